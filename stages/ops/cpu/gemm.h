/* pipewright — CPU GEMMs whose bits do not depend on the thread count.
 *
 * The BLAS is only ever called single-threaded. A GEMM is cut into tiles of
 * C whose boundaries are a function of (M, N, K) alone; each tile is one
 * single-threaded BLAS call over the whole reduction dimension K, and the
 * tiles are spread over the CPU thread team (runtime/pool.h). So the order
 * in which every element of C is summed is fixed by the shape and the BLAS
 * kernel: 1 thread or 64, one stage or eight, the same bits.
 *
 * Internal to the CPU backend (stages/ops/cpu/); row-major, like cblas.
 */
#ifndef PW_STAGES_CPU_GEMM_H
#define PW_STAGES_CPU_GEMM_H

#include <stdint.h>

#include "runtime/pool.h"

#ifdef __cplusplus
extern "C" {
#endif

/* C (M, N) = alpha · op(A) · op(B) + beta · C, op(X) = X or Xᵀ (trans_* = 1).
 * beta = 0 writes C without reading it. Tiled over the CPU thread team. */
void pw_cpu_gemm(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                 float *C, int64_t ldc);

/* The same as one BLAS call on the calling thread (inside a parallel item). */
void pw_cpu_gemm_1t(int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                    float *C, int64_t ldc);

/* How pw_cpu_gemm cuts C: tiles of *tm rows × *tn columns (the last ones
 * smaller). Depends on (M, N, K) only; exposed for tests and benchmarks. */
void pw_cpu_gemm_tiles(int64_t M, int64_t N, int64_t K, int64_t *tm, int64_t *tn);

/* fn(arg, i, worker) for i in [0, n) over the CPU thread team; worker < the
 * team's size (pw_cpu_get_threads). Items must be independent (pool.h). */
void pw_cpu_parallel(int64_t n, pw_pool_fn fn, void *arg);

/* The BLAS's own thread count, for benchmarks that time the BLAS itself as
 * a reference (a multi-threaded cblas_sgemm). Kernels need it at 1: set it
 * back before they run. */
void pw_cpu_blas_threads(int n);

#ifdef __cplusplus
}
#endif
#endif
