/* pipewright — measured op times and their cache file. See profile.h. */
#include "stages/plan/profile.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "runtime/log.h"
#include "runtime/rng.h"
#include "stages/ops/cpu/ops.h"
#include "stages/program/program.h"

#define PROFILE_FORMAT "pipewright-profile"
#define PROFILE_VERSION 2 /* 2: the optimizer time "o" and "optimizer" */
#define MIN_SAMPLE_S 2e-4 /* one timed sample lasts at least this long */
#define STALE_HINT "delete it or choose another --profile file to measure again"

/* ------------------------------------------------------------ keys */

static void device_string_threads(char *buf, size_t n, int threads)
{
    char model[128] = "unknown CPU";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "model name", 10) != 0) continue;
            const char *c = strchr(line, ':');
            if (!c) continue;
            c++;
            while (*c == ' ' || *c == '\t') c++;
            size_t len = strcspn(c, "\n");
            if (len >= sizeof model) len = sizeof model - 1;
            memcpy(model, c, len);
            model[len] = '\0';
            break;
        }
        fclose(f);
    }
    snprintf(buf, n, "cpu: %s (%s, %d thread%s)", model, PW_BLAS_NAME, threads,
             threads == 1 ? "" : "s");
}

void pw_profile_device_string(char *buf, size_t n)
{
    device_string_threads(buf, n, pw_cpu_get_threads());
}

void pw_profile_node_sig(const pw_graph *g, int node, char *buf, size_t n)
{
    const pw_node *nd = &g->nodes[node];
    size_t off = (size_t)snprintf(buf, n, "%s(", pw_op_name(nd->op));
    char sh[64];
    for (int k = 0; k < nd->n_inputs && off < n; k++) {
        const pw_value *v = &g->values[nd->inputs[k]];
        off += (size_t)snprintf(buf + off, n - off, "%s%s%s", k ? ", " : "", pw_dtype_name(v->dtype),
                                pw_shape_str(&v->shape, sh, sizeof sh));
    }
    const pw_value *y = &g->values[nd->output];
    if (off < n)
        snprintf(buf + off, n - off, ") -> %s%s, %d param%s", pw_dtype_name(y->dtype),
                 pw_shape_str(&y->shape, sh, sizeof sh), nd->n_params, nd->n_params == 1 ? "" : "s");
}

/* ------------------------------------------------------------ lifetime */

void pw_profile_destroy(pw_profile *p)
{
    if (!p) return;
    for (int i = 0; p->names && i < p->n_nodes; i++) free(p->names[i]);
    for (int i = 0; p->sigs && i < p->n_nodes; i++) free(p->sigs[i]);
    free(p->names);
    free(p->sigs);
    free(p->times);
    free(p->graph);
    free(p->device);
    free(p);
}

static pw_profile *profile_new(int n_nodes)
{
    pw_profile *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n_nodes = n_nodes;
    p->names = calloc((size_t)n_nodes + 1, sizeof(char *));
    p->sigs = calloc((size_t)n_nodes + 1, sizeof(char *));
    p->times = calloc((size_t)n_nodes + 1, sizeof(pw_op_time));
    if (!p->names || !p->sigs || !p->times) {
        pw_profile_destroy(p);
        return NULL;
    }
    return p;
}

/* ------------------------------------------------------------ measuring */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Fixed pseudo-random contents: floats in [-1, 1), integers 0 (a valid
 * class or index for any op that reads one). */
static void fill_value(void *buf, const pw_value *v, int64_t mb, uint64_t key)
{
    int64_t n = mb * pw_shape_numel(&v->shape);
    if (v->dtype == PW_F32) {
        float *f = buf;
        for (int64_t k = 0; k < n; k++) f[k] = 2.0f * pw_rng_uniform(key, (uint64_t)k) - 1.0f;
    } else {
        memset(buf, 0, (size_t)n * pw_dtype_size(v->dtype));
    }
}

typedef enum phase { PH_F, PH_B, PH_W } phase;

static pw_status run_phase(pw_program *p, phase ph, int64_t mb)
{
    switch (ph) {
    case PH_F:
        /* Dropout draws its masks from (seed, step, sample): a fixed step
         * is as good as any for timing. */
        if (pw_program_needs_rng(p)) PW_CHECK(pw_program_set_rng(p, 0, 1, 1, 0));
        return pw_program_forward(p, 0, mb);
    case PH_B: return pw_program_backward_input(p, 0);
    case PH_W: return pw_program_backward_weight(p, 0);
    }
    return PW_ERR_INTERNAL;
}

static pw_status time_phase(pw_program *p, phase ph, int64_t mb, int reps, double *out)
{
    double t0 = now_s();
    for (int k = 0; k < reps; k++) PW_CHECK(run_phase(p, ph, mb));
    *out = (now_s() - t0) / reps;
    return PW_OK;
}

/* The optimizer update of the parameters node i introduces, as the
 * engine's optimizer step runs it (pw_program_optimizer_step: the
 * non-finite check of the gradients, the update, zeroing the gradients),
 * on the node's one-node program, past step 1 (SGD's first step skips the
 * momentum); repeated like a phase. A parameter the node reuses (tied,
 * introduced by an earlier node) is not this node's: a node with only such
 * parameters gets 0, one with both its share by element count. */
static pw_status time_optimizer(const pw_graph *g, int i, pw_program *p, int iters, double *samples,
                                double *out)
{
    const pw_node *nd = &g->nodes[i];
    double own = 0.0, all = 0.0;
    *out = 0.0;
    for (int k = 0; k < nd->n_params; k++) {
        int q = nd->params[k], dup = 0, first = 1;
        for (int t = 0; t < k; t++) dup |= nd->params[t] == q;
        if (dup) continue;
        for (int j = 0; j < i && first; j++)
            for (int t = 0; t < g->nodes[j].n_params && first; t++) first = g->nodes[j].params[t] != q;
        double ne = (double)pw_shape_numel(&g->params[q].shape);
        all += ne;
        if (first) own += ne;
    }
    if (own <= 0.0) return PW_OK;
    int64_t step = 2;
    PW_CHECK(pw_program_optimizer_step(p, step++)); /* warm-up */
    double t0 = now_s();
    PW_CHECK(pw_program_optimizer_step(p, step++));
    double one = now_s() - t0;
    double r = one >= MIN_SAMPLE_S ? 1.0 : ceil(MIN_SAMPLE_S / (one > 1e-8 ? one : 1e-8));
    int reps = r > 10000 ? 10000 : (int)r;
    for (int it = 0; it < iters; it++) {
        t0 = now_s();
        for (int k = 0; k < reps; k++) PW_CHECK(pw_program_optimizer_step(p, step++));
        samples[it] = (now_s() - t0) / reps;
    }
    *out = median(samples, iters) * own / all;
    return PW_OK;
}

static pw_status measure_node(const pw_graph *g, int i, const pw_profile_config *c, int iters,
                              uint64_t seed, double *samples, pw_op_time *out)
{
    const int64_t mb = c->micro_batch;
    pw_program_config pc = {.graph = g, .node_begin = i, .node_end = i + 1, .micro_batch = mb,
                            .loss_batch = mb, .slots = 1,
                            .optim = pw_optim_defaults(c->optim)};
    pw_program *p = NULL;
    PW_CHECK(pw_program_create(&pc, &p));
    pw_program_init_params(p, seed);
    const pw_node *nd = &g->nodes[i];
    for (int k = 0; k < nd->n_inputs; k++) {
        int v = nd->inputs[k];
        void *buf = pw_program_value(p, v, 0);
        if (buf) fill_value(buf, &g->values[v], mb, pw_rng_key(seed, g->values[v].name));
    }
    /* Live-in values passed through and gradients of live-out values, as the
     * neighbouring stages would provide them. */
    const int *vals;
    int nin = pw_program_inputs(p, &vals);
    for (int k = 0; k < nin; k++) {
        void *buf = pw_program_value(p, vals[k], 0);
        if (buf) fill_value(buf, &g->values[vals[k]], mb, pw_rng_key(seed, g->values[vals[k]].name));
    }
    int nout = pw_program_outputs(p, &vals);
    for (int k = 0; k < nout; k++) {
        float *gr = pw_program_grad(p, vals[k], 0);
        if (!gr) continue;
        pw_value gv = g->values[vals[k]];
        gv.dtype = PW_F32;
        fill_value(gr, &gv, mb, pw_rng_key(seed ^ 0x9e3779b97f4a7c15ull, g->values[vals[k]].name));
    }

    pw_status st = PW_OK;
    double one[3];
    int reps[3];
    /* Warm-up (first touch of every buffer, BLAS start-up), then one timed
     * call per phase to size the repetitions of a sample. */
    for (int ph = 0; ph < 3 && st == PW_OK; ph++) st = run_phase(p, (phase)ph, mb);
    for (int ph = 0; ph < 3 && st == PW_OK; ph++) {
        st = time_phase(p, (phase)ph, mb, 1, &one[ph]);
        double r = one[ph] >= MIN_SAMPLE_S ? 1.0 : ceil(MIN_SAMPLE_S / (one[ph] > 1e-8 ? one[ph] : 1e-8));
        reps[ph] = r > 10000 ? 10000 : (int)r;
    }
    double *smp[3] = {samples, samples + iters, samples + 2 * iters};
    for (int it = 0; it < iters && st == PW_OK; it++)
        for (int ph = 0; ph < 3 && st == PW_OK; ph++)
            st = time_phase(p, (phase)ph, mb, reps[ph], &smp[ph][it]);
    if (st == PW_OK) {
        out->f = median(smp[0], iters);
        out->b = median(smp[1], iters);
        out->w = median(smp[2], iters);
        /* After F, B and W: the gradients hold what a step would update. */
        st = time_optimizer(g, i, p, iters, samples, &out->o);
    }
    pw_program_destroy(p);
    return st;
}

static pw_status set_keys(pw_profile *p, const pw_graph *g)
{
    p->graph = strdup(g->name);
    if (!p->graph) return pw_error(PW_ERR_NOMEM, "profile: out of memory");
    for (int i = 0; i < g->n_nodes; i++) {
        char sig[256];
        pw_profile_node_sig(g, i, sig, sizeof sig);
        p->names[i] = strdup(g->values[g->nodes[i].output].name);
        p->sigs[i] = strdup(sig);
        if (!p->names[i] || !p->sigs[i]) return pw_error(PW_ERR_NOMEM, "profile: out of memory");
    }
    return PW_OK;
}

pw_status pw_profile_measure(const pw_graph *g, const pw_profile_config *cfg, pw_profile **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "profile: out is NULL");
    *out = NULL;
    if (!g || !cfg) return pw_error(PW_ERR_INVALID_ARG, "profile: no graph or config");
    if (cfg->micro_batch < 1)
        return pw_error(PW_ERR_INVALID_ARG, "profile: micro-batch size must be positive (got %lld)",
                        (long long)cfg->micro_batch);
    if (cfg->iterations < 0 || cfg->iterations > 1000 || cfg->threads < 0)
        return pw_error(PW_ERR_INVALID_ARG, "profile: %d iterations, %d threads", cfg->iterations,
                        cfg->threads);
    const int iters = cfg->iterations ? cfg->iterations : 5;
    const uint64_t seed = cfg->seed ? cfg->seed : 1;
    int saved_threads = pw_cpu_get_threads();
    if (cfg->threads > 0) pw_cpu_set_threads(cfg->threads);

    pw_status st = PW_OK;
    char dev[256];
    pw_profile *p = profile_new(g->n_nodes);
    double *samples = malloc(sizeof(double) * 3 * (size_t)iters);
    if (!p || !samples) {
        st = pw_error(PW_ERR_NOMEM, "profile: out of memory");
        goto done;
    }
    if (cfg->device) snprintf(dev, sizeof dev, "%s", cfg->device);
    else pw_profile_device_string(dev, sizeof dev);
    p->device = strdup(dev);
    p->micro_batch = cfg->micro_batch;
    p->iterations = iters;
    p->optim = cfg->optim;
    if (!p->device) {
        st = pw_error(PW_ERR_NOMEM, "profile: out of memory");
        goto done;
    }
    PW_CHECK_GOTO(set_keys(p, g), st, done);
    double t0 = now_s();
    for (int i = 0; i < g->n_nodes; i++) {
        st = measure_node(g, i, cfg, iters, seed, samples, &p->times[i]);
        if (st != PW_OK) {
            st = pw_error_prefix(st, "profiling node %d (%s): ", i, p->names[i]);
            goto done;
        }
    }
    PW_INFO(PW_SUB_STAGE, "profiled %d nodes of %s at micro-batch %lld in %.2f s on %s",
            g->n_nodes, g->name, (long long)cfg->micro_batch, now_s() - t0, dev);
done:
    if (cfg->threads > 0) pw_cpu_set_threads(saved_threads);
    free(samples);
    if (st != PW_OK) {
        pw_profile_destroy(p);
        return st;
    }
    *out = p;
    return PW_OK;
}

/* ------------------------------------------------------------ the file */

pw_status pw_profile_save(const pw_profile *p, const char *path)
{
    if (!p || !path) return pw_error(PW_ERR_INVALID_ARG, "profile: nothing to save");
    json_t *nodes = json_array();
    json_t *root = json_pack("{s:s, s:i, s:s, s:I, s:s, s:s, s:i}", "format", PROFILE_FORMAT,
                             "version", PROFILE_VERSION, "graph", p->graph, "micro_batch",
                             (json_int_t)p->micro_batch, "device", p->device, "optimizer",
                             pw_optim_name(p->optim), "iterations", p->iterations);
    if (!nodes || !root) {
        json_decref(nodes);
        json_decref(root);
        return pw_error(PW_ERR_NOMEM, "profile: out of memory");
    }
    for (int i = 0; i < p->n_nodes; i++) {
        json_t *o = json_pack("{s:s, s:s, s:f, s:f, s:f, s:f}", "name", p->names[i], "sig",
                              p->sigs[i], "f", p->times[i].f, "b", p->times[i].b, "w",
                              p->times[i].w, "o", p->times[i].o);
        if (!o || json_array_append_new(nodes, o) != 0) {
            json_decref(nodes);
            json_decref(root);
            return pw_error(PW_ERR_NOMEM, "profile: out of memory");
        }
    }
    json_object_set_new(root, "nodes", nodes);
    size_t len = strlen(path);
    char *tmp = malloc(len + 16);
    if (!tmp) {
        json_decref(root);
        return pw_error(PW_ERR_NOMEM, "profile: out of memory");
    }
    snprintf(tmp, len + 16, "%s.tmp%d", path, (int)getpid());
    int rc = json_dump_file(root, tmp, JSON_INDENT(1) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    json_decref(root);
    if (rc != 0 || rename(tmp, path) != 0) {
        int err = errno;
        unlink(tmp);
        free(tmp);
        return pw_error(PW_ERR_IO, "%s: cannot write profile: %s", path, strerror(err));
    }
    free(tmp);
    return PW_OK;
}

static pw_status corrupt(const char *path, const char *fmt, const char *what)
{
    char msg[256];
    snprintf(msg, sizeof msg, fmt, what);
    return pw_error(PW_ERR_FORMAT, "%s: error: %s", path, msg);
}

static int nonneg_number(json_t *v, double *out)
{
    if (!json_is_number(v)) return 0;
    *out = json_number_value(v);
    return isfinite(*out) && *out >= 0.0;
}

pw_status pw_profile_load(const char *path, pw_profile **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "profile: out is NULL");
    *out = NULL;
    if (!path) return pw_error(PW_ERR_INVALID_ARG, "profile: no path");
    FILE *f = fopen(path, "rb");
    if (!f) return pw_error(PW_ERR_IO, "%s: cannot open profile: %s", path, strerror(errno));
    json_error_t err;
    json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &err);
    fclose(f);
    if (!root)
        return pw_error(PW_ERR_FORMAT, "%s:%d:%d: error: not valid JSON (%s)", path, err.line,
                        err.column, err.text);
    pw_status st = PW_OK;
    pw_profile *p = NULL;
    json_t *fmt = json_object_get(root, "format");
    json_t *ver = json_object_get(root, "version");
    json_t *graph = json_object_get(root, "graph");
    json_t *mb = json_object_get(root, "micro_batch");
    json_t *dev = json_object_get(root, "device");
    json_t *iters = json_object_get(root, "iterations");
    json_t *optim = json_object_get(root, "optimizer");
    json_t *nodes = json_object_get(root, "nodes");
    if (!json_is_object(root) || !json_is_string(fmt) || strcmp(json_string_value(fmt), PROFILE_FORMAT)) {
        st = corrupt(path, "not a pipewright profile (no \"format\": \"%s\")", PROFILE_FORMAT);
        goto done;
    }
    if (!json_is_integer(ver) || json_integer_value(ver) != PROFILE_VERSION) {
        if (json_is_integer(ver) && json_integer_value(ver) == 1)
            st = pw_error(PW_ERR_FORMAT, "%s is stale: it is a version 1 profile, measured without "
                          "the optimizer step (no \"o\" times); %s", path, STALE_HINT);
        else if (json_is_integer(ver))
            st = pw_error(PW_ERR_FORMAT, "%s: error: profile format version %lld; this pipewright "
                          "reads version %d", path, (long long)json_integer_value(ver), PROFILE_VERSION);
        else
            st = corrupt(path, "field \"%s\" is missing or has the wrong type", "version");
        goto done;
    }
    const char *bad = !json_is_string(graph)                                ? "graph"
                      : !json_is_integer(mb) || json_integer_value(mb) < 1  ? "micro_batch"
                      : !json_is_string(dev)                                ? "device"
                      : !json_is_string(optim)                              ? "optimizer"
                      : !json_is_integer(iters) || json_integer_value(iters) < 1 ? "iterations"
                      : !json_is_array(nodes)                               ? "nodes"
                                                                            : NULL;
    if (bad) {
        st = corrupt(path, "field \"%s\" is missing or has the wrong type", bad);
        goto done;
    }
    size_t n = json_array_size(nodes);
    if (n > (1u << 24)) {
        st = corrupt(path, "%s", "more than 16 M nodes");
        goto done;
    }
    p = profile_new((int)n);
    if (!p || !(p->graph = strdup(json_string_value(graph))) ||
        !(p->device = strdup(json_string_value(dev)))) {
        st = pw_error(PW_ERR_NOMEM, "profile: out of memory");
        goto done;
    }
    if (pw_optim_parse_kind(json_string_value(optim), &p->optim) != PW_OK) {
        st = pw_error(PW_ERR_FORMAT, "%s: error: unknown optimizer '%s' (want sgd or adamw)", path,
                      json_string_value(optim));
        goto done;
    }
    p->micro_batch = json_integer_value(mb);
    p->iterations = (int)(json_integer_value(iters) > 1000000 ? 1000000 : json_integer_value(iters));
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(nodes, i);
        json_t *nm = json_object_get(o, "name"), *sg = json_object_get(o, "sig");
        pw_op_time *t = &p->times[i];
        if (!json_is_object(o) || !json_is_string(nm) || !json_is_string(sg) ||
            !nonneg_number(json_object_get(o, "f"), &t->f) ||
            !nonneg_number(json_object_get(o, "b"), &t->b) ||
            !nonneg_number(json_object_get(o, "w"), &t->w)) {
            st = pw_error(PW_ERR_FORMAT, "%s: error: node %zu needs \"name\", \"sig\" and times "
                          "\"f\", \"b\", \"w\", \"o\" (numbers >= 0)", path, i);
            goto done;
        }
        json_t *ot = json_object_get(o, "o");
        if (!ot) {
            st = pw_error(PW_ERR_FORMAT, "%s is stale: node %zu (%s) has no optimizer time \"o\" "
                          "(measured before the optimizer step was timed); %s", path, i,
                          json_string_value(nm), STALE_HINT);
            goto done;
        }
        if (!nonneg_number(ot, &t->o)) {
            st = pw_error(PW_ERR_FORMAT, "%s: error: node %zu needs \"name\", \"sig\" and times "
                          "\"f\", \"b\", \"w\", \"o\" (numbers >= 0)", path, i);
            goto done;
        }
        p->names[i] = strdup(json_string_value(nm));
        p->sigs[i] = strdup(json_string_value(sg));
        if (!p->names[i] || !p->sigs[i]) {
            st = pw_error(PW_ERR_NOMEM, "profile: out of memory");
            goto done;
        }
    }
done:
    json_decref(root);
    if (st != PW_OK) {
        pw_profile_destroy(p);
        return st;
    }
    *out = p;
    return PW_OK;
}

pw_status pw_profile_check(const pw_profile *p, const char *path, const pw_graph *g,
                           int64_t micro_batch, const char *device, pw_optim_kind optim)
{
    const char *what = path ? path : "profile";
    if (!p || !g) return pw_error(PW_ERR_INVALID_ARG, "profile: nothing to check");
    if (strcmp(p->graph, g->name) != 0)
        return pw_error(PW_ERR_FORMAT, "%s is stale: it was measured for graph '%s', not '%s'; %s",
                        what, p->graph, g->name, STALE_HINT);
    if (p->n_nodes != g->n_nodes)
        return pw_error(PW_ERR_FORMAT, "%s is stale: it has %d nodes, graph '%s' has %d (the graph "
                        "changed since it was profiled); %s", what, p->n_nodes, g->name, g->n_nodes,
                        STALE_HINT);
    for (int i = 0; i < g->n_nodes; i++) {
        char sig[256];
        pw_profile_node_sig(g, i, sig, sizeof sig);
        const char *name = g->values[g->nodes[i].output].name;
        if (strcmp(p->names[i], name) != 0 || strcmp(p->sigs[i], sig) != 0)
            return pw_error(PW_ERR_FORMAT, "%s is stale: node %d is '%s: %s' in the profile but "
                            "'%s: %s' in graph '%s' (the graph changed since it was profiled); %s",
                            what, i, p->names[i], p->sigs[i], name, sig, g->name, STALE_HINT);
    }
    if (p->micro_batch != micro_batch)
        return pw_error(PW_ERR_FORMAT, "%s is stale: it was measured at micro-batch %lld, this run "
                        "uses %lld; %s", what, (long long)p->micro_batch, (long long)micro_batch,
                        STALE_HINT);
    char here[256];
    if (!device) {
        pw_profile_device_string(here, sizeof here);
        device = here;
    }
    if (strcmp(p->device, device) != 0)
        return pw_error(PW_ERR_FORMAT, "%s is stale: it was measured on '%s', this run is on '%s'; "
                        "%s", what, p->device, device, STALE_HINT);
    if (p->optim != optim)
        return pw_error(PW_ERR_FORMAT, "%s is stale: its optimizer times are for %s, this run uses "
                        "%s; %s", what, pw_optim_name(p->optim), pw_optim_name(optim), STALE_HINT);
    return PW_OK;
}

pw_status pw_profile_load_or_measure(const char *path, const pw_graph *g,
                                     const pw_profile_config *cfg, pw_profile **out,
                                     int *measured)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "profile: out is NULL");
    *out = NULL;
    if (measured) *measured = 0;
    if (!g || !cfg) return pw_error(PW_ERR_INVALID_ARG, "profile: no graph or config");
    if (path && access(path, F_OK) == 0) {
        char dev[256];
        const char *device = cfg->device;
        if (!device) {
            device_string_threads(dev, sizeof dev, cfg->threads > 0 ? cfg->threads : pw_cpu_get_threads());
            device = dev;
        }
        pw_profile *p = NULL;
        PW_CHECK(pw_profile_load(path, &p));
        pw_status st = pw_profile_check(p, path, g, cfg->micro_batch, device, cfg->optim);
        if (st != PW_OK) {
            pw_profile_destroy(p);
            return st;
        }
        PW_INFO(PW_SUB_STAGE, "%s: reusing the profile of %s", path, g->name);
        *out = p;
        return PW_OK;
    }
    pw_profile *p = NULL;
    PW_CHECK(pw_profile_measure(g, cfg, &p));
    if (path) {
        pw_status st = pw_profile_save(p, path);
        if (st != PW_OK) {
            pw_profile_destroy(p);
            return st;
        }
    }
    if (measured) *measured = 1;
    *out = p;
    return PW_OK;
}
