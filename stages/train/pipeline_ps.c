/* pipewright — the parameter server (stages/train/ps.h): the workers' side
 * (pushing gradient buckets, pulling parameters) and the servers' loop.
 *
 * Messages (the transport's ps_isend / ps_irecv, by world rank):
 *   worker -> server, once, before the first step: HELLO_N (int64: bytes
 *                            of the hello), HELLO (int64 n, staleness, the
 *                            step the run starts from, optimizer state
 *                            floats per element sf, --clip-grad-norm as a
 *                            double, tied across chunks, --compress's kind,
 *                            ratio (a double) and rank; n x {int64 graph param,
 *                            numel, chunk, index in the worker's list, uses
 *                            in its program, the first use's index among
 *                            the process's uses of the parameter},
 *                            in the worker's order (chunks, pieces,
 *                            parameters: grad_sumsq's); the pipeline's pw_optim_config
 *                            in OPTIM_BYTES; the n parameters' values; then
 *                            their optimizer state, sf x numel each);
 *   worker -> server, each step and use of a parameter: the use's gradient
 *                            (fp32, or with --compress bf16/fp16/topk its
 *                            compressed payload; with --compress powersgd
 *                            its P, then its Q: below), tag = ps_tag(use): the
 *                            graph parameter's index for its first use in
 *                            the process (so every untied parameter's);
 *                            with staleness > 0 first (same tag) the
 *                            version it was computed on (int64), so the
 *                            server knows its staleness;
 *   server -> worker, each step and copy of a parameter: the new values and
 *                            the step's gradient norm (a double; -1 without
 *                            --clip-grad-norm), under the copy's first use's
 *                            tag;
 *   worker of replica 0 -> server, at a checkpoint: STATE_REQ (int64: the
 *                            step); server -> worker, once it holds that
 *                            version: STATE (the optimizer state of the
 *                            worker's parameters there, graph order, sf x
 *                            numel each);
 *   --compress powersgd, per step and use of a matrix it compresses (after
 *                            the worker's P, before its Q): server -> worker
 *                            the replicas' P summed and orthogonalised, then
 *                            (after the Q's) the summed Q, under the reply
 *                            tag max_tag - ps_tag(use);
 *   worker -> server, once at the end: BYE (int64: steps done).
 *   --clip-grad-norm with K > 1 servers: server j -> server 0, once:
 *                            NORM_META_N, NORM_META (its parameters' rank,
 *                            chunk, place, size); each step: NORM_GRAD
 *                            (their summed gradients); server 0 -> j:
 *                            NORM_COEF (the coefficient and the norm).
 * Between one pair of processes MPI delivers messages of one tag in order,
 * so step t's gradient and version t's values never need a step number. */
#include <sched.h>
#include <time.h>

#include "stages/train/pipeline-internal.h"
#include "stages/train/ps.h"

#define TAG_HELLO_N(np) (np)
#define TAG_HELLO(np) ((np) + 1)
#define TAG_BYE(np) ((np) + 2)
#define TAG_STATE_REQ(np) ((np) + 3) /* worker -> server: int64 step */
#define TAG_STATE(np) ((np) + 4)     /* server -> worker: the optimizer state */
#define HELLO_HEAD 9                 /* int64 n, staleness, start step, state floats per element,
                                        --clip-grad-norm (a double's bits), tied across chunks,
                                        --compress's kind, top-k ratio (a double's bits) and
                                        PowerSGD rank */
#define PAIR 6                       /* per parameter: int64 graph param, numel, chunk, its index in
                                        the worker's order (chunks, pieces, parameters), its uses in
                                        the program, the first use's index in this process */
#define MAX_USES 16                  /* uses of one parameter in one program (gs_grad_bucket's) */
#define NORM_FLOATS 2                /* each version ends with a double: the step's gradient norm
                                        (--clip-grad-norm; -1 without) */
#define OPTIM_BYTES ((sizeof(pw_optim_config) + 7) / 8 * 8)

/* The tag of use `lu` of graph parameter gp in one process (its uses
 * counted over its chunks, pieces and each program's uses in order): use 0
 * keeps the parameter's index, so an untied parameter's messages are as
 * they were; the others come after the control tags. A copy's values
 * travel under its first use's tag. */
static int ps_tag(int np, int gp, int lu) { return lu == 0 ? gp : np + 9 + (lu - 1) * np + gp; }

/* PowerSGD's replies to a use (server -> worker) count down from the top,
 * clear of every ps_tag (pl_ps_create checks there is room). */
static int ps_reply_tag(const pw_transport *t, int tag) { return t->max_tag - tag; }

void pw_ps_assign(const pw_graph *g, int K, int *out)
{
    const int n = g->n_params;
    int64_t *load = calloc((size_t)(K > 0 ? K : 1), sizeof *load);
    unsigned char *done = calloc((size_t)(n > 0 ? n : 1), 1);
    for (int k = 0; k < n; k++) {
        int best = -1;
        int64_t bb = -1;
        for (int p = 0; p < n; p++) { /* the largest not placed yet; ties: graph order */
            const int64_t b = pw_shape_numel(&g->params[p].shape);
            if (!done[p] && b > bb) bb = b, best = p;
        }
        int s = 0;
        for (int j = 1; j < K && load; j++)
            if (load[j] < load[s]) s = j;
        done[best] = 1;
        out[best] = s;
        if (load) load[s] += bb * (int64_t)sizeof(float);
    }
    free(load);
    free(done);
}

/* Waits for `req`, bounded the way the transport's world waits are: after
 * the watchdog, pw_transport_blame names a stalled or lost process (a wait
 * whose chain ends at a process still making progress goes on). */
static pw_status ps_wait_or_abort(const pw_transport *t, pw_treq *req, int peer, const char *what,
                                  const atomic_int *abort);

static pw_status ps_wait(const pw_transport *t, pw_treq *req, int peer, const char *what)
{
    return ps_wait_or_abort(t, req, peer, what, NULL);
}

/* ps_wait that also gives up when the engine aborts the step. */
static pw_status ps_wait_or_abort(const pw_transport *t, pw_treq *req, int peer, const char *what,
                                  const atomic_int *abort)
{
    pw_transport_waiting(t, peer);
    const int64_t t0 = pw_now_ns();
    int64_t check = t0 + (int64_t)(t->watchdog_s * 1e9);
    pw_status st = PW_OK;
    for (int spin = 0;; spin++) {
        const int rc = t->vt->test(t->self, req);
        if (rc < 0) {
            st = pw_error(PW_ERR_IO, "%s: %s", what, pw_last_error());
            break;
        }
        if (rc == 1) break;
        if (abort && atomic_load_explicit(abort, memory_order_relaxed)) {
            st = pw_error(PW_ERR_TIMEOUT, "%s: aborted", what);
            break;
        }
        if (spin < 64) {
            sched_yield();
            continue;
        }
        nanosleep(&(struct timespec){0, 20000}, NULL);
        const int64_t now = pw_now_ns();
        if (now < check) continue;
        char why[400] = "";
        if (pw_transport_blame(t, t->watchdog_s, t->state ? t->state->act_name : NULL, why, sizeof why) == -1) {
            check = now + 100000000LL;
            continue;
        }
        st = pw_error(PW_ERR_TIMEOUT, "%s%swaited %.1f s for %s", why, why[0] ? "; " : "", (double)(now - t0) / 1e9,
                      what);
        break;
    }
    pw_transport_waiting(t, PW_WAIT_NOBODY);
    pw_transport_progress(t);
    return st;
}

static const char *const stale_lr_names[] = {"inverse", "none"}; /* pw_ps_stale_lr's order */

pw_status pw_ps_stale_lr_parse(const char *s, pw_ps_stale_lr *out)
{
    for (int i = 0; i < 2; i++)
        if (s && !strcmp(s, stale_lr_names[i])) return *out = (pw_ps_stale_lr)i, PW_OK;
    return pw_error(PW_ERR_INVALID_ARG, "--staleness-lr: '%s' is not inverse or none", s ? s : "(null)");
}

const char *pw_ps_stale_lr_name(pw_ps_stale_lr rule) { return (unsigned)rule < 2 ? stale_lr_names[rule] : "?"; }

/* Zhang, Gupta, Lian, Liu, "Staleness-aware Async-SGD for Distributed Deep
 * Learning" (IJCAI 2016): the learning rate divided by the staleness, for
 * an update of several gradients by their mean. */
double pw_ps_stale_lr_factor(pw_ps_stale_lr rule, int64_t step, const int64_t *read, int R)
{
    if (rule != PW_PS_STALE_LR_INVERSE || R < 1) return 1.0;
    int64_t sum = 0;
    for (int k = 0; k < R; k++) sum += step - read[k] > 1 ? step - read[k] : 1;
    return sum == R ? 1.0 : (double)R / (double)sum;
}

/* ================================================================ workers */

typedef struct ps_param {
    int gp, server;           /* graph parameter; the server's world rank */
    int chunk;
    pw_program *prog;
    int idx;                  /* its index in prog */
    int64_t numel;
    int n_uses, lu0;          /* its uses in the program; the first's index among this process's
                                 uses of gp (ps_tag) */
    float *use[MAX_USES];     /* each use's gradient, pushed as it is (a tied parameter's uses are
                                 summed by the server, in pipeline_ties.c's order) */
    float *slot;              /* [slots][numel + NORM_FLOATS]: versions being received */
    pw_treq *rreq;            /* [slots] */
    int64_t posted;           /* versions 1 .. posted have a receive posted */
    int64_t have;             /* the newest version received */
    int64_t applied;          /* the version in the program */
    pw_treq sreq[MAX_USES];   /* the gradient sends in flight */
    int64_t read;             /* with staleness: the version the pushed gradients were computed on */
    pw_treq vreq[MAX_USES];   /* its sends, one ahead of each use's gradient */
    pw_treq breq[MAX_USES];   /* --compress powersgd: each use's reply being received */
    unsigned char sent[MAX_USES]; /* a message of this round went out for the use */
} ps_param;

typedef struct ps_bucket {
    const float *key;         /* the bucket's first span (the engine's spans[0].data) */
    int first, n;             /* its parameters in par[] */
} ps_bucket;

struct pl_ps {
    pw_pipeline *pl;
    pw_transport t;           /* the pipeline's, with stage_coll = the push */
    pw_stage_i vt;            /* the chunks' vtable, with optimizer_step = the pull */
    int K, stale, slots;
    int *server_of;           /* [n_params] */
    ps_param *par;
    int n_par;
    int *chunk_first;         /* [C + 1] parameters of chunk c: par[chunk_first[c] .. chunk_first[c+1]) */
    ps_bucket *bk;
    int n_bk;
    int tied;                 /* parameters tied across chunks (the all-reduce run's finish_step) */
    int ready;                /* the pipeline is built (pl_ps_start) */
    int hello_sent;           /* the servers have this process's parameters (pl_ps_begin) */
};

/* Receives of later versions complete in order; taking each that has
 * arrived lets MPI move the next (a large message needs both sides to
 * progress it). No wait. */
static pw_status ps_progress(pl_ps *ps)
{
    const pw_transport *t = &ps->t;
    for (int i = 0; i < ps->n_par; i++) {
        ps_param *p = &ps->par[i];
        while (p->have < p->posted) {
            const int rc = t->vt->test(t->self, &p->rreq[(p->have + 1) % ps->slots]);
            if (rc < 0) return pw_error(PW_ERR_IO, "pulling %s: %s", ps->pl->g->params[p->gp].name, pw_last_error());
            if (rc == 0) break;
            p->have++;
        }
    }
    return PW_OK;
}

/* The engine's all-reduce of one bucket, on the worker's communication
 * thread: send each parameter's gradient to its server and post the receive
 * of the version it will compute. The gradients stay as they are (the
 * worker does not step); the pull replaces the parameters at OPTIM. */
/* What a push sends per use instead of its fp32 gradient: a compressed
 * payload (mine, off: bf16, fp16, top-k) or PowerSGD's round (out; the
 * replies go to back). */
typedef struct ps_src {
    const unsigned char *mine;
    const int64_t *off;
    int round;
    const pw_span *out, *back;
} ps_src;

static pw_status ps_send(pl_ps *ps, const pw_span *spans, int n_spans, const ps_src *src, const atomic_int *abort);

static pw_status ps_push(void *self, int member, const pw_span *spans, int n_spans, const atomic_int *abort)
{
    (void)member;
    return ps_send(self, spans, n_spans, NULL, abort);
}

/* --compress (bf16, fp16, top-k): the compressor has encoded the bucket;
 * each use's payload goes where its gradient would (span j of the bucket is
 * use j in the order of the bucket's parameters and their uses). */
static pw_status ps_push_bytes(void *self, int member, const pw_span *spans, int n_spans, const void *mine,
                               const int64_t *off, const atomic_int *abort)
{
    (void)member;
    const ps_src src = {.mine = mine, .off = off};
    return ps_send(self, spans, n_spans, &src, abort);
}

/* --compress powersgd: round 0 (P, or the fp32 gradient of a use sent
 * uncompressed) and round 1 (Q) of the bucket, each use's reply received
 * into back[j] before it returns. */
static pw_status ps_push_round(void *self, int member, const pw_span *spans, int n_spans, int round,
                               const pw_span *out, const pw_span *back, const atomic_int *abort)
{
    (void)member;
    const ps_src src = {.round = round, .out = out, .back = back};
    return ps_send(self, spans, n_spans, &src, abort);
}

/* The push of a bucket: fp32 gradients (src NULL), their compressed
 * payloads, or a PowerSGD round. Round 0 (every push but PowerSGD's Q)
 * posts the receive of the version the step computes. */
static pw_status ps_send(pl_ps *ps, const pw_span *spans, int n_spans, const ps_src *src, const atomic_int *abort)
{
    const pw_transport *t = &ps->t;
    if (n_spans < 1) return PW_OK;
    const ps_bucket *b = NULL;
    for (int i = 0; i < ps->n_bk && !b; i++)
        if (ps->bk[i].key == spans[0].data) b = &ps->bk[i];
    if (!b) return pw_error(PW_ERR_INTERNAL, "parameter server: a gradient bucket the pipeline does not know");
    const int np = ps->pl->g->n_params;
    const int round = src ? src->round : 0;
    int j = 0; /* the span (use) of the bucket */
    for (int i = b->first; i < b->first + b->n; i++) {
        ps_param *p = &ps->par[i];
        if (round == 0) {
            const int64_t v = ++p->posted;
            const int s = (int)(v % ps->slots);
            PW_CHECK(t->vt->ps_irecv(t->self, p->server, ps_tag(np, p->gp, p->lu0),
                                     p->slot + (size_t)s * (size_t)(p->numel + NORM_FLOATS),
                                     (size_t)(p->numel + NORM_FLOATS) * sizeof(float), &p->rreq[s]));
            /* The version this step's forward and backward used (the pull
             * comes after the push), ahead of each use's gradient on its tag. */
            p->read = p->applied;
        }
        for (int u = 0; u < p->n_uses; u++, j++) {
            if (j >= n_spans || spans[j].data != p->use[u])
                return pw_error(PW_ERR_INTERNAL, "parameter server: bucket span %d is not the use of %s expected", j,
                                ps->pl->g->params[p->gp].name);
            const void *from = (const void *)p->use[u];
            size_t len = (size_t)p->numel * sizeof(float);
            if (src && src->out) from = src->out[j].data, len = (size_t)src->out[j].n * sizeof(float);
            else if (src) from = src->mine + src->off[j], len = (size_t)(src->off[j + 1] - src->off[j]);
            const int tag = ps_tag(np, p->gp, p->lu0 + u);
            if (src && src->back && src->back[j].n > 0) /* the reply's receive before the send it answers */
                PW_CHECK(t->vt->ps_irecv(t->self, p->server, ps_reply_tag(t, tag), src->back[j].data,
                                         (size_t)src->back[j].n * sizeof(float), &p->breq[u]));
            p->sent[u] = len > 0 || round == 0;
            if (!p->sent[u]) continue;
            if (ps->stale) PW_CHECK(t->vt->ps_isend(t->self, p->server, tag, &p->read, sizeof p->read, &p->vreq[u]));
            PW_CHECK(t->vt->ps_isend(t->self, p->server, tag, from, len, &p->sreq[u]));
        }
    }
    /* The sends complete once the servers take them (small ones at once);
     * the version's first (a slow link posts a held send when tested, so
     * this keeps the two in order). */
    for (int i = b->first; i < b->first + b->n; i++) {
        ps_param *p = &ps->par[i];
        /* per use: its version (with staleness), then its gradient */
        for (int u = 0, v = ps->stale ? 0 : 1, spin = 0; u < p->n_uses; spin++) {
            if (!p->sent[u]) {
                u++;
                continue;
            }
            const int rc = t->vt->test(t->self, v == 0 ? &p->vreq[u] : &p->sreq[u]);
            if (rc < 0)
                return pw_error(PW_ERR_IO, "pushing the gradient of %s: %s", ps->pl->g->params[p->gp].name,
                                pw_last_error());
            if (rc == 1) {
                if (v == 0) v = 1;
                else u++, v = ps->stale ? 0 : 1;
                continue;
            }
            if (abort && atomic_load_explicit(abort, memory_order_relaxed))
                return pw_error(PW_ERR_TIMEOUT, "pushing gradients to the servers: aborted");
            if (ps->stale) PW_CHECK(ps_progress(ps));
            if (spin < 64) sched_yield();
            else nanosleep(&(struct timespec){0, 20000}, NULL);
        }
    }
    /* PowerSGD: the replies (the server sends them once every replica's
     * factors of the use are in). */
    for (int i = b->first, jj = 0; src && src->back && i < b->first + b->n; i++) {
        ps_param *p = &ps->par[i];
        for (int u = 0; u < p->n_uses; u++, jj++) {
            if (src->back[jj].n <= 0) continue;
            char what[256];
            snprintf(what, sizeof what, "the summed PowerSGD %s of %s from MPI rank %d (server %d)",
                     round == 0 ? "P" : "Q", ps->pl->g->params[p->gp].name, p->server,
                     p->server - t->n_ranks * t->n_replicas);
            PW_CHECK(ps_wait_or_abort(t, &p->breq[u], p->server, what, abort));
        }
    }
    return ps->stale ? ps_progress(ps) : PW_OK;
}

static pw_status ps_no_gather(void *self, int member, double v, double *out, const atomic_int *abort)
{
    (void)self, (void)member, (void)v, (void)out, (void)abort;
    return pw_error(PW_ERR_UNSUPPORTED, "parameter server: no gradient norm across replicas");
}

static const pw_coll_i ps_coll_i = {.name = "ps-push", .allreduce = ps_push, .allgather_f64 = ps_no_gather,
                                    .push_bytes = ps_push_bytes, .push_round = ps_push_round};

/* OPTIM of a chunk: every parameter at version step − staleness or newer
 * (the newest received), then the gradients cleared for the next step. */
static pw_status ps_pull(void *self, long step)
{
    gstage *gs = self;
    pw_pipeline *pl = gs->pl;
    pl_ps *ps = pl->ps;
    const pw_transport *t = &ps->t;
    const int64_t need = step - ps->stale;
    const int64_t t0 = pw_now_ns();
    int64_t oldest = INT64_MAX, bytes = 0;
    int server = -1;
    for (int i = ps->chunk_first[gs->index]; i < ps->chunk_first[gs->index + 1]; i++) {
        ps_param *p = &ps->par[i];
        /* Versions arrive in order: take what is there, wait for what is needed. */
        while (p->have < p->posted) {
            pw_treq *r = &p->rreq[(p->have + 1) % ps->slots];
            if (p->have >= need) {
                const int rc = t->vt->test(t->self, r);
                if (rc < 0) return pw_error(PW_ERR_IO, "pulling %s: %s", pl->g->params[p->gp].name, pw_last_error());
                if (rc == 0) break;
            } else {
                char what[256];
                snprintf(what, sizeof what, "version %lld of %s from MPI rank %d (server %d)",
                         (long long)(p->have + 1), pl->g->params[p->gp].name, p->server,
                         p->server - t->n_ranks * t->n_replicas);
                PW_CHECK(ps_wait(t, r, p->server, what));
            }
            p->have++;
        }
        if (p->have < need)
            return pw_error(PW_ERR_INTERNAL, "parameter server: %s: version %lld needed, only %lld pushed",
                            pl->g->params[p->gp].name, (long long)need, (long long)p->posted);
        if (p->have > p->applied) {
            const float *src = p->slot + (size_t)(p->have % ps->slots) * (size_t)(p->numel + NORM_FLOATS);
            PW_CHECK(pw_program_param_write(p->prog, p->idx, PW_PARAM_DATA, src));
            p->applied = p->have;
            bytes += p->numel * (int64_t)sizeof(float);
            memcpy(&pl->grad_norm, src + p->numel, sizeof(double)); /* the server's norm of that step */
        }
        if (p->applied < oldest) oldest = p->applied, server = p->server;
    }
    for (int j = 0; j < gs->n_pieces; j++) pw_program_zero_grads(gs->piece[j]);
    if (pl->trace && ps->chunk_first[gs->index + 1] > ps->chunk_first[gs->index]) {
        /* The version the next forward uses (the oldest of the chunk's
         * parameters): step − version − 1 steps stale. */
        pw_trace_event *ev = pw_trace_push(pl->trace, t->world_rank);
        if (ev) {
            ev->name = "PS_PULL";
            ev->cat = PW_TRACE_COMM;
            ev->chunk = gs->index;
            ev->mb = (int32_t)oldest;
            ev->peer = server;
            ev->step = step;
            ev->bytes = bytes;
            ev->t0_ns = t0;
            ev->t1_ns = pw_now_ns();
        }
    }
    return PW_OK;
}

/* The hello to every server: this process's parameters (their values and
 * optimizer state as the programs hold them: initial, --init-from's or a
 * resumed checkpoint's) and the step the run goes on from. Sent before the
 * first step (not at construction), so that whatever the caller loads
 * between the two is what the servers start from. */
static pw_status ps_hello(pl_ps *ps)
{
    const pw_transport *t = &ps->t;
    const int np = ps->pl->g->n_params;
    const int sf = pw_optim_state_floats(ps->pl->cfg.optim.kind);
    const int64_t start = ps->pl->step;
    for (int i = 0; i < ps->n_par; i++) {
        ps_param *p = &ps->par[i];
        p->posted = p->have = p->applied = start; /* versions count the run's steps */
    }
    for (int k = 0; k < ps->K; k++) {
        const int srv = t->n_ranks * t->n_replicas + k;
        int64_t n = 0, floats = 0;
        for (int i = 0; i < ps->n_par; i++)
            if (ps->par[i].server == srv) n++, floats += ps->par[i].numel;
        const int64_t bytes = (int64_t)sizeof(int64_t) * (HELLO_HEAD + PAIR * n) + (int64_t)OPTIM_BYTES +
                              floats * (1 + sf) * (int64_t)sizeof(float);
        char *msg = calloc(1, (size_t)bytes);
        if (!msg) return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        int64_t *h = (int64_t *)(void *)msg, *pair = h + HELLO_HEAD;
        memcpy(pair + PAIR * n, &ps->pl->cfg.optim, sizeof(pw_optim_config));
        float *v = (float *)(void *)((char *)(pair + PAIR * n) + OPTIM_BYTES), *sv = v + floats;
        h[0] = n;
        h[1] = ps->stale;
        h[2] = start;
        h[3] = sf;
        memcpy(&h[4], &ps->pl->cfg.clip_grad_norm, sizeof(double));
        h[5] = ps->tied;
        h[6] = ps->pl->cfg.compress.kind;
        memcpy(&h[7], &ps->pl->cfg.compress.ratio, sizeof(double));
        h[8] = ps->pl->cfg.compress.rank;
        pw_status st = PW_OK;
        for (int i = 0, m = 0; i < ps->n_par && st == PW_OK; i++) {
            const ps_param *p = &ps->par[i];
            if (p->server != srv) continue;
            pair[PAIR * m] = p->gp;
            pair[PAIR * m + 1] = p->numel;
            pair[PAIR * m + 2] = p->chunk;
            pair[PAIR * m + 3] = i;
            pair[PAIR * m + 4] = p->n_uses;
            pair[PAIR * m + 5] = p->lu0;
            m++;
            st = pw_program_param_read(p->prog, p->idx, PW_PARAM_DATA, 0, v);
            v += p->numel;
            for (int b = 0; b < sf && st == PW_OK; b++, sv += p->numel)
                st = pw_program_param_read(p->prog, p->idx, PW_PARAM_STATE, b, sv);
        }
        pw_treq r[2];
        char what[96];
        snprintf(what, sizeof what, "MPI rank %d (server %d) to take this process's parameters", srv, k);
        if (st == PW_OK) st = t->vt->ps_isend(t->self, srv, TAG_HELLO_N(np), &bytes, sizeof bytes, &r[0]);
        if (st == PW_OK) st = ps_wait(t, &r[0], srv, what);
        if (st == PW_OK) st = t->vt->ps_isend(t->self, srv, TAG_HELLO(np), msg, (size_t)bytes, &r[1]);
        if (st == PW_OK) st = ps_wait(t, &r[1], srv, what);
        free(msg);
        PW_CHECK(st);
    }
    ps->hello_sent = 1;
    return PW_OK;
}

static int by_gp(const void *a, const void *b)
{
    const ps_param *x = *(ps_param *const *)a, *y = *(ps_param *const *)b;
    return (x->gp > y->gp) - (x->gp < y->gp);
}

/* A checkpoint after step pl->step: every worker settles (with staleness:
 * version pl->step in place, so the checkpoint is a synchronisation point),
 * and replica 0's workers, whose programs the checkpoint writer reads,
 * fetch their parameters' optimizer state from the servers into their
 * programs (a worker does not step, so its own state is the hello's). The
 * servers answer once they hold exactly that version. */
static pw_status ps_fetch_state(pl_ps *ps)
{
    const pw_transport *t = &ps->t;
    const int np = ps->pl->g->n_params;
    const int sf = pw_optim_state_floats(ps->pl->cfg.optim.kind);
    ps_param **mine = malloc((size_t)(ps->n_par > 0 ? ps->n_par : 1) * sizeof *mine);
    if (!mine) return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    pw_status st = PW_OK;
    for (int k = 0; k < ps->K && st == PW_OK; k++) {
        const int srv = t->n_ranks * t->n_replicas + k;
        int n = 0;
        int64_t floats = 0;
        for (int i = 0; i < ps->n_par; i++)
            if (ps->par[i].server == srv) mine[n++] = &ps->par[i], floats += ps->par[i].numel * sf;
        if (n == 0) continue;
        qsort(mine, (size_t)n, sizeof *mine, by_gp); /* the server's order: graph order */
        float *buf = malloc((size_t)floats * sizeof(float) + 1);
        if (!buf) {
            st = pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
            break;
        }
        const int64_t step = ps->pl->step;
        pw_treq r[2];
        char what[160];
        snprintf(what, sizeof what, "the optimizer state of step %lld from MPI rank %d (server %d)", (long long)step,
                 srv, k);
        st = t->vt->ps_irecv(t->self, srv, TAG_STATE(np), buf, (size_t)floats * sizeof(float), &r[1]);
        if (st == PW_OK) st = t->vt->ps_isend(t->self, srv, TAG_STATE_REQ(np), &step, sizeof step, &r[0]);
        if (st == PW_OK) st = ps_wait(t, &r[0], srv, what);
        if (st == PW_OK) st = ps_wait(t, &r[1], srv, what);
        const float *src = buf;
        for (int i = 0; i < n && st == PW_OK; i++)
            for (int b = 0; b < sf && st == PW_OK; b++, src += mine[i]->numel)
                st = pw_program_param_write_state(mine[i]->prog, mine[i]->idx, b, src);
        free(buf);
    }
    free(mine);
    return st;
}

pw_status pl_ps_create(pw_pipeline *pl)
{
    const pw_pipeline_config *c = &pl->cfg;
    const pw_transport *t = pl->t;
    const pw_graph *g = pl->g;
    const int K = c->ps_servers;
    if (!t || !t->vt->ps_isend || t->n_servers != K)
        return pw_error(PW_ERR_INVALID_ARG, "parameter server: %d servers need a run under mpirun with "
                        "--servers %d (this process's transport has %d)", K, K, t ? t->n_servers : 0);
    if (c->ps_staleness < 0)
        return pw_error(PW_ERR_INVALID_ARG, "parameter server: staleness must be >= 0 (got %d)", c->ps_staleness);
    if (pl->NR < 2)
        return pw_error(PW_ERR_UNSUPPORTED, "parameter server: needs --replicas 2 or more (one replica has "
                        "nothing to synchronise; train without --sync ps)");
    if (c->clip_grad_norm > 0 && K > g->n_params)
        return pw_error(PW_ERR_UNSUPPORTED, "parameter server: --clip-grad-norm with %d servers for %d parameters: "
                        "every server must hold one (the norm's messages go with the updates)", K, g->n_params);
    if (c->compress.kind == PW_COMPRESS_POWERSGD && c->ps_staleness > 0)
        return pw_error(PW_ERR_UNSUPPORTED, "parameter server: --compress powersgd with --staleness %d: PowerSGD "
                        "sums the replicas' factors of one step (twice, through the server), so no replica can "
                        "run ahead; use --staleness 0, or bf16, fp16 or topk", c->ps_staleness);
    /* The uses of each parameter in this process (ps_tag), for the tags. */
    int *lu = calloc((size_t)(g->n_params > 0 ? g->n_params : 1), sizeof *lu);
    if (!lu) return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    int most = 1;
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        const gstage *gs = stage_at(pl, 0, ch);
        for (int j = 0; j < gs->n_pieces; j++)
            for (int i = 0; i < pw_program_n_params(gs->piece[j]); i++) {
                pw_program_param pp;
                float *uses[MAX_USES];
                pw_program_param_at(gs->piece[j], i, &pp);
                const int nu = pw_program_param_uses(gs->piece[j], i, uses, MAX_USES);
                lu[pp.graph_param] += nu > 0 ? nu : 1;
                if (lu[pp.graph_param] > most) most = lu[pp.graph_param];
            }
    }
    memset(lu, 0, (size_t)g->n_params * sizeof *lu);
    /* PowerSGD's replies take as many tags again, from the top (ps_reply_tag). */
    if (((int64_t)g->n_params * most + 9) * (c->compress.kind == PW_COMPRESS_POWERSGD ? 2 : 1) > t->max_tag) {
        free(lu);
        return pw_error(PW_ERR_UNSUPPORTED, "parameter server: %d parameters (one used %d times here) need more "
                        "message tags than MPI's %d", g->n_params, most, t->max_tag);
    }
    pl_ps *ps = calloc(1, sizeof *ps);
    if (!ps) {
        free(lu);
        return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    }
    pl->ps = ps;
    ps->pl = pl;
    /* Tied parameters: the workers push every use's gradient and never
     * step, the servers sum the uses in the all-reduce run's order (its
     * finish_step's: pipeline_ties.c) and send every copy the same values,
     * so the pipeline runs no step of its own after the engine's. */
    ps->tied = pl->post_optim;
    pl->post_optim = 0;
    ps->K = K;
    ps->stale = c->ps_staleness;
    ps->slots = c->ps_staleness + 1;
    ps->t = *t;
    ps->t.stage_coll = (pw_coll){.vt = &ps_coll_i, .self = ps, .member = t->replica, .n_members = pl->NR};
    ps->server_of = malloc((size_t)(g->n_params > 0 ? g->n_params : 1) * sizeof *ps->server_of);
    ps->chunk_first = calloc((size_t)pl->C + 1, sizeof *ps->chunk_first);
    int n = 0, nb = 0;
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        const gstage *gs = stage_at(pl, 0, ch);
        for (int j = 0; j < gs->n_pieces; j++) {
            n += pw_program_n_params(gs->piece[j]);
            nb++;
        }
    }
    ps->par = calloc((size_t)(n > 0 ? n : 1), sizeof *ps->par);
    ps->bk = calloc((size_t)(nb > 0 ? nb : 1), sizeof *ps->bk);
    if (!ps->server_of || !ps->chunk_first || !ps->par || !ps->bk) {
        free(lu);
        return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    }
    pw_ps_assign(g, K, ps->server_of);
    const int W = t->n_ranks * t->n_replicas;
    for (int ch = 0; ch < pl->C; ch++) {
        ps->chunk_first[ch] = ps->n_par;
        if (!stage_here(pl, ch)) continue;
        gstage *gs = stage_at(pl, 0, ch);
        for (int j = 0; j < gs->n_pieces; j++) {
            pw_program *pr = gs->piece[j];
            const int np = pw_program_n_params(pr);
            if (np == 0) continue;
            ps_bucket *b = &ps->bk[ps->n_bk++];
            b->first = ps->n_par;
            b->n = np;
            for (int i = 0; i < np; i++) {
                pw_program_param pp;
                pw_program_param_at(pr, i, &pp);
                ps_param *p = &ps->par[ps->n_par++];
                p->n_uses = pw_program_param_uses(pr, i, p->use, MAX_USES);
                if (p->n_uses < 1 || p->n_uses > MAX_USES) {
                    free(lu);
                    return pw_error(PW_ERR_UNSUPPORTED, "parameter server: %s has %d uses in one stage (at "
                                    "most %d)", pp.name, p->n_uses, MAX_USES);
                }
                if (i == 0) b->key = p->use[0];
                p->lu0 = lu[pp.graph_param];
                lu[pp.graph_param] += p->n_uses;
                p->gp = pp.graph_param;
                p->chunk = ch;
                p->server = W + ps->server_of[p->gp];
                p->prog = pr;
                p->idx = i;
                p->numel = pp.numel;
                p->slot = malloc((size_t)ps->slots * (size_t)(pp.numel + NORM_FLOATS) * sizeof(float));
                p->rreq = calloc((size_t)ps->slots, sizeof *p->rreq);
                if (!p->slot || !p->rreq) {
                    free(lu);
                    return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
                }
            }
        }
    }
    free(lu);
    ps->chunk_first[pl->C] = ps->n_par;
    return PW_OK;
}

const pw_stage_i *pl_ps_vt(pw_pipeline *pl, const pw_stage_i *base)
{
    pl_ps *ps = pl->ps;
    ps->vt = *base;
    ps->vt.optimizer_step = ps_pull;
    ps->vt.optimizer_try = NULL;
    ps->vt.optimizer_commit = NULL;
    ps->vt.optimizer_undo = NULL;
    return &ps->vt;
}

const pw_transport *pl_ps_transport(pw_pipeline *pl) { return &pl->ps->t; }

pw_status pl_ps_start(pw_pipeline *pl)
{
    pl->ps->ready = 1;
    return PW_OK;
}

pw_status pl_ps_begin(pw_pipeline *pl)
{
    return pl->ps && !pl->ps->hello_sent ? ps_hello(pl->ps) : PW_OK;
}

pw_status pl_ps_checkpoint(pw_pipeline *pl)
{
    pl_ps *ps = pl->ps;
    if (!ps || !ps->hello_sent) return PW_OK; /* no step yet: the programs hold what the servers would */
    PW_CHECK(pl_ps_settle(pl));
    return ps->t.replica == 0 ? ps_fetch_state(ps) : PW_OK;
}

/* Every version pushed so far received, the newest in the programs: what
 * the servers hold (with staleness, before an evaluation or a save). */
pw_status pl_ps_settle(pw_pipeline *pl)
{
    pl_ps *ps = pl->ps;
    if (!ps) return PW_OK;
    const pw_transport *t = &ps->t;
    for (int i = 0; i < ps->n_par; i++) {
        ps_param *p = &ps->par[i];
        while (p->have < p->posted) {
            char what[256];
            snprintf(what, sizeof what, "version %lld of %s from MPI rank %d", (long long)(p->have + 1),
                     pl->g->params[p->gp].name, p->server);
            PW_CHECK(ps_wait(t, &p->rreq[(p->have + 1) % ps->slots], p->server, what));
            p->have++;
        }
        if (p->have > p->applied) {
            PW_CHECK(pw_program_param_write(p->prog, p->idx, PW_PARAM_DATA,
                                            p->slot + (size_t)(p->have % ps->slots) *
                                                          (size_t)(p->numel + NORM_FLOATS)));
            p->applied = p->have;
        }
    }
    return PW_OK;
}

void pl_ps_destroy(pw_pipeline *pl)
{
    pl_ps *ps = pl->ps;
    if (!ps) return;
    const pw_transport *t = &ps->t;
    /* A run that made no step still owes the servers its hello. */
    if (ps->ready && !ps->hello_sent && ps_hello(ps) != PW_OK) PW_WARN("parameter server: %s", pw_last_error());
    if (ps->hello_sent && pl_ps_settle(pl) == PW_OK) {
        /* Goodbye to every server (bounded; a failure is only a warning: the
         * run is over and the servers' watchdogs name the silence). */
        const int64_t steps = pl->step;
        for (int k = 0; k < ps->K; k++) {
            const int srv = t->n_ranks * t->n_replicas + k;
            pw_treq r;
            char what[96];
            snprintf(what, sizeof what, "MPI rank %d (server %d) to take the goodbye", srv, k);
            pw_status st = t->vt->ps_isend(t->self, srv, TAG_BYE(pl->g->n_params), &steps, sizeof steps, &r);
            if (st == PW_OK) st = ps_wait(t, &r, srv, what);
            if (st != PW_OK) PW_WARN("parameter server: %s", pw_last_error());
        }
    }
    for (int i = 0; i < ps->n_par; i++) {
        free(ps->par[i].slot);
        free(ps->par[i].rreq);
    }
    free(ps->par);
    free(ps->bk);
    free(ps->chunk_first);
    free(ps->server_of);
    free(ps);
    pl->ps = NULL;
}

/* ================================================================ servers */

/* Where a use's gradient comes from, or a copy's values go: replica k's
 * process w, under tag; chunk and key order them (a use: its index in the
 * program; a copy: its place in the worker's hello). */
typedef struct srv_link {
    int k, w, tag, chunk, key;
} srv_link;

/* One parameter on its server. With staleness s the gradients of s + 1
 * consecutive steps may be in flight from a replica; step v's go to ring
 * slot v mod (s + 1), whose receives are posted as soon as the slot's
 * previous step has been applied. */

typedef struct srv_param {
    int gp, decay;
    int64_t numel;
    /* A tied parameter has U uses and C copies (programs holding it) in
     * each replica (1 and 1 untied); replica k's are at [k·U, k·U + U) in
     * the order the uses are summed (pipeline_ties.c's: chunks last to
     * first, each program's uses in order) and at [k·C, k·C + C). */
    int U, C;
    srv_link *use, *copy;
    int n_use, n_copy;
    int *holder;              /* [R] world rank of the replica's process holding its first copy */
    float *data, *state;
    int init;                 /* data and state hold replica 0's values (its first copy's) */
    float *grads;             /* [slots][U][R][numel] */
    int64_t cb;               /* --compress: bytes of one push's payload (0: fp32) */
    unsigned char *cbuf;      /* --compress: [slots][U][R][cb] the payloads, decoded into grads */
    pw_treq *rreq;            /* [slots][U][R] */
    unsigned char *got;       /* [slots][U][R] that step's gradient arrived (1; 2: its version only) */
    int64_t *read;            /* [slots][U][R] with staleness: the version each gradient was computed on */
    pw_treq *vreq;            /* [slots][U][R] their receives */
    int *n_got;               /* [slots] */
    float *sbuf;              /* [slots][numel + NORM_FLOATS] the versions being sent (v in slot v mod
                                 slots), each followed by the step's gradient norm */
    pw_treq *sreq;            /* [slots][R][C] their sends */
    unsigned char *sending;   /* [slots] */
    int64_t step;             /* updates done: the version the server holds */
    int rank, chunk, seq;     /* replica 0's holder's pipeline rank, the chunk, its place in that
                                 worker's hello (the order of the workers' grad_sumsq) */
    /* --compress powersgd, a matrix it compresses (q > 0; staleness 0, one
     * slot): each use's two rounds. The P's and Q's of [U][R]; per use the
     * replies (the summed P orthogonalised, the summed Q) and their R
     * sends each; fgot bit 1: P here, bit 2: Q here; fphase[u] 0: waiting
     * for the P's, 1: for the Q's, 2: the use's gradient rebuilt. */
    int q;
    int64_t rows, cols;
    float *fp, *fq, *fpout, *fqout;
    pw_treq *fpreq, *fqreq;   /* [U][R] */
    pw_treq *fsreq;           /* [U][R][2] the replies' sends */
    unsigned char *fgot, *fsent;    /* [U][R]; [U][R][2] 1: that reply's send is done (or none) */
    int *fphase;              /* [U] */
} srv_param;

typedef struct srv_norm srv_norm;
static void srv_norm_free(srv_norm *z);

typedef struct server {
    const pw_ps_server_config *cfg;
    pw_optim_config optim;    /* world rank 0's */
    const pw_transport *t;
    int R, W, np, stale, slots, sf;
    int64_t start;            /* the step the run starts from (a resumed run's checkpoint) */
    double clip;              /* --clip-grad-norm (0: none): then every parameter steps together */
    int tied;                 /* parameters tied across chunks: the norm in pl_sumsq_across's order */
    pw_compress_config cc;    /* --compress (world rank 0's): the pushes' payloads */
    srv_norm *norm;           /* with clip: the global norm's order and messages */
    pw_ps_server_stats stats; /* the staleness of the gradients applied */
    srv_param *par;
    int n_par;
    int *index;               /* [np] graph param -> par index, -1 */
} server;

static void srv_free(server *s)
{
    for (int i = 0; s->par && i < s->n_par; i++) {
        srv_param *p = &s->par[i];
        free(p->holder);
        free(p->use);
        free(p->copy);
        free(p->data);
        free(p->state);
        free(p->grads);
        free(p->cbuf);
        free(p->rreq);
        free(p->sreq);
        free(p->got);
        free(p->read);
        free(p->vreq);
        free(p->n_got);
        free(p->sbuf);
        free(p->sending);
        free(p->fp);
        free(p->fq);
        free(p->fpout);
        free(p->fqout);
        free(p->fpreq);
        free(p->fqreq);
        free(p->fsreq);
        free(p->fgot);
        free(p->fsent);
        free(p->fphase);
    }
    free(s->par);
    free(s->index);
    srv_norm_free(s->norm);
}

/* The receive rings, once the staleness is known (world rank 0's hello). */
static pw_status srv_alloc(server *s, int stale)
{
    s->stale = stale;
    s->slots = stale + 1;
    const size_t R = (size_t)s->R, sl = (size_t)s->slots;
    for (int i = 0; i < s->n_par; i++) {
        srv_param *p = &s->par[i];
        const size_t U = (size_t)p->U, C = (size_t)p->C;
        p->grads = malloc(sl * U * R * (size_t)p->numel * sizeof(float) + 1);
        p->cb = pw_compress_span_bytes(&s->cc, p->numel);
        if (p->cb > 0 && !(p->cbuf = malloc(sl * U * R * (size_t)p->cb)))
            return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        p->rreq = calloc(sl * U * R, sizeof *p->rreq);
        p->got = calloc(sl * U * R, 1);
        p->n_got = calloc(sl, sizeof *p->n_got);
        p->sbuf = malloc(sl * (size_t)(p->numel + NORM_FLOATS) * sizeof(float));
        p->sreq = calloc(sl * R * C, sizeof *p->sreq);
        p->sending = calloc(sl, 1);
        p->read = calloc(sl * U * R, sizeof *p->read);
        p->vreq = calloc(sl * U * R, sizeof *p->vreq);
        if (!p->grads || !p->rreq || !p->got || !p->n_got || !p->sbuf || !p->sreq || !p->sending || !p->read ||
            !p->vreq)
            return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        /* PowerSGD's rank for the matrix, by the compressor's rule (rows: its first dimension) */
        const pw_shape *sh = &s->cfg->graph->params[p->gp].shape;
        p->rows = sh->ndim >= 2 ? sh->d[0] : 0;
        p->q = pw_compress_powersgd_rank(&s->cc, p->numel, p->rows);
        if (!p->q) continue;
        p->cols = p->numel / p->rows;
        const size_t fpn = (size_t)(p->rows * p->q), fqn = (size_t)(p->cols * p->q);
        p->fp = malloc(U * R * fpn * sizeof(float));
        p->fq = malloc(U * R * fqn * sizeof(float));
        p->fpout = malloc(U * fpn * sizeof(float));
        p->fqout = malloc(U * fqn * sizeof(float));
        p->fpreq = calloc(U * R, sizeof *p->fpreq);
        p->fqreq = calloc(U * R, sizeof *p->fqreq);
        p->fsreq = calloc(2 * U * R, sizeof *p->fsreq);
        p->fgot = calloc(U * R, 1);
        p->fsent = malloc(2 * U * R);
        p->fphase = calloc(U, sizeof *p->fphase);
        if (!p->fp || !p->fq || !p->fpout || !p->fqout || !p->fpreq || !p->fqreq || !p->fsreq || !p->fgot ||
            !p->fsent || !p->fphase)
            return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        memset(p->fsent, 1, 2 * U * R);
    }
    return PW_OK;
}

/* The uses by replica, then in the order they are summed (pipeline_ties.c:
 * chunks last to first, each program's uses in order); the copies by
 * replica, then chunk. */
static int use_order(const void *a, const void *b)
{
    const srv_link *x = a, *y = b;
    if (x->k != y->k) return x->k < y->k ? -1 : 1;
    if (x->chunk != y->chunk) return x->chunk > y->chunk ? -1 : 1;
    return (x->key > y->key) - (x->key < y->key);
}

static int copy_order(const void *a, const void *b)
{
    const srv_link *x = a, *y = b;
    if (x->k != y->k) return x->k < y->k ? -1 : 1;
    if (x->chunk != y->chunk) return x->chunk < y->chunk ? -1 : 1;
    return (x->key > y->key) - (x->key < y->key);
}

/* Every worker's hello: which of this server's parameters it holds, and
 * (replica 0's) their initial values. */
static pw_status srv_hello(server *s)
{
    const pw_transport *t = s->t;
    const pw_graph *g = s->cfg->graph;
    const int S = t->n_ranks;
    for (int w = 0; w < s->W; w++) {
        int64_t bytes = 0;
        pw_treq r;
        char what[128];
        snprintf(what, sizeof what, "the parameters of MPI rank %d (replica %d, stage %d)", w, w / S, w % S);
        PW_CHECK(t->vt->ps_irecv(t->self, w, TAG_HELLO_N(s->np), &bytes, sizeof bytes, &r));
        PW_CHECK(ps_wait(t, &r, w, what));
        if (bytes < (int64_t)(HELLO_HEAD * sizeof(int64_t) + OPTIM_BYTES) || bytes > ((int64_t)1 << 31))
            return pw_error(PW_ERR_IO, "parameter server: MPI rank %d announced %lld bytes", w, (long long)bytes);
        char *msg = malloc((size_t)bytes);
        if (!msg) return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        pw_status st = t->vt->ps_irecv(t->self, w, TAG_HELLO(s->np), msg, (size_t)bytes, &r);
        if (st == PW_OK) st = ps_wait(t, &r, w, what);
        const int64_t *h = (const int64_t *)(const void *)msg;
        const int64_t n = st == PW_OK ? h[0] : 0, stale = st == PW_OK ? h[1] : 0;
        const int64_t start = st == PW_OK ? h[2] : 0, sf = st == PW_OK ? h[3] : 0;
        const int64_t *pair = h + HELLO_HEAD;
        if (st == PW_OK && (n < 0 || n > s->np || sf < 1 || sf > 2 || start < 0 ||
                            (int64_t)sizeof(int64_t) * (HELLO_HEAD + PAIR * n) + (int64_t)OPTIM_BYTES > bytes))
            st = pw_error(PW_ERR_IO, "parameter server: a malformed hello from MPI rank %d", w);
        if (st == PW_OK && w == 0) {
            memcpy(&s->optim, pair + PAIR * n, sizeof s->optim);
            memcpy(&s->clip, &h[4], sizeof(double));
            s->tied = h[5] != 0;
            s->cc.kind = (pw_compress_kind)h[6];
            memcpy(&s->cc.ratio, &h[7], sizeof(double));
            s->cc.rank = (int)(h[8] > 0 && h[8] <= 1024 ? h[8] : 0);
            s->start = start;
            s->sf = (int)sf;
            s->stale = (int)stale;
            st = stale < 0 || stale > 1000
                     ? pw_error(PW_ERR_IO, "parameter server: MPI rank 0 sent staleness %lld", (long long)stale)
                 : sf != pw_optim_state_floats(s->optim.kind)
                     ? pw_error(PW_ERR_IO, "parameter server: MPI rank 0 sent %lld state floats for %s",
                                (long long)sf, pw_optim_name(s->optim.kind))
                 : s->cc.kind < PW_COMPRESS_NONE || s->cc.kind > PW_COMPRESS_POWERSGD ||
                         (s->cc.kind == PW_COMPRESS_TOPK && !(s->cc.ratio > 0.0 && s->cc.ratio <= 1.0)) ||
                         (s->cc.kind == PW_COMPRESS_POWERSGD && (s->cc.rank < 1 || stale > 0))
                     ? pw_error(PW_ERR_IO, "parameter server: MPI rank 0 sent compression mode %d (rank %lld, "
                                "staleness %lld)", (int)s->cc.kind, (long long)h[8], (long long)stale)
                     : PW_OK;
        }
        if (st == PW_OK && stale != s->stale)
            st = pw_error(PW_ERR_INVALID_ARG, "parameter server: MPI rank %d runs --staleness %lld, MPI rank 0 %d",
                          w, (long long)stale, s->stale);
        if (st == PW_OK && (start != s->start || sf != s->sf))
            st = pw_error(PW_ERR_INVALID_ARG, "parameter server: MPI rank %d starts from step %lld, MPI rank 0 "
                          "from step %lld (did every process resume the same checkpoint?)", w, (long long)start,
                          (long long)s->start);
        int64_t floats = 0;
        for (int64_t m = 0; m < n && st == PW_OK; m++) floats += pair[PAIR * m + 1] > 0 ? pair[PAIR * m + 1] : 0;
        if (st == PW_OK && (int64_t)sizeof(int64_t) * (HELLO_HEAD + PAIR * n) + (int64_t)OPTIM_BYTES +
                                   floats * (1 + sf) * (int64_t)sizeof(float) != bytes)
            st = pw_error(PW_ERR_IO, "parameter server: a malformed hello from MPI rank %d", w);
        const float *v = (const float *)(const void *)((const char *)(pair + PAIR * n) + OPTIM_BYTES);
        const float *sv = v + floats;
        for (int64_t m = 0; m < n && st == PW_OK; m++) {
            const int64_t gp = pair[PAIR * m], numel = pair[PAIR * m + 1];
            const int64_t nu = pair[PAIR * m + 4], lu0 = pair[PAIR * m + 5];
            const int i = gp >= 0 && gp < s->np ? s->index[gp] : -1;
            if (nu < 1 || nu > MAX_USES || lu0 < 0 || lu0 > (int64_t)MAX_USES * s->W) {
                st = pw_error(PW_ERR_IO, "parameter server: a malformed hello from MPI rank %d", w);
                break;
            }
            if (i < 0 || numel != s->par[i].numel) {
                st = pw_error(PW_ERR_INVALID_ARG, "parameter server %d: MPI rank %d sent parameter %lld (%lld "
                              "floats), which this server does not hold in that size (do all processes run "
                              "the same graph and --servers?)", t->server, w, (long long)gp, (long long)numel);
                break;
            }
            srv_param *p = &s->par[i];
            const int k = w / S, chunk = (int)pair[PAIR * m + 2], seq = (int)pair[PAIR * m + 3];
            srv_link *cp = realloc(p->copy, ((size_t)p->n_copy + 1) * sizeof *cp);
            srv_link *us = cp ? realloc(p->use, ((size_t)p->n_use + (size_t)nu) * sizeof *us) : NULL;
            if (cp) p->copy = cp;
            if (us) p->use = us;
            if (!cp || !us) {
                st = pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
                break;
            }
            p->copy[p->n_copy++] = (srv_link){k, w, ps_tag(s->np, (int)gp, (int)lu0), chunk, seq};
            for (int u = 0; u < nu; u++)
                p->use[p->n_use++] = (srv_link){k, w, ps_tag(s->np, (int)gp, (int)lu0 + u), chunk, u};
            p->step = s->start;
            /* The norm counts a parameter once, at replica 0's first chunk holding it. */
            if (k == 0 && (!p->init || chunk < p->chunk)) p->rank = w % S, p->chunk = chunk, p->seq = seq;
            if (k == 0 && !p->init) {
                memcpy(p->data, v, (size_t)numel * sizeof(float));
                memcpy(p->state, sv, (size_t)(numel * sf) * sizeof(float));
                p->init = 1;
            }
            v += numel;
            sv += numel * sf;
        }
        free(msg);
        PW_CHECK(st);
    }
    /* Every replica holds the same copies and uses (replica 0's layout). */
    for (int i = 0; i < s->n_par; i++) {
        srv_param *p = &s->par[i];
        qsort(p->use, (size_t)p->n_use, sizeof *p->use, use_order);
        qsort(p->copy, (size_t)p->n_copy, sizeof *p->copy, copy_order);
        p->U = p->n_use / s->R;
        p->C = p->n_copy / s->R;
        int ok = p->U >= 1 && p->C >= 1 && p->U * s->R == p->n_use && p->C * s->R == p->n_copy;
        for (int k = 0; k < s->R && ok; k++) {
            for (int u = 0; u < p->U && ok; u++) {
                const srv_link *a = &p->use[u], *b = &p->use[k * p->U + u];
                ok = b->k == k && a->chunk == b->chunk && a->key == b->key;
            }
            for (int c = 0; c < p->C && ok; c++) ok = p->copy[k * p->C + c].k == k;
            if (ok) p->holder[k] = p->copy[k * p->C].w;
        }
        if (!ok)
            return pw_error(PW_ERR_INTERNAL, "parameter server %d: the replicas hold %s differently (%d copies and %d "
                            "uses in all, %d replicas)", t->server, g->params[p->gp].name, p->n_copy, p->n_use, s->R);
    }
    return srv_alloc(s, s->stale);
}

/* The receives of step v's gradients (slot v mod slots). */
static pw_status srv_post(server *s, srv_param *p, int64_t v)
{
    const pw_transport *t = s->t;
    const int sl = (int)(v % s->slots);
    for (int u = 0; u < p->U; u++)
        for (int k = 0; k < s->R; k++) {
            const size_t at = ((size_t)sl * (size_t)p->U + (size_t)u) * (size_t)s->R + (size_t)k;
            const srv_link *l = &p->use[k * p->U + u];
            p->got[at] = 0;
            if (p->q) { /* PowerSGD (one slot): the P, then the Q, matched in order on the use's tag */
                const size_t fa = (size_t)u * (size_t)s->R + (size_t)k;
                const size_t fpn = (size_t)(p->rows * p->q), fqn = (size_t)(p->cols * p->q);
                p->fgot[fa] = 0;
                p->fphase[u] = 0;
                PW_CHECK(t->vt->ps_irecv(t->self, l->w, l->tag, p->fp + fa * fpn, fpn * sizeof(float),
                                         &p->fpreq[fa]));
                PW_CHECK(t->vt->ps_irecv(t->self, l->w, l->tag, p->fq + fa * fqn, fqn * sizeof(float),
                                         &p->fqreq[fa]));
                continue;
            }
            if (s->stale) /* the version first: one tag, matched in order */
                PW_CHECK(t->vt->ps_irecv(t->self, l->w, l->tag, &p->read[at], sizeof p->read[at], &p->vreq[at]));
            if (p->cb > 0)
                PW_CHECK(t->vt->ps_irecv(t->self, l->w, l->tag, p->cbuf + at * (size_t)p->cb, (size_t)p->cb,
                                         &p->rreq[at]));
            else
                PW_CHECK(t->vt->ps_irecv(t->self, l->w, l->tag, p->grads + at * (size_t)p->numel,
                                         (size_t)p->numel * sizeof(float), &p->rreq[at]));
        }
    p->n_got[sl] = 0;
    return PW_OK;
}

/* 1 when the sends from slot sl are done (tested without waiting), so the
 * slot may take the next version; -1: a send failed. */
static int srv_slot_free(server *s, srv_param *p, int sl)
{
    const pw_transport *t = s->t;
    const int RC = s->R * p->C;
    for (int c = 0; p->sending[sl] && c < RC; c++) {
        const int rc = t->vt->test(t->self, &p->sreq[(size_t)sl * (size_t)RC + (size_t)c]);
        if (rc < 0) {
            pw_error(PW_ERR_IO, "parameter server %d: sending %s to MPI rank %d: %s", t->server,
                     s->cfg->graph->params[p->gp].name, p->copy[c].w, pw_last_error());
            return -1;
        }
        if (rc == 0) return 0;
    }
    p->sending[sl] = 0;
    return 1;
}

/* part[0] += part[1] + ... in the tree all-reduce's order (collective.h):
 * pairs at distance 1, then 2, 4, ... */
static void tree_sum(float *const *part, int R, int64_t n)
{
    for (int w = 1; w < R; w *= 2)
        for (int a = 0; a + w < R; a += 2 * w) {
            float *restrict d = part[a];
            const float *restrict q = part[a + w];
            for (int64_t i = 0; i < n; i++) d[i] = d[i] + q[i];
        }
}

/* The R replicas' gradients of the parameter's next step (slot of step
 * p->step + 1), each use's summed in the tree all-reduce's order into its
 * first replica's, then (tied) the uses one after the other in the order
 * the all-reduce run sums them (pipeline_ties.c, and a program's own fold).
 * Returns the total (in the first use's buffer). */
static float *srv_sum(server *s, srv_param *p)
{
    const int R = s->R;
    const int64_t n = p->numel;
    const int sl = (int)((p->step + 1) % s->slots);
    float *acc = NULL;
    for (int u = 0; u < p->U; u++) {
        float *part[64];
        for (int k = 0; k < R; k++) {
            const size_t at = ((size_t)sl * (size_t)p->U + (size_t)u) * (size_t)R + (size_t)k;
            part[k] = p->grads + at * (size_t)n;
            /* --compress: the replica's payload decoded as the gathering all-reduce decodes it (the
             * size was checked by the receive) */
            if (p->cb > 0) pw_compress_decode_span(&s->cc, n, p->cbuf + at * (size_t)p->cb, p->cb, part[k]);
        }
        /* PowerSGD: srv_factors rebuilt the use's sum in its first replica's place */
        if (!p->q) tree_sum(part, R, n);
        if (!acc) {
            acc = part[0];
            continue;
        }
        float *restrict d = acc;
        const float *restrict q = part[0];
        for (int64_t i = 0; i < n; i++) d[i] = d[i] + q[i];
    }
    return acc;
}

/* Steps the parameter with its summed gradient `g`, sends the new version
 * from a copy (a worker that takes it late holds nobody up), and posts the
 * receives of the step that takes over the slot. */
static pw_status srv_apply(server *s, srv_param *p, const float *g, double norm)
{
    const pw_transport *t = s->t;
    const int RC = s->R * p->C;
    const int64_t n = p->numel, step = p->step + 1;
    const int sl = (int)(step % s->slots);
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(g[i]))
            return pw_error(PW_ERR_NUMERIC, "step %lld: gradient of '%s' is not finite (parameter server %d)",
                            (long long)step, s->cfg->graph->params[p->gp].name, t->server);
    /* Each gradient's staleness, exactly (synchronous: all 1), and the
     * learning rate of --staleness-lr; a factor of 1 leaves the bits. */
    pw_optim_config oc = s->optim;
    double f = 1.0;
    const int UR = p->U * s->R; /* every use of every replica ([U][R]) */
    for (int q = 0; q < UR; q++) {
        const int64_t tau = s->stale ? step - p->read[(size_t)sl * (size_t)UR + (size_t)q] : 1;
        if (tau < 1 || tau > s->stale + 1)
            return pw_error(PW_ERR_INTERNAL, "parameter server %d: step %lld: MPI rank %d's gradient of %s was "
                            "computed on version %lld (staleness %lld; --staleness %d allows 1 to %d)", t->server,
                            (long long)step, p->use[(q % s->R) * p->U + q / s->R].w,
                            s->cfg->graph->params[p->gp].name, (long long)(step - tau), (long long)tau, s->stale,
                            s->stale + 1);
        s->stats.tau[tau < PW_PS_TAU_BINS ? tau - 1 : PW_PS_TAU_BINS - 1]++;
    }
    if (s->stale) f = pw_ps_stale_lr_factor(s->cfg->staleness_lr, step, p->read + (size_t)sl * (size_t)UR, UR);
    if (f != 1.0) oc.lr = (float)(oc.lr * f), oc.min_lr = (float)(oc.min_lr * f);
    s->stats.updates++;
    s->stats.lr_factor_sum += f;
    pw_optim_update(&oc, step, p->data, g, p->state, n, p->decay);
    p->step = step;
    float *out = p->sbuf + (size_t)sl * (size_t)(n + NORM_FLOATS);
    memcpy(out, p->data, (size_t)n * sizeof(float));
    memcpy(out + n, &norm, sizeof norm);
    for (int c = 0; c < RC; c++) /* every copy of every replica: the copies stay equal */
        PW_CHECK(t->vt->ps_isend(t->self, p->copy[c].w, p->copy[c].tag, out, (size_t)(n + NORM_FLOATS) * sizeof(float),
                                 &p->sreq[(size_t)sl * (size_t)RC + (size_t)c]));
    p->sending[sl] = 1;
    return srv_post(s, p, step + s->slots);
}

/* --compress powersgd, a matrix it compresses: each use's round that has
 * every replica's factor (round 0 the P's, round 1 the Q's) summed in the
 * tree order (round 0 then orthogonalised) and sent back to every replica
 * (a worker waits for it); after round 1 the use's summed gradient P Qᵀ is
 * rebuilt where srv_sum takes it, and counted as arrived. The compressor's
 * all-reduce (runtime/compress.c) does the same on every member. */
static pw_status srv_factors(server *s, srv_param *p, int *moved)
{
    const pw_transport *t = s->t;
    const int R = s->R;
    const size_t fpn = (size_t)(p->rows * p->q), fqn = (size_t)(p->cols * p->q);
    /* The replies in flight, tested (a slow link posts a held send then). */
    for (size_t x = 0; x < 2 * (size_t)p->U * (size_t)R; x++) {
        if (p->fsent[x]) continue;
        const int rc = t->vt->test(t->self, &p->fsreq[x]);
        if (rc < 0)
            return pw_error(PW_ERR_IO, "parameter server %d: sending PowerSGD's summed factors of %s: %s", t->server,
                            s->cfg->graph->params[p->gp].name, pw_last_error());
        p->fsent[x] = rc == 1;
    }
    for (int u = 0; u < p->U; u++) {
        const int ph = p->fphase[u];
        if (ph == 2) continue;
        const unsigned char bit = ph == 0 ? 1 : 2;
        int have = 0;
        for (int k = 0; k < R; k++) {
            const size_t fa = (size_t)u * (size_t)R + (size_t)k;
            if (!(p->fgot[fa] & bit)) {
                const int rc = t->vt->test(t->self, ph == 0 ? &p->fpreq[fa] : &p->fqreq[fa]);
                if (rc < 0)
                    return pw_error(PW_ERR_IO, "parameter server %d: PowerSGD's %s of %s from MPI rank %d: %s",
                                    t->server, ph == 0 ? "P" : "Q", s->cfg->graph->params[p->gp].name,
                                    p->use[k * p->U + u].w, pw_last_error());
                if (rc == 1) p->fgot[fa] |= bit, *moved = 1;
            }
            have += (p->fgot[fa] & bit) != 0;
        }
        if (have < R) continue;
        const size_t len = ph == 0 ? fpn : fqn;
        float *part[64], *base = ph == 0 ? p->fp : p->fq;
        for (int k = 0; k < R; k++) part[k] = base + ((size_t)u * (size_t)R + (size_t)k) * len;
        tree_sum(part, R, (int64_t)len);
        if (ph == 0) pw_compress_powersgd_orthogonalise(part[0], p->rows, p->q);
        /* The reply buffer's last sends (a step ago) are done: that step's
         * workers took them before they could send these factors. */
        float *reply = (ph == 0 ? p->fpout : p->fqout) + (size_t)u * len;
        pw_treq *sr = p->fsreq + (size_t)u * (size_t)R * 2;
        unsigned char *done = p->fsent + (size_t)u * (size_t)R * 2;
        for (int k = 0; k < R; k++)
            if (!done[2 * k + ph])
                PW_CHECK(ps_wait(t, &sr[2 * k + ph], p->use[k * p->U + u].w,
                                 "a worker to take PowerSGD's summed factors"));
        memcpy(reply, part[0], len * sizeof(float));
        for (int k = 0; k < R; k++) {
            const srv_link *l = &p->use[k * p->U + u];
            done[2 * k + ph] = 0;
            PW_CHECK(t->vt->ps_isend(t->self, l->w, ps_reply_tag(t, l->tag), reply, len * sizeof(float),
                                     &sr[2 * k + ph]));
        }
        p->fphase[u] = ph + 1;
        *moved = 1;
        if (ph == 0) continue;
        const int sl = (int)((p->step + 1) % s->slots);
        const size_t at0 = ((size_t)sl * (size_t)p->U + (size_t)u) * (size_t)R;
        pw_compress_powersgd_rebuild(p->fpout + (size_t)u * fpn, reply, p->rows, p->cols, p->q,
                                     p->grads + at0 * (size_t)p->numel);
        for (int k = 0; k < R; k++) p->got[at0 + (size_t)k] = 1;
        p->n_got[sl] += R;
    }
    return PW_OK;
}

/* The process whose PowerSGD factor the matrix waits for, or -1. */
static int srv_factor_peer(const server *s, const srv_param *p)
{
    for (int u = 0; u < p->U; u++) {
        if (p->fphase[u] == 2) continue;
        const unsigned char bit = p->fphase[u] == 0 ? 1 : 2;
        for (int k = 0; k < s->R; k++)
            if (!(p->fgot[(size_t)u * (size_t)s->R + (size_t)k] & bit)) return p->use[k * p->U + u].w;
    }
    return -1;
}

/* All R gradients of the parameter's next step are here (and its send slot
 * is free): sum, step, send. */
static pw_status srv_update(server *s, srv_param *p) { return srv_apply(s, p, srv_sum(s, p), -1.0); }

/* ---- --clip-grad-norm: the global norm over every server's parameters ----
 *
 * The norm is the engine's (scheduler/engine-comm.c): each chunk's squares
 * summed in double over its parameters in the worker's order, the chunks
 * of a rank in chunk order, the ranks in rank order. Its parameters may be
 * on several servers, so server 0 takes it: at start-up every other server
 * tells it which parameters it holds (rank, chunk, place, size; NORM_META),
 * and each step sends it their summed gradients (NORM_GRAD); server 0
 * answers each with the coefficient (NORM_COEF), and every server scales
 * its gradients by it in float and steps. With one server nothing travels. */
#define TAG_NORM_META_N(np) ((np) + 5) /* server j -> 0, once: int64 n */
#define TAG_NORM_META(np) ((np) + 6)   /* server j -> 0, once: n x {rank, chunk, seq, numel} */
#define TAG_NORM_GRAD(np) ((np) + 7)   /* server j -> 0, each step: its summed gradients, in its order */
#define TAG_NORM_COEF(np) ((np) + 8)   /* server 0 -> j, each step: double {coefficient, norm} */

typedef struct norm_ent {
    int rank, chunk, seq;
    int64_t numel;
    int own;                  /* this server's parameter index, or -1 */
    const float *fixed;       /* own -1: where another server's gradient lands each step */
} norm_ent;

typedef struct srv_norm {
    int phase;                /* 0: waiting for this server's gradients; 1: summed, waiting for the rest */
    norm_ent *ent;            /* server 0: every parameter, in the norm's order; others: their own */
    int n_ent;
    float **g;                /* [n_par] the summed gradients of the step under way */
    /* server 0 */
    int K;
    float **peer_buf;         /* [K] each other server's gradients */
    int64_t *peer_floats;     /* [K] */
    pw_treq *peer_req;        /* [K] */
    unsigned char *peer_got;  /* [K] */
    double (*coef_out)[2];    /* [K] */
    pw_treq *coef_sreq;       /* [K] */
    unsigned char *coef_sending;
    /* servers 1 .. K-1 */
    float *gbuf;
    int64_t gfloats;
    pw_treq greq, coef_req;
    int gsending;
    double coef_in[2];
} srv_norm;

/* x before y in the norm's order: rank, chunk, then the worker's order;
 * tied (pl_sumsq_across's): chunk, then the worker's order. */
static int norm_before(const norm_ent *x, const norm_ent *y, int tied)
{
    if (!tied && x->rank != y->rank) return x->rank < y->rank;
    if (x->chunk != y->chunk) return x->chunk < y->chunk;
    return x->seq < y->seq;
}

static void norm_sort(norm_ent *e, int n, int tied) /* insertion sort: a graph's parameters are few */
{
    for (int i = 1; i < n; i++) {
        const norm_ent v = e[i];
        int j = i;
        while (j > 0 && norm_before(&v, &e[j - 1], tied)) e[j] = e[j - 1], j--;
        e[j] = v;
    }
}

static void srv_norm_free(srv_norm *z)
{
    if (!z) return;
    const int K = z->K;
    for (int j = 0; z->peer_buf && j < K; j++) free(z->peer_buf[j]);
    free(z->peer_buf);
    free(z->peer_floats);
    free(z->peer_req);
    free(z->peer_got);
    free(z->coef_out);
    free(z->coef_sreq);
    free(z->coef_sending);
    free(z->ent);
    free(z->g);
    free(z->gbuf);
    free(z);
}

/* Before the loop: the norm's order (server 0: every server's parameters,
 * told by the others; another server: its own, sent to server 0). */
static pw_status srv_norm_setup(server *s)
{
    const pw_transport *t = s->t;
    const int K = t->n_servers, np = s->np, W = s->W;
    srv_norm *z = calloc(1, sizeof *z);
    if (!z) return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    s->norm = z;
    z->K = K;
    if (s->n_par == 0)
        return pw_error(PW_ERR_UNSUPPORTED, "parameter server %d: --clip-grad-norm with a server that holds no "
                        "parameter (more servers than parameters)", t->server);
    z->g = calloc((size_t)s->n_par + 1, sizeof *z->g);
    z->ent = calloc((size_t)s->n_par + 1, sizeof *z->ent);
    if (!z->g || !z->ent) return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    for (int i = 0; i < s->n_par; i++) {
        const srv_param *p = &s->par[i];
        z->ent[z->n_ent++] = (norm_ent){.rank = p->rank, .chunk = p->chunk, .seq = p->seq, .numel = p->numel,
                                        .own = i};
    }
    norm_sort(z->ent, z->n_ent, s->tied);
    if (K == 1) return PW_OK;
    if (t->server > 0) {
        int64_t n = z->n_ent;
        int64_t *meta = malloc(((size_t)n * 4 + 1) * sizeof *meta);
        if (!meta) return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        for (int i = 0; i < z->n_ent; i++) {
            meta[4 * i] = z->ent[i].rank, meta[4 * i + 1] = z->ent[i].chunk;
            meta[4 * i + 2] = z->ent[i].seq, meta[4 * i + 3] = z->ent[i].numel;
            z->gfloats += z->ent[i].numel;
        }
        pw_treq r[2];
        pw_status st = t->vt->ps_isend(t->self, W, TAG_NORM_META_N(np), &n, sizeof n, &r[0]);
        if (st == PW_OK) st = ps_wait(t, &r[0], W, "server 0 to take this server's parameter list");
        if (st == PW_OK) st = t->vt->ps_isend(t->self, W, TAG_NORM_META(np), meta, (size_t)n * 4 * sizeof *meta, &r[1]);
        if (st == PW_OK) st = ps_wait(t, &r[1], W, "server 0 to take this server's parameter list");
        free(meta);
        z->gbuf = malloc((size_t)z->gfloats * sizeof(float) + 1);
        if (st == PW_OK && !z->gbuf) st = pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        return st;
    }
    z->peer_buf = calloc((size_t)K, sizeof *z->peer_buf);
    z->peer_floats = calloc((size_t)K, sizeof *z->peer_floats);
    z->peer_req = calloc((size_t)K, sizeof *z->peer_req);
    z->peer_got = calloc((size_t)K, 1);
    z->coef_out = calloc((size_t)K, sizeof *z->coef_out);
    z->coef_sreq = calloc((size_t)K, sizeof *z->coef_sreq);
    z->coef_sending = calloc((size_t)K, 1);
    if (!z->peer_buf || !z->peer_floats || !z->peer_req || !z->peer_got || !z->coef_out || !z->coef_sreq || !z->coef_sending)
        return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    for (int j = 1; j < K; j++) {
        char what[96];
        snprintf(what, sizeof what, "the parameter list of MPI rank %d (server %d)", W + j, j);
        int64_t n = 0;
        pw_treq r;
        PW_CHECK(t->vt->ps_irecv(t->self, W + j, TAG_NORM_META_N(np), &n, sizeof n, &r));
        PW_CHECK(ps_wait(t, &r, W + j, what));
        if (n < 0 || n > np) return pw_error(PW_ERR_IO, "parameter server: %s: %lld parameters", what, (long long)n);
        int64_t *meta = malloc(((size_t)n * 4 + 1) * sizeof *meta);
        norm_ent *grown = realloc(z->ent, ((size_t)z->n_ent + (size_t)n + 1) * sizeof *z->ent);
        if (!meta || !grown) {
            free(meta);
            return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        }
        z->ent = grown;
        pw_status st = t->vt->ps_irecv(t->self, W + j, TAG_NORM_META(np), meta, (size_t)n * 4 * sizeof *meta, &r);
        if (st == PW_OK) st = ps_wait(t, &r, W + j, what);
        int64_t floats = 0;
        for (int64_t i = 0; i < n && st == PW_OK; i++) floats += meta[4 * i + 3] > 0 ? meta[4 * i + 3] : 0;
        z->peer_floats[j] = floats;
        if (st == PW_OK && !(z->peer_buf[j] = malloc((size_t)floats * sizeof(float) + 1)))
            st = pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
        const float *at = z->peer_buf[j];
        for (int64_t i = 0; i < n && st == PW_OK; i++) {
            z->ent[z->n_ent++] = (norm_ent){.rank = (int)meta[4 * i], .chunk = (int)meta[4 * i + 1],
                                            .seq = (int)meta[4 * i + 2], .numel = meta[4 * i + 3], .own = -1,
                                            .fixed = at};
            at += meta[4 * i + 3];
        }
        free(meta);
        PW_CHECK(st);
        PW_CHECK(t->vt->ps_irecv(t->self, W + j, TAG_NORM_GRAD(np), z->peer_buf[j], (size_t)floats * sizeof(float),
                                 &z->peer_req[j]));
    }
    norm_sort(z->ent, z->n_ent, s->tied);
    return PW_OK;
}

/* The squared global norm, in the engine's order; tied, in the all-reduce
 * run's finish_step's (pl_sumsq_across: one running sum, the chunks in
 * order, each parameter at its first chunk). */
static double norm_total(const srv_norm *z, int tied)
{
    double total = 0.0, rank_s = 0.0, chunk_s = 0.0;
    if (tied) {
        for (int o = 0; o < z->n_ent; o++) {
            const norm_ent *e = &z->ent[o];
            const float *g = e->own >= 0 ? z->g[e->own] : e->fixed;
            for (int64_t k = 0; k < e->numel; k++) total += (double)g[k] * (double)g[k];
        }
        return total;
    }
    for (int o = 0; o < z->n_ent; o++) {
        const norm_ent *e = &z->ent[o];
        const float *g = e->own >= 0 ? z->g[e->own] : e->fixed;
        for (int64_t k = 0; k < e->numel; k++) chunk_s += (double)g[k] * (double)g[k];
        const norm_ent *q = o + 1 < z->n_ent ? &z->ent[o + 1] : NULL;
        if (!q || q->chunk != e->chunk || q->rank != e->rank) rank_s += chunk_s, chunk_s = 0.0;
        if (!q || q->rank != e->rank) total += rank_s, rank_s = 0.0;
    }
    return total;
}

/* Every parameter here scaled by coef (when below 1, as apply_clip) and stepped. */
static pw_status srv_clip_apply(server *s, double coef, double norm)
{
    srv_norm *z = s->norm;
    if (coef < 1.0)
        for (int i = 0; i < s->n_par; i++)
            for (int64_t k = 0; k < s->par[i].numel; k++) z->g[i][k] *= (float)coef;
    pw_status st = PW_OK;
    for (int i = 0; i < s->n_par && st == PW_OK; i++) st = srv_apply(s, &s->par[i], z->g[i], norm);
    return st;
}

/* --clip-grad-norm: every parameter of a server steps together, once the
 * global norm of the step is known. *done = 1 when a step was taken (or,
 * on a server other than 0, its gradients went to server 0). */
static pw_status srv_update_clipped(server *s, int *done)
{
    const pw_transport *t = s->t;
    srv_norm *z = s->norm;
    const int K = t->n_servers, W = s->W, np = s->np;
    *done = 0;
    if (z->phase == 0) {
        for (int i = 0; i < s->n_par; i++) {
            srv_param *p = &s->par[i];
            const int next = (int)((p->step + 1) % s->slots);
            if (p->n_got[next] != p->U * s->R) return PW_OK;
            const int free_ = srv_slot_free(s, p, next);
            if (free_ < 0) return PW_ERR_IO;
            if (free_ == 0) return PW_OK;
        }
        for (int i = 0; i < s->n_par; i++) z->g[i] = srv_sum(s, &s->par[i]);
        z->phase = 1;
        *done = 1;
        if (t->server > 0) {
            if (z->gsending) PW_CHECK(ps_wait(t, &z->greq, W, "server 0 to take the summed gradients"));
            float *d = z->gbuf;
            for (int o = 0; o < z->n_ent; o++) {
                memcpy(d, z->g[z->ent[o].own], (size_t)z->ent[o].numel * sizeof(float));
                d += z->ent[o].numel;
            }
            PW_CHECK(t->vt->ps_irecv(t->self, W, TAG_NORM_COEF(np), z->coef_in, sizeof z->coef_in, &z->coef_req));
            PW_CHECK(t->vt->ps_isend(t->self, W, TAG_NORM_GRAD(np), z->gbuf, (size_t)z->gfloats * sizeof(float),
                                     &z->greq));
            z->gsending = 1;
            return PW_OK;
        }
    }
    if (t->server > 0) {
        const int rc = t->vt->test(t->self, &z->coef_req);
        if (rc < 0) return pw_error(PW_ERR_IO, "parameter server %d: the norm from server 0: %s", t->server,
                                    pw_last_error());
        if (rc == 0) return PW_OK;
        z->phase = 0;
        *done = 1;
        return srv_clip_apply(s, z->coef_in[0], z->coef_in[1]);
    }
    for (int j = 1; j < K; j++) {
        if (z->peer_got[j]) continue;
        const int rc = t->vt->test(t->self, &z->peer_req[j]);
        if (rc < 0) return pw_error(PW_ERR_IO, "parameter server 0: the gradients of server %d: %s", j,
                                    pw_last_error());
        if (rc == 0) return PW_OK;
        z->peer_got[j] = 1;
    }
    const double norm = sqrt(norm_total(z, s->tied)), coef = s->clip / (norm + 1e-6);
    for (int j = 1; j < K; j++) {
        /* The next step's gradients land where this step's were read. */
        PW_CHECK(t->vt->ps_irecv(t->self, W + j, TAG_NORM_GRAD(np), z->peer_buf[j],
                                 (size_t)z->peer_floats[j] * sizeof(float), &z->peer_req[j]));
        if (z->coef_sending[j])
            PW_CHECK(ps_wait(t, &z->coef_sreq[j], W + j, "a server to take the norm"));
        z->coef_out[j][0] = coef;
        z->coef_out[j][1] = norm;
        PW_CHECK(t->vt->ps_isend(t->self, W + j, TAG_NORM_COEF(np), z->coef_out[j], sizeof z->coef_out[j],
                                 &z->coef_sreq[j]));
        z->coef_sending[j] = 1;
        z->peer_got[j] = 0;
    }
    z->phase = 0;
    *done = 1;
    return srv_clip_apply(s, coef, norm);
}

/* A checkpoint's request from worker w (replica 0's), for `step`: once
 * every parameter it holds here is at that version, the optimizer state of
 * them all (graph order) goes back. *answered = 1 when sent. */
typedef struct srv_ask {
    int64_t step;             /* the request's buffer */
    pw_treq req;              /* its receive */
    int64_t asked;            /* the step asked for; -1: none pending */
    float *buf;               /* the answer being sent */
    pw_treq sreq;
    int sending, posted;
} srv_ask;

static pw_status srv_answer(server *s, int w, srv_ask *a, int *answered)
{
    const pw_transport *t = s->t;
    *answered = 0;
    int64_t floats = 0;
    for (int i = 0; i < s->n_par; i++) {
        const srv_param *p = &s->par[i];
        int held = 0; /* its copies in w (replica 0's copies come first) */
        for (int c = 0; c < p->C; c++) held += p->copy[c].w == w;
        if (!held) continue;
        if (p->step < a->asked) return PW_OK; /* not yet */
        if (p->step > a->asked)
            return pw_error(PW_ERR_INTERNAL, "parameter server %d: MPI rank %d asked for the optimizer state of "
                            "step %lld, but %s is at version %lld already", t->server, w, (long long)a->asked,
                            s->cfg->graph->params[p->gp].name, (long long)p->step);
        floats += p->numel * s->sf * held;
    }
    if (a->sending) PW_CHECK(ps_wait(t, &a->sreq, w, "a worker to take the optimizer state"));
    a->sending = 0;
    free(a->buf);
    a->buf = malloc((size_t)floats * sizeof(float) + 1);
    if (!a->buf) return pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    float *d = a->buf;
    for (int i = 0; i < s->n_par; i++) { /* each copy's (the worker's order: graph order) */
        const srv_param *p = &s->par[i];
        for (int c = 0; c < p->C; c++) {
            if (p->copy[c].w != w) continue;
            memcpy(d, p->state, (size_t)(p->numel * s->sf) * sizeof(float));
            d += p->numel * s->sf;
        }
    }
    PW_CHECK(t->vt->ps_isend(t->self, w, TAG_STATE(s->np), a->buf, (size_t)floats * sizeof(float), &a->sreq));
    a->sending = 1;
    a->asked = -1;
    a->posted = 0;
    *answered = 1;
    PW_CHECK(t->vt->ps_irecv(t->self, w, TAG_STATE_REQ(s->np), &a->step, sizeof a->step, &a->req));
    a->posted = 1;
    return PW_OK;
}

static pw_status srv_loop(server *s)
{
    const pw_transport *t = s->t;
    const int R = s->R;
    int64_t *bye = malloc((size_t)s->W * sizeof *bye);
    pw_treq *breq = calloc((size_t)s->W, sizeof *breq);
    unsigned char *said = calloc((size_t)s->W, 1);
    pw_status st = bye && breq && said ? PW_OK : pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    for (int w = 0; w < s->W && st == PW_OK; w++)
        st = t->vt->ps_irecv(t->self, w, TAG_BYE(s->np), &bye[w], sizeof bye[w], &breq[w]);
    /* Checkpoints: replica 0's workers (world ranks 0 .. S-1) ask for the state. */
    const int S = t->n_ranks;
    srv_ask *ask = calloc((size_t)S, sizeof *ask);
    if (!ask && st == PW_OK) st = pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    for (int w = 0; w < S && st == PW_OK; w++) {
        ask[w].asked = -1;
        st = t->vt->ps_irecv(t->self, w, TAG_STATE_REQ(s->np), &ask[w].step, sizeof ask[w].step, &ask[w].req);
        ask[w].posted = st == PW_OK;
    }
    for (int i = 0; i < s->n_par && st == PW_OK; i++)
        for (int64_t v = s->start + 1; v <= s->start + s->slots && st == PW_OK; v++) st = srv_post(s, &s->par[i], v);
    int n_said = 0;
    int64_t last = pw_now_ns(), check = last + (int64_t)(t->watchdog_s * 1e9), version = s->start;
    for (int spin = 0; st == PW_OK; spin++) {
        int moved = 0;
        for (int i = 0; i < s->n_par && st == PW_OK; i++) {
            srv_param *p = &s->par[i];
            /* Every posted slot: a fast replica's later gradients are taken as they come. */
            const int UR = p->U * R;
            if (p->q) st = srv_factors(s, p, &moved);
            for (int sl = 0; !p->q && sl < s->slots && st == PW_OK; sl++)
                for (int q = 0; q < UR && st == PW_OK; q++) {
                    const size_t at = (size_t)sl * (size_t)UR + (size_t)q;
                    if (p->got[at] == 1) continue;
                    if (s->stale && p->got[at] == 0) { /* its version travels first */
                        const int rv = t->vt->test(t->self, &p->vreq[at]);
                        if (rv < 0)
                            st = pw_error(PW_ERR_IO, "parameter server %d: the version of %s from MPI rank %d: %s",
                                          t->server, s->cfg->graph->params[p->gp].name,
                                          p->use[(q % R) * p->U + q / R].w, pw_last_error());
                        if (rv != 1) continue;
                        p->got[at] = 2;
                    }
                    const int rc = t->vt->test(t->self, &p->rreq[at]);
                    if (rc < 0)
                        st = pw_error(PW_ERR_IO, "parameter server %d: the gradient of %s from MPI rank %d: %s",
                                      t->server, s->cfg->graph->params[p->gp].name, p->use[(q % R) * p->U + q / R].w,
                                      pw_last_error());
                    if (rc == 1) p->got[at] = 1, p->n_got[sl]++, moved = 1;
                }
            for (; !s->clip;) {
                const int next = (int)((p->step + 1) % s->slots);
                if (st != PW_OK || p->n_got[next] != UR) break;
                const int free_ = srv_slot_free(s, p, next);
                if (free_ < 0) st = PW_ERR_IO;
                if (free_ <= 0) break;
                st = srv_update(s, p);
                moved = 1;
            }
            for (int sl = 0; sl < s->slots && st == PW_OK; sl++) /* lets MPI move the sends */
                if (p->sending[sl] && srv_slot_free(s, p, sl) < 0) st = PW_ERR_IO;
        }
        for (int done = 1; s->clip > 0 && done && st == PW_OK;) {
            st = srv_update_clipped(s, &done);
            if (done) moved = 1;
        }
        for (int w = 0; w < S && st == PW_OK; w++) {
            srv_ask *a = &ask[w];
            if (a->posted && a->asked < 0) {
                const int rc = t->vt->test(t->self, &a->req);
                if (rc < 0) st = pw_error(PW_ERR_IO, "parameter server: %s", pw_last_error());
                if (rc == 1) a->asked = a->step, moved = 1;
            }
            int answered = 0;
            if (st == PW_OK && a->asked >= 0) st = srv_answer(s, w, a, &answered);
            if (answered) moved = 1;
        }
        for (int w = 0; w < s->W && st == PW_OK; w++) {
            if (said[w]) continue;
            const int rc = t->vt->test(t->self, &breq[w]);
            if (rc < 0) st = pw_error(PW_ERR_IO, "parameter server: %s", pw_last_error());
            if (rc == 1) said[w] = 1, n_said++, moved = 1;
        }
        int64_t low = INT64_MAX;
        for (int i = 0; i < s->n_par; i++)
            if (s->par[i].step < low) low = s->par[i].step;
        if (low != INT64_MAX && low > version) {
            version = low;
            pw_transport_phase(t, PW_PHASE_STEP, version);
        }
        if (st != PW_OK) break;
        if (n_said == s->W) {
            int64_t steps = 0;
            for (int w = 0; w < s->W; w++)
                if (bye[w] > steps) steps = bye[w];
            if (s->n_par == 0 || low >= steps) break;
        }
        const int64_t now = pw_now_ns();
        if (moved) {
            pw_transport_progress(t);
            last = now;
            check = now + (int64_t)(t->watchdog_s * 1e9);
            spin = 0;
            continue;
        }
        /* Whom the server waits for: the first process whose gradient of the next step is missing. */
        int peer = PW_WAIT_ALL;
        for (int i = 0; i < s->n_par && peer == PW_WAIT_ALL; i++) {
            const srv_param *p = &s->par[i];
            if (p->q) {
                const int w = srv_factor_peer(s, p);
                if (w >= 0) peer = w;
                continue;
            }
            const size_t sl = (size_t)((p->step + 1) % s->slots), UR = (size_t)(p->U * R);
            for (size_t q = 0; q < UR; q++)
                if (p->got[sl * UR + q] != 1) {
                    peer = p->use[(int)(q % (size_t)R) * p->U + (int)(q / (size_t)R)].w;
                    break;
                }
        }
        pw_transport_waiting(t, peer);
        if (spin < 64) sched_yield();
        else nanosleep(&(struct timespec){0, 20000}, NULL);
        if (now < check) continue;
        char why[400] = "";
        if (pw_transport_blame(t, t->watchdog_s, NULL, why, sizeof why) == -1) {
            check = now + 100000000LL;
            continue;
        }
        st = pw_error(PW_ERR_TIMEOUT, "%s%sMPI rank %d (server %d) waited %.1f s for the gradients of step %lld",
                      why, why[0] ? "; " : "", t->world_rank, t->server, (double)(now - last) / 1e9,
                      (long long)version + 1);
    }
    pw_transport_waiting(t, PW_WAIT_NOBODY);
    /* The last versions' sends, then the receives nobody will send to. */
    for (int i = 0; i < s->n_par && st == PW_OK; i++) {
        srv_param *p = &s->par[i];
        const int RC = R * p->C;
        for (int sl = 0; sl < s->slots && st == PW_OK; sl++)
            for (int c = 0; p->sending[sl] && c < RC && st == PW_OK; c++)
                st = ps_wait(t, &p->sreq[(size_t)sl * (size_t)RC + (size_t)c], p->copy[c].w,
                             "a worker to take the last parameters");
    }
    for (int i = 0; i < s->n_par; i++) {
        srv_param *p = &s->par[i];
        for (int u = 0; p->q && u < p->U; u++) {
            pw_treq *sr = p->fsreq + (size_t)u * (size_t)R * 2;
            const unsigned char *done = p->fsent + (size_t)u * (size_t)R * 2;
            for (int x = 0; x < 2 * R && st == PW_OK; x++)
                if (!done[x])
                    st = ps_wait(t, &sr[x], p->use[(x / 2) * p->U + u].w,
                                 "a worker to take PowerSGD's last summed factors");
            for (int k = 0; k < R && t->vt->cancel; k++) { /* the step nobody sent */
                const size_t fa = (size_t)u * (size_t)R + (size_t)k;
                if (!(p->fgot[fa] & 1)) t->vt->cancel(t->self, &p->fpreq[fa]);
                if (!(p->fgot[fa] & 2)) t->vt->cancel(t->self, &p->fqreq[fa]);
            }
        }
    }
    for (int i = 0; i < s->n_par; i++)
        for (size_t at = 0; s->par[i].got && !s->par[i].q && at < (size_t)s->slots * (size_t)(s->par[i].U * R); at++)
            if (s->par[i].got[at] != 1 && t->vt->cancel) {
                t->vt->cancel(t->self, &s->par[i].rreq[at]);
                if (s->stale && !s->par[i].got[at]) t->vt->cancel(t->self, &s->par[i].vreq[at]);
            }
    for (int w = 0; breq && said && w < s->W; w++)
        if (!said[w] && t->vt->cancel) t->vt->cancel(t->self, &breq[w]);
    srv_norm *z = s->norm;
    for (int j = 1; z && z->K > 1 && j < z->K; j++) {
        if (t->server == 0 && z->coef_sending[j] && st == PW_OK)
            st = ps_wait(t, &z->coef_sreq[j], s->W + j, "a server to take the norm");
        if (t->server == 0 && t->vt->cancel) t->vt->cancel(t->self, &z->peer_req[j]); /* a step that never came */
    }
    if (z && t->server > 0 && z->gsending && st == PW_OK)
        st = ps_wait(t, &z->greq, s->W, "server 0 to take the summed gradients");
    for (int w = 0; ask && w < S; w++) {
        if (ask[w].sending && st == PW_OK) st = ps_wait(t, &ask[w].sreq, w, "a worker to take the optimizer state");
        if (ask[w].posted && ask[w].asked < 0 && t->vt->cancel) t->vt->cancel(t->self, &ask[w].req);
        free(ask[w].buf);
    }
    free(ask);
    free(bye);
    free(breq);
    free(said);
    return st;
}

pw_status pw_ps_serve(const pw_ps_server_config *cfg)
{
    const pw_transport *t = cfg ? cfg->transport : NULL;
    if (!t || !cfg->graph || t->server < 0 || !t->vt->ps_irecv)
        return pw_error(PW_ERR_INVALID_ARG, "pw_ps_serve: needs a graph and a transport whose process is a server");
    const pw_graph *g = cfg->graph;
    server s = {.cfg = cfg, .t = t, .R = t->n_replicas, .W = t->n_ranks * t->n_replicas, .np = g->n_params};
    if (s.R > 64) return pw_error(PW_ERR_UNSUPPORTED, "parameter server: at most 64 replicas (got %d)", s.R);
    int *owner = malloc((size_t)(s.np > 0 ? s.np : 1) * sizeof *owner);
    s.index = malloc((size_t)(s.np > 0 ? s.np : 1) * sizeof *s.index);
    s.par = calloc((size_t)(s.np > 0 ? s.np : 1), sizeof *s.par);
    pw_status st = owner && s.index && s.par ? PW_OK : pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
    if (st == PW_OK) pw_ps_assign(g, t->n_servers, owner);
    const int sf = 2; /* the most any optimizer keeps (AdamW); the kind arrives with the hello */
    for (int gp = 0; gp < s.np && st == PW_OK; gp++) {
        s.index[gp] = -1;
        if (owner[gp] != t->server) continue;
        s.index[gp] = s.n_par;
        srv_param *p = &s.par[s.n_par++];
        p->gp = gp;
        p->decay = g->params[gp].decay;
        p->numel = pw_shape_numel(&g->params[gp].shape);
        const size_t n = (size_t)p->numel;
        p->holder = malloc((size_t)s.R * sizeof *p->holder);
        p->data = malloc(n * sizeof(float) + 1);
        p->state = calloc(n * (size_t)sf + 1, sizeof(float));
        if (!p->holder || !p->data || !p->state) {
            st = pw_error(PW_ERR_NOMEM, "parameter server: out of memory");
            break;
        }
        for (int k = 0; k < s.R; k++) p->holder[k] = -1;
    }
    free(owner);
    int64_t bytes = 0;
    for (int i = 0; i < s.n_par; i++) bytes += s.par[i].numel * (int64_t)sizeof(float);
    PW_INFO(PW_SUB_COMM, "parameter server %d (MPI rank %d): %d parameters, %.2f MB, %d replicas",
            t->server, t->world_rank, s.n_par, (double)bytes / 1e6, s.R);
    if (st == PW_OK) st = srv_hello(&s);
    if (st == PW_OK && s.clip > 0) st = srv_norm_setup(&s);
    if (st == PW_OK) st = srv_loop(&s);
    if (cfg->stats) *cfg->stats = s.stats;
    srv_free(&s);
    return st;
}
