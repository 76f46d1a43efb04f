/* pipewright — partitioning a graph into contiguous pipeline stages.
 *
 * A partition cuts the graph's nodes (in topological order) into n_stages
 * contiguous ranges: stage s runs nodes [begin[s], begin[s+1]). The planner
 * chooses the cuts that minimise the bottleneck stage's time per micro-batch
 * under a cost model, refuses plans that do not fit the devices' memory, and
 * predicts each stage's time, memory and traffic (docs/partition.md):
 *
 *     pw_partition_config pc = {
 *         .n_stages = 4, .method = PW_PARTITION_AUTO, .balance = PW_BALANCE_FLOPS,
 *         .micro_batch_size = 16, .micro_batches = 8,
 *         .inflight = peaks,              // [4] the schedule's peak in-flight
 *         .memory_budget = 2ll << 30,     // per stage
 *         .link_bandwidth = 10e9, .link_latency = 5e-6,
 *         .optim_state_floats = 1,        // pw_optim_state_floats(SGD)
 *         .optim_flops = PW_OPTIM_FLOPS_SGD,
 *     };
 *     pw_partition pt;
 *     if (pw_partition_plan(g, &pc, &pt) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());  // e.g. which stage does not fit
 *         return 1;
 *     }
 *     for (int s = 0; s < pt.n_stages; s++)
 *         printf("stage %d: nodes [%d, %d) %.3f ms\n", s, pt.begin[s], pt.begin[s + 1],
 *                1e3 * pt.stage[s].time);
 *     pw_partition_free(&pt);
 *
 * This module sees only the graph: the schedule enters as numbers (the peak
 * in-flight count of each stage), measured op times as an array (a
 * pw_profile's `times`, stages/plan/profile.h). stages/plan/plan.h wires both from a
 * schedule kind and a profile and prints the plan; most callers want that.
 *
 * The cost model, per stage s = nodes [i, j) on device s, per micro-batch:
 *   compute  F, B, W = the nodes' forward / backward-input / backward-weight
 *            times (balance TIME: node_times; balance FLOPS: the nodes'
 *            FLOPs × micro_batch_size / flops_per_s, and no input-gradient
 *            work for a node whose inputs carry no gradient), each divided by
 *            the device's speed; recompute adds F to B.
 *   comm     latency + bytes / bandwidth for each message the stage sends:
 *            its activations to stage s+1 and its input gradients to s−1. A
 *            value crossing a cut travels in the message of every link it
 *            crosses (a skip connection from stage 0 to 3 is counted on the
 *            links 0→1, 1→2 and 2→3), as the stage programs send it.
 *   optim    O, once per step: the optimizer update of every parameter the
 *            stage holds (a tied parameter in each stage that uses it), on
 *            its device: balance TIME distributes each node's measured `o`
 *            over the parameters it introduces by element count; balance
 *            FLOPS takes elements × optim_flops / flops_per_s.
 *   time     F + B + W + comm + O / M, the stage's period per micro-batch
 *            in the steady state (the update spread over the step's M
 *            micro-batches); the bottleneck is the largest.
 *   memory   parameters + gradients + optimizer state (optim_state_floats
 *            per element) of every parameter the stage uses, + the activation
 *            stash (one micro-batch's values, gradients and saved statistics)
 *            × the stage's in-flight count, + kernel workspace, + the message
 *            buffers of what it sends (min(inflight[s] + inflight[s±1], M)
 *            each). With recompute a stash keeps only the stage inputs, what
 *            it sends on and the boundary gradients, and one shared copy
 *            holds the rest. These are the sizes pw_program and the engine
 *            plan, to the 64-byte alignment of each buffer.
 * The optimum is exact: a dynamic program over (stage, end node) minimises
 * the bottleneck, then a second pass, among the splits that reach it,
 * minimises the sum of stage times (less traffic, faster devices busier).
 * The program visits only the states that can lie on a split no worse than
 * a bound (prefix-sum lower bounds on each stage's time and memory, greedy
 * windows, a bound tightened from below), which changes no result: about
 * linear in the node count on chains (2^20 nodes into 64 stages in under a
 * second), O(n_stages × n_nodes²) in the worst case (docs/partition.md,
 * "How it scales").
 *
 * Ownership and threads: a pw_partition is the caller's struct; its arrays
 * are allocated by plan/make and freed by pw_partition_free. The graph and
 * the config are only read (borrowed for the call). Calls share nothing:
 * any thread may plan, also several at once on one graph.
 */
#ifndef PW_GRAPH_PARTITION_H
#define PW_GRAPH_PARTITION_H

#include <stdint.h>

#include "graph/graph.h"
#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum pw_partition_method {
    PW_PARTITION_AUTO = 0,  /* the graph's `cut` markers when they make exactly
                               n_stages stages, else BALANCED */
    PW_PARTITION_CUTS,      /* the `cut` markers; an error when they make a
                               different number of stages. Checked: memory
                               (refused like any plan) and the bottleneck
                               against the best split (pw_partition.note) */
    PW_PARTITION_FLOPS,     /* BALANCED with balance = FLOPS (the older name) */
    PW_PARTITION_BALANCED,  /* the planner's optimum under cfg->balance */
} pw_partition_method;

/* What BALANCED minimises per stage. */
typedef enum pw_balance {
    PW_BALANCE_FLOPS = 0,   /* analytic: FLOPs at flops_per_s */
    PW_BALANCE_TIME,        /* measured: node_times (stages/plan/profile.h) */
} pw_balance;

/* Seconds of one node for one micro-batch on a speed-1 device. */
typedef struct pw_op_time {
    double f;               /* forward */
    double b;               /* backward for the input (0 when none flows) */
    double w;               /* backward for the weights */
    double o;               /* the optimizer update of the parameters this node
                               introduces, once per step (not per micro-batch);
                               0 without parameters, and a tied parameter's
                               later uses add nothing */
} pw_op_time;

/* FLOPs of one optimizer update per parameter element, counted from the
 * update loops of stages/ops/optim.c (a square root or a division counts one):
 * SGD with momentum g+wd·p, μ·buf+g, p−lr·buf = 6; AdamW decay, both moments,
 * the bias-corrected step = 14. What pw_partition_config.optim_flops takes
 * for the analytic (FLOPS) model. */
#define PW_OPTIM_FLOPS_SGD 6.0
#define PW_OPTIM_FLOPS_ADAMW 14.0

/* The device that runs one stage. */
typedef struct pw_device_spec {
    double speed;           /* relative speed: the stage's compute times are
                               divided by it; 0 means 1 */
    int64_t memory;         /* bytes this stage may use; 0: the config's
                               memory_budget */
    const char *name;       /* (optional) for messages; "device S" otherwise */
} pw_device_spec;

typedef struct pw_partition_config {
    int n_stages;                   /* >= 1, <= the graph's nodes */
    pw_partition_method method;
    pw_balance balance;
    int64_t micro_batch_size;       /* samples per micro-batch; 0 means 1 */
    int micro_batches;              /* M, for message buffers and the step
                                       estimate; 0 means 1 */
    const pw_op_time *node_times;   /* [n_nodes]; required by balance TIME */
    double flops_per_s;             /* FLOP/s of a speed-1 device for FLOPS
                                       times; 0 means 1e10 */
    const int *inflight;            /* (optional) [n_stages] activation slots
                                       stage s holds: the schedule's peak
                                       in-flight count; NULL: 1 each */
    const pw_device_spec *devices;  /* (optional) [n_stages]: stage s runs on
                                       devices[s]; NULL: speed 1, memory_budget */
    int64_t memory_budget;          /* bytes per stage where no device says;
                                       0: unlimited */
    double link_bandwidth;          /* bytes/s of a stage-to-stage link; 0: infinite */
    double link_latency;            /* s per message */
    int optim_state_floats;         /* floats of optimizer state per parameter
                                       element (pw_optim_state_floats) */
    double optim_flops;             /* FLOPs per parameter element of one
                                       optimizer update for balance FLOPS
                                       (PW_OPTIM_FLOPS_SGD / _ADAMW); 0: the
                                       analytic model leaves the optimizer out.
                                       Balance TIME takes node_times[i].o */
    int recompute;                  /* 1: stash only stage inputs, recompute the
                                       forward before each backward */
    int grad_sum_copies;            /* more copies of its gradients a stage holds (the
                                       pending group sums of stages/program/program.h:
                                       log2 of its gradient groups) */
} pw_partition_config;

/* Bytes one stage holds (what pw_program_memory and the engine's message
 * pools will allocate for it). */
typedef struct pw_stage_memory {
    int64_t params, grads, optim_state; /* grads: with the group sums' copies */
    int64_t stash;          /* what one in-flight micro-batch keeps: its
                               values, gradients and statistics (with
                               recompute: the stage's inputs, what it sends on
                               and the boundary gradients) */
    int64_t activations;    /* stash × slots */
    int64_t shared;         /* one copy for every slot: kernel workspace, and
                               with recompute the rebuilt activations, their
                               gradients and the statistics */
    int64_t buffers;        /* message buffers for what the stage sends */
    int64_t total;
    int64_t budget;         /* 0: unlimited */
    int slots;              /* in-flight micro-batches it stashes */
} pw_stage_memory;

/* Predictions for one stage, per micro-batch. */
typedef struct pw_stage_cost {
    double f, b, w;         /* s on the stage's device (recompute: b includes f) */
    double comm;            /* s sending its activations and input gradients */
    double optim;           /* s per STEP: the optimizer update of every
                               parameter the stage holds, on its device */
    double time;            /* f + b + w + comm + optim / M */
    double flops;           /* fwd + bwd FLOPs (per micro-batch) */
    int64_t send_act_bytes; /* message to stage s+1 (0 for the last stage) */
    int64_t send_grad_bytes;/* message to stage s−1 (0 for the first stage) */
    pw_stage_memory mem;
} pw_stage_cost;

typedef struct pw_partition {
    int n_stages;
    int *begin;             /* [n_stages + 1]: stage s runs nodes [begin[s], begin[s+1]) */
    double *flops;          /* [n_stages]: per-sample fwd + bwd FLOPs of each stage */
    pw_partition_method method; /* the method actually used (never AUTO) */
    /* Predictions (both pw_partition_plan and pw_partition_make fill them). */
    pw_balance balance;
    pw_stage_cost *stage;   /* [n_stages] */
    double bottleneck;      /* s: the largest stage time */
    int bottleneck_stage;
    double best_bottleneck; /* s: the planner's optimum under the same model;
                               equals bottleneck unless the cuts were given
                               (-1 when no split fits) */
    /* Estimate for GPipe / 1F1B: step = Σ stage time + (M−1) × bottleneck,
     * bubble = 1 − Σ (compute × M + optim) / (S × step). stages/plan/plan.h replaces both
     * with the simulator's figures for the actual schedule. */
    double step_time, bubble;
    char note[256];         /* "" or, for cut markers, how they compare */
} pw_partition;

/* The planner. PW_OK: *out holds the partition and its predictions (free
 * with pw_partition_free). Errors (*out zeroed):
 *   PW_ERR_INVALID_ARG  n_stages < 1 or above the node count ("has only 11
 *                       nodes"); CUTS whose markers make another count;
 *                       balance TIME without node_times; a negative or
 *                       non-finite speed, time, bandwidth or budget.
 *   PW_ERR_NOMEM        no split fits: "partition: stage 1 (nodes 4-6: fc2 ..
 *                       h2) needs 1.5 MiB (params ..., activations 4 x ...,
 *                       buffers ...) but device 1 has 1.0 MiB", from the
 *                       split that comes closest, followed by what would help
 *                       (recomputation, fewer micro-batches in flight — each
 *                       said whether it alone fits — or more stages). Cut
 *                       markers that do not fit are refused likewise. */
pw_status pw_partition_plan(const pw_graph *g, const pw_partition_config *cfg, pw_partition *out);

/* Predictions for given cuts (begin[0] = 0 < begin[1] < ... < begin[S] =
 * n_nodes, S = cfg->n_stages; cfg->method is ignored). Does not check
 * memory: compare stage[s].mem.total with mem.budget. best_bottleneck = -1.
 * PW_ERR_INVALID_ARG for bad cuts or config. */
pw_status pw_partition_evaluate(const pw_graph *g, const pw_partition_config *cfg,
                                const int *begin, pw_partition *out);

/* The older entry point: pw_partition_plan with FLOPS balance, one sample
 * per micro-batch, no memory budget, free links and no optimizer time. */
pw_status pw_partition_make(const pw_graph *g, int n_stages, pw_partition_method method,
                            pw_partition *out);
void pw_partition_free(pw_partition *p); /* accepts NULL and a zeroed struct */

/* "auto" / "cuts" / "balanced" / "flops". */
pw_status pw_partition_method_parse(const char *s, pw_partition_method *out);
const char *pw_partition_method_name(pw_partition_method m);
/* "flops" / "time". */
pw_status pw_balance_parse(const char *s, pw_balance *out);
const char *pw_balance_name(pw_balance b);

/* "1.5 MiB" style (B, KiB, MiB, GiB, TiB) into buf; returns buf. */
const char *pw_format_bytes(double bytes, char *buf, size_t n);

#ifdef __cplusplus
}
#endif
#endif
