// fsinfo_fast._C: the fused ops of the compiled engine as torch library ops (namespace
// fsinfo_fast), with their CPU kernels. The contract (shapes, dtypes, meaning) is
// fsinfo_fast/engine/ops.py; TorchOps there is the reference these kernels are tested against.
// Fake (meta) kernels are registered in Python (fsinfo_fast/engine/compiled.py); the CUDA kernels
// live in csrc/cuda/ and are registered only in a CUDA build.
//
// Small headers on purpose (not torch/extension.h): the build takes ~20 s instead of ~50 s.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "op_checks.h"
#include "tridiag_ql.h"

#ifndef FSINFO_FAST_WITH_CUDA
#define FSINFO_FAST_WITH_CUDA 0
#endif

namespace fsinfo_fast {
namespace {

using at::Tensor;

// Elements per parallel chunk: small problems stay on one thread.
constexpr int64_t kGrainElems = 1 << 15;

inline int64_t grain_rows(int64_t row_len) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, row_len));
}

// ------------------------------------------------------------------------------------------
// Gates: bit-packed 0/1 derivative state
// ------------------------------------------------------------------------------------------

Tensor gate_pack_cpu(const Tensor& mask_in) {
  checks::gate_pack(mask_in);
  const Tensor mask = mask_in.contiguous();
  const int64_t B = mask.size(0), F = mask.size(1), nbytes = (F + 7) / 8;
  Tensor out = at::empty({B, nbytes}, mask.options().dtype(at::kByte));
  const bool* m = mask.data_ptr<bool>();
  uint8_t* o = out.data_ptr<uint8_t>();
  at::parallel_for(0, B * nbytes, kGrainElems / 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / nbytes, i = t % nbytes;
      const bool* row = m + b * F + 8 * i;
      const int64_t nb = std::min<int64_t>(8, F - 8 * i);
      uint8_t byte = 0;
      for (int64_t j = 0; j < nb; ++j) byte |= static_cast<uint8_t>(row[j] ? 1u << j : 0u);
      o[t] = byte;
    }
  });
  return out;
}

// out[i] = v[i] * g[i]: the inner loop of the gate/scale ops. On x86-64 GCC also compiles an
// AVX2 clone, picked at load time (the baseline build is SSE2 only).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FSI_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FSI_CLONES
#endif

FSI_CLONES void mul_row(float* __restrict__ o, const float* __restrict__ v,
                        const float* __restrict__ g, int64_t n) {
  _Pragma("omp simd")
  for (int64_t i = 0; i < n; ++i) o[i] = v[i] * g[i];
}

FSI_CLONES void mul_row(double* __restrict__ o, const double* __restrict__ v,
                        const double* __restrict__ g, int64_t n) {
  _Pragma("omp simd")
  for (int64_t i = 0; i < n; ++i) o[i] = v[i] * g[i];
}

// Applies a per-sample row (expanded once per sample into a thread-local buffer of V's dtype) to
// the K tangent rows of that sample: out[b, k, :] = V[b, k, :] * row_b. The inner loop is a
// contiguous multiply that the compiler vectorises.
template <typename scalar_t, typename Expand>
void apply_rowwise(const Tensor& V, Tensor& out, Expand expand_row) {
  const int64_t B = V.size(0), K = V.size(1), F = V.size(2);
  const scalar_t* v = V.const_data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * K, grain_rows(F), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> row(static_cast<size_t>(F));
    int64_t cur_b = -1;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / K;
      if (b != cur_b) {
        expand_row(b, row.data());
        cur_b = b;
      }
      mul_row(o + r * F, v + r * F, row.data(), F);
    }
  });
}

Tensor gate_apply_cpu(const Tensor& V_in, const Tensor& packed_in) {
  checks::gate_apply(V_in, packed_in);
  const int64_t F = V_in.size(2);
  const Tensor V = V_in.contiguous();
  const Tensor packed = packed_in.contiguous();
  Tensor out = at::empty(V.sizes(), V.options());
  if (V.numel() == 0) return out;
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const int64_t nbytes = packed.size(1);
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "fsinfo_fast::gate_apply", [&] {
    apply_rowwise<scalar_t>(V, out, [&](int64_t b, scalar_t* row) {
      const uint8_t* pb = p + b * nbytes;
      for (int64_t f = 0; f < F; ++f) row[f] = static_cast<scalar_t>((pb[f >> 3] >> (f & 7)) & 1);
    });
  });
  return out;
}

Tensor scale_apply_cpu(const Tensor& V_in, const Tensor& s_in) {
  checks::scale_apply(V_in, s_in);
  const Tensor V = V_in.contiguous();
  const Tensor s = s_in.contiguous();
  Tensor out = at::empty(V.sizes(), V.options());
  if (V.numel() == 0) return out;
  const int64_t F = V.size(2);
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "fsinfo_fast::scale_apply", [&] {
    using vt = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(),
                                    "fsinfo_fast::scale_apply(s)", [&] {
      using st = scalar_t;
      const st* sp = s.const_data_ptr<st>();
      // s.to(V.dtype): half/bfloat16 -> float is exact; double -> float rounds as torch does.
      apply_rowwise<vt>(V, out, [&](int64_t b, vt* row) {
        const st* sb = sp + b * F;
        for (int64_t f = 0; f < F; ++f) {
          if constexpr (std::is_same_v<st, at::Half> || std::is_same_v<st, at::BFloat16>) {
            row[f] = static_cast<vt>(static_cast<float>(sb[f]));
          } else {
            row[f] = static_cast<vt>(sb[f]);
          }
        }
      });
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// Max-pool: gather (JVP) and its adjoint scatter-add (VJP)
// ------------------------------------------------------------------------------------------

void check_pool_index(const Tensor& idx, int64_t lin, const char* op) {
  if (idx.numel() == 0) return;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const int64_t n = idx.numel();
  int64_t lo = ip[0], hi = ip[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, ip[i]);
    hi = std::max(hi, ip[i]);
  }
  TORCH_CHECK(lo >= 0 && hi < lin, "fsinfo_fast::", op, ": index out of range [0, ", lin,
              "): found values in [", lo, ", ", hi, "]");
}

Tensor maxpool_gather_cpu(const Tensor& V_in, const Tensor& idx_in) {
  checks::maxpool_gather(V_in, idx_in);
  const Tensor V = V_in.contiguous();
  const Tensor idx = idx_in.contiguous();
  const int64_t B = V.size(0), K = V.size(1), C = V.size(2), Lin = V.size(3),
                Lout = idx.size(2);
  Tensor out = at::empty({B, K, C, Lout}, V.options());
  if (out.numel() == 0) return out;
  check_pool_index(idx, Lin, "maxpool_gather");
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(V.scalar_type(), "fsinfo_fast::maxpool_gather", [&] {
    const scalar_t* v = V.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * K * C, grain_rows(Lout), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (K * C), c = r % C;
        const int64_t* ir = ip + (b * C + c) * Lout;
        const scalar_t* vr = v + r * Lin;
        scalar_t* orow = o + r * Lout;
        for (int64_t i = 0; i < Lout; ++i) orow[i] = vr[ir[i]];
      }
    });
  });
  return out;
}

Tensor maxpool_scatter_cpu(const Tensor& U_in, const Tensor& idx_in, int64_t lin) {
  checks::maxpool_scatter(U_in, idx_in, lin);
  const Tensor U = U_in.contiguous();
  const Tensor idx = idx_in.contiguous();
  const int64_t B = U.size(0), K = U.size(1), C = U.size(2), Lout = U.size(3);
  Tensor out = at::empty({B, K, C, lin}, U.options());
  if (out.numel() == 0) return out;
  if (U.numel() == 0) return out.zero_();
  check_pool_index(idx, lin, "maxpool_scatter");
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "fsinfo_fast::maxpool_scatter", [&] {
    const scalar_t* u = U.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // One row (b, k, c) per task: overlapping windows add into the same row, never across tasks.
    at::parallel_for(0, B * K * C, grain_rows(Lout + lin), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / (K * C), c = r % C;
        const int64_t* ir = ip + (b * C + c) * Lout;
        const scalar_t* ur = u + r * Lout;
        scalar_t* orow = o + r * lin;
        std::fill(orow, orow + lin, scalar_t(0));  // zeroed here, while the row is in cache
        for (int64_t i = 0; i < Lout; ++i) orow[ir[i]] += ur[i];
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// Fused probe reduction: group sums of squares (in place) and per-probe squared norms
// ------------------------------------------------------------------------------------------

Tensor sq_accumulate_cpu(const Tensor& G_in, Tensor& group_sums, int64_t j0) {
  checks::sq_accumulate(G_in, group_sums);
  const Tensor G = G_in.contiguous();
  const int64_t B = G.size(0), K = G.size(1), d = G.size(2), NG = group_sums.size(1);
  Tensor norms = at::empty({B, K}, G.options().dtype(at::kDouble));
  if (B * K == 0) return norms;
  // Work on a contiguous buffer; copy back only if the caller's tensor was not contiguous.
  Tensor acc = group_sums.is_contiguous() ? group_sums : group_sums.contiguous();
  double* ap = acc.data_ptr<double>();
  double* np_ = norms.data_ptr<double>();
  const int64_t T = std::min(K, NG);  // distinct groups touched per sample
  const int64_t j0m = ((j0 % NG) + NG) % NG;
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "fsinfo_fast::sq_accumulate", [&] {
    const scalar_t* gp = G.const_data_ptr<scalar_t>();
    // Task (b, t) owns group (j0 + t) % Gmax of sample b and the probes j = t, t + Gmax, ...:
    // no two tasks write the same group row or norm, and each group adds its probes in order.
    at::parallel_for(0, B * T, grain_rows(d * ((K + NG - 1) / NG)), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / T, t = task % T;
        double* arow = ap + (b * NG + (j0m + t) % NG) * d;
        for (int64_t j = t; j < K; j += NG) {
          const scalar_t* g = gp + (b * K + j) * d;
          double s = 0.0;
          _Pragma("omp simd reduction(+ : s)")
          for (int64_t i = 0; i < d; ++i) {
            const double x = static_cast<double>(g[i]);
            const double x2 = x * x;
            arow[i] += x2;
            s += x2;
          }
          np_[b * K + j] = s;
        }
      }
    });
  });
  if (!acc.is_same(group_sums)) group_sums.copy_(acc);
  return norms;
}

// ------------------------------------------------------------------------------------------
// Batched Lanczos step (after the matvec) with two classical Gram-Schmidt passes
// ------------------------------------------------------------------------------------------

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  _Pragma("omp simd reduction(+ : s)")
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

std::tuple<Tensor, Tensor, Tensor> lanczos_step_cpu(const Tensor& w_in, const Tensor& q_in,
                                                    const Tensor& qp_in, const Tensor& bp_in,
                                                    const Tensor& basis_in) {
  checks::lanczos_step(w_in, q_in, qp_in, bp_in, basis_in);
  const int64_t N = w_in.size(0), n = w_in.size(1);
  const auto dt = w_in.scalar_type();
  const Tensor w = w_in.contiguous(), q = q_in.contiguous(), qp = qp_in.contiguous(),
               bp = bp_in.contiguous(), basis = basis_in.contiguous();
  const int64_t J = basis.size(1);
  Tensor alpha = at::empty({N}, w.options());
  Tensor beta = at::empty({N}, w.options());
  Tensor out = at::empty({N, n}, w.options());
  if (N == 0) return {alpha, out, beta};
  AT_DISPATCH_FLOATING_TYPES(dt, "fsinfo_fast::lanczos_step", [&] {
    const scalar_t *wp = w.const_data_ptr<scalar_t>(), *qq = q.const_data_ptr<scalar_t>(),
                   *qpp = qp.const_data_ptr<scalar_t>(), *bpp = bp.const_data_ptr<scalar_t>(),
                   *Bp = basis.const_data_ptr<scalar_t>();
    scalar_t *ap = alpha.data_ptr<scalar_t>(), *betap = beta.data_ptr<scalar_t>(),
             *op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(n * (J + 1)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> h(static_cast<size_t>(std::max<int64_t>(J, 1)));
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* wr = wp + r * n;
        const scalar_t* qr = qq + r * n;
        const scalar_t* qpr = qpp + r * n;
        const scalar_t* Br = Bp + r * J * n;
        scalar_t* o = op + r * n;
        const scalar_t a = dot(qr, wr, n), b = bpp[r];
        _Pragma("omp simd")
        for (int64_t i = 0; i < n; ++i) o[i] = wr[i] - a * qr[i] - b * qpr[i];
        for (int pass = 0; pass < 2; ++pass) {
          for (int64_t t = 0; t < J; ++t) h[t] = dot(Br + t * n, o, n);
          for (int64_t t = 0; t < J; ++t) {
            const scalar_t ht = h[t];
            const scalar_t* bt = Br + t * n;
            _Pragma("omp simd")
            for (int64_t i = 0; i < n; ++i) o[i] -= ht * bt[i];
          }
        }
        ap[r] = a;
        betap[r] = std::sqrt(dot(o, o, n));
      }
    });
  });
  return {alpha, out, beta};
}

// ------------------------------------------------------------------------------------------
// Batched symmetric tridiagonal eigensolver (Gauss quadrature nodes and weights)
// ------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> tridiag_eigh_cpu(const Tensor& alpha_in, const Tensor& beta_in) {
  checks::tridiag_eigh(alpha_in, beta_in);
  const int64_t k = alpha_in.size(-1);
  const Tensor alpha = alpha_in.contiguous(), beta = beta_in.contiguous();
  Tensor theta = at::empty(alpha.sizes(), alpha.options());
  Tensor tau = at::empty(alpha.sizes(), alpha.options());
  const int64_t N = alpha.numel() / k;
  if (N == 0) return {theta, tau};
  const double* ap = alpha.const_data_ptr<double>();
  const double* bp = beta.const_data_ptr<double>();
  double* th = theta.data_ptr<double>();
  double* ta = tau.data_ptr<double>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / (k * k)), [&](int64_t begin, int64_t end) {
    std::vector<double> e(static_cast<size_t>(k));
    for (int64_t r = begin; r < end; ++r)
      fsinfo_fast_core::tridiag_eigh_one(ap + r * k, bp + r * (k - 1), th + r * k, ta + r * k,
                                         e.data(), k);
  });
  return {theta, tau};
}

// ------------------------------------------------------------------------------------------
// Probe hashing (fsinfo_fast/estimators/probes.py): the integer part of draw_probes
// ------------------------------------------------------------------------------------------

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// The hashing loops vectorise only with 64-bit multiplies: AVX2 emulates them, AVX-512DQ has
// them (x86-64-v4 clone, dispatched on CPU features since GCC 12). Integer math and exact
// conversions only, so every clone gives the same bits.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    __GNUC__ >= 12
#define FSI_HASH_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FSI_HASH_CLONES FSI_CLONES
#endif

// splitmix64 finaliser (Steele, Lea and Flood 2014), as _fmix in probes.py.
inline uint64_t fmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// 53-bit uniform on (0, 1), as _uniform53: h >> 11 < 2^53 converts exactly, then the same two
// IEEE operations as the torch expression (an add that rounds to nearest even, an exact
// power-of-2 scaling), so the value is bit-identical.
inline double uniform53(uint64_t h) {
  return (static_cast<double>(static_cast<int64_t>(h >> 11)) + 0.5) * 0x1p-53;
}

FSI_HASH_CLONES void uniform_pairs_row(double* __restrict__ u1, double* __restrict__ u2,
                                       uint64_t key, int64_t pairs) {
  _Pragma("omp simd")
  for (int64_t p = 0; p < pairs; ++p) {
    const uint64_t e1 = key + static_cast<uint64_t>(2 * p + 1) * kGolden;
    u1[p] = uniform53(fmix64(e1));
    u2[p] = uniform53(fmix64(e1 + kGolden));
  }
}

// u[0, r, p] = u53(fmix(keys[r] + (2p + 1) G)), u[1, r, p] = u53(fmix(keys[r] + (2p + 2) G)):
// the two uniforms of Box-Muller pair p of probe row r (float64, [2, R, pairs]).
Tensor probe_uniforms_cpu(const Tensor& keys_in, int64_t pairs) {
  checks::probe_keys(keys_in, "probe_uniforms", pairs, "pairs");
  const Tensor keys = keys_in.contiguous();
  const int64_t R = keys.size(0);
  Tensor u = at::empty({2, R, pairs}, keys.options().dtype(at::kDouble));
  if (R * pairs == 0) return u;
  const int64_t* kp = keys.const_data_ptr<int64_t>();
  double* up = u.data_ptr<double>();
  at::parallel_for(0, R, grain_rows(2 * pairs), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      uniform_pairs_row(up + r * pairs, up + (R + r) * pairs, static_cast<uint64_t>(kp[r]), pairs);
  });
  return u;
}

// Rademacher signs written as bit patterns: the IEEE encoding of 1.0 (`one`) with the sign bit
// of the hash (the top bit: negative as an int64, as in probes.py) moved into the sign position.
FSI_HASH_CLONES void signs_row(uint64_t* __restrict__ o, uint64_t key, int64_t n) {
  _Pragma("omp simd")
  for (int64_t e = 0; e < n; ++e)
    o[e] = 0x3FF0000000000000ull | (fmix64(key + static_cast<uint64_t>(e + 1) * kGolden) &
                                    0x8000000000000000ull);
}

FSI_HASH_CLONES void signs_row(uint32_t* __restrict__ o, uint64_t key, int64_t n) {
  _Pragma("omp simd")
  for (int64_t e = 0; e < n; ++e)
    o[e] = 0x3F800000u |
           static_cast<uint32_t>(fmix64(key + static_cast<uint64_t>(e + 1) * kGolden) >> 63 << 31);
}

FSI_HASH_CLONES void signs_row(uint16_t* __restrict__ o, uint64_t key, int64_t n, uint16_t one) {
  _Pragma("omp simd")
  for (int64_t e = 0; e < n; ++e)
    o[e] = one | static_cast<uint16_t>(
                     fmix64(key + static_cast<uint64_t>(e + 1) * kGolden) >> 63 << 15);
}

// out[r, e] = -1 if fmix(keys[r] + (e + 1) G) has its top bit set, else +1 ([R, n], dtype).
Tensor probe_signs_cpu(const Tensor& keys_in, int64_t n, at::ScalarType dtype) {
  checks::probe_keys(keys_in, "probe_signs", n, "n");
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "fsinfo_fast::probe_signs: dtype must be float64, float32, float16 or bfloat16, "
              "got ", dtype);
  const Tensor keys = keys_in.contiguous();
  const int64_t R = keys.size(0);
  Tensor out = at::empty({R, n}, keys.options().dtype(dtype));
  if (R * n == 0) return out;
  const int64_t* kp = keys.const_data_ptr<int64_t>();
  void* op = out.data_ptr();
  at::parallel_for(0, R, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint64_t key = static_cast<uint64_t>(kp[r]);
      switch (dtype) {
        case at::kDouble: signs_row(static_cast<uint64_t*>(op) + r * n, key, n); break;
        case at::kFloat: signs_row(static_cast<uint32_t*>(op) + r * n, key, n); break;
        case at::kHalf: signs_row(static_cast<uint16_t*>(op) + r * n, key, n, 0x3C00); break;
        default: signs_row(static_cast<uint16_t*>(op) + r * n, key, n, 0x3F80); break;  // bf16
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(fsinfo_fast, m) {
  m.def("gate_pack(Tensor mask) -> Tensor");
  m.def("gate_apply(Tensor V, Tensor packed) -> Tensor");
  m.def("scale_apply(Tensor V, Tensor s) -> Tensor");
  m.def("maxpool_gather(Tensor V, Tensor idx) -> Tensor");
  m.def("maxpool_scatter(Tensor U, Tensor idx, int lin) -> Tensor");
  m.def("sq_accumulate(Tensor G, Tensor(a!) group_sums, int j0) -> Tensor");
  m.def(
      "lanczos_step(Tensor w, Tensor q, Tensor q_prev, Tensor b_prev, Tensor basis) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("tridiag_eigh(Tensor alpha, Tensor beta) -> (Tensor, Tensor)");
  m.def("probe_uniforms(Tensor keys, int pairs) -> Tensor");
  m.def("probe_signs(Tensor keys, int n, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fsinfo_fast, CPU, m) {
  m.impl("gate_pack", &gate_pack_cpu);
  m.impl("gate_apply", &gate_apply_cpu);
  m.impl("scale_apply", &scale_apply_cpu);
  m.impl("maxpool_gather", &maxpool_gather_cpu);
  m.impl("maxpool_scatter", &maxpool_scatter_cpu);
  m.impl("sq_accumulate", &sq_accumulate_cpu);
  m.impl("lanczos_step", &lanczos_step_cpu);
  m.impl("tridiag_eigh", &tridiag_eigh_cpu);
  m.impl("probe_uniforms", &probe_uniforms_cpu);
  m.impl("probe_signs", &probe_signs_cpu);
}

}  // namespace fsinfo_fast

// A plain Python module so that `import fsinfo_fast._C` loads the library (and runs the
// registrations above); it carries only build facts.
static struct PyModuleDef fsinfo_fast_C_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "fsinfo_fast compiled ops: registers torch.ops.fsinfo_fast.* (CPU, and CUDA when built).", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&fsinfo_fast_C_module);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", FSINFO_FAST_WITH_CUDA) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
