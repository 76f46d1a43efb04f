/* pipewright — a parameter server for pipelines under MPI (--sync ps
 * --servers K; docs/distributed.md, "Parameter server").
 *
 * A run of S stages x R replicas with K servers has S·R + K processes: the
 * workers are world ranks 0 .. S·R−1 as in any run (pw_mpi_config), the
 * servers the last K (server j is world rank S·R + j). The servers hold the
 * parameters and their optimizer state, sharded by parameter
 * (pw_ps_assign); a worker builds its pipeline with
 * pw_pipeline_config.ps_servers = K and then, instead of all-reducing a
 * gradient bucket, pushes each of its parameters' gradients to the server
 * holding it as soon as the bucket's last backward returns, and at OPTIM
 * pulls the parameters the server computed. A server runs pw_ps_serve
 * until every worker has said it is done; it takes the optimizer's
 * configuration (its learning-rate schedule included) from world rank 0.
 *
 *     // on a server (t->server >= 0):
 *     pw_ps_server_config sc = {.graph = g, .transport = t};
 *     if (pw_ps_serve(&sc) != PW_OK) { report pw_last_error(); pw_transport_abort(t, 1); }
 *
 * Synchronous (staleness 0): the server sums the R replicas' gradients of a
 * parameter in the tree all-reduce's order (runtime/collective.h: pairwise
 * over the replicas in index order), then steps the optimizer exactly as a
 * worker would (pw_optim_update, the same step count): the parameters are
 * bit-identical to --allreduce tree.
 *
 * Stale-synchronous (staleness s > 0): the server still applies one update
 * per step, step t's from the R replicas' step-t gradients, making version
 * t of the parameters; a worker's OPTIM of step t waits only until it holds
 * version t − s or newer and takes the newest it has, so the forward of
 * step t + 1 uses a version in [t − s, t] and no replica runs more than s
 * steps ahead of the slowest. The version each step used is in the trace
 * ("PS pull" events, docs/distributed.md). Each gradient travels with the
 * version its worker computed it on, so the server knows its staleness
 * exactly, and (staleness_lr = PW_PS_STALE_LR_INVERSE, the default)
 * divides the update's learning rate by their mean (pw_ps_stale_lr_factor;
 * 1 for fresh gradients, so a synchronous run keeps its bits).
 *
 * Clipping (--clip-grad-norm): the servers clip the summed gradients by the
 * global norm in the engine's order; with K > 1 server 0 gathers the
 * others' summed gradients each step and sends back the coefficient.
 *
 * Checkpoints (docs/distributed.md, "Parameter server"): a worker's hello
 * goes before its first step and carries its parameters' optimizer state
 * and the step it starts from, so a resumed run's servers start from the
 * checkpoint; at a checkpoint replica 0's workers fetch the state back
 * (STATE_REQ / STATE), so the files are an all-reduce run's.
 *
 * Errors name the process: a server that stops is named by the workers'
 * watchdogs ("MPI rank 4 (server 0) stalled: ..."), through the heartbeat
 * board of runtime/transport.h.
 *
 * Ownership and threads: pw_ps_serve borrows the graph and the transport
 * for the call and runs on the caller's thread (it returns at the end of
 * the run); pw_ps_assign is a pure function of its arguments.
 */
#ifndef PW_STAGES_TRAIN_PS_H
#define PW_STAGES_TRAIN_PS_H

#include "graph/graph.h"
#include "runtime/transport.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Which server holds each graph parameter: out[p] in [0, K) for every p <
 * g->n_params. Balanced by bytes, deterministic: the parameters from the
 * largest to the smallest (ties: graph order) each go to the server with
 * the fewest bytes so far (ties: the lowest index). */
void pw_ps_assign(const pw_graph *g, int K, int *out);

/* How a server scales the learning rate of a stale update (--staleness-lr;
 * docs/distributed.md, "Staleness-aware learning rate"). */
typedef enum pw_ps_stale_lr {
    PW_PS_STALE_LR_INVERSE = 0, /* (default) divided by the mean staleness of its gradients (Zhang et al. 2016) */
    PW_PS_STALE_LR_NONE         /* every update at the optimizer's learning rate */
} pw_ps_stale_lr;

/* "inverse" / "none" -> rule; PW_ERR_INVALID_ARG otherwise. */
pw_status pw_ps_stale_lr_parse(const char *s, pw_ps_stale_lr *out);
const char *pw_ps_stale_lr_name(pw_ps_stale_lr rule);

/* The factor on the learning rate of the update that makes version `step`
 * from R gradients, gradient k computed on version read[k]. Its staleness
 * is tau_k = step − read[k] (Zhang et al.'s: the updates between the read
 * and this one, this one counted; 1 for a synchronous step). INVERSE:
 * 1 / mean(tau_k), exactly 1.0 when every tau_k is 1; NONE: 1.0. */
double pw_ps_stale_lr_factor(pw_ps_stale_lr rule, int64_t step, const int64_t *read, int R);

/* What a server saw (optional, filled by pw_ps_serve): how many replica
 * gradients it applied at each staleness tau (tau[i]: tau = i + 1; the
 * last bin counts tau >= PW_PS_TAU_BINS), known exactly from the version
 * each worker sends with its gradient (with staleness > 0; all tau = 1
 * otherwise). */
#define PW_PS_TAU_BINS 16
typedef struct pw_ps_server_stats {
    int64_t tau[PW_PS_TAU_BINS];
    int64_t updates;               /* parameter updates applied */
    double lr_factor_sum;          /* the sum of their learning-rate factors */
} pw_ps_server_stats;

typedef struct pw_ps_server_config {
    const pw_graph *graph;
    const pw_transport *transport; /* this process is server transport->server */
    pw_ps_stale_lr staleness_lr;   /* --staleness-lr (default, 0: inverse) */
    pw_ps_server_stats *stats;     /* NULL, or filled at the end of the run */
} pw_ps_server_config;

/* Serves until every worker has said goodbye; bounded by the transport's
 * watchdog (a worker that stops is named). PW_OK at the end of the run. */
pw_status pw_ps_serve(const pw_ps_server_config *cfg);

#ifdef __cplusplus
}
#endif
#endif
