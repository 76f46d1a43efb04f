/* pipewright — compressed gradient all-reduce: the 16-bit codecs, top-k
 * with error feedback and PowerSGD (see compress.h for the modes and their
 * summation orders).
 *
 * The 16-bit and top-k modes share one shape: encode this member's bucket
 * into a payload of a size every member knows, all-gather the payloads,
 * decode each member's into a dense fp32 vector and sum the vectors
 * pairwise in member order (collective.h's tree order) into the spans.
 * PowerSGD runs on the group's own all-reduce twice (P, then Q).
 */
#include "runtime/compress.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/link.h"
#include "runtime/rng.h"

typedef struct zspan {
    int64_t n, rows, cols;
    int q;              /* powersgd: the rank used, 0 = uncompressed */
    int64_t k;          /* topk: floats kept */
    int64_t state_off;  /* topk: the residual's offset; powersgd: the residual's, Q after it */
} zspan;

struct pw_compressor {
    pw_compress_config cfg;
    int n_spans;
    zspan *s;            /* [n_spans] */
    int64_t L;           /* floats in the bucket */
    int64_t payload;     /* bytes one member contributes (16-bit and top-k) */
    int64_t total_p, total_q; /* powersgd: floats of every P and every Q */
    float *state;        /* topk: residuals [L]; powersgd: per compressed span residual, Q */
    int64_t state_n;
    /* scratch, grown on first use for the group's size */
    unsigned char *mine, *all;  /* payloads: ours, every member's */
    float *dense;                /* [n_members × L] */
    int dense_members;
    uint32_t *keys;              /* topk: one span's |acc| bits */
    float *pq;                   /* powersgd: every P, then every Q */
    pw_span *ar;                 /* powersgd: the first all-reduce's spans */
    int64_t *off;                /* a push (pw_coll_i.push_bytes): each span's bytes in `mine`, [n_spans + 1] */
    pw_span *back;               /* powersgd's push_round: what goes out, where the replies land [2 n_spans] */
    float *pq_back;              /* powersgd's push_round: the replies (every P, then every Q) */
};

/* ------------------------------------------------------------ parsing */

pw_status pw_compress_parse(const char *s, pw_compress_config *out)
{
    memset(out, 0, sizeof *out);
    if (!s) return pw_error(PW_ERR_INVALID_ARG, "--compress: no value");
    if (!strcmp(s, "none")) return PW_OK;
    if (!strcmp(s, "bf16")) {
        out->kind = PW_COMPRESS_BF16;
        return PW_OK;
    }
    if (!strcmp(s, "fp16")) {
        out->kind = PW_COMPRESS_FP16;
        return PW_OK;
    }
    char *end = NULL;
    if (!strncmp(s, "topk:", 5)) {
        double r = strtod(s + 5, &end);
        if (end == s + 5 || *end || !(r > 0.0 && r <= 1.0))
            return pw_error(PW_ERR_INVALID_ARG, "--compress %s: the top-k ratio must be a number in (0, 1], "
                            "e.g. topk:0.01", s);
        out->kind = PW_COMPRESS_TOPK;
        out->ratio = r;
        return PW_OK;
    }
    if (!strncmp(s, "powersgd:", 9)) {
        long r = strtol(s + 9, &end, 10);
        if (end == s + 9 || *end || r < 1 || r > 1024)
            return pw_error(PW_ERR_INVALID_ARG, "--compress %s: the PowerSGD rank must be an integer in "
                            "1..1024, e.g. powersgd:4", s);
        out->kind = PW_COMPRESS_POWERSGD;
        out->rank = (int)r;
        return PW_OK;
    }
    return pw_error(PW_ERR_INVALID_ARG, "--compress %s: expected none, bf16, fp16, topk:RATIO or "
                    "powersgd:RANK", s);
}

void pw_compress_name(const pw_compress_config *c, char *out, size_t n)
{
    switch (c->kind) {
    case PW_COMPRESS_BF16: snprintf(out, n, "bf16"); break;
    case PW_COMPRESS_FP16: snprintf(out, n, "fp16"); break;
    case PW_COMPRESS_TOPK: snprintf(out, n, "topk:%g", c->ratio); break;
    case PW_COMPRESS_POWERSGD: snprintf(out, n, "powersgd:%d", c->rank); break;
    default: snprintf(out, n, "none"); break;
    }
}

pw_compress_cost pw_compress_model(const pw_compress_config *cc, const int64_t *numel, const int64_t *rows, int n,
                                   int members, int hosts, const pw_link *l, int algo)
{
    pw_compress_cost out = {0, 0, 0.0};
    int64_t p = 0, q = 0, unc = 0, payload = 0;
    const pw_compress_kind kind = cc ? cc->kind : PW_COMPRESS_NONE;
    for (int i = 0; i < n; i++) {
        const int64_t m = numel[i];
        out.raw_bytes += 4 * m;
        switch (kind) {
        case PW_COMPRESS_BF16:
        case PW_COMPRESS_FP16: payload += 2 * m; break;
        case PW_COMPRESS_TOPK: payload += m == 0 ? 0 : 8 * (int64_t)ceil(cc->ratio * (double)m); break;
        case PW_COMPRESS_POWERSGD: {
            const int64_t r = rows ? rows[i] : 0, c = r > 0 ? m / r : 0;
            int64_t k = cc->rank;
            if (k > r) k = r;
            if (k > c) k = c;
            if (r > 0 && (r + c) * k < r * c) {
                p += r * k;
                q += c * k;
            } else {
                unc += m;
            }
            break;
        }
        default: break;
        }
    }
    const double inv_b = l && l->bandwidth > 0 ? 1.0 / l->bandwidth : 0.0, a = l ? l->latency_s : 0.0;
    switch (kind) {
    case PW_COMPRESS_BF16:
    case PW_COMPRESS_FP16:
    case PW_COMPRESS_TOPK:
        out.wire_bytes = payload;
        if (pw_link_on(l) && members > 1) out.link_s = (members - 1) * ((double)payload * inv_b + a);
        break;
    case PW_COMPRESS_POWERSGD:
        out.wire_bytes = 4 * (p + q + unc);
        out.link_s = pw_link_allreduce_s(l, (pw_allreduce_algo)algo, members, hosts, 4.0 * (double)(p + unc)) +
                     pw_link_allreduce_s(l, (pw_allreduce_algo)algo, members, hosts, 4.0 * (double)q);
        break;
    default:
        out.wire_bytes = out.raw_bytes;
        out.link_s = pw_link_allreduce_s(l, (pw_allreduce_algo)algo, members, hosts, (double)out.raw_bytes);
        break;
    }
    return out;
}

/* ------------------------------------------------------------- codecs */

static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The codecs as static inline for the per-float loops; the public names
 * below call them. */
static inline uint16_t enc_bf16(float f)
{
    uint32_t u = f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* a quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* ties to even */
    return (uint16_t)(u >> 16);
}

static inline float dec_bf16(uint16_t h) { return u2f((uint32_t)h << 16); }

/* fp16 without branches on the value (gradients straddle 2^-14, where a
 * branch would be mispredicted half the time): both roundings are computed
 * and one is selected. */
static inline uint16_t enc_fp16(float f)
{
    const uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    /* Below 2^-14 (subnormal in fp16): adding 0.5 rounds |f| to a multiple
     * of 2^-24, 0.5's ulp, ties to even; the bits above 0.5's are then the
     * encoding (1024 when it rounds up to the smallest normal). */
    const uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3f000000u;
    /* Normal: exponent 127 → 15, the 13 low bits rounded to nearest even;
     * past 65504 (or inf) the result saturates to inf. */
    const uint32_t r = a - (112u << 23);
    uint32_t nrm = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;
    nrm = nrm < 0x7c00u ? nrm : 0x7c00u;
    uint32_t h = a < 0x38800000u ? sub : nrm;
    h = a > 0x7f800000u ? 0x7e00u : h; /* NaN: a quiet NaN */
    return (uint16_t)(sign | h);
}

static inline float dec_fp16(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu;
    uint32_t o = (em << 13) + (112u << 23);        /* normal: exponent 15 → 127 */
    o = em >= 0x7c00u ? o + (112u << 23) : o;      /* inf, NaN: exponent 255 */
    const float sub = (float)em * (1.0f / 16777216.0f); /* subnormal: m · 2^-24, exact */
    const float v = em < 0x400u ? sub : u2f(o);
    return u2f(f2u(v) | sign);
}

uint16_t pw_f32_to_bf16(float f) { return enc_bf16(f); }
float pw_bf16_to_f32(uint16_t h) { return dec_bf16(h); }
uint16_t pw_f32_to_fp16(float f) { return enc_fp16(f); }
float pw_fp16_to_f32(uint16_t h) { return dec_fp16(h); }

/* ------------------------------------------------------ create, state */

static void powersgd_seed_q(const pw_compressor *z, const zspan *s, float *q, int only_col)
{
    /* Keyed by the matrix's shape alone, so the first Q does not depend on
     * which bucket (or stage) the matrix is in. */
    const uint64_t key = pw_rng_u64(pw_rng_key(z->cfg.seed, "powersgd-q"),
                                    (uint64_t)s->rows * 0x100000001b3ull + (uint64_t)s->cols);
    for (int64_t j = 0; j < s->cols; j++)
        for (int c = 0; c < s->q; c++)
            if (only_col < 0 || c == only_col) q[j * s->q + c] = pw_rng_normal(key, (uint64_t)(j * s->q + c));
}

void pw_compressor_reset(pw_compressor *z)
{
    if (!z) return;
    if (z->state) memset(z->state, 0, (size_t)z->state_n * sizeof(float));
    if (z->cfg.kind != PW_COMPRESS_POWERSGD) return;
    for (int i = 0; i < z->n_spans; i++) {
        const zspan *s = &z->s[i];
        if (s->q) powersgd_seed_q(z, s, z->state + s->state_off + s->n, -1);
    }
}

pw_status pw_compressor_create(const pw_compress_config *cfg, const pw_span *spans, const int64_t *rows_of,
                               int n_spans, pw_compressor **out)
{
    if (!cfg || !out || (n_spans > 0 && !spans))
        return pw_error(PW_ERR_INVALID_ARG, "pw_compressor_create: NULL argument");
    *out = NULL;
    if (cfg->kind == PW_COMPRESS_NONE || cfg->kind > PW_COMPRESS_POWERSGD)
        return pw_error(PW_ERR_INVALID_ARG, "compressor: no compression mode given");
    if (cfg->kind == PW_COMPRESS_TOPK && !(cfg->ratio > 0.0 && cfg->ratio <= 1.0))
        return pw_error(PW_ERR_INVALID_ARG, "compressor: top-k ratio %g is not in (0, 1]", cfg->ratio);
    if (cfg->kind == PW_COMPRESS_POWERSGD && cfg->rank < 1)
        return pw_error(PW_ERR_INVALID_ARG, "compressor: PowerSGD rank %d is below 1", cfg->rank);
    pw_compressor *z = calloc(1, sizeof *z);
    if (!z) return pw_error(PW_ERR_NOMEM, "compressor: out of memory");
    z->cfg = *cfg;
    z->n_spans = n_spans;
    z->s = calloc((size_t)(n_spans > 0 ? n_spans : 1), sizeof *z->s);
    z->ar = calloc((size_t)n_spans + 1, sizeof *z->ar);
    if (!z->s || !z->ar) goto nomem;
    for (int i = 0; i < n_spans; i++) {
        zspan *s = &z->s[i];
        s->n = spans[i].n;
        if (s->n < 0) {
            const long long n = (long long)s->n; /* s is freed with z */
            pw_compressor_destroy(z);
            return pw_error(PW_ERR_INVALID_ARG, "compressor: span %d has %lld floats", i, n);
        }
        z->L += s->n;
        switch (cfg->kind) {
        case PW_COMPRESS_BF16:
        case PW_COMPRESS_FP16: z->payload += 2 * s->n; break;
        case PW_COMPRESS_TOPK:
            s->k = s->n == 0 ? 0 : (int64_t)ceil(cfg->ratio * (double)s->n);
            if (s->n > 0 && s->k < 1) s->k = 1;
            if (s->k > s->n) s->k = s->n;
            s->state_off = z->state_n;
            z->state_n += s->n;
            z->payload += 8 * s->k;
            break;
        case PW_COMPRESS_POWERSGD: {
            const int64_t rows = rows_of ? rows_of[i] : 0;
            if (rows > 0 && s->n % rows != 0) {
                const long long n = (long long)s->n; /* s is freed with z */
                pw_compressor_destroy(z);
                return pw_error(PW_ERR_INVALID_ARG, "compressor: span %d has %lld floats, not a multiple of "
                                "its %lld rows", i, n, (long long)rows);
            }
            const int q = pw_compress_powersgd_rank(cfg, s->n, rows);
            if (!q) break;
            const int64_t cols = s->n / rows;
            s->rows = rows;
            s->cols = cols;
            s->q = q;
            s->state_off = z->state_n;
            z->state_n += s->n + cols * q;
            z->total_p += rows * q;
            z->total_q += cols * q;
            break;
        }
        default: break;
        }
    }
    if (z->state_n > 0 && !(z->state = malloc((size_t)z->state_n * sizeof(float)))) goto nomem;
    if (z->total_p + z->total_q > 0 && !(z->pq = malloc((size_t)(z->total_p + z->total_q) * sizeof(float))))
        goto nomem;
    pw_compressor_reset(z);
    *out = z;
    return PW_OK;
nomem:
    pw_compressor_destroy(z);
    return pw_error(PW_ERR_NOMEM, "compressor: out of memory for a bucket of %d spans", n_spans);
}

void pw_compressor_destroy(pw_compressor *z)
{
    if (!z) return;
    free(z->s);
    free(z->ar);
    free(z->off);
    free(z->back);
    free(z->pq_back);
    free(z->state);
    free(z->mine);
    free(z->all);
    free(z->dense);
    free(z->keys);
    free(z->pq);
    free(z);
}

int64_t pw_compressor_state_floats(const pw_compressor *z) { return z ? z->state_n : 0; }

void pw_compressor_state_get(const pw_compressor *z, float *out)
{
    if (z && z->state_n) memcpy(out, z->state, (size_t)z->state_n * sizeof(float));
}

int64_t pw_compressor_span_state(const pw_compressor *z, int i, int64_t *off)
{
    *off = 0;
    if (!z || i < 0 || i >= z->n_spans) return 0;
    const zspan *s = &z->s[i];
    *off = s->state_off;
    if (z->cfg.kind == PW_COMPRESS_TOPK) return s->n;
    if (z->cfg.kind == PW_COMPRESS_POWERSGD && s->q) return s->n + s->cols * s->q;
    return 0;
}

void pw_compressor_span_state_get(const pw_compressor *z, int i, float *out)
{
    int64_t off;
    const int64_t n = pw_compressor_span_state(z, i, &off);
    if (n > 0) memcpy(out, z->state + off, (size_t)n * sizeof(float));
}

void pw_compressor_span_state_set(pw_compressor *z, int i, const float *in)
{
    int64_t off;
    const int64_t n = pw_compressor_span_state(z, i, &off);
    if (n > 0) memcpy(z->state + off, in, (size_t)n * sizeof(float));
}

void pw_compressor_state_set(pw_compressor *z, const float *in)
{
    if (z && z->state_n) memcpy(z->state, in, (size_t)z->state_n * sizeof(float));
}

/* ------------------------------------------------ gather-decode-sum */

/* Members up to which the 16-bit sum runs fused (sum16), without dense copies. */
#define PW_COMPRESS_FUSED_MAX 16

static pw_status scratch(pw_compressor *z, int n_members)
{
    if (!z->mine && !(z->mine = malloc((size_t)z->payload + 1))) goto nomem;
    if (z->dense_members < n_members) {
        const int dense = z->cfg.kind == PW_COMPRESS_TOPK || n_members > PW_COMPRESS_FUSED_MAX;
        free(z->all);
        free(z->dense);
        z->all = malloc((size_t)z->payload * (size_t)n_members + 1);
        z->dense = malloc(dense ? (size_t)z->L * (size_t)n_members * sizeof(float) + 1 : 1);
        z->dense_members = z->all && z->dense ? n_members : 0;
        if (!z->dense_members) goto nomem;
    }
    return PW_OK;
nomem:
    return pw_error(PW_ERR_NOMEM, "compressor: out of memory for %d members' copies of a bucket of %lld floats",
                    n_members, (long long)z->L);
}

/* Member m's payload → the dense vector dense[m·L ..). */
static void decode(const pw_compressor *z, const unsigned char *p, float *d)
{
    if (z->cfg.kind == PW_COMPRESS_TOPK) {
        memset(d, 0, (size_t)z->L * sizeof(float));
        for (int i = 0; i < z->n_spans; i++) {
            const zspan *s = &z->s[i];
            for (int64_t e = 0; e < s->k; e++) {
                uint32_t idx;
                float v;
                memcpy(&idx, p + 8 * e, 4);
                memcpy(&v, p + 8 * e + 4, 4);
                if (idx < (uint64_t)s->n) d[idx] = v; /* a bad index cannot write outside the span */
            }
            p += 8 * s->k;
            d += s->n;
        }
        return;
    }
    const int bf = z->cfg.kind == PW_COMPRESS_BF16;
    for (int64_t x = 0; x < z->L; x++) {
        uint16_t h;
        memcpy(&h, p + 2 * x, 2);
        d[x] = bf ? dec_bf16(h) : dec_fp16(h);
    }
}

/* The 16-bit sum in one pass: each element's n decoded values summed in
 * the tree order, straight into the spans (the same operations in the same
 * order as decode + the dense tree below, without the n dense copies). */
static void sum16(const pw_compressor *z, int n, const pw_span *spans, int n_spans)
{
    const int bf = z->cfg.kind == PW_COMPRESS_BF16;
    int64_t x = 0;
    for (int i = 0; i < n_spans; i++)
        for (int64_t e = 0; e < spans[i].n; e++, x++) {
            float v[PW_COMPRESS_FUSED_MAX];
            v[0] = 0.0f; /* n >= 1; this keeps the compiler sure of it */
            for (int m = 0; m < n; m++) {
                uint16_t h;
                memcpy(&h, z->all + (size_t)m * (size_t)z->payload + 2 * (size_t)x, 2);
                v[m] = bf ? dec_bf16(h) : dec_fp16(h);
            }
            for (int w = 1; w < n; w *= 2)
                for (int a = 0; a + w < n; a += 2 * w) v[a] = v[a] + v[a + w];
            spans[i].data[e] = v[0];
        }
}

static pw_status gather_sum(pw_compressor *z, const pw_coll *co, const pw_span *spans, int n_spans,
                            const atomic_int *abort)
{
    const int n = co->n_members;
    PW_CHECK(pw_coll_allgather_bytes(co, z->mine, z->payload, z->all, abort));
    if (z->cfg.kind != PW_COMPRESS_TOPK && n <= PW_COMPRESS_FUSED_MAX) {
        sum16(z, n, spans, n_spans);
        return PW_OK;
    }
    for (int m = 0; m < n; m++) decode(z, z->all + (size_t)m * (size_t)z->payload, z->dense + (size_t)m * (size_t)z->L);
    /* The tree order of collective.h: pairs at distance 1, 2, 4 ... */
    for (int w = 1; w < n; w *= 2)
        for (int a = 0; a + w < n; a += 2 * w) {
            float *restrict d = z->dense + (size_t)a * (size_t)z->L;
            const float *restrict q = z->dense + (size_t)(a + w) * (size_t)z->L;
            for (int64_t x = 0; x < z->L; x++) d[x] = d[x] + q[x];
        }
    const float *src = z->dense;
    for (int i = 0; i < n_spans; i++) {
        if (spans[i].n) memcpy(spans[i].data, src, (size_t)spans[i].n * sizeof(float));
        src += spans[i].n;
    }
    return PW_OK;
}

static void encode16(pw_compressor *z, const pw_span *spans, int n_spans)
{
    const int bf = z->cfg.kind == PW_COMPRESS_BF16;
    unsigned char *p = z->mine;
    for (int i = 0; i < n_spans; i++)
        for (int64_t x = 0; x < spans[i].n; x++, p += 2) {
            uint16_t h = bf ? enc_bf16(spans[i].data[x]) : enc_fp16(spans[i].data[x]);
            memcpy(p, &h, 2);
        }
}

/* ---------------------------------------------------------------- top-k */

/* The k-th largest (k >= 1) of a[0..n): a select with a three-way
 * partition (many equal keys, zeros say, stay linear). Reorders a. */
static uint32_t kth_largest(uint32_t *a, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n;
    const int64_t want = k - 1;
    for (;;) {
        if (hi - lo <= 1) return a[lo];
        uint32_t x = a[lo], y = a[lo + (hi - lo) / 2], w = a[hi - 1];
        uint32_t piv = x > y ? (y > w ? y : (x > w ? w : x)) : (x > w ? x : (y > w ? w : y));
        int64_t lt = lo, i = lo, gt = hi;
        while (i < gt) {
            uint32_t v = a[i];
            if (v > piv) {
                a[i++] = a[lt];
                a[lt++] = v;
            } else if (v < piv) {
                a[i] = a[--gt];
                a[gt] = v;
            } else {
                i++;
            }
        }
        if (want < lt) hi = lt;
        else if (want < gt) return piv;
        else lo = gt;
    }
}

static pw_status topk_encode(pw_compressor *z, const pw_span *spans, int n_spans)
{
    int64_t maxn = 0;
    for (int i = 0; i < n_spans; i++)
        if (z->s[i].n > maxn) maxn = z->s[i].n;
    if (!z->keys && !(z->keys = malloc((size_t)maxn * sizeof(uint32_t) + 1)))
        return pw_error(PW_ERR_NOMEM, "compressor: out of memory for top-k keys");
    unsigned char *p = z->mine;
    for (int i = 0; i < n_spans; i++) {
        const zspan *s = &z->s[i];
        float *acc = z->state + s->state_off;
        const float *g = spans[i].data;
        for (int64_t x = 0; x < s->n; x++) {
            acc[x] = g[x] + acc[x]; /* error feedback: this step's gradient plus what was left */
            z->keys[x] = f2u(acc[x]) & 0x7fffffffu;
        }
        if (s->k == 0) continue;
        /* |a| < |b| exactly when their bits without the sign are, NaN above all. */
        const uint32_t t = kth_largest(z->keys, s->n, s->k);
        int64_t above = 0;
        for (int64_t x = 0; x < s->n; x++) above += (f2u(acc[x]) & 0x7fffffffu) > t;
        int64_t ties = s->k - above, taken = 0;
        for (int64_t x = 0; x < s->n && taken < s->k; x++) {
            const uint32_t key = f2u(acc[x]) & 0x7fffffffu;
            if (key > t || (key == t && ties > 0)) {
                if (key == t) ties--;
                uint32_t idx = (uint32_t)x;
                memcpy(p + 8 * taken, &idx, 4);
                memcpy(p + 8 * taken + 4, &acc[x], 4);
                acc[x] = 0.0f; /* sent: nothing of it is left over */
                taken++;
            }
        }
        p += 8 * s->k;
    }
    return PW_OK;
}

/* ------------------------------------------------------------- PowerSGD */

int pw_compress_powersgd_rank(const pw_compress_config *cc, int64_t n, int64_t rows)
{
    if (!cc || cc->kind != PW_COMPRESS_POWERSGD || rows <= 0 || n <= 0 || n % rows) return 0;
    const int64_t cols = n / rows;
    int64_t q = cc->rank;
    if (q > rows) q = rows;
    if (q > cols) q = cols;
    if (q < 1 || (rows + cols) * q >= rows * cols) return 0; /* no gain: uncompressed, as PyTorch's hook */
    return (int)q;
}

/* P (rows × q) = M (rows × cols) Q (cols × q), sums over j in order. */
static void mat_mq(const float *M, const float *Q, float *P, int64_t rows, int64_t cols, int q)
{
    memset(P, 0, (size_t)(rows * q) * sizeof(float));
    for (int64_t i = 0; i < rows; i++) {
        float *restrict p = P + i * q;
        const float *m = M + i * cols;
        for (int64_t j = 0; j < cols; j++) {
            const float mij = m[j];
            const float *restrict qq = Q + j * q;
            for (int c = 0; c < q; c++) p[c] += mij * qq[c];
        }
    }
}

/* Q (cols × q) = Mᵀ P, sums over i in order. */
static void mat_mtp(const float *M, const float *P, float *Q, int64_t rows, int64_t cols, int q)
{
    memset(Q, 0, (size_t)(cols * q) * sizeof(float));
    for (int64_t i = 0; i < rows; i++) {
        const float *m = M + i * cols;
        const float *restrict p = P + i * q;
        for (int64_t j = 0; j < cols; j++) {
            const float mij = m[j];
            float *restrict qq = Q + j * q;
            for (int c = 0; c < q; c++) qq[c] += mij * p[c];
        }
    }
}

static double col_norm2(const float *P, int64_t rows, int q, int c)
{
    double nn = 0.0;
    for (int64_t i = 0; i < rows; i++) nn += (double)P[i * q + c] * P[i * q + c];
    return nn;
}

/* Gram–Schmidt on P's columns in order, each projected out twice ("twice is
 * enough": orthogonal to rounding even when nearly dependent). A column
 * with less than 1e-4 of its length left lies in the span of the ones
 * before it (a gradient of lower rank than r) and becomes 0: normalising
 * its rounding noise would add a direction that is not in the gradient. */
void pw_compress_powersgd_orthogonalise(float *P, int64_t rows, int q)
{
    for (int c = 0; c < q; c++) {
        const double before = col_norm2(P, rows, q, c);
        for (int pass = 0; pass < 2; pass++)
            for (int d = 0; d < c; d++) {
                double dot = 0.0;
                for (int64_t i = 0; i < rows; i++) dot += (double)P[i * q + d] * P[i * q + c];
                const float f = (float)dot;
                for (int64_t i = 0; i < rows; i++) P[i * q + c] -= f * P[i * q + d];
            }
        const double nn = col_norm2(P, rows, q, c);
        const float inv = nn > 1e-8 * before && nn > 0.0 ? (float)(1.0 / sqrt(nn)) : 0.0f;
        for (int64_t i = 0; i < rows; i++) P[i * q + c] *= inv;
    }
}

void pw_compress_powersgd_rebuild(const float *P, const float *Q, int64_t rows, int64_t cols, int q, float *out)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < cols; j++) {
            float v = 0.0f;
            for (int c = 0; c < q; c++) v += P[r * q + c] * Q[j * q + c];
            out[r * cols + j] = v;
        }
}

/* 1. M = gradient + residual (kept in the residual); P = M Q, every
 *    compressed span's P one after the other in P. */
static void powersgd_p(pw_compressor *z, const pw_span *spans, int n_spans, float *P)
{
    for (int i = 0; i < n_spans; i++) {
        const zspan *s = &z->s[i];
        if (!s->q) continue;
        float *M = z->state + s->state_off;
        const float *g = spans[i].data;
        for (int64_t x = 0; x < s->n; x++) M[x] = g[x] + M[x];
        mat_mq(M, M + s->n, P, s->rows, s->cols, s->q);
        P += s->rows * s->q;
    }
}

/* 2. Q = Mᵀ P (our own M, P orthogonalised), every span's in Q. */
static void powersgd_q(pw_compressor *z, int n_spans, const float *P, float *Q)
{
    for (int i = 0; i < n_spans; i++) {
        const zspan *s = &z->s[i];
        if (!s->q) continue;
        mat_mtp(z->state + s->state_off, P, Q, s->rows, s->cols, s->q);
        P += s->rows * s->q;
        Q += s->cols * s->q;
    }
}

/* 3. The sum is P Qᵀ (Q summed); our residual is M − P Qᵀ / n; Q (the sum,
 *    the same bytes on every member) is the next step's warm start. */
static void powersgd_finish(pw_compressor *z, const pw_span *spans, int n_spans, const float *p, const float *q,
                            int n_members)
{
    const float inv_n = 1.0f / (float)n_members;
    for (int i = 0; i < n_spans; i++) {
        const zspan *s = &z->s[i];
        if (!s->q) continue;
        float *M = z->state + s->state_off, *Qkeep = M + s->n, *out = spans[i].data;
        pw_compress_powersgd_rebuild(p, q, s->rows, s->cols, s->q, out);
        for (int64_t x = 0; x < s->n; x++) M[x] -= out[x] * inv_n;
        memcpy(Qkeep, q, (size_t)(s->cols * s->q) * sizeof(float));
        /* A column that came back all zero (a zero gradient) would stay zero
         * for ever: draw it again from the seed. */
        for (int c = 0; c < s->q; c++) {
            int64_t j = 0;
            while (j < s->cols && Qkeep[j * s->q + c] == 0.0f) j++;
            if (j == s->cols) powersgd_seed_q(z, s, Qkeep, c);
        }
        p += s->rows * s->q;
        q += s->cols * s->q;
    }
}

static pw_status powersgd(pw_compressor *z, const pw_coll *co, const pw_span *spans, int n_spans,
                          const atomic_int *abort)
{
    float *P = z->pq, *Qs = z->pq + z->total_p;
    /* P with the uncompressed spans in the same all-reduce. */
    int na = 0;
    if (z->total_p) z->ar[na++] = (pw_span){P, z->total_p};
    for (int i = 0; i < n_spans; i++)
        if (!z->s[i].q && spans[i].n) z->ar[na++] = spans[i];
    powersgd_p(z, spans, n_spans, P);
    PW_CHECK(pw_coll_allreduce(co, z->ar, na, abort));
    if (!z->total_p) return PW_OK;
    float *p = P;
    for (int i = 0; i < n_spans; i++)
        if (z->s[i].q) {
            pw_compress_powersgd_orthogonalise(p, z->s[i].rows, z->s[i].q);
            p += z->s[i].rows * z->s[i].q;
        }
    powersgd_q(z, n_spans, P, Qs);
    pw_span qs = {Qs, z->total_q};
    PW_CHECK(pw_coll_allreduce(co, &qs, 1, abort));
    powersgd_finish(z, spans, n_spans, P, Qs, co->n_members);
    return PW_OK;
}

/* Through a parameter server (push_round): P out, the summed and
 * orthogonalised P back; Q out, the summed Q back (into the second half of
 * pq's twin, so no buffer is sent from and received into at once). */
static pw_status powersgd_push(pw_compressor *z, const pw_coll *co, const pw_span *spans, int n_spans,
                               const atomic_int *abort)
{
    const size_t pqn = (size_t)(z->total_p + z->total_q);
    if (!z->back && !(z->back = malloc(2 * (size_t)n_spans * sizeof *z->back + 1)))
        return pw_error(PW_ERR_NOMEM, "compressor: out of memory");
    if (pqn && !z->pq_back && !(z->pq_back = malloc(pqn * sizeof(float))))
        return pw_error(PW_ERR_NOMEM, "compressor: out of memory");
    pw_span *out = z->back, *back = z->back + n_spans;
    float *P = z->pq, *Qs = z->pq + z->total_p, *Pb = z->pq_back, *Qb = z->pq_back + z->total_p;
    powersgd_p(z, spans, n_spans, P);
    int64_t o = 0;
    for (int i = 0; i < n_spans; i++) {
        const zspan *s = &z->s[i];
        out[i] = s->q ? (pw_span){P + o, s->rows * s->q} : spans[i];
        back[i] = s->q ? (pw_span){Pb + o, s->rows * s->q} : (pw_span){NULL, 0};
        o += s->rows * s->q;
    }
    PW_CHECK(co->vt->push_round(co->self, co->member, spans, n_spans, 0, out, back, abort));
    if (!z->total_p) return PW_OK;
    powersgd_q(z, n_spans, Pb, Qs);
    o = 0;
    for (int i = 0; i < n_spans; i++) {
        const zspan *s = &z->s[i];
        out[i] = s->q ? (pw_span){Qs + o, s->cols * s->q} : (pw_span){NULL, 0};
        back[i] = s->q ? (pw_span){Qb + o, s->cols * s->q} : (pw_span){NULL, 0};
        o += s->cols * s->q;
    }
    PW_CHECK(co->vt->push_round(co->self, co->member, spans, n_spans, 1, out, back, abort));
    powersgd_finish(z, spans, n_spans, Pb, Qb, co->n_members);
    return PW_OK;
}

/* ------------------------------------------------ a parameter server */

int64_t pw_compress_span_bytes(const pw_compress_config *cc, int64_t n)
{
    if (!cc || n <= 0) return 0;
    switch (cc->kind) {
    case PW_COMPRESS_BF16:
    case PW_COMPRESS_FP16: return 2 * n;
    case PW_COMPRESS_TOPK: { /* pw_compressor_create's k */
        int64_t k = (int64_t)ceil(cc->ratio * (double)n);
        if (k < 1) k = 1;
        if (k > n) k = n;
        return 8 * k;
    }
    default: return 0;
    }
}

pw_status pw_compress_decode_span(const pw_compress_config *cc, int64_t n, const void *payload, int64_t bytes,
                                  float *out)
{
    const int64_t want = pw_compress_span_bytes(cc, n);
    if (n > 0 && (want == 0 || bytes != want))
        return pw_error(PW_ERR_SHAPE, "compressed push: %lld bytes for a span of %lld floats (expected %lld)",
                        (long long)bytes, (long long)n, (long long)want);
    const unsigned char *p = payload;
    if (cc->kind == PW_COMPRESS_TOPK) { /* decode()'s, for one span */
        memset(out, 0, (size_t)n * sizeof(float));
        for (int64_t e = 0; e < want / 8; e++) {
            uint32_t idx;
            float v;
            memcpy(&idx, p + 8 * e, 4);
            memcpy(&v, p + 8 * e + 4, 4);
            if (idx < (uint64_t)n) out[idx] = v;
        }
        return PW_OK;
    }
    const int bf = cc->kind == PW_COMPRESS_BF16;
    for (int64_t x = 0; x < n; x++) {
        uint16_t h;
        memcpy(&h, p + 2 * x, 2);
        out[x] = bf ? dec_bf16(h) : dec_fp16(h);
    }
    return PW_OK;
}

/* ---------------------------------------------------------------- entry */

pw_status pw_compressor_allreduce(pw_compressor *z, const pw_coll *co, const pw_span *spans, int n_spans,
                                  const atomic_int *abort, pw_compress_bytes *bytes)
{
    if (n_spans != z->n_spans)
        return pw_error(PW_ERR_SHAPE, "compressed all-reduce: %d spans, the compressor was made for %d", n_spans,
                        z->n_spans);
    for (int i = 0; i < n_spans; i++)
        if (spans[i].n != z->s[i].n)
            return pw_error(PW_ERR_SHAPE, "compressed all-reduce: span %d has %lld floats, the compressor was "
                            "made for %lld", i, (long long)spans[i].n, (long long)z->s[i].n);
    int64_t wire = 0;
    if (co->vt->push_bytes && z->cfg.kind == PW_COMPRESS_POWERSGD) {
        if (!co->vt->push_round)
            return pw_error(PW_ERR_UNSUPPORTED, "compressed push (%s): PowerSGD sums twice across the members with "
                            "an orthogonalisation between, and this endpoint has no round trip", co->vt->name);
        int64_t unc = z->L;
        for (int i = 0; i < n_spans; i++)
            if (z->s[i].q) unc -= z->s[i].n;
        PW_CHECK(powersgd_push(z, co, spans, n_spans, abort));
        wire = (z->total_p + z->total_q + unc) * (int64_t)sizeof(float);
    } else if (co->vt->push_bytes) {
        /* A parameter server's push: encode (top-k's residual as always), send, no sum here. */
        PW_CHECK(scratch(z, 1));
        if (!z->off && !(z->off = malloc(((size_t)n_spans + 1) * sizeof *z->off)))
            return pw_error(PW_ERR_NOMEM, "compressor: out of memory");
        z->off[0] = 0;
        for (int i = 0; i < n_spans; i++) z->off[i + 1] = z->off[i] + pw_compress_span_bytes(&z->cfg, z->s[i].n);
        if (z->cfg.kind == PW_COMPRESS_TOPK) PW_CHECK(topk_encode(z, spans, n_spans));
        else encode16(z, spans, n_spans);
        PW_CHECK(co->vt->push_bytes(co->self, co->member, spans, n_spans, z->mine, z->off, abort));
        wire = z->payload;
    } else if (z->cfg.kind == PW_COMPRESS_POWERSGD) {
        int64_t unc = z->L;
        for (int i = 0; i < n_spans; i++)
            if (z->s[i].q) unc -= z->s[i].n;
        PW_CHECK(powersgd(z, co, spans, n_spans, abort));
        wire = (z->total_p + z->total_q + unc) * (int64_t)sizeof(float);
    } else {
        PW_CHECK(scratch(z, co->n_members));
        if (z->cfg.kind == PW_COMPRESS_TOPK) PW_CHECK(topk_encode(z, spans, n_spans));
        else encode16(z, spans, n_spans);
        PW_CHECK(gather_sum(z, co, spans, n_spans, abort));
        wire = z->payload;
    }
    if (bytes) {
        bytes->raw = z->L * (int64_t)sizeof(float);
        bytes->wire = wire;
    }
    return PW_OK;
}
