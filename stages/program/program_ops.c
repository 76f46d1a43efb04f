/* pipewright — the program's op table: for each graph op, the statistics it
 * keeps for its backward, its forward, its input backward and its weight
 * backward, as calls to the backend table (stages/ops/backend.h).
 *
 * Adding an op (docs/building.md, "Adding an op"): its row in graph/ops.c
 * (shapes, attributes, costs), its entry here, its kernels (a slot in
 * backend.h, the CPU's in stages/ops/cpu/ and stages/ops/backend_cpu.c, the
 * CUDA one in stages/ops/cuda/), and a row in tests/test_op_table.c. The
 * program's loops (program.c) need no change.
 *
 * Each function gets one node of one slot (prog_op_call). The order of the
 * calls, and so of every sum, is the program's: nodes in order forward,
 * reverse order backward, gradients of a value used twice added in that
 * order (grad_dest says whether to write or add). */
#include "stages/program/program-internal.h"

#define X(c, k) act((c)->p, (c)->nd->inputs[k], (c)->slot)
#define Y(c) act((c)->p, (c)->nd->output, (c)->slot)
#define XV(c) (&(c)->p->g->values[(c)->nd->inputs[0]])
#define YV(c) (&(c)->p->g->values[(c)->nd->output])
#define W(c, k) param_data((c)->p, (c)->nd->params[k])
#define STAT(c, which) stat((c)->p, (c)->slot, (c)->p->nodes[(c)->i].which)
#define DY(c) grad_at((c)->p, (c)->nd->output, (c)->slot)

/* Elements of the output over the slot's samples. */
static int64_t out_numel(const prog_op_call *c) { return c->n * pw_shape_numel(&YV(c)->shape); }

/* ---------------------------------------------------------------- linear */

/* Tensor parallelism (stages/ops/tp.h, graph.h pw_graph_tp_rank): the split
 * ops of a rank graph talk to their group through p->tp. */
static int tp_split(const pw_program *p) { return p->tp.size > 1; }

static pw_status tp_check(const prog_op_call *c)
{
    if (c->p->tp_ready) return PW_OK;
    return pw_error(PW_ERR_INVALID_ARG, "program: graph '%s' is tensor-parallel rank %d of %d but has no group "
                    "endpoint (pw_program_set_tp) at node %d (%s)", c->p->g->name, c->p->tp.rank, c->p->tp.size,
                    c->i, pw_op_name(c->nd->op));
}

static pw_status linear_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    if (tp_split(p) && c->nd->attrs.tp == PW_TP_ROW) { /* the partial sums, all-reduced */
        PW_CHECK(tp_check(c));
        return pw_tp_row_linear_fwd(&p->tp, X(c, 0), W(c, 0), c->nd->n_params > 1 ? W(c, 1) : NULL, Y(c),
                                    rows_of(XV(c), c->n), last_dim(XV(c)), c->nd->attrs.out);
    }
    BE(linear_fwd, X(c, 0), W(c, 0), c->nd->n_params > 1 ? W(c, 1) : NULL, Y(c), rows_of(XV(c), c->n),
       last_dim(XV(c)), c->nd->attrs.out);
    return PW_OK;
}

static pw_status linear_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    int acc = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (dx && tp_split(p) && c->nd->attrs.tp == PW_TP_COLUMN) {
        /* Σ over ranks; the rank graph gave this input no other consumer,
         * so nothing is accumulated into dx before (acc == 0) */
        PW_CHECK(tp_check(c));
        if (acc)
            return pw_error(PW_ERR_INTERNAL, "program: column-parallel node %d's input gradient accumulates", c->i);
        return pw_tp_col_linear_bwd_input(&p->tp, DY(c), W(c, 0), dx, rows_of(XV(c), c->n), last_dim(XV(c)),
                                          c->nd->attrs.out);
    }
    if (dx)
        BE(linear_bwd_input, DY(c), W(c, 0), dx, rows_of(XV(c), c->n), last_dim(XV(c)), c->nd->attrs.out, acc);
    return PW_OK;
}

static pw_status linear_backward_weight(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(linear_bwd_weight, DY(c), X(c, 0), use_grad(p, c->i, 0), c->nd->n_params > 1 ? use_grad(p, c->i, 1) : NULL,
       rows_of(XV(c), c->n), last_dim(XV(c)), c->nd->attrs.out);
    return PW_OK;
}

/* ------------------------------------------------------ relu, gelu, add */

static pw_status relu_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(relu_fwd, X(c, 0), Y(c), out_numel(c));
    return PW_OK;
}

static pw_status relu_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    int acc = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (dx) BE(relu_bwd_input, Y(c), DY(c), dx, out_numel(c), acc);
    return PW_OK;
}

static pw_status gelu_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(gelu_fwd, X(c, 0), Y(c), out_numel(c));
    return PW_OK;
}

static pw_status gelu_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    int acc = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (dx) BE(gelu_bwd_input, X(c, 0), DY(c), dx, out_numel(c), acc);
    return PW_OK;
}

static pw_status add_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(add_fwd, X(c, 0), X(c, 1), Y(c), out_numel(c));
    return PW_OK;
}

static pw_status add_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    const float *dy = DY(c);
    int acc = 0, acc1 = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (dx) BE(copy_grad, dy, dx, out_numel(c), acc);
    float *dx1 = grad_dest(p, c->slot, c->nd->inputs[1], &acc1);
    if (dx1) BE(copy_grad, dy, dx1, out_numel(c), acc1);
    return PW_OK;
}

/* ------------------------------------- flatten, reshape: the same floats */

static pw_status copy_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(copy, Y(c), X(c, 0), (size_t)out_numel(c) * pw_dtype_size(YV(c)->dtype));
    return PW_OK;
}

/* dx = dy: flatten, reshape, and the input of a position embedding. */
static pw_status pass_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    int acc = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (dx) BE(copy_grad, DY(c), dx, out_numel(c), acc);
    return PW_OK;
}

/* ------------------------------------------------------------- layernorm */

static void layernorm_plan(pw_program *p, int i, pw_arena *a)
{
    const pw_value *x = &p->g->values[p->g->nodes[i].inputs[0]];
    p->nodes[i].off_stat0 = pw_arena_plan(a, (size_t)rows_of(x, p->cfg.micro_batch) * 4); /* mean */
    p->nodes[i].off_stat1 = pw_arena_plan(a, (size_t)rows_of(x, p->cfg.micro_batch) * 4); /* rstd */
}

static pw_status layernorm_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(layernorm_fwd, X(c, 0), W(c, 0), W(c, 1), Y(c), STAT(c, off_stat0), STAT(c, off_stat1),
       rows_of(XV(c), c->n), last_dim(XV(c)), c->nd->attrs.eps);
    return PW_OK;
}

static pw_status layernorm_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    int acc = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (dx)
        BE(layernorm_bwd_input, X(c, 0), W(c, 0), STAT(c, off_stat0), STAT(c, off_stat1), DY(c), dx,
           rows_of(XV(c), c->n), last_dim(XV(c)), acc);
    return PW_OK;
}

static pw_status layernorm_backward_weight(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(layernorm_bwd_weight, X(c, 0), STAT(c, off_stat0), STAT(c, off_stat1), DY(c), use_grad(p, c->i, 0),
       use_grad(p, c->i, 1), rows_of(XV(c), c->n), last_dim(XV(c)));
    return PW_OK;
}

/* ------------------------------------------------- softmax cross-entropy */

static void xent_plan(pw_program *p, int i, pw_arena *a)
{
    const pw_value *x = &p->g->values[p->g->nodes[i].inputs[0]];
    const int64_t mb = p->cfg.micro_batch;
    p->nodes[i].off_stat0 = pw_arena_plan(a, value_bytes(x, mb)); /* probabilities */
    if (x->tp_full && p->tp.size > 1) /* vocabulary-parallel: the ranks' numbers per row */
        p->nodes[i].off_stat1 = pw_arena_plan(a, (size_t)pw_tp_xent_scratch(rows_of(x, mb), p->tp.size) * 4);
    if (p->dev) { /* the device reduces per row; its statistics stay there */
        p->nodes[i].off_stat1 = pw_arena_plan(a, (size_t)rows_of(x, mb) * sizeof(double));
        p->nodes[i].off_stat2 = pw_arena_plan(a, 4 * sizeof(double));
    }
}

static pw_status xent_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    const int64_t rows = rows_of(XV(c), c->n), C = last_dim(XV(c));
    double *st = loss_stats(p, c->i, c->slot, c->how);
    double *rowbuf = p->dev ? (double *)STAT(c, off_stat1) : NULL;
    BE(zero, st, 2 * sizeof(double));
    if (tp_split(p) && XV(c)->tp_full) { /* vocabulary-parallel: the logits are this rank's columns */
        PW_CHECK(tp_check(c));
        int64_t correct = 0;
        PW_CHECK(pw_tp_xent_fwd(&p->tp, X(c, 0), (const int32_t *)X(c, 1), STAT(c, off_stat0), STAT(c, off_stat1),
                                rows, XV(c)->tp_full, &st[0], &correct));
        st[1] = (double)correct;
        BE(loss_fill, st, Y(c), c->n, (double)rows);
        return PW_OK;
    }
    BE(xent_fwd, X(c, 0), (const int32_t *)X(c, 1), STAT(c, off_stat0), st, rowbuf, rows, C);
    /* The loss value holds the per-position mean loss of this micro-batch. */
    BE(loss_fill, st, Y(c), c->n, (double)rows);
    return PW_OK;
}

/* The seed of the backward: the mean over every position of the global
 * batch. */
static pw_status xent_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    int acc = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (!dx) return PW_OK;
    const int64_t rows = rows_of(XV(c), c->n), C = last_dim(XV(c));
    float scale = (float)(1.0 / ((double)p->cfg.loss_batch * (double)(rows / c->n)));
    if (tp_split(p) && XV(c)->tp_full) {
        pw_tp_xent_bwd(&p->tp, STAT(c, off_stat0), X(c, 1), dx, rows, XV(c)->tp_full, scale, acc);
        return PW_OK;
    }
    BE(xent_bwd, STAT(c, off_stat0), X(c, 1), dx, rows, C, scale, acc);
    return PW_OK;
}

/* ------------------------------------------ embeddings (token, position) */

static pw_status embedding_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    if (tp_split(p) && c->nd->attrs.tp == PW_TP_VOCAB) { /* this rank's rows, all-reduced */
        PW_CHECK(tp_check(c));
        return pw_tp_embedding_fwd(&p->tp, X(c, 0), W(c, 0), Y(c), c->n * pw_shape_numel(&XV(c)->shape),
                                   c->nd->attrs.vocab, c->nd->attrs.dim);
    }
    BE(embedding_fwd, X(c, 0), W(c, 0), Y(c), c->n * pw_shape_numel(&XV(c)->shape), c->nd->attrs.vocab,
       c->nd->attrs.dim);
    return PW_OK;
}

/* Tokens are integers: no input gradient. */
static pw_status no_backward_input(const prog_op_call *c)
{
    (void)c;
    return PW_OK;
}

static pw_status embedding_backward_weight(const prog_op_call *c)
{
    pw_program *p = c->p;
    if (tp_split(p) && c->nd->attrs.tp == PW_TP_VOCAB) {
        pw_tp_embedding_bwd_weight(&p->tp, X(c, 0), DY(c), use_grad(p, c->i, 0),
                                   c->n * pw_shape_numel(&XV(c)->shape), c->nd->attrs.vocab, c->nd->attrs.dim);
        return PW_OK;
    }
    BE(embedding_bwd_weight, X(c, 0), DY(c), use_grad(p, c->i, 0), c->n * pw_shape_numel(&XV(c)->shape),
       c->nd->attrs.vocab, c->nd->attrs.dim);
    return PW_OK;
}

static pw_status pos_embedding_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(pos_embedding_fwd, X(c, 0), W(c, 0), Y(c), c->n, XV(c)->shape.d[0], XV(c)->shape.d[1]);
    return PW_OK;
}

static pw_status pos_embedding_backward_weight(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(pos_embedding_bwd_weight, DY(c), use_grad(p, c->i, 0), c->n, XV(c)->shape.d[0], XV(c)->shape.d[1]);
    return PW_OK;
}

/* ------------------------------------------------------ causal attention */

static void attention_plan(pw_program *p, int i, pw_arena *a)
{
    const pw_node *nd = &p->g->nodes[i];
    const int64_t T = p->g->values[nd->inputs[0]].shape.d[0];
    p->nodes[i].off_stat0 = pw_arena_plan(a, (size_t)(p->cfg.micro_batch * nd->attrs.heads * T * T) * 4);
}

static pw_status attention_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    BE(attention_fwd, X(c, 0), Y(c), STAT(c, off_stat0), c->n, XV(c)->shape.d[0], YV(c)->shape.d[1],
       c->nd->attrs.heads);
    return PW_OK;
}

static pw_status attention_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    int acc = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (dx)
        BE(attention_bwd_input, X(c, 0), STAT(c, off_stat0), DY(c), dx, (float *)shared_at(p, p->off_work), c->n,
           XV(c)->shape.d[0], YV(c)->shape.d[1], c->nd->attrs.heads, acc);
    return PW_OK;
}

/* --------------------------------------------------------------- dropout */

static void dropout_plan(pw_program *p, int i, pw_arena *a)
{
    const pw_value *x = &p->g->values[p->g->nodes[i].inputs[0]];
    p->nodes[i].off_stat0 = pw_arena_plan(a, (size_t)(p->cfg.micro_batch * pw_shape_numel(&x->shape))); /* mask */
}

static pw_status dropout_forward(const prog_op_call *c)
{
    pw_program *p = c->p;
    if (c->how == RUN_EVAL || c->nd->attrs.p == 0.0f) { /* the identity */
        BE(copy, Y(c), X(c, 0), (size_t)out_numel(c) * sizeof(float));
        return PW_OK;
    }
    const slot_state *ss = &p->slots[c->slot];
    BE(dropout_fwd, X(c, 0), Y(c), STAT(c, off_stat0), c->n, pw_shape_numel(&XV(c)->shape), c->nd->attrs.p,
       dropout_key(p, c->i, ss), ss->used_offset);
    return PW_OK;
}

static pw_status dropout_backward_input(const prog_op_call *c)
{
    pw_program *p = c->p;
    int acc = 0;
    float *dx = grad_dest(p, c->slot, c->nd->inputs[0], &acc);
    if (!dx) return PW_OK;
    if (c->nd->attrs.p == 0.0f) BE(copy_grad, DY(c), dx, out_numel(c), acc);
    else BE(dropout_bwd_input, STAT(c, off_stat0), DY(c), dx, out_numel(c), c->nd->attrs.p, acc);
    return PW_OK;
}

/* ------------------------------------------------------------- the table */

const prog_op pw_prog_ops[PW_OP_COUNT] = {
    [PW_OP_LINEAR] = {.forward = linear_forward, .backward_input = linear_backward_input,
                      .backward_weight = linear_backward_weight},
    [PW_OP_RELU] = {.forward = relu_forward, .backward_input = relu_backward_input},
    [PW_OP_GELU] = {.forward = gelu_forward, .backward_input = gelu_backward_input},
    [PW_OP_LAYERNORM] = {.plan_stats = layernorm_plan, .forward = layernorm_forward,
                         .backward_input = layernorm_backward_input, .backward_weight = layernorm_backward_weight},
    [PW_OP_ADD] = {.forward = add_forward, .backward_input = add_backward_input},
    [PW_OP_FLATTEN] = {.forward = copy_forward, .backward_input = pass_backward_input},
    [PW_OP_RESHAPE] = {.forward = copy_forward, .backward_input = pass_backward_input},
    [PW_OP_SOFTMAX_XENT] = {.plan_stats = xent_plan, .forward = xent_forward, .backward_input = xent_backward_input,
                            .loss = 1},
    [PW_OP_EMBEDDING] = {.forward = embedding_forward, .backward_input = no_backward_input,
                         .backward_weight = embedding_backward_weight},
    [PW_OP_POS_EMBEDDING] = {.forward = pos_embedding_forward, .backward_input = pass_backward_input, /* y = x + table */
                             .backward_weight = pos_embedding_backward_weight},
    [PW_OP_CAUSAL_ATTENTION] = {.plan_stats = attention_plan, .forward = attention_forward,
                                .backward_input = attention_backward_input},
    [PW_OP_DROPOUT] = {.plan_stats = dropout_plan, .forward = dropout_forward,
                       .backward_input = dropout_backward_input},
};
