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
 *   - GEMMs go through pw_cpu_gemm (stages/ops/cpu/gemm.h): the BLAS runs
 *     single-threaded on tiles fixed by the shape, spread over the CPU
 *     thread team (pw_cpu_set_threads), so no result depends on the thread
 *     count. The other kernels run on the same team, cut by the shape into
 *     ranges that never split a reduction (ops.c says how): their bits do
 *     not depend on the thread count either.
 *   - Arrays never alias unless stated.
 */
#ifndef PW_STAGES_CPU_OPS_H
#define PW_STAGES_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Sets/gets the size of the CPU thread team every kernel uses (the caller
 * plus n - 1 helper threads; the BLAS itself always runs single-threaded).
 * Default: OPENBLAS_NUM_THREADS when set, else the cores this process may
 * run on. Results are the same for every n. Not while kernels run. */
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

/* exp(x) element-wise, branch-free so that it vectorises (gelu and attention
 * use it): relative error ≤ 3e-7 (about 2 ulp) for x in [−87.3, 88]; below
 * that it returns 2^−126 (≈ 1.2e−38) instead of underflowing to 0, above it
 * e^88. NaN gives NaN. */
void pw_cpu_exp(const float *x, float *y, int64_t n);

/* gelu, tanh approximation:
 *   y = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
 * evaluated as x / (1 + exp(−2u)), u = √(2/π)·(x + 0.044715·x³) (the same
 * function: 0.5·(1 + tanh u) = sigmoid(2u)) with pw_cpu_exp, so the loops
 * vectorise; absolute error ≤ 1e-6·max(1, |x|). Backward uses the input x. */
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
/* memset(dst, 0, bytes); long arrays of floats on the thread team. */
void pw_cpu_zero(void *dst, size_t bytes);

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
/* The same, and *correct (when not NULL) = the rows whose first largest
 * logit is the label (accuracy), from the same sweep. */
double pw_cpu_softmax_xent_fwd_count(const float *logits, const int32_t *labels, float *probs,
                                     int64_t n, int64_t C, int64_t *correct);
void pw_cpu_softmax_xent_bwd(const float *probs, const int32_t *labels, float *dlogits,
                             int64_t n, int64_t C, float scale, int accumulate);

/* embedding: y (n, d) = w[tokens[r]] row by row; w (vocab, d) as
 * nn.Embedding. A token outside [0, vocab) is the caller's error (the data
 * loader checks); its row is written as zeros and its gradient dropped, so
 * nothing reads or writes out of bounds. No gradient flows to the tokens. */
void pw_cpu_embedding_fwd(const int32_t *tokens, const float *w, float *y, int64_t n,
                          int64_t vocab, int64_t d);
/* dw (vocab, d) += each dy row into its token's row, row 0 first. */
void pw_cpu_embedding_bwd_weight(const int32_t *tokens, const float *dy, float *dw, int64_t n,
                                 int64_t vocab, int64_t d);

/* pos_embedding over `batch` samples of T rows of d: y[b, t] = x[b, t] + w[t],
 * w (≥ T, d). The input gradient is dy itself (pw_cpu_copy_grad). */
void pw_cpu_pos_embedding_fwd(const float *x, const float *w, float *y, int64_t batch,
                              int64_t T, int64_t d);
/* dw[t] += dy[b, t] for b = 0, 1, ... in order (micro-batch splits are exact). */
void pw_cpu_pos_embedding_bwd_weight(const float *dy, float *dw, int64_t batch, int64_t T,
                                     int64_t d);

/* Causal multi-head self-attention over `batch` sequences of T positions,
 * GPT-2's layout: qkv (batch, T, 3D) holds q = qkv[:, 0:D], k = qkv[:, D:2D],
 * v = qkv[:, 2D:3D]; head h (of H, head width hd = D/H) uses columns
 * h·hd .. (h+1)·hd of each. For every head
 *   att = softmax(q·kᵀ/√hd, masked to s ≤ t)  (max-subtracted, sum in double)
 *   out[:, h·hd:(h+1)·hd] = att·v
 * out (batch, T, D). att (batch, H, T, T) keeps the probabilities for the
 * backward (rows t, columns s; exactly 0 for s > t, so no future position
 * reaches an earlier output). The GEMMs go through the BLAS, in blocks of
 * PW_CPU_ATTENTION_BLOCK rows that skip the blocks above the diagonal
 * (62.5 % of the full T×T products' work at T = 128, tending to half as T
 * grows; the blocking depends on T only, never on the batch). */
#define PW_CPU_ATTENTION_BLOCK 32
void pw_cpu_attention_fwd(const float *qkv, float *out, float *att, int64_t batch,
                          int64_t T, int64_t D, int64_t H);
/* dqkv (batch, T, 3D) (+)= the gradient for qkv from dout (batch, T, D), with
 * the forward's qkv and att. `scratch` is H·T·T floats of workspace (one
 * T×T per head: heads run in parallel). The op has
 * no weights, so there is no backward-weight. */
void pw_cpu_attention_bwd_input(const float *qkv, const float *att, const float *dout,
                                float *dqkv, float *scratch, int64_t batch, int64_t T,
                                int64_t D, int64_t H, int accumulate);

/* Dropout over `batch` samples of `numel` elements. Element j of the sample
 * whose global index is first_sample + b is kept when
 *   pw_rng_uniform(key, (first_sample + b)·numel + j) ≥ p
 * and then scaled by 1/(1 − p); mask (batch, numel) records keep (1) or drop
 * (0) for the backward. The mask of a sample therefore depends on (key, its
 * global index) only: not on the micro-batch size or position, nor on the
 * stage. `key` carries the rest (see pw_program_set_rng). p in [0, 1); p = 0
 * copies x exactly. */
void pw_cpu_dropout_fwd(const float *x, float *y, uint8_t *mask, int64_t batch, int64_t numel,
                        float p, uint64_t key, int64_t first_sample);
/* dx (+)= dy · mask / (1 − p) over n elements. */
void pw_cpu_dropout_bwd_input(const uint8_t *mask, const float *dy, float *dx, int64_t n,
                              float p, int accumulate);

#ifdef __cplusplus
}
#endif
#endif
