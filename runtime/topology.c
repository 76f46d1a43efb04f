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

static int numa_of(hwloc_topology_t topo, hwloc_const_nodeset_t ns);
static pw_status place_stages(hwloc_topology_t topo, const pw_place_config *cfg, const int *rank_gpu,
                              int strict, pw_placement **out);

void pw_cpu_placement_destroy(pw_cpu_placement *p)
{
    if (!p) return;
    for (int r = 0; p->cpusets && r < p->n_ranks; r++) hwloc_bitmap_free(p->cpusets[r]);
    for (int r = 0; p->nodesets && r < p->n_ranks; r++) hwloc_bitmap_free(p->nodesets[r]);
    free(p->cpusets);
    free(p->nodesets);
    free(p->numa);
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
    p->n_numa = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    p->core = calloc((size_t)n_ranks, sizeof *p->core);
    p->cpusets = calloc((size_t)n_ranks, sizeof *p->cpusets);
    p->nodesets = calloc((size_t)n_ranks, sizeof *p->nodesets);
    p->numa = calloc((size_t)n_ranks, sizeof *p->numa);
    if (!p->core || !p->cpusets || !p->nodesets || !p->numa) goto nomem;
    for (int r = 0; r < n_ranks; r++) {
        int idx = r % n;
        hwloc_obj_t obj = hwloc_get_obj_by_type(topo, type, (unsigned)idx);
        p->core[r] = idx;
        p->cpusets[r] = obj && obj->cpuset ? hwloc_bitmap_dup(obj->cpuset) : hwloc_bitmap_alloc();
        /* Its memory: the NUMA node(s) local to its PUs, as pw_place_stages
         * binds a stage's (several where memory-only nodes such as HBM
         * share the locality). */
        p->nodesets[r] = hwloc_bitmap_alloc();
        if (!p->cpusets[r] || !p->nodesets[r] ||
            hwloc_cpuset_to_nodeset(topo, p->cpusets[r], p->nodesets[r]) != 0)
            goto nomem;
        p->numa[r] = numa_of(topo, p->nodesets[r]);
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

/* The engine's per-worker view of a stage placement: each rank's cpuset and
 * nodeset, copied. Consumes pl (destroyed either way). */
static pw_status to_cpu_placement(hwloc_topology_t topo, pw_placement *pl, pw_cpu_placement **out)
{
    const int n = pl->n_ranks;
    pw_cpu_placement *p = calloc(1, sizeof *p);
    if (!p) goto nomem;
    p->n_ranks = n;
    p->n_cores = pl->n_cores;
    p->shared = pl->shared;
    p->n_numa = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    p->core = calloc((size_t)n, sizeof *p->core);
    p->cpusets = calloc((size_t)n, sizeof *p->cpusets);
    p->nodesets = calloc((size_t)n, sizeof *p->nodesets);
    p->numa = calloc((size_t)n, sizeof *p->numa);
    if (!p->core || !p->cpusets || !p->nodesets || !p->numa) goto nomem;
    for (int r = 0; r < n; r++) {
        const pw_rank_place *rp = &pl->ranks[r];
        p->core[r] = rp->first_core;
        p->cpusets[r] = hwloc_bitmap_dup(rp->cpuset);
        p->nodesets[r] = hwloc_bitmap_dup(rp->nodeset);
        if (!p->cpusets[r] || !p->nodesets[r]) goto nomem;
        p->numa[r] = numa_of(topo, p->nodesets[r]);
    }
    snprintf(p->note, sizeof p->note, "%s", pl->note);
    pw_placement_destroy(pl);
    *out = p;
    return PW_OK;
nomem:
    pw_cpu_placement_destroy(p);
    pw_status st = pw_error(PW_ERR_NOMEM, "placement: out of memory for %d ranks", n);
    pw_placement_destroy(pl);
    return st;
}

pw_status pw_cpu_place_pipeline(hwloc_topology_t topo, int n_stages, int n_replicas, pw_cpu_placement **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_cpu_place_pipeline: out is NULL");
    *out = NULL;
    if (n_replicas < 1) n_replicas = 1;
    /* Worker threads run on CPU cores even when the machine has GPUs. */
    pw_place_config pc = {.n_stages = n_stages, .n_replicas = n_replicas, .gpus = 0};
    pw_placement *pl = NULL;
    PW_CHECK(pw_place_stages(topo, &pc, &pl));
    return to_cpu_placement(topo, pl, out);
}

int pw_cpu_bind_thread(hwloc_topology_t topo, hwloc_const_cpuset_t set, const char *who)
{
    if (!topo || !set || hwloc_bitmap_iszero(set)) {
        PW_WARN("%s: no CPU set to bind to; running unpinned", who ? who : "thread");
        return -1;
    }
    /* hwloc binds as a silent no-op on a topology that is not this
     * machine's (synthetic, XML): refuse out loud instead. */
    if (!hwloc_topology_is_thissystem(topo)) {
        PW_WARN("%s: the topology is not this machine's; running unpinned", who ? who : "thread");
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

/* ------------------------------------------------------------ topologies */

/* Largest OS index of a PU or NUMA node in a topology file: far above any
 * machine's (a 2^20-bit hwloc bitmap is 128 KB). */
#define PW_TOPOLOGY_MAX_OS_INDEX (1u << 20)

/* The value of attribute `name` in the attribute list tag[0, n) (` name="v"`
 * or with single quotes), its length in *len; NULL when absent. */
static const char *attr_value(const char *tag, size_t n, const char *name, size_t *len)
{
    size_t k = strlen(name);
    for (size_t i = 1; i + k + 1 < n; i++) {
        if ((tag[i - 1] == ' ' || tag[i - 1] == '\t' || tag[i - 1] == '\n' || tag[i - 1] == '\r') &&
            memcmp(tag + i, name, k) == 0 && tag[i + k] == '=') {
            char q = tag[i + k + 1];
            const char *v = tag + i + k + 2, *end = tag + n;
            if (q != '"' && q != '\'') { /* malformed: hwloc will say so */
                *len = 0;
                return v - 1;
            }
            const char *e = v;
            while (e < end && *e != q) e++;
            *len = (size_t)(e - v);
            return v;
        }
    }
    return NULL;
}

static int has_attr(const char *tag, size_t n, const char *name)
{
    size_t len;
    return attr_value(tag, n, name, &len) != NULL;
}

/* An hwloc bitmap attribute ("0x0000000f", "0xffffffff,0x00000001",
 * "0xf...f" for an infinite set) as 64-bit words, least significant first,
 * in *words[0, *n) (*full: infinite); 0 on bad syntax or more bits than
 * PW_TOPOLOGY_MAX_OS_INDEX. *words is realloc'ed. */
static int parse_bitmap(const char *v, size_t len, uint64_t **words, size_t *n, int *full)
{
    *n = 0;
    *full = 0;
    if (len == 7 && !memcmp(v, "0xf...f", 7)) {
        *full = 1;
        return 1;
    }
    size_t tokens = 1;
    for (size_t i = 0; i < len; i++) tokens += v[i] == ',';
    if (tokens * 32 > PW_TOPOLOGY_MAX_OS_INDEX + 64) return 0;
    size_t nw = (tokens + 1) / 2;
    uint64_t *w = realloc(*words, (nw ? nw : 1) * sizeof *w);
    if (!w) return 0;
    *words = w;
    memset(w, 0, (nw ? nw : 1) * sizeof *w);
    size_t t = tokens, i = 0; /* the first token is the most significant */
    while (i <= len && t > 0) {
        size_t j = i;
        while (j < len && v[j] != ',') j++;
        t--;
        if (j - i == 7 && !memcmp(v + i, "0xf...f", 7)) { /* an infinite head: all ones above */
            *full = 1;
        } else {
            if (j - i < 3 || j - i > 10 || v[i] != '0' || (v[i + 1] != 'x' && v[i + 1] != 'X')) return 0;
            uint64_t word = 0;
            for (size_t k = i + 2; k < j; k++) {
                int c = v[k], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
                if (d < 0) return 0;
                word = word * 16 + (uint64_t)d;
            }
            w[t / 2] |= word << (32 * (t % 2));
        }
        i = j + 1;
    }
    *n = nw;
    return 1;
}

/* a ⊆ b for parsed bitmaps. */
static int bitmap_within(const uint64_t *a, size_t na, int afull, const uint64_t *b, size_t nb, int bfull)
{
    if (bfull) return 1;
    if (afull) return 0;
    for (size_t i = 0; i < na; i++)
        if (a[i] & ~(i < nb ? b[i] : 0)) return 0;
    return 1;
}

/* hwloc 2.9 dereferences NULL while loading an XML <object> that has a
 * cpuset but no complete_cpuset (or the reverse, or the same for nodesets),
 * which any hand edit or a typo in an attribute name makes; lstopo always
 * writes them in pairs. Checked here, so such a file is an error and not a
 * crash (found by tests/fuzz/fuzz_topology.c). */
static pw_status xml_precheck(const char *path, FILE *f)
{
    static const char *const pairs[][2] = {{"cpuset", "complete_cpuset"},
                                           {"nodeset", "complete_nodeset"}};
    pw_status st = PW_OK;
    size_t cap = 4096, n = 0;
    char *tag = malloc(cap);
    if (!tag) return pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
    int c, line = 1, in_tag = 0, tag_line = 0;
    const char open_tag[] = "<object";
    size_t match = 0;
    uint64_t *bm_a = NULL, *bm_b = NULL; /* parsed bitmaps, reused */
    while (st == PW_OK && (c = getc(f)) != EOF) {
        if (c == '\n') line++;
        if (!in_tag) {
            match = c == open_tag[match] ? match + 1 : c == '<' ? 1 : 0;
            if (match == sizeof open_tag - 1) {
                in_tag = 1, n = 0, match = 0, tag_line = line;
            }
            continue;
        }
        if (c != '>') {
            if (n + 1 == cap) {
                char *q = realloc(tag, cap * 2);
                if (!q) {
                    st = pw_error(PW_ERR_NOMEM, "%s: out of memory", path);
                    break;
                }
                tag = q, cap *= 2;
            }
            tag[n++] = (char)c;
            continue;
        }
        in_tag = 0;
        if (n > 0 && tag[0] != ' ' && tag[0] != '\t' && tag[0] != '\n' && tag[0] != '\r')
            continue; /* <objectfoo>: not an object */
        for (int k = 0; k < 2 && st == PW_OK; k++) {
            int a = has_attr(tag, n, pairs[k][0]), b = has_attr(tag, n, pairs[k][1]);
            if (a != b)
                st = pw_error(PW_ERR_FORMAT, "%s:%d: <object> has %s but no %s (lstopo writes "
                              "both; hwloc cannot load one without the other)", path, tag_line,
                              pairs[k][a ? 0 : 1], pairs[k][a ? 1 : 0]);
        }
        /* hwloc 2.9 also crashes on a set that is not a bitmap ("0x0000pf")
         * or a complete set that does not hold the object's set (found by
         * fuzz_topology): the syntax and that inclusion are checked. */
        for (int k = 0; k < 2 && st == PW_OK; k++) {
            size_t la, lb;
            const char *va = attr_value(tag, n, pairs[k][0], &la), *vb = attr_value(tag, n, pairs[k][1], &lb);
            if (!va || !vb) continue;
            size_t na, nb;
            int fa, fb;
            if (!parse_bitmap(va, la, &bm_a, &na, &fa) || !parse_bitmap(vb, lb, &bm_b, &nb, &fb))
                st = pw_error(PW_ERR_FORMAT, "%s:%d: <object> %s or %s is not an hwloc bitmap "
                              "(\"0x0000000f\", words of 8 hex digits separated by commas)", path,
                              tag_line, pairs[k][0], pairs[k][1]);
            else if (!bitmap_within(bm_a, na, fa, bm_b, nb, fb))
                st = pw_error(PW_ERR_FORMAT, "%s:%d: <object> %s is not within its %s", path, tag_line,
                              pairs[k][0], pairs[k][1]);
        }
        for (int k = 0; k < 4 && st == PW_OK; k++) { /* the other sets: syntax */
            static const char *const others[] = {"allowed_cpuset", "allowed_nodeset", "complete_cpuset",
                                                 "complete_nodeset"};
            size_t l, nn;
            int fl;
            const char *v = attr_value(tag, n, others[k], &l);
            if (v && !parse_bitmap(v, l, &bm_a, &nn, &fl))
                st = pw_error(PW_ERR_FORMAT, "%s:%d: <object> %s is not an hwloc bitmap", path, tag_line,
                              others[k]);
        }
        /* A PU or NUMA node without an OS index (hwloc's UINT_MAX) or with a
         * huge one makes hwloc build bitmaps up to that bit: seconds and
         * hundreds of MB for a 2 KB file. */
        size_t tl, il;
        const char *type = attr_value(tag, n, "type", &tl);
        if (st != PW_OK || !type || !((tl == 2 && !memcmp(type, "PU", 2)) ||
                                      (tl == 8 && !memcmp(type, "NUMANode", 8))))
            continue;
        const char *idx = attr_value(tag, n, "os_index", &il);
        unsigned long v = 0;
        size_t d = 0;
        while (idx && d < il && d < 10 && idx[d] >= '0' && idx[d] <= '9') v = v * 10 + (unsigned long)(idx[d++] - '0');
        if (!idx || d == 0 || d != il || v > PW_TOPOLOGY_MAX_OS_INDEX)
            st = pw_error(PW_ERR_FORMAT, "%s:%d: <object type=\"%.*s\"> needs an os_index in 0..%u "
                          "(got %s%.*s%s)", path, tag_line, (int)tl, type,
                          (unsigned)PW_TOPOLOGY_MAX_OS_INDEX, idx ? "'" : "none", idx ? (int)(il < 24 ? il : 24) : 0,
                          idx ? idx : "", idx ? "'" : "");
    }
    if (st == PW_OK && ferror(f)) st = pw_error(PW_ERR_IO, "%s: read failed: %s", path, strerror(errno));
    free(tag);
    free(bm_a);
    free(bm_b);
    return st;
}

pw_status pw_topology_load_xml(const char *path, hwloc_topology_t *out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_topology_load_xml: out is NULL");
    *out = NULL;
    if (!path) return pw_error(PW_ERR_INVALID_ARG, "pw_topology_load_xml: path is NULL");
    FILE *f = fopen(path, "rb");
    if (!f) return pw_error(PW_ERR_IO, "%s: cannot open topology: %s", path, strerror(errno));
    pw_status pre = xml_precheck(path, f);
    fclose(f);
    if (pre != PW_OK) return pre;
    hwloc_topology_t t;
    if (hwloc_topology_init(&t) != 0)
        return pw_error(PW_ERR_UNSUPPORTED, "hwloc: cannot initialise a topology: %s", strerror(errno));
    /* GPUs are OS devices under PCI objects: keep them (hwloc drops I/O by default). */
    hwloc_topology_set_io_types_filter(t, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    if (hwloc_topology_set_xml(t, path) != 0 || hwloc_topology_load(t) != 0) {
        int err = errno;
        hwloc_topology_destroy(t);
        return pw_error(PW_ERR_FORMAT, "%s: not an hwloc topology XML (lstopo --of xml): %s", path,
                        strerror(err));
    }
    /* Placement sets bits by the OS indices of PUs and NUMA nodes (hwloc
     * bitmaps grow to the largest): a missing one (hwloc's "unknown",
     * UINT_MAX) or an absurd one would make a 512 MB bitmap and a long loop
     * per rank (found by tests/fuzz/fuzz_topology.c). */
    static const hwloc_obj_type_t indexed[] = {HWLOC_OBJ_PU, HWLOC_OBJ_NUMANODE};
    for (int k = 0; k < 2; k++) {
        hwloc_obj_t o = NULL;
        while ((o = hwloc_get_next_obj_by_type(t, indexed[k], o)) != NULL) {
            if (o->os_index <= PW_TOPOLOGY_MAX_OS_INDEX) continue;
            pw_status st = o->os_index == HWLOC_UNKNOWN_INDEX
                ? pw_error(PW_ERR_FORMAT, "%s: %s #%u (logical index) has no os_index (lstopo "
                           "writes one for every PU and NUMANode)", path,
                           hwloc_obj_type_string(indexed[k]), o->logical_index)
                : pw_error(PW_ERR_FORMAT, "%s: %s #%u (logical index) has os_index %u, above the "
                           "%u pipewright accepts", path, hwloc_obj_type_string(indexed[k]),
                           o->logical_index, o->os_index, (unsigned)PW_TOPOLOGY_MAX_OS_INDEX);
            hwloc_topology_destroy(t);
            return st;
        }
    }
    *out = t;
    return PW_OK;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

pw_status pw_topology_load_spec(const char *spec, hwloc_topology_t *out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_topology_load_spec: out is NULL");
    *out = NULL;
    if (!spec || !*spec || !strcmp(spec, "this")) {
        hwloc_topology_t t;
        if (hwloc_topology_init(&t) != 0)
            return pw_error(PW_ERR_UNSUPPORTED, "hwloc: cannot initialise a topology: %s",
                            strerror(errno));
        hwloc_topology_set_io_types_filter(t, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
        /* On Linux the OS backend reads PCI devices from sysfs itself; the
         * libpciaccess component finds nothing more and leaks at exit. */
        hwloc_topology_set_components(t, HWLOC_TOPOLOGY_COMPONENTS_FLAG_BLACKLIST, "pci");
        if (hwloc_topology_load(t) != 0) {
            int err = errno;
            hwloc_topology_destroy(t);
            return pw_error(PW_ERR_UNSUPPORTED, "hwloc: cannot read this machine's topology: %s",
                            strerror(err));
        }
        *out = t;
        return PW_OK;
    }
    FILE *f = fopen(spec, "rb");
    if (f) fclose(f);
    if (f || ends_with(spec, ".xml")) return pw_topology_load_xml(spec, out);
    return pw_topology_load_synthetic(spec, out);
}

/* -------------------------------------------------------- stage placement */

void pw_placement_destroy(pw_placement *p)
{
    if (!p) return;
    for (int g = 0; p->gpus && g < p->n_gpus; g++) hwloc_bitmap_free(p->gpus[g].cpuset);
    for (int r = 0; p->ranks && r < p->n_ranks; r++) {
        hwloc_bitmap_free(p->ranks[r].cpuset);
        hwloc_bitmap_free(p->ranks[r].nodeset);
    }
    free(p->gpus);
    free(p->ranks);
    free(p);
}

/* Logical index of the package above obj (obj itself when it is one), -1. */
static int package_of(hwloc_topology_t topo, hwloc_obj_t obj)
{
    if (!obj) return -1;
    if (obj->type == HWLOC_OBJ_PACKAGE) return (int)obj->logical_index;
    hwloc_obj_t p = hwloc_get_ancestor_obj_by_type(topo, HWLOC_OBJ_PACKAGE, obj);
    return p ? (int)p->logical_index : -1;
}

/* Logical index of the first NUMA node of a nodeset, -1 when empty. */
static int numa_of(hwloc_topology_t topo, hwloc_const_nodeset_t ns)
{
    if (!ns || hwloc_bitmap_iszero(ns)) return -1;
    hwloc_obj_t n = hwloc_get_numanode_obj_by_os_index(topo, (unsigned)hwloc_bitmap_first(ns));
    return n ? (int)n->logical_index : -1;
}

static int cmp_gpu(const void *a, const void *b)
{
    const pw_gpu *x = a, *y = b;
    if (x->package != y->package) return x->package < y->package ? -1 : 1;
    if (x->numa != y->numa) return x->numa < y->numa ? -1 : 1;
    int c = strcmp(x->pci, y->pci);
    return c ? c : strcmp(x->name, y->name);
}

/* "0000:11:00.0" for a PCI device (hwloc's own format, lower case). */
static void pci_string(hwloc_obj_t pci, char *buf, size_t n)
{
    const struct hwloc_pcidev_attr_s *pa = &pci->attr->pcidev;
    snprintf(buf, n, "%04x:%02x:%02x.%01x", (unsigned)pa->domain, (unsigned)pa->bus, (unsigned)pa->dev,
             (unsigned)pa->func);
}

/* Model and memory of a card from one of its OS devices, where not known
 * yet: lstopo's CUDA device carries both (CUDAGlobalMemorySize, in KiB),
 * NVML the model, OpenCL both. */
static void gpu_info(pw_gpu *g, hwloc_obj_t os)
{
    const char *v;
    if (!g->model[0] && (v = hwloc_obj_get_info_by_name(os, "GPUModel")))
        snprintf(g->model, sizeof g->model, "%s", v);
    if (g->memory <= 0) {
        v = hwloc_obj_get_info_by_name(os, "CUDAGlobalMemorySize");
        if (!v) v = hwloc_obj_get_info_by_name(os, "OpenCLGlobalMemorySize");
        long long kib = v ? strtoll(v, NULL, 10) : 0;
        if (kib > 0 && kib < (1ll << 50)) g->memory = (int64_t)kib * 1024;
    }
}

/* g's CPU locality: the cores of the first non-I/O ancestor of `io` (the
 * whole machine when io is NULL or has none). */
static pw_status gpu_locate(hwloc_topology_t topo, pw_gpu *g, hwloc_obj_t io)
{
    hwloc_obj_t anc = io ? hwloc_get_non_io_ancestor_obj(topo, io) : NULL;
    g->cpuset = hwloc_bitmap_dup(anc && anc->cpuset ? anc->cpuset : hwloc_topology_get_topology_cpuset(topo));
    if (!g->cpuset) return pw_error(PW_ERR_NOMEM, "placement: out of memory");
    g->located = io != NULL;
    g->package = package_of(topo, anc);
    g->numa = numa_of(topo, anc ? anc->nodeset : NULL);
    return PW_OK;
}

static int is_gpu_osdev(hwloc_obj_t os)
{
    return os->type == HWLOC_OBJ_OS_DEVICE && (os->attr->osdev.type == HWLOC_OBJ_OSDEV_GPU ||
                                               os->attr->osdev.type == HWLOC_OBJ_OSDEV_COPROC);
}

/* Parses a PCI bus id — "0000:11:00.0" (CUDA may write an 8-digit domain,
 * upper case) or "11:00.0" — into domain, bus, device, function. 0 when
 * malformed. */
static int parse_busid(const char *busid, unsigned a[4])
{
    char tail;
    a[0] = 0;
    if (sscanf(busid, "%x:%x:%x.%x%c", &a[0], &a[1], &a[2], &a[3], &tail) == 4) return 1;
    a[0] = 0;
    return sscanf(busid, "%x:%x.%x%c", &a[1], &a[2], &a[3], &tail) == 3;
}

/* The PCI device of a bus id, NULL when the topology has none; *bad = 1
 * for a malformed id. */
static hwloc_obj_t find_pcidev(hwloc_topology_t topo, const char *busid, int *bad)
{
    unsigned a[4];
    *bad = !parse_busid(busid, a);
    return *bad ? NULL : hwloc_get_pcidev_by_busid(topo, a[0], a[1], a[2], a[3]);
}

/* The caller's GPUs (cfg->gpu_list), in its order, each located by bus id.
 * strict: one the topology lacks is an error; otherwise it has the whole
 * machine as its locality and the note says so. */
static pw_status gpus_from_list(hwloc_topology_t topo, const pw_place_config *cfg, int strict, pw_placement *p)
{
    const int n = cfg->n_gpu_list;
    p->gpus = calloc((size_t)n, sizeof *p->gpus);
    if (!p->gpus) return pw_error(PW_ERR_NOMEM, "placement: out of memory");
    int missing = 0, first_missing = -1;
    for (int k = 0; k < n; k++) {
        const pw_gpu_desc *d = &cfg->gpu_list[k];
        int bad = 0;
        hwloc_obj_t pd = d->pci ? find_pcidev(topo, d->pci, &bad) : NULL;
        if (!d->pci || bad)
            return pw_error(PW_ERR_INVALID_ARG, "placement: GPU %d: '%s' is not a PCI bus id (like "
                            "0000:11:00.0)", k, d->pci ? d->pci : "(null)");
        if (!pd && strict)
            return pw_error(PW_ERR_UNSUPPORTED, "GPU %s%s%s%s is not in the topology (no PCI device "
                            "with that bus id)", d->name ? d->name : "", d->name ? " (" : "", d->pci,
                            d->name ? ")" : "");
        pw_gpu *g = &p->gpus[p->n_gpus++];
        if (pd) pci_string(pd, g->pci, sizeof g->pci);
        else snprintf(g->pci, sizeof g->pci, "%s", d->pci);
        if (d->name) snprintf(g->name, sizeof g->name, "%s", d->name);
        for (hwloc_obj_t os = pd ? pd->io_first_child : NULL; os; os = os->next_sibling) {
            if (!is_gpu_osdev(os)) continue;
            if (!d->name && os->name && (!g->name[0] || (strncmp(g->name, "cuda", 4) != 0 &&
                                                         strncmp(os->name, "cuda", 4) == 0)))
                snprintf(g->name, sizeof g->name, "%s", os->name);
            gpu_info(g, os);
        }
        if (!g->name[0]) snprintf(g->name, sizeof g->name, "gpu%d", k);
        if (d->model) snprintf(g->model, sizeof g->model, "%s", d->model);
        const char *v;
        if (!g->model[0] && pd && (v = hwloc_obj_get_info_by_name(pd, "PCIDevice")))
            snprintf(g->model, sizeof g->model, "%s", v);
        if (d->memory > 0) g->memory = d->memory;
        PW_CHECK(gpu_locate(topo, g, pd));
        if (!pd && missing++ == 0) first_missing = k;
    }
    if (missing == 1)
        snprintf(p->note, sizeof p->note, "%s (%s) is not in the topology: its ranks may run on any core",
                 p->gpus[first_missing].name, p->gpus[first_missing].pci);
    else if (missing > 1)
        snprintf(p->note, sizeof p->note, "%d of the GPUs are not in the topology: their ranks may run "
                 "on any core", missing);
    return PW_OK;
}

/* The GPUs of topo, one per card, in locality order. */
static pw_status find_gpus(hwloc_topology_t topo, pw_placement *p)
{
    int cap = 0;
    for (hwloc_obj_t os = NULL; (os = hwloc_get_next_osdev(topo, os));) cap++;
    if (cap == 0) return PW_OK;
    p->gpus = calloc((size_t)cap, sizeof *p->gpus);
    hwloc_obj_t *ident = calloc((size_t)cap, sizeof *ident);
    if (!p->gpus || !ident) {
        free(ident);
        return pw_error(PW_ERR_NOMEM, "placement: out of memory");
    }
    for (hwloc_obj_t os = NULL; (os = hwloc_get_next_osdev(topo, os));) {
        hwloc_obj_osdev_type_t t = os->attr->osdev.type;
        if (t != HWLOC_OBJ_OSDEV_GPU && t != HWLOC_OBJ_OSDEV_COPROC) continue;
        /* One card shows up as several OS devices (cuda0, nvml0, card0,
         * opencl0d0): they share the PCI device above them. */
        hwloc_obj_t id = os->parent && os->parent->type == HWLOC_OBJ_PCI_DEVICE ? os->parent : os;
        int k = 0;
        while (k < p->n_gpus && ident[k] != id) k++;
        pw_gpu *g = &p->gpus[k];
        if (k < p->n_gpus) {
            /* Prefer the CUDA name, which is what a CUDA backend calls it. */
            if (strncmp(g->name, "cuda", 4) != 0 && os->name && strncmp(os->name, "cuda", 4) == 0)
                snprintf(g->name, sizeof g->name, "%s", os->name);
            gpu_info(g, os);
            continue;
        }
        ident[p->n_gpus++] = id;
        snprintf(g->name, sizeof g->name, "%s", os->name ? os->name : "gpu");
        if (id->type == HWLOC_OBJ_PCI_DEVICE) pci_string(id, g->pci, sizeof g->pci);
        gpu_info(g, os);
        pw_status st = gpu_locate(topo, g, os);
        if (st != PW_OK) {
            free(ident);
            return st;
        }
    }
    for (int k = 0; k < p->n_gpus; k++) {
        const char *v;
        if (!p->gpus[k].model[0] && ident[k]->type == HWLOC_OBJ_PCI_DEVICE &&
            (v = hwloc_obj_get_info_by_name(ident[k], "PCIDevice")))
            snprintf(p->gpus[k].model, sizeof p->gpus[k].model, "%s", v);
    }
    free(ident);
    qsort(p->gpus, (size_t)p->n_gpus, sizeof *p->gpus, cmp_gpu);
    return PW_OK;
}

/* Gives rank r the cores [first, first + n) of the slot list `type`. */
static pw_status assign_cores(hwloc_topology_t topo, hwloc_obj_type_t type, pw_rank_place *rk,
                              const int *cores, int first, int n)
{
    rk->first_core = cores[first];
    rk->n_cores = n;
    for (int k = 0; k < n; k++) {
        hwloc_obj_t o = hwloc_get_obj_by_type(topo, type, (unsigned)cores[first + k]);
        if (o && o->cpuset) hwloc_bitmap_or(rk->cpuset, rk->cpuset, o->cpuset);
    }
    hwloc_obj_t o = hwloc_get_obj_by_type(topo, type, (unsigned)cores[first]);
    rk->package = package_of(topo, o);
    if (hwloc_cpuset_to_nodeset(topo, rk->cpuset, rk->nodeset) != 0)
        return pw_error(PW_ERR_NOMEM, "placement: out of memory");
    rk->numa = o && o->nodeset ? numa_of(topo, o->nodeset) : -1;
    rk->n_numa = hwloc_bitmap_weight(rk->nodeset);
    return PW_OK;
}

pw_status pw_place_stages(hwloc_topology_t topo, const pw_place_config *cfg, pw_placement **out)
{
    return place_stages(topo, cfg, NULL, 0, out);
}

/* pw_place_stages; with rank_gpu ([n_stages × n_replicas], indices into
 * cfg->gpu_list) each rank's GPU is given instead of the rule; strict: every
 * GPU of gpu_list must be in the topology. */
static pw_status place_stages(hwloc_topology_t topo, const pw_place_config *cfg, const int *rank_gpu,
                              int strict, pw_placement **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_place_stages: out is NULL");
    *out = NULL;
    if (!topo) return pw_error(PW_ERR_INVALID_ARG, "pw_place_stages: topology is NULL");
    if (!cfg || cfg->n_stages < 1 || cfg->n_replicas < 0 || cfg->cores_per_rank < 0 ||
        cfg->n_gpu_list < 0 || (cfg->n_gpu_list > 0 && !cfg->gpu_list))
        return pw_error(PW_ERR_INVALID_ARG, "pw_place_stages: %d stages, %d replicas, %d cores "
                        "per rank", cfg ? cfg->n_stages : 0, cfg ? cfg->n_replicas : 0,
                        cfg ? cfg->cores_per_rank : 0);
    const int S = cfg->n_stages, R = cfg->n_replicas > 0 ? cfg->n_replicas : 1;
    if ((int64_t)S * R > 1 << 20)
        return pw_error(PW_ERR_INVALID_ARG, "pw_place_stages: %d x %d ranks is too many", S, R);
    const int N = S * R;

    hwloc_obj_type_t type = HWLOC_OBJ_CORE;
    int nc = hwloc_get_nbobjs_by_type(topo, type);
    if (nc <= 0) {
        type = HWLOC_OBJ_PU;
        nc = hwloc_get_nbobjs_by_type(topo, type);
    }
    if (nc <= 0) return pw_error(PW_ERR_UNSUPPORTED, "hwloc: the topology has no cores or PUs");

    pw_status st = PW_OK;
    int *cores = malloc(sizeof(int) * (size_t)nc);
    int *local = malloc(sizeof(int) * (size_t)nc);
    pw_placement *p = calloc(1, sizeof *p);
    if (!p || !cores || !local) {
        st = pw_error(PW_ERR_NOMEM, "placement: out of memory");
        goto fail;
    }
    p->n_stages = S;
    p->n_replicas = R;
    p->n_ranks = N;
    p->n_cores = nc;
    p->cores_are_pus = type == HWLOC_OBJ_PU;
    p->ranks = calloc((size_t)N, sizeof *p->ranks);
    if (!p->ranks) {
        st = pw_error(PW_ERR_NOMEM, "placement: out of memory");
        goto fail;
    }
    for (int r = 0; r < N; r++) {
        p->ranks[r].stage = r % S;
        p->ranks[r].replica = r / S;
        p->ranks[r].gpu = -1;
        p->ranks[r].cpuset = hwloc_bitmap_alloc();
        p->ranks[r].nodeset = hwloc_bitmap_alloc();
        if (!p->ranks[r].cpuset || !p->ranks[r].nodeset) {
            st = pw_error(PW_ERR_NOMEM, "placement: out of memory");
            goto fail;
        }
    }
    for (int k = 0; k < nc; k++) cores[k] = k;
    const char *unit = p->cores_are_pus ? "PU" : "core";
    if (cfg->n_gpu_list > 0) PW_CHECK_GOTO(gpus_from_list(topo, cfg, strict, p), st, fail);
    else if (cfg->gpus != 0) PW_CHECK_GOTO(find_gpus(topo, p), st, fail);
    if (cfg->n_gpu_list == 0 && cfg->gpus == 1 && p->n_gpus == 0) {
        st = pw_error(PW_ERR_UNSUPPORTED, "placement: the topology has no GPUs (no GPU or "
                      "co-processor OS devices; an XML needs lstopo's I/O objects)");
        goto fail;
    }
    p->on_gpus = (cfg->n_gpu_list > 0 || cfg->gpus != 0) && p->n_gpus > 0;

    if (!p->on_gpus) {
        if (N <= nc) {
            for (int r = 0; r < R; r++) {
                int lo = (int)((int64_t)r * nc / R), hi = (int)((int64_t)(r + 1) * nc / R);
                for (int s = 0; s < S; s++) {
                    int a = lo + (int)((int64_t)s * (hi - lo) / S);
                    int b = lo + (int)((int64_t)(s + 1) * (hi - lo) / S);
                    int n = b - a;
                    if (cfg->cores_per_rank > 0 && n > cfg->cores_per_rank) n = cfg->cores_per_rank;
                    PW_CHECK_GOTO(assign_cores(topo, type, &p->ranks[r * S + s], cores, a, n), st, fail);
                }
            }
        } else {
            p->shared = 1;
            snprintf(p->note, sizeof p->note, "%d ranks on %d %ss: ranks share %ss", N, nc, unit, unit);
            for (int k = 0; k < N; k++)
                PW_CHECK_GOTO(assign_cores(topo, type, &p->ranks[k], cores, k % nc, 1), st, fail);
        }
        *out = p;
        free(cores);
        free(local);
        return PW_OK;
    }

    const int G = p->n_gpus;
    if (rank_gpu) {
        for (int k = 0; k < N; k++) p->ranks[k].gpu = rank_gpu[k];
    } else if (N <= G) {
        for (int r = 0; r < R; r++) {
            int lo = (int)((int64_t)r * G / R);
            for (int s = 0; s < S; s++) p->ranks[r * S + s].gpu = lo + s;
        }
    } else {
        p->shared = 1;
        size_t len = strlen(p->note); /* gpus_from_list's, or "" */
        snprintf(p->note + len, sizeof p->note - len, "%s%d ranks on %d GPU%s: ranks share GPUs",
                 len ? "; " : "", N, G, G > 1 ? "s" : "");
        for (int k = 0; k < N; k++) p->ranks[k].gpu = k % G;
    }
    /* Worker cores: the ranks whose GPUs share one CPU locality split its
     * cores evenly, in rank order. */
    unsigned char *done = calloc((size_t)N, 1);
    if (!done) {
        st = pw_error(PW_ERR_NOMEM, "placement: out of memory");
        goto fail;
    }
    for (int r0 = 0; r0 < N; r0++) {
        if (done[r0]) continue;
        hwloc_const_cpuset_t loc = p->gpus[p->ranks[r0].gpu].cpuset;
        int nl = 0;
        for (int k = 0; k < nc; k++) {
            hwloc_obj_t o = hwloc_get_obj_by_type(topo, type, (unsigned)k);
            if (o && o->cpuset && hwloc_bitmap_isincluded(o->cpuset, loc)) local[nl++] = k;
        }
        if (nl == 0) { /* a GPU without CPU locality: the whole machine */
            for (int k = 0; k < nc; k++) local[k] = k;
            nl = nc;
        }
        int K = 0;
        for (int r = r0; r < N; r++)
            if (!done[r] && hwloc_bitmap_isequal(p->gpus[p->ranks[r].gpu].cpuset, loc)) K++;
        int k = 0;
        for (int r = r0; r < N; r++) {
            if (done[r] || !hwloc_bitmap_isequal(p->gpus[p->ranks[r].gpu].cpuset, loc)) continue;
            done[r] = 1;
            if (K <= nl) {
                int a = (int)((int64_t)k * nl / K), b = (int)((int64_t)(k + 1) * nl / K);
                int n = b - a;
                if (cfg->cores_per_rank > 0 && n > cfg->cores_per_rank) n = cfg->cores_per_rank;
                st = assign_cores(topo, type, &p->ranks[r], local, a, n);
            } else {
                if (!p->shared || !strstr(p->note, unit)) {
                    size_t len = strlen(p->note);
                    snprintf(p->note + len, sizeof p->note - len, "%s%d ranks on the %d %ss near "
                             "their GPUs: ranks share %ss", len ? "; " : "", K, nl, unit, unit);
                }
                p->shared = 1;
                st = assign_cores(topo, type, &p->ranks[r], local, k % nl, 1);
            }
            if (st != PW_OK) {
                free(done);
                goto fail;
            }
            k++;
        }
    }
    free(done);
    *out = p;
    free(cores);
    free(local);
    return PW_OK;
fail:
    pw_placement_destroy(p);
    free(cores);
    free(local);
    return st;
}

pw_status pw_cpu_place_gpus(hwloc_topology_t topo, int n_ranks, const char *const *pci,
                            pw_cpu_placement **out)
{
    if (!out) return pw_error(PW_ERR_INVALID_ARG, "pw_cpu_place_gpus: out is NULL");
    *out = NULL;
    if (!topo || !pci || n_ranks < 1 || n_ranks > 1 << 20)
        return pw_error(PW_ERR_INVALID_ARG, "pw_cpu_place_gpus: %s, %d ranks",
                        topo ? "bus ids" : "topology is NULL", n_ranks);
    /* The distinct GPUs in order of first use; rank r on GPU map[r]. Bus
     * ids are compared as the PCI addresses they name. */
    pw_gpu_desc *desc = calloc((size_t)n_ranks, sizeof *desc);
    unsigned (*addr)[4] = calloc((size_t)n_ranks, sizeof *addr);
    int *map = calloc((size_t)n_ranks, sizeof *map);
    pw_status st = PW_OK;
    if (!desc || !addr || !map) {
        st = pw_error(PW_ERR_NOMEM, "placement: out of memory");
        goto out;
    }
    int n = 0;
    for (int r = 0; r < n_ranks; r++) {
        unsigned a[4] = {0, 0, 0, 0};
        if (!pci[r] || !parse_busid(pci[r], a)) {
            st = pw_error(PW_ERR_INVALID_ARG, "placement: rank %d: '%s' is not a PCI bus id (like "
                          "0000:11:00.0)", r, pci[r] ? pci[r] : "(null)");
            goto out;
        }
        int k = 0;
        while (k < n && memcmp(addr[k], a, sizeof a) != 0) k++;
        if (k == n) {
            memcpy(addr[n], a, sizeof a);
            desc[n++].pci = pci[r];
        }
        map[r] = k;
    }
    pw_place_config pc = {.n_stages = n_ranks, .n_replicas = 1, .gpu_list = desc, .n_gpu_list = n};
    pw_placement *pl = NULL;
    st = place_stages(topo, &pc, map, 1, &pl);
    if (st == PW_OK) st = to_cpu_placement(topo, pl, out);
out:
    free(desc);
    free(addr);
    free(map);
    return st;
}

int pw_placement_describe(const pw_placement *p, int rank, char *buf, size_t n)
{
    if (!p || rank < 0 || rank >= p->n_ranks) return snprintf(buf, n, "?");
    const pw_rank_place *rk = &p->ranks[rank];
    char gpu[64] = "", cores[48];
    if (rk->gpu >= 0) {
        const pw_gpu *g = &p->gpus[rk->gpu];
        snprintf(gpu, sizeof gpu, g->pci[0] ? "%s (%s), " : "%s, ", g->name, g->pci);
    }
    const char *unit = p->cores_are_pus ? "PU" : "core";
    if (rk->n_cores == 1)
        snprintf(cores, sizeof cores, "%s %d", unit, rk->first_core);
    else
        snprintf(cores, sizeof cores, "%ss %d-%d", unit, rk->first_core, rk->first_core + rk->n_cores - 1);
    char numa[48] = "";
    if (rk->numa >= 0 && rk->n_numa > 1)
        snprintf(numa, sizeof numa, ", NUMA %d (+%d more)", rk->numa, rk->n_numa - 1);
    else if (rk->numa >= 0)
        snprintf(numa, sizeof numa, ", NUMA %d", rk->numa);
    return snprintf(buf, n, "%s%s%s", gpu, cores, numa);
}

int pw_mem_bind_area(hwloc_topology_t topo, const void *addr, size_t len,
                     hwloc_const_nodeset_t nodes, const char *who)
{
    if (len == 0) return 0;
    who = who ? who : "memory";
    if (!topo || !addr || !nodes || hwloc_bitmap_iszero(nodes)) {
        PW_WARN("%s: no NUMA node to bind %zu bytes to; memory stays where the OS puts it", who, len);
        return -1;
    }
    /* hwloc's binding calls succeed as no-ops on a topology that is not this
     * machine's (synthetic, XML): say so instead of pretending. */
    if (!hwloc_topology_is_thissystem(topo)) {
        PW_WARN("%s: the topology is not this machine's; %zu bytes not bound", who, len);
        return -1;
    }
    if (hwloc_set_area_membind(topo, addr, len, nodes, HWLOC_MEMBIND_BIND,
                               HWLOC_MEMBIND_BYNODESET | HWLOC_MEMBIND_MIGRATE) == 0) {
        PW_INFO(PW_SUB_TOPO, "%s: %zu bytes bound", who, len);
        return 0;
    }
    int err = errno;
    char *list = NULL;
    hwloc_bitmap_list_asprintf(&list, nodes);
    PW_WARN("%s: binding %zu bytes to NUMA node(s) %s refused (%s); memory stays where the OS "
            "puts it", who, len, list ? list : "?", strerror(err));
    free(list);
    return -1;
}
