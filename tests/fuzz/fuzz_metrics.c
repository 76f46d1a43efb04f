/* libFuzzer harness for the metrics reader (runtime/metrics_read.h) and
 * `pipe-trace --plot` (tools/pipe-trace/plot.c): the bytes are read as a
 * metrics file from memory, and what was read is drawn as the SVG, to
 * /dev/null.
 *
 * Contract checked: any input gives PW_OK or a PW_ERR_PARSE message that
 * starts with the file's name and a line ("fuzz.jsonl:7: ..."); nothing
 * crashes, leaks, hangs or allocates more than the input calls for, and the
 * plot's arithmetic on hostile values (1e308, subnormals, huge steps) stays
 * defined.
 *
 * Build: scripts/fuzz.sh (see tests/fuzz/fuzz_trace.c for the command).
 * Seed corpus: tests/fuzz/corpus/metrics/ (step and eval lines as
 * `pipeline-run --metrics` writes them, non-finite values, unknown lines). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/metrics_read.h"

/* The plot and the helpers it shares with the tool's other outputs. */
#include "tools/pipe-trace/plot.c"
#include "tools/pipe-trace/report.c"
#include "tools/pipe-trace/svg.c"

#define NAME "fuzz.jsonl"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *out;
    if (!out && !(out = fopen("/dev/null", "w"))) abort();
    pw_metrics *m = NULL;
    pw_status st = pw_metrics_read_memory(data, size, NAME, &m);
    if (st != PW_OK) {
        if (m || st != PW_ERR_PARSE || strncmp(pw_last_error(), NAME ":", sizeof NAME)) {
            fprintf(stderr, "unexpected outcome: status %d: %s\n", (int)st, pw_last_error());
            abort();
        }
        return 0;
    }
    if (pt_plot_write(out, m, size & 1 ? "fuzz <title> & co" : NULL) != 0) abort();
    pw_metrics_destroy(m);
    return 0;
}
