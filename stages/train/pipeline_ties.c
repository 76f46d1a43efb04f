/* pipewright — parameters tied across a pw_pipeline's chunks (and
 * processes): their sums after the engine's step, and the global gradient
 * norm across processes. */
#include "stages/train/pipeline-internal.h"

/* ---- parameters tied across chunks ----
 *
 * Design. A tied parameter's gradient is defined (stages/program/program.h) as the
 * sum of all its uses in reverse node order over the whole graph. Its uses
 * sit in different chunks, which run on different engine workers
 * concurrently, and the engine's OPTIM is per rank: no worker can know when
 * the other ranks' backwards are done. So when the graph has such a tie the
 * chunks get a stage vtable without optimizer_step (pl_gstage_post_i), the
 * engine only runs F/B/W and the replica all-reduces (it sums every use
 * buffer across replicas: gs_grad_bucket), and after pw_engine_run_step has
 * returned — every worker idle, every backward of the step done — this
 * thread, for each replica: sums the uses across chunks in reverse node
 * order (chunks last to first, pieces last to first, each program's uses as
 * pw_program_param_uses lists them), writes the total into every copy,
 * optionally clips by the global norm (each tied parameter counted once),
 * and runs every program's optimizer. Every copy sees the same gradient and
 * the same optimizer state, so copies never drift, and the bytes match one
 * stage. Replicas: the cross-replica sum happens first (per use), then the
 * cross-chunk sum. Multi-process runs pass the partial sums between the
 * chunks' processes in the same order (pl_sum_ties_across below). */

/* The programs of local replica k in node order (tensor parallelism: rank
 * 0's); returns the count. */
int pl_replica_programs(pw_pipeline *pl, int k, pw_program **out)
{
    int n = 0;
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        gstage *gs = stage_at(pl, k, ch);
        for (int j = 0; j < gs->n_pieces; j++) out[n++] = gs->piece[j];
    }
    return n;
}

/* The same for this process's tensor-parallel rank `rank` (0 .. TL−1: in
 * one process rank `rank`, under MPI the process's own; one piece per chunk
 * at T > 1). */
int pl_replica_rank_programs(pw_pipeline *pl, int k, int rank, pw_program **out)
{
    if (pl->T <= 1) return pl_replica_programs(pl, k, out);
    int n = 0;
    for (int ch = 0; ch < pl->C; ch++)
        if (stage_here(pl, ch)) out[n++] = stage_at(pl, k, ch)->rank_prog[rank];
    return n;
}

pw_status pl_sum_ties(const pw_graph *g, pw_program **p, int np)
{
    int *where = malloc((size_t)np * sizeof *where), *local = malloc((size_t)np * sizeof *local);
    float *acc = NULL, *host = NULL; /* host: a device program's use, downloaded */
    pw_status st = PW_OK;
    if (!where || !local) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
        goto out;
    }
    for (int gp = 0; gp < g->n_params; gp++) {
        int n = 0;
        for (int s = 0; s < np; s++)
            for (int i = 0; i < pw_program_n_params(p[s]); i++) {
                pw_program_param pp;
                pw_program_param_at(p[s], i, &pp);
                if (pp.graph_param == gp) {
                    where[n] = s;
                    local[n++] = i;
                    break;
                }
            }
        if (n < 2) continue; /* held by one program: its optimizer folds it */
        const int64_t numel = pw_shape_numel(&g->params[gp].shape);
        float *a = realloc(acc, (size_t)numel * sizeof *acc);
        if (!a) {
            st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
            goto out;
        }
        acc = a;
        int first = 1;
        for (int k = n - 1; k >= 0; k--) {
            float *bufs[16];
            int uses = pw_program_param_uses(p[where[k]], local[k], bufs, 16);
            if (uses < 1 || uses > 16) {
                st = pw_error(PW_ERR_INTERNAL, "pipeline: parameter %s has %d uses in one program",
                              g->params[gp].name, uses);
                goto out;
            }
            for (int u = 0; u < uses; u++) {
                if (pw_program_on_device(p[where[k]])) { /* a host copy of the use, then the same sum */
                    float *h = realloc(host, (size_t)numel * sizeof *host);
                    if (!h) {
                        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
                        goto out;
                    }
                    host = h;
                    PW_CHECK_GOTO(pw_program_param_read(p[where[k]], local[k], PW_PARAM_GRAD, u, host), st, out);
                    bufs[u] = host;
                }
                if (first) memcpy(acc, bufs[u], (size_t)numel * sizeof *acc);
                else
                    for (int64_t j = 0; j < numel; j++) acc[j] += bufs[u][j];
                first = 0;
            }
        }
        for (int k = 0; k < n; k++) {
            pw_program_param pp;
            pw_program_fold_grads(p[where[k]]);
            pw_program_param_at(p[where[k]], local[k], &pp);
            if (pw_program_on_device(p[where[k]]))
                PW_CHECK_GOTO(pw_program_param_write(p[where[k]], local[k], PW_PARAM_GRAD, acc), st, out);
            else
                memcpy(pp.grad, acc, (size_t)numel * sizeof *acc);
        }
    }
out:
    free(where);
    free(local);
    free(acc);
    free(host);
    return st;
}

/* ---- the same across processes (a transport) ----
 *
 * Each process holds the chunks of its rank, so a tied parameter's uses sit
 * in several processes of the replica. The sum keeps the one-process order
 * by passing the partial sum along: the process of the last chunk using the
 * parameter starts it, each process holding an earlier use receives it,
 * adds its uses (pw_program_param_uses order) and passes it on, down to the
 * first chunk's process (the owner), which sends the total to every other
 * process holding a use. The squared norm for clipping travels the same way
 * through the chunks in order. Every message is a blocking world send or
 * receive on this thread between the engine's step and the optimizer, and
 * every process walks the parameters and chunks in the same order, so each
 * send meets its receive: no deadlock, and the bytes of one process. */

/* Chunks whose nodes use graph parameter gp, ascending; returns the count. */
static int chunks_using(const pw_pipeline *pl, int gp, int *out)
{
    const pw_graph *g = pl->g;
    int n = 0;
    for (int ch = 0; ch < pl->C; ch++) {
        int uses = 0;
        for (int i = pl->part.begin[ch]; i < pl->part.begin[ch + 1] && !uses; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++) uses |= g->nodes[i].params[q] == gp;
        if (uses) out[n++] = ch;
    }
    return n;
}

/* The piece of local chunk ch of local replica lrep holding graph
 * parameter gp (one: cut_pieces never separates two uses), and the
 * parameter's index there; NULL when the chunk holds no use of it. */
pw_program *pl_chunk_param(pw_pipeline *pl, int lrep, int ch, int gp, int *local)
{
    gstage *gs = stage_at(pl, lrep, ch);
    for (int j = 0; j < gs->n_pieces; j++)
        for (int i = 0; i < pw_program_n_params(gs->piece[j]); i++) {
            pw_program_param pp;
            pw_program_param_at(gs->piece[j], i, &pp);
            if (pp.graph_param == gp) {
                *local = i;
                return gs->piece[j];
            }
        }
    return NULL;
}

pw_status pl_sum_ties_across(pw_pipeline *pl)
{
    /* tensor parallelism: this process's rank's parts (its peers in the
     * other stages hold the same rank's) */
    const pw_graph *g = pl->T > 1 ? pl->rank_g[pl->tp0] : pl->g;
    const pw_transport *t = pl->t;
    const int me = t->rank, k = t->replica;
    int *list = malloc((size_t)pl->C * sizeof *list);
    float *acc = NULL;
    pw_status st = PW_OK;
    if (!list) return pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
    for (int gp = 0; gp < g->n_params && st == PW_OK; gp++) {
        const int nc = chunks_using(pl, gp, list);
        if (nc < 2) continue; /* held by one chunk: its optimizer folds it */
        const int64_t numel = pw_shape_numel(&g->params[gp].shape);
        const size_t bytes = (size_t)numel * sizeof *acc;
        float *a = realloc(acc, bytes ? bytes : sizeof *acc);
        if (!a) {
            st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory summing tied gradients");
            break;
        }
        acc = a;
        /* Last use to first; the partial sum follows the chunks' ranks. */
        int prev = -1;
        for (int i = nc - 1; i >= 0 && st == PW_OK; i--) {
            const int ch = list[i], r = pw_schedule_rank_of(pl->sched, ch);
            if (prev >= 0 && prev != r) {
                if (prev == me) st = t->vt->send(t->self, pw_transport_world_of(t, k, r), gp, acc, bytes);
                else if (r == me) st = t->vt->recv(t->self, pw_transport_world_of(t, k, prev), gp, acc, bytes);
            }
            prev = r;
            if (st != PW_OK || r != me) continue;
            int li = 0;
            pw_program *p = pl_chunk_param(pl, 0, ch, gp, &li);
            float *bufs[16];
            int uses = p ? pw_program_param_uses(p, li, bufs, 16) : 0;
            if (uses < 1 || uses > 16) {
                st = pw_error(PW_ERR_INTERNAL, "pipeline: parameter %s has %d uses in chunk %d",
                              g->params[gp].name, uses, ch);
                break;
            }
            for (int u = 0; u < uses; u++) {
                if (i == nc - 1 && u == 0) memcpy(acc, bufs[u], bytes);
                else
                    for (int64_t j = 0; j < numel; j++) acc[j] += bufs[u][j];
            }
        }
        /* The owner (first use) sends the total to the other holders, in
         * rank order. */
        const int owner = pw_schedule_rank_of(pl->sched, list[0]);
        for (int r = 0; r < pl->S && st == PW_OK; r++) {
            int holds = 0;
            for (int i = 1; i < nc; i++) holds |= pw_schedule_rank_of(pl->sched, list[i]) == r;
            if (r == owner || !holds) continue;
            if (me == owner) st = t->vt->send(t->self, pw_transport_world_of(t, k, r), gp, acc, bytes);
            else if (me == r) st = t->vt->recv(t->self, pw_transport_world_of(t, k, owner), gp, acc, bytes);
        }
        for (int i = 0; i < nc && st == PW_OK; i++) {
            if (pw_schedule_rank_of(pl->sched, list[i]) != me) continue;
            int li = 0;
            pw_program *p = pl_chunk_param(pl, 0, list[i], gp, &li);
            pw_program_param pp;
            pw_program_fold_grads(p);
            pw_program_param_at(p, li, &pp);
            memcpy(pp.grad, acc, bytes);
        }
        if (st != PW_OK) st = pw_error_prefix(st, "summing tied parameter %s across processes: ",
                                              g->params[gp].name);
    }
    free(list);
    free(acc);
    return st;
}

/* The sum of squared gradients of the replica, every parameter once at its
 * first chunk, added in chunk order through the chunks' processes (the
 * order of one process); every process of the replica learns the total.
 * Tensor parallelism: each chunk's share is pl_tp_sumsq's, taken by the T
 * processes of its stage together; the running sum then passes between the
 * processes of one tensor rank (each holds the same). */
pw_status pl_sumsq_across(pw_pipeline *pl, double *out)
{
    const pw_graph *g = pl->g;
    const pw_transport *t = pl->t;
    const int me = t->rank, k = t->replica, tag = g->n_params;
    int *first = malloc((size_t)(g->n_params > 0 ? g->n_params : 1) * sizeof *first);
    double *all = calloc((size_t)t->world_size, sizeof *all);
    unsigned char *skip = malloc((size_t)(g->n_params > 0 ? g->n_params : 1));
    double sumsq = 0.0;
    pw_status st = PW_OK;
    if (!first || !all || !skip) {
        st = pw_error(PW_ERR_NOMEM, "pipeline: out of memory for the gradient norm");
        goto out;
    }
    for (int p = 0; p < g->n_params; p++) first[p] = -1;
    for (int ch = pl->C - 1; ch >= 0; ch--)
        for (int i = pl->part.begin[ch]; i < pl->part.begin[ch + 1]; i++)
            for (int q = 0; q < g->nodes[i].n_params; q++) first[g->nodes[i].params[q]] = ch;
    for (int ch = 0; ch < pl->C && st == PW_OK; ch++) {
        const int r = pw_schedule_rank_of(pl->sched, ch);
        const int pr = ch > 0 ? pw_schedule_rank_of(pl->sched, ch - 1) : r;
        if (pr != r && pr == me) st = t->vt->send(t->self, pw_transport_world_of(t, k, r), tag, &sumsq, sizeof sumsq);
        else if (pr != r && r == me)
            st = t->vt->recv(t->self, pw_transport_world_of(t, k, pr), tag, &sumsq, sizeof sumsq);
        if (st != PW_OK || r != me) continue;
        gstage *gs = stage_at(pl, 0, ch);
        if (gs->rank_prog) {
            /* Tensor parallelism: the parts' sums of the stage's T processes
             * (pl_tp_sumsq), the parameters first used here. */
            for (int p = 0; p < g->n_params; p++) skip[p] = first[p] != ch;
            float *tmp = NULL;
            st = pl_tp_sumsq(gs, skip, &tmp, &sumsq);
            free(tmp);
            continue;
        }
        for (int j = 0; j < gs->n_pieces; j++) {
            pw_program_fold_grads(gs->piece[j]);
            for (int i = 0; i < pw_program_n_params(gs->piece[j]); i++) {
                pw_program_param pp;
                pw_program_param_at(gs->piece[j], i, &pp);
                if (first[pp.graph_param] != ch) continue;
                for (int64_t e = 0; e < pp.numel; e++) sumsq += (double)pp.grad[e] * (double)pp.grad[e];
            }
        }
    }
    if (st == PW_OK) {
        /* The last chunk's process holds the replica's total. */
        double mine = pw_schedule_rank_of(pl->sched, pl->C - 1) == me ? sumsq : 0.0;
        st = t->vt->allgather(t->self, &mine, sizeof mine, all);
        if (st == PW_OK) *out = all[world_of_chunk(pl, k, pl->C - 1)];
    }
    if (st != PW_OK) st = pw_error_prefix(st, "gradient norm across processes: ");
out:
    free(first);
    free(all);
    free(skip);
    return st;
}

/* The rest of the step after the engine's: see the design note above. */
