/* pipeline-run --parallel auto (parallel.h). */
#include "parallel.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "runtime/pool.h"
#include "runtime/topology.h"
#include "stages/plan/plan.h"

/* A GPU rank's compute rate when no --flops-per-s is given: pipewright's
 * fp32 training on an H100 reached 31-42 TFLOP/s (docs/performance.md,
 * "CUDA backend on an H100"). */
#define GPU_FLOPS_DEFAULT 3e13

static double wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The machine's slots: GPUs (on_gpus) or cores, and the least memory of
 * its GPUs (*gpu_memory, 0 when unknown). 0, or 1 after the message. */
static int machine_slots(hwloc_topology_t topo, int this_machine, int *on_gpus, int *slots, int64_t *gpu_memory)
{
    pw_place_config pc = {.n_stages = 1, .n_replicas = 1, .gpus = this_machine ? 0 : PW_PLACE_GPUS_AUTO};
    pw_placement *pl = NULL;
    if (pw_place_stages(topo, &pc, &pl) != PW_OK) {
        fprintf(stderr, "pipeline-run: --parallel auto: %s\n", pw_last_error());
        return 1;
    }
    *on_gpus = pl->on_gpus;
    *slots = pl->on_gpus ? pl->n_gpus : pl->n_cores;
    *gpu_memory = 0;
    for (int g = 0; pl->on_gpus && g < pl->n_gpus; g++)
        if (pl->gpus[g].memory > 0 && (!*gpu_memory || pl->gpus[g].memory < *gpu_memory))
            *gpu_memory = pl->gpus[g].memory;
    pw_placement_destroy(pl);
    /* This machine: the cores this process may run on. */
    if (this_machine) *slots = pw_available_cores();
    return 0;
}

static void print_command(const pr_parallel_request *rq, const pw_layout *l)
{
    printf("run it: pipeline-run %s --batch %lld --stages %d --replicas %d --threads %d --micro-batches %d "
           "--schedule %s", rq->graph_path, (long long)rq->batch, l->stages, l->replicas, l->threads,
           l->micro_batches, pw_schedule_kind_name(l->schedule));
    if (l->tensor > 1) printf(" --tensor-parallel %d", l->tensor);
    if (l->schedule == PW_SCHEDULE_INTERLEAVED) printf(" --chunks-per-rank %d", l->chunks_per_rank);
    printf(" --partition flops%s%s\n", l->recompute ? " --recompute" : "",
           rq->optim == PW_OPTIM_ADAMW ? " --optimizer adamw" : "");
}

typedef struct machine {
    hwloc_topology_t topo;
    int on_gpus, slots;
    int64_t budget;
    int budget_is_gpu;           /* the budget is the GPUs' memory (the topology's) */
} machine;

/* Topology, slots and budget from the flags. 0 or the exit status. */
static int describe_machine(const pr_parallel_request *rq, machine *m)
{
    memset(m, 0, sizeof *m);
    if (rq->memory_budget && (strchr(rq->memory_budget, ',') || pw_parse_bytes(rq->memory_budget, &m->budget) != PW_OK ||
                              m->budget <= 0)) {
        fprintf(stderr, "pipeline-run: --memory-budget: --parallel auto takes one size per rank (e.g. 2G), not "
                "'%s'\n", rq->memory_budget);
        return 2;
    }
    const int here = !rq->topology || !strcmp(rq->topology, "this");
    if (pw_topology_load_spec(here ? "this" : rq->topology, &m->topo) != PW_OK) {
        fprintf(stderr, "pipeline-run: --topology: %s\n", pw_last_error());
        return 1;
    }
    int64_t gpu_memory = 0;
    int rc = machine_slots(m->topo, here, &m->on_gpus, &m->slots, &gpu_memory);
    /* One rank per GPU: its memory is the budget unless one is given. */
    if (!rc && !m->budget && gpu_memory > 0) m->budget = gpu_memory, m->budget_is_gpu = 1;
    return rc;
}

int pr_parallel_auto(const pr_parallel_request *rq, pw_layout *chosen)
{
    const double t0 = wall_s();
    const int here = !rq->topology || !strcmp(rq->topology, "this");
    machine m;
    int rc = describe_machine(rq, &m);
    if (rc) {
        if (m.topo) hwloc_topology_destroy(m.topo);
        return rc;
    }
    pw_layout_space sp = rq->pins;
    sp.batch = rq->batch;
    sp.processes = rq->processes > 0 ? rq->processes : m.slots;
    sp.cores = m.on_gpus ? 0 : m.slots;
    /* In one process the ranks are threads that share one CPU team. */
    sp.shared_team = here && rq->processes == 0;
    sp.n_nodes = rq->graph->n_nodes;
    /* T > 1 only where the graph marks what to split; at most the
     * pipeline's 64 ranks per group (pw_pipeline_config.tensor_parallel). */
    sp.max_tensor = pw_graph_tp_marked(rq->graph) ? (sp.processes < 64 ? sp.processes : 64) : 1;

    pw_layout_forecast_config fc = pw_layout_forecast_defaults();
    fc.graph = rq->graph;
    fc.batch = rq->batch;
    fc.optim = rq->optim;
    fc.grad_groups = rq->grad_groups;
    fc.topology = m.topo;
    fc.flops_per_s = rq->flops_per_s > 0 ? rq->flops_per_s : m.on_gpus ? GPU_FLOPS_DEFAULT : 0;
    fc.log = rq->quiet ? NULL : stdout;
    fc.in_process = sp.shared_team; /* ranks as threads: measure their links and contention */
    if (!rq->quiet) {
        printf("pipeline-run: --parallel auto: graph %s, batch %lld, at most %d rank%s on %s (%d %s%s)%s\n",
               rq->graph->name, (long long)rq->batch, sp.processes, sp.processes > 1 ? "s" : "",
               here ? "this machine" : rq->topology, m.slots, m.on_gpus ? "GPU" : "core", m.slots > 1 ? "s" : "",
               sp.shared_team ? ", ranks are threads of this process" : "");
        if (rq->flops_per_s > 0) printf("  compute: %.3g FLOP/s per rank (--flops-per-s)\n", fc.flops_per_s);
        else if (m.on_gpus)
            printf("  compute: %.3g FLOP/s per GPU rank, nominal (pipewright's fp32 training on an H100); set "
                   "--flops-per-s\n", fc.flops_per_s);
        else
            printf("  compute: measured here per thread count and micro-batch size (pw_forecast_calibrate)%s\n",
                   here ? "" : ", taking that machine's cores to be like this one's");
        if (m.budget_is_gpu) {
            char b[32];
            printf("  memory: %s per rank, the topology's GPU memory (set --memory-budget to change)\n",
                   pw_format_bytes((double)m.budget, b, sizeof b));
        }
        if (fc.in_process && !(fc.flops_per_s > 0))
            printf("  links: measured here between this process's threads (hand-offs and the replicas' sum), "
                   "ranks that compute at once measured together\n");
        else
            printf("  links: from the placement on %s, default figures per link class (docs/schedules.md)\n",
                   here ? "this machine's topology" : rq->topology);
        fflush(stdout);
    }
    pw_layout_forecaster *f = NULL;
    pw_layout_result res;
    memset(&res, 0, sizeof res);
    int64_t *mem = NULL;
    rc = 1;
    if (pw_layout_forecaster_create(&fc, &f) != PW_OK) {
        fprintf(stderr, "pipeline-run: --parallel auto: %s\n", pw_last_error());
        goto out;
    }
    pw_layout_model model = pw_layout_forecaster_model(f);
    if (pw_layout_search(&sp, &model, m.budget, &res) != PW_OK) {
        fprintf(stderr, "pipeline-run: --parallel auto: %s\n", pw_last_error());
        goto out;
    }
    if (pw_layout_forecaster_recheck(f, 0.25)) { /* the machine changed speed: once more */
        pw_layout_result_free(&res);
        if (pw_layout_search(&sp, &model, m.budget, &res) != PW_OK) {
            fprintf(stderr, "pipeline-run: --parallel auto: %s\n", pw_last_error());
            goto out;
        }
    }
    pw_layout_cost_more(&model, &res, 5); /* runners-up to show beside the choice */
    const int S = res.best.stages;
    mem = calloc((size_t)S, sizeof *mem);
    if (!mem || pw_layout_forecaster_memory(f, &res.best, mem, S) != PW_OK) {
        free(mem);
        mem = NULL;
        pw_clear_error();
    }
    if (!rq->quiet) {
        double meas_s = 0;
        const int n_meas = pw_layout_forecaster_measurements(f, &meas_s);
        pw_layout_print(stdout, &res, 5, mem, mem ? S : 0);
        print_command(rq, &res.best);
        printf("planned in %.2f s", wall_s() - t0);
        if (n_meas) printf(" (%.2f s measuring: %d measurement%s)", meas_s, n_meas, n_meas > 1 ? "s" : "");
        printf("\n");
        fflush(stdout);
    }
    *chosen = res.best;
    rc = 0;
out:
    free(mem);
    pw_layout_result_free(&res);
    pw_layout_forecaster_destroy(f);
    hwloc_topology_destroy(m.topo);
    return rc;
}
