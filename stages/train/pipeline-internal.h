/* pipewright — pw_pipeline's internals, shared by its files
 * (docs/architecture.md, "stages/train/pipeline*.c"): the pipeline object,
 * a chunk of a replica (gstage), and the functions one file gives another.
 * Not installed. */
#ifndef PW_STAGES_TRAIN_PIPELINE_INTERNAL_H
#define PW_STAGES_TRAIN_PIPELINE_INTERNAL_H

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"
#include "runtime/topology.h"
#include "runtime/trace.h"
#include "stages/ops/backend.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/pipeline.h"
#include "stages/ops/tp.h"
#include "stages/train/tp_team.h"

#define DEFAULT_BUCKETS 4
/* Tags of the blocking world messages: a parameter's is its graph index,
 * evaluation's activations use the largest tag (the phases never overlap). */
#define TAG_EVAL(t) ((t)->max_tag)

/* One stage chunk of one replica: the stage's nodes cut into `n_pieces`
 * programs (one per gradient bucket; one without replicas) chained through
 * per-slot link buffers, plus the data it loads. */
/* Loss and correct count of one replica's loss stage this step, summed in
 * micro-batch order (all-gathered across processes as bytes). */
typedef struct loss_part {
    double loss;
    int64_t correct;
    int32_t has;
    int32_t pad;
} loss_part;

typedef struct pl_ps pl_ps; /* the parameter server's worker side (pipeline_ps.c) */

typedef struct gstage {
    pw_pipeline *pl;
    int index;                /* chunk id (= stage with one chunk per rank) */
    int replica;              /* global replica index */
    int n_pieces;
    pw_program **piece;       /* [n_pieces] in node order; bucket b is piece n_pieces−1−b */
    unsigned char *reads_input, *reads_label; /* [n_pieces] */
    int loss_piece;           /* -1: no loss here */
    void *links;              /* link buffers between pieces, every slot */
    size_t link_bytes;
    double *mb_loss;          /* [K][M]: loss sum of each micro-batch of each step of
                                 the run (K: pl->K) */
    int64_t *mb_correct;      /* [M] */
    /* Asynchronous (a device stage of one piece; pw_program_set_async):
     * the forward whose loss is read at completion (-1: none), and the
     * engine's done for the call in flight. */
    int async;
    int loss_mb, loss_slot;
    pw_stage_done_fn done;
    void *done_arg;
    /* Tensor parallelism (pl->T > 1): one piece, run by the TL rank programs
     * of this process on the team's threads (the engine's worker is the
     * first) over the group (in process) or the transport's tp_coll (MPI). */
    pw_program **rank_prog;   /* [TL]: ranks tp0 .. tp0+TL−1; [0] == piece[0] */
    pw_shm_group *tp_group;   /* in process only */
    pw_tp_team *tp_team;
    void **tp_grad_out;       /* [slots]: the engine's GRAD_OUT buffer, rank 0's */
    char *tp_grad_mem;        /* local ranks 1 .. TL−1 × slots own GRAD_OUT buffers */
    size_t tp_grad_bytes, tp_grad_stride;
    atomic_int tp_abort;
    /* The engine call the first local rank is in, for its TP_ALLREDUCE
     * trace events (pipeline_stage.c, tp_traced): none while evaluating. */
    int tp_tracing, tp_mb;
    int64_t tp_step;
} gstage;

struct pw_pipeline {
    pw_pipeline_config cfg;
    const pw_graph *g;
    const pw_transport *t;
    int S, NR, NRL;           /* ranks (stages), replicas, replicas built here */
    int V, C;                 /* chunks per rank; chunks C = S·V (graph cut into C) */
    int post_optim;           /* 1: parameters tied across chunks; the pipeline runs the
                                 optimizer after the engine's step (see finish_step) */
    double grad_norm;         /* post_optim with clipping: last norm before clipping; --sync ps:
                                 the servers' (sent with each version, -1 without clipping) */
    pw_schedule_config sc;    /* the generated schedule's config (kind CUSTOM for CSV) */
    int n_buckets;            /* the schedule's */
    int64_t micro;            /* samples per micro-batch */
    int grad_groups;          /* K: each replica's micro-batches are summed in K groups */
    int64_t share;            /* samples per replica per step: batch / R */
    int64_t steps_per_epoch;
    int64_t step;             /* steps done */
    pw_sampler sampler;
    int64_t sampler_epoch;
    const int64_t *batch_idx; /* this step's samples, read by the workers */
    int K;                    /* steps per engine run (overlap_steps; 1: off) */
    int64_t run_first;        /* the current run's first step */

    pw_partition part;
    pw_schedule *sched;
    pw_schedule_report *rep;
    gstage *stages;           /* [NRL][C]; with a transport only this process's chunk is built */
    pw_engine_chunk *chunks;  /* [NRL][C], chunk-id order (the engine's) */
    pw_engine *engine;
    pw_trace *trace;
    double last_bubble;
    char *schedule_name;
    void *msg_pinned;               /* the engine's message block, page-locked by msg_backend */
    const pw_backend_i *msg_backend;
    const pw_backend_i *dev_msgs;   /* messages in this backend's memory on msg_device */
    int msg_device;
    pl_ps *ps;                /* cfg.ps_servers > 0: pushes and pulls (pipeline_ps.c) */
    loss_part win;            /* with staleness: this process's loss since the last agreement */
    int64_t win_steps;
    double win_last_loss;     /* the last agreed window's mean (summed over processes) */
    int64_t win_last_correct;
    int T;                    /* tensor-parallel ranks per chunk (1: none) */
    int TL, tp0;              /* of which this process runs TL from rank tp0: in one
                                 process all T from 0; under MPI one, the transport's
                                 tp_rank (its peers are other processes: t->tp_coll) */
    pw_graph **rank_g;        /* [T] at T > 1: rank k's graph (pw_graph_tp_rank) */
    uint64_t generation;      /* unique per pipeline object of the process: a caller that
                                 keeps pointers into its programs (the checkpoint writer)
                                 sees a re-partition (stages/train/rebalance.c) by it */
};

static inline gstage *stage_at(pw_pipeline *pl, int lrep, int c) { return &pl->stages[(size_t)lrep * (size_t)pl->C + (size_t)c]; }
/* Chunk c is built in this process (always in one process; under a
 * transport, the chunks the schedule places on this process's rank). */
static inline int stage_here(const pw_pipeline *pl, int c) { return !pl->t || pw_schedule_rank_of(pl->sched, c) == pl->t->rank; }
static inline int rank_here(const pw_pipeline *pl, int r) { return !pl->t || pl->t->rank == r; }
/* Under a transport: the world rank of the process running chunk c of
 * global replica k. */
static inline int world_of_chunk(const pw_pipeline *pl, int k, int c)
{
    return pw_transport_world_of(pl->t, k, pw_schedule_rank_of(pl->sched, c));
}
/* The local replica index of global replica k, -1 when not here. */
static inline int lrep_of(const pw_pipeline *pl, int k)
{
    if (pl->t) return k == pl->t->replica ? 0 : -1;
    return k >= 0 && k < pl->NR ? k : -1;
}



/* What one file gives another; each is documented at its definition. */

/* pipeline.c */
/* j: the step's index in the run (0 for pw_pipeline_step). */
loss_part pl_replica_loss(const pw_pipeline *pl, int lrep, int j);
pw_status pl_create(const pw_pipeline_config *cfg, pw_trace *adopt, pw_pipeline **out);

/* rebalance.c */
const pw_stage_i *pl_chunk_vt(const pw_pipeline *pl);

/* pipeline_device.c */
void pl_bind_stage_memory(pw_pipeline *pl, const char *const *gpu_pci);
pw_status pl_check_device(const pw_pipeline_config *c, int NR);
int pl_messages_on_device(pw_pipeline *pl);
pw_status pl_msgs_alloc(void *arg, size_t bytes, void **base);
void pl_msgs_free(void *arg, void *base);
void pl_pin_messages(pw_pipeline *pl);
const char **pl_worker_gpu_pci(const pw_pipeline *pl);

/* pipeline_stage.c */
pw_status pl_build_stage(pw_pipeline *pl, gstage *gs, int s, int replica);
void pl_free_stage(gstage *gs);
pw_status pl_host_grad(pw_program *p, int i, const pw_program_param *pp, float **tmp, float **out);
pw_status pl_host_grad_done(pw_program *p, int i, const float *g);
int pl_node_range_reads(const pw_graph *g, int begin, int end, int value);
const char *pl_chunk_device(const pw_pipeline *pl, int s, char *buf, size_t size);
pw_status pl_gs_bind(void *self, int slot, pw_port port, void *buf);
size_t pl_gs_port_bytes(void *self, pw_port port);
pw_status pl_gs_run_forward(gstage *s, const pw_dataset *d, const int64_t *idx, int64_t n, int slot, int train, int64_t step, int64_t sample_offset);
extern const pw_stage_i pl_gstage_i, pl_gstage_post_i;

/* pipeline_ties.c */
pw_status pl_sum_ties(const pw_graph *g, pw_program **p, int np);
pw_status pl_sum_ties_across(pw_pipeline *pl);
pw_status pl_sumsq_across(pw_pipeline *pl, double *out);
/* Tensor parallelism (pipeline_stage.c): adds chunk gs's share of the
 * squared global norm to *sum, the order of docs/parallelism.md ("Clipping
 * at T > 1"): parameter by parameter in program order, those whose graph
 * parameter is not skip[]ped (skip NULL: all), each as its parts' sums in
 * rank order (a split parameter's T parts, a whole one's rank 0 copy), each
 * part's squares summed on their own from 0, elements in order. Under MPI
 * the T processes of the stage all-gather their parts' sums over the
 * transport's tensor-parallel group (all must call it together), so every
 * process adds the numbers one process adds. Folds the gradients. */
pw_status pl_tp_sumsq(gstage *gs, const unsigned char *skip, float **tmp, double *sum);
/* Tensor parallelism (pipeline.c): a cut may not split a column → row pair
 * (a split value would cross it). Each interior cut of cuts[0 .. C] that
 * does moves to the nearest boundary no split value crosses between its
 * neighbours (the earlier on a tie); *moved = 1 when one did.
 * PW_ERR_INVALID_ARG, naming the chunk, when there is none. */
pw_status pl_tp_snap_cuts(const pw_pipeline *pl, int *cuts, int *moved);
int pl_replica_programs(pw_pipeline *pl, int k, pw_program **out);
int pl_replica_rank_programs(pw_pipeline *pl, int k, int rank, pw_program **out);

/* pipeline_ps.c: the worker's side of --sync ps (stages/train/ps.h).
 * create: after the stages, before the engine (which then takes
 * pl_ps_transport and the chunks' pl_ps_vt); start: after the engine;
 * begin: before each step (the first sends the parameters and optimizer
 * state to the servers); settle: every version pushed received and in
 * place (before an evaluation or a save); checkpoint: settle, and replica
 * 0 fetches the servers' optimizer state into its programs (before a
 * training-state snapshot); destroy: goodbye and free. */
pw_status pl_ps_create(pw_pipeline *pl);
const pw_stage_i *pl_ps_vt(pw_pipeline *pl, const pw_stage_i *base);
const pw_transport *pl_ps_transport(pw_pipeline *pl);
pw_status pl_ps_start(pw_pipeline *pl);
pw_status pl_ps_begin(pw_pipeline *pl);
pw_status pl_ps_checkpoint(pw_pipeline *pl);
pw_status pl_ps_settle(pw_pipeline *pl);
void pl_ps_destroy(pw_pipeline *pl);

/* pipeline_compress.c: the error-feedback state of --compress per
 * (replica, parameter, use), for training-state checkpoints and moves of
 * the cuts. One entry per gradient span whose compressor keeps state
 * (top-k, PowerSGD), in (local replica, chunk, piece, parameter, use)
 * order; a tied parameter has one span per use. A use is numbered over the
 * whole graph as pw_program_param_uses numbers a program's: nodes last to
 * first, a node's slots in order (pl_param_use_node: its node). *out is
 * malloc'd (the caller frees), NULL with none. At T > 1 (in one process)
 * each tensor rank's compressor holds its own part of a split parameter's
 * use and its own copy of a whole one: one entry per (replica, parameter,
 * use, tensor rank), ranks in order. *why (a constant string) says why the
 * state cannot be kept per use (tensor parallelism under a transport): then
 * nothing is listed. Between steps only. */
typedef struct pl_zstate {
    int replica;              /* the global replica index */
    int gp;                   /* the graph parameter */
    int use;                  /* its use, 0 .. n_uses − 1 */
    int n_uses;               /* its uses in the graph (> 1: tied) */
    pw_compressor *z;         /* its bucket's compressor (the engine's) */
    int span;                 /* its span there */
    int64_t floats;           /* pw_compressor_span_state's (0: none, a PowerSGD
                                 span sent uncompressed) */
    int tp_rank;              /* the tensor rank whose compressor it is (0 at T = 1) */
    int split;                /* T > 1: the parameter is split, the span is tp_rank's
                                 part of it (pw_graph_tp_slice) */
    int64_t numel;            /* the span's floats: the residual's (the state's first
                                 numel floats); PowerSGD's Q follows it */
} pl_zstate;
pw_status pl_compress_states(pw_pipeline *pl, pl_zstate **out, int *n, const char **why);
/* The node of use `use` of graph parameter gp (-1: none). */
int pl_param_use_node(const pw_graph *g, int gp, int use);
/* The checkpoint tensor's name: "<parameter>.compress.replica<k>", and
 * ".use<u>" after it for a tied parameter. */
void pl_zstate_name(const pw_graph *g, const pl_zstate *z, char *out, size_t n);

/* The piece of local chunk ch of local replica lrep holding graph
 * parameter gp and its index there (*local); NULL: none (pipeline_ties.c). */
pw_program *pl_chunk_param(pw_pipeline *pl, int lrep, int ch, int gp, int *local);

#endif
