/* pipeline-run — train a graph file (one stage for now; the pipeline engine
 * adds --stages N > 1 and --schedule).
 *
 *   pipeline-run examples/fashion_mlp.graph --epochs 3
 *
 * Exit status: 0 success, 1 a run-time error (bad file, numeric failure),
 * 2 bad command line. Every error is one message on stderr. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/log.h"
#include "stages/checkpoint.h"
#include "stages/cpu/ops.h"
#include "stages/data.h"
#include "stages/trainer.h"

typedef struct options {
    const char *graph;
    int64_t epochs, steps;
    int64_t batch;
    int micro_batches;
    int stages;
    pw_optim_config optim;
    int lr_set, momentum_set, wd_set;
    uint64_t seed;
    const char *data;
    int shuffle;
    const char *save;
    const char *init_from;
    int quiet;
    int threads;
    int print_graph;
} options;

static void usage(FILE *f)
{
    fputs(
"usage: pipeline-run GRAPH [options]\n"
"\n"
"Train the model described by the graph file GRAPH (see docs/graph-format.md).\n"
"\n"
"Length of training (default: --epochs 3)\n"
"  --epochs N            passes over the training set\n"
"  --steps N             optimizer steps instead (overrides --epochs)\n"
"\n"
"Batching\n"
"  --batch B             samples per optimizer step, the global batch (default 64)\n"
"  --micro-batches M     split each batch into M micro-batches of B/M samples;\n"
"                        the update equals one batch of B (default 1)\n"
"  --stages S            pipeline stages (only 1 in this version)\n"
"\n"
"Optimizer\n"
"  --optimizer NAME      sgd (default) or adamw\n"
"  --lr X                learning rate (sgd 0.05, adamw 0.001)\n"
"  --momentum X          SGD momentum (default 0.9)\n"
"  --weight-decay X      decoupled for adamw (default 0.01), L2 for sgd (default 0);\n"
"                        applies to weight matrices, not biases or norms\n"
"\n"
"Data\n"
"  --data SPEC           fashion-mnist (default; Debian package dataset-fashion-mnist)\n"
"                        idx:TRAIN_IMAGES,TRAIN_LABELS[,TEST_IMAGES,TEST_LABELS]\n"
"                        synthetic[:N[:DIM[:CLASSES]]]\n"
"  --shuffle             reshuffle the training set every epoch (seeded)\n"
"  --seed N              seed for parameters and shuffling (default 1)\n"
"\n"
"Checkpoints (safetensors, names from the graph, PyTorch layouts)\n"
"  --init-from FILE      start from these weights instead of the seeded init\n"
"  --save FILE           write the trained weights at the end (atomically)\n"
"\n"
"Other\n"
"  --threads N           BLAS threads (default: the BLAS library's choice)\n"
"  --print-graph         print the parsed graph with shapes and costs, then train\n"
"  --quiet               only errors and the final result\n"
"  --help                this text\n"
"\n"
"Logging: PW_DEBUG=INFO|TRACE and PW_DEBUG_SUBSYS=GRAPH,TRAIN,MEM,... in the\n"
"environment.\n", f);
}

static int bad_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "pipeline-run: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\nTry 'pipeline-run --help'.\n");
    return 2;
}

static int parse_i64(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "pipeline-run: %s wants an integer in [%lld, %lld], got '%s'\n", flag,
                (long long)lo, (long long)hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_f32(const char *flag, const char *s, double lo, double hi, float *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "pipeline-run: %s wants a number in [%g, %g], got '%s'\n", flag, lo, hi,
                s);
        return -1;
    }
    *out = (float)v;
    return 0;
}

enum { OPT_EPOCHS = 256, OPT_STEPS, OPT_BATCH, OPT_MICRO, OPT_STAGES, OPT_OPTIM, OPT_LR,
       OPT_MOMENTUM, OPT_WD, OPT_SEED, OPT_DATA, OPT_SHUFFLE, OPT_SAVE, OPT_INIT, OPT_QUIET,
       OPT_THREADS, OPT_PRINT, OPT_HELP };

/* Returns 0 to run, 1 when --help was printed, 2 on a usage error. */
static int parse_args(int argc, char **argv, options *o)
{
    static const struct option longopts[] = {
        {"epochs", required_argument, 0, OPT_EPOCHS},
        {"steps", required_argument, 0, OPT_STEPS},
        {"batch", required_argument, 0, OPT_BATCH},
        {"micro-batches", required_argument, 0, OPT_MICRO},
        {"stages", required_argument, 0, OPT_STAGES},
        {"optimizer", required_argument, 0, OPT_OPTIM},
        {"lr", required_argument, 0, OPT_LR},
        {"momentum", required_argument, 0, OPT_MOMENTUM},
        {"weight-decay", required_argument, 0, OPT_WD},
        {"seed", required_argument, 0, OPT_SEED},
        {"data", required_argument, 0, OPT_DATA},
        {"shuffle", no_argument, 0, OPT_SHUFFLE},
        {"save", required_argument, 0, OPT_SAVE},
        {"init-from", required_argument, 0, OPT_INIT},
        {"quiet", no_argument, 0, OPT_QUIET},
        {"threads", required_argument, 0, OPT_THREADS},
        {"print-graph", no_argument, 0, OPT_PRINT},
        {"help", no_argument, 0, OPT_HELP},
        {0, 0, 0, 0},
    };
    memset(o, 0, sizeof *o);
    o->epochs = 3;
    o->batch = 64;
    o->micro_batches = 1;
    o->stages = 1;
    o->seed = 1;
    o->data = "fashion-mnist";
    pw_optim_kind kind = PW_OPTIM_SGD;
    float lr = 0, momentum = 0, wd = 0;
    int64_t v;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_EPOCHS:
            if (parse_i64("--epochs", optarg, 1, 1000000, &o->epochs)) return 2;
            break;
        case OPT_STEPS:
            if (parse_i64("--steps", optarg, 1, INT64_MAX / 2, &o->steps)) return 2;
            break;
        case OPT_BATCH:
            if (parse_i64("--batch", optarg, 1, 1 << 24, &o->batch)) return 2;
            break;
        case OPT_MICRO:
            if (parse_i64("--micro-batches", optarg, 1, 1 << 20, &v)) return 2;
            o->micro_batches = (int)v;
            break;
        case OPT_STAGES:
            if (parse_i64("--stages", optarg, 1, 4096, &v)) return 2;
            o->stages = (int)v;
            break;
        case OPT_OPTIM:
            if (pw_optim_parse_kind(optarg, &kind) != PW_OK)
                return bad_usage("--optimizer: '%s' is not sgd or adamw", optarg);
            break;
        case OPT_LR:
            if (parse_f32("--lr", optarg, 0.0, 1e3, &lr)) return 2;
            o->lr_set = 1;
            break;
        case OPT_MOMENTUM:
            if (parse_f32("--momentum", optarg, 0.0, 0.999999, &momentum)) return 2;
            o->momentum_set = 1;
            break;
        case OPT_WD:
            if (parse_f32("--weight-decay", optarg, 0.0, 1e3, &wd)) return 2;
            o->wd_set = 1;
            break;
        case OPT_SEED:
            if (parse_i64("--seed", optarg, 0, INT64_MAX, &v)) return 2;
            o->seed = (uint64_t)v;
            break;
        case OPT_DATA: o->data = optarg; break;
        case OPT_SHUFFLE: o->shuffle = 1; break;
        case OPT_SAVE: o->save = optarg; break;
        case OPT_INIT: o->init_from = optarg; break;
        case OPT_QUIET: o->quiet = 1; break;
        case OPT_THREADS:
            if (parse_i64("--threads", optarg, 1, 1024, &v)) return 2;
            o->threads = (int)v;
            break;
        case OPT_PRINT: o->print_graph = 1; break;
        case 'h':
        case OPT_HELP: usage(stdout); return 1;
        case ':': return bad_usage("%s needs a value", argv[optind - 1]);
        default: {
            const char *arg = argv[optind - 1];
            if (optopt) {
                static char buf[8];
                snprintf(buf, sizeof buf, "-%c", optopt);
                arg = buf;
            }
            /* getopt_long reports a missing argument as '?' with opterr = 0. */
            for (const struct option *lo = longopts; lo->name; lo++)
                if (optopt == lo->val && lo->has_arg == required_argument)
                    return bad_usage("--%s needs a value", lo->name);
            return bad_usage("unknown option '%s'", arg);
        }
        }
    }
    if (optind >= argc) return bad_usage("%s", "no graph file given (usage: pipeline-run GRAPH [options])");
    if (optind + 1 < argc) return bad_usage("unexpected argument '%s' (one graph file only)", argv[optind + 1]);
    o->graph = argv[optind];
    o->optim = pw_optim_defaults(kind);
    if (o->lr_set) o->optim.lr = lr;
    if (o->momentum_set) {
        if (kind != PW_OPTIM_SGD) return bad_usage("%s", "--momentum applies to --optimizer sgd only");
        o->optim.momentum = momentum;
    }
    if (o->wd_set) o->optim.weight_decay = wd;
    if (o->stages != 1) {
        fprintf(stderr, "pipeline-run: --stages %d: this version trains on one stage only; the "
                "pipeline engine is not built yet\n", o->stages);
        return 2;
    }
    if (o->batch % o->micro_batches != 0) {
        fprintf(stderr, "pipeline-run: --batch %lld is not divisible by --micro-batches %d\n",
                (long long)o->batch, o->micro_batches);
        return 2;
    }
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void fmt_time(double s, char *buf, size_t n)
{
    if (!(s >= 0) || s > 1e7) {
        snprintf(buf, n, "--:--");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else snprintf(buf, n, "%ld:%02ld", t / 60, t % 60);
}

static int fail(const char *what)
{
    fprintf(stderr, "pipeline-run: %s%s\n", what, pw_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    options o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc == 1 ? 0 : rc;
    if (o.threads) pw_cpu_set_threads(o.threads);

    pw_graph *g = NULL;
    pw_dataset *train = NULL, *test = NULL;
    pw_trainer *t = NULL;
    int status = 1;

    if (pw_graph_parse_file(o.graph, &g) != PW_OK) {
        fprintf(stderr, "%s\n", pw_last_error());
        goto out;
    }
    if (o.print_graph) pw_graph_print(g, stdout);
    if (pw_dataset_from_spec(o.data, 1, &train) != PW_OK) {
        fail("--data: ");
        goto out;
    }
    if (pw_dataset_spec_has_test(o.data)) {
        if (pw_dataset_from_spec(o.data, 0, &test) != PW_OK) {
            fail("--data (test set): ");
            goto out;
        }
    } else if (!o.quiet) {
        printf("pipeline-run: --data %s has no test set; accuracy is not reported\n", o.data);
    }

    pw_trainer_config tc = {
        .graph = g, .train = train, .batch = o.batch, .micro_batches = o.micro_batches,
        .optim = o.optim, .seed = o.seed, .shuffle = o.shuffle,
    };
    if (pw_trainer_create(&tc, &t) != PW_OK) {
        fail("");
        goto out;
    }
    pw_program *prog = pw_trainer_program(t);
    if (o.init_from) {
        if (pw_checkpoint_load(o.init_from, g, &prog, 1, NULL) != PW_OK) {
            fail("--init-from: ");
            goto out;
        }
    }

    const int64_t spe = pw_trainer_steps_per_epoch(t);
    const int64_t total = o.steps ? o.steps : o.epochs * spe;
    const int64_t n_epochs = (total + spe - 1) / spe;
    const int tty = isatty(STDOUT_FILENO) && !o.quiet;
    if (!o.quiet) {
        pw_program_memory mem;
        pw_program_memory_usage(prog, &mem);
        pw_op_cost cost;
        pw_graph_total_cost(g, &cost);
        printf("pipeline-run: %s: %d nodes, %d parameter tensors (%.2f M values), %.1f MiB planned\n",
               g->name, g->n_nodes, g->n_params, (double)cost.param_bytes / 4e6,
               (double)mem.total / (1 << 20));
        printf("pipeline-run: data %s: %lld train / %lld test samples; batch %lld = %d x %lld; "
               "%s lr %g; %lld steps (%lld per epoch)\n",
               train->name, (long long)train->n, test ? (long long)test->n : 0LL,
               (long long)o.batch, o.micro_batches, (long long)(o.batch / o.micro_batches),
               pw_optim_name(o.optim.kind), (double)o.optim.lr, (long long)total, (long long)spe);
        fflush(stdout);
    }

    double t0 = now_s(), last_print = t0;
    double epoch_loss = 0.0;
    int64_t epoch_steps = 0;
    pw_step_stats s = {0};
    pw_eval_stats ev = {0};
    int64_t print_every = spe / 10 > 0 ? spe / 10 : 1;
    for (int64_t i = 0; i < total; i++) {
        if (pw_trainer_step(t, &s) != PW_OK) {
            if (tty) printf("\n");
            fail("");
            goto out;
        }
        epoch_loss += s.loss;
        epoch_steps++;
        double now = now_s();
        double rate = (double)(i + 1) * (double)o.batch / (now - t0);
        int epoch_done = s.step_in_epoch == spe || i + 1 == total;
        if (!o.quiet && (tty ? (now - last_print > 0.1 || epoch_done)
                             : ((i + 1) % print_every == 0 || epoch_done))) {
            char eta[32];
            fmt_time((double)(total - i - 1) * (double)o.batch / rate, eta, sizeof eta);
            printf("%sepoch %lld/%lld  step %lld/%lld  loss %.4f  %.0f samples/s  ETA %s%s",
                   tty ? "\r\033[K" : "", (long long)s.epoch + 1, (long long)n_epochs,
                   (long long)s.step_in_epoch, (long long)spe, s.loss, rate, eta, tty ? "" : "\n");
            fflush(stdout);
            last_print = now;
        }
        if (epoch_done) {
            if (tty) printf("\n");
            if (test && pw_trainer_evaluate(t, test, &ev) != PW_OK) {
                fail("evaluation: ");
                goto out;
            }
            if (!o.quiet) {
                printf("epoch %lld: train loss %.4f", (long long)s.epoch + 1,
                       epoch_loss / (double)epoch_steps);
                if (test)
                    printf("  test loss %.4f  test accuracy %.2f%%", ev.loss, 100.0 * ev.accuracy);
                printf("  (%.1f s)\n", now_s() - t0);
                fflush(stdout);
            }
            epoch_loss = 0.0;
            epoch_steps = 0;
        }
    }
    if (o.save) {
        char extra[256];
        snprintf(extra, sizeof extra, "data=%s batch=%lld micro_batches=%d optimizer=%s lr=%g",
                 o.data, (long long)o.batch, o.micro_batches, pw_optim_name(o.optim.kind),
                 (double)o.optim.lr);
        pw_checkpoint_info info = {.step = s.step, .epoch = s.epoch + 1, .seed = o.seed,
                                   .extra = extra};
        if (pw_checkpoint_save(o.save, g, &prog, 1, &info) != PW_OK) {
            fail("--save: ");
            goto out;
        }
        if (!o.quiet) printf("saved %s\n", o.save);
    }
    printf("done: %lld steps in %.1f s; final train loss %.4f", (long long)s.step, now_s() - t0,
           s.loss);
    if (test) printf("; test accuracy %.2f%%", 100.0 * ev.accuracy);
    printf("\n");
    status = 0;
out:
    pw_trainer_destroy(t);
    pw_dataset_destroy(train);
    pw_dataset_destroy(test);
    pw_graph_destroy(g);
    return status;
}
