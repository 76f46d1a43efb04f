/* Tests for stage placement on hwloc topologies (runtime/topology.h):
 * synthetic machines and XML fixtures of machines we do not have (2
 * packages x 2 NUMA nodes x 8 cores; 2 sockets x 4 GPUs), checked exactly;
 * binding degrades to a warning.
 *
 * Every test has the same .timeout: Criterion reports a spurious leak under
 * LeakSanitizer when timeouts differ within a file. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/graph.h"
#include "runtime/log.h"
#include "runtime/topology.h"
#include "stages/ops/backend.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"

#define TIMEOUT 60

#define FIXTURES PW_SOURCE_DIR "/tests/fixtures/topologies/"

static pw_placement *place(hwloc_topology_t topo, int S, int R, int cores_per_rank, int gpus)
{
    pw_place_config c = {.n_stages = S, .n_replicas = R, .cores_per_rank = cores_per_rank,
                         .gpus = gpus};
    pw_placement *p = NULL;
    cr_assert_eq(pw_place_stages(topo, &c, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p->n_ranks, S * (R ? R : 1));
    return p;
}

static hwloc_topology_t load(const char *spec)
{
    hwloc_topology_t t = NULL;
    cr_assert_eq(pw_topology_load_spec(spec, &t), PW_OK, "%s", pw_last_error());
    return t;
}

static void expect(const pw_placement *p, int rank, const char *want)
{
    char got[160];
    pw_placement_describe(p, rank, got, sizeof got);
    cr_assert_str_eq(got, want, "rank %d", rank);
}

/* No two ranks share a PU (when the placement says they do not). */
static void distinct(const pw_placement *p)
{
    cr_assert_eq(p->shared, 0);
    cr_assert_str_empty(p->note);
    for (int a = 0; a < p->n_ranks; a++) {
        cr_assert_not(hwloc_bitmap_iszero(p->ranks[a].cpuset), "rank %d has no PUs", a);
        for (int b = 0; b < a; b++)
            cr_assert_not(hwloc_bitmap_intersects(p->ranks[a].cpuset, p->ranks[b].cpuset),
                          "ranks %d and %d share PUs", b, a);
    }
}

/* pack:2 numa:2 core:8: one stage per NUMA node, in order, as XML or synthetic. */
static void check_numa_machine(hwloc_topology_t t)
{
    pw_placement *p = place(t, 4, 1, 0, PW_PLACE_GPUS_AUTO);
    distinct(p);
    cr_assert_eq(p->n_cores, 32);
    cr_assert_eq(p->on_gpus, 0);
    for (int s = 0; s < 4; s++) {
        const pw_rank_place *r = &p->ranks[s];
        cr_assert_eq(r->stage, s);
        cr_assert_eq(r->first_core, 8 * s);
        cr_assert_eq(r->n_cores, 8);
        cr_assert_eq(r->numa, s, "stage %d on NUMA node %d", s, s);
        cr_assert_eq(r->n_numa, 1);
        cr_assert_eq(r->package, s / 2);
        cr_assert_eq(hwloc_bitmap_weight(r->nodeset), 1);
    }
    expect(p, 0, "cores 0-7, NUMA 0");
    expect(p, 3, "cores 24-31, NUMA 3");
    pw_placement_destroy(p);

    /* Two replicas of two stages: each replica in its own package,
     * neighbouring stages in one package. */
    p = place(t, 2, 2, 0, PW_PLACE_GPUS_AUTO);
    distinct(p);
    for (int r = 0; r < 4; r++) {
        cr_assert_eq(p->ranks[r].replica, r / 2);
        cr_assert_eq(p->ranks[r].stage, r % 2);
        cr_assert_eq(p->ranks[r].package, r / 2, "replica %d in package %d", r / 2, r / 2);
        cr_assert_eq(p->ranks[r].numa, r);
    }
    pw_placement_destroy(p);

    /* Three stages, two cores each: the first cores of equal thirds. */
    p = place(t, 3, 1, 2, PW_PLACE_GPUS_AUTO);
    distinct(p);
    expect(p, 0, "cores 0-1, NUMA 0");
    expect(p, 1, "cores 10-11, NUMA 1");
    expect(p, 2, "cores 21-22, NUMA 2");
    pw_placement_destroy(p);

    /* Eight stages: neighbours share a NUMA node pairwise, and only the link
     * 3 -> 4 crosses packages. */
    p = place(t, 8, 1, 0, PW_PLACE_GPUS_AUTO);
    distinct(p);
    int crossings = 0;
    for (int s = 0; s + 1 < 8; s++) crossings += p->ranks[s].package != p->ranks[s + 1].package;
    cr_assert_eq(crossings, 1);
    cr_assert_neq(p->ranks[3].package, p->ranks[4].package);
    pw_placement_destroy(p);
}

Test(placement, numa_machine_synthetic, .timeout = TIMEOUT)
{
    hwloc_topology_t t = load("pack:2 numa:2 core:8 pu:1");
    check_numa_machine(t);
    hwloc_topology_destroy(t);
}

Test(placement, numa_machine_xml, .timeout = TIMEOUT)
{
    hwloc_topology_t t = load(FIXTURES "2pack_2numa_8core.xml");
    check_numa_machine(t);
    hwloc_topology_destroy(t);
}

Test(placement, more_ranks_than_cores_share, .timeout = TIMEOUT)
{
    hwloc_topology_t t = load("core:2 pu:1");
    pw_placement *p = place(t, 3, 1, 0, PW_PLACE_GPUS_AUTO);
    cr_assert_eq(p->shared, 1);
    cr_assert_str_eq(p->note, "3 ranks on 2 cores: ranks share cores");
    expect(p, 0, "core 0, NUMA 0");
    expect(p, 2, "core 0, NUMA 0");
    cr_assert(hwloc_bitmap_isequal(p->ranks[0].cpuset, p->ranks[2].cpuset));
    pw_placement_destroy(p);
    hwloc_topology_destroy(t);
    /* Without core objects, PUs. */
    t = load("pack:2 pu:2");
    p = place(t, 2, 1, 0, PW_PLACE_GPUS_AUTO);
    cr_assert_eq(p->cores_are_pus, 1);
    expect(p, 1, "PUs 2-3, NUMA 0");
    pw_placement_destroy(p);
    hwloc_topology_destroy(t);
}

Test(placement, gpus_of_the_two_socket_machine, .timeout = TIMEOUT)
{
    hwloc_topology_t t = load(FIXTURES "2socket_8gpu.xml");
    pw_placement *p = place(t, 4, 2, 0, PW_PLACE_GPUS_AUTO);
    /* Eight cards, each once although it shows as cuda and nvml devices;
     * the NIC is not a GPU. */
    cr_assert_eq(p->n_gpus, 8);
    cr_assert_eq(p->on_gpus, 1);
    static const char *const pci[] = {"0000:11:00.0", "0000:21:00.0", "0000:31:00.0", "0000:41:00.0",
                                      "0000:91:00.0", "0000:a1:00.0", "0000:b1:00.0", "0000:c1:00.0"};
    for (int g = 0; g < 8; g++) {
        char name[16];
        snprintf(name, sizeof name, "cuda%d", g);
        cr_assert_str_eq(p->gpus[g].name, name);
        cr_assert_str_eq(p->gpus[g].pci, pci[g]);
        cr_assert_eq(p->gpus[g].package, g / 4);
        cr_assert_eq(p->gpus[g].numa, g / 4);
        cr_assert_eq(hwloc_bitmap_weight(p->gpus[g].cpuset), 16, "a package's 8 cores x 2 PUs");
    }
    /* Replica r on package r's GPUs; each worker on 2 of the 8 cores next
     * to its GPU. */
    distinct(p);
    expect(p, 0, "cuda0 (0000:11:00.0), cores 0-1, NUMA 0");
    expect(p, 1, "cuda1 (0000:21:00.0), cores 2-3, NUMA 0");
    expect(p, 3, "cuda3 (0000:41:00.0), cores 6-7, NUMA 0");
    expect(p, 4, "cuda4 (0000:91:00.0), cores 8-9, NUMA 1");
    expect(p, 7, "cuda7 (0000:c1:00.0), cores 14-15, NUMA 1");
    for (int r = 0; r < 8; r++) {
        const pw_rank_place *rk = &p->ranks[r];
        cr_assert_eq(rk->gpu, r);
        cr_assert(hwloc_bitmap_isincluded(rk->cpuset, p->gpus[rk->gpu].cpuset),
                  "rank %d runs on cores local to its GPU", r);
        cr_assert_eq(rk->numa, p->gpus[rk->gpu].numa);
    }
    pw_placement_destroy(p);

    /* Two stages, two replicas: neighbours on GPUs of one package,
     * replicas on different packages. */
    p = place(t, 2, 2, 0, PW_PLACE_GPUS_AUTO);
    distinct(p);
    expect(p, 0, "cuda0 (0000:11:00.0), cores 0-3, NUMA 0");
    expect(p, 1, "cuda1 (0000:21:00.0), cores 4-7, NUMA 0");
    expect(p, 2, "cuda4 (0000:91:00.0), cores 8-11, NUMA 1");
    expect(p, 3, "cuda5 (0000:a1:00.0), cores 12-15, NUMA 1");
    pw_placement_destroy(p);

    /* Eight stages: one cross-package link. */
    p = place(t, 8, 1, 1, PW_PLACE_GPUS_AUTO);
    distinct(p);
    for (int s = 0; s < 8; s++) cr_assert_eq(p->ranks[s].gpu, s);
    expect(p, 4, "cuda4 (0000:91:00.0), core 8, NUMA 1");
    pw_placement_destroy(p);

    /* More ranks than GPUs share them, round-robin. */
    p = place(t, 12, 1, 0, PW_PLACE_GPUS_AUTO);
    cr_assert_eq(p->shared, 1);
    cr_assert_str_eq(p->note, "12 ranks on 8 GPUs: ranks share GPUs");
    cr_assert_eq(p->ranks[8].gpu, 0);
    cr_assert_not(hwloc_bitmap_intersects(p->ranks[0].cpuset, p->ranks[8].cpuset),
                  "the two ranks of cuda0 still get their own cores");
    pw_placement_destroy(p);

    /* CPU placement on the same machine when asked. */
    p = place(t, 2, 1, 0, 0);
    cr_assert_eq(p->on_gpus, 0);
    distinct(p);
    expect(p, 0, "cores 0-7, NUMA 0");
    expect(p, 1, "cores 8-15, NUMA 1");
    pw_placement_destroy(p);
    hwloc_topology_destroy(t);
}

Test(placement, errors, .timeout = TIMEOUT)
{
    hwloc_topology_t t = NULL;
    cr_assert_eq(pw_topology_load_spec("pack:banana", &t), PW_ERR_INVALID_ARG);
    cr_assert_null(t);
    cr_assert_eq(pw_topology_load_spec("/nonexistent/machine.xml", &t), PW_ERR_IO);
    cr_assert(strstr(pw_last_error(), "/nonexistent/machine.xml: cannot open topology"), "%s",
              pw_last_error());
    cr_assert_eq(pw_topology_load_xml(PW_SOURCE_DIR "/tests/fixtures/graphs/features.graph", &t),
                 PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "not an hwloc topology XML"), "%s", pw_last_error());
    cr_assert_null(t);
    /* hwloc 2.9 (lstopo too) dereferences NULL on an object with a cpuset
     * but no complete_cpuset: a typo in one attribute name, found by
     * tests/fuzz/fuzz_topology.c. Refused before hwloc sees it. */
    cr_assert_eq(pw_topology_load_xml(PW_SOURCE_DIR "/tests/fixtures/crashes/hwloc-null-complete-cpuset.xml", &t),
                 PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "hwloc-null-complete-cpuset.xml:16: <object> has cpuset but no "
                     "complete_cpuset"), "%s", pw_last_error());
    cr_assert_null(t);
    /* A NUMA node without os_index made placement set bit UINT_MAX of a
     * nodeset (a 512 MB bitmap, seconds per rank). */
    cr_assert_eq(pw_topology_load_xml(PW_SOURCE_DIR "/tests/fixtures/crashes/hwloc-numa-without-os-index.xml", &t),
                 PW_ERR_FORMAT);
    cr_assert(strstr(pw_last_error(), "hwloc-numa-without-os-index.xml:10: <object type=\"NUMANode\"> "
                     "needs an os_index in 0..1048576 (got none)"), "%s", pw_last_error());
    cr_assert_null(t);

    t = load("pack:2 core:2 pu:1");
    pw_place_config c = {.n_stages = 2, .gpus = 1};
    pw_placement *p = NULL;
    cr_assert_eq(pw_place_stages(t, &c, &p), PW_ERR_UNSUPPORTED);
    cr_assert(strstr(pw_last_error(), "the topology has no GPUs"), "%s", pw_last_error());
    cr_assert_null(p);
    c.n_stages = 0;
    cr_assert_eq(pw_place_stages(t, &c, &p), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_place_stages(NULL, &c, &p), PW_ERR_INVALID_ARG);
    pw_placement_destroy(NULL);
    hwloc_topology_destroy(t);
}

/* The engine's one-core-per-rank rule says which NUMA node each worker's
 * memory belongs to (stages/train/pipeline.c binds each stage's arena there). */
static void check_cpu_nodes(hwloc_topology_t t, int n_ranks, int cores_per_node, int nodes)
{
    pw_cpu_placement *p = NULL;
    cr_assert_eq(pw_cpu_place_ranks(t, n_ranks, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p->n_numa, nodes);
    for (int r = 0; r < n_ranks; r++) {
        int want = (r % p->n_cores) / cores_per_node;
        cr_assert_eq(p->numa[r], want, "rank %d (core %d) on NUMA node %d, want %d", r, p->core[r],
                     p->numa[r], want);
        cr_assert_eq(hwloc_bitmap_weight(p->nodesets[r]), 1, "rank %d", r);
        hwloc_obj_t node = hwloc_get_obj_by_type(t, HWLOC_OBJ_NUMANODE, (unsigned)want);
        cr_assert_not_null(node);
        cr_assert(hwloc_bitmap_isset(p->nodesets[r], node->os_index), "rank %d: nodeset lacks node %d", r,
                  want);
    }
    pw_cpu_placement_destroy(p);
}

Test(placement, engine_ranks_memory_nodes, .timeout = TIMEOUT)
{
    /* 2 packages x 2 NUMA nodes x 8 cores: ranks fill node 0 first (compact),
     * rank 8 is the first on node 1; 40 ranks wrap round the 32 cores. */
    hwloc_topology_t t = load("pack:2 numa:2 core:8 pu:1");
    check_cpu_nodes(t, 2, 8, 4);
    check_cpu_nodes(t, 32, 8, 4);
    check_cpu_nodes(t, 40, 8, 4);
    hwloc_topology_destroy(t);
    t = load(FIXTURES "2pack_2numa_8core.xml");
    check_cpu_nodes(t, 32, 8, 4);
    hwloc_topology_destroy(t);
    /* 2 sockets, one NUMA node each, 8 cores x 2 PUs (and GPUs). */
    t = load(FIXTURES "2socket_8gpu.xml");
    check_cpu_nodes(t, 16, 8, 2);
    hwloc_topology_destroy(t);
    /* No NUMA level in the description: hwloc's one node holds everything. */
    t = load("pack:2 core:2 pu:2");
    check_cpu_nodes(t, 4, 4, 1);
    hwloc_topology_destroy(t);
}

/* The in-process engine places stages x replicas as --plan prints it
 * (pw_place_stages): replicas spread over the packages, each stage a
 * contiguous share of its replica's cores, memory on that share's node. */
Test(placement, engine_pipeline_placement_is_the_plans, .timeout = TIMEOUT)
{
    hwloc_topology_t t = load("pack:2 numa:2 core:8 pu:1");
    pw_cpu_placement *p = NULL;
    cr_assert_eq(pw_cpu_place_pipeline(t, 2, 2, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p->n_ranks, 4);
    cr_assert_eq(p->shared, 0);
    /* worker k*S + s: replica 0 on package 0 (nodes 0, 1), replica 1 on
     * package 1 (nodes 2, 3); eight cores per stage. */
    for (int r = 0; r < 4; r++) {
        cr_assert_eq(p->core[r], 8 * r, "worker %d first core %d", r, p->core[r]);
        cr_assert_eq(hwloc_bitmap_weight(p->cpusets[r]), 8, "worker %d", r);
        cr_assert_eq(p->numa[r], r, "worker %d on NUMA node %d", r, p->numa[r]);
    }
    pw_place_config pc = {.n_stages = 2, .n_replicas = 2, .gpus = 0};
    pw_placement *pl = NULL;
    cr_assert_eq(pw_place_stages(t, &pc, &pl), PW_OK);
    for (int r = 0; r < 4; r++) {
        cr_assert(hwloc_bitmap_isequal(p->cpusets[r], pl->ranks[r].cpuset), "worker %d", r);
        cr_assert(hwloc_bitmap_isequal(p->nodesets[r], pl->ranks[r].nodeset), "worker %d", r);
    }
    pw_placement_destroy(pl);
    pw_cpu_placement_destroy(p);
    /* More workers than cores: round-robin, with the note. */
    hwloc_topology_destroy(t);
    t = load("pack:1 core:2 pu:1");
    cr_assert_eq(pw_cpu_place_pipeline(t, 3, 2, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p->shared, 1);
    cr_assert(p->note[0], "no note for 6 workers on 2 cores");
    for (int r = 0; r < 6; r++) cr_assert_eq(p->core[r], r % 2, "worker %d on core %d", r, p->core[r]);
    pw_cpu_placement_destroy(p);
    /* Two stages on a 2-core machine: one core each, as before. */
    cr_assert_eq(pw_cpu_place_pipeline(t, 2, 1, &p), PW_OK);
    cr_assert_eq(p->core[0], 0);
    cr_assert_eq(p->core[1], 1);
    cr_assert_eq(p->shared, 0);
    pw_cpu_placement_destroy(p);
    cr_assert_eq(pw_cpu_place_pipeline(NULL, 2, 1, &p), PW_ERR_INVALID_ARG);
    hwloc_topology_destroy(t);
}

/* ------------------------------------------------------------ binding */

static char warned[1024];

static void capture(pw_log_level level, unsigned subsys, const char *msg, void *user)
{
    (void)subsys;
    (void)user;
    if (level == PW_LOG_WARN) snprintf(warned, sizeof warned, "%s", msg);
}

Test(binding, degrades_to_a_warning, .timeout = TIMEOUT)
{
    pw_log_set(capture, NULL);
    /* A machine we do not have: nothing is bound, and it says so. */
    hwloc_topology_t t = load(FIXTURES "2socket_8gpu.xml");
    pw_placement *p = place(t, 2, 1, 0, PW_PLACE_GPUS_AUTO);
    static char area[1 << 16];
    warned[0] = '\0';
    cr_assert_eq(pw_mem_bind_area(t, area, sizeof area, p->ranks[0].nodeset, "stage 0"), -1);
    cr_assert_str_eq(warned, "stage 0: the topology is not this machine's; 65536 bytes not bound");
    warned[0] = '\0';
    cr_assert_eq(pw_cpu_bind_thread(t, p->ranks[1].cpuset, "stage 1"), -1);
    cr_assert_str_eq(warned, "stage 1: the topology is not this machine's; running unpinned");
    cr_assert_eq(pw_mem_bind_area(t, area, 0, p->ranks[0].nodeset, "stage 0"), 0, "nothing to bind");
    pw_placement_destroy(p);
    hwloc_topology_destroy(t);

    /* This machine: binds, or warns and carries on. */
    t = load("this");
    p = place(t, 1, 1, 0, 0);
    size_t len = 1 << 20;
    char *buf = aligned_alloc(4096, len);
    cr_assert_not_null(buf);
    memset(buf, 1, len);
    warned[0] = '\0';
    int rc = pw_mem_bind_area(t, buf, len, p->ranks[0].nodeset, "stage 0 arena");
    cr_assert(rc == 0 || (rc == -1 && strstr(warned, "stage 0 arena: binding 1048576 bytes to NUMA")),
              "rc %d, warning '%s'", rc, warned);
    rc = pw_cpu_bind_thread(t, p->ranks[0].cpuset, "test thread");
    cr_assert(rc == 0 || rc == -1);
    free(buf);
    pw_placement_destroy(p);
    hwloc_topology_destroy(t);
    pw_log_set(NULL, NULL);
}

/* ------------------------------------------------- workers near their GPUs */

static void expect_cores(const pw_cpu_placement *p, int rank, const char *want_pus)
{
    char *got = NULL;
    hwloc_bitmap_list_asprintf(&got, p->cpusets[rank]);
    cr_assert_str_eq(got, want_pus, "rank %d", rank);
    free(got);
}

/* Issue 9: the engine's worker for a rank on GPU g binds to the cores near
 * g, found by the bus id the CUDA runtime gives (cudaDeviceGetPCIBusId);
 * ranks sharing one locality split its cores as pw_place_stages does. */
Test(placement, gpu_workers_bind_near_their_gpus_by_bus_id, .timeout = TIMEOUT)
{
    hwloc_topology_t t = load(FIXTURES "2socket_8gpu.xml");
    pw_cpu_placement *p = NULL;
    /* Two GPUs per package (cuda0, cuda1 | cuda4, cuda5), as CUDA spells
     * them (upper case, 8-digit domain): each package's 8 cores split in
     * two, 2 PUs per core. */
    const char *four[] = {"00000000:11:00.0", "0000:21:00.0", "0000:91:00.0", "0000:A1:00.0"};
    cr_assert_eq(pw_cpu_place_gpus(t, 4, four, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p->n_ranks, 4);
    cr_assert_eq(p->shared, 0);
    cr_assert_str_empty(p->note);
    static const int first[] = {0, 4, 8, 12}, numa[] = {0, 0, 1, 1};
    for (int r = 0; r < 4; r++) {
        cr_assert_eq(p->core[r], first[r], "rank %d first core %d", r, p->core[r]);
        cr_assert_eq(p->numa[r], numa[r], "rank %d NUMA %d", r, p->numa[r]);
        cr_assert_eq(hwloc_bitmap_weight(p->nodesets[r]), 1);
    }
    expect_cores(p, 0, "0-7");
    expect_cores(p, 1, "8-15");
    expect_cores(p, 2, "16-23");
    expect_cores(p, 3, "24-31");
    pw_cpu_placement_destroy(p);

    /* Eight GPUs, eight ranks: two cores each, next to their own GPU. */
    const char *eight[] = {"0000:11:00.0", "0000:21:00.0", "0000:31:00.0", "0000:41:00.0",
                           "0000:91:00.0", "0000:a1:00.0", "0000:b1:00.0", "0000:c1:00.0"};
    cr_assert_eq(pw_cpu_place_gpus(t, 8, eight, &p), PW_OK, "%s", pw_last_error());
    for (int r = 0; r < 8; r++) cr_assert_eq(p->core[r], 2 * r, "rank %d", r);
    expect_cores(p, 0, "0-3");
    expect_cores(p, 7, "28-31");
    pw_cpu_placement_destroy(p);

    /* The same as the plan's placement of 8 stages on the 8 GPUs. */
    pw_placement *pl = place(t, 8, 1, 0, PW_PLACE_GPUS_AUTO);
    cr_assert_eq(pw_cpu_place_gpus(t, 8, eight, &p), PW_OK);
    for (int r = 0; r < 8; r++) {
        cr_assert(hwloc_bitmap_isequal(p->cpusets[r], pl->ranks[r].cpuset), "rank %d", r);
        cr_assert(hwloc_bitmap_isequal(p->nodesets[r], pl->ranks[r].nodeset), "rank %d", r);
    }
    pw_cpu_placement_destroy(p);
    pw_placement_destroy(pl);

    /* Three ranks on one GPU (cuda:4 for every stage) and one on cuda5:
     * the four share package 1's cores, in rank order. */
    const char *shared[] = {"0000:91:00.0", "0000:91:00.0", "0000:91:00.0", "0000:a1:00.0"};
    cr_assert_eq(pw_cpu_place_gpus(t, 4, shared, &p), PW_OK, "%s", pw_last_error());
    for (int r = 0; r < 4; r++) cr_assert_eq(p->core[r], 8 + 2 * r, "rank %d", r);
    cr_assert_str_empty(p->note, "sharing a GPU is not worth a warning: %s", p->note);
    pw_cpu_placement_destroy(p);

    /* Twenty ranks on cuda0: more than its 8 cores, one core each round-robin. */
    const char *many[20];
    for (int r = 0; r < 20; r++) many[r] = "0000:11:00.0";
    cr_assert_eq(pw_cpu_place_gpus(t, 20, many, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p->shared, 1);
    cr_assert_str_eq(p->note, "20 ranks on the 8 cores near their GPUs: ranks share cores");
    cr_assert_eq(p->core[9], 1);
    pw_cpu_placement_destroy(p);

    /* Not in the topology (a VM, this machine's GPU on a fixture): an
     * error that names it, for the engine's fallback; bad ids refused. */
    const char *absent[] = {"0000:11:00.0", "0000:65:00.0"};
    cr_assert_eq(pw_cpu_place_gpus(t, 2, absent, &p), PW_ERR_UNSUPPORTED);
    cr_assert_null(p);
    cr_assert_str_eq(pw_last_error(), "GPU 0000:65:00.0 is not in the topology (no PCI device with that bus id)");
    const char *bad[] = {"0000:11:00.0", "cuda1"};
    cr_assert_eq(pw_cpu_place_gpus(t, 2, bad, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "rank 1: 'cuda1' is not a PCI bus id"), "%s", pw_last_error());
    const char *none[] = {NULL};
    cr_assert_eq(pw_cpu_place_gpus(t, 1, none, &p), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_cpu_place_gpus(t, 0, four, &p), PW_ERR_INVALID_ARG);
    cr_assert_eq(pw_cpu_place_gpus(NULL, 1, four, &p), PW_ERR_INVALID_ARG);
    hwloc_topology_destroy(t);

    /* A topology without I/O objects has no PCI devices at all. */
    t = load("pack:2 core:4 pu:1");
    cr_assert_eq(pw_cpu_place_gpus(t, 1, four, &p), PW_ERR_UNSUPPORTED);
    hwloc_topology_destroy(t);
}

/* The fixture's GPUs carry their model and memory (lstopo's CUDA device:
 * GPUModel, CUDAGlobalMemorySize in KiB); a caller's GPU list is placed in
 * its order and keeps its own names and figures. */
Test(placement, gpu_list_in_device_order, .timeout = TIMEOUT)
{
    hwloc_topology_t t = load(FIXTURES "2socket_8gpu.xml");
    pw_placement *p = place(t, 2, 1, 0, PW_PLACE_GPUS_AUTO);
    for (int g = 0; g < p->n_gpus; g++) {
        cr_assert_str_eq(p->gpus[g].model, "NVIDIA H100 80GB HBM3");
        cr_assert_eq(p->gpus[g].memory, 80ll << 30, "gpu %d: %lld", g, (long long)p->gpus[g].memory);
        cr_assert_eq(p->gpus[g].located, 1);
    }
    pw_placement_destroy(p);

    /* Device order as CUDA numbers them (here: package 1's first). */
    const pw_gpu_desc list[] = {
        {.pci = "0000:91:00.0", .name = "cuda0", .model = "H200", .memory = 100ll << 30},
        {.pci = "0000:11:00.0"},
    };
    pw_place_config c = {.n_stages = 4, .gpu_list = list, .n_gpu_list = 2};
    cr_assert_eq(pw_place_stages(t, &c, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p->on_gpus, 1);
    cr_assert_eq(p->n_gpus, 2);
    cr_assert_str_eq(p->gpus[0].name, "cuda0");
    cr_assert_str_eq(p->gpus[0].model, "H200");
    cr_assert_eq(p->gpus[0].memory, 100ll << 30);
    cr_assert_str_eq(p->gpus[1].name, "cuda0", "the topology's name for 0000:11:00.0");
    cr_assert_eq(p->gpus[1].memory, 80ll << 30);
    /* Rank k on device k mod 2, as a CUDA pipeline runs it; the two ranks of
     * each GPU split its package's cores. */
    cr_assert_str_eq(p->note, "4 ranks on 2 GPUs: ranks share GPUs");
    expect(p, 0, "cuda0 (0000:91:00.0), cores 8-11, NUMA 1");
    expect(p, 1, "cuda0 (0000:11:00.0), cores 0-3, NUMA 0");
    expect(p, 2, "cuda0 (0000:91:00.0), cores 12-15, NUMA 1");
    expect(p, 3, "cuda0 (0000:11:00.0), cores 4-7, NUMA 0");
    pw_placement_destroy(p);

    /* A GPU the topology lacks: placed anyway, on any core, and said. */
    const pw_gpu_desc lost[] = {{.pci = "0000:65:00.0", .name = "cuda0"}};
    c = (pw_place_config){.n_stages = 2, .gpu_list = lost, .n_gpu_list = 1};
    cr_assert_eq(pw_place_stages(t, &c, &p), PW_OK, "%s", pw_last_error());
    cr_assert_eq(p->gpus[0].located, 0);
    cr_assert_str_eq(p->note, "cuda0 (0000:65:00.0) is not in the topology: its ranks may run on any core; "
                              "2 ranks on 1 GPU: ranks share GPUs");
    expect(p, 0, "cuda0 (0000:65:00.0), cores 0-7, NUMA 0");
    expect(p, 1, "cuda0 (0000:65:00.0), cores 8-15, NUMA 1");
    pw_placement_destroy(p);

    const pw_gpu_desc junk[] = {{.pci = "zz"}};
    c.gpu_list = junk;
    cr_assert_eq(pw_place_stages(t, &c, &p), PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "'zz' is not a PCI bus id"), "%s", pw_last_error());
    c.gpu_list = NULL;
    cr_assert_eq(pw_place_stages(t, &c, &p), PW_ERR_INVALID_ARG);
    hwloc_topology_destroy(t);
}

/* ------------------------------------------- the pipeline and the engine */

/* Every warning, from any thread (workers warn when binding is refused). */
static pthread_mutex_t warn_mu = PTHREAD_MUTEX_INITIALIZER;
static char warnings[8192];

static void collect(pw_log_level level, unsigned subsys, const char *msg, void *user)
{
    (void)subsys;
    (void)user;
    if (level != PW_LOG_WARN) return;
    pthread_mutex_lock(&warn_mu);
    size_t len = strlen(warnings);
    snprintf(warnings + len, sizeof warnings - len, "%s\n", msg);
    pthread_mutex_unlock(&warn_mu);
}

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

/* "pcidev": the CPU's ops on a pretend device that reports a PCI bus id,
 * so the pipeline passes it to the engine as a CUDA run does. (A backend
 * without `open` keeps host memory and has one device.) */
static char pci_of[2][16];

static pw_status pd_pci(int device, char *buf, size_t n)
{
    if (device < 0 || device > 1) return pw_error(PW_ERR_INVALID_ARG, "pcidev: no device %d", device);
    snprintf(buf, n, "%s", pci_of[device]);
    return PW_OK;
}

static int pd_count(void) { return 1; }

static pw_backend_i pcidev_i;

/* Two stages on "pcidev" (both ranks on its one device), pinned; one step. */
static void train_pinned_on_pcidev(void)
{
    pcidev_i = pw_backend_cpu_i;
    pcidev_i.name = "pcidev";
    pcidev_i.device_count = pd_count;
    pcidev_i.device_pci = pd_pci;
    cr_assert_eq(pw_backend_register(&pcidev_i), PW_OK, "%s", pw_last_error());
    static const char *text = "graph t_mlp\n"
                              "input x : f32[6]\n"
                              "label y : i32[]\n"
                              "h = linear(x, out=8)\n"
                              "a = relu(h)\n"
                              "logits = linear(a, out=3)\n"
                              "loss = softmax_cross_entropy(logits, y)\n";
    pw_graph *g = NULL;
    cr_assert_eq(pw_graph_parse_string(text, strlen(text), "t.graph", &g), PW_OK, "%s", pw_last_error());
    pw_synthetic_config sc = {.n = 64, .sample_shape = {.ndim = 1, .d = {6}}, .n_classes = 3, .seed = 1,
                              .noise = 1.0f};
    pw_dataset *d = NULL;
    cr_assert_eq(pw_dataset_synthetic(&sc, &d), PW_OK, "%s", pw_last_error());
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    pc.train = d;
    pc.batch = 16;
    pc.micro_batches = 4;
    pc.stages = 2;
    pc.pin = 1;
    pc.device = "pcidev";
    pw_pipeline *pl = NULL;
    cr_assert_eq(pw_pipeline_create(&pc, &pl), PW_OK, "%s", pw_last_error());
    pw_step_stats st;
    cr_assert_eq(pw_pipeline_step(pl, &st), PW_OK, "%s", pw_last_error());
    pw_pipeline_destroy(pl);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
}

/* GPUs this machine does not have (the fixture's bus ids): the engine says
 * so once and binds its workers by the CPU rule; training goes on. */
Test(gpu_binding, falls_back_to_the_cpu_rule_with_one_warning, .timeout = TIMEOUT)
{
    snprintf(pci_of[0], sizeof pci_of[0], "0000:11:00.0");
    pw_log_set(collect, NULL);
    train_pinned_on_pcidev();
    train_pinned_on_pcidev(); /* a second pipeline: not said again */
    pw_log_set(NULL, NULL);
    const char *want = "engine: GPU 0000:11:00.0 is not in the topology (no PCI device with that bus id); "
                       "workers bind by the CPU rule instead of near their GPUs";
    cr_assert_eq(count_of(warnings, want), 1, "warnings:\n%s", warnings);
}

/* A PCI device this machine has (whatever it is) stands in for a GPU: the
 * workers bind near it, with no fallback. */
Test(gpu_binding, binds_near_a_device_of_this_machine, .timeout = TIMEOUT)
{
    hwloc_topology_t t = load("this");
    hwloc_obj_t pd = hwloc_get_next_pcidev(t, NULL);
    if (!pd) {
        hwloc_topology_destroy(t);
        cr_skip_test("this machine's topology shows no PCI device");
    }
    const struct hwloc_pcidev_attr_s *a = &pd->attr->pcidev;
    snprintf(pci_of[0], sizeof pci_of[0], "%04x:%02x:%02x.%01x", (unsigned)a->domain, (unsigned)a->bus,
             (unsigned)a->dev, (unsigned)a->func);
    snprintf(pci_of[1], sizeof pci_of[1], "%s", pci_of[0]);
    const char *ids[] = {pci_of[0], pci_of[1]};
    pw_cpu_placement *p = NULL;
    cr_assert_eq(pw_cpu_place_gpus(t, 2, ids, &p), PW_OK, "%s", pw_last_error());
    hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(t, pd);
    for (int r = 0; r < 2; r++)
        cr_assert(hwloc_bitmap_isincluded(p->cpusets[r], anc->cpuset), "rank %d near %s", r, pci_of[0]);
    pw_cpu_placement_destroy(p);
    hwloc_topology_destroy(t);
    pw_log_set(collect, NULL);
    train_pinned_on_pcidev();
    pw_log_set(NULL, NULL);
    cr_assert_not(strstr(warnings, "CPU rule"), "warnings:\n%s", warnings);
}
