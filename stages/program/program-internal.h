/* pipewright — the stage program's internals, shared by program.c (plan,
 * calls, gradients, optimizer) and program_ops.c (each op's forward and
 * backward: the program's op table). Not installed. */
#ifndef PW_STAGES_PROGRAM_PROGRAM_INTERNAL_H
#define PW_STAGES_PROGRAM_PROGRAM_INTERNAL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/arena.h"
#include "runtime/log.h"
#include "runtime/rng.h"
#include "stages/ops/backend.h"
#include "stages/ops/tp.h"
#include "stages/program/program.h"

#define NO_OFF ((size_t)-1)

typedef struct prog_param {
    int gp;                /* graph param id */
    size_t off_data, off_grad, off_state;
    int64_t numel;
    int n_uses;            /* nodes of the range that use it */
    int use_first;         /* its uses' gradient buffers: use_off[use_first ..] */
} prog_param;

/* Where a value and its gradient live. Offsets are relative to the slot's
 * base (off_act, off_grad) or to the shared region (the _s ones); NO_OFF
 * when absent there. Without recompute only the slot offsets are used. */
typedef struct prog_value {
    size_t off_act, off_act_s;
    size_t off_grad, off_grad_s;
} prog_value;

typedef struct prog_node {
    /* layernorm mean/rstd, softmax probs, attention probs, dropout mask;
     * relative to the slot, or to the shared region under recompute */
    size_t off_stat0, off_stat1;
    /* device backends, softmax cross-entropy: row scratch (off_stat1) and
     * the loss statistics (off_stat2: 2 doubles for the forward, 2 for a
     * recomputation); the CPU keeps its statistics in slot_state */
    size_t off_stat2;
    char *rng_name;              /* dropout: "dropout:<value name>" */
} prog_node;

/* Per slot: the last forward and the randomness it used. */
typedef struct slot_state {
    int64_t rows;                /* samples of the last forward; 0 = none */
    int eval;                    /* the last forward was an evaluation forward */
    int rng_pending;             /* pw_program_set_rng since the last training forward */
    uint64_t seed;               /* pending: set by pw_program_set_rng */
    int64_t step, offset;
    uint64_t used_seed;          /* what the last training forward used (and so */
    int64_t used_step, used_offset; /* what its recomputation must use) */
    double loss_sum;
    int64_t correct;
    double stats[2];             /* the loss op's statistics of the last forward (host copy) */
    double redo_stats[2];        /* the CPU's scratch statistics of a recomputation */
} slot_state;

/* What the shared region holds under recompute. */
enum { SHARED_NONE = 0, SHARED_FWD, SHARED_BWD };

struct pw_program {
    pw_program_config cfg;
    const pw_graph *g;
    int begin, end;
    pw_arena arena;              /* the plan; the memory itself for the CPU */
    const pw_backend_i *be;
    void *be_ctx;
    int dev;                     /* p->be->device_memory */
    int dev_index;               /* "cuda:N": N */
    size_t cat_start[PW_MEM_COUNT]; /* plan offset where each category begins */
    size_t cat_bytes[PW_MEM_COUNT];
    char *cat_base[PW_MEM_COUNT];   /* its block (the arena's base + start on the CPU) */
    char *staging;               /* device: per slot, host copies of the graph input and label;
                                    then dev_stats (one page-aligned block) */
    double *dev_stats;           /* device: per slot, the loss statistics downloaded (2 doubles) */
    int staging_pinned;          /* the backend page-locked the staging block */
    size_t stage_in_bytes, stage_slot_bytes;
    float **gptr;                /* [n_params] each parameter's gradient (optimizer check) */
    int64_t *gnum;               /* [n_params] */
    size_t slot_bytes;           /* stride between slots in the activation region */
    size_t act_base;             /* offset of slot 0's activation region */
    size_t shared_base;          /* offset of the shared region */
    size_t off_work;             /* kernel workspace in the shared region */
    pw_program_memory mem;

    int n_params;
    prog_param *params;
    int *param_of_graph;         /* graph param id -> local index or -1 */
    /* Tied parameters: each use accumulates its weight gradient in its own
     * buffer over a step (use 0, the last user in node order, in the
     * parameter's gradient); pw_program_fold_grads sums them. */
    size_t *use_off;             /* per use, in reverse node order of the users */
    size_t *node_grad_off;       /* per (node, param slot): that use's buffer */
    int folded;                  /* the uses are summed (until the next backward_weight) */
    /* Group sums (cfg.grad_groups > 1): backward_weight calls this step, the
     * gradient-sized buffers that hold group sums, and which buffer holds
     * the pending sum of 2^l groups (-1: none). */
    int n_bw;
    int n_sum_bufs;
    size_t off_sums;             /* n_sum_bufs × mem.grads bytes after the gradients */
    int sum_level[32];
    unsigned sum_busy;           /* bit b: buffer b holds a sum */
    /* Post-validation: the copy of parameters and optimizer state
     * (cfg.post_validate; mem.backup bytes in the OPTIM category), and
     * whether a _try's update is waiting for its _commit or _undo. */
    size_t off_backup;
    int tried;

    prog_value *values;          /* per graph value */
    unsigned char *touched;      /* per graph value: read or written here */
    unsigned char *requires_grad;/* per graph value (whole-graph analysis) */
    unsigned char *grad_valid;   /* slots × n_values: gradient written this backward */
    prog_node *nodes;            /* per graph node (only [begin, end) used) */

    int n_inputs, n_outputs;
    int *inputs, *outputs;       /* live-in / live-out values, value-id order */
    unsigned char *is_in, *is_out; /* per graph value */

    /* Ports: message layouts (offsets per value) and per-slot bindings. */
    size_t port_bytes[PW_PORT_COUNT];
    size_t *port_off[PW_PORT_COUNT];      /* per graph value; NO_OFF when absent */
    void **bind_act;                      /* slots × n_values; NULL = own buffer */
    float **bind_grad;                    /* slots × n_values */
    char **fwd_act_dst;                   /* slots × n_values: ACT_OUT copy target of
                                             a value received and passed on */
    float **fwd_grad_src;                 /* slots × n_values: GRAD_OUT part of such a value */

    slot_state *slots;
    int loss_node;               /* node id of the loss in range, or -1 */
    int needs_rng;               /* a dropout with p > 0 in range */

    /* recompute */
    int shared_slot;             /* slot whose state the shared region holds */
    int shared_state;            /* SHARED_* */
    int redo;                    /* re-running a backward for backward_weight: input
                                    gradients go to the shared region, not the ports */

    /* Asynchronous completion (pw_program_set_async). */
    int async;                   /* training calls return with their work in flight */
    int unsynced;                /* one did, and pw_program_submitted has not taken it */
    int loss_slot;               /* its loss statistics reach the host at completion; -1: none */
    pw_stage_done_fn done;       /* the caller's, for the call in flight */
    void *done_arg;

    /* Tensor parallelism: the graph is rank tp.rank of tp.size
     * (pw_graph_tp_rank); the group's endpoint from pw_program_set_tp. */
    pw_tp tp;
    int tp_ready;
};

/* Plan offset → address in its category's block. */
static inline void *at(const pw_program *p, size_t off)
{
    int c = PW_MEM_COUNT - 1;
    while (c > 0 && off < p->cat_start[c]) c--;
    return p->cat_base[c] + (off - p->cat_start[c]);
}

static inline char *slot_base(const pw_program *p, int slot)
{
    return (char *)at(p, p->act_base) + (size_t)slot * p->slot_bytes;
}

static inline char *shared_at(const pw_program *p, size_t off)
{
    return (char *)at(p, p->shared_base) + off;
}

/* Runs a backend slot; returns its error from the calling function. */
#define BE(slot, ...) PW_CHECK(p->be->slot(p->be_ctx, __VA_ARGS__))

/* Every public call that touches memory starts here (the CUDA device is
 * current per thread: the engine's workers call from their own). */
static inline pw_status be_begin(const pw_program *p)
{
    return p->be->activate ? p->be->activate(p->be_ctx) : PW_OK;
}

/* ... and ends here: a device program waits for its stream (program.h). */
static inline pw_status be_end(const pw_program *p, pw_status st)
{
    if (st == PW_OK && p->be->sync) st = p->be->sync(p->be_ctx);
    return st;
}

/* The training calls (forward, backward_input, backward_weight, optimizer
 * step) end here: an asynchronous program leaves the work in flight for
 * pw_program_submitted. */
static inline pw_status be_end_call(pw_program *p, pw_status st)
{
    if (st == PW_OK && p->async) {
        p->unsynced = 1;
        return PW_OK;
    }
    return be_end(p, st);
}

static inline size_t sv(const pw_program *p, int slot, int v)
{
    return (size_t)slot * (size_t)p->g->n_values + (size_t)v;
}

/* Where the ops read and write value v of `slot`: the shared region under
 * recompute (all but the stage's inputs), else the slot (or a bound port). */
static inline void *act(const pw_program *p, int v, int slot)
{
    const prog_value *pv = &p->values[v];
    if (pv->off_act_s != NO_OFF) return shared_at(p, pv->off_act_s);
    return pw_program_value(p, v, slot);
}

/* Where the ops accumulate the gradient of v. Under recompute everything
 * but the gradients of received values (which go back to the previous stage)
 * is summed in the shared region; a redo sends those there too. */
static inline float *grad_at(const pw_program *p, int v, int slot)
{
    const prog_value *pv = &p->values[v];
    if (pv->off_grad_s != NO_OFF && (!p->is_in[v] || p->redo))
        return (float *)shared_at(p, pv->off_grad_s);
    return pw_program_grad(p, v, slot);
}

static inline void *stat(const pw_program *p, int slot, size_t off)
{
    return p->cfg.recompute ? shared_at(p, off) : slot_base(p, slot) + off;
}

/* Rows an op works over for n samples: all leading dims of the value. */
static inline int64_t rows_of(const pw_value *v, int64_t n)
{
    int64_t last = v->shape.ndim ? v->shape.d[v->shape.ndim - 1] : 1;
    return n * (pw_shape_numel(&v->shape) / (last ? last : 1));
}

static inline int64_t last_dim(const pw_value *v)
{
    return v->shape.ndim ? v->shape.d[v->shape.ndim - 1] : 1;
}

static inline size_t value_bytes(const pw_value *v, int64_t mb)
{
    return (size_t)mb * (size_t)pw_shape_numel(&v->shape) * pw_dtype_size(v->dtype);
}

static inline float *param_data(const pw_program *p, int gp)
{
    return at(p, p->params[p->param_of_graph[gp]].off_data);
}

/* The gradient buffer of parameter slot k of node i (its own for a tied
 * parameter's use; see pw_program_fold_grads). */
static inline float *use_grad(const pw_program *p, int i, int k)
{
    return at(p, p->node_grad_off[(size_t)(i - p->begin) * PW_MAX_OP_PARAMS + (size_t)k]);
}

/* Dropout's stream for one node and step: see pw_program_set_rng. */
static inline uint64_t dropout_key(const pw_program *p, int node, const slot_state *s)
{
    return pw_rng_u64(pw_rng_key(s->used_seed, p->nodes[node].rng_name), (uint64_t)s->used_step);
}

enum { RUN_TRAIN = 0, RUN_EVAL = 1, RUN_RECOMPUTE = 2 };

/* Where the loss op of node i keeps its statistics (2 doubles, backend
 * memory): the slot's for a forward, scratch ones for a recomputation. */
static inline double *loss_stats(pw_program *p, int i, int slot, int how)
{
    slot_state *ss = &p->slots[slot];
    if (!p->dev) return how == RUN_RECOMPUTE ? ss->redo_stats : ss->stats;
    return (double *)stat(p, slot, p->nodes[i].off_stat2) + (how == RUN_RECOMPUTE ? 2 : 0);
}

/* Hands gradient `dy` of a node to its input k: write or accumulate. Returns
 * the destination, or NULL when that input needs no gradient. */
static inline float *grad_dest(pw_program *p, int slot, int v, int *accumulate)
{
    if (!p->requires_grad[v]) return NULL;
    unsigned char *valid = &p->grad_valid[(size_t)slot * (size_t)p->g->n_values + (size_t)v];
    *accumulate = *valid;
    *valid = 1;
    return grad_at(p, v, slot);
}

static inline int grad_ready(const pw_program *p, int slot, int v)
{
    return p->grad_valid[(size_t)slot * (size_t)p->g->n_values + (size_t)v];
}

/* ---- the op table (program_ops.c) ----
 *
 * One entry per graph op (graph/graph.h): what the program does for it. The
 * program's loops call these; an op without an entry for a pass is refused
 * with the node's place in the graph file. */
typedef struct prog_op_call {
    pw_program *p;
    int i;                       /* the node */
    const pw_node *nd;
    int slot;
    int64_t n;                   /* samples in the slot */
    int how;                     /* RUN_* (forward) */
} prog_op_call;

typedef struct prog_op {
    /* Plans the statistics the backward needs into `a` (optional). */
    void (*plan_stats)(pw_program *p, int i, pw_arena *a);
    pw_status (*forward)(const prog_op_call *c);
    /* Gradients of the inputs from the output's; called only when the
     * output has a gradient, except for a `loss` op, which seeds it. */
    pw_status (*backward_input)(const prog_op_call *c);
    /* Gradients of the parameters (ops with parameters). */
    pw_status (*backward_weight)(const prog_op_call *c);
    int loss;                    /* the loss: starts the backward */
} prog_op;

extern const prog_op pw_prog_ops[PW_OP_COUNT];

#endif
