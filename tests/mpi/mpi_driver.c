/* MPI tests: pipeline-run under mpirun on loopback, against the same run in
 * one process. Run by CTest as `mpi_driver BUILD_DIR NP` for NP = 2, 3 and 4
 * (no Criterion: each case launches mpirun itself).
 *
 *   identical   for every (stages, replicas) with stages × replicas = NP:
 *               the checkpoint's tensors are byte-identical to the same run
 *               in one process (SGD and AdamW, 1F1B / GPipe / split W, clipping),
 *               and R replicas × M micro-batches to one replica of R·M;
 *               a run resumed with --init-from likewise; interleaved 1F1B and
 *               zb-v (two chunks per process) likewise
 *   tied        a tiny GPT whose head reuses the token embedding (wte.weight
 *               on the first and last stage, so in different processes):
 *               byte-identical to one process, with clipping and replicas
 *   data parts  IDX files: the first stage reads only the images, the last
 *               only the labels, a middle stage neither file (the PW_DEBUG
 *               log of each process, told apart by mpirun --tag-output, says
 *               what it read and loaded); still byte-identical
 *   binding     with pinning on, the processes of this host bind their
 *               workers to cores by host rank (not all to core 0), or keep
 *               mpirun's --bind-to core binding
 *   failures    a rank killed (SIGKILL), exiting early, reporting an error
 *               or hanging: mpirun returns non-zero within a bounded time and
 *               the output names the rank (and stage)
 *   hangs       a rank hung (PW_TEST_HANG: asleep for good, or stopped with
 *               SIGSTOP) inside a training step, at an epoch boundary, during
 *               the evaluation and during --save, and one stopped by SIGSTOP
 *               from outside mid-run: mpirun returns non-zero within the
 *               watchdog + 10 s, and the output names that rank as the
 *               stalled one and no other
 *   signals     SIGTERM to one process mid-run: all stop after the same
 *               step, each writes its trace, no temp file is left
 *   traces      4 processes (2 stages x 2 replicas) write run.rankN.json;
 *               each records its clock (rank, run id, an offset whose
 *               estimate is within half its round trip of the one clock of
 *               this host); `pipe-trace run.rank*.json` analyses them as one
 *               run with the ranks, stages and replicas the same run in one
 *               process reports, and --merge writes that run as one trace
 *   hostfile    the run started with `mpirun --hostfile` naming localhost
 *               once per slot trains and its traces analyse
 *   checkpoints training-state checkpoints written by every process in
 *               shards (docs/checkpoints.md): resumed in one process and
 *               under mpirun on another layout, byte-identical to the
 *               uninterrupted run; SIGTERM -> a complete checkpoint and
 *               mpirun's exit 75; a rank SIGKILLed mid-run, restarted by
 *               tools/pipeline-launch from the last checkpoint on the same
 *               process count and on fewer (elastic: 2 stages x 2 replicas
 *               -> 2 x 1): byte-identical to a run that never failed
 *
 *   compress    --compress bf16 / fp16 / topk / powersgd (runtime/compress.h):
 *               byte-identical to the same compressed run in one process
 *               (PW_MPI_ONLY=compress runs these alone)
 *
 *   algos       (also alone at NP = 3, or with PW_MPI_ONLY=algos) every MPI
 *               all-reduce against its documented order float for float
 *               (tests/mpi/coll_check.c: tree and ring against the
 *               in-process ones, hierarchical against the tree of the
 *               hosts' trees and the tree where pw_hier_matches_tree, auto
 *               against the tree, MPI_Iallreduce at 2), with PW_TEST_HOSTS
 *               fake hosts and behind a slow link; and training runs with
 *               --allreduce tree / hierarchical / auto (and ring, mpi at 2)
 *               and --link-bandwidth/--link-latency, byte-identical to the
 *               tree in one process (with and without the in-process link);
 *               at 2, runs behind a 20 ms link take at least its latencies
 *   tp          (PW_MPI_ONLY=tp, at NP = 4; docs/parallelism.md "Under MPI")
 *               tensor parallelism with its T ranks as processes: a tiny GPT
 *               split Megatron-style (vocabulary-parallel embedding and tied
 *               head, attention by heads, MLPs column then row; dropout) at
 *               S x R x T = 2 x 1 x 2 and 1 x 2 x 2 (np 4) and 2 x 2 x 2
 *               (np 8): the checkpoint byte-identical to the same layout in
 *               one process (SGD and AdamW, 1F1B and GPipe), and not T = 1's;
 *               with --clip-grad-norm (2 x 1 x 2, 1 x 2 x 2; clipping every
 *               step) the same bytes and every step's norm as one process;
 *               training-state checkpoints written at T = 2 under mpirun
 *               resumed in one process at T = 2 and 1 and under mpirun on
 *               other layouts, and one process's T = 1 checkpoint resumed
 *               under mpirun at T = 2, each against one process's bytes;
 *               at 1 x 3 x 2 the replicas' sum: tree, hierarchical, auto,
 *               bf16, top-k and PowerSGD one process's bytes, the ring
 *               within 1e-5; forced moves of the cuts at 2 x 1 x 2
 *               (one inside a tensor-parallel pair) against the unmoved run;
 *               bad layouts (np not S x R x T, not a multiple of R x T, heads
 *               fewer than T) refused naming the numbers or the op; a tensor
 *               rank hung mid-step named as the stalled one within the
 *               watchdog (the tensor-parallel all-reduce's own watch), one
 *               killed ending the job with its rank named; every process's
 *               trace holds TP_ALLREDUCE events and pipe-trace reads the
 *               four files as one run with the line for them
 *   parts       (no mpirun) what pw_pipeline_data_parts gives each rank of a
 *               few layouts, partial synthetic data holds the same values as
 *               the full set, and gather refuses a side that was not loaded
 *
 * Exit status: 0 pass, 1 fail, 77 skipped (no mpirun, or a build without
 * MPI), as CTest's SKIP_RETURN_CODE. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "runtime/safetensors.h"
#include "runtime/trace_read.h"
#include "runtime/topology.h"
#include "runtime/transport.h"
#include "graph/graph.h"
#include "stages/train/data.h"
#include "stages/train/pipeline.h"
#include "tests/test_helpers.h"

static const char *bin;       /* the build directory: pipeline-run */
static char dir[64];          /* scratch */
static int failures;

#define MPIRUN "mpirun --oversubscribe --bind-to none --mca btl self,vader"
#define DATA "--data synthetic:768:24:5 --no-pin --quiet --seed 5 --shuffle"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    failures++;
}

/* Runs a shell command with a time limit; returns its exit status (-1 when
 * killed by a signal; 124 on timeout) and its output in *out. */
static int run(const char *cmd, int limit_s, char **out, double *took)
{
    char full[8192];
    /* The output goes through a file: a process the timeout left behind
     * (an mpirun that outlived its shell) would otherwise hold the pipe
     * open and the read would never end. */
    snprintf(full, sizeof full, "cd '%s' && timeout -k 5 %d sh -c '%s' > .run.out 2>&1; st=$?; cat .run.out; "
             "exit $st", dir, limit_s, cmd);
    double t0 = now_s();
    int st = test_run(full, out);
    if (took) *took = now_s() - t0;
    return st;
}

static void write_graph(void)
{
    char path[128];
    snprintf(path, sizeof path, "%s/m.graph", dir);
    FILE *f = fopen(path, "w");
    fputs("graph mpi_mlp\n"
          "input x : f32[24]\n"
          "label y : i32[]\n"
          "h1 = linear(x, out=48) as fc1\n"
          "n1 = layernorm(h1)\n"
          "a1 = gelu(n1)\n"
          "h2 = linear(a1, out=48) as fc2\n"
          "a2 = relu(h2)\n"
          "h3 = linear(a2, out=48) as fc3\n"
          "a3 = relu(h3)\n"
          "r = add(a3, a1)\n"
          "logits = linear(r, out=5) as head\n"
          "loss = softmax_cross_entropy(logits, y)\n", f);
    fclose(f);
}

/* A tiny GPT whose head is tied to the token embedding (as
 * tests/test_pipeline.c's), and a text to train it on. */
static void write_tied(void)
{
    char path[128];
    snprintf(path, sizeof path, "%s/tied.graph", dir);
    FILE *f = fopen(path, "w");
    fputs("graph tiny_tied_gpt\n"
          "input tokens : i32[8]\n"
          "label next : i32[8]\n"
          "tok = embedding(tokens, vocab=256, dim=16) as wte\n"
          "pos = pos_embedding(tok, max=8) as wpe\n"
          "x0  = dropout(pos, p=0.1)\n"
          "h = repeat 2 as h (x = x0) {\n"
          "  a   = layernorm(x) as ln_1\n"
          "  qkv = linear(a, out=48) as attn.c_attn\n"
          "  att = causal_attention(qkv, heads=2)\n"
          "  o   = linear(att, out=16) as attn.c_proj\n"
          "  od  = dropout(o, p=0.1)\n"
          "  x1  = add(x, od)\n"
          "  m   = layernorm(x1) as ln_2\n"
          "  fc  = linear(m, out=64) as mlp.c_fc\n"
          "  g   = gelu(fc)\n"
          "  pr  = linear(g, out=16) as mlp.c_proj\n"
          "  x2  = add(x1, pr)\n"
          "  return x2\n"
          "}\n"
          "hf = layernorm(h) as ln_f\n"
          "logits = linear(hf, out=256, bias=false, weight=wte.weight) as lm_head\n"
          "loss = softmax_cross_entropy(logits, next)\n", f);
    fclose(f);
    static const char *const sent[] = {"the quick brown fox jumps over the lazy dog. ",
                                       "a stitch in time saves nine. ", "all that glitters is not gold. "};
    snprintf(path, sizeof path, "%s/text.txt", dir);
    f = fopen(path, "w");
    for (int i = 0; i < 120; i++) fputs(sent[(i * 7 + i / 3) % 3], f);
    fclose(f);
}

/* The same training run (model, data and step flags in `model`) in one
 * process and under mpirun -np NP; the checkpoints must hold the same
 * tensor bytes. */
/* The run `args` under mpirun -np `np` (plus `mpi_extra`) against `one_args`
 * in one process: the same checkpoint tensors. */
static void identical_runs(int np, const char *args, const char *mpi_extra, const char *one_args, const char *tag,
                           const char *what)
{
    char cmd[2048], why[256];
    char *out = NULL;
    double took;
    snprintf(cmd, sizeof cmd, "%s/pipeline-run %s --save one_%s.st", bin, one_args, tag);
    int st = run(cmd, 300, &out, &took);
    if (st != 0) {
        fail("in one process (%s): exit %d\n%s", cmd, st, out);
        free(out);
        return;
    }
    free(out);
    snprintf(cmd, sizeof cmd, MPIRUN " -np %d %s/pipeline-run %s %s --save mpi_%s.st", np, bin, args, mpi_extra,
             tag);
    st = run(cmd, 300, &out, &took);
    if (st != 0) {
        fail("under mpirun (%s): exit %d\n%s", cmd, st, out);
        free(out);
        return;
    }
    free(out);
    char a[160], b[160];
    snprintf(a, sizeof a, "%s/one_%s.st", dir, tag);
    snprintf(b, sizeof b, "%s/mpi_%s.st", dir, tag);
    if (!test_same_tensors(a, b, why, sizeof why))
        fail("%s %s: the MPI checkpoint differs from one process (%s): %s", what, mpi_extra, one_args, why);
    else
        printf("ok   %s %s: MPI checkpoint identical to one process (%.1f s)\n", what, mpi_extra, took);
}

static void identical_model(const char *model, int np, int S, int R, const char *extra, const char *mpi_extra,
                            const char *tag)
{
    char args[1024], what[1200];
    snprintf(args, sizeof args, "%s --stages %d --replicas %d %s", model, S, R, extra);
    snprintf(what, sizeof what, "%.*s: %d stages x %d replicas %s", (int)strcspn(model, " "), model, S, R, extra);
    identical_runs(np, args, mpi_extra, args, tag, what);
}

/* R replicas of M micro-batches under MPI (the tree all-reduce) against one
 * replica of R·M micro-batches on one stage in one process: the same bits
 * for a power-of-two R (docs/api.md, "Determinism"). */
static void one_replica(int np, int S, int R, int M, const char *extra, const char *tag)
{
    char args[1024], one[1024], what[1200];
    const char *model = "m.graph " DATA " --batch 48 --steps 12";
    snprintf(args, sizeof args, "%s --stages %d --replicas %d --micro-batches %d %s", model, S, R, M, extra);
    snprintf(one, sizeof one, "%s --stages 1 --replicas 1 --micro-batches %d %s", model, R * M, extra);
    snprintf(what, sizeof what, "m.graph: %d stages x %d replicas x %d micro-batches %s (= 1 x 1 x %d)", S, R, M,
             extra, R * M);
    identical_runs(np, args, "", one, tag, what);
}

/* One (stages, replicas) layout of the MLP. */
static void identical(int np, int S, int R, const char *extra, const char *mpi_extra, const char *tag)
{
    identical_model("m.graph " DATA " --batch 48 --steps 12", np, S, R, extra, mpi_extra, tag);
}

/* The tied GPT: wte.weight on the first chunk, lm_head on the last. */
static void tied(int np, int S, int R, const char *extra, const char *tag)
{
    identical_model("tied.graph --data text:text.txt --no-pin --quiet --seed 5 --shuffle --batch 16 --steps 6",
                    np, S, R, extra, "", tag);
}

/* Compressed gradients (runtime/compress.h): the 16-bit and top-k payloads
 * travel by MPI_Iallgather, PowerSGD's P and Q by the tree; each sums in
 * the same order as in process. */
/* The error-feedback state of --compress (top-k's residuals, PowerSGD's
 * residuals and Q) in checkpoints under mpirun: every process writes its
 * replica's (compress-RANK-of-N files); a run written by 1 x 2 processes
 * and resumed at step 2 under mpirun on 2 x 2, and in one process, ends
 * with the bytes of the unbroken run in one process. */
/* base: the graph, its data and batch; written by ws stages x 2 replicas
 * under mpirun (ws 2 on the tied GPT: the embedding's and the head's uses
 * of the tied weight in different processes, each writing its use's
 * state). */
static void compress_resumed(const char *base, const char *mode, int ws)
{
    char cmd[2048], *out = NULL, ref[64], what[256];
    char model[512];
    snprintf(model, sizeof model, "%s --steps 6 --replicas 2 --micro-batches 2 --optimizer adamw --compress %s", base,
             mode);
    snprintf(ref, sizeof ref, "zref.st");
    snprintf(cmd, sizeof cmd, "%s/pipeline-run %s --stages 1 --save %s", bin, model, ref);
    int st = run(cmd, 300, &out, NULL);
    if (st != 0) fail("--compress %s resumed: the unbroken run: exit %d\n%s", mode, st, out);
    free(out);
    if (st) return;
    snprintf(cmd, sizeof cmd, "rm -rf ckz; " MPIRUN " -np %d %s/pipeline-run %s --stages %d --checkpoint-dir ckz "
             "--checkpoint-every 2 --keep 0", 2 * ws, bin, model, ws);
    st = run(cmd, 300, &out, NULL);
    char z2[200];
    snprintf(z2, sizeof z2, "%s/ckz/step-00000002/compress-%05d-of-%05d.safetensors", dir, 2 * ws, 2 * ws);
    if (st != 0 || access(z2, R_OK) != 0) {
        fail("--compress %s under mpirun with checkpoints: exit %d, replica 1's state file %s\n%s", mode, st,
             access(z2, R_OK) ? "missing" : "there", out);
        free(out);
        return;
    }
    free(out);
    static const struct {
        int np;
        const char *layout;
    } resume[] = {{4, "--stages 2"}, {0, "--stages 3"}};
    for (int i = 0; i < 2; i++) {
        char prefix[128] = "";
        if (resume[i].np) snprintf(prefix, sizeof prefix, MPIRUN " -np %d ", resume[i].np);
        snprintf(cmd, sizeof cmd, "%s%s/pipeline-run %s %s --resume ckz/step-00000002 --save zres%d.st", prefix, bin,
                 model, resume[i].layout, i);
        st = run(cmd, 300, &out, NULL);
        if (st != 0 || strstr(out, "not restored")) {
            fail("--compress %s resumed (%s): exit %d\n%s", mode, cmd, st, out);
            free(out);
            continue;
        }
        free(out);
        char a[200], b[200], why[256];
        snprintf(a, sizeof a, "%s/%s", dir, ref);
        snprintf(b, sizeof b, "%s/zres%d.st", dir, i);
        snprintf(what, sizeof what, "%.24s --compress %s: written by %d x 2 processes at step 2, resumed %s on %s x 2",
                 base, mode, ws, resume[i].np ? "under mpirun" : "in one process", resume[i].layout + 9);
        if (!test_same_tensors(a, b, why, sizeof why)) fail("%s: differs from the unbroken run: %s", what, why);
        else printf("ok   %s: identical to the unbroken run\n", what);
    }
}

static void compress_cases(int np)
{
    if (np == 2) {
        identical(2, 1, 2, "--micro-batches 2 --compress bf16", "", "zbf16");
        identical(2, 1, 2, "--micro-batches 2 --buckets 3 --compress fp16", "", "zfp16");
        identical(2, 1, 2, "--micro-batches 2 --compress topk:0.05", "", "ztopk");
        identical(2, 1, 2, "--micro-batches 2 --optimizer adamw --compress powersgd:2", "", "zpsgd");
        /* Behind a slow link (the payload's gather is throttled too) and
         * with auto's endpoint: the same bytes as in process. */
        identical(2, 1, 2, "--micro-batches 2 --compress bf16 --link-bandwidth 2e8 --link-latency 1e-4", "",
                  "zbf16slow");
        identical(2, 1, 2, "--micro-batches 2 --compress topk:0.05", "--allreduce auto --link-bandwidth 2e8",
                  "ztopkauto");
        /* The hierarchical endpoint gathers the payloads over its whole
         * group (it once had no byte gather: every such run failed). */
        identical(2, 1, 2, "--micro-batches 2 --compress fp16", "--allreduce hierarchical", "zfp16hier");
        compress_resumed("m.graph " DATA " --batch 48", "topk:0.05", 1);
        compress_resumed("m.graph " DATA " --batch 48", "powersgd:2", 1);
        compress_resumed("tied.graph --data text:text.txt --no-pin --quiet --seed 5 --shuffle --batch 16", "topk:0.1", 2);
    } else {
        identical(4, 2, 2, "--micro-batches 4 --buckets 2 --compress topk:0.1 --clip-grad-norm 0.5", "", "ztopk4");
        identical(4, 1, 4, "--micro-batches 2 --compress powersgd:3", "", "zpsgd4");
        identical(4, 1, 4, "--micro-batches 2 --compress bf16", "--allreduce hierarchical", "zbf16hier4");
    }
}

/* --allreduce ALGO (and a slow link) under mpirun, with PW_TEST_HOSTS
 * making "hosts" of this machine (NULL: none), against the tree in one
 * process (with `one_link` there: the in-process throttle): the same
 * checkpoint bytes. */
static void algo_identical(int np, int S, int R, const char *algo, const char *hosts, const char *link,
                           const char *one_link, const char *tag)
{
    char args[1024], one[1400], mpi_extra[1400], what[1600];
    snprintf(args, sizeof args, "m.graph " DATA " --batch 48 --steps 6 --stages %d --replicas %d --micro-batches 2 "
             "--buckets 3", S, R);
    snprintf(one, sizeof one, "%s %s", args, one_link);
    snprintf(mpi_extra, sizeof mpi_extra, "--allreduce %s %s", algo, link);
    snprintf(what, sizeof what, "m.graph: %d stages x %d replicas, hosts %s, in one process %s", S, R,
             hosts ? hosts : "(one)", *one_link ? one_link : "(no link)");
    if (hosts) setenv("PW_TEST_HOSTS", hosts, 1);
    else unsetenv("PW_TEST_HOSTS");
    identical_runs(np, args, mpi_extra, one, tag, what);
    unsetenv("PW_TEST_HOSTS");
}

/* tests/mpi/coll_check under mpirun -np np with PW_TEST_HOSTS=hosts (NULL:
 * none) and `extra` flags: every MPI all-reduce against its documented
 * order, float for float. */
static void coll_check(int np, const char *hosts, const char *extra)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s%s%s" MPIRUN " -np %d %s/coll_check %s", hosts ? "PW_TEST_HOSTS=" : "",
             hosts ? hosts : "", hosts ? " " : "", np, bin, extra);
    int st = run(cmd, 120, &out, NULL);
    const char *line = out ? strstr(out, "ok: ") : NULL;
    if (st != 0 || !line) fail("coll_check (%s): exit %d\n%s", cmd, st, out ? out : "");
    else printf("ok   coll_check %.*s\n", (int)strcspn(line + 4, "\n"), line + 4);
    free(out);
}

/* Every exact all-reduce (tree, hierarchical where the hosts make it the
 * tree's bytes, auto) and the slow link, at np processes. */
static void algos(int np)
{
    /* The collectives alone, against their orders. */
    coll_check(np, NULL, "");
    coll_check(np, NULL, "--link-bandwidth 1e9 --link-latency 1e-4");
    if (np == 3) coll_check(3, "0,0,1", ""), coll_check(3, "0,1,1", "");
    if (np == 4) coll_check(4, "0,0,1,1", ""), coll_check(4, "0,1,0,1", "--link-bandwidth 1e9");
    if (np == 2) coll_check(2, "0,1", "");
    const char *slow = "--link-bandwidth 2e8 --link-latency 2e-4";
    char hosts[64] = "", split[64] = "";
    /* Hosts of two members each (the last may hold one): the tree's bytes. */
    for (int w = 0; w < np; w++)
        snprintf(hosts + strlen(hosts), sizeof hosts - strlen(hosts), "%s%d", w ? "," : "", w / 2);
    /* A host per member. */
    for (int w = 0; w < np; w++)
        snprintf(split + strlen(split), sizeof split - strlen(split), "%s%d", w ? "," : "", w);
    algo_identical(np, 1, np, "tree", NULL, slow, slow, "al_tree");
    algo_identical(np, 1, np, "hierarchical", hosts, "", "", "al_hier");
    algo_identical(np, 1, np, "hierarchical", hosts, slow, "", "al_hier_slow");
    algo_identical(np, 1, np, "hierarchical", NULL, "", "", "al_hier1");
    algo_identical(np, 1, np, "hierarchical", split, "", "", "al_hierN");
    algo_identical(np, 1, np, "auto", hosts, "", "", "al_auto");
    algo_identical(np, 1, np, "auto", NULL, slow, "", "al_auto_slow");
    if (np == 2) {
        algo_identical(2, 2, 1, "tree", NULL, slow, slow, "al_s2_slow"); /* the stages' messages */
        algo_identical(2, 1, 2, "ring", NULL, slow, "", "al_ring_slow");
        algo_identical(2, 1, 2, "mpi", NULL, slow, "", "al_mpi_slow");
    }
    if (np == 4) {
        /* A replica per host (the all-reduce crosses hosts), and a stage per
         * host (--map-by node: the all-reduce stays within one). */
        algo_identical(4, 2, 2, "hierarchical", "0,0,1,1", slow, slow, "al_s2r2_hier");
        algo_identical(4, 2, 2, "auto", "0,1,0,1", slow, "", "al_s2r2_auto");
    }
    /* Hosts of 1 and 2 members (np 3): not the tree's bytes; it runs. */
    if (np == 3) {
        char cmd[2048], *out = NULL;
        snprintf(cmd, sizeof cmd, "PW_TEST_HOSTS=0,1,1 PW_DEBUG=INFO PW_DEBUG_SUBSYS=COMM " MPIRUN " -np 3 "
                 "%s/pipeline-run m.graph " DATA " --batch 48 --steps 6 --replicas 3 --allreduce hierarchical", bin);
        int st = run(cmd, 300, &out, NULL);
        if (st != 0) fail("hierarchical over hosts 0,1,1: exit %d\n%s", st, out);
        else if (!strstr(out, "hierarchical (not the tree's bytes) all-reduce"))
            fail("hierarchical over hosts 0,1,1: the layout does not say it is not the tree's bytes:\n%s", out);
        else printf("ok   hierarchical over hosts 0,1,1 (1 + 2 members) runs, and says it is not the tree's bytes\n");
        free(out);
    }
    /* The link is really there under MPI: a training run's own time (the
     * "done: N steps in T s" line) is at least what the link alone imposes.
     * 2 stages: each step's last micro-batch goes to stage 1 and its
     * gradient comes back, each >= 20 ms; 2 replicas: each step's
     * non-empty buckets (at least one) wait 2 x 20 ms each. */
    if (np == 2) {
        static const struct {
            const char *layout;
            double min_s;
        } lk[] = {{"--stages 2 --replicas 1 --micro-batches 4 --steps 12", 12 * 2 * 0.02},
                  {"--stages 1 --replicas 2 --micro-batches 2 --buckets 3 --steps 6", 6 * 2 * 0.02}};
        for (size_t i = 0; i < sizeof lk / sizeof lk[0]; i++) {
            char cmd[2048], *out = NULL;
            snprintf(cmd, sizeof cmd, MPIRUN " -np 2 %s/pipeline-run m.graph " DATA " --batch 48 %s --link-latency 0.02",
                     bin, lk[i].layout);
            int st = run(cmd, 300, &out, NULL);
            const char *done = out ? strstr(out, "done: ") : NULL;
            int steps = 0;
            double took = -1;
            if (done) sscanf(done, "done: %d steps in %lf s", &steps, &took);
            if (st != 0 || took < 0) fail("slow link under MPI (%s): exit %d\n%s", lk[i].layout, st, out ? out : "");
            else if (took < lk[i].min_s)
                fail("slow link under MPI (%s): %d steps took %.3f s, the 20 ms link alone needs %.2f s", lk[i].layout,
                     steps, took, lk[i].min_s);
            else printf("ok   slow link under MPI (%s): %.2f s >= %.2f s\n", lk[i].layout, took, lk[i].min_s);
            free(out);
        }
    }
    /* Bad input: a malformed host list is refused with its name. */
    {
        char cmd[2048], *out = NULL;
        snprintf(cmd, sizeof cmd, "PW_TEST_HOSTS=0,x " MPIRUN " -x PW_TEST_HOSTS -np 2 %s/pipeline-run m.graph " DATA
                 " --batch 48 --steps 2 --replicas 2 --allreduce hierarchical", bin);
        int st = run(cmd, 120, &out, NULL);
        if (st == 0 || !strstr(out, "PW_TEST_HOSTS")) fail("PW_TEST_HOSTS=0,x: exit %d, expected an error naming it:\n%s", st, out);
        else printf("ok   PW_TEST_HOSTS=0,x is refused\n");
        free(out);
    }
}

/* 1 when some line of `out` that mpirun --tag-output marks as world rank
 * `rank` ("[1,3]<stderr>:...") contains `needle`. */
static int rank_says(const char *out, int rank, const char *needle)
{
    for (const char *line = out; line && *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t)(end - line) : strlen(line);
        int job = 0, r = -1;
        if (sscanf(line, "[%d,%d]", &job, &r) == 2 && r == rank) {
            char buf[1024];
            snprintf(buf, sizeof buf, "%.*s", (int)(len < sizeof buf ? len : sizeof buf - 1), line);
            if (strstr(buf, needle)) return 1;
        }
        line = end ? end + 1 : NULL;
    }
    return 0;
}

/* IDX files (f32 images, gzipped u8 labels) of the synthetic task, so that
 * reading a file shows in the log. */
static int write_idx(void)
{
    for (int train = 1; train >= 0; train--) {
        pw_dataset *d = NULL;
        if (pw_dataset_from_spec("synthetic:768:24:5", train, &d) != PW_OK) {
            fail("synthetic data: %s", pw_last_error());
            return 0;
        }
        unsigned char *y = malloc((size_t)d->n);
        for (int64_t i = 0; i < d->n; i++) y[i] = (unsigned char)d->y[i];
        pw_shape xs = {.ndim = 2, .d = {d->n, d->sample_numel}}, ys = {.ndim = 1, .d = {d->n}};
        char px[128], py[128];
        snprintf(px, sizeof px, "%s/%s_x.idx", dir, train ? "tr" : "te");
        snprintf(py, sizeof py, "%s/%s_y.idx.gz", dir, train ? "tr" : "te");
        int ok = pw_idx_write(px, PW_F32, &xs, d->x) == PW_OK && pw_idx_write(py, PW_U8, &ys, y) == PW_OK;
        free(y);
        pw_dataset_destroy(d);
        if (!ok) {
            fail("writing IDX files: %s", pw_last_error());
            return 0;
        }
    }
    return 1;
}

/* Each process reads only the data its stages need: with S stages x R
 * replicas over IDX files, stage 0 reads the images file alone, stage S-1
 * the labels file alone, a middle stage neither (the labels file's header,
 * for the sample count); the test split only on replica 0. The checkpoint
 * stays byte-identical to one process. */
static void data_parts(int np, int S, int R)
{
    char tag[32], args[1024], cmd[2048], why[256], *out = NULL;
    snprintf(tag, sizeof tag, "dp%d%d", S, R);
    snprintf(args, sizeof args, "m.graph --data idx:tr_x.idx,tr_y.idx.gz,te_x.idx,te_y.idx.gz --no-pin --quiet "
             "--seed 5 --shuffle --stages %d --replicas %d --batch 48 --steps 12 --micro-batches 4", S, R);
    snprintf(cmd, sizeof cmd, "%s/pipeline-run %s --save one_%s.st", bin, args, tag);
    if (run(cmd, 300, &out, NULL) != 0) {
        fail("in one process (%s):\n%s", cmd, out);
        free(out);
        return;
    }
    free(out);
    snprintf(cmd, sizeof cmd, "PW_DEBUG=INFO PW_DEBUG_SUBSYS=DATA " MPIRUN " --tag-output -np %d %s/pipeline-run "
             "%s --save mpi_%s.st", np, bin, args, tag);
    if (run(cmd, 300, &out, NULL) != 0) {
        fail("under mpirun (%s):\n%s", cmd, out);
        free(out);
        return;
    }
    char a[160], b[160];
    snprintf(a, sizeof a, "%s/one_%s.st", dir, tag);
    snprintf(b, sizeof b, "%s/mpi_%s.st", dir, tag);
    int bad = 0;
    if (!test_same_tensors(a, b, why, sizeof why)) {
        fail("data parts, %d stages x %d replicas: the MPI checkpoint differs from one process: %s", S, R, why);
        bad = 1;
    }
    for (int w = 0; w < np; w++) {
        const int stage = w % S, replica = w / S;
        for (int train = 1; train >= 0; train--) {
            const char *pre = train ? "tr" : "te";
            char x[64], y[64], yh[80], loaded[96];
            snprintf(x, sizeof x, "reading %s_x.idx", pre);
            snprintf(y, sizeof y, "reading %s_y.idx.gz", pre);
            snprintf(yh, sizeof yh, "reading %s_y.idx.gz (its header only)", pre);
            const int none = !train && replica > 0; /* evaluation runs on replica 0 */
            const int want_x = !none && stage == 0, want_y = !none && stage == S - 1;
            snprintf(loaded, sizeof loaded, train ? "train data tr_x.idx: 768" : "test data te_x.idx: 192");
            const char *what = want_x && want_y ? "loaded inputs and labels" : want_x ? "loaded inputs only"
                             : want_y ? "loaded labels only" : "loaded nothing";
            char says[160];
            snprintf(says, sizeof says, "%s samples, %s", loaded, what);
            if (!rank_says(out, w, says) || rank_says(out, w, x) != want_x ||
                (rank_says(out, w, y) && !rank_says(out, w, yh)) != want_y ||
                (want_x && !want_y && rank_says(out, w, y)) ||
                (!want_x && !want_y && !rank_says(out, w, "(0 bytes)"))) {
                fail("data parts, %d stages x %d replicas: MPI rank %d (stage %d, replica %d) should say \"%s\", "
                     "%sread the %s images and %sthe %s labels:\n%s", S, R, w, stage, replica, says,
                     want_x ? "" : "not ", pre, want_y ? "" : "not ", pre, out);
                bad = 1;
                break;
            }
        }
        if (bad) break;
    }
    if (!bad)
        printf("ok   data parts, %d stages x %d replicas: stage 0 reads only the images, stage %d only the "
               "labels, middle stages neither; identical to one process\n", S, R, S - 1);
    free(out);
}

/* Without mpirun: the layout logic and the partial loaders. */
static void parts_unit(void)
{
    char path[160];
    snprintf(path, sizeof path, "%s/m.graph", dir);
    pw_graph *g = NULL;
    if (pw_graph_parse_file(path, &g) != PW_OK) {
        fail("parts: %s", pw_last_error());
        return;
    }
    /* want[r]: rank r's sides (zb-v's V puts the first and last chunk on
     * rank 0); eval[r] the same for replica 0's evaluation. */
    struct { int S, R; pw_schedule_kind kind; unsigned want[4], eval[4]; } cases[] = {
        {3, 1, PW_SCHEDULE_1F1B, {PW_DATA_INPUTS, 0, PW_DATA_LABELS}, {PW_DATA_INPUTS, 0, PW_DATA_LABELS}},
        {2, 1, PW_SCHEDULE_ZB_V, {PW_DATA_ALL, 0}, {PW_DATA_ALL, 0}},
        {2, 2, PW_SCHEDULE_INTERLEAVED, {PW_DATA_INPUTS, PW_DATA_LABELS}, {PW_DATA_INPUTS, PW_DATA_LABELS}},
        {1, 2, PW_SCHEDULE_1F1B, {PW_DATA_ALL}, {PW_DATA_ALL}},
    };
    int ok = 1;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (int k = 0; k < cases[c].R; k++)
            for (int r = 0; r < cases[c].S; r++) {
                pw_transport t = {.rank = r, .n_ranks = cases[c].S, .replica = k, .n_replicas = cases[c].R};
                pw_pipeline_config pc = pw_pipeline_defaults();
                pc.graph = g;
                pc.stages = cases[c].S;
                pc.replicas = cases[c].R;
                pc.micro_batches = 4;
                pc.schedule = cases[c].kind;
                pc.transport = &t;
                unsigned got = 99, got_eval = 99;
                if (pw_pipeline_data_parts(&pc, 0, &got) != PW_OK ||
                    pw_pipeline_data_parts(&pc, 1, &got_eval) != PW_OK) {
                    fail("parts: %s", pw_last_error());
                    ok = 0;
                    continue;
                }
                unsigned want_eval = k == 0 ? cases[c].eval[r] : 0;
                if (got != cases[c].want[r] || got_eval != want_eval) {
                    fail("parts: %s, %d stages x %d replicas, replica %d rank %d: parts %u (evaluation %u), "
                         "expected %u (%u)", pw_schedule_kind_name(cases[c].kind), cases[c].S, cases[c].R, k, r,
                         got, got_eval, cases[c].want[r], want_eval);
                    ok = 0;
                }
            }
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = g;
    unsigned all = 0;
    if (pw_pipeline_data_parts(&pc, 0, &all) != PW_OK || all != PW_DATA_ALL) {
        fail("parts: without a transport every side is needed (got %u)", all);
        ok = 0;
    }
    pw_graph_destroy(g);
    /* Synthetic sides are the full set's values; missing sides are refused. */
    pw_dataset *full = NULL, *xs = NULL, *ys = NULL, *none = NULL;
    if (pw_dataset_from_spec_parts("synthetic:64:6:3", 1, NULL, PW_DATA_ALL, &full) != PW_OK ||
        pw_dataset_from_spec_parts("synthetic:64:6:3", 1, NULL, PW_DATA_INPUTS, &xs) != PW_OK ||
        pw_dataset_from_spec_parts("synthetic:64:6:3", 1, NULL, PW_DATA_LABELS, &ys) != PW_OK ||
        pw_dataset_from_spec_parts("synthetic:64:6:3", 1, NULL, 0, &none) != PW_OK) {
        fail("parts: synthetic: %s", pw_last_error());
        ok = 0;
    } else {
        int64_t idx[2] = {5, 60};
        float x[12];
        int32_t y[2];
        if (!xs->x || xs->y || memcmp(xs->x, full->x, sizeof(float) * 64 * 6) || !ys->y || ys->x ||
            memcmp(ys->y, full->y, sizeof(int32_t) * 64) || none->x || none->y || none->n != 64 ||
            none->loaded_bytes != 0 || xs->missing != PW_DATA_LABELS || ys->missing != PW_DATA_INPUTS) {
            fail("parts: partial synthetic data differs from the full set");
            ok = 0;
        } else if (pw_dataset_gather(xs, idx, 2, x, NULL) != PW_OK ||
                   pw_dataset_gather(ys, idx, 2, NULL, y) != PW_OK ||
                   pw_dataset_gather(xs, idx, 2, NULL, y) == PW_OK ||
                   pw_dataset_gather(none, idx, 2, x, NULL) == PW_OK ||
                   !strstr(pw_last_error(), "not loaded in this process")) {
            fail("parts: gather of the loaded sides must work and of a missing side fail (%s)", pw_last_error());
            ok = 0;
        }
    }
    pw_dataset_destroy(full);
    pw_dataset_destroy(xs);
    pw_dataset_destroy(ys);
    pw_dataset_destroy(none);
    if (ok) printf("ok   parts: pw_pipeline_data_parts per rank; partial synthetic data and gather\n");
}

/* Without mpirun: the placement rule on a machine we don't have (2 cores,
 * 4 processes on the host): host rank l takes core l mod 2, never all core
 * 0 (a synthetic topology is never "already bound"). */
static void host_place_unit(void)
{
    hwloc_topology_t topo = NULL;
    if (pw_topology_load_synthetic("pack:1 core:2 pu:1", &topo) != PW_OK) {
        fail("host place: %s", pw_last_error());
        return;
    }
    int ok = 1;
    for (int l = 0; l < 4; l++) {
        pw_transport t = {.local_rank = l, .local_size = 4};
        int slot = -1, n = 0;
        pw_cpu_placement *place = NULL;
        if (pw_transport_host_place(&t, topo, &slot, &n) != 0 || slot != l || n != 4 ||
            pw_cpu_place_ranks(topo, n, &place) != PW_OK || place->core[slot] != l % 2) {
            fail("host place: host rank %d of 4 on 2 cores: slot %d of %d, core %d (expected core %d)", l, slot,
                 n, place ? place->core[slot < 0 ? 0 : slot] : -1, l % 2);
            ok = 0;
        }
        pw_cpu_placement_destroy(place);
    }
    hwloc_topology_destroy(topo);
    if (ok) printf("ok   host place: 4 processes on 2 cores take cores 0 1 0 1\n");
}

/* Pinning under mpirun: host rank l's worker binds to core l mod cores, so
 * the processes of one host spread over its cores; with --bind-to core
 * (when there are cores for it) each process keeps mpirun's core. */
static void binding(int np)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "PW_DEBUG=INFO PW_DEBUG_SUBSYS=TOPO " MPIRUN " -np %d %s/pipeline-run m.graph "
             "--data synthetic:768:24:5 --quiet --seed 5 --stages %d --batch 48 --steps 2", np, bin, np);
    if (run(cmd, 120, &out, NULL) != 0) {
        fail("binding (%s):\n%s", cmd, out);
        free(out);
        return;
    }
    int seen = 0, cores = 0, first_core = -1, spread = 0;
    for (int w = 0; w < np; w++) {
        char pat[96];
        snprintf(pat, sizeof pat, "MPI rank %d (host rank ", w);
        const char *at = strstr(out, pat);
        int host = -1, n = 0, core = -1;
        if (!at || sscanf(at + strlen(pat), "%d of %d): the worker binds to core %d of %d", &host, &n, &core,
                          &cores) != 4)
            continue;
        seen++;
        if (cores > 0 && core != host % cores) {
            fail("binding: MPI rank %d (host rank %d) bound to core %d, expected %d of %d\n%s", w, host, core,
                 host % cores, cores, out);
            free(out);
            return;
        }
        if (first_core < 0) first_core = core;
        else if (core != first_core) spread = 1;
    }
    if (seen != np || (cores >= 2 && !spread)) {
        fail("binding: %d of %d processes logged their core (%d cores), %s\n%s", seen, np, cores,
             spread ? "spread" : "all on one core", out);
        free(out);
        return;
    }
    free(out);
    printf("ok   binding: %d processes on %d cores, host rank l on core l mod %d\n", np, cores, cores);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (np != 2 || online < 2) return;
    snprintf(cmd, sizeof cmd, "PW_DEBUG=INFO PW_DEBUG_SUBSYS=TOPO mpirun --oversubscribe --bind-to core --mca btl "
             "self,vader -np 2 %s/pipeline-run m.graph --data synthetic:768:24:5 --quiet --seed 5 --stages 2 "
             "--batch 48 --steps 2", bin);
    if (run(cmd, 120, &out, NULL) != 0) {
        fail("binding (%s):\n%s", cmd, out);
        free(out);
        return;
    }
    if (!strstr(out, "MPI rank 0 (host rank 0 of 2): already bound to PU") ||
        !strstr(out, "MPI rank 1 (host rank 1 of 2): already bound to PU"))
        fail("binding: with --bind-to core both processes should keep mpirun's binding:\n%s", out);
    else
        printf("ok   binding: under --bind-to core each worker keeps mpirun's core\n");
    free(out);
}

/* Resuming under MPI from a checkpoint saved in one process. */
static void resumed(int np, int S, int R)
{
    char cmd[2048], why[256], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s/pipeline-run m.graph " DATA " --steps 4 --batch 48 --save start.st", bin);
    if (run(cmd, 300, &out, NULL) != 0) {
        fail("%s\n%s", cmd, out);
        free(out);
        return;
    }
    free(out);
    const char *flags = "--optimizer adamw --steps 6 --batch 48 --init-from start.st";
    snprintf(cmd, sizeof cmd, "%s/pipeline-run m.graph " DATA " --stages %d --replicas %d %s --save r1.st", bin,
             S, R, flags);
    int a = run(cmd, 300, &out, NULL);
    if (a != 0) fail("%s\n%s", cmd, out);
    free(out);
    snprintf(cmd, sizeof cmd, MPIRUN " -np %d %s/pipeline-run m.graph " DATA " --stages %d --replicas %d %s "
             "--save r2.st", np, bin, S, R, flags);
    int b = run(cmd, 300, &out, NULL);
    if (b != 0) fail("%s\n%s", cmd, out);
    free(out);
    if (a || b) return;
    char p1[160], p2[160];
    snprintf(p1, sizeof p1, "%s/r1.st", dir);
    snprintf(p2, sizeof p2, "%s/r2.st", dir);
    if (!test_same_tensors(p1, p2, why, sizeof why)) fail("--init-from under MPI differs: %s", why);
    else printf("ok   --init-from under MPI (%d x %d) identical to one process\n", S, R);
}

/* ---- training-state checkpoints (docs/checkpoints.md) ---- */

/* 8 micro-batches of 6 samples per step, whatever the replica count: a
 * resume without --micro-batches takes the checkpoint's micro-batch size. */
#define CKPT_MODEL "m.graph " DATA " --batch 48 --steps 20 --optimizer adamw --lr-schedule cosine --warmup 4 " \
                   "--clip-grad-norm 0.5"

/* The uninterrupted run in one process, on one stage (ckref.st). */
static int ckpt_reference(void)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " CKPT_MODEL " --stages 1 --micro-batches 8 --save ckref.st", bin);
    int st = run(cmd, 300, &out, NULL);
    if (st != 0) fail("checkpoints: the reference run (%s): exit %d\n%s", cmd, st, out);
    free(out);
    return st == 0;
}

static void ckpt_compare(const char *file, const char *what)
{
    char a[160], b[160], why[256];
    snprintf(a, sizeof a, "%s/ckref.st", dir);
    snprintf(b, sizeof b, "%s/%s", dir, file);
    if (!test_same_tensors(a, b, why, sizeof why)) fail("checkpoints: %s: differs from the uninterrupted run: %s", what, why);
    else printf("ok   checkpoints: %s: identical to the uninterrupted run\n", what);
}

/* Written under mpirun -np np (S x R), resumed in one process on 3 stages
 * and under mpirun on another S' x R'. */
static void ckpt_mpi(int np, int S, int R, int S2, int R2)
{
    char cmd[2048], *out = NULL, what[256];
    snprintf(cmd, sizeof cmd, "rm -rf ckm; " MPIRUN " -np %d %s/pipeline-run " CKPT_MODEL " --stages %d --replicas %d "
             "--micro-batches %d --checkpoint-dir ckm --checkpoint-every 6 --keep 0", np, bin, S, R, 8 / R);
    int st = run(cmd, 300, &out, NULL);
    char m[200], shard[200];
    snprintf(m, sizeof m, "%s/ckm/step-00000006/manifest.json", dir);
    snprintf(shard, sizeof shard, "%s/ckm/step-00000006/optimizer-%05d-of-%05d.safetensors", dir, S, S);
    if (st != 0 || access(m, R_OK) != 0 || access(shard, R_OK) != 0) {
        fail("checkpoints: under mpirun -np %d (%s): exit %d, manifest %s, last stage's shard %s\n%s", np, cmd, st,
             access(m, R_OK) ? "missing" : "there", access(shard, R_OK) ? "missing" : "there", out);
        free(out);
        return;
    }
    free(out);
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " CKPT_MODEL " --stages 3 --replicas 1 --resume ckm/step-00000006 "
             "--save ck1.st", bin);
    if ((st = run(cmd, 300, &out, NULL)) != 0) fail("checkpoints: %s: exit %d\n%s", cmd, st, out);
    free(out);
    snprintf(what, sizeof what, "written by %d x %d processes, resumed in one process on 3 stages", S, R);
    if (st == 0) ckpt_compare("ck1.st", what);
    snprintf(cmd, sizeof cmd, MPIRUN " -np %d %s/pipeline-run " CKPT_MODEL " --stages %d --replicas %d --resume ckm "
             "--save ck2.st", S2 * R2, bin, S2, R2);
    if ((st = run(cmd, 300, &out, NULL)) != 0) fail("checkpoints: %s: exit %d\n%s", cmd, st, out);
    free(out);
    snprintf(what, sizeof what, "written by %d x %d processes, resumed under mpirun on %d x %d", S, R, S2, R2);
    if (st == 0) ckpt_compare("ck2.st", what);
}

/* SIGTERM to one process after step 7 (the PW_TEST_FAULT hook): every
 * process stops after step 7, the checkpoint is complete, mpirun exits 75,
 * and the run resumed from it matches. */
static void ckpt_sigterm(int np)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "rm -rf ckt; PW_TEST_FAULT=term:%d:7 " MPIRUN " -np %d %s/pipeline-run " CKPT_MODEL
             " --stages %d --replicas 2 --micro-batches 4 --checkpoint-dir ckt", np - 1, np, bin, np / 2);
    int st = run(cmd, 300, &out, NULL);
    char m[200];
    snprintf(m, sizeof m, "%s/ckt/step-00000007/manifest.json", dir);
    if (st != 75 || access(m, R_OK) != 0 || !strstr(out, "checkpointed at step 7")) {
        fail("checkpoints: SIGTERM under mpirun -np %d: exit %d (want 75), step 7's manifest %s\n%s", np, st,
             access(m, R_OK) ? "missing" : "there", out);
        free(out);
        return;
    }
    free(out);
    printf("ok   checkpoints: SIGTERM to rank %d under mpirun -np %d: a complete checkpoint of step 7, exit 75\n",
           np - 1, np);
    snprintf(cmd, sizeof cmd, MPIRUN " -np %d %s/pipeline-run " CKPT_MODEL " --stages %d --replicas 2 --resume ckt "
             "--save ckt.st", np, bin, np / 2);
    if ((st = run(cmd, 300, &out, NULL)) != 0) fail("checkpoints: %s: exit %d\n%s", cmd, st, out);
    free(out);
    if (st == 0) ckpt_compare("ckt.st", "resumed after SIGTERM under mpirun");
}

/* tools/pipeline-launch asked to stop (SIGTERM to the launcher, as a
 * batch system does): mpirun, signalled, exits 1, but the processes
 * checkpointed, so the launcher exits 75 and names the checkpoint. */
static void ckpt_launch_sigterm(void)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "rm -rf cks; %s/tools/pipeline-launch --np 2 --mpirun \"" MPIRUN "\" -- "
             "%s/pipeline-run m.graph " DATA " --batch 48 --steps 1000000 --stages 2 --checkpoint-dir cks "
             "--checkpoint-every 20 --quiet & p=$!; i=0; while [ ! -e cks/step-00000020/manifest.json ] && "
             "[ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; kill -TERM $p; wait $p", PW_SOURCE_DIR, bin);
    int st = run(cmd, 300, &out, NULL);
    if (st != 75 || !strstr(out, "pipeline-launch: stopped on request; checkpoint cks/step-")) {
        fail("checkpoints: SIGTERM to pipeline-launch: exit %d (want 75)\n%s", st, out);
        free(out);
        return;
    }
    const char *said = strstr(out, "pipeline-launch: stopped");
    printf("ok   checkpoints: SIGTERM to pipeline-launch: exit 75, %.*s\n", (int)strcspn(said, "\n"), said);
    free(out);
}

/* tools/pipeline-launch: rank 3 of 4 (2 stages x 2 replicas) SIGKILLed
 * after step 9; mpirun is re-run with --resume on `restart_np` processes. */
static void ckpt_launch(int restart_np)
{
    char cmd[2048], *out = NULL, what[160];
    snprintf(cmd, sizeof cmd, "rm -rf ckl; PW_TEST_FAULT=kill:3:9 %s/tools/pipeline-launch --np 4 --restart-np %d "
             "--backoff 0.1 --max-restarts 2 --mpirun \"" MPIRUN "\" -- %s/pipeline-run " CKPT_MODEL " --stages 2 "
             "--replicas 2 --micro-batches 4 --checkpoint-dir ckl --checkpoint-every 4 --save ckl%d.st", PW_SOURCE_DIR, restart_np, bin,
             restart_np);
    double took = 0;
    int st = run(cmd, 300, &out, &took);
    const int elastic = restart_np < 4;
    if (st != 0 || !strstr(out, "pipeline-launch: mpirun exited with status") ||
        (elastic && !strstr(out, "resuming on 1 replica where the checkpoint's run had 2"))) {
        fail("checkpoints: pipeline-launch, restart on %d processes (%s): exit %d\n%s", restart_np, cmd, st, out);
        free(out);
        return;
    }
    const char *said = strstr(out, "pipeline-launch: mpirun exited");
    printf("     %.*s\n", (int)strcspn(said, "\n"), said);
    free(out);
    snprintf(what, sizeof what, "a rank SIGKILLed after step 9, restarted by pipeline-launch on %d processes%s (%.1f s)",
             restart_np, elastic ? " (elastic: 1 replica)" : "", took);
    char f[32];
    snprintf(f, sizeof f, "ckl%d.st", restart_np);
    ckpt_compare(f, what);
}

/* A process fails after step 2: every mode must end the run, non-zero,
 * within the bound, with the failing rank named. */
static void failure(int np, const char *mode, const char *must_say, double bound_s)
{
    const int S = np / 2, R = 2, victim = np - 1;
    char cmd[2048], *out = NULL;
    double took = 0;
    snprintf(cmd, sizeof cmd, "PW_TEST_FAULT=%s:%d:2 " MPIRUN " -np %d %s/pipeline-run m.graph " DATA
             " --stages %d --replicas %d --batch 48 --steps 40 --watchdog 3", mode, victim, np, bin, S, R);
    int st = run(cmd, 120, &out, &took);
    char name[160];
    snprintf(name, sizeof name, must_say, victim, victim / S, victim % S);
    if (st == 0) fail("%s: mpirun returned 0 after rank %d failed\n%s", mode, victim, out);
    else if (st == 124) fail("%s: the run hung (killed by the test after %.0f s)\n%s", mode, took, out);
    else if (took > bound_s) fail("%s: the others took %.1f s to stop (bound %.0f s)\n%s", mode, took, bound_s, out);
    else if (!strstr(out, name)) fail("%s: the output does not say \"%s\"\n%s", mode, name, out);
    else printf("ok   %s of rank %d: mpirun exit %d after %.1f s, says \"%s\"\n", mode, victim, st, took, name);
    free(out);
}

/* The watchdog of the hang cases (seconds): short, so the driver stays fast. */
#define HANG_WD 2

/* 1 when out names rank `victim` of an S-stage layout as the stalled process
 * and no other rank as stalled; *why says what is wrong otherwise. */
static int names_stalled(const char *out, int np, int S, int victim, char *why, size_t n)
{
    char name[96];
    snprintf(name, sizeof name, "MPI rank %d (replica %d, stage %d) stalled", victim, victim / S, victim % S);
    if (!strstr(out, name)) {
        snprintf(why, n, "the output does not say \"%s\"", name);
        return 0;
    }
    for (int r = 0; r < np; r++) {
        snprintf(name, sizeof name, "MPI rank %d (replica %d, stage %d) stalled", r, r / S, r % S);
        if (r != victim && strstr(out, name)) {
            snprintf(why, n, "a healthy rank is named: \"%s\"", name);
            return 0;
        }
    }
    return 1;
}

/* Rank `victim` hangs (stop = 0: sleeps for good; 1: SIGSTOPs itself) on
 * reaching `phase` of step `step` (PW_TEST_HANG). 768 samples at batch 48:
 * 16 steps per epoch, so the epoch boundary and its evaluation come after
 * step 16, and --save after step 20. */
static void hang(int np, int victim, const char *phase, int step, int stop)
{
    const int S = np / 2, R = 2;
    char cmd[2048], *out = NULL, why[160];
    double took = 0;
    snprintf(cmd, sizeof cmd, "PW_TEST_HANG=%d:%s:%d%s " MPIRUN " -np %d %s/pipeline-run m.graph " DATA
             " --stages %d --replicas %d --batch 48 --steps 20 --watchdog %d --save hang.safetensors",
             victim, phase, step, stop ? ":stop" : "", np, bin, S, R, HANG_WD);
    int st = run(cmd, 60, &out, &took);
    const char *how = stop ? "SIGSTOP" : "hang";
    if (!strstr(out, "PW_TEST_HANG: MPI rank")) fail("%s at %s: the hook never fired\n%s", how, phase, out);
    else if (st == 0) fail("%s at %s: mpirun returned 0 after rank %d hung\n%s", how, phase, victim, out);
    else if (st == 124) fail("%s at %s: the run hung (killed by the test after %.0f s)\n%s", how, phase, took, out);
    else if (took > HANG_WD + 10) fail("%s at %s: took %.1f s to stop (bound %d s)\n%s", how, phase, took, HANG_WD + 10, out);
    else if (!names_stalled(out, np, S, victim, why, sizeof why)) fail("%s at %s: %s\n%s", how, phase, why, out);
    else printf("ok   %s of rank %d at point '%s' of step %d: mpirun exit %d after %.1f s, names it as stalled\n",
                how, victim, phase, step, st, took);
    free(out);
}

/* Writes dir/signal.sh: a long run under mpirun whose rank `victim` gets
 * `sig` from outside a second into training (its pid comes from the shell
 * mpirun starts for it; exec keeps the pid). */
/* signal.sh: mpirun in the background, then `sig` to the victim `delay`
 * seconds after its pid is known — or, with `ready` (a file the run
 * writes once training has started), that long after the file has content. */
static void write_signal_script(int np, int victim, const char *sig, const char *extra, const char *ready,
                                const char *delay)
{
    char path[128];
    snprintf(path, sizeof path, "%s/signal.sh", dir);
    FILE *f = fopen(path, "w");
    fprintf(f, "rm -f victim.pid %s\n"
            "%s -np %d sh -c 'if [ \"$OMPI_COMM_WORLD_RANK\" = %d ]; then echo $$ > victim.pid; fi; exec %s/pipeline-run "
            "m.graph %s --stages %d --replicas 2 --batch 48 --steps 1000000 --watchdog %d %s' &\n"
            "mp=$!\n"
            "trap 'kill -KILL $mp 2>/dev/null' EXIT\n"
            "trap 'exit 143' INT TERM\n"
            "while [ ! -s %s ]; do sleep 0.05; done\n"
            "sleep %s\n"
            "kill -%s $(cat victim.pid)\n"
            "wait $mp\n", ready ? ready : "", MPIRUN, np, victim, bin, DATA, np / 2, HANG_WD, extra,
            ready ? ready : "victim.pid", delay, sig);
    fclose(f);
}

/* SIGSTOP from outside, at whatever point the run has reached after a
 * second of training. The bound counts from mpirun's start, so it adds the
 * second before the stop. */
static void sigstop_outside(int np, int victim)
{
    const int S = np / 2;
    char *out = NULL, why[160];
    write_signal_script(np, victim, "STOP", "--metrics sig.jsonl", "sig.jsonl", "0.5");
    double took = 0;
    int st = run("sh signal.sh", 60, &out, &took);
    if (st == 0) fail("outside SIGSTOP: mpirun returned 0\n%s", out);
    else if (st == 124) fail("outside SIGSTOP: the run hung (killed by the test after %.0f s)\n%s", took, out);
    else if (took > HANG_WD + 10 + 2) fail("outside SIGSTOP: took %.1f s (bound %d s)\n%s", took, HANG_WD + 12, out);
    else if (!names_stalled(out, np, S, victim, why, sizeof why)) fail("outside SIGSTOP: %s\n%s", why, out);
    else printf("ok   SIGSTOP of rank %d from outside, mid-run: mpirun exit %d after %.1f s (1 s before the stop), "
                "names it\n", victim, st, took);
    free(out);
}

/* SIGSTOP during start-up (MPI_Init, before the heartbeats): every other
 * process gives up after the start-up limit (the watchdog's time, at least
 * 10 s), says so naming itself, and the run ends non-zero; the victim is
 * the one rank that does not report. */
static void sigstop_startup(int np, int victim)
{
    char *out = NULL;
    write_signal_script(np, victim, "STOP", "", NULL, "0");
    double took = 0;
    const double limit = HANG_WD > 10 ? HANG_WD : 10;
    int st = run("sh signal.sh", 90, &out, &took);
    char victim_says[64];
    snprintf(victim_says, sizeof victim_says, "MPI rank %d (host", victim);
    if (st == 0 || st == 124) fail("start-up SIGSTOP: exit %d after %.0f s\n%s", st, took, out);
    else if (took > limit + 10 + 2) fail("start-up SIGSTOP: took %.1f s (bound %.0f s)\n%s", took, limit + 12, out);
    else if (strstr(out, "MPI start-up did not complete")) {
        /* mpirun sends SIGCONT before it kills: the stopped rank may then
         * wake and report, but only as the one that was not running. */
        const char *v = strstr(out, victim_says);
        const char *eol = v ? strchr(v, '\n') : NULL;
        const char *own = v ? strstr(v, "itself was not running") : NULL;
        if (v && !(own && (!eol || own < eol)))
            fail("start-up SIGSTOP: the stopped rank %d reported another's stall\n%s", victim, out);
        else printf("ok   SIGSTOP of rank %d in MPI start-up: mpirun exit %d after %.1f s, the others report the "
                    "start-up that did not complete\n", victim, st, took);
    } else if (strstr(out, "stalled")) { /* the stop landed after start-up: the watchdog's case */
        printf("ok   SIGSTOP of rank %d right after launch landed after start-up: exit %d after %.1f s, the "
               "watchdog named a stall\n", victim, st, took);
    } else {
        fail("start-up SIGSTOP: no start-up message\n%s", out);
    }
    free(out);
}

/* SIGTERM to one process mid-run: every process stops after the same step,
 * writes its trace, and the run ends non-zero with no temp file left. */
static void sigterm_one(int np, int victim)
{
    char *out = NULL, cmd[256];
    snprintf(cmd, sizeof cmd, "rm -f sig.*; sh signal.sh; st=$?; ls; exit $st");
    write_signal_script(np, victim, "TERM", "--trace sig.json --metrics sig.jsonl", "sig.jsonl", "0.5");
    double took = 0;
    int st = run(cmd, 60, &out, &took), traces = 0;
    for (int r = 0; r < np; r++) {
        char name[32];
        snprintf(name, sizeof name, "sig.rank%d.json", r);
        traces += strstr(out, name) != NULL;
    }
    if (st == 0 || st == 124) fail("SIGTERM to rank %d: exit %d\n%s", victim, st, out);
    else if (!strstr(out, "pipeline-run: interrupted by SIGTERM at step ")) fail("SIGTERM: no message\n%s", out);
    else if (traces != np) fail("SIGTERM: %d of %d traces written\n%s", traces, np, out);
    else if (strstr(out, ".tmp.")) fail("SIGTERM: a temp file is left\n%s", out);
    else printf("ok   SIGTERM to rank %d mid-run: all %d processes stop at one step, write their traces; exit %d "
                "after %.1f s\n", victim, np, st, took);
    free(out);
}

/* The analysis `pipe-trace --json ARGS` prints (NULL with a failure). */
static json_t *pipe_trace_json(const char *args, const char *what)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s/pipe-trace --json %s 2>/dev/null", bin, args);
    int st = run(cmd, 60, &out, NULL);
    json_error_t jerr;
    json_t *j = st == 0 ? json_loads(out, 0, &jerr) : NULL;
    if (!j) fail("%s: `%s` exit %d\n%.2000s", what, cmd, st, out);
    free(out);
    return j;
}

/* The figures that must not depend on one process or many: the layout, the
 * ranks listed and each rank's forward, backward and weight counts. */
static int same_structure(json_t *one, json_t *many, char *why, size_t n)
{
    static const char *const meta[] = {"graph", "schedule", "ranks", "stages", "replicas", "micro_batches", "steps"};
    for (size_t i = 0; i < sizeof meta / sizeof *meta; i++)
        if (!json_equal(json_object_get(json_object_get(one, "meta"), meta[i]),
                        json_object_get(json_object_get(many, "meta"), meta[i])))
            return snprintf(why, n, "meta.%s differs", meta[i]), 0;
    if (!json_equal(json_object_get(one, "ranks_n"), json_object_get(many, "ranks_n")) ||
        !json_equal(json_object_get(one, "steps_total"), json_object_get(many, "steps_total")))
        return snprintf(why, n, "rank or step counts differ"), 0;
    json_t *ra = json_object_get(one, "ranks"), *rb = json_object_get(many, "ranks");
    if (json_array_size(ra) != json_array_size(rb) || json_array_size(ra) == 0)
        return snprintf(why, n, "%zu ranks listed, %zu in one process", json_array_size(rb), json_array_size(ra)), 0;
    for (size_t r = 0; r < json_array_size(ra); r++) {
        json_t *a = json_array_get(ra, r), *b = json_array_get(rb, r);
        if (!json_equal(json_object_get(a, "label"), json_object_get(b, "label")))
            return snprintf(why, n, "rank %zu is labelled differently", r), 0;
        static const char *const counts[] = {"n_F", "n_B", "n_W"};
        for (int c = 0; c < 3; c++) {
            json_t *x = json_object_get(json_object_get(a, "total"), counts[c]);
            json_t *y = json_object_get(json_object_get(b, "total"), counts[c]);
            if (!json_equal(x, y))
                return snprintf(why, n, "rank %zu: %s %lld, %lld in one process", r, counts[c],
                                (long long)json_integer_value(y), (long long)json_integer_value(x)), 0;
        }
        if (json_integer_value(json_object_get(json_object_get(b, "total"), "n_F")) <= 0)
            return snprintf(why, n, "rank %zu has no forwards", r), 0;
    }
    return 1;
}

/* Each process's trace: its own clock block, one run. */
static int clocks_ok(const char *prefix, int np, char *why, size_t n)
{
    char run_id[40] = "";
    for (int w = 0; w < np; w++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s.rank%d.json", dir, prefix, w);
        pw_trace_reader *rd = NULL;
        pw_trace_record ev;
        int more = 0;
        if (pw_trace_reader_open(path, &rd) != PW_OK || pw_trace_reader_next(rd, &ev, &more) != PW_OK) {
            snprintf(why, n, "%.200s", pw_last_error());
            pw_trace_reader_close(rd);
            return 0;
        }
        const pw_trace_info in = *pw_trace_reader_info(rd);
        pw_trace_reader_close(rd);
        const int64_t err = in.clock_measured_ns < 0 ? -in.clock_measured_ns : in.clock_measured_ns;
        if (!in.has_clock || in.world_rank != w || in.world_size != np || !in.run_id[0])
            return snprintf(why, n, "%.120s: no clock block, or not MPI rank %d of %d", path, w, np), 0;
        if (w == 0) snprintf(run_id, sizeof run_id, "%s", in.run_id);
        else if (strcmp(run_id, in.run_id)) return snprintf(why, n, "%.120s: run %.32s, rank 0's is %.32s", path, in.run_id, run_id), 0;
        /* One host, one CLOCK_MONOTONIC: the true offset is 0, so the
         * ping-pong's estimate must lie within half its round trip. */
        if (!in.clock_same_host || in.clock_offset_ns != 0 || (w > 0 && (in.clock_rtt_ns <= 0 || err > in.clock_rtt_ns / 2 + 1)))
            return snprintf(why, n, "%.120s: offset %lld ns, estimate %lld ns, round trip %lld ns", path,
                            (long long)in.clock_offset_ns, (long long)in.clock_measured_ns, (long long)in.clock_rtt_ns), 0;
    }
    return 1;
}

/* 4 processes write their traces; pipe-trace reads them as one run, the
 * same run in one process gives the same structure. */
static void traces(int np, int S, int R)
{
    char cmd[2048], why[256], args[512], *out = NULL;
    snprintf(args, sizeof args, "m.graph " DATA " --stages %d --replicas %d --batch 48 --steps 6 --micro-batches 4",
             S, R);
    snprintf(cmd, sizeof cmd, "rm -f tr.*; " MPIRUN " -np %d %s/pipeline-run %s --trace tr.json && %s/pipeline-run %s "
             "--trace tr_one.json", np, bin, args, bin, args);
    if (run(cmd, 300, &out, NULL) != 0) {
        fail("traces (%s):\n%s", cmd, out);
        free(out);
        return;
    }
    free(out);
    if (!clocks_ok("tr", np, why, sizeof why)) {
        fail("traces: %s", why);
        return;
    }
    char files[1024] = "", merged_args[1200];
    for (int w = 0; w < np; w++) {
        size_t len = strlen(files);
        snprintf(files + len, sizeof files - len, " %s/tr.rank%d.json", dir, w);
    }
    snprintf(args, sizeof args, "%s/tr_one.json", dir);
    json_t *one = pipe_trace_json(args, "traces: one process"), *many = pipe_trace_json(files, "traces: per-rank files");
    snprintf(cmd, sizeof cmd, "%s/pipe-trace --merge %s/tr_merged.json%s", bin, dir, files);
    int merged_ok = run(cmd, 60, &out, NULL) == 0 && strstr(out, "share MPI rank 0's host");
    if (!merged_ok) fail("traces: `%s`:\n%s", cmd, out);
    free(out);
    snprintf(merged_args, sizeof merged_args, "%s/tr_merged.json", dir);
    json_t *merged = merged_ok ? pipe_trace_json(merged_args, "traces: the --merge output") : NULL;
    if (one && many && merged) {
        if (!same_structure(one, many, why, sizeof why))
            fail("traces: the %d per-rank files analysed as one run differ from one process: %s", np, why);
        else if (!json_equal(json_object_get(many, "total"), json_object_get(merged, "total")) ||
                 !json_equal(json_object_get(many, "causes"), json_object_get(merged, "causes")))
            fail("traces: pipe-trace FILES and pipe-trace on their --merge output differ");
        else
            printf("ok   traces: %d processes (%d stages x %d replica%s) write their own traces, with their clocks; "
                   "pipe-trace merges them into the run one process reports (%zu ranks)\n", np, S, R, R > 1 ? "s" : "",
                   json_array_size(json_object_get(many, "ranks")));
    }
    json_decref(one);
    json_decref(many);
    json_decref(merged);
}

/* `mpirun --hostfile`: Open MPI 4.1 refuses a host named twice with slots=N,
 * so localhost is listed once per slot (on a cluster: "node1 slots=2"). */
static void hostfile(int np, int S, int R)
{
    char path[160], cmd[2048], *out = NULL;
    snprintf(path, sizeof path, "%s/hosts", dir);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < np; i++) fputs("localhost\n", f);
    fclose(f);
    snprintf(cmd, sizeof cmd, "rm -f hf.*; mpirun --hostfile hosts --bind-to none --mca btl self,vader -np %d "
             "%s/pipeline-run m.graph --data synthetic:768:24:5 --no-pin --seed 5 --stages %d --replicas %d --batch 48 "
             "--steps 8 --micro-batches 4 --trace hf.json && %s/pipe-trace --color never hf.rank*.json", np, bin, S, R, bin);
    double took = 0;
    int st = run(cmd, 300, &out, &took);
    char last[32];
    snprintf(last, sizeof last, "rank %d ", np - 1);
    if (st != 0 || !strstr(out, "done: 8 steps") || !strstr(out, "pipe-trace: hf.rank*.json") || !strstr(out, last) ||
        !strstr(out, "Bubble: measured"))
        fail("hostfile (%s): exit %d\n%s", cmd, st, out);
    else
        printf("ok   hostfile: mpirun --hostfile (localhost x %d) trains %d stages x %d replica%s; its traces "
               "analyse as one run (%.1f s)\n", np, S, R, R > 1 ? "s" : "", took);
    free(out);
}

/* Lines of dir/name holding `needle`; -1 when it cannot be read. */
static int count_lines(const char *name, const char *needle)
{
    char path[256], line[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int n = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, needle)) n++;
    fclose(f);
    return n;
}

/* Re-partitioning under mpirun (stages/train/rebalance.h): the run with
 * forced moves (`moves`, --rebalance-at's spec; `env` may inject a fault or
 * a slowdown, `more` adds flags to the MPI run only) ends with the bytes of
 * the run in one process that never moved, and the metrics log records
 * `want_moves` moves. */
static void rebalanced(const char *model, int np, int S, int R, const char *extra, const char *moves,
                       const char *env, const char *more, int want_moves, const char *tag)
{
    char args[1400], one[1024], what[1400], mpi_extra[512];
    snprintf(one, sizeof one, "%s --stages %d --replicas %d %s", model, S, R, extra);
    snprintf(args, sizeof args, "%s %s%s --metrics reb_%s.jsonl", one, moves ? "--rebalance-at " : "",
             moves ? moves : "", tag);
    snprintf(mpi_extra, sizeof mpi_extra, "%s", more ? more : "");
    snprintf(what, sizeof what, "rebalance %.*s: %d stages x %d replicas %s, moves %s%s%s", (int)strcspn(model, " "),
             model, S, R, extra, moves ? moves : "(auto)", env ? ", " : "", env ? env : "");
    const int before = failures;
    if (env) {
        /* Both runs see it (PW_TEST_SLOW and PW_TEST_REBALANCE_FAIL change no bit). */
        const char *eq = strchr(env, '=');
        char name[64];
        snprintf(name, sizeof name, "%.*s", (int)(eq - env), env);
        setenv(name, eq + 1, 1);
        identical_runs(np, args, mpi_extra, one, tag, what);
        unsetenv(name);
    } else {
        identical_runs(np, args, mpi_extra, one, tag, what);
    }
    if (failures != before) return;
    char log[64];
    snprintf(log, sizeof log, "reb_%s.jsonl", tag);
    const int n = count_lines(log, "\"type\":\"rebalance\"");
    if (want_moves >= 0 ? n != want_moves : n < 1)
        fail("%s: the metrics log records %d moves, want %s%d", what, n, want_moves >= 0 ? "" : "at least ",
             want_moves >= 0 ? want_moves : 1);
    else
        printf("ok   %s: %d move%s in the metrics log\n", what, n, n == 1 ? "" : "s");
}

/* A process that hangs in the middle of a move: the others end with an
 * error naming it, within the watchdog's bound. */
static void rebalance_hang(int np, int victim)
{
    const int S = np;
    char cmd[2048], *out = NULL, why[160];
    double took = 0;
    snprintf(cmd, sizeof cmd, "PW_TEST_HANG=%d:rebalance:3 " MPIRUN " -np %d %s/pipeline-run m.graph " DATA
             " --stages %d --batch 48 --steps 10 --watchdog %d --rebalance-at 3:1,3,6", victim, np, bin, S, HANG_WD);
    int st = run(cmd, 60, &out, &took);
    if (!strstr(out, "PW_TEST_HANG: MPI rank")) fail("hang in a move: the hook never fired\n%s", out);
    else if (st == 0 || st == 124) fail("hang in a move: mpirun exit %d after %.0f s\n%s", st, took, out);
    else if (took > HANG_WD + 10) fail("hang in a move: took %.1f s to stop\n%s", took, out);
    else if (!names_stalled(out, np, S, victim, why, sizeof why)) fail("hang in a move: %s\n%s", why, out);
    else printf("ok   rank %d hangs in a move: mpirun exit %d after %.1f s, names it as stalled\n", victim, st, took);
    free(out);
}

/* A graph that reads its input again near the end (r = add(h2, x)); the
 * cut marker keeps that node on stage 0 at first, so stage 1's process
 * loads only the labels. */
static void write_skip(void)
{
    char path[128];
    snprintf(path, sizeof path, "%s/skip.graph", dir);
    FILE *f = fopen(path, "w");
    fputs("graph mpi_skip\n"
          "input x : f32[24]\n"
          "label y : i32[]\n"
          "h1 = linear(x, out=24) as fc1\n"
          "a1 = relu(h1)\n"
          "h2 = linear(a1, out=24) as fc2\n"
          "r = add(h2, x)\n"
          "cut\n"
          "logits = linear(r, out=5) as head\n"
          "loss = softmax_cross_entropy(logits, y)\n", f);
    fclose(f);
}

static void rebalance_cases(int np)
{
    write_skip();
    const char *mlp = "m.graph " DATA " --batch 48 --steps 12";
    const char *gpt = "tied.graph --data text:text.txt --no-pin --quiet --seed 5 --shuffle --batch 16 --steps 6";
    if (np == 2) {
        rebalanced(mlp, 2, 2, 1, "--micro-batches 4 --optimizer adamw", "3:3/6:7", NULL, NULL, 2, "rb2");
        rebalanced(gpt, 2, 2, 1, "--micro-batches 4 --schedule zb-v --optimizer adamw --clip-grad-norm 0.05",
                   "2:4,14,22/4:9,12,25", NULL, NULL, 2, "rb2t");
        /* Stage 1 would read the inputs its process never loaded: refused, the run goes on. */
        rebalanced("skip.graph " DATA " --batch 48 --steps 8", 2, 2, 1, "--micro-batches 4", "3:3/5:2", NULL, NULL, 0,
                   "rbskip");
        return;
    }
    rebalanced(mlp, 4, 4, 1, "--micro-batches 8 --optimizer adamw", "3:1,3,6/6:4,6,8/9:2,5,7", NULL, NULL, 3, "rb4");
    rebalanced(mlp, 4, 2, 2, "--micro-batches 4 --schedule zb-h1 --optimizer adamw --buckets 2", "4:2/8:6", NULL,
               NULL, 2, "rb4zb");
    rebalanced(mlp, 4, 2, 2, "--micro-batches 4 --schedule interleaved --optimizer adamw --clip-grad-norm 0.5",
               "4:2,5,8/8:3,6,7", NULL, NULL, 2, "rb4il");
    rebalanced(mlp, 4, 4, 1, "--micro-batches 8 --schedule gpipe --optimizer adamw", "5:2,4,6/9:3,6,8", NULL, NULL,
               2, "rb4gp");
    rebalanced(mlp, 4, 4, 1, "--micro-batches 8 --schedule zb-h2 --optimizer adamw", "5:2,4,6/9:3,6,8", NULL, NULL,
               2, "rb4h2");
    rebalanced(gpt, 4, 4, 1, "--micro-batches 4 --optimizer adamw --clip-grad-norm 0.05", "2:5,12,20/4:3,18,25",
               NULL, NULL, 2, "rb4t");
    rebalanced(gpt, 4, 2, 2, "--micro-batches 2 --schedule zb-v --clip-grad-norm 0.05", "2:4,14,22/4:9,12,25", NULL,
               NULL, 2, "rb4tzbv");
    /* --compress with error feedback: each replica's state (per parameter
     * and use) moves with the cuts, across processes where a layer does. */
    rebalanced(mlp, 4, 2, 2, "--micro-batches 4 --optimizer adamw --compress topk:0.1", "4:2/8:6", NULL, NULL, 2,
               "rb4ztopk");
    rebalanced(gpt, 4, 2, 2, "--micro-batches 2 --compress powersgd:2 --clip-grad-norm 0.05", "2:9/4:20", NULL,
               NULL, 2, "rb4zpsgd");
    /* A build that fails on one process: nobody moves, the run goes on. */
    rebalanced(mlp, 4, 4, 1, "--micro-batches 8 --optimizer adamw", "3:1,3,6/6:4,6,8", "PW_TEST_REBALANCE_FAIL=2:3",
               NULL, 1, "rb4fail");
    /* Automatic: rank 1 twice as slow; the cuts move, the bits stay. */
    rebalanced("m.graph " DATA " --batch 48 --steps 40", 4, 4, 1, "--micro-batches 8 --optimizer adamw", NULL,
               "PW_TEST_SLOW=1:3", "--rebalance every:6", -1, "rb4auto");
    rebalance_hang(4, 2);
}

/* --sync ps (docs/distributed.md, "Parameter server"): S x R workers and K
 * servers, the last K world ranks. Synchronous mode gives the bytes of the
 * tree all-reduce, which gives those of one process (checked against one
 * process here); a stopped server is named by the watchdog; the flags it
 * does not support yet are refused. */
static void ps_identical(int S, int R, int K, const char *extra, const char *tag)
{
    char args[1100], one[1024], what[1200];
    const char *model = "m.graph " DATA " --batch 48 --steps 12";
    snprintf(one, sizeof one, "%s --stages %d --replicas %d %s", model, S, R, extra);
    snprintf(args, sizeof args, "%s --sync ps --servers %d", one, K);
    snprintf(what, sizeof what, "--sync ps: %d stages x %d replicas + %d server%s %s", S, R, K, K > 1 ? "s" : "",
             extra);
    identical_runs(S * R + K, args, "", one, tag, what);
}

/* The grad_norm values of a metrics log's step lines, in order, into
 * out[0 .. max); returns how many (-1: no file). */
static int ps_norms(const char *name, char out[][40], int max)
{
    char path[256], line[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int n = 0;
    while (fgets(line, sizeof line, f) && n < max) {
        const char *a = strstr(line, "\"type\":\"step\"") ? strstr(line, "\"grad_norm\":") : NULL;
        if (!a) continue;
        a += strlen("\"grad_norm\":");
        size_t k = strcspn(a, ",}");
        snprintf(out[n++], 40, "%.*s", (int)(k < 39 ? k : 39), a);
    }
    fclose(f);
    return n;
}

/* --sync ps against the all-reduce run in one process with the same flags
 * (`model` a graph and its data; `extra` e.g. --compress): the bytes of the
 * --save checkpoint, and with --clip-grad-norm the gradient norm the
 * metrics log records each step (the servers send it back with the
 * parameters), the same doubles as the all-reduce run's. */
static void ps_identical_model(const char *model, int S, int R, int K, const char *extra, const char *tag)
{
    char args[1400], one[1200], what[1400];
    const int clip = strstr(extra, "--clip-grad-norm") != NULL;
    snprintf(one, sizeof one, "%s --stages %d --replicas %d %s%s%s", model, S, R, extra,
             clip ? " --metrics norm_one_" : "", clip ? tag : "");
    if (clip) strncat(one, ".jsonl", sizeof one - strlen(one) - 1);
    snprintf(args, sizeof args, "%s --stages %d --replicas %d %s --sync ps --servers %d%s%s%s", model, S, R, extra, K,
             clip ? " --metrics norm_ps_" : "", clip ? tag : "", clip ? ".jsonl" : "");
    snprintf(what, sizeof what, "--sync ps: %s, %d stages x %d replicas + %d server%s %s", model, S, R, K,
             K > 1 ? "s" : "", extra);
    const int before = failures;
    identical_runs(S * R + K, args, "", one, tag, what);
    if (!clip || failures != before) return;
    char a[64][40], b[64][40], na[64], nb[64];
    snprintf(na, sizeof na, "norm_one_%s.jsonl", tag);
    snprintf(nb, sizeof nb, "norm_ps_%s.jsonl", tag);
    const int n = ps_norms(na, a, 64), m = ps_norms(nb, b, 64);
    int same = n > 0 && n == m;
    for (int i = 0; same && i < n; i++) same = !strcmp(a[i], b[i]) && strcmp(b[i], "-1") && strcmp(b[i], "null");
    if (!same)
        fail("%s: the metrics log's grad_norm differs from the all-reduce run's (%d and %d steps; first %s / %s)",
             what, n, m, n > 0 ? a[0] : "-", m > 0 ? b[0] : "-");
    else printf("ok   %s: the metrics log's grad_norm of %d steps is the all-reduce run's (%s ...)\n", what, n, b[0]);
}

/* The tied GPT (write_tied: wte.weight on the first chunk and in the head on
 * the last, or twice in one program on one stage). */
#define PS_TIED "tied.graph --data text:text.txt --no-pin --quiet --seed 5 --shuffle --batch 16 --steps 6"

/* sig: "STOP" (the watchdog names the victim as stalled) or "KILL" (mpirun
 * names the process that died); victim 2 is the server of 1 stage x 2
 * replicas, 0 and 1 the workers; extra: more flags (--compress powersgd:
 * the other worker waits for the server's reply, the server for the
 * victim's factors). */
static void ps_stopped(const char *sig, int victim, const char *extra)
{
    char path[128], who[64], *out = NULL;
    const int np = 3;
    if (victim == 2) snprintf(who, sizeof who, "MPI rank 2 (server 0)");
    else snprintf(who, sizeof who, "MPI rank %d (replica %d, stage 0)", victim, victim);
    snprintf(path, sizeof path, "%s/signal.sh", dir);
    FILE *f = fopen(path, "w");
    fprintf(f, "rm -f victim.pid sig.jsonl\n"
            "%s -np %d sh -c 'if [ \"$OMPI_COMM_WORLD_RANK\" = %d ]; then echo $$ > victim.pid; fi; exec %s/pipeline-run "
            "m.graph %s --stages 1 --replicas 2 --sync ps %s --batch 48 --steps 1000000 --watchdog %d "
            "--metrics sig.jsonl' &\n"
            "mp=$!\n"
            "trap 'kill -KILL $mp 2>/dev/null' EXIT\n"
            "trap 'exit 143' INT TERM\n"
            "while [ ! -s sig.jsonl ]; do sleep 0.05; done\n"
            "sleep 0.5\n"
            "kill -%s $(cat victim.pid)\n"
            "wait $mp\n", MPIRUN, np, victim, bin, DATA, extra, HANG_WD, sig);
    fclose(f);
    double took = 0;
    int st = run("sh signal.sh", 60, &out, &took);
    const int kill9 = !strcmp(sig, "KILL");
    char rank[16], stalled[96];
    snprintf(rank, sizeof rank, "rank %d", victim);
    snprintf(stalled, sizeof stalled, "%s stalled", who);
    int other = 0; /* a healthy process named as stalled */
    for (int r = 0; r < np && !kill9; r++) {
        char o[96];
        if (r == victim) continue;
        if (r == 2) snprintf(o, sizeof o, "MPI rank 2 (server 0) stalled");
        else snprintf(o, sizeof o, "MPI rank %d (replica %d, stage 0) stalled", r, r);
        other |= strstr(out, o) != NULL;
    }
    if (st == 0 || st == 124) fail("--sync ps %s, SIG%s of %s: exit %d after %.0f s\n%s", extra, sig, who, st, took, out);
    else if (took > HANG_WD + 12) fail("--sync ps %s, SIG%s of %s: took %.1f s (bound %d s)\n%s", extra, sig, who, took,
                                       HANG_WD + 12, out);
    else if (kill9 && !strstr(out, rank)) fail("--sync ps %s: the killed %s is not named\n%s", extra, who, out);
    else if (!kill9 && !strstr(out, stalled)) fail("--sync ps %s: the stopped %s is not named\n%s", extra, who, out);
    else if (other) fail("--sync ps %s: a healthy process is named as stalled\n%s", extra, out);
    else printf("ok   --sync ps %s: SIG%s of %s mid-run: mpirun exit %d after %.1f s, names it\n", extra, sig, who, st,
                took);
    free(out);
}

static void ps_refused(void)
{
    static const struct {
        const char *args, *says;
    } cases[] = {
        {"--servers 2", "--servers, --staleness and --staleness-lr apply to --sync ps"},
        {"--staleness-lr inverse", "--servers, --staleness and --staleness-lr apply to --sync ps"},
        {"--sync ps --staleness 1 --staleness-lr half", "--staleness-lr: 'half' is not inverse or none"},
        {"--sync ps --staleness 1 --compress powersgd:2", "with --compress powersgd takes --staleness 0 only"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char cmd[1024], *out = NULL;
        double took;
        snprintf(cmd, sizeof cmd, MPIRUN " -np 3 %s/pipeline-run m.graph " DATA " --stages 1 --replicas 2 --batch 48 "
                 "--steps 2 %s", bin, cases[i].args);
        int st = run(cmd, 60, &out, &took);
        if (st == 0 || !strstr(out, cases[i].says)) fail("%s: exit %d, expected \"%s\"\n%s", cmd, st, cases[i].says, out);
        else printf("ok   %s refused: \"%s\"\n", cases[i].args, cases[i].says);
        free(out);
    }
    /* A process count that does not fit S x R + K says how many it needs. */
    char cmd[1024], *out = NULL;
    double took;
    snprintf(cmd, sizeof cmd, MPIRUN " -np 4 %s/pipeline-run m.graph " DATA " --stages 1 --replicas 2 --batch 48 "
             "--steps 2 --sync ps --servers 1", bin);
    int st = run(cmd, 60, &out, &took);
    if (st == 0 || !strstr(out, "needs 3")) fail("%s: exit %d, expected \"needs 3\"\n%s", cmd, st, out);
    else printf("ok   --sync ps with a process too many: refused, naming the count\n");
    free(out);
}

/* Server 0's closing line of a stale run: its updates, the gradients it
 * applied (all staleness counts) and the largest staleness, and the mean
 * learning-rate factor; updates -1 or factor < 0 when the line is missing. */
static void server_taus(const char *out, long long *updates, long long *counted, int *tau_max, double *factor)
{
    *updates = -1, *counted = 0, *tau_max = 0, *factor = -1.0;
    const char *line = strstr(out, "parameter server 0: ");
    if (!line || sscanf(line, "parameter server 0: %lld updates", updates) != 1) return;
    const char *a = strstr(line, "tau:"), *e = strstr(line, "; mean learning-rate factor ");
    for (const char *q = a ? a + 4 : NULL; q && e && q < e;) {
        int tau, n = 0;
        long long c;
        if (sscanf(q, " %d: %lld%n", &tau, &c, &n) != 2) break; /* "tau: 1: 243, 2: 213" */
        if (q[n] == ',') n++;
        *counted += c;
        if (tau > *tau_max) *tau_max = tau;
        q += n;
    }
    if (e) *factor = atof(e + strlen("; mean learning-rate factor "));
}

/* --staleness S: no replica ever runs more than S steps ahead; checked from
 * the trace (each PS_PULL event: step t took version mb >= t - S), with one
 * replica slowed so that the other does run ahead (some pull older than
 * the step). The run ends with the servers' final parameters: --save of a
 * stale run equals nothing in particular, but every process agrees.
 * The server's own count of the staleness tau of each gradient it applied
 * (the version travels with the gradient) agrees with the traces: 2 x its
 * updates in all, the largest tau = the worst pull + 1 (pulls before the
 * last step: that one's version computes no gradient), and --staleness-lr
 * `lr` (NULL: the default, inverse) scales the learning rate by 1 with
 * none, by [1 / (S + 1), 1) with inverse once a gradient was stale. */
static void ps_staleness(int S, const char *lr)
{
    char cmd[2048], *out = NULL, lrflag[64] = "";
    double took;
    if (lr) snprintf(lrflag, sizeof lrflag, " --staleness-lr %s", lr);
    snprintf(cmd, sizeof cmd, "rm -f st.rank*.json; PW_TEST_SLOW=w1:4 " MPIRUN " -np 3 %s/pipeline-run m.graph " DATA
             " --stages 1 --replicas 2 --batch 48 --steps 24 --sync ps --staleness %d%s --trace st.json", bin, S,
             lrflag);
    int st = run(cmd, 120, &out, &took);
    if (st != 0) {
        fail("--staleness %d%s: exit %d\n%s", S, lrflag, st, out);
        free(out);
        return;
    }
    long long updates, counted;
    int tau_max;
    double factor;
    server_taus(out, &updates, &counted, &tau_max, &factor);
    if (updates <= 0 || updates % 24 || factor < 0) {
        fail("--staleness %d%s: no staleness line from the server\n%s", S, lrflag, out);
        free(out);
        return;
    }
    free(out);
    int events = 0, worst = -1, ahead = 0, worst_pushed = -1;
    for (int w = 0; w < 2; w++) {
        char path[256];
        snprintf(path, sizeof path, "%s/st.rank%d.json", dir, w);
        FILE *f = fopen(path, "r");
        if (!f) {
            fail("--staleness %d: no trace %s", S, path);
            return;
        }
        char line[1024];
        while (fgets(line, sizeof line, f)) {
            if (!strstr(line, "\"PS_PULL\"")) continue;
            const char *a = strstr(line, "\"step\": "), *b = strstr(line, "\"mb\": ");
            if (!a || !b) continue;
            const int step = atoi(a + 8), version = atoi(b + 6);
            events++;
            if (step - version > worst) worst = step - version;
            if (step < 24 && step - version > worst_pushed) worst_pushed = step - version;
            if (step - version > 0) ahead++;
        }
        fclose(f);
    }
    if (events < 2 * 24) fail("--staleness %d: %d PS_PULL events in the traces, expected 48", S, events);
    else if (worst > S) fail("--staleness %d: a step used a version %d steps old", S, worst);
    else if (ahead == 0) fail("--staleness %d: no replica ran ahead with replica 1 4x slower", S);
    else if (counted != 2 * updates || tau_max != worst_pushed + 1 || tau_max > S + 1)
        fail("--staleness %d%s: the server applied %lld gradients for %lld updates (2 replicas), the stalest at tau "
             "%d; the traces' worst pull before the last step was %d steps behind", S, lrflag, counted, updates,
             tau_max, worst_pushed);
    else if (!lr || !strcmp(lr, "inverse") ? !(factor < 1.0 && factor >= 1.0 / (S + 1) - 5e-4) : factor != 1.0)
        fail("--staleness %d%s: mean learning-rate factor %.3f", S, lrflag, factor);
    else printf("ok   --staleness %d%s: %d pulls, at most %d steps stale (%d stale pulls; replica 1 4x slower); the "
                "server's tau at most %d, mean lr factor %.3f\n", S, lrflag, events, worst, ahead, tau_max, factor);
}

/* The tied GPT stale (2 stages x 2 replicas + 1 server, stage 1's process
 * of replica 0 slowed): every use of the tied weight carries its own
 * version, so the server counts U x R gradients an update of it (one tied
 * parameter of 2 uses: 2 more per step than 2 per update), each within
 * the bound. */
static void ps_staleness_tied(void)
{
    char cmd[2048], *out = NULL;
    double took;
    const int steps = 12;
    snprintf(cmd, sizeof cmd, "PW_TEST_SLOW=w1:4 " MPIRUN " -np 5 %s/pipeline-run " PS_TIED " --stages 2 --replicas 2 "
             "--micro-batches 2 --sync ps --staleness 2 --steps %d", bin, steps);
    int st = run(cmd, 120, &out, &took);
    long long updates, counted;
    int tau_max;
    double factor;
    server_taus(out ? out : "", &updates, &counted, &tau_max, &factor);
    if (st != 0) fail("tied GPT --staleness 2: exit %d\n%s", st, out);
    else if (updates <= 0 || counted != 2 * updates + 2 * steps || tau_max < 1 || tau_max > 3)
        fail("tied GPT --staleness 2: the server applied %lld gradients for %lld updates over %d steps (expected "
             "2 per update and 2 more per step for the tied weight's second use), the stalest at tau %d\n%s", counted,
             updates, steps, tau_max, out);
    else printf("ok   --sync ps: tied GPT --staleness 2: %lld gradients for %lld updates (the tied weight's 2 uses "
                "each with its version), the stalest at tau %d, mean lr factor %.3f\n", counted, updates, tau_max,
                factor);
    free(out);
}

/* Runs `cmd` (in the test directory); 1 when it exits 0, else a failure naming `what`. */
static int ps_run(const char *cmd, const char *what)
{
    char *out = NULL;
    const int st = run(cmd, 300, &out, NULL);
    if (st != 0) fail("--sync ps checkpoints: %s: exit %d\n%s\n%s", what, st, cmd, out);
    free(out);
    return st == 0;
}

/* 1 when files a and b (in the test directory) hold the same tensors; else a failure. */
static int ps_same(const char *a, const char *b, const char *what)
{
    char pa[200], pb[200], why[256];
    snprintf(pa, sizeof pa, "%s/%s", dir, a);
    snprintf(pb, sizeof pb, "%s/%s", dir, b);
    if (!test_same_tensors(pa, pb, why, sizeof why)) {
        fail("--sync ps: %s: differs: %s", what, why);
        return 0;
    }
    printf("ok   --sync ps: %s: identical\n", what);
    return 1;
}

/* Checkpoints of --sync ps (docs/distributed.md, "Checkpoints"): the
 * servers' optimizer state is in them, so a run resumed at step 5 ends
 * with the bytes of the unbroken run — resumed as PS (on another server
 * count), as an all-reduce run in one process; and an all-reduce run's
 * checkpoint resumed as PS. With staleness a checkpoint is a
 * synchronisation point: resumed as PS (synchronous) and as all-reduce it
 * gives the same bytes. */
#define PS_CKPT "m.graph " DATA " --batch 48 --steps 12 --optimizer adamw --lr-schedule cosine --warmup 4 " \
                "--micro-batches 2"
static void ps_checkpoints(void)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " PS_CKPT " --stages 1 --replicas 2 --save psref.st", bin);
    if (!ps_run(cmd, "the unbroken all-reduce run")) return;
    snprintf(cmd, sizeof cmd, "rm -rf ckp; " MPIRUN " -np 3 %s/pipeline-run " PS_CKPT " --stages 1 --replicas 2 "
             "--sync ps --checkpoint-dir ckp --checkpoint-every 5 --keep 0 --save psck.st", bin);
    if (!ps_run(cmd, "the checkpointing PS run")) return;
    ps_same("psref.st", "psck.st", "checkpoints: a PS run that checkpoints at steps 5 and 10 against the all-reduce run");
    char m[200];
    snprintf(m, sizeof m, "%s/ckp/step-00000005/manifest.json", dir);
    if (access(m, R_OK) != 0) {
        fail("--sync ps checkpoints: no complete checkpoint at step 5 (%s)", m);
        return;
    }
    snprintf(cmd, sizeof cmd, MPIRUN " -np 4 %s/pipeline-run " PS_CKPT " --stages 1 --replicas 2 --sync ps "
             "--servers 2 --resume ckp/step-00000005 --save ps1.st", bin);
    if (ps_run(cmd, "PS (1 server) resumed on 2 servers"))
        ps_same("psref.st", "ps1.st", "checkpoints: saved by 1 x 2 + 1 server at step 5, resumed on 1 x 2 + 2 servers");
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " PS_CKPT " --stages 2 --replicas 2 --resume ckp/step-00000005 "
             "--save ps2.st", bin);
    if (ps_run(cmd, "PS resumed as an all-reduce run"))
        ps_same("psref.st", "ps2.st", "checkpoints: saved by PS at step 5, resumed in one process on 2 stages x 2 replicas");
    snprintf(cmd, sizeof cmd, "rm -rf cka; %s/pipeline-run " PS_CKPT " --stages 1 --replicas 2 --steps 12 "
             "--checkpoint-dir cka --checkpoint-every 5 --keep 0", bin);
    if (ps_run(cmd, "the checkpointing all-reduce run")) {
        snprintf(cmd, sizeof cmd, MPIRUN " -np 5 %s/pipeline-run " PS_CKPT " --stages 2 --replicas 2 --sync ps "
                 "--resume cka/step-00000005 --save ps3.st", bin);
        if (ps_run(cmd, "an all-reduce checkpoint resumed as PS"))
            ps_same("psref.st", "ps3.st", "checkpoints: saved by an all-reduce run at step 5, resumed as 2 x 2 + 1 server");
    }
    /* --init-from reaches the servers (the hello goes before the first step). */
    snprintf(cmd, sizeof cmd, "%s/pipeline-run m.graph " DATA " --batch 48 --steps 4 --save psinit.st", bin);
    if (ps_run(cmd, "the weights to start from")) {
        snprintf(cmd, sizeof cmd, MPIRUN " -np 3 %s/pipeline-run " PS_CKPT " --stages 1 --replicas 2 --sync ps "
                 "--init-from psinit.st --save ps6.st", bin);
        const int a = ps_run(cmd, "PS from --init-from");
        snprintf(cmd, sizeof cmd, "%s/pipeline-run " PS_CKPT " --stages 1 --replicas 2 --init-from psinit.st "
                 "--save ps7.st", bin);
        if (ps_run(cmd, "all-reduce from --init-from") && a)
            ps_same("ps6.st", "ps7.st", "--init-from: PS against the all-reduce run");
    }
    /* Staleness 2, replica 1 slowed: the checkpoint at step 6 holds version 6. */
    snprintf(cmd, sizeof cmd, "rm -rf cks; PW_TEST_SLOW=w1:3 " MPIRUN " -np 3 %s/pipeline-run " PS_CKPT " --stages 1 "
             "--replicas 2 --sync ps --staleness 2 --checkpoint-dir cks --checkpoint-every 6 --keep 0", bin);
    if (!ps_run(cmd, "a stale PS run that checkpoints")) return;
    snprintf(cmd, sizeof cmd, MPIRUN " -np 3 %s/pipeline-run " PS_CKPT " --stages 1 --replicas 2 --sync ps "
             "--resume cks/step-00000006 --save ps4.st", bin);
    const int a = ps_run(cmd, "a stale run's checkpoint resumed as synchronous PS");
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " PS_CKPT " --stages 1 --replicas 2 --resume cks/step-00000006 "
             "--save ps5.st", bin);
    if (ps_run(cmd, "a stale run's checkpoint resumed as all-reduce") && a)
        ps_same("ps4.st", "ps5.st", "checkpoints: a --staleness 2 run's checkpoint at step 6, resumed as synchronous PS and "
                "as all-reduce");
}

/* --sync ps over a slow link: the pushes and the versions the servers send
 * back are held back by the link (runtime/link.h), the bytes are those of
 * the unthrottled run, and the run's own time ("done: N steps in T s") is
 * at least the link's: each step's gradients reach the server >= 20 ms
 * after they are pushed, and the new version reaches the worker >= 20 ms
 * after the server sends it. */
/* extra: flags of both runs; ps_extra: of the PS run only. With
 * --clip-grad-norm the servers exchange the norm's messages, and with a
 * checkpoint a server answers a worker's state request: sends that only a
 * test posts behind the slow link (they once waited for good). */
static void ps_slow_link(const char *extra, const char *ps_extra)
{
    char cmd[2048], model[512], *out = NULL;
    snprintf(model, sizeof model, "m.graph " DATA " --batch 48 --steps 6 --stages 1 --replicas 2 --micro-batches 2 "
             "--optimizer adamw %s", extra);
    snprintf(cmd, sizeof cmd, "%s/pipeline-run %s --save pslink_ref.st", bin, model);
    if (!ps_run(cmd, "the unthrottled reference")) return;
    snprintf(cmd, sizeof cmd, "rm -rf ckl; " MPIRUN " -np 4 %s/pipeline-run %s --sync ps --servers 2 --link-latency 0.02 "
             "--link-bandwidth 2e6 --save pslink.st %s", bin, model, ps_extra);
    const int st = run(cmd, 300, &out, NULL);
    const char *done = out ? strstr(out, "done: ") : NULL;
    int steps = 0;
    double took = -1;
    if (done) sscanf(done, "done: %d steps in %lf s", &steps, &took);
    const double min_s = 6 * 2 * 0.02;
    if (st != 0 || took < 0) fail("--sync ps over a slow link: exit %d\n%s\n%s", st, cmd, out ? out : "");
    else if (took < min_s)
        fail("--sync ps over a slow link: %d steps took %.3f s, the 20 ms link alone needs %.2f s", steps, took, min_s);
    else {
        printf("ok   --sync ps %s %s over a slow link (20 ms, 2 MB/s, 2 servers): %.2f s >= %.2f s\n", extra, ps_extra,
               took, min_s);
        ps_same("pslink_ref.st", "pslink.st", "--sync ps over a slow link against the unthrottled all-reduce run");
    }
    free(out);
}

/* --sync ps --compress topk / powersgd: the workers' error-feedback state
 * (residuals; PowerSGD's Q) is in the checkpoint as in an all-reduce run,
 * so PS resumed on another server count ends with the bytes of the
 * unbroken all-reduce run (without the state it does not). */
#define PS_ZCKPT "m.graph " DATA " --batch 48 --steps 12 --micro-batches 2 --stages 1 --replicas 2 --optimizer adamw"
static void ps_compress_resume(const char *mode)
{
    char cmd[2048], what[256];
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " PS_ZCKPT " --compress %s --save pszref.st", bin, mode);
    if (!ps_run(cmd, "the unbroken compressed all-reduce run")) return;
    snprintf(cmd, sizeof cmd, "rm -rf ckz; " MPIRUN " -np 3 %s/pipeline-run " PS_ZCKPT " --compress %s --sync ps "
             "--checkpoint-dir ckz --checkpoint-every 5 --keep 0", bin, mode);
    if (!ps_run(cmd, "the checkpointing compressed PS run")) return;
    snprintf(cmd, sizeof cmd, MPIRUN " -np 4 %s/pipeline-run " PS_ZCKPT " --compress %s --sync ps --servers 2 --resume "
             "ckz/step-00000005 --save pszres.st", bin, mode);
    snprintf(what, sizeof what, "--compress %s: saved by 1 x 2 + 1 server at step 5 with its state, resumed on 1 x 2 "
             "+ 2 servers, against the unbroken all-reduce run", mode);
    if (ps_run(cmd, "compressed PS resumed on 2 servers")) ps_same("pszref.st", "pszres.st", what);
}

/* Checkpoints of the tied GPT under --sync ps with zb-v (two copies of the
 * tied weight in one process, each fetching the server's optimizer state):
 * resumed on 2 servers and in one process, both end with the bytes of the
 * unbroken all-reduce run. */
#define PS_TCKPT PS_TIED " --steps 8 --micro-batches 4 --stages 2 --replicas 2 --schedule zb-v --optimizer adamw"
static void ps_tied_checkpoint(void)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " PS_TCKPT " --save pstref.st", bin);
    if (!ps_run(cmd, "the unbroken tied all-reduce run")) return;
    snprintf(cmd, sizeof cmd, "rm -rf ckt; " MPIRUN " -np 5 %s/pipeline-run " PS_TCKPT " --sync ps --checkpoint-dir ckt "
             "--checkpoint-every 3 --keep 0", bin);
    if (!ps_run(cmd, "the checkpointing tied PS run")) return;
    snprintf(cmd, sizeof cmd, MPIRUN " -np 6 %s/pipeline-run " PS_TCKPT " --sync ps --servers 2 --resume "
             "ckt/step-00000003 --save pstres.st", bin);
    if (ps_run(cmd, "tied PS resumed on 2 servers"))
        ps_same("pstref.st", "pstres.st", "tied GPT (zb-v): saved by 2 x 2 + 1 server at step 3, resumed on 2 x 2 + 2 "
                "servers, against the unbroken all-reduce run");
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " PS_TCKPT " --resume ckt/step-00000003 --save pstres1.st", bin);
    if (ps_run(cmd, "tied PS checkpoint resumed in one process"))
        ps_same("pstref.st", "pstres1.st", "tied GPT (zb-v): saved by PS at step 3, resumed in one process");
}

/* The trace counts a compressed push's bytes: pipe-trace's gradient line
 * gives bf16's ratio of 2 for a --sync ps run. */
static void ps_trace_ratio(void)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "rm -f zps.rank*.json; " MPIRUN " -np 3 %s/pipeline-run m.graph " DATA " --batch 48 "
             "--steps 4 --stages 1 --replicas 2 --micro-batches 2 --sync ps --compress bf16 --trace zps.json && "
             "%s/pipe-trace --color never zps.rank*.json", bin, bin);
    const int st = run(cmd, 120, &out, NULL);
    if (st != 0 || !strstr(out, "on the wire after compression (ratio 2.00x)"))
        fail("--sync ps --compress bf16: pipe-trace does not give the push's ratio 2.00x (exit %d)\n%s", st, out);
    else printf("ok   --sync ps --compress bf16: pipe-trace counts the pushes (ratio 2.00x)\n");
    free(out);
}

static void ps_cases(int np)
{
    if (np == 2) {
        ps_identical(1, 2, 1, "--micro-batches 2", "ps3");
        /* --clip-grad-norm: the server takes the global norm in the engine's
         * order (0.01 clips every step here). */
        ps_identical(1, 2, 1, "--micro-batches 2 --clip-grad-norm 0.01", "psclip3");
        ps_identical(2, 2, 1, "--micro-batches 4 --optimizer adamw --schedule interleaved --clip-grad-norm 0.01",
                     "psclip5");
        ps_identical(2, 2, 3, "--micro-batches 4 --optimizer adamw --clip-grad-norm 0.01", "psclip7");
        ps_identical(1, 2, 2, "--micro-batches 2 --clip-grad-norm 0.01", "psclip4");
        /* Tied parameters: the server sums the copies' uses in the
         * all-reduce run's order and sends every copy the same values. */
        ps_identical_model(PS_TIED, 2, 2, 1, "--micro-batches 2", "pstied5");
        ps_identical_model(PS_TIED, 2, 2, 2, "--micro-batches 2 --optimizer adamw", "pstied6");
        ps_identical_model(PS_TIED, 1, 2, 1, "--micro-batches 2", "pstied3"); /* twice in one program */
        ps_identical_model(PS_TIED, 2, 2, 2, "--micro-batches 2 --clip-grad-norm 0.05", "pstiedclip6");
        /* zb-v: chunks 0 and 3 (the embedding and the head) on one process, two copies there */
        ps_identical_model(PS_TIED, 2, 2, 2, "--schedule zb-v --micro-batches 4 --clip-grad-norm 0.05 --compress bf16",
                           "pstiedzbv6");
        ps_identical_model("m.graph " DATA " --batch 48 --steps 12", 1, 2, 2, "--micro-batches 2 --clip-grad-norm 0.01",
                           "psnorm4");
        /* --compress: the pushes compressed, the server decodes and sums as
         * the gathering all-reduce does: the all-reduce run's bytes. */
        ps_identical_model("m.graph " DATA " --batch 48 --steps 12", 1, 2, 1, "--micro-batches 2 --compress bf16",
                           "pszbf3");
        ps_identical_model("m.graph " DATA " --batch 48 --steps 12", 2, 2, 2,
                           "--micro-batches 2 --optimizer adamw --compress fp16", "pszfp6");
        ps_identical_model("m.graph " DATA " --batch 48 --steps 12", 1, 2, 2,
                           "--micro-batches 2 --compress topk:0.05 --clip-grad-norm 0.01", "psztopk4");
        ps_identical_model(PS_TIED, 2, 2, 1, "--micro-batches 2 --compress topk:0.1", "psztied5");
        /* PowerSGD: two round trips through the server (P summed and
         * orthogonalised there, then Q summed): the tree all-reduce's bytes. */
        ps_identical_model("m.graph " DATA " --batch 48 --steps 12", 1, 2, 1, "--micro-batches 2 --compress powersgd:2",
                           "pszpsgd3");
        ps_identical_model("m.graph " DATA " --batch 48 --steps 12", 2, 2, 2,
                           "--micro-batches 4 --optimizer adamw --clip-grad-norm 0.01 --compress powersgd:3",
                           "pszpsgdclip6");
        ps_identical_model(PS_TIED, 2, 2, 1, "--micro-batches 2 --compress powersgd:2", "pszpsgdtied5");
        ps_identical_model(PS_TIED, 1, 2, 1, "--micro-batches 2 --compress powersgd:1", "pszpsgdtied3");
        /* zb-v: the embedding's and the head's chunks on one process, each its own bucket's rounds */
        ps_identical_model(PS_TIED, 2, 2, 2, "--schedule zb-v --micro-batches 4 --clip-grad-norm 0.05 "
                           "--compress powersgd:2", "pszpsgdzbv6");
        ps_stopped("STOP", 2, "");
        ps_stopped("KILL", 2, "");
        ps_stopped("STOP", 1, "--compress powersgd:2"); /* mid-round: the server and worker 0 wait for it */
        ps_stopped("STOP", 2, "--compress powersgd:2");
        ps_refused();
        ps_staleness(2, NULL);
        ps_staleness(2, "none");
        ps_staleness_tied();
        ps_checkpoints();
        ps_compress_resume("topk:0.05");
        ps_compress_resume("powersgd:2");
        ps_trace_ratio();
        ps_tied_checkpoint();
        ps_slow_link("", "");
        ps_slow_link("--compress powersgd:2 --clip-grad-norm 0.01", "");
        ps_slow_link("--clip-grad-norm 0.01", "--checkpoint-dir ckl --checkpoint-every 2 --keep 0");
    } else {
        ps_identical(2, 2, 1, "--micro-batches 4 --optimizer adamw --buckets 2", "ps5");
        ps_identical(1, 4, 2, "--micro-batches 2 --optimizer adamw", "ps6");
        ps_identical_model(PS_TIED, 1, 4, 2, "--micro-batches 2 --compress bf16", "psztied6");
        ps_identical_model("m.graph " DATA " --batch 48 --steps 12", 1, 4, 2, "--micro-batches 2 --compress powersgd:2",
                           "pszpsgd6");
        ps_identical_model("m.graph " DATA " --batch 48 --steps 12", 1, 3, 1, "--micro-batches 2 --compress powersgd:2",
                           "pszpsgd4"); /* three replicas: the tree's odd one out */
    }
}

/* ------------------------------------------------ tensor parallelism (tp) */

/* The tied GPT of write_tied with tp= marks: vocabulary-parallel wte and
 * head, attention split by its 2 heads, the MLP column then row. */
static void write_tp(void)
{
    char path[128];
    snprintf(path, sizeof path, "%s/tp.graph", dir);
    FILE *f = fopen(path, "w");
    fputs("graph tiny_tp_gpt\n"
          "input tokens : i32[8]\n"
          "label next : i32[8]\n"
          "tok = embedding(tokens, vocab=256, dim=16, tp=vocab) as wte\n"
          "pos = pos_embedding(tok, max=8) as wpe\n"
          "x0  = dropout(pos, p=0.1)\n"
          "h = repeat 2 as h (x = x0) {\n"
          "  a   = layernorm(x) as ln_1\n"
          "  qkv = linear(a, out=48, tp=column) as attn.c_attn\n"
          "  att = causal_attention(qkv, heads=2)\n"
          "  o   = linear(att, out=16, tp=row) as attn.c_proj\n"
          "  od  = dropout(o, p=0.1)\n"
          "  x1  = add(x, od)\n"
          "  m   = layernorm(x1) as ln_2\n"
          "  fc  = linear(m, out=64, tp=column) as mlp.c_fc\n"
          "  g   = gelu(fc)\n"
          "  pr  = linear(g, out=16, tp=row) as mlp.c_proj\n"
          "  x2  = add(x1, pr)\n"
          "  return x2\n"
          "}\n"
          "hf = layernorm(h) as ln_f\n"
          "logits = linear(hf, out=256, bias=false, weight=wte.weight, tp=column) as lm_head\n"
          "loss = softmax_cross_entropy(logits, next)\n", f);
    fclose(f);
}

#define TP_MODEL "tp.graph --data text:text.txt --no-pin --quiet --seed 5 --shuffle --batch 16"
#define TP_MODEL_R3 "tp.graph --data text:text.txt --no-pin --quiet --seed 5 --shuffle --batch 24 --steps 6 " \
                    "--stages 1 --replicas 3 --tensor-parallel 2 --micro-batches 2"

/* S x R x T under mpirun -np S·R·T against the same layout in one process
 * (T ranks as threads): the same checkpoint bytes. */
static void tp_identical(int S, int R, int T, const char *extra, const char *tag)
{
    char args[1024], what[1200];
    snprintf(args, sizeof args, TP_MODEL " --steps 6 --stages %d --replicas %d --tensor-parallel %d %s", S, R, T,
             extra);
    snprintf(what, sizeof what, "tp.graph: %d stages x %d replicas x %d tensor-parallel ranks %s", S, R, T, extra);
    identical_runs(S * R * T, args, "", args, tag, what);
}

/* The MPI run at T = 2 is not T = 1's (the sums' order differs): the
 * byte comparison above could fail. */
static void tp_not_t1(void)
{
    char cmd[2048], why[256], *out = NULL, a[160], b[160];
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " TP_MODEL " --steps 6 --stages 2 --micro-batches 4 --save tp_t1.st",
             bin);
    if (run(cmd, 300, &out, NULL) != 0) {
        fail("tp: T = 1 in one process (%s):\n%s", cmd, out);
        free(out);
        return;
    }
    free(out);
    snprintf(a, sizeof a, "%s/tp_t1.st", dir);
    snprintf(b, sizeof b, "%s/mpi_tp_s2.st", dir);
    if (test_same_tensors(a, b, why, sizeof why)) fail("tp: the MPI run at T = 2 saved T = 1's very bytes");
    else printf("ok   tp: the MPI run at T = 2 differs from T = 1 in its bits (%s)\n", why);
}

/* A layout mpirun cannot run: non-zero, and the output says `must_say`. */
static void tp_refused(int np, const char *flags, const char *must_say)
{
    char cmd[2048], *out = NULL;
    double took = 0;
    snprintf(cmd, sizeof cmd, MPIRUN " -np %d %s/pipeline-run " TP_MODEL " --steps 2 %s", np, bin, flags);
    int st = run(cmd, 120, &out, &took);
    if (st == 0) fail("tp: mpirun -np %d %s ran (expected a refusal)\n%s", np, flags, out);
    else if (st == 124) fail("tp: mpirun -np %d %s hung\n%s", np, flags, out);
    else if (!strstr(out, must_say)) fail("tp: mpirun -np %d %s: the output does not say \"%s\"\n%s", np, flags, must_say, out);
    else printf("ok   tp: mpirun -np %d %s refused (%.1f s): \"%s\"\n", np, flags, took, must_say);
    free(out);
}

/* World rank `victim` (S = 2, T = 2: rank 2·stage + tp) hangs mid-step: its
 * tensor-parallel peer waits inside F or B, in the group's all-reduce; the
 * watch on that wait names the victim as stalled, and no healthy rank. */
static void tp_hang(int victim)
{
    char cmd[2048], *out = NULL, name[128];
    double took = 0;
    snprintf(cmd, sizeof cmd, "PW_TEST_HANG=%d:step:3 " MPIRUN " -np 4 %s/pipeline-run " TP_MODEL " --steps 20 "
             "--stages 2 --tensor-parallel 2 --watchdog %d", victim, bin, HANG_WD);
    int st = run(cmd, 60, &out, &took);
    snprintf(name, sizeof name, "MPI rank %d (replica 0, stage %d, tensor rank %d) stalled", victim, victim / 2,
             victim % 2);
    int other = 0;
    for (int w = 0; w < 4; w++) {
        char x[128];
        snprintf(x, sizeof x, "MPI rank %d (replica 0, stage %d, tensor rank %d) stalled", w, w / 2, w % 2);
        other |= w != victim && strstr(out, x) != NULL;
    }
    /* How long the peer waited in the sum before it named the victim: the
     * watch's own bound, which start-up time on a loaded machine does not
     * stretch (the whole run's time, start-up included, is bounded loosely). */
    double waited = -1;
    const char *w = strstr(out, "s for the tensor-parallel all-reduce of its stage");
    for (const char *q = w; q && q > out + 7; q--)
        if (!strncmp(q, " waited ", 8)) {
            waited = atof(q + 8);
            break;
        }
    if (!strstr(out, "PW_TEST_HANG: MPI rank")) fail("tp hang: the hook never fired\n%s", out);
    else if (st == 0) fail("tp hang: mpirun returned 0 after rank %d hung\n%s", victim, out);
    else if (st == 124) fail("tp hang: the run hung (killed by the test after %.0f s)\n%s", took, out);
    else if (took > HANG_WD + 30) fail("tp hang: took %.1f s to stop (bound %d s)\n%s", took, HANG_WD + 30, out);
    else if (!strstr(out, name)) fail("tp hang: the output does not say \"%s\"\n%s", name, out);
    else if (other) fail("tp hang: a healthy rank is named as stalled\n%s", out);
    else if (waited < 0) fail("tp hang: no process says it waited in the tensor-parallel all-reduce\n%s", out);
    else if (waited < HANG_WD || waited > HANG_WD + 3)
        fail("tp hang: the peer named it after waiting %.1f s in the all-reduce (watchdog %d s)\n%s", waited, HANG_WD,
             out);
    else printf("ok   tp: tensor rank %d hung in step 3: its peer's tensor-parallel all-reduce named it after %.1f s "
                "(--watchdog %d), mpirun exit %d after %.1f s: \"%s\"\n", victim, waited, HANG_WD, st, took, name);
    free(out);
}

/* World rank `victim` killed after step 2: mpirun ends the job, naming it. */
static void tp_kill(int victim)
{
    char cmd[2048], *out = NULL, name[64];
    double took = 0;
    snprintf(cmd, sizeof cmd, "PW_TEST_FAULT=kill:%d:2 " MPIRUN " -np 4 %s/pipeline-run " TP_MODEL " --steps 40 "
             "--stages 2 --tensor-parallel 2 --watchdog 3", victim, bin);
    int st = run(cmd, 120, &out, &took);
    snprintf(name, sizeof name, "process rank %d", victim); /* mpirun's: "noticed that process rank 3 ..." */
    if (st == 0) fail("tp kill: mpirun returned 0 after rank %d was killed\n%s", victim, out);
    else if (st == 124) fail("tp kill: the run hung (killed by the test after %.0f s)\n%s", took, out);
    else if (took > 60) fail("tp kill: the others took %.1f s to stop\n%s", took, out);
    else if (!strstr(out, name)) fail("tp kill: the output does not say \"%s\"\n%s", name, out);
    else printf("ok   tp: tensor rank %d killed: mpirun exit %d after %.1f s, says \"%s\"\n", victim, st, took, name);
    free(out);
}

/* Each process's trace holds its TP_ALLREDUCE events (pid = its tensor
 * rank); pipe-trace reads the 4 files as one run of 4 tracks with the
 * tensor-parallel line. */
static void tp_traces(void)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "rm -f tptr.*; " MPIRUN " -np 4 %s/pipeline-run " TP_MODEL " --steps 4 --stages 2 "
             "--tensor-parallel 2 --trace tptr.json && grep -c TP_ALLREDUCE "
             "tptr.rank0.json tptr.rank1.json tptr.rank2.json tptr.rank3.json && %s/pipe-trace tptr.rank0.json "
             "tptr.rank1.json tptr.rank2.json tptr.rank3.json", bin, bin);
    int st = run(cmd, 300, &out, NULL);
    int ok = st == 0 && strstr(out, "Tensor-parallel all-reduce:") && strstr(out, "rank 0 tp 1") &&
             strstr(out, "rank 1 tp 1") && !strstr(out, ".json:0\n");
    if (!ok) fail("tp traces (%s): exit %d\n%s", cmd, st, out);
    else printf("ok   tp: 4 processes' traces hold their tensor-parallel all-reduces; pipe-trace reads them as one "
                "run with a line for them\n");
    free(out);
}

/* Every step's grad_norm in a metrics log, as written (9 digits), joined
 * by spaces; the count of steps; the smallest norm in *least. */
static int tp_norms(const char *file, char *out, size_t n, double *least)
{
    char path[200], line[4096];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r");
    int k = 0;
    size_t len = 0;
    out[0] = '\0';
    *least = 1e300;
    while (f && fgets(line, sizeof line, f)) {
        const char *g = strstr(line, "\"grad_norm\":");
        if (!strstr(line, "\"type\":\"step\"") || !g) continue;
        g += strlen("\"grad_norm\":");
        const size_t w = strcspn(g, ",}");
        if (len + w + 2 < n) len += (size_t)snprintf(out + len, n - len, "%s%.*s", k ? " " : "", (int)w, g);
        const double v = atof(g);
        if (v < *least) *least = v;
        k++;
    }
    if (f) fclose(f);
    return k;
}

/* Clipping at T > 1 under MPI (docs/parallelism.md, "Clipping at T > 1"):
 * a clip below every step's norm, so it scales every step. The bytes of
 * the same layout in one process, every step's norm the same as there (the
 * metrics logs), and not the bytes of the same run without the clip (the
 * clip did something; `unclipped` is that run's MPI checkpoint). */
static void tp_clip(int S, int R, const char *extra, const char *tag, const char *unclipped)
{
    const double clip = 0.05;
    char base[1024], args[1200], one[1200], what[1300], why[256];
    snprintf(base, sizeof base, TP_MODEL " --steps 6 --stages %d --replicas %d --tensor-parallel 2 %s "
             "--clip-grad-norm %g", S, R, extra, clip);
    snprintf(args, sizeof args, "%s --metrics mpi_%s.jsonl", base, tag);
    snprintf(one, sizeof one, "%s --metrics one_%s.jsonl", base, tag);
    snprintf(what, sizeof what, "tp.graph: %d stages x %d replicas x 2 tensor-parallel ranks %s --clip-grad-norm %g",
             S, R, extra, clip);
    const int before = failures;
    identical_runs(S * R * 2, args, "", one, tag, what);
    if (failures != before) return;
    char a[200], b[200], na[1024], nb[1024];
    double la, lb;
    snprintf(a, sizeof a, "one_%s.jsonl", tag);
    snprintf(b, sizeof b, "mpi_%s.jsonl", tag);
    const int ka = tp_norms(a, na, sizeof na, &la), kb = tp_norms(b, nb, sizeof nb, &lb);
    if (ka != 6 || kb != 6 || strcmp(na, nb) != 0)
        fail("tp clip %s: the norms differ: one process (%d steps) [%s], MPI (%d steps) [%s]", tag, ka, na, kb, nb);
    else if (!(lb > clip))
        fail("tp clip %s: the clip %g did not trigger every step (least norm %g): [%s]", tag, clip, lb, nb);
    else printf("ok   tp clip %s: every step's norm as in one process, each above the clip %g: [%s]\n", tag, clip, nb);
    snprintf(a, sizeof a, "%s/mpi_%s.st", dir, tag);
    snprintf(b, sizeof b, "%s/%s", dir, unclipped);
    if (test_same_tensors(a, b, why, sizeof why)) fail("tp clip %s: the clipped run saved the unclipped run's bytes", tag);
}

/* Training-state checkpoints at T > 1 under MPI (docs/parallelism.md,
 * "Checkpoints at T > 1"): written at step 3 of 6 by mpirun at S x T = 2 x 2
 * (AdamW, clipping), the checkpoint is layout-free. Resumed in one process
 * at T = 2 on one stage, under mpirun at T = 2 with GPipe and on 1 stage x
 * 2 replicas: the unbroken run's bytes. Resumed in one process at T = 1: the bytes of the same
 * resume from the checkpoint one process writes at T = 2. And the other
 * way: a checkpoint written in one process at T = 1, resumed under mpirun
 * at T = 2, gives the bytes of that resume in one process at T = 2. */
#define TPK_MODEL TP_MODEL " --steps 6 --optimizer adamw --clip-grad-norm 0.05 --micro-batches 4"

static int tpk_run(const char *launch, const char *flags, const char *what)
{
    char cmd[2048], *out = NULL;
    snprintf(cmd, sizeof cmd, "%s%s/pipeline-run " TPK_MODEL " %s", launch, bin, flags);
    int st = run(cmd, 300, &out, NULL);
    if (st != 0) fail("tp checkpoints: %s (%s): exit %d\n%s", what, cmd, st, out);
    free(out);
    return st == 0;
}

static void tpk_same(const char *x, const char *y, const char *what)
{
    char a[200], b[200], why[256];
    snprintf(a, sizeof a, "%s/%s", dir, x);
    snprintf(b, sizeof b, "%s/%s", dir, y);
    if (!test_same_tensors(a, b, why, sizeof why)) fail("tp checkpoints: %s: %s", what, why);
    else printf("ok   tp checkpoints: %s\n", what);
}

static void tp_checkpoints(void)
{
    char mpi4[256], m[200];
    snprintf(mpi4, sizeof mpi4, MPIRUN " -np 4 ");
    /* The unbroken runs (one process, T = 2 and 1), each writing a checkpoint at step 3. */
    if (!tpk_run("rm -rf tpk_o2 tpk_o1 tpk_m2; ", "--stages 2 --tensor-parallel 2 --checkpoint-dir tpk_o2 "
                 "--checkpoint-every 3 --keep 0 --save tpk_ref2.st", "one process, T = 2") ||
        !tpk_run("", "--stages 2 --checkpoint-dir tpk_o1 --checkpoint-every 3 --keep 0", "one process, T = 1") ||
        !tpk_run(mpi4, "--stages 2 --tensor-parallel 2 --checkpoint-dir tpk_m2 --checkpoint-every 3 --keep 0 "
                 "--save tpk_m2.st", "under mpirun, 2 x 1 x 2"))
        return;
    snprintf(m, sizeof m, "%s/tpk_m2/step-00000003/manifest.json", dir);
    if (access(m, R_OK) != 0) {
        fail("tp checkpoints: mpirun at T = 2 wrote no complete checkpoint of step 3 (%s)", m);
        return;
    }
    tpk_same("tpk_ref2.st", "tpk_m2.st", "written under mpirun at 2 x 1 x 2: the run's bytes are one process's");
    if (tpk_run("", "--stages 1 --tensor-parallel 2 --resume tpk_m2/step-00000003 --save tpk_a.st",
                "mpirun's T = 2 checkpoint resumed in one process at T = 2"))
        tpk_same("tpk_ref2.st", "tpk_a.st", "mpirun's T = 2 checkpoint resumed in one process at T = 2 (1 stage): "
                 "the unbroken run's bytes");
    if (tpk_run(mpi4, "--stages 2 --tensor-parallel 2 --schedule gpipe --resume tpk_m2/step-00000003 --save tpk_b.st",
                "mpirun's T = 2 checkpoint resumed under mpirun at T = 2"))
        tpk_same("tpk_ref2.st", "tpk_b.st", "mpirun's T = 2 checkpoint resumed under mpirun at 2 x 1 x 2 (GPipe): "
                 "the unbroken run's bytes");
    if (tpk_run(mpi4, "--stages 1 --replicas 2 --micro-batches 2 --tensor-parallel 2 --resume tpk_m2/step-00000003 "
                "--save tpk_e.st", "mpirun's 2 x 1 x 2 checkpoint resumed under mpirun at 1 x 2 x 2"))
        tpk_same("tpk_ref2.st", "tpk_e.st", "mpirun's 2 x 1 x 2 checkpoint resumed under mpirun at 1 x 2 x 2: the "
                 "unbroken run's bytes");
    if (tpk_run("", "--stages 2 --tensor-parallel 1 --resume tpk_m2/step-00000003 --save tpk_c1.st",
                "mpirun's T = 2 checkpoint resumed at T = 1") &&
        tpk_run("", "--stages 2 --tensor-parallel 1 --resume tpk_o2/step-00000003 --save tpk_c2.st",
                "one process's T = 2 checkpoint resumed at T = 1"))
        tpk_same("tpk_c2.st", "tpk_c1.st", "mpirun's T = 2 checkpoint resumed in one process at T = 1: the bytes of "
                 "one process's T = 2 checkpoint resumed so");
    if (tpk_run(mpi4, "--stages 2 --tensor-parallel 2 --resume tpk_o1/step-00000003 --save tpk_d1.st",
                "one process's T = 1 checkpoint resumed under mpirun at T = 2") &&
        tpk_run("", "--stages 2 --tensor-parallel 2 --resume tpk_o1/step-00000003 --save tpk_d2.st",
                "one process's T = 1 checkpoint resumed in one process at T = 2"))
        tpk_same("tpk_d2.st", "tpk_d1.st", "one process's T = 1 checkpoint resumed under mpirun at T = 2: the bytes "
                 "of that resume in one process");
}

/* The replicas' sum at T > 1 under mpirun (docs/parallelism.md, "Under
 * MPI"): each process's buckets hold its own tensor rank's parts, where one
 * process puts every rank's parts in one bucket. At 1 x 3 x 2 (three
 * replicas: with two every order of a sum is the same) against the same
 * layout in one process: the per-element orders (the tree, hierarchical,
 * auto) and compressors (bf16, fp16, top-k, whose k is per parameter part)
 * give the same bytes; the ring (its segments follow the bucket) other
 * bytes, within 1e-5 of each tensor's largest after 6 SGD steps; PowerSGD
 * (its matrices' factors) trains, its bytes other than one process's. */
static void tp_algo(const char *flags, int same, double tol, const char *tag)
{
    char cmd[2048], what[1200], a[160], b[160], why[256], *out = NULL;
    /* --allreduce is mpirun's (one process sums with the tree); --compress both's */
    const char *one = strncmp(flags, "--compress", 10) == 0 ? flags : "";
    snprintf(what, sizeof what, "tp.graph: 1 stage x 3 replicas x 2 tensor-parallel ranks %s", flags);
    snprintf(cmd, sizeof cmd, "%s/pipeline-run " TP_MODEL_R3 " %s --save one_%s.st", bin, one, tag);
    int st = run(cmd, 300, &out, NULL);
    if (st != 0) fail("tp: %s in one process (%s): exit %d\n%s", what, cmd, st, out);
    free(out);
    if (st != 0) return;
    snprintf(cmd, sizeof cmd, MPIRUN " -np 6 %s/pipeline-run " TP_MODEL_R3 " %s --save mpi_%s.st", bin, flags, tag);
    st = run(cmd, 300, &out, NULL);
    if (st != 0) fail("tp: %s under mpirun (%s): exit %d\n%s", what, cmd, st, out);
    free(out);
    if (st != 0) return;
    snprintf(a, sizeof a, "%s/one_%s.st", dir, tag);
    snprintf(b, sizeof b, "%s/mpi_%s.st", dir, tag);
    const int equal = test_same_tensors(a, b, why, sizeof why);
    if (same && !equal) fail("tp: %s: the MPI checkpoint differs from one process: %s", what, why);
    else if (same) printf("ok   tp: %s: MPI checkpoint identical to one process\n", what);
    else if (equal) fail("tp: %s: the same bytes as one process, where docs/parallelism.md says they differ", what);
    else if (tol > 0 && !test_compare_tensors(a, b, tol, 0, why, sizeof why))
        fail("tp: %s: beyond %g of the largest against one process: %s", what, tol, why);
    else printf("ok   tp: %s: not one process's bytes (%s)%s\n", what, why, tol > 0 ? ", within the bound" : "");
}

static void tp_algos(void)
{
    tp_algo("--allreduce tree", 1, 0, "tp_r3");
    tp_algo("--allreduce hierarchical", 1, 0, "tp_r3h");
    tp_algo("--allreduce auto", 1, 0, "tp_r3a");
    tp_algo("--compress bf16", 1, 0, "tp_r3bf");
    tp_algo("--compress topk:0.1", 1, 0, "tp_r3k");
    tp_algo("--allreduce ring", 0, 1e-5, "tp_r3r");
    /* (one process once compressed only tensor rank 0's matrices here) */
    tp_algo("--compress powersgd:2", 1, 0, "tp_r3p");
}

static void tp_cases(int np)
{
    if (np != 4) {
        printf("tp: runs at NP = 4 (and starts its own mpirun -np 8)\n");
        return;
    }
    tp_identical(2, 1, 2, "--micro-batches 4", "tp_s2");
    tp_not_t1();
    tp_identical(2, 1, 2, "--micro-batches 4 --schedule gpipe --optimizer adamw", "tp_s2g");
    tp_identical(1, 2, 2, "--micro-batches 2 --optimizer adamw", "tp_r2");
    tp_identical(2, 2, 2, "--micro-batches 2", "tp_s2r2");
    tp_clip(2, 1, "--micro-batches 4", "tp_s2c", "mpi_tp_s2.st");
    tp_clip(1, 2, "--micro-batches 2 --optimizer adamw", "tp_r2c", "mpi_tp_r2.st");
    tp_checkpoints();
    tp_algos();
    /* --rebalance-at under mpirun at T = 2: each process moves its tensor
     * rank's parts; 6 splits the first attention pair (it goes to 7) */
    rebalanced(TP_MODEL " --steps 6", 4, 2, 1, "--tensor-parallel 2 --micro-batches 4 --optimizer adamw "
               "--clip-grad-norm 0.05", "2:8/3:6/4:17", NULL, NULL, 3, "tp_reb");
    tp_refused(4, "--stages 2 --tensor-parallel 3",
               "mpirun started 4 processes, but --stages 2 x --replicas 1 x --tensor-parallel 3 needs 6");
    tp_refused(3, "--tensor-parallel 2", "mpirun -np 3 is not a multiple of --replicas 1 x --tensor-parallel 2");
    tp_refused(3, "--stages 1 --tensor-parallel 3",
               "linear 'h.0.attn.c_attn' feeds causal_attention with 2 heads, fewer than the 3 tensor-parallel ranks");
    tp_hang(1);
    tp_hang(2);
    tp_kill(3);
    tp_traces();
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s BUILD_DIR NP\n", argv[0]);
        return 2;
    }
    static char abs_bin[4096];
    if (!realpath(argv[1], abs_bin)) {
        perror(argv[1]);
        return 2;
    }
    bin = abs_bin;
    int np = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (system("command -v mpirun >/dev/null 2>&1") != 0) {
        printf("mpirun not found: skipping the MPI tests (Debian: apt-get install openmpi-bin)\n");
        return 77;
    }
    if (!pw_mpi_built()) {
        printf("this build has no MPI (PW_MPI=OFF): skipping the MPI tests\n");
        return 77;
    }
    /* Root in containers; leak reports from the MPI library are not ours. */
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 0);
    const char *asan = getenv("ASAN_OPTIONS");
    char asan_opts[512];
    snprintf(asan_opts, sizeof asan_opts, "%s%sdetect_leaks=0", asan ? asan : "", asan && *asan ? ":" : "");
    setenv("ASAN_OPTIONS", asan_opts, 1);
    snprintf(dir, sizeof dir, "/tmp/pw_mpi_test_XXXXXX");
    if (!mkdtemp(dir)) return 1;
    write_graph();
    write_tied();
    write_tp();
    const int have_idx = write_idx();

    /* PW_MPI_ONLY=checkpoints: only the training-state checkpoint cases. */
    const char *only = getenv("PW_MPI_ONLY");
    if (only && !strcmp(only, "algos")) {
        algos(np);
    } else if (np == 3) {
        algos(3); /* np 3: the all-reduce algorithms at a non-power-of-two count only */
    } else if (only && !strcmp(only, "startup")) {
        sigstop_startup(np, np - 1);
    } else if (only && !strcmp(only, "rebalance")) {
        rebalance_cases(np);
    } else if (only && !strcmp(only, "compress")) {
        compress_cases(np);
    } else if (only && !strcmp(only, "ps")) {
        ps_cases(np);
    } else if (only && !strcmp(only, "tp")) {
        tp_cases(np);
    } else if (only && !strcmp(only, "checkpoints")) {
        if (ckpt_reference()) {
            if (np == 2) {
                ckpt_mpi(2, 2, 1, 1, 2);
            } else {
                ckpt_mpi(4, 2, 2, 4, 1);
                ckpt_sigterm(4);
                ckpt_launch_sigterm();
                ckpt_launch(4);
                ckpt_launch(2);
            }
        }
    } else if (np == 2) {
        parts_unit();
        host_place_unit();
        identical(2, 2, 1, "--micro-batches 4", "", "s2");
        identical(2, 1, 2, "--micro-batches 2 --buckets 3", "", "r2");
        identical(2, 2, 1, "--schedule gpipe --optimizer adamw --clip-grad-norm 0.5", "", "s2g");
        identical(2, 1, 2, "--optimizer adamw", "--allreduce mpi", "r2mpi");
        one_replica(2, 1, 2, 4, "--optimizer adamw", "r2one");
        resumed(2, 1, 2);
        identical(2, 2, 1, "--micro-batches 4 --schedule interleaved", "", "il2");
        identical(2, 2, 1, "--micro-batches 4 --schedule zb-v --optimizer adamw --clip-grad-norm 0.5", "", "zbv2");
        tied(2, 2, 1, "--micro-batches 4", "t2");
        tied(2, 2, 1, "--micro-batches 4 --schedule zb-v --optimizer adamw --clip-grad-norm 0.05", "t2zbv");
        tied(2, 2, 1, "--micro-batches 4 --schedule interleaved --clip-grad-norm 0.05", "t2il");
        if (have_idx) data_parts(2, 2, 1);
        binding(2);
        failure(2, "kill", "rank %d", 60);
        failure(2, "error", "MPI rank %d (replica %d, stage %d): step 2: injected fault", 60);
        hang(2, 1, "step", 3, 0);
        hang(2, 1, "eval", 16, 1);
        traces(2, 2, 1);
        hostfile(2, 2, 1);
        rebalance_cases(2);
        compress_cases(2);
        algos(2);
        ps_cases(2);
        if (ckpt_reference()) ckpt_mpi(2, 2, 1, 1, 2);
    } else {
        identical(4, 2, 2, "--micro-batches 4 --clip-grad-norm 0.5", "", "s2r2");
        identical(4, 4, 1, "--micro-batches 8 --optimizer adamw", "", "s4");
        identical(4, 1, 4, "--micro-batches 2 --buckets 2 --optimizer adamw", "", "r4");
        one_replica(4, 1, 4, 3, "--buckets 2 --optimizer adamw --clip-grad-norm 0.5", "r4one");
        one_replica(4, 2, 2, 6, "--schedule zb-h1 --optimizer adamw", "s2r2one");
        identical(4, 2, 2, "--schedule zb-h1 --micro-batches 4 --buckets 2", "", "zb");
        resumed(4, 2, 2);
        identical(4, 4, 1, "--micro-batches 8 --schedule interleaved --optimizer adamw", "", "il4");
        identical(4, 2, 2, "--micro-batches 4 --schedule zb-v --buckets 2 --clip-grad-norm 0.5", "", "zbv4");
        tied(4, 4, 1, "--micro-batches 4 --schedule interleaved --optimizer adamw --clip-grad-norm 0.05", "t4il");
        tied(4, 2, 2, "--micro-batches 2 --schedule zb-v --clip-grad-norm 0.05", "t4zbv");
        if (have_idx) {
            data_parts(4, 4, 1);
            data_parts(4, 2, 2);
        }
        binding(4);
        failure(4, "kill", "rank %d", 60);
        failure(4, "exit", "MPI rank %d (replica %d, stage %d): exited before the end of the run", 60);
        failure(4, "hang", "MPI rank %d (replica %d, stage %d) stalled", 60);
        hang(4, 3, "step", 3, 0);
        hang(4, 1, "step", 3, 1);
        hang(4, 0, "epoch", 16, 0);
        hang(4, 2, "epoch", 16, 1);
        hang(4, 1, "eval", 16, 0);
        hang(4, 3, "eval", 16, 1);
        hang(4, 2, "save", 20, 0);
        hang(4, 1, "save", 20, 1);
        sigstop_outside(4, 3);
        sigstop_startup(4, 2);
        sigterm_one(4, 2);
        traces(4, 2, 2);
        hostfile(4, 2, 2);
        rebalance_cases(4);
        compress_cases(4);
        algos(4);
        ps_cases(4);
        tp_cases(4);
        if (ckpt_reference()) {
            ckpt_mpi(4, 2, 2, 4, 1);
            ckpt_sigterm(4);
            ckpt_launch_sigterm();
            ckpt_launch(4);
            ckpt_launch(2);
        }
    }
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    if (failures) {
        printf("%d MPI check(s) failed\n", failures);
        return 1;
    }
    printf("all MPI checks passed (%d processes)\n", np);
    return 0;
}
