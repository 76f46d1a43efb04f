/* Tests: stage programs, optimizers, random numbers and dropout masks (against
 * an independent reference), micro-batch accumulation, training, checkpoints,
 * and the two-program (stage boundary) equivalence. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "runtime/safetensors.h"
#include "stages/train/checkpoint.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/data.h"
#include "stages/ops/optim.h"
#include "stages/program/program.h"
#include "stages/train/trainer.h"

static const char *MLP =
    "graph t_mlp\n"
    "input image : f32[4, 6]\n"
    "label target : i32[]\n"
    "x = flatten(image)\n"
    "fc1 = linear(x, out=32)\n"
    "n1 = layernorm(fc1)\n"
    "h1 = gelu(n1)\n"
    "fc2 = linear(h1, out=32)\n"
    "h2 = relu(fc2)\n"
    "r = add(h2, h1)\n"
    "cut\n"
    "fc3 = linear(r, out=16)\n"
    "h3 = relu(fc3)\n"
    "logits = linear(h3, out=5) as head\n"
    "loss = softmax_cross_entropy(logits, target)\n";

static pw_graph *parse(const char *text)
{
    pw_graph *g = NULL;
    pw_status st = pw_graph_parse_string(text, strlen(text), "test.graph", &g);
    cr_assert_eq(st, PW_OK, "parse failed: %s", pw_last_error());
    return g;
}

static pw_dataset *synthetic(int64_t n, int classes, int test)
{
    pw_synthetic_config sc = {.n = n, .sample_shape = {.ndim = 2, .d = {4, 6}},
                              .n_classes = classes, .seed = 3, .noise = 1.0f, .test = test};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    return d;
}

static void snapshot(pw_program *p, float **out, int64_t *n)
{
    int64_t total = 0;
    for (int i = 0; i < pw_program_n_params(p); i++) {
        pw_program_param pp;
        pw_program_param_at(p, i, &pp);
        total += pp.numel;
    }
    float *buf = malloc((size_t)total * sizeof(float));
    int64_t off = 0;
    for (int i = 0; i < pw_program_n_params(p); i++) {
        pw_program_param pp;
        pw_program_param_at(p, i, &pp);
        memcpy(buf + off, pp.data, (size_t)pp.numel * sizeof(float));
        off += pp.numel;
    }
    *out = buf;
    *n = total;
}

Test(optim, sgd_momentum_matches_hand_computation)
{
    pw_optim_config c = pw_optim_defaults(PW_OPTIM_SGD);
    c.lr = 0.1f;
    c.momentum = 0.9f;
    c.weight_decay = 0.01f;
    float p[2] = {1.0f, -2.0f}, g[2] = {0.5f, 0.25f}, st[2] = {0, 0};
    double rp[2] = {1.0, -2.0}, buf[2] = {0, 0};
    for (int step = 1; step <= 3; step++) {
        pw_optim_update(&c, step, p, g, st, 2, 1);
        for (int i = 0; i < 2; i++) {
            double gi = (double)g[i] + 0.01 * rp[i];
            buf[i] = step == 1 ? gi : 0.9 * buf[i] + gi;
            rp[i] -= 0.1 * buf[i];
        }
    }
    for (int i = 0; i < 2; i++) cr_assert_float_eq(p[i], rp[i], 1e-6, "p[%d] %g vs %g", i, p[i], rp[i]);
}

Test(optim, adamw_matches_hand_computation)
{
    pw_optim_config c = pw_optim_defaults(PW_OPTIM_ADAMW);
    c.lr = 0.01f;
    c.weight_decay = 0.1f;
    float p[3] = {0.5f, -1.0f, 2.0f}, st[6] = {0};
    double rp[3] = {0.5, -1.0, 2.0}, m[3] = {0}, v[3] = {0};
    for (int step = 1; step <= 5; step++) {
        float g[3] = {0.1f * step, -0.3f, 0.05f / step};
        pw_optim_update(&c, step, p, g, st, 3, 1);
        for (int i = 0; i < 3; i++) {
            rp[i] *= 1.0 - 0.01 * 0.1;
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.999 * v[i] + 0.001 * (double)g[i] * g[i];
            double mh = m[i] / (1 - pow(0.9, step)), vh = v[i] / (1 - pow(0.999, step));
            rp[i] -= 0.01 * mh / (sqrt(vh) + 1e-8);
        }
    }
    for (int i = 0; i < 3; i++) cr_assert_float_eq(p[i], rp[i], 1e-5, "p[%d] %g vs %g", i, p[i], rp[i]);
}

Test(optim, no_decay_leaves_parameter_alone_without_gradient)
{
    pw_optim_config c = pw_optim_defaults(PW_OPTIM_ADAMW);
    c.weight_decay = 0.5f;
    float p[1] = {3.0f}, g[1] = {0.0f}, st[2] = {0};
    pw_optim_update(&c, 1, p, g, st, 1, 0);
    cr_assert_eq(p[0], 3.0f);
    pw_optim_update(&c, 2, p, g, st, 1, 1);
    cr_assert_lt(p[0], 3.0f);
}

/* The defaults and the exact float32 sequence of one AdamW update are what
 * docs/api.md#reproducing-the-math says, bit for bit. */
Test(optim, adamw_defaults_and_update_are_the_documented_ones)
{
    pw_optim_config c = pw_optim_defaults(PW_OPTIM_ADAMW);
    cr_assert_eq(c.lr, 1e-3f);
    cr_assert_eq(c.beta1, 0.9f);
    cr_assert_eq(c.beta2, 0.999f);
    cr_assert_eq(c.eps, 1e-8f);
    cr_assert_eq(c.weight_decay, 0.01f);
    c.lr = 0.01f;
    c.beta1 = 0.8f;
    c.beta2 = 0.99f;
    c.eps = 1e-3f;
    c.weight_decay = 0.1f;
    float p[2] = {0.5f, -1.0f}, st[4] = {0}, rp[2] = {0.5f, -1.0f}, m[2] = {0}, v[2] = {0};
    for (int t = 1; t <= 4; t++) {
        const float g[2] = {0.1f * (float)t, -0.3f};
        pw_optim_update(&c, t, p, g, st, 2, 1);
        const float bc1 = (float)(1.0 - pow(0.8f, t)), bc2_sqrt = (float)sqrt(1.0 - pow(0.99f, t));
        for (int i = 0; i < 2; i++) {
            m[i] = 0.8f * m[i] + (1.0f - 0.8f) * g[i];
            v[i] = 0.99f * v[i] + (1.0f - 0.99f) * g[i] * g[i];
            rp[i] = rp[i] * (1.0f - 0.01f * 0.1f) - (0.01f / bc1) * m[i] / (sqrtf(v[i]) / bc2_sqrt + 1e-3f);
            cr_assert_eq(p[i], rp[i], "step %d p[%d]: %.9g, the documented formula gives %.9g", t, i, p[i], rp[i]);
        }
    }
}

Test(optim, parse_kind)
{
    pw_optim_kind k;
    cr_assert_eq(pw_optim_parse_kind("adamw", &k), PW_OK);
    cr_assert_eq(k, PW_OPTIM_ADAMW);
    cr_assert_eq(pw_optim_parse_kind("adam", &k), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "adam"));
}

/* ---- random numbers and dropout masks, against an independent reference.
 * Every expected value below was printed by tests/fixtures/rng_reference.py,
 * a Python implementation written from docs/api.md#reproducing-the-math
 * alone (run once, values pasted); a change to runtime/rng.c or to how
 * dropout keys its masks must change that document, that script and these. */

Test(rng, matches_the_documented_algorithm)
{
    const uint64_t key = pw_rng_key(1, "dropout:x0");
    cr_assert_eq(key, 0x5b7a7667c8aa1f5eULL, "pw_rng_key(1, \"dropout:x0\") = 0x%016llx", (unsigned long long)key);
    cr_assert_eq(pw_rng_key(42, ""), 0x34869d7f6b4aa57fULL);
    const uint64_t u64[3] = {0x77363fbb236915dcULL, 0xfbbc1211a7499779ULL, 0xa99b88ca16d4f633ULL};
    for (int i = 0; i < 3; i++) cr_assert_eq(pw_rng_u64(key, (uint64_t)i), u64[i], "pw_rng_u64(key, %d)", i);
    const uint32_t uniform_bits[4] = {0x3eee6c7e, 0x3f7bbc12, 0x3f299b88, 0x3f2c746c};
    for (int i = 0; i < 4; i++) {
        float u = pw_rng_uniform(key, (uint64_t)i);
        uint32_t b;
        memcpy(&b, &u, 4);
        cr_assert_eq(b, uniform_bits[i], "pw_rng_uniform(key, %d) = %.9g (0x%08x)", i, u, b);
    }
    /* Box-Muller goes through libm's log and cos in double: equal to the
     * reference up to the last float bit, which another libm may move. */
    const float normal[2] = {1.22957659f, -0.418787956f};
    for (int i = 0; i < 2; i++)
        cr_assert_float_eq(pw_rng_normal(key, (uint64_t)i), normal[i], 2e-7f, "pw_rng_normal(key, %d) = %.9g", i,
                           pw_rng_normal(key, (uint64_t)i));
    /* The sequential generator is the counter stream from 0. */
    pw_rng r = pw_rng_make(key);
    for (int i = 0; i < 3; i++) cr_assert_eq(pw_rng_next(&r), u64[i]);
}

/* A dropout mask through a real stage program: seed 1, the dropout's output
 * value "d", step 3, p = 0.25, 8 elements per sample, and a micro-batch
 * holding samples 5 and 6 of the global batch. */
Test(rng, dropout_mask_matches_the_documented_derivation)
{
    static const char *G = "graph t_drop\n"
                           "input x : f32[8]\n"
                           "label y : i32[]\n"
                           "d = dropout(x, p=0.25)\n"
                           "logits = linear(d, out=2) as head\n"
                           "loss = softmax_cross_entropy(logits, y)\n";
    static const char *keep[2] = {"11101101", "10110111"}; /* samples 5 and 6, elements 0..7 */
    pw_graph *g = parse(G);
    pw_program_config pc = {.graph = g, .micro_batch = 2, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    pw_program *p = NULL;
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK, "%s", pw_last_error());
    pw_program_init_params(p, 1);
    int d = -1;
    for (int v = 0; v < g->n_values; v++)
        if (!strcmp(g->values[v].name, "d")) d = v;
    cr_assert_geq(d, 0);
    float *x = pw_program_value(p, g->input, 0);
    for (int i = 0; i < 16; i++) x[i] = 1.0f;
    memset(pw_program_value(p, g->label, 0), 0, 2 * sizeof(int32_t));
    cr_assert_eq(pw_program_set_rng(p, 0, 1, 3, 5), PW_OK);
    cr_assert_eq(pw_program_forward(p, 0, 2), PW_OK, "%s", pw_last_error());
    const float *y = pw_program_value(p, d, 0), scale = 1.0f / (1.0f - 0.25f);
    for (int s = 0; s < 2; s++)
        for (int j = 0; j < 8; j++)
            cr_assert_eq(y[s * 8 + j], keep[s][j] == '1' ? scale : 0.0f, "sample %d element %d: %g", 5 + s, j,
                         y[s * 8 + j]);
    pw_program_destroy(p);
    pw_graph_destroy(g);
}

/* Parameters depend on (seed, name) only: a program holding part of the
 * graph initialises exactly the values the whole-graph program has. */
Test(program, init_is_independent_of_partition)
{
    pw_graph *g = parse(MLP);
    int cut = -1;
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i].cut_before) cut = i;
    cr_assert_gt(cut, 0);
    pw_program_config pc = {.graph = g, .micro_batch = 4, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    pw_program *whole, *tail;
    cr_assert_eq(pw_program_create(&pc, &whole), PW_OK);
    pc.node_begin = cut;
    pc.node_end = g->n_nodes;
    cr_assert_eq(pw_program_create(&pc, &tail), PW_OK);
    pw_program_init_params(whole, 42);
    pw_program_init_params(tail, 42);
    cr_assert_lt(pw_program_n_params(tail), pw_program_n_params(whole));
    for (int i = 0; i < pw_program_n_params(tail); i++) {
        pw_program_param a, b;
        pw_program_param_at(tail, i, &a);
        int found = 0;
        for (int j = 0; j < pw_program_n_params(whole); j++) {
            pw_program_param_at(whole, j, &b);
            if (b.graph_param != a.graph_param) continue;
            found = 1;
            cr_assert_eq(memcmp(a.data, b.data, (size_t)a.numel * 4), 0, "%s differs", a.name);
        }
        cr_assert(found);
    }
    pw_program_destroy(whole);
    pw_program_destroy(tail);
    pw_graph_destroy(g);
}

Test(program, rejects_bad_config)
{
    pw_graph *g = parse(MLP);
    pw_program *p;
    pw_program_config pc = {.graph = g, .micro_batch = 0};
    cr_assert_eq(pw_program_create(&pc, &p), PW_ERR_INVALID_ARG);
    cr_assert_null(p);
    pc.micro_batch = 4;
    pc.node_begin = 3;
    pc.node_end = 2;
    cr_assert_eq(pw_program_create(&pc, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "node range"));
    pc.node_begin = pc.node_end = 0;
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK);
    cr_assert_eq(pw_program_forward(p, 0, 5), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_program_forward(p, 1, 4), PW_ERR_INVALID_ARG);
    pw_program_destroy(p);
    pw_program_destroy(NULL);
    pw_graph_destroy(g);
}

/* Runs one training step of `batch` samples as `m` micro-batches and returns
 * the parameters after it, and the parameters before. */
static void one_step(pw_graph *g, pw_dataset *d, int64_t batch, int m, float **before, float **after,
                     int64_t *n)
{
    pw_trainer_config tc = {.graph = g, .train = d, .batch = batch, .micro_batches = m,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .seed = 5};
    tc.optim.momentum = 0.0f;
    tc.optim.lr = 0.5f;
    pw_trainer *t;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "%s", pw_last_error());
    snapshot(pw_trainer_program(t), before, n);
    pw_step_stats s;
    cr_assert_eq(pw_trainer_step(t, &s), PW_OK, "%s", pw_last_error());
    snapshot(pw_trainer_program(t), after, n);
    pw_trainer_destroy(t);
}

Test(train, micro_batches_equal_one_big_batch)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = synthetic(256, 5, 0);
    float *b1, *a1, *b4, *a4;
    int64_t n;
    one_step(g, d, 64, 1, &b1, &a1, &n);
    for (int m = 2; m <= 8; m *= 2) {
        one_step(g, d, 64, m, &b4, &a4, &n);
        cr_assert_eq(memcmp(b1, b4, (size_t)n * 4), 0, "initial parameters differ");
        /* Relative difference per parameter tensor, in the max norm:
         * max|a1 − a4| / max|a1| over the tensor's elements. */
        double max_rel = 0, max_upd = 0, max_upd_diff = 0;
        pw_program_config pc = {.graph = g, .micro_batch = 1};
        pw_program *layout;
        cr_assert_eq(pw_program_create(&pc, &layout), PW_OK);
        int64_t off = 0;
        for (int k = 0; k < pw_program_n_params(layout); k++) {
            pw_program_param pp;
            pw_program_param_at(layout, k, &pp);
            double num = 0, den = 0;
            for (int64_t i = off; i < off + pp.numel; i++) {
                num = fmax(num, fabs((double)a1[i] - a4[i]));
                den = fmax(den, fabs((double)a1[i]));
            }
            max_rel = fmax(max_rel, num / den);
            off += pp.numel;
        }
        pw_program_destroy(layout);
        for (int64_t i = 0; i < n; i++) {
            max_upd = fmax(max_upd, fabs((double)a1[i] - b1[i]));
            max_upd_diff = fmax(max_upd_diff, fabs(((double)a1[i] - b1[i]) - ((double)a4[i] - b4[i])));
        }
        cr_log_info("M=%d: max relative parameter difference %.3g; update difference %.3g of "
                    "largest update %.3g", m, max_rel, max_upd_diff, max_upd);
        cr_assert_lt(max_rel, 1e-6, "M=%d: parameters differ by %.3g relative", m, max_rel);
        cr_assert_gt(max_upd, 1e-4, "the step changed nothing; the test would be vacuous");
        cr_assert_lt(max_upd_diff / max_upd, 1e-4, "M=%d: updates differ by %.3g of the largest",
                     m, max_upd_diff / max_upd);
        free(b4);
        free(a4);
    }
    free(b1);
    free(a1);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

static double train_loss(pw_graph *g, pw_dataset *d, pw_optim_kind kind, int steps, double *first)
{
    pw_trainer_config tc = {.graph = g, .train = d, .batch = 32, .micro_batches = 2,
                            .optim = pw_optim_defaults(kind), .seed = 9, .shuffle = 1};
    if (kind == PW_OPTIM_ADAMW) tc.optim.lr = 1e-2f;
    pw_trainer *t;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "%s", pw_last_error());
    pw_step_stats s;
    double last = 0;
    for (int i = 0; i < steps; i++) {
        cr_assert_eq(pw_trainer_step(t, &s), PW_OK, "%s", pw_last_error());
        if (i == 0) *first = s.loss;
        last = s.loss;
    }
    pw_trainer_destroy(t);
    return last;
}

Test(train, loss_falls_on_synthetic_data)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = synthetic(512, 5, 0);
    for (int k = 0; k < 2; k++) {
        double first, last = train_loss(g, d, k ? PW_OPTIM_ADAMW : PW_OPTIM_SGD, 60, &first);
        cr_log_info("%s: loss %.4f -> %.4f", k ? "adamw" : "sgd", first, last);
        cr_assert_lt(last, 0.5 * first, "%s: loss %.4f -> %.4f", k ? "adamw" : "sgd", first, last);
    }
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(train, evaluation_accuracy_rises)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = synthetic(512, 5, 0), *te = synthetic(200, 5, 1);
    pw_trainer_config tc = {.graph = g, .train = d, .batch = 32, .micro_batches = 1,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .seed = 9};
    pw_trainer *t;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "%s", pw_last_error());
    pw_eval_stats e0, e1;
    cr_assert_eq(pw_trainer_evaluate(t, te, &e0), PW_OK);
    for (int i = 0; i < 64; i++) cr_assert_eq(pw_trainer_step(t, NULL), PW_OK);
    cr_assert_eq(pw_trainer_evaluate(t, te, &e1), PW_OK);
    cr_assert_eq(e1.samples, 200);
    cr_log_info("accuracy %.3f -> %.3f", e0.accuracy, e1.accuracy);
    cr_assert_gt(e1.accuracy, 0.9);
    cr_assert_gt(e1.accuracy, e0.accuracy + 0.3);
    pw_trainer_destroy(t);
    pw_dataset_destroy(d);
    pw_dataset_destroy(te);
    pw_graph_destroy(g);
}

Test(train, data_that_does_not_fit_the_graph_is_refused)
{
    pw_graph *g = parse(MLP);
    pw_synthetic_config sc = {.n = 64, .sample_shape = {.ndim = 1, .d = {23}}, .n_classes = 5,
                              .seed = 1, .noise = 1.0f};
    pw_dataset *d;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK);
    pw_trainer_config tc = {.graph = g, .train = d, .batch = 8, .micro_batches = 1,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    pw_trainer *t;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_ERR_SHAPE);
    cr_assert(strstr(pw_last_error(), "[4, 6]") && strstr(pw_last_error(), "[23]"), "%s",
              pw_last_error());
    pw_dataset_destroy(d);
    sc.sample_shape = (pw_shape){.ndim = 2, .d = {4, 6}};
    sc.n_classes = 9;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK);
    tc.train = d;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_ERR_SHAPE);
    cr_assert(strstr(pw_last_error(), "5 classes"), "%s", pw_last_error());
    sc.n_classes = 5;
    pw_dataset_destroy(d);
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK);
    tc.train = d;
    tc.batch = 10;
    tc.micro_batches = 4;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "multiple"), "%s", pw_last_error());
    tc.batch = 128;
    tc.micro_batches = 1;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "larger"), "%s", pw_last_error());
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The seam the pipeline engine stands on: the graph run as two programs that
 * hand boundary activations forward and their gradients back gives
 * bit-identical parameters to one program. */
static void fill_micro(pw_program *p, const pw_graph *g, const pw_dataset *d, int64_t start, int64_t n)
{
    int64_t idx[64];
    for (int64_t i = 0; i < n; i++) idx[i] = start + i;
    /* Each stage reads only what it holds: the first the input, the last the label. */
    float *x = pw_program_value(p, g->input, 0);
    int32_t *y = pw_program_value(p, g->label, 0);
    if (!x) {
        static float scratch[64 * 24];
        x = scratch;
    }
    cr_assert_eq(pw_dataset_gather(d, idx, n, x, y), PW_OK, "%s", pw_last_error());
}

Test(program, two_stages_bit_identical_to_one)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = synthetic(256, 5, 0);
    int cut = -1;
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i].cut_before) cut = i;
    const int64_t mb = 8;
    const int M = 4;
    pw_program_config pc = {.graph = g, .micro_batch = mb, .loss_batch = mb * M,
                            .optim = pw_optim_defaults(PW_OPTIM_ADAMW)};
    pw_program *one, *s0, *s1;
    cr_assert_eq(pw_program_create(&pc, &one), PW_OK);
    pc.node_end = cut;
    cr_assert_eq(pw_program_create(&pc, &s0), PW_OK, "%s", pw_last_error());
    pc.node_begin = cut;
    pc.node_end = g->n_nodes;
    cr_assert_eq(pw_program_create(&pc, &s1), PW_OK, "%s", pw_last_error());
    pw_program_init_params(one, 11);
    pw_program_init_params(s0, 11);
    pw_program_init_params(s1, 11);

    const int *outs, *ins;
    int n_out = pw_program_outputs(s0, &outs);
    int n_in = pw_program_inputs(s1, &ins);
    cr_assert_eq(n_out, 1, "stage 0 should send exactly r (the residual sum)");
    cr_assert_eq(n_in, 1, "stage 1 should receive exactly r (labels are loaded, not sent)");
    cr_assert_eq(ins[0], outs[0]);
    int r = outs[0];
    size_t rbytes = (size_t)mb * (size_t)pw_shape_numel(&g->values[r].shape) * 4;

    for (int step = 1; step <= 3; step++) {
        for (int m = 0; m < M; m++) {
            int64_t start = ((int64_t)(step - 1) * M + m) * mb;
            fill_micro(one, g, d, start, mb);
            cr_assert_eq(pw_program_forward(one, 0, mb), PW_OK);
            cr_assert_eq(pw_program_backward_input(one, 0), PW_OK);
            cr_assert_eq(pw_program_backward_weight(one, 0), PW_OK);

            fill_micro(s0, g, d, start, mb);
            fill_micro(s1, g, d, start, mb);
            cr_assert_eq(pw_program_forward(s0, 0, mb), PW_OK);
            memcpy(pw_program_value(s1, r, 0), pw_program_value(s0, r, 0), rbytes);
            cr_assert_eq(pw_program_forward(s1, 0, mb), PW_OK);
            cr_assert_eq(pw_program_loss_sum(s1, 0), pw_program_loss_sum(one, 0));
            cr_assert_eq(pw_program_backward_input(s1, 0), PW_OK);
            cr_assert_eq(pw_program_backward_weight(s1, 0), PW_OK);
            cr_assert_not_null(pw_program_grad(s1, r, 0));
            memcpy(pw_program_grad(s0, r, 0), pw_program_grad(s1, r, 0), rbytes);
            cr_assert_eq(pw_program_backward_input(s0, 0), PW_OK);
            cr_assert_eq(pw_program_backward_weight(s0, 0), PW_OK);
        }
        cr_assert_eq(pw_program_optimizer_step(one, step), PW_OK);
        cr_assert_eq(pw_program_optimizer_step(s0, step), PW_OK);
        cr_assert_eq(pw_program_optimizer_step(s1, step), PW_OK);
    }
    pw_program *stages[2] = {s0, s1};
    for (int s = 0; s < 2; s++) {
        for (int i = 0; i < pw_program_n_params(stages[s]); i++) {
            pw_program_param a, b;
            pw_program_param_at(stages[s], i, &a);
            for (int j = 0; j < pw_program_n_params(one); j++) {
                pw_program_param_at(one, j, &b);
                if (b.graph_param == a.graph_param)
                    cr_assert_eq(memcmp(a.data, b.data, (size_t)a.numel * 4), 0,
                                 "%s differs between 1 and 2 stages", a.name);
            }
        }
    }
    pw_program_destroy(one);
    pw_program_destroy(s0);
    pw_program_destroy(s1);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---- checkpoints ---- */
static char tmpdir[64];

static void make_tmpdir(void)
{
    strcpy(tmpdir, "/tmp/pw_test_train_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static void remove_tmpdir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(checkpoint, .init = make_tmpdir, .fini = remove_tmpdir);

static pw_program *make_program(pw_graph *g, uint64_t seed)
{
    pw_program_config pc = {.graph = g, .micro_batch = 4, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    pw_program *p;
    cr_assert_eq(pw_program_create(&pc, &p), PW_OK);
    pw_program_init_params(p, seed);
    return p;
}

Test(checkpoint, round_trip_and_layout)
{
    pw_graph *g = parse(MLP);
    pw_program *a = make_program(g, 1), *b = make_program(g, 2);
    char path[128];
    snprintf(path, sizeof path, "%s/ck.safetensors", tmpdir);
    pw_checkpoint_info info = {.step = 17, .epoch = 2, .seed = 1, .extra = "x"};
    cr_assert_eq(pw_checkpoint_save(path, g, &a, 1, &info), PW_OK, "%s", pw_last_error());
    pw_checkpoint_info got;
    cr_assert_eq(pw_checkpoint_load(path, g, &b, 1, &got), PW_OK, "%s", pw_last_error());
    cr_assert_eq(got.step, 17);
    cr_assert_eq(got.epoch, 2);
    float *pa, *pb;
    int64_t n;
    snapshot(a, &pa, &n);
    snapshot(b, &pb, &n);
    cr_assert_eq(memcmp(pa, pb, (size_t)n * 4), 0);
    free(pa);
    free(pb);
    /* PyTorch layout and names. */
    pw_safetensors *f;
    cr_assert_eq(pw_safetensors_open(path, &f), PW_OK);
    pw_st_tensor t;
    cr_assert_eq(pw_safetensors_get(f, "fc1.weight", &t), PW_OK);
    cr_assert_eq(t.shape.ndim, 2);
    cr_assert_eq(t.shape.d[0], 32);
    cr_assert_eq(t.shape.d[1], 24);
    cr_assert_eq(pw_safetensors_get(f, "head.bias", &t), PW_OK);
    cr_assert_str_eq(pw_safetensors_meta(f, "graph"), "t_mlp");
    cr_assert_str_eq(pw_safetensors_meta(f, "step"), "17");
    pw_safetensors_close(f);
    pw_program_destroy(a);
    pw_program_destroy(b);
    pw_graph_destroy(g);
}

Test(checkpoint, mismatched_or_corrupt_files_are_refused_untouched)
{
    pw_graph *g = parse(MLP);
    pw_program *a = make_program(g, 1);
    char path[128];
    snprintf(path, sizeof path, "%s/ck.safetensors", tmpdir);
    cr_assert_eq(pw_checkpoint_save(path, g, &a, 1, NULL), PW_OK);

    /* A different graph: same names, other width. */
    char *other = strdup(MLP);
    char *w = strstr(other, "out=16");
    memcpy(w, "out=17", 6);
    pw_graph *g2 = parse(other);
    pw_program *b = make_program(g2, 3);
    float *before, *after;
    int64_t n;
    snapshot(b, &before, &n);
    cr_assert_eq(pw_checkpoint_load(path, g2, &b, 1, NULL), PW_ERR_SHAPE);
    cr_assert(strstr(pw_last_error(), "fc3.weight"), "%s", pw_last_error());
    snapshot(b, &after, &n);
    cr_assert_eq(memcmp(before, after, (size_t)n * 4), 0, "a refused load changed parameters");
    free(before);
    free(after);

    /* Truncated. */
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    cr_assert_eq(truncate(path, size - 10), 0);
    cr_assert_eq(pw_checkpoint_load(path, g, &a, 1, NULL), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), path), "%s", pw_last_error());

    /* Missing file. */
    cr_assert_eq(pw_checkpoint_load("/nonexistent/x.safetensors", g, &a, 1, NULL), PW_ERR_IO);

    /* Extra tensor the graph does not define. */
    float z = 0;
    pw_st_tensor ts[1] = {{.name = "stray.weight", .dtype = PW_F32, .shape = {.ndim = 1, .d = {1}},
                           .data = &z, .nbytes = 4}};
    cr_assert_eq(pw_safetensors_write(path, ts, 1, NULL, 0), PW_OK);
    cr_assert_eq(pw_checkpoint_load(path, g, &a, 1, NULL), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "stray.weight"), "%s", pw_last_error());

    /* Negative, overflowing or malformed counters in the metadata (issue 13:
     * they were read with strtoll and taken as they came). */
    cr_assert_eq(pw_checkpoint_save(path, g, &a, 1, NULL), PW_OK);
    pw_safetensors *sf = NULL;
    cr_assert_eq(pw_safetensors_open(path, &sf), PW_OK, "%s", pw_last_error());
    int nt = pw_safetensors_count(sf);
    pw_st_tensor *all = calloc((size_t)nt, sizeof *all);
    for (int i = 0; i < nt; i++) cr_assert_eq(pw_safetensors_at(sf, i, &all[i]), PW_OK);
    static const char *const bad_meta[][3] = {
        {"step", "-3", "metadata \"step\" is '-3', not a whole number in 0..9223372036854775807"},
        {"epoch", "9223372036854775808", "metadata \"epoch\" is '9223372036854775808'"},
        {"seed", "18446744073709551616", "metadata \"seed\" is '18446744073709551616', not a whole "
                                         "number in 0..18446744073709551615"},
        {"step", "12x", "metadata \"step\" is '12x'"},
        {"step", "", "metadata \"step\" is ''"},
    };
    char path2[160];
    snprintf(path2, sizeof path2, "%s/ck2.safetensors", tmpdir);
    for (size_t k = 0; k < sizeof bad_meta / sizeof bad_meta[0]; k++) {
        pw_st_meta m[1] = {{bad_meta[k][0], bad_meta[k][1]}};
        cr_assert_eq(pw_safetensors_write(path2, all, nt, m, 1), PW_OK, "%s", pw_last_error());
        pw_checkpoint_info info = {0};
        cr_assert_eq(pw_checkpoint_load(path2, g, &a, 1, &info), PW_ERR_FORMAT, "case %zu", k);
        cr_assert(strstr(pw_last_error(), path2) && strstr(pw_last_error(), bad_meta[k][2]),
                  "case %zu: %s", k, pw_last_error());
    }
    pw_safetensors_close(sf);
    free(all);
    free(other);
    pw_program_destroy(a);
    pw_program_destroy(b);
    pw_graph_destroy(g);
    pw_graph_destroy(g2);
}

/* The gradients of all parameters, concatenated (use 0: the MLP has no tie). */
static float *grads_of(pw_program *p, int64_t n)
{
    float *out = malloc((size_t)n * sizeof(float));
    int64_t off = 0;
    for (int i = 0; i < pw_program_n_params(p); i++) {
        pw_program_param pp;
        pw_program_param_at(p, i, &pp);
        cr_assert_eq(pw_program_param_read(p, i, PW_PARAM_GRAD, 0, out + off), PW_OK);
        off += pp.numel;
    }
    return out;
}

/* One micro-batch's forward and backward into `p`'s gradients. */
static void micro_batch(pw_program *p, const pw_graph *g, const pw_dataset *d, int m, int64_t rows)
{
    int64_t idx[64];
    for (int64_t r = 0; r < rows; r++) idx[r] = m * rows + r;
    cr_assert_eq(pw_dataset_gather(d, idx, rows, pw_program_value(p, g->input, 0), pw_program_value(p, g->label, 0)),
                 PW_OK);
    cr_assert_eq(pw_program_forward(p, 0, rows), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_program_backward_input(p, 0), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_program_backward_weight(p, 0), PW_OK, "%s", pw_last_error());
}

/* The documented tree over groups [lo, lo + n) of one element: the left
 * block is the largest power of two below n (collective.h's tree), a group
 * is its micro-batches' running sum as the kernels accumulate it. */
static float tree_sum(float *const *gs, int64_t i, int lo, int n)
{
    if (n == 1) return gs[lo][i];
    int left = 1;
    while (2 * left < n) left *= 2;
    return tree_sum(gs, i, lo, left) + tree_sum(gs, i, lo + left, n - left);
}

/* M micro-batches in K groups: the step's gradient is the tree over the K
 * group sums, ((G0 + G1) + (G2 + G3)) + ((G4 + G5) + (G6 + G7)) for K = 8,
 * ((G0 + G1) + (G2 + G3)) + (G4 + G5) for K = 6, computed here from each
 * group's own gradient (a second program summing one group at a time); the
 * program holds ceil(log2 K) more gradient
 * copies for it; and the next step starts over. */
static void check_grad_groups(int M, int K)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = synthetic(256, 5, 0);
    const int64_t rows = 8;
    pw_program_config pc = {.graph = g, .micro_batch = rows, .loss_batch = rows * M, .micro_batches = M,
                            .grad_groups = K, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    pw_program *tree, *one;
    cr_assert_eq(pw_program_create(&pc, &tree), PW_OK, "%s", pw_last_error());
    pc.grad_groups = 1;
    cr_assert_eq(pw_program_create(&pc, &one), PW_OK, "%s", pw_last_error());
    pw_program_init_params(tree, 4);
    pw_program_init_params(one, 4);
    pw_program_memory mt, mo;
    pw_program_memory_usage(tree, &mt);
    pw_program_memory_usage(one, &mo);
    int copies = 0;
    while ((1 << copies) < K) copies++;
    cr_assert_eq(mt.grad_sums, (size_t)copies * mt.grads, "K = %d: ceil(log2 K) = %d copies", K, copies);
    cr_assert_eq(mo.grad_sums, 0);
    cr_assert_eq(mt.total, mo.total + mt.grad_sums);
    int64_t n = 0;
    for (int i = 0; i < pw_program_n_params(one); i++) {
        pw_program_param pp;
        pw_program_param_at(one, i, &pp);
        n += pp.numel;
    }
    for (int step = 0; step < 2; step++) {
        float *gs[16];
        cr_assert_leq(K, 16);
        for (int m = 0; m < M; m++) {
            if (m % (M / K) == 0) pw_program_zero_grads(one);
            micro_batch(one, g, d, m + step * M, rows);
            if ((m + 1) % (M / K) == 0) gs[m / (M / K)] = grads_of(one, n);
            micro_batch(tree, g, d, m + step * M, rows);
        }
        float *got = grads_of(tree, n);
        int64_t differ = 0, nonzero = 0;
        for (int64_t i = 0; i < n; i++) {
            float want = tree_sum(gs, i, 0, K);
            if (memcmp(&want, &got[i], 4) != 0) differ++;
            if (want != 0.0f) nonzero++;
        }
        cr_assert_eq(differ, 0, "M = %d K = %d step %d: %lld of %lld gradient elements differ from the tree", M,
                     K, step, (long long)differ, (long long)n);
        cr_assert_gt(nonzero, n / 2, "the gradients are mostly zero; the test would be vacuous");
        /* Another association differs somewhere: the check above can fail. */
        float *left = calloc((size_t)n, sizeof(float));
        int64_t left_differs = 0;
        for (int64_t i = 0; i < n; i++) {
            left[i] = gs[K - 1][i]; /* the right fold: not the tree for K >= 3 */
            for (int k = K - 2; k >= 0; k--) left[i] = gs[k][i] + left[i];
            if (memcmp(&left[i], &got[i], 4) != 0) left_differs++;
        }
        cr_assert_gt(left_differs, 0, "the right fold is the same bits; the test would be vacuous");
        free(left);
        free(got);
        for (int k = 0; k < K; k++) free(gs[k]);
        cr_assert_eq(pw_program_optimizer_step(tree, step + 1), PW_OK, "%s", pw_last_error());
        pw_program_zero_grads(one);
        /* The same parameters for the next step. */
        for (int i = 0; i < pw_program_n_params(one); i++) {
            pw_program_param pp;
            pw_program_param_at(tree, i, &pp);
            cr_assert_eq(pw_program_param_write(one, i, PW_PARAM_DATA, pp.data), PW_OK);
        }
    }
    pw_program_destroy(tree);
    pw_program_destroy(one);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

Test(program, grad_groups_sum_pairwise)
{
    check_grad_groups(8, 8);
}

/* Group counts that are not powers of two close the same tree as the
 * all-reduce over that many members: 3, 6, 7 groups, and groups of two
 * micro-batches. */
Test(program, grad_groups_any_count)
{
    check_grad_groups(6, 6);
    check_grad_groups(6, 3);
    check_grad_groups(7, 7);
    check_grad_groups(12, 6);
}

Test(program, grad_groups_defaults_and_refusals)
{
    int K;
    /* The default: the largest power of two dividing R·M, at most PW_GRAD_GROUPS_DEFAULT. */
    cr_assert_eq(PW_GRAD_GROUPS_DEFAULT, 4);
    cr_assert_eq(pw_grad_groups(0, 1, 12, &K), 4);
    cr_assert_eq(K, 4);
    cr_assert_eq(pw_grad_groups(0, 2, 12, &K), 4);
    cr_assert_eq(K, 2);
    cr_assert_eq(pw_grad_groups(0, 4, 12, &K), 4);
    cr_assert_eq(K, 1);
    cr_assert_eq(pw_grad_groups(0, 1, 6, &K), 2);
    cr_assert_eq(K, 2);
    cr_assert_eq(pw_grad_groups(0, 1, 3, &K), 1);
    cr_assert_eq(K, 1);
    cr_assert_eq(pw_grad_groups(8, 1, 8, &K), 8); /* asked for: 8 replicas agree with 1 */
    cr_assert_eq(K, 8);
    cr_assert_eq(pw_grad_groups(8, 8, 1, &K), 8);
    cr_assert_eq(K, 1);
    cr_assert_eq(pw_grad_groups(0, 3, 8, &K), 4); /* R = 3 does not divide 4: K = 4 / gcd(4, 3) */
    cr_assert_eq(K, 4);
    cr_assert_eq(pw_grad_groups(0, 16, 1, &K), 4); /* 16 replicas: one group each is not G = 4 */
    cr_assert_eq(K, 1);
    cr_assert_eq(pw_grad_groups(16, 4, 4, &K), 16);
    cr_assert_eq(K, 4);
    cr_assert_eq(pw_grad_groups(3, 1, 6, &K), 3); /* any G dividing R·M */
    cr_assert_eq(K, 3);
    cr_assert_eq(pw_grad_groups(12, 3, 8, &K), 12);
    cr_assert_eq(K, 4);
    cr_assert_eq(pw_grad_groups(12, 2, 12, &K), 12);
    cr_assert_eq(K, 6);
    cr_assert_eq(pw_grad_groups(12, 8, 3, &K), 12); /* R does not divide G: K = 12 / gcd(12, 8) */
    cr_assert_eq(K, 3);
    cr_assert_eq(pw_grad_groups(4, 1, 6, NULL), -1);
    cr_assert_eq(pw_grad_groups(5, 2, 6, NULL), -1);
    /* Which replica counts give one replica's bits. */
    cr_assert(pw_grad_groups_identical(12, 1));
    cr_assert(pw_grad_groups_identical(12, 3));
    cr_assert(pw_grad_groups_identical(12, 12));
    cr_assert(!pw_grad_groups_identical(12, 2)); /* 6 groups per replica: another tree */
    cr_assert(!pw_grad_groups_identical(12, 5));
    cr_assert(pw_grad_groups_identical(4, 2));
    cr_assert(!pw_grad_groups_identical(4, 3));
    pw_graph *g = parse(MLP);
    pw_program_config pc = {.graph = g, .micro_batch = 2, .micro_batches = 6, .grad_groups = 4};
    pw_program *p;
    cr_assert_eq(pw_program_create(&pc, &p), PW_ERR_INVALID_ARG);
    pc.grad_groups = 5;
    pc.micro_batches = 6;
    cr_assert_eq(pw_program_create(&pc, &p), PW_ERR_INVALID_ARG);
    pc.grad_groups = 2;
    pc.micro_batches = 0;
    cr_assert_eq(pw_program_create(&pc, &p), PW_ERR_INVALID_ARG);
    pw_graph_destroy(g);
}

/* A step that runs fewer micro-batches than the program was told
 * (micro_batches) leaves group sums pending: the optimizer step takes them
 * in, so the update is that of every micro-batch run (to rounding). */
Test(program, a_short_step_loses_no_gradient)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = synthetic(256, 5, 0);
    const int64_t rows = 8;
    pw_program_config pc = {.graph = g, .micro_batch = rows, .loss_batch = rows * 4, .micro_batches = 4,
                            .grad_groups = 4, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
    pc.optim.momentum = 0.0f;
    pc.optim.weight_decay = 0.0f;
    pw_program *tree, *one;
    cr_assert_eq(pw_program_create(&pc, &tree), PW_OK, "%s", pw_last_error());
    pc.grad_groups = 1;
    cr_assert_eq(pw_program_create(&pc, &one), PW_OK, "%s", pw_last_error());
    pw_program_init_params(tree, 4);
    pw_program_init_params(one, 4);
    for (int m = 0; m < 3; m++) { /* 3 of 4 */
        micro_batch(tree, g, d, m, rows);
        micro_batch(one, g, d, m, rows);
    }
    cr_assert_eq(pw_program_optimizer_step(tree, 1), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_program_optimizer_step(one, 1), PW_OK, "%s", pw_last_error());
    float *a, *b;
    int64_t n;
    snapshot(tree, &a, &n);
    snapshot(one, &b, &n);
    double worst = 0, moved = 0;
    for (int64_t i = 0; i < n; i++) worst = fmax(worst, fabs((double)a[i] - b[i]));
    float *init;
    pw_program *fresh;
    cr_assert_eq(pw_program_create(&pc, &fresh), PW_OK);
    pw_program_init_params(fresh, 4);
    snapshot(fresh, &init, &n);
    for (int64_t i = 0; i < n; i++) moved = fmax(moved, fabs((double)b[i] - init[i]));
    cr_assert_gt(moved, 1e-4, "the step moved nothing: the check would be vacuous");
    /* "To rounding": the parameters may differ in their last bits (the sum
     * order differs, and so do a kernel's roundings: 7.5e-9 on a 0.1-sized
     * weight under OpenBLAS's Haswell kernel, one ulp), while a lost
     * micro-batch would move them by about a third of the update. */
    cr_assert_lt(worst, 1e-4 * moved, "the short step's update differs by %.3g (largest update %.3g)", worst, moved);
    free(a);
    free(b);
    free(init);
    pw_program_destroy(fresh);
    pw_program_destroy(tree);
    pw_program_destroy(one);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}
