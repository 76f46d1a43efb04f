/* pipewright — a graph's rank graphs for tensor parallelism (graph.h,
 * pw_graph_tp_rank; docs/parallelism.md, "Tensor parallelism"). */
#include <stdlib.h>
#include <string.h>

#include "graph/graph-internal.h"

/* How a dimension splits: `full` features, in `blocks` equal blocks, each
 * split in whole units of `unit` features. */
typedef struct split {
    int64_t full, unit;
    int blocks;
} split;

static split split_of(int64_t full, int64_t unit, int blocks)
{
    return (split){full, unit > 0 ? unit : 1, blocks > 0 ? blocks : 1};
}

/* Rank k's features [*lo, *hi) within each block (offsets in the block),
 * and the block's length. */
static int64_t part_of(split s, int T, int k, int64_t *lo, int64_t *hi)
{
    const int64_t block = s.full / s.blocks, units = block / s.unit;
    *lo = units * k / T * s.unit;
    *hi = units * (k + 1) / T * s.unit;
    return block;
}

/* Rank k's length of the dimension. */
static int64_t part_len(split s, int T, int k)
{
    int64_t lo, hi;
    part_of(s, T, k, &lo, &hi);
    return s.blocks * (hi - lo);
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

/* A deep copy of g (names included). */
static pw_graph *clone(const pw_graph *g)
{
    pw_graph *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    *r = *g;
    r->name = dup_or_null(g->name);
    r->file = dup_or_null(g->file);
    r->values = calloc((size_t)(g->n_values ? g->n_values : 1), sizeof *r->values);
    r->nodes = calloc((size_t)(g->n_nodes ? g->n_nodes : 1), sizeof *r->nodes);
    r->params = calloc((size_t)(g->n_params ? g->n_params : 1), sizeof *r->params);
    int ok = r->values && r->nodes && r->params && (!g->name || r->name) && (!g->file || r->file);
    if (!r->values || !r->nodes || !r->params) {
        r->n_values = r->n_nodes = r->n_params = 0;
        pw_graph_destroy(r);
        return NULL;
    }
    memcpy(r->values, g->values, (size_t)g->n_values * sizeof *r->values);
    memcpy(r->nodes, g->nodes, (size_t)g->n_nodes * sizeof *r->nodes);
    memcpy(r->params, g->params, (size_t)g->n_params * sizeof *r->params);
    for (int i = 0; i < g->n_values; i++) ok &= (r->values[i].name = dup_or_null(g->values[i].name)) != NULL;
    for (int i = 0; i < g->n_nodes; i++)
        ok &= !g->nodes[i].scope || (r->nodes[i].scope = dup_or_null(g->nodes[i].scope)) != NULL;
    for (int i = 0; i < g->n_params; i++) ok &= (r->params[i].name = dup_or_null(g->params[i].name)) != NULL;
    if (!ok) {
        pw_graph_destroy(r);
        return NULL;
    }
    return r;
}

int pw_graph_tp_marked(const pw_graph *g)
{
    for (int i = 0; i < g->n_nodes; i++)
        if (g->nodes[i].attrs.tp != PW_TP_NONE) return 1;
    return 0;
}

/* "file:line: linear 'mlp.c_proj'" for messages. */
static const char *where(const pw_graph *g, const pw_node *nd, char *buf, size_t n)
{
    snprintf(buf, n, "%s:%d: %s '%s'", g->file ? g->file : "graph", nd->line, pw_op_name(nd->op),
             nd->scope && nd->scope[0] ? nd->scope : g->values[nd->output].name);
    return buf;
}

/* Parameter p of rank graph r split along `dim` as `sp`, or whole
 * (sp.full = 0); the first user decides, the others must agree. */
static pw_status split_param(pw_graph *r, const pw_node *nd, int p, int dim, split sp, unsigned char *seen)
{
    pw_param *pp = &r->params[p];
    const int64_t full = sp.full;
    char w[256];
    if (seen[p]) {
        const split had = split_of(pp->tp_full, pp->tp_unit, pp->tp_blocks);
        if (pp->tp_full != full ||
            (full && (pp->tp_dim != dim || had.unit != sp.unit || had.blocks != sp.blocks)))
            return pw_error(PW_ERR_SHAPE,
                            "%s: parameter '%s' is tied to an op that splits it differently for tensor "
                            "parallelism (%s here, %s there)",
                            where(r, nd, w, sizeof w), pp->name, full ? (dim ? "columns" : "rows") : "whole",
                            pp->tp_full ? (pp->tp_dim ? "columns" : "rows") : "whole");
        return PW_OK;
    }
    seen[p] = 1;
    if (!full) return PW_OK;
    pp->tp_dim = dim;
    pp->tp_full = full;
    pp->tp_unit = sp.unit;
    pp->tp_blocks = sp.blocks;
    pp->shape.d[dim] = part_len(sp, r->tp_size, r->tp_rank);
    return PW_OK;
}

pw_status pw_graph_tp_rank(const pw_graph *g, int T, int k, pw_graph **out)
{
    *out = NULL;
    if (T < 1 || k < 0 || k >= T)
        return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism: rank %d of %d ranks (T >= 1, 0 <= rank < T)", k, T);
    if (g->tp_size > 1) return pw_error(PW_ERR_INVALID_ARG, "tensor parallelism: '%s' is already a rank graph", g->name);
    pw_graph *r = clone(g);
    unsigned char *seen = calloc((size_t)(g->n_params ? g->n_params : 1), 1);
    if (!r || !seen) {
        pw_graph_destroy(r);
        free(seen);
        return pw_error(PW_ERR_NOMEM, "tensor parallelism: out of memory copying '%s'", g->name);
    }
    r->tp_rank = k;
    r->tp_size = T;
    pw_status st = PW_OK;
    char w[256];
    const split whole = {0, 1, 1};
    for (int i = 0; i < r->n_nodes && st == PW_OK; i++) {
        pw_node *nd = &r->nodes[i];
        pw_value *y = &r->values[nd->output];
        const pw_value *x = nd->n_inputs ? &r->values[nd->inputs[0]] : NULL;
        int split_in = -1; /* the input that is split, if any */
        for (int j = 0; j < nd->n_inputs; j++)
            if (r->values[nd->inputs[j]].tp_full) split_in = j;
        const char *split_name = split_in >= 0 ? r->values[nd->inputs[split_in]].name : "";
        const split xs = x ? split_of(x->tp_full, x->tp_unit, x->tp_blocks) : whole;
        switch (nd->op) {
        case PW_OP_LINEAR:
            if (nd->attrs.tp == PW_TP_COLUMN) {
                if (split_in >= 0) {
                    st = pw_error(PW_ERR_SHAPE, "%s is tp=column but its input '%s' is already split across "
                                  "tensor-parallel ranks (a tp=row linear must join it first)",
                                  where(r, nd, w, sizeof w), split_name);
                    break;
                }
                if (x->n_consumers > 1) {
                    st = pw_error(PW_ERR_SHAPE, "%s is tp=column but its input '%s' has %d consumers: a "
                                  "column-parallel linear's input gradient is summed across ranks, so its input "
                                  "must feed it alone",
                                  where(r, nd, w, sizeof w), x->name, x->n_consumers);
                    break;
                }
                /* Feeding attention alone (c_attn): whole heads of q, k and v. */
                split ys = split_of(nd->attrs.out, 1, 1);
                const pw_node *att = NULL;
                for (int j = i + 1; j < r->n_nodes && y->n_consumers == 1; j++)
                    if (r->nodes[j].n_inputs && r->nodes[j].inputs[0] == nd->output) {
                        if (r->nodes[j].op == PW_OP_CAUSAL_ATTENTION) att = &r->nodes[j];
                        break;
                    }
                if (att) {
                    const int64_t H = att->attrs.heads, D = nd->attrs.out / 3;
                    if (H < T) {
                        st = pw_error(PW_ERR_SHAPE, "%s feeds causal_attention with %lld heads, fewer than the %d "
                                      "tensor-parallel ranks (attention splits by whole heads)",
                                      where(r, nd, w, sizeof w), (long long)H, T);
                        break;
                    }
                    ys = split_of(nd->attrs.out, D / H, 3);
                }
                nd->attrs.out = part_len(ys, T, k);
                y->shape.d[y->shape.ndim - 1] = nd->attrs.out;
                y->tp_full = ys.full, y->tp_unit = ys.unit, y->tp_blocks = ys.blocks;
                for (int p = 0; p < nd->n_params && st == PW_OK; p++)
                    st = split_param(r, nd, nd->params[p], 0, ys, seen);
            } else if (nd->attrs.tp == PW_TP_ROW) {
                if (split_in < 0) {
                    st = pw_error(PW_ERR_SHAPE, "%s is tp=row but its input '%s' is whole (a tp=column linear "
                                  "before it must split it)", where(r, nd, w, sizeof w), x->name);
                    break;
                }
                if (xs.blocks != 1) {
                    st = pw_error(PW_ERR_SHAPE, "%s is tp=row but its input '%s' is split as q, k and v "
                                  "(causal_attention must come between)", where(r, nd, w, sizeof w), x->name);
                    break;
                }
                st = split_param(r, nd, nd->params[0], 1, xs, seen);
                for (int p = 1; p < nd->n_params && st == PW_OK; p++)
                    st = split_param(r, nd, nd->params[p], 0, whole, seen);
            } else if (split_in >= 0) {
                st = pw_error(PW_ERR_SHAPE, "%s reads '%s', which is split across tensor-parallel ranks: mark "
                              "it tp=row to sum the parts", where(r, nd, w, sizeof w), split_name);
            } else {
                for (int p = 0; p < nd->n_params && st == PW_OK; p++)
                    st = split_param(r, nd, nd->params[p], 0, whole, seen);
            }
            break;
        case PW_OP_EMBEDDING:
            st = split_param(r, nd, nd->params[0], 0,
                             nd->attrs.tp == PW_TP_VOCAB ? split_of(nd->attrs.vocab, 1, 1) : whole, seen);
            break;
        case PW_OP_RELU:
        case PW_OP_GELU:
        case PW_OP_DROPOUT:
            if (split_in >= 0 && nd->op == PW_OP_DROPOUT && nd->attrs.p > 0.0f) {
                st = pw_error(PW_ERR_SHAPE, "%s (p = %g) reads '%s', which is split across tensor-parallel "
                              "ranks: a split dropout's masks are not built", where(r, nd, w, sizeof w),
                              (double)nd->attrs.p, split_name);
                break;
            }
            if (split_in >= 0) {
                y->shape.d[y->shape.ndim - 1] = x->shape.d[x->shape.ndim - 1];
                y->tp_full = x->tp_full, y->tp_unit = x->tp_unit, y->tp_blocks = x->tp_blocks;
            }
            break;
        case PW_OP_CAUSAL_ATTENTION:
            if (split_in >= 0) { /* by heads: this rank's q, k, v heads (see above) */
                const int64_t H = nd->attrs.heads, D = xs.full / 3;
                if (xs.blocks != 3 || xs.unit != D / H) {
                    st = pw_error(PW_ERR_SHAPE, "%s reads '%s', which is split but not by its heads (a tp=column "
                                  "linear feeding it alone splits by heads)", where(r, nd, w, sizeof w), split_name);
                    break;
                }
                const int64_t d_k = part_len(split_of(D, xs.unit, 1), T, k);
                nd->attrs.heads = d_k / xs.unit;
                y->shape.d[y->shape.ndim - 1] = d_k;
                y->tp_full = D, y->tp_unit = xs.unit, y->tp_blocks = 1;
            }
            break;
        case PW_OP_SOFTMAX_XENT: /* vocabulary-parallel when its logits are split */
            if (split_in == 0 && (xs.blocks != 1 || xs.unit != 1))
                st = pw_error(PW_ERR_SHAPE, "%s reads '%s', which is split by heads, not by classes",
                              where(r, nd, w, sizeof w), split_name);
            break;
        default:
            if (split_in >= 0)
                st = pw_error(PW_ERR_SHAPE, "%s reads '%s', which is split across tensor-parallel ranks: only "
                              "relu, gelu, dropout (p = 0), causal_attention (by heads), a tp=row linear and "
                              "softmax_cross_entropy take a split value", where(r, nd, w, sizeof w), split_name);
            for (int p = 0; p < nd->n_params && st == PW_OK; p++)
                st = split_param(r, nd, nd->params[p], 0, whole, seen);
            break;
        }
    }
    free(seen);
    if (st != PW_OK) {
        pw_graph_destroy(r);
        return st;
    }
    *out = r;
    return PW_OK;
}

void pw_graph_tp_slice(const pw_graph *r, int param, float *full, float *part, int to_part)
{
    const pw_param *pp = &r->params[param];
    const int64_t numel = pw_shape_numel(&pp->shape);
    if (!pp->tp_full) {
        if (to_part) memcpy(part, full, (size_t)numel * sizeof(float));
        else memcpy(full, part, (size_t)numel * sizeof(float));
        return;
    }
    const split sp = split_of(pp->tp_full, pp->tp_unit, pp->tp_blocks);
    int64_t lo, hi;
    const int64_t block = part_of(sp, r->tp_size, r->tp_rank, &lo, &hi);
    /* The split dim: `outer` runs of it (dims before), each of its length
     * times `inner` floats (dims after); in each run, each block's
     * [lo, hi) is rank r's. */
    int64_t inner = 1, outer = 1;
    for (int d = pp->tp_dim + 1; d < pp->shape.ndim; d++) inner *= pp->shape.d[d];
    for (int d = 0; d < pp->tp_dim; d++) outer *= pp->shape.d[d];
    const int64_t fullrun = sp.full * inner, partrun = pp->shape.d[pp->tp_dim] * inner;
    const int64_t n = (hi - lo) * inner;
    for (int64_t o = 0; o < outer; o++)
        for (int b = 0; b < sp.blocks; b++) {
            float *f = full + o * fullrun + (b * block + lo) * inner;
            float *q = part + o * partrun + b * (hi - lo) * inner;
            if (to_part) memcpy(q, f, (size_t)n * sizeof(float));
            else memcpy(f, q, (size_t)n * sizeof(float));
        }
}
