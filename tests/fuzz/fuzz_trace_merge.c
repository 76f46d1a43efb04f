/* libFuzzer harness for merging the per-process traces of a run
 * (runtime/trace_merge.h), as `pipe-trace A.json B.json ...` does: the input
 * is cut at NUL bytes (JSON never holds one) into up to 4 traces, merged
 * from memory, and the merged trace is read back and analysed with the
 * per-step table.
 *
 * Contract checked: the merge gives PW_OK, or PW_ERR_PARSE naming one of the
 * parts ("partK.json:line N: ..."), or PW_ERR_INVALID_ARG naming the parts
 * that do not belong together; a merged trace always reads back: its
 * analysis is PW_OK or the one refusal a well-formed trace can earn (times
 * adding past 2^63 ns). Nothing crashes, leaks, hangs or allocates more than
 * the input's content calls for (run with -malloc_limit_mb).
 *
 * Build: scripts/fuzz.sh (see tests/fuzz/fuzz_trace.c for the command).
 * Seed corpus: tests/fuzz/corpus/trace_merge/ (the per-rank traces of small
 * mpirun runs, joined with NUL bytes; with and without clock blocks). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/analysis/trace_analysis.h"
#include "runtime/trace_merge.h"
#include "runtime/trace_read.h"

#define MAX_PARTS 4

typedef struct parts {
    const uint8_t *p[MAX_PARTS];
    size_t n[MAX_PARTS];
    int count;
} parts;

static pw_status open_part(void *user, int i, pw_trace_reader **out)
{
    const parts *ps = user;
    char name[32];
    snprintf(name, sizeof name, "part%d.json", i);
    return pw_trace_reader_open_memory(ps->p[i], ps->n[i], name, out);
}

static void bad(pw_status st, const char *what)
{
    fprintf(stderr, "unexpected outcome of the %s: status %d: %s\n", what, (int)st, pw_last_error());
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    parts ps = {.count = 0};
    for (size_t at = 0; ps.count < MAX_PARTS;) {
        const uint8_t *nul = ps.count < MAX_PARTS - 1 ? memchr(data + at, 0, size - at) : NULL;
        const size_t end = nul ? (size_t)(nul - data) : size;
        ps.p[ps.count] = data + at;
        ps.n[ps.count++] = end - at;
        if (!nul) break;
        at = end + 1;
    }
    char *buf = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&buf, &len);
    if (!out) abort();
    pw_trace_merge_report rep;
    pw_status st = pw_trace_merge(ps.count, open_part, &ps, out, &rep);
    fclose(out);
    if (st != PW_OK) {
        const char *e = pw_last_error();
        if (!((st == PW_ERR_PARSE && !strncmp(e, "part", 4)) || (st == PW_ERR_INVALID_ARG && strstr(e, "part"))))
            bad(st, "merge");
    } else {
        pw_trace_reader *rd;
        if (pw_trace_reader_open_memory(buf, len, "merged.json", &rd) != PW_OK) abort();
        pw_trace_analysis_config cfg = PW_TRACE_ANALYSIS_DEFAULTS;
        cfg.per_step = 1;
        cfg.notes = (const char *const *)rep.notes;
        cfg.n_notes = rep.n_notes;
        pw_trace_analysis *a = NULL;
        st = pw_trace_analyze_reader(rd, &cfg, &a);
        pw_trace_reader_close(rd);
        if (st != PW_OK && !(st == PW_ERR_PARSE && strstr(pw_last_error(), "add up past 2^63"))) {
            fprintf(stderr, "the merged trace does not read back:\n%.*s\n", (int)(len < 4096 ? len : 4096), buf);
            bad(st, "analysis of the merged trace");
        }
        pw_trace_analysis_destroy(a);
    }
    pw_trace_merge_report_free(&rep);
    free(buf);
    return 0;
}
