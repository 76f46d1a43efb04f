/* pipeline-run --parallel auto: the flags mapped onto the layout search
 * (stages/plan/layout.h), the machine described, the choice printed with
 * its runners-up (docs/parallelism.md). pipeline-run then trains with the
 * chosen layout, or, with --plan, stops there. */
#ifndef PW_TOOLS_PARALLEL_H
#define PW_TOOLS_PARALLEL_H

#include <stdint.h>

#include "graph/graph.h"
#include "stages/plan/layout.h"

typedef struct pr_parallel_request {
    const pw_graph *graph;
    const char *graph_path;      /* for the command line it prints */
    int64_t batch;
    int processes;               /* --processes P; 0: the machine's slots */
    const char *topology;        /* --topology (NULL: this machine) */
    const char *memory_budget;   /* --memory-budget (one value), NULL */
    double flops_per_s;          /* --flops-per-s, 0 */
    pw_optim_kind optim;
    int grad_groups;
    pw_layout_space pins;        /* the axes the command line fixed (stages, replicas,
                                    threads, micro_batches, schedule, chunks_per_rank,
                                    recompute); batch, processes and cores are set here */
    int quiet;
} pr_parallel_request;

/* Searches, prints (unless quiet: then only errors) and returns 0 with
 * *chosen, or the exit status after one line on stderr: 1 when no layout
 * fits or planning fails, 2 for a malformed --memory-budget. */
int pr_parallel_auto(const pr_parallel_request *rq, pw_layout *chosen);

#endif
