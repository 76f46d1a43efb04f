/* graph_trainer — a trainer of its own over a graph file: pipewright's
 * graph programs (pw_program) run by the engine, without pw_pipeline.
 *
 * The graph is cut into the schedule's chunks (its `cut` markers when they
 * give that many, else a FLOP-balanced split); each chunk of each replica is
 * one pw_program, wrapped by pw_program_stage (ports, data, loss) into an
 * engine chunk; the runner builds the schedule and the engine from a name.
 *
 *     graph_trainer examples/fashion_mlp.graph --schedule 1f1b --stages 2 --micro-batches 4
 *     graph_trainer examples/fashion_mlp.graph --data fashion-mnist --steps 200 --replicas 2
 *
 * Then, unless --no-check, it trains again on one stage (GPipe, the same
 * batch, micro-batches and replicas) and checks that the parameters are
 * the same bits. Exit status: 0 ok, 1 the runs differ, 2 bad usage or a
 * failed run. examples/README.md describes it.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pipewright/pipewright.h>

typedef struct trainer {
    const pw_graph *g;
    const pw_dataset *data;
    int64_t batch;
    uint64_t seed;
    pw_optim_config optim;
    int *cuts;                  /* [n_chunks + 1]: chunk c runs nodes [cuts[c], cuts[c+1]) */
    int n_chunks, replicas;
    pw_program **progs;         /* [replicas × n_chunks], replica-major */
    pw_program_stage **stages;
} trainer;

/* The cuts, on the first chunk the runner asks for (it knows the schedule's
 * chunk count by then). A parameter tied across two chunks is refused:
 * pw_program_stage does not sum its uses across chunks (pw_pipeline does). */
static pw_status plan(trainer *t, const pw_chunk_spec *c)
{
    pw_partition part;
    PW_CHECK(pw_partition_make(t->g, c->n_chunks, PW_PARTITION_AUTO, &part));
    t->n_chunks = c->n_chunks;
    t->replicas = c->replicas;
    t->cuts = malloc(((size_t)c->n_chunks + 1) * sizeof *t->cuts);
    t->progs = calloc((size_t)c->replicas * (size_t)c->n_chunks, sizeof *t->progs);
    t->stages = calloc((size_t)c->replicas * (size_t)c->n_chunks, sizeof *t->stages);
    if (!t->cuts || !t->progs || !t->stages) {
        pw_partition_free(&part);
        return pw_error(PW_ERR_NOMEM, "out of memory");
    }
    memcpy(t->cuts, part.begin, ((size_t)c->n_chunks + 1) * sizeof *t->cuts);
    pw_partition_free(&part);
    for (int p = 0; p < t->g->n_params; p++) {
        int users[16];
        int n = pw_graph_param_users(t->g, p, users, 16);
        for (int u = 1; u < n && u < 16; u++)
            for (int ch = 0; ch + 1 < t->n_chunks; ch++)
                if (users[0] < t->cuts[ch + 1] && users[u] >= t->cuts[ch + 1])
                    return pw_error(PW_ERR_UNSUPPORTED, "%s: parameter %s is tied across chunks (nodes %d and %d); "
                                    "this example cannot sum it, pipeline-run can", t->g->file,
                                    t->g->params[p].name, users[0], users[u]);
    }
    return PW_OK;
}

/* The stage table's make: one program over the chunk's nodes, with the
 * slots the schedule needs, and the stage that feeds it. */
static pw_status make(void *user, const pw_chunk_spec *c, pw_engine_chunk *out)
{
    trainer *t = user;
    if (!t->cuts) PW_CHECK(plan(t, c));
    const int i = c->replica * c->n_chunks + c->chunk;
    /* The micro-batch gradients summed as pw_pipeline sums them (pairwise
     * over groups: the same bits for 1, 2 and 4 replicas by default). */
    int K;
    pw_grad_groups(0, c->replicas, c->micro_batches, &K);
    pw_program_config pc = {
        .graph = t->g, .node_begin = t->cuts[c->chunk], .node_end = t->cuts[c->chunk + 1],
        .micro_batch = t->batch / ((int64_t)c->replicas * c->micro_batches), .loss_batch = t->batch,
        .slots = c->slots, .optim = t->optim, .micro_batches = c->micro_batches, .grad_groups = K,
    };
    PW_CHECK(pw_program_create(&pc, &t->progs[i]));
    pw_program_init_params(t->progs[i], t->seed); /* the same weights whatever the cuts */
    pw_program_stage_config sc = {
        .program = t->progs[i], .batch = t->batch, .micro_batches = c->micro_batches,
        .replica = c->replica, .replicas = c->replicas, .data = t->data, .shuffle = 1, .seed = t->seed,
    };
    pw_status st = pw_program_stage_create(&sc, &t->stages[i]);
    if (st != PW_OK) {
        pw_program_destroy(t->progs[i]);
        t->progs[i] = NULL;
        return st;
    }
    *out = pw_program_stage_chunk(t->stages[i]);
    return PW_OK;
}

static void trainer_free(trainer *t)
{
    for (int i = 0; t->progs && i < t->replicas * t->n_chunks; i++) {
        pw_program_stage_destroy(t->stages[i]);
        pw_program_destroy(t->progs[i]);
    }
    free(t->progs);
    free(t->stages);
    free(t->cuts);
    t->progs = NULL;
    t->stages = NULL;
    t->cuts = NULL;
}

/* Replica 0's parameters in graph order (a host copy). */
static float *params_of(const trainer *t, int64_t *count)
{
    const pw_graph *g = t->g;
    int64_t total = 0;
    for (int p = 0; p < g->n_params; p++) total += pw_shape_numel(&g->params[p].shape);
    float *out = malloc((size_t)total * sizeof *out + 1);
    int64_t off = 0;
    for (int p = 0; out && p < g->n_params; p++) {
        for (int ch = 0; ch < t->n_chunks; ch++) {
            pw_program *prog = t->progs[ch];
            int j = 0;
            for (; j < pw_program_n_params(prog); j++) {
                pw_program_param pp;
                pw_program_param_at(prog, j, &pp);
                if (pp.graph_param == p) break;
            }
            if (j == pw_program_n_params(prog)) continue;
            if (pw_program_param_read(prog, j, PW_PARAM_DATA, 0, out + off) != PW_OK) {
                free(out);
                return NULL;
            }
            break;
        }
        off += pw_shape_numel(&g->params[p].shape);
    }
    *count = total;
    return out;
}

typedef struct run_opts {
    const char *schedule;
    int stages, micro_batches, replicas, pin, quiet;
    int64_t steps;
    const char *trace;
} run_opts;

/* Trains a fresh model; *params gets replica 0's parameters. 0 or 2. */
static int train(trainer *t, const run_opts *o, float **params, int64_t *n_params)
{
    pw_runner_config rc = pw_runner_defaults();
    rc.schedule = o->schedule;
    rc.micro_batches = o->micro_batches;
    rc.table = (pw_stage_table){.stages = o->stages, .replicas = o->replicas, .make = make, .user = t};
    /* One gradient bucket per parameter (pw_program_stage gives a chunk's
     * parameters their own buckets when there are enough): each parameter
     * is then summed across the replicas the same way whatever the cuts,
     * so the one-stage check holds for any replica count. */
    rc.buckets = t->g->n_params;
    rc.pin = o->pin;
    rc.model = t->g->name;
    rc.micro_batch_size = t->batch / ((int64_t)o->replicas * o->micro_batches);
    if (o->trace) rc.trace_events = 64 + o->steps * 64 * (int64_t)o->micro_batches;
    pw_runner *r;
    if (pw_runner_create(&rc, &r) != PW_OK) {
        fprintf(stderr, "graph_trainer: %s\n", pw_last_error());
        trainer_free(t);
        return 2;
    }
    const int64_t positions = t->batch * pw_program_loss_positions(t->progs[t->n_chunks - 1]);
    for (int64_t s = 1; s <= o->steps; s++) {
        if (pw_runner_step(r) != PW_OK) {
            fprintf(stderr, "graph_trainer: step %lld: %s\n", (long long)s, pw_last_error());
            pw_runner_destroy(r);
            trainer_free(t);
            return 2;
        }
        /* Between steps the stages are ours to read. */
        double loss = 0.0;
        int64_t correct = 0;
        for (int k = 0; k < t->replicas; k++) {
            double l;
            int64_t c;
            if (pw_program_stage_loss(t->stages[k * t->n_chunks + t->n_chunks - 1], &l, &c)) {
                loss += l;
                correct += c;
            }
        }
        if (!o->quiet && (s <= 3 || s % 10 == 0 || s == o->steps))
            printf("  step %4lld  loss %.6f  accuracy %5.1f%%\n", (long long)s, loss / (double)positions,
                   100.0 * (double)correct / (double)positions);
    }
    if (o->trace) {
        if (pw_runner_write_trace(r, o->trace) != PW_OK) fprintf(stderr, "graph_trainer: %s\n", pw_last_error());
        else printf("graph_trainer: wrote %s (read it with: pipe-trace %s)\n", o->trace, o->trace);
    }
    pw_runner_destroy(r);
    *params = params_of(t, n_params);
    trainer_free(t);
    return *params ? 0 : 2;
}

static const char usage[] =
"usage: graph_trainer GRAPH [OPTIONS]\n"
"\n"
"Trains the graph file's model with pipewright's graph programs run by the\n"
"pipeline engine (not pw_pipeline), then checks it against one stage.\n"
"\n"
"  --schedule NAME       gpipe, 1f1b (default), interleaved, zb-h1, zb-h2, zb-v,\n"
"                        or a schedule CSV file\n"
"  --stages S            pipeline stages (default 2)\n"
"  --micro-batches M     micro-batches per step (default 4)\n"
"  --replicas R          data-parallel replicas in this process (default 1)\n"
"  --steps N             optimizer steps (default 20)\n"
"  --batch B             samples per step (default 32)\n"
"  --data SPEC           as pipeline-run --data (default synthetic:2048:DIM:CLASSES\n"
"                        from the graph's input and logits)\n"
"  --lr X                AdamW learning rate (default 1e-3)\n"
"  --trace FILE          write a Chrome trace (pipe-trace FILE)\n"
"  --no-check            skip the one-stage run and the comparison\n"
"  --no-pin              do not bind the engine's workers to cores\n"
"  --quiet               print only the check\n"
"  -h, --help            this help\n";

static int bad(const char *what, const char *arg)
{
    fprintf(stderr, "graph_trainer: %s '%s'\n(graph_trainer --help lists the options)\n", what, arg);
    return 2;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < lo || v > hi) return 0;
    *out = v;
    return 1;
}

int main(int argc, char **argv)
{
    run_opts o = {.schedule = "1f1b", .stages = 2, .micro_batches = 4, .replicas = 1, .pin = 1, .steps = 20};
    trainer t = {.batch = 32, .seed = 1, .optim = pw_optim_defaults(PW_OPTIM_ADAMW)};
    const char *spec = NULL;
    int check = 1;
    enum { O_SCHED = 256, O_STAGES, O_MICRO, O_REPL, O_STEPS, O_BATCH, O_DATA, O_LR, O_TRACE, O_NOCHECK,
           O_NOPIN, O_QUIET };
    static const struct option opts[] = {
        {"schedule", required_argument, 0, O_SCHED}, {"stages", required_argument, 0, O_STAGES},
        {"micro-batches", required_argument, 0, O_MICRO}, {"replicas", required_argument, 0, O_REPL},
        {"steps", required_argument, 0, O_STEPS}, {"batch", required_argument, 0, O_BATCH},
        {"data", required_argument, 0, O_DATA}, {"lr", required_argument, 0, O_LR},
        {"trace", required_argument, 0, O_TRACE}, {"no-check", no_argument, 0, O_NOCHECK},
        {"no-pin", no_argument, 0, O_NOPIN}, {"quiet", no_argument, 0, O_QUIET},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
    };
    int c;
    long v;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case O_SCHED: o.schedule = optarg; break;
        case O_STAGES: if (!parse_int(optarg, 1, 64, &v)) return bad("--stages: not 1-64:", optarg);
            o.stages = (int)v; break;
        case O_MICRO: if (!parse_int(optarg, 1, 4096, &v)) return bad("--micro-batches: not 1-4096:", optarg);
            o.micro_batches = (int)v; break;
        case O_REPL: if (!parse_int(optarg, 1, 64, &v)) return bad("--replicas: not 1-64:", optarg);
            o.replicas = (int)v; break;
        case O_STEPS: if (!parse_int(optarg, 1, 1000000, &v)) return bad("--steps: not 1-1000000:", optarg);
            o.steps = v; break;
        case O_BATCH: if (!parse_int(optarg, 1, 1 << 20, &v)) return bad("--batch: not 1-1048576:", optarg);
            t.batch = v; break;
        case O_DATA: spec = optarg; break;
        case O_LR: {
            char *end;
            t.optim.lr = strtof(optarg, &end);
            if (end == optarg || *end || !(t.optim.lr > 0)) return bad("--lr: not a positive number:", optarg);
            break;
        }
        case O_TRACE: o.trace = optarg; break;
        case O_NOCHECK: check = 0; break;
        case O_NOPIN: o.pin = 0; break;
        case O_QUIET: o.quiet = 1; break;
        case 'h': fputs(usage, stdout); return 0;
        default: fputs("(graph_trainer --help lists the options)\n", stderr); return 2;
        }
    }
    if (optind != argc - 1) {
        fputs(usage, stderr);
        return 2;
    }
    pw_graph *g = NULL;
    if (pw_graph_parse_file(argv[optind], &g) != PW_OK) {
        fprintf(stderr, "%s\n", pw_last_error());
        return 2;
    }
    /* Synthetic data shaped like the graph: its input's size, and the
     * classes of the logits the loss reads. */
    char synth[96];
    if (!spec) {
        int64_t classes = 10;
        for (int i = 0; i < g->n_nodes; i++)
            if (g->nodes[i].output == g->loss) {
                const pw_shape *s = &g->values[g->nodes[i].inputs[0]].shape;
                classes = s->d[s->ndim - 1];
            }
        snprintf(synth, sizeof synth, "synthetic:2048:%lld:%lld",
                 (long long)pw_shape_numel(&g->values[g->input].shape), (long long)classes);
        spec = synth;
    }
    pw_dataset *d = NULL;
    if (pw_dataset_from_spec_for_graph(spec, 1, g, &d) != PW_OK) {
        fprintf(stderr, "graph_trainer: %s\n", pw_last_error());
        pw_graph_destroy(g);
        return 2;
    }
    t.g = g;
    t.data = d;
    if (!o.quiet)
        printf("graph_trainer: %s (%d nodes) on %s, batch %lld = %d replica%s x %d micro-batches\n"
               "graph_trainer: %s on %d stage%s, %lld steps\n", g->name, g->n_nodes, d->name,
               (long long)t.batch, o.replicas, o.replicas > 1 ? "s" : "", o.micro_batches, o.schedule,
               o.stages, o.stages > 1 ? "s" : "", (long long)o.steps);
    float *got = NULL, *ref = NULL;
    int64_t n = 0, n_ref = 0;
    int rc = train(&t, &o, &got, &n);
    if (rc == 0 && check) {
        run_opts one = o;
        one.schedule = "gpipe";
        one.stages = 1;
        one.trace = NULL;
        one.quiet = 1;
        rc = train(&t, &one, &ref, &n_ref);
    }
    if (rc == 0 && check) {
        int64_t first = -1, ndiff = 0;
        for (int64_t i = 0; i < n; i++)
            if (memcmp(&got[i], &ref[i], sizeof *got) != 0) {
                if (first < 0) first = i;
                ndiff++;
            }
        if (ndiff) {
            printf("MISMATCH: %lld of %lld parameters differ from the 1-stage run's (first [%lld]: %.9g vs %.9g)\n",
                   (long long)ndiff, (long long)n, (long long)first, got[first], ref[first]);
            rc = 1;
        } else {
            printf("checked: the %lld parameters of %s after %lld steps of %s on %d stage%s (%d replica%s) equal "
                   "the 1-stage run's bit for bit\n", (long long)n, g->name, (long long)o.steps, o.schedule,
                   o.stages, o.stages > 1 ? "s" : "", o.replicas, o.replicas > 1 ? "s" : "");
        }
    }
    free(got);
    free(ref);
    pw_dataset_destroy(d);
    pw_graph_destroy(g);
    return rc;
}
