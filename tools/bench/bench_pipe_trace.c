/* bench_pipe_trace — speed and memory of trace analysis (pipe-trace's
 * engine, scheduler/analysis/trace_analysis.h) on a large generated trace.
 *
 *   bench_pipe_trace [--events N] [--ranks R] [--micro-batches M]
 *                    [--file PATH] [--keep] [--reuse] [--runs K] [--per-step]
 *
 * Generates a 1F1B trace of about N events (default 10 million) over R ranks
 * (default 4) in exactly the format pw_trace_write produces (metadata block
 * first, one event a line, rank-major), with deterministic pseudo-random
 * jitter on every action so waits and steady-state stalls exist. Then
 * analyses it K times (default 3), each in a child process so that the
 * child's peak RSS (getrusage RUSAGE_CHILDREN) is the analysis alone, and
 * prints the median wall time, events/s, MB/s and the peak RSS. The file is
 * read from the page cache (it was just written): this measures parsing and
 * analysis, not the disk.
 *
 * Memory: the analysis holds the open steps' events plus an 88-byte record
 * per (rank, step); --per-step also keeps every (rank, step)'s figures, as
 * pipe-trace --json does. Run with --events 1000000 and 10000000 to compare. */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "scheduler/analysis/trace_analysis.h"
#include "scheduler/schedule.h"
#include "tools/bench/bench_util.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static long long arg_ll(int argc, char **argv, const char *name, long long def)
{
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return strtoll(argv[i + 1], NULL, 10);
    return def;
}

static int has_flag(int argc, char **argv, const char *name)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], name)) return 1;
    return 0;
}

/* Deterministic jitter in [0, span) ns for (step, rank, action). */
static int64_t jitter(uint64_t step, uint64_t rank, uint64_t k, int64_t span)
{
    uint64_t x = step * 0x9e3779b97f4a7c15ull ^ rank * 0xbf58476d1ce4e5b9ull ^ k * 0x94d049bb133111ebull;
    x ^= x >> 31;
    x *= 0xd6e8feb96a5a2c3bull;
    x ^= x >> 29;
    return (int64_t)(x % (uint64_t)span);
}

typedef struct gen_ev {
    const char *name, *cat;
    int stage, mb, peer;
    int64_t t0, t1, bytes;
} gen_ev;

/* Simulates one step of the lowered schedule; fills ev[r][..] for every
 * rank (n[r] events each). Times in ns from the step start `t`. Returns the
 * step's end. */
static int64_t sim_step(const pw_schedule *s, int64_t step, int64_t t, gen_ev **ev, int *n, int64_t *arrive)
{
    const int R = s->n_ranks, C = s->n_chunks, M = s->n_micro;
    int64_t now[64];
    int pc[64], left = R;
    for (int i = 0; i < 2 * C * M; i++) arrive[i] = -1;
    for (int r = 0; r < R; r++) now[r] = t, pc[r] = 0, n[r] = 0;
    while (left > 0) {
        for (int r = 0; r < R; r++) {
            while (pc[r] < s->ranks[r].n_actions) {
                const pw_action *x = &s->ranks[r].actions[pc[r]];
                gen_ev e = {pw_action_kind_name(x->kind), "compute", x->chunk, x->mb, -1, now[r], now[r], 0};
                int64_t dur = 0;
                if (x->kind == PW_ACT_RECV_F || x->kind == PW_ACT_RECV_B) {
                    int dir = x->kind == PW_ACT_RECV_B;
                    int64_t at = arrive[(dir * C + x->chunk) * M + x->mb];
                    if (at < 0) break;
                    e.peer = pw_schedule_rank_of(s, dir ? x->chunk + 1 : x->chunk - 1);
                    if (at > now[r]) {
                        ev[r][n[r]++] = (gen_ev){dir ? "wait RECV_B" : "wait RECV_F", "wait", x->chunk, x->mb, e.peer,
                                                 now[r], at, 0};
                        now[r] = at;
                    }
                    e.t0 = now[r];
                    e.cat = "comm";
                    e.bytes = 65536;
                    dur = 300 + jitter((uint64_t)step, (uint64_t)r, (uint64_t)pc[r], 200);
                } else if (x->kind == PW_ACT_SEND_F || x->kind == PW_ACT_SEND_B) {
                    int dir = x->kind == PW_ACT_SEND_B, dst = dir ? x->chunk - 1 : x->chunk + 1;
                    dur = 400 + jitter((uint64_t)step, (uint64_t)r, (uint64_t)pc[r], 200);
                    arrive[(dir * C + dst) * M + x->mb] = now[r] + dur + 2000;
                    e.peer = pw_schedule_rank_of(s, dst);
                    e.cat = "comm";
                    e.bytes = 65536;
                } else if (x->kind == PW_ACT_F) {
                    dur = 100000 + jitter((uint64_t)step, (uint64_t)r, (uint64_t)pc[r], 20000);
                } else if (x->kind == PW_ACT_B) {
                    dur = 200000 + jitter((uint64_t)step, (uint64_t)r, (uint64_t)pc[r], 40000);
                } else if (x->kind == PW_ACT_OPTIM) {
                    dur = 50000;
                    e.stage = e.mb = -1;
                } else { /* ALLREDUCE: none with one replica */
                    pc[r]++;
                    continue;
                }
                e.t1 = e.t0 + dur;
                now[r] = e.t1;
                ev[r][n[r]++] = e;
                if (++pc[r] == s->ranks[r].n_actions) left--;
            }
        }
    }
    int64_t end = t;
    for (int r = 0; r < R; r++) {
        ev[r][n[r]++] = (gen_ev){"step", "step", -1, -1, -1, t, now[r], 0};
        if (now[r] > end) end = now[r];
    }
    return end;
}

static void put_event(FILE *f, int r, int64_t step, const gen_ev *e)
{
    /* The same text pw_trace_write produces. */
    fprintf(f, ",\n{\"name\": \"%s\", \"cat\": \"%s\", \"ph\": \"X\", \"pid\": 0, \"tid\": %d, \"ts\": %.3f, "
               "\"dur\": %.3f, \"args\": {\"step\": %" PRId64,
            e->name, e->cat, r, (double)e->t0 / 1e3, (double)(e->t1 - e->t0) / 1e3, step);
    if (e->stage >= 0) fprintf(f, ", \"stage\": %d", e->stage);
    if (e->mb >= 0) fprintf(f, ", \"mb\": %d", e->mb);
    if (e->peer >= 0) fprintf(f, ", \"peer\": %d", e->peer);
    if (e->bytes) fprintf(f, ", \"bytes\": %" PRId64, e->bytes);
    fputs("}}", f);
}

static int generate(const char *path, int64_t want, int R, int M, int64_t *n_events)
{
    pw_schedule_config cfg = {.kind = PW_SCHEDULE_1F1B, .n_stages = R, .n_micro = M};
    pw_schedule *s = NULL;
    if (pw_schedule_generate(&cfg, &s) != PW_OK || pw_schedule_lower(s) != PW_OK) {
        fprintf(stderr, "bench_pipe_trace: %s\n", pw_last_error());
        return 1;
    }
    int cap = 0;
    for (int r = 0; r < R; r++)
        if (2 * s->ranks[r].n_actions + 2 > cap) cap = 2 * s->ranks[r].n_actions + 2;
    gen_ev **ev = calloc((size_t)R, sizeof *ev);
    int *n = calloc((size_t)R, sizeof *n);
    int64_t *arrive = malloc(sizeof(int64_t) * 2 * (size_t)s->n_chunks * (size_t)M);
    for (int r = 0; r < R; r++) ev[r] = malloc((size_t)cap * sizeof **ev);
    /* Events per step, from one simulated step. */
    sim_step(s, 1, 0, ev, n, arrive);
    int64_t events_per_step = 0;
    for (int r = 0; r < R; r++) events_per_step += n[r];
    int64_t steps = want / events_per_step > 0 ? want / events_per_step : 1;
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return 1;
    }
    setvbuf(f, NULL, _IOFBF, 1 << 20);
    double theory = pw_schedule_theoretical_bubble(PW_SCHEDULE_1F1B, R, M);
    fprintf(f, "{\"displayTimeUnit\": \"ns\",\n\"pipewright\": {\"version\": 1, \"schedule\": \"1f1b\", \"graph\": "
               "\"bench\", \"ranks\": %d, \"stages\": %d, \"micro_batches\": %d, \"replicas\": 1, "
               "\"micro_batch_size\": 32, \"steps\": %" PRId64 ", \"theory_bubble\": %.6f, \"dropped_events\": 0},\n"
               "\"traceEvents\": [\n{\"name\": \"process_name\", \"ph\": \"M\", \"pid\": 0, \"tid\": 0, "
               "\"args\": {\"name\": \"pipewright\"}}",
            R, R, M, steps, theory);
    for (int r = 0; r < R; r++)
        fprintf(f, ",\n{\"name\": \"thread_name\", \"ph\": \"M\", \"pid\": 0, \"tid\": %d, \"args\": {\"name\": "
                   "\"rank %d\"}}", r, r);
    /* Rank-major like the writer: each rank's whole run, one after the
     * other; the steps are simulated again for each rank (cheap). */
    int64_t total = 0;
    for (int r = 0; r < R; r++) {
        int64_t t = 0;
        for (int64_t st = 1; st <= steps; st++) {
            int64_t end = sim_step(s, st, t, ev, n, arrive);
            for (int i = 0; i < n[r]; i++) put_event(f, r, st, &ev[r][i]);
            total += n[r];
            t = end + 20000;
        }
    }
    fprintf(f, "\n]}\n");
    int bad = ferror(f) | (fclose(f) != 0);
    for (int r = 0; r < R; r++) free(ev[r]);
    free(ev);
    free(n);
    free(arrive);
    pw_schedule_destroy(s);
    *n_events = total + 1 + R;
    return bad;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (has_flag(argc, argv, "--help")) {
        puts("usage: bench_pipe_trace [--events N] [--ranks R] [--micro-batches M] [--file PATH] [--keep] "
             "[--reuse] [--runs K] [--per-step]");
        return 0;
    }
    const int64_t want = arg_ll(argc, argv, "--events", 10000000);
    const int R = (int)arg_ll(argc, argv, "--ranks", 4), M = (int)arg_ll(argc, argv, "--micro-batches", 16);
    const int runs = (int)arg_ll(argc, argv, "--runs", 3);
    const int per_step = has_flag(argc, argv, "--per-step"); /* what pipe-trace --json keeps */
    char def[256];
    snprintf(def, sizeof def, "/tmp/bench_pipe_trace_%lld.json", (long long)want);
    const char *path = arg_str(argc, argv, "--file", def);
    if (R < 2 || R > 64 || M < 1 || runs < 1 || runs > 99 || want < 1000) {
        fprintf(stderr, "bench_pipe_trace: bad arguments (ranks 2..64, micro-batches >= 1, runs 1..99, events >= 1000)\n");
        return 2;
    }
    int64_t n_events = 0;
    struct stat sb;
    if (!(has_flag(argc, argv, "--reuse") && stat(path, &sb) == 0)) {
        double g0 = now_s();
        if (generate(path, want, R, M, &n_events)) return 1;
        printf("generated %s: %" PRId64 " events in %.1f s\n", path, n_events, now_s() - g0);
    }
    if (stat(path, &sb) != 0) {
        perror(path);
        return 1;
    }
    double t[100];
    long rss_kb = 0;
    pw_trace_analysis *a = NULL;
    for (int k = 0; k < runs; k++) {
        int fd[2];
        if (pipe(fd) != 0) return 1;
        pid_t pid = fork();
        if (pid == 0) {
            close(fd[0]);
            double t0 = now_s();
            pw_trace_analysis_config cfg = PW_TRACE_ANALYSIS_DEFAULTS;
            cfg.per_step = per_step;
            if (pw_trace_analyze(path, &cfg, &a) != PW_OK) {
                fprintf(stderr, "bench_pipe_trace: %s\n", pw_last_error());
                _exit(1);
            }
            double dt = now_s() - t0;
            char line[512];
            int len = snprintf(line, sizeof line, "%.6f %" PRId64 " %" PRId64 " %.6f %.6f\n", dt, a->n_events,
                               a->n_steps, a->bubble, a->theory);
            if (write(fd[1], line, (size_t)len) != len) _exit(1);
            pw_trace_analysis_destroy(a);
            _exit(0);
        }
        close(fd[1]);
        char buf[512] = "";
        ssize_t got = read(fd[0], buf, sizeof buf - 1);
        close(fd[0]);
        int status;
        struct rusage ru;
        if (wait4(pid, &status, 0, &ru) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0 || got <= 0)
            return 1;
        buf[got] = 0;
        long long ev, steps;
        double bubble, theory;
        sscanf(buf, "%lf %lld %lld %lf %lf", &t[k], &ev, &steps, &bubble, &theory);
        n_events = ev;
        if (ru.ru_maxrss > rss_kb) rss_kb = ru.ru_maxrss;
        if (k == 0)
            printf("trace: %.1f MB, %lld events, %d ranks, %d micro-batches, %lld steps; bubble %.2f%% (theory "
                   "%.2f%%)\n", (double)sb.st_size / 1e6, ev, R, M, steps, 100 * bubble, 100 * theory);
    }
    qsort(t, (size_t)runs, sizeof *t, cmp_d);
    double med = t[(runs - 1) / 2];
    printf("analysis (median of %d runs, both passes): %.2f s = %.1f M events/s, %.0f MB/s; min %.2f s, max %.2f s\n",
           runs, med, (double)n_events / med / 1e6, (double)sb.st_size / med / 1e6, t[0], t[runs - 1]);
    printf("peak RSS of the analysing process: %.1f MB%s\n", (double)rss_kb / 1024,
           per_step ? " (--per-step: every (rank, step)'s figures kept)" : "");
    if (!has_flag(argc, argv, "--keep") && !has_flag(argc, argv, "--reuse")) unlink(path);
    return 0;
}
