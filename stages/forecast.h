/* pipewright — forecasts: a graph's pipeline run simulated, not executed.
 *
 * Partitions the graph into the schedule's stage chunks, costs each chunk
 * from the graph's cost model (FLOPs at a compute rate; messages at a link
 * bandwidth and latency; all-reduce of its gradients across replicas), and
 * runs the discrete-event simulator (scheduler/simulate.h). Nothing here
 * needs the machine it describes: `--stages 64 --replicas 8` plans on a
 * laptop.
 *
 *     pw_forecast_config fc = pw_forecast_defaults();
 *     fc.graph = g; fc.stages = 8; fc.micro_batches = 32; fc.micro_batch_size = 4;
 *     fc.schedule = PW_SCHEDULE_ZB_V;
 *     pw_forecast f;
 *     PW_CHECK(pw_forecast_run(&fc, &f));
 *     printf("step %.3f s, bubble %.1f%%\n", f.step_time, 100 * f.bubble);
 *     pw_forecast_free(&f);
 *
 * pw_forecast_auto tries every schedule kind (and v) that applies, keeps
 * those whose peak memory fits the budget, and picks the fastest.
 */
#ifndef PW_STAGES_FORECAST_H
#define PW_STAGES_FORECAST_H

#include <stdint.h>
#include <stdio.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "runtime/trace.h"
#include "scheduler/schedule.h"
#include "scheduler/simulate.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_forecast_config {
    const pw_graph *graph;
    int stages;                 /* pipeline ranks */
    int replicas;               /* data-parallel copies (all-reduce cost), >= 1 */
    int micro_batches;
    int64_t micro_batch_size;   /* samples */
    pw_schedule_kind schedule;
    int chunks_per_rank;        /* v for interleaved (0 = 2); ZB-V uses 2 */
    int split_w;                /* GPipe/1F1B only */
    double flops_per_s;         /* compute rate of one rank */
    double link_latency_s;      /* per message */
    double link_bandwidth;      /* bytes/s between neighbouring ranks */
    double allreduce_bandwidth; /* bytes/s of the replica all-reduce ring */
    int optim_state_floats;     /* 1 SGD, 2 AdamW */
    int64_t memory_budget;      /* bytes per rank; 0 = unlimited */
    pw_trace *trace;            /* (optional) record the simulated step */
} pw_forecast_config;

pw_forecast_config pw_forecast_defaults(void);

typedef struct pw_forecast {
    pw_schedule_kind schedule;
    int chunks_per_rank;
    double step_time;           /* s */
    double bubble;              /* idle fraction of the step */
    double steady_bubble;       /* when consecutive steps overlap */
    double samples_per_s;
    int n_ranks;
    int64_t *peak_memory;       /* [n_ranks] bytes: params + grads + optimizer state
                                   + peak activation stash */
    int *peak_inflight;         /* [n_ranks] micro-batches (validator) */
    int fits;                   /* every rank within the memory budget */
} pw_forecast;

pw_status pw_forecast_run(const pw_forecast_config *cfg, pw_forecast *out);
void pw_forecast_free(pw_forecast *f);

/* Simulates every applicable schedule; *best gets the fastest that fits
 * (PW_ERR_NOMEM naming the smallest need when none fits). `report`
 * (optional) receives one line per candidate and the reason for the choice. */
pw_status pw_forecast_auto(const pw_forecast_config *cfg, pw_forecast *best, FILE *report);

/* Writes the simulated trace's metadata and events (cfg->trace must have
 * been set for the run). */
pw_status pw_forecast_write_trace(const pw_forecast_config *cfg, const pw_forecast *f,
                                  const char *path);

#ifdef __cplusplus
}
#endif
#endif
