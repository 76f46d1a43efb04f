/* Tests for stage placement on hwloc topologies (runtime/topology.h):
 * synthetic machines and XML fixtures of machines we do not have (2
 * packages x 2 NUMA nodes x 8 cores; 2 sockets x 4 GPUs), checked exactly;
 * binding degrades to a warning.
 *
 * Every test has the same .timeout: Criterion reports a spurious leak under
 * LeakSanitizer when timeouts differ within a file. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/log.h"
#include "runtime/topology.h"

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
 * memory belongs to (stages/pipeline.c binds each stage's arena there). */
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
