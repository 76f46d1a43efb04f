/* pipewright — bubble accounting of a run trace: where each rank's time went,
 * step by step, what every idle gap waited on, and why the measured bubble
 * differs from the schedule's theory. pipe-trace prints what this computes;
 * docs/pipe-trace.md defines every figure.
 *
 *     pw_trace_analysis_config cfg = PW_TRACE_ANALYSIS_DEFAULTS;  // median step in detail
 *     pw_trace_analysis *a;
 *     if (pw_trace_analyze("run.json", &cfg, &a) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());   // "run.json:line 9: ..."
 *         return 1;
 *     }
 *     printf("bubble %.1f%% (theory %.1f%%): %s\n", 100 * a->bubble,
 *            100 * a->theory, a->explanation);
 *     for (int i = 0; i < a->n_causes; i++) { ... a->causes[i] ... }  // largest first
 *     pw_trace_analysis_destroy(a);
 *
 * How it reads. One streaming pass (trace_read.h) groups events by (rank,
 * step) and reduces each group as soon as its rank has moved two steps on,
 * so memory holds the open steps' events plus an 88-byte record per rank and
 * step (cfg->per_step keeps each one's full figures too). A second pass seeks back to the detail step (a pipe is spooled to a
 * temporary file) to keep its events for the Gantt chart, the gap list and
 * the critical path.
 *
 * Time model (per rank, per step). Each instant of the step's window — from
 * the first rank's step start to the last rank's step end — is, in priority
 * order: compute (F, B, W, optimizer, or another busy event in a generic
 * trace), waiting (inside a "wait ..." event), a communication action (SEND,
 * RECV, ALLREDUCE), or idle with no event. Busy = compute + communication
 * actions; idle = window − busy (waits included). The bubble is the share of
 * rank time that is not compute: 1 − compute / (ranks × window), so
 * communication actions count in it, as in the theory, which has none.
 *
 * Idle phases: warm-up is idle before the rank's first backward (B, else W)
 * of the step; cool-down is idle after its last forward (F) once that first
 * backward has started; steady-state is the rest. An ideal GPipe or 1F1B
 * step has no steady-state idle at all, so steady-state stalls are waste the
 * schedule did not plan.
 *
 * Bounds. Memory and work follow the trace's events, never a number read
 * from it: ranks are keyed by (pid, tid) in a hash, a metadata "ranks" count
 * adds at most 64 ranks more than the trace has events, and a rank's idle
 * in steps where it has no events is derived from its records, not from a
 * ranks x steps sweep. Sums of times that would pass 2^63 ns are an error.
 *
 * Errors: PW_ERR_PARSE / PW_ERR_IO from the reader ("FILE:line N: ..."),
 * PW_ERR_PARSE "FILE: the steps' times add up past 2^63 ns ..." for a
 * hostile trace whose sums overflow, PW_ERR_INVALID_ARG when
 * cfg->detail_step is not in the trace,
 * PW_ERR_NOMEM. What a trace lacks is not an error: the analysis says what
 * it could not compute in `notes` ("no pipewright metadata: ...").
 *
 * Ownership and threads: an analysis is a new object owned by the caller
 * (pw_trace_analysis_destroy); every string and array in it (names, causes,
 * steps, the detail) belongs to it and is valid until destroy. The reader of
 * pw_trace_analyze_reader is borrowed for the call. Analyses share nothing:
 * one per thread, several threads at once.
 */
#ifndef PW_RUNTIME_TRACE_ANALYSIS_H
#define PW_RUNTIME_TRACE_ANALYSIS_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/status.h"
#include "runtime/trace_read.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What a rank is doing at an instant. */
typedef enum pw_ta_class {
    PW_TA_F = 0,        /* forward */
    PW_TA_B,            /* backward (input gradient; the whole backward if W is not split) */
    PW_TA_W,            /* backward for weights */
    PW_TA_OPTIM,        /* optimizer */
    PW_TA_OTHER,        /* another busy event (generic traces) */
    PW_TA_COMM,         /* SEND_*, RECV_*, ALLREDUCE actions */
    PW_TA_WAIT,         /* parked in a wait event (idle) */
    PW_TA_IDLE,         /* no event (idle) */
    PW_TA_CLASS_COUNT
} pw_ta_class;
#define PW_TA_N_COMPUTE 5   /* classes F..OTHER are compute */

/* Idle phases (see the header comment). */
enum { PW_TA_WARMUP = 0, PW_TA_STEADY, PW_TA_COOLDOWN, PW_TA_N_PHASES };

/* Time of one rank (or a sum of ranks) over one or more steps, in ns. */
typedef struct pw_ta_times {
    int64_t window;                     /* step window time (all ranks' step) */
    int64_t busy[PW_TA_COMM + 1];       /* per class F .. COMM */
    int64_t compute;                    /* busy F .. OTHER */
    int64_t idle;                       /* window - busy = sum of idle_phase */
    int64_t idle_phase[PW_TA_N_PHASES]; /* warm-up, steady-state, cool-down */
    int64_t wait_comm;                  /* idle inside "wait RECV_*" events */
    int64_t wait_other;                 /* idle inside other wait events (data, ...) */
    int64_t exposed_allreduce;          /* idle inside all-reduce waits + ALLREDUCE actions */
    int64_t tp_allreduce;               /* inside tensor-parallel all-reduces (TP_ALLREDUCE
                                           events, cat "tp"): part of F, B and W's busy
                                           time, which they run inside, not added to it */
    int64_t n_actions[3];               /* F, B, W events */
} pw_ta_times;

/* One rank in one step. */
typedef struct pw_ta_rank_step {
    int present;            /* 0: the rank has no events in this step (all idle) */
    int64_t t0, t1;         /* the rank's own step span (trace clock, ns) */
    pw_ta_times t;
} pw_ta_rank_step;

typedef struct pw_ta_step {
    int64_t step;           /* args.step (0 when the trace has none) */
    int64_t t0, t1;         /* window: earliest rank start .. latest rank end */
    int last_rank;          /* the rank whose end closes the window */
    int analysed;           /* 0: left out by skip_steps */
    double bubble;          /* 1 - compute / (ranks x window) */
    pw_ta_rank_step *ranks; /* [n_ranks] with cfg->per_step, else NULL */
} pw_ta_step;

typedef struct pw_ta_rank {
    int64_t pid, tid;
    char label[64];         /* "rank 2", or a generic trace's thread name */
    pw_ta_times total;      /* summed over analysed steps */
    double bubble;          /* 1 - compute / window over analysed steps */
    double compute_per_mb_ns; /* (F+B+W) per micro-batch, mean; 0 unknown */
} pw_ta_rank;

/* Why a rank was idle. */
typedef enum pw_ta_cause_kind {
    PW_CAUSE_WAIT = 0,      /* inside a wait event: `what` ("wait RECV_F"), peer, stage, mb */
    PW_CAUSE_UNTRACKED,     /* between two actions with no wait event; `what` = the next action */
    PW_CAUSE_NOT_STARTED,   /* before the rank's first action of the step */
    PW_CAUSE_DONE,          /* after the rank's last action: the step ends with a slower rank */
    PW_CAUSE_ABSENT,        /* the rank has no events at all in the step */
} pw_ta_cause_kind;

/* Idle time of one rank aggregated by cause over the analysed steps. */
typedef struct pw_ta_cause {
    int rank;
    pw_ta_cause_kind kind;
    const char *what;       /* event name (owned by the analysis) */
    int peer, stage, mb;    /* -1 when unknown / not applicable */
    int64_t total_ns;
    int64_t phase_ns[PW_TA_N_PHASES];
    int64_t n_gaps;         /* maximal idle runs with this cause */
    int64_t max_ns;         /* the longest of them */
    int64_t max_step;       /* ... and its step */
} pw_ta_cause;

/* An event of the detail step. */
typedef struct pw_ta_event {
    int rank;
    pw_ta_class cls;        /* PW_TA_WAIT for wait events */
    const char *name;       /* owned by the analysis */
    int stage, mb, peer;    /* -1 unknown */
    int64_t t0, t1;         /* ns, trace clock */
    int64_t bytes;
} pw_ta_event;

/* The detail step's timeline of one rank: consecutive segments tiling the
 * window [detail.t0, detail.t1]. */
typedef struct pw_ta_segment {
    int64_t t0, t1;
    pw_ta_class cls;
    int event;              /* index in detail.events: the event that wins the
                             * instant (the wait event for PW_TA_WAIT); -1 idle */
    int phase;              /* idle phase, -1 when busy */
} pw_ta_segment;

/* An idle gap of the detail step (a maximal idle run with one cause). */
typedef struct pw_ta_gap {
    int rank;
    int64_t t0, t1;
    pw_ta_cause_kind kind;
    int event;              /* the wait event (WAIT) or the next action (UNTRACKED); -1 */
    int peer;               /* the rank waited on; for DONE the rank that ends the step */
    int phase;              /* phase at the gap's start */
} pw_ta_gap;

/* The critical path tiles the detail step's window with these. */
typedef enum pw_ta_path_kind {
    PW_PATH_ACTION = 0,     /* an event on `rank` */
    PW_PATH_HANDOFF,        /* message from `from_rank` (its SEND ended at t0) to `rank`
                             * (its wait ended at t1): latency + wake-up */
    PW_PATH_GAP,            /* untracked idle on `rank` between two path actions */
    PW_PATH_START,          /* window start .. the rank's first path action */
} pw_ta_path_kind;

typedef struct pw_ta_path_item {
    pw_ta_path_kind kind;
    int rank, from_rank;
    int event;              /* ACTION: index in detail.events; HANDOFF: the wait event */
    int64_t t0, t1;
} pw_ta_path_item;

typedef struct pw_ta_detail {
    int64_t step;           /* -1: no detail (empty trace, or not asked for) */
    int requested;          /* 1: cfg->detail_step; 0: the median-duration step */
    int64_t t0, t1;
    int n_events;
    pw_ta_event *events;    /* sorted by rank, then start */
    int *n_segments;        /* [n_ranks] */
    pw_ta_segment **segments; /* [n_ranks][n_segments[r]] */
    int n_gaps;
    pw_ta_gap *gaps;        /* by rank, then time */
    int n_path;
    pw_ta_path_item *path;  /* in time order */
    int64_t path_ns[4];     /* time per pw_ta_path_kind */
    int64_t path_compute_ns; /* of PW_PATH_ACTION: compute events only */
} pw_ta_detail;

/* A re-partition between steps (stages/train/rebalance.h): the trace's
 * "rebalance" events (one per worker), one entry per move. */
typedef struct pw_ta_move {
    int64_t step;           /* the move came after this step */
    int64_t t0, t1;         /* its span, the longest worker's (trace clock, ns) */
    int64_t bytes;          /* parameter and optimizer bytes: the most one process moved */
    int64_t step_ns_before; /* median step time from the previous move (or the start) to
                               this one, and from this one to the next (or the end); */
    int64_t step_ns_after;  /* 0 when no step is there */
} pw_ta_move;

typedef struct pw_trace_analysis {
    char *file;
    int has_meta;                 /* the trace has a pipewright block */
    pw_trace_info meta;           /* a copy (theory_bubble as read) */
    const char *theory_source;    /* "metadata", "formula", or "none" */

    int n_notes;
    char **notes;                 /* what could not be computed, and why */

    int64_t n_events;             /* events read */
    int64_t n_used;               /* complete (or paired B/E) events analysed */

    int n_ranks;
    pw_ta_rank *ranks;            /* sorted by (pid, tid) */
    int64_t n_steps;
    pw_ta_step *steps;            /* by step number */
    int64_t n_analysed;           /* steps counted in the totals */
    pw_ta_times total;            /* every rank, every analysed step */
    int64_t step_ns_median, step_ns_min, step_ns_max, step_ns_mean;
    int64_t median_step;          /* step number of the median-duration step; -1 none */
    int micro_batches;            /* from the metadata, else the most F per rank-step */

    double bubble;                /* measured over analysed steps; -1 no steps */
    double theory;                /* -1 unknown */
    double model_bubble;          /* first-order model from measured stage times; -1 none */
    double model_bubble_optim;    /* ... with the optimizer time added; -1 none */
    double points_imbalance, points_optimizer, points_overhead, points_comm_actions;
    double imbalance_ratio;       /* slowest / fastest compute per micro-batch; 0 unknown */
    int slow_rank, fast_rank;     /* -1 unknown */
    char explanation[1024];       /* measured vs theory, in words */

    int n_causes;
    pw_ta_cause *causes;          /* largest first */

    pw_ta_detail detail;
    int n_moves;
    pw_ta_move *moves;            /* re-partitions, by step */

    /* Gradient buckets summed across replicas: the ALLREDUCE events of
     * every step (skip_steps does not apply). */
    int64_t allreduce_n;          /* events with bytes */
    int64_t allreduce_bytes;      /* their buckets' fp32 bytes (args.bytes) */
    int64_t allreduce_wire_bytes; /* on the wire: args.wire_bytes where the run
                                     compressed (--compress), else args.bytes */
    int allreduce_compressed;     /* 1: some ALLREDUCE carried wire_bytes */

    /* Tensor parallelism's cross-rank sums inside F, B and W: the
     * TP_ALLREDUCE events of every step (skip_steps does not apply). */
    int64_t tp_allreduce_n;
    int64_t tp_allreduce_bytes;   /* their floats × 4 */
} pw_trace_analysis;

typedef struct pw_trace_analysis_config {
    int64_t detail_step;          /* step for the detail; -1: the median-duration step */
    int no_detail;                /* 1: skip the second pass */
    int skip_steps;               /* leave the first N steps (in trace order) out of totals */
    int per_step;                 /* 1: keep every (rank, step)'s figures in steps[].ranks
                                   * (about 0.3 KB each); 0: totals and per-step windows only.
                                   * Left out, with a note, when ranks x steps is more than
                                   * 16 times the (rank, step) pairs with events + 4096 (a
                                   * sparse trace would make it quadratic in its events) */
    /* Notes the caller puts in front of the analysis's own (copied): pipe-trace
     * says how it merged the per-process traces of one run (trace_merge.h). */
    const char *const *notes;
    int n_notes;
} pw_trace_analysis_config;

#define PW_TRACE_ANALYSIS_DEFAULTS                                                      \
    {.detail_step = -1, .no_detail = 0, .skip_steps = 0, .per_step = 0, \
     .notes = NULL, .n_notes = 0}

/* Analyses the trace at `path` ("-": stdin). *out is NULL on error. */
pw_status pw_trace_analyze(const char *path, const pw_trace_analysis_config *cfg,
                           pw_trace_analysis **out);
/* Same, reading from an open reader (positioned at the start). */
pw_status pw_trace_analyze_reader(pw_trace_reader *rd, const pw_trace_analysis_config *cfg,
                                  pw_trace_analysis **out);
void pw_trace_analysis_destroy(pw_trace_analysis *a); /* accepts NULL */

/* "F", "B", "W", "optimizer", "other", "comm", "wait", "idle". */
const char *pw_ta_class_name(pw_ta_class c);
/* "warm-up", "steady", "cool-down". */
const char *pw_ta_phase_name(int phase);
/* One line for a cause: "wait RECV_F mb 3 (stage 1) from rank 0",
 * "untracked gap before B", "done: the step ends with a slower rank", ...
 * Returns the length needed (as snprintf). */
int pw_ta_cause_format(const pw_ta_cause *c, char *buf, size_t n);
/* The same for a detail-step gap. */
int pw_ta_gap_format(const pw_trace_analysis *a, const pw_ta_gap *g, char *buf, size_t n);

#ifdef __cplusplus
}
#endif
#endif
