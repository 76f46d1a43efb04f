/* pipewright — where a pw_pipeline's chunks live: NUMA binding of their
 * memory, the GPU each runs on, and message buffers in device or
 * page-locked memory. */
#include "stages/train/pipeline-internal.h"

const char **pl_worker_gpu_pci(const pw_pipeline *pl)
{
    const pw_backend_i *be;
    int idx;
    if (pl->t || pw_backend_find(pl->cfg.device, &be, &idx) != PW_OK || !be->device_pci) return NULL;
    const int NW = pl->NRL * pl->S;
    const int n = idx < 0 && be->device_count ? be->device_count() : 1;
    const char **ids = calloc((size_t)NW, sizeof *ids + 16);
    if (!ids) return NULL;
    char *text = (char *)(ids + NW);
    for (int w = 0; w < NW; w++) {
        int dev = idx >= 0 ? idx : n >= 2 ? (w % pl->S) % n : 0;
        ids[w] = text + (size_t)16 * (size_t)w;
        if (be->device_pci(dev, text + (size_t)16 * (size_t)w, 16) != PW_OK) {
            PW_WARN("pipeline: %s; workers bind by the CPU rule", pw_last_error());
            free(ids);
            return NULL;
        }
    }
    return ids;
}

/* Stage memory on its worker's NUMA node: each program's arena (and the
 * links between a stage's pieces) is bound to the node(s) of the core the
 * engine pins the stage's worker to, by the engine's own rule
 * (pw_cpu_place_pipeline: worker k·S + rank; pw_cpu_place_ranks with this
 * process's local rank under a transport; pw_cpu_place_gpus near each
 * worker's GPU when gpu_pci is given and the GPUs are in the topology).
 * One NUMA node: nothing to do (said at PW_DEBUG=INFO).
 * A refusal warns once (pw_mem_bind_area) and leaves the rest unbound. */
void pl_bind_stage_memory(pw_pipeline *pl, const char *const *gpu_pci)
{
    const pw_transport *t = pl->t;
    hwloc_topology_t topo = NULL;
    pw_cpu_placement *place = NULL;
    if (!t && gpu_pci) {
        /* Host memory of GPU stages (messages, links) near the GPU's cores. */
        if (pw_topology_load_spec("this", &topo) != PW_OK) return;
        if (pw_cpu_place_gpus(topo, pl->NRL * pl->S, gpu_pci, &place) != PW_OK) {
            hwloc_topology_destroy(topo); /* the engine says why, once */
            topo = NULL;
        }
    }
    if (!topo && pw_topology_load(&topo) != PW_OK) return; /* the engine warns about pinning */
    if (hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE) < 2) {
        PW_INFO(PW_SUB_MEM, "pipeline: one NUMA node; stage memory is not bound");
        goto out;
    }
    int n = pl->NRL * pl->S, first = 0;
    /* As the engine places this process's worker (one rule for both). A
     * process mpirun or taskset has bound keeps its binding: its memory
     * follows it by first touch. */
    if (t && pw_transport_host_place(t, topo, &first, &n)) {
        PW_INFO(PW_SUB_MEM, "pipeline: this process is already bound (mpirun or taskset); its stage memory "
                "follows that binding");
        goto out;
    }
    if (!place &&
        (t ? pw_cpu_place_ranks(topo, n, &place) : pw_cpu_place_pipeline(topo, pl->S, pl->NRL, &place)) != PW_OK)
        goto out;
    for (int k = 0; k < pl->NRL; k++)
        for (int ch = 0; ch < pl->C; ch++) {
            if (!stage_here(pl, ch)) continue;
            const int slot = t ? first : k * pl->S + pw_schedule_rank_of(pl->sched, ch);
            gstage *gs = stage_at(pl, k, ch);
            char who[64];
            snprintf(who, sizeof who, "stage %d (replica %d) memory", ch, t ? t->replica : k);
            for (int j = 0; j < gs->n_pieces; j++)
                if (pw_program_bind_memory(gs->piece[j], topo, place->nodesets[slot], who) != 0) goto out;
            if (pw_mem_bind_area(topo, gs->links, gs->link_bytes, place->nodesets[slot], who) != 0) goto out;
        }
out:
    pw_cpu_placement_destroy(place);
    if (topo) hwloc_topology_destroy(topo);
}

/* Whether every chunk of this process computes on one device of a backend
 * that can hold the messages (stages/ops/backend.h, message_alloc): then they
 * live there and a hand-over between stages never crosses to the host. */
int pl_messages_on_device(pw_pipeline *pl)
{
    const pw_backend_i *be;
    int idx, dev = -1;
    if (pl->t || pw_backend_find(pl->cfg.device, &be, &idx) != PW_OK || !be->message_alloc)
        return 0;
    for (int ch = 0; ch < pl->C; ch++) {
        if (!stage_here(pl, ch)) continue;
        char buf[64];
        const pw_backend_i *b;
        int i;
        if (pw_backend_find(pl_chunk_device(pl, ch, buf, sizeof buf), &b, &i) != PW_OK || b != be) return 0;
        if (i < 0) i = 0;
        if (dev >= 0 && i != dev) return 0;
        dev = i;
    }
    pl->dev_msgs = be;
    pl->msg_device = dev < 0 ? 0 : dev;
    return 1;
}

pw_status pl_msgs_alloc(void *arg, size_t bytes, void **base)
{
    pw_pipeline *pl = arg;
    return pl->dev_msgs->message_alloc(pl->msg_device, bytes, base);
}

void pl_msgs_free(void *arg, void *base) { ((pw_pipeline *)arg)->dev_msgs->message_free(base); }

/* A device pipeline page-locks the engine's message buffers once: the
 * programs download what they send into them and upload what they receive
 * from them, and from pageable memory a download waits for the device
 * (the worker would block inside every action that sends). A refusal
 * leaves them pageable: slower, still correct. */
void pl_pin_messages(pw_pipeline *pl)
{
    const pw_backend_i *be;
    int idx;
    if (pw_backend_find(pl->cfg.device, &be, &idx) != PW_OK || !be->host_register) return;
    void *base;
    size_t bytes;
    pw_engine_message_memory(pl->engine, &base, &bytes);
    if (!bytes) return;
    if (be->host_register(base, bytes) != PW_OK) {
        PW_WARN("pipeline: message buffers (%zu bytes) stay pageable: %s", bytes, pw_last_error());
        return;
    }
    pl->msg_pinned = base;
    pl->msg_backend = be;
}

/* A device backend (CUDA) runs the stage programs; what the pipeline does
 * with gradients on the host between processes or replicas (the all-reduce,
 * the processes' messages) is not wired to device memory yet: refused up
 * front. (Clipping and tied gradients go through host copies.) */
pw_status pl_check_device(const pw_pipeline_config *c, int NR)
{
    const pw_backend_i *be;
    int dev;
    PW_CHECK(pw_backend_find(c->device, &be, &dev));
    if (!be->device_memory) return PW_OK;
    const char *no = c->transport ? "several processes (MPI; the NCCL transport is not written yet)"
                     : NR > 1 && !be->span_memory ? "--replicas > 1 (its all-reduce cannot reach the gradients)"
                     : NULL;
    if (no)
        return pw_error(PW_ERR_UNSUPPORTED, "device '%s': %s is not supported on %s yet (docs/cuda.md)",
                        c->device, no, be->name);
    return PW_OK;
}
