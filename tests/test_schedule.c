/* Tests for the schedule IR (scheduler/schedule.h): generators, lowering,
 * validator, run-time checker, CSV form, theory and printing. */
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
ParameterizedTest(gen_param *p, schedule, generated, .timeout = 60)
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
        }

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

Test(schedule, gpipe_order)
{
    pw_schedule *s = gen(PW_SCHEDULE_GPIPE, 4, 4, 0, 0);
    char row[512];
    compute_row(s, 2, row, sizeof row);
    cr_assert_str_eq(row, "2F0,2F1,2F2,2F3,2B0,2B1,2B2,2B3");
    pw_schedule_destroy(s);
}

Test(schedule, onefoneb_order)
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

Test(schedule, lowering_placement)
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

Test(schedule, allreduce_buckets)
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

Test(schedule_broken, baseline_is_valid)
{
    pw_schedule *s = from_csv(HDR GOOD0 GOOD1);
    pw_schedule_report *rep = NULL;
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK, "%s", pw_last_error());
    cr_assert_eq(rep->peak_inflight[0], 2);
    cr_assert_eq(rep->peak_inflight[1], 1);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
}

Test(schedule_broken, missing_receive)
{
    expect_invalid(HDR GOOD0 "1RF0,1F0,1B0,1SB0,1F1,1B1,1SB1,OPT\n",
                   "rank 1, position 4 (F mb 1): missing receive: F needs its input from rank 0, "
                   "but no RECV_F mb 1 comes before it");
    expect_invalid(HDR "0F0,0SF0,0F1,0SF1,0RB0,0B0,0B1,OPT\n" GOOD1,
                   "rank 0, position 6 (B mb 1): missing receive: B needs the output gradient from "
                   "rank 1, but no RECV_B mb 1 comes before it");
}

Test(schedule_broken, unmatched_send)
{
    /* Rank 0 sends mb 1 forward, but rank 1 never takes it. */
    expect_invalid(HDR "0F0,0SF0,0F1,0SF1,0RB0,0B0,OPT\n"
                       "1RF0,1F0,1B0,1SB0,OPT\n",
                   "rank 0, position 3 (SEND_F mb 1 to rank 1): unmatched send: rank 1 never "
                   "receives it (no RECV_F mb 1)");
}

Test(schedule_broken, unmatched_receive)
{
    /* Rank 1 waits for mb 1, which rank 0 computes but never sends. */
    expect_invalid(HDR "0F0,0SF0,0F1,0RB0,0B0,OPT\n" GOOD1,
                   "rank 1, position 4 (RECV_F mb 1 from rank 0): unmatched receive: rank 0 "
                   "finished without sending it");
}

Test(schedule_broken, b_before_f)
{
    expect_invalid(HDR GOOD0 "1RF0,1B0,1F0,1SB0,1RF1,1F1,1B1,1SB1,OPT\n",
                   "rank 1, position 1 (B mb 0): B before its F (F mb 0 has not run)");
}

Test(schedule_broken, w_before_b)
{
    expect_invalid("0F0,0W0,0B0,OPT\n", "rank 0, position 1 (W mb 0): W before its B (B mb 0 has not run)");
}

Test(schedule_broken, cyclic_wait)
{
    /* Rank 0 wants the gradient of mb 1 before sending mb 1 forward; rank 1
     * needs mb 1 forward before it can produce that gradient. */
    expect_invalid(HDR "0F0,0SF0,0RB1,0B1,0F1,0SF1,0RB0,0B0,OPT\n"
                       "1RF0,1F0,1RF1,1F1,1B1,1SB1,1B0,1SB0,OPT\n",
                   "deadlock: rank 0 at position 2 (RECV_B mb 1 from rank 1) waits; rank 1 at "
                   "position 2 (RECV_F mb 1 from rank 0) waits");
}

Test(schedule_broken, docs_deadlock)
{
    /* The edit docs/schedules.md warns about: 0B0 right after 0F0. */
    expect_invalid("0F0,0B0,0F1,0F2,0F3,0B1,0B2,0B3,OPT\n"
                   "1F0,1F1,1F2,1B0,1F3,1B1,1B2,1B3,OPT\n"
                   "2F0,2F1,2B0,2F2,2B1,2F3,2B2,2B3,OPT\n"
                   "3F0,3B0,3F1,3B1,3F2,3B2,3F3,3B3,OPT\n",
                   "deadlock: rank 0 at position 2 (RECV_B mb 0 from rank 1) waits; rank 1 at "
                   "position 3 (RECV_F mb 1 from rank 0) waits (4 ranks blocked in all)");
}

Test(schedule_broken, cycle_among_many)
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

Test(schedule_broken, duplicate_f)
{
    expect_invalid("0F0,0F0,0F1,0B0,0B1,OPT\n1F0,1B0,1F1,1B1,OPT\n",
                   "rank 0, position 2 (F mb 0): duplicate F: mb 0 already ran its F");
}

Test(schedule_broken, missing_b)
{
    expect_invalid("# pipewright schedule v1: micro_batches=2\n0F0,0F1,0B0,OPT\n",
                   "rank 0, position 3 (OPTIM): OPTIM before the last backward of chunk 0 (1 of 2 "
                   "micro-batches done)");
    expect_invalid("0F0,0B0\n", "rank 0, at the end: no OPTIM");
    expect_invalid("# pipewright schedule v1: micro_batches=2\n0F0,0B0\n",
                   "rank 0, at the end: mb 1 never runs F");
}

Test(schedule_broken, w_without_split)
{
    expect_invalid("# pipewright schedule v1: split_w=0\n0F0,0B0,0W0,OPT\n",
                   "rank 0, position 2 (W mb 0): W in a schedule that does not split W (split_w=0)");
    /* And split without W. */
    expect_invalid("# pipewright schedule v1: split_w=1\n0F0,0B0,OPT\n",
                   "OPTIM before the last backward of chunk 0 (0 of 1 micro-batches done)");
}

Test(schedule_broken, optim_rules)
{
    expect_invalid("0F0,0B0,OPT,OPT\n", "rank 0, position 3 (OPTIM): second OPTIM (once per rank)");
    expect_invalid("0F0,OPT,0B0\n", "rank 0, position 1 (OPTIM): OPTIM before the last backward");
    expect_invalid(HDR GOOD0 "1RF0,1F0,1B0,1SB0,1RF1,1F1,1B1,OPT,1SB1\n",
                   "rank 1, position 8 (SEND_B mb 1 to rank 0): action after OPTIM");
}

Test(schedule_broken, bad_messages)
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

Test(schedule_broken, bad_structs)
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

/* ------------------------------------------------------ generator arguments */

Test(schedule, bad_configs)
{
    pw_schedule *s = (pw_schedule *)1;
    pw_schedule_config cfg = {.kind = PW_SCHEDULE_1F1B, .n_stages = 0, .n_micro = 4};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert_null(s);
    cr_assert(strstr(pw_last_error(), "n_stages must be in 1.."), "%s", pw_last_error());
    cfg = (pw_schedule_config){.kind = PW_SCHEDULE_CUSTOM, .n_stages = 2, .n_micro = 4};
    cr_assert_eq(pw_schedule_generate(&cfg, &s), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "kind must be gpipe, 1f1b, interleaved, zb-h1, zb-h2 or zb-v (got custom)"),
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

Test(schedule, names_and_theory)
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

Test(schedule_csv, malformed_cells)
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

Test(schedule_csv, bad_rank_or_chunk)
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

Test(schedule_csv, bad_headers)
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

Test(schedule_csv, lenient_forms)
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

Test(schedule_csv, compute_only_is_lowered)
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
Test(schedule_csv, interleaved_chunks)
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

Test(schedule_csv, load_and_save)
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
Test(schedule_csv, docs_examples)
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

Test(schedule, print_timeline)
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

/* ------------------------------------------------------------ robustness */

static uint32_t lcg(uint32_t *x)
{
    *x = *x * 1664525u + 1013904223u;
    return *x >> 8;
}

/* Randomly damaged schedules never crash anything: validation answers OK or
 * PW_ERR_SCHEDULE, their CSV text parses or gets PW_ERR_PARSE, print works.
 * (Run under AddressSanitizer this is the memory-safety check.) */
Test(schedule_fuzz, damaged_schedules, .timeout = 120)
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

/* Random bytes and truncations of a valid file: the parser never crashes. */
Test(schedule_fuzz, damaged_text)
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
