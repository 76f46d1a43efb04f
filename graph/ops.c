/* pipewright — the op table of graph format v1: names, arguments,
 * attributes (kinds, defaults, ranges), shape/dtype inference, the parameters
 * each op creates, and the per-sample cost model.
 *
 * Adding an op: a pw_op_kind in graph.h, a row in op_table, its attributes
 * in pw_op_default_attrs and pw_op_set_attr, a case in pw_op_infer,
 * pw_op_params (if it owns parameters) and pw_graph_node_cost — then the
 * program, kernels, tests and docs listed in docs/building.md, "Adding an
 * op".
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "graph/graph-internal.h"

static const pw_op_spec op_table[PW_OP_COUNT] = {
    [PW_OP_LINEAR] = {
        .op = PW_OP_LINEAR, .name = "linear", .n_inputs = 1, .inputs = {"x"},
        .n_attrs = 4,
        .attrs = {{"out", PW_ATTR_INT, 1}, {"bias", PW_ATTR_BOOL, 0},
                  {"weight", PW_ATTR_NAME, 0}, {"tp", PW_ATTR_NAME, 0}},
    },
    [PW_OP_RELU] = {.op = PW_OP_RELU, .name = "relu", .n_inputs = 1, .inputs = {"x"}},
    [PW_OP_GELU] = {.op = PW_OP_GELU, .name = "gelu", .n_inputs = 1, .inputs = {"x"}},
    [PW_OP_LAYERNORM] = {
        .op = PW_OP_LAYERNORM, .name = "layernorm", .n_inputs = 1, .inputs = {"x"},
        .n_attrs = 1, .attrs = {{"eps", PW_ATTR_FLOAT, 0}},
    },
    [PW_OP_ADD] = {.op = PW_OP_ADD, .name = "add", .n_inputs = 2, .inputs = {"a", "b"}},
    [PW_OP_FLATTEN] = {.op = PW_OP_FLATTEN, .name = "flatten", .n_inputs = 1, .inputs = {"x"}},
    [PW_OP_RESHAPE] = {
        .op = PW_OP_RESHAPE, .name = "reshape", .n_inputs = 1, .inputs = {"x"},
        .n_attrs = 1, .attrs = {{"shape", PW_ATTR_INTS, 1}},
    },
    [PW_OP_SOFTMAX_XENT] = {
        .op = PW_OP_SOFTMAX_XENT, .name = "softmax_cross_entropy", .n_inputs = 2,
        .inputs = {"logits", "labels"}, .is_loss = 1,
    },
    [PW_OP_EMBEDDING] = {
        .op = PW_OP_EMBEDDING, .name = "embedding", .n_inputs = 1, .inputs = {"tokens"},
        .n_attrs = 4,
        .attrs = {{"vocab", PW_ATTR_INT, 1}, {"dim", PW_ATTR_INT, 1},
                  {"weight", PW_ATTR_NAME, 0}, {"tp", PW_ATTR_NAME, 0}},
    },
    [PW_OP_POS_EMBEDDING] = {
        .op = PW_OP_POS_EMBEDDING, .name = "pos_embedding", .n_inputs = 1, .inputs = {"x"},
        .n_attrs = 1, .attrs = {{"max", PW_ATTR_INT, 0}},
    },
    [PW_OP_CAUSAL_ATTENTION] = {
        .op = PW_OP_CAUSAL_ATTENTION, .name = "causal_attention", .n_inputs = 1,
        .inputs = {"qkv"}, .n_attrs = 1, .attrs = {{"heads", PW_ATTR_INT, 1}},
    },
    [PW_OP_DROPOUT] = {
        .op = PW_OP_DROPOUT, .name = "dropout", .n_inputs = 1, .inputs = {"x"},
        .n_attrs = 1, .attrs = {{"p", PW_ATTR_FLOAT, 0}},
    },
};

const char *pw_op_name(pw_op_kind op)
{
    if ((unsigned)op >= PW_OP_COUNT) return "?";
    return op_table[op].name;
}

const pw_op_spec *pw_op_spec_get(pw_op_kind op)
{
    if ((unsigned)op >= PW_OP_COUNT) return NULL;
    return &op_table[op];
}

const pw_op_spec *pw_op_find(const char *name)
{
    for (int i = 0; i < PW_OP_COUNT; i++)
        if (strcmp(op_table[i].name, name) == 0) return &op_table[i];
    return NULL;
}

const char *pw_op_suggest(const char *name)
{
    const char *best = NULL;
    int best_d = 3;
    for (int i = 0; i < PW_OP_COUNT; i++) {
        int d = pw_edit_distance(name, op_table[i].name, 2);
        if (d < best_d) {
            best_d = d;
            best = op_table[i].name;
        }
    }
    return best;
}

const pw_attr_spec *pw_op_attr_find(const pw_op_spec *spec, const char *key)
{
    for (int i = 0; i < spec->n_attrs; i++)
        if (strcmp(spec->attrs[i].key, key) == 0) return &spec->attrs[i];
    return NULL;
}

const char *pw_attr_kind_name(pw_attr_kind kind)
{
    switch (kind) {
    case PW_ATTR_INT: return "an integer";
    case PW_ATTR_FLOAT: return "a number";
    case PW_ATTR_BOOL: return "true or false";
    case PW_ATTR_NAME: return "a name";
    case PW_ATTR_INTS: return "a list of integers";
    }
    return "?";
}

void pw_op_default_attrs(pw_op_kind op, pw_node_attrs *attrs)
{
    memset(attrs, 0, sizeof *attrs);
    if (op == PW_OP_LINEAR) attrs->bias = 1;
    if (op == PW_OP_LAYERNORM) attrs->eps = 1e-5f;
    if (op == PW_OP_DROPOUT) attrs->p = 0.1f;
}

/* An integer attribute in [lo, hi], stored into *dst. */
static pw_status int_in_range(const pw_op_spec *spec, const pw_attr_spec *a,
                              const pw_attr_value *v, int64_t lo, int64_t hi, const char *hi_text,
                              int64_t *dst, char *msg, size_t n)
{
    if (v->i < lo || v->i > hi) {
        snprintf(msg, n, "%s: '%s' must be between %lld and %s, got %lld", spec->name, a->key,
                 (long long)lo, hi_text, (long long)v->i);
        return PW_ERR_SHAPE;
    }
    *dst = v->i;
    return PW_OK;
}

pw_status pw_op_set_attr(const pw_op_spec *spec, const pw_attr_spec *a,
                         const pw_attr_value *v, pw_node_attrs *attrs, char *msg, size_t n)
{
    int kind_ok = v->kind == a->kind || (a->kind == PW_ATTR_FLOAT && v->kind == PW_ATTR_INT);
    if (!kind_ok) {
        snprintf(msg, n, "%s: attribute '%s' must be %s, got %s", spec->name, a->key,
                 pw_attr_kind_name(a->kind), pw_attr_kind_name(v->kind));
        return PW_ERR_PARSE;
    }
    if (spec->op == PW_OP_LINEAR && strcmp(a->key, "out") == 0) {
        if (v->i <= 0 || v->i > PW_GRAPH_MAX_NUMEL) {
            snprintf(msg, n, "linear: 'out' must be between 1 and 2^40, got %lld",
                     (long long)v->i);
            return PW_ERR_SHAPE;
        }
        attrs->out = v->i;
    } else if (spec->op == PW_OP_LINEAR && strcmp(a->key, "bias") == 0) {
        attrs->bias = v->b;
    } else if (strcmp(a->key, "tp") == 0) {
        /* tensor parallelism: linear column|row, embedding vocab */
        const int lin = spec->op == PW_OP_LINEAR;
        if (lin && strcmp(v->s, "column") == 0) attrs->tp = PW_TP_COLUMN;
        else if (lin && strcmp(v->s, "row") == 0) attrs->tp = PW_TP_ROW;
        else if (!lin && strcmp(v->s, "vocab") == 0) attrs->tp = PW_TP_VOCAB;
        else {
            snprintf(msg, n, "%s: 'tp' must be %s, got '%s'", spec->name, lin ? "column or row" : "vocab", v->s);
            return PW_ERR_PARSE;
        }
    } else if (spec->op == PW_OP_LAYERNORM && strcmp(a->key, "eps") == 0) {
        double f = v->kind == PW_ATTR_INT ? (double)v->i : v->f;
        float ff = (float)f;
        if (!(f > 0) || !isfinite(ff) || ff <= 0.0f) {
            snprintf(msg, n, "layernorm: 'eps' must be a positive f32 number, got %g", f);
            return PW_ERR_PARSE;
        }
        attrs->eps = ff;
    } else if (spec->op == PW_OP_RESHAPE && strcmp(a->key, "shape") == 0) {
        int infer = 0;
        if (v->n > PW_MAX_DIMS) {
            snprintf(msg, n, "reshape: too many dimensions (%d; the limit is %d)", v->n,
                     PW_MAX_DIMS);
            return PW_ERR_SHAPE;
        }
        for (int i = 0; i < v->n; i++) {
            if (v->list[i] == -1 && !infer) {
                infer = 1;
            } else if (v->list[i] == -1) {
                snprintf(msg, n, "reshape: at most one dimension may be -1");
                return PW_ERR_SHAPE;
            } else if (v->list[i] <= 0 || v->list[i] > PW_GRAPH_MAX_NUMEL) {
                snprintf(msg, n, "reshape: dimension %d must be positive (or -1), got %lld",
                         i, (long long)v->list[i]);
                return PW_ERR_SHAPE;
            }
        }
        attrs->shape = pw_shape_make(v->n, v->list);
    } else if (spec->op == PW_OP_EMBEDDING && strcmp(a->key, "vocab") == 0) {
        /* token ids are i32 */
        return int_in_range(spec, a, v, 1, INT32_MAX, "2^31 - 1", &attrs->vocab, msg, n);
    } else if (spec->op == PW_OP_EMBEDDING && strcmp(a->key, "dim") == 0) {
        return int_in_range(spec, a, v, 1, PW_GRAPH_MAX_NUMEL, "2^40", &attrs->dim, msg, n);
    } else if (spec->op == PW_OP_POS_EMBEDDING && strcmp(a->key, "max") == 0) {
        return int_in_range(spec, a, v, 1, PW_GRAPH_MAX_NUMEL, "2^40", &attrs->max_len, msg, n);
    } else if (spec->op == PW_OP_CAUSAL_ATTENTION && strcmp(a->key, "heads") == 0) {
        return int_in_range(spec, a, v, 1, PW_GRAPH_MAX_NUMEL, "2^40", &attrs->heads, msg, n);
    } else if (spec->op == PW_OP_DROPOUT && strcmp(a->key, "p") == 0) {
        double f = v->kind == PW_ATTR_INT ? (double)v->i : v->f;
        if (!(f >= 0.0 && f < 1.0)) {
            snprintf(msg, n, "dropout: 'p' must be in [0, 1), got %g", f);
            return PW_ERR_PARSE;
        }
        attrs->p = (float)f;
        if (attrs->p >= 1.0f) attrs->p = nextafterf(1.0f, 0.0f); /* 0.99999999 rounds up */
    }
    /* `weight` (linear, embedding) is a name the lowering pass resolves (tied parameter). */
    return PW_OK;
}

/* ------------------------------------------------------------------ inference */

static const char *shp(const pw_shape *s, char *buf, size_t n) { return pw_shape_str(s, buf, n); }

static pw_status fail(pw_infer *c, int blame, const char *attr, pw_status st, const char *fmt,
                      ...) __attribute__((format(printf, 5, 6)));
static pw_status fail(pw_infer *c, int blame, const char *attr, pw_status st, const char *fmt,
                      ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, sizeof c->msg, fmt, ap);
    va_end(ap);
    c->blame = blame;
    c->blame_attr = attr;
    return st;
}

static pw_status need_f32(pw_infer *c, const char *op, int k)
{
    if (c->in[k]->dtype != PW_F32)
        return fail(c, k, NULL, PW_ERR_SHAPE, "%s: expects f32 input, got %s", op,
                    pw_dtype_name(c->in[k]->dtype));
    return PW_OK;
}

static pw_status need_rank1(pw_infer *c, const char *op, int k)
{
    if (c->in[k]->shape.ndim < 1)
        return fail(c, k, NULL, PW_ERR_SHAPE,
                    "%s: input must have at least 1 dimension, got []", op);
    return PW_OK;
}

pw_status pw_op_infer(pw_op_kind op, pw_infer *c)
{
    char b1[128], b2[128], b3[128];
    const pw_value *x = c->in[0];
    int64_t numel = 1, tmp;

    c->blame = -1;
    c->blame_attr = NULL;
    c->msg[0] = '\0';
    c->dtype = x->dtype;
    c->shape = x->shape;
    for (int i = 0; i < x->shape.ndim; i++) numel *= x->shape.d[i]; /* ≤ 2^40 by invariant */

    switch (op) {
    case PW_OP_LINEAR: {
        PW_CHECK(need_f32(c, "linear", 0));
        PW_CHECK(need_rank1(c, "linear", 0));
        int64_t in = x->shape.d[x->shape.ndim - 1];
        if (pw_graph_mul_checked(numel / in, c->attrs.out, &tmp) != 0)
            return fail(c, -1, "out", PW_ERR_SHAPE,
                        "linear: output would have more than 2^40 elements");
        if (pw_graph_mul_checked(in, c->attrs.out, &tmp) != 0)
            return fail(c, -1, "out", PW_ERR_SHAPE,
                        "linear: weight [%lld, %lld] would have more than 2^40 elements",
                        (long long)c->attrs.out, (long long)in);
        c->shape.d[c->shape.ndim - 1] = c->attrs.out;
        return PW_OK;
    }
    case PW_OP_RELU:
        return need_f32(c, "relu", 0);
    case PW_OP_GELU:
        return need_f32(c, "gelu", 0);
    case PW_OP_LAYERNORM:
        PW_CHECK(need_f32(c, "layernorm", 0));
        return need_rank1(c, "layernorm", 0);
    case PW_OP_ADD:
        PW_CHECK(need_f32(c, "add", 0));
        PW_CHECK(need_f32(c, "add", 1));
        if (!pw_shape_equal(&c->in[0]->shape, &c->in[1]->shape))
            return fail(c, -1, NULL, PW_ERR_SHAPE, "add: shapes %s and %s differ",
                        shp(&c->in[0]->shape, b1, sizeof b1),
                        shp(&c->in[1]->shape, b2, sizeof b2));
        return PW_OK;
    case PW_OP_FLATTEN:
        c->shape = pw_shape_make(1, &numel);
        return PW_OK;
    case PW_OP_RESHAPE: {
        pw_shape *t = &c->attrs.shape;
        int64_t known = 1;
        int infer = -1;
        for (int i = 0; i < t->ndim; i++) {
            if (t->d[i] == -1) {
                infer = i;
            } else if (pw_graph_mul_checked(known, t->d[i], &known) != 0) {
                known = -1; /* larger than any value: cannot match */
                break;
            }
        }
        if (known > 0 && infer >= 0 && numel % known == 0) t->d[infer] = numel / known;
        if (known <= 0 || (infer >= 0 && numel % known != 0) ||
            (infer < 0 && known != numel))
            return fail(c, -1, "shape", PW_ERR_SHAPE,
                        "reshape: cannot reshape %s (%lld elements) into %s",
                        shp(&x->shape, b1, sizeof b1), (long long)numel,
                        shp(t, b2, sizeof b2));
        c->shape = *t;
        return PW_OK;
    }
    case PW_OP_SOFTMAX_XENT: {
        const pw_value *lab = c->in[1];
        PW_CHECK(need_f32(c, "softmax_cross_entropy", 0));
        PW_CHECK(need_rank1(c, "softmax_cross_entropy", 0));
        if (lab->dtype != PW_I32)
            return fail(c, 1, NULL, PW_ERR_SHAPE,
                        "softmax_cross_entropy: labels must be i32, got %s",
                        pw_dtype_name(lab->dtype));
        pw_shape lead = x->shape;
        lead.ndim--;
        lead.d[lead.ndim] = 0;
        if (!pw_shape_equal(&lead, &lab->shape))
            return fail(c, 1, NULL, PW_ERR_SHAPE,
                        "softmax_cross_entropy: labels shape %s does not match logits %s "
                        "(expected %s)",
                        shp(&lab->shape, b1, sizeof b1), shp(&x->shape, b2, sizeof b2),
                        shp(&lead, b3, sizeof b3));
        c->dtype = PW_F32;
        c->shape = pw_shape_make(0, NULL);
        return PW_OK;
    }
    case PW_OP_EMBEDDING: {
        if (x->dtype != PW_I32)
            return fail(c, 0, NULL, PW_ERR_SHAPE, "embedding: tokens must be i32, got %s",
                        pw_dtype_name(x->dtype));
        if (x->shape.ndim >= PW_MAX_DIMS)
            return fail(c, 0, NULL, PW_ERR_SHAPE,
                        "embedding: tokens %s have too many dimensions (the output adds one; "
                        "the limit is %d)", shp(&x->shape, b1, sizeof b1), PW_MAX_DIMS);
        if (pw_graph_mul_checked(numel, c->attrs.dim, &tmp) != 0)
            return fail(c, -1, "dim", PW_ERR_SHAPE,
                        "embedding: output would have more than 2^40 elements");
        if (pw_graph_mul_checked(c->attrs.vocab, c->attrs.dim, &tmp) != 0)
            return fail(c, -1, "vocab", PW_ERR_SHAPE,
                        "embedding: weight [%lld, %lld] would have more than 2^40 elements",
                        (long long)c->attrs.vocab, (long long)c->attrs.dim);
        c->dtype = PW_F32;
        c->shape.d[c->shape.ndim++] = c->attrs.dim;
        return PW_OK;
    }
    case PW_OP_POS_EMBEDDING: {
        PW_CHECK(need_f32(c, "pos_embedding", 0));
        if (x->shape.ndim != 2)
            return fail(c, 0, NULL, PW_ERR_SHAPE,
                        "pos_embedding: input must be [T, D] (positions, width), got %s",
                        shp(&x->shape, b1, sizeof b1));
        if (c->attrs.max_len == 0) c->attrs.max_len = x->shape.d[0];
        if (x->shape.d[0] > c->attrs.max_len)
            return fail(c, -1, "max", PW_ERR_SHAPE,
                        "pos_embedding: %lld positions do not fit a table of max=%lld",
                        (long long)x->shape.d[0], (long long)c->attrs.max_len);
        if (pw_graph_mul_checked(c->attrs.max_len, x->shape.d[1], &tmp) != 0)
            return fail(c, -1, "max", PW_ERR_SHAPE,
                        "pos_embedding: weight [%lld, %lld] would have more than 2^40 elements",
                        (long long)c->attrs.max_len, (long long)x->shape.d[1]);
        return PW_OK;
    }
    case PW_OP_CAUSAL_ATTENTION: {
        PW_CHECK(need_f32(c, "causal_attention", 0));
        if (x->shape.ndim != 2)
            return fail(c, 0, NULL, PW_ERR_SHAPE,
                        "causal_attention: input must be [T, 3·D] (q, k, v side by side), got %s",
                        shp(&x->shape, b1, sizeof b1));
        int64_t w = x->shape.d[1], H = c->attrs.heads;
        if (w % 3 != 0)
            return fail(c, 0, NULL, PW_ERR_SHAPE,
                        "causal_attention: last dimension %lld is not 3·D (q, k, v side by side)",
                        (long long)w);
        if ((w / 3) % H != 0)
            return fail(c, -1, "heads", PW_ERR_SHAPE,
                        "causal_attention: width D = %lld is not a multiple of heads = %lld",
                        (long long)(w / 3), (long long)H);
        int64_t T = x->shape.d[0];
        if (pw_graph_mul_checked(T, T, &tmp) != 0 || pw_graph_mul_checked(tmp, H, &tmp) != 0)
            return fail(c, 0, NULL, PW_ERR_SHAPE,
                        "causal_attention: heads × T × T attention weights would have more than "
                        "2^40 elements");
        c->shape.d[1] = w / 3;
        return PW_OK;
    }
    case PW_OP_DROPOUT:
        return need_f32(c, "dropout", 0);
    case PW_OP_COUNT:
        break;
    }
    return fail(c, -1, NULL, PW_ERR_INTERNAL, "unknown op kind %d", (int)op);
}

/* ------------------------------------------------------------------ parameters */

int pw_op_params(pw_op_kind op, const pw_node_attrs *attrs, const pw_value *const *in,
                 pw_param_tmpl out[PW_MAX_OP_PARAMS])
{
    const pw_shape *xs = &in[0]->shape;
    int64_t last = xs->ndim > 0 ? xs->d[xs->ndim - 1] : 1;
    memset(out, 0, sizeof(pw_param_tmpl) * PW_MAX_OP_PARAMS);

    switch (op) {
    case PW_OP_LINEAR: {
        /* PyTorch's nn.Linear default: U(-1/√in, 1/√in) for weight and bias. */
        int64_t wd[2] = {attrs->out, last};
        float scale = (float)(1.0 / sqrt((double)last));
        out[0] = (pw_param_tmpl){"weight", pw_shape_make(2, wd), PW_INIT_UNIFORM, scale, 1,
                                 "weight"};
        if (!attrs->bias) return 1;
        out[1] = (pw_param_tmpl){"bias", pw_shape_make(1, &attrs->out), PW_INIT_UNIFORM,
                                 scale, 0, NULL};
        return 2;
    }
    case PW_OP_LAYERNORM:
        out[0] = (pw_param_tmpl){"weight", pw_shape_make(1, &last), PW_INIT_ONES, 0, 0, NULL};
        out[1] = (pw_param_tmpl){"bias", pw_shape_make(1, &last), PW_INIT_ZEROS, 0, 0, NULL};
        return 2;
    case PW_OP_EMBEDDING: {
        /* nn.Embedding's layout (vocab, dim), so an output projection
         * linear(h, out=vocab, weight=SCOPE.weight) ties to it as is.
         * N(0, 0.02²) as GPT-2 (nn.Embedding's own default is N(0, 1)). */
        int64_t wd[2] = {attrs->vocab, attrs->dim};
        out[0] = (pw_param_tmpl){"weight", pw_shape_make(2, wd), PW_INIT_NORMAL, 0.02f, 1,
                                 "weight"};
        return 1;
    }
    case PW_OP_POS_EMBEDDING: {
        /* GPT-2's wpe: (positions, width), N(0, 0.01²). */
        int64_t wd[2] = {attrs->max_len, last};
        out[0] = (pw_param_tmpl){"weight", pw_shape_make(2, wd), PW_INIT_NORMAL, 0.01f, 1, NULL};
        return 1;
    }
    default:
        return 0;
    }
}

/* ------------------------------------------------------------------ costs */

static int64_t value_bytes(const pw_value *v)
{
    return pw_shape_numel(&v->shape) * (int64_t)pw_dtype_size(v->dtype);
}

pw_status pw_graph_node_cost(const pw_graph *g, int node, pw_op_cost *c)
{
    if (!g || !c || node < 0 || node >= g->n_nodes)
        return pw_error(PW_ERR_INVALID_ARG, "pw_graph_node_cost: node %d out of range", node);
    const pw_node *nd = &g->nodes[node];
    const pw_value *x = &g->values[nd->inputs[0]];
    const pw_value *y = &g->values[nd->output];
    double n = (double)pw_shape_numel(&x->shape);
    int64_t last = x->shape.ndim > 0 ? x->shape.d[x->shape.ndim - 1] : 1;
    double rows = n / (double)last;

    memset(c, 0, sizeof *c);
    c->out_bytes = value_bytes(y);
    c->act_bytes = c->out_bytes;
    for (int i = 0; i < nd->n_params; i++) {
        const pw_param *p = &g->params[nd->params[i]];
        if (p->owner == node) c->param_bytes += pw_shape_numel(&p->shape) * 4;
    }

    switch (nd->op) {
    case PW_OP_LINEAR: {
        double mm = 2.0 * rows * (double)last * (double)nd->attrs.out;
        double b = nd->attrs.bias ? rows * (double)nd->attrs.out : 0.0;
        c->flops_fwd = mm + b;
        c->flops_bwd_input = mm;
        c->flops_bwd_weight = mm + b;
        break;
    }
    case PW_OP_RELU:
        c->flops_fwd = n;
        c->flops_bwd_input = n;
        break;
    case PW_OP_GELU:
        c->flops_fwd = 8 * n;
        c->flops_bwd_input = 12 * n;
        break;
    case PW_OP_LAYERNORM:
        c->flops_fwd = 8 * n;
        c->flops_bwd_input = 10 * n;
        c->flops_bwd_weight = 4 * n;
        c->act_bytes += (int64_t)(2 * rows) * 4; /* mean and rstd per row */
        break;
    case PW_OP_ADD:
        c->flops_fwd = n; /* the gradient passes through unchanged: backward 0 */
        break;
    case PW_OP_FLATTEN:
    case PW_OP_RESHAPE:
        c->act_bytes = 0; /* a view of the input: nothing new to keep */
        break;
    case PW_OP_SOFTMAX_XENT:
        c->flops_fwd = 5 * n;
        c->flops_bwd_input = 3 * n;
        c->act_bytes += (int64_t)n * 4; /* the softmax probabilities */
        break;
    case PW_OP_EMBEDDING: {
        /* a gather forward; the backward adds each output row into its
         * token's row of the table (no gradient flows to the tokens) */
        double rows_out = (double)pw_shape_numel(&y->shape);
        c->flops_bwd_weight = rows_out;
        break;
    }
    case PW_OP_POS_EMBEDDING:
        c->flops_fwd = n;
        c->flops_bwd_input = 0; /* the gradient passes through unchanged */
        c->flops_bwd_weight = n; /* no statistics: the backward reads only dy */
        break;
    case PW_OP_CAUSAL_ATTENTION: {
        /* What the CPU kernel does per head (stages/ops/cpu/ops.c): S = Q·Kᵀ and
         * O = P·V as GEMMs over blocks of PW_ATTENTION_BLOCK rows, each block
         * over the columns up to its last row (the blocks above the diagonal
         * are skipped; the masked part of a diagonal block is computed and
         * discarded), softmax over the causal part; backward dP = dO·Vᵀ and
         * dQ = dS·K by the same row blocks, dK = dSᵀ·Q and dV = Pᵀ·dO by the
         * mirrored column blocks. `cells` counts the (row, column) pairs the
         * blocks cover; with D = heads × head_dim each GEMM is 2·cells·D
         * FLOPs over all heads. */
        const int64_t Ti = x->shape.d[0], Bk = PW_ATTENTION_BLOCK;
        /* Σ over blocks of rows × (r0 + rows) in closed form, so the cost
         * model stays O(1) per node: k full blocks give Bk² · k(k+1)/2, the
         * partial one r · (k·Bk + r). Exact: T ≤ 2^20, so every term is an
         * integer below 2^53. */
        const int64_t k = Ti / Bk, r = Ti % Bk;
        double cells = (double)(Bk * Bk) * (double)(k * (k + 1) / 2) + (double)(r * (k * Bk + r));
        double T = (double)Ti, D = (double)y->shape.d[1];
        double H = (double)nd->attrs.heads, tri = T * (T + 1) / 2;
        c->flops_fwd = 2 * (2 * cells * D) + 5 * H * tri;
        c->flops_bwd_input = 4 * (2 * cells * D) + 5 * H * tri;
        c->act_bytes += (int64_t)(H * T * T) * 4; /* the attention probabilities */
        break;
    }
    case PW_OP_DROPOUT:
        c->flops_fwd = 2 * n; /* one random draw and one multiply per element */
        c->flops_bwd_input = n;
        c->act_bytes += (int64_t)n; /* the keep mask: one byte per element */
        break;
    case PW_OP_COUNT:
        break;
    }
    return PW_OK;
}
