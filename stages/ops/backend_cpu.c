/* pipewright — the CPU backend (thin wrappers around stages/ops/cpu/ops.h, so a
 * CPU program computes the bits it always did) and the backend registry.
 * Contract in backend.h. */
#include "stages/ops/backend.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stages/ops/cpu/gemm.h"
#include "stages/ops/cpu/ops.h"
#include "stages/ops/cpu/vec.h"

/* ---------------------------------------------------------------- memory */

static pw_status cpu_copy(void *ctx, void *dst, const void *src, size_t bytes)
{
    (void)ctx;
    if (bytes) memcpy(dst, src, bytes);
    return PW_OK;
}

static pw_status cpu_zero(void *ctx, void *dst, size_t bytes)
{
    (void)ctx;
    pw_cpu_zero(dst, bytes);
    return PW_OK;
}

/* ---------------------------------------------------------------- ops */

static pw_status cpu_linear_fwd(void *ctx, const float *x, const float *w, const float *b, float *y,
                                int64_t n, int64_t in, int64_t out)
{
    (void)ctx;
    pw_cpu_linear_fwd(x, w, b, y, n, in, out);
    return PW_OK;
}

static pw_status cpu_linear_bwd_input(void *ctx, const float *dy, const float *w, float *dx,
                                      int64_t n, int64_t in, int64_t out, int accumulate)
{
    (void)ctx;
    pw_cpu_linear_bwd_input(dy, w, dx, n, in, out, accumulate);
    return PW_OK;
}

static pw_status cpu_linear_bwd_weight(void *ctx, const float *dy, const float *x, float *dw,
                                       float *db, int64_t n, int64_t in, int64_t out)
{
    (void)ctx;
    pw_cpu_linear_bwd_weight(dy, x, dw, db, n, in, out);
    return PW_OK;
}

static pw_status cpu_relu_fwd(void *ctx, const float *x, float *y, int64_t n)
{
    (void)ctx;
    pw_cpu_relu_fwd(x, y, n);
    return PW_OK;
}

static pw_status cpu_relu_bwd_input(void *ctx, const float *y, const float *dy, float *dx,
                                    int64_t n, int accumulate)
{
    (void)ctx;
    pw_cpu_relu_bwd_input(y, dy, dx, n, accumulate);
    return PW_OK;
}

static pw_status cpu_gelu_fwd(void *ctx, const float *x, float *y, int64_t n)
{
    (void)ctx;
    pw_cpu_gelu_fwd(x, y, n);
    return PW_OK;
}

static pw_status cpu_gelu_bwd_input(void *ctx, const float *x, const float *dy, float *dx,
                                    int64_t n, int accumulate)
{
    (void)ctx;
    pw_cpu_gelu_bwd_input(x, dy, dx, n, accumulate);
    return PW_OK;
}

static pw_status cpu_layernorm_fwd(void *ctx, const float *x, const float *w, const float *b,
                                   float *y, float *mean, float *rstd, int64_t n, int64_t d,
                                   float eps)
{
    (void)ctx;
    pw_cpu_layernorm_fwd(x, w, b, y, mean, rstd, n, d, eps);
    return PW_OK;
}

static pw_status cpu_layernorm_bwd_input(void *ctx, const float *x, const float *w,
                                         const float *mean, const float *rstd, const float *dy,
                                         float *dx, int64_t n, int64_t d, int accumulate)
{
    (void)ctx;
    pw_cpu_layernorm_bwd_input(x, w, mean, rstd, dy, dx, n, d, accumulate);
    return PW_OK;
}

static pw_status cpu_layernorm_bwd_weight(void *ctx, const float *x, const float *mean,
                                          const float *rstd, const float *dy, float *dw,
                                          float *db, int64_t n, int64_t d)
{
    (void)ctx;
    pw_cpu_layernorm_bwd_weight(x, mean, rstd, dy, dw, db, n, d);
    return PW_OK;
}

static pw_status cpu_add_fwd(void *ctx, const float *a, const float *b, float *y, int64_t n)
{
    (void)ctx;
    pw_cpu_add_fwd(a, b, y, n);
    return PW_OK;
}

static pw_status cpu_copy_grad(void *ctx, const float *dy, float *dx, int64_t n, int accumulate)
{
    (void)ctx;
    pw_cpu_copy_grad(dy, dx, n, accumulate);
    return PW_OK;
}

static pw_status cpu_xent_fwd(void *ctx, const float *logits, const int32_t *labels, float *probs,
                              double *stats, double *scratch, int64_t n, int64_t C)
{
    (void)ctx;
    (void)scratch;
    int64_t correct = 0;
    double s = pw_cpu_softmax_xent_fwd_count(logits, labels, probs, n, C, stats ? &correct : NULL);
    if (stats) {
        stats[0] += s;
        stats[1] += (double)correct;
    }
    return PW_OK;
}

static pw_status cpu_xent_bwd(void *ctx, const float *probs, const int32_t *labels, float *dlogits,
                              int64_t n, int64_t C, float scale, int accumulate)
{
    (void)ctx;
    pw_cpu_softmax_xent_bwd(probs, labels, dlogits, n, C, scale, accumulate);
    return PW_OK;
}

static pw_status cpu_loss_fill(void *ctx, const double *stats, float *y, int64_t m, double div)
{
    (void)ctx;
    for (int64_t j = 0; j < m; j++) y[j] = (float)(stats[0] / div);
    return PW_OK;
}

static pw_status cpu_embedding_fwd(void *ctx, const int32_t *tokens, const float *w, float *y,
                                   int64_t n, int64_t vocab, int64_t d)
{
    (void)ctx;
    pw_cpu_embedding_fwd(tokens, w, y, n, vocab, d);
    return PW_OK;
}

static pw_status cpu_embedding_bwd_weight(void *ctx, const int32_t *tokens, const float *dy,
                                          float *dw, int64_t n, int64_t vocab, int64_t d)
{
    (void)ctx;
    pw_cpu_embedding_bwd_weight(tokens, dy, dw, n, vocab, d);
    return PW_OK;
}

static pw_status cpu_pos_embedding_fwd(void *ctx, const float *x, const float *w, float *y,
                                       int64_t batch, int64_t T, int64_t d)
{
    (void)ctx;
    pw_cpu_pos_embedding_fwd(x, w, y, batch, T, d);
    return PW_OK;
}

static pw_status cpu_pos_embedding_bwd_weight(void *ctx, const float *dy, float *dw, int64_t batch,
                                              int64_t T, int64_t d)
{
    (void)ctx;
    pw_cpu_pos_embedding_bwd_weight(dy, dw, batch, T, d);
    return PW_OK;
}

static pw_status cpu_attention_fwd(void *ctx, const float *qkv, float *out, float *att,
                                   int64_t batch, int64_t T, int64_t D, int64_t H)
{
    (void)ctx;
    pw_cpu_attention_fwd(qkv, out, att, batch, T, D, H);
    return PW_OK;
}

static pw_status cpu_attention_bwd_input(void *ctx, const float *qkv, const float *att,
                                         const float *dout, float *dqkv, float *scratch,
                                         int64_t batch, int64_t T, int64_t D, int64_t H,
                                         int accumulate)
{
    (void)ctx;
    pw_cpu_attention_bwd_input(qkv, att, dout, dqkv, scratch, batch, T, D, H, accumulate);
    return PW_OK;
}

static int64_t cpu_attention_scratch(int64_t T, int64_t H)
{
    return H * T * T; /* one T×T per head: heads run in parallel */
}

static pw_status cpu_dropout_fwd(void *ctx, const float *x, float *y, uint8_t *mask, int64_t batch,
                                 int64_t numel, float p, uint64_t key, int64_t first_sample)
{
    (void)ctx;
    pw_cpu_dropout_fwd(x, y, mask, batch, numel, p, key, first_sample);
    return PW_OK;
}

static pw_status cpu_dropout_bwd_input(void *ctx, const uint8_t *mask, const float *dy, float *dx,
                                       int64_t n, float p, int accumulate)
{
    (void)ctx;
    pw_cpu_dropout_bwd_input(mask, dy, dx, n, p, accumulate);
    return PW_OK;
}

/* The optimizer on the thread team, in ranges fixed by the tensor's size:
 * each element's update is its own, so the bits are pw_optim_update's. */
typedef struct optim_job {
    const pw_optim_config *c;
    int64_t step, n;
    float *p, *state;
    const float *g;
    float *g_zero; /* g, to clear after its range is updated; NULL: keep it */
    int decay;
} optim_job;

static void optim_range(const void *v, int64_t lo, int64_t hi)
{
    const optim_job *j = v;
    pw_optim_update_range(j->c, j->step, j->p, j->g, j->state, j->n, lo, hi, j->decay);
    /* The range's gradient was just read: still in cache, so clearing it
     * here costs no pass over memory of its own. */
    if (j->g_zero) memset(j->g_zero + lo, 0, (size_t)(hi - lo) * sizeof(float));
}

static pw_status cpu_optim_update(void *ctx, const pw_optim_config *c, int64_t step, float *p,
                                  const float *g, float *state, int64_t n, int decay)
{
    (void)ctx;
    const optim_job j = {.c = c, .step = step, .n = n, .p = p, .state = state, .g = g, .decay = decay};
    pw_cpu_parallel_for(n, PW_CPU_GRAIN, optim_range, &j);
    return PW_OK;
}

static pw_status cpu_optim_update_zero(void *ctx, const pw_optim_config *c, int64_t step, float *p,
                                       float *g, float *state, int64_t n, int decay)
{
    (void)ctx;
    const optim_job j = {.c = c, .step = step, .n = n, .p = p, .state = state, .g = g, .g_zero = g,
                         .decay = decay};
    pw_cpu_parallel_for(n, PW_CPU_GRAIN, optim_range, &j);
    return PW_OK;
}

/* Whether g[lo, hi) holds an infinity or a NaN. x·0 is 0 for a finite x
 * and NaN otherwise; summed in VEC_N independent lanes (so the loop
 * vectorises) the total is ±0 exactly when every element is finite. The
 * answer is a yes or no, the same however the array is cut. */
typedef struct finite_job {
    const float *g;
    atomic_int bad;
} finite_job;

static void finite_range(const void *v, int64_t lo, int64_t hi)
{
    finite_job *j = (finite_job *)v;
    if (atomic_load_explicit(&j->bad, memory_order_relaxed)) return; /* answered already */
    const float *restrict g = j->g + lo;
    float acc[VEC_N] = {0};
    int64_t i = 0;
    for (; i + VEC_N <= hi - lo; i += VEC_N)
        for (int l = 0; l < VEC_N; l++) acc[l] += g[i + l] * 0.0f;
    float s = 0.0f;
    for (int l = 0; l < VEC_N; l++) s += acc[l];
    for (; i < hi - lo; i++) s += g[i] * 0.0f;
    if (s != 0.0f || isnan(s)) atomic_store_explicit(&j->bad, 1, memory_order_relaxed);
}

static pw_status cpu_find_nonfinite(void *ctx, float *const *g, const int64_t *n, int count,
                                    int *bad)
{
    (void)ctx;
    *bad = -1;
    for (int i = 0; i < count; i++) {
        finite_job j = {.g = g[i]};
        atomic_init(&j.bad, 0);
        pw_cpu_parallel_for(n[i], 4 * PW_CPU_GRAIN, finite_range, &j);
        if (atomic_load(&j.bad)) {
            *bad = i;
            break;
        }
    }
    return PW_OK;
}

const pw_backend_i pw_backend_cpu_i = {
    .name = "cpu",
    .device_memory = 0,
    .open = NULL, /* one host arena, bindable to a NUMA node */
    .close = NULL,
    .activate = NULL,
    .sync = NULL,
    .upload = cpu_copy,
    .download = cpu_copy,
    .copy = cpu_copy,
    .zero = cpu_zero,
    .linear_fwd = cpu_linear_fwd,
    .linear_bwd_input = cpu_linear_bwd_input,
    .linear_bwd_weight = cpu_linear_bwd_weight,
    .relu_fwd = cpu_relu_fwd,
    .relu_bwd_input = cpu_relu_bwd_input,
    .gelu_fwd = cpu_gelu_fwd,
    .gelu_bwd_input = cpu_gelu_bwd_input,
    .layernorm_fwd = cpu_layernorm_fwd,
    .layernorm_bwd_input = cpu_layernorm_bwd_input,
    .layernorm_bwd_weight = cpu_layernorm_bwd_weight,
    .add_fwd = cpu_add_fwd,
    .copy_grad = cpu_copy_grad,
    .xent_fwd = cpu_xent_fwd,
    .xent_bwd = cpu_xent_bwd,
    .loss_fill = cpu_loss_fill,
    .embedding_fwd = cpu_embedding_fwd,
    .embedding_bwd_weight = cpu_embedding_bwd_weight,
    .pos_embedding_fwd = cpu_pos_embedding_fwd,
    .pos_embedding_bwd_weight = cpu_pos_embedding_bwd_weight,
    .attention_fwd = cpu_attention_fwd,
    .attention_bwd_input = cpu_attention_bwd_input,
    .attention_scratch = cpu_attention_scratch,
    .dropout_fwd = cpu_dropout_fwd,
    .dropout_bwd_input = cpu_dropout_bwd_input,
    .optim_update = cpu_optim_update,
    .optim_update_zero = cpu_optim_update_zero,
    .find_nonfinite = cpu_find_nonfinite,
    .device_pci = NULL, /* workers bind by the CPU rule */
};

/* ---------------------------------------------------------------- registry */

#define MAX_BACKENDS 8
static const pw_backend_i *registry[MAX_BACKENDS] = {&pw_backend_cpu_i};
static int n_registered = 1;

pw_status pw_backend_register(const pw_backend_i *be)
{
    if (!be || !be->name)
        return pw_error(PW_ERR_INVALID_ARG, "backend: registering a backend without a name");
    for (int i = 0; i < n_registered; i++)
        if (strcmp(registry[i]->name, be->name) == 0) {
            registry[i] = be;
            return PW_OK;
        }
    if (n_registered == MAX_BACKENDS)
        return pw_error(PW_ERR_UNSUPPORTED, "backend: more than %d backends", MAX_BACKENDS);
    registry[n_registered++] = be;
    return PW_OK;
}

pw_status pw_backend_find(const char *device, const pw_backend_i **be, int *index)
{
    *be = NULL;
    *index = 0;
    if (!device || !*device) device = "cpu";
    const char *colon = strchr(device, ':');
    size_t len = colon ? (size_t)(colon - device) : strlen(device);
    int idx = -1; /* the bare name */
    if (colon) {
        char *end = NULL;
        long v = strtol(colon + 1, &end, 10);
        if (!colon[1] || *end || v < 0 || v > 1024)
            return pw_error(PW_ERR_INVALID_ARG, "device '%s': expected cpu, cuda or cuda:N (N a device "
                            "index from 0)", device);
        idx = (int)v;
    }
    for (int i = 0; i < n_registered; i++)
        if (strlen(registry[i]->name) == len && strncmp(registry[i]->name, device, len) == 0) {
            if (!registry[i]->open && idx > 0)
                return pw_error(PW_ERR_INVALID_ARG, "device '%s': the %s backend has one device (%s)",
                                device, registry[i]->name, registry[i]->name);
            *be = registry[i];
            *index = idx;
            return PW_OK;
        }
    if (len == 4 && strncmp(device, "cuda", 4) == 0) {
#ifdef PW_HAVE_CUDA
        return pw_error(PW_ERR_UNSUPPORTED, "device '%s': this program did not register the CUDA "
                        "backend (link pw_cuda and call pw_backend_register(pw_backend_cuda()); "
                        "docs/cuda.md)", device);
#else
        return pw_error(PW_ERR_UNSUPPORTED, "device '%s': built without CUDA (this build has no CUDA "
                        "backend; see docs/cuda.md)", device);
#endif
    }
    return pw_error(PW_ERR_INVALID_ARG, "device '%s': unknown (expected cpu, cuda or cuda:N)", device);
}

/* ---------------------------------------------------------------- math modes */

static const char *const math_names[] = {"fp32", "tf32", "bf16"};

const char *pw_math_name(pw_math m)
{
    return (unsigned)m < sizeof math_names / sizeof *math_names ? math_names[m] : "?";
}

pw_status pw_math_parse(const char *s, pw_math *out)
{
    for (int m = 0; m < (int)(sizeof math_names / sizeof *math_names); m++)
        if (s && strcmp(s, math_names[m]) == 0) {
            *out = (pw_math)m;
            return PW_OK;
        }
    return pw_error(PW_ERR_INVALID_ARG, "GPU math '%s': expected fp32, tf32 or bf16", s ? s : "");
}
