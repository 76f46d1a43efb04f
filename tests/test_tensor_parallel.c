/* pipewright — tensor parallelism inside a stage (issue 16; docs/parallelism.md,
 * "Tensor parallelism"): the rank graphs a graph's tp= marks make, their
 * errors, training at T = 2, 3, 4 ranks (threads of this process) against
 * T = 1, and checkpoints that hold the same full tensors at every T.
 * The ops themselves are checked against the unsplit ones in
 * tests/test_op_table.c (op_table::tensor_parallel). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/safetensors.h"
#include "stages/ops/cpu/ops.h"
#include "stages/ops/optim.h"
#include "stages/train/checkpoint.h"
#include "stages/train/data.h"
#include "runtime/trace_read.h"
#include "runtime/transport.h"
#include "stages/train/trainer.h"
#include "tests/tsan_criterion.h" /* runs under ThreadSanitizer (scripts/test.sh) */
#include "tests/tp_support.h"        /* MLP, GPT, parse, images, tokens */

#define TIMEOUT 120

/* ------------------------------------------------------------ rank graphs */

Test(tensor_parallel, rank_graph_shapes, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    const int w1 = pw_graph_find_param(g, "fc1.weight"), b1 = pw_graph_find_param(g, "fc1.bias");
    const int w2 = pw_graph_find_param(g, "fc2.weight"), b2 = pw_graph_find_param(g, "fc2.bias");
    cr_assert(w1 >= 0 && b1 >= 0 && w2 >= 0 && b2 >= 0);
    for (int T = 1; T <= 4; T++) {
        int64_t rows = 0, cols = 0;
        for (int k = 0; k < T; k++) {
            pw_graph *r = NULL;
            cr_assert_eq(pw_graph_tp_rank(g, T, k, &r), PW_OK, "%s", pw_last_error());
            const int64_t lo = 37 * k / T, hi = 37 * (k + 1) / T;
            cr_expect_eq(r->params[w1].shape.d[0], hi - lo, "T=%d rank %d: fc1.weight rows", T, k);
            cr_expect_eq(r->params[w1].shape.d[1], 24);
            cr_expect_eq(r->params[b1].shape.d[0], hi - lo);
            cr_expect_eq(r->params[w2].shape.d[0], 19, "fc2.weight keeps its output features");
            cr_expect_eq(r->params[w2].shape.d[1], hi - lo, "T=%d rank %d: fc2.weight columns", T, k);
            cr_expect_eq(r->params[b2].shape.d[0], 19, "the row-parallel bias is whole");
            cr_expect_eq(r->params[b2].tp_full, 0);
            rows += r->params[w1].shape.d[0];
            cols += r->params[w2].shape.d[1];
            /* names stay (checkpoints) */
            cr_expect_str_eq(r->params[w1].name, "fc1.weight");
            pw_graph_destroy(r);
        }
        cr_expect_eq(rows, 37, "T=%d: the parts cover fc1's rows", T);
        cr_expect_eq(cols, 37);
    }
    pw_graph *r;
    cr_expect_eq(pw_graph_tp_rank(g, 2, 2, &r), PW_ERR_INVALID_ARG);
    cr_expect_eq(pw_graph_tp_rank(g, 0, 0, &r), PW_ERR_INVALID_ARG);
    pw_graph_destroy(g);
}

/* Attention by heads: c_attn's rows are whole heads of q, k and v. */
Test(tensor_parallel, attention_splits_by_heads, .timeout = TIMEOUT)
{
    pw_graph *g = parse(GPT);
    const int w = pw_graph_find_param(g, "h.0.attn.c_attn.weight");
    const int pw = pw_graph_find_param(g, "h.0.attn.c_proj.weight");
    cr_assert(w >= 0 && pw >= 0, "parameter names");
    /* heads per rank at T = 3: 4 heads → 1, 1, 2 */
    static const int64_t heads3[] = {1, 1, 2};
    float *full = malloc(96 * 32 * sizeof(float)), *back = calloc(96 * 32, sizeof(float));
    for (int i = 0; i < 96 * 32; i++) full[i] = (float)i;
    for (int k = 0; k < 3; k++) {
        pw_graph *r = NULL;
        cr_assert_eq(pw_graph_tp_rank(g, 3, k, &r), PW_OK, "%s", pw_last_error());
        cr_expect_eq(r->params[w].shape.d[0], 3 * heads3[k] * 8, "rank %d: c_attn rows", k);
        cr_expect_eq(r->params[pw].shape.d[1], heads3[k] * 8, "rank %d: c_proj columns", k);
        int at = -1;
        for (int i = 0; i < r->n_nodes; i++)
            if (r->nodes[i].op == PW_OP_CAUSAL_ATTENTION && at < 0) at = i;
        cr_assert_geq(at, 0);
        cr_expect_eq(r->nodes[at].attrs.heads, heads3[k], "rank %d: attention heads", k);
        /* rank k's rows of q, then of k, then of v */
        float *part = malloc((size_t)pw_shape_numel(&r->params[w].shape) * sizeof(float));
        pw_graph_tp_slice(r, w, full, part, 1);
        const int64_t h0 = k == 2 ? 2 : k;
        for (int b = 0; b < 3; b++)
            cr_expect_eq(part[(b * heads3[k] * 8) * 32], (float)((b * 32 + h0 * 8) * 32),
                         "rank %d block %d starts at the wrong row", k, b);
        pw_graph_tp_slice(r, w, back, part, 0);
        free(part);
        pw_graph_destroy(r);
    }
    cr_expect_eq(memcmp(full, back, 96 * 32 * sizeof(float)), 0, "the three parts do not put back the whole");
    free(full), free(back);
    /* five ranks for four heads: refused */
    pw_graph *r = NULL;
    cr_expect_eq(pw_graph_tp_rank(g, 5, 0, &r), PW_ERR_SHAPE);
    cr_expect(strstr(pw_last_error(), "4 heads, fewer than the 5 tensor-parallel ranks") != NULL, "%s",
              pw_last_error());
    pw_graph_destroy(g);
}

/* A graph that cannot split as marked: an error naming the op and line. */
Test(tensor_parallel, errors_name_the_op, .timeout = TIMEOUT)
{
    static const struct {
        const char *body, *want;
    } cases[] = {
        {"a = linear(x, out=8, tp=row) as p\nlogits = linear(a, out=3)\n", "linear 'p' is tp=row but its input"},
        {"a = linear(x, out=8, tp=column) as p\nb = layernorm(a) as ln\nlogits = linear(b, out=3)\n",
         "layernorm 'ln' reads 'a', which is split"},
        {"a = linear(x, out=8, tp=column) as p\nlogits = linear(a, out=3) as q\n",
         "linear 'q' reads 'a', which is split across tensor-parallel ranks: mark it tp=row"},
        {"a = linear(x, out=8, tp=column) as p\nb = linear(x, out=8) as q\nc = add(a, b)\nlogits = linear(c, out=3)\n",
         "has 2 consumers"},
        {"a = linear(x, out=8, tp=column) as p\nd = dropout(a, p=0.5)\nlogits = linear(d, out=3, tp=row)\n",
         "split dropout's masks are not built"},
        {"a = linear(x, out=8, tp=column) as p\nb = linear(a, out=8, tp=column) as q\nlogits = linear(b, out=3)\n",
         "linear 'q' is tp=column but its input 'a' is already split"},
        {"a = linear(x, out=24, tp=column) as p\nb = linear(a, out=24, tp=row, weight=p.weight) as q\n"
         "logits = linear(b, out=3)\n",
         "tied to an op that splits it differently"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[1024];
        snprintf(text, sizeof text, "graph e\ninput x : f32[24]\nlabel t : i32[]\n%sloss = softmax_cross_entropy(logits, t)\n",
                 cases[i].body);
        pw_graph *g = parse(text), *r = NULL;
        pw_status st = pw_graph_tp_rank(g, 2, 1, &r);
        cr_expect_eq(st, PW_ERR_SHAPE, "case %zu: %s", i, st == PW_OK ? "accepted" : pw_last_error());
        cr_expect(r == NULL);
        cr_expect(strstr(pw_last_error(), cases[i].want) != NULL, "case %zu: '%s' does not say '%s'", i,
                  pw_last_error(), cases[i].want);
        cr_expect(strstr(pw_last_error(), "tp.graph:") != NULL, "case %zu: '%s' names no line", i, pw_last_error());
        pw_graph_destroy(g);
    }
    /* bad attribute values are parse errors */
    const char *bad = "graph e\ninput x : f32[4]\nlabel t : i32[]\nlogits = linear(x, out=3, tp=vocab)\n"
                      "loss = softmax_cross_entropy(logits, t)\n";
    pw_graph *g = NULL;
    cr_expect_eq(pw_graph_parse_string(bad, strlen(bad), "bad.graph", &g), PW_ERR_PARSE);
    cr_expect(strstr(pw_last_error(), "'tp' must be column or row") != NULL, "%s", pw_last_error());
    /* a trainer at T = 2 over a graph with no marks is refused */
    pw_graph *plain = parse("graph p\ninput image : f32[4, 6]\nlabel target : i32[]\nx = flatten(image)\n"
                            "logits = linear(x, out=5)\nloss = softmax_cross_entropy(logits, target)\n");
    pw_dataset *d = images();
    pw_trainer_config tc = {.graph = plain, .train = d, .batch = 16, .micro_batches = 2,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .seed = 1, .tensor_parallel = 2};
    pw_trainer *t = NULL;
    cr_expect_eq(pw_trainer_create(&tc, &t), PW_ERR_INVALID_ARG);
    cr_expect(strstr(pw_last_error(), "marks no op to split") != NULL, "%s", pw_last_error());
    pw_dataset_destroy(d);
    pw_graph_destroy(plain);
}

/* --------------------------------------------------------------- training */

/* Every parameter, full (gathered over the ranks), in graph order. */
static float *gather(pw_trainer *t, const pw_graph *g, int64_t *n_out)
{
    int64_t total = 0;
    for (int i = 0; i < g->n_params; i++) total += pw_shape_numel(&g->params[i].shape);
    float *all = calloc((size_t)total, sizeof *all);
    cr_assert_not_null(all);
    pw_program *const *progs;
    const int T = pw_trainer_programs(t, &progs);
    for (int k = 0; k < T; k++) {
        const pw_graph *rg = pw_program_get_config(progs[k])->graph;
        for (int j = 0; j < pw_program_n_params(progs[k]); j++) {
            pw_program_param pp;
            pw_program_param_at(progs[k], j, &pp);
            int64_t off = 0;
            for (int i = 0; i < pp.graph_param; i++) off += pw_shape_numel(&g->params[i].shape);
            pw_graph_tp_slice(rg, pp.graph_param, all + off, pp.data, 0);
        }
    }
    *n_out = total;
    return all;
}

typedef struct run_result {
    float *params;
    int64_t n;
    double loss[8];
} run_result;

static run_result train(const pw_graph *g, const pw_dataset *d, int T, int steps, int64_t batch, int M,
                        pw_optim_kind opt, int threads)
{
    pw_cpu_set_threads(threads);
    pw_optim_config oc = pw_optim_defaults(opt);
    oc.lr = opt == PW_OPTIM_SGD ? 0.1f : 3e-3f;
    pw_trainer_config tc = {.graph = g, .train = d, .batch = batch, .micro_batches = M, .optim = oc, .seed = 11,
                            .shuffle = 1, .tensor_parallel = T};
    pw_trainer *t = NULL;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "T=%d: %s", T, pw_last_error());
    run_result r = {0};
    for (int s = 0; s < steps; s++) {
        pw_step_stats st;
        cr_assert_eq(pw_trainer_step(t, &st), PW_OK, "T=%d step %d: %s", T, s + 1, pw_last_error());
        r.loss[s] = st.loss;
    }
    r.params = gather(t, g, &r.n);
    pw_trainer_destroy(t);
    return r;
}

/* max |a − b| / max |b| over every parameter. */
static double rel_err(const run_result *a, const run_result *b)
{
    double d = 0.0, m = 0.0;
    for (int64_t i = 0; i < a->n; i++) {
        d = fmax(d, fabs((double)a->params[i] - (double)b->params[i]));
        m = fmax(m, fabs((double)b->params[i]));
    }
    return d / m;
}

/* max |b| over every parameter. */
static double scale_of(const run_result *b)
{
    double m = 0.0;
    for (int64_t i = 0; i < b->n; i++) m = fmax(m, fabs((double)b->params[i]));
    return m;
}

/* T ∈ {2, 3, 4} against T = 1 after several steps: each step's loss within
 * 1e-6 relative; under SGD every parameter within 1e-6 of the largest (the
 * row-parallel sums change order, so not the same bits: checked too); under
 * AdamW see below. The same T twice — the second at another CPU thread
 * count — gives the same bits. */
static void against_one(const char *text, pw_dataset *d, int64_t batch, int M, pw_optim_kind opt, int steps)
{
    const int team = pw_cpu_get_threads();
    const double lr = opt == PW_OPTIM_SGD ? 0.1 : 3e-3; /* train()'s */
    pw_graph *g = parse(text);
    run_result one = train(g, d, 1, steps, batch, M, opt, 1);
    cr_assert(one.loss[steps - 1] < one.loss[0], "the run does not learn (%g -> %g): a vacuous comparison",
              one.loss[0], one.loss[steps - 1]);
    const char *on = pw_optim_name(opt);
    for (int T = 2; T <= 4; T++) {
        run_result r = train(g, d, T, steps, batch, M, opt, 1);
        const double e = rel_err(&r, &one);
        if (opt == PW_OPTIM_SGD) {
            cr_log_info("%s %s T=%d: parameters after %d steps within %.3g of the largest of T=1", g->name, on, T,
                        steps, e);
            cr_expect_leq(e, 1e-6, "%s %s T=%d: parameters after %d steps differ from T=1 by %.3g of the largest",
                          g->name, on, T, steps, e);
        } else {
            /* Adam divides each update by the gradient's own running scale,
             * so an element whose gradient is near rounding level moves by a
             * different fraction of lr at T = 2 than at T = 1. The others
             * agree as under SGD, and none can drift further apart than
             * Adam's steps (about lr each) allow. */
            const double big = scale_of(&one);
            int64_t off = 0;
            double worst = 0.0;
            for (int64_t i = 0; i < r.n; i++) {
                const double dd = fabs((double)r.params[i] - (double)one.params[i]);
                worst = fmax(worst, dd);
                off += dd > 1e-6 * big;
            }
            cr_log_info("%s %s T=%d: %lld of %lld parameters differ from T=1 by more than 1e-6 of the largest; "
                        "the most by %.3g (%.3g of the largest)", g->name, on, T, (long long)off, (long long)r.n,
                        worst, e);
            cr_expect_leq(off, r.n / 100, "%s %s T=%d: %lld of %lld parameters differ from T=1 by more than 1e-6 of "
                          "the largest (more than 1 %%)", g->name, on, T, (long long)off, (long long)r.n);
            cr_expect_leq(worst, lr * steps, "%s %s T=%d: a parameter differs from T=1 by %.3g, more than %d steps "
                          "of lr %g", g->name, on, T, worst, steps, lr);
        }
        cr_expect_gt(e, 0.0, "%s %s T=%d: bit-identical to T=1, which the docs say it is not (the sums' order)",
                     g->name, on, T);
        for (int s = 0; s < steps; s++)
            cr_expect_leq(fabs(r.loss[s] - one.loss[s]), 1e-6 * fabs(one.loss[s]),
                          "%s %s T=%d step %d: loss %.9g, T=1 %.9g", g->name, on, T, s + 1, r.loss[s], one.loss[s]);
        if (T == 2) {
            run_result again = train(g, d, T, steps, batch, M, opt, 3);
            cr_expect_eq(memcmp(again.params, r.params, (size_t)r.n * sizeof(float)), 0,
                         "%s %s T=2: a second run at 3 CPU threads differs from the first", g->name, on);
            free(again.params);
        }
        free(r.params);
    }
    free(one.params);
    pw_graph_destroy(g);
    pw_cpu_set_threads(team);
}

Test(tensor_parallel, mlp_matches_one_rank, .timeout = TIMEOUT)
{
    pw_dataset *d = images();
    against_one(MLP, d, 32, 4, PW_OPTIM_SGD, 4);
    against_one(MLP, d, 32, 2, PW_OPTIM_ADAMW, 4);
    pw_dataset_destroy(d);
}

Test(tensor_parallel, gpt_matches_one_rank, .timeout = TIMEOUT)
{
    pw_dataset *d = tokens();
    against_one(GPT, d, 8, 2, PW_OPTIM_SGD, 3);
    against_one(GPT, d, 8, 2, PW_OPTIM_ADAMW, 3);
    pw_dataset_destroy(d);
}

/* ------------------------------------------------------------ checkpoints */

static pw_trainer *trainer(const pw_graph *g, const pw_dataset *d, int T)
{
    pw_optim_config oc = pw_optim_defaults(PW_OPTIM_SGD);
    oc.lr = 0.1f;
    pw_trainer_config tc = {.graph = g, .train = d, .batch = 8, .micro_batches = 2, .optim = oc, .seed = 11,
                            .shuffle = 1, .tensor_parallel = T};
    pw_trainer *t = NULL;
    cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "T=%d: %s", T, pw_last_error());
    return t;
}

static void save(pw_trainer *t, const pw_graph *g, const char *path)
{
    pw_program *const *progs;
    const int n = pw_trainer_programs(t, &progs);
    pw_checkpoint_info info = {.step = 2};
    cr_assert_eq(pw_checkpoint_save(path, g, progs, n, &info), PW_OK, "%s", pw_last_error());
}

static void load(pw_trainer *t, const pw_graph *g, const char *path)
{
    pw_program *const *progs;
    const int n = pw_trainer_programs(t, &progs);
    cr_assert_eq(pw_checkpoint_load(path, g, progs, n, NULL), PW_OK, "%s", pw_last_error());
}

/* Every tensor of file a against b: same names, shapes and count; values
 * bit for bit (exact) or within 1e-6 of b's largest. */
static void same_tensors(const char *a, const char *b, int exact, const char *what)
{
    pw_safetensors *fa = NULL, *fb = NULL;
    cr_assert_eq(pw_safetensors_open(a, &fa), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_open(b, &fb), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_safetensors_count(fa), pw_safetensors_count(fb), "%s: tensor counts differ", what);
    for (int i = 0; i < pw_safetensors_count(fb); i++) {
        pw_st_tensor tb, ta;
        cr_assert_eq(pw_safetensors_at(fb, i, &tb), PW_OK);
        cr_assert_eq(pw_safetensors_get(fa, tb.name, &ta), PW_OK, "%s: '%s' missing: %s", what, tb.name,
                     pw_last_error());
        cr_assert(pw_shape_equal(&ta.shape, &tb.shape), "%s: '%s' has another shape", what, tb.name);
        cr_assert_eq(ta.nbytes, tb.nbytes);
        const float *x = ta.data, *y = tb.data;
        const int64_t n = (int64_t)(tb.nbytes / sizeof(float));
        if (exact) {
            double dd = 0.0;
            for (int64_t j = 0; j < n; j++) dd = fmax(dd, fabs((double)x[j] - (double)y[j]));
            cr_expect_eq(memcmp(x, y, tb.nbytes), 0, "%s: '%s' differs (by up to %.3g)", what, tb.name, dd);
            continue;
        }
        double d = 0.0, m = 0.0;
        for (int64_t j = 0; j < n; j++) {
            d = fmax(d, fabs((double)x[j] - (double)y[j]));
            m = fmax(m, fabs((double)y[j]));
        }
        cr_expect_leq(d, 1e-6 * fmax(m, 1.0), "%s: '%s' differs by %.3g", what, tb.name, d);
    }
    pw_safetensors_close(fa);
    pw_safetensors_close(fb);
}

/* A run at T = 2 saves the full tensors a run at T = 1 saves (names,
 * shapes; values as training at T = 2 gives them); the file loads at
 * T = 3 and T = 1 and saves again to the same bytes (split and gather are
 * exact), and a resumed T = 3 run continues as the T = 1 run does. */
Test(tensor_parallel, checkpoints_are_layout_free, .timeout = TIMEOUT)
{
    pw_graph *g = parse(GPT);
    pw_dataset *d = tokens();
    char p1[] = "/tmp/pw_tp_ck1_XXXXXX", p2[] = "/tmp/pw_tp_ck2_XXXXXX", p3[] = "/tmp/pw_tp_ck3_XXXXXX",
         p4[] = "/tmp/pw_tp_ck4_XXXXXX";
    char *paths[] = {p1, p2, p3, p4};
    for (int i = 0; i < 4; i++) {
        int fd = mkstemp(paths[i]);
        cr_assert_geq(fd, 0);
        close(fd);
    }
    pw_trainer *one = trainer(g, d, 1), *two = trainer(g, d, 2);
    for (int s = 0; s < 2; s++) {
        cr_assert_eq(pw_trainer_step(one, NULL), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_trainer_step(two, NULL), PW_OK, "%s", pw_last_error());
    }
    save(one, g, p1);
    save(two, g, p2);
    same_tensors(p2, p1, 0, "T=2 saved against T=1 saved");

    pw_trainer *three = trainer(g, d, 3), *again = trainer(g, d, 1);
    load(three, g, p2);
    save(three, g, p3);
    same_tensors(p3, p2, 1, "T=2 saved, loaded at T=3, saved");
    load(again, g, p2);
    save(again, g, p4);
    same_tensors(p4, p2, 1, "T=2 saved, loaded at T=1, saved");

    /* T = 1's file resumed at T = 3 and at T = 1 (weights only: both
     * start without momentum) for a step: within 1e-6 */
    pw_trainer *r3 = trainer(g, d, 3), *r1 = trainer(g, d, 1);
    load(r3, g, p1);
    load(r1, g, p1);
    pw_trainer_seek(r3, 2);
    pw_trainer_seek(r1, 2);
    cr_assert_eq(pw_trainer_step(r3, NULL), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_trainer_step(r1, NULL), PW_OK, "%s", pw_last_error());
    save(r3, g, p3);
    save(r1, g, p4);
    same_tensors(p3, p4, 0, "T=1's file resumed at T=3 for a step against resumed at T=1");
    pw_trainer_destroy(r3);
    pw_trainer_destroy(r1);

    pw_trainer_destroy(one);
    pw_trainer_destroy(two);
    pw_trainer_destroy(three);
    pw_trainer_destroy(again);
    for (int i = 0; i < 4; i++) unlink(paths[i]);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* Evaluation at T = 2 and 3 gives T = 1's loss and accuracy (to rounding);
 * recomputation at T = 2 gives T = 2's bits (the forward re-run in the
 * backward repeats its all-reduces on every rank). */
Test(tensor_parallel, evaluate_and_recompute, .timeout = TIMEOUT)
{
    pw_graph *g = parse(GPT);
    pw_dataset *d = tokens();
    pw_eval_stats e1, eT;
    pw_trainer *one = trainer(g, d, 1);
    cr_assert_eq(pw_trainer_step(one, NULL), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_trainer_evaluate(one, d, &e1), PW_OK, "%s", pw_last_error());
    for (int T = 2; T <= 3; T++) {
        pw_trainer *t = trainer(g, d, T);
        cr_assert_eq(pw_trainer_step(t, NULL), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_trainer_evaluate(t, d, &eT), PW_OK, "%s", pw_last_error());
        cr_expect_leq(fabs(eT.loss - e1.loss), 1e-6 * e1.loss, "T=%d: evaluation loss %.9g, T=1 %.9g", T, eT.loss,
                      e1.loss);
        cr_expect_leq(fabs(eT.accuracy - e1.accuracy), 1e-9, "T=%d: accuracy %.6f, T=1 %.6f", T, eT.accuracy,
                      e1.accuracy);
        cr_expect_eq(eT.samples, e1.samples);
        pw_trainer_destroy(t);
    }
    pw_trainer_destroy(one);

    pw_optim_config oc = pw_optim_defaults(PW_OPTIM_ADAMW);
    int64_t n[2];
    float *p[2];
    for (int rc = 0; rc < 2; rc++) {
        pw_trainer_config tc = {.graph = g, .train = d, .batch = 8, .micro_batches = 2, .optim = oc, .seed = 5,
                                .tensor_parallel = 2, .recompute = rc};
        pw_trainer *t = NULL;
        cr_assert_eq(pw_trainer_create(&tc, &t), PW_OK, "%s", pw_last_error());
        for (int s = 0; s < 2; s++) cr_assert_eq(pw_trainer_step(t, NULL), PW_OK, "%s", pw_last_error());
        p[rc] = gather(t, g, &n[rc]);
        pw_trainer_destroy(t);
    }
    cr_expect_eq(memcmp(p[0], p[1], (size_t)n[0] * sizeof(float)), 0, "T=2 with recomputation differs from without");
    free(p[0]), free(p[1]);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ---------------------------------------------------------------- pipelines */

#include "stages/train/pipeline.h"

/* Chunk boundaries that no split value crosses (at T = 2), spread over the
 * graph: cuts[0] = 0 < ... < cuts[C] = n_nodes; returns 0 when C chunks do
 * not fit. */
static int tp_cuts(const pw_graph *g, int C, int *cuts)
{
    pw_graph *r = NULL;
    cr_assert_eq(pw_graph_tp_rank(g, 2, 0, &r), PW_OK, "%s", pw_last_error());
    int ok[1024] = {0}, n_ok = 0;
    for (int b = 1; b < g->n_nodes && b < 1024; b++) {
        int fine = 1;
        for (int i = b; i < g->n_nodes && fine; i++)
            for (int q = 0; q < g->nodes[i].n_inputs; q++) {
                const int v = g->nodes[i].inputs[q];
                if (r->values[v].tp_full && r->values[v].producer >= 0 && r->values[v].producer < b) fine = 0;
            }
        if (fine) ok[n_ok++] = b;
    }
    pw_graph_destroy(r);
    if (n_ok < C - 1) return 0;
    cuts[0] = 0;
    for (int c = 1; c < C; c++) cuts[c] = ok[(int64_t)c * n_ok / C];
    cuts[C] = g->n_nodes;
    for (int c = 1; c <= C; c++)
        if (cuts[c] <= cuts[c - 1]) return 0;
    return 1;
}

typedef struct pl_layout {
    int S, R, T, M;
    pw_schedule_kind kind;
} pl_layout;

/* Trains `steps` steps and saves the parameters (gathered over the ranks). */
static void pipeline_run(const pw_graph *g, const pw_dataset *d, const pl_layout *L, int64_t batch, int steps,
                         const char *path)
{
    const int v = L->kind == PW_SCHEDULE_INTERLEAVED || L->kind == PW_SCHEDULE_ZB_V ? 2 : 1;
    int cuts[64];
    cr_assert(tp_cuts(g, L->S * v, cuts), "%s: no %d chunks without splitting a pair", g->name, L->S * v);
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = batch;
    pc.micro_batches = L->M;
    pc.replicas = L->R;
    pc.stages = L->S;
    pc.schedule = L->kind;
    pc.cuts = cuts;
    pc.n_cuts = L->S * v + 1;
    pc.optim = pw_optim_defaults(PW_OPTIM_SGD);
    pc.optim.lr = 0.1f;
    pc.seed = 11;
    pc.shuffle = 1;
    pc.pin = 0;
    pc.watchdog_s = 120;
    pc.tensor_parallel = L->T;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s S=%d R=%d T=%d %s: %s", g->name, L->S, L->R, L->T,
                 pw_schedule_kind_name(L->kind), pw_last_error());
    cr_assert_eq(pw_pipeline_tensor_parallel(pl), L->T > 1 ? L->T : 1);
    for (int s = 0; s < steps; s++)
        cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s S=%d R=%d T=%d: %s", g->name, L->S, L->R, L->T,
                     pw_last_error());
    cr_assert_eq(pw_pipeline_save(pl, path, NULL), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
}

/* S × R × T in one process: at T = 2 the same bits for every stage count,
 * schedule and replica count (2 × 2 × 2 = 8 ranks included); T = 2 against
 * T = 1 within 1e-6 (SGD). */
static void pipeline_matrix(const char *text, pw_dataset *d, int64_t batch, int steps)
{
    pw_graph *g = parse(text);
    char ref[] = "/tmp/pw_tp_pl_ref_XXXXXX", one[] = "/tmp/pw_tp_pl_one_XXXXXX", got[] = "/tmp/pw_tp_pl_got_XXXXXX";
    char *paths[] = {ref, one, got};
    for (int i = 0; i < 3; i++) {
        int fd = mkstemp(paths[i]);
        cr_assert_geq(fd, 0);
        close(fd);
    }
    const pl_layout base = {1, 1, 2, 4, PW_SCHEDULE_1F1B};
    pipeline_run(g, d, &base, batch, steps, ref);
    const pl_layout t1 = {1, 1, 1, 4, PW_SCHEDULE_1F1B};
    pipeline_run(g, d, &t1, batch, steps, one);
    same_tensors(ref, one, 0, "pipeline T=2 against T=1");
    static const pl_layout layouts[] = {
        {2, 1, 2, 4, PW_SCHEDULE_1F1B}, {2, 1, 2, 4, PW_SCHEDULE_GPIPE},       {2, 1, 2, 4, PW_SCHEDULE_ZB_H1},
        {2, 1, 2, 4, PW_SCHEDULE_INTERLEAVED}, {3, 1, 2, 4, PW_SCHEDULE_1F1B}, {2, 2, 2, 2, PW_SCHEDULE_1F1B},
        {1, 2, 2, 2, PW_SCHEDULE_1F1B},
    };
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        pipeline_run(g, d, &layouts[i], batch, steps, got);
        char what[128];
        snprintf(what, sizeof what, "%s T=2: S=%d R=%d %s against S=1 R=1 1f1b", g->name, layouts[i].S,
                 layouts[i].R, pw_schedule_kind_name(layouts[i].kind));
        same_tensors(got, ref, 1, what);
    }
    for (int i = 0; i < 3; i++) unlink(paths[i]);
    pw_graph_destroy(g);
}

Test(tensor_parallel, pipeline_mlp_layouts, .timeout = TIMEOUT)
{
    pw_dataset *d = images();
    pipeline_matrix(MLP, d, 32, 3);
    pw_dataset_destroy(d);
}

Test(tensor_parallel, pipeline_gpt_layouts, .timeout = TIMEOUT)
{
    pw_dataset *d = tokens();
    pipeline_matrix(GPT, d, 8, 2);
    pw_dataset_destroy(d);
}

/* A cut inside a column → row pair is refused, naming the value. */
Test(tensor_parallel, pipeline_cut_inside_a_pair, .timeout = TIMEOUT)
{
    pw_graph *g = parse(MLP);
    pw_dataset *d = images();
    const int cuts[] = {0, 3, g->n_nodes}; /* before node 3 (relu): fc1's output crosses, split */
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 32;
    pc.micro_batches = 4;
    pc.stages = 2;
    pc.cuts = cuts;
    pc.n_cuts = 3;
    pc.optim = pw_optim_defaults(PW_OPTIM_SGD);
    pc.pin = 0;
    pc.tensor_parallel = 2;
    pw_pipeline *pl = NULL;
    cr_expect_eq(pw_pipeline_create(&pc, &pl), PW_ERR_INVALID_ARG);
    cr_expect(strstr(pw_last_error(), "splits a tensor-parallel pair: value 'fc1'") != NULL, "%s", pw_last_error());
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------------ pipeline-run */

#include "tests/test_helpers.h"

static int run_tool(const char *args, char **out)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "cd /tmp && '%s/pipeline-run' %s 2>&1", PW_BINARY_DIR, args);
    return test_run(cmd, out);
}

/* --tensor-parallel T: trains and saves the same named tensors as T = 1
 * (within 1e-6; 2 stages), and is refused where it is not built. */
Test(tensor_parallel, cli_flag, .timeout = TIMEOUT)
{
    char graph[96], ck[2][96], args[1024], *o;
    snprintf(graph, sizeof graph, "/tmp/pw_test_tp_%d.graph", (int)getpid());
    FILE *f = fopen(graph, "w");
    cr_assert_not_null(f);
    fputs(MLP, f);
    fclose(f);
    cr_assert_eq(run_tool("--help", &o), 0);
    cr_assert(strstr(o, "--tensor-parallel T"), "--help does not mention --tensor-parallel");
    free(o);
    for (int T = 1; T <= 2; T++) {
        snprintf(ck[T - 1], sizeof ck[T - 1], "/tmp/pw_test_tp_%d_%d.safetensors", (int)getpid(), T);
        snprintf(args, sizeof args, "%s --data synthetic:256:4x6:5 --no-pin --quiet --stages 2 --batch 32 "
                 "--micro-batches 4 --steps 3 --optimizer sgd --lr 0.1 --tensor-parallel %d --save %s", graph, T,
                 ck[T - 1]);
        cr_assert_eq(run_tool(args, &o), 0, "T=%d: %s", T, o);
        free(o);
    }
    same_tensors(ck[1], ck[0], 0, "pipeline-run --tensor-parallel 2 against 1");
    /* Clipping at T > 1 (tests/test_tp_state.c checks its numbers); with
     * --parallel auto, --tensor-parallel fixes T. */
    snprintf(args, sizeof args, "%s --data synthetic:256:4x6:5 --no-pin --batch 32 --steps 2 --tensor-parallel 2 "
             "--clip-grad-norm 1", graph);
    cr_assert_eq(run_tool(args, &o), 0, "%s", o);
    free(o);
    snprintf(args, sizeof args, "%s --data synthetic:256:4x6:5 --no-pin --batch 32 --tensor-parallel 2 "
             "--parallel auto --plan --flops-per-s 1e10", graph);
    cr_assert_eq(run_tool(args, &o), 0, "%s", o);
    cr_expect(strstr(o, " T=2 ") && strstr(o, "--tensor-parallel 2"), "%s", o);
    free(o);
    cr_assert_eq(run_tool("m.graph --tensor-parallel 0", &o), 2, "%s", o);
    free(o);
    unlink(graph), unlink(ck[0]), unlink(ck[1]);
}

/* A pipeline at T = 2 loads a file saved at T = 1 (--init-from) and saves
 * the same bytes back, over 2 stages. */
Test(tensor_parallel, pipeline_load_save, .timeout = TIMEOUT)
{
    pw_graph *g = parse(GPT);
    pw_dataset *d = tokens();
    char a[] = "/tmp/pw_tp_pll_a_XXXXXX", b[] = "/tmp/pw_tp_pll_b_XXXXXX";
    close(mkstemp(a));
    close(mkstemp(b));
    const pl_layout one = {1, 1, 1, 4, PW_SCHEDULE_1F1B};
    pipeline_run(g, d, &one, 8, 1, a);
    int cuts[8];
    cr_assert(tp_cuts(g, 2, cuts));
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 8;
    pc.micro_batches = 4;
    pc.stages = 2;
    pc.cuts = cuts;
    pc.n_cuts = 3;
    pc.optim = pw_optim_defaults(PW_OPTIM_SGD);
    pc.pin = 0;
    pc.tensor_parallel = 2;
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_pipeline_load(pl, a, NULL), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_pipeline_save(pl, b, NULL), PW_OK, "%s", pw_last_error());
    same_tensors(b, a, 1, "T=1's file loaded into a 2-stage pipeline at T=2 and saved");
    pw_pipeline_destroy(pl);
    unlink(a), unlink(b);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* The tensor-parallel all-reduces in the trace (runtime/trace.h,
 * PW_TRACE_TP): at T = 2 every rank's track holds TP_ALLREDUCE events, each
 * inside an F, B or W of the same chunk, micro-batch and step on that track,
 * with the bytes of the split layers' sums; at T = 1 there are none. */
typedef struct tr_ev {
    char name[16];
    int64_t tid, t0, t1, step, bytes;
    int stage, mb;
} tr_ev;

static int read_events(const char *path, tr_ev *ev, int cap)
{
    pw_trace_reader *rd = NULL;
    cr_assert_eq(pw_trace_reader_open(path, &rd), PW_OK, "%s", pw_last_error());
    pw_trace_record rec;
    int more = 1, n = 0;
    while (pw_trace_reader_next(rd, &rec, &more) == PW_OK && more) {
        if (rec.ph != 'X') continue;
        cr_assert_lt(n, cap);
        tr_ev *e = &ev[n++];
        snprintf(e->name, sizeof e->name, "%s", rec.name);
        e->tid = rec.tid;
        e->t0 = rec.ts_ns;
        e->t1 = rec.ts_ns + rec.dur_ns;
        e->step = rec.step;
        e->bytes = rec.bytes;
        e->stage = rec.stage;
        e->mb = rec.mb;
        if (!strcmp(rec.name, "TP_ALLREDUCE")) cr_assert_str_eq(rec.cat, "tp");
    }
    pw_trace_reader_close(rd);
    return n;
}

Test(tensor_parallel, trace_records_the_sums, .timeout = TIMEOUT)
{
    pw_dataset *d = images();
    pw_graph *g = parse(MLP);
    char path[] = "/tmp/pw_tp_trace_XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    close(fd);
    enum { CAP = 4096 };
    tr_ev *ev = calloc(CAP, sizeof *ev);
    cr_assert_not_null(ev);
    for (int T = 1; T <= 2; T++) {
        int cuts[8];
        cr_assert(tp_cuts(g, 2, cuts));
        pw_pipeline_config pc = pw_pipeline_defaults();
        pc.graph = g;
        pc.train = d;
        pc.batch = 32;
        pc.micro_batches = 4;
        pc.stages = 2;
        pc.cuts = cuts;
        pc.n_cuts = 3;
        pc.optim = pw_optim_defaults(PW_OPTIM_SGD);
        pc.pin = 0;
        pc.tensor_parallel = T;
        pc.trace_events = pw_pipeline_trace_capacity(4, 1, 2) * 4;
        pw_pipeline *pl = NULL;
        cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
        for (int s = 0; s < 2; s++) cr_assert_eq(pw_pipeline_step(pl, NULL), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_pipeline_write_trace(pl, path), PW_OK, "%s", pw_last_error());
        pw_pipeline_destroy(pl);
        const int n = read_events(path, ev, CAP);
        int tp = 0, per_track[2] = {0, 0};
        for (int i = 0; i < n; i++) {
            if (strcmp(ev[i].name, "TP_ALLREDUCE")) continue;
            tp++;
            cr_assert(ev[i].tid >= 0 && ev[i].tid < 2);
            per_track[ev[i].tid]++;
            cr_assert_gt(ev[i].bytes, 0);
            cr_assert_eq(ev[i].bytes % 4, 0);
            int inside = 0;
            for (int j = 0; j < n && !inside; j++)
                inside = (!strcmp(ev[j].name, "F") || !strcmp(ev[j].name, "B") || !strcmp(ev[j].name, "W")) &&
                         ev[j].tid == ev[i].tid && ev[j].stage == ev[i].stage && ev[j].mb == ev[i].mb &&
                         ev[j].step == ev[i].step && ev[j].t0 <= ev[i].t0 && ev[i].t1 <= ev[j].t1;
            cr_assert(inside, "TP_ALLREDUCE of chunk %d mb %d step %lld on track %lld is inside no F, B or W of "
                      "its own", ev[i].stage, ev[i].mb, (long long)ev[i].step, (long long)ev[i].tid);
        }
        if (T == 1) {
            cr_assert_eq(tp, 0, "T = 1 recorded %d tensor-parallel sums", tp);
        } else {
            /* The chunk holding the fc1 -> fc2 pair (tp_cuts keeps it whole) sums once per F (fc2's
             * output) and once per B (fc1's input gradient): 4 micro-batches x 2 steps x 2; the other
             * chunk splits nothing. */
            cr_assert((per_track[0] == 16 && per_track[1] == 0) || (per_track[0] == 0 && per_track[1] == 16),
                      "sums per track: %d and %d", per_track[0], per_track[1]);
        }
    }
    free(ev);
    unlink(path);
    pw_graph_destroy(g);
    pw_dataset_destroy(d);
}

/* The MPI rank layout (runtime/transport.h, "Layout"; docs/distributed.md,
 * "Rank layout"): w = (replica · S + stage) · T + tp, and a process's peer
 * in another stage or replica has its own tensor rank; T = 1 is the layout
 * without tensor parallelism. */
Test(tensor_parallel, mpi_rank_layout, .timeout = TIMEOUT)
{
    const int S = 3, R = 2;
    for (int T = 1; T <= 4; T++)
        for (int w = 0; w < S * R * T; w++) {
            /* what pw_mpi_transport_create derives from the world rank */
            pw_transport t = {.n_ranks = S, .n_replicas = R, .n_tp = T, .replica = w / T / S, .rank = w / T % S,
                              .tp_rank = w % T};
            cr_assert_eq(pw_transport_world_of(&t, t.replica, t.rank), w, "T=%d w=%d", T, w);
            for (int k = 0; k < R; k++)
                for (int r = 0; r < S; r++) {
                    const int peer = pw_transport_world_of(&t, k, r);
                    cr_assert_eq(peer % T, t.tp_rank, "the peer keeps the tensor rank");
                    cr_assert_eq(peer / T, k * S + r);
                }
        }
    /* n_tp 0 (a transport built without tensor parallelism) is T = 1 */
    pw_transport t0 = {.n_ranks = 2, .n_replicas = 2, .replica = 1, .rank = 1};
    cr_assert_eq(pw_transport_world_of(&t0, 1, 0), 2);
}
