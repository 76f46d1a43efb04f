/* pipewright — CPU topology and thread placement (hwloc). See topology.h. */
#include "runtime/topology.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"

pw_status pw_topology_load(hwloc_topology_t *out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_topology_load: out is NULL");
    *out = NULL;
    hwloc_topology_t t;
    if (hwloc_topology_init(&t) != 0)
        return pw_error(PW_ERR_UNSUPPORTED, "hwloc: cannot initialise a topology: %s", strerror(errno));
    if (hwloc_topology_load(t) != 0) {
        int err = errno;
        hwloc_topology_destroy(t);
        return pw_error(PW_ERR_UNSUPPORTED, "hwloc: cannot read this machine's topology: %s",
                        strerror(err));
    }
    *out = t;
    return PW_OK;
}

pw_status pw_topology_load_synthetic(const char *desc, hwloc_topology_t *out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_topology_load_synthetic: out is NULL");
    *out = NULL;
    if (!desc) return pw_error(PW_ERR_INVALID_ARG, "pw_topology_load_synthetic: description is NULL");
    hwloc_topology_t t;
    if (hwloc_topology_init(&t) != 0)
        return pw_error(PW_ERR_UNSUPPORTED, "hwloc: cannot initialise a topology: %s", strerror(errno));
    if (hwloc_topology_set_synthetic(t, desc) != 0) {
        hwloc_topology_destroy(t);
        return pw_error(PW_ERR_INVALID_ARG, "hwloc: bad synthetic topology '%s'", desc);
    }
    if (hwloc_topology_load(t) != 0) {
        int err = errno;
        hwloc_topology_destroy(t);
        return pw_error(PW_ERR_INVALID_ARG, "hwloc: cannot load synthetic topology '%s': %s", desc,
                        strerror(err));
    }
    *out = t;
    return PW_OK;
}

void pw_cpu_placement_destroy(pw_cpu_placement *p)
{
    if (!p) return;
    for (int r = 0; p->cpusets && r < p->n_ranks; r++) hwloc_bitmap_free(p->cpusets[r]);
    free(p->cpusets);
    free(p->core);
    free(p);
}

pw_status pw_cpu_place_ranks(hwloc_topology_t topo, int n_ranks, pw_cpu_placement **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_cpu_place_ranks: out is NULL");
    *out = NULL;
    if (!topo) return pw_error(PW_ERR_INVALID_ARG, "pw_cpu_place_ranks: topology is NULL");
    if (n_ranks < 1) return pw_error(PW_ERR_INVALID_ARG, "pw_cpu_place_ranks: %d ranks", n_ranks);

    /* Cores in logical order: hwloc numbers objects of one type in a
     * depth-first walk, so consecutive indices share the deepest common
     * ancestor available (core 0..3 sit in package 0 on "pack:2 core:4"). */
    hwloc_obj_type_t type = HWLOC_OBJ_CORE;
    int n = hwloc_get_nbobjs_by_type(topo, type);
    if (n <= 0) {
        type = HWLOC_OBJ_PU;
        n = hwloc_get_nbobjs_by_type(topo, type);
    }
    if (n <= 0) return pw_error(PW_ERR_UNSUPPORTED, "hwloc: the topology has no cores or PUs");

    pw_cpu_placement *p = calloc(1, sizeof *p);
    if (!p) return pw_error(PW_ERR_NOMEM, "placement: out of memory");
    p->n_ranks = n_ranks;
    p->n_cores = n;
    p->core = calloc((size_t)n_ranks, sizeof *p->core);
    p->cpusets = calloc((size_t)n_ranks, sizeof *p->cpusets);
    if (!p->core || !p->cpusets) goto nomem;
    for (int r = 0; r < n_ranks; r++) {
        int idx = r % n;
        hwloc_obj_t obj = hwloc_get_obj_by_type(topo, type, (unsigned)idx);
        p->core[r] = idx;
        p->cpusets[r] = obj && obj->cpuset ? hwloc_bitmap_dup(obj->cpuset) : hwloc_bitmap_alloc();
        if (!p->cpusets[r]) goto nomem;
    }
    if (n_ranks > n) {
        p->shared = 1;
        snprintf(p->note, sizeof p->note, "%d ranks on %d %s: ranks share %s", n_ranks, n,
                 type == HWLOC_OBJ_CORE ? (n == 1 ? "core" : "cores") : (n == 1 ? "PU" : "PUs"),
                 type == HWLOC_OBJ_CORE ? "cores" : "PUs");
    }
    *out = p;
    return PW_OK;
nomem:
    pw_cpu_placement_destroy(p);
    return pw_error(PW_ERR_NOMEM, "placement: out of memory for %d ranks", n_ranks);
}

int pw_cpu_bind_thread(hwloc_topology_t topo, hwloc_const_cpuset_t set, const char *who)
{
    if (!topo || !set || hwloc_bitmap_iszero(set)) {
        PW_WARN("%s: no CPU set to bind to; running unpinned", who ? who : "thread");
        return -1;
    }
    if (hwloc_set_cpubind(topo, set, HWLOC_CPUBIND_THREAD) == 0) {
        PW_INFO(PW_SUB_TOPO, "%s: bound", who ? who : "thread");
        return 0;
    }
    int err = errno;
    char *list = NULL;
    hwloc_bitmap_list_asprintf(&list, set);
    PW_WARN("%s: binding to PU(s) %s refused (%s); running unpinned", who ? who : "thread",
            list ? list : "?", strerror(err));
    free(list);
    return -1;
}
