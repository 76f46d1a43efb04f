/* pipewright — the schedule simulator: predicts one training step of any
 * lowered schedule (generated or loaded from CSV) from a cost model, without
 * running it, and can write the run's trace as the engine would.
 *
 *     pw_sim_chunk_cost cost[C];                  // per chunk: seconds, bytes
 *     for (int c = 0; c < C; c++)
 *         cost[c] = (pw_sim_chunk_cost){ .f = 1e-3, .b = 1e-3, .w = 1e-3,
 *                                        .msg_bytes = 4 << 20, .act_bytes = 64 << 20 };
 *     pw_sim_config sc = { .chunks = cost, .link_latency = 5e-6, .link_bandwidth = 25e9 };
 *     pw_sim_result *res = NULL;
 *     if (pw_simulate(sched, &sc, &res) != PW_OK) {   // lowered, validated
 *         fprintf(stderr, "%s\n", pw_last_error());
 *         return 1;
 *     }
 *     printf("step %.2f ms, bubble %.1f%%, rank 0 holds %lld activation bytes\n",
 *            1e3 * res->step_time, 100 * res->bubble,
 *            (long long)res->ranks[0].peak_act_bytes);
 *     pw_sim_result_destroy(res);
 *
 * Model. Each rank runs its actions in order on one compute stream, as the
 * engine does. F, B, W and OPTIM take the chunk's time from the cost model
 * (an unsplit B runs the whole backward: b + w). A send takes no time on the
 * sender; its message travels on the directed link between the two ranks,
 * which carries one message at a time in send order: it leaves when the link
 * is free, occupies it for bytes / bandwidth, and arrives link_latency
 * later. A receive waits until its message has arrived. ALLREDUCE starts the
 * reduction of one gradient bucket on the rank's collective channel (one at a
 * time, in order, `allreduce` seconds each) and returns at once; OPTIM waits
 * for the rank's reductions, then takes the sum of its chunks' `optim`.
 *
 * The simulation is event driven: a rank runs until a receive whose message
 * has not been sent, parks, and the send wakes it; every action is visited
 * once, O(total actions + n_chunks × n_micro) time. 1F1B with 1024 ranks ×
 * 4096 micro-batches (25 M actions) simulates in well under a second
 * (tools/bench/bench_simulate.c).
 *
 * Figures. step_time is one synchronous step (every rank's OPTIM done; the
 * next step starts after it), and bubble = 1 − busy / (ranks × step_time):
 * the idle share of the ranks' time, fill and drain included. A rank cannot
 * start before its inputs exist, so the fill and drain of a synchronous step
 * never vanish; the zero-bubble schedules remove the bubbles *between* a
 * rank's first and last action, so that consecutive steps can overlap (the
 * Zero Bubble paper's post-validation optimizer step lets rank 0 start step
 * n+1 while the last rank finishes step n). steady_step_time = max over
 * ranks of (end − first compute start) is the period of that overlapped
 * steady state, and steady_bubble its idle share; ZB-H2 and ZB-V reach 0
 * with F = B = W and m >= 2p − 1. See docs/schedules.md.
 *
 * Several steps. cfg->steps > 1 runs that many consecutive steps. Without
 * post-validation each step starts when every rank has finished the last, so
 * it replays the first exactly (steps_time = steps × step_time). With
 * cfg->post_validate a rank runs on into its next step as soon as its own
 * OPTIM is done (the steps' programs back to back on every rank; messages of
 * different steps never mix), and period is the time a step adds in that
 * overlapped run: the schedules whose ranks end their step at staggered
 * times (ZB-H2, ZB-V, zb-auto at 2p) gain, 1F1B (its first rank ends last)
 * does not.
 *
 * Trace. With cfg->trace the simulator pushes, on track r, the events the
 * engine records, timed on the simulated clock (t0_ns / t1_ns from 0):
 *   "F" "B" "W" "OPTIM"             PW_TRACE_COMPUTE  chunk, mb
 *   "SEND_F" "SEND_B" "ALLREDUCE"   PW_TRACE_COMM     zero length at issue;
 *                                                     peer = receiver, bytes
 *   "RECV_F" "RECV_B"               PW_TRACE_COMM     zero length when the
 *                                                     message is taken; peer = sender
 *   "wait RECV_F" "wait RECV_B"     PW_TRACE_WAIT     parked on a receive;
 *                                                     peer = sending rank
 *   "wait ALLREDUCE"                PW_TRACE_WAIT     OPTIM waiting for reductions
 *   "step"                          PW_TRACE_STEP     0 .. the rank's end
 * so pw_trace_write() gives a file pipe-trace reads like a measured run.
 *
 * Ownership and threads: pw_simulate borrows the schedule and the config
 * (and writes into the config's trace, if any) for the call only and returns
 * a new result owned by the caller (pw_sim_result_destroy). Simulations
 * share nothing: several threads may simulate one schedule at once, each
 * with its own trace.
 */
#ifndef PW_SCHEDULER_SIMULATE_H
#define PW_SCHEDULER_SIMULATE_H

#include <stdint.h>

#include "runtime/status.h"
#include "runtime/trace.h"
#include "scheduler/schedule.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The cost of one stage chunk, per micro-batch. Times in seconds (>= 0,
 * finite), e.g. from the graph cost model or a profile; they are rounded to
 * whole nanoseconds. */
typedef struct pw_sim_chunk_cost {
    double f;             /* forward */
    double b;             /* backward for the input (B of a split schedule) */
    double w;             /* backward for the weights (W); an unsplit B takes b + w */
    double optim;         /* this chunk's share of OPTIM (once per step) */
    double allreduce;     /* all-reduce of one gradient bucket of this chunk across
                           * the replicas (see pw_sim_ring_allreduce) */
    int64_t msg_bytes;    /* activation this chunk sends to chunk + 1; the
                           * gradient coming back is as large */
    int64_t act_bytes;    /* activations one in-flight micro-batch keeps stashed */
} pw_sim_chunk_cost;

typedef struct pw_sim_config {
    const pw_sim_chunk_cost *chunks;  /* [n_chunks]; NULL: unit costs (f = b = w = 1 s,
                                       * everything else 0) */
    double link_latency;              /* s from a message leaving its link to arriving */
    double link_bandwidth;            /* bytes/s of each directed rank-to-rank link;
                                       * 0: infinite */
    /* (optional) latency and bandwidth of the link src -> dst, replacing the
     * two above (e.g. slower links between hosts); asked once per link. */
    void (*link_params)(void *ctx, int src, int dst, double *latency, double *bandwidth);
    void *link_ctx;
    pw_trace *trace;                  /* (optional) n_ranks tracks of at least
                                       * pw_sim_trace_capacity() events */
    int64_t step;                     /* step number written into trace events; 0 means 1 */
    /* Consecutive steps (the result's steps_* and period figures; the trace
     * and the per-rank figures are of the first step). */
    int steps;                        /* 0 or 1: one step */
    int post_validate;                /* 1: a rank starts step n+1 as soon as its
                                       * own OPTIM of step n is done — the global
                                       * checks (gradient norm, non-finite values)
                                       * are validated after the fact and cost
                                       * nothing unless they fail (Zero Bubble
                                       * §4); 0: every rank starts step n+1 when
                                       * the last rank has finished step n */
} pw_sim_config;

typedef struct pw_sim_rank {
    double start;             /* s: its first compute action starts */
    double end;               /* s: its last action ends */
    double busy;              /* s in F, B, W and OPTIM */
    double idle;              /* step_time - busy */
    double wait_recv;         /* s parked on receives */
    double wait_allreduce;    /* s OPTIM waited for the rank's all-reduces */
    int peak_inflight;        /* activation slots, as pw_schedule_report.peak_inflight */
    double peak_stages;       /* peak_inflight / chunks_per_rank (stage units) */
    int64_t peak_act_bytes;   /* peak over the step of sum(in-flight x act_bytes) */
} pw_sim_rank;

typedef struct pw_sim_result {
    int n_ranks;
    double step_time;         /* s: one synchronous step, 0 .. the last rank's end */
    double busy;              /* s: compute time summed over ranks */
    double bubble;            /* 1 - busy / (n_ranks x step_time) */
    double steady_step_time;  /* s: max over ranks of (end - start): the period
                               * when consecutive steps overlap */
    double steady_bubble;     /* 1 - busy / (n_ranks x steady_step_time) */
    int64_t n_actions;        /* actions executed */
    int64_t n_messages;       /* point-to-point messages */
    int64_t n_waits;          /* receives that had to wait */
    int64_t n_trace_events;   /* events pushed to cfg->trace, dropped ones
                               * included (pw_trace_dropped); 0 without one */
    /* cfg->steps consecutive steps (one when steps <= 1): */
    int steps;
    double steps_time;        /* s: from the first action to the end of the last step */
    double steps_bubble;      /* 1 - steps x busy / (n_ranks x steps_time): fill
                               * and drain paid once */
    double period;            /* s: (end of the last step - end of the first) /
                               * (steps - 1), the time a step adds once steps
                               * follow each other; step_time for one step */
    double period_bubble;     /* 1 - busy / (n_ranks x period) */
    pw_sim_rank *ranks;       /* [n_ranks] */
} pw_sim_result;

/* Simulates one step of `s`, which must be lowered (pw_schedule_lower; the
 * CSV loader lowers) and should be validated: the simulator trusts the
 * validator for the order of actions within a rank and only checks what it
 * needs to stay safe. cfg may be NULL (unit costs, free links, no trace).
 * PW_OK: *out is a new result (destroy with pw_sim_result_destroy).
 * PW_ERR_INVALID_ARG: a NULL schedule, a bad cost (negative or not finite)
 * or link. PW_ERR_SCHEDULE: the schedule is not lowered,
 * holds an action that names no real chunk, micro-batch or neighbour, or does
 * not finish (a receive whose message is never sent: "rank 1 at position 4
 * (RECV_F mb 2 from rank 0) waits for a message that is never sent").
 * PW_ERR_NOMEM. On error *out is NULL. A full trace track drops events (the
 * trace counts them); the result is unaffected. */
pw_status pw_simulate(const pw_schedule *s, const pw_sim_config *cfg, pw_sim_result **out);
void pw_sim_result_destroy(pw_sim_result *r); /* accepts NULL */

/* Events per track a trace needs to hold a simulated step of s: two per
 * action (a wait and the action) plus the step event; 0 for NULL. */
int64_t pw_sim_trace_capacity(const pw_schedule *s);

/* Ring all-reduce time of `bytes` across n_replicas (2(n-1) steps of
 * bytes/n each): 2(n-1) (latency + bytes / (n bandwidth)); 0 for one
 * replica. bandwidth 0: infinite. */
double pw_sim_ring_allreduce(int64_t bytes, int n_replicas, double latency, double bandwidth);

#ifdef __cplusplus
}
#endif
#endif
