/* pipewright — the CUDA backend of the stage program: the slots of
 * stages/ops/backend.h enqueued on one stage's compute stream. Contract in
 * backend.h and backend_cuda.h; the ops' own in stages/ops/cuda/ops.h. */
#include "stages/ops/cuda/backend_cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "stages/ops/cuda/device.h"
#include "stages/ops/cuda/ops.h"

#define ALIGN 256

/* Recording (backend.h, record_begin): one CUDA graph per key, and per key
 * the dropout parameters its replays read — {key, first_sample} per dropout
 * call, written on the host (page-locked) and copied to the device just
 * before each launch. The host copy is rewritten only by the key's next
 * occurrence, which the engine starts after this one completed. */
#define REC_MAX_DROPOUT 256

typedef struct rec {
    pw_cuda_graph graph;  /* NULL: not recorded (yet) */
    uint64_t hash;        /* of the recorded calls' arguments */
    int calls, drops;     /* recorded op calls and dropout calls */
    uint64_t *host;       /* [REC_MAX_DROPOUT][2], page-locked */
    uint64_t *dev;        /* the same on the device */
} rec;

enum { REC_OFF = 0, REC_CAPTURE, REC_REPLAY };

typedef struct cuda_ctx {
    int device;
    pw_cuda_stage *st;
    pw_cuda_ops *ops;
    pw_cuda_stream s;      /* the stage's compute stream: everything goes here */
    double *scratch;       /* one device double (find_nonfinite) */
    rec *recs;             /* [n_recs], by key */
    int n_recs;
    int mode, key;         /* REC_*, and the key between the brackets */
    uint64_t hash;         /* of the calls so far between the brackets */
    int calls, drops;
} cuda_ctx;

/* Between the brackets every op slot notes its arguments (FNV-1a over
 * 64-bit words); replaying, that is all it does. */
static void rec_mix(cuda_ctx *c, const uint64_t *v, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        c->hash ^= v[i];
        c->hash *= 0x100000001b3ULL;
    }
    c->calls++;
}

#define U(x) ((uint64_t)(uintptr_t)(x))
#define I(x) ((uint64_t)(int64_t)(x))
static uint64_t fbits(double x)
{
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}
/* First thing in each op slot: REC(ctx, op number, its arguments...). */
#define REC(ctx, ...)                                                   \
    do {                                                                \
        cuda_ctx *rc_ = (ctx);                                          \
        if (rc_->mode != REC_OFF) {                                     \
            const uint64_t rv_[] = {__VA_ARGS__};                       \
            rec_mix(rc_, rv_, sizeof rv_ / sizeof *rv_);                \
            if (rc_->mode == REC_REPLAY) return PW_OK;                  \
        }                                                               \
    } while (0)

static size_t round_up(size_t b) { return (b + ALIGN - 1) / ALIGN * ALIGN; }

static void cuda_close(void *ctx)
{
    cuda_ctx *c = ctx;
    if (!c) return;
    if (c->st) (void)pw_cuda_sync(c->s); /* no replay in flight */
    for (int k = 0; k < c->n_recs; k++) {
        pw_cuda_graph_destroy(c->recs[k].graph);
        pw_cuda_host_free(c->recs[k].host);
        pw_cuda_free(c->recs[k].dev);
    }
    free(c->recs);
    pw_cuda_ops_destroy(c->ops);
    pw_cuda_stage_destroy(c->st); /* waits for its streams */
    free(c);
}

static pw_status cuda_open(int device, pw_math math, const char *who, const size_t bytes[PW_MEM_COUNT],
                           void **out, void *base[PW_MEM_COUNT])
{
    *out = NULL;
    for (int k = 0; k < PW_MEM_COUNT; k++) base[k] = NULL;
    cuda_ctx *c = calloc(1, sizeof *c);
    if (!c) return pw_error(PW_ERR_NOMEM, "%s: out of host memory", who);
    c->device = device;
    /* The categories map one to one; the activation block also holds the
     * backend's own scratch (one double, at its end). */
    pw_cuda_stage_config sc = {.device = device, .name = who};
    sc.bytes[PW_CUDA_MEM_PARAMS] = round_up(bytes[PW_MEM_PARAMS]);
    sc.bytes[PW_CUDA_MEM_GRADS] = round_up(bytes[PW_MEM_GRADS]);
    sc.bytes[PW_CUDA_MEM_OPTIM] = round_up(bytes[PW_MEM_OPTIM]);
    sc.bytes[PW_CUDA_MEM_ACTIVATIONS] = round_up(bytes[PW_MEM_ACTIVATIONS]) + ALIGN;
    pw_status st;
    PW_CHECK_GOTO(pw_cuda_stage_create(&sc, &c->st), st, fail);
    c->s = pw_cuda_stage_stream(c->st, PW_CUDA_STREAM_COMPUTE);
    for (int k = 0; k < PW_MEM_COUNT; k++) {
        if (!bytes[k]) continue;
        PW_CHECK_GOTO(pw_cuda_stage_carve(c->st, (pw_cuda_mem)k, bytes[k], &base[k]), st, fail);
        /* Gradients and optimizer state must start at zero, as the host
         * arena's do (pw_arena_commit zeroes); the rest is zeroed alike. */
        PW_CHECK_GOTO(pw_cuda_memset_async(base[k], 0, bytes[k], c->s), st, fail);
    }
    void *sp;
    PW_CHECK_GOTO(pw_cuda_stage_carve(c->st, PW_CUDA_MEM_ACTIVATIONS, sizeof(double), &sp), st, fail);
    c->scratch = sp;
    pw_cuda_ops_config oc = {.device = device, .stream = c->s, .math = (pw_cuda_math)math};
    PW_CHECK_GOTO(pw_cuda_ops_create(&oc, &c->ops), st, fail);
    PW_CHECK_GOTO(pw_cuda_sync(c->s), st, fail);
    *out = c;
    return PW_OK;
fail:
    for (int k = 0; k < PW_MEM_COUNT; k++) base[k] = NULL;
    cuda_close(c);
    return st;
}

static int cuda_device_count(void)
{
    int n = 0;
    if (pw_cuda_device_count(&n) != PW_OK) return 0;
    return n;
}

static pw_status cuda_activate(void *ctx) { return pw_cuda_set_device(((cuda_ctx *)ctx)->device); }
static pw_status cuda_sync(void *ctx) { return pw_cuda_sync(((cuda_ctx *)ctx)->s); }
/* The program's completion: a host function after the call's work on the
 * compute stream (its downloads into the engine's messages included). */
static pw_status cuda_notify(void *ctx, void (*fn)(void *arg), void *arg)
{
    return pw_cuda_host_call(((cuda_ctx *)ctx)->s, fn, arg);
}

static pw_status cuda_copy(void *ctx, void *dst, const void *src, size_t bytes)
{
    REC(ctx, 100, U(dst), U(src), I(bytes));
    return pw_cuda_copy_async(dst, src, bytes, ((cuda_ctx *)ctx)->s);
}

static pw_status cuda_zero(void *ctx, void *dst, size_t bytes)
{
    REC(ctx, 101, U(dst), I(bytes));
    return pw_cuda_memset_async(dst, 0, bytes, ((cuda_ctx *)ctx)->s);
}

#define OPS(ctx) (((cuda_ctx *)(ctx))->ops)

static pw_status cuda_linear_fwd(void *ctx, const float *x, const float *w, const float *b, float *y,
                                 int64_t n, int64_t in, int64_t out)
{
    REC(ctx, 1, U(x), U(w), U(b), U(y), I(n), I(in), I(out));
    return pw_cuda_linear_fwd(OPS(ctx), x, w, b, y, n, in, out);
}

static pw_status cuda_linear_bwd_input(void *ctx, const float *dy, const float *w, float *dx,
                                       int64_t n, int64_t in, int64_t out, int accumulate)
{
    REC(ctx, 2, U(dy), U(w), U(dx), I(n), I(in), I(out), I(accumulate));
    return pw_cuda_linear_bwd_input(OPS(ctx), dy, w, dx, n, in, out, accumulate);
}

static pw_status cuda_linear_bwd_weight(void *ctx, const float *dy, const float *x, float *dw,
                                        float *db, int64_t n, int64_t in, int64_t out)
{
    REC(ctx, 3, U(dy), U(x), U(dw), U(db), I(n), I(in), I(out));
    return pw_cuda_linear_bwd_weight(OPS(ctx), dy, x, dw, db, n, in, out);
}

static pw_status cuda_relu_fwd(void *ctx, const float *x, float *y, int64_t n)
{
    REC(ctx, 4, U(x), U(y), I(n));
    return pw_cuda_relu_fwd(OPS(ctx), x, y, n);
}

static pw_status cuda_relu_bwd_input(void *ctx, const float *y, const float *dy, float *dx,
                                     int64_t n, int accumulate)
{
    REC(ctx, 5, U(y), U(dy), U(dx), I(n), I(accumulate));
    return pw_cuda_relu_bwd_input(OPS(ctx), y, dy, dx, n, accumulate);
}

static pw_status cuda_gelu_fwd(void *ctx, const float *x, float *y, int64_t n)
{
    REC(ctx, 6, U(x), U(y), I(n));
    return pw_cuda_gelu_fwd(OPS(ctx), x, y, n);
}

static pw_status cuda_gelu_bwd_input(void *ctx, const float *x, const float *dy, float *dx,
                                     int64_t n, int accumulate)
{
    REC(ctx, 7, U(x), U(dy), U(dx), I(n), I(accumulate));
    return pw_cuda_gelu_bwd_input(OPS(ctx), x, dy, dx, n, accumulate);
}

static pw_status cuda_layernorm_fwd(void *ctx, const float *x, const float *w, const float *b,
                                    float *y, float *mean, float *rstd, int64_t n, int64_t d,
                                    float eps)
{
    REC(ctx, 8, U(x), U(w), U(b), U(y), U(mean), U(rstd), I(n), I(d), fbits(eps));
    return pw_cuda_layernorm_fwd(OPS(ctx), x, w, b, y, mean, rstd, n, d, eps);
}

static pw_status cuda_layernorm_bwd_input(void *ctx, const float *x, const float *w,
                                          const float *mean, const float *rstd, const float *dy,
                                          float *dx, int64_t n, int64_t d, int accumulate)
{
    REC(ctx, 9, U(x), U(w), U(mean), U(rstd), U(dy), U(dx), I(n), I(d), I(accumulate));
    return pw_cuda_layernorm_bwd_input(OPS(ctx), x, w, mean, rstd, dy, dx, n, d, accumulate);
}

static pw_status cuda_layernorm_bwd_weight(void *ctx, const float *x, const float *mean,
                                           const float *rstd, const float *dy, float *dw,
                                           float *db, int64_t n, int64_t d)
{
    REC(ctx, 10, U(x), U(mean), U(rstd), U(dy), U(dw), U(db), I(n), I(d));
    return pw_cuda_layernorm_bwd_weight(OPS(ctx), x, mean, rstd, dy, dw, db, n, d);
}

static pw_status cuda_add_fwd(void *ctx, const float *a, const float *b, float *y, int64_t n)
{
    REC(ctx, 11, U(a), U(b), U(y), I(n));
    return pw_cuda_add_fwd(OPS(ctx), a, b, y, n);
}

static pw_status cuda_copy_grad(void *ctx, const float *dy, float *dx, int64_t n, int accumulate)
{
    REC(ctx, 12, U(dy), U(dx), I(n), I(accumulate));
    return pw_cuda_copy_grad(OPS(ctx), dy, dx, n, accumulate);
}

/* The loss stays on the device: per-row losses into `scratch`, their sum
 * (fixed order) added to stats[0]; then the per-row hits into the same
 * scratch (stream order: after the sum) and their count added to stats[1]. */
static pw_status cuda_xent_fwd(void *ctx, const float *logits, const int32_t *labels, float *probs,
                               double *stats, double *scratch, int64_t n, int64_t C)
{
    REC(ctx, 13, U(logits), U(labels), U(probs), U(stats), U(scratch), I(n), I(C));
    if (!scratch)
        return pw_error(PW_ERR_INVALID_ARG, "CUDA softmax cross-entropy needs %lld doubles of row "
                        "scratch", (long long)n);
    PW_CHECK(pw_cuda_softmax_xent_fwd(OPS(ctx), logits, labels, probs, scratch, n, C));
    if (!stats) return PW_OK;
    PW_CHECK(pw_cuda_sum_d(OPS(ctx), scratch, n, &stats[0], 1));
    PW_CHECK(pw_cuda_argmax_hits(OPS(ctx), logits, labels, scratch, n, C));
    return pw_cuda_sum_d(OPS(ctx), scratch, n, &stats[1], 1);
}

static pw_status cuda_xent_bwd(void *ctx, const float *probs, const int32_t *labels, float *dlogits,
                               int64_t n, int64_t C, float scale, int accumulate)
{
    REC(ctx, 14, U(probs), U(labels), U(dlogits), I(n), I(C), fbits(scale), I(accumulate));
    return pw_cuda_softmax_xent_bwd(OPS(ctx), probs, labels, dlogits, n, C, scale, accumulate);
}

static pw_status cuda_loss_fill(void *ctx, const double *stats, float *y, int64_t m, double div)
{
    REC(ctx, 15, U(stats), U(y), I(m), fbits(div));
    return pw_cuda_fill_mean(OPS(ctx), &stats[0], y, m, div);
}

static pw_status cuda_embedding_fwd(void *ctx, const int32_t *tokens, const float *w, float *y,
                                    int64_t n, int64_t vocab, int64_t d)
{
    REC(ctx, 16, U(tokens), U(w), U(y), I(n), I(vocab), I(d));
    return pw_cuda_embedding_fwd(OPS(ctx), tokens, w, y, n, vocab, d);
}

static pw_status cuda_embedding_bwd_weight(void *ctx, const int32_t *tokens, const float *dy,
                                           float *dw, int64_t n, int64_t vocab, int64_t d)
{
    REC(ctx, 17, U(tokens), U(dy), U(dw), I(n), I(vocab), I(d));
    return pw_cuda_embedding_bwd_weight(OPS(ctx), tokens, dy, dw, n, vocab, d);
}

static pw_status cuda_pos_embedding_fwd(void *ctx, const float *x, const float *w, float *y,
                                        int64_t batch, int64_t T, int64_t d)
{
    REC(ctx, 18, U(x), U(w), U(y), I(batch), I(T), I(d));
    return pw_cuda_pos_embedding_fwd(OPS(ctx), x, w, y, batch, T, d);
}

static pw_status cuda_pos_embedding_bwd_weight(void *ctx, const float *dy, float *dw, int64_t batch,
                                               int64_t T, int64_t d)
{
    REC(ctx, 19, U(dy), U(dw), I(batch), I(T), I(d));
    return pw_cuda_pos_embedding_bwd_weight(OPS(ctx), dy, dw, batch, T, d);
}

static pw_status cuda_attention_fwd(void *ctx, const float *qkv, float *out, float *att,
                                    int64_t batch, int64_t T, int64_t D, int64_t H)
{
    REC(ctx, 20, U(qkv), U(out), U(att), I(batch), I(T), I(D), I(H));
    return pw_cuda_attention_fwd(OPS(ctx), qkv, out, att, batch, T, D, H);
}

static pw_status cuda_attention_bwd_input(void *ctx, const float *qkv, const float *att,
                                          const float *dout, float *dqkv, float *scratch,
                                          int64_t batch, int64_t T, int64_t D, int64_t H,
                                          int accumulate)
{
    REC(ctx, 21, U(qkv), U(att), U(dout), U(dqkv), U(scratch), I(batch), I(T), I(D), I(H), I(accumulate));
    return pw_cuda_attention_bwd_input(OPS(ctx), qkv, att, dout, dqkv, scratch, batch, T, D, H,
                                       accumulate);
}

static int64_t cuda_attention_scratch(int64_t T, int64_t H) { return H * T * T; }

static pw_status cuda_dropout_fwd(void *ctx, const float *x, float *y, uint8_t *mask, int64_t batch,
                                  int64_t numel, float p, uint64_t key, int64_t first_sample)
{
    cuda_ctx *c = ctx;
    if (c->mode == REC_OFF)
        return pw_cuda_dropout_fwd(c->ops, x, y, mask, batch, numel, p, key, first_sample);
    /* Recorded: the parameters go to the key's table, which the kernel reads. */
    rec *r = &c->recs[c->key];
    if (c->drops == REC_MAX_DROPOUT)
        return pw_error(PW_ERR_UNSUPPORTED, "CUDA graph: more than %d dropouts in one call",
                        REC_MAX_DROPOUT);
    const int d = c->drops++;
    r->host[2 * d] = key;
    r->host[2 * d + 1] = (uint64_t)first_sample;
    REC(ctx, 200, U(x), U(y), U(mask), I(batch), I(numel), fbits(p));
    return pw_cuda_dropout_fwd_dev(c->ops, x, y, mask, batch, numel, p, r->dev + 2 * d);
}

/* ---- recording (backend.h) ---- */

static pw_status cuda_record_begin(void *ctx, int key)
{
    cuda_ctx *c = ctx;
    if (c->mode != REC_OFF) return pw_error(PW_ERR_INTERNAL, "CUDA graph: nested recording");
    if (key < 0) return pw_error(PW_ERR_INVALID_ARG, "CUDA graph: key %d", key);
    if (key >= c->n_recs) {
        int n = key + 1 > 2 * c->n_recs ? key + 1 : 2 * c->n_recs;
        rec *r = realloc(c->recs, (size_t)n * sizeof *r);
        if (!r) return pw_error(PW_ERR_NOMEM, "CUDA graph: out of memory");
        memset(r + c->n_recs, 0, (size_t)(n - c->n_recs) * sizeof *r);
        c->recs = r;
        c->n_recs = n;
    }
    rec *r = &c->recs[key];
    if (!r->host) {
        const size_t bytes = 2 * REC_MAX_DROPOUT * sizeof(uint64_t);
        PW_CHECK(pw_cuda_host_alloc(bytes, (void **)&r->host));
        pw_status st = pw_cuda_malloc(c->device, bytes, (void **)&r->dev);
        if (st != PW_OK) {
            pw_cuda_host_free(r->host);
            r->host = NULL;
            return st;
        }
    }
    c->key = key;
    c->hash = 0xcbf29ce484222325ULL;
    c->calls = c->drops = 0;
    if (r->graph) {
        c->mode = REC_REPLAY;
        return PW_OK;
    }
    PW_CHECK(pw_cuda_capture_begin(c->s));
    c->mode = REC_CAPTURE;
    return PW_OK;
}

static pw_status cuda_record_end(void *ctx, int key, pw_status calls)
{
    cuda_ctx *c = ctx;
    if (c->mode == REC_OFF || key != c->key)
        return pw_error(PW_ERR_INTERNAL, "CUDA graph: record_end(%d) without its record_begin", key);
    rec *r = &c->recs[key];
    const int mode = c->mode;
    c->mode = REC_OFF;
    if (mode == REC_CAPTURE) {
        pw_cuda_graph g = NULL;
        pw_status st = pw_cuda_capture_end(c->s, calls != PW_OK, &g);
        if (calls != PW_OK) return calls;
        PW_CHECK(st);
        r->graph = g;
        r->hash = c->hash;
        r->calls = c->calls;
        r->drops = c->drops;
    } else if (calls != PW_OK) {
        return calls;
    } else if (c->hash != r->hash || c->calls != r->calls || c->drops != r->drops) {
        return pw_error(PW_ERR_INTERNAL, "CUDA graph %d: the program's calls differ from the recorded "
                        "ones (%d calls, %d dropouts; recorded %d, %d): a bug; --no-gpu-graphs runs "
                        "without recording", key, c->calls, c->drops, r->calls, r->drops);
    }
    if (r->drops)
        PW_CHECK(pw_cuda_copy_async(r->dev, r->host, 2 * (size_t)r->drops * sizeof(uint64_t), c->s));
    return pw_cuda_graph_launch(r->graph, c->s);
}

static pw_status cuda_dropout_bwd_input(void *ctx, const uint8_t *mask, const float *dy, float *dx,
                                        int64_t n, float p, int accumulate)
{
    REC(ctx, 22, U(mask), U(dy), U(dx), I(n), fbits(p), I(accumulate));
    return pw_cuda_dropout_bwd_input(OPS(ctx), mask, dy, dx, n, p, accumulate);
}

static pw_status cuda_optim_update(void *ctx, const pw_optim_config *c, int64_t step, float *p,
                                   const float *g, float *state, int64_t n, int decay)
{
    return pw_cuda_optim_update(OPS(ctx), c, step, p, g, state, n, decay);
}

/* Σ g² of the arrays [from, to) into the scratch double, read back. */
static pw_status sumsq_of(cuda_ctx *c, float *const *g, const int64_t *n, int from, int to, double *out)
{
    PW_CHECK(pw_cuda_memset_async(c->scratch, 0, sizeof(double), c->s));
    for (int i = from; i < to; i++) PW_CHECK(pw_cuda_sumsq_d(c->ops, g[i], n[i], c->scratch, 1));
    PW_CHECK(pw_cuda_copy_async(out, c->scratch, sizeof(double), c->s));
    return pw_cuda_sync(c->s);
}

/* One read-back for the common case (everything finite: the sum of squares
 * in double is finite exactly then, as float squares cannot overflow it);
 * a second pass only to name the culprit. */
static pw_status cuda_find_nonfinite(void *ctx, float *const *g, const int64_t *n, int count, int *bad)
{
    cuda_ctx *c = ctx;
    double s = 0.0;
    *bad = -1;
    PW_CHECK(sumsq_of(c, g, n, 0, count, &s));
    if (isfinite(s)) return PW_OK;
    for (int i = 0; i < count; i++) {
        PW_CHECK(sumsq_of(c, g, n, i, i + 1, &s));
        if (!isfinite(s)) {
            *bad = i;
            return PW_OK;
        }
    }
    *bad = 0; /* the sum overflowed without a culprit: impossible for floats; say the first */
    return PW_OK;
}

static pw_status cuda_device_info(int dev, pw_device_info *out)
{
    pw_cuda_device_info info;
    PW_CHECK(pw_cuda_device_query(dev, &info));
    snprintf(out->name, sizeof out->name, "%s", info.name);
    out->total_memory = (int64_t)info.total_mem;
    out->free_memory = (int64_t)info.free_mem;
    return PW_OK;
}

static const pw_span_mem cuda_span_mem = {.apply = pw_cuda_span_apply, .fence = pw_cuda_span_fence};

static const pw_backend_i cuda_i = {
    .name = "cuda",
    .device_memory = 1,
    .open = cuda_open,
    .close = cuda_close,
    .device_count = cuda_device_count,
    .activate = cuda_activate,
    .notify = cuda_notify,
    .sync = cuda_sync,
    .upload = cuda_copy,
    .host_register = pw_cuda_host_register,
    .host_unregister = pw_cuda_host_unregister,
    .message_alloc = pw_cuda_message_alloc,
    .message_free = pw_cuda_free,
    .span_memory = &cuda_span_mem,
    .record_begin = cuda_record_begin,
    .record_end = cuda_record_end,
    .download = cuda_copy,
    .copy = cuda_copy,
    .zero = cuda_zero,
    .linear_fwd = cuda_linear_fwd,
    .linear_bwd_input = cuda_linear_bwd_input,
    .linear_bwd_weight = cuda_linear_bwd_weight,
    .relu_fwd = cuda_relu_fwd,
    .relu_bwd_input = cuda_relu_bwd_input,
    .gelu_fwd = cuda_gelu_fwd,
    .gelu_bwd_input = cuda_gelu_bwd_input,
    .layernorm_fwd = cuda_layernorm_fwd,
    .layernorm_bwd_input = cuda_layernorm_bwd_input,
    .layernorm_bwd_weight = cuda_layernorm_bwd_weight,
    .add_fwd = cuda_add_fwd,
    .copy_grad = cuda_copy_grad,
    .xent_fwd = cuda_xent_fwd,
    .xent_bwd = cuda_xent_bwd,
    .loss_fill = cuda_loss_fill,
    .embedding_fwd = cuda_embedding_fwd,
    .embedding_bwd_weight = cuda_embedding_bwd_weight,
    .pos_embedding_fwd = cuda_pos_embedding_fwd,
    .pos_embedding_bwd_weight = cuda_pos_embedding_bwd_weight,
    .attention_fwd = cuda_attention_fwd,
    .attention_bwd_input = cuda_attention_bwd_input,
    .attention_scratch = cuda_attention_scratch,
    .dropout_fwd = cuda_dropout_fwd,
    .dropout_bwd_input = cuda_dropout_bwd_input,
    .optim_update = cuda_optim_update,
    .find_nonfinite = cuda_find_nonfinite,
    .device_pci = pw_cuda_device_pci,
    .device_info = cuda_device_info,
};

const pw_backend_i *pw_backend_cuda(void) { return &cuda_i; }
