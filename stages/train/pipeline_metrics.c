/* pipewright — a pipeline's metrics log (stages/train/pipeline_metrics.h):
 * what a step's line says, measured from the engine's per-rank counters. */
#include "stages/train/pipeline_metrics.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/metrics_log.h"
#include "stages/train/pipeline-internal.h"

struct pw_pipeline_metrics {
    pw_metrics_log *log;       /* on the writing process (world rank 0); else NULL */
    const pw_transport *t;
    int S;                     /* pipeline stages: the entries of stage_busy_ms */
    double *busy;              /* (S) each stage's busy seconds so far (under a transport:
                                  this process's own stage's entry only) */
    double *stage_ms;          /* (S) the last step's busy ms per stage */
    double *gathered;          /* under a transport: (world, 2) each process's busy ms and bubble */
};

pw_status pw_pipeline_metrics_open(const char *path, int stages, const pw_transport *t, pw_pipeline_metrics **out)
{
    *out = NULL;
    if (!path || stages < 1) return pw_error(PW_ERR_INVALID_ARG, "metrics: a path and a stage count >= 1 are needed");
    pw_pipeline_metrics *m = calloc(1, sizeof *m);
    if (m) {
        m->t = t;
        m->S = stages;
        m->busy = calloc((size_t)stages, sizeof *m->busy);
        m->stage_ms = calloc((size_t)stages, sizeof *m->stage_ms);
        if (t) m->gathered = calloc(2 * (size_t)t->world_size, sizeof *m->gathered);
    }
    if (!m || !m->busy || !m->stage_ms || (t && !m->gathered)) {
        pw_pipeline_metrics_close(m);
        return pw_error(PW_ERR_NOMEM, "out of memory");
    }
    if (!t || t->world_rank == 0) {
        pw_status st = pw_metrics_log_open(path, stages, &m->log);
        if (st != PW_OK) {
            pw_pipeline_metrics_close(m);
            return st;
        }
    }
    *out = m;
    return PW_OK;
}

void pw_pipeline_metrics_close(pw_pipeline_metrics *m)
{
    if (!m) return;
    pw_metrics_log_close(m->log);
    free(m->busy);
    free(m->stage_ms);
    free(m->gathered);
    free(m);
}

/* The engine worker of stage r here (replica 0 in one process, this
 * process's own under a transport): busy seconds since the pipeline started. */
static double stage_busy_s(const pw_pipeline_metrics *m, pw_pipeline *pl, int r)
{
    pw_engine_rank_stats rs;
    pw_engine_rank_stats_get(pw_pipeline_engine(pl), m->t ? m->t->replica * m->S + m->t->rank : r, &rs);
    return rs.busy_s;
}

void pw_pipeline_metrics_start(pw_pipeline_metrics *m, pw_pipeline *pl)
{
    if (!m) return;
    for (int r = 0; r < m->S; r++)
        if (!m->t || r == m->t->rank) m->busy[r] = stage_busy_s(m, pl, r);
}

/* After a step: each stage's busy time in it and the step's bubble, which
 * under a transport every process contributes to (an all-gather). */
static pw_status measure(pw_pipeline_metrics *m, pw_pipeline *pl, double *bubble)
{
    *bubble = pw_pipeline_last_bubble(pl);
    if (!m->t) {
        for (int r = 0; r < m->S; r++) {
            double now = stage_busy_s(m, pl, r);
            m->stage_ms[r] = 1e3 * (now - m->busy[r]);
            m->busy[r] = now;
        }
        return PW_OK;
    }
    const int me = m->t->rank;
    double now = stage_busy_s(m, pl, me), mine[2] = {1e3 * (now - m->busy[me]), *bubble};
    m->busy[me] = now;
    PW_CHECK(pw_transport_allgather(m->t, mine, sizeof mine, m->gathered));
    /* Replica 0's stages; the bubble of every worker (their step walls agree). */
    for (int r = 0; r < m->S; r++) m->stage_ms[r] = m->gathered[2 * pw_transport_world_of(m->t, 0, r)];
    double sum = 0;
    for (int w = 0; w < m->t->world_size; w++) sum += m->gathered[2 * w + 1];
    *bubble = sum / m->t->world_size;
    return PW_OK;
}

pw_status pw_pipeline_metrics_step(pw_pipeline_metrics *m, pw_pipeline *pl, const pw_step_stats *s, double step_s,
                                   double elapsed_s)
{
    if (!m) return PW_OK;
    double bubble;
    PW_CHECK(measure(m, pl, &bubble));
    if (!m->log) return PW_OK;
    const pw_pipeline_config *c = &pl->cfg;
    /* Tokens per sample for token data (i32 inputs), else none. */
    const int64_t T = c->train && c->train->x_dtype == PW_I32 ? c->train->sample_numel : 0;
    pw_metrics_step_rec r = {
        .step = s->step, .epoch = s->epoch + 1, .loss = s->loss,
        .lr = pw_optim_lr_at(&c->optim, s->step),
        .grad_norm = c->clip_grad_norm > 0 ? pw_pipeline_grad_norm(pl) : NAN, /* measured only when clipping */
        .samples_per_s = (double)c->batch / step_s,
        .tokens_per_s = T > 0 ? (double)(c->batch * T) / step_s : 0,
        .step_ms = 1e3 * step_s, .bubble_pct = 100.0 * bubble,
        .stage_busy_ms = m->stage_ms, .n_stages = m->S, .elapsed_s = elapsed_s,
    };
    return pw_metrics_log_step(m->log, &r);
}

pw_status pw_pipeline_metrics_eval(pw_pipeline_metrics *m, const pw_step_stats *s, const pw_eval_stats *ev,
                                   double unigram_entropy, double eval_s, double elapsed_s)
{
    if (!m || !m->log) return PW_OK;
    pw_metrics_eval_rec r = {
        .step = s->step, .epoch = s->epoch + 1, .loss = ev->loss, .accuracy = ev->accuracy,
        .unigram_entropy = unigram_entropy, .samples = ev->samples, .eval_ms = 1e3 * eval_s,
        .elapsed_s = elapsed_s,
    };
    return pw_metrics_log_eval(m->log, &r);
}

pw_metrics_log *pw_pipeline_metrics_log(pw_pipeline_metrics *m)
{
    return m ? m->log : NULL;
}
