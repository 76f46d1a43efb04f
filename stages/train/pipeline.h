/* pipewright — a graph trained through a pipeline of stages.
 *
 * Wires everything for a graph file: partition → one stage program per
 * stage → schedule (generated or CSV) → validation → the engine, one worker
 * thread per stage. This is what `pipeline-run` uses; the engine itself
 * (scheduler/engine.h) knows nothing about graphs.
 *
 *     pw_pipeline_config pc = pw_pipeline_defaults();
 *     pc.graph = g; pc.train = ds; pc.batch = 64; pc.micro_batches = 8;
 *     pc.stages = 2; pc.schedule = PW_SCHEDULE_1F1B;
 *     pw_pipeline *pl;
 *     PW_CHECK(pw_pipeline_create(&pc, &pl));
 *     pw_step_stats s;
 *     for (int i = 0; i < 100; i++) PW_CHECK(pw_pipeline_step(pl, &s));
 *     PW_CHECK(pw_pipeline_save(pl, "ckpt.safetensors", NULL));
 *     pw_pipeline_destroy(pl);
 *
 * For the same graph, seed, data order, batch and micro-batch count, the
 * parameters after N steps are bit-identical for every schedule and every
 * stage count (tests/test_pipeline.c holds this).
 *
 * Chunks. The graph is cut into C = stages × chunks_per_rank contiguous
 * chunks (interleaved and zb-v: 2 per rank by default), placed on ranks by
 * the schedule (pw_schedule_rank_of: looping, or zb-v's V); each rank's
 * worker runs all its chunks. A parameter tied across chunks (an embedding on
 * chunk 0 reused by the head on the last) gets the gradient one stage would
 * compute, and every copy the same update: the engine runs forward/backward
 * (and the replica all-reduces) only, and after its step the pipeline sums
 * the uses in reverse node order, clips and runs the optimizers (see
 * finish_step in pipeline.c). Multi-process runs (transport) build the
 * chunks of their rank; a tied parameter's partial sum then travels between
 * the processes holding its uses in the same order, so the bytes match one
 * process (docs/distributed.md).
 *
 * Data parallelism (docs/distributed.md). With replicas = R the pipeline runs
 * R copies; replica k takes samples [k·B/R, (k+1)·B/R) of each step's global
 * batch B, in M micro-batches of B/(R·M) (so R = 1 is the plain pipeline).
 * Each stage's gradients are summed across the replicas in `buckets`
 * buckets: the stage is cut into that many pieces of roughly equal parameter
 * bytes, bucket 0 the last piece, and a bucket's all-reduce starts as soon as
 * its piece's part of the last backward is done. The loss is averaged over
 * the global batch and reported once. With a transport (mpirun -np S·R) this
 * process builds only its own rank's chunks of its own replica and needs only
 * the side of the data they read (pw_pipeline_data_parts); save gathers one
 * file on world rank 0 with the same content as a run in one process.
 *
 * Ownership and threads: a pipeline copies its config (schedule_csv and
 * cuts included) and borrows the graph, the training set and the transport,
 * which must outlive it. It owns its schedule, partition, stage programs,
 * engine (one worker thread per rank) and trace; the pointers the accessors
 * return (partition, schedule, report, programs, engine) are valid until
 * destroy. One thread drives a pipeline: create, step, evaluate, save, load,
 * seek, the figures and destroy are not thread-safe and run between steps;
 * the engine's workers run only inside step and evaluate. Under a transport
 * step, evaluate, save and the gathers (pw_pipeline_planned_bytes,
 * pw_pipeline_gather_process_stats) are collectives: every process calls
 * them in the same order; write_trace writes this process's file only.
 */
#ifndef PW_STAGES_PIPELINE_H
#define PW_STAGES_PIPELINE_H

#include <stdint.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "runtime/status.h"
#include "runtime/transport.h"
#include "scheduler/engine.h"
#include "scheduler/schedule.h"
#include "stages/train/checkpoint.h"
#include "stages/train/data.h"
#include "stages/ops/optim.h"
#include "stages/train/trainer.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_pipeline pw_pipeline;

typedef struct pw_pipeline_config {
    const pw_graph *graph;
    const pw_dataset *train;        /* borrowed */
    int64_t batch;                  /* global batch per step */
    int micro_batches;              /* M */
    int stages;                     /* S pipeline stages = ranks = worker threads */
    pw_schedule_kind schedule;      /* any generated kind (ignored with schedule_csv) */
    const char *schedule_csv;       /* (optional) a user's schedule file */
    int split_w;                    /* split backward into B and W */
    int memory_limit;               /* zb-auto: micro-batches in flight per rank, F to
                                       W (0: 2 × stages, ZB-2p); its order is built
                                       on the partition's predicted stage times */
    pw_partition_method partition;  /* how to cut the graph when `cuts` is NULL */
    const int *cuts;                /* (optional) [n_cuts] chunk boundaries, pw_partition's
                                       `begin` layout: 0 = cuts[0] < cuts[1] < ... <
                                       cuts[C] = the graph's node count, chunk c runs
                                       nodes [cuts[c], cuts[c+1]); e.g. a plan's
                                       part.begin (stages/plan/plan.h). Overrides `partition` */
    int n_cuts;                     /* entries in cuts: chunks + 1 */
    pw_optim_config optim;
    uint64_t seed;
    int shuffle;
    double watchdog_s;              /* 0: 60 s */
    int pin;                        /* bind workers to cores */
    int64_t trace_events;           /* > 0: record up to this many events per rank */
    int check;                      /* run the schedule checker on every action */
    int replicas;                   /* R data-parallel replicas (0: 1); batch must be a
                                       multiple of R × micro_batches */
    int buckets;                    /* gradient buckets per stage with replicas (0: 4;
                                       1: one all-reduce after the whole backward) */
    double clip_grad_norm;          /* > 0: clip the global gradient norm to this */
    int post_validate;              /* 1 (with clip_grad_norm): each rank steps its
                                       optimizer before the global norm is known and
                                       undoes and redoes the step when clipping
                                       triggers; bit-identical to 0 (docs/engine.md,
                                       "Post-validation"). No effect without
                                       clip_grad_norm or with parameters tied across
                                       stages */
    int overlap_steps;              /* > 1: pw_pipeline_steps runs up to this many steps
                                       per engine run, back to back: each rank starts
                                       the next step as soon as its own part of the last
                                       one is done (docs/engine.md, "Steps that
                                       overlap"); with post_validate the next steps'
                                       forwards run while the norm travels. The same
                                       bits as pw_pipeline_step. 0 or 1: off; at most
                                       64; one process only; no effect with parameters
                                       tied across stages */
    const pw_transport *transport;  /* (optional) multi-process run: this process is
                                       (transport->replica, transport->rank) and builds
                                       the chunks the schedule places on that rank */
    pw_link link;                   /* (optional, in one process) a slow link between the
                                       workers: messages and the all-reduce take its time,
                                       results are unchanged (runtime/link.h; under MPI
                                       the transport's pw_mpi_config carries it) */
    int chunks_per_rank;            /* v: the graph is cut into stages × v chunks (0: the
                                       kind's default: interleaved 2, zb-v 2, others 1) */
    int recompute;                  /* 1: every program keeps only its inputs per slot and
                                       re-runs its forward in backward (bit-identical) */
    const char *device;             /* where the stage programs run: NULL or "cpu" (default),
                                       "cuda:N" (every stage on GPU N, each with its own
                                       streams), "cuda" (rank r on GPU r mod the GPU count);
                                       docs/cuda.md. CUDA refuses a transport for now
                                       (PW_ERR_UNSUPPORTED); replicas > 1 need the
                                       backend's span_memory (CUDA has it) */
    int math;                       /* a device's GEMM mode (pw_math, stages/ops/backend.h):
                                       0 = fp32 (default), tf32, bf16; the CPU ignores it */
    int no_graphs;                  /* 1: device programs never record their training
                                       calls for replay (CUDA graphs; docs/cuda.md) */
    int threads;                    /* CPU kernel threads (pw_cpu_set_threads: one team
                                       that every worker of the process shares; results
                                       never depend on it). 0: 1 when this process runs
                                       several workers or is one rank of many, else
                                       the team as it is (default: all cores) */
    int grad_groups;                /* G: the step's R·M micro-batch gradients are summed
                                       as G groups of consecutive micro-batches, pairwise
                                       (pw_grad_groups, stages/program/program.h); replica counts R with G/R
                                       a power of two (and R = 1) are bit-identical
                                       (pw_grad_groups_identical). 0: the default */
    pw_compress_config compress;    /* with replicas: how the gradient buckets travel
                                       (runtime/compress.h; zeroed = none, the plain
                                       all-reduce). The error-feedback state lives in the
                                       engine, per replica and bucket, and is not in the
                                       training-state checkpoints (docs/distributed.md,
                                       "Compression") */
    int ps_servers;                 /* K > 0: synchronise through K parameter servers
                                       instead of the all-reduce (stages/train/ps.h,
                                       docs/distributed.md "Parameter server"): needs
                                       a transport with n_servers = K, replicas >= 2,
                                       no clipping, no tied parameters */
    int ps_staleness;               /* with ps_servers: a replica may run up to this
                                       many steps ahead of the slowest (0: synchronous,
                                       bit-identical to the tree all-reduce) */
    int tensor_parallel;            /* T: every chunk's tp=-marked layers split over T ranks,
                                       threads of this process (docs/parallelism.md, "Tensor
                                       parallelism"); 0 or 1: none. In one process on the
                                       CPU, without clipping; a cut may not split a
                                       tensor-parallel pair */
} pw_pipeline_config;


pw_pipeline_config pw_pipeline_defaults(void);

/* Events per engine worker that hold every action and wait of `steps`
 * steps of M micro-batches with `buckets` all-reduce buckets (0: the
 * default), with a margin; capped at 2^23 (the older events are then
 * dropped and counted). For pw_pipeline_config.trace_events. */
int64_t pw_pipeline_trace_capacity(int micro_batches, int buckets, int64_t steps);

pw_status pw_pipeline_create(const pw_pipeline_config *cfg, pw_pipeline **out);
/* The tensor-parallel degree T the pipeline runs (1: none). At T > 1,
 * pw_pipeline_program(s) return rank 0's programs (its parts of the split
 * parameters); pw_pipeline_save and pw_pipeline_load gather and split. */
int pw_pipeline_tensor_parallel(const pw_pipeline *pl);
void pw_pipeline_destroy(pw_pipeline *pl); /* accepts NULL */

/* Which sides of the data this process's chunks read, before any data is
 * loaded (cfg->train may be NULL): PW_DATA_INPUTS for the chunk holding the
 * graph's input, PW_DATA_LABELS for the one holding the loss; *parts is
 * PW_DATA_ALL without a transport (every chunk runs here) and 0 for a process
 * that reads neither (a middle stage). With `evaluation` set, for the data
 * pw_pipeline_evaluate reads: replica 0's processes only, so 0 on the other
 * replicas. Computes the schedule and partition exactly as
 * pw_pipeline_create does; any error it would report is returned. Load the
 * data with pw_dataset_from_spec_parts and pass it as cfg->train: the data
 * order (the sampler) needs only the sample count, so every process still
 * visits the same samples. */
pw_status pw_pipeline_data_parts(const pw_pipeline_config *cfg, int evaluation, unsigned *parts);

int64_t pw_pipeline_steps_per_epoch(const pw_pipeline *pl);
void pw_pipeline_seek(pw_pipeline *pl, int64_t step);
/* One optimizer step: every micro-batch through every stage. */
pw_status pw_pipeline_step(pw_pipeline *pl, pw_step_stats *out);
/* n steps (out: [n], optional): with overlap_steps > 1 in runs of up to
 * overlap_steps steps that never cross an epoch (the sampler reshuffles at
 * an epoch's start), each run one engine call whose steps overlap; a run
 * whose post-validation rolled back a step ends early and the next run
 * redoes the discarded step. Otherwise n calls of pw_pipeline_step. The
 * caller's step boundaries that need every rank stopped (checkpoints,
 * evaluation, re-partitioning, the end) fall between calls: pass n up to
 * the next one. */
pw_status pw_pipeline_steps(pw_pipeline *pl, int n, pw_step_stats *out);
/* Forward-only over a data set, stage after stage (mean loss, accuracy). */
pw_status pw_pipeline_evaluate(pw_pipeline *pl, const pw_dataset *d, pw_eval_stats *out);

pw_status pw_pipeline_save(pw_pipeline *pl, const char *path, const pw_checkpoint_info *info);
pw_status pw_pipeline_load(pw_pipeline *pl, const char *path, pw_checkpoint_info *info);

/* What the pipeline was built from. */
const pw_partition *pw_pipeline_partition(const pw_pipeline *pl);
const pw_schedule *pw_pipeline_schedule(const pw_pipeline *pl);
const pw_schedule_report *pw_pipeline_report(const pw_pipeline *pl);
/* Chunks: stages × chunks_per_rank (the schedule's); the functions below that
 * take a `stage` take a chunk id (the same thing with one chunk per rank). */
int pw_pipeline_n_chunks(const pw_pipeline *pl);
int pw_pipeline_chunks_per_rank(const pw_pipeline *pl);
/* The first program of `stage` (replica 0 in one process; this process's
 * replica with a transport, NULL for another process's stage). With buckets
 * a stage holds several programs: see pw_pipeline_programs. */
pw_program *pw_pipeline_program(pw_pipeline *pl, int stage);
/* The programs (bucket pieces, in node order) of `stage` of `replica` into
 * progs[0 .. max−1]; returns how many it has, 0 when not held here. */
int pw_pipeline_programs(pw_pipeline *pl, int replica, int stage, pw_program **progs, int max);
pw_engine *pw_pipeline_engine(pw_pipeline *pl);
/* Global gradient norm of the last step before clipping; -1 without
 * clip_grad_norm. */
double pw_pipeline_grad_norm(const pw_pipeline *pl);

/* Per chunk (`stage` is a chunk id), since creation (replica 0; with a
 * transport only this process's chunks have figures). busy/wait/total are the
 * figures of the rank that runs the chunk (shared by its chunks); slots,
 * peak_slots, nodes, flops and memory are the chunk's own. */
typedef struct pw_pipeline_stage_stats {
    double busy_s, wait_s, total_s;
    int rank;                       /* the rank running the chunk */
    int slots, peak_slots;          /* planned (validator) and measured high-water mark */
    int64_t node_begin, node_end;
    double flops;                   /* per-sample fwd+bwd FLOPs of the stage */
    size_t memory;                  /* stage program's arena bytes */
} pw_pipeline_stage_stats;
void pw_pipeline_stage_stats_get(const pw_pipeline *pl, int stage, pw_pipeline_stage_stats *out);
/* Measured bubble of the last step: 1 − Σ busy / (S × step wall time). */
double pw_pipeline_last_bubble(const pw_pipeline *pl);
/* The schedule's theoretical bubble: pw_schedule_config_bubble of the
 * generated schedule ((S−1)/(M+S−1) for GPipe and 1F1B without split W), the
 * validator's replayed figure for a CSV schedule. */
double pw_pipeline_theory_bubble(const pw_pipeline *pl);

/* ---- figures of every process (stages/train/pipeline_stats.c) ---- */

/* The memory the stage programs planned (arenas and message links), summed
 * over every chunk of every replica, in bytes. Under a transport this is a
 * collective: every process calls it, and each gets the sum of every
 * process's chunks (in world order). Errors: the transport's. */
pw_status pw_pipeline_planned_bytes(pw_pipeline *pl, double *bytes);

/* One process of a multi-process run: its rank's figures since creation. */
typedef struct pw_pipeline_process_stats {
    double busy_s, total_s;         /* the rank's worker: busy and wall time */
    double allreduce_s;             /* its replica all-reduces */
    double allreduce_wait_s;        /* the part of them the backward did not hide */
    int32_t replica, stage;         /* the process's replica and pipeline rank */
    int32_t peak_slots, slots;      /* activation slots, measured and planned, summed
                                       over the rank's chunks */
    int64_t node_begin, node_end;   /* the nodes of the rank's first chunk */
} pw_pipeline_process_stats;

/* Every process's figures, in world order, into all[transport->world_size]
 * on every process. A collective: every process calls it. Without a
 * transport PW_ERR_INVALID_ARG; otherwise the transport's errors. */
pw_status pw_pipeline_gather_process_stats(pw_pipeline *pl, pw_pipeline_process_stats *all);

/* Writes the recorded trace (needs trace_events > 0). */
pw_status pw_pipeline_write_trace(const pw_pipeline *pl, const char *path);
/* The recorded trace itself, to read its events in process (one track per
 * worker: replica × stages + rank); NULL when trace_events was 0. Owned by
 * the pipeline; read it only between steps. */
const struct pw_trace *pw_pipeline_trace(const pw_pipeline *pl);

#ifdef __cplusplus
}
#endif
#endif
