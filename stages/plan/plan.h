/* pipewright — the pipeline plan: partition + schedule + placement, printed.
 *
 * `pipeline-run --plan` builds one of these and prints it: which nodes each
 * stage runs, its predicted forward / backward / weight time and optimizer
 * update (once per step; the simulator's OPTIM), memory against
 * its budget, the bytes it sends per micro-batch, the device and cores it is
 * placed on, the predicted bottleneck, step time and bubble.
 *
 *     pw_plan_config pc = pw_plan_defaults();
 *     pc.graph = g; pc.stages = 4; pc.micro_batches = 8; pc.micro_batch_size = 16;
 *     pc.schedule = PW_SCHEDULE_1F1B;
 *     pc.balance = PW_BALANCE_TIME; pc.profile = prof;       // stages/plan/profile.h
 *     pc.memory_budget = 2ll << 30;
 *     pc.topology = topo;                                   // runtime/topology.h
 *     pw_plan *plan = NULL;
 *     if (pw_plan_make(&pc, &plan) != PW_OK) {
 *         fprintf(stderr, "%s\n", pw_last_error());         // e.g. stage 0 does not fit
 *         return 1;
 *     }
 *     pw_plan_print(stdout, plan);
 *     // train on the plan's cuts (stages/train/pipeline.h):
 *     //   pipe_cfg.cuts = plan->part.begin; pipe_cfg.n_cuts = plan->n_stages + 1;
 *     pw_plan_destroy(plan);
 *
 * What it does: the schedule (generated, or a user's CSV) is validated to
 * get each stage's peak in-flight micro-batches; pw_partition_plan chooses
 * the cuts under the memory budget with those counts; the simulator
 * (scheduler/simulate.h) replays one step of the schedule with the
 * predicted stage times to give the step time and bubble; the placement
 * (pw_place_stages) maps the stages onto the topology. When nothing fits
 * and the devices are uniform, the error also says how many stages would.
 *
 * GPUs. On a topology with GPUs (an lstopo XML with its CUDA devices) or
 * with gpu_list (this machine's CUDA devices, pipeline-run --device cuda),
 * the stages are placed on GPUs first, and each stage's memory budget is
 * its GPU's memory (gpu_memory when given; the XML's CUDAGlobalMemorySize;
 * the caller's free memory) shared by the ranks on that GPU — unless
 * devices or memory_budget say otherwise. The table then shows each
 * stage's GPU, its PCI id, its cores and its budget, and a list of the GPUs.
 * docs/partition.md has the model and the flags.
 *
 * Ownership and threads: pw_plan_make borrows its config (graph, profile,
 * devices, topology, GPU list) and returns a new plan owned by the caller
 * (pw_plan_destroy); the plan may point at the config's strings and device
 * specs, so keep them until the plan is destroyed. Plans share nothing;
 * several threads may plan at once (each with its own topology handle:
 * hwloc topologies are not shared here).
 */
#ifndef PW_STAGES_PLAN_H
#define PW_STAGES_PLAN_H

#include <stdint.h>
#include <stdio.h>

#include "graph/graph.h"
#include "graph/partition.h"
#include "runtime/status.h"
#include "runtime/topology.h"
#include "scheduler/schedule.h"
#include "stages/ops/optim.h"
#include "stages/plan/profile.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pw_plan_config {
    const pw_graph *graph;
    int stages;                      /* S >= 1 */
    int replicas;                    /* data-parallel copies (placement); 0 means 1 */
    int micro_batches;               /* M >= 1 */
    int64_t micro_batch_size;        /* samples per micro-batch (batch / M), >= 1 */
    pw_schedule_kind schedule;       /* gpipe, 1f1b, zb-h1, zb-h2 (one stage per rank) */
    int split_w;                     /* gpipe / 1f1b: split the backward into B and W */
    const pw_schedule *custom;       /* (optional) a loaded CSV schedule instead of
                                        `schedule`: one chunk per rank, S ranks, M
                                        micro-batches; validated here */
    pw_partition_method method;      /* auto, cuts, balanced, flops */
    pw_balance balance;              /* flops (analytic) or time (needs profile) */
    const pw_profile *profile;       /* measured op times (pw_profile_load_or_measure) */
    double flops_per_s;              /* analytic rate of a speed-1 device; 0: 1e10 */
    const pw_device_spec *devices;   /* (optional) [stages]: speed and memory per stage */
    int64_t memory_budget;           /* bytes per stage where devices say none; 0: unlimited */
    double link_bandwidth;           /* bytes/s between neighbouring stages; 0: infinite */
    double link_latency;             /* s per message */
    pw_optim_kind optim;             /* sizes the optimizer state and its update
                                        time (the profile must be measured for it) */
    int recompute;                   /* plan with activation recomputation */
    int grad_groups;                 /* the pipeline's (pw_grad_groups; 0: its
                                        default): sizes the gradients' group sums */
    hwloc_topology_t topology;       /* (optional) place the stages on it */
    const char *topology_name;       /* (optional) for the header: "2socket_8gpu.xml" */
    int cores_per_rank;              /* placement: 0: an equal share (pw_place_config) */
    int gpus;                        /* placement: PW_PLACE_GPUS_AUTO, 0 or 1 */
    const pw_gpu_desc *gpu_list;     /* (optional) [n_gpu_list] place on these GPUs (this
                                        machine's CUDA devices, in device order, with their
                                        free memory) instead of the topology's; needs
                                        `topology` for their cores */
    int n_gpu_list;
    int64_t gpu_memory;              /* > 0: bytes of every GPU, instead of what the
                                        topology (CUDAGlobalMemorySize) or gpu_list says */
} pw_plan_config;

/* Zeroed, with schedule 1f1b, method auto, balance flops, optimizer SGD,
 * gpus PW_PLACE_GPUS_AUTO, one replica. */
pw_plan_config pw_plan_defaults(void);

typedef struct pw_plan {
    const pw_graph *graph;           /* borrowed */
    pw_partition part;               /* the cuts and per-stage predictions;
                                        part.step_time / part.bubble are the
                                        simulated ones below */
    int n_stages, n_replicas, micro_batches;
    int64_t micro_batch_size;
    char schedule[64];               /* "1f1b", "zb-h1", "gpipe (split W)", "custom CSV" */
    int *inflight;                   /* [n_stages] peak in-flight micro-batches */
    double step_time;                /* s: simulated synchronous step */
    double bubble;                   /* its idle share */
    double theory_bubble;            /* the schedule's bubble with equal stages; -1 unknown */
    pw_balance balance;
    char source[300];                /* where the op times come from */
    double link_bandwidth, link_latency;
    pw_optim_kind optim;
    int optim_state_floats, recompute;
    int64_t memory_budget;
    const pw_device_spec *devices;   /* borrowed from the config, the GPUs' budgets
                                        (gpu_budgets), or NULL */
    pw_placement *place;             /* NULL without a topology */
    pw_device_spec *gpu_budgets;     /* [n_stages] owned, or NULL: on GPUs whose memory is
                                        known, without devices or memory_budget in the
                                        config, stage s's budget is its GPU's memory
                                        divided among the ranks placed on that GPU */
    char (*gpu_names)[96];           /* [n_stages] their names for messages ("cuda0") */
    int64_t gpu_memory;              /* the config's, 0 */
    char topology[128];              /* its name for the header, "" */
} pw_plan;

/* The partitioner's configuration the plan uses for `c` cut into S stages
 * with inflight[S] activation slots each (balance, op times, devices,
 * budget, links, optimizer state and update, recompute, the gradient
 * group sums): for callers that partition under the same model with other
 * devices (stages/plan/rebalance.c). */
void pw_plan_partition_config(const pw_plan_config *c, int S, const int *inflight, pw_partition_config *pc);

/* Builds the plan. PW_OK: *out is new (pw_plan_destroy). Errors (*out NULL):
 * PW_ERR_INVALID_ARG (counts, a profile for another graph or micro-batch,
 * balance time without a profile; a profile measured for another optimizer
 * is used, and the `op times:` line says so), PW_ERR_UNSUPPORTED (interleaved, zb-v or dualpipev:
 * several chunks per rank; a topology without what `gpus` asks),
 * PW_ERR_SCHEDULE (a custom schedule that does not validate), PW_ERR_NOMEM
 * (no split fits: pw_partition_plan's message, plus "N stages would fit"
 * when more stages on the same devices would). */
pw_status pw_plan_make(const pw_plan_config *cfg, pw_plan **out);
void pw_plan_destroy(pw_plan *p); /* accepts NULL */

/* The table (docs/partition.md shows one). PW_ERR_IO on a write error. */
pw_status pw_plan_print(FILE *f, const pw_plan *p);

/* ------------------------------------------- this machine's devices */

typedef struct pw_plan_local pw_plan_local;

/* Points `pc` at this machine for a run on `device` (a backend device
 * string, stages/ops/backend.h: "cuda" every GPU, "cuda:N" GPU N): loads
 * this machine's topology and describes each device through the backend
 * table (device_count; device_pci, for the cores near it; device_info: its
 * model and free memory), then sets pc->topology, topology_name ("this
 * machine"), gpu_list (named "cuda0", ... by device index) and n_gpu_list.
 * A backend without device memory (the CPU) changes nothing: *out is NULL
 * and PW_OK. Otherwise *out owns what pc points at: destroy it after the
 * plan (pw_plan_destroy). Errors (pc unchanged, *out NULL): pw_backend_find's;
 * PW_ERR_UNSUPPORTED when the backend has no device (or cannot describe
 * them); the backend's own query errors; the topology's. Queries the
 * devices: call it from one thread. */
pw_status pw_plan_local_devices(const char *device, pw_plan_config *pc, pw_plan_local **out);
void pw_plan_local_destroy(pw_plan_local *l); /* accepts NULL */

/* ------------------------------------------------------ flag helpers */

/* "4096", "512K", "1.5G", "2GiB", "64MB": K, M, G, T (with or without
 * "B" / "iB") are powers of 1024. PW_ERR_INVALID_ARG names the string. */
pw_status pw_parse_bytes(const char *s, int64_t *out);

/* One device per stage from comma lists: speeds "1,1,2,2" (relative, > 0)
 * and memory "8G,8G,16G,16G" (pw_parse_bytes); either may be NULL, and a
 * single value applies to every stage. PW_OK: *out is a new array of
 * n_stages (free()). PW_ERR_INVALID_ARG: "device speeds: 3 values for 4
 * stages" or a bad value, named. */
pw_status pw_plan_parse_devices(const char *speeds, const char *memory, int n_stages,
                                pw_device_spec **out);

#ifdef __cplusplus
}
#endif
#endif
