/* pipewright — graph module internals: limits, the op table, the syntax tree
 * the parser builds, and the small helpers (pool, string map, errors) the
 * parser (parse.c), the lowering pass (lower.c) and the op table (ops.c) share.
 *
 * Pipeline: text ──parse.c──▶ pw_ast (statements, repeat bodies unexpanded)
 *                ──lower.c──▶ pw_graph (repeats expanded, names resolved,
 *                              shapes inferred by ops.c, params created).
 */
#ifndef PW_GRAPH_GRAPH_INTERNAL_H
#define PW_GRAPH_GRAPH_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "graph/graph.h"

/* ------------------------------------------------------------------ limits */
#define PW_GRAPH_MAX_NUMEL ((int64_t)1 << 40) /* per value and per parameter */
#define PW_GRAPH_MAX_NAME 255                 /* characters in one name/path token */
#define PW_GRAPH_MAX_REPEAT 100000            /* repeat count */
#define PW_GRAPH_MAX_DEPTH 16                 /* repeat nesting */
#define PW_GRAPH_MAX_NODES (1 << 20)          /* after repeat expansion */
#define PW_GRAPH_MAX_EMPTY_ITERATIONS (1 << 20) /* repeat iterations that make no
                                                 node (a body of one `return`) */
#define PW_GRAPH_MAX_NAME_BYTES ((size_t)256 << 20) /* generated value, scope and
                                                 parameter names after expansion */
#define PW_GRAPH_MAX_FILE ((size_t)64 << 20)  /* bytes */
#define PW_GRAPH_MAX_ATTRS 8                  /* attributes one op may declare */
#define PW_GRAPH_MAX_LIST 16                  /* elements of an attribute list */

/* Source position, 1-based; columns count bytes (a tab is 1). */
typedef struct pw_pos {
    int line, col;
} pw_pos;

/* "FILE:LINE:COL: error: MESSAGE" into pw_last_error(); returns st. */
pw_status pw_graph_err(pw_status st, const char *file, pw_pos pos, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* a·b into *out when both are ≥ 0 and the product ≤ PW_GRAPH_MAX_NUMEL;
 * returns 0 on success, -1 when it would exceed the limit. */
int pw_graph_mul_checked(int64_t a, int64_t b, int64_t *out);

/* Levenshtein distance, or cap + 1 once it is known to exceed `cap`. */
int pw_edit_distance(const char *a, const char *b, int cap);

/* ------------------------------------------------------------------ op table */
typedef enum pw_attr_kind {
    PW_ATTR_INT = 0,
    PW_ATTR_FLOAT,     /* an integer literal is accepted and converted */
    PW_ATTR_BOOL,
    PW_ATTR_NAME,      /* identifier or dotted path */
    PW_ATTR_INTS,      /* [1, 2, 3] */
} pw_attr_kind;

typedef struct pw_attr_spec {
    const char *key;
    pw_attr_kind kind;
    int required;
} pw_attr_spec;

typedef struct pw_op_spec {
    pw_op_kind op;
    const char *name;                         /* as written in files */
    int n_inputs;
    const char *inputs[PW_MAX_OP_INPUTS];     /* argument names for messages */
    int n_attrs;
    pw_attr_spec attrs[PW_GRAPH_MAX_ATTRS];
    int is_loss;
} pw_op_spec;

/* An attribute value as written. */
typedef struct pw_attr_value {
    pw_attr_kind kind;
    int64_t i;
    double f;
    int b;
    const char *s;                            /* PW_ATTR_NAME */
    int n;                                    /* PW_ATTR_INTS */
    int64_t list[PW_GRAPH_MAX_LIST];
} pw_attr_value;

const pw_op_spec *pw_op_spec_get(pw_op_kind op);
const pw_op_spec *pw_op_find(const char *name);          /* NULL when unknown */
const char *pw_op_suggest(const char *name);             /* closest name, ≤ 2 edits */
const pw_attr_spec *pw_op_attr_find(const pw_op_spec *spec, const char *key);
const char *pw_attr_kind_name(pw_attr_kind kind);        /* "an integer" */

/* Defaults for an op's attributes. */
void pw_op_default_attrs(pw_op_kind op, pw_node_attrs *attrs);
/* Checks an attribute's kind and range and stores it into `attrs`.
 * Returns PW_OK, or a status with the reason in msg (no position). */
pw_status pw_op_set_attr(const pw_op_spec *spec, const pw_attr_spec *a,
                         const pw_attr_value *v, pw_node_attrs *attrs,
                         char *msg, size_t n);

/* Shape and dtype inference for one node. */
typedef struct pw_infer {
    const pw_value *in[PW_MAX_OP_INPUTS];
    pw_node_attrs attrs;       /* in/out: reshape's -1 is resolved here */
    pw_dtype dtype;            /* out */
    pw_shape shape;            /* out */
    int blame;                 /* on error: -1 = the op, k ≥ 0 = argument k */
    const char *blame_attr;    /* on error: the attribute to point at, or NULL */
    char msg[512];
} pw_infer;
pw_status pw_op_infer(pw_op_kind op, pw_infer *c);

/* The parameters a node owns, in the op's order (weight, bias). */
typedef struct pw_param_tmpl {
    const char *suffix;        /* "weight" → "<scope>.weight" */
    pw_shape shape;
    pw_init_kind init;
    float init_scale;
    int decay;
    const char *tie_attr;      /* attribute that may name an existing parameter */
} pw_param_tmpl;
int pw_op_params(pw_op_kind op, const pw_node_attrs *attrs, const pw_value *const *in,
                 pw_param_tmpl out[PW_MAX_OP_PARAMS]);

/* ------------------------------------------------------------------ pool */
/* Bump allocator for the syntax tree: everything is freed at once. */
typedef struct pw_pool_block pw_pool_block;
typedef struct pw_pool {
    pw_pool_block *head;
} pw_pool;
void *pw_pool_alloc(pw_pool *p, size_t n);                 /* zeroed; NULL on OOM */
char *pw_pool_strndup(pw_pool *p, const char *s, size_t n);
void pw_pool_free(pw_pool *p);

/* ------------------------------------------------------------------ string map */
/* Open-addressing map from borrowed C strings to ints. */
typedef struct pw_strmap {
    const char **keys;
    int *vals;
    size_t cap, n;
} pw_strmap;
int pw_strmap_get(const pw_strmap *m, const char *key);    /* -1 when absent */
int pw_strmap_put(pw_strmap *m, const char *key, int val); /* 0, or -1 on OOM */
void pw_strmap_free(pw_strmap *m);

/* ------------------------------------------------------------------ syntax tree */
typedef enum pw_stmt_kind {
    PW_ST_GRAPH = 0,   /* graph NAME */
    PW_ST_INPUT,       /* input NAME : TYPE */
    PW_ST_LABEL,       /* label NAME : TYPE */
    PW_ST_CUT,         /* cut */
    PW_ST_OP,          /* NAME = op(args, attrs) [as PATH] */
    PW_ST_REPEAT,      /* NAME = repeat N [as PATH] (carry = init) { body } */
    PW_ST_RETURN,      /* return NAME (last statement of a body) */
} pw_stmt_kind;

typedef struct pw_ast_attr {
    const char *key;
    pw_pos key_pos, val_pos;
    pw_attr_value v;
} pw_ast_attr;

typedef struct pw_ast_stmt pw_ast_stmt;
typedef struct pw_ast_block {
    pw_ast_stmt *first;
    int n;
} pw_ast_block;

struct pw_ast_stmt {
    pw_stmt_kind kind;
    pw_ast_stmt *next;
    pw_pos pos;                /* first token */
    const char *name;          /* defined/returned value, or the graph name */
    pw_pos name_pos;
    /* input, label */
    pw_dtype dtype;
    pw_shape shape;
    pw_pos type_pos;
    /* op */
    const pw_op_spec *op;
    pw_pos op_pos;
    int n_args;
    const char *args[PW_MAX_OP_INPUTS];
    pw_pos arg_pos[PW_MAX_OP_INPUTS];
    int n_attrs;
    pw_ast_attr attrs[PW_GRAPH_MAX_ATTRS];
    pw_node_attrs node_attrs;  /* defaults, then the attributes given */
    /* op, repeat */
    const char *as_path;       /* NULL when no `as` */
    pw_pos as_pos;
    /* repeat */
    int64_t count;
    const char *carry, *init;  /* (carry = init) */
    pw_pos carry_pos, init_pos;
    pw_ast_block body;
};

/* Text → statements. Syntax, literal and per-statement checks happen here;
 * names, shapes and parameters are checked by pw_graph_lower. */
pw_status pw_graph_parse_ast(const char *text, size_t len, const char *file,
                             pw_pool *pool, pw_ast_block *top);
/* Statements → graph: expands repeats, resolves names, infers shapes,
 * creates parameters, checks whole-graph rules. */
pw_status pw_graph_lower(const pw_ast_block *top, const char *file,
                         const char *default_name, pw_graph **out);

#endif
