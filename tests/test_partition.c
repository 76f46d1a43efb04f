/* Tests for the partitioner (graph/partition.h), measured profiles
 * (stages/plan/profile.h) and the printed plan (stages/plan/plan.h).
 *
 * The planner is checked against brute force over every split of small
 * random chains and DAGs with skip connections, under random budgets,
 * schedules' in-flight counts, heterogeneous devices and links; its memory
 * model against what the stage programs really allocate; its refusals word
 * for word.
 *
 * Every test has the same .timeout: Criterion reports a spurious leak under
 * LeakSanitizer when timeouts differ within a file. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "runtime/topology.h"
#include "stages/plan/plan.h"
#include "stages/plan/profile.h"
#include "stages/program/program.h"

#define TIMEOUT 60

static pw_graph *parse(const char *text)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "t.graph", &g), PW_OK, "%s",
                 pw_last_error());
    return g;
}

static unsigned rnd(unsigned *s)
{
    *s = *s * 1103515245u + 12345u;
    return (*s >> 8) & 0xffffff;
}

static double urand(unsigned *s, double lo, double hi) { return lo + (hi - lo) * rnd(s) / 16777216.0; }

/* A random graph of `layers` nodes before the head. With skips, `add` nodes
 * join the current value with an earlier one of the same width, so values
 * cross several cuts. */
static pw_graph *random_graph(unsigned *seed, int layers, int skips)
{
    static const int widths[] = {4, 8, 12};
    char text[8192];
    int width[64];
    size_t off = (size_t)snprintf(text, sizeof text, "graph rnd\ninput x : f32[8]\nlabel y : i32[]\n");
    off += (size_t)snprintf(text + off, sizeof text - off, "v0 = linear(x, out=%d)\n",
                            widths[rnd(seed) % 3]);
    width[0] = 0;
    sscanf(strstr(text, "out=") + 4, "%d", &width[0]);
    for (int k = 1; k < layers; k++) {
        int op = (int)(rnd(seed) % 6), w = width[k - 1];
        int partner = -1;
        if (skips && op >= 4) {
            for (int t = 0; t < 8 && partner < 0; t++) {
                int c = (int)(rnd(seed) % (unsigned)k);
                if (c < k - 1 && width[c] == w) partner = c;
            }
        }
        if (partner >= 0) {
            off += (size_t)snprintf(text + off, sizeof text - off, "v%d = add(v%d, v%d)\n", k, k - 1, partner);
        } else if (op <= 1 || op >= 4) {
            w = widths[rnd(seed) % 3];
            off += (size_t)snprintf(text + off, sizeof text - off, "v%d = linear(v%d, out=%d)\n", k, k - 1, w);
        } else if (op == 2) {
            off += (size_t)snprintf(text + off, sizeof text - off, "v%d = relu(v%d)\n", k, k - 1);
        } else {
            off += (size_t)snprintf(text + off, sizeof text - off, "v%d = layernorm(v%d)\n", k, k - 1);
        }
        width[k] = w;
    }
    snprintf(text + off, sizeof text - off,
             "o = linear(v%d, out=3)\nloss = softmax_cross_entropy(o, y)\n", layers - 1);
    return parse(text);
}

/* ------------------------------------------------------ brute force */

typedef struct brute {
    int found;
    double best;     /* least bottleneck over splits that fit */
    double best_sum; /* least Σ stage time among those reaching it */
    int n_evals;
} brute;

static void brute_rec(const pw_graph *g, const pw_partition_config *pc, int *begin, int s, brute *b)
{
    const int S = pc->n_stages, n = g->n_nodes;
    if (s == S) {
        begin[S] = n;
        pw_partition p;
        cr_assert_eq(pw_partition_evaluate(g, pc, begin, &p), PW_OK, "%s", pw_last_error());
        b->n_evals++;
        int ok = 1;
        double sum = 0;
        for (int k = 0; k < S; k++) {
            const pw_stage_memory *m = &p.stage[k].mem;
            if (m->budget > 0 && m->total > m->budget) ok = 0;
            sum += p.stage[k].time;
        }
        if (ok) {
            if (!b->found || p.bottleneck < b->best) {
                b->found = 1;
                b->best = p.bottleneck;
                b->best_sum = sum;
            } else if (p.bottleneck == b->best && sum < b->best_sum) {
                b->best_sum = sum;
            }
        }
        pw_partition_free(&p);
        return;
    }
    for (int i = begin[s - 1] + 1; i <= n - (S - s); i++) {
        begin[s] = i;
        brute_rec(g, pc, begin, s + 1, b);
    }
}

static void random_config(unsigned *seed, const pw_graph *g, int S, pw_partition_config *pc,
                          pw_op_time *times, int *inflight, pw_device_spec *dev)
{
    memset(pc, 0, sizeof *pc);
    pc->n_stages = S;
    pc->method = PW_PARTITION_BALANCED;
    pc->micro_batch_size = 1 + rnd(seed) % 8;
    pc->micro_batches = 1 + rnd(seed) % 8;
    pc->flops_per_s = 1e6 * (1 + rnd(seed) % 10);
    pc->optim_state_floats = (int)(rnd(seed) % 3);
    /* The optimizer's time (analytic: FLOPs per element; measured: each
     * node's `o` below) enters every stage as O / M. */
    static const double oflops[] = {0.0, PW_OPTIM_FLOPS_SGD, PW_OPTIM_FLOPS_ADAMW, 1e4};
    pc->optim_flops = oflops[rnd(seed) % 4];
    pc->recompute = rnd(seed) % 4 == 0;
    if (rnd(seed) % 2) {
        pc->balance = PW_BALANCE_TIME;
        for (int i = 0; i < g->n_nodes; i++)
            times[i] = (pw_op_time){urand(seed, 0, 1e-3), urand(seed, 0, 1e-3),
                                    rnd(seed) % 2 ? urand(seed, 0, 1e-3) : 0.0,
                                    rnd(seed) % 2 ? urand(seed, 0, 4e-3) : 0.0};
        pc->node_times = times;
    }
    if (rnd(seed) % 3) {
        for (int s = 0; s < S; s++) inflight[s] = 1 + (int)(rnd(seed) % 4);
        pc->inflight = inflight;
    }
    if (rnd(seed) % 2) {
        pc->link_bandwidth = urand(seed, 1e5, 1e7);
        pc->link_latency = urand(seed, 0, 1e-4);
    }
    /* Budgets around what an even split needs: sometimes slack, sometimes
     * binding, sometimes impossible. */
    int begin[16];
    for (int s = 0; s <= S; s++) begin[s] = (int)((int64_t)s * g->n_nodes / S);
    pw_partition p;
    cr_assert_eq(pw_partition_evaluate(g, pc, begin, &p), PW_OK, "%s", pw_last_error());
    int64_t most = 0;
    for (int s = 0; s < S; s++)
        if (p.stage[s].mem.total > most) most = p.stage[s].mem.total;
    pw_partition_free(&p);
    int mode = (int)(rnd(seed) % 3);
    if (mode == 1) {
        pc->memory_budget = (int64_t)((double)most * urand(seed, 0.6, 1.3));
    } else if (mode == 2) {
        for (int s = 0; s < S; s++)
            dev[s] = (pw_device_spec){.speed = urand(seed, 0.5, 3.0),
                                      .memory = rnd(seed) % 4 ? (int64_t)((double)most * urand(seed, 0.6, 1.6)) : 0};
        pc->devices = dev;
        pc->memory_budget = (int64_t)((double)most * 1.2);
    }
}

static void check_against_brute(int skips, unsigned seed0, int trials)
{
    unsigned seed = seed0;
    int feasible = 0, refused = 0;
    for (int trial = 0; trial < trials; trial++) {
        int layers = 2 + (int)(rnd(&seed) % 7);
        pw_graph *g = random_graph(&seed, layers, skips);
        pw_op_time times[64];
        int inflight[16];
        pw_device_spec dev[16];
        for (int S = 1; S <= g->n_nodes && S <= 4; S++) {
            pw_partition_config pc;
            random_config(&seed, g, S, &pc, times, inflight, dev);
            brute b = {0};
            int begin[16] = {0};
            brute_rec(g, &pc, begin, 1, &b);
            pw_partition p;
            pw_status st = pw_partition_plan(g, &pc, &p);
            if (!b.found) {
                cr_assert_eq(st, PW_ERR_NOMEM, "trial %d S=%d: brute force finds no split that "
                             "fits but the planner says %s", trial, S, pw_status_str(st));
                cr_assert(strstr(pw_last_error(), "no split into"), "%s", pw_last_error());
                refused++;
                continue;
            }
            cr_assert_eq(st, PW_OK, "trial %d S=%d: %s", trial, S, pw_last_error());
            feasible++;
            double sum = 0;
            for (int s = 0; s < S; s++) {
                const pw_stage_memory *m = &p.stage[s].mem;
                cr_assert(m->budget == 0 || m->total <= m->budget, "trial %d: stage %d over budget", trial, s);
                cr_assert_lt(p.begin[s], p.begin[s + 1]);
                sum += p.stage[s].time;
            }
            cr_assert_eq(p.bottleneck, b.best, "trial %d S=%d: bottleneck %.17g, brute force %.17g",
                         trial, S, p.bottleneck, b.best);
            cr_assert_leq(sum, b.best_sum * (1 + 1e-12), "trial %d S=%d: total %.17g, best %.17g",
                          trial, S, sum, b.best_sum);
            cr_assert_eq(p.best_bottleneck, p.bottleneck);
            pw_partition_free(&p);
        }
        pw_graph_destroy(g);
    }
    /* The random budgets must exercise both outcomes. */
    cr_assert_gt(feasible, trials / 2);
    cr_assert_gt(refused, 0);
}

Test(partition, exact_on_random_chains, .timeout = TIMEOUT) { check_against_brute(0, 11, 60); }

Test(partition, exact_on_random_dags_with_skips, .timeout = TIMEOUT) { check_against_brute(1, 23, 60); }

/* ------------------------------------------------------ the model */

/* x -> a -> b -> c -> d -> (d + a) -> head: `a` is read four nodes later. */
static const char *SKIP =
    "graph skip\n"
    "input x : f32[16]\n"
    "label y : i32[]\n"
    "a = linear(x, out=16)\n"
    "b = relu(a)\n"
    "c = linear(b, out=16)\n"
    "d = relu(c)\n"
    "r = add(d, a)\n"
    "o = linear(r, out=4)\n"
    "loss = softmax_cross_entropy(o, y)\n";

Test(partition, skip_connection_counted_on_every_link, .timeout = TIMEOUT)
{
    pw_graph *g = parse(SKIP);
    pw_partition_config pc = {.n_stages = 4, .micro_batch_size = 16, .micro_batches = 4,
                              .link_bandwidth = 1e6, .link_latency = 1e-5};
    /* Stages [a] [b c] [d] [r o loss]: `a` crosses the links 0→1, 1→2, 2→3. */
    int begin[] = {0, 1, 3, 4, 7};
    pw_partition p;
    cr_assert_eq(pw_partition_evaluate(g, &pc, begin, &p), PW_OK, "%s", pw_last_error());
    const int64_t v = 16 * 16 * 4; /* one f32[16] value of 16 samples */
    cr_assert_eq(p.stage[0].send_act_bytes, v);           /* a */
    cr_assert_eq(p.stage[1].send_act_bytes, 2 * v);       /* a, c */
    cr_assert_eq(p.stage[2].send_act_bytes, 2 * v);       /* a, d */
    cr_assert_eq(p.stage[3].send_act_bytes, 0);
    cr_assert_eq(p.stage[0].send_grad_bytes, 0);
    cr_assert_eq(p.stage[1].send_grad_bytes, v);
    cr_assert_eq(p.stage[2].send_grad_bytes, 2 * v);
    cr_assert_eq(p.stage[3].send_grad_bytes, 2 * v);
    /* Each message pays latency + bytes / bandwidth on its sender. */
    cr_assert_float_eq(p.stage[1].comm, 2e-5 + 3.0 * v / 1e6, 1e-15);
    /* The messages the stage programs really send. */
    for (int s = 0; s < 4; s++) {
        pw_program_config c = {.graph = g, .node_begin = begin[s], .node_end = begin[s + 1],
                               .micro_batch = 16, .optim = pw_optim_defaults(PW_OPTIM_SGD)};
        pw_program *prog;
        cr_assert_eq(pw_program_create(&c, &prog), PW_OK, "%s", pw_last_error());
        cr_assert_eq((int64_t)pw_program_port_bytes(prog, PW_PORT_ACT_OUT), p.stage[s].send_act_bytes,
                     "stage %d", s);
        cr_assert_eq((int64_t)pw_program_port_bytes(prog, PW_PORT_GRAD_IN), p.stage[s].send_grad_bytes,
                     "stage %d", s);
        pw_program_destroy(prog);
    }
    pw_partition_free(&p);
    pw_graph_destroy(g);
}

/* A GPT at toy size: embeddings, attention (workspace and T x T
 * statistics), dropout masks, and a head tied to the token embedding. */
static const char *TINY_GPT =
    "graph tiny\n"
    "input tokens : i32[8]\n"
    "label next : i32[8]\n"
    "tok = embedding(tokens, vocab=32, dim=16) as wte\n"
    "pos = pos_embedding(tok, max=8) as wpe\n"
    "x0  = dropout(pos, p=0.1)\n"
    "h = repeat 2 as h (x = x0) {\n"
    "    a    = layernorm(x) as ln_1\n"
    "    qkv  = linear(a, out=48) as attn.c_attn\n"
    "    att  = causal_attention(qkv, heads=2)\n"
    "    o    = linear(att, out=16) as attn.c_proj\n"
    "    x1   = add(x, o)\n"
    "    fc   = linear(x1, out=64) as mlp.c_fc\n"
    "    g    = gelu(fc)\n"
    "    pr   = linear(g, out=16) as mlp.c_proj\n"
    "    pd   = dropout(pr, p=0.1)\n"
    "    x2   = add(x1, pd)\n"
    "    return x2\n"
    "}\n"
    "hf     = layernorm(h) as ln_f\n"
    "logits = linear(hf, out=32, bias=false, weight=wte.weight) as lm_head\n"
    "loss   = softmax_cross_entropy(logits, next)\n";

/* The predicted parameters, gradients, optimizer state, activation stash
 * and shared region are what the stage programs allocate, with and without
 * recomputation (micro-batch 16 keeps every buffer a multiple of the
 * 64-byte alignment, so the match is exact). */
static void check_memory_model(pw_graph *g, unsigned seed)
{
    for (int trial = 0; trial < 24; trial++) {
        int S = 1 + (int)(rnd(&seed) % 4);
        int begin[8] = {0}, inflight[8];
        for (int s = 1; s < S; s++) {
            int lo = begin[s - 1] + 1, hi = g->n_nodes - (S - s);
            begin[s] = lo + (int)(rnd(&seed) % (unsigned)(hi - lo + 1));
        }
        begin[S] = g->n_nodes;
        for (int s = 0; s < S; s++) inflight[s] = 1 + (int)(rnd(&seed) % 3);
        pw_optim_kind ok = trial % 2 ? PW_OPTIM_ADAMW : PW_OPTIM_SGD;
        int rc = (trial / 2) % 2;
        pw_partition_config pc = {.n_stages = S, .micro_batch_size = 16, .micro_batches = 8,
                                  .inflight = inflight, .optim_state_floats = pw_optim_state_floats(ok),
                                  .recompute = rc};
        pw_partition p;
        cr_assert_eq(pw_partition_evaluate(g, &pc, begin, &p), PW_OK, "%s", pw_last_error());
        for (int s = 0; s < S; s++) {
            pw_program_config c = {.graph = g, .node_begin = begin[s], .node_end = begin[s + 1],
                                   .micro_batch = 16, .slots = inflight[s],
                                   .optim = pw_optim_defaults(ok), .recompute = rc};
            pw_program *prog;
            cr_assert_eq(pw_program_create(&c, &prog), PW_OK, "%s", pw_last_error());
            pw_program_memory m;
            pw_program_memory_usage(prog, &m);
            const pw_stage_memory *e = &p.stage[s].mem;
            cr_assert_eq(e->params, (int64_t)m.params, "trial %d stage %d", trial, s);
            cr_assert_eq(e->grads, (int64_t)m.grads, "trial %d stage %d", trial, s);
            cr_assert_eq(e->optim_state, (int64_t)m.optim_state, "trial %d stage %d", trial, s);
            cr_assert_eq(e->activations, (int64_t)m.activations, "%s trial %d stage %d [%d, %d) "
                         "recompute %d: predicted %lld, program %zu", g->name, trial, s, begin[s],
                         begin[s + 1], rc, (long long)e->activations, m.activations);
            cr_assert_eq(e->shared, (int64_t)m.shared, "%s trial %d stage %d [%d, %d) recompute "
                         "%d: predicted %lld, program %zu", g->name, trial, s, begin[s],
                         begin[s + 1], rc, (long long)e->shared, m.shared);
            cr_assert_eq(e->total - e->buffers, (int64_t)m.total);
            cr_assert_eq(e->slots, inflight[s]);
            pw_program_destroy(prog);
        }
        pw_partition_free(&p);
    }
}

Test(partition, memory_model_matches_programs, .timeout = TIMEOUT)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_file(PW_SOURCE_DIR "/tests/fixtures/graphs/features.graph", &g),
                 PW_OK, "%s", pw_last_error());
    check_memory_model(g, 3);
    pw_graph_destroy(g);
    g = parse(SKIP);
    check_memory_model(g, 5);
    pw_graph_destroy(g);
    g = parse(TINY_GPT);
    check_memory_model(g, 7);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------ memory refusals */

static const char *CHAIN =
    "graph chain\n"
    "input x : f32[16]\n"
    "label y : i32[]\n"
    "a = linear(x, out=16)\n"
    "b = linear(a, out=16)\n"
    "c = linear(b, out=16)\n"
    "o = linear(c, out=4)\n"
    "loss = softmax_cross_entropy(o, y)\n";

Test(partition, refuses_with_the_stage_its_need_and_the_budget, .timeout = TIMEOUT)
{
    pw_graph *g = parse(CHAIN);
    int inflight[] = {2, 1};
    pw_partition_config pc = {.n_stages = 2, .method = PW_PARTITION_BALANCED, .micro_batch_size = 16,
                              .micro_batches = 4, .inflight = inflight, .optim_state_floats = 1,
                              .memory_budget = 8192};
    pw_partition p;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_NOMEM);
    cr_assert_null(p.begin);
    /* The closest split is [a] [b c o loss]. Its stage 1 holds 3 x 2496 B
     * of parameters, gradients and momentum (b and c: 1024 + 64 B each, o:
     * 256 + 64 B); one slot of a, b, c and their gradients (6 x 1 KiB), o and
     * its gradient (2 x 256 B), the labels and the loss (64 B each) and the
     * softmax probabilities (256 B): 7040 B; and min(2 + 1, 4) = 3 buffers
     * for the 1 KiB gradient it sends back. 17600 B in all. */
    cr_assert_str_eq(pw_last_error(),
                     "partition: stage 1 (nodes 1-4: b .. loss) needs 17.2 KiB (params 2.4 KiB, "
                     "grads 2.4 KiB, optimizer 2.4 KiB, activations 1 x 6.9 KiB, buffers 3.0 KiB) "
                     "but the budget is 8.0 KiB per stage; no split into 2 stages fits, this one "
                     "comes closest; would help: more stages, recomputation (not enough alone), "
                     "fewer micro-batches in flight (up to 2 now; one per stage is not enough "
                     "alone), or a larger budget");
    /* Per device: the message names the device. */
    pw_device_spec dev[2] = {{.speed = 1, .memory = 20000, .name = "gpu0"},
                             {.speed = 1, .memory = 12000, .name = "gpu1"}};
    pc.devices = dev;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_NOMEM);
    cr_assert(strstr(pw_last_error(), "but gpu1 has 11.7 KiB"), "%s", pw_last_error());
    /* Enough memory: it plans. */
    dev[1].memory = 40000;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    for (int s = 0; s < 2; s++) cr_assert_leq(p.stage[s].mem.total, p.stage[s].mem.budget);
    pw_partition_free(&p);
    pw_graph_destroy(g);
}

Test(partition, recomputation_and_fewer_in_flight_are_suggested_when_they_fit, .timeout = TIMEOUT)
{
    pw_graph *g = parse(CHAIN);
    int inflight[] = {4, 4};
    pw_partition_config pc = {.n_stages = 2, .micro_batch_size = 16, .micro_batches = 8,
                              .inflight = inflight, .memory_budget = 24 * 1024};
    pw_partition p;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_NOMEM);
    cr_assert(strstr(pw_last_error(), "recomputation (fits)"), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "one per stage fits"), "%s", pw_last_error());
    /* Planned with recomputation, it fits, and the backward pays a forward. */
    pc.recompute = 1;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    pw_partition q;
    pc.recompute = 0;
    pc.memory_budget = 0;
    cr_assert_eq(pw_partition_evaluate(g, &pc, p.begin, &q), PW_OK);
    for (int s = 0; s < 2; s++) {
        cr_assert_float_eq(p.stage[s].b, q.stage[s].b + q.stage[s].f, 1e-18);
        cr_assert_lt(p.stage[s].mem.activations, q.stage[s].mem.activations);
    }
    pw_partition_free(&p);
    pw_partition_free(&q);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------ devices, cuts */

static const char *EIGHT =
    "graph eight\n"
    "input x : f32[32]\n"
    "label y : i32[]\n"
    "l0 = linear(x, out=32)\n"
    "l1 = linear(l0, out=32)\n"
    "l2 = linear(l1, out=32)\n"
    "l3 = linear(l2, out=32)\n"
    "l4 = linear(l3, out=32)\n"
    "l5 = linear(l4, out=32)\n"
    "l6 = linear(l5, out=32)\n"
    "l7 = linear(l6, out=32)\n"
    "loss = softmax_cross_entropy(l7, y)\n";

Test(partition, faster_device_gets_more_work, .timeout = TIMEOUT)
{
    pw_graph *g = parse(EIGHT);
    pw_partition_config pc = {.n_stages = 2, .micro_batch_size = 8};
    pw_partition p;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    int even = p.begin[1];
    cr_assert(even == 4 || even == 5, "uniform devices split near the middle, got %d", even);
    pw_partition_free(&p);
    /* Stage 1 on a device three times as fast takes about three quarters. */
    pw_device_spec dev[2] = {{.speed = 1.0}, {.speed = 3.0}};
    pc.devices = dev;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.begin[1], 2, "stage 0 keeps 2 layers, got %d", p.begin[1]);
    {
        /* The fast device's times are a third of a speed-1 device's. */
        pw_partition u;
        pw_partition_config uc = pc;
        uc.devices = NULL;
        cr_assert_eq(pw_partition_evaluate(g, &uc, p.begin, &u), PW_OK);
        cr_assert_float_eq(p.stage[1].f * 3.0, u.stage[1].f, 1e-15);
        cr_assert_float_eq(p.stage[1].time * 3.0, u.stage[1].time, 1e-15);
        cr_assert_float_eq(p.stage[0].time, u.stage[0].time, 1e-15);
        pw_partition_free(&u);
    }
    pw_partition_free(&p);
    /* And the other way round. */
    dev[0].speed = 3.0;
    dev[1].speed = 1.0;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_geq(p.begin[1], 6);
    pw_partition_free(&p);
    /* A small memory on the fast device pushes work back. */
    dev[0].speed = 1.0;
    dev[1].speed = 3.0;
    pw_partition q;
    pw_partition_config qc = pc;
    qc.devices = NULL;
    int b5[] = {0, 5, 9};
    cr_assert_eq(pw_partition_evaluate(g, &qc, b5, &q), PW_OK);
    dev[1].memory = q.stage[1].mem.total; /* fits 4 layers, not 7 */
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.begin[1], 5, "got %d", p.begin[1]);
    pw_partition_free(&p);
    pw_partition_free(&q);
    pw_graph_destroy(g);
}

Test(partition, cut_markers_are_honoured_and_checked, .timeout = TIMEOUT)
{
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_file(PW_SOURCE_DIR "/tests/fixtures/graphs/features.graph", &g),
                 PW_OK, "%s", pw_last_error());
    int S = g->n_cuts + 1;
    pw_partition_config pc = {.n_stages = S, .method = PW_PARTITION_AUTO, .micro_batch_size = 16};
    pw_partition p;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.method, PW_PARTITION_CUTS);
    for (int s = 1, i = 0; s < S; s++) {
        while (!g->nodes[++i].cut_before) {}
        cr_assert_eq(p.begin[s], i, "stage %d starts at the marker", s);
    }
    /* Checked against the best split. */
    cr_assert_geq(p.bottleneck, p.best_bottleneck);
    cr_assert_gt(p.best_bottleneck, 0);
    cr_assert(!strncmp(p.note, "cut markers: bottleneck ", 24), "%s", p.note);
    cr_assert(strstr(p.note, "the best split (cuts before nodes "), "%s", p.note);
    pw_partition best;
    pc.method = PW_PARTITION_BALANCED;
    cr_assert_eq(pw_partition_plan(g, &pc, &best), PW_OK);
    cr_assert_eq(best.bottleneck, p.best_bottleneck);
    pw_partition_free(&best);
    /* A marker split that does not fit is refused, and the way out named. */
    int64_t most = 0;
    for (int s = 0; s < S; s++)
        if (p.stage[s].mem.total > most) most = p.stage[s].mem.total;
    pw_partition_free(&p);
    pc.method = PW_PARTITION_CUTS;
    pc.memory_budget = most - 1;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_NOMEM);
    cr_assert(strstr(pw_last_error(), "partition: the `cut` markers of "), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), "features.graph do not fit: stage "), "%s", pw_last_error());
    /* The wrong number of stages for the markers. */
    pc.memory_budget = 0;
    pc.n_stages = 2;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "make 5 stages, not 2"), "%s", pw_last_error());
    pw_graph_destroy(g);
}

Test(partition, config_errors, .timeout = TIMEOUT)
{
    pw_graph *g = parse(CHAIN);
    pw_partition p;
    pw_partition_config pc = {.n_stages = 2, .balance = PW_BALANCE_TIME};
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "balance 'time' needs measured op times"), "%s", pw_last_error());
    pc.balance = PW_BALANCE_FLOPS;
    pc.n_stages = 6;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "has only 5 nodes"), "%s", pw_last_error());
    pc.n_stages = 2;
    pc.link_bandwidth = -1;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_INVALID_ARG);
    pc.link_bandwidth = 0;
    int bad[] = {1, 0};
    pc.inflight = bad;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "stage 1 holds 0 micro-batches"), "%s", pw_last_error());
    int cuts[] = {0, 0, 5};
    pc.inflight = NULL;
    cr_assert_eq(pw_partition_evaluate(g, &pc, cuts, &p), PW_ERR_INVALID_ARG);
    pw_partition_method m;
    cr_assert_eq(pw_partition_method_parse("balanced", &m), PW_OK);
    cr_assert_eq(m, PW_PARTITION_BALANCED);
    cr_assert_eq(pw_partition_method_parse("magic", &m), PW_ERR_INVALID_ARG);
    pw_balance b;
    cr_assert_eq(pw_balance_parse("time", &b), PW_OK);
    cr_assert_eq(b, PW_BALANCE_TIME);
    cr_assert_eq(pw_balance_parse("speed", &b), PW_ERR_INVALID_ARG);
    pw_partition_free(NULL);
    pw_graph_destroy(g);
}

/* Sizes whose byte counts would overflow the model's int64 sums are
 * refused with a message, not computed (issue 13). */
Test(partition, sizes_too_large_to_plan_are_refused, .timeout = TIMEOUT)
{
    pw_graph *g = parse(CHAIN);
    pw_partition p;
    pw_partition_config pc = {.n_stages = 2, .balance = PW_BALANCE_FLOPS,
                              .micro_batch_size = INT64_MAX / 2};
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "too large to plan"), "%s", pw_last_error());
    pc.micro_batch_size = 1;
    pc.optim_state_floats = 2000000000;
    pc.optim_flops = 1;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    pw_partition_free(&p);
    pw_graph_destroy(g);
    /* 2^20 x 2^20 parameters, 2^31 floats of state each */
    g = parse("input x : f32[1048576]\nlabel y : i32[]\nh = linear(x, out=1048576)\n"
              "r = relu(h)\nl = linear(r, out=2)\nloss = softmax_cross_entropy(l, y)\n");
    pc.optim_state_floats = 2000000000;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "optimizer state; too large to plan"), "%s", pw_last_error());
    pw_graph_destroy(g);
}

/* A chain of n nodes (n ≡ 0 mod 2, with n − 4 not a multiple of 128):
 * linear → relu blocks in nested repeats (a repeat counts at most 100000)
 * and a tail repeat, then the classifier and the loss. */
static pw_graph *long_chain(int n)
{
    char text[1024];
    int blocks = (n - 4) / 2;
    snprintf(text, sizeof text,
             "input x : f32[16]\nlabel y : i32[]\nh00 = linear(x, out=16)\nh0 = relu(h00)\n"
             "h1 = repeat %d as o (a = h0) {\n  h = repeat 64 as i (v = a) {\n"
             "    l = linear(v, out=16)\n    r = relu(l)\n    return r\n  }\n  return h\n}\n"
             "h2 = repeat %d as t (v = h1) {\n  l = linear(v, out=16)\n  r = relu(l)\n  return r\n}\n"
             "o = linear(h2, out=4)\nloss = softmax_cross_entropy(o, y)\n", blocks / 64, blocks % 64);
    pw_graph *g = parse(text);
    cr_assert_eq(g->n_nodes, n);
    return g;
}

/* A 2^17-node chain into 64 stages (issue 13: the planner scales). The
 * oracle: with free links and no optimizer a stage's time is the sum of its
 * nodes' times, and the least bottleneck of a contiguous split of additive
 * non-negative costs is found by binary search on the bottleneck with a
 * greedy check. Each node's time comes from the planner's own model
 * (pw_partition_evaluate with one stage per node). */
Test(partition, long_chain_into_64_stages_is_optimal, .timeout = TIMEOUT)
{
    const int n = 1 << 17, S = 64;
    pw_graph *g = long_chain(n);
    pw_partition p, each;
    pw_partition_config pc = {.n_stages = n, .balance = PW_BALANCE_FLOPS, .micro_batch_size = 8};
    int *cuts = malloc(sizeof(int) * ((size_t)n + 1));
    cr_assert_not_null(cuts);
    for (int i = 0; i <= n; i++) cuts[i] = i;
    cr_assert_eq(pw_partition_evaluate(g, &pc, cuts, &each), PW_OK, "%s", pw_last_error());
    free(cuts);
    double lo = 0, hi = 0;
    for (int i = 0; i < n; i++) hi += each.stage[i].time;
    for (int it = 0; it < 200 && hi - lo > 1e-12 * hi; it++) {
        double x = 0.5 * (lo + hi), acc = 0;
        int stages = 1, ok = 1;
        for (int i = 0; i < n && ok; i++) {
            double t = each.stage[i].time;
            if (t > x) ok = 0;
            else if (acc + t > x) stages++, acc = t;
            else acc += t;
        }
        if (ok && stages <= S) hi = x;
        else lo = x;
    }
    pw_partition_free(&each);

    pc.n_stages = S;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.n_stages, S);
    cr_assert_eq(p.begin[0], 0);
    cr_assert_eq(p.begin[S], n);
    for (int s = 0; s < S; s++) cr_assert_lt(p.begin[s], p.begin[s + 1]);
    cr_assert(fabs(p.bottleneck - hi) <= 1e-9 * hi, "bottleneck %.17g, optimum %.17g",
              p.bottleneck, hi);
    pw_partition_free(&p);

    /* With links, budgets and the optimizer: a plan whose predictions are
     * the model's for its cuts, no worse than the equal split, fitting. */
    int inflight[64];
    for (int s = 0; s < S; s++) inflight[s] = S - s < 4 ? S - s : 4;
    pc.inflight = inflight;
    pc.micro_batches = 8;
    pc.link_bandwidth = 1e9;
    pc.link_latency = 1e-6;
    pc.optim_state_floats = 2;
    pc.optim_flops = PW_OPTIM_FLOPS_ADAMW;
    pc.memory_budget = 13 << 20; /* the best split needs 12.0 MiB on its fullest stage */
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    int eq[65];
    for (int s = 0; s <= S; s++) eq[s] = (int)((int64_t)n * s / S);
    pw_partition e, again;
    cr_assert_eq(pw_partition_evaluate(g, &pc, eq, &e), PW_OK);
    cr_assert_eq(pw_partition_evaluate(g, &pc, p.begin, &again), PW_OK);
    cr_assert_eq(again.bottleneck, p.bottleneck);
    cr_assert_leq(p.bottleneck, e.bottleneck);
    for (int s = 0; s < S; s++) cr_assert_leq(p.stage[s].mem.total, pc.memory_budget);
    pw_partition_free(&e);
    pw_partition_free(&again);
    pw_partition_free(&p);

    /* A budget no split meets: refused (the closest split named) in time. */
    pc.memory_budget = 4 << 10;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_ERR_NOMEM);
    cr_assert(strstr(pw_last_error(), "no split into 64 stages fits"), "%s", pw_last_error());
    pw_graph_destroy(g);
}

/* The older entry point keeps its contract (tests/test_pipeline.c holds
 * its optimality). */
Test(partition, make_still_works, .timeout = TIMEOUT)
{
    pw_graph *g = parse(EIGHT);
    pw_partition p;
    cr_assert_eq(pw_partition_make(g, 3, PW_PARTITION_AUTO, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.method, PW_PARTITION_FLOPS);
    cr_assert_eq(p.begin[0], 0);
    cr_assert_eq(p.begin[3], g->n_nodes);
    double total = 0;
    for (int s = 0; s < 3; s++) total += p.flops[s];
    pw_op_cost tot;
    pw_graph_total_cost(g, &tot);
    /* Per-sample FLOPs, the first layer without an input gradient. */
    pw_op_cost c0;
    pw_graph_node_cost(g, 0, &c0);
    cr_assert_float_eq(total, tot.flops_fwd + tot.flops_bwd_input + tot.flops_bwd_weight - c0.flops_bwd_input,
                       1e-6 * total);
    pw_partition_free(&p);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------ the optimizer */

/* A large embedding table (65536 x 64 = 4 Mi parameters, next to no FLOPs
 * per sample) in front of four small linear layers. */
static const char *EMB =
    "graph emb\n"
    "input t : i32[4]\n"
    "label y : i32[4]\n"
    "e = embedding(t, vocab=65536, dim=64)\n"
    "h1 = linear(e, out=64)\n"
    "h2 = linear(h1, out=64)\n"
    "h3 = linear(h2, out=64)\n"
    "h4 = linear(h3, out=64)\n"
    "o = linear(h4, out=8)\n"
    "loss = softmax_cross_entropy(o, y)\n";

Test(partition, analytic_optimizer_time_is_exact, .timeout = TIMEOUT)
{
    pw_graph *g = parse(EMB);
    pw_device_spec dev[2] = {{.speed = 2.0}, {.speed = 1.0}};
    pw_partition_config pc = {.n_stages = 2, .micro_batch_size = 1, .micro_batches = 4,
                              .flops_per_s = 1e9, .optim_state_floats = 2,
                              .optim_flops = PW_OPTIM_FLOPS_ADAMW, .devices = dev};
    int begin[] = {0, 1, g->n_nodes};
    pw_partition p;
    cr_assert_eq(pw_partition_evaluate(g, &pc, begin, &p), PW_OK, "%s", pw_last_error());
    /* Stage 0 = the table: elements × 14 FLOPs ÷ 1 GFLOP/s ÷ speed 2. */
    const double table = 65536.0 * 64.0;
    cr_assert_eq(p.stage[0].optim, table * 14.0 / 1e9 / 2.0, "%.17g", p.stage[0].optim);
    /* Stage 1: four 64x64 layers with biases and the 8x64 head. */
    const double rest = 4.0 * (64 * 64 + 64) + (8 * 64 + 8);
    cr_assert_float_eq(p.stage[1].optim, rest * 14.0 / 1e9, 1e-18);
    for (int s = 0; s < 2; s++) {
        const pw_stage_cost *o = &p.stage[s];
        cr_assert_eq(o->time, o->f + o->b + o->w + o->comm + o->optim / 4, "stage %d: O / M", s);
    }
    /* Σ (compute × M + O) / (S × step) is the busy share. */
    double busy = 0;
    for (int s = 0; s < 2; s++)
        busy += (p.stage[s].f + p.stage[s].b + p.stage[s].w) * 4 + p.stage[s].optim;
    cr_assert_float_eq(p.bubble, 1.0 - busy / (2 * p.step_time), 1e-12);
    pw_partition_free(&p);
    /* optim_flops 0: the analytic model without the optimizer, as before. */
    pc.optim_flops = 0;
    cr_assert_eq(pw_partition_evaluate(g, &pc, begin, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.stage[0].optim, 0);
    cr_assert_eq(p.stage[1].optim, 0);
    pw_partition_free(&p);
    pc.optim_flops = -1;
    cr_assert_eq(pw_partition_evaluate(g, &pc, begin, &p), PW_ERR_INVALID_ARG);
    pw_graph_destroy(g);
}

Test(partition, optimizer_time_moves_a_cut, .timeout = TIMEOUT)
{
    /* Analytic, one sample per micro-batch, M = 1: the table's update
     * (4 Mi × 6 FLOPs) outweighs every layer's compute (about 100 kFLOP
     * each), so with the optimizer the table gets a stage of its own;
     * without it the table costs nothing and shares stage 0. */
    pw_graph *g = parse(EMB);
    pw_partition_config pc = {.n_stages = 2, .method = PW_PARTITION_BALANCED,
                              .micro_batch_size = 1, .micro_batches = 1, .optim_state_floats = 1};
    pw_partition p;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_gt(p.begin[1], 1, "without the optimizer the table shares a stage (cut %d)", p.begin[1]);
    pw_partition_free(&p);
    pc.optim_flops = PW_OPTIM_FLOPS_SGD;
    cr_assert_eq(pw_partition_plan(g, &pc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.begin[1], 1, "with it the table stands alone (cut %d)", p.begin[1]);
    cr_assert_eq(p.bottleneck_stage, 0);
    cr_assert_eq(p.bottleneck, p.stage[0].time);
    pw_partition_free(&p);

    /* Measured, by hand: four nodes of 1 ms each, M = 4, 2 stages. Without
     * the optimizer: [a b | c o+loss], 2 ms. With 8 ms of update on `a`
     * (2 ms per micro-batch): [a b] would take 4 ms, [a | b c o loss] takes
     * max(1 + 2, 3) = 3 ms: the cut moves one node earlier. */
    pw_graph *c = parse(CHAIN);
    cr_assert_eq(c->n_nodes, 5);
    pw_op_time t[5] = {{1e-3, 0, 0, 0}, {1e-3, 0, 0, 0}, {1e-3, 0, 0, 0}, {1e-3, 0, 0, 0}, {0, 0, 0, 0}};
    pw_partition_config tc = {.n_stages = 2, .method = PW_PARTITION_BALANCED, .balance = PW_BALANCE_TIME,
                              .node_times = t, .micro_batch_size = 1, .micro_batches = 4};
    cr_assert_eq(pw_partition_plan(c, &tc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.begin[1], 2);
    cr_assert_float_eq(p.bottleneck, 2e-3, 1e-15);
    pw_partition_free(&p);
    t[0].o = 8e-3;
    cr_assert_eq(pw_partition_plan(c, &tc, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p.begin[1], 1, "cut %d", p.begin[1]);
    cr_assert_float_eq(p.stage[0].optim, 8e-3, 1e-15);
    cr_assert_float_eq(p.bottleneck, 3e-3, 1e-15);
    /* Estimate: Σ stage + (M − 1) × bottleneck. */
    cr_assert_float_eq(p.step_time, 3e-3 + 3e-3 + 3 * 3e-3, 1e-15);
    pw_partition_free(&p);
    pw_graph_destroy(c);
    pw_graph_destroy(g);
}

/* A tied head: each stage updates its own copy of the table, so a stage
 * holding only the reuse pays for it too, whatever `o` the reusing node
 * carries (a measured profile gives it 0). */
Test(partition, tied_parameter_updated_in_every_stage_that_holds_it, .timeout = TIMEOUT)
{
    pw_graph *g = parse("graph tied\n"
                        "input t : i32[4]\n"
                        "label y : i32[4]\n"
                        "e = embedding(t, vocab=16, dim=8) as wte\n"
                        "h = linear(e, out=8)\n"
                        "o = linear(h, out=16, bias=false, weight=wte.weight)\n"
                        "loss = softmax_cross_entropy(o, y)\n");
    pw_op_time t[4] = {{1e-3, 0, 0, 4e-3}, {1e-3, 0, 0, 1e-3}, {1e-3, 0, 0, 9.0}, {0, 0, 0, 0}};
    pw_partition_config pc = {.n_stages = 2, .balance = PW_BALANCE_TIME, .node_times = t,
                              .micro_batch_size = 1, .micro_batches = 2};
    int split[] = {0, 2, 4}, whole[] = {0, 4};
    pw_partition p;
    cr_assert_eq(pw_partition_evaluate(g, &pc, split, &p), PW_OK, "%s", pw_last_error());
    cr_assert_float_eq(p.stage[0].optim, 4e-3 + 1e-3, 1e-15);
    cr_assert_float_eq(p.stage[1].optim, 4e-3, 1e-15, "the head's copy of wte");
    pw_partition_free(&p);
    pc.n_stages = 1;
    cr_assert_eq(pw_partition_evaluate(g, &pc, whole, &p), PW_OK, "%s", pw_last_error());
    cr_assert_float_eq(p.stage[0].optim, 4e-3 + 1e-3, 1e-15, "one copy, updated once");
    pw_partition_free(&p);
    pw_graph_destroy(g);

    /* What a profile measures for it: the reuse updates nothing. */
    g = parse("graph tied\n"
              "input t : i32[4]\n"
              "label y : i32[4]\n"
              "e = embedding(t, vocab=16, dim=8) as wte\n"
              "o = linear(e, out=16, bias=false, weight=wte.weight)\n"
              "loss = softmax_cross_entropy(o, y)\n");
    pw_profile_config prc = {.micro_batch = 2, .iterations = 1, .device = "test device"};
    pw_profile *prof = NULL;
    cr_assert_eq(pw_profile_measure(g, &prc, &prof), PW_OK, "%s", pw_last_error());
    cr_assert_gt(prof->times[0].o, 0);
    cr_assert_eq(prof->times[1].o, 0);
    cr_assert_eq(prof->times[2].o, 0);
    pw_profile_destroy(prof);
    pw_graph_destroy(g);
}

/* ------------------------------------------------------ profiles */

static char tmpdir[64];

static void make_tmpdir(void)
{
    strcpy(tmpdir, "/tmp/pw_test_partition_XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

static void rm_tmpdir(const char *const *files, int n)
{
    char path[256];
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", tmpdir, files[i]);
        unlink(path);
    }
    rmdir(tmpdir);
}

Test(profile, round_trip_and_reuse, .timeout = TIMEOUT)
{
    make_tmpdir();
    pw_graph *g = parse(SKIP);
    char path[256];
    snprintf(path, sizeof path, "%s/p.json", tmpdir);
    pw_profile_config pc = {.micro_batch = 8, .iterations = 3, .threads = 1};
    pw_profile *a = NULL, *b = NULL;
    int measured = -1;
    cr_assert_eq(pw_profile_load_or_measure(path, g, &pc, &a, &measured), PW_OK, "%s", pw_last_error());
    cr_assert_eq(measured, 1);
    cr_assert_eq(access(path, R_OK), 0, "the profile was written");
    cr_assert_eq(a->n_nodes, g->n_nodes);
    cr_assert_str_eq(a->graph, "skip");
    cr_assert_str_eq(a->sigs[0], "linear(f32[16]) -> f32[16], 2 params");
    cr_assert_str_eq(a->sigs[4], "add(f32[16], f32[16]) -> f32[16], 0 params");
    cr_assert(strstr(a->device, "1 thread)"), "%s", a->device);
    for (int i = 0; i < g->n_nodes; i++) {
        cr_assert(a->times[i].f > 0, "node %d forward took time", i);
        cr_assert(a->times[i].b >= 0 && a->times[i].w >= 0);
    }
    /* Linear layers have weight gradients; relu none. Only nodes with
     * parameters have an optimizer update. */
    cr_assert_gt(a->times[0].w, 0);
    cr_assert_eq(a->optim, PW_OPTIM_SGD);
    for (int i = 0; i < g->n_nodes; i++) {
        if (g->nodes[i].n_params > 0)
            cr_assert_gt(a->times[i].o, 0, "node %d: optimizer update timed", i);
        else
            cr_assert_eq(a->times[i].o, 0, "node %d has no parameters", i);
    }
    cr_assert_eq(pw_profile_load_or_measure(path, g, &pc, &b, &measured), PW_OK, "%s", pw_last_error());
    cr_assert_eq(measured, 0, "the second run reuses the file");
    for (int i = 0; i < g->n_nodes; i++) {
        cr_assert_eq(a->times[i].f, b->times[i].f, "node %d: bit-exact round trip", i);
        cr_assert_eq(a->times[i].b, b->times[i].b);
        cr_assert_eq(a->times[i].w, b->times[i].w);
        cr_assert_eq(a->times[i].o, b->times[i].o);
        cr_assert_str_eq(a->names[i], b->names[i]);
    }
    /* A measured profile drives the planner. */
    pw_partition_config cfg = {.n_stages = 3, .balance = PW_BALANCE_TIME, .node_times = b->times,
                               .micro_batch_size = 8};
    pw_partition p;
    cr_assert_eq(pw_partition_plan(g, &cfg, &p), PW_OK, "%s", pw_last_error());
    double sum = 0;
    double osum = 0;
    for (int i = 0; i < g->n_nodes; i++) {
        sum += b->times[i].f + b->times[i].b + b->times[i].w;
        osum += b->times[i].o;
    }
    double got = 0, ogot = 0;
    for (int s = 0; s < 3; s++) {
        got += p.stage[s].f + p.stage[s].b + p.stage[s].w;
        ogot += p.stage[s].optim;
        cr_assert_float_eq(p.stage[s].time, p.stage[s].f + p.stage[s].b + p.stage[s].w +
                           p.stage[s].comm + p.stage[s].optim, 1e-15, "M = 1: O / M = O");
    }
    cr_assert_float_eq(got, sum, 1e-12);
    cr_assert_float_eq(ogot, osum, 1e-12, "no tied parameters: the stages' O sum the nodes' o");
    pw_partition_free(&p);
    pw_profile_destroy(a);
    pw_profile_destroy(b);
    pw_graph_destroy(g);
    const char *files[] = {"p.json"};
    rm_tmpdir(files, 1);
}

Test(profile, stale_and_corrupt_files_are_refused, .timeout = TIMEOUT)
{
    make_tmpdir();
    pw_graph *g = parse(SKIP);
    char path[256];
    snprintf(path, sizeof path, "%s/p.json", tmpdir);
    pw_profile_config pc = {.micro_batch = 4, .iterations = 1, .device = "test device"};
    pw_profile *p = NULL;
    cr_assert_eq(pw_profile_load_or_measure(path, g, &pc, &p, NULL), PW_OK, "%s", pw_last_error());
    pw_profile_destroy(p);
    p = NULL;

    /* Another micro-batch size. */
    pc.micro_batch = 8;
    cr_assert_eq(pw_profile_load_or_measure(path, g, &pc, &p, NULL), PW_ERR_FORMAT);
    char want[512];
    snprintf(want, sizeof want, "%s is stale: it was measured at micro-batch 4, this run uses 8; "
             "delete it or choose another --profile file to measure again", path);
    cr_assert_str_eq(pw_last_error(), want);
    cr_assert_null(p);
    /* Another device. */
    pc.micro_batch = 4;
    pc.device = "other device";
    cr_assert_eq(pw_profile_load_or_measure(path, g, &pc, &p, NULL), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "it was measured on 'test device', this run is on 'other device'"),
              "%s", pw_last_error());
    pc.device = "test device";
    /* A changed graph: same names, a wider layer. */
    char text[1024];
    snprintf(text, sizeof text, "%s", SKIP);
    char *w = strstr(text, "c = linear(b, out=16)\n");
    snprintf(w, sizeof text - (size_t)(w - text), "c = linear(b, out=16, bias=false)\n%s",
             strstr(SKIP, "d = relu"));
    pw_graph *g2 = parse(text);
    cr_assert_eq(pw_profile_load_or_measure(path, g2, &pc, &p, NULL), PW_ERR_FORMAT);
    snprintf(want, sizeof want, "%s is stale: node 2 is 'c: linear(f32[16]) -> f32[16], 2 params' "
             "in the profile but 'c: linear(f32[16]) -> f32[16], 1 param' in graph 'skip' (the "
             "graph changed since it was profiled); delete it or choose another --profile file to "
             "measure again", path);
    cr_assert_str_eq(pw_last_error(), want);
    pw_graph_destroy(g2);
    /* Another graph. */
    pw_graph *g3 = parse(CHAIN);
    cr_assert_eq(pw_profile_load_or_measure(path, g3, &pc, &p, NULL), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "it was measured for graph 'skip', not 'chain'"), "%s",
              pw_last_error());
    pw_graph_destroy(g3);

    /* Another optimizer. */
    pc.optim = PW_OPTIM_ADAMW;
    cr_assert_eq(pw_profile_load_or_measure(path, g, &pc, &p, NULL), PW_ERR_FORMAT);
    snprintf(want, sizeof want, "%s is stale: its optimizer times are for sgd, this run uses adamw; "
             "delete it or choose another --profile file to measure again", path);
    cr_assert_str_eq(pw_last_error(), want);
    pc.optim = PW_OPTIM_SGD;
    /* A version 1 file (no optimizer times) is stale, not corrupt. */
    write_file(path, "{\"format\": \"pipewright-profile\", \"version\": 1, \"graph\": \"skip\", "
                     "\"micro_batch\": 4, \"device\": \"test device\", \"iterations\": 1, "
                     "\"nodes\": [{\"name\": \"a\", \"sig\": \"s\", \"f\": 1, \"b\": 0, \"w\": 0}]}");
    cr_assert_eq(pw_profile_load_or_measure(path, g, &pc, &p, NULL), PW_ERR_FORMAT);
    snprintf(want, sizeof want, "%s is stale: it is a version 1 profile, measured without the "
             "optimizer step (no \"o\" times); delete it or choose another --profile file to "
             "measure again", path);
    cr_assert_str_eq(pw_last_error(), want);
    cr_assert_null(p);
    /* A version 2 node without "o" likewise. */
    write_file(path, "{\"format\": \"pipewright-profile\", \"version\": 2, \"graph\": \"skip\", "
                     "\"micro_batch\": 4, \"device\": \"test device\", \"optimizer\": \"sgd\", "
                     "\"iterations\": 1, \"nodes\": [{\"name\": \"a\", \"sig\": \"s\", \"f\": 1, "
                     "\"b\": 0, \"w\": 0}]}");
    cr_assert_eq(pw_profile_load(path, &p), PW_ERR_FORMAT);
    snprintf(want, sizeof want, "%s is stale: node 0 (a) has no optimizer time \"o\" (measured "
             "before the optimizer step was timed); delete it or choose another --profile file to "
             "measure again", path);
    cr_assert_str_eq(pw_last_error(), want);
    write_file(path, "{\"format\": \"pipewright-profile\", \"version\": 2, \"graph\": \"skip\", "
                     "\"micro_batch\": 4, \"device\": \"test device\", \"optimizer\": \"lion\", "
                     "\"iterations\": 1, \"nodes\": []}");
    cr_assert_eq(pw_profile_load(path, &p), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "unknown optimizer 'lion'"), "%s", pw_last_error());

    /* Corrupt files: where and what. */
    write_file(path, "{\"format\": \"pipewright-profile\",\n \"version\": 1,\n \"graph\": }\n");
    cr_assert_eq(pw_profile_load(path, &p), PW_ERR_FORMAT);
    snprintf(want, sizeof want, "%s:3:11: error: not valid JSON", path);
    cr_assert(!strncmp(pw_last_error(), want, strlen(want)), "%s", pw_last_error());
    write_file(path, "{\"format\": \"chrome-trace\"}");
    cr_assert_eq(pw_profile_load(path, &p), PW_ERR_FORMAT);
    snprintf(want, sizeof want, "%s: error: not a pipewright profile (no \"format\": "
             "\"pipewright-profile\")", path);
    cr_assert_str_eq(pw_last_error(), want);
    write_file(path, "{\"format\": \"pipewright-profile\", \"version\": 9}");
    cr_assert_eq(pw_profile_load(path, &p), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "profile format version 9; this pipewright reads version 2"),
              "%s", pw_last_error());
    write_file(path, "{\"format\": \"pipewright-profile\", \"version\": 2, \"graph\": \"skip\", "
                     "\"micro_batch\": 4, \"device\": \"test device\", \"optimizer\": \"sgd\", "
                     "\"iterations\": 1}");
    cr_assert_eq(pw_profile_load(path, &p), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "field \"nodes\" is missing or has the wrong type"), "%s",
              pw_last_error());
    write_file(path, "{\"format\": \"pipewright-profile\", \"version\": 2, \"graph\": \"skip\", "
                     "\"micro_batch\": 4, \"device\": \"test device\", \"optimizer\": \"sgd\", "
                     "\"iterations\": 1, \"nodes\": [{\"name\": \"a\", \"sig\": \"s\", \"f\": 1, "
                     "\"b\": -1, \"w\": 0, \"o\": 0}]}");
    cr_assert_eq(pw_profile_load(path, &p), PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "node 0 needs \"name\", \"sig\" and times \"f\", \"b\", \"w\", \"o\""),
              "%s", pw_last_error());
    /* The stale or corrupt file is left alone, never overwritten. */
    cr_assert_eq(pw_profile_load_or_measure(path, g, &pc, &p, NULL), PW_ERR_FORMAT);
    cr_assert_eq(pw_profile_load(NULL, &p), PW_ERR_INVALID_ARG);
    snprintf(want, sizeof want, "%s/missing.json", tmpdir);
    cr_assert_eq(pw_profile_load(want, &p), PW_ERR_IO);
    pw_graph_destroy(g);
    const char *files[] = {"p.json"};
    rm_tmpdir(files, 1);
}

/* ------------------------------------------------------ the plan */

static char *print_plan(const pw_plan *plan)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert_not_null(f);
    cr_assert_eq(pw_plan_print(f, plan), PW_OK, "%s", pw_last_error());
    fclose(f);
    return buf;
}

Test(plan, simulator_runs_the_optimizer, .timeout = TIMEOUT)
{
    /* The plan hands O to the simulator's OPTIM: a step with a large update
     * is longer by at least the slowest stage's O. */
    pw_graph *g = parse(EMB);
    pw_plan_config pc = pw_plan_defaults();
    pc.graph = g;
    pc.stages = 2;
    pc.micro_batches = 4;
    pc.micro_batch_size = 1;
    pc.method = PW_PARTITION_BALANCED;
    pc.optim = PW_OPTIM_ADAMW;
    pw_plan *plan = NULL;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    const pw_partition *pt = &plan->part;
    cr_assert_eq(pt->begin[1], 1, "the table stands alone");
    const double o0 = 65536.0 * 64.0 * PW_OPTIM_FLOPS_ADAMW / 1e10;
    cr_assert_eq(pt->stage[0].optim, o0);
    double fbw = 0;
    for (int s = 0; s < 2; s++) fbw += pt->stage[s].f + pt->stage[s].b + pt->stage[s].w;
    cr_assert_geq(plan->step_time, o0, "step %.9g, stage 0's update %.9g", plan->step_time, o0);
    cr_assert_leq(plan->step_time, 4 * fbw + o0 + pt->stage[1].optim + 1e-12);
    char *out = print_plan(plan);
    cr_assert(strstr(out, "  memory: optimizer adamw, state 2 floats per parameter"), "%s", out);
    free(out);
    pw_plan_destroy(plan);
    pw_graph_destroy(g);

    /* A profile in memory measured for another optimizer is used, and the
     * header says so (files are refused: profile tests above). */
    g = parse(CHAIN);
    pw_profile_config prc = {.micro_batch = 1, .iterations = 1, .device = "test device"};
    pw_profile *prof = NULL;
    cr_assert_eq(pw_profile_measure(g, &prc, &prof), PW_OK, "%s", pw_last_error());
    pc.graph = g;
    pc.balance = PW_BALANCE_TIME;
    pc.profile = prof;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    out = print_plan(plan);
    cr_assert(strstr(out, "  op times: measured on test device, median of 1; its optimizer times are for "
                          "sgd, this plan uses adamw (measure one for it)\n"), "%s", out);
    double osum = 0;
    for (int i = 0; i < g->n_nodes; i++) osum += prof->times[i].o;
    cr_assert_float_eq(plan->part.stage[0].optim + plan->part.stage[1].optim, osum, 1e-12);
    free(out);
    pw_plan_destroy(plan);
    pw_profile_destroy(prof);
    pw_graph_destroy(g);
}

Test(plan, table_has_the_columns, .timeout = TIMEOUT)
{
    pw_graph *g = parse(SKIP);
    hwloc_topology_t topo;
    cr_assert_eq(pw_topology_load_synthetic("pack:2 numa:2 core:8 pu:1", &topo), PW_OK);
    pw_plan_config pc = pw_plan_defaults();
    pc.graph = g;
    pc.stages = 3;
    pc.micro_batches = 4;
    pc.micro_batch_size = 16;
    pc.memory_budget = 1 << 20;
    pc.link_bandwidth = 1e9;
    pc.link_latency = 5e-6;
    pc.topology = topo;
    pc.topology_name = "pack:2 numa:2 core:8 pu:1";
    pw_plan *plan = NULL;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    cr_assert_eq(plan->inflight[0], 3, "1f1b: stage 0 holds S micro-batches");
    cr_assert_eq(plan->inflight[2], 1);
    cr_assert_gt(plan->step_time, 0);
    cr_assert(plan->bubble > 0 && plan->bubble < 1);
    char *out = print_plan(plan);
    cr_assert(strstr(out, "plan for graph skip (t.graph): 3 stages, 1f1b, 4 micro-batches of 16 "
                          "samples, partition balanced, balance flops\n"), "%s", out);
    cr_assert(strstr(out, "  op times: analytic, FLOPs at 10 GFLOP/s per unit of speed\n"), "%s", out);
    cr_assert(strstr(out, "  links: 1 GB/s, 5 us per message\n"), "%s", out);
    cr_assert(strstr(out, "\nstage  nodes     ops                           F us      B us      W us"
                          "      O us   send us   time us slots  memory / budget             send act   "
                          "send grad   device\n"), "%s", out);
    cr_assert(strstr(out, "  memory: optimizer sgd, state 1 float per parameter, recomputation off"), "%s", out);
    cr_assert(strstr(out, "(F, B, W, send and time per micro-batch; O, the optimizer update, once per "
                          "step: time = F + B + W + send + O / 4)\n"), "%s", out);
    cr_assert(strstr(out, "\n    0  0-4       a .. r (5)  "), "%s", out);
    cr_assert(strstr(out, "1.0 MiB "), "budget column: %s", out);
    cr_assert(strstr(out, "cores 0-9, NUMA 0 (+1 more)\n"), "%s", out);
    cr_assert(strstr(out, "\nstage ops:\n  0: linear a"), "%s", out);
    cr_assert(strstr(out, "\nbottleneck: stage "), "%s", out);
    cr_assert(strstr(out, "(the best split under this model)\npredicted step: "), "%s", out);
    cr_assert(strstr(out, "(1f1b with equal stages and free links: 33.3%)\n"), "%s", out);
    cr_assert(strstr(out, "placement on pack:2 numa:2 core:8 pu:1: 3 ranks (3 stages x 1 replica) "
                          "on cores\n"), "%s", out);
    free(out);
    pw_plan_destroy(plan);

    /* Heterogeneous devices show in the device column. */
    pw_device_spec *dev = NULL;
    cr_assert_eq(pw_plan_parse_devices("1,2,2", "1M", 3, &dev), PW_OK, "%s", pw_last_error());
    pc.devices = dev;
    pc.topology = NULL;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    out = print_plan(plan);
    cr_assert(strstr(out, "  device 1 x2\n"), "%s", out);
    cr_assert(!strstr(out, "placement"), "%s", out);
    free(out);
    pw_plan_destroy(plan);
    free(dev);
    hwloc_topology_destroy(topo);
    pw_graph_destroy(g);
}

Test(plan, custom_schedule, .timeout = TIMEOUT)
{
    pw_graph *g = parse(EIGHT);
    pw_schedule_config sc = {.kind = PW_SCHEDULE_GPIPE, .n_stages = 3, .n_micro = 4};
    pw_schedule *s = NULL;
    cr_assert_eq(pw_schedule_generate(&sc, &s), PW_OK);
    cr_assert_eq(pw_schedule_lower(s), PW_OK);
    pw_plan_config pc = pw_plan_defaults();
    pc.graph = g;
    pc.stages = 3;
    pc.micro_batches = 4;
    pc.micro_batch_size = 4;
    pc.custom = s;
    pw_plan *plan = NULL;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    cr_assert_str_eq(plan->schedule, "custom (gpipe)");
    for (int k = 0; k < 3; k++) cr_assert_eq(plan->inflight[k], 4, "gpipe stashes every micro-batch");
    pw_plan_destroy(plan);
    pc.micro_batches = 8;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "the schedule has 3 ranks and 4 micro-batches"), "%s", pw_last_error());
    pw_schedule_destroy(s);
    pw_graph_destroy(g);
}

Test(plan, says_how_many_stages_would_fit, .timeout = TIMEOUT)
{
    pw_graph *g = parse(EIGHT);
    pw_plan_config pc = pw_plan_defaults();
    pc.graph = g;
    pc.stages = 2;
    pc.micro_batches = 8;
    pc.micro_batch_size = 16;
    pc.schedule = PW_SCHEDULE_GPIPE;
    pc.memory_budget = 160 * 1024;
    pw_plan *plan = NULL;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_ERR_NOMEM);
    cr_assert_null(plan);
    cr_assert(strstr(pw_last_error(), "no split into 2 stages fits"), "%s", pw_last_error());
    cr_assert(strstr(pw_last_error(), " stages would fit"), "%s", pw_last_error());
    int more = atoi(strrchr(pw_last_error(), ';') + 2);
    cr_assert_gt(more, 2);
    pc.stages = more;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    pw_plan_destroy(plan);
    pc.stages = more - 1;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_ERR_NOMEM);
    /* Several chunks per rank are not planned. */
    pc.schedule = PW_SCHEDULE_ZB_V;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_ERR_UNSUPPORTED);
    pc.schedule = PW_SCHEDULE_1F1B;
    pc.balance = PW_BALANCE_TIME;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "needs a profile"), "%s", pw_last_error());
    pw_graph_destroy(g);
}

Test(plan, flag_helpers, .timeout = TIMEOUT)
{
    int64_t b;
    cr_assert_eq(pw_parse_bytes("4096", &b), PW_OK);
    cr_assert_eq(b, 4096);
    cr_assert_eq(pw_parse_bytes("512K", &b), PW_OK);
    cr_assert_eq(b, 512 * 1024);
    cr_assert_eq(pw_parse_bytes("1.5G", &b), PW_OK);
    cr_assert_eq(b, 3 * (int64_t)1 << 29);
    cr_assert_eq(pw_parse_bytes("2GiB", &b), PW_OK);
    cr_assert_eq(b, (int64_t)2 << 30);
    cr_assert_eq(pw_parse_bytes("64MB", &b), PW_OK);
    cr_assert_eq(b, (int64_t)64 << 20);
    cr_assert_eq(pw_parse_bytes("lots", &b), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_parse_bytes("5X", &b), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_parse_bytes("-1", &b), PW_ERR_INVALID_ARG);
    pw_device_spec *d = NULL;
    cr_assert_eq(pw_plan_parse_devices("1,2,0.5", "8G,8G,16G", 3, &d), PW_OK, "%s", pw_last_error());
    cr_assert_float_eq(d[2].speed, 0.5, 1e-12);
    cr_assert_eq(d[2].memory, (int64_t)16 << 30);
    free(d);
    cr_assert_eq(pw_plan_parse_devices(NULL, "4G", 2, &d), PW_OK);
    cr_assert_eq(d[1].memory, (int64_t)4 << 30);
    cr_assert_float_eq(d[1].speed, 1.0, 0);
    free(d);
    cr_assert_eq(pw_plan_parse_devices("1,2,3", NULL, 4, &d), PW_ERR_INVALID_ARG);
    cr_assert_str_eq(pw_last_error(), "device speeds: 3 values for 4 stages (give one per stage, "
                                      "or one for all)");
    cr_assert_eq(pw_plan_parse_devices("1,fast", NULL, 2, &d), PW_ERR_INVALID_ARG);
    cr_assert_str_eq(pw_last_error(), "device speeds: 'fast' is not a speed > 0");
    cr_assert_null(d);
}

/* Issue 9: the plan on GPUs. On the 2-socket, 8-GPU fixture each stage's
 * row names its GPU, PCI id and cores, and its budget is its GPU's memory
 * (lstopo's CUDAGlobalMemorySize: 80 GiB); a GPU shared by several stages
 * is split among them; the GPUs are listed with their model. */
Test(plan, on_gpus_with_their_memory_as_budgets, .timeout = TIMEOUT)
{
    pw_graph *g = parse(SKIP);
    hwloc_topology_t topo;
    cr_assert_eq(pw_topology_load_spec(PW_SOURCE_DIR "/tests/fixtures/topologies/2socket_8gpu.xml", &topo),
                 PW_OK, "%s", pw_last_error());
    pw_plan_config pc = pw_plan_defaults();
    pc.graph = g;
    pc.stages = 4;
    pc.micro_batches = 4;
    pc.micro_batch_size = 16;
    pc.topology = topo;
    pc.topology_name = "2socket_8gpu.xml";
    pw_plan *plan = NULL;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    cr_assert_not_null(plan->gpu_budgets);
    for (int s = 0; s < 4; s++) {
        cr_assert_eq(plan->part.stage[s].mem.budget, 80ll << 30, "stage %d", s);
        cr_assert_eq(plan->place->ranks[s].gpu, s);
    }
    char *out = print_plan(plan);
    cr_assert(strstr(out, "budget each GPU's memory, shared by the stages on it\n"), "%s", out);
    static const char *const rows[] = {"cuda0 (0000:11:00.0), cores 0-1, NUMA 0\n",
                                       "cuda1 (0000:21:00.0), cores 2-3, NUMA 0\n",
                                       "cuda2 (0000:31:00.0), cores 4-5, NUMA 0\n",
                                       "cuda3 (0000:41:00.0), cores 6-7, NUMA 0\n"};
    for (int s = 0; s < 4; s++) {
        char want[160];
        snprintf(want, sizeof want, "\n    %d  ", s);
        const char *row = strstr(out, want);
        cr_assert_not_null(row, "no row for stage %d: %s", s, out);
        const char *end = strchr(row + 1, '\n');
        cr_assert(strstr(row, rows[s]) && strstr(row, rows[s]) < end + 1, "stage %d: %s", s, out);
        cr_assert(strstr(row, " / 80.0 GiB ") && strstr(row, " / 80.0 GiB ") < end, "stage %d budget: %s", s, out);
    }
    cr_assert(strstr(out, "placement on 2socket_8gpu.xml: 4 ranks (4 stages x 1 replica) on GPUs\nGPUs:\n"
                          "  cuda0   0000:11:00.0  NVIDIA H100 80GB HBM3    memory 80.0 GiB   stage 0, "
                          "budget 80.0 GiB\n"), "%s", out);
    cr_assert(strstr(out, "  cuda3   0000:41:00.0  NVIDIA H100 80GB HBM3    memory 80.0 GiB   stage 3, "
                          "budget 80.0 GiB\n"), "%s", out);
    cr_assert(!strstr(out, "cuda4"), "unused GPUs are not listed: %s", out);
    free(out);
    pw_plan_destroy(plan);

    /* --memory-budget wins over the GPUs' memory. */
    pc.memory_budget = 1 << 20;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    cr_assert_null(plan->gpu_budgets);
    cr_assert_eq(plan->part.stage[0].mem.budget, 1 << 20);
    pw_plan_destroy(plan);
    pc.memory_budget = 0;

    /* This machine's GPU (as --device cuda:0 gives it): two stages share
     * it and its free memory; too little is refused naming the share. */
    const pw_gpu_desc one[] = {{.pci = "0000:91:00.0", .name = "cuda0", .model = "NVIDIA H200",
                                .memory = 2ll << 30}};
    pc.stages = 2;
    pc.gpu_list = one;
    pc.n_gpu_list = 1;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_OK, "%s", pw_last_error());
    cr_assert_eq(plan->part.stage[0].mem.budget, 1ll << 30);
    cr_assert_eq(plan->part.stage[1].mem.budget, 1ll << 30);
    out = print_plan(plan);
    cr_assert(strstr(out, "cuda0 (0000:91:00.0), cores 8-11, NUMA 1\n"), "%s", out);
    cr_assert(strstr(out, "cuda0 (0000:91:00.0), cores 12-15, NUMA 1\n"), "%s", out);
    cr_assert(strstr(out, "  cuda0   0000:91:00.0  NVIDIA H200              memory 2.0 GiB    stages 0, 1, "
                          "budget 1.0 GiB each\n"), "%s", out);
    free(out);
    pw_plan_destroy(plan);
    pc.gpu_memory = 1024;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_ERR_NOMEM);
    cr_assert_null(plan);
    cr_assert(strstr(pw_last_error(), "but its share of cuda0 (1/2) has 512 B"), "%s", pw_last_error());

    /* A GPU memory size needs stages on GPUs; GPUs need a topology. */
    pc.gpu_list = NULL;
    pc.n_gpu_list = 0;
    pc.gpus = 0;
    pc.gpu_memory = 1 << 30;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "not placed on GPUs"), "%s", pw_last_error());
    pc.gpus = PW_PLACE_GPUS_AUTO;
    pc.gpu_memory = 0;
    pc.gpu_list = one;
    pc.n_gpu_list = 1;
    pc.topology = NULL;
    cr_assert_eq(pw_plan_make(&pc, &plan), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "without a topology"), "%s", pw_last_error());
    hwloc_topology_destroy(topo);
    pw_graph_destroy(g);
}
