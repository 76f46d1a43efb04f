/* pipewright — the slow link (a throttle around any collective, and the
 * arrival times of point-to-point messages) and --allreduce auto's choice
 * among collectives by their alpha-beta lines. See link.h. */
#include "runtime/link.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/log.h"
#include "runtime/trace.h" /* pw_now_ns */

int64_t pw_link_clock_due(pw_link_clock *c, const pw_link *l, int64_t now_ns, size_t bytes)
{
    if (!pw_link_on(l)) return now_ns;
    int64_t leave = c->free_ns > now_ns ? c->free_ns : now_ns;
    int64_t busy = l->bandwidth > 0 ? (int64_t)ceil((double)bytes / l->bandwidth * 1e9) : 0;
    c->free_ns = leave + busy;
    return c->free_ns + (int64_t)ceil(l->latency_s * 1e9);
}

double pw_link_allreduce_s(const pw_link *l, pw_allreduce_algo algo, int n, int hosts, double bytes)
{
    if (!pw_link_on(l) || n <= 1) return 0.0;
    const double inv_b = l->bandwidth > 0 ? 1.0 / l->bandwidth : 0.0, a = l->latency_s;
    const double seg = bytes / n;
    switch (algo) {
    case PW_ALLREDUCE_TREE: return 2.0 * ((n - 1) * seg * inv_b + a);
    case PW_ALLREDUCE_RING:
    case PW_ALLREDUCE_MPI: return 2.0 * (n - 1) * (seg * inv_b + a);
    case PW_ALLREDUCE_HIER:
        if (hosts <= 1) return 0.0;
        return 2.0 * ((hosts - 1) * (bytes / hosts) * inv_b + a);
    default: return 0.0;
    }
}

pw_status pw_link_sleep_until(int64_t until_ns, const atomic_int *abort, const char *what)
{
    for (;;) {
        int64_t left = until_ns - pw_now_ns();
        if (left <= 0) return PW_OK;
        if (abort && atomic_load_explicit(abort, memory_order_relaxed))
            return pw_error(PW_ERR_TIMEOUT, "%s: aborted", what);
        if (left > 1000000) left = 1000000;
        struct timespec ts = {0, (long)left};
        nanosleep(&ts, NULL);
    }
}

/* ------------------------------------------------------------ throttle */

typedef struct throttle {
    pw_coll inner;
    pw_link link;
    pw_allreduce_algo algo;
    int hosts;
} throttle;

static pw_status th_allreduce(void *self, int member, const pw_span *spans, int n_spans, const atomic_int *abort)
{
    throttle *t = self;
    (void)member;
    PW_CHECK(pw_coll_allreduce(&t->inner, spans, n_spans, abort));
    const double bytes = (double)pw_span_total(spans, n_spans) * sizeof(float);
    const double s = pw_link_allreduce_s(&t->link, t->algo, t->inner.n_members, t->hosts, bytes);
    return pw_link_sleep_until(pw_now_ns() + (int64_t)(s * 1e9), abort, "throttled all-reduce");
}

static pw_status th_allgather(void *self, int member, double v, double *out, const atomic_int *abort)
{
    throttle *t = self;
    (void)member;
    PW_CHECK(pw_coll_allgather_f64(&t->inner, v, out, abort));
    const int n = t->inner.n_members;
    const double inv_b = t->link.bandwidth > 0 ? 1.0 / t->link.bandwidth : 0.0;
    const double s = n > 1 ? 2.0 * (n - 1) * (8.0 * inv_b + t->link.latency_s) : 0.0;
    return pw_link_sleep_until(pw_now_ns() + (int64_t)(s * 1e9), abort, "throttled all-gather");
}

static int th_waiting_for(void *self, int member)
{
    throttle *t = self;
    (void)member;
    return t->inner.vt->waiting_for ? t->inner.vt->waiting_for(t->inner.self, t->inner.member) : -1;
}

/* The compressed all-reduces' gather (runtime/compress.h): each member
 * receives the n − 1 other payloads, as n − 1 messages of `bytes` over
 * the link. */
static pw_status th_allgather_bytes(void *self, int member, const void *mine, int64_t bytes, void *out,
                                    const atomic_int *abort)
{
    throttle *t = self;
    (void)member;
    PW_CHECK(pw_coll_allgather_bytes(&t->inner, mine, bytes, out, abort));
    const int n = t->inner.n_members;
    const double inv_b = t->link.bandwidth > 0 ? 1.0 / t->link.bandwidth : 0.0;
    const double s = n > 1 ? (n - 1) * ((double)bytes * inv_b + t->link.latency_s) : 0.0;
    return pw_link_sleep_until(pw_now_ns() + (int64_t)(s * 1e9), abort, "throttled all-gather");
}

static const pw_coll_i throttle_i = {
    .name = "throttled", .allreduce = th_allreduce, .allgather_f64 = th_allgather,
    .waiting_for = th_waiting_for, .allgather_bytes = th_allgather_bytes};

pw_status pw_coll_throttle_create(const pw_coll *inner, const pw_link *l, pw_allreduce_algo algo, int hosts,
                                  pw_coll *out)
{
    memset(out, 0, sizeof *out);
    throttle *t = calloc(1, sizeof *t);
    if (!t) return pw_error(PW_ERR_NOMEM, "throttled collective: out of memory");
    t->inner = *inner;
    t->link = *l;
    t->algo = algo;
    t->hosts = hosts;
    *out = (pw_coll){.vt = &throttle_i, .self = t, .member = inner->member, .n_members = inner->n_members};
    return PW_OK;
}

void pw_coll_throttle_destroy(pw_coll *c)
{
    if (!c || c->vt != &throttle_i) return;
    free(c->self);
    memset(c, 0, sizeof *c);
}

/* ---------------------------------------------------------------- auto */

int pw_ab_pick(const pw_ab *table, const int *usable, int n, double bytes)
{
    int best = -1;
    double best_t = 0.0;
    for (int i = 0; i < n; i++) {
        if (usable && !usable[i]) continue;
        double t = table[i].alpha + table[i].beta * bytes;
        if (best < 0 || t < best_t) {
            best = i;
            best_t = t;
        }
    }
    return best;
}

pw_ab pw_ab_fit(double b0, double t0, double b1, double t1)
{
    pw_ab ab = {0.0, 0.0};
    if (b1 != b0) ab.beta = (t1 - t0) / (b1 - b0);
    if (ab.beta < 0) ab.beta = 0.0;
    ab.alpha = t0 - ab.beta * b0;
    if (ab.alpha < 0) ab.alpha = 0.0;
    return ab;
}

typedef struct coll_auto {
    pw_coll *cands;
    const char *const *names;
    pw_ab *table;
    int n;
} coll_auto;

static pw_status au_allreduce(void *self, int member, const pw_span *spans, int n_spans, const atomic_int *abort)
{
    coll_auto *a = self;
    (void)member;
    int k = pw_ab_pick(a->table, NULL, a->n, (double)pw_span_total(spans, n_spans) * sizeof(float));
    return pw_coll_allreduce(&a->cands[k < 0 ? 0 : k], spans, n_spans, abort);
}

static pw_status au_allgather(void *self, int member, double v, double *out, const atomic_int *abort)
{
    coll_auto *a = self;
    (void)member;
    return pw_coll_allgather_f64(&a->cands[0], v, out, abort);
}

/* Gathers take the first candidate that can (the tree, when it is one). */
static pw_status au_allgather_bytes(void *self, int member, const void *mine, int64_t bytes, void *out,
                                    const atomic_int *abort)
{
    coll_auto *a = self;
    (void)member;
    for (int i = 0; i < a->n; i++)
        if (a->cands[i].vt->allgather_bytes) return pw_coll_allgather_bytes(&a->cands[i], mine, bytes, out, abort);
    return pw_coll_allgather_bytes(&a->cands[0], mine, bytes, out, abort); /* the error */
}

static const pw_coll_i auto_i = {.name = "auto", .allreduce = au_allreduce, .allgather_f64 = au_allgather,
                                 .allgather_bytes = au_allgather_bytes};

pw_status pw_coll_auto_create(const pw_coll_auto_cfg *cfg, pw_coll *out)
{
    memset(out, 0, sizeof *out);
    if (!cfg || cfg->n < 1 || !cfg->cands)
        return pw_error(PW_ERR_INVALID_ARG, "--allreduce auto: no candidate algorithms");
    coll_auto *a = calloc(1, sizeof *a);
    pw_coll *cands = calloc((size_t)cfg->n, sizeof *cands);
    pw_ab *table = calloc((size_t)cfg->n, sizeof *table);
    if (!a || !cands || !table) {
        free(a);
        free(cands);
        free(table);
        return pw_error(PW_ERR_NOMEM, "--allreduce auto: out of memory");
    }
    memcpy(cands, cfg->cands, sizeof *cands * (size_t)cfg->n);
    if (cfg->table) memcpy(table, cfg->table, sizeof *table * (size_t)cfg->n);
    a->cands = cands;
    a->table = table;
    a->names = cfg->names;
    a->n = cfg->n;
    *out = (pw_coll){.vt = &auto_i, .self = a, .member = cands[0].member, .n_members = cands[0].n_members};
    return PW_OK;
}

void pw_coll_auto_destroy(pw_coll *c)
{
    if (!c || c->vt != &auto_i) return;
    coll_auto *a = c->self;
    free(a->cands);
    free(a->table);
    free(a);
    memset(c, 0, sizeof *c);
}

int pw_coll_auto_choice(const pw_coll *c, double bytes)
{
    if (!c || c->vt != &auto_i) return -1;
    const coll_auto *a = c->self;
    return pw_ab_pick(a->table, NULL, a->n, bytes);
}

pw_status pw_coll_auto_measure(pw_coll *c, int64_t small, int64_t big, int reps, pw_ab *out_table)
{
    if (!c || c->vt != &auto_i) return pw_error(PW_ERR_INVALID_ARG, "pw_coll_auto_measure: not an auto collective");
    coll_auto *a = c->self;
    if (small < 1 || big <= small || reps < 1)
        return pw_error(PW_ERR_INVALID_ARG, "pw_coll_auto_measure: sizes %lld, %lld, %d repetitions",
                        (long long)small, (long long)big, reps);
    float *buf = calloc((size_t)big, sizeof *buf);
    double *all = calloc((size_t)c->n_members, sizeof *all);
    pw_status st = buf && all ? PW_OK : pw_error(PW_ERR_NOMEM, "--allreduce auto: out of memory");
    for (int i = 0; st == PW_OK && i < a->n; i++) {
        double best[2] = {INFINITY, INFINITY};
        const int64_t len[2] = {small, big};
        for (int s = 0; st == PW_OK && s < 2; s++)
            for (int r = 0; st == PW_OK && r <= reps; r++) { /* r = 0 warms up */
                pw_span sp = {buf, len[s]};
                int64_t t0 = pw_now_ns();
                st = pw_coll_allreduce(&a->cands[i], &sp, 1, NULL);
                double t = (double)(pw_now_ns() - t0) / 1e9;
                if (r > 0 && t < best[s]) best[s] = t;
            }
        if (st != PW_OK) break;
        pw_ab ab = pw_ab_fit((double)small * sizeof(float), best[0], (double)big * sizeof(float), best[1]);
        /* Member 0's line for everyone: the choice must be the same on
         * every member, or the members would run different algorithms. */
        st = pw_coll_allgather_f64(&a->cands[i], ab.alpha, all, NULL);
        if (st == PW_OK) a->table[i].alpha = all[0];
        if (st == PW_OK) st = pw_coll_allgather_f64(&a->cands[i], ab.beta, all, NULL);
        if (st == PW_OK) a->table[i].beta = all[0];
        if (st == PW_OK)
            PW_INFO(PW_SUB_COMM, "--allreduce auto: %s: alpha %.1f us, beta %.3f ns/byte (%.2f GB/s)",
                    a->names ? a->names[i] : "?", a->table[i].alpha * 1e6, a->table[i].beta * 1e9,
                    a->table[i].beta > 0 ? 1e-9 / a->table[i].beta : 0.0);
    }
    if (st == PW_OK && out_table) memcpy(out_table, a->table, sizeof *out_table * (size_t)a->n);
    free(buf);
    free(all);
    return st;
}
