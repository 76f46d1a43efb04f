/* Tests: graphs trained through the engine are bit-identical to one stage,
 * for every schedule, stage count and micro-batch count; stash high-water
 * marks equal the validator's prediction; user CSV schedules; partitions. */
#include <criterion/criterion.h>
#include <criterion/parameterized.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "stages/data.h"
#include "stages/pipeline.h"
#include "stages/trainer.h"

#define TIMEOUT 120

/* 11 nodes; h1 is used again after the cut, so with four stages a value
 * crosses several boundaries. */
static const char *MLP =
    "graph p_mlp\n"
    "input image : f32[4, 6]\n"
    "label target : i32[]\n"
    "x = flatten(image)\n"
    "fc1 = linear(x, out=24)\n"
    "n1 = layernorm(fc1)\n"
    "h1 = gelu(n1)\n"
    "fc2 = linear(h1, out=24)\n"
    "h2 = relu(fc2)\n"
    "fc3 = linear(h2, out=24)\n"
    "h3 = relu(fc3)\n"
    "r = add(h3, h1)\n"
    "logits = linear(r, out=5) as head\n"
    "loss = softmax_cross_entropy(logits, target)\n";

static pw_graph *parse(const char *text)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "p.graph", &g), PW_OK, "%s",
                 pw_last_error());
    return g;
}

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
