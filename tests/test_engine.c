/* Tests for the event-driven engine (scheduler/engine.h) and CPU placement
 * (runtime/topology.h).
 *
 * The engine is driven through fake stage chunks that have no layers: each
 * message is a few 32-bit words computed from (chunk, micro-batch) and a hash
 * of the input the chunk actually received, so a buffer handed to the wrong
 * chunk, the wrong micro-batch or reused too early shows up as a mismatch at
 * the next reader. Every chunk logs the (kind, mb) of each call, checks the
 * slot discipline, and re-checks all its bound buffers at every backward.
 *
 * Every test has the same .timeout: Criterion reports a spurious leak under
 * LeakSanitizer when timeouts differ within a file. */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "runtime/log.h"
#include "runtime/topology.h"
#include "runtime/trace.h"
#include "scheduler/engine.h"
#include "scheduler/schedule.h"

#define TIMEOUT 60

#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer */

/* ------------------------------------------------------------ fake chunk */

#define MAX_SLOTS 64
#define MAX_LOG 8192
#define MAX_WORDS 64

/* Words per message: link l (chunk l -> l+1) carries ACT_WORDS(l) activation
 * words and GRAD_WORDS(l) gradient words; different per link and direction so
 * a buffer from the wrong pool is the wrong size too. */
#define ACT_WORDS(l) (4 + 2 * (l))
#define GRAD_WORDS(l) (5 + 2 * (l))

typedef struct call_rec {
    char kind;   /* 'F', 'B', 'W' */
    int mb;
} call_rec;

typedef struct fake {
    int chunk, n_chunks;
    int split_w;             /* the schedule's */
    int has_bw;              /* vtable has backward_weight */
    int n_slots;             /* report's peak for this chunk */
    int fail_fwd_mb;         /* forward fails on this mb (-1: never) */
    int sleep_fwd_us;        /* forward sleeps this long */
    uint32_t *bound[MAX_SLOTS][PW_PORT_COUNT];
    int slot_mb[MAX_SLOTS];  /* -1: free */
    call_rec log[MAX_LOG];
    int n_log;
    int optim_calls;
    long last_step;
    uint64_t wsum;           /* weight "gradient", accumulated in call order */
} fake;

static uint32_t mix(uint32_t tag, int l, int m, int i, uint32_t h)
{
    uint32_t x = tag * 0x9E3779B1u ^ (uint32_t)l * 0x85EBCA77u ^ (uint32_t)m * 0xC2B2AE3Du ^
                 (uint32_t)i * 0x27D4EB2Fu ^ h;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    x *= 0x297A2D39u;
    x ^= x >> 15;
    return x;
}

static uint32_t fold(const uint32_t *v, int n)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++) h = (h ^ v[i]) * 16777619u;
    return h;
}

/* What link l's activation message for mb m must hold. */
static void expect_act(int l, int m, uint32_t *out)
{
    uint32_t h = 0;
    if (l > 0) {
        uint32_t prev[MAX_WORDS];
        expect_act(l - 1, m, prev);
        h = fold(prev, ACT_WORDS(l - 1));
    }
    for (int i = 0; i < ACT_WORDS(l); i++) out[i] = mix(0xA, l, m, i, h);
}

/* What link l's gradient message (written by chunk l+1) must hold. */
static void expect_grad(int l, int m, int n_chunks, uint32_t *out)
{
    uint32_t h = 0;
    if (l + 1 < n_chunks - 1) {
        uint32_t next[MAX_WORDS];
        expect_grad(l + 1, m, n_chunks, next);
        h = fold(next, GRAD_WORDS(l + 1));
    }
    for (int i = 0; i < GRAD_WORDS(l); i++) out[i] = mix(0xB, l, m, i, h);
}

static pw_status check_words(const fake *f, const char *what, int mb, const uint32_t *got,
                             const uint32_t *want, int n)
{
    if (!got) return pw_error(PW_ERR_INTERNAL, "fake chunk %d mb %d: %s not bound", f->chunk, mb, what);
    if ((uintptr_t)got % 64)
        return pw_error(PW_ERR_INTERNAL, "fake chunk %d mb %d: %s not 64-byte aligned", f->chunk, mb, what);
    for (int i = 0; i < n; i++)
        if (got[i] != want[i])
            return pw_error(PW_ERR_NUMERIC, "fake chunk %d mb %d: %s word %d is %08x, expected %08x",
                            f->chunk, mb, what, i, got[i], want[i]);
    return PW_OK;
}

static pw_status log_call(fake *f, char kind, int mb, int slot)
{
    if (slot < 0 || slot >= f->n_slots)
        return pw_error(PW_ERR_INTERNAL, "fake chunk %d: %c mb %d got slot %d of %d", f->chunk, kind, mb,
                        slot, f->n_slots);
    if (f->n_log < MAX_LOG) f->log[f->n_log++] = (call_rec){kind, mb};
    return PW_OK;
}

/* Everything bound to the slot of mb must still be what it was. */
static pw_status check_bound(fake *f, int mb, int slot, int with_grad_in)
{
    uint32_t want[MAX_WORDS];
    const int c = f->chunk, C = f->n_chunks;
    if (c > 0) {
        expect_act(c - 1, mb, want);
        PW_CHECK(check_words(f, "ACT_IN", mb, f->bound[slot][PW_PORT_ACT_IN], want, ACT_WORDS(c - 1)));
    }
    if (c < C - 1) {
        expect_act(c, mb, want);
        PW_CHECK(check_words(f, "ACT_OUT", mb, f->bound[slot][PW_PORT_ACT_OUT], want, ACT_WORDS(c)));
        expect_grad(c, mb, C, want);
        PW_CHECK(check_words(f, "GRAD_OUT", mb, f->bound[slot][PW_PORT_GRAD_OUT], want, GRAD_WORDS(c)));
    }
    if (with_grad_in && c > 0) {
        expect_grad(c - 1, mb, C, want);
        PW_CHECK(check_words(f, "GRAD_IN", mb, f->bound[slot][PW_PORT_GRAD_IN], want, GRAD_WORDS(c - 1)));
    }
    return PW_OK;
}

static pw_status fake_forward(void *self, int mb, int slot)
{
    fake *f = self;
    PW_CHECK(log_call(f, 'F', mb, slot));
    if (f->sleep_fwd_us) usleep((useconds_t)f->sleep_fwd_us);
    if (mb == f->fail_fwd_mb) return pw_error(PW_ERR_NUMERIC, "fake chunk %d: loss is NaN", f->chunk);
    if (f->slot_mb[slot] != -1)
        return pw_error(PW_ERR_INTERNAL, "fake chunk %d: F mb %d in slot %d still held by mb %d", f->chunk,
                        mb, slot, f->slot_mb[slot]);
    f->slot_mb[slot] = mb;
    uint32_t h = 0;
    if (f->chunk > 0) {
        uint32_t want[MAX_WORDS];
        expect_act(f->chunk - 1, mb, want);
        const uint32_t *in = f->bound[slot][PW_PORT_ACT_IN];
        PW_CHECK(check_words(f, "ACT_IN", mb, in, want, ACT_WORDS(f->chunk - 1)));
        h = fold(in, ACT_WORDS(f->chunk - 1));
    }
    if (f->chunk < f->n_chunks - 1) {
        uint32_t *out = f->bound[slot][PW_PORT_ACT_OUT];
        if (!out || (uintptr_t)out % 64)
            return pw_error(PW_ERR_INTERNAL, "fake chunk %d: bad ACT_OUT", f->chunk);
        for (int i = 0; i < ACT_WORDS(f->chunk); i++) out[i] = mix(0xA, f->chunk, mb, i, h);
    }
    return PW_OK;
}

static pw_status fake_backward_input(void *self, int mb, int slot)
{
    fake *f = self;
    PW_CHECK(log_call(f, 'B', mb, slot));
    if (f->slot_mb[slot] != mb)
        return pw_error(PW_ERR_INTERNAL, "fake chunk %d: B mb %d in slot %d, which holds mb %d", f->chunk,
                        mb, slot, f->slot_mb[slot]);
    PW_CHECK(check_bound(f, mb, slot, 0));
    const int c = f->chunk;
    if (c > 0) {
        uint32_t h = c < f->n_chunks - 1 ? fold(f->bound[slot][PW_PORT_GRAD_OUT], GRAD_WORDS(c)) : 0;
        uint32_t *gin = f->bound[slot][PW_PORT_GRAD_IN];
        if (!gin || (uintptr_t)gin % 64) return pw_error(PW_ERR_INTERNAL, "fake chunk %d: bad GRAD_IN", c);
        for (int i = 0; i < GRAD_WORDS(c - 1); i++) gin[i] = mix(0xB, c - 1, mb, i, h);
    }
    if (!f->has_bw) f->slot_mb[slot] = -1; /* the whole backward: slot free */
    return PW_OK;
}

static pw_status fake_backward_weight(void *self, int mb, int slot)
{
    fake *f = self;
    PW_CHECK(log_call(f, 'W', mb, slot));
    if (f->slot_mb[slot] != mb)
        return pw_error(PW_ERR_INTERNAL, "fake chunk %d: W mb %d in slot %d, which holds mb %d", f->chunk,
                        mb, slot, f->slot_mb[slot]);
    PW_CHECK(check_bound(f, mb, slot, 1));
    f->wsum = f->wsum * 1000003u + (uint64_t)mb + 1;
    f->slot_mb[slot] = -1; /* W is always the last backward when it exists */
    return PW_OK;
}

static pw_status fake_optimizer_step(void *self, long step)
{
    fake *f = self;
    f->optim_calls++;
    f->last_step = step;
    return PW_OK;
}

static size_t fake_port_bytes(void *self, pw_port port)
{
    const fake *f = self;
    const int c = f->chunk, C = f->n_chunks;
    switch (port) {
    case PW_PORT_ACT_IN: return c > 0 ? 4 * ACT_WORDS(c - 1) : 0;
    case PW_PORT_ACT_OUT: return c < C - 1 ? 4 * ACT_WORDS(c) : 0;
    case PW_PORT_GRAD_OUT: return c < C - 1 ? 4 * GRAD_WORDS(c) : 0;
    case PW_PORT_GRAD_IN: return c > 0 ? 4 * GRAD_WORDS(c - 1) : 0;
    default: return 0;
    }
}

static pw_status fake_bind(void *self, int slot, pw_port port, void *buf)
{
    fake *f = self;
    if (slot < 0 || slot >= f->n_slots || (int)port < 0 || port >= PW_PORT_COUNT)
        return pw_error(PW_ERR_INTERNAL, "fake chunk %d: bind slot %d port %d", f->chunk, slot, (int)port);
    f->bound[slot][port] = buf;
    return PW_OK;
}

static const pw_stage_i fake_full_i = {
    .name = "fake",
    .forward = fake_forward,
    .backward_input = fake_backward_input,
    .backward_weight = fake_backward_weight,
    .optimizer_step = fake_optimizer_step,
    .port_bytes = fake_port_bytes,
    .bind = fake_bind,
};

/* No backward_weight: backward_input is the whole backward (W a no-op). */
static const pw_stage_i fake_nobw_i = {
    .name = "fake-no-w",
    .forward = fake_forward,
    .backward_input = fake_backward_input,
    .optimizer_step = fake_optimizer_step,
    .port_bytes = fake_port_bytes,
    .bind = fake_bind,
};

/* ------------------------------------------------------------- harness */

typedef struct harness {
    pw_schedule *s;
    pw_schedule_report *rep;
    fake *fakes;
    pw_engine_chunk *chunks;
    pw_engine *e;
} harness;

static pw_schedule *make_schedule(pw_schedule_kind kind, int S, int M, int split_w)
{
    pw_schedule_config cfg = {.kind = kind, .n_stages = S, .n_micro = M, .split_w = split_w};
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_schedule_lower(s), PW_OK, "%s", pw_last_error());
    return s;
}

static pw_schedule *parse(const char *csv)
{
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_parse_csv(csv, strlen(csv), "test.csv", &s), PW_OK, "%s", pw_last_error());
    return s;
}

/* Fakes and chunk table for s (validated unless rep is given). */
static void harness_init(harness *h, pw_schedule *s, pw_schedule_report *rep, const pw_stage_i *vt)
{
    memset(h, 0, sizeof *h);
    h->s = s;
    if (rep) h->rep = rep;
    else cr_assert_eq(pw_schedule_validate(s, &h->rep), PW_OK, "%s", pw_last_error());
    h->fakes = calloc((size_t)s->n_chunks, sizeof *h->fakes);
    h->chunks = calloc((size_t)s->n_chunks, sizeof *h->chunks);
    cr_assert(h->fakes && h->chunks);
    for (int c = 0; c < s->n_chunks; c++) {
        fake *f = &h->fakes[c];
        f->chunk = c;
        f->n_chunks = s->n_chunks;
        f->split_w = s->split_w;
        f->has_bw = vt->backward_weight != NULL;
        f->n_slots = h->rep->peak_inflight_chunk[c];
        f->fail_fwd_mb = -1;
        for (int k = 0; k < MAX_SLOTS; k++) f->slot_mb[k] = -1;
        h->chunks[c] = (pw_engine_chunk){vt, f};
    }
}

static pw_engine_config harness_config(harness *h)
{
    return (pw_engine_config){.schedule = h->s, .report = h->rep, .chunks = h->chunks, .watchdog_s = 30};
}

static void harness_create(harness *h, const pw_engine_config *cfg)
{
    cr_assert_eq(pw_engine_create(cfg, &h->e), PW_OK, "create: %s", pw_last_error());
}

/* Own report (not from the validator): free it ourselves. */
static int report_is_own(const harness *h) { return h->rep && h->rep->n_actions == -1; }

static void harness_fini(harness *h)
{
    pw_engine_destroy(h->e);
    if (report_is_own(h)) free(h->rep);
    else pw_schedule_report_destroy(h->rep);
    pw_schedule_destroy(h->s);
    free(h->fakes);
    free(h->chunks);
}

/* Checks each chunk's calls of the step against its rank's schedule order,
 * then clears the logs. */
static void check_calls(harness *h, int step)
{
    const pw_schedule *s = h->s;
    for (int c = 0; c < s->n_chunks; c++) {
        fake *f = &h->fakes[c];
        const pw_rank_program *p = &s->ranks[pw_schedule_rank_of(s, c)];
        int k = 0;
        for (int i = 0; i < p->n_actions; i++) {
            const pw_action *a = &p->actions[i];
            if (a->chunk != c || (a->kind != PW_ACT_F && a->kind != PW_ACT_B && a->kind != PW_ACT_W)) continue;
            char want[2] = {0};
            int n_want = 0;
            if (a->kind == PW_ACT_F) want[n_want++] = 'F';
            if (a->kind == PW_ACT_B) {
                want[n_want++] = 'B';
                if (!s->split_w && f->has_bw) want[n_want++] = 'W';
            }
            if (a->kind == PW_ACT_W && f->has_bw) want[n_want++] = 'W';
            for (int j = 0; j < n_want; j++, k++) {
                cr_assert_lt(k, f->n_log, "step %d chunk %d: only %d calls, schedule has more", step, c,
                             f->n_log);
                cr_assert(f->log[k].kind == want[j] && f->log[k].mb == a->mb,
                          "step %d chunk %d call %d: got %c mb %d, schedule says %c mb %d", step, c, k,
                          f->log[k].kind, f->log[k].mb, want[j], a->mb);
            }
        }
        cr_assert_eq(k, f->n_log, "step %d chunk %d: %d calls, schedule has %d", step, c, f->n_log, k);
        for (int slot = 0; slot < MAX_SLOTS; slot++)
            cr_assert_eq(f->slot_mb[slot], -1, "step %d chunk %d: slot %d still holds mb %d", step, c, slot,
                         f->slot_mb[slot]);
        f->n_log = 0;
    }
}

/* Runs `steps` steps and checks calls, optimizer steps and slot peaks. */
static void run_and_check(harness *h, int steps)
{
    for (int step = 1; step <= steps; step++) {
        pw_status st = pw_engine_run_step(h->e, step);
        cr_assert_eq(st, PW_OK, "step %d: %s", step, pw_last_error());
        check_calls(h, step);
        for (int c = 0; c < h->s->n_chunks; c++) {
            cr_assert_eq(h->fakes[c].optim_calls, step, "chunk %d: %d optimizer steps after step %d", c,
                         h->fakes[c].optim_calls, step);
            cr_assert_eq(h->fakes[c].last_step, step);
        }
    }
    for (int c = 0; c < h->s->n_chunks; c++)
        cr_assert_eq(pw_engine_chunk_peak(h->e, c), h->rep->peak_inflight_chunk[c],
                     "chunk %d: measured slot peak %d, validator says %d", c, pw_engine_chunk_peak(h->e, c),
                     h->rep->peak_inflight_chunk[c]);
    for (int r = 0; r < h->s->n_ranks; r++) {
        pw_engine_rank_stats rs;
        pw_engine_rank_stats_get(h->e, r, &rs);
        cr_assert_eq(rs.actions, (int64_t)steps * h->s->ranks[r].n_actions, "rank %d: %lld actions", r,
                     (long long)rs.actions);
        cr_assert_eq(rs.peak_slots_used, h->rep->peak_inflight[r], "rank %d: peak %d, validator %d", r,
                     rs.peak_slots_used, h->rep->peak_inflight[r]);
        cr_assert(rs.total_s > 0 && rs.busy_s >= 0 && rs.wait_s >= 0);
    }
}

/* A report filled by hand (the validator bypassed): uniform peaks. */
static pw_schedule_report *own_report(const pw_schedule *s, int peak)
{
    size_t n = (size_t)s->n_ranks, c = (size_t)s->n_chunks;
    pw_schedule_report *rep = calloc(1, sizeof *rep + (2 * n + c) * sizeof(int));
    cr_assert(rep);
    rep->peak_inflight = (int *)(rep + 1);
    rep->peak_w_pending = rep->peak_inflight + n;
    rep->peak_inflight_chunk = rep->peak_w_pending + n;
    rep->n_ranks = s->n_ranks;
    rep->n_chunks = s->n_chunks;
    rep->n_actions = -1; /* marks it as ours for harness_fini */
    for (size_t r = 0; r < n; r++) rep->peak_inflight[r] = peak * s->chunks_per_rank;
    for (size_t k = 0; k < c; k++) rep->peak_inflight_chunk[k] = peak;
    return rep;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------- the schedule matrix */

typedef struct matrix_case {
    pw_schedule_kind kind;
    int split_w, stages, micro;
} matrix_case;

ParameterizedTestParameters(engine, matrix)
{
    static matrix_case cases[2 * 2 * 4 * 4];
    static const int stages[] = {1, 2, 3, 4}, micro[] = {1, 2, 4, 8};
    size_t n = 0;
    for (int k = 0; k < 2; k++)
        for (int w = 0; w < 2; w++)
            for (int si = 0; si < 4; si++)
                for (int mi = 0; mi < 4; mi++)
                    cases[n++] = (matrix_case){k ? PW_SCHEDULE_1F1B : PW_SCHEDULE_GPIPE, w, stages[si],
                                               micro[mi]};
    return cr_make_param_array(matrix_case, cases, n);
}

ParameterizedTest(matrix_case *mc, engine, matrix, .timeout = TIMEOUT)
{
    harness h;
    harness_init(&h, make_schedule(mc->kind, mc->stages, mc->micro, mc->split_w), NULL, &fake_full_i);
    pw_engine_config cfg = harness_config(&h);
    cfg.check = 1; /* the run-time checker must agree on every generated schedule */
    harness_create(&h, &cfg);
    run_and_check(&h, 3);
    /* GPipe and 1F1B accumulate weight gradients in micro-batch order. */
    for (int c = 0; c < h.s->n_chunks; c++) {
        uint64_t want = 0;
        for (int step = 0; step < 3; step++)
            for (int m = 0; m < mc->micro; m++) want = want * 1000003u + (uint64_t)m + 1;
        cr_assert_eq(h.fakes[c].wsum, want, "chunk %d: weight gradients out of micro-batch order", c);
    }
    harness_fini(&h);
}

Test(engine, no_backward_weight, .timeout = TIMEOUT)
{
    for (int split = 0; split < 2; split++) {
        harness h;
        harness_init(&h, make_schedule(PW_SCHEDULE_1F1B, 4, 8, split), NULL, &fake_nobw_i);
        pw_engine_config cfg = harness_config(&h);
        harness_create(&h, &cfg);
        run_and_check(&h, 2);
        harness_fini(&h);
    }
}

/* Only forward and backward_input: no ports, no binding, no optimizer. */
static pw_status nop_fb(void *self, int mb, int slot)
{
    (void)self;
    (void)mb;
    (void)slot;
    return PW_OK;
}
static const pw_stage_i nop_i = {.name = "nop", .forward = nop_fb, .backward_input = nop_fb};

Test(engine, minimal_vtable, .timeout = TIMEOUT)
{
    pw_schedule *s = make_schedule(PW_SCHEDULE_1F1B, 4, 8, 1);
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK);
    pw_engine_chunk chunks[4];
    for (int c = 0; c < 4; c++) chunks[c] = (pw_engine_chunk){&nop_i, NULL};
    pw_engine_config cfg = {.schedule = s, .report = rep, .chunks = chunks};
    pw_engine *e = NULL;
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_engine_message_bytes(e), 0);
    for (int step = 1; step <= 3; step++) cr_assert_eq(pw_engine_run_step(e, step), PW_OK, "%s", pw_last_error());
    for (int c = 0; c < 4; c++) cr_assert_eq(pw_engine_chunk_peak(e, c), rep->peak_inflight_chunk[c]);
    pw_engine_destroy(e);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
}

Test(engine, message_bytes, .timeout = TIMEOUT)
{
    harness h;
    harness_init(&h, make_schedule(PW_SCHEDULE_1F1B, 3, 8, 0), NULL, &fake_full_i);
    pw_engine_config cfg = harness_config(&h);
    harness_create(&h, &cfg);
    /* Per link: min(M, peak[c] + peak[c+1]) buffers each way, 64-byte rounded. */
    int64_t want = 0;
    for (int l = 0; l < 2; l++) {
        int n = h.rep->peak_inflight_chunk[l] + h.rep->peak_inflight_chunk[l + 1];
        if (n > 8) n = 8;
        want += (int64_t)n * 64 * 2; /* every message here is under 64 bytes */
    }
    cr_assert_eq(pw_engine_message_bytes(h.e), want, "%lld bytes, expected %lld",
                 (long long)pw_engine_message_bytes(h.e), (long long)want);
    harness_fini(&h);
}

/* ------------------------------------------- interleaved and local hand-over */

Test(engine, local_handover, .timeout = TIMEOUT)
{
    /* One rank, two chunks: chunk 1 reads chunk 0's output with no message. */
    harness h;
    harness_init(&h,
                 parse("# pipewright schedule v1: ranks=1 chunks_per_rank=2 micro_batches=3\n"
                       "0F0,1F0,0F1,1F1,1B0,0B0,0F2,1F2,1B1,0B1,1B2,0B2,OPT\n"),
                 NULL, &fake_full_i);
    pw_engine_config cfg = harness_config(&h);
    cfg.check = 1;
    harness_create(&h, &cfg);
    run_and_check(&h, 3);
    harness_fini(&h);
}

Test(engine, interleaved_two_ranks, .timeout = TIMEOUT)
{
    /* Chunk c on rank c mod 2: messages 0->1 (rank 0 to 1), 1->2 (1 to 0), 2->3. */
    harness h;
    harness_init(&h,
                 parse("# pipewright schedule v1: ranks=2 chunks_per_rank=2 micro_batches=4 split_w=1\n"
                       "0F0,0F1,0F2,0F3,2F0,2F1,2F2,2F3,2B0,2W0,2B1,2W1,2B2,2W2,2B3,2W3,0B0,0W0,0B1,0W1,0B2,0W2,0B3,0W3,OPT\n"
                       "1F0,1F1,1F2,1F3,3F0,3F1,3F2,3F3,3B0,3W0,3B1,3W1,3B2,3W2,3B3,3W3,1B0,1W0,1B1,1W1,1B2,1W2,1B3,1W3,OPT\n"),
                 NULL, &fake_full_i);
    pw_engine_config cfg = harness_config(&h);
    cfg.check = 1;
    harness_create(&h, &cfg);
    run_and_check(&h, 3);
    harness_fini(&h);
}

/* ---------------------------------------------------------------- failure */

Test(engine, forward_failure, .timeout = TIMEOUT)
{
    harness h;
    harness_init(&h, make_schedule(PW_SCHEDULE_1F1B, 4, 8, 0), NULL, &fake_full_i);
    h.fakes[1].fail_fwd_mb = 2;
    pw_engine_config cfg = harness_config(&h);
    harness_create(&h, &cfg);
    double t0 = now_s();
    pw_status st = pw_engine_run_step(h.e, 1);
    double dt = now_s() - t0;
    cr_assert_eq(st, PW_ERR_NUMERIC, "status %s: %s", pw_status_str(st), pw_last_error());
    cr_assert(strstr(pw_last_error(), "rank 1 (chunk 1), F of micro-batch 2: fake chunk 1: loss is NaN"),
              "message: %s", pw_last_error());
    cr_assert_lt(dt, 5.0, "run_step took %.2f s to report the failure", dt);
    /* The engine is stopped for good. */
    st = pw_engine_run_step(h.e, 2);
    cr_assert_eq(st, PW_ERR_NUMERIC);
    cr_assert(strstr(pw_last_error(), "earlier failure"), "%s", pw_last_error());
    harness_fini(&h);
}

static pw_status fail_backward(void *self, int mb, int slot)
{
    fake *f = self;
    if (mb == 1) return pw_error(PW_ERR_NUMERIC, "gradient overflow");
    return fake_backward_input(f, mb, slot);
}

Test(engine, failure_wakes_parked_ranks, .timeout = TIMEOUT)
{
    /* The last rank fails in B while the others are parked on RECV_B. */
    static pw_stage_i last_i;
    last_i = fake_full_i;
    last_i.backward_input = fail_backward;
    harness h;
    harness_init(&h, make_schedule(PW_SCHEDULE_GPIPE, 4, 4, 0), NULL, &fake_full_i);
    h.chunks[3].vt = &last_i;
    pw_engine_config cfg = harness_config(&h);
    harness_create(&h, &cfg);
    double t0 = now_s();
    pw_status st = pw_engine_run_step(h.e, 1);
    double dt = now_s() - t0;
    cr_assert_eq(st, PW_ERR_NUMERIC);
    cr_assert(strstr(pw_last_error(), "rank 3 (chunk 3), B of micro-batch 1: gradient overflow"), "%s",
              pw_last_error());
    cr_assert_lt(dt, 5.0, "%.2f s", dt);
    harness_fini(&h);
}

Test(engine, bad_config, .timeout = TIMEOUT)
{
    pw_engine *e = (pw_engine *)1;
    cr_assert_eq(pw_engine_create(NULL, &e), PW_ERR_INVALID_ARG);
    cr_assert_null(e);
    pw_engine_destroy(NULL);
    cr_assert_eq(pw_engine_run_step(NULL, 1), PW_ERR_INVALID_ARG);

    /* Not lowered. */
    pw_schedule_config sc = {.kind = PW_SCHEDULE_1F1B, .n_stages = 2, .n_micro = 2};
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_generate(&sc, &s), PW_OK);
    pw_schedule_report *rep = own_report(s, 2);
    fake fk[2] = {0};
    pw_engine_chunk chunks[2] = {{&fake_full_i, &fk[0]}, {&fake_full_i, &fk[1]}};
    pw_engine_config cfg = {.schedule = s, .report = rep, .chunks = chunks};
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "not lowered"), "%s", pw_last_error());
    cr_assert_eq(pw_schedule_lower(s), PW_OK);

    /* No report, report of another shape, negative watchdog. */
    cfg.report = NULL;
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_ERR_INVALID_ARG);
    cfg.report = rep;
    rep->n_chunks = 3;
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_ERR_INVALID_ARG);
    rep->n_chunks = 2;
    cfg.watchdog_s = -1;
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_ERR_INVALID_ARG);
    cfg.watchdog_s = 0;

    /* Ports that disagree across a link. */
    for (int c = 0; c < 2; c++) {
        fk[c].chunk = c;
        fk[c].n_chunks = c == 0 ? 2 : 3; /* chunk 1 thinks it is in a longer pipeline: GRAD_OUT != 0 */
        fk[c].n_slots = 2;
    }
    fk[1].chunk = 2; /* and expects link 1's activations on ACT_IN */
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_ERR_SHAPE);
    cr_assert(strstr(pw_last_error(), "chunk 0 sends 16-byte activations (port_bytes ACT_OUT) but chunk 1 "
                                      "expects 24 bytes (ACT_IN)"),
              "%s", pw_last_error());
    cr_assert_null(e);

    /* Bad step number. */
    fk[1].chunk = 1;
    fk[1].n_chunks = 2;
    for (int c = 0; c < 2; c++) {
        fk[c].fail_fwd_mb = -1;
        for (int k = 0; k < MAX_SLOTS; k++) fk[c].slot_mb[k] = -1;
        fk[c].has_bw = 1;
    }
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_engine_run_step(e, 0), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_engine_run_step(e, 1), PW_OK, "%s", pw_last_error());
    pw_engine_destroy(e);
    free(rep);
    pw_schedule_destroy(s);
}

/* --------------------------------------------------------------- watchdog */

static pw_status sleepy_forward(void *self, int mb, int slot)
{
    usleep(300 * 1000);
    return fake_forward(self, mb, slot);
}

Test(engine, watchdog, .timeout = TIMEOUT)
{
    /* Hand-lowered, never validated: rank 1 waits for an activation rank 0
     * never sends. Rank 0 parks later (its forward sleeps), so rank 1's
     * watchdog is the first to fire. */
    pw_schedule *s = parse("# pipewright schedule v1: ranks=2 micro_batches=1\n"
                           "0F0,0RB0,0B0,OPT\n"
                           "1RF0,1F0,1B0,1SB0,OPT\n");
    cr_assert_neq(pw_schedule_validate(s, NULL), PW_OK, "this schedule must not validate");
    static pw_stage_i sleepy_i;
    sleepy_i = fake_full_i;
    sleepy_i.forward = sleepy_forward;
    harness h;
    harness_init(&h, s, own_report(s, 1), &fake_full_i);
    h.chunks[0].vt = &sleepy_i;
    pw_engine_config cfg = harness_config(&h);
    cfg.watchdog_s = 0.5;
    harness_create(&h, &cfg);
    double t0 = now_s();
    pw_status st = pw_engine_run_step(h.e, 1);
    double dt = now_s() - t0;
    cr_assert_eq(st, PW_ERR_TIMEOUT, "status %s: %s", pw_status_str(st), pw_last_error());
    cr_assert(strstr(pw_last_error(), "rank 1 (chunk 1): waited 0."), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), " s for RECV_F of micro-batch 0 from rank 0 (chunk 0)"), "%s",
              pw_last_error());
    cr_assert(dt >= 0.45 && dt < 2.0, "watchdog fired after %.2f s", dt);
    cr_log_info("watchdog: %s (after %.2f s)", pw_last_error(), dt);
    harness_fini(&h);
}

/* A forward that never comes back in time: the watchdog of the waiting rank
 * fails the step, run_step returns after its grace period instead of
 * hanging, and destroy leaves the engine to the stuck worker, which frees it
 * once its callback returns. */
static atomic_int stuck_done;
harness stuck_keep; /* external: LeakSanitizer sees it as reachable */
static pw_status stuck_forward(void *self, int mb, int slot)
{
    usleep(5000 * 1000);
    pw_status st = fake_forward(self, mb, slot);
    atomic_store(&stuck_done, 1);
    return st;
}

Test(engine, stuck_callback_does_not_hang, .timeout = TIMEOUT)
{
    static pw_stage_i stuck_i;
    stuck_i = fake_full_i;
    stuck_i.forward = stuck_forward;
    harness h;
    harness_init(&h, make_schedule(PW_SCHEDULE_GPIPE, 2, 1, 0), NULL, &fake_full_i);
    h.chunks[0].vt = &stuck_i;
    atomic_store(&stuck_done, 0);
    pw_engine_config cfg = harness_config(&h);
    cfg.watchdog_s = 0.5;
    harness_create(&h, &cfg);
    double t0 = now_s();
    pw_status st = pw_engine_run_step(h.e, 1);
    double dt = now_s() - t0;
    cr_assert_eq(st, PW_ERR_TIMEOUT, "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "rank 1 (chunk 1): waited"), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "(rank 0 did not stop: still inside a stage callback)"), "%s",
              pw_last_error());
    cr_assert_lt(dt, 4.5, "run_step waited %.2f s for the stuck rank", dt);
    t0 = now_s();
    pw_engine_destroy(h.e);
    h.e = NULL;
    cr_assert_lt(now_s() - t0, 0.5, "destroy waited for the stuck rank");
    /* The worker frees the engine once its callback returns; until then it
     * still reads the schedule and the chunks, which therefore stay alive
     * (kept reachable here, never freed: the process ends soon). */
    stuck_keep = h;
    while (!atomic_load(&stuck_done)) usleep(10 * 1000);
}

/* ------------------------------------------------------ checker on demand */

Test(engine, checker_catches_bound, .timeout = TIMEOUT)
{
    /* A report understating the rank's in-flight peak: with the checker on,
     * the third forward breaks the bound of 2. */
    for (int via_env = 0; via_env < 2; via_env++) {
        pw_schedule *s = make_schedule(PW_SCHEDULE_GPIPE, 1, 4, 0);
        pw_schedule_report *rep = own_report(s, 4);
        rep->peak_inflight[0] = 2;
        harness h;
        harness_init(&h, s, rep, &fake_full_i);
        pw_engine_config cfg = harness_config(&h);
        if (via_env) setenv("PW_DEBUG_CHECK", "1", 1);
        else cfg.check = 1;
        harness_create(&h, &cfg);
        unsetenv("PW_DEBUG_CHECK");
        pw_status st = pw_engine_run_step(h.e, 1);
        cr_assert_eq(st, PW_ERR_SCHEDULE, "%s", pw_last_error());
        cr_assert(strstr(pw_last_error(), "rank 0, position 2 (F mb 2): 3 micro-batches in flight, above the "
                                          "bound of 2"),
                  "%s", pw_last_error());
        harness_fini(&h);
    }
}

Test(engine, report_too_small_is_clear, .timeout = TIMEOUT)
{
    /* Without the checker, too few slots end in a clear internal error. */
    pw_schedule *s = make_schedule(PW_SCHEDULE_GPIPE, 2, 4, 0);
    harness h;
    harness_init(&h, s, own_report(s, 2), &fake_full_i);
    pw_engine_config cfg = harness_config(&h);
    harness_create(&h, &cfg);
    pw_status st = pw_engine_run_step(h.e, 1);
    cr_assert_eq(st, PW_ERR_INTERNAL, "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "F of micro-batch 2: no free activation slot"), "%s", pw_last_error());
    harness_fini(&h);
}

Test(engine, incomplete_step_is_named, .timeout = TIMEOUT)
{
    /* Never validated: micro-batch 1 has no backward. */
    pw_schedule *s = parse("# pipewright schedule v1: ranks=1 micro_batches=2\n0F0,0F1,0B0,OPT\n");
    harness h;
    harness_init(&h, s, own_report(s, 2), &fake_full_i);
    pw_engine_config cfg = harness_config(&h);
    harness_create(&h, &cfg);
    pw_status st = pw_engine_run_step(h.e, 1);
    cr_assert_eq(st, PW_ERR_SCHEDULE, "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "step 1 ended with micro-batch 1 still in flight on chunk 0 (rank 0): "
                                      "its last backward never ran"),
              "%s", pw_last_error());
    cr_assert_eq(pw_engine_run_step(h.e, 2), PW_ERR_SCHEDULE);
    harness_fini(&h);
}

/* ------------------------------------------------------ parking and trace */

static void count_events(const pw_trace *t, int track, const char *name, int64_t *n)
{
    const pw_trace_event *ev = pw_trace_events(t, track);
    *n = 0;
    for (int64_t i = 0; i < pw_trace_count(t, track); i++)
        if (strcmp(ev[i].name, name) == 0) (*n)++;
}

Test(engine, parking_and_trace, .timeout = TIMEOUT)
{
    const int S = 4, M = 4, steps = 2;
    for (int split = 0; split < 2; split++) {
        harness h;
        harness_init(&h, make_schedule(PW_SCHEDULE_1F1B, S, M, split), NULL, &fake_full_i);
        for (int c = 0; c < S; c++) h.fakes[c].sleep_fwd_us = 2000; /* force real parking */
        pw_trace *t = NULL;
        cr_assert_eq(pw_trace_create(S, 4096, &t), PW_OK);
        pw_engine_config cfg = harness_config(&h);
        cfg.trace = t;
        harness_create(&h, &cfg);
        run_and_check(&h, steps);
        for (int r = 0; r < S; r++) {
            pw_engine_rank_stats rs;
            pw_engine_rank_stats_get(h.e, r, &rs);
            cr_assert_gt(rs.busy_s, 0.0);
            if (r > 0) cr_assert_gt(rs.wait_s, 0.0, "rank %d never waited", r);
            cr_assert_leq(rs.busy_s + rs.wait_s, rs.total_s * 1.01 + 1e-3);

            int64_t nF, nB, nW, nStep, nSF, nRF, nWaitF, nOpt;
            count_events(t, r, "F", &nF);
            count_events(t, r, "B", &nB);
            count_events(t, r, "W", &nW);
            count_events(t, r, "step", &nStep);
            count_events(t, r, "SEND_F", &nSF);
            count_events(t, r, "RECV_F", &nRF);
            count_events(t, r, "wait RECV_F", &nWaitF);
            count_events(t, r, "OPTIM", &nOpt);
            cr_assert_eq(nF, M * steps, "rank %d: %lld F events", r, (long long)nF);
            cr_assert_eq(nB, M * steps);
            cr_assert_eq(nW, split ? M * steps : 0);
            cr_assert_eq(nStep, steps);
            cr_assert_eq(nOpt, steps);
            cr_assert_eq(nSF, r < S - 1 ? M * steps : 0);
            cr_assert_eq(nRF, r > 0 ? M * steps : 0);
            if (r > 0) cr_assert_gt(nWaitF, 0, "rank %d: no WAIT event", r);
            cr_assert_eq(pw_trace_dropped(t, r), 0);
            const pw_trace_event *ev = pw_trace_events(t, r);
            for (int64_t i = 0; i < pw_trace_count(t, r); i++) {
                cr_assert_geq(ev[i].t1_ns, ev[i].t0_ns);
                cr_assert(ev[i].step >= 1 && ev[i].step <= steps);
                if (strcmp(ev[i].name, "wait RECV_F") == 0) {
                    cr_assert_eq(ev[i].cat, PW_TRACE_WAIT);
                    cr_assert_eq(ev[i].peer, r - 1);
                    cr_assert_eq(ev[i].chunk, r);
                    cr_assert(ev[i].mb >= 0 && ev[i].mb < M);
                } else if (strcmp(ev[i].name, "SEND_F") == 0) {
                    cr_assert_eq(ev[i].cat, PW_TRACE_COMM);
                    cr_assert_eq(ev[i].peer, r + 1);
                    cr_assert_eq(ev[i].bytes, 4 * ACT_WORDS(r));
                } else if (strcmp(ev[i].name, "F") == 0) {
                    cr_assert_eq(ev[i].cat, PW_TRACE_COMPUTE);
                    cr_assert_eq(ev[i].chunk, r);
                }
            }
        }
        pw_engine_destroy(h.e);
        h.e = NULL;
        pw_trace_destroy(t);
        harness_fini(&h);
    }
}

Test(engine, pinned_run, .timeout = TIMEOUT)
{
    /* Binding may be refused (containers): that is a warning, never an error. */
    harness h;
    harness_init(&h, make_schedule(PW_SCHEDULE_1F1B, 3, 4, 0), NULL, &fake_full_i);
    pw_engine_config cfg = harness_config(&h);
    cfg.pin = 1;
    harness_create(&h, &cfg);
    run_and_check(&h, 2);
    harness_fini(&h);
}

/* -------------------------------------------------------------- placement */

static pw_cpu_placement *place(const char *topo_desc, int n, hwloc_topology_t *topo)
{
    cr_assert_eq(pw_topology_load_synthetic(topo_desc, topo), PW_OK, "%s", pw_last_error());
    pw_cpu_placement *p = NULL;
    cr_assert_eq(pw_cpu_place_ranks(*topo, n, &p), PW_OK, "%s", pw_last_error());
    return p;
}

Test(placement, two_ranks_two_cores, .timeout = TIMEOUT)
{
    hwloc_topology_t topo;
    pw_cpu_placement *p = place("core:2 pu:1", 2, &topo);
    cr_assert_eq(p->n_cores, 2);
    cr_assert_eq(p->shared, 0);
    cr_assert_str_empty(p->note);
    cr_assert_eq(p->core[0], 0);
    cr_assert_eq(p->core[1], 1);
    cr_assert_not(hwloc_bitmap_intersects(p->cpusets[0], p->cpusets[1]));
    cr_assert_eq(hwloc_bitmap_weight(p->cpusets[0]), 1);
    pw_cpu_placement_destroy(p);
    hwloc_topology_destroy(topo);
}

Test(placement, more_ranks_than_cores_share, .timeout = TIMEOUT)
{
    hwloc_topology_t topo;
    pw_cpu_placement *p = place("core:2 pu:1", 4, &topo);
    cr_assert_eq(p->shared, 1);
    cr_assert_str_eq(p->note, "4 ranks on 2 cores: ranks share cores");
    for (int r = 0; r < 4; r++) cr_assert_eq(p->core[r], r % 2);
    cr_assert(hwloc_bitmap_isequal(p->cpusets[0], p->cpusets[2]));
    cr_assert_not(hwloc_bitmap_isequal(p->cpusets[0], p->cpusets[1]));
    pw_cpu_placement_destroy(p);
    hwloc_topology_destroy(topo);
}

Test(placement, two_packages_neighbours_close, .timeout = TIMEOUT)
{
    hwloc_topology_t topo;
    pw_cpu_placement *p = place("pack:2 core:4 pu:2", 4, &topo);
    cr_assert_eq(p->n_cores, 8);
    cr_assert_eq(p->shared, 0);
    for (int r = 0; r < 4; r++) {
        cr_assert_eq(hwloc_bitmap_weight(p->cpusets[r]), 2, "rank %d: a whole core (2 PUs)", r);
        for (int q = 0; q < r; q++)
            cr_assert_not(hwloc_bitmap_intersects(p->cpusets[r], p->cpusets[q]), "ranks %d and %d share", q, r);
    }
    for (int r = 0; r + 1 < 4; r++) {
        hwloc_obj_t a = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)p->core[r]);
        hwloc_obj_t b = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)p->core[r + 1]);
        hwloc_obj_t anc = hwloc_get_common_ancestor_obj(topo, a, b);
        cr_assert_eq(anc->type, HWLOC_OBJ_PACKAGE, "ranks %d and %d meet at %s, not a package", r, r + 1,
                     hwloc_obj_type_string(anc->type));
    }
    pw_cpu_placement_destroy(p);
    /* Nine ranks on eight cores: the ninth shares core 0. */
    cr_assert_eq(pw_cpu_place_ranks(topo, 9, &p), PW_OK);
    cr_assert_eq(p->core[8], 0);
    cr_assert_str_eq(p->note, "9 ranks on 8 cores: ranks share cores");
    pw_cpu_placement_destroy(p);
    hwloc_topology_destroy(topo);
}

Test(placement, bad_input_and_binding, .timeout = TIMEOUT)
{
    hwloc_topology_t topo = NULL;
    cr_assert_eq(pw_topology_load_synthetic("pack:banana", &topo), PW_ERR_INVALID_ARG);
    cr_assert_null(topo);
    pw_cpu_placement *p = NULL;
    cr_assert_eq(pw_cpu_place_ranks(NULL, 2, &p), PW_ERR_INVALID_ARG);
    /* Binding this thread to the first core of this machine works or warns. */
    cr_assert_eq(pw_topology_load(&topo), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_cpu_place_ranks(topo, 1, &p), PW_OK);
    int rc = pw_cpu_bind_thread(topo, p->cpusets[0], "test thread");
    cr_assert(rc == 0 || rc == -1);
    pw_cpu_placement_destroy(p);
    hwloc_topology_destroy(topo);
}

/* -------------------------------------------------------------- overhead */

Test(engine, overhead, .timeout = TIMEOUT)
{
    /* Not a timed assert: the engine's own cost per action with empty
     * compute (every F/B returns at once), 4 stages x 64 micro-batches, 1F1B. */
    const int S = 4, M = 64, steps = 20;
    pw_schedule *s = make_schedule(PW_SCHEDULE_1F1B, S, M, 0);
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK);
    pw_engine_chunk chunks[4];
    for (int c = 0; c < S; c++) chunks[c] = (pw_engine_chunk){&nop_i, NULL};
    pw_engine_config cfg = {.schedule = s, .report = rep, .chunks = chunks};
    pw_engine *e = NULL;
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_engine_run_step(e, 1), PW_OK); /* warm-up */
    double t0 = now_s();
    for (int step = 2; step <= steps + 1; step++) cr_assert_eq(pw_engine_run_step(e, step), PW_OK);
    double wall = now_s() - t0;
    int64_t per_step = 0;
    for (int r = 0; r < S; r++) per_step += s->ranks[r].n_actions;
    double us_action = wall * 1e6 * S / ((double)per_step * steps);
    double us_step = wall * 1e6 / steps;
    cr_log_info("engine overhead (1f1b, %d stages x %d micro-batches, empty compute, %ld CPUs): "
                "%.1f us per step, %lld actions per step, %.2f us per action (wall x ranks / actions)",
                S, M, sysconf(_SC_NPROCESSORS_ONLN), us_step, (long long)per_step, us_action);
    pw_engine_destroy(e);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
}

/* ------------------------------------------------ data-parallel replicas */

/* A chunk with gradients and no ports: backward_weight (or the bucket
 * pieces) adds a value that depends on (replica, chunk, mb, element), so the
 * gradients after the all-reduce say whether every replica's sum arrived, in
 * the documented ring order. */
#define RF_N 37
#define RF_MAXB 8

typedef struct rfake {
    int replica, chunk, n_buckets;
    int sleep_fwd_ms, fail_fwd_mb;
    int next_bucket;          /* backward_bucket: the next bucket expected */
    int bucket_calls;
    float grad[RF_N];
    float snap[RF_N];         /* the gradients OPTIM saw */
    float scale;              /* last scale_grads, 1 if none */
    int optim_calls;
} rfake;

static float rvalue(int replica, int chunk, int mb, int i)
{
    return (float)((replica * 131 + chunk * 17 + mb * 7 + i * 3) % 101) / 7.0f - 3.1f;
}

static void rbucket_range(int b, int n, int *lo, int *hi)
{
    *lo = b * RF_N / n;
    *hi = (b + 1) * RF_N / n;
}

static pw_status rf_forward(void *self, int mb, int slot)
{
    (void)slot;
    rfake *f = self;
    if (f->sleep_fwd_ms) usleep((useconds_t)f->sleep_fwd_ms * 1000);
    if (mb == f->fail_fwd_mb) return pw_error(PW_ERR_NUMERIC, "rfake chunk %d: loss is NaN", f->chunk);
    return PW_OK;
}

static pw_status rf_nop(void *self, int mb, int slot)
{
    (void)self;
    (void)mb;
    (void)slot;
    return PW_OK;
}

static pw_status rf_weight(void *self, int mb, int slot)
{
    (void)slot;
    rfake *f = self;
    for (int i = 0; i < RF_N; i++) f->grad[i] += rvalue(f->replica, f->chunk, mb, i);
    return PW_OK;
}

/* Bucket b holds elements [b·N/n, (b+1)·N/n), as two spans. */
static int rf_grad_bucket(void *self, int b, int n, pw_span *spans, int max)
{
    rfake *f = self;
    int lo, hi;
    rbucket_range(b, n, &lo, &hi);
    int mid = (lo + hi) / 2;
    if (max >= 2) {
        spans[0] = (pw_span){f->grad + lo, mid - lo};
        spans[1] = (pw_span){f->grad + mid, hi - mid};
    }
    return 2;
}

static pw_status rf_backward_bucket(void *self, int mb, int slot, int b, pw_bwd_part part)
{
    (void)slot;
    (void)part;
    rfake *f = self;
    if (b != f->next_bucket)
        return pw_error(PW_ERR_INTERNAL, "rfake chunk %d: bucket %d called, %d expected", f->chunk, b,
                        f->next_bucket);
    f->next_bucket = (b + 1) % f->n_buckets;
    f->bucket_calls++;
    int lo, hi;
    rbucket_range(b, f->n_buckets, &lo, &hi);
    for (int i = lo; i < hi; i++) f->grad[i] += rvalue(f->replica, f->chunk, mb, i);
    return PW_OK;
}

static double rf_sumsq(void *self)
{
    rfake *f = self;
    double s = 0;
    for (int i = 0; i < RF_N; i++) s += (double)f->grad[i] * f->grad[i];
    return s;
}

static void rf_scale(void *self, float s)
{
    rfake *f = self;
    f->scale = s;
    for (int i = 0; i < RF_N; i++) f->grad[i] *= s;
}

static pw_status rf_optim(void *self, long step)
{
    (void)step;
    rfake *f = self;
    memcpy(f->snap, f->grad, sizeof f->snap);
    memset(f->grad, 0, sizeof f->grad);
    f->optim_calls++;
    return PW_OK;
}

static const pw_stage_i rfake_i = {
    .name = "rfake", .forward = rf_forward, .backward_input = rf_nop, .backward_weight = rf_weight,
    .optimizer_step = rf_optim, .grad_bucket = rf_grad_bucket, .grad_sumsq = rf_sumsq,
    .scale_grads = rf_scale,
};
static const pw_stage_i rfake_bucket_i = {
    .name = "rfake-buckets", .forward = rf_forward, .backward_input = rf_nop, .backward_weight = rf_weight,
    .optimizer_step = rf_optim, .grad_bucket = rf_grad_bucket, .backward_bucket = rf_backward_bucket,
    .grad_sumsq = rf_sumsq, .scale_grads = rf_scale,
};

typedef struct rharness {
    pw_schedule *s;
    pw_schedule_report *rep;
    rfake *fakes;             /* [R][C] */
    pw_engine_chunk *chunks;  /* [R][C] */
    pw_engine *e;
    int R;
} rharness;

static void rh_init(rharness *h, pw_schedule_kind kind, int S, int M, int split_w, int R, int NB,
                    const pw_stage_i *vt)
{
    memset(h, 0, sizeof *h);
    pw_schedule_config sc = {.kind = kind, .n_stages = S, .n_micro = M, .split_w = split_w, .n_buckets = NB};
    cr_assert_eq(pw_schedule_generate(&sc, &h->s), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_schedule_lower(h->s), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_schedule_validate(h->s, &h->rep), PW_OK, "%s", pw_last_error());
    const int C = h->s->n_chunks;
    h->R = R;
    h->fakes = calloc((size_t)R * (size_t)C, sizeof *h->fakes);
    h->chunks = calloc((size_t)R * (size_t)C, sizeof *h->chunks);
    for (int k = 0; k < R; k++)
        for (int c = 0; c < C; c++) {
            rfake *f = &h->fakes[k * C + c];
            f->replica = k;
            f->chunk = c;
            f->n_buckets = NB;
            f->fail_fwd_mb = -1;
            f->scale = 1.0f;
            h->chunks[k * C + c] = (pw_engine_chunk){vt, f};
        }
}

static pw_engine_config rh_config(rharness *h)
{
    return (pw_engine_config){.schedule = h->s, .report = h->rep, .chunks = h->chunks, .watchdog_s = 30,
                              .replicas = h->R, .check = 1};
}

static void rh_fini(rharness *h)
{
    pw_engine_destroy(h->e);
    pw_schedule_report_destroy(h->rep);
    pw_schedule_destroy(h->s);
    free(h->fakes);
    free(h->chunks);
}

/* Pairs at distance 1, 2, 4 ... over acc[lo, lo + width) with members >= R
 * absent (runtime/collective.h's tree). */
static float rtree(const float *acc, int lo, int width, int R)
{
    if (width == 1) return acc[lo];
    int half = width / 2;
    if (lo + half >= R) return rtree(acc, lo, half, R);
    return rtree(acc, lo, half, R) + rtree(acc, lo + half, half, R);
}

/* What every replica's chunk c must see at OPTIM: each replica's
 * micro-batch sum, then the tree order over the replicas (the engine's
 * in-process default, runtime/collective.h). */
static float rexpect(int R, int M, int c, int i)
{
    float acc[16];
    for (int k = 0; k < R; k++) {
        acc[k] = 0.0f;
        for (int m = 0; m < M; m++) acc[k] += rvalue(k, c, m, i);
    }
    int width = 1;
    while (width < R) width *= 2;
    return rtree(acc, 0, width, R);
}

typedef struct rcase {
    pw_schedule_kind kind;
    int split_w, S, M, R, NB, pieces;
} rcase;

ParameterizedTestParameters(engine, replicas_sum_buckets)
{
    static rcase cases[] = {
        {PW_SCHEDULE_1F1B, 0, 1, 4, 2, 3, 0},  {PW_SCHEDULE_1F1B, 0, 3, 4, 2, 2, 1},
        {PW_SCHEDULE_1F1B, 1, 2, 4, 3, 4, 1},  {PW_SCHEDULE_GPIPE, 0, 2, 2, 4, 1, 0},
        {PW_SCHEDULE_GPIPE, 1, 4, 8, 2, 5, 0}, {PW_SCHEDULE_ZB_H1, 1, 3, 6, 2, 2, 1},
        {PW_SCHEDULE_INTERLEAVED, 0, 2, 4, 3, 2, 1},
    };
    return cr_make_param_array(rcase, cases, sizeof cases / sizeof cases[0]);
}

ParameterizedTest(rcase *c, engine, replicas_sum_buckets, .timeout = TIMEOUT)
{
    rharness h;
    rh_init(&h, c->kind, c->S, c->M, c->split_w, c->R, c->NB, c->pieces ? &rfake_bucket_i : &rfake_i);
    const int C = h.s->n_chunks, W = c->R * c->S, steps = 3;
    pw_trace *t = NULL;
    cr_assert_eq(pw_trace_create(W, 4096, &t), PW_OK);
    pw_engine_config cfg = rh_config(&h);
    cfg.trace = t;
    cr_assert_eq(pw_engine_create(&cfg, &h.e), PW_OK, "%s", pw_last_error());
    for (int step = 1; step <= steps; step++) {
        cr_assert_eq(pw_engine_run_step(h.e, step), PW_OK, "step %d: %s", step, pw_last_error());
        for (int k = 0; k < c->R; k++)
            for (int ch = 0; ch < C; ch++) {
                rfake *f = &h.fakes[k * C + ch];
                cr_assert_eq(f->optim_calls, step);
                for (int i = 0; i < RF_N; i++) {
                    float want = rexpect(c->R, c->M, ch, i);
                    cr_assert(memcmp(&f->snap[i], &want, 4) == 0,
                              "%s S=%d R=%d NB=%d step %d replica %d chunk %d element %d: %.9g, expected %.9g",
                              pw_schedule_kind_name(c->kind), c->S, c->R, c->NB, step, k, ch, i, f->snap[i], want);
                }
                if (c->pieces) cr_assert_eq(f->bucket_calls, step * c->NB, "the last backward ran %d pieces",
                                            f->bucket_calls);
            }
    }
    /* Each worker's track: one ALLREDUCE per bucket of each of its chunks
     * and step, spanning the all-reduce; statistics agree. */
    for (int w = 0; w < W; w++) {
        int64_t n_ar;
        count_events(t, w, "ALLREDUCE", &n_ar);
        cr_assert_eq(n_ar, (int64_t)steps * c->NB * h.s->chunks_per_rank, "worker %d: %lld ALLREDUCE events", w,
                     (long long)n_ar);
        const pw_trace_event *ev = pw_trace_events(t, w);
        for (int64_t i = 0; i < pw_trace_count(t, w); i++) {
            if (strcmp(ev[i].name, "ALLREDUCE") == 0) {
                cr_assert_eq(ev[i].cat, PW_TRACE_COMM);
                cr_assert(ev[i].mb >= 0 && ev[i].mb < c->NB);
                cr_assert_geq(ev[i].t1_ns, ev[i].t0_ns);
                cr_assert_gt(ev[i].bytes, 0);
            } else if (strcmp(ev[i].name, "wait ALLREDUCE") == 0) {
                cr_assert_eq(ev[i].cat, PW_TRACE_WAIT);
            }
        }
        pw_engine_rank_stats rs;
        pw_engine_rank_stats_get(h.e, w, &rs);
        cr_assert_eq(rs.actions, (int64_t)steps * h.s->ranks[w % c->S].n_actions);
        cr_assert_geq(rs.allreduce_s, rs.allreduce_wait_s * 0.0);
        cr_assert_leq(rs.allreduce_wait_s, rs.wait_s + 1e-9);
    }
    pw_engine_destroy(h.e);
    h.e = NULL;
    pw_trace_destroy(t);
    rh_fini(&h);
}

Test(engine, replica_failure_names_the_replica, .timeout = TIMEOUT)
{
    rharness h;
    rh_init(&h, PW_SCHEDULE_1F1B, 2, 4, 0, 2, 2, &rfake_i);
    h.fakes[1 * 2 + 1].fail_fwd_mb = 2; /* replica 1, chunk 1 */
    pw_engine_config cfg = rh_config(&h);
    cr_assert_eq(pw_engine_create(&cfg, &h.e), PW_OK, "%s", pw_last_error());
    double t0 = now_s();
    pw_status st = pw_engine_run_step(h.e, 1);
    cr_assert_eq(st, PW_ERR_NUMERIC, "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "replica 1 rank 1 (chunk 1), F of micro-batch 2: rfake chunk 1: loss is NaN"),
              "%s", pw_last_error());
    cr_assert_lt(now_s() - t0, 5.0);
    rh_fini(&h);
}

/* Replica 1 never reaches its all-reduce in time: replica 0's OPTIM waits,
 * and its watchdog names what it waits for. */
Test(engine, allreduce_watchdog, .timeout = TIMEOUT)
{
    rharness h;
    rh_init(&h, PW_SCHEDULE_1F1B, 1, 2, 0, 2, 2, &rfake_i);
    h.fakes[1].sleep_fwd_ms = 1500;
    pw_engine_config cfg = rh_config(&h);
    cfg.watchdog_s = 0.5;
    cr_assert_eq(pw_engine_create(&cfg, &h.e), PW_OK, "%s", pw_last_error());
    double t0 = now_s();
    pw_status st = pw_engine_run_step(h.e, 1);
    double dt = now_s() - t0;
    cr_assert_eq(st, PW_ERR_TIMEOUT, "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "replica 0 rank 0 (chunk 0): waited 0."), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "for the all-reduce of gradient bucket 0 across 2 replicas (1 of 2 there)"),
              "%s", pw_last_error());
    cr_assert_lt(dt, 5.0, "%.2f s", dt);
    cr_log_info("all-reduce watchdog: %s", pw_last_error());
    rh_fini(&h);
}

Test(engine, clip_grad_norm, .timeout = TIMEOUT)
{
    for (int R = 1; R <= 2; R++) {
        rharness h;
        rh_init(&h, PW_SCHEDULE_1F1B, 3, 2, 0, R, R > 1 ? 2 : 0, &rfake_i);
        pw_engine_config cfg = rh_config(&h);
        cfg.clip_grad_norm = 1.0;
        cr_assert_eq(pw_engine_create(&cfg, &h.e), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_engine_run_step(h.e, 1), PW_OK, "%s", pw_last_error());
        /* The norm over all chunks of a replica's summed gradients. */
        /* Each rank's sum of squares, then the ranks in order (as the engine). */
        double total = 0;
        for (int c = 0; c < 3; c++) {
            double part = 0;
            for (int i = 0; i < RF_N; i++) {
                double v = rexpect(R, 2, c, i);
                part += v * v;
            }
            total += part;
        }
        double norm = sqrt(total), got = pw_engine_grad_norm(h.e);
        cr_assert_leq(fabs(got - norm), 1e-9 * norm, "R=%d: norm %.12g, expected %.12g", R, got, norm);
        float coef = (float)(1.0 / (norm + 1e-6));
        for (int k = 0; k < R; k++)
            for (int c = 0; c < 3; c++) {
                rfake *f = &h.fakes[k * 3 + c];
                cr_assert_eq(f->scale, coef, "R=%d replica %d chunk %d: scaled by %.9g, expected %.9g", R, k, c,
                             f->scale, coef);
            }
        rh_fini(&h);
    }
}

Test(engine, replica_config_errors, .timeout = TIMEOUT)
{
    rharness h;
    rh_init(&h, PW_SCHEDULE_1F1B, 2, 2, 0, 2, 0, &rfake_i); /* no buckets */
    pw_engine_config cfg = rh_config(&h);
    pw_engine *e = NULL;
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "2 replicas need a schedule with all-reduce buckets"), "%s", pw_last_error());
    rh_fini(&h);
    rh_init(&h, PW_SCHEDULE_1F1B, 2, 2, 0, 2, 1, &fake_full_i);
    for (int i = 0; i < 4; i++) h.chunks[i].vt = &fake_full_i;
    cfg = rh_config(&h);
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "has no grad_bucket"), "%s", pw_last_error());
    cfg.replicas = -1;
    cr_assert_eq(pw_engine_create(&cfg, &e), PW_ERR_INVALID_ARG);
    rh_fini(&h);
}

/* ------------------------------------------- asynchronous stages (pending) */

/* An asynchronous wrapper around the fake chunk, like a GPU stage: most
 * calls only record what to do and return; `submitted` then hands the work
 * to one executor thread (the "device"), which runs the fake's call after a
 * random delay of up to 300 µs and reports through the engine's done
 * function. Some calls run at once (submitted says 0), some complete inside
 * submitted (done before it returns): every path of the engine's pending
 * completions is taken, in random mixes, and the fake checks buffers,
 * slots and the call order exactly as in the synchronous runs. */
typedef struct async_job {
    struct astage *a;
    char what;             /* 'F', 'B', 'W', 'O' */
    int mb, slot;
    long step;
    pw_stage_done_fn done;
    void *arg;
} async_job;

typedef struct astage {
    const pw_stage_i *inner;
    void *self;
    async_job job;         /* the call being submitted (worker thread) */
    int ran;               /* it ran synchronously: submitted says 0 */
    unsigned rng;
    char hold_what;        /* this call (what, mb) completes only after hold_us */
    int hold_mb, hold_us;
} astage;

#define AQ_CAP 64
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    async_job q[AQ_CAP];
    int head, n, quit;
    pthread_t thread;
    atomic_int completed;  /* by the executor */
} aq = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static unsigned arand(unsigned *s)
{
    *s = *s * 1103515245u + 12345u;
    return *s >> 16;
}

static pw_status run_job(const async_job *j)
{
    const astage *a = j->a;
    pw_clear_error();
    switch (j->what) {
    case 'F': return a->inner->forward(a->self, j->mb, j->slot);
    case 'B': return a->inner->backward_input(a->self, j->mb, j->slot);
    case 'W': return a->inner->backward_weight(a->self, j->mb, j->slot);
    default: return a->inner->optimizer_step(a->self, j->step);
    }
}

static void complete_job(const async_job *j)
{
    pw_status st = run_job(j);
    j->done(j->arg, st, st == PW_OK ? NULL : pw_last_error());
}

static void *executor_main(void *arg)
{
    (void)arg;
    unsigned rng = 12345;
    pthread_mutex_lock(&aq.mu);
    for (;;) {
        while (!aq.n && !aq.quit) pthread_cond_wait(&aq.cv, &aq.mu);
        if (!aq.n) break;
        async_job j = aq.q[aq.head];
        aq.head = (aq.head + 1) % AQ_CAP;
        aq.n--;
        pthread_mutex_unlock(&aq.mu);
        int us = (int)(arand(&rng) % 300);
        if (j.what == j.a->hold_what && j.mb == j.a->hold_mb) us = j.a->hold_us;
        if (us) usleep((useconds_t)us);
        complete_job(&j);
        atomic_fetch_add(&aq.completed, 1);
        pthread_mutex_lock(&aq.mu);
    }
    pthread_mutex_unlock(&aq.mu);
    return NULL;
}

static void executor_start(void)
{
    aq.head = aq.n = aq.quit = 0;
    cr_assert_eq(pthread_create(&aq.thread, NULL, executor_main, NULL), 0);
}

static void executor_stop(void)
{
    pthread_mutex_lock(&aq.mu);
    aq.quit = 1;
    pthread_cond_signal(&aq.cv);
    pthread_mutex_unlock(&aq.mu);
    pthread_join(aq.thread, NULL);
}

/* Records the call, or (one call in four) runs it now. */
static pw_status a_defer(astage *a, char what, int mb, int slot, long step)
{
    a->job = (async_job){.a = a, .what = what, .mb = mb, .slot = slot, .step = step};
    a->ran = arand(&a->rng) % 4 == 0 && what != a->hold_what;
    return a->ran ? run_job(&a->job) : PW_OK;
}

static pw_status a_forward(void *self, int mb, int slot) { return a_defer(self, 'F', mb, slot, 0); }
static pw_status a_backward_input(void *self, int mb, int slot) { return a_defer(self, 'B', mb, slot, 0); }
static pw_status a_backward_weight(void *self, int mb, int slot) { return a_defer(self, 'W', mb, slot, 0); }
static pw_status a_optimizer_step(void *self, long step) { return a_defer(self, 'O', -1, -1, step); }

static int a_submitted(void *self, pw_stage_done_fn done, void *arg)
{
    astage *a = self;
    if (a->ran) return 0;
    a->job.done = done;
    a->job.arg = arg;
    if (arand(&a->rng) % 5 == 0 && a->job.what != a->hold_what) {
        complete_job(&a->job); /* done before submitted returns */
        return 1;
    }
    pthread_mutex_lock(&aq.mu);
    cr_assert_lt(aq.n, AQ_CAP);
    aq.q[(aq.head + aq.n++) % AQ_CAP] = a->job;
    pthread_cond_signal(&aq.cv);
    pthread_mutex_unlock(&aq.mu);
    return 1;
}

static size_t a_port_bytes(void *self, pw_port port)
{
    astage *a = self;
    return a->inner->port_bytes(a->self, port);
}

static pw_status a_bind(void *self, int slot, pw_port port, void *buf)
{
    astage *a = self;
    return a->inner->bind(a->self, slot, port, buf);
}

static const pw_stage_i async_full_i = {
    .name = "async-fake",
    .forward = a_forward,
    .backward_input = a_backward_input,
    .backward_weight = a_backward_weight,
    .optimizer_step = a_optimizer_step,
    .port_bytes = a_port_bytes,
    .bind = a_bind,
    .submitted = a_submitted,
};

static const pw_stage_i async_nobw_i = {
    .name = "async-fake",
    .forward = a_forward,
    .backward_input = a_backward_input,
    .optimizer_step = a_optimizer_step,
    .port_bytes = a_port_bytes,
    .bind = a_bind,
    .submitted = a_submitted,
};

/* Wraps every fake of h (initialised with `inner`) in an astage. */
static astage *make_async(harness *h, const pw_stage_i *inner, const pw_stage_i *outer, unsigned seed)
{
    astage *as = calloc((size_t)h->s->n_chunks, sizeof *as);
    cr_assert(as);
    for (int c = 0; c < h->s->n_chunks; c++) {
        as[c] = (astage){.inner = inner, .self = &h->fakes[c], .rng = seed * 7919u + (unsigned)c, .hold_mb = -1};
        h->chunks[c] = (pw_engine_chunk){outer, &as[c]};
    }
    return as;
}

typedef struct async_case {
    pw_schedule_kind kind;
    int split_w, stages, micro, v, nobw;
} async_case;

ParameterizedTestParameters(engine, async_matrix)
{
    static async_case cases[64];
    size_t n = 0;
    for (int S = 1; S <= 4; S++) {
        for (int w = 0; w < 2; w++) {
            cases[n++] = (async_case){PW_SCHEDULE_GPIPE, w, S, 4, 1, 0};
            cases[n++] = (async_case){PW_SCHEDULE_1F1B, w, S, 6, 1, w};
            cases[n++] = (async_case){PW_SCHEDULE_INTERLEAVED, w, S, 2 * S, 2, 0};
        }
        cases[n++] = (async_case){PW_SCHEDULE_ZB_H1, 1, S, 6, 1, 0};
        cases[n++] = (async_case){PW_SCHEDULE_ZB_H2, 1, S, 6, 1, 0};
        cases[n++] = (async_case){PW_SCHEDULE_ZB_V, 1, S, 6, 2, 0};
    }
    return cr_make_param_array(async_case, cases, n);
}

/* Every schedule with asynchronous chunks: the same calls in the same order,
 * the same buffers, the same weight-gradient order as the synchronous run. */
ParameterizedTest(async_case *ac, engine, async_matrix, .timeout = TIMEOUT)
{
    uint64_t want[16];
    const pw_stage_i *inner = ac->nobw ? &fake_nobw_i : &fake_full_i;
    for (int async = 0; async < 2; async++) {
        pw_schedule_config sc = {.kind = ac->kind, .n_stages = ac->stages, .n_micro = ac->micro,
                                 .split_w = ac->split_w, .chunks_per_rank = ac->v};
        pw_schedule *s = NULL;
        cr_assert_eq(pw_schedule_generate(&sc, &s), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_schedule_lower(s), PW_OK, "%s", pw_last_error());
        harness h;
        harness_init(&h, s, NULL, inner);
        astage *as = NULL;
        if (async) {
            executor_start();
            as = make_async(&h, inner, ac->nobw ? &async_nobw_i : &async_full_i, (unsigned)ac->stages);
        }
        pw_engine_config cfg = harness_config(&h);
        cfg.check = 1;
        harness_create(&h, &cfg);
        run_and_check(&h, 3);
        cr_assert_leq(h.s->n_chunks, 16);
        for (int c = 0; c < h.s->n_chunks; c++) {
            if (!async) want[c] = h.fakes[c].wsum;
            else
                cr_assert_eq(h.fakes[c].wsum, want[c], "chunk %d: weight gradients in another order than "
                             "the synchronous run", c);
        }
        harness_fini(&h);
        if (async) {
            executor_stop();
            cr_assert_gt(atomic_load(&aq.completed), 0, "no call completed on the executor");
            free(as);
        }
    }
}

/* A completion that takes too long: the watchdog names it, and the step
 * ends only once the stage has reported (it may still write buffers). */
Test(engine, async_watchdog_names_completion, .timeout = TIMEOUT)
{
    harness h;
    /* One rank: no other wait can trip the watchdog first. */
    harness_init(&h, make_schedule(PW_SCHEDULE_1F1B, 1, 4, 0), NULL, &fake_full_i);
    executor_start();
    astage *as = make_async(&h, &fake_full_i, &async_full_i, 3);
    as[0].hold_what = 'F';
    as[0].hold_mb = 2;
    as[0].hold_us = 1200 * 1000;
    pw_engine_config cfg = harness_config(&h);
    cfg.watchdog_s = 0.3;
    harness_create(&h, &cfg);
    double t0 = now_s();
    pw_status st = pw_engine_run_step(h.e, 1);
    double dt = now_s() - t0;
    cr_assert_eq(st, PW_ERR_TIMEOUT, "status %s: %s", pw_status_str(st), pw_last_error());
    cr_assert(strstr(pw_last_error(), "rank 0 (chunk 0): waited 0."), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), " s for the completion of F of micro-batch 2 (submitted to stage "
                                      "'async-fake')"), "%s", pw_last_error());
    cr_assert(!strstr(pw_last_error(), "did not stop"), "%s", pw_last_error());
    cr_assert(dt >= 1.1, "the step ended after %.2f s, before the held completion (1.2 s)", dt);
    cr_log_info("async watchdog: %s (after %.2f s)", pw_last_error(), dt);
    harness_fini(&h);
    executor_stop();
    free(as);
}

/* A failure reported through done (on the executor thread) fails the step
 * with the stage's message, named by action. */
Test(engine, async_failure_is_named, .timeout = TIMEOUT)
{
    harness h;
    harness_init(&h, make_schedule(PW_SCHEDULE_1F1B, 3, 4, 1), NULL, &fake_full_i);
    executor_start();
    astage *as = make_async(&h, &fake_full_i, &async_full_i, 5);
    h.fakes[1].fail_fwd_mb = 2;
    as[1].hold_what = 'F'; /* that call goes through the executor */
    as[1].hold_mb = 2;
    as[1].hold_us = 1000;
    pw_engine_config cfg = harness_config(&h);
    harness_create(&h, &cfg);
    pw_status st = pw_engine_run_step(h.e, 1);
    cr_assert_eq(st, PW_ERR_NUMERIC, "status %s: %s", pw_status_str(st), pw_last_error());
    cr_assert(strstr(pw_last_error(), "rank 1 (chunk 1), F of micro-batch 2: fake chunk 1: loss is NaN"), "%s",
              pw_last_error());
    harness_fini(&h);
    executor_stop();
    free(as);
}

/* The trace of an asynchronous action spans submission to completion, and
 * the busy time counts the device's share. */
Test(engine, async_trace_spans_completion, .timeout = TIMEOUT)
{
    harness h;
    harness_init(&h, make_schedule(PW_SCHEDULE_GPIPE, 1, 2, 0), NULL, &fake_full_i);
    executor_start();
    astage *as = make_async(&h, &fake_full_i, &async_full_i, 9);
    as[0].hold_what = 'F';
    as[0].hold_mb = 1;
    as[0].hold_us = 50 * 1000;
    pw_trace *t = NULL;
    cr_assert_eq(pw_trace_create(1, 1024, &t), PW_OK, "%s", pw_last_error());
    pw_engine_config cfg = harness_config(&h);
    cfg.trace = t;
    harness_create(&h, &cfg);
    cr_assert_eq(pw_engine_run_step(h.e, 1), PW_OK, "%s", pw_last_error());
    int found = 0;
    const pw_trace_event *evs = pw_trace_events(t, 0);
    for (int64_t i = 0; i < pw_trace_count(t, 0); i++) {
        const pw_trace_event *ev = &evs[i];
        if (ev->name && !strcmp(ev->name, "F") && ev->mb == 1) {
            found = 1;
            cr_assert_geq(ev->t1_ns - ev->t0_ns, 45 * 1000 * 1000, "F mb 1 spans %lld ns",
                          (long long)(ev->t1_ns - ev->t0_ns));
        }
    }
    cr_assert(found, "no F event for micro-batch 1");
    pw_engine_rank_stats rs;
    pw_engine_rank_stats_get(h.e, 0, &rs);
    cr_assert_geq(rs.busy_s, 0.045, "busy %.3f s", rs.busy_s);
    harness_fini(&h);
    pw_trace_destroy(t);
    executor_stop();
    free(as);
}

/* ------------------------------------------------- steps that overlap */

/* The last rank's trailing W of step 1 (after its last SEND_B) waits until
 * chunk 0 has begun step 2's forwards. Nothing of step 1 on rank 0 depends
 * on that W, so a run whose steps overlap (overlap_steps) lets rank 0 run
 * ahead into step 2 and the W goes on; one step at a time, step 2 cannot
 * begin before every rank has ended step 1: the W gives up and fails. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int step2_forward;  /* chunk 0 has run a forward of step 2 */
    int w_mb;           /* the micro-batch of the last chunk's last W */
    double wait_s;      /* how long that W waits */
} ahead = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, -1, 0};

static pw_status ahead_forward(void *self, int mb, int slot)
{
    fake *f = self;
    if (f->chunk == 0 && pw_engine_current_step() == 2) {
        pthread_mutex_lock(&ahead.mu);
        ahead.step2_forward = 1;
        pthread_cond_broadcast(&ahead.cv);
        pthread_mutex_unlock(&ahead.mu);
    }
    return fake_forward(self, mb, slot);
}

static pw_status ahead_backward_weight(void *self, int mb, int slot)
{
    fake *f = self;
    if (f->chunk == f->n_chunks - 1 && pw_engine_current_step() == 1 && mb == ahead.w_mb) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += (time_t)ahead.wait_s;
        pthread_mutex_lock(&ahead.mu);
        int rc = 0;
        while (!ahead.step2_forward && rc == 0) rc = pthread_cond_timedwait(&ahead.cv, &ahead.mu, &until);
        const int seen = ahead.step2_forward;
        pthread_mutex_unlock(&ahead.mu);
        if (!seen)
            return pw_error(PW_ERR_TIMEOUT, "fake chunk %d: step 2 never began on chunk 0 while W mb %d of step 1 "
                            "waited %.0f s", f->chunk, mb, ahead.wait_s);
    }
    return fake_backward_weight(self, mb, slot);
}

static const pw_stage_i ahead_i = {
    .name = "fake-ahead",
    .forward = ahead_forward,
    .backward_input = fake_backward_input,
    .backward_weight = ahead_backward_weight,
    .optimizer_step = fake_optimizer_step,
    .port_bytes = fake_port_bytes,
    .bind = fake_bind,
};

static pw_status run_ahead(pw_schedule_kind kind, int S, int M, int overlap, double wait_s, int *n_done)
{
    harness h;
    harness_init(&h, make_schedule(kind, S, M, 1), NULL, &ahead_i);
    /* The premise: the last rank's last W of the last chunk comes after its
     * last SEND_B, so rank 0's step 1 does not wait for it. */
    const pw_rank_program *p = &h.s->ranks[S - 1];
    int last_w = -1, last_send = -1;
    for (int i = 0; i < p->n_actions; i++) {
        if (p->actions[i].kind == PW_ACT_W && p->actions[i].chunk == h.s->n_chunks - 1) last_w = i;
        if (p->actions[i].kind == PW_ACT_SEND_B) last_send = i;
    }
    cr_assert(last_w > last_send && last_send >= 0, "%s: the last rank ends with no W after its sends",
              pw_schedule_kind_name(kind));
    ahead.w_mb = p->actions[last_w].mb;
    ahead.step2_forward = 0;
    ahead.wait_s = wait_s;
    pw_engine_config cfg = harness_config(&h);
    cfg.overlap_steps = overlap;
    cfg.check = 1;
    harness_create(&h, &cfg);
    pw_status st = pw_engine_run_steps(h.e, 1, 2, n_done);
    if (st == PW_OK)
        for (int c = 0; c < h.s->n_chunks; c++) {
            cr_expect_eq(h.fakes[c].optim_calls, 2, "chunk %d: %d optimizer steps", c, h.fakes[c].optim_calls);
            cr_expect_eq(h.fakes[c].last_step, 2);
        }
    harness_fini(&h);
    return st;
}

Test(engine, overlapped_steps_let_a_rank_run_ahead, .timeout = TIMEOUT)
{
    const pw_schedule_kind kinds[] = {PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_H2};
    for (int k = 0; k < 2; k++)
        for (int S = 2; S <= 4; S += 2) {
            int done = -1;
            pw_status st = run_ahead(kinds[k], S, 2 * S, 1, 60.0, &done);
            cr_expect_eq(st, PW_OK, "%s S=%d, overlapped: %s", pw_schedule_kind_name(kinds[k]), S, pw_last_error());
            cr_expect_eq(done, 2);
        }
    /* The control: one step at a time, the same W waits in vain. */
    int done = -1;
    pw_status st = run_ahead(PW_SCHEDULE_ZB_H1, 2, 4, 0, 1.0, &done);
    cr_expect_eq(st, PW_ERR_TIMEOUT, "one step at a time: %s", st == PW_OK ? "ran" : pw_last_error());
    cr_expect(strstr(pw_last_error(), "step 2 never began"), "%s", pw_last_error());
    cr_expect_eq(done, 0);
}

/* overlap_steps is refused where it cannot run yet, and run_steps checks
 * its arguments. */
Test(engine, overlapped_steps_arguments, .timeout = TIMEOUT)
{
    harness h;
    harness_init(&h, make_schedule(PW_SCHEDULE_1F1B, 2, 4, 0), NULL, &fake_full_i);
    pw_engine_config cfg = harness_config(&h);
    cfg.overlap_steps = 1;
    harness_create(&h, &cfg);
    int done = 7;
    cr_expect_eq(pw_engine_run_steps(h.e, 0, 2, &done), PW_ERR_INVALID_ARG);
    cr_expect_eq(done, 0);
    cr_expect_eq(pw_engine_run_steps(h.e, 1, 0, &done), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_engine_run_steps(NULL, 1, 2, &done), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_engine_run_steps(h.e, 1, 3, &done), PW_OK, "%s", pw_last_error());
    cr_expect_eq(done, 3);
    cr_expect_eq(pw_engine_current_step(), 0, "the caller's thread is in no step");
    harness_fini(&h);
}
