/* pipewright — the layout search: which stages x replicas x tensor degree x
 * threads x micro-batches x schedule x recomputation trains fastest within
 * memory (`pipeline-run --parallel auto`, docs/parallelism.md).
 *
 *     pw_layout_space sp = pw_layout_space_defaults();
 *     sp.batch = 256; sp.processes = 2; sp.cores = 2; sp.shared_team = 1;
 *     sp.n_nodes = g->n_nodes;
 *     pw_layout_forecast_config fc = pw_layout_forecast_defaults();
 *     fc.graph = g; fc.optim = PW_OPTIM_SGD;              // rates: measured here
 *     pw_layout_forecaster *f;
 *     PW_CHECK(pw_layout_forecaster_create(&fc, &f));
 *     pw_layout_model m = pw_layout_forecaster_model(f);
 *     pw_layout_result res;
 *     if (pw_layout_search(&sp, &m, 2ll << 30, &res) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error()); // e.g. the smallest memory that fits
 *         ...
 *     }
 *     pw_layout_print(stdout, &res, 5);                   // the choice and 5 runners-up
 *     // train: stages = res.best.stages, replicas = res.best.replicas, ...
 *     pw_layout_result_free(&res);
 *     pw_layout_forecaster_destroy(f);
 *
 * The axes (pw_layout):
 *   S  pipeline stages (ranks of one pipeline), each running v chunks;
 *   R  data-parallel replicas (whole pipelines, batch / R samples each);
 *   T  tensor-parallel degree: the ranks that split each stage's layers
 *      marked tp= (docs/parallelism.md, "Tensor parallelism"); searched
 *      over the divisors of `processes` up to max_tensor, which a caller
 *      sets above 1 only for a graph with tp marks (pw_graph_tp_marked):
 *      a graph without marks never gets T > 1;
 *   threads per rank (CPU ranks): the kernel team of each rank;
 *   M  micro-batches per replica (batch / (R x M) samples each);
 *   schedule (every built-in kind, interleaved at v = 2 and 4, zb-v at 2);
 *   recomputation off / on.
 *
 * The space (pw_layout_enumerate): S x R x T ranks at most `processes`, T
 * dividing `processes` (or pinned);
 * on CPUs ranks x threads at most `cores` (no core time-shared), and with a
 * shared team (ranks that are threads of one process, which share one CPU
 * team: pw_cpu_set_threads) several ranks run one thread each; R x M
 * divides the batch; S x v chunks at most the graph's nodes; M at most
 * max_micro_batches; a pinned axis (a field > 0) takes only that value.
 * With one stage every one-chunk schedule runs the same actions in nearly
 * the same order, so S = 1 enumerates 1f1b only.
 *
 * The search (pw_layout_search) returns exactly what costing every
 * candidate would: the fitting candidate of least predicted step (ties:
 * less memory, then the earlier candidate in enumeration order). It costs
 * candidates in ascending order of the model's lower bound on the step
 * (pw_layout_model.bound) and stops at the first whose bound exceeds the
 * best fitting step found; a candidate whose memory bound exceeds the
 * budget is never costed for time. Without a bound every candidate is
 * costed. The bounds must be true lower bounds: tests/test_layout.c checks
 * the search against the exhaustive optimum on hand-made cost tables, and
 * that a bound that overstates makes them differ.
 *
 * The model (pw_layout_model) is a cost function; the built-in one
 * (pw_layout_forecaster) is the forecast of stages/plan/forecast.h: FLOPs
 * at a compute rate per rank (measured here by pw_forecast_calibrate at
 * each thread count and micro-batch size, or given), the discrete-event
 * simulator for the schedule's step, links and all-reduce rings from the
 * placement on a topology, and memory from the partitioner's exact model
 * (graph/partition.h: the sizes pw_program allocates). At T > 1 all of it
 * is one tensor rank's: its rank graph (pw_graph_tp_rank, the last rank's,
 * whose parts are the largest) gives the FLOPs, the parameters (split ones
 * divided, the rest whole) and the activations, and the forecast adds
 * each split pair's all-reduces (one in F, one in B per micro-batch) as
 * rings over the stage's T ranks at their link class on the placement.
 *
 * Thread safety: none of these objects may be used by two threads at once;
 * the forecaster's measurements set the CPU team size (pw_cpu_set_threads)
 * while they run and restore it after.
 */
#ifndef PW_STAGES_LAYOUT_H
#define PW_STAGES_LAYOUT_H

#include <stdint.h>
#include <stdio.h>

#include "graph/graph.h"
#include "runtime/status.h"
#include "runtime/topology.h"
#include "scheduler/schedule.h"
#include "stages/ops/optim.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One candidate layout. Ranks = stages x replicas x tensor. */
typedef struct pw_layout {
    int stages;                  /* S */
    int replicas;                /* R */
    int tensor;                  /* T tensor-parallel ranks per stage */
    int threads;                 /* CPU kernel threads per rank (1 on GPUs) */
    int micro_batches;           /* M per replica */
    pw_schedule_kind schedule;
    int chunks_per_rank;         /* v: interleaved 2 or 4, zb-v 2, others 1 */
    int recompute;               /* 0 or 1 */
} pw_layout;

/* "S=2 R=1 T=1 threads=1 M=8 1f1b" (v and recompute when they apply). */
const char *pw_layout_describe(const pw_layout *l, char *buf, size_t n);

/* What the model predicts for one layout. */
typedef struct pw_layout_cost {
    double step_time;            /* s per optimizer step (the whole batch) */
    double bubble;               /* idle share of the step, 0..1 */
    double rate;                 /* FLOP/s per rank it was costed at; 0: unknown */
    double allreduce;            /* s per step in gradient all-reduce (0: one replica) */
    int64_t memory;              /* bytes: the largest rank's need */
    double tp_allreduce;         /* s per micro-batch in tensor-parallel all-reduces,
                                    F and B, the busiest stage (0 at T = 1) */
    int tp_link;                 /* T > 1 on a topology: its slowest hop's link class
                                    (pw_link_class, stages/plan/forecast.h); -1 unknown */
    int tp_in_rate;              /* T > 1: the sums are inside `rate` (measured as the
                                    group runs them), tp_allreduce 0 */
} pw_layout_cost;

/* A cost model. cost: PW_OK and *out, or an error (the candidate is then
 * left out of the search, and the search fails only when every candidate
 * failed). bound (optional): lower bounds on cost's step_time and memory
 * for the same layout, cheap; they must never exceed what cost returns. */
typedef struct pw_layout_model {
    pw_status (*cost)(void *ctx, const pw_layout *l, pw_layout_cost *out);
    void (*bound)(void *ctx, const pw_layout *l, double *step_lb, int64_t *memory_lb);
    void *ctx;
} pw_layout_model;

/* Which layouts to consider. */
typedef struct pw_layout_space {
    int64_t batch;               /* global batch, >= 1 */
    int processes;               /* most ranks (S x R x T), >= 1 */
    int cores;                   /* CPU ranks: cores for ranks x threads; 0: GPU
                                    ranks (threads 1) */
    int shared_team;             /* 1: the ranks are threads of one process that
                                    share one CPU team: with several ranks each runs
                                    1 thread */
    int n_nodes;                 /* the graph's nodes: S x v chunks at most this */
    int max_micro_batches;       /* 0: 64 */
    int max_tensor;              /* the largest T searched (divisors of processes);
                                    0 or 1: T = 1 only (a graph without tp marks) */
    /* Pinned axes: > 0 takes only that value (recompute: -1 searches both). */
    int stages, replicas, tensor, threads, micro_batches, chunks_per_rank;
    int schedule_pinned;         /* 1: only `schedule` */
    pw_schedule_kind schedule;
    int recompute;               /* -1 both, 0 off, 1 on */
} pw_layout_space;

/* Zeroed, recompute -1 (searched), max_micro_batches 64. */
pw_layout_space pw_layout_space_defaults(void);

/* Every candidate of the space, in enumeration order (S, R, T, threads,
 * M, schedule and v, recompute, each ascending). PW_OK: *out is a new
 * array (free()) of *n >= 1. PW_ERR_INVALID_ARG: a bad space or one that
 * is empty, saying why ("--batch 6 is not divisible by 4 replicas"). */
pw_status pw_layout_enumerate(const pw_layout_space *sp, pw_layout **out, int *n);

/* One candidate as the search saw it. */
typedef struct pw_layout_entry {
    pw_layout layout;
    int index;                   /* its place in enumeration order */
    pw_layout_cost cost;         /* valid when costed */
    double step_lb;              /* the model's bounds (0 without) */
    int64_t memory_lb;
    int costed;                  /* cost() ran and succeeded */
    int failed_cost;             /* cost() ran and failed (not applicable) */
    int fits;                    /* costed and memory <= budget (or no budget) */
} pw_layout_entry;

typedef struct pw_layout_result {
    pw_layout best;
    pw_layout_cost best_cost;
    int64_t budget;              /* bytes per rank; 0: none */
    pw_layout_entry *entries;    /* [n_entries]: every candidate; the costed ones
                                    first, fitting before not fitting, each by step
                                    (then memory, then enumeration order) */
    int n_entries;
    int n_costed;                /* cost() calls that succeeded */
    int n_failed;                /* cost() calls that failed */
    int n_skipped_time;          /* never costed: bound above the choice's step */
    int n_skipped_memory;        /* never costed: memory bound above the budget */
} pw_layout_result;

/* The search (above). PW_OK: res->best is the exhaustive optimum among the
 * candidates that fit `budget` bytes per rank (0: no limit). PW_ERR_NOMEM
 * when none fits: "no layout fits a memory budget of 1.0 MiB per rank; the
 * least any layout needs is 3.2 MiB per rank (S=2 R=1 ... recompute): give
 * --memory-budget 3.2M or more" — the least memory over every candidate,
 * found exactly (res is filled, best is that layout). PW_ERR_INVALID_ARG /
 * PW_ERR_UNSUPPORTED from pw_layout_enumerate; the last cost error when
 * every candidate failed. pw_layout_result_free in every case. */
pw_status pw_layout_search(const pw_layout_space *sp, const pw_layout_model *m, int64_t budget,
                           pw_layout_result *res);

/* The same answer by costing every candidate (the reference the tests and
 * benchmarks compare the search with). */
pw_status pw_layout_search_exhaustive(const pw_layout_space *sp, const pw_layout_model *m,
                                      int64_t budget, pw_layout_result *res);

void pw_layout_result_free(pw_layout_result *res); /* accepts a zeroed result */

/* For the report only: costs up to k more candidates that the search
 * skipped on time (those of least step bound whose memory bound fits),
 * so that the runners-up printed beside the choice are real predictions;
 * the choice does not change (their bounds already exceed its step).
 * Re-sorts res->entries and updates the counts. PW_OK (a failed cost only
 * counts as failed) or PW_ERR_NOMEM. */
pw_status pw_layout_cost_more(const pw_layout_model *m, pw_layout_result *res, int k);

/* Why candidate e lost to the choice, in a few words: "over the memory
 * budget (needs 3.1 GiB)", "T = 16 crosses a node: all-reduce 3.1 ms per
 * micro-batch", "tensor-parallel all-reduce 1.2 ms per micro-batch (the
 * choice: 0.4)", "bubble 20.1% (the choice: 4.0%)", "compute at 1.9e+10
 * FLOP/s per rank (the choice: 2.4e+10)", "all-reduce 3.1 ms per step",
 * or "more work per rank". */
const char *pw_layout_why_lost(const pw_layout_result *res, const pw_layout_entry *e, char *buf,
                               size_t n);

/* The choice, its predicted step, samples/s and memory (per rank when
 * rank_memory [n_ranks] is given, e.g. from pw_layout_forecaster_memory),
 * its tensor-parallel all-reduce, then up to `runners_up` costed
 * candidates after it with why each lost, and how many were never costed
 * and why. PW_ERR_IO. */
pw_status pw_layout_print(FILE *f, const pw_layout_result *res, int runners_up,
                          const int64_t *rank_memory, int n_ranks);

/* ---------------------------------------------------------- the built-in model */

typedef struct pw_layout_forecaster pw_layout_forecaster;

typedef struct pw_layout_forecast_config {
    const pw_graph *graph;       /* borrowed */
    int64_t batch;               /* global batch (the space's) */
    pw_optim_kind optim;         /* optimizer state and its update */
    int grad_groups;             /* the pipeline's (pw_grad_groups; 0: its default) */
    hwloc_topology_t topology;   /* (optional) place the ranks, cost links from it */
    double host_latency_s;       /* with a topology: links across hosts; < 0: default */
    double host_bandwidth;       /* likewise, bytes/s; < 0: default */
    double flops_per_s;          /* > 0: every rank computes at this rate (a machine
                                    we do not have); 0: measured here */
    /* (optional) the rate of one rank at `threads` threads and micro-batch
     * size `mbs`, instead of measuring; returns FLOP/s > 0 */
    double (*rate)(void *ctx, int threads, int64_t mbs);
    void *rate_ctx;
    FILE *log;                   /* (optional) one line per measurement */
    /* 1: the ranks are threads of this process (pipeline-run --parallel auto
     * without --processes, bench_layouts). With rates measured here (no
     * flops_per_s, no rate hook) the forecaster then also measures, each
     * once when first needed: the in-process links
     * (pw_forecast_calibrate_links), unless given below; a candidate's rate
     * with all its ranks computing at once (S x R > 1 at T = 1:
     * pw_forecast_calibrate_group over S x R whole-graph programs, for the
     * caches and memory bandwidth they share); and at T > 1 the rank
     * graph's rate as the in-process T group runs it, its tensor-parallel
     * sums inside (pw_forecast_config.tp_in_rate). */
    int in_process;
    /* In-process link figures (> 0: given; 0 with in_process: measured).
     * When known they cost every pipeline message (handoff_s, bandwidth
     * infinite: hand-offs do not copy) and the replicas' sum (a ring at
     * allreduce_latency_s and allreduce_bandwidth, bytes/s; 0: infinite)
     * instead of the topology's default figures. */
    double handoff_s;
    double allreduce_latency_s;
    double allreduce_bandwidth;
} pw_layout_forecast_config;

/* Zeroed, optimizer SGD, host figures -1 (defaults). */
pw_layout_forecast_config pw_layout_forecast_defaults(void);

/* PW_OK: *out is new. PW_ERR_INVALID_ARG: no graph or batch. */
pw_status pw_layout_forecaster_create(const pw_layout_forecast_config *c, pw_layout_forecaster **out);
void pw_layout_forecaster_destroy(pw_layout_forecaster *f); /* accepts NULL */

/* The model over f (valid while f lives). Its cost: pw_forecast_run of the
 * layout (S stages, R replicas, T tensor ranks over the rank graph, M
 * micro-batches of batch / (R x M), the schedule, recomputation) at the
 * rank's rate (measured on the whole graph: a rank's smaller GEMMs at T > 1
 * are taken to run at the same rate); a T the graph cannot split into
 * (no tp marks, fewer heads than T) fails as not applicable; memory: the partitioner's
 * model (pw_partition_evaluate) of the forecast's cuts with the schedule's
 * in-flight counts, summed over each rank's chunks. Its bounds: every
 * rank's compute (F, B, W, recomputation's extra F, the optimizer) at the
 * same rate divided evenly, or the largest chunk's, whichever is more; and
 * the parameters, gradients and optimizer state divided evenly. The rate
 * of (threads, micro-batch size) is measured once (pw_forecast_calibrate at
 * that team size) and cached. */
pw_layout_model pw_layout_forecaster_model(pw_layout_forecaster *f);

/* Per-rank memory of a layout (what the model's cost took the largest
 * of): mem[r] for r < min(n, S), bytes. PW_OK or the forecast's error. */
pw_status pw_layout_forecaster_memory(pw_layout_forecaster *f, const pw_layout *l, int64_t *mem, int n);

/* Measurements taken so far (rate entries); for the printout. */
int pw_layout_forecaster_measurements(const pw_layout_forecaster *f, double *seconds);

/* After a search with rates measured here: times the first and the last
 * rate measured again (the two furthest apart in time). When either now
 * differs from its first measurement by more than `tolerance` (0.25: a
 * quarter; the machine changed speed while the planner measured), every
 * measurement is dropped, to be taken again by the next search, and 1 is
 * returned (search again); else 0. Nothing measured here (a rate hook,
 * flops_per_s), or a failed re-measurement: 0. One line to the log. */
int pw_layout_forecaster_recheck(pw_layout_forecaster *f, double tolerance);

#ifdef __cplusplus
}
#endif
#endif
