/* pipewright — the layer graph: file format v1, IR, shape inference, costs.
 *
 * A graph file (docs/graph-format.md) is parsed into a pw_graph: a DAG of
 * nodes in topological (file) order over SSA values, with named parameters.
 *
 *     pw_graph *g = NULL;
 *     if (pw_graph_parse_file("examples/fashion_mlp.graph", &g) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());  // file:line:col: error: ...
 *         return 1;
 *     }
 *     for (int i = 0; i < g->n_nodes; i++) {
 *         pw_op_cost c;
 *         pw_graph_node_cost(g, i, &c);
 *     }
 *     pw_graph_destroy(g);
 *
 * The IR is plain data, read-only after parsing. Shapes are per sample (no
 * batch dimension). Every value has exactly one producer (a node, or the
 * graph's input/label declarations); parameters have stable dotted names
 * ("fc1.weight", "blocks.3.fc.bias") that checkpoints use.
 *
 * Ownership and threads: the parser returns a new graph owned by the caller
 * (pw_graph_destroy); its names, nodes and parameters point into it and are
 * valid until destroy. A graph is never changed after parsing, and every
 * function here only reads it, so any number of threads may read one graph
 * at once. Parses share nothing with each other.
 */
#ifndef PW_GRAPH_GRAPH_H
#define PW_GRAPH_GRAPH_H

#include <stdint.h>
#include <stdio.h>

#include "runtime/status.h"
#include "runtime/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PW_MAX_OP_INPUTS 4
#define PW_MAX_OP_PARAMS 4
/* Rows per block of the causal attention kernel: the cost model (ops.c)
 * counts the blocks it runs; stages/ops/cpu/ops.c asserts it uses the same. */
#define PW_ATTENTION_BLOCK 32

typedef enum pw_op_kind {
    PW_OP_LINEAR = 0,      /* y = x·Wᵀ + b over the last dim; W (out, in), b (out) */
    PW_OP_RELU,
    PW_OP_GELU,            /* tanh approximation (see docs/graph-format.md) */
    PW_OP_LAYERNORM,       /* over the last dim; weight (d), bias (d) */
    PW_OP_ADD,             /* a + b, same shape */
    PW_OP_FLATTEN,         /* per-sample shape -> [numel] */
    PW_OP_RESHAPE,         /* per-sample shape -> attrs.shape (same numel) */
    PW_OP_SOFTMAX_XENT,    /* (logits [..., C] f32, labels [...] i32) -> loss [] */
    PW_OP_EMBEDDING,       /* tokens [...] i32 -> [..., dim] f32; weight (vocab, dim) */
    PW_OP_POS_EMBEDDING,   /* x [T, D] + weight[0:T]; weight (max, D) */
    PW_OP_CAUSAL_ATTENTION,/* qkv [T, 3D] -> [T, D]; causal, `heads` heads, no parameters */
    PW_OP_DROPOUT,         /* x · mask / (1 − p) in training, x in evaluation */
    PW_OP_COUNT
} pw_op_kind;

/* Tensor parallelism (docs/parallelism.md, "Tensor parallelism"): how an op
 * splits over T ranks, from its `tp=` attribute. */
typedef enum pw_tp_split {
    PW_TP_NONE = 0,
    PW_TP_COLUMN,          /* linear: weight rows (output features); output split */
    PW_TP_ROW,             /* linear: weight columns (input features); input split, output summed */
    PW_TP_VOCAB,           /* embedding: table rows (the vocabulary); output summed */
} pw_tp_split;

typedef enum pw_init_kind {
    PW_INIT_ZEROS = 0,
    PW_INIT_ONES,
    PW_INIT_UNIFORM,       /* U(-scale, scale) */
    PW_INIT_NORMAL,        /* N(0, scale²) */
} pw_init_kind;

typedef struct pw_value {
    char *name;            /* unique; values inside repeat blocks: "blocks.3/h" */
    pw_dtype dtype;
    pw_shape shape;        /* per sample */
    int producer;          /* node index; -1 for input/label declarations */
    int n_consumers;
    int line, col;         /* where it is defined */
    int64_t tp_full;       /* a rank graph (pw_graph_tp_rank): this rank holds a part
                              of the last dim, whose full length this is; 0: whole */
    int64_t tp_unit;       /*   the part is whole units of this many (attention heads'
                              width); 0: 1 */
    int tp_blocks;         /*   in each of this many equal blocks (q, k, v: 3); 0: 1 */
} pw_value;

typedef struct pw_param {
    char *name;            /* "fc1.weight" */
    pw_shape shape;        /* PyTorch layout: linear weight (out, in) */
    pw_init_kind init;
    float init_scale;
    int decay;             /* weight decay applies (matrices yes, biases/norms no) */
    int n_uses;            /* > 1 when tied (e.g. weight=tok_emb.weight) */
    int owner;             /* index of the node that created it (its first use) */
    int tp_dim;            /* a rank graph: split along this dim (0 rows, 1 columns) */
    int64_t tp_full;       /*   whose full length this is; 0: whole on every rank */
    int64_t tp_unit;       /*   in units, per block, as pw_value's; 0: 1 */
    int tp_blocks;
} pw_param;

typedef struct pw_node_attrs {
    int64_t out;           /* linear: output features */
    int bias;              /* linear: 1 (default) or 0 */
    float eps;             /* layernorm: default 1e-5 */
    pw_shape shape;        /* reshape: per-sample target shape */
    int64_t vocab, dim;    /* embedding: table rows (token ids in [0, vocab)), width */
    int64_t max_len;       /* pos_embedding: table rows (≥ T; default T) */
    int64_t heads;         /* causal_attention: number of heads (divides D) */
    float p;               /* dropout: drop probability in [0, 1); default 0.1 */
    int tp;                /* linear: PW_TP_COLUMN / PW_TP_ROW, embedding: PW_TP_VOCAB
                              (`tp=column|row|vocab`); PW_TP_NONE: not split */
} pw_node_attrs;

typedef struct pw_node {
    pw_op_kind op;
    char *scope;           /* parameter prefix: "fc1", "blocks.3.fc" */
    int n_inputs;
    int inputs[PW_MAX_OP_INPUTS];   /* value ids */
    int output;                     /* value id */
    int n_params;
    int params[PW_MAX_OP_PARAMS];   /* param ids, in the op's order (weight, bias) */
    pw_node_attrs attrs;
    int cut_before;        /* a `cut` marker precedes this node in the file */
    int line, col;
} pw_node;

typedef struct pw_graph {
    char *name;            /* from `graph NAME`, else the file's base name */
    char *file;            /* path given to the parser (for messages) */
    int n_values, n_nodes, n_params;
    pw_value *values;
    pw_node *nodes;        /* topological order */
    pw_param *params;
    int input;             /* value id of the `input` declaration */
    int label;             /* value id of the `label` declaration, -1 if none */
    int loss;              /* value id of the loss (output of the softmax_xent node) */
    int n_cuts;            /* number of `cut` markers */
    int tp_rank, tp_size;  /* a rank graph (pw_graph_tp_rank): rank tp_rank of tp_size;
                              a parsed graph: 0, 0 (one rank) */
} pw_graph;

/* Parses a graph file. On error returns PW_ERR_PARSE / PW_ERR_SHAPE / PW_ERR_IO
 * with "file:line:col: error: ..." in pw_last_error() and *out = NULL. */
pw_status pw_graph_parse_file(const char *path, pw_graph **out);
/* Same, from memory; `filename` is used in messages only. */
pw_status pw_graph_parse_string(const char *text, size_t len, const char *filename,
                                pw_graph **out);
void pw_graph_destroy(pw_graph *g); /* accepts NULL */

/* Tensor parallelism (docs/parallelism.md, "Tensor parallelism";
 * graph/tensor_parallel.c). Rank k's graph of T: a copy of `g` in which
 * every op marked `tp=` holds its part — a tp=column linear its rows of the
 * weight and bias (its output value is rank k's slice of the features), a
 * tp=row linear its columns of the weight (its input is such a slice; its
 * output whole again), a tp=vocab embedding its rows of the table — and
 * relu, gelu, dropout(p=0) and softmax_cross_entropy (vocabulary-parallel)
 * take a split value as it is. Shapes, attributes (`out`) and parameter
 * shapes are the rank's; names stay, so a checkpoint's tensors are the full
 * ones gathered (pw_graph_tp_slice). Parts are pw_tp_range's: rank k of T
 * holds [⌊kL/T⌋, ⌊(k+1)L/T⌋). Attention splits by heads: a tp=column
 * linear whose output feeds a causal_attention alone (c_attn) gives each
 * rank whole heads, ⌊kH/T⌋ to ⌊(k+1)H/T⌋, in each of q, k and v; the
 * attention runs those heads, and its output (those heads' features) feeds
 * a tp=row linear (c_proj). T = 1 gives a copy. PW_ERR_SHAPE naming the
 * op ("file:line: linear 'mlp.c_proj' ...") when the graph cannot split as
 * marked: a tp=row linear whose input is whole, a split value read by an op
 * that cannot take one (layernorm, add, ...), attention with fewer heads
 * than ranks, a column-parallel linear whose input has other consumers (its
 * input gradient is summed across ranks), a parameter tied across ops that
 * split it differently. PW_ERR_INVALID_ARG for T < 1 or k outside [0, T). */
pw_status pw_graph_tp_rank(const pw_graph *g, int T, int k, pw_graph **out);
/* 1 when some op of `g` is marked `tp=`. */
int pw_graph_tp_marked(const pw_graph *g);
/* Moves parameter `param` between its full tensor (the shape of the graph
 * `r` was made from) and rank r's part (r a rank graph): to_part = 1 copies
 * rank r's slice of `full` into `part`; 0 writes `part` into its place in
 * `full` (gathering every rank's fills `full`). A whole parameter is copied
 * as it is. */
void pw_graph_tp_slice(const pw_graph *r, int param, float *full, float *part, int to_part);

/* Name of an op as written in graph files ("linear", "softmax_cross_entropy"). */
const char *pw_op_name(pw_op_kind op);

/* Looks a parameter up by name; -1 when absent. */
int pw_graph_find_param(const pw_graph *g, const char *name);

/* The nodes that use parameter `param` (its creator and every tied reuse),
 * in increasing node order, which is the reverse of the order their weight
 * gradients are summed in. Writes at most `cap` node ids into `nodes` (may be
 * NULL when cap is 0) and returns how many there are in all (== n_uses), or
 * -1 when `param` is out of range. A tie that spans pipeline stages is a
 * parameter whose users fall into different node ranges. */
int pw_graph_param_users(const pw_graph *g, int param, int *nodes, int cap);

/* Bytes per sample of what nodes [begin, end) read but do not produce: the
 * values received from earlier stages (passed-through ones included) and
 * the graph's input and label when the range reads them. This is what a
 * stage keeps per in-flight micro-batch under activation recomputation
 * (pw_program_config.recompute); the rest is rebuilt in one shared copy.
 * Returns -1 for a bad range. */
int64_t pw_graph_range_input_bytes(const pw_graph *g, int begin, int end);

/* Per-sample costs of one node. FLOPs count a multiply-add as 2. */
typedef struct pw_op_cost {
    double flops_fwd;
    double flops_bwd_input;
    double flops_bwd_weight;
    int64_t param_bytes;   /* bytes of parameters first used by this node */
    int64_t act_bytes;     /* bytes stashed per sample for the backward pass
                              (the output plus any saved statistics) */
    int64_t out_bytes;     /* bytes of the output value per sample */
} pw_op_cost;

pw_status pw_graph_node_cost(const pw_graph *g, int node, pw_op_cost *out);
/* Sum over all nodes (params counted once even when tied). */
void pw_graph_total_cost(const pw_graph *g, pw_op_cost *out);

/* Human-readable summary (one line per node with shapes and costs) to a FILE*. */
void pw_graph_print(const pw_graph *g, FILE *f);

#ifdef __cplusplus
}
#endif
#endif
