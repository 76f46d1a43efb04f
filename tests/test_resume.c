/* Tests: training-state checkpoints and --resume through the real
 * pipeline-run (docs/checkpoints.md) — a resumed run is byte-identical to
 * the uninterrupted one on any layout; what cannot be resumed is refused
 * before anything runs, naming what differs, and nothing is overwritten;
 * SIGTERM leaves a complete checkpoint and exit 75; --max-restarts
 * restarts a killed run from its last checkpoint. */
#include <criterion/criterion.h>
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "runtime/safetensors.h"
#include "tests/test_helpers.h"

#define TIMEOUT 240

static char dir[64];

static void write_file(const char *name, const char *text)
{
    char path[160];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "%s", path);
    fputs(text, f);
    fclose(f);
}

static void setup(void)
{
    strcpy(dir, "/tmp/pw_test_resume_XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    write_file("m.graph", "graph resume_mlp\n"
                          "input x : f32[24]\n"
                          "label y : i32[]\n"
                          "h1 = linear(x, out=32) as fc1\n"
                          "a1 = relu(h1)\n"
                          "h2 = linear(a1, out=32) as fc2\n"
                          "a2 = relu(h2)\n"
                          "logits = linear(a2, out=5) as head\n"
                          "loss = softmax_cross_entropy(logits, y)\n");
    /* A tiny GPT with dropout whose head is tied to the token embedding. */
    write_file("gpt.graph", "graph resume_gpt\n"
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
                            "loss = softmax_cross_entropy(logits, next)\n");
    static const char *const sent[] = {"the quick brown fox jumps over the lazy dog. ",
                                       "a stitch in time saves nine. ", "all that glitters is not gold. "};
    char text[8192] = "";
    for (int i = 0; i < 80; i++) strcat(text, sent[(i * 7 + i / 3) % 3]);
    write_file("text.txt", text);
}

static void teardown(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(resume, .init = setup, .fini = teardown, .timeout = TIMEOUT);

/* Runs `env pipeline-run args` in dir; the exit status, the output in *out
 * (caller frees; NULL: dropped). */
static int run_env(const char *env, const char *args, char **out)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "cd '%s' && %s '%s/pipeline-run' %s 2>&1", dir, env, PW_BINARY_DIR, args);
    return test_run(cmd, out);
}

static int run(const char *args, char **out) { return run_env("", args, out); }

/* Runs and requires exit 0. */
static void ok(const char *args)
{
    char *o;
    int rc = run(args, &o);
    cr_assert_eq(rc, 0, "pipeline-run %s: exit %d\n%s", args, rc, o);
    free(o);
}

static int exists(const char *name)
{
    char path[1500];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* The bytes of dir/name; *n its size. */
static char *slurp(const char *name, size_t *n)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return test_read_file_or_fail(path, n);
}

/* Byte-identical files (tensors and metadata: --save's "run" metadata holds
 * no layout, so runs on other layouts write the same bytes). On a
 * difference, says which tensor and the first differing element. */
static void same_bytes(const char *a, const char *b, const char *what)
{
    size_t na, nb;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    int same = na == nb && memcmp(x, y, na) == 0;
    free(x);
    free(y);
    if (same) return;
    char pa[1200], pb[1200], why[256];
    snprintf(pa, sizeof pa, "%s/%s", dir, a);
    snprintf(pb, sizeof pb, "%s/%s", dir, b);
    if (test_same_tensors(pa, pb, why, sizeof why)) snprintf(why, sizeof why, "the headers differ");
    cr_assert_fail("%s: %s and %s differ: %s", what, a, b, why);
}

/* ---- the resume matrix ----
 * For a model: the uninterrupted run on one stage (ref.st); three runs that
 * write checkpoints on other layouts (1 stage, 2 stages 1F1B, 3 stages
 * interleaved); from each one's checkpoint at step K, runs on 1, 2 and 4
 * stages and on another schedule finish the run. Every final file is
 * ref.st, byte for byte, and each checkpoint's model.safetensors at the
 * last step is too (what --save writes). */
static void matrix(const char *model, int K, int N)
{
    char args[1024], name[64], what[1200];
    snprintf(args, sizeof args, "%s --steps %d --stages 1 --save ref.st", model, N);
    ok(args);
    const char *save[] = {"--stages 1", "--stages 2 --schedule 1f1b", "--stages 3 --schedule interleaved"};
    const char *resume[] = {"--stages 1", "--stages 2", "--stages 4", "--stages 2 --schedule zb-h1"};
    for (int s = 0; s < 3; s++) {
        snprintf(args, sizeof args, "%s --steps %d %s --checkpoint-dir ck%d --checkpoint-every %d --keep 0", model,
                 N, save[s], s, K);
        ok(args);
        snprintf(name, sizeof name, "ck%d/step-%08d/model.safetensors", s, N);
        snprintf(what, sizeof what, "%s, saved on %s: the last checkpoint's model", model, save[s]);
        same_bytes(name, "ref.st", what);
        for (int r = 0; r < 4; r++) {
            snprintf(args, sizeof args, "%s --steps %d %s --resume ck%d/step-%08d --save r%d%d.st", model, N,
                     resume[r], s, K, s, r);
            ok(args);
            snprintf(name, sizeof name, "r%d%d.st", s, r);
            snprintf(what, sizeof what, "%s: saved at step %d on %s, resumed on %s", model, K, save[s], resume[r]);
            same_bytes(name, "ref.st", what);
        }
    }
}

/* 512 samples in batches of 48: 10 steps an epoch; step 7 to 24 crosses
 * the epoch boundaries after steps 10 and 20, reshuffled (--shuffle). */
#define MLP "m.graph --data synthetic:512:24:5 --no-pin --quiet --batch 48 --micro-batches 6 --shuffle"

Test(resume, matrix_sgd)
{
    matrix(MLP " --optimizer sgd --momentum 0.9 --weight-decay 0.001", 7, 24);
}

Test(resume, matrix_adamw_cosine_warmup_clipping)
{
    matrix(MLP " --optimizer adamw --lr 0.003 --lr-schedule cosine --warmup 5 --clip-grad-norm 0.3", 7, 24);
}

Test(resume, matrix_tiny_gpt_with_dropout)
{
    matrix("gpt.graph --data text:text.txt --no-pin --quiet --batch 12 --micro-batches 6 --shuffle --optimizer "
           "adamw --lr 0.01 --lr-schedule cosine --warmup 3 --clip-grad-norm 1",
           5, 12);
}

/* --checkpoint-every epoch: at each epoch's end; resumed across the next
 * epoch's reshuffle. */
Test(resume, at_epoch_ends_across_a_reshuffle)
{
    ok(MLP " --optimizer adamw --steps 25 --stages 1 --save ref.st");
    ok(MLP " --optimizer adamw --steps 25 --stages 2 --checkpoint-dir ck --checkpoint-every epoch --keep 0");
    cr_assert(exists("ck/step-00000010/manifest.json") && exists("ck/step-00000020/manifest.json") &&
              exists("ck/step-00000025/manifest.json") && !exists("ck/step-00000005"),
              "checkpoints at steps 10, 20 (epoch ends) and 25 (the end) expected");
    ok(MLP " --optimizer adamw --steps 25 --stages 3 --resume ck/step-00000010 --save r.st");
    same_bytes("r.st", "ref.st", "resumed at the end of epoch 1");
}

/* Checkpoints written after the cuts moved (--rebalance-at): the same bytes
 * as a run that never moved, the new cuts in the manifest, and a resume on
 * another layout from it. (The layout's schedule name once pointed into the
 * replaced pipeline: the checkpoint failed after a move.) */
Test(resume, checkpoints_after_a_rebalance)
{
    ok(MLP " --optimizer adamw --steps 8 --stages 1 --save ref8.st");
    ok(MLP " --optimizer adamw --steps 4 --stages 1 --save ref4.st");
    ok(MLP " --optimizer adamw --steps 8 --stages 2 --rebalance-at 2:2 --checkpoint-dir ckm --checkpoint-every 4 "
           "--keep 0");
    same_bytes("ckm/step-00000004/model.safetensors", "ref4.st", "a checkpoint after the move");
    char path[1200];
    snprintf(path, sizeof path, "%s/ckm/step-00000004/manifest.json", dir);
    json_t *m = json_load_file(path, 0, NULL);
    json_t *cuts = json_object_get(json_object_get(m, "layout"), "cuts");
    cr_assert(json_array_size(cuts) == 3 && json_integer_value(json_array_get(cuts, 1)) == 2,
              "the moved cuts [0, 2, ...] in the manifest");
    json_decref(m);
    ok(MLP " --optimizer adamw --steps 8 --stages 3 --resume ckm/step-00000004 --save r8.st");
    same_bytes("r8.st", "ref8.st", "resumed from a checkpoint written after a move");
}

/* Replicas 2 -> 1 at the same global batch: the micro-batches follow the
 * checkpoint's micro-batch size, and the result is the same bits (1 and 2
 * divide the gradient groups). 3 replicas do not divide G = 4: accepted,
 * said, and equal to rounding. */
Test(resume, other_replica_counts)
{
    const char *m = "m.graph --data synthetic:512:24:5 --no-pin --batch 48 --shuffle --optimizer adamw --steps 16";
    char args[1024], *o;
    snprintf(args, sizeof args, "%s --quiet --stages 1 --micro-batches 24 --save ref.st", m);
    ok(args);
    snprintf(args, sizeof args, "%s --quiet --stages 1 --replicas 2 --micro-batches 12 --checkpoint-dir ck "
             "--checkpoint-every 6 --keep 0", m);
    ok(args);
    snprintf(args, sizeof args, "%s --stages 2 --replicas 1 --resume ck/step-00000006 --save r1.st", m);
    cr_assert_eq(run(args, &o), 0, "%s", o);
    cr_assert(strstr(o, "resuming on 1 replica where the checkpoint's run had 2: the same global batch 48, 24 "
                        "micro-batches of 2 per replica; bit-identical"), "%s", o);
    free(o);
    same_bytes("r1.st", "ref.st", "2 replicas resumed on 1");
    snprintf(args, sizeof args, "%s --stages 1 --replicas 3 --resume ck/step-00000006 --save r3.st", m);
    cr_assert_eq(run(args, &o), 0, "%s", o);
    cr_assert(strstr(o, "resuming on 3 replicas") && strstr(o, "equal to rounding only"), "%s", o);
    free(o);
    /* Within rounding: every element within 1e-4 of its tensor's largest. */
    char pa[160], pb[160], why[256];
    snprintf(pa, sizeof pa, "%s/r3.st", dir);
    snprintf(pb, sizeof pb, "%s/ref.st", dir);
    cr_assert(test_compare_tensors(pa, pb, 1e-4, 1e-7, why, sizeof why), "3 replicas: %s", why);
}

/* ---- refusals: before anything runs, naming what differs; nothing is
 * overwritten (the --save file and the checkpoint directory stay as they
 * were) ---- */

static void flip_byte(const char *name, long from_end)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "r+b");
    cr_assert_not_null(f);
    fseek(f, -from_end, SEEK_END);
    int c = fgetc(f);
    fseek(f, -from_end, SEEK_END);
    fputc(c ^ 0x10, f);
    fclose(f);
}

static void refused(const char *args, const char *must_say, const char *must_say2)
{
    char full[1024], *o;
    size_t n0, n1;
    char *before = slurp("keep.st", &n0);
    snprintf(full, sizeof full, MLP " --optimizer adamw --steps 12 --save keep.st %s", args);
    int rc = run(full, &o);
    cr_assert_eq(rc, 1, "%s: exit %d\n%s", args, rc, o);
    cr_assert(strstr(o, must_say), "%s: the message lacks \"%s\":\n%s", args, must_say, o);
    cr_assert(!must_say2 || strstr(o, must_say2), "%s: the message lacks \"%s\":\n%s", args, must_say2, o);
    cr_assert(!strstr(o, "epoch 1"), "%s: trained before refusing:\n%s", args, o);
    char *after = slurp("keep.st", &n1);
    cr_assert(n0 == n1 && !memcmp(before, after, n0), "%s: --save's file was overwritten", args);
    free(before);
    free(after);
    free(o);
}

Test(resume, refuses_corrupt_truncated_incomplete_mismatched_and_weights_only)
{
    ok(MLP " --optimizer adamw --steps 12 --stages 2 --checkpoint-dir ck --checkpoint-every 4 --keep 0 --save keep.st");
    cr_assert_eq(system("cd /tmp && true"), 0);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "cd '%s' && cp -r ck/step-00000004 bad && cp -r ck/step-00000004 cut && "
             "cp -r ck/step-00000004 other && mkdir -p inc/step-00000009 && cp -r ck/step-00000008 inc/ && "
             "rm inc/step-00000008/manifest.json", dir);
    cr_assert_eq(system(cmd), 0);
    /* A bit flipped in the last tensor's data: the file and the tensor are named. */
    flip_byte("bad/optimizer.safetensors", 3);
    refused("--resume bad", "bad/optimizer.safetensors: corrupt: tensor '", "does not match its CRC-32");
    /* Cut short: the file and the tensor that runs past its end. */
    snprintf(cmd, sizeof cmd, "cd '%s' && truncate -s 3000 cut/model.safetensors", dir);
    cr_assert_eq(system(cmd), 0);
    refused("--resume cut", "cut/model.safetensors: truncated", "run past the end");
    /* No manifest: incomplete, never loaded. */
    refused("--resume inc", "no complete checkpoint there", "incomplete: step-00000009, step-00000008");
    refused("--resume inc/step-00000008", "no complete checkpoint there", NULL);
    /* Another graph (a layer of another width), another batch, another optimizer. */
    write_file("m2.graph", "graph resume_mlp\ninput x : f32[24]\nlabel y : i32[]\n"
                           "h1 = linear(x, out=32) as fc1\na1 = relu(h1)\nh2 = linear(a1, out=16) as fc2\n"
                           "a2 = relu(h2)\nlogits = linear(a2, out=5) as head\n"
                           "loss = softmax_cross_entropy(logits, y)\n");
    char *o;
    cr_assert_eq(run("m2.graph --data synthetic:512:24:5 --no-pin --quiet --batch 48 --micro-batches 6 --shuffle "
                     "--optimizer adamw --steps 12 --resume ck", &o), 1);
    cr_assert(strstr(o, "another graph") && strstr(o, "hash"), "%s", o);
    free(o);
    refused("--resume ck --batch 96", "--batch (the global batch): checkpoint 48, this run 96", NULL);
    refused("--resume ck --micro-batches 3", "micro-batch size", "checkpoint 8 samples, this run 16");
    refused("--resume ck --optimizer sgd --lr 0.001 --weight-decay 0.01", "--optimizer: checkpoint adamw, this run sgd",
            NULL);
    /* A weights-only file: use --init-from. */
    refused("--resume keep.st", "weights-only", "Use --init-from keep.st");
    /* The checkpoint directory itself is untouched by the refusals. */
    cr_assert(exists("inc/step-00000008/model.safetensors") && exists("ck/step-00000012/manifest.json"));
}

/* --keep K keeps the newest K; an incomplete checkpoint (a run that died
 * while writing) is never taken by --resume DIR and is removed by the next
 * writer. */
Test(resume, keep_and_incomplete_checkpoints)
{
    ok(MLP " --steps 12 --stages 1 --checkpoint-dir ck --checkpoint-every 3 --keep 2");
    cr_assert(!exists("ck/step-00000003") && !exists("ck/step-00000006") && exists("ck/step-00000009/manifest.json") &&
              exists("ck/step-00000012/manifest.json"), "--keep 2 should leave steps 9 and 12");
    char cmd[256];
    snprintf(cmd, sizeof cmd, "cd '%s' && cp -r ck/step-00000012 ck/step-00000099 && rm ck/step-00000099/manifest.json",
             dir);
    cr_assert_eq(system(cmd), 0);
    char *o;
    cr_assert_eq(run(MLP " --steps 12 --stages 1 --resume ck", &o), 0, "%s", o);
    cr_assert(!strstr(o, "epoch"), "resumed at the last step: nothing to train\n%s", o);
    free(o);
    cr_assert_eq(run(MLP " --steps 14 --stages 1 --resume ck/step-00000012 --checkpoint-dir ck", &o), 0, "%s", o);
    free(o);
    cr_assert(!exists("ck/step-00000099"), "the incomplete checkpoint should be removed");
}

/* The step of the newest complete checkpoint in dir/sub, -1: none. */
static long newest_complete(const char *sub)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, sub);
    DIR *d = opendir(path);
    long newest = -1;
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        long s;
        char m[1400];
        snprintf(m, sizeof m, "%s/%s/manifest.json", sub, e->d_name);
        if (sscanf(e->d_name, "step-%ld", &s) == 1 && s > newest && exists(m)) newest = s;
    }
    if (d) closedir(d);
    return newest;
}

/* SIGTERM (PW_TEST_FAULT=term: raised after step 7, as a scheduler's
 * preemption would): the step finishes, a complete checkpoint of step 7 is
 * written, the exit status is 75, --save is skipped, no temp file is
 * left; resuming on another layout matches the uninterrupted run. The same
 * with a real SIGTERM from outside, at whatever step it lands. */
Test(resume, sigterm_checkpoints_and_exits_resumable)
{
    const char *m = MLP " --optimizer adamw --lr-schedule cosine --warmup 4 --steps 24";
    char args[1024], *o;
    snprintf(args, sizeof args, "%s --stages 1 --save ref.st", m);
    ok(args);
    snprintf(args, sizeof args, "%s --stages 2 --checkpoint-dir ck --save never.st", m);
    cr_assert_eq(run_env("PW_TEST_FAULT=term:0:7", args, &o), 75, "%s", o);
    cr_assert(strstr(o, "interrupted by SIGTERM at step 7") && strstr(o, "checkpointed at step 7"), "%s", o);
    free(o);
    cr_assert(exists("ck/step-00000007/manifest.json") && !exists("never.st"));
    char cmd[256];
    snprintf(cmd, sizeof cmd, "cd '%s' && ! ls -R | grep -q '\\.tmp\\.'", dir);
    cr_assert_eq(system(cmd), 0, "a temp file is left");
    snprintf(args, sizeof args, "%s --stages 3 --resume ck --save r.st", m);
    ok(args);
    same_bytes("r.st", "ref.st", "resumed after SIGTERM");

    /* From outside: a long constant-lr run, SIGTERM once a checkpoint exists. */
    char cmd2[2048];
    const char *lm = "m.graph --data synthetic:4096:24:5 --no-pin --quiet --batch 48 --micro-batches 6 --shuffle "
                     "--optimizer adamw";
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        char bin[512];
        snprintf(bin, sizeof bin, "%s/pipeline-run", PW_BINARY_DIR);
        if (chdir(dir) != 0) _exit(99);
        if (!freopen("/dev/null", "w", stdout)) _exit(99);
        snprintf(cmd2, sizeof cmd2, "exec '%s' %s --stages 2 --steps 1000000 --checkpoint-dir live "
                 "--checkpoint-every 20", bin, lm);
        execl("/bin/sh", "sh", "-c", cmd2, (char *)NULL);
        _exit(99);
    }
    int i = 0;
    while (i++ < 600 && newest_complete("live") < 0) usleep(50000);
    const long first = newest_complete("live");
    kill(pid, SIGTERM);
    int st = 0;
    waitpid(pid, &st, 0);
    cr_assert_gt(first, 0, "no checkpoint within 30 s");
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 75, "exit status %d (want 75)", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    /* The newest checkpoint is the step it stopped at. */
    const long newest = newest_complete("live");
    cr_assert_geq(newest, first);
    snprintf(args, sizeof args, "live/step-%08ld/manifest.json", newest);
    cr_assert(exists(args), "the signal's checkpoint %s is incomplete", args);
    snprintf(args, sizeof args, "%s --stages 1 --steps %ld --save ref2.st", lm, newest + 3);
    ok(args);
    snprintf(args, sizeof args, "%s --stages 2 --steps %ld --resume live --save r2.st", lm, newest + 3);
    ok(args);
    same_bytes("r2.st", "ref2.st", "resumed after an outside SIGTERM");
}

/* --max-restarts: the run is SIGKILLed after step 13 (PW_TEST_FAULT=kill;
 * a restarted run does not fail again); the supervisor says so, restarts
 * from the newest complete checkpoint (step 12's, or step 8's when the
 * kill came while step 12's was still being written in the background),
 * and the final weights are the uninterrupted run's. */
Test(resume, max_restarts_restarts_from_the_last_checkpoint)
{
    const char *m = MLP " --optimizer adamw --steps 24";
    char args[1024], *o;
    snprintf(args, sizeof args, "%s --stages 1 --save ref.st", m);
    ok(args);
    snprintf(args, sizeof args, "%s --stages 2 --checkpoint-dir ck --checkpoint-every 4 --max-restarts 2 --save r.st", m);
    cr_assert_eq(run_env("PW_TEST_FAULT=kill:0:13 PW_RESTART_BACKOFF=0.05", args, &o), 0, "%s", o);
    cr_assert(strstr(o, "supervisor: run 1 ended with killed by signal 9") &&
              (strstr(o, "restart 1 of 2 in 0.1 s from ck/step-00000012 (step 12)") ||
               strstr(o, "restart 1 of 2 in 0.1 s from ck/step-00000008 (step 8)")), "%s", o);
    free(o);
    same_bytes("r.st", "ref.st", "restarted after a SIGKILL");
    /* Every run fails: it gives up after N restarts, with the failure's status. */
    snprintf(args, sizeof args, "%s --stages 1 --checkpoint-dir ck2 --max-restarts 1 --data nosuch:x", m);
    cr_assert_eq(run_env("PW_RESTART_BACKOFF=0", args, &o), 1, "%s", o);
    cr_assert(strstr(o, "giving up after 1 restart"), "%s", o);
    free(o);
    cr_assert_eq(run(MLP " --steps 4 --max-restarts 2", &o), 2, "%s", o);
    cr_assert(strstr(o, "need --checkpoint-dir"), "%s", o);
    free(o);
}

/* SIGTERM to the supervisor (a scheduler preempting the job): passed on to
 * the training child, which checkpoints and exits 75; no restart follows,
 * and the supervisor exits 75 too. */
Test(resume, sigterm_to_the_supervisor_stops_without_a_restart)
{
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        char cmd[2048];
        if (chdir(dir) != 0) _exit(99);
        snprintf(cmd, sizeof cmd, "exec '%s/pipeline-run' m.graph --data synthetic:4096:24:5 --no-pin --quiet "
                 "--batch 48 --steps 1000000 --checkpoint-dir ck --checkpoint-every 20 --max-restarts 3 "
                 ">out.txt 2>&1", PW_BINARY_DIR);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(99);
    }
    int i = 0;
    while (i++ < 600 && newest_complete("ck") < 0) usleep(50000);
    const long first = newest_complete("ck");
    kill(pid, SIGTERM);
    int st = 0;
    waitpid(pid, &st, 0);
    cr_assert_gt(first, 0, "no checkpoint within 30 s");
    size_t n;
    char *out = slurp("out.txt", &n);
    out = realloc(out, n + 1);
    out[n] = '\0';
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 75, "exit status %d (want 75)\n%s",
              WIFEXITED(st) ? WEXITSTATUS(st) : -1, out);
    cr_assert(strstr(out, "checkpointed at step") && !strstr(out, "supervisor:"), "%s", out);
    free(out);
}

/* What the files hold: the manifest's fields, PyTorch's optimizer state
 * names and shapes, and model.safetensors = what --save writes. */
Test(resume, files_and_manifest)
{
    ok(MLP " --optimizer adamw --steps 12 --stages 2 --checkpoint-dir ck --save s.st");
    same_bytes("ck/step-00000012/model.safetensors", "s.st", "model.safetensors vs --save");
    char path[256];
    snprintf(path, sizeof path, "%s/ck/step-00000012/optimizer.safetensors", dir);
    pw_safetensors *f;
    cr_assert_eq(pw_safetensors_open(path, &f), PW_OK, "%s", pw_last_error());
    pw_st_tensor t;
    cr_assert_eq(pw_safetensors_get(f, "fc1.weight.exp_avg", &t), PW_OK);
    cr_assert(t.shape.ndim == 2 && t.shape.d[0] == 32 && t.shape.d[1] == 24);
    cr_assert_eq(pw_safetensors_get(f, "head.bias.exp_avg_sq", &t), PW_OK);
    cr_assert_eq(pw_safetensors_count(f), 12);
    pw_safetensors_close(f);
    snprintf(path, sizeof path, "%s/ck/step-00000012/manifest.json", dir);
    json_error_t je;
    json_t *m = json_load_file(path, 0, &je);
    cr_assert_not_null(m, "%s", je.text);
    cr_assert_str_eq(json_string_value(json_object_get(m, "format")), "pipewright-train-state-1");
    cr_assert_eq(json_integer_value(json_object_get(m, "step")), 12);
    cr_assert_eq(json_integer_value(json_object_get(m, "epoch")), 1);
    cr_assert_eq(json_integer_value(json_object_get(m, "step_in_epoch")), 2);
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(m, "layout"), "stages")), 2);
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(m, "run"), "micro_batch")), 8);
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(m, "optimizer"), "step")), 12);
    cr_assert_eq(strlen(json_string_value(json_object_get(json_object_get(m, "graph"), "hash"))), 16);
    json_t *files = json_object_get(m, "files");
    cr_assert_eq(json_array_size(files), 2);
    cr_assert_eq(strlen(json_string_value(json_object_get(json_array_get(files, 0), "crc32"))), 8);
    json_decref(m);
}
