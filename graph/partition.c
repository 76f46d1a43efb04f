/* pipewright — contiguous partitions: from cut markers, or FLOP-balanced. */
#include "graph/partition.h"

#include <stdlib.h>
#include <string.h>

/* Which values carry a gradient: produced by an op with parameters or from
 * one that does (the same rule the stage program uses). A node whose inputs
 * carry none skips its input-gradient work, e.g. the first layer. */
static unsigned char *grad_flags(const pw_graph *g)
{
    unsigned char *rg = calloc((size_t)g->n_values + 1, 1);
    if (!rg) return NULL;
    for (int i = 0; i < g->n_nodes; i++) {
        const pw_node *nd = &g->nodes[i];
        int r = nd->n_params > 0;
        for (int k = 0; k < nd->n_inputs; k++) r |= rg[nd->inputs[k]];
        rg[nd->output] = (unsigned char)(r && nd->op != PW_OP_SOFTMAX_XENT &&
                                         g->values[nd->output].dtype == PW_F32);
    }
    return rg;
}

static double node_flops_rg(const pw_graph *g, int i, const unsigned char *rg)
{
    pw_op_cost c;
    if (pw_graph_node_cost(g, i, &c) != PW_OK) return 0.0;
    int needs_dx = 1;
    if (rg && g->nodes[i].op != PW_OP_SOFTMAX_XENT) {
        needs_dx = 0;
        for (int k = 0; k < g->nodes[i].n_inputs; k++) needs_dx |= rg[g->nodes[i].inputs[k]];
    }
    return c.flops_fwd + (needs_dx ? c.flops_bwd_input : 0.0) + c.flops_bwd_weight;
}

/* Greedy: can the nodes be cut into at most `stages` ranges each ≤ cap,
 * every range non-empty? Fills begin[] when it can. */
static int fits(const double *w, int n, int stages, double cap, int *begin)
{
    int s = 0;
    double acc = 0.0;
    begin[0] = 0;
    for (int i = 0; i < n; i++) {
        /* Leave at least one node for each remaining stage. */
        int must_cut = n - i == stages - s - 1 + 0 && i > begin[s];
        if ((acc + w[i] > cap && i > begin[s]) || must_cut) {
            if (++s >= stages) return 0;
            begin[s] = i;
            acc = 0.0;
        }
        if (w[i] > cap) return 0;
        acc += w[i];
    }
    /* Fewer ranges than stages: split the largest ranges' tails to fill. */
    while (s + 1 < stages) {
        int best = -1;
        for (int k = 0; k <= s; k++) {
            int end = k == s ? n : begin[k + 1];
            if (end - begin[k] >= 2 && (best < 0 || end - begin[k] > (best == s ? n : begin[best + 1]) - begin[best]))
                best = k;
        }
        if (best < 0) return 0;
        int end = best == s ? n : begin[best + 1];
        memmove(&begin[best + 2], &begin[best + 1], sizeof(int) * (size_t)(s - best));
        begin[best + 1] = end - 1;
        s++;
    }
    begin[stages] = n;
    return 1;
}

static pw_status balanced(const pw_graph *g, int n_stages, int *begin)
{
    int n = g->n_nodes;
    double *w = malloc(sizeof(double) * (size_t)n);
    int *tmp = malloc(sizeof(int) * (size_t)(n_stages + 1));
    if (!w || !tmp) {
        free(w);
        free(tmp);
        return pw_error(PW_ERR_NOMEM, "partition: out of memory");
    }
    double total = 0.0, wmax = 0.0;
    unsigned char *rg = grad_flags(g);
    for (int i = 0; i < n; i++) {
        w[i] = node_flops_rg(g, i, rg);
        total += w[i];
        if (w[i] > wmax) wmax = w[i];
    }
    free(rg);
    /* Bisection on the bottleneck: the greedy check is exact for contiguous
     * ranges of non-negative weights, so this converges on the optimum. */
    double lo = wmax > total / n_stages ? wmax : total / n_stages, hi = total + 1.0;
    if (!fits(w, n, n_stages, hi, begin)) {
        free(w);
        free(tmp);
        return pw_error(PW_ERR_INTERNAL, "partition: no split of %d nodes into %d stages", n,
                        n_stages);
    }
    for (int it = 0; it < 100 && hi - lo > 1e-9 * (hi > 1 ? hi : 1); it++) {
        double mid = 0.5 * (lo + hi);
        if (fits(w, n, n_stages, mid, tmp)) {
            hi = mid;
            memcpy(begin, tmp, sizeof(int) * (size_t)(n_stages + 1));
        } else {
            lo = mid;
        }
    }
    free(w);
    free(tmp);
    return PW_OK;
}

pw_status pw_partition_make(const pw_graph *g, int n_stages, pw_partition_method method,
                            pw_partition *out)
{
    memset(out, 0, sizeof *out);
    if (n_stages < 1)
        return pw_error(PW_ERR_INVALID_ARG, "partition: %d stages (need at least 1)", n_stages);
    if (n_stages > g->n_nodes)
        return pw_error(PW_ERR_INVALID_ARG, "partition: %d stages but graph '%s' has only %d "
                        "nodes", n_stages, g->name, g->n_nodes);
    if (method == PW_PARTITION_AUTO)
        method = g->n_cuts + 1 == n_stages && n_stages > 1 ? PW_PARTITION_CUTS : PW_PARTITION_FLOPS;
    if (method == PW_PARTITION_CUTS && g->n_cuts + 1 != n_stages)
        return pw_error(PW_ERR_INVALID_ARG, "partition: the `cut` markers of %s make %d stage%s, "
                        "not %d", g->file, g->n_cuts + 1, g->n_cuts ? "s" : "", n_stages);
    out->n_stages = n_stages;
    out->method = method;
    out->begin = calloc((size_t)n_stages + 1, sizeof(int));
    out->flops = calloc((size_t)n_stages, sizeof(double));
    if (!out->begin || !out->flops) {
        pw_partition_free(out);
        return pw_error(PW_ERR_NOMEM, "partition: out of memory");
    }
    if (method == PW_PARTITION_CUTS) {
        int s = 0;
        for (int i = 0; i < g->n_nodes; i++)
            if (g->nodes[i].cut_before && i > 0) out->begin[++s] = i;
        out->begin[n_stages] = g->n_nodes;
    } else {
        pw_status st = balanced(g, n_stages, out->begin);
        if (st != PW_OK) {
            pw_partition_free(out);
            return st;
        }
    }
    unsigned char *rg = grad_flags(g);
    for (int s = 0; s < n_stages; s++)
        for (int i = out->begin[s]; i < out->begin[s + 1]; i++) out->flops[s] += node_flops_rg(g, i, rg);
    free(rg);
    return PW_OK;
}

void pw_partition_free(pw_partition *p)
{
    if (!p) return;
    free(p->begin);
    free(p->flops);
    p->begin = NULL;
    p->flops = NULL;
}

pw_status pw_partition_method_parse(const char *s, pw_partition_method *out)
{
    if (!strcmp(s, "auto")) *out = PW_PARTITION_AUTO;
    else if (!strcmp(s, "cuts")) *out = PW_PARTITION_CUTS;
    else if (!strcmp(s, "flops")) *out = PW_PARTITION_FLOPS;
    else return pw_error(PW_ERR_INVALID_ARG, "unknown partition method '%s' (want auto, cuts or flops)", s);
    return PW_OK;
}

const char *pw_partition_method_name(pw_partition_method m)
{
    switch (m) {
    case PW_PARTITION_AUTO: return "auto";
    case PW_PARTITION_CUTS: return "cuts";
    case PW_PARTITION_FLOPS: return "flops";
    }
    return "?";
}
