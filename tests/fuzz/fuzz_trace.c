/* libFuzzer harness for the Chrome-trace reader and pipe-trace's analysis
 * (runtime/trace_read.h, scheduler/analysis/trace_analysis.h) and its outputs: the
 * bytes go through the same path as `pipe-trace --json --gaps --path --svg`
 * (read from memory, both analysis passes, the per-step table), then the
 * report, the comparison, the SVG and the JSON are written to /dev/null.
 *
 * Contract checked: any input gives PW_OK or a PW_ERR_PARSE message that
 * starts with the file's name; nothing crashes, leaks, hangs or allocates
 * more than the input's content calls for (run with -malloc_limit_mb).
 *
 * Build (scripts/fuzz.sh does this):
 *     clang -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_trace.c \
 *         libpw_scheduler.a libpw_runtime.a $(pkg-config --libs jansson) -lm
 * Seed corpus: tests/fuzz/corpus/trace/ (small pipewright and generic traces,
 * and the reproducers of tests/fixtures/crashes/). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/analysis/trace_analysis.h"
#include "runtime/trace_read.h"
#include "scheduler/schedule.h"

/* The tool's output modules (no main of their own), compiled in so their
 * arithmetic on hostile analyses is fuzzed too. */
#include "tools/pipe-trace/json.c"
#include "tools/pipe-trace/report.c"
#include "tools/pipe-trace/svg.c"

#define NAME "fuzz.json"

static void check_error(pw_status st)
{
    /* Bad input is PW_ERR_PARSE naming the file; out of memory would be a
     * finding of its own (-malloc_limit_mb reports it first). */
    if (st != PW_ERR_PARSE || strncmp(pw_last_error(), NAME ":", sizeof NAME)) {
        fprintf(stderr, "unexpected outcome: status %d: %s\n", (int)st, pw_last_error());
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static FILE *out;
    if (!out && !(out = fopen("/dev/null", "w"))) abort();

    pw_trace_reader *rd;
    if (pw_trace_reader_open_memory(data, size, NAME, &rd) != PW_OK) abort();
    pw_trace_analysis_config cfg = PW_TRACE_ANALYSIS_DEFAULTS;
    cfg.per_step = 1;
    cfg.skip_steps = (int)(size % 3); /* vary --skip with the input, deterministically */
    pw_trace_analysis *a = NULL;
    pw_status st = pw_trace_analyze_reader(rd, &cfg, &a);
    pw_trace_reader_close(rd);
    if (st != PW_OK) {
        if (a) abort(); /* *out is NULL on error */
        check_error(st);
        return 0;
    }

    pt_options o = {.trace = NAME, .json = 0, .color = (int)(size & 1), .width = 20 + (int)(size % 200),
                    .top = 0, .gaps = 1, .path = 1, .skip = cfg.skip_steps, .step = -1};
    pt_report(out, a, &o);
    pt_report_compare(out, a, a, &o);
    if (pt_svg_write(out, a, NULL) != 0) abort();
    if (pt_json_write(out, a, NULL) != 0 || pt_json_write(out, a, a) != 0) abort();
    pw_trace_analysis_destroy(a);
    return 0;
}
