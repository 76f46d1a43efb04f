/* pipewright — graph IR lifetime, lookups, totals and the printed summary,
 * plus the small helpers the parser and the lowering pass share (errors with
 * positions, checked sizes, edit distance, the syntax-tree pool, a string map).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph-internal.h"

/* ------------------------------------------------------------------ helpers */

pw_status pw_graph_err(pw_status st, const char *file, pw_pos pos, const char *fmt, ...)
{
    char msg[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return pw_error(st, "%s:%d:%d: error: %s", file, pos.line, pos.col, msg);
}

int pw_graph_mul_checked(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0) return -1;
    if (a != 0 && b > PW_GRAPH_MAX_NUMEL / a) return -1;
    if (a * b > PW_GRAPH_MAX_NUMEL) return -1;
    *out = a * b;
    return 0;
}

int pw_edit_distance(const char *a, const char *b, int cap)
{
    size_t la = strlen(a), lb = strlen(b);
    int row[64];
    /* Names longer than the buffer are never "close" to an op or attribute. */
    if (lb >= 64 || la >= 64) return cap + 1;
    if ((la > lb ? la - lb : lb - la) > (size_t)cap) return cap + 1;
    for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0], best = row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j];
            int v = diag + (a[i - 1] != b[j - 1]);
            if (row[j - 1] + 1 < v) v = row[j - 1] + 1;
            if (up + 1 < v) v = up + 1;
            row[j] = v;
            diag = up;
            if (v < best) best = v;
        }
        if (best > cap) return cap + 1;
    }
    return row[lb] > cap ? cap + 1 : row[lb];
}

/* ------------------------------------------------------------------ pool */

struct pw_pool_block {
    pw_pool_block *next;
    size_t used, cap;
    max_align_t data[];
};

void *pw_pool_alloc(pw_pool *p, size_t n)
{
    const size_t align = sizeof(max_align_t);
    n = (n + align - 1) / align * align;
    pw_pool_block *b = p->head;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 16384 ? n : 16384;
        b = malloc(sizeof *b + cap);
        if (!b) return NULL;
        b->next = p->head;
        b->used = 0;
        b->cap = cap;
        p->head = b;
    }
    void *r = (char *)b->data + b->used;
    b->used += n;
    memset(r, 0, n);
    return r;
}

char *pw_pool_strndup(pw_pool *p, const char *s, size_t n)
{
    char *r = pw_pool_alloc(p, n + 1);
    if (!r) return NULL;
    memcpy(r, s, n);
    r[n] = '\0';
    return r;
}

void pw_pool_free(pw_pool *p)
{
    while (p->head) {
        pw_pool_block *next = p->head->next;
        free(p->head);
        p->head = next;
    }
}

/* ------------------------------------------------------------------ string map */

static uint64_t str_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

int pw_strmap_get(const pw_strmap *m, const char *key)
{
    if (m->cap == 0) return -1;
    for (size_t i = str_hash(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (!m->keys[i]) return -1;
        if (strcmp(m->keys[i], key) == 0) return m->vals[i];
    }
}

int pw_strmap_put(pw_strmap *m, const char *key, int val)
{
    if ((m->n + 1) * 2 > m->cap) { /* keep the load factor ≤ 1/2 */
        size_t cap = m->cap ? m->cap * 2 : 16;
        const char **keys = calloc(cap, sizeof *keys);
        int *vals = calloc(cap, sizeof *vals);
        if (!keys || !vals) {
            free(keys);
            free(vals);
            return -1;
        }
        for (size_t i = 0; i < m->cap; i++) {
            if (!m->keys[i]) continue;
            size_t j = str_hash(m->keys[i]) & (cap - 1);
            while (keys[j]) j = (j + 1) & (cap - 1);
            keys[j] = m->keys[i];
            vals[j] = m->vals[i];
        }
        free(m->keys);
        free(m->vals);
        m->keys = keys;
        m->vals = vals;
        m->cap = cap;
    }
    size_t i = str_hash(key) & (m->cap - 1);
    while (m->keys[i] && strcmp(m->keys[i], key) != 0) i = (i + 1) & (m->cap - 1);
    if (!m->keys[i]) m->n++;
    m->keys[i] = key;
    m->vals[i] = val;
    return 0;
}

void pw_strmap_free(pw_strmap *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------ the IR */

void pw_graph_destroy(pw_graph *g)
{
    if (!g) return;
    for (int i = 0; i < g->n_values; i++) free(g->values[i].name);
    for (int i = 0; i < g->n_nodes; i++) free(g->nodes[i].scope);
    for (int i = 0; i < g->n_params; i++) free(g->params[i].name);
    free(g->values);
    free(g->nodes);
    free(g->params);
    free(g->name);
    free(g->file);
    free(g);
}

int pw_graph_find_param(const pw_graph *g, const char *name)
{
    if (!g || !name) return -1;
    for (int i = 0; i < g->n_params; i++)
        if (strcmp(g->params[i].name, name) == 0) return i;
    return -1;
}

int pw_graph_param_users(const pw_graph *g, int param, int *nodes, int cap)
{
    if (!g || param < 0 || param >= g->n_params) return -1;
    int n = 0;
    for (int i = g->params[param].owner; i < g->n_nodes; i++) {
        const pw_node *nd = &g->nodes[i];
        for (int k = 0; k < nd->n_params; k++) {
            if (nd->params[k] != param) continue;
            if (n < cap) nodes[n] = i;
            n++;
            break; /* a node counts once even if it named the parameter twice */
        }
    }
    return n;
}

int64_t pw_graph_range_input_bytes(const pw_graph *g, int begin, int end)
{
    if (!g || begin < 0 || end > g->n_nodes || begin >= end) return -1;
    /* last use of each value, and whether the range itself reads it */
    int *last = malloc((size_t)g->n_values * sizeof *last);
    unsigned char *in_range = calloc((size_t)g->n_values, 1);
    if (!last || !in_range) {
        free(last);
        free(in_range);
        return -1;
    }
    for (int v = 0; v < g->n_values; v++) last[v] = -1;
    for (int i = 0; i < g->n_nodes; i++)
        for (int k = 0; k < g->nodes[i].n_inputs; k++) {
            int v = g->nodes[i].inputs[k];
            last[v] = i;
            if (i >= begin && i < end) in_range[v] = 1;
        }
    int64_t bytes = 0;
    for (int v = 0; v < g->n_values; v++) {
        const pw_value *val = &g->values[v];
        if (val->producer >= begin) continue; /* produced in or after the range */
        /* data (input, label) is loaded where it is read; a node's output
         * is received if used here or later (passed on) */
        int kept = val->producer < 0 ? in_range[v] : last[v] >= begin;
        if (kept) bytes += pw_shape_numel(&val->shape) * (int64_t)pw_dtype_size(val->dtype);
    }
    free(last);
    free(in_range);
    return bytes;
}

void pw_graph_total_cost(const pw_graph *g, pw_op_cost *out)
{
    memset(out, 0, sizeof *out);
    if (!g) return;
    for (int i = 0; i < g->n_nodes; i++) {
        pw_op_cost c;
        if (pw_graph_node_cost(g, i, &c) != PW_OK) continue;
        out->flops_fwd += c.flops_fwd;
        out->flops_bwd_input += c.flops_bwd_input;
        out->flops_bwd_weight += c.flops_bwd_weight;
        out->param_bytes += c.param_bytes; /* only the creator counts a tied param */
        out->act_bytes += c.act_bytes;
        out->out_bytes += c.out_bytes;
    }
}

/* "401.4 K" style with SI prefixes. */
static const char *si(double v, char *buf, size_t n)
{
    static const char *const pre[] = {"", "K", "M", "G", "T", "P", "E"};
    int k = 0;
    while (v >= 1000.0 && k < 6) {
        v /= 1000.0;
        k++;
    }
    if (k == 0)
        snprintf(buf, n, "%.0f ", v);
    else
        snprintf(buf, n, "%.1f %s", v, pre[k]);
    return buf;
}

static const char *bytes_str(double v, char *buf, size_t n)
{
    static const char *const pre[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    int k = 0;
    while (v >= 1024.0 && k < 5) {
        v /= 1024.0;
        k++;
    }
    snprintf(buf, n, k ? "%.1f %s" : "%.0f %s", v, pre[k]);
    return buf;
}

static int64_t param_elems(const pw_graph *g)
{
    int64_t n = 0;
    for (int i = 0; i < g->n_params; i++) n += pw_shape_numel(&g->params[i].shape);
    return n;
}

void pw_graph_print(const pw_graph *g, FILE *f)
{
    char a[64], b[64], c[64], d[64];
    if (!g || !f) return;
    pw_op_cost tot;
    pw_graph_total_cost(g, &tot);
    fprintf(f, "graph %s (%s): %d nodes, %d values, %d params (%s, %s), %d cuts\n", g->name,
            g->file, g->n_nodes, g->n_values, g->n_params,
            si((double)param_elems(g), a, sizeof a), bytes_str((double)tot.param_bytes, b, sizeof b),
            g->n_cuts);
    if (g->input >= 0) {
        const pw_value *v = &g->values[g->input];
        fprintf(f, "  input %s : %s%s\n", v->name, pw_dtype_name(v->dtype),
                pw_shape_str(&v->shape, a, sizeof a));
    }
    if (g->label >= 0) {
        const pw_value *v = &g->values[g->label];
        fprintf(f, "  label %s : %s%s\n", v->name, pw_dtype_name(v->dtype),
                pw_shape_str(&v->shape, a, sizeof a));
    }
    fprintf(f, "  %4s %-22s %-20s %-32s %10s %13s %13s\n", "#", "op", "value", "shapes",
            "params", "fwd", "bwd");
    for (int i = 0; i < g->n_nodes; i++) {
        const pw_node *n = &g->nodes[i];
        pw_op_cost cost;
        char shapes[160], in[64], out[64];
        int64_t created = 0;
        pw_graph_node_cost(g, i, &cost);
        for (int k = 0; k < n->n_params; k++) {
            const pw_param *p = &g->params[n->params[k]];
            if (p->owner == i) created += pw_shape_numel(&p->shape);
        }
        if (n->cut_before) fprintf(f, "  ---- cut ----\n");
        snprintf(shapes, sizeof shapes, "%s -> %s",
                 pw_shape_str(&g->values[n->inputs[0]].shape, in, sizeof in),
                 pw_shape_str(&g->values[n->output].shape, out, sizeof out));
        fprintf(f, "  %4d %-22s %-20s %-32s %10lld %9sFLOP %9sFLOP\n", i, pw_op_name(n->op),
                g->values[n->output].name, shapes, (long long)created,
                si(cost.flops_fwd, c, sizeof c),
                si(cost.flops_bwd_input + cost.flops_bwd_weight, d, sizeof d));
    }
    fprintf(f, "  total per sample: fwd %sFLOP, bwd_input %sFLOP, bwd_weight %sFLOP, "
               "activations %s\n",
            si(tot.flops_fwd, a, sizeof a), si(tot.flops_bwd_input, b, sizeof b),
            si(tot.flops_bwd_weight, c, sizeof c), bytes_str((double)tot.act_bytes, d, sizeof d));
}
