/* pipewright — re-partitioning a running pipeline (stages/train/rebalance.h):
 * forced moves at chosen steps, in both directions, on 2-4 stages, every
 * schedule, AdamW with clipping, 1 and 2 replicas, end with the same bits
 * (parameters and optimizer state) as the run that never moved; a move
 * that fails leaves the old pipeline running; checkpoints written after a
 * move hold the moved pipeline's state; with --compress topk and powersgd
 * the error-feedback state moves too. The MPI version is in
 * tests/mpi/mpi_driver.c ("rebalance").
 */
#define _GNU_SOURCE /* nftw (tests/test_tmpdir.h) */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pipeline_support.h"
#include "runtime/compress.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "stages/train/rebalance.h"
#include "stages/train/state.h"
#include "tests/tsan_criterion.h"
#define PW_TEST_TMP_NAME "rebalance"
#define PW_TEST_SUITE rebalance
#include "tests/test_tmpdir.h"

#define TIMEOUT 600
#define STEPS 4

static const char *MLP = "graph r_mlp\n" PW_TEST_MLP_BODY;
static const char *GPT = "graph r_gpt\n" PW_TEST_GPT_BODY;

static const pw_schedule_kind KINDS[] = {PW_SCHEDULE_GPIPE, PW_SCHEDULE_1F1B, PW_SCHEDULE_INTERLEAVED,
                                         PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_H2, PW_SCHEDULE_ZB_V};
#define N_KINDS 6

static pw_dataset *image_data(void)
{
    pw_synthetic_config sc = {.n = 480, .sample_shape = {.ndim = 2, .d = {4, 6}}, .n_classes = 5, .seed = 3,
                              .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

static pw_dataset *token_data(void)
{
    char path[] = "/tmp/pw_rebal_text_XXXXXX.txt";
    int fd = mkstemps(path, 4);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    cr_assert_not_null(f);
    for (int i = 0; i < 300; i++) fprintf(f, "%d: a slow stage gives its layers to a fast one %d.\n", i, i * 5 % 11);
    fclose(f);
    pw_dataset *d = NULL;
    pw_status st = pw_dataset_load_text(path, 16, 1, &d);
    unlink(path);
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    return d;
}

/* --compress of the pipelines make() builds (NULL: none). */
static const char *zmode;

static pw_pipeline *make(const pw_graph *g, const pw_dataset *d, int S, pw_schedule_kind kind, int R)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.micro_batches = 12;
    pc.batch = 24 * R;
    pc.replicas = R;
    pc.stages = S;
    pc.schedule = kind;
    pc.partition = PW_PARTITION_FLOPS;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.clip_grad_norm = 1.0;
    pc.seed = 7;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.watchdog_s = 120;
    if (zmode) {
        cr_assert_eq(pw_compress_parse(zmode, &pc.compress), PW_OK, "%s", pw_last_error());
        pc.compress.seed = 99;
    }
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s S=%d R=%d: %s", pw_schedule_kind_name(kind), S, R,
                 pw_last_error());
    return pl;
}

/* Every parameter, then every optimizer state buffer, of replica `rep`, in
 * graph order (the first program holding each). */
static float *state_of(pw_pipeline *pl, int rep, const pw_graph *g, int64_t *n)
{
    int64_t np;
    float *p = test_replica_params(pl, rep, g, &np);
    float *out = malloc((size_t)np * 3 * sizeof(float));
    cr_assert_not_null(out);
    memcpy(out, p, (size_t)np * sizeof(float));
    free(p);
    int64_t off = np;
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < g->n_params; i++) {
            int found = 0;
            for (int c = 0; c < pw_pipeline_n_chunks(pl) && !found; c++) {
                pw_program *progs[16];
                int m = pw_pipeline_programs(pl, rep, c, progs, 16);
                for (int q = 0; q < m && !found; q++)
                    for (int j = 0; j < pw_program_n_params(progs[q]) && !found; j++) {
                        pw_program_param pp;
                        pw_program_param_at(progs[q], j, &pp);
                        if (pp.graph_param != i) continue;
                        cr_assert_eq(pw_program_param_read(progs[q], j, PW_PARAM_STATE, k, out + off), PW_OK);
                        found = 1;
                    }
            }
            cr_assert(found);
            off += pw_shape_numel(&g->params[i].shape);
        }
    *n = off;
    return out;
}

/* The cuts `base` with every interior boundary moved by `delta` nodes,
 * kept in order and inside the graph; 0 when that is not possible. */
static int shifted(const pw_partition *base, int n_nodes, int delta, int *out)
{
    const int C = base->n_stages;
    out[0] = 0;
    out[C] = n_nodes;
    for (int c = 1; c < C; c++) {
        int v = base->begin[c] + delta;
        if (v <= out[c - 1]) v = out[c - 1] + 1;
        out[c] = v;
    }
    for (int c = 0; c < C; c++)
        if (out[c + 1] <= out[c]) return 0;
    for (int c = 0; c <= C; c++)
        if (out[c] != base->begin[c]) return 1;
    return 0;
}

static void move_to(pw_pipeline **pl, const int *cuts, int C)
{
    pw_repartition_info info;
    cr_assert_eq(pw_pipeline_repartition(pl, cuts, C + 1, &info), PW_OK, "%s", pw_last_error());
    const pw_partition *p = pw_pipeline_partition(*pl);
    for (int c = 0; c <= C; c++) cr_assert_eq(p->begin[c], cuts[c], "the move did not take cut %d", c);
    cr_assert_gt(info.bytes_local, 0);
}

/* Trains STEPS steps; with `moves`, after step 1 every cut moves one node
 * earlier, after step 2 two nodes later, after step 3 back to the start. */
static float *run(const pw_graph *g, const pw_dataset *d, int S, pw_schedule_kind kind, int R, int moves,
                  int64_t *n, int *moved)
{
    pw_pipeline *pl = make(g, d, S, kind, R);
    const int C = pw_pipeline_n_chunks(pl);
    int start[64], a[64], b[64];
    memcpy(start, pw_pipeline_partition(pl)->begin, sizeof(int) * (size_t)(C + 1));
    const int can_a = shifted(pw_pipeline_partition(pl), g->n_nodes, -1, a);
    const int can_b = shifted(pw_pipeline_partition(pl), g->n_nodes, +2, b);
    *moved = 0;
    for (int i = 0; i < STEPS; i++) {
        cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
        if (!moves) continue;
        const int *to = i == 0 && can_a ? a : i == 1 && can_b ? b : i == 2 ? start : NULL;
        if (!to || (i == 2 && !*moved)) continue;
        move_to(&pl, to, C);
        cr_assert_eq(pw_pipeline_steps_per_epoch(pl) > 0, 1);
        (*moved)++;
    }
    float *s = state_of(pl, 0, g, n);
    if (R > 1) {
        int64_t n1;
        float *s1 = state_of(pl, R - 1, g, &n1);
        cr_assert(n1 == *n && memcmp(s, s1, (size_t)n1 * 4) == 0, "replicas disagree after the moves");
        free(s1);
    }
    pw_pipeline_destroy(pl);
    return s;
}

static void expect_same(const float *got, const float *ref, int64_t n, const char *what)
{
    int64_t first = -1, nd = 0;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&got[i], &ref[i], 4) != 0) {
            if (first < 0) first = i;
            nd++;
        }
    cr_expect_eq(nd, 0, "%s: %lld of %lld values (parameters, then AdamW state) differ from the run that never "
                 "moved (first at %lld: %.9g vs %.9g)", what, (long long)nd, (long long)n, (long long)first,
                 first >= 0 ? got[first] : 0.0, first >= 0 ? ref[first] : 0.0);
}

static void matrix(const char *text, pw_dataset *d)
{
    pw_graph *g = test_parse(text, "rebalance.graph");
    int runs = 0;
    for (int R = 1; R <= 2; R++)
        for (int S = 2; S <= 4; S++)
            for (int k = 0; k < N_KINDS; k++) {
                const int v = KINDS[k] == PW_SCHEDULE_INTERLEAVED || KINDS[k] == PW_SCHEDULE_ZB_V ? 2 : 1;
                if (S * v > g->n_nodes - 2) continue;
                int64_t n_ref, n;
                int moved;
                float *ref = run(g, d, S, KINDS[k], R, 0, &n_ref, &moved);
                float *got = run(g, d, S, KINDS[k], R, 1, &n, &moved);
                cr_assert_eq(n, n_ref);
                cr_assert_geq(moved, 2, "%s S=%d: fewer than two moves", pw_schedule_kind_name(KINDS[k]), S);
                char what[128];
                snprintf(what, sizeof what, "%s: %s S=%d R=%d, %d moves", g->name, pw_schedule_kind_name(KINDS[k]),
                         S, R, moved);
                expect_same(got, ref, n, what);
                free(ref);
                free(got);
                runs++;
            }
    cr_assert_gt(runs, 20);
    pw_graph_destroy(g);
    pw_dataset_destroy(d);
}

Test(rebalance, mlp_moves_keep_bits, .timeout = TIMEOUT) { matrix(MLP, image_data()); }

/* The GPT's head is tied to its embedding across chunks: moves change which
 * chunks (and how many) hold the tie. */
Test(rebalance, gpt_moves_keep_bits, .timeout = TIMEOUT) { matrix(GPT, token_data()); }

/* --compress with error feedback: each replica's state (top-k's residuals,
 * PowerSGD's residuals and Q: per parameter and use) moves with the cuts,
 * so 2 replicas with moves end with the bits of the run that never moved
 * (docs/distributed.md, "Compression"); started again from zero they would
 * not. The GPT's tied embedding has two uses, on two chunks, each with its
 * own state. */
static void compressed(const char *text, pw_dataset *d, const char *mode)
{
    pw_graph *g = test_parse(text, "rebalance_z.graph");
    static const struct { int S; pw_schedule_kind kind; } cases[] = {
        {2, PW_SCHEDULE_1F1B}, {3, PW_SCHEDULE_ZB_H1}, {2, PW_SCHEDULE_INTERLEAVED}, {4, PW_SCHEDULE_GPIPE}};
    int64_t n_plain, n_ref, n;
    int moved;
    float *plain = run(g, d, 2, PW_SCHEDULE_1F1B, 2, 0, &n_plain, &moved);
    zmode = mode;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        float *ref = run(g, d, cases[i].S, cases[i].kind, 2, 0, &n_ref, &moved);
        float *got = run(g, d, cases[i].S, cases[i].kind, 2, 1, &n, &moved);
        cr_assert(n == n_ref && n == n_plain);
        cr_assert_neq(memcmp(ref, plain, (size_t)n * 4), 0, "--compress %s: the bits of no compression", mode);
        cr_assert_geq(moved, 2, "%s S=%d: fewer than two moves", pw_schedule_kind_name(cases[i].kind), cases[i].S);
        char what[160];
        snprintf(what, sizeof what, "%s --compress %s: %s S=%d R=2, %d moves", g->name, mode,
                 pw_schedule_kind_name(cases[i].kind), cases[i].S, moved);
        expect_same(got, ref, n, what);
        free(ref);
        free(got);
    }
    zmode = NULL;
    free(plain);
    pw_graph_destroy(g);
    pw_dataset_destroy(d);
}

Test(rebalance, topk_state_moves_with_the_cuts, .timeout = TIMEOUT)
{
    compressed(MLP, image_data(), "topk:0.1");
    compressed(GPT, token_data(), "topk:0.1");
}

Test(rebalance, powersgd_state_moves_with_the_cuts, .timeout = TIMEOUT)
{
    compressed(MLP, image_data(), "powersgd:2");
    compressed(GPT, token_data(), "powersgd:2");
}

/* The comparison above sees a move that loses state: the same moves with
 * one AdamW buffer zeroed after the first move end with other bits. */
Test(rebalance, a_lost_optimizer_state_is_seen, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(MLP, "rebalance.graph");
    pw_dataset *d = image_data();
    int64_t n_ref, n;
    int moved;
    float *ref = run(g, d, 2, PW_SCHEDULE_1F1B, 1, 0, &n_ref, &moved);
    pw_pipeline *pl = make(g, d, 2, PW_SCHEDULE_1F1B, 1);
    int a[3];
    cr_assert(shifted(pw_pipeline_partition(pl), g->n_nodes, -1, a));
    for (int i = 0; i < STEPS; i++) {
        cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
        if (i != 0) continue;
        move_to(&pl, a, 2);
        pw_program *p = pw_pipeline_program(pl, 1);
        pw_program_param pp;
        pw_program_param_at(p, 0, &pp);
        float *zero = calloc((size_t)pp.numel, sizeof(float));
        cr_assert_eq(pw_program_param_write_state(p, 0, 0, zero), PW_OK);
        free(zero);
    }
    float *got = state_of(pl, 0, g, &n);
    cr_assert_eq(n, n_ref);
    cr_assert(memcmp(got, ref, (size_t)n * 4) != 0, "zeroed optimizer state went unnoticed");
    free(got);
    free(ref);
    pw_pipeline_destroy(pl);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* All or nothing: a move whose build fails leaves the old pipeline (same
 * object, same cuts) training, and the bits are those of a run without it;
 * bad cuts are refused before anything is built. */
Test(rebalance, a_failed_move_changes_nothing, .timeout = TIMEOUT)
{
    pw_graph *g = test_parse(MLP, "rebalance.graph");
    pw_dataset *d = image_data();
    int64_t n_ref, n;
    int moved;
    float *ref = run(g, d, 3, PW_SCHEDULE_ZB_H1, 1, 0, &n_ref, &moved);
    pw_pipeline *pl = make(g, d, 3, PW_SCHEDULE_ZB_H1, 1);
    int a[4], before[4];
    memcpy(before, pw_pipeline_partition(pl)->begin, sizeof before);
    cr_assert(shifted(pw_pipeline_partition(pl), g->n_nodes, -1, a));
    setenv("PW_TEST_REBALANCE_FAIL", "2", 1);
    for (int i = 0; i < STEPS; i++) {
        cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
        if (i != 1) continue;
        pw_pipeline *same = pl;
        pw_repartition_info info;
        cr_assert_eq(pw_pipeline_repartition(&pl, a, 4, &info), PW_ERR_NOMEM);
        cr_assert(strstr(pw_last_error(), "PW_TEST_REBALANCE_FAIL"), "%s", pw_last_error());
        cr_assert_eq(info.kept, 1);
        cr_assert_eq(pl, same);
        cr_assert_eq(memcmp(pw_pipeline_partition(pl)->begin, before, sizeof before), 0);
        const int bad[][4] = {{0, 5, 5, 11}, {0, 3, 7, 10}, {1, 3, 7, 11}};
        for (int b = 0; b < 3; b++) {
            cr_assert_eq(pw_pipeline_repartition(&pl, bad[b], 4, &info), PW_ERR_INVALID_ARG);
            cr_assert_eq(pl, same);
        }
        cr_assert_eq(pw_pipeline_repartition(&pl, a, 3, &info), PW_ERR_INVALID_ARG);
    }
    unsetenv("PW_TEST_REBALANCE_FAIL");
    float *got = state_of(pl, 0, g, &n);
    expect_same(got, ref, n, "after a failed move");
    free(got);
    free(ref);
    pw_pipeline_destroy(pl);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* A checkpoint writer that saved before a move saves the moved pipeline
 * after it (its pointers into the old programs are renewed), and the
 * checkpoint resumes to the same state. */
Test(rebalance, checkpoints_after_a_move, .timeout = TIMEOUT)
{
    const char *dir = tmp_path("ckpt");
    pw_graph *g = test_parse(GPT, "rebalance.graph");
    pw_dataset *d = token_data();
    pw_pipeline *pl = make(g, d, 3, PW_SCHEDULE_1F1B, 1);
    const pw_partition *part = pw_pipeline_partition(pl);
    pw_state_config sc = {.dir = dir, .foreground = 1, .graph = g,
                          .run = {.data = "t", .train_samples = d->n, .batch = 24, .micro_batch = 2, .seed = 7,
                                  .optim = pw_optim_defaults(PW_OPTIM_ADAMW)},
                          .layout = {.stages = 3, .replicas = 1, .micro_batches = 12, .cuts = part->begin,
                                     .n_cuts = 4}};
    pw_state_writer *w;
    cr_assert_eq(pw_state_writer_create(&sc, &w), PW_OK, "%s", pw_last_error());
    int a[4];
    cr_assert(shifted(part, g->n_nodes, +2, a));
    pw_state_done done;
    int completed;
    cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK);
    cr_assert_eq(pw_state_writer_save(w, pl, 1), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_state_writer_poll(w, 1, &done, &completed), PW_OK);
    move_to(&pl, a, 3);
    cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK);
    cr_assert_eq(pw_state_writer_save(w, pl, 2), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_state_writer_poll(w, 1, &done, &completed), PW_OK);
    cr_assert_eq(done.step, 2);
    int64_t n_want, n_got;
    float *want = state_of(pl, 0, g, &n_want);
    pw_state_writer_destroy(w);
    pw_pipeline_destroy(pl);

    pw_state *s;
    cr_assert_eq(pw_state_open(dir, &s), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_state_get_meta(s)->step, 2);
    pw_pipeline *fresh = make(g, d, 2, PW_SCHEDULE_GPIPE, 1);
    cr_assert_eq(pw_state_restore(s, fresh, 1), PW_OK, "%s", pw_last_error());
    float *got = state_of(fresh, 0, g, &n_got);
    cr_assert_eq(n_got, n_want);
    expect_same(got, want, n_got, "the checkpoint written after a move");
    free(got);
    free(want);
    pw_state_close(s);
    pw_pipeline_destroy(fresh);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* PW_TEST_SLOW slows a rank without changing a bit; the stage times are
 * there to read. */
Test(rebalance, slow_rank_keeps_bits, .timeout = TIMEOUT)
{
    setenv("PW_TEST_SLOW", "1:2@2", 1);
    cr_assert_eq(pw_test_slow_factor(1, 1), 1.0);
    cr_assert_eq(pw_test_slow_factor(1, 2), 2.0);
    cr_assert_eq(pw_test_slow_factor(0, 9), 1.0);
    pw_graph *g = test_parse(MLP, "rebalance.graph");
    pw_dataset *d = image_data();
    int64_t n_ref, n;
    int moved;
    float *got = run(g, d, 2, PW_SCHEDULE_1F1B, 1, 1, &n, &moved);
    unsetenv("PW_TEST_SLOW"); /* read once: still in force here, which is what we want */
    float *ref = run(g, d, 2, PW_SCHEDULE_1F1B, 1, 0, &n_ref, &moved);
    expect_same(got, ref, n, "PW_TEST_SLOW");
    pw_pipeline *pl = make(g, d, 2, PW_SCHEDULE_1F1B, 1);
    cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK);
    double busy[2];
    cr_assert_eq(pw_pipeline_rank_busy(pl, busy), PW_OK);
    cr_assert(busy[0] > 0 && busy[1] > 0, "busy %g %g", busy[0], busy[1]);
    pw_pipeline_destroy(pl);
    free(got);
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---- the decision (stages/plan/rebalancer.h), fed with chosen stage times ---- */

#include "graph/partition.h"
#include "stages/plan/rebalancer.h"

/* A 4-stage 1F1B rebalancer over the MLP at the FLOPs model; each rank's
 * busy time per step is the model's for its chunk × slow[r]. Returns the
 * step of the first proposed move (0: none within 60 steps) and its cuts. */
static int64_t first_move_of(const pw_graph *g, const double *slow, int64_t budget, int *moved_to, char *why,
                             size_t n, int alternate);
static int64_t first_move(const pw_graph *g, const double *slow, int64_t budget, int *moved_to, char *why, size_t n)
{
    return first_move_of(g, slow, budget, moved_to, why, n, 0);
}

/* With `alternate`, the slow rank changes every window (rank r's factor
 * moves to rank r + 2): a machine whose contention wanders. */
static int64_t first_move_of(const pw_graph *g, const double *slow, int64_t budget, int *moved_to, char *why,
                             size_t n, int alternate)
{
    pw_schedule_config sc = {.kind = PW_SCHEDULE_1F1B, .n_stages = 4, .n_micro = 8};
    pw_schedule *s;
    pw_schedule_report *rep;
    cr_assert_eq(pw_schedule_generate(&sc, &s), PW_OK);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK);
    pw_partition part;
    cr_assert_eq(pw_partition_make(g, 4, PW_PARTITION_FLOPS, &part), PW_OK);
    pw_rebalancer_config rc = pw_rebalancer_defaults();
    rc.mode = PW_REBALANCE_AUTO;
    rc.plan.graph = g;
    rc.plan.stages = 4;
    rc.plan.micro_batches = 8;
    rc.plan.micro_batch_size = 16;
    rc.plan.memory_budget = budget;
    rc.schedule = s;
    rc.report = rep;
    pw_rebalancer *rb;
    cr_assert_eq(pw_rebalancer_create(&rc, part.begin, &rb), PW_OK, "%s", pw_last_error());
    /* The model's busy time per step of each chunk (speed 1). */
    pw_partition_config pc;
    pw_plan_partition_config(&rc.plan, 4, rep->peak_inflight_chunk, &pc);
    pw_partition ev;
    cr_assert_eq(pw_partition_evaluate(g, &pc, part.begin, &ev), PW_OK);
    double busy[4];
    int64_t at = 0;
    for (int64_t step = 1; step <= 60 && !at; step++) {
        const int shift = alternate ? 2 * (int)((step - 2) / 8) : 0; /* windows: steps 2-9, 10-17, ... */
        for (int r = 0; r < 4; r++)
            busy[r] = slow[(r + 4 - shift % 4) % 4] *
                      (8 * (ev.stage[r].f + ev.stage[r].b + ev.stage[r].w) + ev.stage[r].optim);
        pw_rebalance_decision d;
        cr_assert_eq(pw_rebalancer_observe(rb, step, busy, 1e-3, &d), PW_OK, "%s", pw_last_error());
        if (d.decided) snprintf(why, n, "%s", d.why);
        if (d.move) {
            at = step;
            memcpy(moved_to, d.new_cuts, 5 * sizeof(int));
            cr_assert_gt(d.predicted_gain, 0.05);
        }
    }
    pw_partition_free(&ev);
    pw_partition_free(&part);
    pw_rebalancer_destroy(rb);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    return at;
}

Test(rebalance, decides_from_the_measured_times)
{
    pw_graph *g = test_parse(MLP, "rebalance.graph");
    int cuts[5];
    char why[256] = "";
    /* As the model says: no move. */
    const double even[4] = {1, 1, 1, 1};
    cr_assert_eq(first_move(g, even, 0, cuts, why, sizeof why), 0, "moved on equal speeds");
    cr_assert(strstr(why, "best") || strstr(why, "below"), "%s", why);
    /* Rank 2 three times slower: its chunk shrinks, within two windows (AUTO confirms). */
    const double slow2[4] = {1, 1, 3, 1};
    pw_partition part;
    cr_assert_eq(pw_partition_make(g, 4, PW_PARTITION_FLOPS, &part), PW_OK);
    const int64_t at = first_move(g, slow2, 0, cuts, why, sizeof why);
    cr_assert(at > 0 && at <= 20, "moved at step %lld (%s)", (long long)at, why);
    cr_assert_lt(cuts[3] - cuts[2], part.begin[3] - part.begin[2], "stage 2 did not lose nodes: [%d,%d)", cuts[2],
                 cuts[3]);
    /* A budget the move would break (but the current cuts do not matter):
     * no move, and it says why. */
    cr_assert_eq(first_move(g, slow2, 4096, cuts, why, sizeof why), 0);
    cr_assert(strstr(why, "budget"), "%s", why);
    /* The slow rank wanders from window to window: each window wants other
     * cuts, and none is confirmed. */
    cr_assert_eq(first_move_of(g, slow2, 0, cuts, why, sizeof why, 1), 0, "moved after a wandering slowdown: %s",
                 why);
    cr_assert(strstr(why, "confirmed"), "%s", why);
    pw_partition_free(&part);
    pw_graph_destroy(g);
}

/* Rank 2 three times slower, as above; the rebalancer moves, and the step
 * time after the move is `after_s` (1e-3 before). Returns the first step
 * at which a move back was decided (0: none within 150 steps), after
 * making it, and whether a later proposal to the rejected cuts was turned
 * down with a reason (*rejected_why). */
static int64_t revert_after(const pw_graph *g, double after_s, int *reverted_to, int *first_cuts, char *why,
                            size_t n)
{
    pw_schedule_config sc = {.kind = PW_SCHEDULE_1F1B, .n_stages = 4, .n_micro = 8};
    pw_schedule *s;
    pw_schedule_report *rep;
    cr_assert_eq(pw_schedule_generate(&sc, &s), PW_OK);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK);
    pw_partition part;
    cr_assert_eq(pw_partition_make(g, 4, PW_PARTITION_FLOPS, &part), PW_OK);
    memcpy(first_cuts, part.begin, 5 * sizeof(int));
    pw_rebalancer_config rc = pw_rebalancer_defaults();
    rc.mode = PW_REBALANCE_AUTO;
    rc.plan.graph = g;
    rc.plan.stages = 4;
    rc.plan.micro_batches = 8;
    rc.plan.micro_batch_size = 16;
    rc.schedule = s;
    rc.report = rep;
    pw_rebalancer *rb;
    cr_assert_eq(pw_rebalancer_create(&rc, part.begin, &rb), PW_OK, "%s", pw_last_error());
    pw_partition_config pc;
    pw_plan_partition_config(&rc.plan, 4, rep->peak_inflight_chunk, &pc);
    pw_partition ev;
    cr_assert_eq(pw_partition_evaluate(g, &pc, part.begin, &ev), PW_OK);
    const double slow[4] = {1, 1, 3, 1};
    double busy[4];
    for (int r = 0; r < 4; r++) busy[r] = slow[r] * (8 * (ev.stage[r].f + ev.stage[r].b + ev.stage[r].w) + ev.stage[r].optim);
    int moved = 0, back = 0, measured = 0;
    int64_t back_at = 0;
    why[0] = '\0';
    for (int64_t step = 1; step <= 150; step++) {
        /* The busy times stay those of the first cuts: after a revert the
         * rebalancer sees what made it move the first time. */
        const double step_s = moved && !back ? after_s : 1e-3;
        pw_rebalance_decision d;
        cr_assert_eq(pw_rebalancer_observe(rb, step, busy, step_s, &d), PW_OK, "%s", pw_last_error());
        if (d.measured) measured++;
        if (back && d.decided) snprintf(why, n, "%s", d.why);
        if (!d.move) continue;
        if (d.refine) { /* a kept move's neighbours, measured (refines_* below): not the model's */
            cr_assert(moved && !back, "a refinement without a kept move: %s", d.why);
            pw_rebalancer_moved(rb, step, d.new_cuts, s, rep);
            continue;
        }
        cr_assert(!back, "moved again after the revert at step %lld: %s", (long long)back_at, d.why);
        if (d.revert) {
            cr_assert(moved, "a revert before any move");
            back = 1;
            back_at = step;
            memcpy(reverted_to, d.new_cuts, 5 * sizeof(int));
            cr_assert(strstr(d.why, "slower"), "%s", d.why);
        } else {
            cr_assert(!moved, "a second move without a revert: %s", d.why);
            moved = 1;
        }
        pw_rebalancer_moved(rb, step, d.new_cuts, s, rep);
    }
    cr_assert(moved, "no first move");
    cr_assert_geq(measured, 1, "the first move's gain was never measured");
    pw_partition_free(&ev);
    pw_partition_free(&part);
    pw_rebalancer_destroy(rb);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
    return back_at;
}

Test(rebalance, undoes_a_move_that_measured_slower)
{
    pw_graph *g = test_parse(MLP, "rebalance.graph");
    int back[5], first[5];
    char why[256];
    /* The step got 30 % slower after the move: back to the first cuts at
     * the end of the next window, and the same cuts are not proposed again
     * (the model still predicts a gain on these busy times). */
    const int64_t at = revert_after(g, 1.3e-3, back, first, why, sizeof why);
    cr_assert(at > 0, "the slower move was not undone");
    cr_assert_arr_eq(back, first, 5 * sizeof(int), "reverted to other cuts than the first");
    cr_assert(strstr(why, "undone"), "a proposal to the rejected cuts, or no reason: %s", why);
    /* 3 % slower is within the noise a move must beat (min_gain 5 %): kept.
     * And a faster step is kept, of course. */
    cr_assert_eq(revert_after(g, 1.03e-3, back, first, why, sizeof why), 0);
    cr_assert_eq(revert_after(g, 0.6e-3, back, first, why, sizeof why), 0);
    pw_graph_destroy(g);
}

/* ---- measured refinement and the window's restart, on hand-made step times ---- */

/* A hand-made run of the decision: S stages of the MLP (1F1B, 8
 * micro-batches) from `start` (NULL: the FLOPs partition). Each step rank
 * r is busy for the model's time of its chunk at the current cuts ×
 * hr_slow(r, step), the step takes hr_step(cuts, step), both × a
 * deterministic noise in ±noise; the moves decided are made. */
typedef struct hand_log {
    int decided, move, refine, revert, restarted;
    double busy[4];              /* the decision's median busy times */
    int cuts[5];                 /* after the step */
} hand_log;

typedef struct hand_run {
    int S;
    const int *start;
    double noise;
    int64_t steps;
    double (*slow)(int r, int64_t step);
    double (*step_time)(const int *cuts, int64_t step);
    /* out */
    int cuts[5];                 /* at the end */
    int moves, refines, restarts;
    int64_t last_move;
    hand_log *log;               /* [steps + 1], malloc'ed */
} hand_run;

static double unit_slow(int r, int64_t step) { (void)r, (void)step; return 1.0; }

static void hand(const pw_graph *g, hand_run *hr)
{
    const int S = hr->S;
    pw_schedule_config sc = {.kind = PW_SCHEDULE_1F1B, .n_stages = S, .n_micro = 8};
    pw_schedule *s;
    pw_schedule_report *rep;
    cr_assert_eq(pw_schedule_generate(&sc, &s), PW_OK);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    cr_assert_eq(pw_schedule_validate(s, &rep), PW_OK);
    pw_partition part;
    cr_assert_eq(pw_partition_make(g, S, PW_PARTITION_FLOPS, &part), PW_OK);
    if (hr->start) memcpy(part.begin, hr->start, sizeof(int) * (size_t)(S + 1));
    memcpy(hr->cuts, part.begin, sizeof(int) * (size_t)(S + 1));
    pw_rebalancer_config rc = pw_rebalancer_defaults();
    rc.mode = PW_REBALANCE_AUTO;
    rc.plan.graph = g;
    rc.plan.stages = S;
    rc.plan.micro_batches = 8;
    rc.plan.micro_batch_size = 16;
    rc.schedule = s;
    rc.report = rep;
    pw_rebalancer *rb;
    cr_assert_eq(pw_rebalancer_create(&rc, hr->cuts, &rb), PW_OK, "%s", pw_last_error());
    pw_partition_config pc;
    pw_plan_partition_config(&rc.plan, S, rep->peak_inflight_chunk, &pc);
    hr->log = calloc((size_t)hr->steps + 1, sizeof *hr->log);
    hr->moves = hr->refines = hr->restarts = 0;
    hr->last_move = 0;
    uint64_t x = 88172645463325252ull; /* xorshift64: the same noise every run */
    for (int64_t step = 1; step <= hr->steps; step++) {
        pw_partition ev;
        cr_assert_eq(pw_partition_evaluate(g, &pc, hr->cuts, &ev), PW_OK);
        double busy[4];
        for (int r = 0; r < S; r++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            const double e = 1.0 + hr->noise * (2.0 * (double)(x >> 11) / 9007199254740992.0 - 1.0);
            busy[r] = e * hr->slow(r, step) * (8 * (ev.stage[r].f + ev.stage[r].b + ev.stage[r].w) + ev.stage[r].optim);
        }
        pw_partition_free(&ev);
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        const double e = 1.0 + hr->noise * (2.0 * (double)(x >> 11) / 9007199254740992.0 - 1.0);
        pw_rebalance_decision d;
        cr_assert_eq(pw_rebalancer_observe(rb, step, busy, e * hr->step_time(hr->cuts, step), &d), PW_OK, "%s",
                     pw_last_error());
        hand_log *l = &hr->log[step];
        *l = (hand_log){.decided = d.decided, .move = d.move, .refine = d.refine, .revert = d.revert,
                        .restarted = d.restarted};
        memcpy(l->busy, d.rank_busy_s, sizeof(double) * (size_t)S);
        hr->restarts += d.restarted;
        memcpy(l->cuts, hr->cuts, sizeof(int) * (size_t)(S + 1));
        if (!d.move) continue;
        if (d.refine) cr_assert(isnan(d.predicted_gain), "a refinement with a prediction: %s", d.why);
        hr->moves++;
        hr->refines += d.refine;
        hr->last_move = step;
        memcpy(hr->cuts, d.new_cuts, sizeof(int) * (size_t)(S + 1));
        pw_rebalancer_moved(rb, step, hr->cuts, s, rep);
        memcpy(l->cuts, hr->cuts, sizeof(int) * (size_t)(S + 1));
    }
    pw_partition_free(&part);
    pw_rebalancer_destroy(rb);
    pw_schedule_report_destroy(rep);
    pw_schedule_destroy(s);
}

/* Refinement: the step time of 2 stages is 1 ms × (1 + 12 % per node
 * between the cut and `true_cut`), 2 ms from the start's bad cut; the
 * model, whose busy times are exact, goes to `model_cut`. */
static int true_cut, model_cut;
static double cut_time(const int *cuts, int64_t step)
{
    (void)step;
    return cuts[1] == 1 ? 2e-3 : 1e-3 * (1.0 + 0.12 * abs(cuts[1] - true_cut));
}
static double flat_time(const int *cuts, int64_t step)
{
    (void)step;
    return cuts[1] == 1 ? 2e-3 : 1e-3;
}

Test(rebalance, refines_to_the_measured_best_neighbour_and_stops)
{
    pw_graph *g = test_parse(MLP, "rebalance.graph");
    /* Flat step times around the model's cut: it moves there once. */
    const int start[3] = {0, 1, 11};
    hand_run hr = {.S = 2, .start = start, .steps = 300, .slow = unit_slow, .step_time = flat_time};
    hand(g, &hr);
    model_cut = hr.cuts[1];
    cr_assert(model_cut > 2 && model_cut < 9, "the model's cut %d leaves no room for the test", model_cut);
    /* Nothing better nearby: each neighbour is tried once, the run goes
     * back and stays (the model's move, at most two trials, the way back),
     * with a ±3 % noise too. */
    cr_assert_leq(hr.moves, 4, "%d moves on flat step times", hr.moves);
    cr_assert_leq(hr.last_move, 60, "still moving at step %lld", (long long)hr.last_move);
    free(hr.log);
    hand_run noisy = {.S = 2, .start = start, .steps = 400, .noise = 0.03, .slow = unit_slow, .step_time = flat_time};
    hand(g, &noisy);
    cr_assert_eq(noisy.cuts[1], model_cut, "a ±3 %% noise took the run from the model's cut %d to %d", model_cut,
                 noisy.cuts[1]);
    cr_assert_leq(noisy.moves, 4, "%d moves on flat step times with noise", noisy.moves);
    cr_assert_leq(noisy.last_move, 60, "still moving at step %lld", (long long)noisy.last_move);
    cr_assert_eq(noisy.restarts, 0, "the window restarted %d times on noise", noisy.restarts);
    free(noisy.log);
    /* The fastest cut two nodes from the model's, either side, with and
     * without a ±3 % noise: the refinement walks there node by node, keeps
     * it, and moves no more (the model's own cut measured slower, so its
     * proposals back are refused). */
    for (int side = -1; side <= 1; side += 2)
        for (int noisy = 0; noisy < 2; noisy++) {
            true_cut = model_cut + 2 * side;
            hand_run h = {.S = 2, .start = start, .steps = 400, .noise = noisy ? 0.03 : 0, .slow = unit_slow,
                          .step_time = cut_time};
            hand(g, &h);
            cr_assert_eq(h.cuts[1], true_cut, "ended at cut %d, the fastest is %d (model %d, noise %d)", h.cuts[1],
                         true_cut, model_cut, noisy);
            cr_assert_geq(h.refines, 2, "%d refinement moves", h.refines);
            cr_assert_leq(h.moves, 1 + 5 + 1, "%d moves: hunting", h.moves);
            cr_assert_leq(h.last_move, 120, "still moving at step %lld", (long long)h.last_move);
            cr_assert_eq(h.restarts, 0, "the window restarted %d times on moves and noise", h.restarts);
            free(h.log);
        }
    pw_graph_destroy(g);
}

/* The window restarts: rank 2 of 4 three times slower from step
 * `jump_at` to `jump_end`, the step time twice as long. */
static int64_t jump_at, jump_end;
static double jump_slow(int r, int64_t step) { return r == 2 && step >= jump_at && step < jump_end ? 3.0 : 1.0; }
static double jump_time(const int *cuts, int64_t step)
{
    (void)cuts;
    return step >= jump_at && step < jump_end ? 2e-3 : 1e-3;
}

Test(rebalance, restarts_the_window_when_the_step_time_jumps)
{
    pw_graph *g = test_parse(MLP, "rebalance.graph");
    /* Where the model goes when rank 2 is slow from the start. */
    int want[5];
    char why[256];
    const double slow2[4] = {1, 1, 3, 1};
    cr_assert_gt(first_move(g, slow2, 0, want, why, sizeof why), 0, "%s", why);
    /* The slowdown half-way into the window of steps 74-81: without a
     * restart that window decides on half the steps before it. */
    jump_at = 78;
    jump_end = 1000;
    hand_run hr = {.S = 4, .steps = 140, .slow = jump_slow, .step_time = jump_time};
    hand(g, &hr);
    const double slow_busy = 3.0 * hr.log[jump_at - 5].busy[2]; /* decided on steps 66-73 */
    cr_assert(hr.log[jump_at - 5].decided && slow_busy > 0);
    int64_t restart = 0, moved = 0;
    for (int64_t s = jump_at; s <= hr.steps; s++) {
        if (hr.log[s].restarted && !restart) restart = s;
        if (hr.log[s].move && !moved) {
            moved = s;
            cr_assert(!hr.log[s].refine, "the first move after the jump is a refinement");
        }
        /* Every decision after the jump, until the move, on steps after it. */
        if (hr.log[s].decided && !moved)
            cr_assert_float_eq(hr.log[s].busy[2], slow_busy, 1e-12,
                               "step %lld decided on stage 2 busy %g, after the jump %g: a window from before it",
                               (long long)s, hr.log[s].busy[2], slow_busy);
    }
    cr_assert_eq(restart, jump_at + 2, "the window restarted at step %lld (the jump at %lld)", (long long)restart,
                 (long long)jump_at);
    cr_assert(moved > 0 && moved <= jump_at + 20, "the move came at step %lld", (long long)moved);
    cr_assert_arr_eq(hr.log[moved].cuts, want, sizeof want, "moved to other cuts than a run slowed from the start");
    free(hr.log);
    /* The slowdown ends: a jump down restarts it too. One or two slow
     * steps (a spike) and ±3 % noise do not. */
    jump_at = 40, jump_end = 100;
    hand_run down = {.S = 4, .steps = 130, .slow = jump_slow, .step_time = jump_time};
    hand(g, &down);
    int ups = 0, downs = 0;
    for (int64_t s = 1; s <= down.steps; s++)
        if (down.log[s].restarted) *(s < jump_end ? &ups : &downs) += 1;
    cr_assert_eq(ups, 1, "%d restarts after the slowdown began", ups);
    cr_assert_geq(downs, 1, "no restart when the slowdown ended");
    free(down.log);
    jump_at = 50, jump_end = 52;
    hand_run spike = {.S = 4, .steps = 150, .noise = 0.03, .slow = jump_slow, .step_time = jump_time};
    hand(g, &spike);
    cr_assert_eq(spike.restarts, 0, "a 2-step spike restarted the window");
    cr_assert_eq(spike.moves, 0, "moved %d times on a spike and noise", spike.moves);
    free(spike.log);
    pw_graph_destroy(g);
}

Test(rebalance, parses_the_mode)
{
    pw_rebalance_mode m;
    int every;
    cr_assert_eq(pw_rebalance_parse("auto", &m, &every), PW_OK);
    cr_assert_eq(m, PW_REBALANCE_AUTO);
    cr_assert_eq(pw_rebalance_parse("every:25", &m, &every), PW_OK);
    cr_assert(m == PW_REBALANCE_EVERY && every == 25);
    cr_assert_eq(pw_rebalance_parse("off", &m, &every), PW_OK);
    cr_assert_eq(m, PW_REBALANCE_OFF);
    const char *bad[] = {"every:1", "every:", "every:x", "sometimes", "every:5x", ""};
    for (int i = 0; i < 6; i++) cr_assert_eq(pw_rebalance_parse(bad[i], &m, &every), PW_ERR_INVALID_ARG, "%s", bad[i]);
}

/* ---- pipeline-run's flags ---- */

/* Runs pipeline-run with `args` in the scratch directory; its exit status,
 * and its output in *out (malloc'ed). */
static int cli(const char *args, char **out)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s/pipeline-run' %s 2>&1", tmpdir(), PW_BINARY_DIR, args);
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p);
    size_t cap = 1 << 16, n = 0, k;
    char *buf = malloc(cap);
    while ((k = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += k;
        if (n + 1 >= cap) buf = realloc(buf, cap *= 2);
    }
    buf[n] = 0;
    int st = pclose(p);
    *out = buf;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Test(rebalance, cli_flags, .timeout = TIMEOUT)
{
    FILE *f = fopen(tmp_path("m.graph"), "w");
    cr_assert_not_null(f);
    fputs(MLP, f);
    fclose(f);
    const char *base = "m.graph --data synthetic:480:24:5 --stages 2 --batch 24 --micro-batches 4 --no-pin";
    const char *bad[] = {"--rebalance sometimes", "--rebalance every:1", "--rebalance-gain 0", "--rebalance-at 0:3",
                         "--rebalance-at 2:3,4", "--rebalance-at 2:11", "--rebalance-at 2:x", "--rebalance auto --plan"};
    for (int i = 0; i < 8; i++) {
        char args[512], *out;
        snprintf(args, sizeof args, "%s --steps 4 %s", base, bad[i]);
        cr_expect_eq(cli(args, &out), 2, "%s: want exit 2\n%s", bad[i], out);
        cr_expect(strstr(out, "rebalance"), "%s: the message does not name the flag\n%s", bad[i], out);
        free(out);
    }
    /* Forced moves both ways, with the automatic mode on: said, logged, and
     * the weights of the run that never moved. */
    char args[1024], *out;
    snprintf(args, sizeof args, "%s --steps 30 --optimizer adamw --rebalance-at 3:4/9:7 --rebalance every:5 "
             "--metrics m.jsonl --save moved.st", base);
    cr_assert_eq(cli(args, &out), 0, "%s", out);
    cr_assert(strstr(out, "-> [0,4) [4,11) (--rebalance-at)"), "%s", out);
    cr_assert(strstr(out, "rebalance after step 9:"), "%s", out);
    free(out);
    snprintf(args, sizeof args, "%s --steps 30 --optimizer adamw --save still.st", base);
    cr_assert_eq(cli(args, &out), 0, "%s", out);
    free(out);
    snprintf(args, sizeof args, "cmp moved.st still.st && grep -q '\"type\":\"rebalance\",\"step\":3,\"forced\":true,\"revert\":false,\"refine\":false' "
             "m.jsonl");
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "cd '%s' && %s", tmpdir(), args);
    cr_assert_eq(system(cmd), 0, "the moved run's weights differ from the still one's, or the move is not logged");
}
