/* libFuzzer harness: graph files (graph/parse.c, lower.c, ops.c) and what
 * runs on every graph a user gives: shape inference (in the parser), the
 * cost model, the printed summary and the planner.
 *
 * The input is the graph text itself, parsed from memory
 * (pw_graph_parse_string). A graph that parses is costed node by node and
 * in total, printed, and partitioned into 2 stages twice: as
 * pw_partition_make does (FLOPS, free links, no budget) and with a 1 MiB
 * memory budget, links, recomputation and 1F1B-like in-flight counts, which
 * exercises the memory model and, when nothing fits, the diagnosis. Seeds:
 * tests/fuzz/corpus/graph/ (the examples and small edge cases). */
#include <math.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *null_out;
    if (!null_out) {
        fuzz_quiet();
        null_out = fopen("/dev/null", "w");
        if (!null_out) abort();
    }
    pw_graph *g = NULL;
    if (pw_graph_parse_string((const char *)data, size, "fuzz.graph", &g) != PW_OK) {
        if (g) abort(); /* *out is NULL on error */
        return 0;
    }
    for (int i = 0; i < g->n_nodes; i++) {
        pw_op_cost c;
        if (pw_graph_node_cost(g, i, &c) != PW_OK) abort();
        if (!isfinite(c.flops_fwd) || c.flops_fwd < 0 || c.act_bytes < 0 || c.out_bytes < 0)
            abort();
    }
    pw_op_cost tot;
    pw_graph_total_cost(g, &tot);
    pw_graph_print(g, null_out);
    if (g->n_nodes > 0 && pw_graph_range_input_bytes(g, 0, g->n_nodes) < 0) abort();

    if (g->n_nodes >= 2) {
        pw_partition pt;
        if (pw_partition_make(g, 2, PW_PARTITION_AUTO, &pt) == PW_OK) {
            if (pt.begin[0] != 0 || pt.begin[1] <= 0 || pt.begin[1] >= g->n_nodes ||
                pt.begin[2] != g->n_nodes)
                abort();
            pw_partition_free(&pt);
        }
        int inflight[2] = {2, 1};
        pw_partition_config pc = {.n_stages = 2, .method = PW_PARTITION_BALANCED,
                                  .balance = PW_BALANCE_FLOPS, .micro_batch_size = 4,
                                  .micro_batches = 4, .inflight = inflight,
                                  .memory_budget = 1 << 20, .link_bandwidth = 1e9,
                                  .link_latency = 1e-6, .optim_state_floats = 2,
                                  .optim_flops = PW_OPTIM_FLOPS_ADAMW, .recompute = size & 1};
        if (pw_partition_plan(g, &pc, &pt) == PW_OK) pw_partition_free(&pt);
    }
    pw_graph_destroy(g);
    return 0;
}
