/* pipewright — CUDA kernels (fp32), the GPU twin of stages/ops/cpu/ops.h.
 *
 * Every CPU op has a CUDA op here with the same name after pw_cuda_, the same
 * argument order and the same layouts; pointers are DEVICE pointers and the
 * op is enqueued on the stream of a pw_cuda_ops context (nothing here waits
 * for the GPU). A C file uses this header without any CUDA header: a stream
 * is the opaque pw_cuda_stream (the same type as cudaStream_t, so CUDA code
 * passes its streams unchanged).
 *
 *     pw_cuda_ops_config oc = { .device = 0, .stream = s, .math = PW_CUDA_MATH_FP32 };
 *     pw_cuda_ops *ops;
 *     PW_CHECK(pw_cuda_ops_create(&oc, &ops));
 *     PW_CHECK(pw_cuda_linear_fwd(ops, x, w, b, y, n, in, out));   // on s
 *     PW_CHECK(pw_cuda_gelu_fwd(ops, y, z, n * out));                // on s
 *     ...
 *     pw_cuda_ops_destroy(ops);
 *
 * Outcomes. Each op returns PW_OK once its kernels are enqueued;
 * PW_ERR_UNSUPPORTED for a shape cuBLAS cannot take (a dimension over
 * INT_MAX); PW_ERR_INTERNAL with the CUDA or cuBLAS message when a launch
 * fails. Errors of kernels that already ran surface at the next
 * synchronisation (the caller's), as everywhere in CUDA.
 *
 * Conventions (the CPU header's, unchanged):
 *   - `n` rows of the last dimension `d` (`in`/`out` for linear);
 *   - backward-input ops write dx when `accumulate` is 0, add when 1;
 *   - backward-weight ops always ADD into dw/db;
 *   - arrays never alias.
 *
 * Determinism. No reduction uses atomics: a row reduction (layernorm,
 * softmax) is one block with a fixed tree, and a reduction over rows (db,
 * layernorm dw/db, embedding and position-embedding gradients) adds the rows
 * in order, row 0 first, exactly as the CPU op does. GEMMs are cuBLAS, which
 * gives the same bits run to run on one GPU model and toolkit (its atomics
 * mode stays off). So a CUDA op gives the same bits on every run. The
 * custom kernels are compiled without FMA contraction (--fmad=false), so the
 * element-wise ops (relu, gelu, add, dropout, embeddings, the xent backward)
 * round like the CPU ones, and the reductions over rows (linear db,
 * layernorm dw/db, embedding and position-embedding gradients) give the CPU
 * op's bits exactly, wherever the CPU build does not contract to FMA either
 * (x86-64 without -march). GEMMs and the row reductions in double differ
 * from the CPU in order: within rounding of the CPU op, not bit-identical.
 *
 * Math modes (pw_cuda_ops_config.math) set how every GEMM (linear and
 * attention) multiplies; inputs, accumulation and outputs stay fp32 arrays:
 *   PW_CUDA_MATH_FP32  plain fp32 (the default): ~1e-6 relative error;
 *   PW_CUDA_MATH_TF32  operands rounded to TF32 (10-bit mantissa) inside the
 *                      tensor cores, fp32 accumulation: ~1e-3 relative;
 *   PW_CUDA_MATH_BF16  operands rounded to bf16 (7-bit mantissa) inside the
 *                      tensor cores, fp32 accumulation and storage ("bf16
 *                      compute, fp32 master weights"): ~1e-2 relative.
 * Each mode is deterministic run to run; the modes differ from each other.
 * The custom kernels are fp32 in every mode.
 */
#ifndef PW_STAGES_CUDA_OPS_H
#define PW_STAGES_CUDA_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"
#include "stages/ops/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A CUDA stream (cudaStream_t is `struct CUstream_st *`). NULL is the
 * legacy default stream. */
typedef struct CUstream_st *pw_cuda_stream;

typedef struct pw_cuda_ops pw_cuda_ops;

/* How the GEMMs multiply (see "Math modes" above). */
typedef enum {
    PW_CUDA_MATH_FP32 = 0, /* plain fp32 */
    PW_CUDA_MATH_TF32 = 1, /* TF32 tensor cores, fp32 accumulation */
    PW_CUDA_MATH_BF16 = 2  /* bf16 tensor cores, fp32 accumulation */
} pw_cuda_math;

/* "fp32", "tf32", "bf16"; "unknown" for any other value. */
const char *pw_cuda_math_name(pw_cuda_math m);
/* Parses one of those names (any case) into *out: 0, or -1 (and *out
 * untouched) for anything else, NULL included. */
int pw_cuda_math_parse(const char *s, pw_cuda_math *out);

typedef struct pw_cuda_ops_config {
    int device;             /* CUDA device index the pointers live on */
    pw_cuda_stream stream;  /* where every op is enqueued */
    pw_cuda_math math;      /* GEMM mode; 0 = PW_CUDA_MATH_FP32 */
    size_t blas_workspace;  /* bytes of cuBLAS workspace; 0 = 32 MiB */
} pw_cuda_ops_config;

/* Creates a context: a cuBLAS handle bound to cfg->stream, on cfg->device
 * (made current on the calling thread), with its own cuBLAS workspace and
 * a little scratch, allocated here once. The own workspace is what keeps
 * cuBLAS deterministic when several contexts run on concurrent streams of
 * one GPU (several stages on one GPU); with cuBLAS's shared default pool it
 * may pick different kernels. One context per stream. PW_ERR_UNSUPPORTED
 * with "no CUDA device: ..." when there is none; PW_ERR_INVALID_ARG for a
 * device that does not exist or a math value outside pw_cuda_math. */
pw_status pw_cuda_ops_create(const pw_cuda_ops_config *cfg, pw_cuda_ops **out);
void pw_cuda_ops_destroy(pw_cuda_ops *ops); /* accepts NULL */
/* Moves later ops (and their cuBLAS calls) onto another stream. */
pw_status pw_cuda_ops_set_stream(pw_cuda_ops *ops, pw_cuda_stream stream);
pw_cuda_stream pw_cuda_ops_stream(const pw_cuda_ops *ops);

/* linear: y (n, out) = x (n, in) · wᵀ, w (out, in), + b (out) if b != NULL. */
pw_status pw_cuda_linear_fwd(pw_cuda_ops *ops, const float *x, const float *w, const float *b,
                             float *y, int64_t n, int64_t in, int64_t out);
/* dx (n, in) (+)= dy (n, out) · w (out, in) */
pw_status pw_cuda_linear_bwd_input(pw_cuda_ops *ops, const float *dy, const float *w, float *dx,
                                   int64_t n, int64_t in, int64_t out, int accumulate);
/* dw (out, in) += dyᵀ · x; db (out) += Σ_rows dy (db may be NULL) */
pw_status pw_cuda_linear_bwd_weight(pw_cuda_ops *ops, const float *dy, const float *x, float *dw,
                                    float *db, int64_t n, int64_t in, int64_t out);

/* relu: y = x < 0 ? 0 : x (NaN passes); backward from the output y. */
pw_status pw_cuda_relu_fwd(pw_cuda_ops *ops, const float *x, float *y, int64_t n);
pw_status pw_cuda_relu_bwd_input(pw_cuda_ops *ops, const float *y, const float *dy, float *dx,
                                 int64_t n, int accumulate);

/* gelu (tanh approximation) as x / (1 + exp(−2u)) with the CPU's exp
 * polynomial (pw_cpu_exp); backward from the input x. */
pw_status pw_cuda_gelu_fwd(pw_cuda_ops *ops, const float *x, float *y, int64_t n);
pw_status pw_cuda_gelu_bwd_input(pw_cuda_ops *ops, const float *x, const float *dy, float *dx,
                                 int64_t n, int accumulate);

/* layernorm over rows of d; forward stores mean (n) and rstd (n). */
pw_status pw_cuda_layernorm_fwd(pw_cuda_ops *ops, const float *x, const float *w, const float *b,
                                float *y, float *mean, float *rstd, int64_t n, int64_t d,
                                float eps);
pw_status pw_cuda_layernorm_bwd_input(pw_cuda_ops *ops, const float *x, const float *w,
                                      const float *mean, const float *rstd, const float *dy,
                                      float *dx, int64_t n, int64_t d, int accumulate);
pw_status pw_cuda_layernorm_bwd_weight(pw_cuda_ops *ops, const float *x, const float *mean,
                                       const float *rstd, const float *dy, float *dw, float *db,
                                       int64_t n, int64_t d);

/* add: y = a + b; copy_grad: dx (+)= dy. */
pw_status pw_cuda_add_fwd(pw_cuda_ops *ops, const float *a, const float *b, float *y, int64_t n);
pw_status pw_cuda_copy_grad(pw_cuda_ops *ops, const float *dy, float *dx, int64_t n,
                            int accumulate);

/* softmax cross-entropy. The CPU op returns the summed loss; on the GPU that
 * would be a host synchronisation, so the loss stays on the device: row r's
 * −log p[label] goes to row_loss[r] (double; 0 for a label outside [0, C)),
 * and pw_cuda_sum_d adds rows up when the caller wants the total. */
pw_status pw_cuda_softmax_xent_fwd(pw_cuda_ops *ops, const float *logits, const int32_t *labels,
                                   float *probs, double *row_loss, int64_t n, int64_t C);
pw_status pw_cuda_softmax_xent_bwd(pw_cuda_ops *ops, const float *probs, const int32_t *labels,
                                   float *dlogits, int64_t n, int64_t C, float scale,
                                   int accumulate);
/* *out (one device double) = Σ v[0..n) in a fixed order (one block, fixed
 * tree), or *out += that sum when accumulate is 1. */
pw_status pw_cuda_sum_d(pw_cuda_ops *ops, const double *v, int64_t n, double *out,
                        int accumulate);

/* embedding: y (n, d) = w[tokens[r]]; out-of-range tokens give zero rows and
 * no gradient. Backward-weight adds the rows in order (see Determinism): a
 * token that occurs twice gets its rows in position order. */
pw_status pw_cuda_embedding_fwd(pw_cuda_ops *ops, const int32_t *tokens, const float *w, float *y,
                                int64_t n, int64_t vocab, int64_t d);
pw_status pw_cuda_embedding_bwd_weight(pw_cuda_ops *ops, const int32_t *tokens, const float *dy,
                                       float *dw, int64_t n, int64_t vocab, int64_t d);
pw_status pw_cuda_pos_embedding_fwd(pw_cuda_ops *ops, const float *x, const float *w, float *y,
                                    int64_t batch, int64_t T, int64_t d);
pw_status pw_cuda_pos_embedding_bwd_weight(pw_cuda_ops *ops, const float *dy, float *dw,
                                           int64_t batch, int64_t T, int64_t d);

/* Causal multi-head attention, GPT-2's layout (see pw_cpu_attention_fwd):
 * qkv (batch, T, 3D), out (batch, T, D), att (batch, H, T, T) probabilities
 * with exact zeros above the diagonal. D must be a multiple of H. */
pw_status pw_cuda_attention_fwd(pw_cuda_ops *ops, const float *qkv, float *out, float *att,
                                int64_t batch, int64_t T, int64_t D, int64_t H);
/* dqkv (+)= the gradient for qkv. `scratch` is H·T·T floats (the CPU op
 * takes T·T: the GPU works on all heads of a sequence at once). */
pw_status pw_cuda_attention_bwd_input(pw_cuda_ops *ops, const float *qkv, const float *att,
                                      const float *dout, float *dqkv, float *scratch,
                                      int64_t batch, int64_t T, int64_t D, int64_t H,
                                      int accumulate);

/* Dropout with the CPU op's masks, bit for bit: element j of global sample
 * first_sample + b is kept when pw_rng_uniform(key, (first_sample+b)·numel
 * + j) ≥ p (the same splitmix64 stream, computed on the device). */
pw_status pw_cuda_dropout_fwd(pw_cuda_ops *ops, const float *x, float *y, uint8_t *mask,
                              int64_t batch, int64_t numel, float p, uint64_t key,
                              int64_t first_sample);
/* The same with key_first = {key, (uint64_t)first_sample} in DEVICE memory,
 * read when the kernel runs: what a recorded CUDA graph replays
 * (stages/ops/cuda/backend_cuda.c) with new values copied there first. */
pw_status pw_cuda_dropout_fwd_dev(pw_cuda_ops *ops, const float *x, float *y, uint8_t *mask,
                                  int64_t batch, int64_t numel, float p, const uint64_t *key_first);

/* The replicas' all-reduce on device memory (runtime/collective.h,
 * pw_span_mem): dst[0..n) = src + dst (add) or = src, enqueued on the
 * calling thread's per-thread stream on dst's device (any thread: the
 * engine's communication threads); fence waits for that stream. A float
 * addition, so the host ring's bits. */
pw_status pw_cuda_span_apply(float *dst, const float *src, int64_t n, int add);
pw_status pw_cuda_span_fence(void);
pw_status pw_cuda_dropout_bwd_input(pw_cuda_ops *ops, const uint8_t *mask, const float *dy,
                                    float *dx, int64_t n, float p, int accumulate);

/* ---- what a stage needs besides the layer ops ---- */

/* One optimizer update of n elements (stages/ops/optim.h, pw_optim_update): the
 * scalars (learning rate of `step`, bias corrections) are computed on the
 * host exactly as optim.c does, and each element gets optim.c's arithmetic,
 * so the parameters and state match the CPU's (bit for bit where the CPU
 * build does not contract to FMA). state holds pw_optim_state_floats() × n
 * floats, zero before step 1. */
pw_status pw_cuda_optim_update(pw_cuda_ops *ops, const pw_optim_config *c, int64_t step,
                               float *p, const float *g, float *state, int64_t n, int decay);

/* hits[r] = 1.0 when row r's first largest logit is at labels[r], else 0.0
 * (the accuracy count the stage program keeps; total with pw_cuda_sum_d,
 * exact for any count below 2^53). Rows with NaN: unspecified, but the same
 * on every run. */
pw_status pw_cuda_argmax_hits(pw_cuda_ops *ops, const float *logits, const int32_t *labels,
                              double *hits, int64_t n, int64_t C);

/* *out (one device double) = Σ v[i]² in double, or += it when accumulate is
 * 1 (gradient-norm clipping). Fixed order: each of a fixed number of blocks
 * sums a fixed contiguous chunk with a fixed tree, then one block adds the
 * chunk sums in order. Uses the context's scratch, so calls on one context
 * must stay ordered (one stream, or a hand-off after set_stream). */
pw_status pw_cuda_sumsq_d(pw_cuda_ops *ops, const float *v, int64_t n, double *out,
                          int accumulate);

/* y[0..n) = (float)(*sum / div), *sum one device double: the stage
 * program's loss value (the micro-batch's per-position mean loss) without
 * reading the sum back to the host. */
pw_status pw_cuda_fill_mean(pw_cuda_ops *ops, const double *sum, float *y, int64_t n, double div);

/* v *= s element-wise (gradient clipping). */
pw_status pw_cuda_scale(pw_cuda_ops *ops, float *v, int64_t n, float s);

#ifdef __cplusplus
}
#endif
#endif
