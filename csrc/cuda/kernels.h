// Launchers of the fsinfo_fast CUDA kernels (cuda/kernels.cu). Plain C++: no torch or CUDA
// headers, so the binding (ops_cuda.cpp) and the kernels compile separately, and `nvcc -c
// kernels.cu` works on a machine whose torch has no CUDA.
//
// All pointers are device pointers to contiguous arrays; `stream` is a cudaStream_t. Each
// launcher enqueues its kernels on that stream and returns nullptr, or the CUDA error string of a
// failed launch. Shapes follow fsinfo_fast/engine/ops.py.
#pragma once

#include <stdint.h>

namespace fsinfo_fast_cuda {

// dtype codes of the tensors behind `const void*` arguments
enum Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

const char* gate_pack(const bool* mask, uint8_t* out, int64_t B, int64_t F, void* stream);

const char* gate_apply(int dtype, const void* V, const uint8_t* packed, void* out, int64_t B,
                       int64_t K, int64_t F, void* stream);

const char* scale_apply(int dtype, const void* V, int s_dtype, const void* s, void* out,
                        int64_t B, int64_t K, int64_t F, void* stream);

const char* maxpool_gather(int dtype, const void* V, const int64_t* idx, void* out, int64_t B,
                           int64_t K, int64_t C, int64_t Lin, int64_t Lout, void* stream);

// `out` [B, K, C, Lin] must be zeroed by the caller.
const char* maxpool_scatter(int dtype, const void* U, const int64_t* idx, void* out, int64_t B,
                            int64_t K, int64_t C, int64_t Lout, int64_t Lin, void* stream);

// group_sums [B, NG, d] float64 updated in place; norms [B, K] float64.
const char* sq_accumulate(int dtype, const void* G, double* group_sums, double* norms, int64_t B,
                          int64_t K, int64_t d, int64_t NG, int64_t j0, void* stream);

// All of w, q, q_prev [N, n], b_prev [N], basis [N, J, n], alpha [N], out [N, n], beta [N] share
// `dtype` (float32 or float64).
const char* lanczos_step(int dtype, const void* w, const void* q, const void* q_prev,
                         const void* b_prev, const void* basis, void* alpha, void* out,
                         void* beta, int64_t N, int64_t n, int64_t J, void* stream);

// alpha [N, k], beta [N, k-1] -> theta, tau [N, k]; work: N * k doubles of scratch.
const char* tridiag_eigh(const double* alpha, const double* beta, double* theta, double* tau,
                         double* work, int64_t N, int64_t k, void* stream);

}  // namespace fsinfo_fast_cuda
