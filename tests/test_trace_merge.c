/* Tests for merging the per-process traces of a multi-process run
 * (runtime/trace_merge.h) and pipe-trace's multi-file input, --merge and
 * directory arguments.
 *
 * The per-rank files are written here with the trace writer, as the
 * processes of an mpirun job write them: each holds its own track, timed by
 * its own clock (a known offset from rank 0's), with a clock block. The same
 * events written by one process with rank 0's clock are the reference: the
 * merge of the rank files must reproduce that file byte for byte, whatever
 * the offsets and the order of the files. Mismatched files (two runs, one
 * rank twice, different metadata) are refused naming both; missing ranks
 * and files without clocks are merged with a warning or note; every
 * truncation of an input is a clean error. The real mpirun runs are in
 * tests/mpi/mpi_driver.c ("traces", "hostfile"). */
#define _GNU_SOURCE /* nftw */
#include <criterion/criterion.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/trace.h"
#include "scheduler/analysis/trace_analysis.h"
#include "runtime/trace_merge.h"
#include "runtime/trace_read.h"

#define TIMEOUT .timeout = 240
#define TOOL PW_BINARY_DIR "/pipe-trace"
#define US INT64_C(1000)
#define BASE_NS INT64_C(20000000000) /* rank 0's clock at the run's start: 20 s */

/* ---------------------------------------------------------------- helpers */

#define PW_TEST_TMP_NAME "trace_merge"
#define PW_TEST_SUITE trace_merge
#include "tests/test_tmpdir.h"
#include "tests/test_helpers.h"

static void write_text(const char *path, const char *text, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert(f, "%s", path);
    cr_assert_eq(fwrite(text, 1, n, f), n);
    cr_assert_eq(fclose(f), 0);
}

/* ------------------------------------------------------------ the run */

/* 2 stages x 2 replicas, GPipe with 2 micro-batches, 3 steps: rank r of
 * replica k is track k*2 + r. Times in us from the run's start on rank 0's
 * clock; each step is the hand-built GPipe step of test_pipe_trace.c, the
 * second replica 3 us later. */
typedef struct ev_spec {
    int rank;                 /* within the replica */
    const char *name;
    int cat, stage, mb, peer; /* peer within the replica */
    int t0, t1;
} ev_spec;

static const ev_spec k_step[] = {
    {0, "F", PW_TRACE_COMPUTE, 0, 0, -1, 0, 10},
    {0, "SEND_F", PW_TRACE_COMM, 0, 0, 1, 10, 11},
    {0, "F", PW_TRACE_COMPUTE, 0, 1, -1, 11, 21},
    {0, "SEND_F", PW_TRACE_COMM, 0, 1, 1, 21, 22},
    {0, "wait RECV_B", PW_TRACE_WAIT, 0, 0, 1, 22, 52},
    {0, "B", PW_TRACE_COMPUTE, 0, 0, -1, 52, 72},
    {0, "B", PW_TRACE_COMPUTE, 0, 1, -1, 72, 92},
    {0, "OPTIM", PW_TRACE_COMPUTE, -1, -1, -1, 92, 97},
    {0, "step", PW_TRACE_STEP, -1, -1, -1, 0, 97},
    {1, "wait RECV_F", PW_TRACE_WAIT, 1, 0, 0, 0, 11},
    {1, "F", PW_TRACE_COMPUTE, 1, 0, -1, 11, 21},
    {1, "F", PW_TRACE_COMPUTE, 1, 1, -1, 22, 32},
    {1, "B", PW_TRACE_COMPUTE, 1, 0, -1, 32, 52},
    {1, "SEND_B", PW_TRACE_COMM, 1, 0, 0, 52, 53},
    {1, "B", PW_TRACE_COMPUTE, 1, 1, -1, 53, 73},
    {1, "OPTIM", PW_TRACE_COMPUTE, -1, -1, -1, 73, 78},
    {1, "step", PW_TRACE_STEP, -1, -1, -1, 0, 78},
};
#define N_STEP_EV ((int)(sizeof k_step / sizeof *k_step))
#define RANKS 4
#define STEPS 3

/* Pushes track w's events (all tracks when w < 0), their times on a clock
 * that reads rank 0's minus `offset_ns`. */
static void push_events(pw_trace *t, int w, int64_t offset_ns)
{
    for (int track = 0; track < RANKS; track++) {
        if (w >= 0 && track != w) continue;
        const int k = track / 2, r = track % 2;
        for (int s = 0; s < STEPS; s++)
            for (int i = 0; i < N_STEP_EV; i++) {
                if (k_step[i].rank != r) continue;
                pw_trace_event *e = pw_trace_push(t, track);
                cr_assert(e);
                const int64_t at = BASE_NS + (s * 120 + k * 3) * US - offset_ns;
                e->name = k_step[i].name;
                e->cat = k_step[i].cat;
                e->chunk = k_step[i].stage;
                e->mb = k_step[i].mb;
                e->peer = k_step[i].peer < 0 ? -1 : k * 2 + k_step[i].peer;
                e->step = s + 1;
                e->t0_ns = at + k_step[i].t0 * US;
                e->t1_ns = at + k_step[i].t1 * US;
            }
    }
}

typedef struct rank_file {
    int world_rank;              /* -1: write all tracks, no clock (one process) */
    int64_t offset_ns;           /* add to the file's clock to get rank 0's */
    int clock;                   /* write a clock block */
    int same_host;
    uint64_t run_id;
    const char *graph;
} rank_file;

static void write_file(const char *path, rank_file f)
{
    pw_trace *t = NULL;
    cr_assert_eq(pw_trace_create(RANKS, 256, &t), PW_OK);
    push_events(t, f.world_rank, f.offset_ns);
    /* As pipeline.c writes it: a process knows its own rank's peak. */
    int peaks[RANKS] = {2, 1, 2, 1}, measured[RANKS] = {0};
    for (int r = 0; r < RANKS; r++)
        if (f.world_rank < 0 || f.world_rank == r) measured[r] = r % 2 ? 1 : 2;
    pw_trace_meta m = {.schedule = "gpipe", .graph = f.graph ? f.graph : "merge_fixture", .n_ranks = RANKS,
                       .n_chunks = 2, .n_micro = 2, .n_replicas = 2, .micro_batch = 4, .steps = STEPS,
                       .theory_bubble = 1.0 / 3.0, .peak_inflight = peaks, .measured_peak = measured};
    pw_trace_clock c = {.world_rank = f.world_rank, .world_size = RANKS, .offset_ns = f.offset_ns,
                        .measured_ns = f.offset_ns + 700, .rtt_ns = 4000, .same_host = f.same_host,
                        .run_id = f.run_id};
    snprintf(c.host, sizeof c.host, "host%d", f.same_host ? 0 : f.world_rank);
    pw_trace_set_clock(f.clock ? &c : NULL);
    cr_assert_eq(pw_trace_write(t, path, &m), PW_OK, "%s", pw_last_error());
    pw_trace_set_clock(NULL);
    pw_trace_destroy(t);
}

static const int64_t k_offsets[RANKS] = {0, INT64_C(5000000000), -INT64_C(3000000000), INT64_C(7123456789)};

/* run.rank0.json .. run.rank3.json in `sub` (a directory under tmpdir). */
static void write_rank_files(const char *sub, uint64_t run_id)
{
    char dir[256];
    snprintf(dir, sizeof dir, "%s/%s", tmpdir(), sub);
    mkdir(dir, 0755);
    for (int w = 0; w < RANKS; w++) {
        char path[320];
        snprintf(path, sizeof path, "%s/run.rank%d.json", dir, w);
        write_file(path, (rank_file){.world_rank = w, .offset_ns = k_offsets[w], .clock = 1, .run_id = run_id});
    }
}

static const char *rank_path(const char *sub, int w)
{
    static char buf[8][320];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 320, "%s/%s/run.rank%d.json", tmpdir(), sub, w);
    return p;
}

/* Merges the files into a string; *st the status, notes appended to `notes`. */
static char *merge(const char *const *paths, int n, pw_status *st, pw_trace_merge_report *rep)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    cr_assert(f);
    *st = pw_trace_merge_files(paths, n, f, rep);
    fclose(f);
    return buf;
}

static int has_note(const pw_trace_merge_report *rep, const char *needle)
{
    for (int i = 0; i < rep->n_notes; i++)
        if (strstr(rep->notes[i], needle)) return 1;
    return 0;
}

static const char *reference(void)
{
    const char *p = tmp_path("one.json");
    write_file(p, (rank_file){.world_rank = -1});
    return p;
}

/* ---------------------------------------------------------------- tests */

Test(trace_merge, rank_files_merge_into_the_one_process_trace, TIMEOUT)
{
    write_rank_files("a", 0x1234);
    size_t n;
    char *want = test_read_file_or_fail(reference(), &n);
    /* In rank order, reversed, and shuffled: the same bytes. */
    const int orders[3][RANKS] = {{0, 1, 2, 3}, {3, 2, 1, 0}, {2, 0, 3, 1}};
    for (int o = 0; o < 3; o++) {
        const char *paths[RANKS];
        for (int i = 0; i < RANKS; i++) paths[i] = rank_path("a", orders[o][i]);
        pw_status st;
        pw_trace_merge_report rep;
        char *got = merge(paths, RANKS, &st, &rep);
        cr_assert_eq(st, PW_OK, "%s", pw_last_error());
        cr_assert_eq(rep.clock, PW_MERGE_CLOCK_OFFSETS);
        cr_assert_eq(rep.n_hosts, 4);
        cr_assert_eq(rep.max_rtt_ns, 4000);
        cr_assert(has_note(&rep, "4 processes on 4 hosts") && has_note(&rep, "+-2.0 us"), "%s",
                  rep.n_notes ? rep.notes[0] : "no notes");
        for (int i = 0; i < RANKS; i++) cr_assert_eq(orders[o][rep.order[i]], i, "written in world-rank order");
        cr_assert_str_eq(got, want, "order %d: the merged trace differs from the one-process trace", o);
        free(got);
        pw_trace_merge_report_free(&rep);
    }
    free(want);
}

Test(trace_merge, the_analysis_of_the_merge_is_the_one_process_analysis, TIMEOUT)
{
    write_rank_files("b", 7);
    char *one = NULL, *many = NULL, cmd[1024];
    snprintf(cmd, sizeof cmd, "%s --color never --top 0 %s 2>&1", TOOL, reference());
    cr_assert_eq(test_run(cmd, &one), 0, "%s", one);
    snprintf(cmd, sizeof cmd, "%s --color never --top 0 %s/b/run.rank*.json 2>&1", TOOL, tmpdir());
    cr_assert_eq(test_run(cmd, &many), 0, "%s", many);
    /* The same report from the first figure on: only the header names the
     * files, and the notes say how the files were merged. */
    const char *a = strstr(one, "  graph "), *b = strstr(many, "  graph ");
    cr_assert(a && b);
    const char *na = strstr(a, "\nNotes"), *nb = strstr(b, "\nNotes");
    cr_assert(na && nb, "%s", many);
    cr_assert_eq(na - a, nb - b, "reports differ:\n%s\n----\n%s", one, many);
    cr_assert(!strncmp(a, b, (size_t)(na - a)), "reports differ:\n%s\n----\n%s", one, many);
    cr_assert(strstr(many, "pipe-trace: "), "%s", many);
    cr_assert(strstr(many, "/b/run.rank*.json (4 files)"), "%s", many);
    cr_assert(strstr(nb, "4 processes on 4 hosts"), "%s", many);
    cr_assert(strstr(a, "rank 3"), "%s", one);
    /* A directory is its rank files. */
    char *dir = NULL;
    snprintf(cmd, sizeof cmd, "%s --color never --top 0 %s/b 2>&1", TOOL, tmpdir());
    cr_assert_eq(test_run(cmd, &dir), 0, "%s", dir);
    const char *c = strstr(dir, "  graph ");
    cr_assert(c && !strcmp(c, b), "%s\n----\n%s", dir, many);
    /* --merge writes the one-process trace. */
    snprintf(cmd, sizeof cmd, "%s --merge %s %s/b 2>&1", TOOL, tmp_path("merged.json"), tmpdir());
    char *out = NULL;
    cr_assert_eq(test_run(cmd, &out), 0, "%s", out);
    cr_assert(strstr(out, "merged ") && strstr(out, "4 processes on 4 hosts"), "%s", out);
    size_t n1, n2;
    char *x = test_read_file_or_fail(reference(), &n1), *y = test_read_file_or_fail(tmp_path("merged.json"), &n2);
    cr_assert(n1 == n2 && !memcmp(x, y, n1), "--merge output differs from the one-process trace");
    free(x), free(y), free(out), free(dir), free(one), free(many);
}

Test(trace_merge, the_reader_exposes_the_clock_block, TIMEOUT)
{
    write_rank_files("c", 0xabcdef);
    pw_trace_reader *rd;
    cr_assert_eq(pw_trace_reader_open(rank_path("c", 3), &rd), PW_OK);
    pw_trace_record ev;
    int more;
    cr_assert_eq(pw_trace_reader_next(rd, &ev, &more), PW_OK);
    const pw_trace_info *in = pw_trace_reader_info(rd);
    cr_assert(in->present && in->has_clock);
    cr_assert_eq(in->world_rank, 3);
    cr_assert_eq(in->world_size, 4);
    cr_assert_eq(in->clock_offset_ns, k_offsets[3]);
    cr_assert_eq(in->clock_measured_ns, k_offsets[3] + 700);
    cr_assert_eq(in->clock_rtt_ns, 4000);
    cr_assert_eq(in->clock_t0_ns, BASE_NS + 3 * US - k_offsets[3]); /* its first event */
    cr_assert_str_eq(in->host, "host3");
    cr_assert_str_eq(in->run_id, "0000000000abcdef");
    pw_trace_reader_close(rd);
    /* Alone, the file says it is one process of a run. */
    pw_trace_analysis *a = NULL;
    cr_assert_eq(pw_trace_analyze(rank_path("c", 3), NULL, &a), PW_OK);
    int found = 0;
    for (int i = 0; i < a->n_notes; i++) found |= strstr(a->notes[i], "one process's trace of a 4-process run (MPI rank 3)") != NULL;
    cr_assert(found);
    pw_trace_analysis_destroy(a);
}

Test(trace_merge, files_of_two_runs_or_one_rank_twice_are_refused, TIMEOUT)
{
    write_rank_files("d1", 1);
    write_rank_files("d2", 2);
    pw_status st;
    pw_trace_merge_report rep;
    const char *two_runs[] = {rank_path("d1", 0), rank_path("d2", 1)};
    free(merge(two_runs, 2, &st, &rep));
    cr_assert_eq(st, PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "come from different runs") && strstr(pw_last_error(), two_runs[0]) &&
              strstr(pw_last_error(), two_runs[1]), "%s", pw_last_error());
    pw_trace_merge_report_free(&rep);

    const char *twice[] = {rank_path("d1", 0), rank_path("d1", 1), rank_path("d1", 1)};
    free(merge(twice, 3, &st, &rep));
    cr_assert_eq(st, PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "are both MPI rank 1"), "%s", pw_last_error());
    pw_trace_merge_report_free(&rep);

    /* Another graph: not one run, whatever the clocks say. */
    const char *other = tmp_path("other.json");
    write_file(other, (rank_file){.world_rank = 1, .clock = 1, .run_id = 1, .graph = "another"});
    const char *diff[] = {rank_path("d1", 0), other};
    free(merge(diff, 2, &st, &rep));
    cr_assert_eq(st, PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "not the traces of one run: graph 'merge_fixture' and 'another'"), "%s",
              pw_last_error());
    pw_trace_merge_report_free(&rep);

    /* The tool: exit 1, the message names the files. */
    char cmd[1024], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s %s %s 2>&1", TOOL, two_runs[0], two_runs[1]);
    cr_assert_eq(test_run(cmd, &out), 1, "%s", out);
    cr_assert(strstr(out, "come from different runs"), "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s --merge %s %s %s 2>&1", TOOL, tmp_path("bad.json"), twice[0], twice[1]);
    cr_assert_eq(test_run(cmd, &out), 0, "%s", out); /* two distinct ranks: fine */
    free(out);
    snprintf(cmd, sizeof cmd, "%s --merge %s %s %s %s 2>&1; ls %s", TOOL, tmp_path("bad2.json"), twice[0], twice[1],
             twice[2], tmpdir());
    test_run(cmd, &out);
    cr_assert(strstr(out, "are both MPI rank 1") && !strstr(out, "bad2.json"), "%s", out);
    free(out);
}

Test(trace_merge, missing_ranks_are_a_warning, TIMEOUT)
{
    write_rank_files("e", 3);
    const char *three[] = {rank_path("e", 0), rank_path("e", 1), rank_path("e", 3)};
    pw_status st;
    pw_trace_merge_report rep;
    char *got = merge(three, 3, &st, &rep);
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    cr_assert(has_note(&rep, "warning: no trace of MPI rank 2 of the 4-process run"), "%s", rep.notes[0]);
    pw_trace_reader *rd;
    cr_assert_eq(pw_trace_reader_open_memory(got, strlen(got), "merged", &rd), PW_OK);
    pw_trace_analysis *a = NULL;
    cr_assert_eq(pw_trace_analyze_reader(rd, NULL, &a), PW_OK, "%s", pw_last_error());
    cr_assert_eq(a->n_ranks, 4); /* the metadata's count: rank 2 is idle */
    cr_assert_eq(a->ranks[2].total.compute, 0);
    pw_trace_analysis_destroy(a);
    pw_trace_reader_close(rd);
    free(got);
    pw_trace_merge_report_free(&rep);
    char cmd[1024], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s --color never %s %s %s", TOOL, three[0], three[1], three[2]);
    cr_assert_eq(test_run(cmd, &out), 0, "%s", out);
    cr_assert(strstr(out, "warning: no trace of MPI rank 2"), "%s", out);
    free(out);
}

Test(trace_merge, files_without_clocks_are_merged_as_written, TIMEOUT)
{
    /* Older per-rank traces: no clock block, each from its own first event. */
    const char *a = tmp_path("old.rank0.json"), *b = tmp_path("old.rank1.json");
    write_file(a, (rank_file){.world_rank = 0});
    write_file(b, (rank_file){.world_rank = 1, .offset_ns = 5});
    const char *both[] = {a, b};
    pw_status st;
    pw_trace_merge_report rep;
    free(merge(both, 2, &st, &rep));
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    cr_assert_eq(rep.clock, PW_MERGE_CLOCK_AS_WRITTEN);
    cr_assert(has_note(&rep, "none of the 2 files records its clock"));
    cr_assert(has_note(&rep, "warning: the 2 files hold no events of ranks 2, 3 of the 4"), "%s",
              rep.n_notes > 1 ? rep.notes[1] : "");
    pw_trace_merge_report_free(&rep);
    /* The same track in two files. */
    const char *dup[] = {a, a};
    free(merge(dup, 2, &st, &rep));
    cr_assert_eq(st, PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "both hold events of track 0"), "%s", pw_last_error());
    pw_trace_merge_report_free(&rep);
    /* One with a clock, one without: as written, with a warning. */
    write_rank_files("f", 9);
    const char *mixed[] = {rank_path("f", 0), b};
    free(merge(mixed, 2, &st, &rep));
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    cr_assert_eq(rep.clock, PW_MERGE_CLOCK_AS_WRITTEN);
    cr_assert(has_note(&rep, "records its clock and"), "%s", rep.notes[0]);
    pw_trace_merge_report_free(&rep);
}

Test(trace_merge, same_host_processes_need_no_offset, TIMEOUT)
{
    char dir[256];
    snprintf(dir, sizeof dir, "%s/g", tmpdir());
    mkdir(dir, 0755);
    for (int w = 0; w < RANKS; w++)
        write_file(rank_path("g", w), (rank_file){.world_rank = w, .clock = 1, .same_host = 1, .run_id = 4});
    const char *paths[] = {rank_path("g", 0), rank_path("g", 1), rank_path("g", 2), rank_path("g", 3)};
    pw_status st;
    pw_trace_merge_report rep;
    char *got = merge(paths, RANKS, &st, &rep);
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    cr_assert_eq(rep.max_rtt_ns, 0);
    cr_assert_eq(rep.max_estimate_ns, 700); /* measured_ns = offset + 700 in write_file */
    cr_assert(has_note(&rep, "share MPI rank 0's host (host0) and its clock"), "%s", rep.notes[0]);
    size_t n;
    char *want = test_read_file_or_fail(reference(), &n);
    cr_assert_str_eq(got, want);
    free(want), free(got);
    pw_trace_merge_report_free(&rep);
}

Test(trace_merge, directories_name_one_run, TIMEOUT)
{
    write_rank_files("h", 5);
    char cmd[1024], *out = NULL;
    /* Another run's files beside them. */
    snprintf(cmd, sizeof cmd, "cp %s %s/h/other.rank0.json && %s %s/h 2>&1", rank_path("h", 0), tmpdir(), TOOL,
             tmpdir());
    cr_assert_eq(test_run(cmd, &out), 1, "%s", out);
    cr_assert(strstr(out, "more than one run") && strstr(out, "run.rank*.json") && strstr(out, "other.rank*.json"),
              "%s", out);
    free(out);
    char empty[256];
    snprintf(empty, sizeof empty, "%s/empty", tmpdir());
    mkdir(empty, 0755);
    snprintf(cmd, sizeof cmd, "%s %s 2>&1", TOOL, empty);
    cr_assert_eq(test_run(cmd, &out), 1, "%s", out);
    cr_assert(strstr(out, "no per-process traces"), "%s", out);
    free(out);
    /* stdin cannot be one of several. */
    snprintf(cmd, sizeof cmd, "%s - %s 2>&1 </dev/null", TOOL, rank_path("h", 1));
    cr_assert_eq(test_run(cmd, &out), 2, "%s", out);
    free(out);
    snprintf(cmd, sizeof cmd, "%s --merge %s --json %s 2>&1", TOOL, tmp_path("x.json"), rank_path("h", 1));
    cr_assert_eq(test_run(cmd, &out), 2, "%s", out);
    free(out);
}

Test(trace_merge, clock_blocks_are_checked, TIMEOUT)
{
    static const struct { const char *clock, *error; } cases[] = {
        {"\"clock\": 5", "pipewright.clock: expected an object"},
        {"\"clock\": {}", "pipewright.clock.t0_ns: expected an integer in [0, 2305843009213693952], got missing"},
        {"\"clock\": {\"t0_ns\": -1}", "pipewright.clock.t0_ns: expected an integer in"},
        {"\"clock\": {\"t0_ns\": 1, \"offset_ns\": 1e3}", "pipewright.clock.offset_ns: expected an integer"},
        {"\"clock\": {\"t0_ns\": 1, \"world_rank\": 4, \"world_size\": 4}", "world_rank 4 is not below world_size 4"},
        {"\"clock\": {\"t0_ns\": 1, \"host\": 7}", "pipewright.clock.host: expected a string"},
        {"\"clock\": {\"t0_ns\": 1, \"same_host\": 1}", "pipewright.clock.same_host: expected a boolean"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char text[512];
        int n = snprintf(text, sizeof text, "{\"pipewright\": {\"version\": 1, \"ranks\": 1, %s},\n\"traceEvents\": "
                         "[]}\n", cases[i].clock);
        pw_trace_reader *rd;
        cr_assert_eq(pw_trace_reader_open_memory(text, (size_t)n, "c.json", &rd), PW_OK);
        pw_trace_record ev;
        int more;
        cr_assert_eq(pw_trace_reader_next(rd, &ev, &more), PW_ERR_PARSE, "%s", cases[i].clock);
        cr_assert(strstr(pw_last_error(), cases[i].error), "%s: %s", cases[i].clock, pw_last_error());
        pw_trace_reader_close(rd);
    }
    /* An offset that puts an event past what a trace may hold. */
    const char *text = "{\"pipewright\": {\"version\": 1, \"ranks\": 2, \"clock\": {\"t0_ns\": 0, \"offset_ns\": "
                       "2305843009213693952, \"world_rank\": 1, \"world_size\": 2}},\n\"traceEvents\": [\n"
                       "{\"name\": \"F\", \"ph\": \"X\", \"tid\": 1, \"ts\": 3999999000000000, \"dur\": 1}]}\n";
    const char *text0 = "{\"pipewright\": {\"version\": 1, \"ranks\": 2, \"clock\": {\"t0_ns\": 0, \"world_rank\": 0, "
                        "\"world_size\": 2}},\n\"traceEvents\": [\n{\"name\": \"F\", \"ph\": \"X\", \"tid\": 0, "
                        "\"ts\": 0, \"dur\": 1}]}\n";
    write_text(tmp_path("far.rank1.json"), text, strlen(text));
    write_text(tmp_path("far.rank0.json"), text0, strlen(text0));
    const char *paths[] = {tmp_path("far.rank0.json"), tmp_path("far.rank1.json")};
    pw_status st;
    pw_trace_merge_report rep;
    free(merge(paths, 2, &st, &rep));
    cr_assert_eq(st, PW_ERR_INVALID_ARG);
    cr_assert(strstr(pw_last_error(), "far.rank1.json:line 3: event 1: its clock offset puts it at"), "%s",
              pw_last_error());
    pw_trace_merge_report_free(&rep);
}

/* Every prefix of one input, merged with an intact one: a clean error naming
 * that input, or a merge whose output reads back and analyses. */
Test(trace_merge, every_truncation_is_a_clean_error, TIMEOUT)
{
    write_rank_files("t", 11);
    size_t n;
    char *full = test_read_file_or_fail(rank_path("t", 1), &n);
    const char *cut = tmp_path("cut.rank1.json");
    const char *paths[] = {rank_path("t", 0), cut};
    for (size_t len = 0; len < n; len += 1 + len / 64) {
        write_text(cut, full, len);
        pw_status st;
        pw_trace_merge_report rep;
        char *got = merge(paths, 2, &st, &rep);
        if (st != PW_OK) {
            cr_assert(st == PW_ERR_PARSE && strstr(pw_last_error(), "cut.rank1.json"), "length %zu: %d %s", len,
                      (int)st, pw_last_error());
        } else {
            pw_trace_reader *rd;
            cr_assert_eq(pw_trace_reader_open_memory(got, strlen(got), "merged", &rd), PW_OK);
            pw_trace_analysis *a = NULL;
            cr_assert_eq(pw_trace_analyze_reader(rd, NULL, &a), PW_OK, "length %zu: %s", len, pw_last_error());
            pw_trace_analysis_destroy(a);
            pw_trace_reader_close(rd);
        }
        free(got);
        pw_trace_merge_report_free(&rep);
    }
    free(full);
}

/* Found by fuzz_trace_merge: a file with metadata and no clock whose events
 * are on no pid-0 track sorted a NULL array (UBSan: qsort's nonnull). Alone,
 * and beside a second such file. */
Test(trace_merge, crash_no_pid0_tracks, TIMEOUT)
{
    const char *crash = PW_SOURCE_DIR "/tests/fixtures/crashes/ubsan-merge-qsort-null-tids.json";
    pw_status st;
    pw_trace_merge_report rep;
    free(merge(&crash, 1, &st, &rep));
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    pw_trace_merge_report_free(&rep);
    const char *a = tmp_path("p1a.json"), *b = tmp_path("p1b.json");
    const char *ta = "{\"pipewright\": {\"version\": 1, \"ranks\": 2},\n\"traceEvents\": [\n"
                     "{\"name\": \"F\", \"ph\": \"X\", \"pid\": 1, \"tid\": 0, \"ts\": 0, \"dur\": 1}]}\n";
    const char *tb = "{\"pipewright\": {\"version\": 1, \"ranks\": 2},\n\"traceEvents\": [\n"
                     "{\"name\": \"F\", \"ph\": \"X\", \"pid\": 1, \"tid\": 1, \"ts\": 0, \"dur\": 1}]}\n";
    write_text(a, ta, strlen(ta));
    write_text(b, tb, strlen(tb));
    const char *both[] = {a, b};
    free(merge(both, 2, &st, &rep));
    cr_assert_eq(st, PW_OK, "%s", pw_last_error());
    cr_assert(has_note(&rep, "hold no events of ranks 0, 1 of the 2"));
    pw_trace_merge_report_free(&rep);
}
