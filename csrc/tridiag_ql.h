// Batched symmetric tridiagonal eigensolver core shared by the CPU (ops.cpp) and CUDA
// (cuda/kernels.cu) ops. No torch or CUDA headers: plain C++ that nvcc also compiles for the device.
//
// Implicit QL with Wilkinson-type shifts (the tqli scheme: each sweep chases the bulge from the
// bottom of the unreduced block up to row l, shift = eigenvalue of the leading 2x2 closer to
// d[l]). Only the FIRST row of the eigenvector matrix is tracked (the Gauss quadrature weights of
// Lanczos quadrature are its squares): every Givens rotation updates two entries of that row, so a
// k x k problem costs O(k^2) instead of O(k^3).
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FSI_HD __host__ __device__
#else
#define FSI_HD
#endif

namespace fsinfo_fast_core {

// hypot without its cost (it dominates the solve): the plain formula, with hypot only where
// squaring could overflow or underflow.
FSI_HD inline double fast_hypot(double a, double b) {
  const double r = sqrt(a * a + b * b);
  return (r > 1e-150 && r < 1e150) ? r : hypot(a, b);
}

// Solves one problem in place. d[n]: in the diagonal, out the eigenvalues (unsorted);
// e[n]: in e[0..n-2] the off-diagonal (e[n-1] is workspace), destroyed; z[n]: out the first
// components of the unit eigenvectors, in the order of d. Returns false if an eigenvalue failed to
// converge (non-finite input); the caller then reports NaN.
FSI_HD inline bool tridiag_ql_first_row(double* d, double* e, double* z, int64_t n) {
  const int max_iter = 60;
  for (int64_t i = 0; i < n; ++i) z[i] = (i == 0) ? 1.0 : 0.0;
  if (n <= 0) return true;
  e[n - 1] = 0.0;
  for (int64_t l = 0; l < n; ++l) {
    int iter = 0;
    int64_t m;
    do {
      // Find a negligible off-diagonal element: the block [l, m] is unreduced.
      for (m = l; m < n - 1; ++m) {
        const double dd = fabs(d[m]) + fabs(d[m + 1]);
        if (fabs(e[m]) <= DBL_EPSILON * dd) break;
      }
      if (m != l) {
        if (iter++ == max_iter) return false;
        double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
        double r = fast_hypot(g, 1.0);
        g = d[m] - d[l] + e[l] / (g + copysign(r, g));  // d[m] - shift
        double s = 1.0, c = 1.0, p = 0.0;
        bool underflow = false;
        for (int64_t i = m - 1; i >= l; --i) {
          double f = s * e[i];
          const double b = c * e[i];
          r = fast_hypot(f, g);
          e[i + 1] = r;
          if (r == 0.0) {  // recover from underflow: deflate and restart this block
            d[i + 1] -= p;
            e[m] = 0.0;
            underflow = true;
            break;
          }
          s = f / r;
          c = g / r;
          g = d[i + 1] - p;
          r = (d[i] - g) * s + 2.0 * c * b;
          p = s * r;
          d[i + 1] = g + p;
          g = c * r - b;
          f = z[i + 1];  // rotate the tracked first row of the eigenvector matrix
          z[i + 1] = s * z[i] + c * f;
          z[i] = c * z[i] - s * f;
        }
        if (underflow) continue;
        d[l] -= p;
        e[l] = g;
        e[m] = 0.0;
      }
    } while (m != l);
  }
  return true;
}

// Full problem: alpha[n], beta[n-1] -> theta[n] ascending, tau[n] = squared first components.
// e is workspace of n doubles. theta/tau may not alias alpha/beta.
FSI_HD inline void tridiag_eigh_one(const double* alpha, const double* beta, double* theta,
                                    double* tau, double* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    theta[i] = alpha[i];
    e[i] = (i + 1 < n) ? beta[i] : 0.0;
  }
  if (!tridiag_ql_first_row(theta, e, tau, n)) {
    for (int64_t i = 0; i < n; ++i) theta[i] = tau[i] = NAN;
    return;
  }
  // Selection sort ascending (O(n^2), same order as the solve), squaring the components.
  for (int64_t i = 0; i < n; ++i) {
    int64_t best = i;
    for (int64_t j = i + 1; j < n; ++j)
      if (theta[j] < theta[best]) best = j;
    if (best != i) {
      const double t = theta[i]; theta[i] = theta[best]; theta[best] = t;
      const double u = tau[i]; tau[i] = tau[best]; tau[best] = u;
    }
    tau[i] = tau[i] * tau[i];
  }
}

}  // namespace fsinfo_fast_core
