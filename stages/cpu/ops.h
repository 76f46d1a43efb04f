/* pipewright — CPU reference kernels (fp32), one forward, backward-input and
 * backward-weight function per op.
 *
 * Conventions:
 *   - `n` is the number of rows: batch × all leading dims; the op acts on the
 *     last dimension of length `d` (or `in`/`out` for linear).
 *   - Backward-input functions write dx when `accumulate` is 0 and add into it
 *     when 1 (a value consumed by several ops sums its gradients, in a fixed
 *     order chosen by the caller).
 *   - Backward-weight functions always ADD into dw/db so gradients accumulate
 *     over micro-batches in micro-batch order.
 *   - GEMMs go through the CPU BLAS (cblas_sgemm); the thread count is the
 *     BLAS library's own setting (pw_cpu_set_threads).
 *   - Arrays never alias unless stated.
 */
#ifndef PW_STAGES_CPU_OPS_H
#define PW_STAGES_CPU_OPS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Sets/gets the BLAS thread count (OpenBLAS / BLIS). */
void pw_cpu_set_threads(int n);
int pw_cpu_get_threads(void);

/* linear: y (n, out) = x (n, in) · wᵀ, w (out, in), + b (out) if b != NULL. */
void pw_cpu_linear_fwd(const float *x, const float *w, const float *b, float *y,
                       int64_t n, int64_t in, int64_t out);
/* dx (n, in) (+)= dy (n, out) · w (out, in) */
void pw_cpu_linear_bwd_input(const float *dy, const float *w, float *dx,
                             int64_t n, int64_t in, int64_t out, int accumulate);
/* dw (out, in) += dyᵀ · x; db (out) += Σ_rows dy (db may be NULL) */
void pw_cpu_linear_bwd_weight(const float *dy, const float *x, float *dw, float *db,
                              int64_t n, int64_t in, int64_t out);

/* relu: y = max(x, 0); backward uses the output y (dx = dy where y > 0). */
void pw_cpu_relu_fwd(const float *x, float *y, int64_t n);
void pw_cpu_relu_bwd_input(const float *y, const float *dy, float *dx, int64_t n,
                           int accumulate);

/* gelu, tanh approximation:
 *   y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
 * backward uses the input x. */
void pw_cpu_gelu_fwd(const float *x, float *y, int64_t n);
void pw_cpu_gelu_bwd_input(const float *x, const float *dy, float *dx, int64_t n,
                           int accumulate);

/* layernorm over rows of length d:
 *   y = (x − mean)·rstd·w + b,  rstd = 1/√(var + eps), var biased (÷d).
 * Forward stores mean (n) and rstd (n) for the backward. */
void pw_cpu_layernorm_fwd(const float *x, const float *w, const float *b, float *y,
                          float *mean, float *rstd, int64_t n, int64_t d, float eps);
void pw_cpu_layernorm_bwd_input(const float *x, const float *w, const float *mean,
                                const float *rstd, const float *dy, float *dx,
                                int64_t n, int64_t d, int accumulate);
void pw_cpu_layernorm_bwd_weight(const float *x, const float *mean, const float *rstd,
                                 const float *dy, float *dw, float *db, int64_t n,
                                 int64_t d);

/* add: y = a + b (n elements); backward: da (+)= dy and db (+)= dy. */
void pw_cpu_add_fwd(const float *a, const float *b, float *y, int64_t n);
/* dx (+)= dy: used for add's inputs and for identity ops (flatten, reshape). */
void pw_cpu_copy_grad(const float *dy, float *dx, int64_t n, int accumulate);

/* softmax cross-entropy over rows of C logits with integer labels.
 * Forward: probs (n, C) = softmax(logits) (max-subtracted, stable); returns
 * the SUM over rows of −log p[label] (double). Labels outside [0, C) are the
 * caller's error (checked by the data loader), treated as row loss 0 here.
 * Backward: dlogits (n, C) = (probs − onehot(label)) · scale, where scale is
 * 1 / (number of rows in the GLOBAL batch) so micro-batches sum to the mean.
 * A row whose label is outside [0, C) gets dlogits = probs · scale (no one-hot
 * term). That is not the gradient of its zero loss: such a label is a caller
 * error, handled only so that nothing crashes or reads out of bounds. */
double pw_cpu_softmax_xent_fwd(const float *logits, const int32_t *labels, float *probs,
                               int64_t n, int64_t C);
void pw_cpu_softmax_xent_bwd(const float *probs, const int32_t *labels, float *dlogits,
                             int64_t n, int64_t C, float scale, int accumulate);

#ifdef __cplusplus
}
#endif
#endif
