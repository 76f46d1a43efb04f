/* Tests for the schedule IR (scheduler/schedule.h): generators, lowering,
 * validator, run-time checker, CSV form, theory and printing.
 *
 * Every test has the same .timeout (300 s, room for the 25 M-action scale
 * test under AddressSanitizer): Criterion runs tests with different timeouts
 * in a way that shows up as a leak under LeakSanitizer. */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "scheduler/schedule.h"

/* ---------------------------------------------------------------- helpers */

static pw_schedule *gen(pw_schedule_kind kind, int S, int M, int split_w, int buckets)
{
    pw_schedule_config cfg = {
        .kind = kind, .n_stages = S, .n_micro = M, .split_w = split_w, .n_buckets = buckets,
    };
    pw_schedule *s = NULL;
    pw_status st = pw_schedule_generate(&cfg, &s);
    cr_assert_eq(st, PW_OK, "generate %s S=%d M=%d: %s", pw_schedule_kind_name(kind), S, M,
                 pw_last_error());
    return s;
}

static pw_schedule *gen_lowered(pw_schedule_kind kind, int S, int M, int split_w)
{
    pw_schedule *s = gen(kind, S, M, split_w, 0);
    cr_assert_eq(pw_schedule_lower(s), PW_OK, "%s", pw_last_error());
    return s;
}

/* The CSV text of s (caller frees). */
static char *to_csv(const pw_schedule *s, size_t *len)
{
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    cr_assert(f);
    cr_assert_eq(pw_schedule_write_csv(s, f), PW_OK, "%s", pw_last_error());
    fclose(f);
    if (len) *len = n;
    return buf;
}

static pw_schedule *from_csv(const char *text)
{
    pw_schedule *s = NULL;
    pw_status st = pw_schedule_parse_csv(text, strlen(text), "test.csv", &s);
    cr_assert_eq(st, PW_OK, "parse: %s", pw_last_error());
    return s;
}

/* Parses `text` (must parse) and expects validation to fail with `msg`. */
static void expect_invalid(const char *text, const char *msg)
{
    pw_schedule *s = from_csv(text);
    pw_schedule_report *rep = (pw_schedule_report *)1;
    pw_status st = pw_schedule_validate(s, &rep);
    cr_assert_eq(st, PW_ERR_SCHEDULE, "expected a validation error '%s', got status %d", msg, st);
    cr_assert_null(rep);
    cr_assert(strstr(pw_last_error(), msg), "message\n  %s\ndoes not contain\n  %s", pw_last_error(),
              msg);
    pw_schedule_destroy(s);
}

/* Expects the CSV text to be rejected by the parser with exactly `msg`. */
static void expect_parse_error(const char *text, const char *msg)
{
    pw_schedule *s = (pw_schedule *)1;
    pw_status st = pw_schedule_parse_csv(text, strlen(text), "bad.csv", &s);
    cr_assert_eq(st, PW_ERR_PARSE, "expected parse error '%s' for:\n%s", msg, text);
    cr_assert_null(s);
    cr_assert(strstr(pw_last_error(), msg), "message\n  %s\ndoes not contain\n  %s", pw_last_error(),
              msg);
}

/* The compute cells of one rank, joined with ',' ("0F0,0F1,0B0,..."). */
static void compute_row(const pw_schedule *s, int r, char *buf, size_t n)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < s->ranks[r].n_actions; i++) {
        const pw_action *a = &s->ranks[r].actions[i];
        if (a->kind != PW_ACT_F && a->kind != PW_ACT_B && a->kind != PW_ACT_W) continue;
        char cell[32];
        pw_action_format(a, 1, cell, sizeof cell);
        used += (size_t)snprintf(buf + used, n - used, "%s%s", used ? "," : "", cell);
    }
}

/* ------------------------------------------- generated schedules, all sizes */

typedef struct gen_param {
    pw_schedule_kind kind;
    int split_w;
    int stages;
} gen_param;

ParameterizedTestParameters(schedule, generated)
{
    static gen_param params[2 * 2 * 8];
    int n = 0;
    for (int k = 0; k < 2; k++)
        for (int w = 0; w < 2; w++)
            for (int S = 1; S <= 8; S++)
                params[n++] = (gen_param){k ? PW_SCHEDULE_1F1B : PW_SCHEDULE_GPIPE, w, S};
    return cr_make_param_array(gen_param, params, (size_t)n);
}

/* Every generated schedule lowers, validates, has the theoretical peaks and
 * bubble, round-trips through CSV, and passes the run-time checker. */
ParameterizedTest(gen_param *p, schedule, generated, .timeout = 300)
{
    const int S = p->stages, W = p->split_w;
    const char *name = pw_schedule_kind_name(p->kind);
    for (int M = 1; M <= 16; M++) {
        pw_schedule *compute = gen(p->kind, S, M, W, 0);
        cr_assert_eq(compute->lowered, 0);
        for (int r = 0; r < S; r++) {
            const pw_rank_program *rp = &compute->ranks[r];
            cr_assert_eq(rp->n_actions, M * (2 + W) + 1, "%s S=%d M=%d rank %d", name, S, M, r);
            cr_assert_eq(rp->actions[rp->n_actions - 1].kind, PW_ACT_OPTIM);
        }

        pw_schedule *s = gen_lowered(p->kind, S, M, W);
        pw_schedule_report *rep = NULL;
        cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s S=%d M=%d split_w=%d: %s", name, S,
                     M, W, pw_last_error());
        for (int r = 0; r < S; r++) {
            int want = pw_schedule_theoretical_peak(p->kind, S, M, r);
            cr_assert_eq(want, p->kind == PW_SCHEDULE_GPIPE ? M : (S - r < M ? S - r : M));
            cr_assert_eq(rep->peak_inflight[r], want, "%s S=%d M=%d split_w=%d rank %d: peak %d, want %d",
                         name, S, M, W, r, rep->peak_inflight[r], want);
            cr_assert_eq(rep->peak_inflight_chunk[r], want);
            cr_assert_eq(rep->peak_w_pending[r], W ? 1 : 0);
        }
        cr_assert_eq(rep->n_messages, 2 * (int64_t)M * (S - 1));
        /* Unit costs, unsplit: fill + drain = 2(S-1) idle steps per rank. */
        if (!W) {
            cr_assert_eq(rep->makespan, 2 * (int64_t)(M + S - 1), "%s S=%d M=%d", name, S, M);
            double theory = pw_schedule_theoretical_bubble(p->kind, S, M);
            cr_assert_float_eq(rep->bubble, theory, 1e-12, "%s S=%d M=%d: bubble %g, theory %g",
                               name, S, M, rep->bubble, theory);
        } else {
            cr_assert_leq(rep->bubble, pw_schedule_theoretical_bubble(p->kind, S, M) + 1e-12);
            /* The gradient leaves after B, before W: 3M + 2(S-1) steps. */
            cr_assert_eq(rep->makespan, 3 * (int64_t)M + 2 * (S - 1), "%s S=%d M=%d", name, S, M);
        }
        pw_schedule_config cfg = {.kind = p->kind, .n_stages = S, .n_micro = M, .split_w = W};
        cr_assert_float_eq(rep->bubble, pw_schedule_config_bubble(&cfg), 1e-12, "%s S=%d M=%d W=%d",
                           name, S, M, W);
        for (int r = 0; r < S; r++) cr_assert_eq(rep->peak_stages[r], (double)rep->peak_inflight[r]);

        /* Lowering is idempotent. */
        pw_schedule *again = gen_lowered(p->kind, S, M, W);
        cr_assert_eq(pw_schedule_lower(again), PW_OK);
        cr_assert(pw_schedule_equal(s, again));
        pw_schedule_destroy(again);

        /* CSV: a lowered schedule reads back equal and re-writes byte for byte. */
        size_t len1, len2;
        char *csv1 = to_csv(s, &len1);
        pw_schedule *back = from_csv(csv1);
        cr_assert(pw_schedule_equal(s, back), "%s S=%d M=%d: CSV round trip differs", name, S, M);
        char *csv2 = to_csv(back, &len2);
        cr_assert_eq(len1, len2);
        cr_assert_eq(memcmp(csv1, csv2, len1), 0);
        /* A compute-only schedule reads back lowered. */
        char *csv3 = to_csv(compute, NULL);
        pw_schedule *back3 = from_csv(csv3);
        cr_assert(pw_schedule_equal(s, back3), "%s S=%d M=%d: compute-only CSV", name, S, M);

        /* Run-time checker, bound = the validator's peak: passes, twice (it
         * resets at finish); bound one lower trips on the rank that peaks. */
        for (int r = 0; r < S; r++) {
            pw_schedule_checker *ck = NULL;
            cr_assert_eq(pw_schedule_checker_create(s, r, rep->peak_inflight[r], &ck), PW_OK);
            for (int step = 0; step < 2; step++) {
                for (int i = 0; i < s->ranks[r].n_actions; i++)
                    cr_assert_eq(pw_schedule_checker_step(ck, &s->ranks[r].actions[i]), PW_OK, "%s",
                                 pw_last_error());
                cr_assert_eq(pw_schedule_checker_finish(ck), PW_OK, "%s", pw_last_error());
            }
            pw_schedule_checker_destroy(ck);
            if (rep->peak_inflight[r] > 1) {
                cr_assert_eq(pw_schedule_checker_create(s, r, rep->peak_inflight[r] - 1, &ck), PW_OK);
                pw_status st = PW_OK;
                for (int i = 0; i < s->ranks[r].n_actions && st == PW_OK; i++)
                    st = pw_schedule_checker_step(ck, &s->ranks[r].actions[i]);
                cr_assert_eq(st, PW_ERR_SCHEDULE);
                cr_assert(strstr(pw_last_error(), "above the bound"), "%s", pw_last_error());
                pw_schedule_checker_destroy(ck);
            }
        }

        free(csv1);
        free(csv2);
        free(csv3);
        pw_schedule_destroy(back);
        pw_schedule_destroy(back3);
        pw_schedule_report_destroy(rep);
        pw_schedule_destroy(s);
        pw_schedule_destroy(compute);
    }
}

/* ----------------------------------------------------------- exact orders */

Test(schedule, gpipe_order, .timeout = 300)
{
    pw_schedule *s = gen(PW_SCHEDULE_GPIPE, 4, 4, 0, 0);
    char row[512];
    compute_row(s, 2, row, sizeof row);
    cr_assert_str_eq(row, "2F0,2F1,2F2,2F3,2B0,2B1,2B2,2B3");
    pw_schedule_destroy(s);
}

Test(schedule, onefoneb_order, .timeout = 300)
{
    pw_schedule *s = gen(PW_SCHEDULE_1F1B, 4, 8, 0, 0);
    char row[512];
    compute_row(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,0F2,0F3,0B0,0F4,0B1,0F5,0B2,0F6,0B3,0F7,0B4,0B5,0B6,0B7");
    compute_row(s, 3, row, sizeof row);
    cr_assert_str_eq(row, "3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3,3F4,3B4,3F5,3B5,3F6,3B6,3F7,3B7");
    pw_schedule_destroy(s);
    /* Split W: W right after its B. */
    s = gen(PW_SCHEDULE_1F1B, 2, 3, 1, 0);
    compute_row(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,0B0,0W0,0F2,0B1,0W1,0B2,0W2");
    pw_schedule_destroy(s);
}

Test(schedule, lowering_placement, .timeout = 300)
{
    pw_schedule *s = gen_lowered(PW_SCHEDULE_1F1B, 3, 2, 0);
    size_t len;
    char *csv = to_csv(s, &len);
    cr_assert_str_eq(csv,
                     "# pipewright schedule v1: kind=1f1b ranks=3 chunks_per_rank=1 micro_batches=2 split_w=0 buckets=0\n"
                     "0F0,0SF0,0F1,0SF1,0RB0,0B0,0RB1,0B1,OPT\n"
                     "1RF0,1F0,1SF0,1RF1,1F1,1SF1,1RB0,1B0,1SB0,1RB1,1B1,1SB1,OPT\n"
                     "2RF0,2F0,2B0,2SB0,2RF1,2F1,2B1,2SB1,OPT\n");
    free(csv);
    pw_schedule_destroy(s);
}

Test(schedule, allreduce_buckets, .timeout = 300)
{
    pw_schedule *s = gen(PW_SCHEDULE_1F1B, 3, 4, 0, 2);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    const pw_rank_program *r1 = &s->ranks[1];
    cr_assert_eq(r1->actions[r1->n_actions - 3].kind, PW_ACT_ALLREDUCE);
    cr_assert_eq(r1->actions[r1->n_actions - 3].mb, 0);
    cr_assert_eq(r1->actions[r1->n_actions - 2].mb, 1);
    char *csv = to_csv(s, NULL);
    cr_assert(strstr(csv, ",AR0,AR1,OPT\n"), "%s", csv);
    pw_schedule *back = from_csv(csv);
    cr_assert(pw_schedule_equal(s, back));
    pw_schedule_destroy(back);
    free(csv);
    pw_schedule_destroy(s);

    expect_invalid("0F0,AR0,0B0,OPT\n", "rank 0, position 1 (ALLREDUCE bucket 0): ALLREDUCE before the "
                   "chunk's last backward (0 of 1 micro-batches done)");
    expect_invalid("# pipewright schedule v1: buckets=1\n0F0,0B0,OPT\n",
                   "rank 0, position 2 (OPTIM): OPTIM before ALLREDUCE of bucket 0 of chunk 0");
}

/* ------------------------------------------------ hand-made broken schedules */

/* A correct lowered 1F1B with 2 ranks and 2 micro-batches; the tests below
 * break one thing each. */
#define HDR "# pipewright schedule v1: kind=custom ranks=2 chunks_per_rank=1 micro_batches=2 split_w=0 buckets=0\n"
#define GOOD0 "0F0,0SF0,0F1,0SF1,0RB0,0B0,0RB1,0B1,OPT\n"
#define GOOD1 "1RF0,1F0,1B0,1SB0,1RF1,1F1,1B1,1SB1,OPT\n"

Test(schedule_broken, baseline_is_valid, .timeout = 300)
{
    pw_schedule *s = from_csv(HDR GOOD0 GOOD1);
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s", pw_last_error());
    cr_assert_eq(rep->peak_inflight[0], 2);
    cr_assert_eq(rep->peak_inflight[1], 1);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
}

Test(schedule_broken, missing_receive, .timeout = 300)
{
    expect_invalid(HDR GOOD0 "1RF0,1F0,1B0,1SB0,1F1,1B1,1SB1,OPT\n",
                   "rank 1, position 4 (F mb 1): missing receive: F needs its input from rank 0, "
                   "but no RECV_F mb 1 comes before it");
    expect_invalid(HDR "0F0,0SF0,0F1,0SF1,0RB0,0B0,0B1,OPT\n" GOOD1,
                   "rank 0, position 6 (B mb 1): missing receive: B needs the output gradient from "
                   "rank 1, but no RECV_B mb 1 comes before it");
}

Test(schedule_broken, unmatched_send, .timeout = 300)
{
    /* Rank 0 sends mb 1 forward, but rank 1 never takes it. */
    expect_invalid(HDR "0F0,0SF0,0F1,0SF1,0RB0,0B0,OPT\n"
                       "1RF0,1F0,1B0,1SB0,OPT\n",
                   "rank 0, position 3 (SEND_F mb 1 to rank 1): unmatched send: rank 1 never "
                   "receives it (no RECV_F mb 1)");
}

Test(schedule_broken, unmatched_receive, .timeout = 300)
{
    /* Rank 1 waits for mb 1, which rank 0 computes but never sends. */
    expect_invalid(HDR "0F0,0SF0,0F1,0RB0,0B0,OPT\n" GOOD1,
                   "rank 1, position 4 (RECV_F mb 1 from rank 0): unmatched receive: rank 0 "
                   "finished without sending it");
}

Test(schedule_broken, b_before_f, .timeout = 300)
{
    expect_invalid(HDR GOOD0 "1RF0,1B0,1F0,1SB0,1RF1,1F1,1B1,1SB1,OPT\n",
                   "rank 1, position 1 (B mb 0): B before its F (F mb 0 has not run)");
}

Test(schedule_broken, w_before_b, .timeout = 300)
{
    expect_invalid("0F0,0W0,0B0,OPT\n", "rank 0, position 1 (W mb 0): W before its B (B mb 0 has not run)");
}

Test(schedule_broken, cyclic_wait, .timeout = 300)
{
    /* Rank 0 wants the gradient of mb 1 before sending mb 1 forward; rank 1
     * needs mb 1 forward before it can produce that gradient. */
    expect_invalid(HDR "0F0,0SF0,0RB1,0B1,0F1,0SF1,0RB0,0B0,OPT\n"
                       "1RF0,1F0,1RF1,1F1,1B1,1SB1,1B0,1SB0,OPT\n",
                   "deadlock: rank 0 at position 2 (RECV_B mb 1 from rank 1) waits; rank 1 at "
                   "position 2 (RECV_F mb 1 from rank 0) waits");
}

Test(schedule_broken, docs_deadlock, .timeout = 300)
{
    /* The edit docs/schedules.md warns about: 0B0 right after 0F0. */
    expect_invalid("0F0,0B0,0F1,0F2,0F3,0B1,0B2,0B3,OPT\n"
                   "1F0,1F1,1F2,1B0,1F3,1B1,1B2,1B3,OPT\n"
                   "2F0,2F1,2B0,2F2,2B1,2F3,2B2,2B3,OPT\n"
                   "3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3,OPT\n",
                   "deadlock: rank 0 at position 2 (RECV_B mb 0 from rank 1) waits; rank 1 at "
                   "position 3 (RECV_F mb 1 from rank 0) waits (4 ranks blocked in all)");
}

Test(schedule_broken, cycle_among_many, .timeout = 300)
{
    /* Ranks 1 and 2 wait on each other; ranks 0 and 3 wait behind them. Only
     * the cycle is named. */
    pw_schedule *s = gen_lowered(PW_SCHEDULE_GPIPE, 4, 2, 0);
    /* Rank 1 receives the gradient of mb 1 before its first forward. */
    pw_rank_program *r1 = &s->ranks[1];
    pw_action first = r1->actions[0];
    int k = -1;
    for (int i = 0; i < r1->n_actions; i++)
        if (r1->actions[i].kind == PW_ACT_RECV_B && r1->actions[i].mb == 1) k = i;
    cr_assert_geq(k, 0);
    r1->actions[0] = r1->actions[k];
    memmove(&r1->actions[2], &r1->actions[1], (size_t)(k - 1) * sizeof(pw_action));
    r1->actions[1] = first;
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "deadlock: rank 1 at position 0 (RECV_B mb 1 from rank 2) waits; "
                                       "rank 2 at position 0 (RECV_F mb 0 from rank 1) waits"),
              "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "(4 ranks blocked in all)"), "%s", pw_last_error());
    pw_schedule_destroy(s);
}

Test(schedule_broken, duplicate_f, .timeout = 300)
{
    expect_invalid("0F0,0F0,0F1,0B0,0B1,OPT\n1F0,1B0,1F1,1B1,OPT\n",
                   "rank 0, position 2 (F mb 0): duplicate F: mb 0 already ran its F");
}

Test(schedule_broken, missing_b, .timeout = 300)
{
    expect_invalid("# pipewright schedule v1: micro_batches=2\n0F0,0F1,0B0,OPT\n",
                   "rank 0, position 3 (OPTIM): OPTIM before the last backward of chunk 0 (1 of 2 "
                   "micro-batches done)");
    expect_invalid("0F0,0B0\n", "rank 0, at the end: no OPTIM");
    expect_invalid("# pipewright schedule v1: micro_batches=2\n0F0,0B0\n",
                   "rank 0, at the end: mb 1 never runs F");
}

Test(schedule_broken, w_without_split, .timeout = 300)
{
    expect_invalid("# pipewright schedule v1: split_w=0\n0F0,0B0,0W0,OPT\n",
                   "rank 0, position 2 (W mb 0): W in a schedule that does not split W (split_w=0)");
    /* And split without W. */
    expect_invalid("# pipewright schedule v1: split_w=1\n0F0,0B0,OPT\n",
                   "OPTIM before the last backward of chunk 0 (0 of 1 micro-batches done)");
}

Test(schedule_broken, optim_rules, .timeout = 300)
{
    expect_invalid("0F0,0B0,OPT,OPT\n", "rank 0, position 3 (OPTIM): second OPTIM (once per rank)");
    expect_invalid("0F0,OPT,0B0\n", "rank 0, position 1 (OPTIM): OPTIM before the last backward");
    expect_invalid(HDR GOOD0 "1RF0,1F0,1B0,1SB0,1RF1,1F1,1B1,OPT,1SB1\n",
                   "rank 1, position 8 (SEND_B mb 1 to rank 0): action after OPTIM");
}

Test(schedule_broken, bad_messages, .timeout = 300)
{
    expect_invalid(HDR "0RF0,0F0,0SF0,0F1,0SF1,0RB0,0B0,0RB1,0B1,OPT\n" GOOD1,
                   "rank 0, position 0 (RECV_F mb 0 from no rank): RECV_F into chunk 0: the first "
                   "stage has no producer");
    expect_invalid(HDR GOOD0 "1RF0,1F0,1SF0,1B0,1SB0,1RF1,1F1,1B1,1SB1,OPT\n",
                   "rank 1, position 2 (SEND_F mb 0 to no rank): SEND_F from the last stage");
    expect_invalid(HDR "0SF0,0F0,0F1,0SF1,0RB0,0B0,0RB1,0B1,OPT\n" GOOD1,
                   "rank 0, position 0 (SEND_F mb 0 to rank 1): SEND_F before the F that produces it");
    expect_invalid(HDR "0F0,0SF0,0SF0,0F1,0SF1,0RB0,0B0,0RB1,0B1,OPT\n" GOOD1,
                   "rank 0, position 2 (SEND_F mb 0 to rank 1): duplicate SEND_F");
}

Test(schedule_broken, bad_structs, .timeout = 300)
{
    pw_schedule *s = gen_lowered(PW_SCHEDULE_1F1B, 2, 2, 0);
    pw_action saved = s->ranks[0].actions[0];
    s->ranks[0].actions[0].kind = (pw_action_kind)42;
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "rank 0, position 0 (kind 42 chunk 0 mb 0): unknown action kind 42"),
              "%s", pw_last_error());
    s->ranks[0].actions[0] = saved;
    s->ranks[0].actions[0].chunk = 1;
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "chunk 1 runs on rank 1, not on rank 0"), "%s", pw_last_error());
    s->ranks[0].actions[0] = saved;
    s->ranks[0].actions[0].mb = 7;
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "micro-batch 7 does not exist (micro-batches 0..1)"), "%s",
              pw_last_error());
    s->ranks[0].actions[0] = saved;
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK);
    pw_schedule_destroy(s);

    /* Lowering rejects what it cannot place. */
    s = gen(PW_SCHEDULE_GPIPE, 2, 2, 0, 0);
    s->ranks[1].actions[0].chunk = 9;
    cr_assert_eq(pw_schedule_lower(s), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "lowering: rank 1, position 0 (F chunk 9 mb 0): chunk 9 does not exist"),
              "%s", pw_last_error());
    cr_assert_eq(s->lowered, 0);
    pw_schedule_destroy(s);

    /* Shape fields that disagree. */
    s = gen(PW_SCHEDULE_GPIPE, 2, 2, 0, 0);
    s->n_chunks = 3;
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_ERR_INVALID_ARG);
    pw_schedule_destroy(s);
    cr_assert_eq(pw_schedule_validate(NULL, NULL), PW_ERR_INVALID_ARG);
}

/* Memory follows the actions, not the largest index (issue 13): an 11-byte
 * CSV once made the validator ask for 7.97 GB. */
Test(schedule_broken, sparse_indices_cost_no_memory, .timeout = 300)
{
    pw_schedule *s = (pw_schedule *)1;
    cr_assert_eq(pw_schedule_load_csv(PW_SOURCE_DIR "/tests/fixtures/crashes/validator-7GB-malloc.csv", &s),
                 PW_ERR_PARSE);
    cr_assert_null(s);
    cr_assert(strstr(pw_last_error(), "validator-7GB-malloc.csv:1:1: error: 1 cell cannot make a "
                     "schedule of 727 chunks x 1218365 micro-batches (each chunk runs an F for every "
                     "micro-batch); micro-batch 1218364 at line 1, column 1 sets micro_batches; chunk "
                     "726 at line 1, column 1 sets chunks_per_rank"), "%s", pw_last_error());
    expect_parse_error("# pipewright schedule v1: micro_batches=16777216\n0F0,0B0,OPT\n",
                       "bad.csv:1:1: error: 3 cells cannot make a schedule of 1 chunks x 16777216 "
                       "micro-batches (each chunk runs an F for every micro-batch)");
    expect_parse_error("# pipewright schedule v1: buckets=65536 chunks_per_rank=2\n0F0,0B0,OPT\n",
                       "2 chunks x 1 micro-batches and 65536 buckets (each chunk runs an F for every "
                       "micro-batch and an ALLREDUCE for every bucket)");

    /* A schedule built in memory with a huge shape and few actions: the
     * validator reports the first missing action without dense state for
     * 1024 chunks x 2^24 micro-batches (150 GB before). */
    s = from_csv("0F0,0B0,OPT\n");
    s->chunks_per_rank = s->n_chunks = 1024;
    s->n_micro = 1 << 24;
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "rank 0, at the end: chunk 0 mb 1 never runs F (the rank has "
                     "1 F actions for its 1024 chunks x 16777216 micro-batches)"), "%s", pw_last_error());
    s->n_micro = 1;
    s->n_buckets = 1 << 16;
    s->ranks[0].actions[1].kind = PW_ACT_F; /* 0F0, 1F0: chunk 2 is the first without */
    s->ranks[0].actions[1].chunk = 1;
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_ERR_SCHEDULE);
    cr_assert(strstr(pw_last_error(), "rank 0, at the end: chunk 2 mb 0 never runs F"), "%s",
              pw_last_error());
    pw_schedule_destroy(s);
}

/* ------------------------------------------------------ generator arguments */

Test(schedule, bad_configs, .timeout = 300)
{
    pw_schedule *s = (pw_schedule *)1;
    pw_schedule_config cfg = {.kind = PW_SCHEDULE_1F1B, .n_stages = 0, .n_micro = 4};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert_null(s);
    cr_assert(strstr(pw_last_error(), "n_stages must be in 1.."), "%s", pw_last_error());
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_CUSTOM, .n_stages = 2, .n_micro = 4};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "kind must be gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v, zb-auto or dualpipev (got custom)"),
              "%s", pw_last_error());
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_GPIPE, .n_stages = 2, .n_micro = 0};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_GPIPE, .n_stages = 2, .n_micro = 2, .split_w = 2};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_schedule_generate(NULL, &s), PW_ERR_INVALID_ARG);
    s = gen(PW_SCHEDULE_GPIPE, 2, 2, 0, 0);
    pw_schedule_checker *ck = (pw_schedule_checker *)1;
    cr_assert_eq(pw_schedule_checker_create(s, 2, 0, &ck), PW_ERR_INVALID_ARG);
    cr_assert_null(ck);
    cr_assert(strstr(pw_last_error(), "rank 2 out of range (0..1)"), "%s", pw_last_error());
    pw_schedule_destroy(s);
    pw_schedule_destroy(NULL);
    pw_schedule_report_destroy(NULL);
    pw_schedule_checker_destroy(NULL);
}

Test(schedule, names_and_theory, .timeout = 300)
{
    pw_schedule_kind k;
    cr_assert_eq(pw_schedule_kind_parse("1F1B", &k), PW_OK);
    cr_assert_eq(k, PW_SCHEDULE_1F1B);
    cr_assert_eq(pw_schedule_kind_parse("gpipe", &k), PW_OK);
    cr_assert_eq(k, PW_SCHEDULE_GPIPE);
    cr_assert_eq(pw_schedule_kind_parse("pipedream-flush", &k), PW_OK);
    cr_assert_eq(k, PW_SCHEDULE_1F1B);
    cr_assert_eq(pw_schedule_kind_parse("zb", &k), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "unknown schedule 'zb'"));
    cr_assert_str_eq(pw_action_kind_name(PW_ACT_RECV_B), "RECV_B");
    cr_assert_str_eq(pw_action_kind_name((pw_action_kind)99), "?");
    char buf[32];
    pw_action a = {PW_ACT_SEND_B, 12, 7};
    cr_assert_eq(pw_action_format(&a, 1, buf, sizeof buf), 5);
    cr_assert_str_eq(buf, "12SB7");
    a = (pw_action){PW_ACT_ALLREDUCE, 3, 1};
    pw_action_format(&a, 1, buf, sizeof buf);
    cr_assert_str_eq(buf, "AR1");
    pw_action_format(&a, 0, buf, sizeof buf);
    cr_assert_str_eq(buf, "3AR1");
    cr_assert_float_eq(pw_schedule_theoretical_bubble(PW_SCHEDULE_GPIPE, 4, 8), 3.0 / 11.0, 1e-15);
    cr_assert_float_eq(pw_schedule_theoretical_bubble(PW_SCHEDULE_1F1B, 1, 8), 0.0, 1e-15);
    cr_assert_eq(pw_schedule_theoretical_bubble(PW_SCHEDULE_CUSTOM, 4, 8), -1.0);
    cr_assert_eq(pw_schedule_theoretical_peak(PW_SCHEDULE_1F1B, 4, 8, 1), 3);
    cr_assert_eq(pw_schedule_theoretical_peak(PW_SCHEDULE_1F1B, 4, 2, 0), 2);
    cr_assert_eq(pw_schedule_theoretical_peak(PW_SCHEDULE_GPIPE, 4, 8, 3), 8);
    cr_assert_eq(pw_schedule_theoretical_peak(PW_SCHEDULE_GPIPE, 4, 8, 4), -1);
}

/* ----------------------------------------------------------------- CSV */

Test(schedule_csv, malformed_cells, .timeout = 300)
{
    expect_parse_error("0F0,0X3,OPT\n", "bad.csv:1:6: error: malformed cell '0X3': unknown action 'X'");
    expect_parse_error("0F0,0B0,OPT\n\n  0F0, F3\n", "bad.csv:3:8: error: malformed cell 'F3': missing chunk number before 'F'");
    expect_parse_error("0F0,0F,OPT\n", "bad.csv:1:7: error: malformed cell '0F': missing micro-batch number after 'F'");
    expect_parse_error("0F0,0F3x\n", "bad.csv:1:8: error: malformed cell '0F3x': unexpected 'x'");
    expect_parse_error("0F0,0F99999999999\n", "bad.csv:1:7: error: number too large in cell '0F99999999999'");
    expect_parse_error("0F0,0 F1\n", "bad.csv:1:6: error: malformed cell '0 F1': expected an action letter");
    expect_parse_error("0F0,0OPT1\n", "bad.csv:1:5: error: malformed cell '0OPT1': OPT takes no chunk or number");
    expect_parse_error("0F0,0B0,OPT\r\n0F0;0B0\r\n", "bad.csv:2:4: error: malformed cell '0F0;0B0': unexpected ';'");
    expect_parse_error("0F0,0AR\n", "bad.csv:1:8: error: malformed cell '0AR': missing bucket number after 'AR'");
}

Test(schedule_csv, bad_rank_or_chunk, .timeout = 300)
{
    expect_parse_error("0F0,1F0,OPT\n1F0,1B0,OPT\n",
                       "bad.csv:1:5: error: chunk 1 runs on rank 1 (chunk mod 2), but this row is rank 0");
    expect_parse_error("# pipewright schedule v1: ranks=2 chunks_per_rank=1\n0F0,0B0,OPT\n1F0,3B0,OPT\n",
                       "bad.csv:3:5: error: chunk 3 does not exist (2 ranks x 1 chunks per rank: chunks 0..1)");
    expect_parse_error("# pipewright schedule v1: ranks=3\n0F0,0B0,OPT\n1F0,1B0,OPT\n",
                       "bad.csv:1:27: error: header says ranks=3 but there are 2 rows");
    expect_parse_error("# pipewright schedule v1: micro_batches=2\n0F0,0B2,OPT\n",
                       "bad.csv:2:5: error: micro-batch 2 out of range (micro_batches=2)");
    expect_parse_error("# pipewright schedule v1: chunks_per_rank=2\n0F0,AR0,OPT\n1F0,OPT\n",
                       "bad.csv:2:5: error: 'AR0' names no chunk, but ranks hold 2 chunks each");
}

Test(schedule_csv, bad_headers, .timeout = 300)
{
    expect_parse_error("# pipewright schedule v1: stages=4\n0F0\n",
                       "bad.csv:1:27: error: header: unknown key 'stages'");
    expect_parse_error("# pipewright schedule v2: ranks=1\n0F0\n",
                       "bad.csv:1:23: error: unsupported schedule format version 'v2'");
    expect_parse_error("# pipewright schedule v1: split_w=yes\n0F0\n",
                       "bad.csv:1:27: error: header: split_w must be a number in 0..1 (got 'yes')");
    expect_parse_error("# pipewright schedule v1: kind=zb\n0F0\n",
                       "bad.csv:1:27: error: header: unknown kind 'zb'");
    expect_parse_error("0F0,0B0,OPT\n# pipewright schedule v1: ranks=1\n",
                       "bad.csv:2:1: error: the header must come before the first row");
    expect_parse_error("# just a comment\n\n", "bad.csv:1:1: error: no schedule rows");
    expect_parse_error("", "bad.csv:1:1: error: no schedule rows");
    expect_parse_error("OPT\n", "no cell names a micro-batch");
}

Test(schedule_csv, lenient_forms, .timeout = 300)
{
    /* Comments, blank lines, spaces, empty cells, lower case, CRLF, AR<b>. */
    const char *text = "# my schedule\n"
                       "\n"
                       "  0f0 , 0SF0, 0f1,0sf1 ,0rb0,0B0,0RB1,0B1,ar0,opt,,,\r\n"
                       "1RF0,1F0,1B0,1SB0,1RF1,1F1,1B1,1SB1,AR0,OPT\r\n";
    pw_schedule *s = from_csv(text);
    cr_assert_eq(s->kind, PW_SCHEDULE_CUSTOM);
    cr_assert_eq(s->n_ranks, 2);
    cr_assert_eq(s->n_micro, 2);
    cr_assert_eq(s->n_buckets, 1);
    cr_assert_eq(s->split_w, 0);
    cr_assert_eq(s->lowered, 1);
    cr_assert_eq(s->ranks[0].n_actions, 10);
    cr_assert_eq(s->ranks[0].actions[8].kind, PW_ACT_ALLREDUCE);
    cr_assert_eq(s->ranks[0].actions[8].chunk, 0);
    cr_assert_eq(s->ranks[1].actions[8].chunk, 1);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    pw_schedule_destroy(s);
}

Test(schedule_csv, compute_only_is_lowered, .timeout = 300)
{
    pw_schedule *s = from_csv("0F0,0F1,0B0,0B1,OPT\n1F0,1B0,1F1,1B1,OPT\n");
    cr_assert_eq(s->lowered, 1);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    pw_schedule *g = gen_lowered(PW_SCHEDULE_1F1B, 2, 2, 0);
    g->kind = PW_SCHEDULE_CUSTOM;
    cr_assert(pw_schedule_equal(s, g));
    pw_schedule_destroy(g);
    pw_schedule_destroy(s);
}

/* Two ranks, two chunks each (chunk c on rank c mod 2): the IR, lowering and
 * validator handle interleaved placements; local hand-overs need no message. */
Test(schedule_csv, interleaved_chunks, .timeout = 300)
{
    const char *text = "0F0,0F1,2F0,2F1,2B0,2B1,0B0,0B1,OPT\n"
                       "1F0,1F1,3F0,3F1,3B0,3B1,1B0,1B1,OPT\n";
    pw_schedule *s = from_csv(text);
    cr_assert_eq(s->chunks_per_rank, 2);
    cr_assert_eq(s->n_chunks, 4);
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s", pw_last_error());
    cr_assert_eq(rep->peak_inflight[0], 4);
    cr_assert_eq(rep->peak_inflight[1], 4);
    for (int c = 0; c < 4; c++) cr_assert_eq(rep->peak_inflight_chunk[c], 2);
    cr_assert_eq(rep->n_messages, 2 * 2 * 3);
    char *csv = to_csv(s, NULL);
    cr_assert(strstr(csv, "chunks_per_rank=2"));
    cr_assert(strstr(csv, "0F0,0SF0,0F1,0SF1,2RF0,2F0,"), "%s", csv);
    pw_schedule *back = from_csv(csv);
    cr_assert(pw_schedule_equal(s, back));
    pw_schedule_destroy(back);
    free(csv);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);

    /* A message between chunks of one rank is wrong. */
    expect_invalid("# pipewright schedule v1: chunks_per_rank=2\n"
                   "0F0,0SF0,1F0,1B0,0B0,OPT\n",
                   "rank 0, position 1 (SEND_F chunk 0 mb 0 to rank 0): chunk 1 runs on this rank "
                   "too: the hand-over is local, not a message");
}

Test(schedule_csv, load_and_save, .timeout = 300)
{
    char path[512];
    snprintf(path, sizeof path, "%s/test_schedule_%d.csv", PW_BINARY_DIR, (int)getpid());
    pw_schedule *s = gen_lowered(PW_SCHEDULE_GPIPE, 3, 5, 1);
    cr_assert_eq(pw_schedule_save_csv(s, path), PW_OK, "%s", pw_last_error());
    pw_schedule *back = NULL;
    cr_assert_eq(pw_schedule_load_csv(path, &back), PW_OK, "%s", pw_last_error());
    cr_assert(pw_schedule_equal(s, back));
    remove(path);
    pw_schedule_destroy(back);
    pw_schedule_destroy(s);
    back = (pw_schedule *)1;
    cr_assert_eq(pw_schedule_load_csv("/nonexistent/x.csv", &back), PW_ERR_IO);
    cr_assert_null(back);
    cr_assert(strstr(pw_last_error(), "/nonexistent/x.csv: No such file"), "%s", pw_last_error());
}

/* Every ```csv block in docs/schedules.md parses and validates, so the
 * examples a user copies keep working. */
Test(schedule_csv, docs_examples, .timeout = 300)
{
    char path[512];
    snprintf(path, sizeof path, "%s/docs/schedules.md", PW_SOURCE_DIR);
    FILE *f = fopen(path, "rb");
    cr_assert(f, "cannot open %s", path);
    static char doc[1 << 17];
    size_t n = fread(doc, 1, sizeof doc - 1, f);
    fclose(f);
    doc[n] = '\0';
    int blocks = 0;
    for (char *p = strstr(doc, "```csv\n"); p; p = strstr(p, "```csv\n")) {
        p += strlen("```csv\n");
        char *end = strstr(p, "```");
        cr_assert(end);
        pw_schedule *s = NULL;
        cr_assert_eq(pw_schedule_parse_csv(p, (size_t)(end - p), "docs/schedules.md", &s), PW_OK,
                     "%s", pw_last_error());
        cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "docs example %d: %s", blocks,
                     pw_last_error());
        pw_schedule_destroy(s);
        blocks++;
        p = end + 3;
    }
    cr_assert_geq(blocks, 2, "docs/schedules.md should hold CSV examples");
}

/* --------------------------------------------------------------- printing */

Test(schedule, print_timeline, .timeout = 300)
{
    pw_schedule *s = gen_lowered(PW_SCHEDULE_1F1B, 4, 8, 0);
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    cr_assert_eq(pw_schedule_print(s, f), PW_OK);
    fclose(f);
    cr_assert(strstr(buf, "1f1b: 4 ranks, 8 micro-batches; unit-cost makespan 22, bubble 27.3% (theory 27.3%)\n"),
              "%s", buf);
    cr_assert(strstr(buf, "rank 0 | F0 F1 F2 F3 .. .. .. B0 F4 B1 F5 B2 F6 B3 F7 B4 .. B5 .. B6 .. B7\n"),
              "%s", buf);
    cr_assert(strstr(buf, "rank 3 | .. .. .. F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 .. .. ..\n"),
              "%s", buf);
    free(buf);
    pw_schedule_destroy(s);

    /* A broken schedule prints its lists under the reason. */
    s = from_csv("0B0,0F0,OPT\n");
    buf = NULL;
    f = open_memstream(&buf, &n);
    cr_assert_eq(pw_schedule_print(s, f), PW_OK);
    fclose(f);
    cr_assert(strstr(buf, "(no timeline: rank 0, position 0 (B mb 0): B before its F"), "%s", buf);
    cr_assert(strstr(buf, "rank 0: 0B0 0F0 OPT\n"), "%s", buf);
    free(buf);
    pw_schedule_destroy(s);
}

/* ------------------------------------- interleaved and zero-bubble schedules */

typedef struct new_param {
    pw_schedule_kind kind;
    int v;        /* chunks_per_rank asked for (0: the kind's default) */
    int stages;
} new_param;

ParameterizedTestParameters(schedule_new, generated)
{
    static new_param params[8 * 8];
    static const new_param kinds[] = {
        {PW_SCHEDULE_INTERLEAVED, 2, 0}, {PW_SCHEDULE_INTERLEAVED, 3, 0},
        {PW_SCHEDULE_INTERLEAVED, 4, 0}, {PW_SCHEDULE_ZB_H1, 0, 0},
        {PW_SCHEDULE_ZB_H2, 0, 0},       {PW_SCHEDULE_ZB_V, 0, 0},
        {PW_SCHEDULE_ZB_AUTO, 0, 0},     {PW_SCHEDULE_DUALPIPE_V, 0, 0},
    };
    int n = 0;
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++)
        for (int S = 1; S <= 8; S++) params[n++] = (new_param){kinds[k].kind, kinds[k].v, S};
    return cr_make_param_array(new_param, params, (size_t)n);
}

/* The published peak activation memory of rank 0, in stage units (one
 * micro-batch's activations of a whole stage), once m is large enough for
 * the schedule to reach it; -1 when m is too small. */
static double published_peak(pw_schedule_kind kind, int S, int v, int M)
{
    switch (kind) {
    case PW_SCHEDULE_ZB_H1: return M >= S ? S : -1;               /* as 1F1B: p */
    case PW_SCHEDULE_ZB_H2: return M >= 2 * S - 1 ? 2 * S - 1 : -1; /* 2p - 1 */
    case PW_SCHEDULE_ZB_V: return M >= 2 * S - 1 ? S : -1;          /* p */
    case PW_SCHEDULE_ZB_AUTO: return M == 1 << 20 ? 2 * S : -1;     /* a bound only: its limit, 2p */
    case PW_SCHEDULE_DUALPIPE_V: return M >= 2 * S ? S + 0.5 : -1;  /* DeepSeek: PP + 1 chunks, PP = 2p */
    case PW_SCHEDULE_INTERLEAVED:
        /* Korthikanti et al. 2022, §4.2: the first stage holds p(1 + (p-1)/(pv)). */
        return S == 1 || M >= 2 * S ? S + (double)(S - 1) / v : -1;
    default: return -1;
    }
}

/* Every interleaved and zero-bubble schedule of 1..8 stages and 1..16, p, 2p,
 * 4p micro-batches (interleaved: multiples of p; dualpipev: 2p and more, the
 * others refused) lowers, validates, has the
 * closed-form peaks and bubble, the published memory, round-trips through
 * CSV, and passes the run-time checker at its own bound. */
ParameterizedTest(new_param *p, schedule_new, generated, .timeout = 300)
{
    const int S = p->stages;
    const char *name = pw_schedule_kind_name(p->kind);
    int Ms[19], nM = 0;
    for (int M = 1; M <= 16; M++) Ms[nM++] = M;
    Ms[nM++] = 2 * S > 16 ? 2 * S : 17;
    Ms[nM++] = 4 * S > 16 ? 4 * S : 18;
    Ms[nM++] = 20 + S;
    int tested = 0;
    for (int i = 0; i < nM; i++) {
        const int M = Ms[i];
        pw_schedule_config cfg = {.kind = p->kind, .n_stages = S, .n_micro = M, .chunks_per_rank = p->v};
        pw_schedule *compute = NULL;
        pw_status st = pw_schedule_generate(&cfg, &compute);
        if (p->kind == PW_SCHEDULE_INTERLEAVED && M % S != 0) {
            cr_assert_eq(st, PW_ERR_INVALID_ARG);
            cr_assert(strstr(pw_last_error(), "needs n_micro to be a multiple of n_stages"), "%s",
                      pw_last_error());
            continue;
        }
        if (p->kind == PW_SCHEDULE_DUALPIPE_V && M < 2 * S) {
            cr_assert_eq(st, PW_ERR_INVALID_ARG, "dualpipev S=%d M=%d", S, M);
            cr_assert_null(compute);
            cr_assert(strstr(pw_last_error(), "dualpipev needs n_micro >= 2 x n_stages"), "%s",
                      pw_last_error());
            cr_assert_eq(pw_schedule_config_bubble(&cfg), -1.0);
            cr_assert_eq(pw_schedule_config_peak(&cfg, 0), -1);
            continue;
        }
        cr_assert_eq(st, PW_OK, "%s S=%d M=%d: %s", name, S, M, pw_last_error());
        tested++;
        const int v = compute->chunks_per_rank, C = compute->n_chunks;
        const int is_v = p->kind == PW_SCHEDULE_ZB_V || p->kind == PW_SCHEDULE_DUALPIPE_V;
        cr_assert_eq(v, is_v ? 2 : p->v ? p->v : 1);
        cr_assert_eq(compute->split_w, p->kind != PW_SCHEDULE_INTERLEAVED);
        /* (With one rank the V placement is the looping one, stored as NULL.) */
        cr_assert_eq(compute->chunk_rank == NULL, !is_v || S == 1);
        for (int c = 0; c < C; c++) {
            int want = !is_v ? c % S : c < S ? c : 2 * S - 1 - c;
            cr_assert_eq(pw_schedule_rank_of(compute, c), want, "%s S=%d chunk %d", name, S, c);
        }
        cr_assert_eq(pw_schedule_rank_of(compute, C), -1);
        for (int r = 0; r < S; r++) {
            const pw_rank_program *rp = &compute->ranks[r];
            cr_assert_eq(rp->n_actions, v * M * (2 + compute->split_w) + 1, "%s S=%d M=%d rank %d",
                         name, S, M, r);
            cr_assert_eq(rp->actions[rp->n_actions - 1].kind, PW_ACT_OPTIM);
        }

        pw_schedule *s = NULL;
        cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_OK);
        cr_assert_eq(pw_schedule_lower(s), PW_OK, "%s", pw_last_error());
        pw_schedule_report *rep = NULL;
        cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s S=%d M=%d: %s", name, S, M,
                     pw_last_error());
        for (int r = 0; r < S; r++) {
            int want = pw_schedule_config_peak(&cfg, r);
            cr_assert_eq(rep->peak_inflight[r], want, "%s S=%d M=%d rank %d: peak %d, closed form %d",
                         name, S, M, r, rep->peak_inflight[r], want);
            cr_assert_float_eq(rep->peak_stages[r], (double)want / v, 1e-12);
        }
        /* The published memory, in stage units; never above it. */
        double pub = published_peak(p->kind, S, v, M);
        double bound = published_peak(p->kind, S, v, 1 << 20);
        for (int r = 0; r < S; r++)
            cr_assert_leq(rep->peak_stages[r], bound + 1e-12, "%s S=%d M=%d rank %d: %g stages",
                          name, S, M, r, rep->peak_stages[r]);
        if (pub >= 0)
            cr_assert_float_eq(rep->peak_stages[0], pub, 1e-12, "%s S=%d M=%d: rank 0 holds %g "
                               "stages, published %g", name, S, M, rep->peak_stages[0], pub);
        /* Unit-cost bubble: the closed form, exactly. */
        double theory = pw_schedule_config_bubble(&cfg);
        cr_assert_float_eq(rep->bubble, theory, 1e-12, "%s S=%d M=%d: bubble %g, theory %g", name,
                           S, M, rep->bubble, theory);
        if (p->kind != PW_SCHEDULE_INTERLEAVED)
            cr_assert_float_eq(pw_schedule_theoretical_bubble(p->kind, S, M), theory, 1e-15);
        /* Messages: two per micro-batch over every boundary between ranks. */
        int remote = 0;
        for (int c = 0; c + 1 < C; c++) remote += pw_schedule_rank_of(s, c) != pw_schedule_rank_of(s, c + 1);
        cr_assert_eq(rep->n_messages, 2 * (int64_t)M * remote);

        /* Lowering is idempotent; CSV reads back equal and rewrites the same
         * bytes; compute-only CSV reads back lowered. */
        pw_schedule *again = NULL;
        cr_assert_eq(pw_schedule_generate(&cfg, &again), PW_OK);
        cr_assert_eq(pw_schedule_lower(again), PW_OK);
        cr_assert_eq(pw_schedule_lower(again), PW_OK);
        cr_assert(pw_schedule_equal(s, again));
        pw_schedule_destroy(again);
        size_t len1, len2;
        char *csv1 = to_csv(s, &len1);
        char head[160];
        snprintf(head, sizeof head, "kind=%s ranks=%d chunks_per_rank=%d micro_batches=%d", name, S,
                 v, M);
        cr_assert(strstr(csv1, head), "%s", csv1);
        cr_assert_eq(strstr(csv1, "placement=v\n") != NULL, is_v && S > 1);
        pw_schedule *back = from_csv(csv1);
        cr_assert(pw_schedule_equal(s, back), "%s S=%d M=%d: CSV round trip differs", name, S, M);
        char *csv2 = to_csv(back, &len2);
        cr_assert_eq(len1, len2);
        cr_assert_eq(memcmp(csv1, csv2, len1), 0);
        char *csv3 = to_csv(compute, NULL);
        pw_schedule *back3 = from_csv(csv3);
        cr_assert(pw_schedule_equal(s, back3), "%s S=%d M=%d: compute-only CSV", name, S, M);

        /* Run-time checker at the validator's bound, and one below. */
        for (int r = 0; r < S; r++) {
            pw_schedule_checker *ck = NULL;
            cr_assert_eq(pw_schedule_checker_create(s, r, rep->peak_inflight[r], &ck), PW_OK);
            for (int k = 0; k < s->ranks[r].n_actions; k++)
                cr_assert_eq(pw_schedule_checker_step(ck, &s->ranks[r].actions[k]), PW_OK, "%s",
                             pw_last_error());
            cr_assert_eq(pw_schedule_checker_finish(ck), PW_OK, "%s", pw_last_error());
            pw_schedule_checker_destroy(ck);
            if (rep->peak_inflight[r] > 1) {
                cr_assert_eq(pw_schedule_checker_create(s, r, rep->peak_inflight[r] - 1, &ck), PW_OK);
                st = PW_OK;
                for (int k = 0; k < s->ranks[r].n_actions && st == PW_OK; k++)
                    st = pw_schedule_checker_step(ck, &s->ranks[r].actions[k]);
                cr_assert_eq(st, PW_ERR_SCHEDULE);
                pw_schedule_checker_destroy(ck);
            }
        }
        free(csv1);
        free(csv2);
        free(csv3);
        pw_schedule_destroy(back);
        pw_schedule_destroy(back3);
        pw_schedule_report_destroy(rep);
        pw_schedule_destroy(s);
        pw_schedule_destroy(compute);
    }
    cr_assert_geq(tested, 3);
}

static pw_schedule *gen_cfg(pw_schedule_kind kind, int S, int M, int v, int buckets)
{
    pw_schedule_config cfg = {
        .kind = kind, .n_stages = S, .n_micro = M, .chunks_per_rank = v, .n_buckets = buckets,
    };
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_OK, "%s", pw_last_error());
    return s;
}

/* The compute cells of one rank with their chunks ("0F0,4F0,..."). */
static void compute_row_chunks(const pw_schedule *s, int r, char *buf, size_t n)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < s->ranks[r].n_actions; i++) {
        const pw_action *a = &s->ranks[r].actions[i];
        if (a->kind == PW_ACT_OPTIM) continue;
        char cell[32];
        pw_action_format(a, 0, cell, sizeof cell);
        used += (size_t)snprintf(buf + used, n - used, "%s%s", used ? "," : "", cell);
    }
}

Test(schedule_new, interleaved_order, .timeout = 300)
{
    char row[2048];
    /* Megatron: warm-up 2(p-r-1) + (v-1)p forwards, chunks in groups of p. */
    pw_schedule *s = gen_cfg(PW_SCHEDULE_INTERLEAVED, 2, 4, 2, 0);
    compute_row_chunks(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,2F0,2F1,0F2,2B0,0F3,2B1,2F2,0B0,2F3,0B1,2B2,2B3,0B2,0B3");
    compute_row_chunks(s, 1, row, sizeof row);
    cr_assert_str_eq(row, "1F0,1F1,3F0,3B0,3F1,3B1,1F2,1B0,1F3,1B1,3F2,3B2,3F3,3B3,1B2,1B3");
    pw_schedule_destroy(s);
    s = gen_cfg(PW_SCHEDULE_INTERLEAVED, 4, 8, 2, 0);
    compute_row_chunks(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,0F2,0F3,4F0,4F1,4F2,4F3,0F4,0F5,0F6,4B0,0F7,4B1,4F4,4B2,4F5,4B3,"
                          "4F6,0B0,4F7,0B1,0B2,0B3,4B4,4B5,4B6,4B7,0B4,0B5,0B6,0B7");
    compute_row_chunks(s, 3, row, sizeof row);
    cr_assert_str_eq(row, "3F0,3F1,3F2,3F3,7F0,7B0,7F1,7B1,7F2,7B2,7F3,7B3,3F4,3B0,3F5,3B1,3F6,3B2,"
                          "3F7,3B3,7F4,7B4,7F5,7B5,7F6,7B6,7F7,7B7,3B4,3B5,3B6,3B7");
    pw_schedule_destroy(s);
    /* All-reduce buckets right after each chunk's last backward. */
    s = gen_cfg(PW_SCHEDULE_INTERLEAVED, 2, 2, 2, 1);
    compute_row_chunks(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,2F0,2F1,2B0,2B1,2AR0,0B0,0B1,0AR0");
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    pw_schedule_destroy(s);
}

Test(schedule_new, zero_bubble_orders, .timeout = 300)
{
    char row[2048];
    /* ZB-H1: 1F1B's F and B; rank r holds back r W passes to the end. */
    pw_schedule *s = gen_cfg(PW_SCHEDULE_ZB_H1, 4, 8, 0, 0);
    compute_row(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,0F2,0F3,0B0,0W0,0F4,0B1,0W1,0F5,0B2,0W2,0F6,0B3,0W3,0F7,0B4,0W4,"
                          "0B5,0W5,0B6,0W6,0B7,0W7");
    compute_row(s, 3, row, sizeof row);
    cr_assert_str_eq(row, "3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3,3W0,3F4,3B4,3W1,3F5,3B5,3W2,3F6,3B6,3W3,"
                          "3F7,3B7,3W4,3W5,3W6,3W7");
    pw_schedule_destroy(s);
    /* ZB-H2: 2(p-r)-1 warm-up forwards; W where nothing else is ready. */
    s = gen_cfg(PW_SCHEDULE_ZB_H2, 4, 8, 0, 0);
    compute_row(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,0F2,0F3,0F4,0F5,0F6,0B0,0W0,0B1,0F7,0B2,0W1,0B3,0W2,0B4,0W3,0B5,"
                          "0W4,0B6,0W5,0W6,0B7,0W7");
    compute_row(s, 3, row, sizeof row);
    cr_assert_str_eq(row, "3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3,3F4,3B4,3F5,3B5,3F6,3B6,3W0,3F7,3B7,3W1,"
                          "3W2,3W3,3W4,3W5,3W6,3W7");
    pw_schedule_destroy(s);
    /* ZB-V: rank 0 holds chunks 0 (down) and 7 (up); rank 3 chunks 3 and 4. */
    s = gen_cfg(PW_SCHEDULE_ZB_V, 4, 8, 0, 0);
    compute_row_chunks(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,0F2,0F3,0F4,0F5,0F6,7F0,7B0,7W0,7F1,7B1,7W1,7F2,7B2,7W2,7F3,7B3,"
                          "7W3,0F7,0B0,0W0,7F4,7B4,7W4,0B1,0W1,7F5,7B5,7W5,0B2,0W2,7F6,7B6,7W6,0B3,"
                          "0W3,7F7,7B7,7W7,0B4,0W4,0B5,0W5,0B6,0W6,0B7,0W7");
    compute_row_chunks(s, 3, row, sizeof row);
    cr_assert_str_eq(row, "3F0,4F0,3F1,4F1,3F2,4F2,3F3,4F3,4B0,4W0,3F4,3B0,3W0,4F4,4B1,4W1,3F5,3B1,"
                          "3W1,4F5,4B2,4W2,3F6,3B2,3W2,4F6,4B3,4W3,3F7,3B3,3W3,4F7,4B4,4W4,3B4,4B5,"
                          "3B5,4B6,3B6,4B7,3B7,3W4,4W5,4W6,4W7,3W5,3W6,3W7");
    /* Chunks 3 and 4 meet on rank 3: a local hand-over, no message. */
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    char *csv = to_csv(s, NULL);
    cr_assert(strstr(csv, "\n3RF0,3F0,4F0,4SF0,"), "%s", csv);
    free(csv);
    pw_schedule_destroy(s);
    /* Buckets: after each chunk's last W. */
    s = gen_cfg(PW_SCHEDULE_ZB_V, 1, 1, 0, 2);
    compute_row_chunks(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,1F0,1B0,1W0,1AR0,1AR1,0B0,0W0,0AR0,0AR1");
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    pw_schedule_destroy(s);
}

/* DualPipeV against DeepSeek's eight phases (dualpipev.py), written out by
 * hand from the reference for each rank: q = p-r-1; an "F&B" pair is its F
 * then its B; a full backward is B then W; from the middle of phase 6 on a
 * W waits in a FIFO that phases 3, 7 and 8 pop. */
Test(schedule_new, dualpipev_order, .timeout = 300)
{
    char row[2048];
    pw_schedule *s = gen_cfg(PW_SCHEDULE_DUALPIPE_V, 2, 4, 0, 0);
    compute_row_chunks(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,0F1,"                    /* 1: 2q F down */
                          "0F2,3F0,"                    /* 2: r+1 pairs F down, F up */
                          "3B0,3W0,3F1,"                /* 3: q x B up, W popped, F up */
                          "0F3,3B1,3W1,3F2,0B0,0W0,"    /* 4: m-2p+r+1 x (F0&B1, F1&B0) */
                          "3B2,3W2,3F3,0B1,0W1,"        /* 5: q x B up, F1&B0 */
                          "3B3,3W3,0B2,"                /* 6: even rank: W waits from B down */
                          "0W2,0B3,"                    /* 7: q x W popped, B down (W waits) */
                          "0W3");                       /* 8: r+1 W popped */
    compute_row_chunks(s, 1, row, sizeof row);
    cr_assert_str_eq(row, "1F0,2F0,1F1,2F1,"            /* 2 */
                          "1F2,2B0,2W0,2F2,1B0,1W0,1F3,2B1,2W1,2F3,1B1,1W1," /* 4 */
                          "2B2,2W2,1B2,1W2,2B3,1B3,"    /* 6: odd rank: W waits from round (r+1)/2 */
                          "2W3,1W3");                   /* 8 */
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    pw_schedule_destroy(s);
    /* p = 3, the last rank: phase 6 switches in the middle of round 1. */
    s = gen_cfg(PW_SCHEDULE_DUALPIPE_V, 3, 6, 0, 0);
    compute_row_chunks(s, 2, row, sizeof row);
    cr_assert_str_eq(row, "2F0,3F0,2F1,3F1,2F2,3F2,"
                          "2F3,3B0,3W0,3F3,2B0,2W0,2F4,3B1,3W1,3F4,2B1,2W1,2F5,3B2,3W2,3F5,2B2,2W2,"
                          "3B3,3W3,2B3,2W3,3B4,3W4,2B4,3B5,2B5,"
                          "2W4,3W5,2W5");
    /* Chunks 2 and 3 meet on rank 2: a local hand-over, no message. */
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    char *csv = to_csv(s, NULL);
    cr_assert(strstr(csv, "kind=dualpipev ranks=3 chunks_per_rank=2 micro_batches=6 split_w=1 "
                          "buckets=0 placement=v\n"), "%s", csv);
    cr_assert(strstr(csv, "\n2RF0,2F0,3F0,3SF0,"), "%s", csv);
    free(csv);
    pw_schedule_destroy(s);
    /* Buckets: after each chunk's last W, wherever the FIFO put it. */
    s = gen_cfg(PW_SCHEDULE_DUALPIPE_V, 1, 2, 0, 2);
    compute_row_chunks(s, 0, row, sizeof row);
    cr_assert_str_eq(row, "0F0,1F0,0F1,1B0,1W0,1F1,0B0,0W0,1B1,1W1,1AR0,1AR1,0B1,0W1,0AR0,0AR1");
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    pw_schedule_destroy(s);
    s = gen_cfg(PW_SCHEDULE_DUALPIPE_V, 4, 8, 0, 3);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s", pw_last_error());
    for (int r = 0; r < 4; r++) cr_assert_eq(rep->peak_inflight[r], 9, "rank %d", r);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
}

Test(schedule_new, print_zero_bubble, .timeout = 300)
{
    pw_schedule *s = gen_cfg(PW_SCHEDULE_ZB_H1, 4, 8, 0, 0);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    cr_assert_eq(pw_schedule_print(s, f), PW_OK);
    fclose(f);
    cr_assert(strstr(buf, "zb-h1: 4 ranks, 8 micro-batches, split W; unit-cost makespan 27, bubble "
                          "11.1% (theory 11.1%)\n"), "%s", buf);
    cr_assert(strstr(buf, "rank 0 | F0 F1 F2 F3 .. .. .. B0 W0 F4 B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 "
                          "B5 W5 B6 W6 B7 W7\n"), "%s", buf);
    free(buf);
    pw_schedule_destroy(s);
    s = gen_cfg(PW_SCHEDULE_ZB_V, 2, 3, 0, 0);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    buf = NULL;
    f = open_memstream(&buf, &n);
    cr_assert_eq(pw_schedule_print(s, f), PW_OK);
    fclose(f);
    cr_assert(strstr(buf, "zb-v: 2 ranks x 2 chunks (V placement), 3 micro-batches, split W; "
                          "unit-cost makespan 19, bubble 5.3% (theory 5.3%)\n"), "%s", buf);
    free(buf);
    pw_schedule_destroy(s);
    s = gen_cfg(PW_SCHEDULE_DUALPIPE_V, 2, 4, 0, 0);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    buf = NULL;
    f = open_memstream(&buf, &n);
    cr_assert_eq(pw_schedule_print(s, f), PW_OK);
    fclose(f);
    cr_assert(strstr(buf, "dualpipev: 2 ranks x 2 chunks (V placement), 4 micro-batches, split W; "
                          "unit-cost makespan 25, bubble 4.0% (theory 4.0%)\n"), "%s", buf);
    free(buf);
    pw_schedule_destroy(s);
}

Test(schedule_new, bad_configs, .timeout = 300)
{
    pw_schedule *s = (pw_schedule *)1;
    pw_schedule_config cfg = {.kind = PW_SCHEDULE_INTERLEAVED, .n_stages = 4, .n_micro = 6};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert_null(s);
    cr_assert(strstr(pw_last_error(), "schedule config: interleaved 1F1B needs n_micro to be a "
                                      "multiple of n_stages, as Megatron-LM does"), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "got n_micro=6 with n_stages=4; use 4 or 8"), "%s", pw_last_error());
    cfg.n_micro = 3;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "got n_micro=3 with n_stages=4; use 4"), "%s", pw_last_error());
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_INTERLEAVED, .n_stages = 2, .n_micro = 4,
                               .chunks_per_rank = 1};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "interleaved needs chunks_per_rank in 2..1024 (got 1; with one "
                                      "chunk per rank use 1f1b)"), "%s", pw_last_error());
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_ZB_V, .n_stages = 2, .n_micro = 4,
                               .chunks_per_rank = 3};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "zb-v has exactly 2 chunks per rank (got chunks_per_rank=3)"),
              "%s", pw_last_error());
    cfg.kind = PW_SCHEDULE_DUALPIPE_V;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "dualpipev has exactly 2 chunks per rank (got chunks_per_rank=3)"),
              "%s", pw_last_error());
    /* DualPipeV takes DeepSeek's m >= 2p, nothing less. */
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_DUALPIPE_V, .n_stages = 4, .n_micro = 7};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert_null(s);
    cr_assert(strstr(pw_last_error(), "schedule config: dualpipev needs n_micro >= 2 x n_stages (one "
                                      "micro-batch per chunk), as DeepSeek's DualPipeV does: got "
                                      "n_micro=7 with n_stages=4; use 8 or more"), "%s", pw_last_error());
    cr_assert_eq(pw_schedule_theoretical_bubble(PW_SCHEDULE_DUALPIPE_V, 4, 7), -1.0);
    cr_assert_eq(pw_schedule_theoretical_peak(PW_SCHEDULE_DUALPIPE_V, 4, 7, 0), -1);
    cr_assert_eq(pw_schedule_theoretical_peak(PW_SCHEDULE_DUALPIPE_V, 4, 8, 3), 9);
    cr_assert_float_eq(pw_schedule_theoretical_bubble(PW_SCHEDULE_DUALPIPE_V, 4, 8), 3.0 / 51, 1e-15);
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_1F1B, .n_stages = 2, .n_micro = 4,
                               .chunks_per_rank = 2};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "1f1b has one chunk per rank (got chunks_per_rank=2; "
                                      "interleaved takes more)"), "%s", pw_last_error());
    cr_assert_eq(pw_schedule_config_bubble(&cfg), -1.0);
    cr_assert_eq(pw_schedule_config_peak(&cfg, 0), -1);
    cfg.chunks_per_rank = 0;
    cr_assert_eq(pw_schedule_config_peak(&cfg, 2), -1);
    cr_assert_eq(pw_schedule_config_bubble(NULL), -1.0);
    /* split_w is the zero-bubble schedules' own business. */
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_ZB_H1, .n_stages = 2, .n_micro = 4, .split_w = 0};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_OK);
    cr_assert_eq(s->split_w, 1);
    pw_schedule_destroy(s);
    /* Interleaved has no closed form without v. */
    cr_assert_eq(pw_schedule_theoretical_bubble(PW_SCHEDULE_INTERLEAVED, 4, 8), -1.0);
    cr_assert_eq(pw_schedule_theoretical_peak(PW_SCHEDULE_INTERLEAVED, 4, 8, 0), -1);
    cr_assert_eq(pw_schedule_theoretical_peak(PW_SCHEDULE_ZB_H2, 4, 8, 3), 7);
    cr_assert_eq(pw_schedule_rank_of(NULL, 0), -1);
}

Test(schedule_new, names, .timeout = 300)
{
    static const struct { const char *name; pw_schedule_kind kind; } cases[] = {
        {"interleaved", PW_SCHEDULE_INTERLEAVED}, {"Interleaved-1F1B", PW_SCHEDULE_INTERLEAVED},
        {"zb-h1", PW_SCHEDULE_ZB_H1}, {"ZB_H1", PW_SCHEDULE_ZB_H1}, {"zbh1", PW_SCHEDULE_ZB_H1},
        {"zb-h2", PW_SCHEDULE_ZB_H2}, {"zbh2", PW_SCHEDULE_ZB_H2}, {"zb-v", PW_SCHEDULE_ZB_V},
        {"ZBV", PW_SCHEDULE_ZB_V}, {"zb_v", PW_SCHEDULE_ZB_V}, {"zb-auto", PW_SCHEDULE_ZB_AUTO},
        {"ZB_AUTO", PW_SCHEDULE_ZB_AUTO}, {"dualpipev", PW_SCHEDULE_DUALPIPE_V},
        {"DualPipeV", PW_SCHEDULE_DUALPIPE_V}, {"dualpipe-v", PW_SCHEDULE_DUALPIPE_V},
        {"dualpipe_v", PW_SCHEDULE_DUALPIPE_V},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        pw_schedule_kind k = PW_SCHEDULE_CUSTOM;
        cr_assert_eq(pw_schedule_kind_parse(cases[i].name, &k), PW_OK, "%s", cases[i].name);
        cr_assert_eq(k, cases[i].kind, "%s", cases[i].name);
    }
    for (int k = 0; k < PW_SCHEDULE_KIND_COUNT; k++) {
        pw_schedule_kind back;
        cr_assert_eq(pw_schedule_kind_parse(pw_schedule_kind_name((pw_schedule_kind)k), &back), PW_OK);
        cr_assert_eq((int)back, k);
    }
    /* Numbering of the existing kinds is kept. */
    cr_assert_eq(PW_SCHEDULE_CUSTOM, 0);
    cr_assert_eq(PW_SCHEDULE_GPIPE, 1);
    cr_assert_eq(PW_SCHEDULE_1F1B, 2);
    pw_schedule_kind k;
    cr_assert_eq(pw_schedule_kind_parse("zb", &k), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "(expected gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v, "
                                      "zb-auto, dualpipev or custom)"), "%s", pw_last_error());
}

/* The V placement and explicit placements in the CSV header. */
Test(schedule_csv, placements, .timeout = 300)
{
    /* kind=zb-v implies the V placement: rank 0 holds chunks 0 and 3. */
    const char *v_text = "# pipewright schedule v1: kind=zb-v ranks=2 micro_batches=1\n"
                         "0F0,3F0,3B0,3W0,0B0,0W0,OPT\n"
                         "1F0,2F0,2B0,2W0,1B0,1W0,OPT\n";
    pw_schedule *s = from_csv(v_text);
    cr_assert_not_null(s->chunk_rank);
    cr_assert_eq(pw_schedule_rank_of(s, 3), 0);
    cr_assert_eq(pw_schedule_rank_of(s, 2), 1);
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s", pw_last_error());
    cr_assert_eq(rep->n_messages, 2 * 2); /* 0->1 and 2->3 cross ranks, 1->2 is local */
    cr_assert_eq(rep->peak_inflight_chunk[3], 1);
    pw_schedule_report_destroy(rep);
    char *csv = to_csv(s, NULL);
    cr_assert(strstr(csv, "buckets=0 placement=v\n0F0,0SF0,3RF0,3F0,3B0,3SB0,3W0,0RB0,0B0,0W0,OPT\n"),
              "%s", csv);
    pw_schedule *back = from_csv(csv);
    cr_assert(pw_schedule_equal(s, back));
    pw_schedule_destroy(back);
    free(csv);
    /* The same as an explicit list; placement=loop overrides the kind. */
    back = from_csv("# pipewright schedule v1: kind=zb-v placement=0,1,1,0 micro_batches=1\n"
                    "0F0,3F0,3B0,3W0,0B0,0W0,OPT\n1F0,2F0,2B0,2W0,1B0,1W0,OPT\n");
    cr_assert(pw_schedule_equal(s, back));
    pw_schedule_destroy(back);
    pw_schedule_destroy(s);
    expect_parse_error("# pipewright schedule v1: kind=zb-v placement=loop\n"
                       "0F0,3F0,3B0,3W0,0B0,0W0,OPT\n1F0,2F0,2B0,2W0,1B0,1W0,OPT\n",
                       "bad.csv:2:5: error: chunk 3 runs on rank 1 (chunk mod 2), but this row is rank 0");
    /* kind=dualpipev implies it too (a hand-written file, compute only). */
    s = from_csv("# pipewright schedule v1: kind=dualpipev ranks=2 micro_batches=1\n"
                 "0F0,3F0,3B0,3W0,0B0,0W0,OPT\n1F0,2F0,2B0,2W0,1B0,1W0,OPT\n");
    cr_assert_eq(s->kind, PW_SCHEDULE_DUALPIPE_V);
    cr_assert_eq(pw_schedule_rank_of(s, 3), 0);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    pw_schedule_destroy(s);

    /* A placement of its own: rank 0 holds chunks 0 and 1, rank 1 chunks 2 and 3. */
    s = from_csv("# pipewright schedule v1: placement=0,0,1,1\n"
                 "0F0,1F0,1B0,0B0,OPT\n"
                 "2F0,3F0,3B0,2B0,OPT\n");
    cr_assert_eq(s->chunks_per_rank, 2);
    cr_assert_eq(pw_schedule_validate(s, NULL), PW_OK, "%s", pw_last_error());
    csv = to_csv(s, NULL);
    cr_assert(strstr(csv, " placement=0,0,1,1\n0F0,1F0,1SF0,1RB0,1B0,0B0,OPT\n"), "%s", csv);
    back = from_csv(csv);
    cr_assert(pw_schedule_equal(s, back));
    pw_schedule_destroy(back);
    free(csv);
    pw_schedule_destroy(s);

    expect_parse_error("# pipewright schedule v1: placement=v ranks=2\n0F0,2F0,OPT\n1F0,3F0,OPT\n",
                       "bad.csv:2:5: error: chunk 2 runs on rank 1 (placement=v), but this row is rank 0");
    expect_parse_error("# pipewright schedule v1: placement=0,1,1\n0F0,3F0,OPT\n1F0,2F0,OPT\n",
                       "bad.csv:1:27: error: header: placement lists 3 ranks, but there are 4 chunks "
                       "(2 ranks x 2 chunks per rank)");
    expect_parse_error("# pipewright schedule v1: placement=0,0,0,1\n0F0,1F0,OPT\n3F0,OPT\n",
                       "header: placement puts more than 2 chunks on rank 0");
    expect_parse_error("# pipewright schedule v1: placement=0,5,1,0\n0F0,3F0,OPT\n1F0,2F0,OPT\n",
                       "header: placement entry 1 must be a rank in 0..1 (placement=0,5,1,0)");
    expect_parse_error("# pipewright schedule v1: placement=zigzag\n0F0\n",
                       "bad.csv:1:27: error: header: placement must be loop, v or the rank of each chunk");
    expect_parse_error("# pipewright schedule v1: placement=0,1,,0\n0F0,3F0,OPT\n1F0,2F0,OPT\n",
                       "header: placement entry 2 must be a rank in 0..1");
}

/* ------------------------------------------------------------ robustness */

static uint32_t lcg(uint32_t *x)
{
    *x = *x * 1664525u + 1013904223u;
    return *x >> 8;
}

/* Randomly damaged schedules never crash anything: validation answers OK or
 * PW_ERR_SCHEDULE, their CSV text parses or gets PW_ERR_PARSE, print works.
 * (Run under AddressSanitizer this is the memory-safety check.) */
Test(schedule_fuzz, damaged_schedules, .timeout = 300)
{
    uint32_t seed = 12345;
    int n_ok = 0, n_bad = 0;
    for (int iter = 0; iter < 3000; iter++) {
        int S = 1 + (int)(lcg(&seed) % 4), M = 1 + (int)(lcg(&seed) % 4);
        pw_schedule *s = gen_lowered(lcg(&seed) % 2 ? PW_SCHEDULE_1F1B : PW_SCHEDULE_GPIPE, S, M,
                                     (int)(lcg(&seed) % 2));
        int edits = 1 + (int)(lcg(&seed) % 3);
        for (int e = 0; e < edits; e++) {
            pw_rank_program *p = &s->ranks[lcg(&seed) % (uint32_t)S];
            pw_action *a = &p->actions[lcg(&seed) % (uint32_t)p->n_actions];
            switch (lcg(&seed) % 5) {
            case 0: a->kind = (pw_action_kind)(lcg(&seed) % (PW_ACT_COUNT + 2)); break;
            case 1: a->chunk = (int)(lcg(&seed) % (uint32_t)(S + 3)) - 1; break;
            case 2: a->mb = (int)(lcg(&seed) % (uint32_t)(M + 3)) - 1; break;
            case 3: { /* swap with another action of the rank */
                pw_action *b = &p->actions[lcg(&seed) % (uint32_t)p->n_actions];
                pw_action tmp = *a;
                *a = *b;
                *b = tmp;
                break;
            }
            default: /* drop the last action */
                if (p->n_actions > 1) p->n_actions--;
                break;
            }
        }
        pw_status st = pw_schedule_validate(s, NULL);
        cr_assert(st == PW_OK || st == PW_ERR_SCHEDULE, "status %d: %s", st, pw_last_error());
        if (st == PW_OK) n_ok++;
        else n_bad++;
        char *buf = NULL;
        size_t n = 0;
        FILE *f = open_memstream(&buf, &n);
        cr_assert_eq(pw_schedule_write_csv(s, f), PW_OK);
        cr_assert_eq(pw_schedule_print(s, f), PW_OK);
        fclose(f);
        pw_schedule *back = NULL;
        st = pw_schedule_parse_csv(buf, n, "fuzz.csv", &back);
        cr_assert(st == PW_OK || st == PW_ERR_PARSE, "status %d: %s", st, pw_last_error());
        if (back) {
            st = pw_schedule_validate(back, NULL);
            cr_assert(st == PW_OK || st == PW_ERR_SCHEDULE, "status %d: %s", st, pw_last_error());
        }
        pw_schedule_destroy(back);
        free(buf);
        pw_schedule_destroy(s);
    }
    cr_assert_gt(n_bad, 2000, "most damage should be caught (%d ok, %d rejected)", n_ok, n_bad);
}

/* The same damage to the new kinds: several chunks per rank, the V
 * placement, split W everywhere. */
Test(schedule_fuzz, damaged_new_kinds, .timeout = 300)
{
    static const pw_schedule_kind kinds[] = {PW_SCHEDULE_INTERLEAVED, PW_SCHEDULE_ZB_H1,
                                             PW_SCHEDULE_ZB_H2, PW_SCHEDULE_ZB_V};
    uint32_t seed = 4242;
    int n_bad = 0;
    for (int iter = 0; iter < 2000; iter++) {
        pw_schedule_kind kind = kinds[lcg(&seed) % 4];
        int S = 1 + (int)(lcg(&seed) % 4), M = 1 + (int)(lcg(&seed) % 4);
        if (kind == PW_SCHEDULE_INTERLEAVED) M = S * (1 + (int)(lcg(&seed) % 2));
        pw_schedule *s = gen_cfg(kind, S, M, 0, (int)(lcg(&seed) % 2));
        cr_assert_eq(pw_schedule_lower(s), PW_OK);
        const int C = s->n_chunks;
        int edits = 1 + (int)(lcg(&seed) % 3);
        for (int e = 0; e < edits; e++) {
            pw_rank_program *p = &s->ranks[lcg(&seed) % (uint32_t)S];
            pw_action *a = &p->actions[lcg(&seed) % (uint32_t)p->n_actions];
            switch (lcg(&seed) % 5) {
            case 0: a->kind = (pw_action_kind)(lcg(&seed) % (PW_ACT_COUNT + 2)); break;
            case 1: a->chunk = (int)(lcg(&seed) % (uint32_t)(C + 3)) - 1; break;
            case 2: a->mb = (int)(lcg(&seed) % (uint32_t)(M + 3)) - 1; break;
            case 3: {
                pw_action *b = &p->actions[lcg(&seed) % (uint32_t)p->n_actions];
                pw_action tmp = *a;
                *a = *b;
                *b = tmp;
                break;
            }
            default:
                if (p->n_actions > 1) p->n_actions--;
                break;
            }
        }
        pw_status st = pw_schedule_validate(s, NULL);
        cr_assert(st == PW_OK || st == PW_ERR_SCHEDULE, "status %d: %s", st, pw_last_error());
        n_bad += st != PW_OK;
        char *buf = NULL;
        size_t n = 0;
        FILE *f = open_memstream(&buf, &n);
        cr_assert_eq(pw_schedule_write_csv(s, f), PW_OK);
        cr_assert_eq(pw_schedule_print(s, f), PW_OK);
        fclose(f);
        pw_schedule *back = NULL;
        st = pw_schedule_parse_csv(buf, n, "fuzz.csv", &back);
        cr_assert(st == PW_OK || st == PW_ERR_PARSE, "status %d: %s", st, pw_last_error());
        if (back) {
            st = pw_schedule_validate(back, NULL);
            cr_assert(st == PW_OK || st == PW_ERR_SCHEDULE, "status %d: %s", st, pw_last_error());
        }
        pw_schedule_destroy(back);
        free(buf);
        pw_schedule_destroy(s);
    }
    cr_assert_gt(n_bad, 1200, "most damage should be caught (%d rejected)", n_bad);
}

/* Random bytes and truncations of a valid file: the parser never crashes. */
Test(schedule_fuzz, damaged_text, .timeout = 300)
{
    pw_schedule *g = gen_lowered(PW_SCHEDULE_1F1B, 3, 3, 1);
    size_t len;
    char *text = to_csv(g, &len);
    static const char alphabet[] = "0123456789FBWSRAOPTfbw,# \n\r=:-x\t";
    uint32_t seed = 777;
    for (int iter = 0; iter < 5000; iter++) {
        char *copy = malloc(len);
        memcpy(copy, text, len);
        int edits = 1 + (int)(lcg(&seed) % 4);
        for (int e = 0; e < edits; e++)
            copy[lcg(&seed) % len] = alphabet[lcg(&seed) % (sizeof alphabet - 1)];
        size_t n = lcg(&seed) % 4 ? len : lcg(&seed) % (len + 1);
        pw_schedule *s = NULL;
        pw_status st = pw_schedule_parse_csv(copy, n, "fuzz.csv", &s);
        cr_assert(st == PW_OK || st == PW_ERR_PARSE, "status %d: %s", st, pw_last_error());
        if (st == PW_ERR_PARSE) cr_assert(strncmp(pw_last_error(), "fuzz.csv:", 9) == 0);
        if (s) {
            st = pw_schedule_validate(s, NULL);
            cr_assert(st == PW_OK || st == PW_ERR_SCHEDULE, "status %d: %s", st, pw_last_error());
        }
        pw_schedule_destroy(s);
        free(copy);
    }
    free(text);
    pw_schedule_destroy(g);
}

/* --------------------------------------------------------------- scale */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Not a timed assertion: measures generate + lower + validate of 1F1B with
 * 1024 ranks x 4096 micro-batches (25 M actions) and reports the time. */
Test(schedule_scale, onefoneb_1024x4096, .timeout = 300)
{
    double t0 = now_s();
    pw_schedule *s = gen(PW_SCHEDULE_1F1B, 1024, 4096, 0, 0);
    double t1 = now_s();
    cr_assert_eq(pw_schedule_lower(s), PW_OK, "%s", pw_last_error());
    double t2 = now_s();
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s", pw_last_error());
    double t3 = now_s();
    cr_assert_eq(rep->peak_inflight[0], 1024);
    cr_assert_eq(rep->peak_inflight[1023], 1);
    cr_assert_eq(rep->makespan, 2 * (4096 + 1024 - 1));
    fprintf(stderr,
            "schedule_scale: 1f1b 1024 ranks x 4096 micro-batches, %lld actions: generate %.3f s, "
            "lower %.3f s, validate %.3f s, total %.3f s\n",
            (long long)rep->n_actions, t1 - t0, t2 - t1, t3 - t2, t3 - t0);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
}

/* ---------------------------------------------------------------- zb-auto */

/* Every memory limit from 1 to 2p, p = 1..8, m = 1..16 and 2p, 4p: the
 * greedy finishes, the order validates (the validator's replay is the
 * proof: the generator is not trusted), no rank holds more micro-batches
 * than the limit, and 1p is no longer than ZB-H1 on the unit clock. */
Test(schedule_auto, every_limit_validates, .timeout = 300)
{
    int checked = 0;
    for (int S = 1; S <= 8; S++)
        for (int M = 1; M <= 16 + 4 * S; M += M < 16 ? 1 : 2 * S) {
            for (int L = 1; L <= 2 * S; L++) {
                pw_schedule_config cfg = {.kind = PW_SCHEDULE_ZB_AUTO, .n_stages = S, .n_micro = M,
                                          .memory_limit = L};
                pw_schedule *s = NULL;
                pw_schedule_report *rep = NULL;
                cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_OK, "S=%d M=%d L=%d: %s", S, M, L,
                             pw_last_error());
                cr_assert_eq(s->kind, PW_SCHEDULE_ZB_AUTO);
                cr_assert_eq(s->split_w, 1);
                cr_assert_eq(pw_schedule_lower(s), PW_OK);
                cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "S=%d M=%d L=%d: %s", S, M, L,
                             pw_last_error());
                for (int r = 0; r < S; r++)
                    cr_assert_leq(rep->peak_inflight[r], L < M ? L : M, "S=%d M=%d L=%d rank %d: %d",
                                  S, M, L, r, rep->peak_inflight[r]);
                if (L == S) {
                    pw_schedule_config h1 = {.kind = PW_SCHEDULE_ZB_H1, .n_stages = S, .n_micro = M};
                    cr_assert_leq(rep->bubble, pw_schedule_config_bubble(&h1) + 1e-12,
                                  "S=%d M=%d: zb-auto 1p %g, zb-h1 %g", S, M, rep->bubble,
                                  pw_schedule_config_bubble(&h1));
                }
                pw_schedule_report_destroy(rep);
                pw_schedule_destroy(s);
                checked++;
            }
        }
    cr_assert_gt(checked, 1000);
}

Test(schedule_auto, config_errors_and_limits, .timeout = 300)
{
    int L = 0;
    cr_assert_eq(pw_schedule_memory_limit_parse("2p", 8, &L), PW_OK);
    cr_assert_eq(L, 16);
    cr_assert_eq(pw_schedule_memory_limit_parse("1P", 8, &L), PW_OK);
    cr_assert_eq(L, 8);
    cr_assert_eq(pw_schedule_memory_limit_parse("12", 8, &L), PW_OK);
    cr_assert_eq(L, 12);
    const char *bad[] = {"", "p", "0", "0p", "-1", "2q", "2p5", "1.5p", "99999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cr_assert_eq(pw_schedule_memory_limit_parse(bad[i], 8, &L), PW_ERR_INVALID_ARG, "'%s'", bad[i]);
        cr_assert(strstr(pw_last_error(), "expected a count of micro-batches"), "%s", pw_last_error());
    }
    pw_schedule *s = NULL;
    pw_schedule_config cfg = {.kind = PW_SCHEDULE_ZB_AUTO, .n_stages = 4, .n_micro = 8, .memory_limit = -1};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "memory_limit >= 1"), "%s", pw_last_error());
    double f[4] = {1, 1, 1, 1}, b[4] = {1, 1, -1, 1}, w[4] = {1, 1, 1, 1};
    pw_schedule_costs costs = {.f = f, .b = b, .w = w};
    cfg.memory_limit = 0;
    cfg.costs = &costs;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "stage 2: b must be a time"), "%s", pw_last_error());
    costs.b = NULL;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cfg.costs = NULL;
    cfg.chunks_per_rank = 2;
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "zb-auto has one chunk per rank"), "%s", pw_last_error());
    cr_assert_null(s);
}

/* The order follows the times it is given: with a slow last stage the
 * greedy's order differs from the unit-cost one (it is not ignoring them). */
Test(schedule_auto, costs_shape_the_order, .timeout = 300)
{
    double f[4] = {1, 1, 1, 3}, b[4] = {1, 1, 1, 3}, w[4] = {1, 1, 1, 3};
    pw_schedule_costs costs = {.f = f, .b = b, .w = w, .comm = 0.25};
    pw_schedule_config cfg = {.kind = PW_SCHEDULE_ZB_AUTO, .n_stages = 4, .n_micro = 12, .memory_limit = 6};
    pw_schedule *unit = NULL, *timed = NULL;
    cr_assert_eq(pw_schedule_generate(&cfg, &unit), PW_OK);
    cfg.costs = &costs;
    cr_assert_eq(pw_schedule_generate(&cfg, &timed), PW_OK, "%s", pw_last_error());
    cr_assert_not(pw_schedule_equal(unit, timed), "the costs changed nothing");
    cr_assert_eq(pw_schedule_lower(timed), PW_OK);
    cr_assert_eq(pw_schedule_validate(timed, NULL), PW_OK, "%s", pw_last_error());
    pw_schedule_destroy(unit);
    pw_schedule_destroy(timed);
}
