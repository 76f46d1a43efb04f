/* Tests: the layout search (stages/plan/layout.h) — its choice against an
 * exhaustive search on hand-made cost tables, memory budgets, the refusal of
 * an impossible request, the space's rules, and the built-in model's bounds. */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <time.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "runtime/rng.h"
#include "runtime/topology.h"
#include "stages/plan/forecast.h"
#include "stages/plan/layout.h"

#define TIMEOUT 300

/* ------------------------------------------------------------ cost tables */

/* A hand-made model: each candidate of the space (by enumeration index)
 * has a step and a memory drawn at random, and bounds below them. */
typedef struct table {
    pw_layout *cand;
    int n;
    double *step;
    int64_t *mem;
    double *step_lb;
    int64_t *mem_lb;
    int calls;
} table;

static int find(const table *t, const pw_layout *l)
{
    for (int i = 0; i < t->n; i++)
        if (!memcmp(&t->cand[i], l, sizeof *l)) return i;
    cr_assert_fail("layout not in the table");
    return -1;
}

static pw_status table_cost(void *ctx, const pw_layout *l, pw_layout_cost *out)
{
    table *t = ctx;
    const int i = find(t, l);
    t->calls++;
    memset(out, 0, sizeof *out);
    out->step_time = t->step[i];
    out->memory = t->mem[i];
    return PW_OK;
}

static void table_bound(void *ctx, const pw_layout *l, double *step_lb, int64_t *mem_lb)
{
    table *t = ctx;
    const int i = find(t, l);
    *step_lb = t->step_lb[i];
    *mem_lb = t->mem_lb[i];
}

static double uni(uint64_t key, uint64_t i) { return (double)pw_rng_uniform(key, i); }

/* A random space of the kind the CLI builds. */
static pw_layout_space random_space(uint64_t key)
{
    pw_layout_space sp = pw_layout_space_defaults();
    static const int64_t batches[] = {8, 12, 16, 24, 32};
    sp.batch = batches[(int)(uni(key, 1) * 5)];
    sp.processes = 1 + (int)(uni(key, 2) * 6);
    sp.cores = uni(key, 3) < 0.3 ? 0 : sp.processes + (int)(uni(key, 4) * 4);
    sp.shared_team = uni(key, 5) < 0.5;
    sp.n_nodes = 2 + (int)(uni(key, 6) * 10);
    sp.max_micro_batches = 8;
    if (uni(key, 7) < 0.2) sp.stages = 1 + (int)(uni(key, 8) * 2);
    if (uni(key, 9) < 0.2) sp.recompute = 0;
    return sp;
}

/* Steps and memories with many ties (few distinct values), bounds between
 * a fraction of the truth and the truth itself. */
static void fill_table(table *t, uint64_t key)
{
    t->step = malloc((size_t)t->n * sizeof *t->step);
    t->mem = malloc((size_t)t->n * sizeof *t->mem);
    t->step_lb = malloc((size_t)t->n * sizeof *t->step_lb);
    t->mem_lb = malloc((size_t)t->n * sizeof *t->mem_lb);
    for (int i = 0; i < t->n; i++) {
        t->step[i] = 1.0 + (int)(uni(key, 100 + 4 * (uint64_t)i) * 12);
        t->mem[i] = 100 + 10 * (int64_t)(uni(key, 101 + 4 * (uint64_t)i) * 20);
        const double f = uni(key, 102 + 4 * (uint64_t)i);
        t->step_lb[i] = f < 0.3 ? t->step[i] : t->step[i] * (0.3 + 0.7 * f);
        t->mem_lb[i] = (int64_t)((double)t->mem[i] * uni(key, 103 + 4 * (uint64_t)i));
    }
}

static void table_free(table *t)
{
    free(t->cand);
    free(t->step);
    free(t->mem);
    free(t->step_lb);
    free(t->mem_lb);
}

/* The reference, written out here: the fitting candidate of least step,
 * then least memory, then first; or, when none fits, the least memory. */
static int brute_force(const table *t, int64_t budget, int *fits)
{
    int best = -1;
    for (int i = 0; i < t->n; i++) {
        if (budget > 0 && t->mem[i] > budget) continue;
        if (best < 0 || t->step[i] < t->step[best] ||
            (t->step[i] == t->step[best] && t->mem[i] < t->mem[best]))
            best = i;
    }
    *fits = best >= 0;
    if (best >= 0) return best;
    for (int i = 0; i < t->n; i++)
        if (best < 0 || t->mem[i] < t->mem[best] ||
            (t->mem[i] == t->mem[best] && t->step[i] < t->step[best]))
            best = i;
    return best;
}

Test(layout, search_equals_exhaustive_on_cost_tables, .timeout = TIMEOUT)
{
    int checked = 0, refused = 0, pruned = 0;
    for (uint64_t seed = 1; seed <= 400; seed++) {
        const uint64_t key = pw_rng_key(seed, "test_layout");
        pw_layout_space sp = random_space(key);
        table t = {0};
        if (pw_layout_enumerate(&sp, &t.cand, &t.n) != PW_OK) {
            pw_clear_error();
            continue;
        }
        fill_table(&t, key);
        /* Budgets: none, binding, and below every candidate. */
        const int64_t budgets[3] = {0, 100 + 10 * (int64_t)(uni(key, 50) * 20), 50};
        pw_layout_model m = {.cost = table_cost, .bound = table_bound, .ctx = &t};
        for (int b = 0; b < 3; b++) {
            int fits;
            const int want = brute_force(&t, budgets[b], &fits);
            pw_layout_result res, ex;
            t.calls = 0;
            pw_status st = pw_layout_search(&sp, &m, budgets[b], &res);
            const int calls = t.calls;
            pw_status st_ex = pw_layout_search_exhaustive(&sp, &m, budgets[b], &ex);
            cr_assert_eq(st, fits ? PW_OK : PW_ERR_NOMEM, "seed %llu: %s", (unsigned long long)seed,
                         pw_last_error());
            cr_assert_eq(st_ex, st);
            cr_assert(!memcmp(&res.best, &t.cand[want], sizeof res.best),
                      "seed %llu budget %lld: the search chose another layout than brute force",
                      (unsigned long long)seed, (long long)budgets[b]);
            cr_assert(!memcmp(&ex.best, &t.cand[want], sizeof ex.best));
            cr_assert_eq(res.best_cost.step_time, t.step[want]);
            if (fits && budgets[b] > 0) cr_assert_leq(res.best_cost.memory, budgets[b]);
            refused += !fits;
            pruned += calls < t.n;
            checked++;
            pw_layout_result_free(&res);
            pw_layout_result_free(&ex);
        }
        table_free(&t);
    }
    cr_log_info("%d searches checked, %d refused, %d costed fewer candidates than exhaustive", checked, refused,
                pruned);
    cr_assert_gt(checked, 600);
    cr_assert_gt(refused, 300);
    cr_assert_gt(pruned, checked / 3, "the bounds must let the search skip candidates");
}

/* The comparison can fail: a bound above the truth hides the optimum. */
Test(layout, an_overstated_bound_changes_the_choice, .timeout = TIMEOUT)
{
    pw_layout_space sp = pw_layout_space_defaults();
    sp.batch = 16;
    sp.processes = 4;
    sp.cores = 4;
    sp.n_nodes = 8;
    table t = {0};
    cr_assert_eq(pw_layout_enumerate(&sp, &t.cand, &t.n), PW_OK, "%s", pw_last_error());
    fill_table(&t, pw_rng_key(7, "overstated"));
    int fits;
    const int want = brute_force(&t, 0, &fits);
    pw_layout_model m = {.cost = table_cost, .bound = table_bound, .ctx = &t};
    pw_layout_result res;
    cr_assert_eq(pw_layout_search(&sp, &m, 0, &res), PW_OK);
    cr_assert(!memcmp(&res.best, &t.cand[want], sizeof res.best));
    pw_layout_result_free(&res);
    t.step_lb[want] = 2 * t.step[want] + 100; /* a wrong bound */
    cr_assert_eq(pw_layout_search(&sp, &m, 0, &res), PW_OK);
    cr_assert(memcmp(&res.best, &t.cand[want], sizeof res.best), "the wrong bound went unnoticed");
    pw_layout_result_free(&res);
    table_free(&t);
}

Test(layout, impossible_budget_is_refused_with_the_least_memory, .timeout = TIMEOUT)
{
    pw_layout_space sp = pw_layout_space_defaults();
    sp.batch = 32;
    sp.processes = 4;
    sp.cores = 8;
    sp.n_nodes = 10;
    table t = {0};
    cr_assert_eq(pw_layout_enumerate(&sp, &t.cand, &t.n), PW_OK);
    fill_table(&t, pw_rng_key(3, "impossible"));
    int64_t least = t.mem[0];
    for (int i = 0; i < t.n; i++)
        if (t.mem[i] < least) least = t.mem[i];
    pw_layout_model m = {.cost = table_cost, .bound = table_bound, .ctx = &t};
    pw_layout_result res;
    cr_assert_eq(pw_layout_search(&sp, &m, least - 1, &res), PW_ERR_NOMEM);
    char want[64];
    snprintf(want, sizeof want, "(%lld bytes", (long long)least);
    cr_assert(strstr(pw_last_error(), want), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "no layout fits a memory budget of"), "%s", pw_last_error());
    cr_assert_eq(res.best_cost.memory, least);
    pw_layout_result_free(&res);
    /* That much memory is enough, and the choice then needs no more. */
    cr_assert_eq(pw_layout_search(&sp, &m, least, &res), PW_OK, "%s", pw_last_error());
    cr_assert_eq(res.best_cost.memory, least);
    pw_layout_result_free(&res);
    table_free(&t);
}

/* ------------------------------------------------------------ the space */

Test(layout, the_space_follows_its_rules, .timeout = TIMEOUT)
{
    pw_layout_space sp = pw_layout_space_defaults();
    sp.batch = 24;
    sp.processes = 4;
    sp.cores = 4;
    sp.shared_team = 1;
    sp.n_nodes = 6;
    pw_layout *v;
    int n;
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK, "%s", pw_last_error());
    int one_rank_two_threads = 0, zbv = 0, recompute = 0;
    for (int i = 0; i < n; i++) {
        const pw_layout *l = &v[i];
        const int ranks = l->stages * l->replicas * l->tensor;
        cr_assert_eq(l->tensor, 1, "max_tensor 0: T = 1 only");
        cr_assert_leq(ranks, 4);
        cr_assert_leq(ranks * l->threads, 4);
        if (ranks > 1) cr_assert_eq(l->threads, 1, "a shared team gives several ranks one thread");
        cr_assert_eq(24 % (l->replicas * l->micro_batches), 0);
        cr_assert_leq(l->stages * l->chunks_per_rank, 6);
        if (l->stages == 1) cr_assert_eq(l->schedule, PW_SCHEDULE_1F1B);
        one_rank_two_threads += ranks == 1 && l->threads == 2;
        zbv += l->schedule == PW_SCHEDULE_ZB_V;
        recompute += l->recompute;
    }
    cr_assert_gt(one_rank_two_threads, 0);
    cr_assert_gt(zbv, 0);
    cr_assert_eq(recompute * 2, n);
    free(v);
    /* Separate processes each have their own team. */
    sp.shared_team = 0;
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK);
    int two_by_two = 0;
    for (int i = 0; i < n; i++) two_by_two += v[i].stages == 2 && v[i].replicas == 1 && v[i].threads == 2;
    cr_assert_gt(two_by_two, 0);
    free(v);
    /* Pins. */
    sp.stages = 2;
    sp.micro_batches = 4;
    sp.schedule_pinned = 1;
    sp.schedule = PW_SCHEDULE_ZB_H1;
    sp.recompute = 0;
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK);
    for (int i = 0; i < n; i++)
        cr_assert(v[i].stages == 2 && v[i].micro_batches == 4 && v[i].schedule == PW_SCHEDULE_ZB_H1 &&
                  !v[i].recompute);
    cr_assert_eq(n, 3, "R = 1 (threads 1, 2) and R = 2; got %d", n); /* 2x1 threads 1,2; 2x2 threads 1 */
    free(v);
    /* Tensor degrees: divisors of the process count up to max_tensor. */
    sp = pw_layout_space_defaults();
    sp.batch = 8;
    sp.processes = 6;
    sp.n_nodes = 4;
    sp.max_tensor = 6;
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK, "%s", pw_last_error());
    int seen_t[7] = {0};
    for (int i = 0; i < n; i++) {
        cr_assert(v[i].tensor >= 1 && v[i].tensor <= 6);
        cr_assert_leq(v[i].stages * v[i].replicas * v[i].tensor, 6);
        seen_t[v[i].tensor]++;
    }
    cr_assert(seen_t[1] && seen_t[2] && seen_t[3] && seen_t[6], "T = 1, 2, 3, 6 all searched");
    cr_assert(!seen_t[4] && !seen_t[5], "T must divide the 6 processes");
    free(v);
    sp.max_tensor = 1; /* a graph without tp marks: T = 1 only */
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK);
    for (int i = 0; i < n; i++) cr_assert_eq(v[i].tensor, 1);
    free(v);
    sp.tensor = 3; /* pinned */
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK);
    for (int i = 0; i < n; i++) cr_assert_eq(v[i].tensor, 3);
    free(v);
    sp.tensor = 0;
    sp.processes = 2;
    sp.replicas = 3; /* does not divide the batch */
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "replicas 3"), "%s", pw_last_error());
}

/* ------------------------------------------------------------ the built-in model */

static double fake_rate(void *ctx, int threads, int64_t mbs)
{
    (void)ctx;
    /* Faster with more threads and larger micro-batches, as measured rates are. */
    return 1e10 * (threads == 1 ? 1.0 : 1.7) * (mbs >= 16 ? 1.0 : 0.6 + 0.025 * (double)mbs);
}

static pw_graph *load(const char *path)
{
    pw_graph *g;
    cr_assert_eq(pw_graph_parse_file(path, &g), PW_OK, "%s", pw_last_error());
    return g;
}

/* On real graphs, the forecaster's bounds never exceed its costs, and the
 * search agrees with the exhaustive one, budgets included. */
Test(layout, forecaster_bounds_hold_on_the_examples, .timeout = TIMEOUT)
{
    const char *graphs[] = {PW_SOURCE_DIR "/examples/fashion_mlp.graph", PW_SOURCE_DIR "/examples/tiny_gpt_quick.graph",
                            PW_SOURCE_DIR "/tests/fixtures/graphs/gpt_tiny_cuts.graph"};
    for (int k = 0; k < 3; k++) {
        pw_graph *g = load(graphs[k]);
        pw_layout_space sp = pw_layout_space_defaults();
        sp.batch = 16;
        sp.processes = 4;
        sp.cores = 4;
        sp.shared_team = 1;
        sp.n_nodes = g->n_nodes;
        sp.max_micro_batches = 16;
        pw_layout_forecast_config fc = pw_layout_forecast_defaults();
        fc.graph = g;
        fc.batch = sp.batch;
        fc.optim = k == 1 ? PW_OPTIM_ADAMW : PW_OPTIM_SGD;
        fc.rate = fake_rate;
        pw_layout_forecaster *f;
        cr_assert_eq(pw_layout_forecaster_create(&fc, &f), PW_OK);
        pw_layout_model m = pw_layout_forecaster_model(f);
        pw_layout *v;
        int n;
        cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK);
        int64_t least = -1;
        double worst_mem_ratio = 0;
        for (int i = 0; i < n; i++) {
            pw_layout_cost c;
            double slb;
            int64_t mlb;
            if (m.cost(m.ctx, &v[i], &c) != PW_OK) {
                pw_clear_error();
                continue;
            }
            m.bound(m.ctx, &v[i], &slb, &mlb);
            char d[160];
            cr_assert_leq(slb, c.step_time, "%s: %s: step bound %.9g above %.9g", graphs[k],
                          pw_layout_describe(&v[i], d, sizeof d), slb, c.step_time);
            cr_assert_leq(mlb, c.memory, "%s: %s: memory bound %lld above %lld", graphs[k],
                          pw_layout_describe(&v[i], d, sizeof d), (long long)mlb, (long long)c.memory);
            if ((double)mlb / (double)c.memory > worst_mem_ratio) worst_mem_ratio = (double)mlb / (double)c.memory;
            if (least < 0 || c.memory < least) least = c.memory;
        }
        cr_log_info("%s: %d candidates, memory bound up to %.2f of the memory", graphs[k], n, worst_mem_ratio);
        for (int b = 0; b < 3; b++) {
            const int64_t budget = b == 0 ? 0 : b == 1 ? least + least / 2 : least - 1;
            pw_layout_result a, e;
            pw_status sa = pw_layout_search(&sp, &m, budget, &a);
            pw_status se = pw_layout_search_exhaustive(&sp, &m, budget, &e);
            cr_assert_eq(sa, se);
            cr_assert_eq(sa, b == 2 ? PW_ERR_NOMEM : PW_OK, "%s", pw_last_error());
            cr_assert(!memcmp(&a.best, &e.best, sizeof a.best), "%s budget %lld", graphs[k], (long long)budget);
            if (sa == PW_OK && budget) cr_assert_leq(a.best_cost.memory, budget);
            if (b == 0) cr_assert_lt(a.n_costed, e.n_costed, "the bounds should skip some candidates");
            pw_layout_result_free(&a);
            pw_layout_result_free(&e);
        }
        free(v);
        pw_layout_forecaster_destroy(f);
        pw_graph_destroy(g);
    }
}

/* ------------------------------------------------------------ tensor parallelism */

/* A small GPT with Megatron's marks (graph-format.md, "Tensor parallelism"). */
static const char TP_GPT[] =
    "graph tp_gpt\n"
    "input tokens : i32[16]\n"
    "label next : i32[16]\n"
    "tok = embedding(tokens, vocab=64, dim=32, tp=vocab) as wte\n"
    "x0  = pos_embedding(tok, max=16) as wpe\n"
    "h = repeat 3 as h (x = x0) {\n"
    "  a   = layernorm(x) as ln_1\n"
    "  qkv = linear(a, out=96, tp=column) as attn.c_attn\n"
    "  att = causal_attention(qkv, heads=4)\n"
    "  o   = linear(att, out=32, tp=row) as attn.c_proj\n"
    "  x1  = add(x, o)\n"
    "  m   = layernorm(x1) as ln_2\n"
    "  fc  = linear(m, out=128, tp=column) as mlp.c_fc\n"
    "  g   = gelu(fc)\n"
    "  pr  = linear(g, out=32, tp=row) as mlp.c_proj\n"
    "  x2  = add(x1, pr)\n"
    "  return x2\n"
    "}\n"
    "hf = layernorm(h) as ln_f\n"
    "logits = linear(hf, out=64, bias=false, weight=wte.weight, tp=column) as lm_head\n"
    "loss = softmax_cross_entropy(logits, next)\n";

/* At T > 1 the bounds still never exceed the costs (the rank graph's work,
 * the all-reduces on top), the search equals the exhaustive one, and the
 * model divides what splits: per-rank parameters and step shrink with T,
 * and the all-reduces appear. A T the graph cannot split (8 > 4 heads) is
 * not applicable, never chosen. */
Test(layout, tensor_parallel_candidates_are_costed_per_rank, .timeout = TIMEOUT)
{
    pw_graph *g;
    cr_assert_eq(pw_graph_parse_string(TP_GPT, strlen(TP_GPT), "tp_gpt.graph", &g), PW_OK, "%s", pw_last_error());
    pw_layout_space sp = pw_layout_space_defaults();
    sp.batch = 16;
    sp.processes = 8;
    sp.cores = 8;
    sp.shared_team = 1;
    sp.n_nodes = g->n_nodes;
    sp.max_micro_batches = 8;
    sp.max_tensor = 8;
    pw_layout_forecast_config fc = pw_layout_forecast_defaults();
    fc.graph = g;
    fc.batch = sp.batch;
    fc.optim = PW_OPTIM_ADAMW;
    fc.rate = fake_rate;
    pw_layout_forecaster *f;
    cr_assert_eq(pw_layout_forecaster_create(&fc, &f), PW_OK);
    pw_layout_model m = pw_layout_forecaster_model(f);
    pw_layout *v;
    int n, costed_t[9] = {0}, failed_t8 = 0;
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK);
    for (int i = 0; i < n; i++) {
        pw_layout_cost c;
        double slb;
        int64_t mlb;
        char d[160];
        m.bound(m.ctx, &v[i], &slb, &mlb);
        if (m.cost(m.ctx, &v[i], &c) != PW_OK) {
            /* (also not applicable: interleaved with M not a multiple of S) */
            if (v[i].tensor == 8) {
                cr_assert(strstr(pw_last_error(), "T = 8"), "%s", pw_last_error());
                failed_t8++;
            }
            pw_clear_error();
            continue;
        }
        costed_t[v[i].tensor]++;
        cr_assert_leq(slb, c.step_time, "%s: step bound %.9g above %.9g", pw_layout_describe(&v[i], d, sizeof d),
                      slb, c.step_time);
        cr_assert_leq(mlb, c.memory, "%s", pw_layout_describe(&v[i], d, sizeof d));
        if (v[i].tensor > 1) cr_assert_gt(c.tp_allreduce, 0, "%s", pw_layout_describe(&v[i], d, sizeof d));
        else cr_assert_eq(c.tp_allreduce, 0);
    }
    cr_assert(costed_t[1] && costed_t[2] && costed_t[4], "T = 1, 2, 4 costed");
    cr_assert_gt(failed_t8, 0, "T = 8 splits 4 heads: refused");
    cr_assert_eq(costed_t[8], 0);
    /* One stage, one replica, M = 4, 1f1b: T = 2 and 4 against T = 1. */
    int64_t mem[3];
    double step[3];
    for (int k = 0; k < 3; k++) {
        pw_layout l = {.stages = 1, .replicas = 1, .tensor = 1 << k, .threads = 1, .micro_batches = 4,
                       .schedule = PW_SCHEDULE_1F1B, .chunks_per_rank = 1};
        pw_layout_cost c;
        cr_assert_eq(m.cost(m.ctx, &l, &c), PW_OK, "%s", pw_last_error());
        mem[k] = c.memory;
        step[k] = c.step_time - c.tp_allreduce * l.micro_batches;
    }
    cr_assert(mem[1] < mem[0] && mem[2] < mem[1], "memory per rank %lld, %lld, %lld", (long long)mem[0],
              (long long)mem[1], (long long)mem[2]);
    cr_assert(mem[1] > mem[0] / 2, "layernorms, positions and activations stay whole: more than half");
    cr_assert(step[1] < step[0] && step[2] < step[1], "compute per rank %g, %g, %g", step[0], step[1], step[2]);
    for (int b = 0; b < 2; b++) {
        const int64_t budget = b ? mem[1] : 0;
        pw_layout_result a, e;
        cr_assert_eq(pw_layout_search(&sp, &m, budget, &a), PW_OK, "%s", pw_last_error());
        cr_assert_eq(pw_layout_search_exhaustive(&sp, &m, budget, &e), PW_OK);
        cr_assert(!memcmp(&a.best, &e.best, sizeof a.best));
        cr_assert_neq(a.best.tensor, 8);
        if (budget) cr_assert_leq(a.best_cost.memory, budget);
        pw_layout_result_free(&a);
        pw_layout_result_free(&e);
    }
    free(v);
    pw_layout_forecaster_destroy(f);
    pw_graph_destroy(g);
}

/* A graph without tp marks never gets T > 1, even when the space asks for
 * it: each such candidate is not applicable. */
Test(layout, unmarked_graphs_never_get_tensor_parallelism, .timeout = TIMEOUT)
{
    pw_graph *g = load(PW_SOURCE_DIR "/examples/tiny_gpt_quick.graph");
    cr_assert(!pw_graph_tp_marked(g));
    pw_layout_space sp = pw_layout_space_defaults();
    sp.batch = 8;
    sp.processes = 4;
    sp.cores = 4;
    sp.shared_team = 1;
    sp.n_nodes = g->n_nodes;
    sp.max_micro_batches = 4;
    sp.max_tensor = 4;
    pw_layout_forecast_config fc = pw_layout_forecast_defaults();
    fc.graph = g;
    fc.batch = sp.batch;
    fc.rate = fake_rate;
    pw_layout_forecaster *f;
    cr_assert_eq(pw_layout_forecaster_create(&fc, &f), PW_OK);
    pw_layout_model m = pw_layout_forecaster_model(f);
    pw_layout_result res;
    cr_assert_eq(pw_layout_search_exhaustive(&sp, &m, 0, &res), PW_OK, "%s", pw_last_error());
    cr_assert_eq(res.best.tensor, 1);
    int t_above = 0;
    for (int i = 0; i < res.n_entries; i++) {
        const pw_layout_entry *e = &res.entries[i];
        if (e->layout.tensor > 1) {
            t_above++;
            cr_assert(!e->costed && e->failed_cost, "T = %d costed for a graph without marks", e->layout.tensor);
        }
    }
    cr_assert_gt(t_above, 0, "the space held T > 1: the check above checked something");
    cr_assert_geq(res.n_failed, t_above);
    pw_layout_result_free(&res);
    pw_layout_forecaster_destroy(f);
    pw_graph_destroy(g);
}

/* Planning a machine we do not have (docs/parallelism.md): the 48-block,
 * width-4096 GPT with Megatron's marks on 4 nodes x 8 GPUs at 80 GB each.
 * The choice splits layers inside a node (its tensor group's links never
 * cross hosts), the degrees that would cross a node (16, 32) lose, and
 * the plan takes under 5 s of CPU. */
Test(layout, megatron_layout_on_the_cluster, .timeout = TIMEOUT)
{
    const clock_t c0 = clock();
    pw_graph *g = load(PW_SOURCE_DIR "/tests/fixtures/graphs/gpt_48x4096_tp.graph");
    hwloc_topology_t topo;
    cr_assert_eq(pw_topology_load_spec(PW_SOURCE_DIR "/tests/fixtures/topologies/cluster_4node_8gpu.xml", &topo),
                 PW_OK, "%s", pw_last_error());
    pw_layout_space sp = pw_layout_space_defaults();
    sp.batch = 512;
    sp.processes = 32;
    sp.n_nodes = g->n_nodes;
    sp.max_tensor = 32;
    pw_layout_forecast_config fc = pw_layout_forecast_defaults();
    fc.graph = g;
    fc.batch = sp.batch;
    fc.optim = PW_OPTIM_ADAMW;
    fc.topology = topo;
    fc.flops_per_s = 3e13;
    pw_layout_forecaster *f;
    cr_assert_eq(pw_layout_forecaster_create(&fc, &f), PW_OK);
    pw_layout_model m = pw_layout_forecaster_model(f);
    pw_layout_result res;
    const int64_t budget = 80ll << 30;
    cr_assert_eq(pw_layout_search(&sp, &m, budget, &res), PW_OK, "%s", pw_last_error());
    const double cpu_s = (double)(clock() - c0) / CLOCKS_PER_SEC;
    char d[160];
    cr_log_info("chose %s: step %.3f s, T all-reduce %.3f ms per micro-batch (%s), %.2f s of CPU",
                pw_layout_describe(&res.best, d, sizeof d), res.best_cost.step_time,
                1e3 * res.best_cost.tp_allreduce, pw_link_class_name((pw_link_class)res.best_cost.tp_link), cpu_s);
    cr_assert_gt(res.best.tensor, 1, "chose %s", d);
    cr_assert_leq(res.best.tensor, 8, "chose %s", d);
    cr_assert_neq(res.best_cost.tp_link, PW_LINK_HOSTS, "chose %s", d);
    cr_assert_leq(res.best_cost.memory, budget);
    cr_assert_lt(cpu_s, 5.0, "planning took %.2f s of CPU", cpu_s);
    /* T = 16 crosses a node; costed, it is slower and says so. */
    pw_layout l16 = res.best;
    l16.tensor = 16;
    l16.replicas = 32 / (16 * l16.stages);
    if (l16.replicas < 1) l16.replicas = 1, l16.stages = 2;
    pw_layout_cost c16;
    cr_assert_eq(m.cost(m.ctx, &l16, &c16), PW_OK, "%s", pw_last_error());
    cr_assert_eq(c16.tp_link, PW_LINK_HOSTS, "%s", pw_layout_describe(&l16, d, sizeof d));
    cr_assert_gt(c16.step_time, res.best_cost.step_time);
    pw_layout_entry e16 = {.layout = l16, .cost = c16, .costed = 1, .fits = 1};
    char why[200];
    pw_layout_why_lost(&res, &e16, why, sizeof why);
    cr_assert(strstr(why, "T = 16 crosses a node: all-reduce"), "%s", why);
    pw_layout_result_free(&res);
    pw_layout_forecaster_destroy(f);
    hwloc_topology_destroy(topo);
    pw_graph_destroy(g);
}

/* The forecast at T > 1 (pw_forecast_config.tensor) places a stage's T
 * ranks on consecutive slots: on 4 nodes of 2 packages x 4 GPUs, T = 4
 * stays in a package, T = 8 spans a node's packages, T = 16 crosses nodes,
 * and the all-reduce per micro-batch grows with each; a rank's memory
 * shrinks with T; a whole graph given as T > 1 is refused. */
Test(layout, forecast_places_tensor_groups, .timeout = TIMEOUT)
{
    pw_graph *g = load(PW_SOURCE_DIR "/tests/fixtures/graphs/gpt_48x4096_tp.graph");
    hwloc_topology_t topo;
    cr_assert_eq(pw_topology_load_spec(PW_SOURCE_DIR "/tests/fixtures/topologies/cluster_4node_8gpu.xml", &topo),
                 PW_OK, "%s", pw_last_error());
    pw_partition part;
    cr_assert_eq(pw_partition_make(g, 2, PW_PARTITION_FLOPS, &part), PW_OK);
    static const struct {
        int T;
        pw_link_class cls;
    } want[] = {{2, PW_LINK_PACKAGE}, {4, PW_LINK_PACKAGE}, {8, PW_LINK_PACKAGES}, {16, PW_LINK_HOSTS}};
    double last_tp = 0;
    int64_t last_mem = INT64_MAX;
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        const int T = want[k].T;
        pw_graph *rg;
        cr_assert_eq(pw_graph_tp_rank(g, T, T - 1, &rg), PW_OK, "%s", pw_last_error());
        pw_forecast_config fc = pw_forecast_defaults();
        fc.graph = rg;
        fc.tensor = T;
        fc.cuts = part.begin;
        fc.stages = 2;
        fc.replicas = 1;
        fc.micro_batches = 4;
        fc.micro_batch_size = 1;
        fc.schedule = PW_SCHEDULE_1F1B;
        fc.flops_per_s = 3e13;
        fc.optim_state_floats = 2;
        fc.topology = topo;
        pw_forecast f;
        cr_assert_eq(pw_forecast_run(&fc, &f), PW_OK, "T=%d: %s", T, pw_last_error());
        cr_assert_eq(f.tp_cls, (int)want[k].cls, "T=%d: %s, want %s", T, pw_link_class_name((pw_link_class)f.tp_cls),
                     pw_link_class_name(want[k].cls));
        cr_assert_gt(f.tp_time, last_tp, "T=%d: all-reduce %g s per micro-batch", T, f.tp_time);
        cr_assert_lt(f.peak_memory[0], last_mem, "T=%d", T);
        last_tp = f.tp_time;
        last_mem = f.peak_memory[0];
        if (T == 16) cr_assert(strstr(f.placement, "x T 16"), "%s", f.placement);
        pw_forecast_free(&f);
        fc.graph = g; /* the whole graph with T > 1 */
        cr_assert_eq(pw_forecast_run(&fc, &f), PW_ERR_INVALID_ARG);
        pw_graph_destroy(rg);
    }
    pw_partition_free(&part);
    hwloc_topology_destroy(topo);
    pw_graph_destroy(g);
}

/* ------------------------------------------------- in-process measurements */

/* Given in-process link figures replace the default ones, and the forecast
 * moves by what they cost by hand: two stages of GPipe at M = 1 send one
 * activation and one gradient on the critical path (2 hand-offs); two
 * replicas of one stage sum the parameters once as a ring of two,
 * 2 (alpha + bytes / (2 beta)). */
static double cost_with_links(const pw_graph *g, const pw_layout *l, double handoff, double alpha, double beta)
{
    pw_layout_forecast_config fc = pw_layout_forecast_defaults();
    fc.graph = g;
    fc.batch = 64;
    fc.rate = fake_rate;
    fc.in_process = 1; /* with a rate hook: nothing is measured */
    fc.handoff_s = handoff;
    fc.allreduce_latency_s = alpha;
    fc.allreduce_bandwidth = beta;
    pw_layout_forecaster *f;
    cr_assert_eq(pw_layout_forecaster_create(&fc, &f), PW_OK);
    pw_layout_model m = pw_layout_forecaster_model(f);
    pw_layout_cost c;
    cr_assert_eq(m.cost(m.ctx, l, &c), PW_OK, "%s", pw_last_error());
    double s;
    cr_assert_eq(pw_layout_forecaster_measurements(f, &s), 0, "a rate hook and given links: nothing measured");
    pw_layout_forecaster_destroy(f);
    return c.step_time;
}

Test(layout, given_link_figures_cost_as_computed_by_hand, .timeout = TIMEOUT)
{
    {
        /* Nothing measured with a rate hook: nothing to re-check. */
        pw_graph *g0 = load(PW_SOURCE_DIR "/examples/fashion_mlp.graph");
        pw_layout_forecast_config fc = pw_layout_forecast_defaults();
        fc.graph = g0;
        fc.batch = 64;
        fc.rate = fake_rate;
        pw_layout_forecaster *f;
        cr_assert_eq(pw_layout_forecaster_create(&fc, &f), PW_OK);
        cr_assert_eq(pw_layout_forecaster_recheck(f, 0), 0);
        pw_layout_forecaster_destroy(f);
        pw_graph_destroy(g0);
    }
    pw_graph *g = load(PW_SOURCE_DIR "/examples/fashion_mlp.graph");
    const pw_layout two_stages = {.stages = 2, .replicas = 1, .tensor = 1, .threads = 1, .micro_batches = 1,
                                  .schedule = PW_SCHEDULE_GPIPE, .chunks_per_rank = 1};
    const double a = cost_with_links(g, &two_stages, 1e-3, 0, 0), b = cost_with_links(g, &two_stages, 3e-3, 0, 0);
    cr_assert_float_eq(b - a, 2 * 2e-3, 1e-8, "two hand-offs of 2 ms more: %.9f s more", b - a);
    const pw_layout two_replicas = {.stages = 1, .replicas = 2, .tensor = 1, .threads = 1, .micro_batches = 1,
                                    .schedule = PW_SCHEDULE_1F1B, .chunks_per_rank = 1};
    pw_op_cost oc;
    pw_graph_total_cost(g, &oc);
    const double bytes = (double)oc.param_bytes;
    const double x = cost_with_links(g, &two_replicas, 1e-6, 1e-3, 1e9);
    const double y = cost_with_links(g, &two_replicas, 1e-6, 2e-3, 4e9);
    const double want = (2 * 2e-3 + bytes / 4e9) - (2 * 1e-3 + bytes / 1e9);
    cr_assert_float_eq(y - x, want, 1e-8, "the replicas' sum: %.9f s, by hand %.9f s", y - x, want);
    pw_graph_destroy(g);
}

/* The group calibrations run (a T = 2 group of a marked graph, two whole
 * graphs side by side, the no-op engines of the links) and refuse what they
 * cannot time; their figures are this machine's, so only their sanity is
 * checked. */
Test(layout, group_and_link_calibrations, .timeout = TIMEOUT)
{
    pw_graph *g;
    cr_assert_eq(pw_graph_parse_string(TP_GPT, strlen(TP_GPT), "tp_gpt.graph", &g), PW_OK, "%s", pw_last_error());
    pw_forecast_config fc = pw_forecast_defaults();
    fc.graph = g;
    fc.micro_batches = 2;
    fc.micro_batch_size = 4;
    fc.optim_state_floats = 2;
    double mi = 0, op = 0;
    for (int T = 1; T <= 2; T++) {
        fc.tensor = T;
        cr_assert_eq(pw_forecast_calibrate_group(&fc, 2, &mi, &op), PW_OK, "T = %d: %s", T, pw_last_error());
        cr_assert(mi > 0 && op > 0, "T = %d: %g s per micro-batch, %g s optimizer", T, mi, op);
    }
    fc.tensor = 2;
    cr_assert_eq(pw_forecast_calibrate_group(&fc, 3, &mi, &op), PW_ERR_INVALID_ARG, "3 ranks are not a T = 2 group");
    cr_assert_eq(mi, 0);
    fc.tensor = 8; /* 4 heads */
    cr_assert_neq(pw_forecast_calibrate_group(&fc, 8, &mi, &op), PW_OK, "8 tensor ranks of 4 heads");
    cr_assert(strstr(pw_last_error(), "rank"), "%s", pw_last_error());
    pw_forecast_links lk;
    cr_assert_eq(pw_forecast_calibrate_links(&lk), PW_OK, "%s", pw_last_error());
    cr_assert(lk.noop_step_s > 0 && lk.two_stage_s > 0 && lk.sum_small_s > 0 && lk.sum_big_s > 0);
    cr_assert(lk.handoff_s >= 0 && lk.allreduce_latency_s >= 0 && lk.allreduce_bandwidth >= 0);
    cr_assert_eq(pw_forecast_calibrate_links(NULL), PW_ERR_INVALID_ARG);
    pw_graph_destroy(g);
}

/* Ranks as threads, rates measured here: the T = 2 candidates are costed at
 * the group's measured rate with their sums inside (none added), the links
 * and the groups are measured once each, the bounds still hold and the
 * search equals the exhaustive one. */
Test(layout, in_process_measurements_keep_the_search_exact, .timeout = TIMEOUT)
{
    pw_graph *g;
    cr_assert_eq(pw_graph_parse_string(TP_GPT, strlen(TP_GPT), "tp_gpt.graph", &g), PW_OK, "%s", pw_last_error());
    pw_layout_space sp = pw_layout_space_defaults();
    sp.batch = 8;
    sp.processes = 2;
    sp.cores = 2;
    sp.shared_team = 1;
    sp.n_nodes = g->n_nodes;
    sp.max_micro_batches = 2;
    sp.max_tensor = 2;
    sp.recompute = 0;
    pw_layout_forecast_config fc = pw_layout_forecast_defaults();
    fc.graph = g;
    fc.batch = sp.batch;
    fc.in_process = 1;
    pw_layout_forecaster *f;
    cr_assert_eq(pw_layout_forecaster_create(&fc, &f), PW_OK);
    pw_layout_model m = pw_layout_forecaster_model(f);
    pw_layout *v;
    int n, tp = 0;
    cr_assert_eq(pw_layout_enumerate(&sp, &v, &n), PW_OK);
    for (int i = 0; i < n; i++) {
        pw_layout_cost c;
        double slb;
        int64_t mlb;
        char d[160];
        m.bound(m.ctx, &v[i], &slb, &mlb);
        if (m.cost(m.ctx, &v[i], &c) != PW_OK) {
            pw_clear_error();
            continue;
        }
        cr_assert_leq(slb, c.step_time, "%s", pw_layout_describe(&v[i], d, sizeof d));
        cr_assert_leq(mlb, c.memory, "%s", pw_layout_describe(&v[i], d, sizeof d));
        if (v[i].tensor > 1) {
            tp++;
            cr_assert(c.tp_in_rate && c.tp_allreduce == 0, "%s", pw_layout_describe(&v[i], d, sizeof d));
        }
    }
    cr_assert_gt(tp, 0);
    double s;
    const int meas = pw_layout_forecaster_measurements(f, &s);
    pw_layout_result a, e;
    cr_assert_eq(pw_layout_search(&sp, &m, 0, &a), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_layout_search_exhaustive(&sp, &m, 0, &e), PW_OK);
    cr_assert(!memcmp(&a.best, &e.best, sizeof a.best));
    cr_assert_eq(pw_layout_forecaster_measurements(f, &s), meas, "every figure measured once");
    /* (threads 1, 2) x micro-batch (8, 4) alone, 2 at once (8, 4, 2), the
     * T = 2 group (8, 4), and the links: 10 at most. */
    cr_assert(meas >= 5 && meas <= 10, "%d measurements", meas);
    /* A re-check with no tolerance always finds a change: everything is
     * dropped and measured again by the next search, which agrees with
     * the exhaustive one again; with an unbounded one, never. */
    cr_assert_eq(pw_layout_forecaster_recheck(f, 1e9), 0);
    cr_assert_eq(pw_layout_forecaster_recheck(f, 0), 1);
    cr_assert_eq(pw_layout_forecaster_measurements(f, &s), 0, "dropped");
    pw_layout_result_free(&a);
    pw_layout_result_free(&e);
    cr_assert_eq(pw_layout_search(&sp, &m, 0, &a), PW_OK, "%s", pw_last_error());
    cr_assert_eq(pw_layout_search_exhaustive(&sp, &m, 0, &e), PW_OK);
    cr_assert(!memcmp(&a.best, &e.best, sizeof a.best));
    cr_assert_eq(pw_layout_forecaster_measurements(f, &s), meas, "measured again, once each");
    pw_layout_result_free(&a);
    pw_layout_result_free(&e);
    free(v);
    pw_layout_forecaster_destroy(f);
    pw_graph_destroy(g);
}
