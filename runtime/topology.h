/* pipewright — CPU topology and thread placement (hwloc).
 *
 * Placement is pure, binding is a side effect (docs/engine.md, "Pinning"):
 * pw_cpu_place_ranks computes, from a loaded hwloc topology alone, which
 * cores each pipeline rank's worker thread should run on; pw_cpu_bind_thread
 * applies one rank's placement to the calling thread. Tests run the placement
 * on synthetic topologies of machines we do not have:
 *
 *     hwloc_topology_t topo;
 *     PW_CHECK(pw_topology_load_synthetic("pack:2 core:4 pu:2", &topo));
 *     pw_cpu_placement *pl;
 *     PW_CHECK(pw_cpu_place_ranks(topo, 4, &pl));
 *     // pl->core[r]: logical core index of rank r; pl->cpusets[r]: its PUs
 *     if (pl->note[0]) PW_WARN("%s", pl->note);   // ranks share cores
 *     ...
 *     // on rank r's own thread:
 *     pw_cpu_bind_thread(topo, pl->cpusets[r], "rank 2");  // warns if refused
 *     pw_cpu_placement_destroy(pl);
 *     hwloc_topology_destroy(topo);
 *
 * The rule. Rank r gets core r (cores in hwloc's logical order, which walks
 * the machine depth-first: neighbouring ranks, which exchange every
 * micro-batch, land on neighbouring cores of the same package and cache).
 * With more ranks than cores the ranks share cores round-robin (rank r on
 * core r mod cores) and the placement carries the note "4 ranks on 2 cores:
 * ranks share cores". A topology without core objects places on PUs.
 */
#ifndef PW_RUNTIME_TOPOLOGY_H
#define PW_RUNTIME_TOPOLOGY_H

#include <hwloc.h>

#include "runtime/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Loads this machine's topology (the cores this process may use).
 * PW_OK: *out must be freed with hwloc_topology_destroy. PW_ERR_UNSUPPORTED
 * when hwloc cannot read the machine; *out is NULL. */
pw_status pw_topology_load(hwloc_topology_t *out);

/* Builds a synthetic topology from an hwloc description ("pack:2 core:4
 * pu:2"). PW_ERR_INVALID_ARG names a description hwloc refuses. */
pw_status pw_topology_load_synthetic(const char *desc, hwloc_topology_t *out);

typedef struct pw_cpu_placement {
    int n_ranks;
    int n_cores;              /* cores (or PUs, when the topology has no cores) placed on */
    int shared;               /* 1: more ranks than cores, ranks share round-robin */
    int *core;                /* [n_ranks] logical index of rank r's core */
    hwloc_bitmap_t *cpusets;  /* [n_ranks] the PUs of that core */
    char note[96];            /* "4 ranks on 2 cores: ranks share cores", or "" */
} pw_cpu_placement;

/* Pure: computes the placement of n_ranks worker threads on `topo` (see
 * the rule above); logs nothing and binds nothing. PW_OK: *out is new, free
 * it with pw_cpu_placement_destroy. PW_ERR_INVALID_ARG: topo NULL or
 * n_ranks < 1. PW_ERR_NOMEM. */
pw_status pw_cpu_place_ranks(hwloc_topology_t topo, int n_ranks, pw_cpu_placement **out);
void pw_cpu_placement_destroy(pw_cpu_placement *p); /* accepts NULL */

/* Side effect: binds the calling thread to `set` (hwloc_set_cpubind with
 * HWLOC_CPUBIND_THREAD). Returns 0 when bound. When the system refuses
 * (containers, restricted cpusets) it logs one PW_WARN naming `who` and the
 * PUs, and returns -1: the thread simply runs unpinned; never an error. */
int pw_cpu_bind_thread(hwloc_topology_t topo, hwloc_const_cpuset_t set, const char *who);

#ifdef __cplusplus
}
#endif
#endif
