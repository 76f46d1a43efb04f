/* pipewright — the engine's communication: gradient buckets summed across
 * replicas on a communication thread per worker, the global gradient norm,
 * and messages to and from pipeline ranks in other processes.
 *
 * Buckets. Each chunk's gradients come in the schedule's n_buckets buckets
 * (pw_stage_i.grad_bucket). A bucket starts (pw_eng_bucket_start) when the
 * chunk's last backward that touches it returns — bucket by bucket inside
 * that backward when the chunk has backward_bucket — or at the latest at its
 * ALLREDUCE action. Starting only queues a job for the worker's
 * communication thread, which runs the (blocking) collective and wakes the
 * worker's loop when it is done. OPTIM parks until all the rank's buckets
 * are done, so the worker never blocks and the all-reduces overlap whatever
 * the rank still computes. Every worker queues its buckets in the order of
 * its program, the same on every replica, so the members of each group meet
 * in the same sequence and the collectives cannot deadlock.
 *
 * Other processes. Sends are MPI_Isend-like and complete in the background:
 * the worker tests them at its actions and from a poll timer
 * (PW_ENG_POLL_US) while a step runs, and returns each buffer to its pool
 * when its send completes. A receive is posted when its RECV action is
 * reached and tested the same way; a parked worker is woken by the timer.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "runtime/log.h"
#include "scheduler/engine-internal.h"

static void comm_fail(pw_worker *w, pw_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void comm_fail(pw_worker *w, pw_status st, const char *fmt, ...)
{
    char why[PW_ENGINE_ERRMSG - 128], who[64], msg[PW_ENGINE_ERRMSG];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    pw_eng_name(w->e, w->replica, w->rank, who, sizeof who);
    snprintf(msg, sizeof msg, "%s%s", who, why);
    pw_eng_fail(w->e, st, msg);
}

/* ------------------------------------------------- communication thread */

static pw_coll bucket_coll(pw_worker *w, int chunk)
{
    pw_engine *e = w->e;
    if (e->t) return e->t->stage_coll;
    if (e->slow_colls) return e->slow_colls[(size_t)chunk * (size_t)e->NR + (size_t)w->replica];
    return pw_shm_group_member(e->groups[chunk], w->replica);
}

static pw_coll norm_coll(pw_worker *w)
{
    pw_engine *e = w->e;
    if (e->t) return e->t->replica_coll;
    return pw_shm_group_member(e->norm_groups[w->lrep], w->rank);
}

static void *comm_main(void *arg)
{
    pw_worker *w = arg;
    pw_engine *e = w->e;
    pthread_mutex_lock(&w->comm_mu);
    for (;;) {
        while (!w->comm_quit && w->jobs_n == 0) pthread_cond_wait(&w->comm_cv, &w->comm_mu);
        if (w->comm_quit) break;
        pw_job j = w->jobs[w->jobs_head];
        w->jobs_head = (w->jobs_head + 1) % w->jobs_cap;
        w->jobs_n--;
        pw_bucket *bk = j.kind == PW_JOB_ALLREDUCE ? pw_eng_bucket(e, w->lrep, j.chunk, j.bucket) : NULL;
        const int failed = w->comm_err != PW_OK;
        pthread_mutex_unlock(&w->comm_mu);

        pw_clear_error();
        pw_status st;
        int64_t wire = 0;
        if (failed || atomic_load(&e->abort)) {
            /* After an aborted or failed collective the group may only be
             * destroyed (collective.h): a member that left early must not
             * start another round while its peers still read its spans. */
            st = pw_error(PW_ERR_TIMEOUT, "collective skipped: the step was aborted");
        } else if (bk && bk->z && !j.discarded) {
            /* (A discarded step's bucket takes the plain all-reduce below:
             * every member discards the same step, as they share its norm.) */
            pw_coll co = bucket_coll(w, j.chunk);
            pw_compress_bytes by = {0, 0};
            st = pw_compressor_allreduce(bk->z, &co, bk->spans, bk->n_spans, &e->abort, &by);
            wire = by.wire;
        } else if (bk) {
            pw_coll co = bucket_coll(w, j.chunk);
            st = pw_coll_allreduce(&co, bk->spans, bk->n_spans, &e->abort);
            wire = bk->floats * (int64_t)sizeof(float);
        } else {
            pw_coll co = norm_coll(w);
            st = pw_coll_allgather_f64(&co, j.value, w->norm_vals, &e->abort);
        }
        int64_t t1 = pw_now_ns();

        pthread_mutex_lock(&w->comm_mu);
        if (bk) {
            bk->state = st == PW_OK ? PW_BK_DONE : PW_BK_FAILED;
            bk->t1 = t1;
            bk->wire_bytes = wire;
        } else {
            w->norm_state = st == PW_OK ? PW_BK_DONE : PW_BK_FAILED;
        }
        if (st != PW_OK && w->comm_err == PW_OK) {
            w->comm_err = st;
            snprintf(w->comm_msg, sizeof w->comm_msg, "%s", pw_last_error()[0] ? pw_last_error() : pw_status_str(st));
        }
        pthread_mutex_unlock(&w->comm_mu);
        event_active(w->wake, 0, 0);
        pthread_mutex_lock(&w->comm_mu);
    }
    pthread_mutex_unlock(&w->comm_mu);
    return NULL;
}

pw_status pw_eng_comm_start(pw_engine *e, pw_worker *w)
{
    (void)e;
    pthread_mutex_init(&w->comm_mu, NULL);
    pthread_cond_init(&w->comm_cv, NULL);
    w->comm_init = 1;
    int rc = pthread_create(&w->comm_thread, NULL, comm_main, w);
    if (rc != 0)
        return pw_error(PW_ERR_NOMEM, "engine: cannot start the communication thread of rank %d: %s", w->rank,
                        strerror(rc));
    w->comm_started = 1;
    return PW_OK;
}

void pw_eng_comm_stop(pw_worker *w)
{
    if (!w->comm_started) return;
    pthread_mutex_lock(&w->comm_mu);
    w->comm_quit = 1;
    pthread_cond_broadcast(&w->comm_cv);
    pthread_mutex_unlock(&w->comm_mu);
    pthread_join(w->comm_thread, NULL);
    w->comm_started = 0;
}

void pw_eng_comm_free(pw_worker *w)
{
    if (!w->comm_init) return;
    pthread_cond_destroy(&w->comm_cv);
    pthread_mutex_destroy(&w->comm_mu);
    w->comm_init = 0;
}

void pw_eng_comm_begin_step(pw_worker *w, int keep_norm)
{
    pw_engine *e = w->e;
    if (!e->use_comm) return;
    pthread_mutex_lock(&w->comm_mu);
    for (int l = 0; e->bucketed && l < w->n_chunks; l++)
        for (int b = 0; b < e->NB; b++) pw_eng_bucket(e, w->lrep, w->chunk_ids[l], b)->state = PW_BK_IDLE;
    if (!keep_norm) w->norm_state = PW_BK_IDLE;
    pthread_mutex_unlock(&w->comm_mu);
}

static void push_job(pw_worker *w, pw_job j)
{
    /* (comm_mu held) The ring holds a step's jobs: every bucket of the
     * rank's chunks once, plus the norm. */
    PW_ASSERT(w->jobs_n < w->jobs_cap);
    w->jobs[(w->jobs_head + w->jobs_n) % w->jobs_cap] = j;
    w->jobs_n++;
    pthread_cond_signal(&w->comm_cv);
}

void pw_eng_bucket_start(pw_worker *w, int chunk, int b)
{
    pw_engine *e = w->e;
    if (!e->bucketed) return;
    pw_bucket *bk = pw_eng_bucket(e, w->lrep, chunk, b);
    int64_t now = pw_now_ns();
    pthread_mutex_lock(&w->comm_mu);
    if (bk->state == PW_BK_IDLE) {
        bk->t0 = now;
        if (bk->floats == 0) {
            /* Empty on every replica (their buckets are alike): nothing to sum. */
            bk->state = PW_BK_DONE;
            bk->t1 = now;
        } else {
            bk->state = PW_BK_QUEUED;
            push_job(w, (pw_job){.kind = PW_JOB_ALLREDUCE, .chunk = chunk, .bucket = b, .discarded = w->discard});
        }
    }
    pthread_mutex_unlock(&w->comm_mu);
}

/* ------------------------------------------------------------ OPTIM wait */

static int park(pw_worker *w, int kind, int chunk, int bucket)
{
    if (!w->wait_t0) w->wait_t0 = pw_now_ns();
    w->wait_kind = kind;
    w->wait_key_chunk = chunk;
    w->wait_key_bucket = bucket;
    return 1;
}

/* Leaves a park, recording the wait (an exposed all-reduce when kind is
 * PW_WAIT_BUCKET). */
static void unpark(pw_worker *w, const char *name)
{
    if (!w->wait_t0) return;
    int64_t now = pw_now_ns();
    w->wait_ns += now - w->wait_t0;
    if (w->wait_kind == PW_WAIT_BUCKET) w->coll_wait_ns += now - w->wait_t0;
    if (w->e->trace)
        pw_eng_trace(w, name, PW_TRACE_WAIT, w->wait_key_chunk, w->wait_key_bucket, -1, 0, w->wait_t0, now);
    w->wait_t0 = 0;
    w->wait_kind = PW_WAIT_NONE;
}

/* 0: all the worker's buckets are done; 1: parked on one; -1: one failed. */
static int buckets_done(pw_worker *w)
{
    pw_engine *e = w->e;
    int wait_c = -1, wait_b = -1, failed = 0;
    pthread_mutex_lock(&w->comm_mu);
    for (int l = 0; l < w->n_chunks && wait_c < 0 && !failed; l++)
        for (int b = 0; b < e->NB; b++) {
            int s = pw_eng_bucket(e, w->lrep, w->chunk_ids[l], b)->state;
            if (s == PW_BK_FAILED) {
                failed = 1;
                wait_c = w->chunk_ids[l];
                wait_b = b;
                break;
            }
            if (s != PW_BK_DONE) {
                wait_c = w->chunk_ids[l];
                wait_b = b;
                break;
            }
        }
    char msg[sizeof w->comm_msg];
    memcpy(msg, w->comm_msg, sizeof msg);
    pw_status err = w->comm_err;
    pthread_mutex_unlock(&w->comm_mu);
    if (failed) {
        comm_fail(w, err != PW_OK ? err : PW_ERR_INTERNAL, " (chunk %d): all-reduce of gradient bucket %d: %s",
                  wait_c, wait_b, msg);
        return -1;
    }
    if (wait_c >= 0) return park(w, PW_WAIT_BUCKET, wait_c, wait_b);
    unpark(w, "wait ALLREDUCE");
    /* Each bucket's whole run, start to finish, on the worker's track. */
    for (int l = 0; l < w->n_chunks; l++)
        for (int b = 0; b < e->NB; b++) {
            const int c = w->chunk_ids[l];
            pw_bucket *bk = pw_eng_bucket(e, w->lrep, c, b);
            pthread_mutex_lock(&w->comm_mu);
            int64_t t0 = bk->t0, t1 = bk->t1, wire = bk->wire_bytes;
            pthread_mutex_unlock(&w->comm_mu);
            w->coll_ns += t1 - t0;
            if (bk->floats > 0) {
                w->coll_bytes += bk->floats * (int64_t)sizeof(float);
                w->coll_wire_bytes += wire;
            }
            if (e->trace && bk->floats > 0) {
                pw_trace_event *ev = pw_eng_trace(w, "ALLREDUCE", PW_TRACE_COMM, c, b, -1,
                                                  bk->floats * (int64_t)sizeof(float), t0, t1);
                if (ev && bk->z) ev->wire_bytes = wire;
            }
        }
    return 0;
}

/* The rank's share of the squared global norm: its chunks in chunk order. */
static double local_sumsq(pw_worker *w)
{
    double s = 0.0;
    for (int l = 0; l < w->n_chunks; l++) {
        pw_echunk *ch = pw_eng_chunk(w->e, w->lrep, w->chunk_ids[l]);
        s += ch->vt->grad_sumsq(ch->self);
    }
    return s;
}

/* Scales the rank's gradients so the global norm is at most clip (PyTorch's
 * clip_grad_norm_: coefficient clip / (norm + 1e-6), applied when below 1). */
static void apply_clip(pw_worker *w, double total)
{
    pw_engine *e = w->e;
    double norm = sqrt(total);
    w->grad_norm = norm;
    double coef = e->clip / (norm + 1e-6);
    if (!(coef < 1.0)) return;
    for (int l = 0; l < w->n_chunks; l++) {
        pw_echunk *ch = pw_eng_chunk(e, w->lrep, w->chunk_ids[l]);
        ch->vt->scale_grads(ch->self, (float)coef);
    }
}

/* ------------------------------------------------------ post-validation */

/* Parameters and optimizer state of the rank's tried chunks back (undo) or
 * their gradients zeroed (commit). A failure fails the step. */
static int settle_tried(pw_worker *w, int undo)
{
    pw_engine *e = w->e;
    int rc = 0;
    for (int l = 0; l < w->tried; l++) {
        pw_echunk *ch = pw_eng_chunk(e, w->lrep, w->chunk_ids[l]);
        if (!ch->vt->optimizer_step) continue;
        pw_clear_error();
        pw_status st = undo ? ch->vt->optimizer_undo(ch->self) : ch->vt->optimizer_commit(ch->self);
        if (st != PW_OK && rc == 0) {
            comm_fail(w, st, " (chunk %d): %s the optimizer step: %s", w->chunk_ids[l],
                      undo ? "undoing" : "committing", pw_last_error());
            rc = -1;
        }
    }
    w->tried = 0;
    return rc;
}

void pw_eng_optim_abandon(pw_worker *w)
{
    if (w->tried > 0) (void)settle_tried(w, 1);
}

/* The optimistic step of every chunk of the rank, in chunk order: the
 * synchronous OPTIM's calls and checks, its failure message included. A
 * failure undoes the chunks already stepped. */
static int try_all(pw_worker *w)
{
    pw_engine *e = w->e;
    const long step = (long)w->step;
    const int64_t t0 = pw_now_ns();
    w->tried = 0;
    for (int l = 0; l < w->n_chunks; l++) {
        const int c = w->chunk_ids[l];
        pw_echunk *ch = pw_eng_chunk(e, w->lrep, c);
        pw_status st = PW_OK;
        pw_clear_error();
        if (ch->vt->optimizer_step) st = ch->vt->optimizer_try(ch->self, step);
        if (st != PW_OK) {
            char msg[PW_ENGINE_ERRMSG / 2];
            snprintf(msg, sizeof msg, "%s", pw_last_error()[0] ? pw_last_error() : pw_status_str(st));
            (void)settle_tried(w, 1);
            comm_fail(w, st, " (chunk %d), OPTIM of step %ld: %s", c, step, msg);
            return -1;
        }
        w->tried = l + 1;
    }
    const int64_t t1 = pw_now_ns();
    w->busy_ns += t1 - t0;
    if (e->trace) pw_eng_trace(w, "OPTIM", PW_TRACE_COMPUTE, -1, -1, -1, 0, t0, t1);
    return 0;
}

/* The verdict on the optimistic step, once the global sum of squares is
 * known: commit it, or undo it and leave the gradients scaled for OPTIM to
 * redo the step (w->redo). A non-finite norm undoes and fails the step;
 * the rank holding the non-finite gradient has already failed it in
 * try_all, with the synchronous message, before sharing its norm, so this
 * is only a guard. */
static int validate(pw_worker *w, double total)
{
    pw_engine *e = w->e;
    const double norm = sqrt(total), coef = e->clip / (norm + 1e-6);
    w->grad_norm = norm;
    if (!isfinite(total)) {
        (void)settle_tried(w, 1);
        comm_fail(w, PW_ERR_NUMERIC, ": the global gradient norm of step %lld is not finite",
                  (long long)(w->verdict ? w->step - 1 : w->step));
        return -1;
    }
    if (!(coef < 1.0)) return settle_tried(w, 0);
    if (settle_tried(w, 1) != 0) return -1;
    apply_clip(w, total);
    w->redo = 1;
    w->rollbacks++;
    return 0;
}

/* With clipping: the total the norm is taken from is settled here, by
 * clipping (synchronous) or validating (post-validation). */
static int settle_norm(pw_worker *w, double total)
{
    if (w->e->post_validate) return validate(w, total);
    apply_clip(w, total);
    return 0;
}

/* The norm job's outcome: 0 with *total set, 1 parked (or, !may_park,
 * not there yet), -1 failed. */
static int norm_total_or(pw_worker *w, double *total, int may_park)
{
    pw_engine *e = w->e;
    pthread_mutex_lock(&w->comm_mu);
    int s = w->norm_state;
    pw_status err = w->comm_err;
    char msg[sizeof w->comm_msg];
    memcpy(msg, w->comm_msg, sizeof msg);
    pthread_mutex_unlock(&w->comm_mu);
    if (s == PW_BK_FAILED) {
        comm_fail(w, err != PW_OK ? err : PW_ERR_INTERNAL, ": global gradient norm: %s", msg);
        return -1;
    }
    if (s != PW_BK_DONE) return may_park ? park(w, PW_WAIT_NORM, -1, -1) : 1;
    unpark(w, "wait GRADNORM");
    /* Every rank's share, summed in rank order: the same total on every
     * rank and replica, in one process or many. */
    *total = 0.0;
    pthread_mutex_lock(&w->comm_mu);
    for (int r = 0; r < e->S; r++) *total += w->norm_vals[r];
    w->norm_state = PW_BK_IDLE;
    pthread_mutex_unlock(&w->comm_mu);
    return 0;
}

static int norm_total(pw_worker *w, double *total) { return norm_total_or(w, total, 1); }

int pw_eng_comm_verdict_or(pw_worker *w, int may_park)
{
    pw_engine *e = w->e;
    double total;
    int rc = norm_total_or(w, &total, may_park);
    if (rc != 0) return rc;
    /* The previous step's verdict, exactly as validate() takes it: the
     * gradients of that step are still in the chunks (nothing of this step
     * has accumulated yet: we are before the rank's first backward). */
    const int64_t t0 = pw_now_ns();
    if (validate(w, total) != 0) return -1;
    w->verdict = 0;
    if (!w->redo) return 0;
    /* Clipping triggered: undone and scaled; the redo is the synchronous
     * step's own (try + commit: optimizer_step's bits, complete in the
     * call). This step has run forwards on the optimistic parameters: it is
     * discarded and the run ends with it (every rank sees the same norm,
     * so every rank discards the same step). */
    w->redo = 0;
    for (int l = 0; l < w->n_chunks; l++) {
        const int c = w->chunk_ids[l];
        pw_echunk *ch = pw_eng_chunk(e, w->lrep, c);
        if (!ch->vt->optimizer_step) continue;
        pw_clear_error();
        pw_status st = ch->vt->optimizer_try(ch->self, (long)(w->step - 1));
        if (st == PW_OK) st = ch->vt->optimizer_commit(ch->self);
        if (st != PW_OK) {
            comm_fail(w, st, " (chunk %d), OPTIM of step %lld (redone after clipping): %s", c,
                      (long long)(w->step - 1), pw_last_error());
            return -1;
        }
    }
    w->discard = 1;
    w->last_step = w->step;
    const int64_t t1 = pw_now_ns();
    w->busy_ns += t1 - t0;
    if (e->trace) pw_eng_trace(w, "OPTIM", PW_TRACE_COMPUTE, -1, -1, -1, 0, t0, t1);
    return 0;
}

int pw_eng_comm_verdict(pw_worker *w) { return pw_eng_comm_verdict_or(w, 1); }

int pw_eng_comm_before_optim(pw_worker *w)
{
    pw_engine *e = w->e;
    if (w->optim_phase == 0) {
        if (e->bucketed) {
            int rc = buckets_done(w);
            if (rc != 0) return rc;
        }
        w->optim_phase = 1;
    }
    if (e->clip <= 0) return 0;
    if (w->discard) { /* overlap: this step ran on rolled-back parameters */
        if (w->optim_phase == 1) {
            for (int l = 0; l < w->n_chunks; l++) {
                pw_echunk *ch = pw_eng_chunk(e, w->lrep, w->chunk_ids[l]);
                pw_clear_error();
                pw_status st = ch->vt->zero_grads ? ch->vt->zero_grads(ch->self) : PW_OK;
                if (st != PW_OK) {
                    comm_fail(w, st, " (chunk %d): dropping the gradients of discarded step %lld: %s",
                              w->chunk_ids[l], (long long)w->step, pw_last_error());
                    return -1;
                }
            }
            w->optim_phase = 3;
        }
        return 0;
    }
    if (w->optim_phase == 1) {
        double mine = local_sumsq(w);
        /* Post-validation: step first, share the norm after (a rank whose
         * own gradient is not finite fails here, never sharing its norm). */
        if (e->post_validate && try_all(w) != 0) return -1;
        if (!e->use_comm) {
            /* One rank of one replica: the norm is ours alone. */
            w->optim_phase = 3;
            return settle_norm(w, mine);
        }
        pthread_mutex_lock(&w->comm_mu);
        w->norm_state = PW_BK_QUEUED;
        push_job(w, (pw_job){.kind = PW_JOB_NORM, .value = mine});
        pthread_mutex_unlock(&w->comm_mu);
        w->optim_phase = 2;
        if (e->post_validate && e->overlap && w->step < w->last_step) {
            /* Overlap: the rank runs on into the next step; the verdict is
             * taken there, before its first backward (pw_eng_comm_verdict). */
            w->verdict = 1;
            w->optim_phase = 3;
            return 0;
        }
    }
    if (w->optim_phase == 2) {
        double total;
        int rc = norm_total(w, &total);
        if (rc != 0) return rc;
        w->optim_phase = 3;
        return settle_norm(w, total);
    }
    return 0;
}

/* ------------------------------------------------------ other processes */

int pw_eng_progress_sends(pw_worker *w)
{
    const pw_transport *t = w->e->t;
    int k = 0;
    for (int i = 0; i < w->n_pending; i++) {
        int rc = t->vt->test(t->self, &w->pending[i].req);
        if (rc < 0) {
            comm_fail(w, PW_ERR_IO, ": sending a message to another process: %s", pw_last_error());
            /* Keep the rest; the step is failing. */
            for (int j = i; j < w->n_pending; j++) w->pending[k++] = w->pending[j];
            w->n_pending = k;
            return -1;
        }
        if (rc == 1) pw_eng_buf_put(w->pending[i].buf);
        else w->pending[k++] = w->pending[i];
    }
    w->n_pending = k;
    return 0;
}

int pw_eng_remote_send(pw_worker *w, const char *kind, int src_chunk, int dir, int dst_chunk, int mb,
                       pw_msgbuf *buf, size_t bytes)
{
    pw_engine *e = w->e;
    const pw_transport *t = e->t;
    if (w->n_pending >= w->max_pending && pw_eng_progress_sends(w) < 0) return -1;
    if (w->n_pending >= w->max_pending) {
        comm_fail(w, PW_ERR_INTERNAL, " (chunk %d), %s of micro-batch %d: %d sends in flight", src_chunk, kind,
                  mb, w->n_pending);
        return -1;
    }
    struct pw_pending *p = &w->pending[w->n_pending];
    pw_clear_error();
    pw_status st = t->vt->isend(t->self, pw_eng_rank_of(e, dst_chunk), pw_eng_tag(e, dir, dst_chunk, mb),
                                buf ? buf->data : NULL, bytes, &p->req);
    if (st != PW_OK) {
        comm_fail(w, st, " (chunk %d), %s of micro-batch %d: %s", src_chunk, kind, mb, pw_last_error());
        return -1;
    }
    p->buf = buf;
    w->n_pending++;
    return pw_eng_progress_sends(w);
}

int pw_eng_remote_recv(pw_worker *w, const char *kind, int dir, int c, int mb, pw_msgbuf **out)
{
    pw_engine *e = w->e;
    const pw_transport *t = e->t;
    pw_mail *mail = pw_eng_mail(e, w->lrep, dir, c, mb);
    const int src = dir == PW_DIR_F ? c - 1 : c + 1;
    if (!mail->posted) {
        pw_pool *pool = dir == PW_DIR_F ? pw_eng_act_pool(e, w->lrep, c - 1) : pw_eng_grad_pool(e, w->lrep, c);
        pw_msgbuf *b = NULL;
        if (pool->bytes) {
            /* The consumer alone holds a received buffer. */
            b = pw_eng_pool_get(pool, 1);
            if (!b && pw_eng_progress_sends(w) >= 0) b = pw_eng_pool_get(pool, 1);
            if (!b) {
                comm_fail(w, PW_ERR_INTERNAL, " (chunk %d), %s of micro-batch %d: no free receive buffer "
                          "(%d of link %d->%d)", c, kind, mb, pool->n, pool->link, pool->link + 1);
                return -1;
            }
        }
        pw_clear_error();
        pw_status st = t->vt->irecv(t->self, pw_eng_rank_of(e, src), pw_eng_tag(e, dir, c, mb),
                                    b ? b->data : NULL, pool->bytes, &mail->req);
        if (st != PW_OK) {
            pw_eng_buf_put(b);
            comm_fail(w, st, " (chunk %d), %s of micro-batch %d: %s", c, kind, mb, pw_last_error());
            return -1;
        }
        mail->buf = b;
        mail->posted = 1;
    }
    int rc = t->vt->test(t->self, &mail->req);
    if (rc < 0) {
        char from[64];
        pw_eng_name(e, w->replica, pw_eng_rank_of(e, src), from, sizeof from);
        comm_fail(w, PW_ERR_IO, " (chunk %d), %s of micro-batch %d from %s: %s", c, kind, mb, from,
                  pw_last_error());
        return -1;
    }
    if (rc == 0) return 0;
    mail->posted = 0;
    *out = mail->buf;
    mail->buf = NULL;
    return 1;
}

void pw_eng_poll_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    pw_worker *w = arg;
    if (!w->running) return;
    if (w->n_pending > 0 && pw_eng_progress_sends(w) < 0) return; /* the failure wakes us */
    if (w->wait_t0) pw_eng_drive(w);
}
