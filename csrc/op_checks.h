// Argument checks of the fsinfo_fast ops, shared by the CPU (ops.cpp) and CUDA
// (cuda/ops_cuda.cpp) kernels so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fsinfo_fast {
namespace checks {

using at::Tensor;

inline void float_tangent(const Tensor& V, const char* op, const char* name) {
  TORCH_CHECK(V.scalar_type() == at::kFloat || V.scalar_type() == at::kDouble, "fsinfo_fast::", op,
              ": ", name, " must be float32 or float64, got ", V.scalar_type());
}

inline void gate_pack(const Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2, "fsinfo_fast::gate_pack expects mask [B, F], got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "fsinfo_fast::gate_pack expects a bool mask, got ",
              mask.scalar_type());
}

inline void gate_apply(const Tensor& V, const Tensor& packed) {
  TORCH_CHECK(V.dim() == 3, "fsinfo_fast::gate_apply expects V [B, K, F], got ", V.sizes());
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte,
              "fsinfo_fast::gate_apply expects packed [B, ceil(F/8)] uint8, got ", packed.sizes(),
              " ", packed.scalar_type());
  float_tangent(V, "gate_apply", "V");
  const int64_t B = V.size(0), F = V.size(2);
  TORCH_CHECK(packed.size(0) == B && packed.size(1) == (F + 7) / 8,
              "fsinfo_fast::gate_apply: packed must be [", B, ", ", (F + 7) / 8, "], got ",
              packed.sizes());
}

inline void scale_apply(const Tensor& V, const Tensor& s) {
  TORCH_CHECK(V.dim() == 3, "fsinfo_fast::scale_apply expects V [B, K, F], got ", V.sizes());
  TORCH_CHECK(s.dim() == 2 && s.size(0) == V.size(0) && s.size(1) == V.size(2),
              "fsinfo_fast::scale_apply: s must be [B, F] = [", V.size(0), ", ", V.size(2),
              "], got ", s.sizes());
  float_tangent(V, "scale_apply", "V");
  const auto st = s.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
              "fsinfo_fast::scale_apply: s must be a floating dtype, got ", st);
}

inline void maxpool_gather(const Tensor& V, const Tensor& idx) {
  TORCH_CHECK(V.dim() == 4, "fsinfo_fast::maxpool_gather expects V [B, K, C, Lin], got ",
              V.sizes());
  TORCH_CHECK(idx.dim() == 3 && idx.scalar_type() == at::kLong && idx.size(0) == V.size(0) &&
                  idx.size(1) == V.size(2),
              "fsinfo_fast::maxpool_gather expects idx [B, C, Lout] int64 matching V, got ",
              idx.sizes(), " ", idx.scalar_type());
  float_tangent(V, "maxpool_gather", "V");
}

inline void maxpool_scatter(const Tensor& U, const Tensor& idx, int64_t lin) {
  TORCH_CHECK(U.dim() == 4, "fsinfo_fast::maxpool_scatter expects U [B, K, C, Lout], got ",
              U.sizes());
  TORCH_CHECK(idx.dim() == 3 && idx.scalar_type() == at::kLong && idx.size(0) == U.size(0) &&
                  idx.size(1) == U.size(2) && idx.size(2) == U.size(3),
              "fsinfo_fast::maxpool_scatter expects idx [B, C, Lout] int64 matching U, got ",
              idx.sizes(), " ", idx.scalar_type());
  TORCH_CHECK(lin >= 0, "fsinfo_fast::maxpool_scatter: lin must be >= 0, got ", lin);
  float_tangent(U, "maxpool_scatter", "U");
}

inline void sq_accumulate(const Tensor& G, const Tensor& group_sums) {
  TORCH_CHECK(G.dim() == 3, "fsinfo_fast::sq_accumulate expects G [B, K, d], got ", G.sizes());
  float_tangent(G, "sq_accumulate", "G");
  TORCH_CHECK(group_sums.dim() == 3 && group_sums.scalar_type() == at::kDouble &&
                  group_sums.size(0) == G.size(0) && group_sums.size(2) == G.size(2) &&
                  group_sums.size(1) >= 1,
              "fsinfo_fast::sq_accumulate expects group_sums [B, Gmax >= 1, d] float64 matching "
              "G, got ", group_sums.sizes(), " ", group_sums.scalar_type());
}

inline void lanczos_step(const Tensor& w, const Tensor& q, const Tensor& qp, const Tensor& bp,
                         const Tensor& basis) {
  TORCH_CHECK(w.dim() == 2, "fsinfo_fast::lanczos_step expects w [N, n], got ", w.sizes());
  const int64_t N = w.size(0), n = w.size(1);
  TORCH_CHECK(q.sizes() == w.sizes() && qp.sizes() == w.sizes(),
              "fsinfo_fast::lanczos_step: q and q_prev must be [", N, ", ", n, "], got ",
              q.sizes(), " and ", qp.sizes());
  TORCH_CHECK(bp.dim() == 1 && bp.size(0) == N, "fsinfo_fast::lanczos_step: b_prev must be [", N,
              "], got ", bp.sizes());
  TORCH_CHECK(basis.dim() == 3 && basis.size(0) == N && basis.size(2) == n,
              "fsinfo_fast::lanczos_step: basis must be [", N, ", j, ", n, "], got ",
              basis.sizes());
  float_tangent(w, "lanczos_step", "w");
  const auto dt = w.scalar_type();
  TORCH_CHECK(q.scalar_type() == dt && qp.scalar_type() == dt && bp.scalar_type() == dt &&
                  basis.scalar_type() == dt,
              "fsinfo_fast::lanczos_step: all inputs must share w's dtype ", dt);
}

inline void tridiag_eigh(const Tensor& alpha, const Tensor& beta) {
  TORCH_CHECK(alpha.dim() >= 1, "fsinfo_fast::tridiag_eigh expects alpha [..., k], got ",
              alpha.sizes());
  const int64_t k = alpha.size(-1);
  TORCH_CHECK(k >= 1, "fsinfo_fast::tridiag_eigh needs k >= 1");
  TORCH_CHECK(beta.dim() == alpha.dim() &&
                  beta.sizes().slice(0, beta.dim() - 1) == alpha.sizes().slice(0, alpha.dim() - 1) &&
                  beta.size(-1) == k - 1,
              "fsinfo_fast::tridiag_eigh: beta must be [..., k-1] matching alpha ", alpha.sizes(),
              ", got ", beta.sizes());
  TORCH_CHECK(alpha.scalar_type() == at::kDouble && beta.scalar_type() == at::kDouble,
              "fsinfo_fast::tridiag_eigh expects float64 alpha and beta, got ", alpha.scalar_type(),
              " and ", beta.scalar_type());
}

// Per-(sample, probe) keys of the probe hashing ops: [R] int64, and a row length >= 0.
inline void probe_keys(const Tensor& keys, const char* op, int64_t len, const char* len_name) {
  TORCH_CHECK(keys.dim() == 1 && keys.scalar_type() == at::kLong, "fsinfo_fast::", op,
              " expects keys [R] int64, got ", keys.sizes(), " ", keys.scalar_type());
  TORCH_CHECK(len >= 0, "fsinfo_fast::", op, ": ", len_name, " must be >= 0, got ", len);
}

// All tensors on one device (the CUDA kernels index raw pointers).
inline void same_device(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = *ts.begin();
  for (const Tensor* t : ts)
    TORCH_CHECK(t->device() == first->device(), "fsinfo_fast::", op,
                ": all tensors must be on one device, got ", first->device(), " and ",
                t->device());
}

}  // namespace checks
}  // namespace fsinfo_fast
