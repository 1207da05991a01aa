// CUDA registrations of the fsinfo_fast ops: argument checks (shared with the CPU kernels),
// output allocation and the current stream, then the raw-pointer launchers of kernels.cu.
// Built only where torch has CUDA (setup.py / CMakeLists.txt decide).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../op_checks.h"
#include "kernels.h"

namespace fsinfo_fast {
namespace {

using at::Tensor;
namespace k = fsinfo_fast_cuda;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return k::kFloat32;
    case at::kDouble: return k::kFloat64;
    case at::kHalf: return k::kFloat16;
    case at::kBFloat16: return k::kBFloat16;
    default: TORCH_CHECK(false, "fsinfo_fast: unsupported dtype ", t);
  }
  return -1;
}

void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

void launched(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, "fsinfo_fast::", op, " (CUDA): ", err);
}

Tensor gate_pack_cuda(const Tensor& mask_in) {
  checks::gate_pack(mask_in);
  c10::cuda::CUDAGuard guard(mask_in.device());
  const Tensor mask = mask_in.contiguous();
  const int64_t B = mask.size(0), F = mask.size(1);
  Tensor out = at::empty({B, (F + 7) / 8}, mask.options().dtype(at::kByte));
  launched(k::gate_pack(mask.const_data_ptr<bool>(), out.data_ptr<uint8_t>(), B, F,
                        current_stream()),
           "gate_pack");
  return out;
}

Tensor gate_apply_cuda(const Tensor& V_in, const Tensor& packed_in) {
  checks::gate_apply(V_in, packed_in);
  checks::same_device("gate_apply", {&V_in, &packed_in});
  c10::cuda::CUDAGuard guard(V_in.device());
  const Tensor V = V_in.contiguous(), packed = packed_in.contiguous();
  Tensor out = at::empty(V.sizes(), V.options());
  launched(k::gate_apply(dtype_code(V.scalar_type()), V.const_data_ptr(),
                         packed.const_data_ptr<uint8_t>(), out.data_ptr(), V.size(0), V.size(1),
                         V.size(2), current_stream()),
           "gate_apply");
  return out;
}

Tensor scale_apply_cuda(const Tensor& V_in, const Tensor& s_in) {
  checks::scale_apply(V_in, s_in);
  checks::same_device("scale_apply", {&V_in, &s_in});
  c10::cuda::CUDAGuard guard(V_in.device());
  const Tensor V = V_in.contiguous(), s = s_in.contiguous();
  Tensor out = at::empty(V.sizes(), V.options());
  launched(k::scale_apply(dtype_code(V.scalar_type()), V.const_data_ptr(),
                          dtype_code(s.scalar_type()), s.const_data_ptr(), out.data_ptr(),
                          V.size(0), V.size(1), V.size(2), current_stream()),
           "scale_apply");
  return out;
}

Tensor maxpool_gather_cuda(const Tensor& V_in, const Tensor& idx_in) {
  checks::maxpool_gather(V_in, idx_in);
  checks::same_device("maxpool_gather", {&V_in, &idx_in});
  c10::cuda::CUDAGuard guard(V_in.device());
  const Tensor V = V_in.contiguous(), idx = idx_in.contiguous();
  const int64_t B = V.size(0), K = V.size(1), C = V.size(2), Lin = V.size(3), Lout = idx.size(2);
  Tensor out = at::empty({B, K, C, Lout}, V.options());
  launched(k::maxpool_gather(dtype_code(V.scalar_type()), V.const_data_ptr(),
                             idx.const_data_ptr<int64_t>(), out.data_ptr(), B, K, C, Lin, Lout,
                             current_stream()),
           "maxpool_gather");
  return out;
}

Tensor maxpool_scatter_cuda(const Tensor& U_in, const Tensor& idx_in, int64_t lin) {
  checks::maxpool_scatter(U_in, idx_in, lin);
  checks::same_device("maxpool_scatter", {&U_in, &idx_in});
  c10::cuda::CUDAGuard guard(U_in.device());
  const Tensor U = U_in.contiguous(), idx = idx_in.contiguous();
  const int64_t B = U.size(0), K = U.size(1), C = U.size(2), Lout = U.size(3);
  Tensor out = at::zeros({B, K, C, lin}, U.options());
  launched(k::maxpool_scatter(dtype_code(U.scalar_type()), U.const_data_ptr(),
                              idx.const_data_ptr<int64_t>(), out.data_ptr(), B, K, C, Lout, lin,
                              current_stream()),
           "maxpool_scatter");
  return out;
}

Tensor sq_accumulate_cuda(const Tensor& G_in, Tensor& group_sums, int64_t j0) {
  checks::sq_accumulate(G_in, group_sums);
  checks::same_device("sq_accumulate", {&G_in, &group_sums});
  c10::cuda::CUDAGuard guard(G_in.device());
  const Tensor G = G_in.contiguous();
  const int64_t B = G.size(0), K = G.size(1), d = G.size(2), NG = group_sums.size(1);
  Tensor norms = at::empty({B, K}, G.options().dtype(at::kDouble));
  Tensor acc = group_sums.is_contiguous() ? group_sums : group_sums.contiguous();
  launched(k::sq_accumulate(dtype_code(G.scalar_type()), G.const_data_ptr(),
                            acc.data_ptr<double>(), norms.data_ptr<double>(), B, K, d, NG, j0,
                            current_stream()),
           "sq_accumulate");
  if (!acc.is_same(group_sums)) group_sums.copy_(acc);
  return norms;
}

std::tuple<Tensor, Tensor, Tensor> lanczos_step_cuda(const Tensor& w_in, const Tensor& q_in,
                                                     const Tensor& qp_in, const Tensor& bp_in,
                                                     const Tensor& basis_in) {
  checks::lanczos_step(w_in, q_in, qp_in, bp_in, basis_in);
  checks::same_device("lanczos_step", {&w_in, &q_in, &qp_in, &bp_in, &basis_in});
  c10::cuda::CUDAGuard guard(w_in.device());
  const Tensor w = w_in.contiguous(), q = q_in.contiguous(), qp = qp_in.contiguous(),
               bp = bp_in.contiguous(), basis = basis_in.contiguous();
  const int64_t N = w.size(0), n = w.size(1), J = basis.size(1);
  Tensor alpha = at::empty({N}, w.options());
  Tensor beta = at::empty({N}, w.options());
  Tensor out = at::empty({N, n}, w.options());
  launched(k::lanczos_step(dtype_code(w.scalar_type()), w.const_data_ptr(), q.const_data_ptr(),
                           qp.const_data_ptr(), bp.const_data_ptr(), basis.const_data_ptr(),
                           alpha.data_ptr(), out.data_ptr(), beta.data_ptr(), N, n, J,
                           current_stream()),
           "lanczos_step");
  return {alpha, out, beta};
}

std::tuple<Tensor, Tensor> tridiag_eigh_cuda(const Tensor& alpha_in, const Tensor& beta_in) {
  checks::tridiag_eigh(alpha_in, beta_in);
  checks::same_device("tridiag_eigh", {&alpha_in, &beta_in});
  c10::cuda::CUDAGuard guard(alpha_in.device());
  const Tensor alpha = alpha_in.contiguous(), beta = beta_in.contiguous();
  const int64_t kk = alpha.size(-1), N = alpha.numel() / kk;
  Tensor theta = at::empty(alpha.sizes(), alpha.options());
  Tensor tau = at::empty(alpha.sizes(), alpha.options());
  Tensor work = at::empty({N, kk}, alpha.options());
  launched(k::tridiag_eigh(alpha.const_data_ptr<double>(), beta.const_data_ptr<double>(),
                           theta.data_ptr<double>(), tau.data_ptr<double>(),
                           work.data_ptr<double>(), N, kk, current_stream()),
           "tridiag_eigh");
  return {theta, tau};
}

}  // namespace

TORCH_LIBRARY_IMPL(fsinfo_fast, CUDA, m) {
  m.impl("gate_pack", &gate_pack_cuda);
  m.impl("gate_apply", &gate_apply_cuda);
  m.impl("scale_apply", &scale_apply_cuda);
  m.impl("maxpool_gather", &maxpool_gather_cuda);
  m.impl("maxpool_scatter", &maxpool_scatter_cuda);
  m.impl("sq_accumulate", &sq_accumulate_cuda);
  m.impl("lanczos_step", &lanczos_step_cuda);
  m.impl("tridiag_eigh", &tridiag_eigh_cuda);
}

}  // namespace fsinfo_fast
