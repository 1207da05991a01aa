// CUDA kernels of the fsinfo_fast fused ops (contract: fsinfo_fast/engine/ops.py).
// Raw-pointer kernels and their launchers only; no torch headers (see kernels.h). The torch
// registration lives in ops_cuda.cpp and is built only where torch has CUDA.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include "../tridiag_ql.h"
#include "kernels.h"

namespace fsinfo_fast_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 16;

inline int64_t blocks_for(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  return b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b);
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline const char* last_error() {
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

#define FSI_GRID_STRIDE(i, n)                                                   \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
       i += (int64_t)blockDim.x * gridDim.x)

// bfloat16 is passed as raw 16-bit storage: the upper half of a float32 (exact widening).
struct bf16_raw {
  uint16_t bits;
};

__device__ __forceinline__ float widen(__half h) { return __half2float(h); }
__device__ __forceinline__ float widen(bf16_raw b) {
  return __uint_as_float(static_cast<unsigned int>(b.bits) << 16);
}
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }

// Sum over the block; every thread gets the result. shm: 33 slots of T.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with shm
  if (lane == 0) shm[wid] = v;
  __syncthreads();
  if (wid == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? shm[lane] : T(0);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shm[32] = v;
  }
  __syncthreads();
  return shm[32];
}

// ---------------------------------------------------------------------------------------------

__global__ void gate_pack_kernel(const bool* __restrict__ mask, uint8_t* __restrict__ out,
                                 int64_t B, int64_t F, int64_t nbytes) {
  FSI_GRID_STRIDE(t, B * nbytes) {
    const int64_t b = t / nbytes, i = t % nbytes;
    const bool* row = mask + b * F + 8 * i;
    const int64_t nb = F - 8 * i < 8 ? F - 8 * i : 8;
    unsigned int byte = 0;
    for (int64_t j = 0; j < nb; ++j) byte |= row[j] ? (1u << j) : 0u;
    out[t] = static_cast<uint8_t>(byte);
  }
}

template <typename T>
__global__ void gate_apply_kernel(const T* __restrict__ V, const uint8_t* __restrict__ packed,
                                  T* __restrict__ out, int64_t B, int64_t K, int64_t F,
                                  int64_t nbytes) {
  FSI_GRID_STRIDE(e, B * K * F) {
    const int64_t f = e % F, b = e / (K * F);
    const unsigned int bit = (packed[b * nbytes + (f >> 3)] >> (f & 7)) & 1u;
    out[e] = V[e] * static_cast<T>(bit);
  }
}

template <typename T, typename S>
__global__ void scale_apply_kernel(const T* __restrict__ V, const S* __restrict__ s,
                                   T* __restrict__ out, int64_t B, int64_t K, int64_t F) {
  FSI_GRID_STRIDE(e, B * K * F) {
    const int64_t f = e % F, b = e / (K * F);
    out[e] = V[e] * static_cast<T>(widen(s[b * F + f]));
  }
}

__device__ __forceinline__ void check_index(int64_t i, int64_t lim) {
  if (i < 0 || i >= lim) {
    printf("fsinfo_fast max-pool kernel: index %lld out of range [0, %lld)\n", (long long)i,
           (long long)lim);
    __trap();
  }
}

template <typename T>
__global__ void maxpool_gather_kernel(const T* __restrict__ V, const int64_t* __restrict__ idx,
                                      T* __restrict__ out, int64_t B, int64_t K, int64_t C,
                                      int64_t Lin, int64_t Lout) {
  FSI_GRID_STRIDE(e, B * K * C * Lout) {
    const int64_t r = e / Lout, o = e % Lout;
    const int64_t b = r / (K * C), c = r % C;
    const int64_t i = idx[(b * C + c) * Lout + o];
    check_index(i, Lin);
    out[e] = V[r * Lin + i];
  }
}

template <typename T>
__global__ void maxpool_scatter_kernel(const T* __restrict__ U, const int64_t* __restrict__ idx,
                                       T* __restrict__ out, int64_t B, int64_t K, int64_t C,
                                       int64_t Lout, int64_t Lin) {
  FSI_GRID_STRIDE(e, B * K * C * Lout) {
    const int64_t r = e / Lout, o = e % Lout;
    const int64_t b = r / (K * C), c = r % C;
    const int64_t i = idx[(b * C + c) * Lout + o];
    check_index(i, Lin);
    atomicAdd(out + r * Lin + i, U[e]);  // overlapping windows
  }
}

// One block per (sample b, group slot t): it owns group (j0 + t) % NG of sample b and the probes
// j = t, t + NG, ...; so no two blocks touch the same group row or norm (deterministic, no
// atomics), and each thread updates its own elements of the group row.
template <typename T>
__global__ void sq_accumulate_kernel(const T* __restrict__ G, double* __restrict__ group_sums,
                                     double* __restrict__ norms, int64_t B, int64_t K, int64_t d,
                                     int64_t NG, int64_t T_slots, int64_t j0m) {
  __shared__ double shm[33];
  for (int64_t task = blockIdx.x; task < B * T_slots; task += gridDim.x) {
    const int64_t b = task / T_slots, t = task % T_slots;
    double* arow = group_sums + (b * NG + (j0m + t) % NG) * d;
    for (int64_t j = t; j < K; j += NG) {
      const T* g = G + (b * K + j) * d;
      double s = 0.0;
      for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const double x = static_cast<double>(g[i]);
        const double x2 = x * x;
        arow[i] += x2;
        s += x2;
      }
      s = block_sum(s, shm);
      if (threadIdx.x == 0) norms[b * K + j] = s;
    }
  }
}

// One block per Lanczos row: alpha = <q, w>; w - alpha q - b_prev q_prev; two classical
// Gram-Schmidt passes against basis rows; beta = ||w||. Each thread owns the elements
// i = threadIdx.x + m * blockDim.x of the output row, so only the dot products synchronise.
template <typename T>
__global__ void lanczos_step_kernel(const T* __restrict__ w, const T* __restrict__ q,
                                    const T* __restrict__ qp, const T* __restrict__ bp,
                                    const T* __restrict__ basis, T* __restrict__ alpha,
                                    T* __restrict__ out, T* __restrict__ beta, int64_t N,
                                    int64_t n, int64_t J) {
  __shared__ T shm[33];
  extern __shared__ __align__(16) unsigned char h_raw[];
  T* h = reinterpret_cast<T*>(h_raw);
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const T* wr = w + r * n;
    const T* qr = q + r * n;
    const T* qpr = qp + r * n;
    const T* Br = basis + r * J * n;
    T* o = out + r * n;
    T s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += qr[i] * wr[i];
    const T a = block_sum(s, shm);
    const T b = bp[r];
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) o[i] = wr[i] - a * qr[i] - b * qpr[i];
    for (int pass = 0; pass < 2; ++pass) {
      for (int64_t t = 0; t < J; ++t) {
        T p = 0;
        const T* bt = Br + t * n;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) p += bt[i] * o[i];
        p = block_sum(p, shm);
        if (threadIdx.x == 0) h[t] = p;
      }
      __syncthreads();
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        T acc = o[i];
        for (int64_t t = 0; t < J; ++t) acc -= h[t] * Br[t * n + i];
        o[i] = acc;
      }
      __syncthreads();  // h is rewritten by the next pass
    }
    s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += o[i] * o[i];
    s = block_sum(s, shm);
    if (threadIdx.x == 0) {
      alpha[r] = a;
      beta[r] = sqrt(s);
    }
  }
}

// One thread per tridiagonal problem (k is small: the Lanczos order).
__global__ void tridiag_eigh_kernel(const double* __restrict__ alpha,
                                    const double* __restrict__ beta, double* __restrict__ theta,
                                    double* __restrict__ tau, double* __restrict__ work,
                                    int64_t N, int64_t k) {
  FSI_GRID_STRIDE(r, N) {
    fsinfo_fast_core::tridiag_eigh_one(alpha + r * k, beta + r * (k - 1), theta + r * k,
                                       tau + r * k, work + r * k, k);
  }
}

template <typename T>
const char* launch_scale(const void* V, int s_dtype, const void* s, void* out, int64_t B,
                         int64_t K, int64_t F, cudaStream_t st) {
  const int64_t n = B * K * F;
  const T* v = static_cast<const T*>(V);
  T* o = static_cast<T*>(out);
  switch (s_dtype) {
    case kFloat32:
      scale_apply_kernel<T, float><<<blocks_for(n), kThreads, 0, st>>>(
          v, static_cast<const float*>(s), o, B, K, F);
      break;
    case kFloat64:
      scale_apply_kernel<T, double><<<blocks_for(n), kThreads, 0, st>>>(
          v, static_cast<const double*>(s), o, B, K, F);
      break;
    case kFloat16:
      scale_apply_kernel<T, __half><<<blocks_for(n), kThreads, 0, st>>>(
          v, static_cast<const __half*>(s), o, B, K, F);
      break;
    case kBFloat16:
      scale_apply_kernel<T, bf16_raw><<<blocks_for(n), kThreads, 0, st>>>(
          v, static_cast<const bf16_raw*>(s), o, B, K, F);
      break;
    default:
      return "scale_apply: unsupported scale dtype";
  }
  return last_error();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------

const char* gate_pack(const bool* mask, uint8_t* out, int64_t B, int64_t F, void* stream) {
  const int64_t nbytes = (F + 7) / 8;
  if (B * nbytes == 0) return nullptr;
  gate_pack_kernel<<<blocks_for(B * nbytes), kThreads, 0, as_stream(stream)>>>(mask, out, B, F,
                                                                               nbytes);
  return last_error();
}

const char* gate_apply(int dtype, const void* V, const uint8_t* packed, void* out, int64_t B,
                       int64_t K, int64_t F, void* stream) {
  const int64_t n = B * K * F;
  if (n == 0) return nullptr;
  const int64_t nbytes = (F + 7) / 8;
  cudaStream_t st = as_stream(stream);
  if (dtype == kFloat32)
    gate_apply_kernel<float><<<blocks_for(n), kThreads, 0, st>>>(
        static_cast<const float*>(V), packed, static_cast<float*>(out), B, K, F, nbytes);
  else if (dtype == kFloat64)
    gate_apply_kernel<double><<<blocks_for(n), kThreads, 0, st>>>(
        static_cast<const double*>(V), packed, static_cast<double*>(out), B, K, F, nbytes);
  else
    return "gate_apply: V must be float32 or float64";
  return last_error();
}

const char* scale_apply(int dtype, const void* V, int s_dtype, const void* s, void* out,
                        int64_t B, int64_t K, int64_t F, void* stream) {
  if (B * K * F == 0) return nullptr;
  if (dtype == kFloat32) return launch_scale<float>(V, s_dtype, s, out, B, K, F, as_stream(stream));
  if (dtype == kFloat64)
    return launch_scale<double>(V, s_dtype, s, out, B, K, F, as_stream(stream));
  return "scale_apply: V must be float32 or float64";
}

const char* maxpool_gather(int dtype, const void* V, const int64_t* idx, void* out, int64_t B,
                           int64_t K, int64_t C, int64_t Lin, int64_t Lout, void* stream) {
  const int64_t n = B * K * C * Lout;
  if (n == 0) return nullptr;
  cudaStream_t st = as_stream(stream);
  if (dtype == kFloat32)
    maxpool_gather_kernel<float><<<blocks_for(n), kThreads, 0, st>>>(
        static_cast<const float*>(V), idx, static_cast<float*>(out), B, K, C, Lin, Lout);
  else if (dtype == kFloat64)
    maxpool_gather_kernel<double><<<blocks_for(n), kThreads, 0, st>>>(
        static_cast<const double*>(V), idx, static_cast<double*>(out), B, K, C, Lin, Lout);
  else
    return "maxpool_gather: V must be float32 or float64";
  return last_error();
}

const char* maxpool_scatter(int dtype, const void* U, const int64_t* idx, void* out, int64_t B,
                            int64_t K, int64_t C, int64_t Lout, int64_t Lin, void* stream) {
  const int64_t n = B * K * C * Lout;
  if (n == 0) return nullptr;
  cudaStream_t st = as_stream(stream);
  if (dtype == kFloat32)
    maxpool_scatter_kernel<float><<<blocks_for(n), kThreads, 0, st>>>(
        static_cast<const float*>(U), idx, static_cast<float*>(out), B, K, C, Lout, Lin);
  else if (dtype == kFloat64)
    maxpool_scatter_kernel<double><<<blocks_for(n), kThreads, 0, st>>>(
        static_cast<const double*>(U), idx, static_cast<double*>(out), B, K, C, Lout, Lin);
  else
    return "maxpool_scatter: U must be float32 or float64";
  return last_error();
}

const char* sq_accumulate(int dtype, const void* G, double* group_sums, double* norms, int64_t B,
                          int64_t K, int64_t d, int64_t NG, int64_t j0, void* stream) {
  if (B * K == 0) return nullptr;
  if (NG < 1) return "sq_accumulate: need at least one group";
  const int64_t T_slots = K < NG ? K : NG;
  const int64_t j0m = ((j0 % NG) + NG) % NG;
  const int64_t tasks = B * T_slots;
  const int64_t grid = tasks < kMaxBlocks ? tasks : kMaxBlocks;
  cudaStream_t st = as_stream(stream);
  if (dtype == kFloat32)
    sq_accumulate_kernel<float><<<grid, kThreads, 0, st>>>(static_cast<const float*>(G),
                                                           group_sums, norms, B, K, d, NG,
                                                           T_slots, j0m);
  else if (dtype == kFloat64)
    sq_accumulate_kernel<double><<<grid, kThreads, 0, st>>>(static_cast<const double*>(G),
                                                            group_sums, norms, B, K, d, NG,
                                                            T_slots, j0m);
  else
    return "sq_accumulate: G must be float32 or float64";
  return last_error();
}

const char* lanczos_step(int dtype, const void* w, const void* q, const void* q_prev,
                         const void* b_prev, const void* basis, void* alpha, void* out,
                         void* beta, int64_t N, int64_t n, int64_t J, void* stream) {
  if (N == 0) return nullptr;
  const int64_t grid = N < kMaxBlocks ? N : kMaxBlocks;
  cudaStream_t st = as_stream(stream);
  const size_t elem = dtype == kFloat64 ? sizeof(double) : sizeof(float);
  const size_t shmem = static_cast<size_t>(J > 0 ? J : 1) * elem;
  if (shmem > 48 * 1024) return "lanczos_step: too many basis rows for one block's shared memory";
  if (dtype == kFloat32)
    lanczos_step_kernel<float><<<grid, kThreads, shmem, st>>>(
        static_cast<const float*>(w), static_cast<const float*>(q),
        static_cast<const float*>(q_prev), static_cast<const float*>(b_prev),
        static_cast<const float*>(basis), static_cast<float*>(alpha), static_cast<float*>(out),
        static_cast<float*>(beta), N, n, J);
  else if (dtype == kFloat64)
    lanczos_step_kernel<double><<<grid, kThreads, shmem, st>>>(
        static_cast<const double*>(w), static_cast<const double*>(q),
        static_cast<const double*>(q_prev), static_cast<const double*>(b_prev),
        static_cast<const double*>(basis), static_cast<double*>(alpha),
        static_cast<double*>(out), static_cast<double*>(beta), N, n, J);
  else
    return "lanczos_step: inputs must be float32 or float64";
  return last_error();
}

const char* tridiag_eigh(const double* alpha, const double* beta, double* theta, double* tau,
                         double* work, int64_t N, int64_t k, void* stream) {
  if (N == 0 || k == 0) return nullptr;
  const int threads = 64;  // one problem per thread; registers and local memory, not shared
  const int64_t grid = (N + threads - 1) / threads;
  tridiag_eigh_kernel<<<grid < kMaxBlocks ? grid : kMaxBlocks, threads, 0, as_stream(stream)>>>(
      alpha, beta, theta, tau, work, N, k);
  return last_error();
}

}  // namespace fsinfo_fast_cuda
