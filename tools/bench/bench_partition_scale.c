/* bench_partition_scale — how the graph front end and the planner scale with
 * the node count (issue 13, "Scales in the input").
 *
 *   bench_partition_scale [--min-log 14] [--max-log 20] [--rounds 3]
 *
 * For n = 2^min-log .. 2^max-log nodes it generates a chain as a graph file
 * in memory (input, nested repeats of linear → relu blocks of width 64, a
 * classifier and the loss; exactly n nodes) and times, median of R rounds:
 *
 *   syntax   the text → statements (pw_graph_parse_ast)
 *   lower    repeat expansion, name resolution and shape inference
 *            (pw_graph_lower); syntax + lower is pw_graph_parse_string
 *   costs    the per-node cost model over every node (pw_graph_node_cost)
 *   S = 2, 8, 64   pw_partition_plan, balanced, FLOPS, 4 micro-batches of
 *            8 samples, 1F1B-like in-flight counts, 10 GB/s links with 5 us
 *            latency, SGD state: the planner as `pipeline-run --plan` runs it
 *
 * and prints one row per n with the time per node of the largest plan, so a
 * linear step shows a flat ns/node column. It includes the graph module's
 * internal header to time the two halves of parsing apart. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graph/graph-internal.h"
#include "graph/graph.h"
#include "graph/partition.h"
#include "tools/bench/bench_util.h"

#define MAX_ROUNDS 16

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(void)
{
    fprintf(stderr, "bench_partition_scale: %s\n", pw_last_error());
    exit(1);
}

/* A chain of exactly n nodes (n even, ≥ 8): linear → relu, then (n − 4) / 2 blocks
 * of linear → relu as an outer repeat of inner repeats (the repeat count is
 * limited to 100000), a remainder repeat, the classifier and the loss; the
 * first block is written out. */
static char *chain_text(long n, size_t *len)
{
    long blocks = (n - 4) / 2, inner = 1024, outer = blocks / inner, rest = blocks % inner;
    size_t cap = 4096;
    char *t = malloc(cap);
    if (!t) return NULL;
    int k = snprintf(t, cap,
                     "graph chain\ninput x : f32[64]\nlabel y : i32[]\n"
                     "h00 = linear(x, out=64)\nh0 = relu(h00)\n"
                     "h1 = repeat %ld as outer (a = h0) {\n"
                     "  h = repeat %ld as inner (v = a) {\n"
                     "    l = linear(v, out=64)\n    r = relu(l)\n    return r\n  }\n"
                     "  return h\n}\n",
                     outer > 0 ? outer : 1, outer > 0 ? inner : blocks);
    if (outer > 0 && rest > 0)
        k += snprintf(t + k, cap - (size_t)k,
                      "h2 = repeat %ld as tail (v = h1) {\n"
                      "  l = linear(v, out=64)\n  r = relu(l)\n  return r\n}\n"
                      "o = linear(h2, out=10)\n",
                      rest);
    else
        k += snprintf(t + k, cap - (size_t)k, "o = linear(h1, out=10)\n");
    k += snprintf(t + k, cap - (size_t)k, "loss = softmax_cross_entropy(o, y)\n");
    *len = (size_t)k;
    return t;
}

static double plan_time(const pw_graph *g, int S)
{
    int *inflight = malloc(sizeof(int) * (size_t)S);
    if (!inflight) return -1;
    for (int s = 0; s < S; s++) inflight[s] = S - s < 4 ? S - s : 4;
    pw_partition_config pc = {.n_stages = S, .method = PW_PARTITION_BALANCED,
                              .balance = PW_BALANCE_FLOPS, .micro_batch_size = 8,
                              .micro_batches = 4, .inflight = inflight,
                              .link_bandwidth = 10e9, .link_latency = 5e-6,
                              .optim_state_floats = 1, .optim_flops = PW_OPTIM_FLOPS_SGD};
    pw_partition pt;
    double t0 = now();
    if (pw_partition_plan(g, &pc, &pt) != PW_OK) die();
    double dt = now() - t0;
    pw_partition_free(&pt);
    free(inflight);
    return dt;
}

int main(int argc, char **argv)
{
    int lo = (int)arg_int(argc, argv, "--min-log", 14), hi = (int)arg_int(argc, argv, "--max-log", 20);
    int rounds = (int)arg_int(argc, argv, "--rounds", 3);
    static const int stages[] = {2, 8, 64};
    if (lo < 3 || hi > 20 || lo > hi || rounds < 1 || rounds > MAX_ROUNDS) {
        fprintf(stderr, "bench_partition_scale: want 3 <= min-log <= max-log <= 20, 1..%d rounds\n",
                MAX_ROUNDS);
        return 2;
    }
    printf("chain of linear -> relu blocks, median of %d rounds, seconds\n", rounds);
    printf("%8s %9s %9s %9s %9s %9s %9s %10s\n", "nodes", "syntax", "lower", "costs", "S=2",
           "S=8", "S=64", "ns/node*");
    for (int e = lo; e <= hi; e++) {
        long n = 1L << e;
        size_t len;
        char *text = chain_text(n, &len);
        if (!text) return 1;
        double t[6][MAX_ROUNDS];
        for (int r = 0; r < rounds; r++) {
            pw_pool pool = {0};
            pw_ast_block top;
            pw_graph *g = NULL;
            double t0 = now();
            if (pw_graph_parse_ast(text, len, "chain.graph", &pool, &top) != PW_OK) die();
            double t1 = now();
            if (pw_graph_lower(&top, "chain.graph", "chain", &g) != PW_OK) die();
            double t2 = now();
            pw_pool_free(&pool);
            if (g->n_nodes != n) {
                fprintf(stderr, "bench_partition_scale: generated %d nodes, wanted %ld\n",
                        g->n_nodes, n);
                return 1;
            }
            double t3 = now(), flops = 0;
            for (int i = 0; i < g->n_nodes; i++) {
                pw_op_cost c;
                if (pw_graph_node_cost(g, i, &c) != PW_OK) die();
                flops += c.flops_fwd;
            }
            double t4 = now();
            if (flops <= 0) return 1;
            t[0][r] = t1 - t0;
            t[1][r] = t2 - t1;
            t[2][r] = t4 - t3;
            for (int k = 0; k < 3; k++) t[3 + k][r] = plan_time(g, stages[k]);
            pw_graph_destroy(g);
        }
        double med[6];
        for (int k = 0; k < 6; k++) med[k] = median(t[k], rounds);
        printf("%8ld %9.4f %9.4f %9.4f %9.4f %9.4f %9.4f %10.1f\n", n, med[0], med[1], med[2],
               med[3], med[4], med[5], 1e9 * med[5] / (double)n);
        fflush(stdout);
        free(text);
    }
    printf("* ns/node: the S=64 plan's time per node\n");
    return 0;
}
