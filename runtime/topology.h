/* pipewright — CPU/GPU topology, stage placement and binding (hwloc).
 *
 * Placement is pure, binding is a side effect (STYLE.md §8, docs/engine.md
 * "Pinning", docs/partition.md "Placement"). A placement is computed from a
 * loaded hwloc topology alone, so tests and `pipeline-run --plan --topology`
 * plan for machines we do not have: a synthetic description, or an XML file
 * written by `lstopo --of xml` (with its GPUs). Binding the calling thread or
 * an allocation is separate and degrades to one warning where refused.
 *
 *     hwloc_topology_t topo;
 *     PW_CHECK(pw_topology_load_spec("tests/fixtures/topologies/2socket_8gpu.xml", &topo));
 *     pw_place_config pc = { .n_stages = 4, .n_replicas = 2, .gpus = PW_PLACE_GPUS_AUTO };
 *     pw_placement *pl;
 *     PW_CHECK(pw_place_stages(topo, &pc, &pl));
 *     for (int r = 0; r < pl->n_ranks; r++) {       // rank = replica * n_stages + stage
 *         char where[128];
 *         pw_placement_describe(pl, r, where, sizeof where);  // "cuda1, cores 2-3, NUMA 0"
 *     }
 *     // on rank r's own thread:
 *     pw_cpu_bind_thread(topo, pl->ranks[r].cpuset, "stage 1");        // warns if refused
 *     pw_mem_bind_area(topo, arena, bytes, pl->ranks[r].nodeset, "stage 1");  // likewise
 *     pw_placement_destroy(pl);
 *     hwloc_topology_destroy(topo);
 *
 * Workers of ranks that compute on GPUs bind near their GPU, found by the
 * PCI bus id the CUDA runtime gives (the topology must keep I/O devices):
 *
 *     const char *bus[2] = {"0000:11:00.0", "0000:11:00.0"};  // both ranks on cuda0
 *     pw_cpu_placement *gp;
 *     if (pw_cpu_place_gpus(topo, 2, bus, &gp) == PW_OK)     // gp->cpusets[r]: cores
 *         ...                                                // near cuda0, split in two
 *     else PW_WARN("%s", pw_last_error());                   // not in the topology
 *
 * pw_cpu_place_ranks is the engine's simpler rule (one core per rank):
 *
 *     PW_CHECK(pw_topology_load_synthetic("pack:2 core:4 pu:2", &topo));
 *     pw_cpu_placement *pl;
 *     PW_CHECK(pw_cpu_place_ranks(topo, 4, &pl));
 *     // pl->core[r]: logical core index of rank r; pl->cpusets[r]: its PUs
 *     if (pl->note[0]) PW_WARN("%s", pl->note);   // ranks share cores
 *
 *     // and rank r's memory on that core's NUMA node (from any thread):
 *     pw_mem_bind_area(topo, arena, bytes, pl->nodesets[r], "stage 1");
 *
 * pw_cpu_place_ranks' rule (the engine's under mpirun, for this process's
 * host rank; in one process the engine uses pw_cpu_place_pipeline, below).
 * Rank r gets core r (cores in hwloc's logical order, which walks
 * the machine depth-first: neighbouring ranks, which exchange every
 * micro-batch, land on neighbouring cores of the same package and cache).
 * With more ranks than cores the ranks share cores round-robin (rank r on
 * core r mod cores) and the placement carries the note "4 ranks on 2 cores:
 * ranks share cores". A topology without core objects places on PUs.
 */
#ifndef PW_RUNTIME_TOPOLOGY_H
#define PW_RUNTIME_TOPOLOGY_H

#include <hwloc.h>
#include <stddef.h>
#include <stdint.h>

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
    hwloc_bitmap_t *nodesets; /* [n_ranks] the NUMA node(s) of that core: where rank
                                 r's memory belongs (pw_mem_bind_area); empty when
                                 the topology has no NUMA information */
    int *numa;                /* [n_ranks] logical index of that NUMA node, -1 none */
    int n_numa;               /* NUMA nodes of the topology (1 on most laptops) */
    char note[160];           /* "4 ranks on 2 cores: ranks share cores", or "" */
} pw_cpu_placement;

/* Pure: computes the placement of n_ranks worker threads on `topo` (see
 * the rule above); logs nothing and binds nothing. PW_OK: *out is new, free
 * it with pw_cpu_placement_destroy. PW_ERR_INVALID_ARG: topo NULL or
 * n_ranks < 1. PW_ERR_NOMEM. */
pw_status pw_cpu_place_ranks(hwloc_topology_t topo, int n_ranks, pw_cpu_placement **out);
void pw_cpu_placement_destroy(pw_cpu_placement *p); /* accepts NULL */
/* Pure: the in-process engine's placement of S stages × R replicas, worker
 * k·S + s for stage s of replica k: pw_place_stages (below) on CPU cores, as
 * `pipeline-run --plan` prints it — replicas spread over the packages, each
 * stage a contiguous share of its replica's cores (its worker binds to the
 * share), memory on the share's NUMA node(s); more ranks than cores share
 * them round-robin, with the note. Same errors as pw_place_stages. */
pw_status pw_cpu_place_pipeline(hwloc_topology_t topo, int n_stages, int n_replicas, pw_cpu_placement **out);

/* Side effect: binds the calling thread to `set` (hwloc_set_cpubind with
 * HWLOC_CPUBIND_THREAD). Returns 0 when bound. When the system refuses
 * (containers, restricted cpusets), or `topo` is not this machine's
 * (synthetic, XML), it logs one PW_WARN naming `who` and the PUs, and
 * returns -1: the thread simply runs unpinned; never an error. */
int pw_cpu_bind_thread(hwloc_topology_t topo, hwloc_const_cpuset_t set, const char *who);

/* ------------------------------------------------------------ topologies */

/* Loads an hwloc XML file (lstopo --of xml), keeping the PCI and OS devices
 * it describes (GPUs). PW_ERR_IO when it cannot be read, PW_ERR_FORMAT when
 * hwloc refuses its content, or when it has what hwloc 2.9 would crash on or
 * placement cannot use: an <object> with a cpuset (nodeset) but no
 * complete_cpuset (complete_nodeset), or the reverse ("FILE:LINE: ..."), a
 * PU or NUMANode without an os_index or with one above 2^20; *out is NULL
 * then. */
pw_status pw_topology_load_xml(const char *path, hwloc_topology_t *out);

/* One string for `--topology`: NULL, "" or "this" loads this machine (with
 * its GPUs); a name ending in ".xml" or naming an existing file loads that
 * XML; anything else is a synthetic description ("pack:2 numa:2 core:8
 * pu:1"). Errors as the loaders above. */
pw_status pw_topology_load_spec(const char *spec, hwloc_topology_t *out);

/* -------------------------------------------------------- stage placement */

#define PW_PLACE_GPUS_AUTO (-1)

/* A GPU named by the caller (the CUDA runtime's view of this machine): the
 * placement finds its PCI device in the topology for its CPU locality. */
typedef struct pw_gpu_desc {
    const char *pci;      /* bus id, "0000:11:00.0" (cudaDeviceGetPCIBusId; any
                             case, 4- or 8-digit domain) */
    const char *name;     /* (optional) "cuda0"; NULL: the topology's OS device
                             under that PCI device, else "gpuK" */
    const char *model;    /* (optional) "NVIDIA H100 80GB HBM3"; NULL: the topology's */
    int64_t memory;       /* (optional) bytes a plan may use on it (free memory); 0:
                             the topology's figure, if any */
} pw_gpu_desc;

typedef struct pw_place_config {
    int n_stages;         /* pipeline stages, >= 1 */
    int n_replicas;       /* data-parallel copies of the pipeline; 0 means 1 */
    int cores_per_rank;   /* > 0: at most this many cores per rank; 0: the
                             rank's whole share */
    int gpus;             /* PW_PLACE_GPUS_AUTO: on GPUs when the topology has
                             any; 0: CPU cores only; 1: GPUs, an error without */
    const pw_gpu_desc *gpu_list; /* (optional) [n_gpu_list] place on these
                             GPUs, in device order (the CUDA runtime's), instead
                             of the topology's; `gpus` is then ignored */
    int n_gpu_list;
} pw_place_config;

/* One GPU of the topology: a PCI device with a GPU or co-processor OS
 * device (CUDA, NVML, OpenCL, ... names of one card count once). */
typedef struct pw_gpu {
    char name[32];        /* the first OS device's name: "cuda0", "nvml0", "card1" */
    char pci[16];         /* "0000:11:00.0", "" when not on PCI */
    char model[64];       /* "NVIDIA H100 80GB HBM3" (the OS device's GPUModel, or
                             the PCI device's name), "" unknown */
    int64_t memory;       /* bytes of device memory: the caller's (pw_gpu_desc), or
                             the topology's (CUDAGlobalMemorySize of lstopo's CUDA
                             device), 0 unknown */
    int located;          /* 1: found in the topology; 0: a pw_gpu_desc whose bus
                             id the topology lacks (a VM, a topology without I/O):
                             its locality is the whole machine */
    int package;          /* logical index of its local package, -1 */
    int numa;             /* logical index of its local NUMA node, -1 */
    hwloc_bitmap_t cpuset;/* its CPU locality (the non-I/O ancestor's cpuset) */
} pw_gpu;

typedef struct pw_rank_place {
    int stage, replica;
    int gpu;              /* index into pw_placement.gpus, -1 on CPU */
    int package;          /* logical index of the package of its first core, -1 */
    int numa;             /* logical index of the NUMA node of its first core, -1 */
    int n_numa;           /* NUMA nodes under its cores (in nodeset) */
    int first_core;       /* logical index of its first core (or PU) */
    int n_cores;          /* cores (or PUs) it owns: first_core .. + n_cores - 1 */
    hwloc_bitmap_t cpuset;  /* PUs its worker thread binds to */
    hwloc_bitmap_t nodeset; /* NUMA nodes its memory binds to (may be empty) */
} pw_rank_place;

typedef struct pw_placement {
    int n_stages, n_replicas, n_ranks;
    int on_gpus;          /* 1: ranks run on GPUs, cores are their helpers */
    int n_gpus;
    pw_gpu *gpus;         /* [n_gpus] in locality order */
    int n_cores;          /* cores (or PUs) of the topology */
    int cores_are_pus;    /* 1: the topology has no core objects; "cores" are PUs */
    pw_rank_place *ranks; /* [n_ranks], rank = replica * n_stages + stage */
    int shared;           /* 1: ranks share cores or GPUs */
    char note[160];       /* why they share, or "" */
} pw_placement;

/* Pure: places n_stages × n_replicas ranks on `topo`. The rule:
 *   - the machine's slots (GPUs in locality order, or cores in hwloc's
 *     logical order, which walks packages, then NUMA nodes, then caches) are
 *     cut into n_replicas equal contiguous shares: replica r takes share r,
 *     so replicas spread over the packages while each pipeline stays as
 *     compact as its share allows;
 *   - on CPUs, stage s takes the s-th of n_stages equal contiguous parts of
 *     its replica's cores (capped by cores_per_rank): neighbouring stages,
 *     which exchange every micro-batch, sit on neighbouring cores, and parts
 *     fall on NUMA-node boundaries when the counts divide;
 *   - on GPUs, stage s takes GPU s of its share (neighbours on neighbouring
 *     GPUs of one package), and the ranks sharing one CPU locality split its
 *     cores evenly in rank order, for their worker threads;
 *   - more ranks than slots: rank k takes slot k mod slots (one core each on
 *     CPUs), shared = 1 and note says so ("12 ranks on 8 GPUs: ranks share
 *     GPUs"). Memory binds to the NUMA nodes under the rank's cores;
 *   - with cfg->gpu_list the GPUs are those, in the given (device) order, so
 *     rank k of one replica is on device k mod count as a CUDA pipeline runs
 *     it; each is looked up by bus id for its locality, and one the topology
 *     lacks gets the whole machine's cores and a note ("cuda0
 *     (0000:65:00.0) is not in the topology: its ranks may run on any core").
 * Logs nothing, binds nothing. PW_OK: *out is new (pw_placement_destroy).
 * PW_ERR_INVALID_ARG: topo NULL, n_stages < 1, negative counts.
 * PW_ERR_UNSUPPORTED: gpus = 1 on a topology without GPUs ("the topology has
 * no GPUs"), or no cores. PW_ERR_NOMEM. */
pw_status pw_place_stages(hwloc_topology_t topo, const pw_place_config *cfg, pw_placement **out);
void pw_placement_destroy(pw_placement *p); /* accepts NULL */

/* Pure: the engine's worker placement when rank r computes on the GPU with
 * PCI bus id pci[r] (several ranks may share one): each rank's worker binds
 * to cores near its GPU — the PCI device's non-I/O ancestor's cores — and
 * the ranks sharing one locality split those cores evenly in rank order, as
 * pw_place_stages does for GPUs (one core each, round-robin, with the note,
 * when they outnumber the cores); memory on those cores' NUMA node(s).
 * The topology must hold I/O objects (pw_topology_load_spec("this"), or an
 * lstopo XML). Logs nothing, binds nothing. PW_OK: *out is new
 * (pw_cpu_placement_destroy). PW_ERR_INVALID_ARG: topo NULL, n_ranks < 1, a
 * NULL or malformed bus id. PW_ERR_UNSUPPORTED: a bus id not in the topology
 * ("GPU 0000:65:00.0 is not in the topology (no PCI device with that bus
 * id)"): the caller falls back to the CPU rule. PW_ERR_NOMEM. */
pw_status pw_cpu_place_gpus(hwloc_topology_t topo, int n_ranks, const char *const *pci,
                            pw_cpu_placement **out);

/* "cuda1 (0000:21:00.0), cores 2-3, NUMA 0" / "cores 8-15, NUMA 1" into buf
 * (core ranges in logical indices). Returns the length it needs (snprintf). */
int pw_placement_describe(const pw_placement *p, int rank, char *buf, size_t n);

/* Side effect: binds the pages of [addr, addr + len) to `nodes`
 * (hwloc_set_area_membind, HWLOC_MEMBIND_BIND), migrating what is already
 * touched. Returns 0 when bound; where refused (no NUMA support, a synthetic
 * or XML topology, an empty set) it logs one PW_WARN naming `who` and
 * returns -1: the memory stays where the OS put it; never an error. len 0:
 * returns 0. */
int pw_mem_bind_area(hwloc_topology_t topo, const void *addr, size_t len,
                     hwloc_const_nodeset_t nodes, const char *who);

#ifdef __cplusplus
}
#endif
#endif
