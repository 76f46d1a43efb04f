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
 *
 * With a topology (cfg.topology: an hwloc XML file or synthetic description
 * loaded with pw_topology_load_spec), the stages × replicas are placed on it
 * (pw_place_stages) and every link is costed from where its two ranks sit:
 *
 *     hwloc_topology_t topo;
 *     PW_CHECK(pw_topology_load_spec("cluster.xml", &topo));
 *     fc.topology = topo; fc.stages = 64; fc.replicas = 8;
 *     PW_CHECK(pw_forecast_run(&fc, &f));
 *     for (int k = 0; k < f.n_links; k++)     // chunk k -> k + 1
 *         printf("%d -> %d: %s, %.1f us per message
", f.links[k].src, f.links[k].dst,
 *                pw_link_class_name(f.links[k].cls), 1e6 * f.links[k].time);
 *
 * Hosts. A Group object above packages (synthetic "group:8 pack:2 core:8
 * pu:1", or a Group per node in an XML file) is one host. A placement that
 * needs more slots (GPUs, else cores) than the topology has repeats the
 * topology: each copy is more hosts of the same make ("--topology node.xml"
 * with 512 ranks on 8-GPU nodes is 64 nodes). Whole pipelines stay on one
 * copy when they fit one; a longer pipeline spans consecutive copies.
 *
 * Links. Each pair of ranks falls in one class (pw_link_class); each class
 * has default figures (pw_link_default: documented in docs/schedules.md) and
 * the links between hosts take cfg.host_latency_s / host_bandwidth when set.
 * A pipeline link between two stages takes the slowest figures over the
 * replicas; each stage's gradient all-reduce is a ring over its replicas at
 * the figures of the ring's slowest hop.
 *
 * Ownership and threads: a forecast borrows its config (graph, topology,
 * trace) for the call; pw_forecast's arrays are allocated by run/auto and
 * freed by pw_forecast_free. Forecasts share nothing and may run on several
 * threads at once, except pw_forecast_calibrate, which times a program on
 * the calling thread with the CPU thread team as it is set (do not change
 * it meanwhile).
 */
#ifndef PW_STAGES_FORECAST_H
#define PW_STAGES_FORECAST_H

#include <stdint.h>
#include <stdio.h>

#include "graph/graph.h"
#include "runtime/compress.h"
#include "runtime/status.h"
#include "runtime/topology.h"
#include "runtime/transport.h"
#include "runtime/trace.h"
#include "scheduler/schedule.h"
#include "scheduler/simulate.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Where the two ranks of a link sit, fastest class first. */
typedef enum pw_link_class {
    PW_LINK_SAME_DEVICE = 0,  /* same core (CPU) or same GPU: ranks share it */
    PW_LINK_NUMA,             /* CPU ranks on one NUMA node */
    PW_LINK_PACKAGE,          /* one package: CPU ranks across its NUMA nodes, or
                               * GPUs local to the same package (PCIe switch/NVLink) */
    PW_LINK_PACKAGES,         /* across packages of one host */
    PW_LINK_HOSTS,            /* across hosts (the network) */
    PW_LINK_N
} pw_link_class;

const char *pw_link_class_name(pw_link_class c); /* "same core/GPU", ..., "across hosts" */

/* The default latency (s) and bandwidth (bytes/s, 0 = infinite) of class c
 * between CPU ranks (on_gpus 0) or GPU ranks (1). */
void pw_link_default(pw_link_class c, int on_gpus, double *latency, double *bandwidth);

/* One link of the forecast's pipeline: chunk k's activation to chunk k + 1
 * (and its gradient back), between ranks on different slots. */
typedef struct pw_forecast_link {
    int src, dst;               /* pipeline ranks (stages) */
    pw_link_class cls;          /* the slowest over the replicas */
    double latency, bandwidth;  /* its figures (bandwidth 0 = infinite) */
    int64_t bytes;              /* one micro-batch's activation */
    double time;                /* s one message takes: latency + bytes / bandwidth */
} pw_forecast_link;

typedef struct pw_forecast_config {
    const pw_graph *graph;
    int stages;                 /* pipeline ranks */
    int replicas;               /* data-parallel copies (all-reduce cost), >= 1 */
    int micro_batches;
    int64_t micro_batch_size;   /* samples */
    pw_schedule_kind schedule;
    int chunks_per_rank;        /* v for interleaved (0 = 2); ZB-V and DualPipeV use 2 */
    int split_w;                /* GPipe/1F1B only */
    int memory_limit;           /* zb-auto's (pw_schedule_config); 0: 2p */
    double flops_per_s;         /* compute rate of one rank */
    double link_latency_s;      /* per message */
    double link_bandwidth;      /* bytes/s between neighbouring ranks */
    double allreduce_bandwidth; /* bytes/s of the replica all-reduce ring */
    double allreduce_latency_s; /* > 0: the replica all-reduce's latency per message
                                 * instead of link_latency_s (without a topology:
                                 * e.g. measured in this process, pw_forecast_calibrate_links) */
    int optim_state_floats;     /* 1 SGD, 2 AdamW */
    const int *cuts;            /* (optional) [stages x chunks + 1] the chunks' node
                                 * ranges (0 < ... < n_nodes) instead of
                                 * pw_partition_make(graph, chunks, FLOPS); not
                                 * checked: a caller's cached FLOP partition */
    int grad_groups;            /* K, the gradient groups a replica sums (pw_grad_groups'
                                 * per_replica); with K > 1 each rank pays K - 1
                                 * passes over its gradients per step (a group's sum
                                 * joins the pending sums, the gradients are zeroed:
                                 * stages/program/program.h) at group_pass_bandwidth */
    double group_pass_bandwidth;/* bytes of gradients per s such a pass covers; 0: free */
    int recompute;              /* activation recomputation: each backward re-runs
                                 * its chunk's forward first (B pays F again), and
                                 * a micro-batch in flight keeps only the chunk's
                                 * input */
    int64_t memory_budget;      /* bytes per rank; 0 = unlimited */
    pw_trace *trace;            /* (optional) record the simulated step */
    /* (optional) place the ranks on this topology and cost each link and
     * all-reduce from the placement (above) instead of the three link
     * figures; not owned. */
    hwloc_topology_t topology;
    int gpus;                   /* with a topology: PW_PLACE_GPUS_AUTO (default), 0 or 1 */
    double host_latency_s;      /* with a topology: links across hosts; < 0 (as
                                 * pw_forecast_defaults sets it): the default */
    double host_bandwidth;      /* likewise (bytes/s; 0 = infinite); < 0: the default */
    /* The replicas' gradient sum (replicas > 1): its algorithm
     * (pw_forecast_defaults: the ring), the hosts the
     * replicas span for the hierarchical one (0: one replica per host), and
     * the compression (kind none: fp32). Costed by pw_compress_model on each
     * chunk's parameter tensors over the all-reduce's link. */
    pw_allreduce_algo allreduce_algo;
    int hosts;
    pw_compress_config compress;
    /* > 0: the replicas synchronise through this many parameter servers
     * instead (--sync ps): per step a worker's link carries its gradients
     * out and a server's link the parameters of its shard to each of the R
     * workers, G/B + R·G/(K·B) + 2 latencies for a chunk of G bytes (the
     * servers' own update and the workers' waits are not in it); with
     * `compress` the push is its payload's bytes (pw_compress_model's
     * wire_bytes), the pull stays fp32; PowerSGD adds its replies, the
     * summed P and Q of each compressed matrix to each worker through the
     * server's link, and 2 latencies. */
    int ps_servers;
    /* Tensor parallelism: T ranks per stage (0 or 1: none). `graph` is then
     * one rank's graph (pw_graph_tp_rank(full, T, T - 1, ...): the last rank
     * holds the largest parts), so every FLOP, parameter and activation
     * above is one rank's; `cuts` (when given) are the full graph's (the
     * nodes are the same). Each rank takes its own slot of the placement,
     * a stage's T ranks consecutive (slot (replica x S + stage) x T + t),
     * and every tensor-parallel collective of a chunk's nodes (a tp=row
     * linear's and a tp=vocab embedding's output forward, a tp=column
     * linear's input gradient backward, the vocabulary-parallel
     * cross-entropy's five floats per row forward) is a ring all-reduce
     * over the T ranks at the class of the group's slowest hop (without a
     * topology: link_latency_s and link_bandwidth), added to F and B. */
    int tensor;
    /* 1 (T > 1): flops_per_s was measured on the T ranks running as a group
     * (pw_forecast_calibrate_group), their tensor-parallel sums inside it:
     * the all-reduces above are not costed again (tp_time 0). */
    int tp_in_rate;
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
    double allreduce_time;      /* s: the slowest stage's gradient all-reduce (0 for
                                 * one replica) */
    int allreduce_stage;        /* ... that stage */
    double tp_time;             /* s per micro-batch: the busiest stage's tensor-parallel
                                 * all-reduces, F and B (0 at T = 1) */
    int tp_cls;                 /* with a topology: the class of the slowest tensor-parallel
                                 * group's slowest hop */
    /* With a topology only (0 / NULL / "" without): */
    int n_hosts;                /* hosts the placement spans */
    int on_gpus;                /* ranks run on GPUs */
    int topology_copies;        /* copies of the topology it took (1: it fits) */
    int allreduce_cls;          /* class of the slowest all-reduce ring's slowest hop */
    int n_links;                /* chunk boundaries between different ranks */
    pw_forecast_link *links;    /* [n_links] */
    char placement[192];        /* "512 ranks (64 stages x 8 replicas) on 64 hosts: ..." */
    /* The pipeline it simulated, for callers that cost it further (the
     * layout search, stages/plan/layout.h, sizes memory from these): */
    int n_chunks;               /* stages x chunks per rank */
    int *cuts;                  /* [n_chunks + 1] chunk k runs nodes [cuts[k], cuts[k+1]):
                                 * pw_partition_make(graph, n_chunks, FLOPS), which is
                                 * also what a pipeline with partition `flops` runs */
    int *chunk_rank;            /* [n_chunks] the rank (stage) that runs chunk k */
    int *chunk_inflight;        /* [n_chunks] its peak in-flight micro-batches */
} pw_forecast;

pw_status pw_forecast_run(const pw_forecast_config *cfg, pw_forecast *out);
void pw_forecast_free(pw_forecast *f);

/* Simulates every applicable schedule; *best gets the fastest that fits
 * (PW_ERR_NOMEM naming the smallest need when none fits). `report`
 * (optional) receives one line per candidate and the reason for the choice. */
pw_status pw_forecast_auto(const pw_forecast_config *cfg, pw_forecast *best, FILE *report);

/* Calibration: the compute rate of this machine for cfg->graph, measured
 * as a one-stage pipeline runs it, so that forecasts start from what this
 * machine does rather than from a nominal FLOP/s figure. A whole-graph stage
 * program at cfg->micro_batch_size samples runs forward, backward for inputs
 * and backward for weights per micro-batch, in 1F1B's one-stage order, then
 * the optimizer (AdamW when optim_state_floats = 2, else SGD): one warm-up
 * micro-batch, then three rounds of min(2, micro_batches) micro-batches; the
 * fastest round (wall time), scaled to cfg->micro_batches, is one step (the
 * BLAS threads are the caller's: pw_cpu_set_threads). *flops_per_s is the
 * rate at which the forecast's cost model (graph FLOPs, and 4 FLOPs per
 * parameter for the optimizer) takes exactly that long for that step;
 * *step_s (optional) the measured step. Everything the per-op cost model
 * misses on this machine (cache misses between ops, per-op overheads, the
 * optimizer's memory traffic) is folded into that one rate, so a forecast
 * at it is exact for one stage here and carries the same ratio to other
 * stage counts; it says nothing about another machine. Inputs are zeros
 * (a valid token or class). PW_ERR_INVALID_ARG: no graph, counts < 1;
 * errors of pw_program_create (e.g. PW_ERR_NOMEM). */
pw_status pw_forecast_calibrate(const pw_forecast_config *cfg, double *flops_per_s, double *step_s);

/* The two halves of the calibration's measurement, for callers that need
 * the rate at several micro-batch counts: the fastest of the same three
 * rounds' time per micro-batch (forward, backward for inputs and weights)
 * in *micro_s and the fastest optimizer step in *optim_s, at
 * cfg->micro_batch_size samples and the caller's team size. The layout
 * search (stages/plan/layout.h) takes the rate of a step of M micro-batches
 * as its FLOPs over micro_s x M + optim_s. Errors as pw_forecast_calibrate. */
pw_status pw_forecast_calibrate_parts(const pw_forecast_config *cfg, double *micro_s, double *optim_s);

/* The same halves for `ranks` stage programs that run at once, each on its
 * own thread of this process, in step (a barrier before each round), with
 * the caller's team size (1 for ranks that share one team): cfg->tensor = T
 * > 1 and ranks = T: the T ranks of one tensor-parallel group, rank t
 * running pw_graph_tp_rank(cfg->graph, T, t) and summing through an
 * in-process group (stages/ops/tp.h), so its smaller GEMMs, the shared
 * caches and the real sums are in the time; T = 1: `ranks` copies of the
 * whole graph, for the rate of a rank while others compute beside it
 * (contention for caches and memory bandwidth). Per round the slowest
 * member's time, then the fastest of the three rounds; ranks = 1 is
 * pw_forecast_calibrate_parts. PW_ERR_INVALID_ARG (no graph, counts < 1,
 * ranks outside 1..256 or not T at T > 1), the rank graph's error (a T the
 * graph cannot split into), errors of pw_program_create. */
pw_status pw_forecast_calibrate_group(const pw_forecast_config *cfg, int ranks, double *micro_s, double *optim_s);

/* In-process links of this machine: ranks that are threads of one process
 * (the engine's workers, pinned as pipelines pin them). */
typedef struct pw_forecast_links {
    double handoff_s;           /* one message between two ranks' workers: a 2-stage no-op
                                 * pipeline's step less a 1-stage one's (16 micro-batches of
                                 * 1F1B), over the messages on its critical path (the
                                 * simulator's count) */
    double allreduce_latency_s; /* the replicas' sum of 2 as a ring, 2 (alpha + bytes / (2
                                 * beta)): alpha and beta fitted to a 2-replica no-op step with */
    double allreduce_bandwidth; /* 1 KiB and 4 MiB of gradients less the 1-stage step */
    double noop_step_s;         /* the 1-stage no-op step (the engine's per-step cost) */
    double two_stage_s;         /* the 2-stage one's */
    double sum_small_s, sum_big_s; /* the 2-replica ones' (1 KiB, 4 MiB) */
} pw_forecast_links;

/* Medians of 9 steps each (after 3 warm-ups) of four no-op engines; about
 * 0.1 s. Figures that come out negative (noise) are 0. PW_ERR_INVALID_ARG
 * (NULL), errors of the engine. */
pw_status pw_forecast_calibrate_links(pw_forecast_links *out);

/* Writes the simulated trace's metadata and events (cfg->trace must have
 * been set for the run). */
pw_status pw_forecast_write_trace(const pw_forecast_config *cfg, const pw_forecast *f,
                                  const char *path);

#ifdef __cplusplus
}
#endif
#endif
