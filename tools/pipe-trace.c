/* pipe-trace — where a pipeline run's time went: per-rank busy and idle
 * time, the measured bubble beside the schedule's theory (and why they
 * differ), what every idle gap waited on, the critical path of a step, a
 * Gantt chart, an SVG timeline and a JSON dump. Reads traces written by
 * `pipeline-run --trace` (and any Chrome Trace Event JSON, with less to say);
 * the per-process traces of an MPI run (several files, or their directory)
 * are merged into one timeline first (runtime/trace_merge.h), and --merge
 * writes that timeline out. --plot draws a metrics file's loss and
 * throughput curves (`pipeline-run --metrics`). docs/pipe-trace.md explains
 * every figure.
 *
 * Exit status: 0 ok, 1 bad input (unreadable or malformed trace, traces that
 * are not of one run, or an output file that cannot be written), 2 bad usage. */
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pipe-trace/pipe-trace.h"
#include "runtime/metrics_read.h"
#include "runtime/tmpfile.h"
#include "scheduler/analysis/trace_analysis.h"
#include "runtime/trace_merge.h"
#include "scheduler/schedule.h"

static const char usage_text[] =
"usage: pipe-trace [OPTIONS] TRACE.json\n"
"       pipe-trace [OPTIONS] RUN.rank0.json RUN.rank1.json ...  (or DIR)\n"
"       pipe-trace --merge OUT.json RUN.rank0.json RUN.rank1.json ...  (or DIR)\n"
"       pipe-trace --plot METRICS.jsonl [-o CURVES.svg] [--title TEXT]\n"
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
"Several files, or a directory holding RUN.rankN.json files, are the\n"
"per-process traces of one MPI run: they are merged into one timeline (each\n"
"process's clock put on MPI rank 0's with the offset measured at start-up)\n"
"and analysed as one run; files of different runs, or one rank twice, are\n"
"refused.\n"
"\n"
"Options:\n"
"  --step N          step shown in detail (Gantt, gaps, critical path, SVG);\n"
"                    default: the median-duration step\n"
"  --skip N          leave the first N steps out of the totals (process\n"
"                    warm-up: allocation, page faults); default 0\n"
"  --compare OTHER   compare with another trace side by side (e.g. 1F1B\n"
"                    against GPipe): per rank and in total; OTHER may be a\n"
"                    directory of per-rank traces\n"
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
"  --merge OUT       write the per-process traces as one Chrome trace (for\n"
"                    Perfetto or a later pipe-trace) to OUT and stop; notes\n"
"                    on the merge go to stderr\n"
"  --plot METRICS    draw the loss (with evaluation losses) and samples/s\n"
"                    against the step from a `pipeline-run --metrics` file as\n"
"                    a standalone SVG; no trace is read\n"
"  -o, --output FILE where --plot writes its SVG (default: stdout)\n"
"  -h, --help        this help\n"
"\n"
"Exit status: 0 ok, 1 bad input (unreadable or malformed trace or metrics\n"
"file, traces that are not of one run, unwritable output), 2 bad usage.\n";

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

/* ------------------------------------------------------------ inputs */

/* The traces named on the command line: one file, the per-process files of
 * one MPI run, or a directory holding them. */
typedef struct inputs {
    char **paths;
    int n;
    char name[1024];          /* how the merged run is named in messages and reports */
} inputs;

static void inputs_free(inputs *in)
{
    for (int i = 0; i < in->n; i++) free(in->paths[i]);
    free(in->paths);
    in->paths = NULL;
    in->n = 0;
}

static int inputs_add(inputs *in, const char *path)
{
    char **p = realloc(in->paths, (size_t)(in->n + 1) * sizeof *p);
    if (!p) return -1;
    in->paths = p;
    if (!(in->paths[in->n] = strdup(path))) return -1;
    in->n++;
    return 0;
}

/* "DIR/run.rank12.json" -> 12 and the length of "DIR/run" (the prefix), or -1
 * when the name is not PREFIX.rankN.json. */
static long rank_of(const char *path, size_t *prefix)
{
    const size_t n = strlen(path);
    if (n < 12 || strcmp(path + n - 5, ".json")) return -1;
    size_t d = n - 5;
    while (d > 0 && path[d - 1] >= '0' && path[d - 1] <= '9') d--;
    if (d == n - 5 || n - 5 - d > 7 || d < 6 || strncmp(path + d - 5, ".rank", 5) || path[d - 6] == '/') return -1;
    *prefix = d - 5;
    return strtol(path + d, NULL, 10);
}

typedef struct ranked {
    long rank;
    char *path;
} ranked;

static int cmp_ranked(const void *x, const void *y)
{
    const ranked *a = x, *b = y;
    return (a->rank > b->rank) - (a->rank < b->rank);
}

/* The PREFIX.rankN.json files of a directory, in rank order; exactly one
 * PREFIX. 0, or 1 with a message. */
static int expand_dir(const char *dir, inputs *in)
{
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "pipe-trace: %s: %s\n", dir, strerror(errno));
        return 1;
    }
    ranked *r = NULL;
    size_t n = 0, cap = 0;
    char first[512] = "", other[512] = "";
    int rc = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t pre;
        const long k = rank_of(e->d_name, &pre);
        if (k < 0) continue;
        if (!first[0]) snprintf(first, sizeof first, "%.*s", (int)pre, e->d_name);
        else if (!other[0] && (strlen(first) != pre || strncmp(first, e->d_name, pre)))
            snprintf(other, sizeof other, "%.*s", (int)pre, e->d_name);
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            ranked *p = realloc(r, cap * sizeof *p);
            if (!p) {
                rc = 1;
                break;
            }
            r = p;
        }
        size_t len = strlen(dir) + strlen(e->d_name) + 2;
        if (!(r[n].path = malloc(len))) {
            rc = 1;
            break;
        }
        snprintf(r[n].path, len, "%s%s%s", dir, dir[strlen(dir) - 1] == '/' ? "" : "/", e->d_name);
        r[n++].rank = k;
    }
    closedir(d);
    if (rc) {
        fprintf(stderr, "pipe-trace: %s: out of memory\n", dir);
    } else if (!n) {
        fprintf(stderr, "pipe-trace: %s: no per-process traces (NAME.rankN.json, as `mpirun ... pipeline-run --trace "
                "NAME.json` writes them) in this directory\n", dir);
        rc = 1;
    } else if (other[0]) {
        fprintf(stderr, "pipe-trace: %s holds the per-process traces of more than one run (%s.rank*.json and "
                "%s.rank*.json): name the files\n", dir, first, other);
        rc = 1;
    } else {
        qsort(r, n, sizeof *r, cmp_ranked);
        for (size_t i = 0; i < n && !rc; i++)
            if (inputs_add(in, r[i].path) != 0) {
                fprintf(stderr, "pipe-trace: out of memory\n");
                rc = 1;
            }
    }
    for (size_t i = 0; i < n; i++) free(r[i].path);
    free(r);
    return rc;
}

static int is_dir(const char *path)
{
    struct stat st;
    return strcmp(path, "-") && stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* Resolves the command line's traces into *in. 0, else the exit status
 * (the message is printed). */
static int resolve(char *const *args, int n, inputs *in)
{
    memset(in, 0, sizeof *in);
    for (int i = 0; i < n; i++) {
        if (n > 1 && !strcmp(args[i], "-")) {
            inputs_free(in);
            return usage_error("%s", "stdin ('-') is one trace: with several files name them all");
        }
        int rc = is_dir(args[i]) ? expand_dir(args[i], in) : inputs_add(in, args[i]) ? 1 : 0;
        if (rc) {
            inputs_free(in);
            return rc;
        }
    }
    /* Name the run "DIR/run.rank*.json (4 files)" when the files are one run's
     * by name, else "first.json + 3 more". */
    size_t pre0 = 0, pre;
    int same = in->n > 1 && rank_of(in->paths[0], &pre0) >= 0;
    for (int i = 1; same && i < in->n; i++)
        same = rank_of(in->paths[i], &pre) >= 0 && pre == pre0 && !strncmp(in->paths[0], in->paths[i], pre);
    if (in->n == 1) snprintf(in->name, sizeof in->name, "%s", in->paths[0]);
    else if (same) snprintf(in->name, sizeof in->name, "%.*s.rank*.json (%d files)", (int)pre0, in->paths[0], in->n);
    else snprintf(in->name, sizeof in->name, "%s + %d more", in->paths[0], in->n - 1);
    return 0;
}

/* ------------------------------------------------------------ analysis */

static void print_notes(const pw_trace_merge_report *rep)
{
    for (int i = 0; i < rep->n_notes; i++) fprintf(stderr, "pipe-trace: %s\n", rep->notes[i]);
}

/* The analysis's failure as an exit status: a --step that is not in the
 * trace is a usage error, anything else bad input. */
static int analysis_failed(pw_status st)
{
    fprintf(stderr, "pipe-trace: %s\n", pw_last_error());
    return st == PW_ERR_INVALID_ARG ? 2 : 1;
}

/* Several files: merged into a temporary file (the analysis streams it and
 * seeks back for the detail step); the merge's notes lead the report's.
 * Files that are not of one run are bad input (exit 1). */
static int analyse_merged(const inputs *in, pw_trace_analysis_config *cfg, pw_trace_analysis **out)
{
    FILE *tmp = tmpfile();
    if (!tmp) {
        fprintf(stderr, "pipe-trace: cannot create a temporary file to merge %s: %s\n", in->name, strerror(errno));
        return 1;
    }
    pw_trace_merge_report rep;
    pw_trace_reader *rd = NULL;
    const char **notes = NULL;
    int rc = 0;
    pw_status st = pw_trace_merge_files((const char *const *)in->paths, in->n, tmp, &rep);
    if (st == PW_OK && (fflush(tmp) != 0 || fseek(tmp, 0, SEEK_SET) != 0))
        st = pw_error(PW_ERR_IO, "%s: merging into a temporary file: %s", in->name, strerror(errno));
    if (st == PW_OK) st = pw_trace_reader_open_stream(tmp, in->name, &rd);
    if (st == PW_OK && !(notes = calloc((size_t)rep.n_notes + 1, sizeof *notes)))
        st = pw_error(PW_ERR_NOMEM, "out of memory");
    if (st != PW_OK) {
        fprintf(stderr, "pipe-trace: %s\n", pw_last_error());
        rc = 1;
    } else {
        /* In the report's notes "note: " goes without saying; "warning: " stays. */
        for (int i = 0; i < rep.n_notes; i++) notes[i] = rep.notes[i] + (strncmp(rep.notes[i], "note: ", 6) ? 0 : 6);
        cfg->notes = notes;
        cfg->n_notes = rep.n_notes;
        if ((st = pw_trace_analyze_reader(rd, cfg, out)) != PW_OK) rc = analysis_failed(st);
    }
    free(notes);
    pw_trace_reader_close(rd);
    pw_trace_merge_report_free(&rep);
    fclose(tmp);
    return rc;
}

static int analyse(const inputs *in, const pt_options *o, int detail, pw_trace_analysis **out)
{
    pw_trace_analysis_config cfg = PW_TRACE_ANALYSIS_DEFAULTS;
    cfg.detail_step = o->step;
    cfg.skip_steps = o->skip;
    cfg.no_detail = !detail;
    cfg.per_step = o->json; /* the per-(rank, step) table is only printed in JSON */
    if (in->n > 1) return analyse_merged(in, &cfg, out);
    pw_status st = pw_trace_analyze(in->paths[0], &cfg, out);
    return st == PW_OK ? 0 : analysis_failed(st);
}

/* --merge OUT: the merged trace, written atomically (temp file + rename). */
static int merge_to(const inputs *in, const char *out_path)
{
    char tmp[PW_TMPFILE_PATH];
    if (pw_tmpfile_name(out_path, tmp, sizeof tmp) != 0) return usage_error("--merge: path too long: %s", out_path);
    const int slot = pw_tmpfile_register(tmp);
    const int fd = pw_tmpfile_create(slot, tmp);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0) {
            close(fd);
            unlink(tmp);
        }
        fprintf(stderr, "pipe-trace: %s: %s\n", tmp, strerror(errno));
        pw_tmpfile_forget(slot);
        return 1;
    }
    pw_trace_merge_report rep;
    pw_status st = pw_trace_merge_files((const char *const *)in->paths, in->n, f, &rep);
    int bad = st != PW_OK;
    if (bad) fprintf(stderr, "pipe-trace: %s\n", pw_last_error());
    if (fflush(f) != 0 || ferror(f) || fsync(fileno(f)) != 0) bad = bad ? bad : 2;
    if (fclose(f) != 0) bad = bad ? bad : 2;
    if (!bad && rename(tmp, out_path) != 0) bad = 2;
    if (bad == 2) fprintf(stderr, "pipe-trace: %s: cannot write the merged trace: %s\n", out_path, strerror(errno));
    if (bad) unlink(tmp);
    pw_tmpfile_forget(slot);
    if (!bad) {
        print_notes(&rep);
        printf("merged %s into %s: %lld events; clocks: %s\n", in->name, out_path, (long long)rep.events,
               rep.clock == PW_MERGE_CLOCK_OFFSETS ? "each process's put on MPI rank 0's" : "as written");
    }
    pw_trace_merge_report_free(&rep);
    return bad ? 1 : 0;
}

/* --plot METRICS [-o FILE]. */
static int plot(const char *metrics, const char *out_path, const char *title)
{
    pw_metrics *m = NULL;
    if (pw_metrics_read(metrics, &m) != PW_OK) {
        fprintf(stderr, "pipe-trace: %s\n", pw_last_error());
        return 1;
    }
    for (int i = 0; i < m->n_notes; i++) fprintf(stderr, "pipe-trace: note: %s\n", m->notes[i]);
    const int to_stdout = !out_path || !strcmp(out_path, "-");
    FILE *f = to_stdout ? stdout : fopen(out_path, "w");
    int bad = !f || pt_plot_write(f, m, title) != 0;
    if (f && (to_stdout ? fflush(f) : fclose(f)) != 0) bad = 1;
    if (bad)
        fprintf(stderr, "pipe-trace: %s: cannot write the SVG: %s\n", to_stdout ? "<stdout>" : out_path, strerror(errno));
    pw_metrics_destroy(m);
    return bad;
}

int main(int argc, char **argv)
{
    enum { OPT_STEP = 256, OPT_SKIP, OPT_COMPARE, OPT_SVG, OPT_TITLE, OPT_JSON, OPT_TOP, OPT_GAPS,
           OPT_PATH, OPT_WIDTH, OPT_COLOR, OPT_MERGE, OPT_PLOT };
    static const struct option longopts[] = {
        {"step", required_argument, 0, OPT_STEP},     {"skip", required_argument, 0, OPT_SKIP},
        {"compare", required_argument, 0, OPT_COMPARE}, {"svg", required_argument, 0, OPT_SVG},
        {"title", required_argument, 0, OPT_TITLE},   {"json", no_argument, 0, OPT_JSON},
        {"top", required_argument, 0, OPT_TOP},       {"gaps", no_argument, 0, OPT_GAPS},
        {"path", no_argument, 0, OPT_PATH},           {"width", required_argument, 0, OPT_WIDTH},
        {"color", required_argument, 0, OPT_COLOR},   {"colour", required_argument, 0, OPT_COLOR},
        {"merge", required_argument, 0, OPT_MERGE},   {"plot", required_argument, 0, OPT_PLOT},
        {"output", required_argument, 0, 'o'},        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    pt_options o = {.step = -1, .top = 10, .width = 0};
    const char *color = "auto", *merge = NULL, *metrics = NULL, *output = NULL;
    long long v;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":ho:", longopts, NULL)) != -1) {
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
        case OPT_MERGE: merge = optarg; break;
        case OPT_PLOT: metrics = optarg; break;
        case 'o': output = optarg; break;
        case 'h': fputs(usage_text, stdout); return 0;
        case ':': return usage_error("%s needs a value", argv[optind - 1]);
        default: return usage_error("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (metrics) {
        if (merge) return usage_error("%s", "--plot and --merge are separate jobs: run pipe-trace twice");
        if (optind < argc) return usage_error("--plot reads a metrics file, not a trace: '%s'", argv[optind]);
        return plot(metrics, output, o.title);
    }
    if (output) return usage_error("%s", "-o is where --plot writes (a trace's SVG is --svg FILE, a merge --merge FILE)");
    if (optind >= argc) return usage_error("%s", "no trace file given");
    if (merge && (o.compare || o.svg || o.json))
        return usage_error("%s", "--merge only writes the merged trace: analyse it with a second pipe-trace");
    inputs in, other = {0};
    int rc = resolve(argv + optind, argc - optind, &in);
    if (rc) return rc;
    if (merge) {
        rc = merge_to(&in, merge);
        inputs_free(&in);
        return rc;
    }
    o.trace = in.name;
    if (o.compare && !strcmp(o.compare, "-") && !strcmp(in.paths[0], "-"))
        rc = usage_error("%s", "stdin cannot be read twice (--compare -)");
    if (!rc && o.compare) rc = resolve((char *const *)&o.compare, 1, &other);
    if (rc) {
        inputs_free(&in);
        return rc;
    }
    if (!strcmp(color, "always")) o.color = 1;
    else if (!strcmp(color, "never")) o.color = 0;
    else o.color = isatty(STDOUT_FILENO) && !getenv("NO_COLOR") && !o.json;
    if (!o.width) o.width = terminal_width();

    pw_trace_analysis *a = NULL, *b = NULL;
    rc = analyse(&in, &o, 1, &a);
    if (!rc && o.compare) {
        pt_options ob = o;
        ob.step = -1; /* the step number is TRACE's; OTHER shows its median step */
        rc = analyse(&other, &ob, 1, &b);
    }
    inputs_free(&in);
    inputs_free(&other);
    if (rc) {
        pw_trace_analysis_destroy(a);
        return rc;
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
