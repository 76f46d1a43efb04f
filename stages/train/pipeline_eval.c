/* pipewright — evaluating a pw_pipeline over a data set. */
#include "stages/train/pipeline-internal.h"

/* Forward-only over a data set, stage after stage, on replica 0. In one
 * process the stages run one after the other on this thread (the workers
 * are idle between steps); with a transport each process of replica 0 runs
 * its chunks and passes the activations to the next chunk's process with
 * blocking world messages (in chunk order, so a rank holding several chunks
 * takes its turn each time the chain comes back to it). */
pw_status pw_pipeline_evaluate(pw_pipeline *pl, const pw_dataset *d, pw_eval_stats *out)
{
    PW_CHECK(pl_ps_settle(pl)); /* --sync ps with staleness: the servers' newest parameters */
    const pw_graph *g = pl->g;
    const int S = pl->C; /* chunks, run in chunk order */
    const pw_transport *t = pl->t;
    PW_CHECK(pw_trainer_check_data(g, d));
    pw_transport_phase(t, PW_PHASE_EVAL, pl->step);
    void **link = calloc((size_t)S + 1, sizeof(void *));
    int64_t *idx = malloc((size_t)pl->micro * sizeof *idx);
    pw_status st = PW_OK;
    double loss = 0.0;
    int64_t correct = 0;
    const int run = !t || t->replica == 0; /* other replicas only hear the result */
    if (!link || !idx) {
        st = pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
        goto out;
    }
    /* link[s]: the activations from stage s to s+1 (bound to slot 0). */
    for (int s = 0; run && s + 1 < S; s++) {
        if (!stage_here(pl, s) && !stage_here(pl, s + 1)) continue;
        gstage *from = stage_here(pl, s) ? stage_at(pl, 0, s) : NULL;
        gstage *to = stage_here(pl, s + 1) ? stage_at(pl, 0, s + 1) : NULL;
        size_t n = from ? pl_gs_port_bytes(from, PW_PORT_ACT_OUT) : pl_gs_port_bytes(to, PW_PORT_ACT_IN);
        if (posix_memalign(&link[s], 64, n ? n : 64) != 0) {
            link[s] = NULL;
            st = pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
            goto out;
        }
        if (from) PW_CHECK_GOTO(pl_gs_bind(from, 0, PW_PORT_ACT_OUT, link[s]), st, out);
        if (to) PW_CHECK_GOTO(pl_gs_bind(to, 0, PW_PORT_ACT_IN, link[s]), st, out);
    }
    for (int64_t start = 0; run && start < d->n; start += pl->micro) {
        int64_t n = d->n - start < pl->micro ? d->n - start : pl->micro;
        for (int64_t i = 0; i < n; i++) idx[i] = start + i;
        for (int s = 0; s < S; s++) {
            if (!stage_here(pl, s)) continue;
            gstage *gs = stage_at(pl, 0, s);
            if (s > 0 && !stage_here(pl, s - 1))
                PW_CHECK_GOTO(t->vt->recv(t->self, world_of_chunk(pl, 0, s - 1), TAG_EVAL(t), link[s - 1],
                                          pl_gs_port_bytes(gs, PW_PORT_ACT_IN)), st, out);
            PW_CHECK_GOTO(pl_gs_run_forward(gs, d, idx, n, 0, 0, 0, 0), st, out);
            if (s + 1 < S && !stage_here(pl, s + 1))
                PW_CHECK_GOTO(t->vt->send(t->self, world_of_chunk(pl, 0, s + 1), TAG_EVAL(t), link[s],
                                          pl_gs_port_bytes(gs, PW_PORT_ACT_OUT)), st, out);
            if (gs->loss_piece >= 0) {
                loss += pw_program_loss_sum(gs->piece[gs->loss_piece], 0);
                correct += pw_program_correct(gs->piece[gs->loss_piece], 0);
            }
        }
        /* A tick per micro-batch: the processes waiting for this one
         * (replica 1 in its all-gather) see it is alive and go on waiting. */
        pw_transport_progress(t);
        if (start == 0) pw_transport_test_point(t, "eval", pl->step);
    }
    if (t && !run) pw_transport_test_point(t, "eval", pl->step);
    if (t) {
        /* Everyone learns replica 0's figures (a failed process sends has = 0). */
        loss_part lp = {.loss = loss, .correct = correct, .has = run && st == PW_OK &&
                        stage_here(pl, S - 1) ? 1 : 0};
        loss_part *all = calloc((size_t)t->world_size, sizeof *all);
        if (!all) {
            st = pw_error(PW_ERR_NOMEM, "evaluate: out of memory");
            goto out;
        }
        PW_CHECK_GOTO(t->vt->allgather(t->self, &lp, sizeof lp, all), st, out_all);
        const loss_part *last = &all[world_of_chunk(pl, 0, S - 1)];
        loss = last->loss;
        correct = last->correct;
    out_all:
        free(all);
        if (st != PW_OK) goto out;
    }
    {
        int64_t per_sample = g->label >= 0 ? pw_shape_numel(&g->values[g->label].shape) : 1;
        int64_t positions = d->n * (per_sample > 0 ? per_sample : 1);
        out->loss = positions ? loss / (double)positions : 0.0;
        out->accuracy = positions ? (double)correct / (double)positions : 0.0;
        out->samples = d->n;
    }
out:
    for (int s = 0; link && s + 1 < S; s++) {
        if (!link[s]) continue;
        if (stage_here(pl, s)) pl_gs_bind(stage_at(pl, 0, s), 0, PW_PORT_ACT_OUT, NULL);
        if (stage_here(pl, s + 1)) pl_gs_bind(stage_at(pl, 0, s + 1), 0, PW_PORT_ACT_IN, NULL);
        free(link[s]);
    }
    free(link);
    free(idx);
    return st;
}

/* Every program of replica 0 (this process's), stage by stage, pieces in
 * node order; returns the count. */
