/* pipewright — lowering: statements → pw_graph.
 *
 * Walks the syntax tree once, in file order, expanding each repeat body
 * `count` times. Every expansion gets a fresh scope whose names are local to
 * that iteration; names resolve innermost-first through the enclosing scopes,
 * and a name may not shadow one that is visible (so every name in a file
 * means one thing at each point). Values must be defined before use, which is
 * what keeps the graph acyclic. Whole-graph rules (one input, one loss, every
 * value reaching the loss, cut placement) are checked at the end.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph-internal.h"

typedef struct sym {
    const char *name; /* borrowed from the syntax tree */
    int value;
    pw_pos pos;
} sym;

typedef struct scope {
    struct scope *parent;
    pw_strmap map;            /* name → index in syms */
    sym *syms;
    int n, cap;
    char *vprefix;            /* value-name prefix: "" or "blocks.2/" */
    char *pprefix;            /* parameter prefix: "" or "blocks.2." */
    const pw_ast_stmt *cur;   /* statement being lowered (for "defined later" hints) */
} scope;

typedef struct lower {
    const char *file;
    pw_graph *g;
    int cap_values, cap_nodes, cap_params;
    pw_strmap params;         /* parameter name → id (keys owned by g) */
    pw_strmap rpaths;         /* full repeat path → index in rpath */
    struct rpath {
        char *path;           /* "enc.1.layers" */
        pw_pos pos;
    } *rpath;
    int n_rpaths, cap_rpaths;
    int pending_cut;
    pw_pos cut_pos, input_pos, label_pos, loss_pos;
    const char *where;        /* "blocks.2" while lowering a repeat body */
    int64_t empty_iterations; /* repeat iterations that made no node */
    size_t name_bytes;        /* bytes of the names the graph holds so far */
} lower;

static pw_status lerr(lower *L, pw_status st, pw_pos pos, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static pw_status lerr(lower *L, pw_status st, pw_pos pos, const char *fmt, ...)
{
    char msg[1280];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (L->where) return pw_graph_err(st, L->file, pos, "%s (in repeat iteration %s)", msg, L->where);
    return pw_graph_err(st, L->file, pos, "%s", msg);
}

static pw_status oom(lower *L) { return pw_error(PW_ERR_NOMEM, "%s: out of memory", L->file); }

static char *str_cat3(const char *a, const char *b, const char *c)
{
    size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
    char *r = malloc(la + lb + lc + 1);
    if (!r) return NULL;
    memcpy(r, a, la);
    memcpy(r + la, b, lb);
    memcpy(r + la + lb, c, lc + 1);
    return r;
}

/* Grows *arr (elements of `size` bytes) so that index n fits. */
static int grow(void **arr, int *cap, int n, size_t size)
{
    if (n < *cap) return 0;
    int nc = *cap ? *cap * 2 : 16;
    void *na = realloc(*arr, (size_t)nc * size);
    if (!na) return -1;
    *arr = na;
    *cap = nc;
    return 0;
}

/* ------------------------------------------------------------------ scopes */

static const sym *sym_find(const scope *s, const char *name)
{
    for (; s; s = s->parent) {
        int i = pw_strmap_get(&s->map, name);
        if (i >= 0) return &s->syms[i];
    }
    return NULL;
}

static pw_status sym_define(lower *L, scope *s, const char *name, pw_pos pos, int value)
{
    const sym *old = sym_find(s, name);
    if (old)
        return lerr(L, PW_ERR_PARSE, pos, "value '%s' already defined at %d:%d", name,
                    old->pos.line, old->pos.col);
    if (grow((void **)&s->syms, &s->cap, s->n, sizeof *s->syms) != 0) return oom(L);
    s->syms[s->n] = (sym){name, value, pos};
    if (pw_strmap_put(&s->map, name, s->n) != 0) return oom(L);
    s->n++;
    return PW_OK;
}

static void scope_free(scope *s)
{
    pw_strmap_free(&s->map);
    free(s->syms);
    free(s->vprefix);
    free(s->pprefix);
}

static int defines(const pw_ast_stmt *st, const char *name)
{
    return (st->kind == PW_ST_OP || st->kind == PW_ST_REPEAT || st->kind == PW_ST_INPUT ||
            st->kind == PW_ST_LABEL) &&
           strcmp(st->name, name) == 0;
}

/* The message for a name that is not visible here, with the most useful hint. */
static pw_status undefined(lower *L, const scope *s, const char *name, pw_pos pos)
{
    for (const scope *sc = s; sc; sc = sc->parent)
        for (const pw_ast_stmt *st = sc->cur; st; st = st->next)
            if (defines(st, name))
                return lerr(L, PW_ERR_PARSE, pos,
                            "undefined value '%s' (values must be defined before use; cycles "
                            "are not allowed; '%s' is defined at %d:%d)",
                            name, name, st->name_pos.line, st->name_pos.col);
    const char *best = NULL;
    int best_d = 3, len = (int)strlen(name);
    for (const scope *sc = s; sc; sc = sc->parent)
        for (int i = 0; i < sc->n; i++) {
            int d = pw_edit_distance(name, sc->syms[i].name, 2);
            if (d < best_d && d < len) {
                best_d = d;
                best = sc->syms[i].name;
            }
        }
    if (best) return lerr(L, PW_ERR_PARSE, pos, "undefined value '%s'; did you mean '%s'?", name, best);
    return lerr(L, PW_ERR_PARSE, pos, "undefined value '%s'", name);
}

static pw_status resolve(lower *L, const scope *s, const char *name, pw_pos pos, int *out)
{
    const sym *y = sym_find(s, name);
    if (!y) return undefined(L, s, name, pos);
    *out = y->value;
    return PW_OK;
}

/* ------------------------------------------------------------------ graph growth */

static pw_status new_value(lower *L, char *name, pw_dtype dt, const pw_shape *shape,
                           int producer, pw_pos pos, int *out)
{
    pw_graph *g = L->g;
    if (!name) return oom(L);
    if (grow((void **)&g->values, &L->cap_values, g->n_values, sizeof *g->values) != 0) {
        free(name);
        return oom(L);
    }
    pw_value *v = &g->values[g->n_values];
    memset(v, 0, sizeof *v);
    v->name = name;
    L->name_bytes += strlen(name) + 1;
    v->dtype = dt;
    v->shape = *shape;
    v->producer = producer;
    v->line = pos.line;
    v->col = pos.col;
    *out = g->n_values++;
    return PW_OK;
}

static pw_status new_param(lower *L, char *name, const pw_param_tmpl *t, int owner, int *out)
{
    pw_graph *g = L->g;
    if (!name) return oom(L);
    if (grow((void **)&g->params, &L->cap_params, g->n_params, sizeof *g->params) != 0) {
        free(name);
        return oom(L);
    }
    pw_param *p = &g->params[g->n_params];
    memset(p, 0, sizeof *p);
    p->name = name;
    L->name_bytes += strlen(name) + 1;
    p->shape = t->shape;
    p->init = t->init;
    p->init_scale = t->init_scale;
    p->decay = t->decay;
    p->n_uses = 1;
    p->owner = owner;
    if (pw_strmap_put(&L->params, p->name, g->n_params) != 0) return oom(L); /* g owns name */
    *out = g->n_params++;
    return PW_OK;
}

/* ------------------------------------------------------------------ statements */

static pw_status lower_decl(lower *L, scope *s, const pw_ast_stmt *st)
{
    pw_graph *g = L->g;
    int is_input = st->kind == PW_ST_INPUT;
    int *slot = is_input ? &g->input : &g->label;
    pw_pos *first = is_input ? &L->input_pos : &L->label_pos;
    const char *what = is_input ? "input" : "label";
    if (*slot >= 0)
        return lerr(L, PW_ERR_PARSE, st->pos,
                    "more than one '%s' declaration (the first is '%s' at %d:%d; a graph has "
                    "exactly one %s)",
                    what, g->values[*slot].name, first->line, first->col, what);
    if (!is_input && st->dtype != PW_I32)
        return lerr(L, PW_ERR_SHAPE, st->type_pos, "label must have dtype i32, got %s",
                    pw_dtype_name(st->dtype));
    PW_CHECK(sym_define(L, s, st->name, st->name_pos, g->n_values));
    int id;
    PW_CHECK(new_value(L, strdup(st->name), st->dtype, &st->shape, -1, st->name_pos, &id));
    *slot = id;
    *first = st->pos;
    return PW_OK;
}

static const pw_ast_attr *find_attr(const pw_ast_stmt *st, const char *key)
{
    for (int i = 0; i < st->n_attrs; i++)
        if (strcmp(st->attrs[i].key, key) == 0) return &st->attrs[i];
    return NULL;
}

static pw_status lower_op(lower *L, scope *s, const pw_ast_stmt *st)
{
    pw_graph *g = L->g;
    const pw_op_spec *spec = st->op;
    const sym *old;
    int ids[PW_MAX_OP_INPUTS] = {0};
    char b1[128], b2[128];

    if (g->n_nodes >= PW_GRAPH_MAX_NODES)
        return lerr(L, PW_ERR_PARSE, st->op_pos,
                    "graph too large: more than %d nodes after repeat expansion",
                    PW_GRAPH_MAX_NODES);
    /* The names this node adds (value, scope, up to 4 parameters) are at
     * most this long each; bound the total before allocating them. */
    size_t add = 6 * (strlen(s->pprefix) + strlen(s->vprefix) + PW_GRAPH_MAX_NAME + 16);
    if (L->name_bytes + add > PW_GRAPH_MAX_NAME_BYTES)
        return lerr(L, PW_ERR_PARSE, st->op_pos,
                    "graph too large: its names would take more than %zu MiB after repeat "
                    "expansion (use shorter names or paths, or fewer repeats)",
                    PW_GRAPH_MAX_NAME_BYTES >> 20);
    if ((old = sym_find(s, st->name)) != NULL)
        return lerr(L, PW_ERR_PARSE, st->name_pos, "value '%s' already defined at %d:%d",
                    st->name, old->pos.line, old->pos.col);
    for (int k = 0; k < st->n_args; k++)
        PW_CHECK(resolve(L, s, st->args[k], st->arg_pos[k], &ids[k]));

    /* The label feeds the loss only; the loss feeds nothing. */
    for (int k = 0; k < st->n_args; k++) {
        if (ids[k] == g->label && !(spec->is_loss && k == 1))
            return lerr(L, PW_ERR_PARSE, st->arg_pos[k],
                        "label '%s' can only be used as the labels argument of "
                        "softmax_cross_entropy",
                        st->args[k]);
        if (ids[k] == g->loss)
            return lerr(L, PW_ERR_PARSE, st->arg_pos[k],
                        "the loss '%s' cannot be used as an input", st->args[k]);
    }
    if (spec->is_loss) {
        if (g->loss >= 0)
            return lerr(L, PW_ERR_PARSE, st->op_pos,
                        "more than one loss (the first is at %d:%d; a graph has exactly one "
                        "softmax_cross_entropy)",
                        L->loss_pos.line, L->loss_pos.col);
        if (g->label < 0)
            return lerr(L, PW_ERR_PARSE, st->arg_pos[1],
                        "softmax_cross_entropy needs a 'label' declaration for its labels");
        if (ids[1] != g->label)
            return lerr(L, PW_ERR_PARSE, st->arg_pos[1],
                        "softmax_cross_entropy: labels must be the label '%s', got '%s'",
                        g->values[g->label].name, st->args[1]);
    }

    pw_infer c;
    memset(&c, 0, sizeof c);
    for (int k = 0; k < st->n_args; k++) c.in[k] = &g->values[ids[k]];
    c.attrs = st->node_attrs;
    pw_status rc = pw_op_infer(spec->op, &c);
    if (rc != PW_OK) {
        pw_pos pos = st->op_pos;
        const pw_ast_attr *a = c.blame_attr ? find_attr(st, c.blame_attr) : NULL;
        if (c.blame >= 0) pos = st->arg_pos[c.blame];
        else if (a) pos = a->val_pos;
        return lerr(L, rc, pos, "%s", c.msg);
    }

    /* Parameters: created under the scope, or reused when the op names one. */
    int node_id = g->n_nodes, pids[PW_MAX_OP_PARAMS];
    pw_param_tmpl tm[PW_MAX_OP_PARAMS];
    int np = pw_op_params(spec->op, &c.attrs, c.in, tm);
    char *scope_name = str_cat3(s->pprefix, st->as_path ? st->as_path : st->name, "");
    if (!scope_name) return oom(L);
    for (int i = 0; i < np; i++) {
        const pw_ast_attr *tie = tm[i].tie_attr ? find_attr(st, tm[i].tie_attr) : NULL;
        if (tie) {
            int pid = pw_strmap_get(&L->params, tie->v.s);
            if (pid < 0) {
                free(scope_name);
                return lerr(L, PW_ERR_PARSE, tie->val_pos,
                            "%s: no parameter named '%s' to reuse (it must be created by an "
                            "earlier node)",
                            spec->name, tie->v.s);
            }
            if (!pw_shape_equal(&g->params[pid].shape, &tm[i].shape)) {
                free(scope_name);
                return lerr(L, PW_ERR_SHAPE, tie->val_pos,
                            "%s: cannot reuse '%s': it has shape %s but this %s needs %s",
                            spec->name, tie->v.s, pw_shape_str(&g->params[pid].shape, b1, sizeof b1),
                            spec->name, pw_shape_str(&tm[i].shape, b2, sizeof b2));
            }
            pids[i] = pid;
            continue;
        }
        char *pname = str_cat3(scope_name, ".", tm[i].suffix);
        if (!pname) {
            free(scope_name);
            return oom(L);
        }
        int pid = pw_strmap_get(&L->params, pname);
        if (pid >= 0) {
            const pw_node *ow = &g->nodes[g->params[pid].owner];
            rc = lerr(L, PW_ERR_PARSE, st->as_path ? st->as_pos : st->name_pos,
                      "parameter '%s' already exists (created at %d:%d); use 'as PATH' to "
                      "name this node's parameters",
                      pname, ow->line, ow->col);
            free(pname);
            free(scope_name);
            return rc;
        }
        rc = new_param(L, pname, &tm[i], node_id, &pids[i]);
        if (rc != PW_OK) {
            free(scope_name);
            return rc;
        }
    }

    int vid;
    rc = new_value(L, str_cat3(s->vprefix, st->name, ""), c.dtype, &c.shape, node_id,
                   st->name_pos, &vid);
    if (rc == PW_OK && grow((void **)&g->nodes, &L->cap_nodes, g->n_nodes, sizeof *g->nodes) != 0)
        rc = oom(L);
    if (rc != PW_OK) {
        free(scope_name);
        return rc;
    }
    pw_node *n = &g->nodes[g->n_nodes++];
    memset(n, 0, sizeof *n);
    n->op = spec->op;
    n->scope = scope_name;
    L->name_bytes += strlen(scope_name) + 1;
    n->n_inputs = st->n_args;
    for (int k = 0; k < st->n_args; k++) {
        n->inputs[k] = ids[k];
        g->values[ids[k]].n_consumers++;
    }
    n->output = vid;
    n->n_params = np;
    for (int i = 0; i < np; i++) {
        n->params[i] = pids[i];
        if (g->params[pids[i]].owner != node_id) g->params[pids[i]].n_uses++;
    }
    n->attrs = c.attrs;
    n->line = st->op_pos.line;
    n->col = st->op_pos.col;
    if (L->pending_cut) {
        if (node_id == 0)
            return lerr(L, PW_ERR_PARSE, L->cut_pos,
                        "'cut' before the first node would leave the first stage empty");
        n->cut_before = 1;
        g->n_cuts++;
        L->pending_cut = 0;
    }
    if (spec->is_loss) {
        g->loss = vid;
        L->loss_pos = st->op_pos;
    }
    return sym_define(L, s, st->name, st->name_pos, vid);
}

static pw_status lower_block(lower *L, scope *s, const pw_ast_block *b, int *ret);

static pw_status lower_repeat(lower *L, scope *s, const pw_ast_stmt *st)
{
    const sym *old;
    int carried = -1;
    if ((old = sym_find(s, st->name)) != NULL)
        return lerr(L, PW_ERR_PARSE, st->name_pos, "value '%s' already defined at %d:%d",
                    st->name, old->pos.line, old->pos.col);
    PW_CHECK(resolve(L, s, st->init, st->init_pos, &carried));
    if ((old = sym_find(s, st->carry)) != NULL)
        return lerr(L, PW_ERR_PARSE, st->carry_pos, "value '%s' already defined at %d:%d",
                    st->carry, old->pos.line, old->pos.col);

    /* Full paths must be distinct so that value names ("P.i/name") are unique. */
    pw_pos ppos = st->as_path ? st->as_pos : st->name_pos;
    char *path = str_cat3(s->pprefix, st->as_path ? st->as_path : st->name, "");
    if (!path) return oom(L);
    int prev = pw_strmap_get(&L->rpaths, path);
    if (prev >= 0) {
        pw_status rc = lerr(L, PW_ERR_PARSE, ppos,
                            "repeat path '%s' is already used by the repeat at %d:%d",
                            path, L->rpath[prev].pos.line, L->rpath[prev].pos.col);
        free(path);
        return rc;
    }
    if (grow((void **)&L->rpath, &L->cap_rpaths, L->n_rpaths, sizeof *L->rpath) != 0) {
        free(path);
        return oom(L);
    }
    L->rpath[L->n_rpaths].path = path;
    L->rpath[L->n_rpaths].pos = ppos;
    if (pw_strmap_put(&L->rpaths, path, L->n_rpaths++) != 0) return oom(L);

    /* One scope and one set of prefix buffers serve every iteration: each
     * starts empty (its names are local to it), so expansion costs no
     * allocation per iteration beyond the nodes it makes. */
    const char *saved_where = L->where;
    pw_status rc = PW_OK;
    size_t plen = strlen(path) + 32; /* "." + a 20-digit index + "/" or "." */
    scope child;
    memset(&child, 0, sizeof child);
    child.parent = s;
    char *where = malloc(plen);
    child.vprefix = malloc(plen);
    child.pprefix = malloc(plen);
    if (!where || !child.vprefix || !child.pprefix) rc = oom(L);
    for (int64_t i = 0; i < st->count && rc == PW_OK; i++) {
        /* Nested repeats multiply: bound the iterations that make no node
         * (a body of one `return`), as the node limit bounds the others. */
        int nodes_before = L->g->n_nodes;
        snprintf(where, plen, "%s.%lld", path, (long long)i);
        snprintf(child.vprefix, plen, "%s/", where);
        snprintf(child.pprefix, plen, "%s.", where);
        child.n = 0;
        if (child.map.cap) {
            memset(child.map.keys, 0, child.map.cap * sizeof *child.map.keys);
            child.map.n = 0;
        }
        L->where = where;
        int ret = -1;
        rc = sym_define(L, &child, st->carry, st->carry_pos, carried);
        if (rc == PW_OK) rc = lower_block(L, &child, &st->body, &ret);
        carried = ret;
        L->where = saved_where;
        if (rc == PW_OK && L->g->n_nodes == nodes_before &&
            ++L->empty_iterations > PW_GRAPH_MAX_EMPTY_ITERATIONS)
            rc = lerr(L, PW_ERR_PARSE, st->pos,
                      "graph too large: more than %d repeat iterations that make no node "
                      "(nested repeats multiply)",
                      PW_GRAPH_MAX_EMPTY_ITERATIONS);
    }
    free(where);
    scope_free(&child);
    PW_CHECK(rc);
    return sym_define(L, s, st->name, st->name_pos, carried);
}

static pw_status lower_block(lower *L, scope *s, const pw_ast_block *b, int *ret)
{
    pw_status rc = PW_OK;
    for (const pw_ast_stmt *st = b->first; st && rc == PW_OK; st = st->next) {
        s->cur = st;
        switch (st->kind) {
        case PW_ST_GRAPH:
            break; /* the name was taken before lowering */
        case PW_ST_INPUT:
        case PW_ST_LABEL:
            rc = lower_decl(L, s, st);
            break;
        case PW_ST_CUT:
            if (L->pending_cut)
                rc = lerr(L, PW_ERR_PARSE, st->pos,
                          "two 'cut' markers with no node between them (the first is at %d:%d)",
                          L->cut_pos.line, L->cut_pos.col);
            L->pending_cut = 1;
            L->cut_pos = st->pos;
            break;
        case PW_ST_OP:
            rc = lower_op(L, s, st);
            break;
        case PW_ST_REPEAT:
            rc = lower_repeat(L, s, st);
            break;
        case PW_ST_RETURN:
            rc = resolve(L, s, st->name, st->name_pos, ret);
            break;
        }
    }
    s->cur = NULL;
    return rc;
}

/* ------------------------------------------------------------------ whole graph */

static pw_status check_graph(lower *L)
{
    pw_graph *g = L->g;
    pw_pos start = {1, 1};
    if (L->pending_cut)
        return lerr(L, PW_ERR_PARSE, L->cut_pos, "'cut' must be followed by a node");
    if (g->input < 0) return lerr(L, PW_ERR_PARSE, start, "graph has no 'input' declaration");
    if (g->loss < 0)
        return lerr(L, PW_ERR_PARSE, start,
                    "graph has no loss (end it with a softmax_cross_entropy node)");
    for (int i = 0; i < g->n_values; i++) {
        const pw_value *v = &g->values[i];
        pw_pos pos = {v->line, v->col};
        if (i == g->loss || v->n_consumers > 0) continue;
        if (i == g->input) return lerr(L, PW_ERR_PARSE, pos, "input '%s' is never used", v->name);
        return lerr(L, PW_ERR_PARSE, pos,
                    "value '%s' is never used (every value must contribute to the loss)",
                    v->name);
    }
    return PW_OK;
}

pw_status pw_graph_lower(const pw_ast_block *top, const char *file, const char *default_name,
                         pw_graph **out)
{
    lower L;
    scope root;
    int ret = -1;
    memset(&L, 0, sizeof L);
    memset(&root, 0, sizeof root);
    *out = NULL;
    L.file = file;
    L.g = calloc(1, sizeof *L.g);
    root.vprefix = strdup("");
    root.pprefix = strdup("");
    pw_status rc = PW_OK;
    if (!L.g || !root.vprefix || !root.pprefix) {
        rc = oom(&L);
        goto done;
    }
    L.g->input = L.g->label = L.g->loss = -1;
    const pw_ast_stmt *first = top->first;
    L.g->name = strdup(first && first->kind == PW_ST_GRAPH ? first->name : default_name);
    L.g->file = strdup(file);
    if (!L.g->name || !L.g->file) {
        rc = oom(&L);
        goto done;
    }
    rc = lower_block(&L, &root, top, &ret);
    if (rc == PW_OK) rc = check_graph(&L);

done:
    scope_free(&root);
    pw_strmap_free(&L.params);
    pw_strmap_free(&L.rpaths);
    for (int i = 0; i < L.n_rpaths; i++) free(L.rpath[i].path);
    free(L.rpath);
    if (rc != PW_OK) {
        pw_graph_destroy(L.g);
        return rc;
    }
    *out = L.g;
    return PW_OK;
}
