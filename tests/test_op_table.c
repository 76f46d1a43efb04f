/* pipewright — the op table: every op of graph.h's PW_OP_* list, checked
 * the same way at several shapes (issue 15; STYLE 9 and 15, in the way of
 * ggml's test-backend-ops).
 *
 * ONE table (`rows` below) declares each op's test coverage: a row per
 * (op, shape, attributes). The harness turns a row into a tiny graph
 *
 *     input x : f32[SHAPE]                 (i32 token ids for IN_TOKENS)
 *     label t : i32[]                      (SHAPE less its last dim for IN_LOSS)
 *     h  = linear(x, out=LAST) as pre      so that input gradients reach a parameter
 *     h2 = linear(x, out=LAST) as pre2     (IN_TWO only)
 *     y  = OP(h[, h2 | , h], ATTRS) as op  the op under test
 *     f  = flatten(y)                      any output shape feeds one head
 *     logits = linear(f, out=5) as post
 *     loss   = softmax_cross_entropy(logits, t)
 *
 * (IN_LOSS rows make the op itself the loss, `loss = OP(h, t)`), fills it
 * with fixed data and fixed parameters, and checks it. Every message starts
 * with the row's name, "causal_attention(heads=2) [5, 24] B=2", and says
 * which check failed.
 *
 *   op_table::row (one test per row; Criterion runs each in its own process)
 *     (a) gradients: every parameter's analytic gradient against finite
 *         differences of the loss (five-point stencil, in double, on the CPU
 *         program), sampled for large tensors. For every parameter the
 *         comparator must also REJECT a copy of the analytic gradient scaled
 *         by 1 + 4·tol and a copy with one element's sign flipped, so the
 *         check is known to be able to fail at this row;
 *     (b) determinism: the row run twice in one program on 1 CPU thread and
 *         once in a fresh program on 2 gives the same bits (loss and every
 *         gradient);
 *     (c) on "hostdev", an emulated device (host memory and the CPU's ops
 *         behind the program's device paths, as in test_backend.c): the
 *         CPU's bits exactly, kernels hooks included. It runs everywhere, so
 *         the cross-backend harness itself runs without a GPU.
 *   op_table::cuda: (c) on cuda:0 when the build has CUDA and a device exists
 *     (otherwise it skips and says why), every row in one process: loss and
 *     gradients within the row's dev_tol of the CPU, then the row's kernels
 *     hook. A mismatch does not stop the pass, so one run lists them all.
 *     It runs in test_op_table_cuda, this file linked with pw_cuda
 *     (CMakeLists.txt); test_op_table does not link cuBLAS, whose loading
 *     in each per-row process would cost more than the checks.
 *   op_table::covers_every_op: every PW_OP_* kind has a row.
 *
 * Bit identity across backends. docs/cuda.md promises the CPU's bits for
 * the reductions over rows (linear db, layernorm dw/db, embedding and
 * position-embedding gradients), the dropout masks, and equal values for
 * the element-wise kernels — for the same inputs. Inside a whole graph the
 * inputs of those kernels already differ by GEMM rounding, so the graph's
 * gradients are compared within a tolerance; a row's `kernels` hook then
 * runs the op's kernels on both backends from the SAME host tensors (the
 * CPU program's own activations and gradients for that row) and compares
 * with the strength test_cuda_ops.c uses: bit for bit (memcmp) for the row
 * reductions and masks, equal values for relu/add/copies/gathers/dropout,
 * 1e-6 normalised (TOL_EW there) for gelu and the softmax backward.
 *
 * Tolerances (fd_step, fd_tol, dev_tol; 0 = the defaults FD_STEP, FD_TOL,
 * DEV_TOL, whose rationale is at their definitions). A row that sets its own
 * says why in a comment.
 *
 * ADDING AN OP (docs/building.md, "Adding an op"): add rows for it to
 * `rows` — a 1-element shape, odd sizes (3, 17, 33: not multiples of the
 * kernels' 8- or 16-wide vectors), more than one sample per micro-batch, and
 * each attribute's interesting values — with `.in` saying how the harness
 * feeds it (add a row_inputs mode only if none fits). Where the op is not
 * differentiable at 0, set `.kink`; where a gradient is 0 by construction,
 * list it in `.zero`; where the default data make a check vacuous (the test
 * says so), pick a `.seed`. If docs/cuda.md promises bit identity for any of
 * its kernels, write a kernels hook (kern_* below) and name it in the rows.
 * covers_every_op fails until the op has a row.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <criterion/parameterized.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "runtime/rng.h"
#include "runtime/status.h"
#include "stages/ops/backend.h"
#include "stages/ops/cpu/ops.h"
#include "stages/program/program.h"
#ifdef PW_OP_TABLE_CUDA /* test_op_table_cuda: this file linked with pw_cuda */
#include "stages/ops/cuda/backend_cuda.h"
#endif

/* One timeout for every test (test_cuda_ops.c: Criterion 2.4.1 leaks a
 * record when tests of one binary run in parallel with different ones). */
#define TIMEOUT_S 60

#define SEED 7          /* data, parameters and dropout masks */
#define STEP 1          /* the optimizer step the dropout masks belong to */
#define POST_CLASSES 5  /* the head's width */

/* Finite differences of the fp32 program's loss (summed in double by the
 * loss op), by the five-point stencil (fd_at). Their error has two parts:
 * truncation, O(h⁴), and rounding: the loss of an fp32 forward carries
 * ~1e-7 of rounding (logits, exp, the normaliser), which the quotient
 * divides by h. Measured over the table (worst row, max err as defined
 * below): h = 5e-3: 3.2e-3; 1e-2: 1.8e-3; 5e-2: 3.4e-4; 1e-1: 6.9e-3
 * (truncation: dropout p = 0.9 scales activations by 10). So h = 5e-2.
 * relu's kink: the elements whose evaluations move a pre-activation across 0
 * are left out (op_row.kink), and its rows take h = 1e-2, where fewer do
 * (worst relu row then 3.6e-4). */
#define FD_STEP 5e-2
#define RELU_STEP 1e-2
/* Per sampled element, err = |analytic − fd| / max(|fd|, FD_FLOOR · max|fd|)
 * must be ≤ tol. The floor makes elements far below the tensor's largest
 * gradient count in absolute terms (their fd carries the same absolute
 * rounding noise as the big ones). FD_TOL is ~6× the worst error measured
 * (3.4e-4), so rounding on another CPU or BLAS has room, while a real
 * gradient bug (a wrong term, index or scale: errors of O(1), or 1 % for a
 * 1.01 factor) cannot hide under it; every row also checks that a copy of
 * its gradients scaled by 1 + 4·tol is rejected. */
#define FD_FLOOR 0.05
#define FD_TOL 2e-3
/* At most this many elements of a parameter are differentiated (all of them
 * when it has fewer; pick() says which). */
#define FD_SAMPLES 48
/* A device backend against the CPU, normalised: max |dev − cpu| / max |cpu|
 * per gradient (and relative for the loss). test_cuda_ops.c bounds one fp32
 * GEMM at TOL_GEMM = 2e-5 (a different summation order); a row's loss and
 * gradients pass through up to five GEMMs (pre, op, post forward and their
 * backward), so 1e-4. A kernel bug gives O(1) errors. */
#define DEV_TOL 1e-4

/* Bit-exact comparisons with the CPU op need a CPU build that does not
 * contract a·b + c into an FMA (x86-64 without -march has none); only
 * layernorm's dw has a product in its sum (test_cuda_ops.c). */
#if defined(__FP_FAST_FMAF)
#define CPU_MAY_FUSE 1
#else
#define CPU_MAY_FUSE 0
#endif

#define OK(call) cr_assert_eq((call), PW_OK, "%s: %s: %s", c->name, #call, pw_last_error())

/* ---------------------------------------------------------------- the table */

/* How the harness feeds the op (see the graph at the top). */
typedef enum row_inputs {
    IN_ONE = 0, /* y = op(h) */
    IN_TWO,     /* y = op(h, h2): two pre linears */
    IN_SAME,    /* y = op(h, h): one value used twice */
    IN_TOKENS,  /* y = op(x): x i32 token ids, drawn from [0, the node's vocab) */
    IN_LOSS,    /* loss = op(h, t): the op is the loss */
} row_inputs;

typedef struct kenv kenv;
typedef struct kmem kmem;
typedef struct kout kout;
/* Runs the op's kernels on one backend's memory from the CPU program's
 * tensors, filling `out` (host copies); returns how many. */
typedef int (*kernel_fn)(const kenv *e, kmem *m, kout *out);

typedef struct op_row {
    pw_op_kind op;
    const char *shape;   /* the op's input per sample, e.g. "[3, 17]" */
    const char *attrs;   /* as written in the graph, e.g. "heads=2"; NULL: none */
    row_inputs in;
    int batch;           /* samples per micro-batch */
    double fd_step;      /* 0: FD_STEP */
    double fd_tol;       /* 0: FD_TOL */
    double dev_tol;      /* 0: DEV_TOL */
    const char *zero;    /* parameters whose gradient is exactly 0 by construction
                            (space-separated); checked to be 0, analytic and fd */
    int kink;            /* the op is not differentiable where its input is 0 (relu):
                            an element whose evaluations (±h, ±2h) move any of the
                            op's inputs across 0 is left out (at most a quarter) */
    kernel_fn kernels;   /* NULL: no bit-identity promise to check */
    uint64_t seed;       /* 0: SEED. Another one where SEED's data make a check
                            vacuous (the row's comment says which) */
} op_row;

static int kern_linear(const kenv *e, kmem *m, kout *out);
static int kern_relu(const kenv *e, kmem *m, kout *out);
static int kern_gelu(const kenv *e, kmem *m, kout *out);
static int kern_layernorm(const kenv *e, kmem *m, kout *out);
static int kern_add(const kenv *e, kmem *m, kout *out);
static int kern_copy(const kenv *e, kmem *m, kout *out);
static int kern_xent(const kenv *e, kmem *m, kout *out);
static int kern_embedding(const kenv *e, kmem *m, kout *out);
static int kern_pos_embedding(const kenv *e, kmem *m, kout *out);
static int kern_dropout(const kenv *e, kmem *m, kout *out);

static op_row rows[] = {
    /* linear: with and without bias, 1-D to 3-D inputs (over the last dim) */
    {PW_OP_LINEAR, "[1]", "out=1", IN_ONE, 1, .kernels = kern_linear},
    {PW_OP_LINEAR, "[3]", "out=17", IN_ONE, 2, .kernels = kern_linear},
    {PW_OP_LINEAR, "[4, 5]", "out=3, bias=false", IN_ONE, 3, .kernels = NULL},
    {PW_OP_LINEAR, "[2, 3, 16]", "out=7", IN_ONE, 2, .kernels = kern_linear},
    {PW_OP_LINEAR, "[17]", "out=33, bias=false", IN_ONE, 1, .kernels = NULL},
    {PW_OP_LINEAR, "[33]", "out=16", IN_ONE, 3, .kernels = kern_linear},

    /* [1]: seed 6, as SEED's pre-activations are all negative at [1] */
    {PW_OP_RELU, "[1]", NULL, IN_ONE, 4, RELU_STEP, .kink = 1, .kernels = kern_relu, .seed = 6},
    {PW_OP_RELU, "[17]", NULL, IN_ONE, 3, RELU_STEP, .kink = 1, .kernels = kern_relu},
    {PW_OP_RELU, "[3, 16]", NULL, IN_ONE, 2, RELU_STEP, .kink = 1, .kernels = kern_relu},
    {PW_OP_RELU, "[2, 3, 5]", NULL, IN_ONE, 2, RELU_STEP, .kink = 1, .kernels = kern_relu},

    {PW_OP_GELU, "[1]", NULL, IN_ONE, 1, .kernels = kern_gelu},
    {PW_OP_GELU, "[17]", NULL, IN_ONE, 3, .kernels = kern_gelu},
    {PW_OP_GELU, "[3, 16]", NULL, IN_ONE, 2, .kernels = kern_gelu},
    {PW_OP_GELU, "[2, 3, 5]", NULL, IN_ONE, 2, .kernels = kern_gelu},

    /* d = 1: the output is the bias whatever x is, so nothing before the
     * op and not its weight get a gradient */
    {PW_OP_LAYERNORM, "[1]", NULL, IN_ONE, 2, .zero = "pre.weight pre.bias op.weight",
     .kernels = kern_layernorm},
    {PW_OP_LAYERNORM, "[3]", NULL, IN_ONE, 2, .kernels = kern_layernorm},
    {PW_OP_LAYERNORM, "[16]", NULL, IN_ONE, 3, .kernels = kern_layernorm},
    {PW_OP_LAYERNORM, "[3, 17]", NULL, IN_ONE, 2, .kernels = kern_layernorm},
    {PW_OP_LAYERNORM, "[2, 2, 33]", "eps=1e-3", IN_ONE, 1, .kernels = kern_layernorm},

    {PW_OP_ADD, "[1]", NULL, IN_TWO, 1, .kernels = kern_add},
    {PW_OP_ADD, "[17]", NULL, IN_TWO, 2, .kernels = kern_add},
    {PW_OP_ADD, "[3, 5]", NULL, IN_SAME, 2, .kernels = kern_add},
    {PW_OP_ADD, "[2, 16]", NULL, IN_TWO, 3, .kernels = kern_add},

    {PW_OP_FLATTEN, "[1]", NULL, IN_ONE, 1, .kernels = kern_copy},
    {PW_OP_FLATTEN, "[3, 5]", NULL, IN_ONE, 2, .kernels = kern_copy},
    {PW_OP_FLATTEN, "[2, 3, 4]", NULL, IN_ONE, 3, .kernels = kern_copy},

    {PW_OP_RESHAPE, "[1]", "shape=[1, 1]", IN_ONE, 1, .kernels = kern_copy},
    {PW_OP_RESHAPE, "[3, 5]", "shape=[5, 3]", IN_ONE, 2, .kernels = kern_copy},
    {PW_OP_RESHAPE, "[2, 6]", "shape=[-1]", IN_ONE, 3, .kernels = kern_copy},
    {PW_OP_RESHAPE, "[4, 6]", "shape=[2, -1, 4]", IN_ONE, 2, .kernels = kern_copy},
    {PW_OP_RESHAPE, "[17]", "shape=[1, 17, 1]", IN_ONE, 2, .kernels = kern_copy},

    /* C = 1: log softmax of one class is 0 whatever the logit: no gradient */
    {PW_OP_SOFTMAX_XENT, "[1]", NULL, IN_LOSS, 2, .zero = "pre.weight pre.bias",
     .kernels = kern_xent},
    {PW_OP_SOFTMAX_XENT, "[2]", NULL, IN_LOSS, 3, .kernels = kern_xent},
    {PW_OP_SOFTMAX_XENT, "[17]", NULL, IN_LOSS, 2, .kernels = kern_xent},
    {PW_OP_SOFTMAX_XENT, "[1, 5]", NULL, IN_LOSS, 1, .kernels = kern_xent},
    {PW_OP_SOFTMAX_XENT, "[3, 17]", NULL, IN_LOSS, 2, .kernels = kern_xent},
    {PW_OP_SOFTMAX_XENT, "[2, 3, 33]", NULL, IN_LOSS, 2, .kernels = kern_xent},

    /* token ids: one id (scalar tokens), repeats (a row gathered twice sums
     * its gradients), unused rows (zero gradient), 2-D tokens */
    {PW_OP_EMBEDDING, "[]", "vocab=1, dim=1", IN_TOKENS, 1, .kernels = kern_embedding},
    {PW_OP_EMBEDDING, "[1]", "vocab=3, dim=2", IN_TOKENS, 2, .kernels = kern_embedding},
    {PW_OP_EMBEDDING, "[7]", "vocab=5, dim=3", IN_TOKENS, 2, .kernels = kern_embedding},
    {PW_OP_EMBEDDING, "[3]", "vocab=17, dim=16", IN_TOKENS, 3, .kernels = kern_embedding},
    {PW_OP_EMBEDDING, "[2, 9]", "vocab=50, dim=17", IN_TOKENS, 2, .kernels = kern_embedding},

    {PW_OP_POS_EMBEDDING, "[1, 1]", NULL, IN_ONE, 1, .kernels = kern_pos_embedding},
    {PW_OP_POS_EMBEDDING, "[3, 5]", NULL, IN_ONE, 2, .kernels = kern_pos_embedding},
    {PW_OP_POS_EMBEDDING, "[5, 17]", "max=8", IN_ONE, 2, .kernels = kern_pos_embedding},
    {PW_OP_POS_EMBEDDING, "[17, 3]", NULL, IN_ONE, 3, .kernels = kern_pos_embedding},
    {PW_OP_POS_EMBEDDING, "[33, 4]", "max=40", IN_ONE, 1, .kernels = kern_pos_embedding},

    /* [T, 3D]: T = 1; head widths 1 to 12; T = 33 crosses the kernel's
     * 32-row blocks (PW_ATTENTION_BLOCK). GEMMs only: no bit promise. */
    {PW_OP_CAUSAL_ATTENTION, "[1, 3]", "heads=1", IN_ONE, 1, .kernels = NULL},
    {PW_OP_CAUSAL_ATTENTION, "[1, 12]", "heads=2", IN_ONE, 2, .kernels = NULL},
    {PW_OP_CAUSAL_ATTENTION, "[3, 9]", "heads=3", IN_ONE, 2, .kernels = NULL},
    {PW_OP_CAUSAL_ATTENTION, "[5, 24]", "heads=2", IN_ONE, 2, .kernels = NULL},
    {PW_OP_CAUSAL_ATTENTION, "[17, 48]", "heads=4", IN_ONE, 1, .kernels = NULL},
    {PW_OP_CAUSAL_ATTENTION, "[33, 12]", "heads=1", IN_ONE, 2, .kernels = NULL},
    {PW_OP_CAUSAL_ATTENTION, "[33, 48]", "heads=4", IN_ONE, 1, .kernels = NULL},

    /* p > 0: the harness sets the same (seed, step, offset) before every
     * training forward, so the masks are the same in every evaluation */
    {PW_OP_DROPOUT, "[17]", "p=0", IN_ONE, 2, .kernels = NULL},
    /* [1]: B = 5, as SEED's masks drop samples 0-3 */
    {PW_OP_DROPOUT, "[1]", "p=0.5", IN_ONE, 5, .kernels = kern_dropout},
    {PW_OP_DROPOUT, "[3, 17]", "p=0.5", IN_ONE, 2, .kernels = kern_dropout},
    {PW_OP_DROPOUT, "[2, 33]", "p=0.1", IN_ONE, 3, .kernels = kern_dropout},
    {PW_OP_DROPOUT, "[16]", "p=0.9", IN_ONE, 2, .kernels = kern_dropout},
};

#define N_ROWS ((int)(sizeof rows / sizeof rows[0]))

/* Each parameterized test runs once per row. Criterion hands the tests a
 * copy of the parameters in a new process, where pointers into this binary
 * need not hold: the parameter is the row's index. */
static struct criterion_test_params row_params(void)
{
    static int idx[N_ROWS];
    for (int i = 0; i < N_ROWS; i++) idx[i] = i;
    return cr_make_param_array(int, idx, N_ROWS);
}

/* ---------------------------------------------------------------- a row's graph */

typedef struct tcase {
    const op_row *r;
    char name[160];      /* "causal_attention(heads=2) [5, 24] B=2": every message starts with it */
    char text[1024];     /* the graph */
    pw_graph *g;
    int node;            /* the op's node */
} tcase;

static double fd_step(const op_row *r) { return r->fd_step > 0 ? r->fd_step : FD_STEP; }
static double fd_tol(const op_row *r) { return r->fd_tol > 0 ? r->fd_tol : FD_TOL; }
static double dev_tol(const op_row *r) { return r->dev_tol > 0 ? r->dev_tol : DEV_TOL; }
static uint64_t row_seed(const op_row *r) { return r->seed ? r->seed : SEED; }

/* The last dimension of "[a, b, c]" (0 for "[]"), and the shape without it. */
static int64_t last_dim(const char *shape, char *lead, size_t n)
{
    const char *comma = strrchr(shape, ',');
    const char *last = comma ? comma + 1 : shape + 1;
    if (comma)
        snprintf(lead, n, "%.*s]", (int)(comma - shape), shape);
    else
        snprintf(lead, n, "[]");
    return strtoll(last, NULL, 10);
}

static void case_open(tcase *c, const op_row *r)
{
    memset(c, 0, sizeof *c);
    c->r = r;
    const char *op = pw_op_name(r->op);
    snprintf(c->name, sizeof c->name, "%s(%s) %s B=%d", op, r->attrs ? r->attrs : "", r->shape,
             r->batch);
    char lead[96];
    const int64_t last = last_dim(r->shape, lead, sizeof lead);
    const char *args = r->in == IN_TWO ? "h, h2" : r->in == IN_SAME ? "h, h"
                       : r->in == IN_TOKENS ? "x" : r->in == IN_LOSS ? "h, t" : "h";
    char attrs[96] = "";
    if (r->attrs) snprintf(attrs, sizeof attrs, ", %s", r->attrs);
    size_t k = 0, cap = sizeof c->text;
    k += (size_t)snprintf(c->text + k, cap - k, "graph op_table\ninput x : %s%s\nlabel t : i32%s\n",
                          r->in == IN_TOKENS ? "i32" : "f32", r->shape,
                          r->in == IN_LOSS ? lead : "[]");
    if (r->in != IN_TOKENS)
        k += (size_t)snprintf(c->text + k, cap - k, "h = linear(x, out=%lld) as pre\n",
                              (long long)last);
    if (r->in == IN_TWO)
        k += (size_t)snprintf(c->text + k, cap - k, "h2 = linear(x, out=%lld) as pre2\n",
                              (long long)last);
    if (r->in == IN_LOSS)
        k += (size_t)snprintf(c->text + k, cap - k, "loss = %s(%s%s)\n", op, args, attrs);
    else
        k += (size_t)snprintf(c->text + k, cap - k,
                              "y = %s(%s%s) as op\nf = flatten(y)\n"
                              "logits = linear(f, out=%d) as post\n"
                              "loss = softmax_cross_entropy(logits, t)\n",
                              op, args, attrs, POST_CLASSES);
    cr_assert_lt(k, cap, "%s: graph text too long", c->name);
    cr_assert_eq(pw_graph_parse_string(c->text, strlen(c->text), "op_table.graph", &c->g), PW_OK,
                 "%s: %s\n%s", c->name, pw_last_error(), c->text);
    c->node = -1; /* the node defining y (or the loss) */
    const char *vname = r->in == IN_LOSS ? "loss" : "y";
    for (int i = 0; i < c->g->n_nodes; i++)
        if (!strcmp(c->g->values[c->g->nodes[i].output].name, vname)) c->node = i;
    cr_assert(c->node >= 0 && c->g->nodes[c->node].op == r->op, "%s: no %s node in\n%s", c->name,
              op, c->text);
}

static void case_close(tcase *c) { pw_graph_destroy(c->g); }

/* Micro-batch elements of value v. */
static int64_t value_numel(const tcase *c, int v)
{
    return (int64_t)c->r->batch * pw_shape_numel(&c->g->values[v].shape);
}

/* A program for the row on `device` (NULL: the CPU) with the row's data and
 * parameters: the same values on every backend. Parameters are not the
 * graph's initialisation (layernorm's weight of ones would hide a backward
 * that forgets it): 2-D ones U(−1, 1)/√cols, 1-D ones U(−1, 1). */
static pw_program *case_program(tcase *c, const char *device)
{
    const pw_graph *g = c->g;
    pw_program_config pc = {.graph = g, .micro_batch = c->r->batch, .slots = 1,
                            .optim = pw_optim_defaults(PW_OPTIM_SGD), .device = device};
    pw_program *p = NULL;
    OK(pw_program_create(&pc, &p));
    for (int i = 0; i < pw_program_n_params(p); i++) {
        pw_program_param pp;
        pw_program_param_at(p, i, &pp);
        float *v = malloc((size_t)pp.numel * sizeof(float));
        cr_assert_not_null(v);
        const int64_t cols = pp.shape.d[pp.shape.ndim - 1];
        const double a = pp.shape.ndim >= 2 ? 1.0 / sqrt((double)cols) : 1.0;
        const uint64_t key = pw_rng_key(row_seed(c->r), pp.name);
        for (int64_t j = 0; j < pp.numel; j++)
            v[j] = (float)(a * (2.0 * pw_rng_uniform(key, (uint64_t)j) - 1.0));
        OK(pw_program_param_write(p, i, PW_PARAM_DATA, v));
        free(v);
    }
    /* The input: U(−1, 1), or token ids with the first id 0, the last
     * vocab − 1 and a repeat; the labels below the classes. */
    const int64_t nx = value_numel(c, g->input);
    const uint64_t kx = pw_rng_key(row_seed(c->r), "x");
    if (c->r->in == IN_TOKENS) {
        int32_t *tok = pw_program_data(p, g->input, 0);
        const int64_t vocab = g->nodes[c->node].attrs.vocab;
        for (int64_t i = 0; i < nx; i++)
            tok[i] = (int32_t)(pw_rng_u64(kx, (uint64_t)i) % (uint64_t)vocab);
        tok[0] = 0;
        tok[nx - 1] = (int32_t)(vocab - 1);
        if (nx > 2) tok[1] = tok[nx - 1];
    } else {
        float *x = pw_program_data(p, g->input, 0);
        for (int64_t i = 0; i < nx; i++) x[i] = 2.0f * pw_rng_uniform(kx, (uint64_t)i) - 1.0f;
    }
    const pw_value *logits = &g->values[g->nodes[g->n_nodes - 1].inputs[0]];
    const int64_t C = logits->shape.d[logits->shape.ndim - 1];
    int32_t *lab = pw_program_data(p, g->label, 0);
    const uint64_t kt = pw_rng_key(row_seed(c->r), "t");
    for (int64_t i = 0; i < value_numel(c, g->label); i++)
        lab[i] = (int32_t)(pw_rng_u64(kt, (uint64_t)i) % (uint64_t)C);
    return p;
}

/* The training loss of the micro-batch (the mean over its positions, what
 * the gradients are of), after a training forward with the row's fixed
 * dropout masks. */
static double loss_of(const tcase *c, pw_program *p)
{
    if (pw_program_needs_rng(p)) OK(pw_program_set_rng(p, 0, row_seed(c->r), STEP, 0));
    OK(pw_program_forward(p, 0, c->r->batch));
    return pw_program_loss_sum(p, 0) / ((double)c->r->batch * (double)pw_program_loss_positions(p));
}

/* One forward and backward: the loss and every parameter's gradient (host
 * copies, in program parameter order; grads[i] has the i-th numel). */
typedef struct result {
    double loss;
    int n;
    float *grad[PW_MAX_OP_PARAMS * 4];
    int64_t numel[PW_MAX_OP_PARAMS * 4];
    const char *name[PW_MAX_OP_PARAMS * 4];
} result;

static void run(tcase *c, pw_program *p, result *out)
{
    memset(out, 0, sizeof *out);
    pw_program_zero_grads(p);
    out->loss = loss_of(c, p);
    OK(pw_program_backward_input(p, 0));
    OK(pw_program_backward_weight(p, 0));
    pw_program_fold_grads(p);
    out->n = pw_program_n_params(p);
    cr_assert_leq(out->n, PW_MAX_OP_PARAMS * 4, "%s: too many parameters", c->name);
    for (int i = 0; i < out->n; i++) {
        pw_program_param pp;
        pw_program_param_at(p, i, &pp);
        out->numel[i] = pp.numel;
        out->name[i] = pp.name;
        out->grad[i] = malloc((size_t)pp.numel * sizeof(float));
        cr_assert_not_null(out->grad[i]);
        OK(pw_program_param_read(p, i, PW_PARAM_GRAD, 0, out->grad[i]));
    }
}

static void result_free(result *r)
{
    for (int i = 0; i < r->n; i++) free(r->grad[i]);
}

/* Whether parameter `name` is in the row's space-separated `zero` list. */
static int expect_zero(const op_row *r, const char *name)
{
    if (!r->zero) return 0;
    const size_t n = strlen(name);
    for (const char *s = r->zero; (s = strstr(s, name)) != NULL; s += n)
        if ((s == r->zero || s[-1] == ' ') && (s[n] == '\0' || s[n] == ' ')) return 1;
    return 0;
}

/* ---------------------------------------------------------------- the comparator */

/* max over elements of |g − fd| / max(|fd|, FD_FLOOR · max|fd|), and where.
 * NaN counts as infinitely wrong. */
static double fd_error(const double *g, const double *fd, int n, int *worst)
{
    double fmax_ = 0.0;
    for (int i = 0; i < n; i++) fmax_ = fmax(fmax_, fabs(fd[i]));
    const double floor_ = FD_FLOOR * fmax_ > 0.0 ? FD_FLOOR * fmax_ : 1e-30;
    double err = 0.0;
    *worst = 0;
    for (int i = 0; i < n; i++) {
        double e = fabs(g[i] - fd[i]) / fmax(fabs(fd[i]), floor_);
        if (isnan(e)) e = INFINITY;
        if (e > err) {
            err = e;
            *worst = i;
        }
    }
    return err;
}

/* Which elements of a gradient of `numel` to differentiate: all, or the
 * FD_TOP largest analytic ones (where a gradient is, e.g. the rows of the
 * tokens an embedding saw) and an even spread from the first element to
 * the last (where one may be missing). */
#define FD_TOP 8
static int pick(const float *g, int64_t numel, int64_t *idx)
{
    if (numel <= FD_SAMPLES) {
        for (int64_t i = 0; i < numel; i++) idx[i] = i;
        return (int)numel;
    }
    int n = 0;
    for (int t = 0; t < FD_TOP; t++) {
        int64_t best = -1;
        for (int64_t i = 0; i < numel; i++) {
            int taken = 0;
            for (int k = 0; k < n && !taken; k++) taken = idx[k] == i;
            if (!taken && (best < 0 || fabsf(g[i]) > fabsf(g[best]))) best = i;
        }
        idx[n++] = best;
    }
    const int spread = FD_SAMPLES - FD_TOP;
    for (int k = 0; k < spread; k++) {
        const int64_t i = (int64_t)k * (numel - 1) / (spread - 1);
        int taken = 0;
        for (int q = 0; q < FD_TOP && !taken; q++) taken = idx[q] == i;
        if (!taken) idx[n++] = i;
    }
    return n;
}

/* ---------------------------------------------------------------- (a) gradients */

/* Kinked ops (relu): whether any element of the op's input now lies on the
 * other side of 0 than in `ref` (the unperturbed forward's signs). Finite
 * differences across such a crossing measure neither side's derivative. */
static int crossed(const tcase *c, pw_program *p, const unsigned char *ref)
{
    const int v = c->g->nodes[c->node].inputs[0];
    const float *z = pw_program_value(p, v, 0);
    for (int64_t j = 0; j < value_numel(c, v); j++)
        if ((z[j] > 0.0f) != ref[j]) return 1;
    return 0;
}

/* dL/dw by the five-point stencil, (L(w − 2h) − 8L(w − h) + 8L(w + h) −
 * L(w + 2h)) / 12h: truncation O(h⁴) instead of central differences' O(h²),
 * which lets h stay large enough for the fp32 rounding (see FD_STEP). The
 * float steps round by at most half an ulp of w (3e-8 for |w| < 1: under
 * 1e-6 of h).
 * *kinked is set when an evaluation moved an input of a kinked op across 0. */
static double fd_at(const tcase *c, pw_program *p, float *w, double h, const unsigned char *sign,
                    int *kinked)
{
    static const double off[4] = {-2, -1, 1, 2};
    const float w0 = *w;
    double L[4];
    for (int s = 0; s < 4; s++) {
        *w = (float)((double)w0 + off[s] * h);
        L[s] = loss_of(c, p);
        if (sign && crossed(c, p, sign)) *kinked = 1;
    }
    *w = w0;
    /* differences first: a loss that does not move gives exactly 0 */
    return ((L[0] - L[3]) + 8.0 * (L[2] - L[1])) / (12.0 * h);
}

static void check_gradients(tcase *c)
{
    const op_row *r = c->r;
    pw_program *p = case_program(c, NULL);
    result an;
    run(c, p, &an);
    cr_assert(isfinite(an.loss), "%s: loss %g", c->name, an.loss);
    const double h = fd_step(r), tol = fd_tol(r);
    unsigned char *sign = NULL;
    if (r->kink) {
        const int v = c->g->nodes[c->node].inputs[0];
        sign = malloc((size_t)value_numel(c, v));
        cr_assert_not_null(sign);
        (void)loss_of(c, p);
        const float *z = pw_program_value(p, v, 0);
        for (int64_t j = 0; j < value_numel(c, v); j++) sign[j] = z[j] > 0.0f;
    }
    int nonzero = 0;
    for (int i = 0; i < an.n; i++) {
        pw_program_param pp;
        pw_program_param_at(p, i, &pp);
        int64_t idx[FD_SAMPLES];
        double g[FD_SAMPLES], fd[FD_SAMPLES];
        int n = pick(an.grad[i], pp.numel, idx), kinks = 0;
        double gmax = 0.0, fdmax = 0.0;
        for (int k = 0; k < n; k++) {
            float *w = &pp.data[idx[k]];
            int kinked = 0;
            fd[k] = fd_at(c, p, w, h, sign, &kinked);
            if (kinked) { /* drop the element */
                kinks++;
                idx[k] = idx[n - 1];
                k--, n--;
                continue;
            }
            g[k] = an.grad[i][idx[k]];
            fdmax = fmax(fdmax, fabs(fd[k]));
        }
        for (int64_t j = 0; j < pp.numel; j++) gmax = fmax(gmax, fabs((double)an.grad[i][j]));
        cr_assert(n > 0 && kinks <= (n + kinks) / 4, "%s: %s: %d of %d elements cross relu's kink "
                  "within ±2h (h = %.0e): use a smaller step or other data", c->name, pp.name, kinks,
                  n + kinks, h);

        if (expect_zero(r, pp.name)) {
            cr_assert(gmax == 0.0 && fdmax == 0.0,
                      "%s: %s: expected no gradient; max |analytic| %.3g, max |fd| %.3g", c->name,
                      pp.name, gmax, fdmax);
            continue;
        }
        nonzero++;
        cr_assert(fdmax > 0.0, "%s: %s: the loss does not move with it (max |fd| 0): the check "
                  "would be vacuous", c->name, pp.name);
        int worst;
        const double err = fd_error(g, fd, n, &worst);
        cr_log_info("%s: %s: %d of %lld elements (%d across a kink), max err %.3g (tol %.3g, h "
                    "%.0e)", c->name, pp.name, n, (long long)pp.numel, kinks, err, tol, h);
        if (!(err <= tol)) {
            int shown = 0;
            const double floor_ = FD_FLOOR * fdmax;
            for (int k = 0; k < n && shown < 5; k++) {
                const double e = fabs(g[k] - fd[k]) / fmax(fabs(fd[k]), floor_);
                if (e <= tol) continue;
                cr_log_error("%s: %s[%lld]: analytic %.9g fd %.9g (err %.3g)", c->name, pp.name,
                             (long long)idx[k], g[k], fd[k], e);
                shown++;
            }
        }
        cr_assert(err <= tol, "%s: %s: analytic gradient differs from finite differences: max "
                  "err %.3g at element %lld (analytic %.9g, fd %.9g; tol %.3g, h %.0e)", c->name,
                  pp.name, err, (long long)idx[worst], g[worst], fd[worst], tol, h);

        /* The comparator must be able to fail here: a 4·tol scaled copy and
         * one element of the wrong sign are both rejected. */
        double bad[FD_SAMPLES];
        for (int k = 0; k < n; k++) bad[k] = g[k] * (1.0 + 4.0 * tol);
        int w2;
        const double e_scaled = fd_error(bad, fd, n, &w2);
        cr_assert(e_scaled > tol, "%s: %s: a gradient scaled by %.4g passes (err %.3g ≤ tol %.3g)",
                  c->name, pp.name, 1.0 + 4.0 * tol, e_scaled, tol);
        int big = 0;
        for (int k = 1; k < n; k++)
            if (fabs(fd[k]) > fabs(fd[big])) big = k;
        memcpy(bad, g, (size_t)n * sizeof *bad);
        bad[big] = -bad[big];
        const double e_flip = fd_error(bad, fd, n, &w2);
        cr_assert(e_flip > tol, "%s: %s: a gradient with element %lld negated passes (err %.3g)",
                  c->name, pp.name, (long long)idx[big], e_flip);
    }
    cr_assert(nonzero > 0 || r->zero, "%s: no parameter has a gradient", c->name);
    free(sign);
    result_free(&an);
    pw_program_destroy(p);
}

/* ---------------------------------------------------------------- (b) determinism */

static void same_bits(tcase *c, const char *what, const result *a, const result *b)
{
    cr_assert(memcmp(&a->loss, &b->loss, sizeof a->loss) == 0, "%s: %s: loss %.17g vs %.17g",
              c->name, what, a->loss, b->loss);
    cr_assert_eq(a->n, b->n);
    for (int i = 0; i < a->n; i++) {
        if (memcmp(a->grad[i], b->grad[i], (size_t)a->numel[i] * sizeof(float)) == 0) continue;
        int64_t bad = 0, first = -1;
        for (int64_t j = 0; j < a->numel[i]; j++) {
            if (memcmp(&a->grad[i][j], &b->grad[i][j], sizeof(float)) == 0) continue;
            if (first < 0) first = j;
            if (bad++ < 5)
                cr_log_error("%s: %s: %s[%lld]: %.9g vs %.9g", c->name, what, a->name[i],
                             (long long)j, (double)a->grad[i][j], (double)b->grad[i][j]);
        }
        cr_assert_fail("%s: %s: %s: %lld of %lld elements differ (first at %lld)", c->name, what,
                       a->name[i], (long long)bad, (long long)a->numel[i], (long long)first);
    }
}

/* The same row on one thread and on two, in one program run twice and in
 * a fresh program: the same bits (the CPU kernels fix their order whatever
 * the thread count; cpu/ops.h). */
static void check_determinism(tcase *c)
{
    const int threads = pw_cpu_get_threads();
    pw_cpu_set_threads(1);
    pw_program *p = case_program(c, NULL);
    result a, b, d;
    run(c, p, &a);
    run(c, p, &b);
    pw_cpu_set_threads(2);
    pw_program *q = case_program(c, NULL);
    run(c, q, &d);
    pw_cpu_set_threads(threads);
    same_bits(c, "the same program run twice", &a, &b);
    same_bits(c, "a second program on 2 threads", &a, &d);
    result_free(&a), result_free(&b), result_free(&d);
    pw_program_destroy(p);
    pw_program_destroy(q);
}

/* ---------------------------------------------------------------- kernels on one backend */

/* One backend's memory for the kernels hooks: a block from its `open` (the
 * CPU: a host block), handed out in 256-byte pieces. */
struct kmem {
    const pw_backend_i *be;
    void *ctx;
    char *base;
    size_t used, cap;
    void *host;          /* the CPU's block */
    const char *name;    /* the row's, for messages */
};

enum { K_BITS = 0, K_EQUAL, K_TOL };
#define K_TOL_EW 1e-6    /* test_cuda_ops.c's TOL_EW for gelu and the softmax backward */
#define K_MAX_OUT 4

struct kout {
    char what[64];
    void *data;          /* host copy */
    size_t bytes;
    int how;             /* K_BITS memcmp; K_EQUAL == per float (−0 == +0); K_TOL normalised */
    int is_float;
};

/* What a hook reads: the row's CPU program after its forward and backward. */
struct kenv {
    const tcase *c;
    pw_program *p;
    const pw_node *nd;
    int64_t batch;
};

#define KOK(call) cr_assert_eq((call), PW_OK, "%s: %s: %s", m->name, #call, pw_last_error())

static void kmem_open(kmem *m, const pw_backend_i *be, int device, size_t cap, const char *name)
{
    memset(m, 0, sizeof *m);
    m->be = be;
    m->cap = cap;
    m->name = name;
    if (be->open) {
        size_t bytes[PW_MEM_COUNT] = {0};
        void *base[PW_MEM_COUNT];
        bytes[PW_MEM_ACTIVATIONS] = cap;
        KOK(be->open(device, PW_MATH_FP32, "test_op_table kernels", bytes, &m->ctx, base));
        m->base = base[PW_MEM_ACTIVATIONS];
    } else {
        m->host = calloc(1, cap);
        cr_assert_not_null(m->host);
        m->base = m->host;
    }
    if (be->activate) KOK(be->activate(m->ctx));
}

static void kmem_close(kmem *m)
{
    if (m->be->sync) KOK(m->be->sync(m->ctx));
    if (m->be->close) m->be->close(m->ctx);
    free(m->host);
}

/* `bytes` of backend memory holding src (zeros when src is NULL). */
static void *kput(kmem *m, const void *src, size_t bytes)
{
    const size_t size = (bytes + 255) / 256 * 256;
    cr_assert_leq(m->used + size, m->cap, "%s: kernel memory exhausted", m->name);
    void *d = m->base + m->used;
    m->used += size;
    if (src)
        KOK(m->be->upload(m->ctx, d, src, bytes));
    else
        KOK(m->be->zero(m->ctx, d, bytes));
    if (m->be->sync) KOK(m->be->sync(m->ctx)); /* src may be a temporary */
    return d;
}

/* Names a host copy of `bytes` of backend memory d as output `what`. */
static void kget(kmem *m, kout *o, const char *what, const void *d, size_t bytes, int how,
                 int is_float)
{
    snprintf(o->what, sizeof o->what, "%s", what);
    o->data = malloc(bytes ? bytes : 1);
    cr_assert_not_null(o->data);
    KOK(m->be->download(m->ctx, o->data, d, bytes));
    if (m->be->sync) KOK(m->be->sync(m->ctx));
    o->bytes = bytes;
    o->how = how;
    o->is_float = is_float;
}

/* Host tensors of the CPU program: value v (micro-batch), its gradient,
 * and the op's parameter k. */
static void *kval(const kenv *e, int v) { return pw_program_value(e->p, v, 0); }
static float *kgrad(const kenv *e, int v) { return pw_program_grad(e->p, v, 0); }
static int64_t knumel(const kenv *e, int v) { return value_numel(e->c, v); }
static size_t kbytes(const kenv *e, int v) { return (size_t)knumel(e, v) * sizeof(float); }
static const pw_value *kv(const kenv *e, int v) { return &e->c->g->values[v]; }
static int64_t klast(const kenv *e, int v) { return kv(e, v)->shape.d[kv(e, v)->shape.ndim - 1]; }
static const float *kparam(const kenv *e, int k, int64_t *numel)
{
    const int gp = e->nd->params[k];
    for (int i = 0; i < pw_program_n_params(e->p); i++) {
        pw_program_param pp;
        pw_program_param_at(e->p, i, &pp);
        if (pp.graph_param != gp) continue;
        *numel = pp.numel;
        return pp.data;
    }
    cr_assert_fail("%s: parameter %d of the op not in the program", e->c->name, k);
    return NULL;
}

/* linear: db is a column sum over rows in row order — the CPU's bits (dw
 * is a GEMM, compared through the graph). */
static int kern_linear(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], y = e->nd->output;
    const int64_t in = klast(e, x), o = e->nd->attrs.out, rows = knumel(e, x) / in;
    int64_t nw, nb;
    kparam(e, 0, &nw);
    kparam(e, 1, &nb);
    float *xd = kput(m, kval(e, x), kbytes(e, x)), *dyd = kput(m, kgrad(e, y), kbytes(e, y));
    float *dw = kput(m, NULL, (size_t)nw * 4), *db = kput(m, NULL, (size_t)nb * 4);
    KOK(m->be->linear_bwd_weight(m->ctx, dyd, xd, dw, db, rows, in, o));
    kget(m, &out[0], "linear_bwd_weight db", db, (size_t)nb * 4, K_BITS, 1);
    return 1;
}

static int kern_relu(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], y = e->nd->output;
    const int64_t n = knumel(e, y);
    float *xd = kput(m, kval(e, x), kbytes(e, x)), *yd = kput(m, NULL, kbytes(e, y));
    float *yc = kput(m, kval(e, y), kbytes(e, y)), *dyd = kput(m, kgrad(e, y), kbytes(e, y));
    float *dx = kput(m, NULL, kbytes(e, x));
    KOK(m->be->relu_fwd(m->ctx, xd, yd, n));
    KOK(m->be->relu_bwd_input(m->ctx, yc, dyd, dx, n, 0));
    kget(m, &out[0], "relu_fwd", yd, kbytes(e, y), K_EQUAL, 1);
    kget(m, &out[1], "relu_bwd_input", dx, kbytes(e, x), K_EQUAL, 1);
    return 2;
}

static int kern_gelu(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], y = e->nd->output;
    const int64_t n = knumel(e, y);
    float *xd = kput(m, kval(e, x), kbytes(e, x)), *yd = kput(m, NULL, kbytes(e, y));
    float *dyd = kput(m, kgrad(e, y), kbytes(e, y)), *dx = kput(m, NULL, kbytes(e, x));
    KOK(m->be->gelu_fwd(m->ctx, xd, yd, n));
    KOK(m->be->gelu_bwd_input(m->ctx, xd, dyd, dx, n, 0));
    kget(m, &out[0], "gelu_fwd", yd, kbytes(e, y), K_TOL, 1);
    kget(m, &out[1], "gelu_bwd_input", dx, kbytes(e, x), K_TOL, 1);
    return 2;
}

/* layernorm: dw and db are column sums over rows in row order — the CPU's
 * bits, from the CPU's statistics on both sides. */
static int kern_layernorm(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], y = e->nd->output;
    const int64_t d = klast(e, x), rows = knumel(e, x) / d;
    int64_t nw, nb;
    const float *w = kparam(e, 0, &nw), *b = kparam(e, 1, &nb);
    float *ytmp = malloc(kbytes(e, y)), *mean = malloc((size_t)rows * 4);
    float *rstd = malloc((size_t)rows * 4);
    cr_assert(ytmp && mean && rstd);
    pw_cpu_layernorm_fwd(kval(e, x), w, b, ytmp, mean, rstd, rows, d, e->nd->attrs.eps);
    float *xd = kput(m, kval(e, x), kbytes(e, x)), *dyd = kput(m, kgrad(e, y), kbytes(e, y));
    float *md = kput(m, mean, (size_t)rows * 4), *rd = kput(m, rstd, (size_t)rows * 4);
    float *dw = kput(m, NULL, (size_t)d * 4), *db = kput(m, NULL, (size_t)d * 4);
    KOK(m->be->layernorm_bwd_weight(m->ctx, xd, md, rd, dyd, dw, db, rows, d));
    kget(m, &out[0], "layernorm_bwd_weight dw", dw, (size_t)d * 4,
         CPU_MAY_FUSE ? K_TOL : K_BITS, 1);
    kget(m, &out[1], "layernorm_bwd_weight db", db, (size_t)d * 4, K_BITS, 1);
    free(ytmp), free(mean), free(rstd);
    return 2;
}

/* add: the sum, and its backward's copies (overwrite, then accumulate: a
 * value used twice). */
static int kern_add(const kenv *e, kmem *m, kout *out)
{
    const int a = e->nd->inputs[0], b = e->nd->inputs[1], y = e->nd->output;
    const int64_t n = knumel(e, y);
    float *ad = kput(m, kval(e, a), kbytes(e, a)), *bd = kput(m, kval(e, b), kbytes(e, b));
    float *yd = kput(m, NULL, kbytes(e, y)), *dyd = kput(m, kgrad(e, y), kbytes(e, y));
    float *dx = kput(m, kval(e, a), kbytes(e, a)), *acc = kput(m, kval(e, b), kbytes(e, b));
    KOK(m->be->add_fwd(m->ctx, ad, bd, yd, n));
    KOK(m->be->copy_grad(m->ctx, dyd, dx, n, 0));
    KOK(m->be->copy_grad(m->ctx, dyd, acc, n, 1));
    kget(m, &out[0], "add_fwd", yd, kbytes(e, y), K_EQUAL, 1);
    kget(m, &out[1], "copy_grad", dx, kbytes(e, a), K_EQUAL, 1);
    kget(m, &out[2], "copy_grad accumulate", acc, kbytes(e, b), K_EQUAL, 1);
    return 3;
}

/* flatten, reshape: a copy forward, copy_grad backward. */
static int kern_copy(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], y = e->nd->output;
    const int64_t n = knumel(e, y);
    float *xd = kput(m, kval(e, x), kbytes(e, x)), *yd = kput(m, NULL, kbytes(e, y));
    float *dyd = kput(m, kgrad(e, y), kbytes(e, y)), *dx = kput(m, NULL, kbytes(e, x));
    KOK(m->be->copy(m->ctx, yd, xd, kbytes(e, y)));
    KOK(m->be->copy_grad(m->ctx, dyd, dx, n, 0));
    kget(m, &out[0], "copy (forward)", yd, kbytes(e, y), K_BITS, 1);
    kget(m, &out[1], "copy_grad", dx, kbytes(e, x), K_EQUAL, 1);
    return 2;
}

/* softmax cross-entropy's backward from the CPU's probabilities (the
 * forward reduces rows in double in another order: not promised). */
static int kern_xent(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], t = e->nd->inputs[1];
    const int64_t C = klast(e, x), rows = knumel(e, x) / C;
    float *probs = malloc(kbytes(e, x));
    cr_assert_not_null(probs);
    pw_cpu_softmax_xent_fwd(kval(e, x), kval(e, t), probs, rows, C);
    const float scale = (float)(1.0 / (double)rows);
    float *pd = kput(m, probs, kbytes(e, x));
    int32_t *td = kput(m, kval(e, t), (size_t)rows * sizeof(int32_t));
    float *dl = kput(m, NULL, kbytes(e, x));
    KOK(m->be->xent_bwd(m->ctx, pd, td, dl, rows, C, scale, 0));
    kget(m, &out[0], "xent_bwd", dl, kbytes(e, x), K_TOL, 1);
    free(probs);
    return 1;
}

/* embedding: a gather; its gradient adds each token's rows in order — the
 * CPU's bits. */
static int kern_embedding(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], y = e->nd->output;
    const int64_t n = knumel(e, x), V = e->nd->attrs.vocab, D = e->nd->attrs.dim;
    int64_t nw;
    const float *w = kparam(e, 0, &nw);
    int32_t *td = kput(m, kval(e, x), (size_t)n * sizeof(int32_t));
    float *wd = kput(m, w, (size_t)nw * 4), *yd = kput(m, NULL, kbytes(e, y));
    float *dyd = kput(m, kgrad(e, y), kbytes(e, y)), *dw = kput(m, NULL, (size_t)nw * 4);
    KOK(m->be->embedding_fwd(m->ctx, td, wd, yd, n, V, D));
    KOK(m->be->embedding_bwd_weight(m->ctx, td, dyd, dw, n, V, D));
    kget(m, &out[0], "embedding_fwd", yd, kbytes(e, y), K_EQUAL, 1);
    kget(m, &out[1], "embedding_bwd_weight", dw, (size_t)nw * 4, K_BITS, 1);
    return 2;
}

static int kern_pos_embedding(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], y = e->nd->output;
    const int64_t T = kv(e, x)->shape.d[0], D = kv(e, x)->shape.d[1];
    int64_t nw;
    const float *w = kparam(e, 0, &nw);
    float *xd = kput(m, kval(e, x), kbytes(e, x)), *wd = kput(m, w, (size_t)nw * 4);
    float *yd = kput(m, NULL, kbytes(e, y)), *dyd = kput(m, kgrad(e, y), kbytes(e, y));
    float *dw = kput(m, NULL, (size_t)nw * 4);
    KOK(m->be->pos_embedding_fwd(m->ctx, xd, wd, yd, e->batch, T, D));
    KOK(m->be->pos_embedding_bwd_weight(m->ctx, dyd, dw, e->batch, T, D));
    kget(m, &out[0], "pos_embedding_fwd", yd, kbytes(e, y), K_EQUAL, 1);
    kget(m, &out[1], "pos_embedding_bwd_weight", dw, (size_t)nw * 4, K_BITS, 1);
    return 2;
}

/* dropout: the masks of the program's keying (program.h, set_rng) bit for
 * bit, the scaled values and the backward equal. */
static int kern_dropout(const kenv *e, kmem *m, kout *out)
{
    const int x = e->nd->inputs[0], y = e->nd->output;
    const int64_t n = knumel(e, x), per = n / e->batch;
    const float p = e->nd->attrs.p;
    const uint64_t key = pw_rng_u64(pw_rng_key(row_seed(e->c->r), "dropout:y"), STEP);
    float *xd = kput(m, kval(e, x), kbytes(e, x)), *yd = kput(m, NULL, kbytes(e, y));
    uint8_t *mask = kput(m, NULL, (size_t)n);
    float *dyd = kput(m, kgrad(e, y), kbytes(e, y)), *dx = kput(m, NULL, kbytes(e, x));
    KOK(m->be->dropout_fwd(m->ctx, xd, yd, mask, e->batch, per, p, key, 0));
    KOK(m->be->dropout_bwd_input(m->ctx, mask, dyd, dx, n, p, 0));
    kget(m, &out[0], "dropout mask", mask, (size_t)n, K_BITS, 0);
    kget(m, &out[1], "dropout_fwd", yd, kbytes(e, y), K_EQUAL, 1);
    kget(m, &out[2], "dropout_bwd_input", dx, kbytes(e, x), K_EQUAL, 1);
    return 3;
}

/* ---------------------------------------------------------------- (c) backends */

/* max |got − ref| / max |ref| (1 when ref is all zero), NaN as infinite. */
static double norm_error(const float *got, const float *ref, int64_t n, int64_t *worst)
{
    double rmax = 0.0, err = 0.0;
    for (int64_t i = 0; i < n; i++) rmax = fmax(rmax, fabs((double)ref[i]));
    const double norm = rmax > 0.0 ? rmax : 1.0;
    *worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - (double)ref[i]) / norm;
        if (isnan(e)) e = isnan(got[i]) && isnan(ref[i]) ? 0.0 : INFINITY;
        if (e > err) {
            err = e;
            *worst = i;
        }
    }
    return err;
}

/* got against ref: the same bits (memcmp), equal values (== per float, so
 * −0 matches +0), or within tol normalised by max |ref|. On a mismatch the
 * first few differing elements and the max error; the test goes on (and
 * fails at its end), so one run lists every row and output that differs. */
static void compare(const char *row, const char *be, const char *what, const void *got,
                    const void *ref, size_t bytes, int how, int is_float, double tol)
{
    if (how == K_BITS && memcmp(got, ref, bytes) == 0) return;
    if (!is_float) { /* bytes (masks) */
        const uint8_t *a = got, *b = ref;
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < bytes; i++)
            if (a[i] != b[i] && bad++ == 0) first = i;
        cr_expect_fail("%s: %s: %s: %zu of %zu bytes differ from the CPU's (first at %zu: %d vs %d)",
                       row, be, what, bad, bytes, first, a[first], b[first]);
        return;
    }
    const float *a = got, *b = ref;
    const int64_t n = (int64_t)(bytes / sizeof(float));
    int64_t worst, bad = 0;
    const double err = norm_error(a, b, n, &worst);
    double rmax = 0.0;
    for (int64_t i = 0; i < n; i++) rmax = fmax(rmax, fabs((double)b[i]));
    const double norm = rmax > 0.0 ? rmax : 1.0;
    for (int64_t i = 0; i < n; i++) {
        const double e = fabs((double)a[i] - (double)b[i]) / norm;
        const int ok = how == K_BITS ? memcmp(&a[i], &b[i], sizeof(float)) == 0
                       : how == K_EQUAL ? a[i] == b[i] || (isnan(a[i]) && isnan(b[i]))
                       : e <= tol;
        if (ok) continue;
        if (bad++ < 5) {
            uint32_t ua, ub;
            memcpy(&ua, &a[i], 4);
            memcpy(&ub, &b[i], 4);
            cr_log_error("%s: %s: %s[%lld]: %.9g (0x%08x), cpu %.9g (0x%08x)", row, be, what,
                         (long long)i, (double)a[i], ua, (double)b[i], ub);
        }
    }
    if (how == K_TOL)
        cr_expect(err <= tol, "%s: %s: %s: max normalised error %.3g at %lld (tolerance %.3g)",
                  row, be, what, err, (long long)worst, tol);
    else
        cr_expect(bad == 0, "%s: %s: %s: %lld of %lld elements differ from the CPU's %s (max "
                  "normalised error %.3g at %lld)", row, be, what, (long long)bad, (long long)n,
                  how == K_BITS ? "bits" : "values", err, (long long)worst);
}

/* The row on `device` against the CPU: loss and gradients within tol (bit
 * for bit when tol is 0), then the row's kernels from the same tensors. */
static void check_backend(tcase *c, const pw_backend_i *be, int device, double tol)
{
    const op_row *r = c->r;
    char dev[32];
    snprintf(dev, sizeof dev, "%s:%d", be->name, device);
    pw_program *cpu = case_program(c, NULL), *p = case_program(c, dev);
    result ref, got;
    run(c, cpu, &ref);
    run(c, p, &got);
    if (tol == 0.0)
        cr_expect(memcmp(&got.loss, &ref.loss, sizeof ref.loss) == 0,
                  "%s: %s: loss %.17g, the CPU's %.17g", c->name, dev, got.loss, ref.loss);
    else
        cr_expect(fabs(got.loss - ref.loss) <= tol * fmax(1.0, fabs(ref.loss)),
                  "%s: %s: loss %.12g, the CPU's %.12g (tolerance %.3g)", c->name, dev, got.loss,
                  ref.loss, tol);
    cr_assert_eq(got.n, ref.n);
    for (int i = 0; i < ref.n; i++) {
        char what[160];
        snprintf(what, sizeof what, "gradient of %s", ref.name[i]);
        compare(c->name, dev, what, got.grad[i], ref.grad[i], (size_t)ref.numel[i] * 4,
                tol == 0.0 ? K_BITS : K_TOL, 1, tol);
        int64_t w;
        cr_log_info("%s: %s: %s within %.3g of the CPU", c->name, dev, what,
                    norm_error(got.grad[i], ref.grad[i], ref.numel[i], &w));
    }
    if (r->kernels) {
        /* The CPU program's tensors after its forward and backward. */
        kenv e = {.c = c, .p = cpu, .nd = &c->g->nodes[c->node], .batch = r->batch};
        size_t cap = 1 << 16;
        for (int v = 0; v < c->g->n_values; v++)
            cap += 2 * ((size_t)value_numel(c, v) * 4 + 256);
        for (int i = 0; i < ref.n; i++) cap += 2 * ((size_t)ref.numel[i] * 4 + 256);
        kmem mc, md;
        kout oc[K_MAX_OUT], od[K_MAX_OUT];
        kmem_open(&mc, &pw_backend_cpu_i, 0, cap, c->name);
        kmem_open(&md, be, device, cap, c->name);
        const int nc = r->kernels(&e, &mc, oc), nd = r->kernels(&e, &md, od);
        cr_assert_eq(nc, nd);
        for (int k = 0; k < nc; k++) {
            compare(c->name, dev, od[k].what, od[k].data, oc[k].data, oc[k].bytes, od[k].how,
                    od[k].is_float, K_TOL_EW);
            free(oc[k].data), free(od[k].data);
        }
        kmem_close(&mc);
        kmem_close(&md);
    }
    result_free(&ref), result_free(&got);
    pw_program_destroy(p);
    pw_program_destroy(cpu);
}

/* "hostdev": the program's device paths (separate blocks from `open`,
 * uploads, downloads, parameters through param_read/write) over host
 * memory and the CPU's ops, so every result must be the CPU's bits
 * (test_backend.c has the full emulation; this is its minimum). */
typedef struct hostdev {
    void *block[PW_MEM_COUNT];
} hostdev;

static void hd_close(void *ctx)
{
    hostdev *h = ctx;
    if (!h) return;
    for (int k = 0; k < PW_MEM_COUNT; k++) free(h->block[k]);
    free(h);
}

static pw_status hd_open(int device, pw_math math, const char *who, const size_t bytes[PW_MEM_COUNT],
                         void **ctx, void *base[PW_MEM_COUNT])
{
    (void)math;
    if (device != 0)
        return pw_error(PW_ERR_INVALID_ARG, "%s: hostdev has no device %d", who, device);
    hostdev *h = calloc(1, sizeof *h);
    if (!h) return pw_error(PW_ERR_NOMEM, "%s: out of memory", who);
    for (int k = 0; k < PW_MEM_COUNT; k++) {
        base[k] = NULL;
        if (!bytes[k]) continue;
        if (posix_memalign(&h->block[k], 256, bytes[k]) != 0) {
            hd_close(h);
            return pw_error(PW_ERR_NOMEM, "%s: out of memory", who);
        }
        memset(h->block[k], 0, bytes[k]);
        base[k] = h->block[k];
    }
    *ctx = h;
    return PW_OK;
}

static int hd_count(void) { return 1; }
static pw_status hd_sync(void *ctx)
{
    (void)ctx;
    return PW_OK;
}

static pw_backend_i hostdev_i;

static const pw_backend_i *register_hostdev(void)
{
    hostdev_i = pw_backend_cpu_i; /* the CPU's ops... */
    hostdev_i.name = "hostdev";
    hostdev_i.device_memory = 1;  /* ...behind the device paths */
    hostdev_i.open = hd_open;
    hostdev_i.close = hd_close;
    hostdev_i.device_count = hd_count;
    hostdev_i.sync = hd_sync;
    cr_assert_eq(pw_backend_register(&hostdev_i), PW_OK, "%s", pw_last_error());
    const pw_backend_i *be;
    int index;
    cr_assert_eq(pw_backend_find("hostdev:0", &be, &index), PW_OK, "%s", pw_last_error());
    return be;
}

/* ---------------------------------------------------------------- the tests */

ParameterizedTestParameters(op_table, row)
{
    return row_params();
}

/* One test per row: (a), (b), and (c) on the emulated device. */
ParameterizedTest(int *ri, op_table, row, .timeout = TIMEOUT_S)
{
    tcase c;
    case_open(&c, &rows[*ri]);
    check_gradients(&c);
    check_determinism(&c);
    check_backend(&c, register_hostdev(), 0, 0.0);
    case_close(&c);
}

/* (c) on every device backend present: today CUDA's device 0. All rows in
 * one process (one pass over the table, cuBLAS loaded once): each mismatch
 * names its row, and the test goes on to the next. It runs in the binary
 * test_op_table_cuda (CMakeLists.txt: this file linked with pw_cuda, as
 * `test_op_table_cuda --filter op_table/cuda`). */
Test(op_table, cuda, .timeout = TIMEOUT_S)
{
#ifdef PW_OP_TABLE_CUDA
    cr_assert_eq(pw_backend_register(pw_backend_cuda()), PW_OK, "%s", pw_last_error());
#elif defined(PW_HAVE_CUDA)
    cr_skip_test("cuda: runs in test_op_table_cuda (this binary does not link cuBLAS)");
#endif
    const pw_backend_i *be;
    int index;
    if (pw_backend_find("cuda:0", &be, &index) != PW_OK)
        cr_skip_test("cuda: %s", pw_last_error()); /* "built without CUDA" */
    if (be->device_count && be->device_count() < 1)
        cr_skip_test("cuda: no CUDA device (the backend counts 0 devices): the op table ran on the "
                     "CPU and the emulated device only");
    for (int i = 0; i < N_ROWS; i++) {
        tcase c;
        case_open(&c, &rows[i]);
        check_backend(&c, be, 0, dev_tol(&rows[i]));
        case_close(&c);
    }
}

/* ---------------------------------------------------------------- coverage */

Test(op_table, covers_every_op, .timeout = TIMEOUT_S)
{
    for (int op = 0; op < PW_OP_COUNT; op++) {
        int n = 0;
        for (int i = 0; i < N_ROWS; i++) n += rows[i].op == (pw_op_kind)op;
        cr_expect_gt(n, 0, "op '%s' (PW_OP_* %d) has no row in the op table",
                     pw_op_name((pw_op_kind)op), op);
    }
}

/* ------------------------------------------------- tensor-parallel ops */

/* op_table::tensor_parallel: each tensor-parallel op of stages/ops/tp.h
 * (column- and row-parallel linear, vocabulary-parallel embedding and
 * cross-entropy) at T = 1 … 4 ranks, as threads of one in-process group,
 * against the unsplit CPU op on the same data: the forward, the input
 * gradient and the weight gradient, each rank's slices put back together.
 * Sizes include ones that T does not divide (17 over 3, 10 over 4) and
 * ones smaller than T (a rank holding nothing). What tp.h promises bit for
 * bit is compared with memcmp; what changes a sum's order within TP_TOL,
 * normalised (max |split − whole| / max |whole|); at T = 1 everything is
 * the unsplit op's bits. The comparator must reject the result with one
 * element moved by 4·TP_TOL of the largest, so every check can fail. */

#include <pthread.h>

#include "stages/ops/tp.h"

/* A split sum over the input features against the GEMM's own order: fp32
 * rounding of a dot product of ≤ 64 terms of O(1), ~1e-7 relative; 1e-5
 * leaves room while a missing or doubled part (errors of O(1)) cannot hide. */
#define TP_TOL 1e-5

typedef enum tp_kind { TP_COL, TP_ROW, TP_EMB, TP_XENT } tp_kind;
static const char *const tp_kind_name[] = {"column-parallel linear", "row-parallel linear",
                                           "vocabulary-parallel embedding",
                                           "vocabulary-parallel cross-entropy"};

typedef struct tp_shape {
    tp_kind kind;
    int64_t n;   /* rows */
    int64_t a;   /* linear: in; embedding: vocab; cross-entropy: classes */
    int64_t b;   /* linear: out; embedding: d */
    int bias;
} tp_shape;

static const tp_shape tp_shapes[] = {
    {TP_COL, 5, 16, 12, 1}, {TP_COL, 7, 33, 17, 1}, {TP_COL, 3, 8, 2, 0},
    {TP_ROW, 5, 16, 12, 1}, {TP_ROW, 7, 33, 17, 1}, {TP_ROW, 3, 2, 9, 0},
    {TP_EMB, 9, 10, 7, 0},  {TP_EMB, 4, 3, 5, 0},
    {TP_XENT, 9, 10, 0, 0}, {TP_XENT, 6, 17, 0, 0}, {TP_XENT, 5, 3, 0, 0},
};
#define N_TP_SHAPES ((int)(sizeof tp_shapes / sizeof tp_shapes[0]))
#define TP_MAX 4

/* One rank's buffers (its slices) and the group. */
typedef struct tp_env {
    const tp_shape *s;
    int T;
    pw_shm_group *g;
    const float *x, *w, *b, *dy;   /* whole inputs */
    const int32_t *tok;
    /* whole outputs, each rank writing its slice */
    float *y, *dx, *dw, *db;
    double loss[TP_MAX];
    int64_t correct[TP_MAX];
    pw_status st[TP_MAX];
} tp_env;

typedef struct tp_arg {
    tp_env *e;
    int k;
} tp_arg;

static float *tp_floats(int64_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }

static void *tp_rank(void *v)
{
    const tp_arg *a = v;
    tp_env *e = a->e;
    const tp_shape *s = e->s;
    const int k = a->k, T = e->T;
    pw_tp tp = {.rank = k, .size = T, .coll = pw_shm_group_member(e->g, k)};
    const int64_t n = s->n;
    int64_t lo, hi;
    pw_status st = PW_OK;
    switch (s->kind) {
    case TP_COL: { /* w (out, in) by rows */
        const int64_t in = s->a, out = s->b;
        pw_tp_range(out, T, k, &lo, &hi);
        const int64_t ok = hi - lo;
        float *yk = tp_floats(n * ok), *dyk = tp_floats(n * ok), *dx = tp_floats(n * in);
        float *dwk = tp_floats(ok * in), *dbk = tp_floats(ok);
        for (int64_t r = 0; r < n; r++)
            memcpy(dyk + r * ok, e->dy + r * out + lo, (size_t)ok * sizeof(float));
        pw_tp_col_linear_fwd(e->x, e->w + lo * in, s->bias ? e->b + lo : NULL, yk, n, in, ok);
        st = pw_tp_col_linear_bwd_input(&tp, dyk, e->w + lo * in, dx, n, in, ok);
        pw_tp_col_linear_bwd_weight(dyk, e->x, dwk, s->bias ? dbk : NULL, n, in, ok);
        for (int64_t r = 0; r < n; r++) memcpy(e->y + r * out + lo, yk + r * ok, (size_t)ok * sizeof(float));
        memcpy(e->dw + lo * in, dwk, (size_t)(ok * in) * sizeof(float));
        if (s->bias) memcpy(e->db + lo, dbk, (size_t)ok * sizeof(float));
        if (k == T - 1) memcpy(e->dx, dx, (size_t)(n * in) * sizeof(float)); /* every rank holds it */
        free(yk), free(dyk), free(dx), free(dwk), free(dbk);
        break;
    }
    case TP_ROW: { /* w (out, in) by columns, x by columns */
        const int64_t in = s->a, out = s->b;
        pw_tp_range(in, T, k, &lo, &hi);
        const int64_t ik = hi - lo;
        float *xk = tp_floats(n * ik), *wk = tp_floats(out * ik), *y = tp_floats(n * out);
        float *dxk = tp_floats(n * ik), *dwk = tp_floats(out * ik), *db = tp_floats(out);
        for (int64_t r = 0; r < n; r++) memcpy(xk + r * ik, e->x + r * in + lo, (size_t)ik * sizeof(float));
        for (int64_t o = 0; o < out; o++) memcpy(wk + o * ik, e->w + o * in + lo, (size_t)ik * sizeof(float));
        st = pw_tp_row_linear_fwd(&tp, xk, wk, s->bias ? e->b : NULL, y, n, ik, out);
        pw_tp_row_linear_bwd_input(e->dy, wk, dxk, n, ik, out, 0);
        pw_tp_row_linear_bwd_weight(e->dy, xk, dwk, s->bias ? db : NULL, n, ik, out);
        for (int64_t r = 0; r < n; r++) memcpy(e->dx + r * in + lo, dxk + r * ik, (size_t)ik * sizeof(float));
        for (int64_t o = 0; o < out; o++) memcpy(e->dw + o * in + lo, dwk + o * ik, (size_t)ik * sizeof(float));
        if (k == T - 1) {
            memcpy(e->y, y, (size_t)(n * out) * sizeof(float));
            if (s->bias) memcpy(e->db, db, (size_t)out * sizeof(float));
        }
        free(xk), free(wk), free(y), free(dxk), free(dwk), free(db);
        break;
    }
    case TP_EMB: { /* table (vocab, d) by rows */
        const int64_t vocab = s->a, d = s->b;
        pw_tp_range(vocab, T, k, &lo, &hi);
        float *y = tp_floats(n * d), *dwk = tp_floats((hi - lo) * d);
        st = pw_tp_embedding_fwd(&tp, e->tok, e->w + lo * d, y, n, vocab, d);
        pw_tp_embedding_bwd_weight(&tp, e->tok, e->dy, dwk, n, vocab, d);
        memcpy(e->dw + lo * d, dwk, (size_t)((hi - lo) * d) * sizeof(float));
        if (k == T - 1) memcpy(e->y, y, (size_t)(n * d) * sizeof(float));
        free(y), free(dwk);
        break;
    }
    case TP_XENT: { /* logits (n, C) by columns; y = probs, dx = dlogits */
        const int64_t C = s->a;
        pw_tp_range(C, T, k, &lo, &hi);
        const int64_t ck = hi - lo;
        float *lk = tp_floats(n * ck), *pk = tp_floats(n * ck), *dk = tp_floats(n * ck);
        float *scratch = tp_floats(pw_tp_xent_scratch(n, T));
        for (int64_t r = 0; r < n; r++) memcpy(lk + r * ck, e->x + r * C + lo, (size_t)ck * sizeof(float));
        st = pw_tp_xent_fwd(&tp, lk, e->tok, pk, scratch, n, C, &e->loss[k], &e->correct[k]);
        pw_tp_xent_bwd(&tp, pk, e->tok, dk, n, C, 0.25f, 0);
        for (int64_t r = 0; r < n; r++) {
            memcpy(e->y + r * C + lo, pk + r * ck, (size_t)ck * sizeof(float));
            memcpy(e->dx + r * C + lo, dk + r * ck, (size_t)ck * sizeof(float));
        }
        free(lk), free(pk), free(dk), free(scratch);
        break;
    }
    }
    e->st[k] = st;
    return NULL;
}

/* max |got − want| / max |want| (0 when both are 0). */
static double tp_err(const float *got, const float *want, int64_t n)
{
    double d = 0.0, m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)got[i] - (double)want[i]));
        m = fmax(m, fabs((double)want[i]));
    }
    return m > 0.0 ? d / m : d;
}

/* `exact`: memcmp; else within TP_TOL normalised. Also checks that the
 * comparator rejects `got` with its largest element moved by 4·TP_TOL of
 * the tensor's largest (or, for exact, by one ulp). */
static void tp_compare(const char *row, const char *what, const float *got, const float *want, int64_t n,
                       int exact)
{
    if (n == 0) return;
    if (exact) {
        int64_t i = 0;
        while (i < n && memcmp(&got[i], &want[i], sizeof(float)) == 0) i++;
        cr_expect_eq(i, n, "%s: %s: element %lld is %.9g, the unsplit op's %.9g (promised bit for bit)", row,
                     what, (long long)i, i < n ? got[i] : 0.0, i < n ? want[i] : 0.0);
    } else {
        double err = tp_err(got, want, n);
        cr_expect_leq(err, TP_TOL, "%s: %s: max normalised error %.3g > %.1g", row, what, err, TP_TOL);
    }
    /* the check can fail */
    float *bad = tp_floats(n);
    memcpy(bad, got, (size_t)n * sizeof(float));
    int64_t at = 0;
    for (int64_t i = 1; i < n; i++)
        if (fabsf(want[i]) > fabsf(want[at])) at = i;
    double scale = fabs((double)want[at]) > 0 ? fabs((double)want[at]) : 1.0;
    bad[at] = exact ? nextafterf(bad[at], INFINITY) : (float)(bad[at] + 4.0 * TP_TOL * scale);
    int rejected = exact ? memcmp(bad, want, (size_t)n * sizeof(float)) != 0 : tp_err(bad, want, n) > TP_TOL;
    cr_expect(rejected, "%s: %s: the comparator accepted a wrong result", row, what);
    free(bad);
}

/* uniform in [0, 1) */
static float tp_u(pw_rng *r) { return (float)(pw_rng_next(r) >> 40) / 16777216.0f; }

static int tp_case_count(void) { return N_TP_SHAPES * TP_MAX; }

ParameterizedTestParameters(op_table, tensor_parallel)
{
    static int idx[N_TP_SHAPES * TP_MAX];
    for (int i = 0; i < tp_case_count(); i++) idx[i] = i;
    return cr_make_param_array(int, idx, (size_t)tp_case_count());
}

ParameterizedTest(int *ci, op_table, tensor_parallel, .timeout = TIMEOUT_S)
{
    const tp_shape *s = &tp_shapes[*ci / TP_MAX];
    const int T = *ci % TP_MAX + 1;
    char row[160];
    snprintf(row, sizeof row, "%s n=%lld a=%lld b=%lld%s T=%d", tp_kind_name[s->kind], (long long)s->n,
             (long long)s->a, (long long)s->b, s->bias ? " bias" : "", T);
    const int64_t n = s->n, A = s->a, B = s->kind == TP_XENT ? s->a : s->b;
    /* whole tensors: x (n, A), w (B, A) or (A, B), b (B), dy (n, B); tokens */
    const int64_t wn = A * (s->b ? s->b : 1);
    float *x = tp_floats(n * A), *w = tp_floats(wn), *b = tp_floats(B), *dy = tp_floats(n * B);
    int32_t *tok = calloc((size_t)n, sizeof(int32_t));
    pw_rng rng = pw_rng_make(pw_rng_key(SEED + (uint64_t)(*ci / TP_MAX), "tensor_parallel"));
    for (int64_t i = 0; i < n * A; i++) x[i] = tp_u(&rng) * 4.0f - 2.0f;
    for (int64_t i = 0; i < wn; i++) w[i] = tp_u(&rng) - 0.5f;
    for (int64_t i = 0; i < B; i++) b[i] = tp_u(&rng) - 0.5f;
    for (int64_t i = 0; i < n * B; i++) dy[i] = tp_u(&rng) - 0.5f;
    for (int64_t r = 0; r < n; r++) tok[r] = (int32_t)pw_rng_below(&rng, (uint64_t)A);
    if (s->kind == TP_EMB) tok[n - 1] = (int32_t)A; /* out of range: a zero row, no gradient */
    if (s->kind == TP_EMB) dy = realloc(dy, (size_t)(n * s->b) * sizeof(float));
    if (s->kind == TP_EMB)
        for (int64_t i = 0; i < n * s->b; i++) dy[i] = tp_u(&rng) - 0.5f;

    /* the unsplit op */
    const int64_t ny = s->kind == TP_EMB ? n * s->b : n * B;
    float *y0 = tp_floats(ny), *dx0 = tp_floats(n * A), *dw0 = tp_floats(wn), *db0 = tp_floats(B);
    double loss0 = 0.0;
    int64_t correct0 = 0;
    switch (s->kind) {
    case TP_COL:
    case TP_ROW:
        pw_cpu_linear_fwd(x, w, s->bias ? b : NULL, y0, n, A, B);
        pw_cpu_linear_bwd_input(dy, w, dx0, n, A, B, 0);
        pw_cpu_linear_bwd_weight(dy, x, dw0, s->bias ? db0 : NULL, n, A, B);
        break;
    case TP_EMB:
        pw_cpu_embedding_fwd(tok, w, y0, n, A, s->b);
        pw_cpu_embedding_bwd_weight(tok, dy, dw0, n, A, s->b);
        break;
    case TP_XENT:
        loss0 = pw_cpu_softmax_xent_fwd_count(x, tok, y0, n, A, &correct0);
        pw_cpu_softmax_xent_bwd(y0, tok, dx0, n, A, 0.25f, 0);
        break;
    }

    /* split over T ranks */
    tp_env e = {.s = s, .T = T, .x = x, .w = w, .b = b, .dy = dy, .tok = tok};
    e.y = tp_floats(ny), e.dx = tp_floats(n * A), e.dw = tp_floats(wn), e.db = tp_floats(B);
    cr_assert_eq(pw_shm_group_create(T, &e.g), PW_OK, "%s", pw_last_error());
    pthread_t th[TP_MAX];
    tp_arg args[TP_MAX];
    for (int k = 0; k < T; k++) {
        args[k] = (tp_arg){&e, k};
        cr_assert_eq(pthread_create(&th[k], NULL, tp_rank, &args[k]), 0);
    }
    for (int k = 0; k < T; k++) pthread_join(th[k], NULL);
    pw_shm_group_destroy(e.g);
    for (int k = 0; k < T; k++) cr_assert_eq(e.st[k], PW_OK, "%s: rank %d: %s", row, k, pw_last_error());

    /* What tp.h promises bit for bit at every T, and within rounding. */
    const int one = T == 1;
    switch (s->kind) {
    case TP_COL:
        tp_compare(row, "forward y", e.y, y0, n * B, one);
        tp_compare(row, "input gradient dx (summed over ranks)", e.dx, dx0, n * A, one);
        tp_compare(row, "weight gradient dw", e.dw, dw0, wn, 1);
        if (s->bias) tp_compare(row, "bias gradient db", e.db, db0, B, 1);
        break;
    case TP_ROW:
        tp_compare(row, "forward y (summed over ranks)", e.y, y0, n * B, one);
        tp_compare(row, "input gradient dx", e.dx, dx0, n * A, one);
        tp_compare(row, "weight gradient dw", e.dw, dw0, wn, 1);
        if (s->bias) tp_compare(row, "bias gradient db", e.db, db0, B, 1);
        break;
    case TP_EMB:
        tp_compare(row, "forward y", e.y, y0, ny, 1);
        tp_compare(row, "weight gradient dw", e.dw, dw0, wn, 1);
        break;
    case TP_XENT:
        tp_compare(row, "probabilities", e.y, y0, n * A, one);
        tp_compare(row, "input gradient dlogits", e.dx, dx0, n * A, one);
        for (int k = 0; k < T; k++) {
            double rel = fabs(e.loss[k] - loss0) / fmax(fabs(loss0), 1e-30);
            cr_expect(one ? e.loss[k] == loss0 : rel <= TP_TOL, "%s: rank %d's loss %.17g, the unsplit op's %.17g",
                      row, k, e.loss[k], loss0);
            cr_expect(e.loss[k] == e.loss[0], "%s: rank %d's loss differs from rank 0's", row, k);
            cr_expect_eq(e.correct[k], correct0, "%s: rank %d counts %lld right, the unsplit op %lld", row, k,
                         (long long)e.correct[k], (long long)correct0);
        }
        break;
    }
    free(x), free(w), free(b), free(dy), free(tok), free(y0), free(dx0), free(dw0), free(db0);
    free(e.y), free(e.dx), free(e.dw), free(e.db);
}

/* A forward over an aborted group returns the collective's error, not a hang. */
Test(op_table, tensor_parallel_abort, .timeout = TIMEOUT_S)
{
    pw_shm_group *g;
    cr_assert_eq(pw_shm_group_create(2, &g), PW_OK);
    atomic_int stop = 1;
    pw_tp tp = {.rank = 0, .size = 2, .coll = pw_shm_group_member(g, 0), .abort = &stop};
    float y[4] = {0};
    int32_t tok[2] = {0, 1};
    float w[4] = {1, 2, 3, 4};
    pw_status st = pw_tp_embedding_fwd(&tp, tok, w, y, 2, 4, 2);
    cr_expect_eq(st, PW_ERR_TIMEOUT, "an aborted all-reduce returned %s", pw_status_str(st));
    pw_shm_group_destroy(g);
}
