/* pipewright — a plan on this machine's devices (stages/plan/plan.h,
 * pw_plan_local_devices): the devices described through the backend table,
 * so that planning never links a device library. */
#include <stdio.h>
#include <stdlib.h>

#include "stages/ops/backend.h"
#include "stages/plan/plan.h"

struct pw_plan_local {
    hwloc_topology_t topo;
    pw_gpu_desc *gpus;         /* [n] what pc->gpu_list points at */
    struct gpu_text { char name[16], pci[16], model[256]; } *text; /* [n] their strings */
    int n;
};

void pw_plan_local_destroy(pw_plan_local *l)
{
    if (!l) return;
    if (l->topo) hwloc_topology_destroy(l->topo);
    free(l->gpus);
    free(l->text);
    free(l);
}

/* Describes devices first .. first+n-1 of `be` into l. */
static pw_status describe(const pw_backend_i *be, int first, pw_plan_local *l)
{
    for (int k = 0; k < l->n; k++) {
        pw_device_info info;
        struct gpu_text *t = &l->text[k];
        PW_CHECK(be->device_info(first + k, &info));
        PW_CHECK(be->device_pci(first + k, t->pci, sizeof t->pci));
        snprintf(t->name, sizeof t->name, "%s%d", be->name, first + k);
        snprintf(t->model, sizeof t->model, "%s", info.name);
        l->gpus[k] = (pw_gpu_desc){.pci = t->pci, .name = t->name, .model = t->model, .memory = info.free_memory};
    }
    return PW_OK;
}

pw_status pw_plan_local_devices(const char *device, pw_plan_config *pc, pw_plan_local **out)
{
    *out = NULL;
    const pw_backend_i *be;
    int dev;
    PW_CHECK(pw_backend_find(device, &be, &dev));
    if (!be->device_memory) return PW_OK;
    if (!be->device_info || !be->device_pci)
        return pw_error(PW_ERR_UNSUPPORTED, "backend %s cannot describe its devices for a plan", be->name);
    const int count = be->device_count ? be->device_count() : 1;
    if (count <= 0) return pw_error(PW_ERR_UNSUPPORTED, "no %s device on this machine", be->name);
    pw_plan_local *l = calloc(1, sizeof *l);
    if (l) {
        l->n = dev >= 0 ? 1 : count;
        l->gpus = calloc((size_t)l->n, sizeof *l->gpus);
        l->text = calloc((size_t)l->n, sizeof *l->text);
    }
    if (!l || !l->gpus || !l->text) {
        pw_plan_local_destroy(l);
        return pw_error(PW_ERR_NOMEM, "out of memory");
    }
    pw_status st = describe(be, dev >= 0 ? dev : 0, l);
    if (st == PW_OK) st = pw_topology_load_spec("this", &l->topo);
    if (st != PW_OK) {
        pw_plan_local_destroy(l);
        return st;
    }
    pc->topology = l->topo;
    pc->topology_name = "this machine";
    pc->gpu_list = l->gpus;
    pc->n_gpu_list = l->n;
    *out = l;
    return PW_OK;
}
