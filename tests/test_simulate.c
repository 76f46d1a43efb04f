/* Tests for the schedule simulator (scheduler/simulate.h): closed-form
 * bubbles under unit costs for every schedule, communication and all-reduce
 * timing, memory, the trace it writes, errors, and the 1024 x 4096 scale.
 *
 * Every test has the same .timeout (300 s): Criterion runs tests with
 * different timeouts in a way that shows up as a leak under LeakSanitizer. */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "runtime/trace.h"
#include "scheduler/schedule.h"
#include "scheduler/simulate.h"

/* ---------------------------------------------------------------- helpers */

static pw_schedule *make(pw_schedule_kind kind, int S, int M, int v, int split, int buckets)
{
    pw_schedule_config cfg = {
        .kind = kind, .n_stages = S, .n_micro = M, .chunks_per_rank = v, .split_w = split,
        .n_buckets = buckets,
    };
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_schedule_lower(s), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    return s;
}

/* Uniform per-chunk costs. */
static pw_sim_chunk_cost *uniform(const pw_schedule *s, double f, double b, double w)
{
    pw_sim_chunk_cost *c = calloc((size_t)s->n_chunks, sizeof *c);
    cr_assert(c);
    for (int i = 0; i < s->n_chunks; i++) c[i] = (pw_sim_chunk_cost){.f = f, .b = b, .w = w};
    return c;
}

static pw_sim_result *sim(const pw_schedule *s, const pw_sim_config *cfg)
{
    pw_sim_result *res = NULL;
    pw_status st = pw_simulate(s, cfg, &res);
    cr_assert_eq(st, PW_OK, "simulate %s: %s", pw_schedule_kind_name(s->kind), pw_last_error());
    return res;
}

/* Simulates `s` with uniform costs and no communication cost. */
static pw_sim_result *sim_unit(const pw_schedule *s, double f, double b, double w)
{
    pw_sim_chunk_cost *c = uniform(s, f, b, w);
    pw_sim_config cfg = {.chunks = c};
    pw_sim_result *res = sim(s, &cfg);
    free(c);
    return res;
}

/* Idle seconds of rank r in a synchronous step. */
static double idle(const pw_sim_result *res, int r) { return res->step_time - res->ranks[r].busy; }

/* ------------------------------------------------- unit costs: the theory */

typedef struct kind_param {
    pw_schedule_kind kind;
    int v;
} kind_param;

ParameterizedTestParameters(sim_theory, matches_replay)
{
    static kind_param params[] = {
        {PW_SCHEDULE_GPIPE, 0},       {PW_SCHEDULE_1F1B, 0},        {PW_SCHEDULE_INTERLEAVED, 2},
        {PW_SCHEDULE_INTERLEAVED, 3}, {PW_SCHEDULE_ZB_H1, 0},       {PW_SCHEDULE_ZB_H2, 0},
        {PW_SCHEDULE_ZB_V, 0},        {PW_SCHEDULE_DUALPIPE_V, 0},
    };
    return cr_make_param_array(kind_param, params, sizeof params / sizeof params[0]);
}

/* With F = B = W = 1 s and free links, the simulated step is the validator's
 * unit-cost makespan, its bubble the closed form, its peaks the validator's,
 * for every stage count 1..4 and m in {p, 2p, 4p} (dualpipev: 2p, 4p); with
 * split W as generated and, for the unsplit kinds, with split W too. */
ParameterizedTest(kind_param *p, sim_theory, matches_replay, .timeout = 300)
{
    for (int S = 1; S <= 4; S++) {
        for (int k = 1; k <= 4; k *= 2) {
            const int M = k * S;
            if (p->kind == PW_SCHEDULE_DUALPIPE_V && M < 2 * S) continue;
            for (int split = 0; split < 2; split++) {
                pw_schedule *s = make(p->kind, S, M, p->v, split, 0);
                pw_schedule_report *rep = NULL;
                cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK);
                /* The replay counts every F, B, W as one step, an unsplit B too. */
                pw_sim_result *res = sim_unit(s, 1.0, 1.0, s->split_w ? 1.0 : 0.0);
                const char *name = pw_schedule_kind_name(p->kind);
                cr_assert_float_eq(res->step_time, (double)rep->makespan, 1e-9,
                                   "%s S=%d M=%d split=%d: step %g, replay %lld", name, S, M,
                                   s->split_w, res->step_time, (long long)rep->makespan);
                cr_assert_float_eq(res->bubble, rep->bubble, 1e-12);
                pw_schedule_config cfg = {.kind = p->kind, .n_stages = S, .n_micro = M,
                                          .chunks_per_rank = p->v, .split_w = split};
                cr_assert_float_eq(res->bubble, pw_schedule_config_bubble(&cfg), 1e-12,
                                   "%s S=%d M=%d", name, S, M);
                for (int r = 0; r < S; r++) {
                    cr_assert_eq(res->ranks[r].peak_inflight, rep->peak_inflight[r]);
                    cr_assert_float_eq(res->ranks[r].peak_stages, rep->peak_stages[r], 1e-12);
                    cr_assert_leq(res->ranks[r].start, res->ranks[r].end);
                    cr_assert_float_eq(res->ranks[r].idle + res->ranks[r].busy, res->step_time, 1e-9);
                }
                cr_assert_eq(res->n_messages, rep->n_messages);
                cr_assert_eq(res->n_actions, rep->n_actions);
                cr_assert_leq(res->steady_step_time, res->step_time + 1e-9);
                pw_sim_result_destroy(res);
                pw_schedule_report_destroy(rep);
                pw_schedule_destroy(s);
                if (p->kind >= PW_SCHEDULE_ZB_H1) break; /* always split */
            }
        }
    }
}

/* 1F1B and GPipe: (p-1)/(m+p-1) of the step, with an unsplit backward
 * costing B + W = 2 against F = 1 (any ratio gives the same fraction). */
Test(sim_theory, gpipe_1f1b, .timeout = 300)
{
    for (int k = 0; k < 2; k++) {
        for (int S = 1; S <= 4; S++) {
            for (int f = 1; f <= 4; f *= 2) {
                const int M = f * S;
                pw_schedule *s = make(k ? PW_SCHEDULE_1F1B : PW_SCHEDULE_GPIPE, S, M, 0, 0, 0);
                pw_sim_result *res = sim_unit(s, 1.0, 1.0, 1.0);
                cr_assert_float_eq(res->step_time, 3.0 * (M + S - 1), 1e-9);
                cr_assert_float_eq(res->bubble, (double)(S - 1) / (M + S - 1), 1e-12);
                /* Rank 0 starts first and ends last: nothing to overlap. */
                cr_assert_float_eq(res->steady_bubble, res->bubble, 1e-12);
                for (int r = 0; r < S; r++) cr_assert_float_eq(idle(res, r), 3.0 * (S - 1), 1e-9);
                pw_sim_result_destroy(res);
                pw_schedule_destroy(s);
            }
        }
    }
}

/* Interleaved 1F1B with v chunks: the idle time is 1/v of 1F1B's when each
 * chunk costs 1/v of a stage (Narayanan et al. 2021: bubble (1/v)(p-1)/m of
 * the ideal time); as a fraction of the step, (p-1)/(vm+p-1). */
Test(sim_theory, interleaved, .timeout = 300)
{
    for (int v = 2; v <= 4; v++) {
        for (int S = 1; S <= 4; S++) {
            for (int f = 1; f <= 4; f *= 2) {
                const int M = f * S;
                /* Whole numbers: a 1F1B stage costs v, a chunk 1. */
                pw_schedule *base = make(PW_SCHEDULE_1F1B, S, M, 0, 0, 0);
                pw_sim_result *rb = sim_unit(base, v, v, v);
                pw_schedule *s = make(PW_SCHEDULE_INTERLEAVED, S, M, v, 0, 0);
                pw_sim_result *ri = sim_unit(s, 1.0, 1.0, 1.0);
                cr_assert_float_eq(ri->busy, rb->busy, 1e-9);
                for (int r = 0; r < S; r++)
                    cr_assert_float_eq(idle(ri, r) * v, idle(rb, r), 1e-9,
                                       "v=%d S=%d M=%d rank %d: idle %g vs 1F1B %g", v, S, M, r,
                                       idle(ri, r), idle(rb, r));
                cr_assert_float_eq(ri->bubble, (double)(S - 1) / (v * M + S - 1), 1e-12);
                cr_assert_leq(ri->bubble, rb->bubble);
                pw_sim_result_destroy(ri);
                pw_sim_result_destroy(rb);
                pw_schedule_destroy(s);
                pw_schedule_destroy(base);
            }
        }
    }
}

/* ZB-H1: with F = B = W = 1 each rank idles p-1 steps against 1F1B's
 * 3(p-1) (B + W = 2 unsplit): a third of the bubble time, (p-1)/(3m+p-1) of
 * the step (Qi et al. 2023: (p-1)(T_F + T_B - T_W) against (p-1)(T_F + T_B + T_W)). */
Test(sim_theory, zb_h1_third_of_1f1b, .timeout = 300)
{
    for (int S = 1; S <= 4; S++) {
        for (int f = 1; f <= 4; f *= 2) {
            const int M = f * S;
            pw_schedule *base = make(PW_SCHEDULE_1F1B, S, M, 0, 0, 0);
            pw_sim_result *rb = sim_unit(base, 1.0, 1.0, 1.0);
            pw_schedule *s = make(PW_SCHEDULE_ZB_H1, S, M, 0, 0, 0);
            pw_sim_result *rz = sim_unit(s, 1.0, 1.0, 1.0);
            cr_assert_float_eq(rz->busy, rb->busy, 1e-9);
            for (int r = 0; r < S; r++) cr_assert_float_eq(3.0 * idle(rz, r), idle(rb, r), 1e-9);
            cr_assert_float_eq(rz->bubble, (double)(S - 1) / (3 * M + S - 1), 1e-12);
            if (S > 1) {
                double ratio = rz->bubble / rb->bubble;
                cr_assert(ratio >= 1.0 / 3.0 - 1e-12 && ratio < 0.5, "S=%d M=%d: ratio %g", S, M, ratio);
            }
            /* Rank 0 still waits p-1 steps for its first B. */
            cr_assert_float_eq(rz->steady_bubble, rz->bubble, 1e-12);
            pw_sim_result_destroy(rz);
            pw_sim_result_destroy(rb);
            pw_schedule_destroy(s);
            pw_schedule_destroy(base);
        }
    }
}

/* ZB-H2 and ZB-V: once m >= 2p-1 no rank idles between its first and last
 * action, so overlapped steps have no bubble at all; a synchronous step keeps
 * only the fill (rank r cannot start before r forwards). With m = p the
 * schedules cannot close their gaps. */
Test(sim_theory, zb_h2_zb_v_zero_bubble, .timeout = 300)
{
    for (int k = 0; k < 2; k++) {
        pw_schedule_kind kind = k ? PW_SCHEDULE_ZB_V : PW_SCHEDULE_ZB_H2;
        for (int S = 1; S <= 4; S++) {
            for (int f = 1; f <= 4; f *= 2) {
                const int M = f * S;
                pw_schedule *s = make(kind, S, M, 0, 0, 0);
                pw_sim_result *res = sim_unit(s, 1.0, 1.0, 1.0);
                const int chunks = k ? 2 : 1;
                double sync = k ? (double)(S - 1) / (6 * M + S - 1) : (double)(S - 1) / (3 * M + S - 1);
                if (M >= 2 * S - 1) {
                    cr_assert_eq(res->steady_bubble, 0.0, "%s S=%d M=%d: steady bubble %g",
                                 pw_schedule_kind_name(kind), S, M, res->steady_bubble);
                    cr_assert_float_eq(res->steady_step_time, 3.0 * chunks * M, 1e-9);
                    cr_assert_float_eq(res->bubble, sync, 1e-12);
                    for (int r = 0; r < S; r++) cr_assert_float_eq(res->ranks[r].start, (double)r, 1e-9);
                } else {
                    cr_assert_gt(res->steady_bubble, 0.0);
                }
                pw_sim_result_destroy(res);
                pw_schedule_destroy(s);
            }
        }
    }
    /* DualPipeV (m >= 2p only): ZB-V's synchronous bubble, p−1 half-stage
     * steps: (p−1)/(6m+p−1) — DeepSeek's (PP/2−1)(F&B + B − 3W) with F&B =
     * F + B and a full B = B + W. But the idle is not only the fill: rank r
     * starts at r and waits p−1−r steps in its cool-down (for the first
     * rank's chunk 0 gradients), so rank 0's span is the whole step and the
     * steady bubble is no smaller. */
    for (int S = 1; S <= 4; S++)
        for (int M = 2 * S; M <= 4 * S; M += S) {
            pw_schedule *s = make(PW_SCHEDULE_DUALPIPE_V, S, M, 0, 0, 0);
            pw_sim_result *res = sim_unit(s, 1.0, 1.0, 1.0);
            const double sync = (double)(S - 1) / (6 * M + S - 1);
            cr_assert_float_eq(res->bubble, sync, 1e-12);
            cr_assert_float_eq(res->steady_bubble, sync, 1e-12, "dualpipev S=%d M=%d: steady %g",
                               S, M, res->steady_bubble);
            cr_assert_float_eq(res->steady_step_time, 6.0 * M + S - 1, 1e-9);
            for (int r = 0; r < S; r++) {
                cr_assert_float_eq(res->ranks[r].start, (double)r, 1e-9);
                cr_assert_float_eq(res->ranks[r].end - res->ranks[r].start - res->ranks[r].busy,
                                   (double)(S - 1 - r), 1e-9, "dualpipev S=%d M=%d rank %d", S, M, r);
                cr_assert_eq(res->ranks[r].peak_inflight, 2 * S + 1); /* DeepSeek's PP + 1 */
            }
            pw_sim_result_destroy(res);
            pw_schedule_destroy(s);
        }
    /* Against 1F1B at p = 4, m = 16: ZB-V's synchronous bubble is about a
     * sixth (0.0303 vs 0.1579), ZB-H2's a third. */
    pw_schedule *a = make(PW_SCHEDULE_1F1B, 4, 16, 0, 0, 0), *b = make(PW_SCHEDULE_ZB_V, 4, 16, 0, 0, 0);
    pw_sim_result *ra = sim_unit(a, 1.0, 1.0, 1.0), *rbv = sim_unit(b, 0.5, 0.5, 0.5);
    cr_assert_float_eq(ra->bubble, 3.0 / 19.0, 1e-12);
    cr_assert_float_eq(rbv->bubble, 3.0 / 99.0, 1e-12);
    cr_assert_float_eq(rbv->busy, ra->busy, 1e-9); /* half-stage chunks: the same work */
    pw_sim_result_destroy(ra);
    pw_sim_result_destroy(rbv);
    pw_schedule_destroy(a);
    pw_schedule_destroy(b);
}

/* ------------------------------------------------------- the cost model */

/* 1F1B, 2 ranks, 1 micro-batch: F, message, F, B (b + w), message, B. */
Test(sim_model, link_latency_and_bandwidth, .timeout = 300)
{
    pw_schedule *s = make(PW_SCHEDULE_1F1B, 2, 1, 0, 0, 0);
    pw_sim_chunk_cost *c = uniform(s, 1.0, 1.5, 0.5);
    c[0].msg_bytes = 2000000000;
    pw_sim_config cfg = {.chunks = c, .link_latency = 0.25, .link_bandwidth = 1e9};
    pw_sim_result *res = sim(s, &cfg);
    /* F 1, link 2 + 0.25, F 1, B 2, link 2 + 0.25, B 2. */
    cr_assert_float_eq(res->step_time, 1 + 2.25 + 1 + 2 + 2.25 + 2, 1e-9, "%g", res->step_time);
    cr_assert_float_eq(res->ranks[1].wait_recv, 3.25, 1e-9);
    cr_assert_float_eq(res->ranks[0].wait_recv, 8.5 - 1, 1e-9);
    cr_assert_float_eq(res->ranks[1].start, 3.25, 1e-9);
    cr_assert_eq(res->n_messages, 2);
    cr_assert_eq(res->n_waits, 2);
    pw_sim_result_destroy(res);
    /* Bandwidth 0 is infinite: only the latency remains. */
    cfg.link_bandwidth = 0;
    res = sim(s, &cfg);
    cr_assert_float_eq(res->step_time, 1 + 0.25 + 1 + 2 + 0.25 + 2, 1e-9);
    pw_sim_result_destroy(res);
    free(c);
    pw_schedule_destroy(s);
}

/* A link carries one message at a time, in send order: GPipe sends F0 and
 * F1 one second apart, each taking 5 s on the link. */
Test(sim_model, link_queues_messages, .timeout = 300)
{
    pw_schedule *s = make(PW_SCHEDULE_GPIPE, 2, 2, 0, 0, 0);
    pw_sim_chunk_cost *c = uniform(s, 1.0, 1.0, 0.0);
    c[0].msg_bytes = 5;
    pw_sim_config cfg = {.chunks = c, .link_bandwidth = 1.0};
    pw_sim_result *res = sim(s, &cfg);
    /* F0 leaves at 1, arrives 6; F1 is sent at 2, leaves at 6, arrives 11.
     * Rank 1: F0 6..7, F1 11..12, B0 12..13, B1 13..14. Gradients of chunk 0
     * use the other direction: B0's leaves 13, arrives 18; B1's queues to 23.
     * Rank 0: B0 18..19, B1 23..24. */
    cr_assert_float_eq(res->ranks[1].end, 14.0, 1e-9, "%g", res->ranks[1].end);
    cr_assert_float_eq(res->step_time, 24.0, 1e-9, "%g", res->step_time);
    cr_assert_float_eq(res->ranks[1].wait_recv, 6.0 + 4.0, 1e-9);
    pw_sim_result_destroy(res);
    free(c);
    pw_schedule_destroy(s);
}

/* link_params gives each directed pair of ranks its own latency. */
static int n_link_calls;
static void slow_back_links(void *ctx, int src, int dst, double *latency, double *bandwidth)
{
    (void)ctx;
    (void)bandwidth;
    n_link_calls++;
    if (dst < src) *latency = 10.0; /* gradients crawl */
}

Test(sim_model, per_link_parameters, .timeout = 300)
{
    pw_schedule *s = make(PW_SCHEDULE_1F1B, 3, 1, 0, 1, 0);
    pw_sim_config cfg = {.link_latency = 1.0, .link_params = slow_back_links};
    n_link_calls = 0;
    pw_sim_result *res = sim(s, &cfg);
    cr_assert_eq(n_link_calls, 4); /* 0->1, 1->0, 1->2, 2->1 */
    /* Unit costs, split: F 1 +1, F 1 +1, F 1, B 1 +10, B 1 +10, B 1, then W. */
    cr_assert_float_eq(res->ranks[0].end, 3 + 2 + 1 + 20 + 2 + 1, 1e-9, "%g", res->ranks[0].end);
    pw_sim_result_destroy(res);
    pw_schedule_destroy(s);
}

/* Buckets are all-reduced one after another on the rank's collective
 * channel, overlapping what the rank still computes; OPTIM waits for them. */
Test(sim_model, allreduce_and_optim, .timeout = 300)
{
    pw_schedule *s = make(PW_SCHEDULE_1F1B, 2, 2, 0, 0, 2);
    pw_sim_chunk_cost *c = uniform(s, 1.0, 1.0, 1.0);
    for (int i = 0; i < 2; i++) {
        c[i].allreduce = 3.0;
        c[i].optim = 0.5;
    }
    pw_sim_config cfg = {.chunks = c};
    pw_sim_result *res = sim(s, &cfg);
    /* Without the reduction a 1F1B of 2 x 2 ends at 3(M+S-1) = 9; the last
     * backward of rank 0 ends at 9, its two buckets at 15, OPTIM at 15.5. */
    cr_assert_float_eq(res->ranks[0].end, 15.5, 1e-9, "%g", res->ranks[0].end);
    cr_assert_float_eq(res->ranks[0].wait_allreduce, 6.0, 1e-9);
    cr_assert_float_eq(res->step_time, 15.5, 1e-9);
    pw_sim_result_destroy(res);
    free(c);
    pw_schedule_destroy(s);

    /* Ring all-reduce: 2(n-1) (latency + bytes / (n bandwidth)). */
    cr_assert_float_eq(pw_sim_ring_allreduce(1000000000, 4, 1e-5, 1e10), 6 * (1e-5 + 0.025), 1e-12);
    cr_assert_eq(pw_sim_ring_allreduce(1000, 1, 1.0, 1.0), 0.0);
    cr_assert_float_eq(pw_sim_ring_allreduce(1000, 2, 1.0, 0.0), 2.0, 1e-12);
}

/* Peak memory: in-flight micro-batches times each chunk's activation bytes. */
Test(sim_model, peak_memory, .timeout = 300)
{
    pw_schedule *s = make(PW_SCHEDULE_1F1B, 4, 8, 0, 0, 0);
    pw_sim_chunk_cost *c = uniform(s, 1.0, 1.0, 1.0);
    for (int i = 0; i < 4; i++) c[i].act_bytes = (int64_t)(i + 1) << 30;
    pw_sim_config cfg = {.chunks = c};
    pw_sim_result *res = sim(s, &cfg);
    for (int r = 0; r < 4; r++) {
        cr_assert_eq(res->ranks[r].peak_inflight, 4 - r);
        cr_assert_eq(res->ranks[r].peak_act_bytes, (int64_t)(4 - r) * ((int64_t)(r + 1) << 30));
    }
    pw_sim_result_destroy(res);
    free(c);
    pw_schedule_destroy(s);
    /* ZB-V: 2p half-stage chunks on every rank = p stages; the interleaved
     * first rank holds p + (p-1)/v stages. */
    s = make(PW_SCHEDULE_ZB_V, 4, 16, 0, 0, 0);
    res = sim(s, NULL);
    for (int r = 0; r < 4; r++) cr_assert_float_eq(res->ranks[r].peak_stages, 4.0, 1e-12);
    pw_sim_result_destroy(res);
    pw_schedule_destroy(s);
    s = make(PW_SCHEDULE_INTERLEAVED, 4, 16, 2, 0, 0);
    res = sim(s, NULL);
    cr_assert_float_eq(res->ranks[0].peak_stages, 4.0 + 3.0 / 2.0, 1e-12);
    pw_sim_result_destroy(res);
    pw_schedule_destroy(s);
}

/* A schedule loaded from CSV simulates like a generated one. */
Test(sim_model, csv_schedule, .timeout = 300)
{
    const char *text = "0F0,0F1,2F0,2F1,2B0,2B1,0B0,0B1,OPT\n"
                       "1F0,1F1,3F0,3F1,3B0,3B1,1B0,1B1,OPT\n";
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_parse_csv(text, strlen(text), "t.csv", &s), PW_OK, "%s", pw_last_error());
    pw_sim_result *res = sim(s, NULL);
    /* Unit costs, an unsplit B = 1 + 1. Rank 1 ends its forwards with 3F1 at
     * 5; then 3B0 5..7, 3B1 7..9; rank 0's 2B0 7..9, 2B1 9..11; rank 1's 1B0
     * 9..11, 1B1 11..13; rank 0's 0B0 11..13, 0B1 13..15. */
    cr_assert_eq(res->n_messages, 2 * 2 * 3);
    cr_assert_float_eq(res->step_time, 15.0, 1e-9);
    cr_assert_float_eq(res->bubble, 1.0 - 24.0 / 30.0, 1e-12);
    cr_assert_eq(res->ranks[0].peak_inflight, 4);
    cr_assert_float_eq(res->ranks[0].peak_stages, 2.0, 1e-12);
    pw_sim_result_destroy(res);
    pw_schedule_destroy(s);
}

/* ----------------------------------------------------------------- trace */

/* Counts the trace's events by name prefix and category. */
typedef struct counts {
    int compute, comm, wait, step, meta;
    int wait_recv_f, wait_recv_b, recv_f;
    int bad_peer;
    double last_end_us;
} counts;

static void count_events(json_t *events, counts *k)
{
    memset(k, 0, sizeof *k);
    size_t i;
    json_t *e;
    json_array_foreach(events, i, e) {
        const char *ph = json_string_value(json_object_get(e, "ph"));
        if (ph && !strcmp(ph, "M")) {
            k->meta++;
            continue;
        }
        const char *name = json_string_value(json_object_get(e, "name"));
        const char *cat = json_string_value(json_object_get(e, "cat"));
        cr_assert(name && cat);
        int tid = (int)json_integer_value(json_object_get(e, "tid"));
        json_t *args = json_object_get(e, "args");
        double end = json_number_value(json_object_get(e, "ts")) + json_number_value(json_object_get(e, "dur"));
        if (end > k->last_end_us) k->last_end_us = end;
        if (!strcmp(cat, "compute")) k->compute++;
        else if (!strcmp(cat, "comm")) k->comm++;
        else if (!strcmp(cat, "wait")) k->wait++;
        else if (!strcmp(cat, "step")) k->step++;
        if (!strcmp(name, "RECV_F")) k->recv_f++;
        if (!strcmp(name, "wait RECV_F") || !strcmp(name, "wait RECV_B")) {
            /* 1F1B with one chunk per rank: the sender is the neighbour. */
            int peer = (int)json_integer_value(json_object_get(args, "peer"));
            if (peer != (!strcmp(name, "wait RECV_F") ? tid - 1 : tid + 1)) k->bad_peer++;
            if (!strcmp(name, "wait RECV_F")) k->wait_recv_f++;
            else k->wait_recv_b++;
        }
    }
}

Test(sim_trace, parses_back, .timeout = 300)
{
    const int S = 3, M = 4;
    pw_schedule *s = make(PW_SCHEDULE_1F1B, S, M, 0, 1, 1);
    pw_trace *t = NULL;
    cr_assert_eq(pw_trace_create(S, pw_sim_trace_capacity(s), &t), PW_OK);
    pw_sim_chunk_cost *c = uniform(s, 1e-3, 1e-3, 1e-3);
    for (int i = 0; i < S; i++) {
        c[i].msg_bytes = 1 << 20;
        c[i].allreduce = 2e-3;
    }
    pw_sim_config cfg = {.chunks = c, .link_latency = 1e-4, .link_bandwidth = 1e10, .trace = t, .step = 7};
    pw_sim_result *res = sim(s, &cfg);
    int64_t pushed = 0;
    for (int r = 0; r < S; r++) {
        pushed += pw_trace_count(t, r);
        cr_assert_eq(pw_trace_dropped(t, r), 0);
        const pw_trace_event *ev = pw_trace_events(t, r);
        cr_assert_eq(ev[0].step, 7);
    }
    cr_assert_eq(pushed, res->n_trace_events);

    char path[512];
    snprintf(path, sizeof path, "%s/test_simulate_%d.json", PW_BINARY_DIR, (int)getpid());
    int peaks[3] = {0};
    for (int r = 0; r < S; r++) peaks[r] = res->ranks[r].peak_inflight;
    pw_trace_meta meta = {
        .schedule = "1f1b", .graph = "simulated", .n_ranks = S, .n_chunks = S, .n_micro = M,
        .n_replicas = 2, .steps = 1, .theory_bubble = pw_schedule_theoretical_bubble(s->kind, S, M),
        .peak_inflight = peaks,
    };
    cr_assert_eq(pw_trace_write(t, path, &meta), PW_OK, "%s", pw_last_error());

    json_error_t err;
    json_t *root = json_load_file(path, 0, &err);
    cr_assert(root, "%s:%d: %s", path, err.line, err.text);
    json_t *pw = json_object_get(root, "pipewright");
    cr_assert_eq(json_integer_value(json_object_get(pw, "ranks")), S);
    cr_assert_eq(json_integer_value(json_object_get(pw, "dropped_events")), 0);
    counts k;
    count_events(json_object_get(root, "traceEvents"), &k);
    /* Compute: F, B, W per micro-batch and one OPTIM per rank. */
    cr_assert_eq(k.compute, S * (3 * M + 1));
    /* Comm: each message is a SEND and a RECV, plus one ALLREDUCE a rank. */
    cr_assert_eq(k.comm, 2 * (int)res->n_messages + S);
    cr_assert_eq(k.recv_f, (S - 1) * M);
    cr_assert_eq(k.wait, (int)res->n_waits + S); /* + "wait ALLREDUCE" before each OPTIM */
    cr_assert_gt(k.wait_recv_f, 0);
    cr_assert_gt(k.wait_recv_b, 0);
    cr_assert_eq(k.bad_peer, 0);
    cr_assert_eq(k.step, S);
    cr_assert_eq(k.meta, 1 + S);
    cr_assert_eq(k.compute + k.comm + k.wait + k.step, (int)pushed);
    cr_assert_float_eq(k.last_end_us, 1e6 * res->step_time, 1e-3);
    json_decref(root);
    remove(path);
    pw_sim_result_destroy(res);
    pw_trace_destroy(t);

    /* A track too small drops events (counted) and leaves the result alone. */
    cr_assert_eq(pw_trace_create(S, 4, &t), PW_OK);
    cfg.trace = t;
    pw_sim_result *small = sim(s, &cfg);
    cr_assert_gt(pw_trace_dropped(t, 0), 0);
    cr_assert_eq(pw_trace_count(t, 0), 4);
    pw_sim_result_destroy(small);
    pw_trace_destroy(t);
    free(c);
    pw_schedule_destroy(s);
    cr_assert_eq(pw_sim_trace_capacity(NULL), 0);
}

/* ---------------------------------------------------------------- errors */

Test(sim_errors, bad_input, .timeout = 300)
{
    pw_sim_result *res = (pw_sim_result *)1;
    cr_assert_eq(pw_simulate(NULL, NULL, &res), PW_ERR_INVALID_ARG);
    cr_assert_null(res);
    cr_assert_eq(pw_simulate(NULL, NULL, NULL), PW_ERR_INVALID_ARG);

    /* Not lowered. */
    pw_schedule_config sc = {.kind = PW_SCHEDULE_1F1B, .n_stages = 2, .n_micro = 2};
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_generate(&sc, &s), PW_OK);
    cr_assert_eq(pw_simulate(s, NULL, &res), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "simulate: the schedule is not lowered"), "%s", pw_last_error());
    cr_assert_eq(pw_schedule_lower(s), PW_OK);

    /* Bad costs. */
    pw_sim_chunk_cost *c = uniform(s, 1.0, 1.0, 1.0);
    c[1].b = -1.0;
    pw_sim_config cfg = {.chunks = c};
    cr_assert_eq(pw_simulate(s, &cfg, &res), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "simulate: chunk 1: b must be a time in seconds >= 0 (got -1)"),
              "%s", pw_last_error());
    c[1].b = NAN;
    cr_assert_eq(pw_simulate(s, &cfg, &res), PW_ERR_INVALID_ARG);
    c[1].b = 1.0;
    c[0].msg_bytes = -5;
    cr_assert_eq(pw_simulate(s, &cfg, &res), PW_ERR_INVALID_ARG);
    c[0].msg_bytes = 0;
    cfg.link_latency = -1.0;
    cr_assert_eq(pw_simulate(s, &cfg, &res), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "link 0 -> 1: latency must be >= 0 s"), "%s", pw_last_error());
    cfg.link_latency = 0.0;
    c[0].f = 1e9; /* a billion seconds per forward: the int64 clock would overflow */
    cr_assert_eq(pw_simulate(s, &cfg, &res), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "too large for the simulated clock"), "%s", pw_last_error());
    free(c);

    /* An action of another rank. */
    pw_action saved = s->ranks[0].actions[0];
    s->ranks[0].actions[0].chunk = 1;
    cr_assert_eq(pw_simulate(s, NULL, &res), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "simulate: rank 0, position 0"), "%s", pw_last_error());
    s->ranks[0].actions[0] = saved;
    pw_schedule_destroy(s);

    /* A schedule that does not finish: rank 0 wants the gradient of mb 0
     * before it sends mb 1 (the docs' deadlock). */
    const char *text = "0F0,0B0,0F1,0F2,0F3,0B1,0B2,0B3,OPT\n"
                       "1F0,1F1,1F2,1B0,1F3,1B1,1B2,1B3,OPT\n";
    cr_assert_eq(pw_schedule_parse_csv(text, strlen(text), "d.csv", &s), PW_OK);
    cr_assert_eq(pw_simulate(s, NULL, &res), PW_ERR_SCHEDULE);
    cr_assert_null(res);
    cr_assert(strstr(pw_last_error(), "waits for a message that is never sent"), "%s", pw_last_error());
    pw_schedule_destroy(s);
    pw_sim_result_destroy(NULL);
}

static uint32_t lcg(uint32_t *x)
{
    *x = *x * 1664525u + 1013904223u;
    return *x >> 8;
}

/* Damaged schedules never crash the simulator: it answers OK or
 * PW_ERR_SCHEDULE, with a trace attached. */
Test(sim_errors, damaged_schedules, .timeout = 300)
{
    static const pw_schedule_kind kinds[] = {PW_SCHEDULE_1F1B, PW_SCHEDULE_INTERLEAVED,
                                             PW_SCHEDULE_ZB_H2, PW_SCHEDULE_ZB_V};
    uint32_t seed = 99;
    for (int iter = 0; iter < 1500; iter++) {
        pw_schedule_kind kind = kinds[lcg(&seed) % 4];
        int S = 1 + (int)(lcg(&seed) % 4), M = 1 + (int)(lcg(&seed) % 4);
        if (kind == PW_SCHEDULE_INTERLEAVED) M = S;
        pw_schedule *s = make(kind, S, M, 0, 0, (int)(lcg(&seed) % 2));
        for (int e = 0; e < 2; e++) {
            pw_rank_program *p = &s->ranks[lcg(&seed) % (uint32_t)S];
            pw_action *a = &p->actions[lcg(&seed) % (uint32_t)p->n_actions];
            switch (lcg(&seed) % 4) {
            case 0: a->kind = (pw_action_kind)(lcg(&seed) % (PW_ACT_COUNT + 1)); break;
            case 1: a->chunk = (int)(lcg(&seed) % (uint32_t)(s->n_chunks + 2)) - 1; break;
            case 2: a->mb = (int)(lcg(&seed) % (uint32_t)(M + 2)) - 1; break;
            default: {
                pw_action *b = &p->actions[lcg(&seed) % (uint32_t)p->n_actions];
                pw_action tmp = *a;
                *a = *b;
                *b = tmp;
            }
            }
        }
        pw_trace *t = NULL;
        cr_assert_eq(pw_trace_create(S, pw_sim_trace_capacity(s), &t), PW_OK);
        pw_sim_config cfg = {.trace = t, .link_latency = 0.1};
        pw_sim_result *res = NULL;
        pw_status st = pw_simulate(s, &cfg, &res);
        cr_assert(st == PW_OK || st == PW_ERR_SCHEDULE, "status %d: %s", st, pw_last_error());
        cr_assert_eq(res != NULL, st == PW_OK);
        pw_sim_result_destroy(res);
        pw_trace_destroy(t);
        pw_schedule_destroy(s);
    }
}

/* ----------------------------------------------------------------- scale */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Not a timed assertion: generates, lowers, validates and simulates 1F1B
 * with 1024 ranks x 4096 micro-batches (25 M actions) and reports the time
 * (target: under 2 s; tools/bench/bench_simulate measures it properly). */
Test(sim_scale, onefoneb_1024x4096, .timeout = 300)
{
    const int S = 1024, M = 4096;
    double t0 = now_s();
    pw_schedule_config cfg = {.kind = PW_SCHEDULE_1F1B, .n_stages = S, .n_micro = M};
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_schedule_lower(s), PW_OK, "%s", pw_last_error());
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s", pw_last_error());
    double t1 = now_s();
    pw_sim_result *res = sim(s, NULL); /* unit costs: F 1, unsplit B 1 + 1 */
    double t2 = now_s();
    cr_assert_float_eq(res->step_time, 3.0 * (M + S - 1), 1e-6);
    cr_assert_float_eq(res->bubble, (double)(S - 1) / (M + S - 1), 1e-12);
    cr_assert_eq(res->ranks[0].peak_inflight, S);
    cr_assert_eq(res->ranks[S - 1].peak_inflight, 1);
    fprintf(stderr,
            "sim_scale: 1f1b %d ranks x %d micro-batches, %lld actions: generate + lower + validate "
            "%.3f s, simulate %.3f s, total %.3f s (target < 2 s)\n",
            S, M, (long long)res->n_actions, t1 - t0, t2 - t1, t2 - t0);
    pw_sim_result_destroy(res);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
}

/* ------------------------------------------------------ several steps */

/* Synchronous steps replay the first; post-validated ones overlap: the
 * period of 1F1B, ZB-H1 and DualPipeV (their first rank ends last) stays a
 * whole step,
 * that of ZB-H2, ZB-V and zb-auto at 2p falls to the steady step — exactly,
 * on the unit clock — and K steps cost the fill once. */
Test(sim_steps, sync_and_post_validated, .timeout = 300)
{
    const pw_schedule_kind kinds[] = {PW_SCHEDULE_1F1B, PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_H2,
                                      PW_SCHEDULE_ZB_V, PW_SCHEDULE_ZB_AUTO, PW_SCHEDULE_DUALPIPE_V};
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++)
        for (int S = 2; S <= 4; S++)
            for (int M = 2 * S; M <= 4 * S; M += S) {
                pw_schedule *s = make(kinds[k], S, M, 0, 0, 0);
                const char *name = pw_schedule_kind_name(kinds[k]);
                pw_sim_chunk_cost *c = uniform(s, 1.0 / s->chunks_per_rank, 1.0 / s->chunks_per_rank,
                                               1.0 / s->chunks_per_rank);
                pw_sim_config cfg = {.chunks = c, .steps = 5};
                pw_sim_result *one = sim(s, &(pw_sim_config){.chunks = c});
                pw_sim_result *syn = sim(s, &cfg);
                cfg.post_validate = 1;
                pw_sim_result *pv = sim(s, &cfg);
                cr_assert_eq(one->steps, 1);
                cr_assert_float_eq(one->period, one->step_time, 1e-12);
                cr_assert_eq(syn->steps, 5);
                cr_assert_float_eq(syn->steps_time, 5 * one->step_time, 1e-9);
                cr_assert_float_eq(syn->period, one->step_time, 1e-12);
                cr_assert_float_eq(syn->step_time, one->step_time, 1e-12); /* the first step's figures */
                const int staggered = kinds[k] == PW_SCHEDULE_ZB_H2 || kinds[k] == PW_SCHEDULE_ZB_V ||
                                      kinds[k] == PW_SCHEDULE_ZB_AUTO;
                double want = staggered ? one->steady_step_time : one->step_time;
                cr_assert_float_eq(pv->period, want, 1e-9, "%s S=%d M=%d: period %g, want %g", name, S,
                                   M, pv->period, want);
                if (staggered)
                    cr_assert_lt(pv->period, one->step_time, "%s S=%d M=%d: no overlap", name, S, M);
                cr_assert_float_eq(pv->steps_time, one->step_time + 4 * pv->period, 1e-9,
                                   "%s S=%d M=%d", name, S, M);
                cr_assert_leq(pv->steps_bubble, syn->steps_bubble + 1e-12);
                pw_sim_result_destroy(one);
                pw_sim_result_destroy(syn);
                pw_sim_result_destroy(pv);
                free(c);
                pw_schedule_destroy(s);
            }
}

/* The Table 5 setting of docs/schedules.md (p = 8, F = B = W, m = 24, 32,
 * 64; bench_simulate --table): DualPipeV's synchronous step idles
 * (p−1)/(6m+p−1) = 4.6 / 3.5 / 1.8 %, ZB-V's figures, and post-validated
 * steps keep it (rank 0 ends the step last: the period is the step). With
 * messages a tenth of F (the table's --comm 10) one synchronous step idles
 * less than ZB-V's, and the post-validated period more. */
Test(sim_steps, dualpipev_table5, .timeout = 300)
{
    static const int ms[] = {24, 32, 64};
    static const double sync_pct[] = {4.6, 3.5, 1.8};
    for (int i = 0; i < 3; i++) {
        const int S = 8, M = ms[i];
        pw_schedule *d = make(PW_SCHEDULE_DUALPIPE_V, S, M, 0, 0, 0);
        pw_schedule *z = make(PW_SCHEDULE_ZB_V, S, M, 0, 0, 0);
        for (int comm = 0; comm <= 1; comm++) {
            pw_sim_chunk_cost *cd = uniform(d, 0.5, 0.5, 0.5), *cz = uniform(z, 0.5, 0.5, 0.5);
            pw_sim_config cfg = {.chunks = cd, .link_latency = comm ? 0.1 : 0.0, .steps = 8,
                                 .post_validate = 1};
            pw_sim_result *rd = sim(d, &cfg);
            cfg.chunks = cz;
            pw_sim_result *rz = sim(z, &cfg);
            if (!comm) {
                cr_assert_float_eq(rd->bubble, (double)(S - 1) / (6 * M + S - 1), 1e-12);
                cr_assert_float_eq(100 * rd->bubble, sync_pct[i], 0.05, "m=%d: %.2f %%", M, 100 * rd->bubble);
                cr_assert_float_eq(rd->bubble, rz->bubble, 1e-12);
                cr_assert_float_eq(rd->period_bubble, rd->bubble, 1e-12, "m=%d: period %g", M,
                                   rd->period_bubble);
                cr_assert_float_eq(rz->period_bubble, 0.0, 1e-12);
            } else {
                cr_assert_lt(rd->bubble, rz->bubble, "m=%d: dualpipev %g, zb-v %g", M, rd->bubble,
                             rz->bubble);
                cr_assert_gt(rd->period, rz->period, "m=%d: dualpipev %g, zb-v %g", M, rd->period,
                             rz->period);
            }
            cr_assert_float_eq(rd->period, rd->step_time, 1e-9);
            pw_sim_result_destroy(rd);
            pw_sim_result_destroy(rz);
            free(cd);
            free(cz);
        }
        pw_schedule_destroy(d);
        pw_schedule_destroy(z);
    }
}

/* zb-auto given the stages' times (uneven stages, a message time) is never
 * slower in the overlapped steady state than the handcrafted schedule of the
 * same memory: ZB-H1 at p, ZB-H2 at 2p - 1. */
Test(sim_steps, zb_auto_beats_handcrafted_on_measured_times, .timeout = 300)
{
    static const double shapes[][4] = {{1, 1, 1, 1}, {1, 1, 1, 2}, {2, 1, 1, 1}, {1, 1.5, 0.7, 1.2}};
    for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++)
        for (int S = 2; S <= 4; S++)
            for (int M = S; M <= 4 * S; M += S) {
                double f[4], b[4], w[4];
                for (int r = 0; r < S; r++) {
                    f[r] = 1e-3 * shapes[sh][r];
                    b[r] = 1.1e-3 * shapes[sh][r];
                    w[r] = 0.8e-3 * shapes[sh][(r + 1) % 4];
                }
                pw_schedule_costs costs = {.f = f, .b = b, .w = w, .comm = 0.1e-3};
                for (int two = 0; two <= 1; two++) {
                    pw_schedule_config ac = {.kind = PW_SCHEDULE_ZB_AUTO, .n_stages = S, .n_micro = M,
                                             .memory_limit = two ? 2 * S - 1 : S, .costs = &costs};
                    pw_schedule *a = NULL;
                    cr_assert_eq(pw_schedule_generate(&ac, &a), PW_OK, "%s", pw_last_error());
                    cr_assert_eq(pw_schedule_lower(a), PW_OK);
                    cr_assert_eq(pw_schedule_validate(a, NULL), PW_OK, "%s", pw_last_error());
                    pw_schedule *h = make(two ? PW_SCHEDULE_ZB_H2 : PW_SCHEDULE_ZB_H1, S, M, 0, 0, 0);
                    pw_sim_chunk_cost c[4];
                    for (int r = 0; r < S; r++) c[r] = (pw_sim_chunk_cost){.f = f[r], .b = b[r], .w = w[r]};
                    pw_sim_config cfg = {.chunks = c, .link_latency = costs.comm, .steps = 4,
                                         .post_validate = 1};
                    pw_sim_result *ra = sim(a, &cfg), *rh = sim(h, &cfg);
                    cr_assert_leq(ra->period, rh->period * (1 + 1e-9), "shape %zu S=%d M=%d %s: zb-auto %g, %s %g",
                                  sh, S, M, two ? "2p-1" : "1p", ra->period, two ? "zb-h2" : "zb-h1",
                                  rh->period);
                    pw_sim_result_destroy(ra);
                    pw_sim_result_destroy(rh);
                    pw_schedule_destroy(a);
                    pw_schedule_destroy(h);
                }
            }
}
