/* libFuzzer harness: the hwloc topology XML reader (runtime/topology.c,
 * pw_topology_load_xml, the file `--topology` names) and the placements
 * computed on what it loads: a topology hwloc accepts may still have no
 * cores, no NUMA nodes, GPUs without PCI parents or odd memory sizes, and
 * every placement must still answer PW_OK or an error.
 *
 * Byte 0 gives the stage count (1..16), byte 1 the replicas (1..4) and
 * whether to ask for GPUs; the rest is the XML. Seeds:
 * tests/fuzz/corpus/topology/ (lstopo exports, tests/fixtures/topologies/). */
#include <hwloc.h>

#include "runtime/topology.h"
#include "tests/fuzz/fuzz_util.h"

/* hwloc 2.9's XML import leaks the objects it had set up when it rejects a
 * malformed file (inside hwloc_topology_load; not pipewright's to fix).
 * Full stacks on malloc let the suppression name that call exactly, so a
 * leak of pipewright's own (placements, bitmaps it allocates) still fails. */
const char *__asan_default_options(void);
const char *__lsan_default_suppressions(void);
const char *__asan_default_options(void) { return "fast_unwind_on_malloc=0"; }
const char *__lsan_default_suppressions(void) { return "leak:hwloc_topology_load\n"; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static hwloc_topology_t keep;
    if (!keep) {
        fuzz_quiet();
        setenv("HWLOC_HIDE_ERRORS", "2", 1); /* hwloc's own complaints about bad XML */
        /* hwloc unloads its plugins when the last topology goes and loads
         * them again for the next: one topology held for the whole run keeps
         * them loaded (60x faster, and no leak reports from unloaded code). */
        if (hwloc_topology_init(&keep) != 0) abort();
    }
    unsigned b0 = (unsigned)fuzz_take(&data, &size, 1), b1 = (unsigned)fuzz_take(&data, &size, 1);
    int stages = (int)(b0 & 15) + 1, replicas = (int)(b1 & 3) + 1;
    fuzz_file f = fuzz_file_open(data, size, "topology.xml");
    hwloc_topology_t t = NULL;
    if (pw_topology_load_xml(f.path, &t) == PW_OK) {
        pw_cpu_placement *cp = NULL;
        if (pw_cpu_place_pipeline(t, stages, replicas, &cp) == PW_OK) pw_cpu_placement_destroy(cp);
        pw_place_config cfg = {
            .n_stages = stages,
            .n_replicas = replicas,
            .cores_per_rank = (int)(b1 >> 4),
            .gpus = (b1 & 4) ? PW_PLACE_GPUS_AUTO : (b1 & 8) ? 1 : 0,
        };
        pw_placement *pl = NULL;
        if (pw_place_stages(t, &cfg, &pl) == PW_OK) {
            char buf[256];
            for (int r = 0; r < pl->n_ranks; r++) pw_placement_describe(pl, r, buf, sizeof buf);
            pw_placement_destroy(pl);
        }
        const char *pci[2] = {"0000:11:00.0", "0000:65:00.0"};
        if (pw_cpu_place_gpus(t, 2, pci, &cp) == PW_OK) pw_cpu_placement_destroy(cp);
        hwloc_topology_destroy(t);
    }
    fuzz_file_close(&f);
    return 0;
}
