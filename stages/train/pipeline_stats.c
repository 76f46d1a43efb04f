/* pipewright — a pipeline's figures across the processes of a run
 * (stages/train/pipeline.h): what each process measured, gathered. */
#include <stdlib.h>
#include <string.h>

#include "stages/train/pipeline-internal.h"

pw_status pw_pipeline_planned_bytes(pw_pipeline *pl, double *bytes)
{
    double planned = 0;
    for (int c = 0; c < pl->C; c++) {
        pw_pipeline_stage_stats ss;
        pw_pipeline_stage_stats_get(pl, c, &ss);
        planned += (double)ss.memory;
    }
    if (!pl->t) {
        *bytes = planned * pl->NR;
        return PW_OK;
    }
    /* The sum over every process (world order). */
    double *all = calloc((size_t)pl->t->world_size, sizeof *all), sum = 0;
    if (!all) return pw_error(PW_ERR_NOMEM, "out of memory");
    pw_status st = pw_transport_allgather(pl->t, &planned, sizeof planned, all);
    for (int w = 0; st == PW_OK && w < pl->t->world_size; w++) sum += all[w];
    free(all);
    *bytes = st == PW_OK ? sum : planned;
    return st;
}

pw_status pw_pipeline_gather_process_stats(pw_pipeline *pl, pw_pipeline_process_stats *all)
{
    if (!pl->t) return pw_error(PW_ERR_INVALID_ARG, "pipeline: process figures need a transport (a multi-process run)");
    /* The rank's figures from its first chunk; slots summed over its chunks
     * (interleaved and zb-v place several on each rank). */
    pw_pipeline_stage_stats first = {0};
    int found = 0, peak = 0, slots = 0;
    for (int c = 0; c < pl->C; c++) {
        if (pw_schedule_rank_of(pl->sched, c) != pl->t->rank) continue;
        pw_pipeline_stage_stats cs;
        pw_pipeline_stage_stats_get(pl, c, &cs);
        if (!found++) first = cs;
        peak += cs.peak_slots;
        slots += cs.slots;
    }
    pw_engine_rank_stats rs;
    pw_engine_rank_stats_get(pl->engine, pl->t->replica * pl->S + pl->t->rank, &rs);
    pw_pipeline_process_stats mine;
    memset(&mine, 0, sizeof mine); /* the padding too: the bytes travel */
    mine.busy_s = first.busy_s;
    mine.total_s = first.total_s;
    mine.allreduce_s = rs.allreduce_s;
    mine.allreduce_wait_s = rs.allreduce_wait_s;
    mine.replica = pl->t->replica;
    mine.stage = pl->t->rank;
    mine.peak_slots = peak;
    mine.slots = slots;
    mine.node_begin = first.node_begin;
    mine.node_end = first.node_end;
    return pw_transport_allgather(pl->t, &mine, sizeof mine, all);
}
