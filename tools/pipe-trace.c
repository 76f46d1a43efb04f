/* pipe-trace — where a pipeline run's time went: per-rank busy and idle
 * time, the measured bubble beside the schedule's theory (and why they
 * differ), what every idle gap waited on, the critical path of a step, a
 * Gantt chart, an SVG timeline and a JSON dump. Reads traces written by
 * `pipeline-run --trace` (and any Chrome Trace Event JSON, with less to say).
 * docs/pipe-trace.md explains every figure.
 *
 * Exit status: 0 ok, 1 bad input (unreadable or malformed trace, or an
 * output file that cannot be written), 2 bad usage. */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "pipe-trace/pipe-trace.h"
#include "runtime/trace_analysis.h"
#include "scheduler/schedule.h"

static const char usage_text[] =
"usage: pipe-trace [OPTIONS] TRACE.json\n"
"\n"
"Bubble accounting of a pipeline trace written by `pipeline-run --trace`:\n"
"per-rank busy time (F / B / W / optimizer), idle time split into warm-up,\n"
"steady-state and cool-down, communication waits, exposed all-reduce, the\n"
"measured bubble beside the schedule's theory with the difference explained,\n"
"every idle gap attributed to what the rank waited for, the critical path of\n"
"a step and a Gantt chart of it. Any Chrome trace is accepted; without the\n"
"pipewright metadata the analysis says what it cannot compute.\n"
"TRACE.json may be '-' for stdin.\n"
"\n"
"Options:\n"
"  --step N          step shown in detail (Gantt, gaps, critical path, SVG);\n"
"                    default: the median-duration step\n"
"  --skip N          leave the first N steps out of the totals (process\n"
"                    warm-up: allocation, page faults); default 0\n"
"  --compare OTHER   compare with another trace side by side (e.g. 1F1B\n"
"                    against GPipe): per rank and in total\n"
"  --svg FILE        write the detail step's timeline of TRACE as SVG (a row\n"
"                    per rank, F/B/W coloured, micro-batch numbers, waits\n"
"                    hatched, idle grey, the critical path outlined)\n"
"  --title TEXT      title of the SVG (default: graph, schedule and step)\n"
"  --json            print the whole analysis as JSON instead of tables\n"
"                    (times in microseconds, fractions in [0, 1])\n"
"  --top N           idle causes listed, largest first (default 10; 0: all)\n"
"  --gaps            list every idle gap of the detail step with its cause\n"
"  --path            list the critical path item by item\n"
"  --width N         Gantt chart width in columns (default: the terminal's,\n"
"                    else 100; at least 20)\n"
"  --color WHEN      colour the report: auto (default: on a terminal, unless\n"
"                    NO_COLOR is set), always, never\n"
"  -h, --help        this help\n"
"\n"
"Exit status: 0 ok, 1 bad input (unreadable or malformed trace, unwritable\n"
"output), 2 bad usage.\n";

static int usage_error(const char *fmt, const char *arg)
{
    fprintf(stderr, "pipe-trace: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(pipe-trace --help lists the options)\n");
    return 2;
}

static int parse_int(const char *s, long long lo, long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

static int terminal_width(void)
{
    struct winsize ws;
    if (isatty(STDOUT_FILENO) && ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 40)
        return ws.ws_col;
    const char *c = getenv("COLUMNS");
    long long v;
    if (c && parse_int(c, 40, 1000, &v)) return (int)v;
    return 100;
}

static int analyse(const char *path, const pt_options *o, int detail, pw_trace_analysis **out)
{
    pw_trace_analysis_config cfg = PW_TRACE_ANALYSIS_DEFAULTS;
    cfg.detail_step = o->step;
    cfg.skip_steps = o->skip;
    cfg.no_detail = !detail;
    cfg.per_step = o->json; /* the per-(rank, step) table is only printed in JSON */
    cfg.theory = pt_theory_formula;
    pw_status st = pw_trace_analyze(path, &cfg, out);
    if (st == PW_OK) return 0;
    fprintf(stderr, "pipe-trace: %s\n", pw_last_error());
    return st == PW_ERR_INVALID_ARG ? 2 : 1;
}

int main(int argc, char **argv)
{
    enum { OPT_STEP = 256, OPT_SKIP, OPT_COMPARE, OPT_SVG, OPT_TITLE, OPT_JSON, OPT_TOP, OPT_GAPS,
           OPT_PATH, OPT_WIDTH, OPT_COLOR };
    static const struct option longopts[] = {
        {"step", required_argument, 0, OPT_STEP},     {"skip", required_argument, 0, OPT_SKIP},
        {"compare", required_argument, 0, OPT_COMPARE}, {"svg", required_argument, 0, OPT_SVG},
        {"title", required_argument, 0, OPT_TITLE},   {"json", no_argument, 0, OPT_JSON},
        {"top", required_argument, 0, OPT_TOP},       {"gaps", no_argument, 0, OPT_GAPS},
        {"path", no_argument, 0, OPT_PATH},           {"width", required_argument, 0, OPT_WIDTH},
        {"color", required_argument, 0, OPT_COLOR},   {"colour", required_argument, 0, OPT_COLOR},
        {"help", no_argument, 0, 'h'},                {0, 0, 0, 0},
    };
    pt_options o = {.step = -1, .top = 10, .width = 0};
    const char *color = "auto";
    long long v;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_STEP:
            if (!parse_int(optarg, 0, LLONG_MAX, &v)) return usage_error("--step: '%s' is not a step number", optarg);
            o.step = v;
            break;
        case OPT_SKIP:
            if (!parse_int(optarg, 0, 1 << 30, &v)) return usage_error("--skip: '%s' is not a count >= 0", optarg);
            o.skip = (int)v;
            break;
        case OPT_COMPARE: o.compare = optarg; break;
        case OPT_SVG: o.svg = optarg; break;
        case OPT_TITLE: o.title = optarg; break;
        case OPT_JSON: o.json = 1; break;
        case OPT_TOP:
            if (!parse_int(optarg, 0, 1 << 30, &v)) return usage_error("--top: '%s' is not a count >= 0", optarg);
            o.top = (int)v;
            break;
        case OPT_GAPS: o.gaps = 1; break;
        case OPT_PATH: o.path = 1; break;
        case OPT_WIDTH:
            if (!parse_int(optarg, 20, 10000, &v)) return usage_error("--width: '%s' is not a width in [20, 10000]", optarg);
            o.width = (int)v;
            break;
        case OPT_COLOR:
            if (strcmp(optarg, "auto") && strcmp(optarg, "always") && strcmp(optarg, "never"))
                return usage_error("--color: '%s' is not auto, always or never", optarg);
            color = optarg;
            break;
        case 'h': fputs(usage_text, stdout); return 0;
        case ':': return usage_error("%s needs a value", argv[optind - 1]);
        default: return usage_error("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind >= argc) return usage_error("%s", "no trace file given");
    if (optind + 1 < argc) return usage_error("one trace file expected, got also '%s' (use --compare)", argv[optind + 1]);
    o.trace = argv[optind];
    if (o.compare && !strcmp(o.compare, "-") && !strcmp(o.trace, "-"))
        return usage_error("%s", "stdin cannot be read twice (--compare -)");
    if (!strcmp(color, "always")) o.color = 1;
    else if (!strcmp(color, "never")) o.color = 0;
    else o.color = isatty(STDOUT_FILENO) && !getenv("NO_COLOR") && !o.json;
    if (!o.width) o.width = terminal_width();

    pw_trace_analysis *a = NULL, *b = NULL;
    int rc = analyse(o.trace, &o, 1, &a);
    if (rc) return rc;
    if (o.compare) {
        pt_options ob = o;
        ob.step = -1; /* the step number is TRACE's; OTHER shows its median step */
        if ((rc = analyse(o.compare, &ob, 1, &b))) {
            pw_trace_analysis_destroy(a);
            return rc;
        }
    }
    if (o.svg) {
        FILE *f = fopen(o.svg, "w");
        int bad = !f || pt_svg_write(f, a, o.title) != 0;
        if (f && fclose(f) != 0) bad = 1;
        if (bad) {
            fprintf(stderr, "pipe-trace: %s: cannot write the SVG: %s\n", o.svg, strerror(errno));
            rc = 1;
        }
    }
    if (!rc) {
        if (o.json) {
            if (pt_json_write(stdout, a, b) != 0) rc = 1;
        } else if (b) {
            pt_report_compare(stdout, a, b, &o);
        } else {
            pt_report(stdout, a, &o);
        }
        if (fflush(stdout) != 0 || ferror(stdout)) {
            fprintf(stderr, "pipe-trace: cannot write the report: %s\n", strerror(errno));
            rc = 1;
        }
    }
    pw_trace_analysis_destroy(a);
    pw_trace_analysis_destroy(b);
    return rc;
}
