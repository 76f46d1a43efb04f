/* Tests for compressed gradient all-reduce (runtime/compress.h): the 16-bit
 * codecs (every representable value round-trips, the rest rounds to nearest
 * even), top-k selection and its error feedback on hand-made gradients,
 * PowerSGD's exact recovery of a low-rank sum and its error feedback, the
 * in-process all-gather of bytes, and a pipeline of 2 replicas that
 * compresses (differs from none, the same bits over stage counts and
 * schedules, wire bytes in its trace).
 *
 * Every test has the same .timeout (see test_collectives.c). */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/collective.h"
#include "runtime/compress.h"
#include "runtime/trace.h"
#include "stages/train/pipeline.h"
#include "tests/pipeline_support.h"
#include "tests/test_helpers.h"

#define TIMEOUT 60

#include "tests/tsan_criterion.h"

static float bits_f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ------------------------------------------------------------ codecs */

Test(compress, bf16_every_value_round_trips, .timeout = TIMEOUT)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float f = pw_bf16_to_f32((uint16_t)h);
        if (isnan(f)) {
            cr_assert(isnan(pw_bf16_to_f32(pw_f32_to_bf16(f))), "bf16 NaN %04x", h);
            continue;
        }
        cr_assert_eq(pw_f32_to_bf16(f), h, "bf16 %04x -> %g -> %04x", h, f, pw_f32_to_bf16(f));
    }
}

Test(compress, fp16_every_value_round_trips, .timeout = TIMEOUT)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float f = pw_fp16_to_f32((uint16_t)h);
        if (isnan(f)) {
            cr_assert(isnan(pw_fp16_to_f32(pw_f32_to_fp16(f))), "fp16 NaN %04x", h);
            continue;
        }
        cr_assert_eq(pw_f32_to_fp16(f), h, "fp16 %04x -> %g -> %04x", h, f, pw_f32_to_fp16(f));
    }
    cr_assert_eq(pw_fp16_to_f32(0x7bff), 65504.0f);
    cr_assert_eq(pw_fp16_to_f32(0x0001), ldexpf(1.0f, -24));
}

Test(compress, sixteen_bits_round_to_nearest_even, .timeout = TIMEOUT)
{
    /* bf16 keeps 8 significant bits: 1 + 2^-8 is half way between 1 and 1 + 2^-7. */
    cr_assert_eq(pw_bf16_to_f32(pw_f32_to_bf16(1.0f + ldexpf(1, -8))), 1.0f);
    cr_assert_eq(pw_bf16_to_f32(pw_f32_to_bf16(1.0f + 3 * ldexpf(1, -8))), 1.0f + ldexpf(1, -6));
    cr_assert_eq(pw_bf16_to_f32(pw_f32_to_bf16(1.0f + ldexpf(1, -8) + ldexpf(1, -20))), 1.0f + ldexpf(1, -7));
    cr_assert_eq(pw_bf16_to_f32(pw_f32_to_bf16(-1.0f - ldexpf(1, -8) - ldexpf(1, -20))), -1.0f - ldexpf(1, -7));
    /* fp16: 11 significant bits, 65504 the largest, subnormals down to 2^-24. */
    cr_assert_eq(pw_fp16_to_f32(pw_f32_to_fp16(1.0f + ldexpf(1, -11))), 1.0f);
    cr_assert_eq(pw_fp16_to_f32(pw_f32_to_fp16(1.0f + 3 * ldexpf(1, -11))), 1.0f + ldexpf(1, -9));
    cr_assert_eq(pw_fp16_to_f32(pw_f32_to_fp16(65519.0f)), 65504.0f);
    cr_assert(isinf(pw_fp16_to_f32(pw_f32_to_fp16(65520.0f))));
    cr_assert(isinf(pw_fp16_to_f32(pw_f32_to_fp16(-1e30f))) && pw_fp16_to_f32(pw_f32_to_fp16(-1e30f)) < 0);
    cr_assert_eq(pw_fp16_to_f32(pw_f32_to_fp16(ldexpf(1, -25))), 0.0f);                    /* tie: to 0 */
    cr_assert_eq(pw_fp16_to_f32(pw_f32_to_fp16(3 * ldexpf(1, -25))), 2 * ldexpf(1, -24)); /* tie: to even */
    cr_assert_eq(pw_fp16_to_f32(pw_f32_to_fp16(ldexpf(1, -14) - ldexpf(1, -26))), ldexpf(1, -14));
    /* Any float: the nearest of its two neighbours (half an ulp at most). */
    uint32_t s = 7;
    for (int i = 0; i < 200000; i++) {
        s = s * 1664525u + 1013904223u;
        float x = bits_f((s & 0x807fffffu) | ((100u + (s >> 24) % 50u) << 23)); /* 2^-27 .. 2^22 */
        float b = pw_bf16_to_f32(pw_f32_to_bf16(x)), h = pw_fp16_to_f32(pw_f32_to_fp16(x));
        int e;
        frexpf(x, &e);
        cr_assert_leq(fabsf(b - x), ldexpf(1, e - 9), "bf16 of %g is %g", x, b);
        float ulp16 = e - 1 < -14 ? ldexpf(1, -24) : ldexpf(1, e - 11);
        if (fabsf(x) < 65504.0f) cr_assert_leq(fabsf(h - x), ulp16 / 2, "fp16 of %g is %g", x, h);
    }
}

Test(compress, parse_and_name, .timeout = TIMEOUT)
{
    pw_compress_config c;
    char n[32];
    cr_assert_eq(pw_compress_parse("none", &c), PW_OK);
    cr_assert_eq(c.kind, PW_COMPRESS_NONE);
    cr_assert_eq(pw_compress_parse("topk:0.01", &c), PW_OK);
    cr_assert_eq(c.kind, PW_COMPRESS_TOPK);
    pw_compress_name(&c, n, sizeof n);
    cr_assert_str_eq(n, "topk:0.01");
    cr_assert_eq(pw_compress_parse("powersgd:4", &c), PW_OK);
    cr_assert_eq(c.rank, 4);
    const char *bad[] = {"topk:0", "topk:1.5", "topk:", "topk:x", "powersgd:0", "powersgd:2.5", "fp8", "", "bf16 "};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cr_assert_eq(pw_compress_parse(bad[i], &c), PW_ERR_INVALID_ARG, "'%s' accepted", bad[i]);
        cr_assert(strstr(pw_last_error(), "--compress"), "message: %s", pw_last_error());
    }
}

/* ------------------------------------------------- a group of threads */

typedef struct member {
    pw_shm_group *g; /* NULL: coll is the endpoint */
    pw_coll coll;
    int k;
    pw_compressor *z;
    pw_span *spans;
    int n_spans;
    int steps;
    float *grads; /* [steps][L]: this member's gradient of each step */
    float *out;   /* [steps][L]: the sums it got */
    int64_t L;
    pw_status st;
    pw_compress_bytes by;
} member;

static void *member_main(void *arg)
{
    member *m = arg;
    pw_coll c = m->g ? pw_shm_group_member(m->g, m->k) : m->coll;
    m->st = PW_OK;
    for (int s = 0; s < m->steps && m->st == PW_OK; s++) {
        /* The spans are consecutive pieces of one buffer of L floats. */
        memcpy(m->spans[0].data, m->grads + s * m->L, (size_t)m->L * sizeof(float));
        m->st = pw_compressor_allreduce(m->z, &c, m->spans, m->n_spans, NULL, &m->by);
        memcpy(m->out + s * m->L, m->spans[0].data, (size_t)m->L * sizeof(float));
    }
    return NULL;
}

/* n members, each with spans of the sizes `ns` (rows `rows`) over one
 * buffer, run `steps` compressed sums of grads[member][step][L]. */
static void run_group(const pw_compress_config *cc, int n, const int64_t *ns, const int64_t *rows, int n_spans,
                      int steps, float *grads, float *out, member *ms)
{
    pw_shm_group *g;
    cr_assert_eq(pw_shm_group_create(n, &g), PW_OK);
    int64_t L = 0;
    for (int i = 0; i < n_spans; i++) L += ns[i];
    pthread_t th[8];
    for (int k = 0; k < n; k++) {
        member *m = &ms[k];
        memset(m, 0, sizeof *m);
        m->g = g;
        m->k = k;
        m->L = L;
        m->steps = steps;
        m->n_spans = n_spans;
        m->grads = grads + (size_t)k * (size_t)steps * (size_t)L;
        m->out = out + (size_t)k * (size_t)steps * (size_t)L;
        float *buf = calloc((size_t)L + 1, sizeof *buf);
        m->spans = calloc((size_t)n_spans, sizeof *m->spans);
        int64_t at = 0;
        for (int i = 0; i < n_spans; i++) {
            m->spans[i] = (pw_span){buf + at, ns[i]};
            at += ns[i];
        }
        cr_assert_eq(pw_compressor_create(cc, m->spans, rows, n_spans, &m->z), PW_OK, "%s", pw_last_error());
    }
    for (int k = 0; k < n; k++) pthread_create(&th[k], NULL, member_main, &ms[k]);
    for (int k = 0; k < n; k++) pthread_join(th[k], NULL);
    for (int k = 0; k < n; k++) cr_assert_eq(ms[k].st, PW_OK, "member %d: %s", k, pw_status_str(ms[k].st));
    pw_shm_group_destroy(g);
}

static void free_group(member *ms, int n)
{
    for (int k = 0; k < n; k++) {
        free(ms[k].spans[0].data);
        free(ms[k].spans);
        pw_compressor_destroy(ms[k].z);
    }
}

Test(compress, sixteen_bit_sum_is_the_tree_of_the_rounded, .timeout = TIMEOUT)
{
    const int64_t ns[] = {5, 0, 37, 1};
    const int64_t L = 43;
    for (int kind = 0; kind < 2; kind++)
        for (int n = 1; n <= 5; n++) {
            pw_compress_config cc = {.kind = kind ? PW_COMPRESS_FP16 : PW_COMPRESS_BF16};
            float *g = malloc(sizeof(float) * (size_t)(n * L)), *out = malloc(sizeof(float) * (size_t)(n * L));
            uint32_t s = 99u + (uint32_t)n;
            for (int64_t i = 0; i < n * L; i++) {
                s = s * 1664525u + 1013904223u;
                g[i] = ((float)(s >> 8) / 16777216.0f - 0.5f) * 3.0f;
            }
            member ms[5];
            run_group(&cc, n, ns, NULL, 4, 1, g, out, ms);
            for (int64_t x = 0; x < L; x++) {
                float r[5];
                for (int k = 0; k < n; k++)
                    r[k] = kind ? pw_fp16_to_f32(pw_f32_to_fp16(g[k * L + x])) : pw_bf16_to_f32(pw_f32_to_bf16(g[k * L + x]));
                for (int w = 1; w < n; w *= 2) /* pairs at distance 1, 2, 4 (collective.h) */
                    for (int a = 0; a + w < n; a += 2 * w) r[a] = r[a] + r[a + w];
                for (int k = 0; k < n; k++)
                    cr_assert_eq(out[k * L + x], r[0], "%s n=%d member %d float %lld: %g, want %g",
                                 kind ? "fp16" : "bf16", n, k, (long long)x, out[k * L + x], r[0]);
            }
            cr_assert_eq(ms[0].by.raw, 4 * L);
            cr_assert_eq(ms[0].by.wire, 2 * L);
            free_group(ms, n);
            free(g);
            free(out);
        }
}

/* ------------------------------------------ a parameter server's push */

/* An endpoint with push_bytes (stages/train/ps.h's): it keeps the payload. */
typedef struct pushed {
    unsigned char buf[4096];
    int64_t off[8];
    int n_spans, calls;
} pushed;

static pw_status push_keep(void *self, int member, const pw_span *spans, int n_spans, const void *mine,
                           const int64_t *off, const atomic_int *abort)
{
    (void)member, (void)spans, (void)abort;
    pushed *p = self;
    cr_assert(n_spans < 8 && off[n_spans] <= (int64_t)sizeof p->buf);
    memcpy(p->off, off, ((size_t)n_spans + 1) * sizeof *off);
    memcpy(p->buf, mine, (size_t)off[n_spans]);
    p->n_spans = n_spans;
    p->calls++;
    return PW_OK;
}

static pw_status no_allreduce(void *self, int member, const pw_span *spans, int n_spans, const atomic_int *abort)
{
    (void)self, (void)member, (void)spans, (void)n_spans, (void)abort;
    return pw_error(PW_ERR_INTERNAL, "a push endpoint does not all-reduce");
}

static pw_status no_gather(void *self, int member, double v, double *out, const atomic_int *abort)
{
    (void)self, (void)member, (void)v, (void)out, (void)abort;
    return pw_error(PW_ERR_INTERNAL, "a push endpoint does not gather");
}

/* bf16, fp16 and top-k (with its error feedback over 3 steps): what a
 * server gets by decoding each member's pushed spans and summing them in
 * the tree order is, bit for bit, the gathering all-reduce's sum; the
 * push leaves the spans as they are and reports the payload's bytes;
 * PowerSGD refuses an endpoint that pushes but has no round trip. */
Test(compress, a_pushed_payload_decodes_to_the_gathered_sum, .timeout = TIMEOUT)
{
    const int64_t ns[] = {5, 0, 37, 1};
    const int64_t L = 43;
    const int n = 4, steps = 3; /* 4: the tree is not the left-to-right sum */
    static const pw_coll_i push_i = {.name = "push", .allreduce = no_allreduce, .allgather_f64 = no_gather,
                                     .push_bytes = push_keep};
    for (int mode = 0; mode < 3; mode++) {
        pw_compress_config cc = {.kind = mode == 0 ? PW_COMPRESS_BF16 : mode == 1 ? PW_COMPRESS_FP16 : PW_COMPRESS_TOPK,
                                 .ratio = 0.2};
        float *g = malloc(sizeof(float) * (size_t)(n * steps * L)), *out = malloc(sizeof(float) * (size_t)(n * steps * L));
        uint32_t s = 7u + (uint32_t)mode;
        for (int64_t i = 0; i < n * steps * L; i++) {
            s = s * 1664525u + 1013904223u;
            /* magnitudes 2^-12 .. 2^12: the members' sums round, so their order shows */
            g[i] = ldexpf((float)(s >> 8) / 16777216.0f - 0.5f, (int)(s % 25u) - 12);
        }
        member ms[4];
        run_group(&cc, n, ns, NULL, 4, steps, g, out, ms);
        /* The same gradients pushed by fresh compressors, one per member. */
        pw_compressor *z[4];
        float buf[4][43], dec[4][43];
        pw_span sp[4][4];
        pushed got[4];
        for (int k = 0; k < n; k++) {
            int64_t at = 0;
            for (int i = 0; i < 4; i++) sp[k][i] = (pw_span){buf[k] + at, ns[i]}, at += ns[i];
            cr_assert_eq(pw_compressor_create(&cc, sp[k], NULL, 4, &z[k]), PW_OK, "%s", pw_last_error());
        }
        for (int st = 0; st < steps; st++) {
            for (int k = 0; k < n; k++) {
                memset(&got[k], 0, sizeof got[k]);
                const float *gk = g + ((size_t)k * (size_t)steps + (size_t)st) * (size_t)L;
                memcpy(buf[k], gk, sizeof buf[k]);
                pw_coll c = {.vt = &push_i, .self = &got[k], .member = k, .n_members = n};
                pw_compress_bytes by;
                cr_assert_eq(pw_compressor_allreduce(z[k], &c, sp[k], 4, NULL, &by), PW_OK, "%s", pw_last_error());
                cr_assert_eq(got[k].calls, 1);
                cr_assert_eq(memcmp(buf[k], gk, sizeof buf[k]), 0, "the push changed the spans");
                cr_assert_eq(by.wire, got[k].off[4]);
                cr_assert_eq(by.wire, ms[0].by.wire);
                int64_t at = 0;
                for (int i = 0; i < 4; i++) {
                    const int64_t b = got[k].off[i + 1] - got[k].off[i];
                    cr_assert_eq(b, pw_compress_span_bytes(&cc, ns[i]));
                    cr_assert_eq(pw_compress_decode_span(&cc, ns[i], got[k].buf + got[k].off[i], b, dec[k] + at), PW_OK,
                                 "%s", pw_last_error());
                    at += ns[i];
                }
            }
            for (int w = 1; w < n; w *= 2) /* the server's tree */
                for (int a = 0; a + w < n; a += 2 * w)
                    for (int64_t x = 0; x < L; x++) dec[a][x] = dec[a][x] + dec[a + w][x];
            for (int64_t x = 0; x < L; x++) {
                const float want = out[(size_t)st * (size_t)L + (size_t)x]; /* member 0's gathered sum */
                cr_assert_eq(memcmp(&dec[0][x], &want, sizeof want), 0, "mode %d step %d float %lld: %g, gathered %g",
                             mode, st, (long long)x, dec[0][x], want);
            }
        }
        float one = 1.0f;
        cr_assert_eq(pw_compress_decode_span(&cc, 1, got[0].buf, 3, &one), PW_ERR_SHAPE, "a short payload is taken");
        for (int k = 0; k < n; k++) pw_compressor_destroy(z[k]);
        free_group(ms, n);
        free(g);
        free(out);
    }
    pw_compress_config pc = {.kind = PW_COMPRESS_POWERSGD, .rank = 1};
    float m[16] = {0};
    pw_span sp = {m, 16};
    const int64_t rows = 4;
    pw_compressor *z;
    pushed got = {0};
    pw_coll c = {.vt = &push_i, .self = &got, .member = 0, .n_members = 2};
    cr_assert_eq(pw_compressor_create(&pc, &sp, &rows, 1, &z), PW_OK);
    cr_assert_eq(pw_compressor_allreduce(z, &c, &sp, 1, NULL, NULL), PW_ERR_UNSUPPORTED);
    cr_assert(strstr(pw_last_error(), "PowerSGD") && strstr(pw_last_error(), "round trip"), "%s", pw_last_error());
    pw_compressor_destroy(z);
}

/* ---------------------------------------------------------------- top-k */

Test(compress, topk_selects_the_largest_and_feeds_back_the_rest, .timeout = TIMEOUT)
{
    /* Two spans; ratio 0.34: k = ⌈0.34·6⌉ = 3 of the first, ⌈0.34·4⌉ = 2 of
     * the second. Multiples of 1/4, so every sum below is exact. */
    const int64_t ns[] = {6, 4};
    float g[2 * 10] = {
        0.25f, -5.0f, 3.0f, 0.5f, -3.0f, 1.0f, /* picks -5, 3, -3 */
        1.0f, -1.0f, 1.0f, 0.5f,              /* ties: the lower indices 0 and 1 */
        /* step 2: adds to the residual (0.25, 0, 0, 0.5, 0, 1 | 0, 0, 1, 0.5) */
        0.5f, 0.0f, 0.0f, 0.25f, 0.0f, 0.0f, /* acc 0.75 0 0 0.75 0 1: picks 1, then 0.75 at 0 and 3 */
        0.0f, 0.0f, -2.0f, 0.0f,              /* acc 0 0 -1 0.5: picks -1, 0.5 */
    };
    float out[20];
    pw_compress_config cc = {.kind = PW_COMPRESS_TOPK, .ratio = 0.34};
    member ms[1];
    run_group(&cc, 1, ns, NULL, 2, 2, g, out, ms);
    const float want[20] = {0, -5, 3, 0, -3, 0, 1, -1, 0, 0, /* step 1 */
                            0.75f, 0, 0, 0.75f, 0, 1, 0, 0, -1, 0.5f};
    for (int i = 0; i < 20; i++) cr_assert_eq(out[i], want[i], "float %d of step %d: %g, want %g", i % 10, i / 10 + 1, out[i], want[i]);
    float res[10];
    cr_assert_eq(pw_compressor_state_floats(ms[0].z), 10);
    pw_compressor_state_get(ms[0].z, res);
    for (int i = 0; i < 10; i++) cr_assert_eq(res[i], 0.0f, "residual %d: %g", i, res[i]);
    cr_assert_eq(ms[0].by.wire, 8 * (3 + 2));
    cr_assert_eq(ms[0].by.raw, 40);
    free_group(ms, 1);
}

Test(compress, topk_error_feedback_loses_nothing, .timeout = TIMEOUT)
{
    /* 3 members, 6 steps of random gradients (multiples of 2^-10 in
     * [-4, 4]: every sum below is exact): the sum of what arrived plus every
     * member's residual is the sum of every gradient. */
    enum { N = 3, T = 6, L = 40 };
    const int64_t ns[] = {25, 15};
    static float g[N * T * L], out[N * T * L];
    uint32_t s = 5;
    for (int i = 0; i < N * T * L; i++) {
        s = s * 1664525u + 1013904223u;
        g[i] = (float)((int)(s >> 20) - 2048) / 1024.0f;
    }
    pw_compress_config cc = {.kind = PW_COMPRESS_TOPK, .ratio = 0.1};
    member ms[N];
    run_group(&cc, N, ns, NULL, 2, T, g, out, ms);
    float res[N][L];
    for (int k = 0; k < N; k++) pw_compressor_state_get(ms[k].z, res[k]);
    for (int x = 0; x < L; x++) {
        double got = 0, want = 0;
        for (int t = 0; t < T; t++) {
            got += out[t * L + x]; /* member 0's; every member got the same */
            for (int k = 1; k < N; k++) cr_assert_eq(out[(k * T + t) * L + x], out[t * L + x]);
            for (int k = 0; k < N; k++) want += g[(k * T + t) * L + x];
        }
        for (int k = 0; k < N; k++) got += res[k][x];
        cr_assert_eq(got, want, "float %d: arrived + residuals %g, gradients %g", x, got, want);
    }
    /* Each step each member sent ⌈0.1·25⌉ + ⌈0.1·15⌉ = 3 + 2 entries: at most 5 nonzero per member. */
    for (int t = 0; t < T; t++) {
        int nz = 0;
        for (int x = 0; x < L; x++) nz += out[t * L + x] != 0.0f;
        cr_assert_leq(nz, N * 5);
    }
    /* Reset: the residuals are zero again. */
    pw_compressor_reset(ms[0].z);
    pw_compressor_state_get(ms[0].z, res[0]);
    for (int x = 0; x < L; x++) cr_assert_eq(res[0][x], 0.0f);
    free_group(ms, N);
}

/* ------------------------------------------------------------- PowerSGD */

/* rows × cols matrix Σ_j u_j v_jᵀ of rank `r` from a seed. */
static void low_rank(float *m, int rows, int cols, int r, uint32_t seed)
{
    memset(m, 0, sizeof(float) * (size_t)(rows * cols));
    uint32_t s = seed;
    for (int j = 0; j < r; j++) {
        float u[64], v[64];
        for (int i = 0; i < rows; i++) {
            s = s * 1664525u + 1013904223u;
            u[i] = (float)(s >> 8) / 16777216.0f - 0.5f;
        }
        for (int i = 0; i < cols; i++) {
            s = s * 1664525u + 1013904223u;
            v[i] = (float)(s >> 8) / 16777216.0f - 0.5f;
        }
        for (int a = 0; a < rows; a++)
            for (int b = 0; b < cols; b++) m[a * cols + b] += u[a] * v[b];
    }
}

Test(compress, powersgd_recovers_a_low_rank_sum_exactly, .timeout = TIMEOUT)
{
    /* A 24 × 16 matrix and a vector of 7 in one bucket. Two members whose
     * gradients are of rank 1 and 2: the sum is of rank <= 3, so rank 3 (and
     * 4) give it back to rounding; the vector is summed exactly in fp32. */
    enum { R = 24, C = 16, V = 7, L = R * C + V };
    const int64_t ns[] = {R * C, V}, rows[] = {R, 0};
    for (int rank = 3; rank <= 4; rank++) {
        static float g[2 * L], out[2 * L];
        low_rank(g, R, C, 1, 11);
        low_rank(g + L, R, C, 2, 12);
        for (int i = 0; i < V; i++) {
            g[R * C + i] = 0.1f * (float)i;
            g[L + R * C + i] = 1.0f / (float)(i + 3);
        }
        pw_compress_config cc = {.kind = PW_COMPRESS_POWERSGD, .rank = rank, .seed = 42};
        member ms[2];
        run_group(&cc, 2, ns, rows, 2, 1, g, out, ms);
        double err = 0, mag = 0;
        for (int i = 0; i < R * C; i++) {
            double want = (double)g[i] + g[L + i];
            err = fmax(err, fabs(out[i] - want));
            mag = fmax(mag, fabs(want));
            cr_assert_eq(out[i], out[L + i], "the members' sums differ at %d", i);
        }
        cr_assert_leq(err, 1e-5 * mag, "rank %d: max error %g of %g", rank, err, mag);
        for (int i = 0; i < V; i++) cr_assert_eq(out[R * C + i], g[R * C + i] + g[L + R * C + i]);
        /* P (24 × q) and Q (16 × q) travel, not 384 floats; the vector as is. */
        cr_assert_eq(ms[0].by.wire, 4 * ((R + C) * rank + V));
        free_group(ms, 2);
    }
}

Test(compress, powersgd_error_feedback, .timeout = TIMEOUT)
{
    /* A full-rank 20 × 12 gradient, the same each step, at rank 1 on 2
     * members: each step the sum arrived plus the members' residuals is
     * every gradient so far (to rounding), and the residual is what rank 1
     * cannot carry — so over steps the average of what arrived approaches
     * the true sum. */
    enum { R = 20, C = 12, L = R * C, T = 8 };
    const int64_t ns[] = {L}, rows[] = {R};
    static float g[2 * T * L], out[2 * T * L];
    for (int k = 0; k < 2; k++)
        for (int t = 0; t < T; t++) low_rank(g + (k * T + t) * L, R, C, 12, 3 + (uint32_t)k);
    pw_compress_config cc = {.kind = PW_COMPRESS_POWERSGD, .rank = 1, .seed = 7};
    member ms[2];
    run_group(&cc, 2, ns, rows, 1, T, g, out, ms);
    /* The state: residual (L) then Q (C × 1). */
    cr_assert_eq(pw_compressor_state_floats(ms[0].z), L + C);
    float st0[L + C], st1[L + C];
    pw_compressor_state_get(ms[0].z, st0);
    pw_compressor_state_get(ms[1].z, st1);
    for (int j = 0; j < C; j++) cr_assert_eq(st0[L + j], st1[L + j], "the members' Q differ");
    double worst = 0, first_err = 0, avg_err = 0, mag = 0;
    for (int i = 0; i < L; i++) {
        double got = 0, want = 0;
        for (int t = 0; t < T; t++) {
            got += out[t * L + i];
            want += (double)g[t * L + i] + g[(T + t) * L + i];
        }
        got += (double)st0[i] + st1[i];
        worst = fmax(worst, fabs(got - want));
        mag = fmax(mag, fabs(want));
        const double one = (double)g[i] + g[T * L + i];
        first_err = fmax(first_err, fabs(out[i] - one));
        avg_err = fmax(avg_err, fabs((got - st0[i] - st1[i]) / T - one));
    }
    cr_assert_leq(worst, 1e-4 * mag, "arrived + residuals differ from the gradients by %g (of %g)", worst, mag);
    cr_assert_gt(first_err, 1e-3 * mag / T, "rank 1 of a full-rank matrix cannot be exact (%g)", first_err);
    cr_assert_lt(avg_err, first_err, "error feedback: the average of %d steps (%g) is no better than one (%g)", T,
                 avg_err, first_err);
    /* State set / get / reset. */
    float z[L + C];
    memset(z, 0, sizeof z);
    pw_compressor_state_set(ms[0].z, z);
    pw_compressor_state_get(ms[0].z, st0);
    cr_assert_eq(st0[0], 0.0f);
    pw_compressor_reset(ms[0].z);
    pw_compressor_state_get(ms[0].z, st0);
    cr_assert_eq(st0[0], 0.0f);
    cr_assert_neq(st0[L], 0.0f, "reset draws Q from the seed again");
    free_group(ms, 2);
}

/* ------------------------------------------ PowerSGD through a server */

/* A parameter server for threads (pw_coll_i.push_round): the members
 * deposit their round's spans; member 0 sums each replied span over the
 * members in the tree order — round 0 then orthogonalises it, round 1 also
 * rebuilds P Qᵀ — with the functions stages/train/pipeline_ps.c's server
 * uses; every member copies the reply. */
enum { FS_SPANS = 4, FS_MAX = 512 };
typedef struct fake_server {
    pthread_barrier_t bar;
    int n;
    int64_t rows[FS_SPANS];
    const pw_span *out[8];
    float reply[FS_SPANS][FS_MAX], p[FS_SPANS][FS_MAX], rebuilt[FS_SPANS][FS_MAX];
    int rounds;
} fake_server;

typedef struct fs_member {
    fake_server *fs;
    int k;
} fs_member;

static pw_status fs_round(void *self, int member, const pw_span *spans, int n_spans, int round, const pw_span *out,
                          const pw_span *back, const atomic_int *abort)
{
    (void)member, (void)spans, (void)abort;
    fs_member *m = self;
    fake_server *fs = m->fs;
    fs->out[m->k] = out;
    pthread_barrier_wait(&fs->bar);
    if (m->k == 0) {
        fs->rounds++;
        for (int i = 0; i < n_spans; i++) {
            if (back[i].n <= 0) continue;
            const int64_t len = back[i].n;
            cr_assert(len <= FS_MAX && out[i].n == len);
            float part[8][FS_MAX];
            for (int k = 0; k < fs->n; k++) memcpy(part[k], fs->out[k][i].data, sizeof(float) * (size_t)len);
            for (int w = 1; w < fs->n; w *= 2)
                for (int a = 0; a + w < fs->n; a += 2 * w)
                    for (int64_t x = 0; x < len; x++) part[a][x] = part[a][x] + part[a + w][x];
            const int64_t rows = fs->rows[i], cols = spans[i].n / rows;
            if (round == 0) { /* P: rows × q */
                pw_compress_powersgd_orthogonalise(part[0], rows, (int)(len / rows));
                memcpy(fs->p[i], part[0], sizeof(float) * (size_t)len);
            } else { /* Q: cols × q */
                pw_compress_powersgd_rebuild(fs->p[i], part[0], rows, cols, (int)(len / cols), fs->rebuilt[i]);
            }
            memcpy(fs->reply[i], part[0], sizeof(float) * (size_t)len);
        }
    }
    pthread_barrier_wait(&fs->bar);
    for (int i = 0; i < n_spans; i++)
        if (back[i].n > 0) memcpy(back[i].data, fs->reply[i], sizeof(float) * (size_t)back[i].n);
    return PW_OK;
}

static pw_status fs_push_bytes(void *self, int member, const pw_span *spans, int n_spans, const void *mine,
                               const int64_t *off, const atomic_int *abort)
{
    (void)self, (void)member, (void)spans, (void)n_spans, (void)mine, (void)off, (void)abort;
    return pw_error(PW_ERR_INTERNAL, "PowerSGD pushed a payload instead of its rounds");
}

/* PowerSGD through a parameter server (the compressor's push_round; the
 * server's sums, orthogonalisation and rebuild as pipeline_ps.c does them)
 * against the tree all-reduce of the same members over 3 steps: the same
 * summed gradient of every compressed matrix, rebuilt on the server too,
 * the same residuals and Q (the error feedback and warm start), the same
 * wire bytes; the uncompressed vector is pushed as it is. 4 members: the
 * tree, (0 + 1) + (2 + 3), is not the left-to-right sum. */
Test(compress, powersgd_through_a_server_is_the_tree_all_reduce, .timeout = TIMEOUT)
{
    enum { R = 12, C = 10, V = 7, N = 4, T = 3 };
    const int64_t ns[] = {R * C, V, C * R}, rows[] = {R, 0, C};
    const int64_t L = 2 * R * C + V;
    static float g[N * T * (2 * R * C + V)], want[N * T * (2 * R * C + V)], got[N * T * (2 * R * C + V)];
    for (int k = 0; k < N; k++)
        for (int t = 0; t < T; t++) {
            float *m = g + (size_t)(k * T + t) * (size_t)L;
            low_rank(m, R, C, 4, 17u + (uint32_t)(k * T + t));
            for (int i = 0; i < V; i++) m[R * C + i] = 0.25f * (float)(i - k) + (float)t;
            low_rank(m + R * C + V, C, R, 5, 91u + (uint32_t)(k * T + t));
        }
    pw_compress_config cc = {.kind = PW_COMPRESS_POWERSGD, .rank = 2, .seed = 5};
    member ms[N];
    run_group(&cc, N, ns, rows, 3, T, g, want, ms);
    fake_server fs = {.n = N, .rows = {R, 0, C}};
    pthread_barrier_init(&fs.bar, NULL, N);
    static const pw_coll_i vt = {.name = "fake-ps", .allreduce = no_allreduce, .allgather_f64 = no_gather,
                                 .push_bytes = fs_push_bytes, .push_round = fs_round};
    member th[N];
    fs_member fm[N];
    pthread_t id[N];
    for (int k = 0; k < N; k++) {
        member *m = &th[k];
        memset(m, 0, sizeof *m);
        fm[k] = (fs_member){&fs, k};
        m->coll = (pw_coll){.vt = &vt, .self = &fm[k], .member = k, .n_members = N};
        m->k = k;
        m->L = L;
        m->steps = T;
        m->n_spans = 3;
        m->grads = g + (size_t)k * T * (size_t)L;
        m->out = got + (size_t)k * T * (size_t)L;
        float *buf = calloc((size_t)L, sizeof *buf);
        m->spans = calloc(3, sizeof *m->spans);
        for (int i = 0, at = 0; i < 3; at += (int)ns[i], i++) m->spans[i] = (pw_span){buf + at, ns[i]};
        cr_assert_eq(pw_compressor_create(&cc, m->spans, rows, 3, &m->z), PW_OK, "%s", pw_last_error());
    }
    for (int k = 0; k < N; k++) pthread_create(&id[k], NULL, member_main, &th[k]);
    for (int k = 0; k < N; k++) pthread_join(id[k], NULL);
    pthread_barrier_destroy(&fs.bar);
    cr_assert_eq(fs.rounds, 2 * T, "two rounds a step: %d in %d steps", fs.rounds, T);
    for (int k = 0; k < N; k++) {
        cr_assert_eq(th[k].st, PW_OK, "member %d: %s", k, pw_status_str(th[k].st));
        cr_assert_eq(th[k].by.wire, ms[k].by.wire, "wire bytes %lld, the all-reduce's %lld", (long long)th[k].by.wire,
                     (long long)ms[k].by.wire);
        for (int t = 0; t < T; t++) {
            const float *a = got + (size_t)(k * T + t) * (size_t)L, *b = want + (size_t)(k * T + t) * (size_t)L;
            const float *mine = g + (size_t)(k * T + t) * (size_t)L;
            cr_assert_eq(memcmp(a, b, sizeof(float) * R * C), 0, "member %d step %d: the first matrix's sum differs",
                         k, t);
            cr_assert_eq(memcmp(a + R * C + V, b + R * C + V, sizeof(float) * C * R), 0,
                         "member %d step %d: the second matrix's sum differs", k, t);
            cr_assert_eq(memcmp(a + R * C, mine + R * C, sizeof(float) * V), 0, "the pushed vector changed");
        }
        const int64_t nst = pw_compressor_state_floats(ms[k].z);
        cr_assert_eq(pw_compressor_state_floats(th[k].z), nst);
        float *st_got = malloc(sizeof(float) * (size_t)nst), *st_want = malloc(sizeof(float) * (size_t)nst);
        pw_compressor_state_get(th[k].z, st_got);
        pw_compressor_state_get(ms[k].z, st_want);
        cr_assert_eq(memcmp(st_got, st_want, sizeof(float) * (size_t)nst), 0,
                     "member %d: the residuals or Q differ from the all-reduce's", k);
        free(st_got);
        free(st_want);
    }
    free_group(th, N);
    /* The server's own rebuild of the last step is the members' sum. */
    const float *last = want + (size_t)(T - 1) * (size_t)L;
    cr_assert_eq(memcmp(fs.rebuilt[0], last, sizeof(float) * R * C), 0, "the server's rebuild differs");
    cr_assert_eq(memcmp(fs.rebuilt[2], last + R * C + V, sizeof(float) * C * R), 0, "the server's rebuild differs");
    free_group(ms, N);
}


Test(compress, bad_compressors_are_refused, .timeout = TIMEOUT)
{
    float buf[12];
    pw_span sp = {buf, 12};
    pw_compressor *z = NULL;
    pw_compress_config none = {0}, topk = {.kind = PW_COMPRESS_TOPK, .ratio = 0}, psgd = {.kind = PW_COMPRESS_POWERSGD, .rank = 2};
    cr_assert_eq(pw_compressor_create(&none, &sp, NULL, 1, &z), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_compressor_create(&topk, &sp, NULL, 1, &z), PW_ERR_INVALID_ARG);
    const int64_t rows = 5; /* does not divide 12 */
    cr_assert_eq(pw_compressor_create(&psgd, &sp, &rows, 1, &z), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "rows"), "%s", pw_last_error());
    cr_assert_null(z);
    /* Spans other than the creation's. */
    pw_compress_config bf = {.kind = PW_COMPRESS_BF16};
    cr_assert_eq(pw_compressor_create(&bf, &sp, NULL, 1, &z), PW_OK);
    pw_shm_group *g;
    cr_assert_eq(pw_shm_group_create(1, &g), PW_OK);
    pw_coll c = pw_shm_group_member(g, 0);
    pw_span other = {buf, 11};
    cr_assert_eq(pw_compressor_allreduce(z, &c, &other, 1, NULL, NULL), PW_ERR_SHAPE);
    pw_compressor_destroy(z);
    pw_shm_group_destroy(g);
}

/* ------------------------------------------------------------ pipelines */

#include "runtime/trace_read.h"
#include "scheduler/analysis/trace_analysis.h"
#include "stages/train/data.h"

typedef struct zrun {
    int stages, buckets;
    pw_schedule_kind kind;
    const char *mode;
    const char *trace; /* (optional) write the trace here */
    int overlap;       /* > 1: post-validated clipping, runs of this many steps */
} zrun;

/* 2 replicas of the test MLP, 5 steps of AdamW: replica 0's parameters
 * (every replica's are checked equal). */
static float *train_z(const pw_graph *g, const pw_dataset *d, const zrun *z, int64_t *n)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 48;
    pc.micro_batches = 3;
    pc.stages = z->stages;
    pc.schedule = z->kind;
    pc.partition = PW_PARTITION_FLOPS;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.seed = 7;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.check = 1;
    pc.watchdog_s = 60;
    pc.replicas = 2;
    pc.buckets = z->buckets;
    pc.trace_events = z->trace ? 4096 : 0;
    cr_assert_eq(pw_compress_parse(z->mode, &pc.compress), PW_OK);
    pc.compress.seed = 1234;
    if (z->overlap) { /* clipping that triggers on most steps, validated after the step */
        pc.clip_grad_norm = 0.05f;
        pc.post_validate = 1;
        pc.overlap_steps = z->overlap;
    }
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    if (z->overlap > 1) {
        pw_step_stats s[5];
        cr_assert_eq(pw_pipeline_steps(pl, 5, s), PW_OK, "%s: %s", z->mode, pw_last_error());
    } else {
        for (int i = 0; i < 5; i++) {
            pw_step_stats s;
            cr_assert_eq(pw_pipeline_step(pl, &s), PW_OK, "%s: step %d: %s", z->mode, i + 1, pw_last_error());
        }
    }
    float *p0 = test_replica_params(pl, 0, g, n);
    int64_t n1;
    float *p1 = test_replica_params(pl, 1, g, &n1);
    cr_assert_eq(memcmp(p0, p1, (size_t)n1 * 4), 0, "%s: the replicas' parameters differ", z->mode);
    free(p1);
    if (z->trace) cr_assert_eq(pw_pipeline_write_trace(pl, z->trace), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
    return p0;
}

Test(compress, pipelines_compress_the_same_bits_on_every_layout, .timeout = TIMEOUT)
{
    static const char *MLP = "graph z_mlp\n" PW_TEST_MLP_BODY;
    pw_graph *g = test_parse(MLP, "z.graph");
    pw_synthetic_config sc = {.n = 384, .sample_shape = {.ndim = 2, .d = {4, 6}}, .n_classes = 5, .seed = 3,
                              .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    int64_t n;
    float *none = train_z(g, d, &(zrun){1, 4, PW_SCHEDULE_1F1B, "none", NULL, 0}, &n);
    const char *modes[] = {"bf16", "fp16", "topk:0.1", "powersgd:2"};
    for (int m = 0; m < 4; m++) {
        int64_t n1, n2, n3;
        float *a = train_z(g, d, &(zrun){1, 4, PW_SCHEDULE_1F1B, modes[m], NULL, 0}, &n1);
        float *b = train_z(g, d, &(zrun){2, 3, PW_SCHEDULE_GPIPE, modes[m], NULL, 0}, &n2);
        float *c = train_z(g, d, &(zrun){3, 1, PW_SCHEDULE_ZB_H1, modes[m], NULL, 0}, &n3);
        cr_assert(n1 == n && n2 == n && n3 == n);
        cr_assert_eq(memcmp(a, b, (size_t)n * 4), 0, "%s: 1 stage (1F1B) and 2 stages (GPipe) differ", modes[m]);
        cr_assert_eq(memcmp(a, c, (size_t)n * 4), 0, "%s: 1 stage and 3 stages (ZB-H1) differ", modes[m]);
        cr_assert_neq(memcmp(a, none, (size_t)n * 4), 0, "%s: the same bits as no compression", modes[m]);
        /* Trained, not broken: within a few percent of the uncompressed weights. */
        double diff = 0, mag = 0;
        for (int64_t i = 0; i < n; i++) {
            diff += fabs((double)a[i] - none[i]);
            mag += fabs((double)none[i]);
        }
        cr_assert_lt(diff, 0.05 * mag, "%s: the weights moved %.3g (of %.3g) from uncompressed training", modes[m],
                     diff, mag);
        free(a);
        free(b);
        free(c);
    }
    free(none);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Steps that overlap (post-validation with clipping that triggers): a
 * discarded step's buckets must not reach the compressors' error
 * feedback, so runs of steps give the bits of one step at a time. */
Test(compress, overlapped_steps_keep_the_error_feedback, .timeout = TIMEOUT)
{
    static const char *MLP = "graph z_mlp\n" PW_TEST_MLP_BODY;
    pw_graph *g = test_parse(MLP, "z.graph");
    pw_synthetic_config sc = {.n = 384, .sample_shape = {.ndim = 2, .d = {4, 6}}, .n_classes = 5, .seed = 3,
                              .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    const char *modes[] = {"topk:0.1", "powersgd:2"};
    for (int m = 0; m < 2; m++) {
        int64_t n1, n3;
        float *one = train_z(g, d, &(zrun){2, 3, PW_SCHEDULE_1F1B, modes[m], NULL, 1}, &n1);
        float *runs = train_z(g, d, &(zrun){2, 3, PW_SCHEDULE_1F1B, modes[m], NULL, 3}, &n3);
        cr_assert_eq(n1, n3);
        cr_assert_eq(memcmp(one, runs, (size_t)n1 * 4), 0, "%s: runs of 3 overlapped steps differ from one at a time",
                     modes[m]);
        free(one);
        free(runs);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(compress, the_trace_records_bytes_before_and_after, .timeout = TIMEOUT)
{
    static const char *MLP = "graph z_mlp\n" PW_TEST_MLP_BODY;
    pw_graph *g = test_parse(MLP, "z.graph");
    pw_synthetic_config sc = {.n = 384, .sample_shape = {.ndim = 2, .d = {4, 6}}, .n_classes = 5, .seed = 3,
                              .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    char path[64];
    snprintf(path, sizeof path, "/tmp/pw_compress_trace_%d.json", (int)getpid());
    const char *modes[] = {"none", "bf16", "topk:0.1"};
    for (int m = 0; m < 3; m++) {
        int64_t n;
        free(train_z(g, d, &(zrun){2, 2, PW_SCHEDULE_1F1B, modes[m], path, 0}, &n));
        pw_trace_reader *rd;
        cr_assert_eq(pw_trace_reader_open(path, &rd), PW_OK, "%s", pw_last_error());
        pw_trace_record ev;
        int more = 1, seen = 0;
        int64_t raw = 0, wire = 0;
        while (pw_trace_reader_next(rd, &ev, &more) == PW_OK && more) {
            if (strcmp(ev.name, "ALLREDUCE")) continue;
            seen++;
            raw += ev.bytes;
            wire += ev.wire_bytes;
            if (m > 0) cr_assert(ev.has & PW_TREC_WIRE_BYTES, "%s: an ALLREDUCE without wire_bytes", modes[m]);
            else cr_assert(!(ev.has & PW_TREC_WIRE_BYTES), "none: an ALLREDUCE with wire_bytes");
        }
        pw_trace_reader_close(rd);
        cr_assert_gt(seen, 0, "%s: no ALLREDUCE in the trace", modes[m]);
        if (m == 1) cr_assert_eq(2 * wire, raw, "bf16: %lld bytes on the wire of %lld", (long long)wire, (long long)raw);
        if (m == 2) cr_assert_lt(4 * wire, raw, "topk:0.1: %lld bytes on the wire of %lld", (long long)wire, (long long)raw);
        /* pipe-trace's analysis sums the same. */
        pw_trace_analysis_config tc = PW_TRACE_ANALYSIS_DEFAULTS;
        tc.no_detail = 1;
        pw_trace_analysis *ta;
        cr_assert_eq(pw_trace_analyze(path, &tc, &ta), PW_OK, "%s", pw_last_error());
        cr_assert_eq(ta->allreduce_n, seen);
        cr_assert_eq(ta->allreduce_bytes, raw);
        cr_assert_eq(ta->allreduce_wire_bytes, m > 0 ? wire : raw);
        cr_assert_eq(ta->allreduce_compressed, m > 0);
        pw_trace_analysis_destroy(ta);
    }
    remove(path);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(compress, a_missing_member_cannot_hang_the_gather, .timeout = TIMEOUT)
{
    /* Member 1 never comes; once abort is raised member 0 returns. */
    pw_shm_group *g;
    cr_assert_eq(pw_shm_group_create(2, &g), PW_OK);
    pw_coll c = pw_shm_group_member(g, 0);
    atomic_int abort_flag;
    atomic_init(&abort_flag, 1);
    char mine[4] = "abc", all[8];
    cr_assert_eq(pw_coll_allgather_bytes(&c, mine, 4, all, &abort_flag), PW_ERR_TIMEOUT);
    pw_shm_group_destroy(g);
}

Test(compress, cli_refuses_a_bad_mode, .timeout = TIMEOUT)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " PW_SOURCE_DIR "/examples/fashion_mlp.graph --data synthetic:64:784:10 "
             "--compress topk:2 --steps 1 2>&1", PW_BINARY_DIR);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    char out[4096] = "";
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    int st = pclose(p);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 2, "exit %d: %s", WEXITSTATUS(st), out);
    cr_assert(strstr(out, "--compress topk:2: the top-k ratio must be a number in (0, 1]"), "%s", out);
}

/* Runs `cmd` with stderr joined; its output in out (n bytes). The exit status. */
static int run_cli(const char *cmd, char *out, size_t n)
{
    char full[2048];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    cr_assert_not_null(p);
    size_t got = fread(out, 1, n - 1, p);
    out[got] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

/* The error-feedback state is in training-state checkpoints (the
 * "compress" files, per replica, parameter and use): a compressed run
 * resumed at step 2, on another stage count, ends with the bytes of the
 * unbroken run (docs/distributed.md, "Compression"). Without the state the
 * residuals would restart from zero and the bytes differ. `gpt`: a tiny GPT
 * whose head is tied to its embedding (two uses, so two parts of the state:
 * in one chunk on 1 stage, on the first and last chunks on 3). */
static void resumed_is_unbroken(const char *mode, int gpt)
{
    char dir[64], cmd[2048], out[16384], a[128], b[128], why[256], model[512];
    snprintf(dir, sizeof dir, "/tmp/pw_compress_ckpt_XXXXXX");
    cr_assert(mkdtemp(dir));
    if (gpt) {
        snprintf(model, sizeof model, "%s/g.graph", dir);
        FILE *f = fopen(model, "w");
        cr_assert_not_null(f);
        fputs("graph z_gpt\n" PW_TEST_GPT_BODY, f);
        fclose(f);
        snprintf(model, sizeof model, "%s/text.txt", dir);
        cr_assert_not_null(f = fopen(model, "w"));
        for (int i = 0; i < 200; i++) fprintf(f, "%d: the error feedback of a tied weight, use by use %d.\n", i, i % 7);
        fclose(f);
        snprintf(model, sizeof model, "%s/g.graph --data text:%s/text.txt --batch 16", dir, dir);
    } else {
        snprintf(model, sizeof model, PW_SOURCE_DIR "/examples/fashion_mlp.graph --data synthetic:256:784:10 "
                 "--batch 32");
    }
    char run[1024];
    snprintf(run, sizeof run, PW_BINARY_DIR "/pipeline-run %s --micro-batches 2 --replicas 2 --no-pin --quiet "
             "--steps 5 --optimizer adamw --compress %s", model, mode);
    snprintf(a, sizeof a, "%s/unbroken.st", dir);
    snprintf(b, sizeof b, "%s/resumed.st", dir);
    snprintf(cmd, sizeof cmd, "%s --stages 1 --save %s", run, a);
    cr_assert_eq(run_cli(cmd, out, sizeof out), 0, "%s\n%s", cmd, out);
    snprintf(cmd, sizeof cmd, "%s --stages 1 --checkpoint-dir %s/ck --checkpoint-every 2 --keep 0", run, dir);
    cr_assert_eq(run_cli(cmd, out, sizeof out), 0, "%s\n%s", cmd, out);
    snprintf(cmd, sizeof cmd, "%s --stages %d --resume %s/ck/step-00000002 --save %s", run, gpt ? 3 : 2, dir, b);
    cr_assert_eq(run_cli(cmd, out, sizeof out), 0, "%s\n%s", cmd, out);
    cr_assert(!strstr(out, "not restored"), "%s", out);
    cr_assert(test_same_tensors(a, b, why, sizeof why), "--compress %s resumed at step 2: %s", mode, why);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
}

Test(compress, resume_of_topk_is_bit_identical, .timeout = 120) { resumed_is_unbroken("topk:0.1", 0); }
Test(compress, resume_of_powersgd_is_bit_identical, .timeout = 120) { resumed_is_unbroken("powersgd:2", 0); }
Test(compress, resume_of_a_tied_gpt_is_bit_identical, .timeout = 120)
{
    resumed_is_unbroken("topk:0.1", 1);
    resumed_is_unbroken("powersgd:2", 1);
}

/* A checkpoint without the state (written by an uncompressed run, or by a
 * version before it was saved) still resumes, and says that the state
 * starts again from zero. */
Test(compress, resume_without_the_state_says_it_restarts, .timeout = TIMEOUT)
{
    char dir[64], cmd[1024];
    snprintf(dir, sizeof dir, "/tmp/pw_compress_ckpt_XXXXXX");
    cr_assert(mkdtemp(dir));
    const char *run = PW_BINARY_DIR "/pipeline-run " PW_SOURCE_DIR "/examples/fashion_mlp.graph "
                      "--data synthetic:256:784:10 --batch 32 --micro-batches 2 --stages 1 --replicas 2 --no-pin "
                      "--quiet --steps 4";
    snprintf(cmd, sizeof cmd, "%s --checkpoint-dir %s --checkpoint-every 2 >/dev/null 2>&1", run, dir);
    cr_assert_eq(system(cmd), 0, "%s", cmd);
    snprintf(cmd, sizeof cmd, "%s --compress topk:0.1 --resume %s/step-00000002", run, dir);
    char out[8192];
    cr_assert_eq(run_cli(cmd, out, sizeof out), 0, "%s", out);
    cr_assert(strstr(out, "--resume with --compress topk: the error-feedback state (residuals) is not restored: "
                          "the checkpoint holds none (it was written without it); it starts again from zero"),
              "%s", out);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
}
