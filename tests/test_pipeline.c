/* Tests: graphs trained through the engine are bit-identical to one stage,
 * for every schedule, stage count and micro-batch count; stash high-water
 * marks equal the validator's prediction; user CSV schedules; partitions. */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "runtime/log.h"
#include "runtime/topology.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "stages/plan/plan.h"
#include "stages/plan/profile.h"
#include "stages/train/trainer.h"
#include "tests/pipeline_support.h"

#define TIMEOUT 120

/* 11 nodes; h1 is used again after the cut, so with four stages a value
 * crosses several boundaries. */
static const char *MLP = "graph p_mlp\n" PW_TEST_MLP_BODY;

static pw_graph *parse(const char *text) { return test_parse(text, "p.graph"); }

static pw_dataset *data(void)
{
    pw_synthetic_config sc = {.n = 256, .sample_shape = {.ndim = 2, .d = {4, 6}},
                              .n_classes = 5, .seed = 3, .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

/* Flat copy of all parameters in graph order. */
static float *params_of(pw_program *const *progs, int n, const pw_graph *g, int64_t *count)
{
    int64_t total = 0;
    for (int i = 0; i < g->n_params; i++) total += pw_shape_numel(&g->params[i].shape);
    float *out = calloc((size_t)total, sizeof(float));
    int64_t off = 0;
    for (int i = 0; i < g->n_params; i++) {
        int64_t k = pw_shape_numel(&g->params[i].shape);
        int found = 0;
        for (int s = 0; s < n && !found; s++) {
            for (int j = 0; j < pw_program_n_params(progs[s]); j++) {
                pw_program_param pp;
                pw_program_param_at(progs[s], j, &pp);
                if (pp.graph_param == i) {
                    memcpy(out + off, pp.data, (size_t)k * 4);
                    found = 1;
                    break;
                }
            }
        }
        cr_assert(found, "parameter %s held by no stage", g->params[i].name);
        off += k;
    }
    *count = total;
    return out;
}

static const int STEPS = 3;
static const int64_t BATCH = 16;

static float *reference(const pw_graph *g, const pw_dataset *d, int M, int64_t *n)
{
    pw_trainer_config tc = {.graph = g, .train = d, .batch = BATCH, .micro_batches = M,
                            .optim = pw_optim_defaults(PW_OPTIM_ADAMW), .seed = 7, .shuffle = 1};
    pw_trainer *t;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < STEPS; i++) cr_assert_eq(pw_trainer_step(t, NULL), PW_OK, "%s", pw_last_error());
    pw_program *p = pw_trainer_program(t);
    float *out = params_of(&p, 1, g, n);
    pw_trainer_destroy(t);
    return out;
}

typedef struct case_t {
    pw_schedule_kind kind;
    int split_w;
    int stages;
} case_t;

ParameterizedTestParameters(pipeline, bit_exact)
{
    static case_t cases[16];
    int n = 0;
    for (int k = 0; k < 2; k++)
        for (int w = 0; w < 2; w++)
            for (int s = 1; s <= 4; s++)
                cases[n++] = (case_t){k ? PW_SCHEDULE_1F1B : PW_SCHEDULE_GPIPE, w, s};
    return cr_make_param_array(case_t, cases, (size_t)n);
}

ParameterizedTest(case_t *c, pipeline, bit_exact, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = data();
    for (int M = 1; M <= 8; M *= 2) {
        int64_t n_ref, n;
        float *ref = reference(g, d, M, &n_ref);
        pw_pipeline_config pc = pw_pipeline_defaults();
        pc.graph = g;
        pc.train = d;
        pc.batch = BATCH;
        pc.micro_batches = M;
        pc.stages = c->stages;
        pc.schedule = c->kind;
        pc.split_w = c->split_w;
        pc.partition = PW_PARTITION_FLOPS;
        pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
        pc.seed = 7;
        pc.shuffle = 1;
        pc.pin = 0;
        pc.check = 1;
        pc.watchdog_s = 30;
        pw_pipeline *pl;
        cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
        for (int i = 0; i < STEPS; i++)
            cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
        pw_program *progs[4];
        for (int s = 0; s < c->stages; s++) progs[s] = pw_pipeline_program(pl, s);
        float *got = params_of(progs, c->stages, g, &n);
        cr_assert_eq(n, n_ref);
        int64_t first = -1, ndiff = 0;
        for (int64_t i = 0; i < n; i++)
            if (memcmp(&got[i], &ref[i], 4) != 0) {
                if (first < 0) first = i;
                ndiff++;
            }
        cr_assert_eq(ndiff, 0, "%s split_w=%d S=%d M=%d: %lld of %lld parameters differ from one "
                     "stage (first at %lld: %.9g vs %.9g)", pw_schedule_kind_name(c->kind),
                     c->split_w, c->stages, M, (long long)ndiff, (long long)n, (long long)first,
                     first >= 0 ? got[first] : 0.0, first >= 0 ? ref[first] : 0.0);
        /* Stash high-water mark = validator = theory. */
        for (int s = 0; s < c->stages; s++) {
            pw_pipeline_stage_stats ss;
            pw_pipeline_stage_stats_get(pl, s, &ss);
            int theory = pw_schedule_theoretical_peak(c->kind, c->stages, M, s);
            cr_assert_eq(ss.slots, theory, "stage %d: validator %d vs theory %d", s, ss.slots, theory);
            cr_assert_eq(ss.peak_slots, theory, "%s S=%d M=%d stage %d: measured peak %d, theory %d",
                         pw_schedule_kind_name(c->kind), c->stages, M, s, ss.peak_slots, theory);
        }
        free(got);
        free(ref);
        pw_pipeline_destroy(pl);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(pipeline, loss_and_evaluation_match_one_stage, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = data();
    pw_trainer_config tc = {.graph = g, .train = d, .batch = BATCH, .micro_batches = 4,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .seed = 7};
    pw_trainer *t;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK);
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = BATCH;
    pc.micro_batches = 4;
    pc.stages = 3;
    pc.seed = 7;
    pc.pin = 0;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < 5; i++) {
        pw_step_stats a, b;
        cr_assert_eq(pw_trainer_step(t, &a), PW_OK);
        cr_assert_eq(pw_pipeline_step(pl, &b), PW_OK, "%s", pw_last_error());
        cr_assert_eq(a.loss, b.loss, "step %d: loss %.17g vs %.17g", i, a.loss, b.loss);
        cr_assert_eq(a.accuracy, b.accuracy);
    }
    pw_eval_stats ea, eb;
    cr_assert_eq(pw_trainer_evaluate(t, d, &ea), PW_OK);
    cr_assert_eq(pw_pipeline_evaluate(pl, d, &eb), PW_OK, "%s", pw_last_error());
    cr_assert_eq(ea.loss, eb.loss);
    cr_assert_eq(ea.accuracy, eb.accuracy);
    /* Evaluation must not disturb training: one more step still matches. */
    pw_step_stats a, b;
    cr_assert_eq(pw_trainer_step(t, &a), PW_OK);
    cr_assert_eq(pw_pipeline_step(pl, &b), PW_OK, "%s", pw_last_error());
    cr_assert_eq(a.loss, b.loss);
    pw_pipeline_destroy(pl);
    pw_trainer_destroy(t);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

static char *write_temp(const char *text)
{
    char *path = strdup("/tmp/pw_sched_XXXXXX.csv");
    int fd = mkstemps(path, 4);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

Test(pipeline, user_csv_schedule_runs_and_bad_one_is_refused, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = data();
    /* 1F1B on 2 stages, 4 micro-batches, written by hand (compute only). */
    char *good = write_temp("0F0,0F1,0B0,0F2,0B1,0F3,0B2,0B3,OPT\n"
                            "1F0,1B0,1F1,1B1,1F2,1B2,1F3,1B3,OPT\n");
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = BATCH;
    pc.micro_batches = 4;
    pc.stages = 2;
    pc.schedule_csv = good;
    pc.seed = 7;
    pc.pin = 0;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < STEPS; i++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    pw_program *progs[2] = {pw_pipeline_program(pl, 0), pw_pipeline_program(pl, 1)};
    int64_t n, nr;
    float *got = params_of(progs, 2, g, &n);
    pw_trainer_config tc = {.graph = g, .train = d, .batch = BATCH, .micro_batches = 4,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .seed = 7};
    pw_trainer *t;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK);
    for (int i = 0; i < STEPS; i++) cr_assert_eq(pw_trainer_step(t, NULL), PW_OK);
    pw_program *p1 = pw_trainer_program(t);
    float *ref = params_of(&p1, 1, g, &nr);
    cr_assert_eq(memcmp(got, ref, (size_t)n * 4), 0, "CSV schedule differs from one stage");
    free(got);
    free(ref);
    pw_trainer_destroy(t);
    pw_pipeline_destroy(pl);

    /* B of micro-batch 1 before its F on rank 1. */
    char *bad = write_temp("0F0,0F1,0B0,0F2,0B1,0F3,0B2,0B3,OPT\n"
                           "1F0,1B1,1F1,1B0,1F2,1B2,1F3,1B3,OPT\n");
    pc.schedule_csv = bad;
    cr_assert_neq(pw_pipeline_create(&pc, &pl), PW_OK);
    cr_assert(strstr(pw_last_error(), "rank 1"), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), bad), "%s", pw_last_error());
    unlink(good);
    unlink(bad);
    free(good);
    free(bad);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(pipeline, bad_configurations_are_refused, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = data();
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = BATCH;
    pc.micro_batches = 4;
    pc.stages = 12; /* more stages than nodes */
    pc.pin = 0;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "11 nodes"), "%s", pw_last_error());
    pc.stages = 3;
    pc.partition = PW_PARTITION_CUTS;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "cut"), "%s", pw_last_error());
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---- partition ---- */

static double bottleneck(const double *w, int n, const int *begin, int S)
{
    double worst = 0;
    for (int s = 0; s < S; s++) {
        double sum = 0;
        for (int i = begin[s]; i < begin[s + 1]; i++) sum += w[i];
        if (sum > worst) worst = sum;
    }
    (void)n;
    return worst;
}

/* Exhaustive best bottleneck over all placements of S−1 cuts. */
static double brute(const double *w, int n, int S, int *begin, int s, double best)
{
    if (s == S) {
        begin[S] = n;
        double b = bottleneck(w, n, begin, S);
        return b < best ? b : best;
    }
    for (int i = begin[s - 1] + 1; i <= n - (S - s); i++) {
        begin[s] = i;
        best = brute(w, n, S, begin, s + 1, best);
    }
    return best;
}

Test(partition, flops_balanced_is_optimal_on_random_chains, .timeout = TIMEOUT)
{
    srand(5);
    for (int trial = 0; trial < 40; trial++) {
        int layers = 2 + rand() % 6;
        char text[4096];
        size_t off = (size_t)snprintf(text, sizeof text, "input x : f32[8]\nlabel y : i32[]\n");
        const char *prev = "x";
        char name[32][16];
        for (int l = 0; l < layers; l++) {
            snprintf(name[l], sizeof name[l], "l%d", l);
            off += (size_t)snprintf(text + off, sizeof text - off, "%s = linear(%s, out=%d)\n",
                                    name[l], prev, 4 + rand() % 60);
            prev = name[l];
        }
        snprintf(text + off, sizeof text - off, "o = linear(%s, out=3)\nloss = softmax_cross_entropy(o, y)\n",
                 prev);
        pw_graph *g = parse(text);
        double w[64];
        for (int i = 0; i < g->n_nodes; i++) {
            pw_op_cost c;
            pw_graph_node_cost(g, i, &c);
            /* The first layer reads the data input: no input gradient. */
            w[i] = c.flops_fwd + (i > 0 ? c.flops_bwd_input : 0.0) + c.flops_bwd_weight;
        }
        for (int S = 1; S <= g->n_nodes && S <= 5; S++) {
            pw_partition pt;
            cr_assert_eq(pw_partition_make(g, S, PW_PARTITION_FLOPS, &pt), PW_OK, "%s", pw_last_error());
            cr_assert_eq(pt.begin[0], 0);
            cr_assert_eq(pt.begin[S], g->n_nodes);
            for (int s = 0; s < S; s++) cr_assert_lt(pt.begin[s], pt.begin[s + 1], "empty stage");
            int begin[8] = {0};
            double best = brute(w, g->n_nodes, S, begin, 1, 1e300);
            double got = bottleneck(w, g->n_nodes, pt.begin, S);
            cr_assert_leq(got, best * (1 + 1e-9), "trial %d S=%d: bottleneck %g, optimum %g", trial,
                          S, got, best);
            pw_partition_free(&pt);
        }
        pw_graph_destroy(g);
    }
}

/* ---- several chunks per rank, every generated kind ---- */

/* 17 nodes, 10 of them with parameters: enough for 4 ranks × 2 chunks. The
 * skip connection (a1 into r4) crosses several chunk boundaries. */
static const char *DEEP =
    "graph p_deep\n"
    "input image : f32[4, 6]\n"
    "label target : i32[]\n"
    "x = flatten(image)\n"
    "l1 = linear(x, out=12)\n"
    "a1 = relu(l1)\n"
    "l2 = linear(a1, out=12)\n"
    "n2 = layernorm(l2)\n"
    "l3 = linear(n2, out=12)\n"
    "a3 = gelu(l3)\n"
    "l4 = linear(a3, out=12)\n"
    "r4 = add(l4, a1)\n"
    "l5 = linear(r4, out=12)\n"
    "n5 = layernorm(l5)\n"
    "l6 = linear(n5, out=12)\n"
    "a6 = relu(l6)\n"
    "l7 = linear(a6, out=12)\n"
    "logits = linear(l7, out=5) as head\n"
    "loss = softmax_cross_entropy(logits, target)\n";

static const int64_t DEEP_BATCH = 48; /* a multiple of every M below (S·{1,2,4}, S ≤ 4) */

/* Parameters of every chunk of replica 0 (every bucket piece), chunk order. */
static float *pipeline_params(pw_pipeline *pl, const pw_graph *g, int64_t *n)
{
    int C = pw_pipeline_n_chunks(pl), k = 0;
    pw_program *progs[64];
    for (int c = 0; c < C; c++) {
        int got = pw_pipeline_programs(pl, 0, c, progs + k, 64 - k);
        cr_assert_gt(got, 0, "chunk %d has no program", c);
        k += got;
        cr_assert_leq(k, 64);
    }
    return params_of(progs, k, g, n);
}

static void assert_same_bytes(const float *got, const float *ref, int64_t n, const char *what)
{
    int64_t first = -1, ndiff = 0;
    double maxerr = 0;
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&got[i], &ref[i], 4) != 0) {
            if (first < 0) first = i;
            ndiff++;
            double e = got[i] > ref[i] ? got[i] - ref[i] : ref[i] - got[i];
            if (e > maxerr) maxerr = e;
        }
    cr_assert_eq(ndiff, 0, "%s: %lld of %lld parameters differ from one stage (first at %lld: %.9g vs "
                 "%.9g, max error %g)", what, (long long)ndiff, (long long)n, (long long)first,
                 first >= 0 ? got[first] : 0.0, first >= 0 ? ref[first] : 0.0, maxerr);
}

typedef struct kcase_t {
    pw_schedule_kind kind;
    int stages;
} kcase_t;

ParameterizedTestParameters(pipeline, every_kind_bit_exact)
{
    static const pw_schedule_kind kinds[] = {PW_SCHEDULE_GPIPE, PW_SCHEDULE_1F1B, PW_SCHEDULE_INTERLEAVED,
                                             PW_SCHEDULE_ZB_H1, PW_SCHEDULE_ZB_H2, PW_SCHEDULE_ZB_V};
    static kcase_t cases[6 * 4];
    int n = 0;
    for (int k = 0; k < 6; k++)
        for (int s = 1; s <= 4; s++) cases[n++] = (kcase_t){kinds[k], s};
    return cr_make_param_array(kcase_t, cases, (size_t)n);
}

/* kind × stages × M ∈ {S, 2S, 4S}: parameters after two steps equal one stage
 * byte for byte; each chunk's measured stash peak equals the validator's, and
 * each rank's the closed form; the theoretical bubble is the closed form. */
ParameterizedTest(kcase_t *c, pipeline, every_kind_bit_exact, .timeout = TIMEOUT)
{
    pw_graph *g = parse(DEEP);
    pw_dataset *d = data();
    const int S = c->stages;
    for (int M = S; M <= 4 * S; M *= 2) {
        pw_trainer_config tc = {.graph = g, .train = d, .batch = DEEP_BATCH, .micro_batches = M,
                                .optim = pw_optim_defaults(PW_OPTIM_ADAMW), .seed = 7, .shuffle = 1};
        pw_trainer *t;
        cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "%s", pw_last_error());
        for (int i = 0; i < 2; i++) cr_assert_eq(pw_trainer_step(t, NULL), PW_OK, "%s", pw_last_error());
        int64_t n_ref, n;
        pw_program *p1 = pw_trainer_program(t);
        float *ref = params_of(&p1, 1, g, &n_ref);
        pw_trainer_destroy(t);

        pw_pipeline_config pc = pw_pipeline_defaults();
        pc.graph = g;
        pc.train = d;
        pc.batch = DEEP_BATCH;
        pc.micro_batches = M;
        pc.stages = S;
        pc.schedule = c->kind;
        pc.partition = PW_PARTITION_FLOPS;
        pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
        pc.seed = 7;
        pc.shuffle = 1;
        pc.pin = 0;
        pc.check = 1;
        pc.watchdog_s = 30;
        pw_pipeline *pl;
        cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s S=%d M=%d: %s", pw_schedule_kind_name(c->kind),
                     S, M, pw_last_error());
        const int v = c->kind == PW_SCHEDULE_INTERLEAVED || c->kind == PW_SCHEDULE_ZB_V ? 2 : 1;
        cr_assert_eq(pw_pipeline_chunks_per_rank(pl), v);
        cr_assert_eq(pw_pipeline_n_chunks(pl), S * v);
        for (int i = 0; i < 2; i++)
            cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
        float *got = pipeline_params(pl, g, &n);
        cr_assert_eq(n, n_ref);
        char what[96];
        snprintf(what, sizeof what, "%s S=%d M=%d", pw_schedule_kind_name(c->kind), S, M);
        assert_same_bytes(got, ref, n, what);

        pw_schedule_config sc = {.kind = c->kind, .n_stages = S, .n_micro = M};
        for (int ch = 0; ch < S * v; ch++) {
            pw_pipeline_stage_stats ss;
            pw_pipeline_stage_stats_get(pl, ch, &ss);
            cr_assert_gt(ss.slots, 0);
            cr_assert_eq(ss.peak_slots, ss.slots, "%s chunk %d: measured peak %d, validator %d", what, ch,
                         ss.peak_slots, ss.slots);
            cr_assert_eq(ss.rank, pw_schedule_rank_of(pw_pipeline_schedule(pl), ch));
        }
        const pw_schedule_report *rep = pw_pipeline_report(pl);
        for (int r = 0; r < S; r++)
            cr_assert_eq(rep->peak_inflight[r], pw_schedule_config_peak(&sc, r), "%s rank %d: validator %d, "
                         "closed form %d", what, r, rep->peak_inflight[r], pw_schedule_config_peak(&sc, r));
        double tb = pw_pipeline_theory_bubble(pl);
        cr_assert_geq(tb, 0.0, "%s: theoretical bubble %g", what, tb);
        cr_assert_eq(tb, pw_schedule_config_bubble(&sc));
        free(got);
        free(ref);
        pw_pipeline_destroy(pl);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(pipeline, interleaved_three_chunks_and_csv_with_two_chunks_per_rank, .timeout = TIMEOUT)
{
    pw_graph *g = parse(DEEP);
    pw_dataset *d = data();
    const int M = 4;
    pw_trainer_config tc = {.graph = g, .train = d, .batch = DEEP_BATCH, .micro_batches = M,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .seed = 7};
    pw_trainer *t;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < 2; i++) cr_assert_eq(pw_trainer_step(t, NULL), PW_OK);
    int64_t n_ref, n;
    pw_program *p1 = pw_trainer_program(t);
    float *ref = params_of(&p1, 1, g, &n_ref);
    pw_trainer_destroy(t);

    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = DEEP_BATCH;
    pc.micro_batches = M;
    pc.stages = 2;
    pc.schedule = PW_SCHEDULE_INTERLEAVED;
    pc.chunks_per_rank = 3;
    pc.seed = 7;
    pc.pin = 0;
    pc.check = 1;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_pipeline_n_chunks(pl), 6);
    for (int i = 0; i < 2; i++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    float *got = pipeline_params(pl, g, &n);
    assert_same_bytes(got, ref, n, "interleaved v=3");
    free(got);

    /* The same schedule through a CSV file. */
    char path[] = "/tmp/pw_sched_v3_XXXXXX.csv";
    int fd = mkstemps(path, 4);
    cr_assert_geq(fd, 0);
    close(fd);
    cr_assert_eq(pw_schedule_save_csv(pw_pipeline_schedule(pl), path), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
    pc.schedule_csv = path;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_pipeline_chunks_per_rank(pl), 3);
    cr_assert_geq(pw_pipeline_theory_bubble(pl), 0.0);
    for (int i = 0; i < 2; i++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    got = pipeline_params(pl, g, &n);
    assert_same_bytes(got, ref, n, "CSV with 3 chunks per rank");
    /* Evaluation goes through the chunks in chunk order. */
    pw_eval_stats e;
    cr_assert_eq(pw_pipeline_evaluate(pl, d, &e), PW_OK, "%s", pw_last_error());
    cr_assert_eq(e.samples, d->n);
    pw_pipeline_destroy(pl);
    unlink(path);
    free(got);
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---- a tiny GPT whose head is tied to the token embedding ---- */

static pw_graph *tiny_gpt(void)
{
    const int T = 8, D = 16, H = 2, V = 256;
    const double p = 0.1;
    char text[4096];
    snprintf(text, sizeof text,
             "graph tiny_tied_gpt\n"
             "input tokens : i32[%d]\n"
             "label next : i32[%d]\n"
             "tok = embedding(tokens, vocab=%d, dim=%d) as wte\n"
             "pos = pos_embedding(tok, max=%d) as wpe\n"
             "x0  = dropout(pos, p=%g)\n"
             "h = repeat 2 as h (x = x0) {\n"
             "  a   = layernorm(x) as ln_1\n"
             "  qkv = linear(a, out=%d) as attn.c_attn\n"
             "  att = causal_attention(qkv, heads=%d)\n"
             "  o   = linear(att, out=%d) as attn.c_proj\n"
             "  od  = dropout(o, p=%g)\n"
             "  x1  = add(x, od)\n"
             "  m   = layernorm(x1) as ln_2\n"
             "  fc  = linear(m, out=%d) as mlp.c_fc\n"
             "  g   = gelu(fc)\n"
             "  pr  = linear(g, out=%d) as mlp.c_proj\n"
             "  x2  = add(x1, pr)\n"
             "  return x2\n"
             "}\n"
             "hf = layernorm(h) as ln_f\n"
             "logits = linear(hf, out=%d, bias=false, weight=wte.weight) as lm_head\n"
             "loss = softmax_cross_entropy(logits, next)\n",
             T, T, V, D, T, p, 3 * D, H, D, p, 4 * D, D, V);
    return parse(text);
}

static pw_dataset *token_data(char *path)
{
    static const char *const sent[] = {"the quick brown fox jumps over the lazy dog. ",
                                       "a stitch in time saves nine. ", "all that glitters is not gold. "};
    int fd = mkstemps(path, 4);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    cr_assert_not_null(f);
    for (int i = 0; i < 120; i++) fputs(sent[(i * 7 + i / 3) % 3], f);
    fclose(f);
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_load_text(path, 8, 1, &d), PW_OK, "%s", pw_last_error());
    return d;
}

typedef struct gpt_run {
    pw_schedule_kind kind;
    int stages, recompute, replicas, sgd;
    double clip;        /* clip_grad_norm */
    double *norm;       /* (optional) out: the last step's gradient norm */
} gpt_run;

static float *run_gpt(const pw_graph *g, const pw_dataset *d, const gpt_run *r, double *losses, int64_t *n)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 16;
    pc.micro_batches = 4;
    pc.stages = r->stages;
    pc.schedule = r->kind;
    pc.recompute = r->recompute;
    pc.replicas = r->replicas;
    pc.clip_grad_norm = r->clip;
    pc.optim = pw_optim_defaults(r->sgd ? PW_OPTIM_SGD : PW_OPTIM_ADAMW);
    if (!r->sgd) pc.optim.lr = 3e-3f;
    pc.seed = 11;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.check = 1;
    pc.watchdog_s = 30;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    for (int i = 0; i < 2; i++) {
        pw_step_stats st;
        cr_assert_eq(pw_pipeline_step(pl, &st), PW_OK, "%s", pw_last_error());
        losses[i] = st.loss;
    }
    if (r->norm) *r->norm = pw_pipeline_grad_norm(pl);
    const int C = pw_pipeline_n_chunks(pl);
    for (int ch = 0; ch < C; ch++) {
        pw_pipeline_stage_stats ss;
        pw_pipeline_stage_stats_get(pl, ch, &ss);
        cr_assert_eq(ss.peak_slots, ss.slots, "%s S=%d chunk %d: measured peak %d, validator %d",
                     pw_schedule_kind_name(r->kind), r->stages, ch, ss.peak_slots, ss.slots);
    }
    /* Every copy of the tied weight holds the same bytes. */
    int wte = pw_graph_find_param(g, "wte.weight");
    cr_assert_geq(wte, 0);
    const float *first = NULL;
    for (int k = 0; k < (r->replicas > 0 ? r->replicas : 1); k++)
        for (int ch = 0; ch < C; ch++) {
            pw_program *progs[16];
            int np = pw_pipeline_programs(pl, k, ch, progs, 16);
            for (int j = 0; j < np; j++)
                for (int i = 0; i < pw_program_n_params(progs[j]); i++) {
                    pw_program_param pp;
                    pw_program_param_at(progs[j], i, &pp);
                    if (pp.graph_param != wte) continue;
                    if (!first) first = pp.data;
                    else cr_assert_eq(memcmp(first, pp.data, (size_t)pp.numel * 4), 0,
                                      "copies of wte.weight drifted (replica %d chunk %d)", k, ch);
                }
        }
    float *out = pipeline_params(pl, g, n);
    pw_pipeline_destroy(pl);
    return out;
}

Test(pipeline, tied_gpt_across_stages_is_bit_exact, .timeout = TIMEOUT)
{
    char path[] = "/tmp/pw_tied_gpt_XXXXXX.txt";
    pw_graph *g = tiny_gpt();
    pw_dataset *d = token_data(path);
    double l_ref[2], l[2];
    int64_t n_ref, n;
    gpt_run one = {.kind = PW_SCHEDULE_1F1B, .stages = 1, .replicas = 1};
    float *ref = run_gpt(g, d, &one, l_ref, &n_ref);
    const pw_schedule_kind kinds[] = {PW_SCHEDULE_1F1B, PW_SCHEDULE_ZB_V};
    for (int k = 0; k < 2; k++)
        for (int S = 2; S <= 4; S++)
            for (int rc = 0; rc < 2; rc++) {
                gpt_run r = {.kind = kinds[k], .stages = S, .recompute = rc, .replicas = 1};
                float *got = run_gpt(g, d, &r, l, &n);
                char what[96];
                snprintf(what, sizeof what, "tied GPT %s S=%d recompute=%d", pw_schedule_kind_name(kinds[k]), S,
                         rc);
                cr_assert_eq(n, n_ref);
                assert_same_bytes(got, ref, n, what);
                for (int i = 0; i < 2; i++)
                    cr_assert_eq(l[i], l_ref[i], "%s step %d: loss %.17g vs %.17g", what, i + 1, l[i], l_ref[i]);
                free(got);
            }
    free(ref);
    /* Two replicas (SGD, as tests/test_replicas.c): the same as one within
     * 1e-6 relative (the replica sum per use comes first, then the chunks'). */
    gpt_run r1 = {.kind = PW_SCHEDULE_1F1B, .stages = 1, .replicas = 1, .sgd = 1};
    ref = run_gpt(g, d, &r1, l_ref, &n_ref);
    for (int S = 1; S <= 3; S += 2) {
        gpt_run r2 = {.kind = PW_SCHEDULE_1F1B, .stages = S, .replicas = 2, .sgd = 1};
        float *got = run_gpt(g, d, &r2, l, &n);
        double maxerr = 0, scale = 0;
        for (int64_t i = 0; i < n; i++) {
            double e = fabs((double)got[i] - (double)ref[i]);
            if (e > maxerr) maxerr = e;
            if (fabs((double)ref[i]) > scale) scale = fabs((double)ref[i]);
        }
        cr_assert_leq(maxerr, 1e-6 * scale, "tied GPT S=%d with 2 replicas: max error %g (scale %g)", S, maxerr,
                      scale);
        free(got);
    }
    free(ref);
    /* Clipping: the norm counts the tied weight once, after its sum. */
    double n1 = 0, n3 = 0;
    gpt_run c1 = {.kind = PW_SCHEDULE_1F1B, .stages = 1, .replicas = 1, .clip = 0.05, .norm = &n1};
    gpt_run c3 = {.kind = PW_SCHEDULE_ZB_V, .stages = 3, .replicas = 1, .clip = 0.05, .norm = &n3};
    ref = run_gpt(g, d, &c1, l_ref, &n_ref);
    float *got = run_gpt(g, d, &c3, l, &n);
    cr_assert_gt(n1, 0.05, "the clip must bite (norm %g)", n1);
    cr_assert_eq(n1, n3, "gradient norm %.17g with one stage, %.17g with zb-v on 3", n1, n3);
    assert_same_bytes(got, ref, n, "tied GPT zb-v S=3 with clipping");
    free(got);
    free(ref);
    unlink(path);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ------------------------------------------- issue 5: the planner's cuts */

/* Three wide layers, then narrow ones: the planner's cuts are far from an
 * equal split by node count (tests/fixtures/graphs/imbalanced_mlp.graph). */
static char *imbalanced_text(void)
{
    FILE *f = fopen(PW_SOURCE_DIR "/tests/fixtures/graphs/imbalanced_mlp.graph", "rb");
    cr_assert_not_null(f);
    static char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

static pw_dataset *imbalanced_data(void)
{
    pw_synthetic_config sc = {.n = 256, .sample_shape = {.ndim = 1, .d = {24}}, .n_classes = 5, .seed = 3,
                              .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

static pw_pipeline_config cuts_config(const pw_graph *g, const pw_dataset *d, int S, int M)
{
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = BATCH;
    pc.micro_batches = M;
    pc.stages = S;
    pc.schedule = PW_SCHEDULE_1F1B;
    pc.optim = pw_optim_defaults(PW_OPTIM_ADAMW);
    pc.seed = 7;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.check = 1;
    pc.watchdog_s = 30;
    return pc;
}

/* Trains STEPS steps on the given cuts and returns every parameter. */
static float *train_on_cuts(const pw_graph *g, const pw_dataset *d, int S, int M, const int *cuts, int64_t *n)
{
    pw_pipeline_config pc = cuts_config(g, d, S, M);
    pc.cuts = cuts;
    pc.n_cuts = S + 1;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    const pw_partition *part = pw_pipeline_partition(pl);
    for (int s = 0; s <= S; s++) cr_assert_eq(part->begin[s], cuts[s], "stage %d begins at %d, not at %d", s,
                                              part->begin[s], cuts[s]);
    for (int i = 0; i < STEPS; i++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    float *got = pipeline_params(pl, g, n);
    pw_pipeline_destroy(pl);
    return got;
}

static pw_plan *plan_for(const pw_graph *g, int S, int M, pw_balance balance, const pw_profile *prof)
{
    pw_plan_config pc = pw_plan_defaults();
    pc.graph = g;
    pc.stages = S;
    pc.micro_batches = M;
    pc.micro_batch_size = BATCH / M;
    pc.schedule = PW_SCHEDULE_1F1B;
    pc.optim = PW_OPTIM_ADAMW;
    pc.balance = balance;
    pc.profile = prof;
    pw_plan *plan = NULL;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    return plan;
}

/* pipeline-run's training path with --balance / --profile / --memory-budget
 * ...: the plan's cuts through pw_pipeline_config.cuts, byte-identical to
 * one stage; a measured profile's cuts too; cut markers stay honoured. */
Test(pipeline, planned_cuts_train_bit_exact, .timeout = TIMEOUT)
{
    const char *text = imbalanced_text();
    pw_graph *g = parse(text);
    pw_dataset *d = imbalanced_data();
    const int M = 4;
    int64_t n_ref, n;
    float *ref = reference(g, d, M, &n_ref);
    pw_profile_config prc = {.micro_batch = BATCH / M, .iterations = 1, .threads = 1};
    pw_profile *prof = NULL;
    cr_assert_eq(pw_profile_measure(g, &prc, &prof), PW_OK, "%s", pw_last_error());
    for (int S = 2; S <= 3; S++)
        for (int b = 0; b < 2; b++) {
            pw_plan *plan = plan_for(g, S, M, b ? PW_BALANCE_TIME : PW_BALANCE_FLOPS, b ? prof : NULL);
            const int *cuts = plan->part.begin;
            if (!b) { /* FLOPs are deterministic: the wide layers are cut apart */
                int differs = 0;
                for (int s = 1; s < S; s++) differs |= cuts[s] != s * g->n_nodes / S;
                cr_assert(differs, "S=%d: the plan's cuts are the equal split", S);
                cr_assert_leq(cuts[1], 4, "S=%d: stage 0 should end within the wide layers (at %d)", S, cuts[1]);
            }
            float *got = train_on_cuts(g, d, S, M, cuts, &n);
            char what[96];
            snprintf(what, sizeof what, "planned cuts S=%d balance %s (cut at %d)", S, b ? "time" : "flops",
                     cuts[1]);
            cr_assert_eq(n, n_ref);
            assert_same_bytes(got, ref, n, what);
            free(got);
            pw_plan_destroy(plan);
        }
    /* The equal split, for contrast, and the same bytes. */
    const int equal[] = {0, 10, 20};
    float *got = train_on_cuts(g, d, 2, M, equal, &n);
    assert_same_bytes(got, ref, n, "equal split");
    free(got);

    /* Bad cuts are refused, named. */
    pw_pipeline_config pc = cuts_config(g, d, 2, M);
    pw_pipeline *pl = NULL;
    const int three[] = {0, 5, 12, 20}, backwards[] = {0, 12, 5}, short_end[] = {0, 5, 19};
    pc.cuts = three;
    pc.n_cuts = 4;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "4 cut boundaries given for 2 chunks"), "%s", pw_last_error());
    pc.n_cuts = 3;
    pc.cuts = backwards;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_ERR_INVALID_ARG);
    pc.cuts = short_end;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_ERR_INVALID_ARG);
    cr_assert_null(pl);
    free(ref);
    pw_profile_destroy(prof);
    pw_graph_destroy(g);

    /* A cut marker before w5: the plan (method auto) keeps it, even though
     * it is far from balanced, and training runs it. */
    char marked[8192];
    const char *at = strstr(text, "w5 = ");
    cr_assert_not_null(at);
    snprintf(marked, sizeof marked, "%.*scut\n%s", (int)(at - text), text, at);
    g = parse(marked);
    ref = reference(g, d, M, &n_ref);
    pw_plan *plan = plan_for(g, 2, M, PW_BALANCE_FLOPS, NULL);
    cr_assert_eq(plan->part.method, PW_PARTITION_CUTS);
    cr_assert_eq(plan->part.begin[1], 8, "the marker is before node 8 (w5), the plan cuts at %d",
                 plan->part.begin[1]);
    cr_assert(plan->part.note[0], "the plan compares the markers with the best split");
    got = train_on_cuts(g, d, 2, M, plan->part.begin, &n);
    assert_same_bytes(got, ref, n, "cut markers through the plan");
    free(got);
    free(ref);
    pw_plan_destroy(plan);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---------------------------- issue 5: stage memory on its NUMA node */

static pthread_mutex_t warn_mu = PTHREAD_MUTEX_INITIALIZER;
static int n_mem_warnings;
static char mem_warned[512];

static void count_mem_warnings(pw_log_level level, unsigned subsys, const char *msg, void *user)
{
    (void)subsys;
    (void)user;
    if (level != PW_LOG_WARN || !strstr(msg, "bytes")) return; /* pw_mem_bind_area's */
    pthread_mutex_lock(&warn_mu);
    n_mem_warnings++;
    snprintf(mem_warned, sizeof mem_warned, "%s", msg);
    pthread_mutex_unlock(&warn_mu);
}

/* With pinning the pipeline binds each stage's arena to its worker's NUMA
 * node: on this machine that succeeds, is skipped (one node) or warns once,
 * and training is unchanged. The binding call itself keeps the bytes. */
Test(pipeline, stage_memory_binds_to_its_node_or_degrades, .timeout = TIMEOUT)
{
    pw_graph *g = parse(imbalanced_text());
    pw_dataset *d = imbalanced_data();
    const int M = 4;
    int64_t n_ref, n;
    float *ref = reference(g, d, M, &n_ref);
    hwloc_topology_t topo = NULL;
    cr_assert_eq(pw_topology_load(&topo), PW_OK, "%s", pw_last_error());
    const int nodes = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    pw_log_set(count_mem_warnings, NULL);

    pw_pipeline_config pc = cuts_config(g, d, 2, M);
    pc.pin = 1;
    pw_pipeline *pl;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    if (nodes < 2) cr_assert_eq(n_mem_warnings, 0, "one NUMA node: nothing to bind, nothing to say (%s)",
                                mem_warned);
    else cr_assert_leq(n_mem_warnings, 1, "a refusal warns once (%s)", mem_warned);
    for (int i = 0; i < STEPS; i++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
    float *got = pipeline_params(pl, g, &n);
    assert_same_bytes(got, ref, n, "pinned, memory bound");
    free(got);

    /* The call: this machine's node of worker 0 binds (or warns, refused);
     * a topology that is not this machine's never binds; bytes stay. */
    pw_cpu_placement *place = NULL;
    cr_assert_eq(pw_cpu_place_ranks(topo, 2, &place), PW_OK, "%s", pw_last_error());
    cr_assert_geq(place->numa[0], 0);
    float *before = pipeline_params(pl, g, &n);
    n_mem_warnings = 0;
    mem_warned[0] = '\0';
    int rc = pw_program_bind_memory(pw_pipeline_program(pl, 0), topo, place->nodesets[0], "stage 0 memory");
    cr_assert(rc == 0 || (rc == -1 && n_mem_warnings == 1 && strstr(mem_warned, "stage 0 memory: binding")),
              "rc %d, warning '%s'", rc, mem_warned);
    got = pipeline_params(pl, g, &n);
    assert_same_bytes(got, before, n, "after binding");
    free(got);
    free(before);
    hwloc_topology_t other = NULL;
    cr_assert_eq(pw_topology_load_synthetic("pack:2 numa:2 core:2 pu:1", &other), PW_OK);
    pw_cpu_placement *far = NULL;
    cr_assert_eq(pw_cpu_place_ranks(other, 4, &far), PW_OK);
    cr_assert_eq(far->numa[3], 1);
    n_mem_warnings = 0;
    cr_assert_eq(pw_program_bind_memory(pw_pipeline_program(pl, 1), other, far->nodesets[3], "stage 1 memory"),
                 -1);
    cr_assert_eq(n_mem_warnings, 1);
    cr_assert(strstr(mem_warned, "not this machine's"), "%s", mem_warned);
    pw_log_set(NULL, NULL);
    pw_cpu_placement_destroy(far);
    pw_cpu_placement_destroy(place);
    hwloc_topology_destroy(other);
    hwloc_topology_destroy(topo);
    pw_pipeline_destroy(pl);
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}
