/* pipeline-run — train a graph file through a pipeline of stages.
 *
 *   pipeline-run examples/fashion_mlp.graph --stages 2 --micro-batches 8 --schedule 1f1b
 *   pipeline-run m.graph --stages 2 --replicas 2                (4 workers, one process)
 *   mpirun -np 4 pipeline-run m.graph --stages 2 --replicas 2   (one process per worker)
 *
 * Exit status: 0 success, 1 a run-time error (bad file, numeric failure),
 * 2 bad command line, 75 interrupted by a signal after writing a
 * checkpoint (--checkpoint-dir: resumable), 128 + the signal otherwise.
 * Every error is one message on stderr. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "graph/graph.h"
#include "runtime/log.h"
#include "runtime/tmpfile.h"
#include "runtime/topology.h"
#include "runtime/trace.h"
#include "runtime/transport.h"
#include "stages/train/ps.h"
#include "stages/ops/backend.h"
#include "stages/train/checkpoint.h"
#include "stages/ops/cpu/gemm.h"
#include "stages/ops/cpu/ops.h"
#include "stages/train/data.h"
#include "stages/plan/forecast.h"
#include "stages/train/generate.h"
#include "stages/train/pipeline.h"
#include "stages/train/pipeline_metrics.h"
#include "stages/plan/plan.h"
#include "stages/plan/profile.h"
#include "stages/program/program.h"
#include "stages/train/trainer.h"
#include "stages/train/state.h"
#include "pipeline-run/rebalance.h"
#include "pipeline-run/startup.h"
#include "pipeline-run/supervise.h"
#include "pipeline-run/parallel.h"
#ifdef PW_HAVE_CUDA
#include "stages/ops/cuda/backend_cuda.h"
#include "stages/ops/cuda/device.h"
#endif

typedef struct options {
    const char *graph;
    int64_t epochs, steps;
    int64_t batch;
    int micro_batches;
    int stages;
    int stages_default;          /* --stages not given: default_stages() may lower it */
    const char *stages_why;      /* where the default came from, for the notice */
    int micro_set;
    const char *schedule;        /* name or CSV path */
    pw_partition_method partition;
    const char *trace;
    double watchdog_s;
    int pin, check;
    pw_optim_config optim;
    int lr_set, momentum_set, wd_set;
    int adam_set;                /* any of --adam-beta1/--adam-beta2/--adam-eps */
    uint64_t seed;
    const char *data;
    int shuffle;
    const char *save;
    const char *init_from;
    int quiet;
    int threads;
    int grad_groups;
    int tensor_parallel;    /* --tensor-parallel T (0: none) */
    int print_graph;
    int replicas;
    int buckets;
    double clip;
    int post_validate;
    int overlap_steps;           /* --overlap-steps N (0: one step per engine run) */
    pw_allreduce_algo allreduce;
    int allreduce_set;
    pw_compress_config compress; /* --compress (kind none: the plain all-reduce) */
    int ps_servers;              /* --sync ps: K parameter servers (0: all-reduce) */
    int staleness;               /* --staleness (--sync ps) */
    int sync_set, servers_set, staleness_set;
    pw_ps_stale_lr staleness_lr; /* --staleness-lr (--sync ps) */
    int staleness_lr_set;
    int chunks_per_rank;         /* 0: the schedule's default */
    const char *memory_limit;    /* zb-auto: "2p", "1p" or a count (NULL: 2p) */
    int simulate;
    int calibrate;               /* --simulate: measure the compute rate here */
    double flops_per_s;          /* 0: measured (auto) or the forecast default */
    int plan;
    pw_balance balance;
    int balance_set;
    const char *profile, *topology, *memory_budget, *device_speeds;
    double link_bandwidth, link_latency;
    int link_set;
    int link_latency_set;        /* --link-latency given (--simulate --topology) */
    int recompute;
    const char *generate;        /* prompt */
    int64_t gen_tokens;
    double temperature;
    int top_k;
    const char *device;          /* --device: NULL = cpu */
    const char *gpu_memory;      /* --gpu-memory: each GPU's bytes for the plan */
    pw_math gpu_math;            /* --gpu-math */
    int no_gpu_graphs;           /* --no-gpu-graphs */
    int gpu_math_set;
    const char *metrics;         /* --metrics FILE: JSON Lines per step and evaluation */
    int64_t eval_every;          /* --eval-every N: also evaluate every N steps (0: epochs only) */
    const char *checkpoint_dir;  /* --checkpoint-dir: training-state checkpoints (stages/train/state.h) */
    int64_t checkpoint_every;    /* steps; -1: each epoch's end; 0: only at the end and on a signal */
    int keep;                    /* --keep K (0: all) */
    const char *resume;          /* --resume DIR */
    int max_restarts;            /* --max-restarts N (one process: a supervising parent) */
    /* --parallel auto: the layout search chooses what the flags leave open
     * (tools/pipeline-run/parallel.h); --processes P: the ranks it may use. */
    int parallel, processes, replicas_set, schedule_set;
    const char *rebalance;       /* --rebalance auto|every:N|off (tools/pipeline-run/rebalance.h) */
    const char *rebalance_at;    /* --rebalance-at STEP:CUTS[/...]: forced moves (tests) */
    double rebalance_gain;       /* --rebalance-gain PCT, as a fraction (0: 5%) */
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
"                        the update equals one batch of B (default: 1 on one\n"
"                        stage, 4 x stages otherwise, capped at B)\n"
"\n"
"Pipeline\n"
"  --stages S            pipeline stages, one worker thread each (default: the\n"
"                        number of cores / --replicas, with --device cuda the\n"
"                        number of GPUs, lowered to the most stages the graph\n"
"                        can make: nodes / chunks per rank)\n"
"  --schedule NAME|FILE  gpipe, 1f1b (default), interleaved, zb-h1, zb-h2, zb-v,\n"
"                        zb-auto (ZB-1p/2p: built from the stages' predicted\n"
"                        times under --memory-limit), dualpipev (DeepSeek's\n"
"                        DualPipeV: micro-batches >= 2 x stages), auto\n"
"                        (forecast every kind, train with the fastest that\n"
"                        fits), or a schedule CSV file (docs/schedules.md);\n"
"                        validated before anything runs\n"
"  --memory-limit N|Np   zb-auto: micro-batches in flight per stage, a count or a\n"
"                        multiple of the stages (default 2p; 1p is 1F1B's)\n"
"  --chunks-per-rank V   model chunks per rank for interleaved (default 2)\n"
"  --recompute           recompute activations in the backward (less memory)\n"
"  --device cpu|cuda[:N] where the stages compute (default cpu); cuda: rank r on\n"
"                        GPU r mod the GPU count; cuda:N: every stage on GPU N\n"
"                        (docs/cuda.md)\n"
"  --gpu-math MODE       fp32 (default), tf32 or bf16: how GPU matrix products\n"
"                        round their operands (storage stays fp32)\n"
"  --no-gpu-graphs       run every GPU kernel as issued instead of replaying\n"
"                        each training call's recorded CUDA graph\n"
"  --partition METHOD    auto (default: the graph's cut markers when they make\n"
"                        S stages, else flops), cuts, or flops\n"
"  --trace FILE          write a Chrome trace (Perfetto, pipe-trace)\n"
"  --metrics FILE        write one JSON line per step and per evaluation (loss,\n"
"                        lr, grad norm, samples/s, step ms, bubble, per-stage\n"
"                        busy ms), flushed as training goes (JSON Lines)\n"
"  --watchdog SEC        fail a stage that waits longer than this (default 60)\n"
"  --no-pin              do not bind stage threads to cores\n"
"  --rebalance MODE      auto, every:N or off (default): move the cuts between\n"
"                        steps when the stage times measured say that another\n"
"                        split is --rebalance-gain PCT faster (default 5); the\n"
"                        results stay bit-identical (docs/partition.md)\n"
"  --rebalance-at STEP:C1,C2,..[/STEP:..]  move the cuts after STEP (tests)\n"
"  --check               check every executed action against the schedule\n"
"\n"
"Forecasts and plans (nothing trains; no data is loaded)\n"
"  --simulate            simulate one step of --stages/--replicas/--micro-batches/\n"
"                        --schedule (any size): step time, bubble, samples/s and\n"
"                        peak memory per stage; --trace FILE writes the simulated\n"
"                        trace (pipe-trace reads it)\n"
"  --flops-per-s X       compute rate of one rank for --simulate and --schedule\n"
"                        auto (default: measured here for auto, 5e10 for --simulate)\n"
"  --calibrate           --simulate at this machine's rate for this graph: time a\n"
"                        few one-stage micro-batches here first\n"
"  --plan                print the partition / schedule / placement plan, exit\n"
"  --balance flops|time  balance stages by FLOPs (default) or measured time\n"
"  --profile FILE        op-time profile cache for --balance time\n"
"  --topology SPEC       FILE.xml, a synthetic description or 'this' (placement;\n"
"                        with --simulate: cost each link from it, any size)\n"
"  --memory-budget SIZE[,SIZE...]  bytes per stage (512M, 16G)\n"
"  --device-speeds X[,X...]        relative speed of each stage's device\n"
"  --gpu-memory SIZE     memory of each GPU the plan places on (default: the\n"
"                        topology's, or the free memory of --device cuda's\n"
"                        GPUs), shared by the stages on one GPU\n"
"  --link-bandwidth B    bytes/s between neighbouring stages; when training,\n"
"                        also a real slow link: every message between stages\n"
"                        and the replicas' all-reduce take its time, in one\n"
"                        process and under mpirun (a test and teaching aid;\n"
"                        results unchanged; docs/distributed.md, Slow links)\n"
"  --link-latency SEC    seconds per stage-to-stage message (also real: above)\n"
"                        (with --simulate --topology: the links between hosts)\n"
"                        without --plan, --balance .. --link-latency make\n"
"                        training run the plan's cuts (printed first)\n"
"\n"
"Text generation (byte-level language models, docs/transformer.md)\n"
"  --generate PROMPT     sample text after PROMPT from --init-from weights, exit\n"
"  --tokens N            bytes to sample (default 200)\n"
"  --temperature T       softmax temperature (default 1; 0 = greedy)\n"
"  --top-k K             sample among the K most likely bytes (default 0 = all)\n"
"\n"
"Data parallelism (docs/distributed.md)\n"
"  --replicas R          R copies of the pipeline, each on 1/R of every batch;\n"
"                        their gradients are summed before each optimizer step\n"
"                        (default 1). Under mpirun -np S*R every process runs\n"
"                        one stage (its chunks) of one replica (MPI rank w:\n"
"                        replica w / S, stage w % S) and loads only the data\n"
"                        its chunks read\n"
"  --buckets N           all-reduce buckets per stage (default 4); a bucket's\n"
"                        all-reduce starts as soon as its part of the backward\n"
"                        is done, overlapping the rest\n"
"  --allreduce ALGO      under mpirun: tree (default: the same bytes as one\n"
"                        process), ring, mpi (MPI_Iallreduce), hierarchical\n"
"                        (within hosts, then across), or auto (per bucket,\n"
"                        by measured alpha-beta, among those with the tree's\n"
"                        bytes); with --simulate: the all-reduce costed\n"
"                        (default there: ring)\n"
"  --compress MODE       how the gradients travel between replicas: none\n"
"                        (default), bf16, fp16, topk:RATIO (e.g. topk:0.01,\n"
"                        with error feedback) or powersgd:RANK (e.g.\n"
"                        powersgd:4); docs/distributed.md, \"Compression\"\n"
"  --sync ps             under mpirun: synchronise through parameter servers\n"
"                        (the last --servers K world ranks: mpirun -np S*R+K)\n"
"                        instead of the all-reduce; bit-identical to --allreduce\n"
"                        tree unless --staleness (docs/distributed.md)\n"
"  --servers K           parameter servers (default 1), sharded by parameter\n"
"  --staleness S         --sync ps: a replica may run S steps ahead of the\n"
"                        slowest (stale-synchronous; default 0)\n"
"  --staleness-lr inverse|none\n"
"                        --sync ps: the server divides the learning rate of\n"
"                        a stale update by its gradients' mean staleness\n"
"                        (inverse, default; Zhang et al. 2016) or not (none)\n"
"  --clip-grad-norm X    scale the gradients so that their global L2 norm (all\n"
"                        stages, all replicas) is at most X\n"
"  --post-validate       with --clip-grad-norm: each stage steps its optimizer\n"
"                        before the global norm is known and undoes and redoes\n"
"                        the step when clipping triggers (same bits)\n"
"  --overlap-steps N     run up to N steps per engine run, back to back: each\n"
"                        stage starts the next step as soon as its own part\n"
"                        of the last is done (with --post-validate, while the\n"
"                        norm travels); the same bits; one process only\n"
"\n"
"Optimizer\n"
"  --optimizer NAME      sgd (default) or adamw\n"
"  --lr X                learning rate (sgd 0.05, adamw 0.001)\n"
"  --lr-schedule NAME    constant (default), cosine or linear decay from --lr to\n"
"                        --min-lr over the run's steps, after the warm-up\n"
"  --warmup N            raise the lr linearly over the first N steps (default 0)\n"
"  --min-lr X            where cosine/linear decay ends (default --lr / 10)\n"
"  --momentum X          SGD momentum (default 0.9)\n"
"  --weight-decay X      decoupled for adamw (default 0.01), L2 for sgd (default 0);\n"
"                        applies to weight matrices, not biases or norms\n"
"  --adam-beta1 X        AdamW's first-moment decay, in [0, 1) (default 0.9)\n"
"  --adam-beta2 X        AdamW's second-moment decay, in [0, 1) (default 0.999)\n"
"  --adam-eps X          AdamW's epsilon, added to the corrected sqrt(v), in\n"
"                        (0, 1] (default 1e-8); formulas in docs/api.md\n"
"\n"
"Data\n"
"  --data SPEC           fashion-mnist (default; Debian package dataset-fashion-mnist)\n"
"                        idx:TRAIN_IMAGES,TRAIN_LABELS[,TEST_IMAGES,TEST_LABELS]\n"
"                        synthetic[:N[:DIM[:CLASSES]]]\n"
"                        text:FILE, text:DIR or text:fortunes (byte tokens; the\n"
"                        window length comes from the graph's input)\n"
"                        tokens:TRAIN[,HELDOUT]: llm.c token shards, each a file\n"
"                        or a quoted glob ('tokens:d/*train*.bin,d/*val*.bin');\n"
"                        without HELDOUT the last 10% of the tokens are held out\n"
"  --eval-every N        also evaluate the held-out split every N steps (default:\n"
"                        after each epoch and the last step only)\n"
"  --shuffle             reshuffle the training set every epoch (seeded)\n"
"  --seed N              seed for parameters and shuffling (default 1)\n"
"\n"
"Checkpoints (safetensors, names from the graph, PyTorch layouts)\n"
"  --init-from FILE      start from these weights instead of the seeded init\n"
"  --save FILE           write the trained weights at the end (atomically)\n"
"  --checkpoint-dir DIR  write training-state checkpoints (weights, optimizer\n"
"                        state, step, data position) to DIR/step-NNNNNNNN/, in\n"
"                        the background; at the end, and on SIGTERM/SIGINT\n"
"                        (then exit 75: resumable); docs/checkpoints.md\n"
"  --checkpoint-every N|epoch  also every N steps, or at each epoch's end\n"
"  --keep K              keep the newest K checkpoints (default 2; 0: all)\n"
"  --resume PATH         continue from a checkpoint (or the newest complete one\n"
"                        in a --checkpoint-dir), bit-identically, on any layout\n"
"  --max-restarts N      re-run the training after a failure, up to N times,\n"
"                        from the newest checkpoint (needs --checkpoint-dir;\n"
"                        under mpirun use tools/pipeline-launch)\n"
"\n"
"Other\n"
"  --threads N           CPU kernel threads, shared by the stages of this process\n"
"                        (default: 1 per stage with several stages or ranks,\n"
"                        else OPENBLAS_NUM_THREADS or all cores); results are\n"
"                        the same for every N\n"
"  --grad-groups G       sum the step's micro-batch gradients as G groups,\n"
"                        pairwise (G divides replicas x micro-batches;\n"
"                        default: the largest power of two doing so, up to\n"
"                        4): --replicas R gives the same bits as 1 replica\n"
"                        when G / R is a power of two (e.g. G = 12 for R =\n"
"                        1, 3, 6, 12); each stage holds ceil(log2(G / R))\n"
"                        more gradient copies\n"
"  --tensor-parallel T   split each stage's tp=-marked layers over T ranks,\n"
"                        threads of this process, or processes under mpirun\n"
"                        -np S*R*T (docs/parallelism.md): CPU;\n"
"                        within rounding of T = 1, the same bits for every\n"
"                        stage count, schedule and replica count at one T\n"
"  --parallel auto       search stages x replicas x tensor degree (graphs with\n"
"                        tp= marks) x threads x micro-batches x\n"
"                        schedule x recomputation for the fastest layout that\n"
"                        fits --memory-budget, print it and its runners-up,\n"
"                        then train with it (with --plan: print only); flags\n"
"                        such as --stages fix their axis (docs/parallelism.md)\n"
"  --processes P         --parallel auto: ranks it may use (default: the cores,\n"
"                        or the GPUs of --topology)\n"
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

static int parse_f64(const char *flag, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "pipeline-run: %s wants a number in [%g, %g], got '%s'\n", flag, lo, hi, s);
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
       OPT_THREADS, OPT_PRINT, OPT_HELP, OPT_SCHEDULE, OPT_PARTITION, OPT_TRACE, OPT_WATCHDOG,
       OPT_NOPIN, OPT_CHECK, OPT_REPLICAS, OPT_BUCKETS, OPT_CLIP, OPT_POST_VALIDATE, OPT_OVERLAP, OPT_ALLREDUCE,
       OPT_COMPRESS,
       OPT_CHUNKS, OPT_MEMLIMIT, OPT_SIMULATE, OPT_CALIBRATE, OPT_FLOPS, OPT_PLAN, OPT_BALANCE, OPT_PROFILE, OPT_TOPOLOGY, OPT_MEMBUDGET,
       OPT_SPEEDS, OPT_LINKBW, OPT_LINKLAT, OPT_RECOMPUTE, OPT_GENERATE, OPT_TOKENS, OPT_TEMP, OPT_TOPK,
       OPT_LR_SCHEDULE, OPT_WARMUP, OPT_MIN_LR, OPT_DEVICE, OPT_GPUMEM, OPT_GPUMATH, OPT_NOGRAPHS,
       OPT_ADAM_BETA1, OPT_ADAM_BETA2, OPT_ADAM_EPS, OPT_GRAD_GROUPS, OPT_METRICS, OPT_EVAL_EVERY,
       OPT_CKPT_DIR, OPT_CKPT_EVERY, OPT_KEEP, OPT_RESUME, OPT_MAX_RESTARTS, OPT_PARALLEL, OPT_PROCESSES,
       OPT_REBALANCE, OPT_REBALANCE_AT, OPT_REBALANCE_GAIN, OPT_SYNC, OPT_SERVERS, OPT_STALENESS,
       OPT_STALENESS_LR,
       OPT_TENSOR_PARALLEL };

/* The default --stages on a GPU: one rank per GPU for the bare "cuda", one
 * stage for "cuda:N" (not one per core); 0 (the CPU's default) otherwise,
 * and where the device cannot be used (check_device_flag says why). */
static int default_device_stages(const char *device)
{
    const pw_backend_i *be;
    int dev;
    if (pw_backend_find(device, &be, &dev) != PW_OK || !be->device_memory) return 0;
    if (dev >= 0 || !be->device_count) return 1;
    int n = be->device_count();
    return n > 0 ? n : 0;
}

/* The online core count, the first guess at --stages. PW_TEST_CORES=N (a
 * test hook, docs/pipeline-run.md) stands in for it, so tests can show what
 * the defaults do on machines they do not run on; nothing else reads it. */
static long machine_cores(void)
{
    const char *fake = getenv("PW_TEST_CORES");
    if (fake && *fake) {
        char *end;
        errno = 0;
        long n = strtol(fake, &end, 10);
        if (!errno && !*end && n >= 1 && n <= 65536) return n;
        fprintf(stderr, "pipeline-run: PW_TEST_CORES='%s' is not a core count in [1, 65536]; "
                "using this machine's\n", fake);
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    return cores > 0 ? cores : 1;
}

/* --micro-batches not given: 1 on one stage, else 4 x stages, lowered
 * until replicas x micro-batches divides the batch. */
static void default_micro_batches(options *o)
{
    if (o->micro_set) return;
    const int64_t R = o->replicas;
    int64_t m = o->stages > 1 ? 4 * (int64_t)o->stages : 1;
    while (m > 1 && (m * R > o->batch || o->batch % (m * R))) m--;
    o->micro_batches = (int)m;
}

/* --device: the backend exists in this build, the GPU exists on this
 * machine, and the run uses nothing the CUDA stage program lacks yet
 * (docs/cuda.md). 0 or 2 (a usage error, with one clear line). */
static int check_device_flag(const options *o, int world)
{
    const pw_backend_i *be;
    int dev;
    if (pw_backend_find(o->device, &be, &dev) != PW_OK) return bad_usage("--device: %s", pw_last_error());
    if (!be->device_memory) {
        if (o->gpu_math_set && o->gpu_math != PW_MATH_FP32)
            return bad_usage("--gpu-math %s: needs a GPU (--device cuda); the CPU computes in fp32",
                             pw_math_name(o->gpu_math));
        return 0;
    }
    if (world > 1)
        return bad_usage("--device %s: several processes (mpirun) are not supported on CUDA yet "
                         "(no NCCL transport); run one process", o->device);
    if (o->generate) return bad_usage("--device %s: --generate runs on the CPU only (drop --device)", o->device);
#ifdef PW_HAVE_CUDA
    int n = 0;
    if (pw_cuda_device_count(&n) != PW_OK) return bad_usage("--device: %s", pw_last_error());
    if (dev >= n) {
        fprintf(stderr, "pipeline-run: --device %s: no CUDA device %d (this machine has %d)\n"
                "Try 'pipeline-run --help'.\n", o->device, dev, n);
        return 2;
    }
#endif
    return 0;
}

/* --parallel auto and --processes against the other flags: 0 or 2. */
static int check_parallel_flags(const options *o, int world)
{
    if (o->processes && !o->parallel) return bad_usage("%s", "--processes applies to --parallel auto only");
    if (!o->parallel) return 0;
    if (world > 1)
        return bad_usage("%s", "--parallel auto plans in one process: run pipeline-run GRAPH --plan --parallel "
                               "auto --processes N, then launch the command it prints under mpirun");
    if (o->simulate || o->generate || o->resume || o->device)
        return bad_usage("%s", "--parallel auto does not combine with --simulate, --generate, --resume or "
                               "--device (it plans CPU ranks here, or any machine with --plan --topology)");
    if (o->topology && strcmp(o->topology, "this") && !o->plan)
        return bad_usage("%s", "--parallel auto --topology FILE plans for another machine: add --plan (training "
                               "runs on this one)");
    if (o->processes && !o->plan)
        return bad_usage("%s", "--parallel auto --processes P plans for P processes under mpirun: add --plan and "
                               "launch the command it prints");
    if (o->schedule_set && strcmp(o->schedule, "auto") && access(o->schedule, R_OK) == 0)
        return bad_usage("%s", "--parallel auto chooses among the built-in schedules, not a CSV file");
    if (o->balance_set || o->profile || o->device_speeds || o->link_set || o->gpu_memory)
        return bad_usage("%s", "--parallel auto costs layouts with its own forecast: drop --balance, --profile, "
                               "--device-speeds, --gpu-memory and the link flags");
    return 0;
}

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
        {"grad-groups", required_argument, 0, OPT_GRAD_GROUPS},
        {"tensor-parallel", required_argument, 0, OPT_TENSOR_PARALLEL},
        {"print-graph", no_argument, 0, OPT_PRINT},
        {"help", no_argument, 0, OPT_HELP},
        {"schedule", required_argument, 0, OPT_SCHEDULE},
        {"partition", required_argument, 0, OPT_PARTITION},
        {"trace", required_argument, 0, OPT_TRACE},
        {"watchdog", required_argument, 0, OPT_WATCHDOG},
        {"no-pin", no_argument, 0, OPT_NOPIN},
        {"check", no_argument, 0, OPT_CHECK},
        {"replicas", required_argument, 0, OPT_REPLICAS},
        {"buckets", required_argument, 0, OPT_BUCKETS},
        {"compress", required_argument, 0, OPT_COMPRESS},
        {"clip-grad-norm", required_argument, 0, OPT_CLIP},
        {"post-validate", no_argument, 0, OPT_POST_VALIDATE},
        {"overlap-steps", required_argument, 0, OPT_OVERLAP},
        {"allreduce", required_argument, 0, OPT_ALLREDUCE},
        {"sync", required_argument, 0, OPT_SYNC},
        {"servers", required_argument, 0, OPT_SERVERS},
        {"staleness", required_argument, 0, OPT_STALENESS},
        {"staleness-lr", required_argument, 0, OPT_STALENESS_LR},
        {"chunks-per-rank", required_argument, 0, OPT_CHUNKS},
        {"memory-limit", required_argument, 0, OPT_MEMLIMIT},
        {"simulate", no_argument, 0, OPT_SIMULATE},
        {"calibrate", no_argument, 0, OPT_CALIBRATE},
        {"flops-per-s", required_argument, 0, OPT_FLOPS},
        {"plan", no_argument, 0, OPT_PLAN},
        {"balance", required_argument, 0, OPT_BALANCE},
        {"profile", required_argument, 0, OPT_PROFILE},
        {"topology", required_argument, 0, OPT_TOPOLOGY},
        {"memory-budget", required_argument, 0, OPT_MEMBUDGET},
        {"device-speeds", required_argument, 0, OPT_SPEEDS},
        {"link-bandwidth", required_argument, 0, OPT_LINKBW},
        {"link-latency", required_argument, 0, OPT_LINKLAT},
        {"recompute", no_argument, 0, OPT_RECOMPUTE},
        {"generate", required_argument, 0, OPT_GENERATE},
        {"tokens", required_argument, 0, OPT_TOKENS},
        {"temperature", required_argument, 0, OPT_TEMP},
        {"top-k", required_argument, 0, OPT_TOPK},
        {"lr-schedule", required_argument, 0, OPT_LR_SCHEDULE},
        {"warmup", required_argument, 0, OPT_WARMUP},
        {"min-lr", required_argument, 0, OPT_MIN_LR},
        {"device", required_argument, 0, OPT_DEVICE},
        {"gpu-memory", required_argument, 0, OPT_GPUMEM},
        {"gpu-math", required_argument, 0, OPT_GPUMATH},
        {"no-gpu-graphs", no_argument, 0, OPT_NOGRAPHS},
        {"adam-beta1", required_argument, 0, OPT_ADAM_BETA1},
        {"adam-beta2", required_argument, 0, OPT_ADAM_BETA2},
        {"adam-eps", required_argument, 0, OPT_ADAM_EPS},
        {"metrics", required_argument, 0, OPT_METRICS},
        {"eval-every", required_argument, 0, OPT_EVAL_EVERY},
        {"checkpoint-dir", required_argument, 0, OPT_CKPT_DIR},
        {"checkpoint-every", required_argument, 0, OPT_CKPT_EVERY},
        {"keep", required_argument, 0, OPT_KEEP},
        {"resume", required_argument, 0, OPT_RESUME},
        {"max-restarts", required_argument, 0, OPT_MAX_RESTARTS},
        {"parallel", required_argument, 0, OPT_PARALLEL},
        {"processes", required_argument, 0, OPT_PROCESSES},
        {"rebalance", required_argument, 0, OPT_REBALANCE},
        {"rebalance-at", required_argument, 0, OPT_REBALANCE_AT},
        {"rebalance-gain", required_argument, 0, OPT_REBALANCE_GAIN},
        {0, 0, 0, 0},
    };
    memset(o, 0, sizeof *o);
    o->epochs = 3;
    o->batch = 64;
    o->micro_batches = 1;
    o->stages = 0;
    o->schedule = "1f1b";
    o->watchdog_s = 60.0;
    o->pin = 1;
    o->seed = 1;
    o->replicas = 1;
    o->data = "fashion-mnist";
    o->gen_tokens = 200;
    o->temperature = 1.0;
    o->keep = 2;
    int ckpt_flags = 0; /* --checkpoint-every, --keep, --max-restarts given */
    pw_optim_kind kind = PW_OPTIM_SGD;
    float lr = 0, momentum = 0, wd = 0;
    float adam[3] = {-1, -1, -1}; /* beta1, beta2, eps; -1: the default */
    pw_lr_schedule lr_schedule = PW_LR_CONSTANT;
    int64_t warmup = 0;
    float min_lr = -1; /* -1: --lr / 10 */
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
            o->micro_set = 1;
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
        case OPT_GRAD_GROUPS:
            if (parse_i64("--grad-groups", optarg, 1, 1 << 20, &v)) return 2;
            o->grad_groups = (int)v;
            break;
        case OPT_TENSOR_PARALLEL:
            if (parse_i64("--tensor-parallel", optarg, 1, 64, &v)) return 2;
            o->tensor_parallel = (int)v;
            break;
        case OPT_PRINT: o->print_graph = 1; break;
        case OPT_SCHEDULE: o->schedule = optarg, o->schedule_set = 1; break;
        case OPT_PARTITION:
            if (pw_partition_method_parse(optarg, &o->partition) != PW_OK)
                return bad_usage("--partition: '%s' is not auto, cuts or flops", optarg);
            break;
        case OPT_TRACE: o->trace = optarg; break;
        case OPT_WATCHDOG: {
            float w;
            if (parse_f32("--watchdog", optarg, 0.01, 86400, &w)) return 2;
            o->watchdog_s = w;
            break;
        }
        case OPT_NOPIN: o->pin = 0; break;
        case OPT_CHECK: o->check = 1; break;
        case OPT_REPLICAS:
            if (parse_i64("--replicas", optarg, 1, 4096, &v)) return 2;
            o->replicas = (int)v;
            o->replicas_set = 1;
            break;
        case OPT_BUCKETS:
            if (parse_i64("--buckets", optarg, 1, 4096, &v)) return 2;
            o->buckets = (int)v;
            break;
        case OPT_CLIP: {
            float x;
            if (parse_f32("--clip-grad-norm", optarg, 1e-12, 1e12, &x)) return 2;
            o->clip = x;
            break;
        }
        case OPT_POST_VALIDATE: o->post_validate = 1; break;
        case OPT_OVERLAP: {
            int64_t v;
            if (parse_i64("--overlap-steps", optarg, 1, 64, &v)) return 2;
            o->overlap_steps = (int)v;
            break;
        }
        case OPT_ALLREDUCE:
            if (pw_allreduce_algo_parse(optarg, &o->allreduce) != PW_OK)
                return bad_usage("--allreduce: '%s' is not tree, ring, mpi, hierarchical or auto", optarg);
            o->allreduce_set = 1;
            break;
        case OPT_COMPRESS:
            if (pw_compress_parse(optarg, &o->compress) != PW_OK) return bad_usage("%s", pw_last_error());
            o->compress.seed = 0x9e3779b97f4a7c15ull; /* PowerSGD's first Q: the same on every replica */
            break;
        case OPT_SYNC: /* --sync ps --servers K --staleness S: docs/distributed.md, "Parameter server" */
            if (strcmp(optarg, "ps") && strcmp(optarg, "allreduce"))
                return bad_usage("--sync: '%s' is not allreduce or ps", optarg);
            o->sync_set = !strcmp(optarg, "ps");
            break;
        case OPT_STALENESS_LR: /* docs/distributed.md, "Staleness-aware learning rate" */
            if (pw_ps_stale_lr_parse(optarg, &o->staleness_lr) != PW_OK) return bad_usage("%s", pw_last_error());
            o->staleness_lr_set = 1;
            break;
        case OPT_SERVERS:
        case OPT_STALENESS: {
            int64_t v;
            const int srv = c == OPT_SERVERS;
            if (parse_i64(srv ? "--servers" : "--staleness", optarg, srv ? 1 : 0, srv ? 64 : 1000, &v)) return 2;
            *(srv ? &o->ps_servers : &o->staleness) = (int)v;
            *(srv ? &o->servers_set : &o->staleness_set) = 1;
            break;
        }
        case OPT_CHUNKS:
            if (parse_i64("--chunks-per-rank", optarg, 1, 64, &v)) return 2;
            o->chunks_per_rank = (int)v;
            break;
        case OPT_MEMLIMIT: o->memory_limit = optarg; break;
        case OPT_SIMULATE: o->simulate = 1; break;
        case OPT_CALIBRATE: o->calibrate = 1; break;
        case OPT_FLOPS:
            if (parse_f64("--flops-per-s", optarg, 1.0, 1e20, &o->flops_per_s)) return 2;
            break;
        case OPT_PLAN: o->plan = 1; break;
        case OPT_BALANCE:
            if (pw_balance_parse(optarg, &o->balance) != PW_OK)
                return bad_usage("--balance: '%s' is not flops or time", optarg);
            o->balance_set = 1;
            break;
        case OPT_PROFILE: o->profile = optarg; break;
        case OPT_TOPOLOGY: o->topology = optarg; break;
        case OPT_MEMBUDGET: o->memory_budget = optarg; break;
        case OPT_SPEEDS: o->device_speeds = optarg; break;
        case OPT_LINKBW:
            if (parse_f64("--link-bandwidth", optarg, 1.0, 1e18, &o->link_bandwidth)) return 2;
            o->link_set = 1;
            break;
        case OPT_LINKLAT:
            if (parse_f64("--link-latency", optarg, 0.0, 1e3, &o->link_latency)) return 2;
            o->link_set = 1;
            o->link_latency_set = 1;
            break;
        case OPT_RECOMPUTE: o->recompute = 1; break;
        case OPT_GENERATE: o->generate = optarg; break;
        case OPT_TOKENS:
            if (parse_i64("--tokens", optarg, 0, 1 << 24, &o->gen_tokens)) return 2;
            break;
        case OPT_TEMP:
            if (parse_f64("--temperature", optarg, 0.0, 1e3, &o->temperature)) return 2;
            break;
        case OPT_LR_SCHEDULE:
            if (pw_lr_schedule_parse(optarg, &lr_schedule) != PW_OK)
                return bad_usage("--lr-schedule: '%s' is not constant, cosine or linear", optarg);
            break;
        case OPT_WARMUP:
            if (parse_i64("--warmup", optarg, 0, INT64_MAX / 2, &warmup)) return 2;
            break;
        case OPT_MIN_LR:
            if (parse_f32("--min-lr", optarg, 0.0, 1e3, &min_lr)) return 2;
            break;
        case OPT_DEVICE: o->device = optarg; break;
        case OPT_GPUMEM: o->gpu_memory = optarg; break;
        case OPT_GPUMATH:
            if (pw_math_parse(optarg, &o->gpu_math) != PW_OK) return bad_usage("--gpu-math: %s", pw_last_error());
            o->gpu_math_set = 1;
            break;
        case OPT_NOGRAPHS: o->no_gpu_graphs = 1; break;
        case OPT_ADAM_BETA1:
        case OPT_ADAM_BETA2:
        case OPT_ADAM_EPS: {
            const int k = c - OPT_ADAM_BETA1;
            const char *flag = k == 0 ? "--adam-beta1" : k == 1 ? "--adam-beta2" : "--adam-eps";
            /* A decay of 1 never forgets and makes the bias correction
             * 1 - beta^t zero; an epsilon of 0 divides 0 by 0 where v is 0. */
            if (parse_f32(flag, optarg, k < 2 ? 0.0 : 1e-30, 1.0, &adam[k])) return 2;
            if (k < 2 && adam[k] >= 1.0f) {
                fprintf(stderr, "pipeline-run: %s wants a number in [0, 1), got '%s'%s\n", flag, optarg,
                        strcmp(optarg, "1") ? " (1 in float32)" : "");
                return 2;
            }
            o->adam_set = 1;
            break;
        }
        case OPT_CKPT_DIR: o->checkpoint_dir = optarg; break;
        case OPT_CKPT_EVERY:
            if (!strcmp(optarg, "epoch")) o->checkpoint_every = -1;
            else if (parse_i64("--checkpoint-every", optarg, 1, INT64_MAX / 2, &o->checkpoint_every)) return 2;
            ckpt_flags = 1;
            break;
        case OPT_KEEP:
            if (parse_i64("--keep", optarg, 0, 1 << 20, &v)) return 2;
            o->keep = (int)v;
            ckpt_flags = 1;
            break;
        case OPT_RESUME: o->resume = optarg; break;
        case OPT_MAX_RESTARTS:
            if (parse_i64("--max-restarts", optarg, 0, 1000, &v)) return 2;
            o->max_restarts = (int)v;
            ckpt_flags = 1;
            break;
        case OPT_TOPK:
            if (parse_i64("--top-k", optarg, 0, 1 << 20, &v)) return 2;
            o->top_k = (int)v;
            break;
        case OPT_METRICS: o->metrics = optarg; break;
        case OPT_REBALANCE: o->rebalance = optarg; break;
        case OPT_REBALANCE_AT: o->rebalance_at = optarg; break;
        case OPT_REBALANCE_GAIN:
            if (parse_f64("--rebalance-gain", optarg, 0.1, 90, &o->rebalance_gain)) return 2;
            o->rebalance_gain /= 100;
            break;
        case OPT_EVAL_EVERY:
            if (parse_i64("--eval-every", optarg, 1, INT64_MAX / 2, &o->eval_every)) return 2;
            break;
        case OPT_PARALLEL:
            if (strcmp(optarg, "auto")) return bad_usage("--parallel: '%s' is not auto", optarg);
            o->parallel = 1;
            break;
        case OPT_PROCESSES:
            if (parse_i64("--processes", optarg, 1, 1 << 20, &v)) return 2;
            o->processes = (int)v;
            break;
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
    /* decay_steps is the run's length, known once the data is loaded. */
    o->optim.schedule = lr_schedule;
    o->optim.warmup_steps = warmup;
    o->optim.min_lr = min_lr >= 0 ? min_lr : o->optim.lr / 10;
    if (o->momentum_set) {
        if (kind != PW_OPTIM_SGD) return bad_usage("%s", "--momentum applies to --optimizer sgd only");
        o->optim.momentum = momentum;
    }
    if (o->wd_set) o->optim.weight_decay = wd;
    if (o->adam_set) {
        if (kind != PW_OPTIM_ADAMW)
            return bad_usage("%s", "--adam-beta1, --adam-beta2 and --adam-eps apply to --optimizer "
                                   "adamw only");
        if (adam[0] >= 0) o->optim.beta1 = adam[0];
        if (adam[1] >= 0) o->optim.beta2 = adam[1];
        if (adam[2] >= 0) o->optim.eps = adam[2];
    }
    const int world = pw_mpi_launched_size();
    if (o->stages == 0 && world <= 1) {
        /* A first guess from the machine; default_stages() lowers it to
         * what the graph can make once the graph is read. */
        o->stages_default = 1;
        o->stages = default_device_stages(o->device);
        o->stages_why = "the GPU count";
        if (o->stages == 0) {
            const long cores = machine_cores();
            o->stages = cores / o->replicas > 0 ? (int)(cores / o->replicas) : 1;
            o->stages_why = o->replicas > 1 ? "cores / --replicas" : "the core count";
        }
    }
    if ((o->servers_set || o->staleness_set || o->staleness_lr_set) && !o->sync_set)
        return bad_usage("%s", "--servers, --staleness and --staleness-lr apply to --sync ps");
    if (o->sync_set && !o->servers_set) o->ps_servers = 1;
    if (o->sync_set) {
        const char *no = world <= 1 && !o->simulate ? "runs under mpirun only (the servers are processes of "
                                                      "their own: mpirun -np S*R+K)"
                         : o->replicas < 2 ? "needs --replicas 2 or more"
                         : o->allreduce_set ? "replaces the all-reduce: give --sync ps or --allreduce"
                         : o->rebalance || o->rebalance_at ? "does not support --rebalance yet"
                         : o->compress.kind == PW_COMPRESS_POWERSGD && o->staleness > 0
                             ? "with --compress powersgd takes --staleness 0 only (PowerSGD sums the replicas' "
                               "factors of one step, so none can run ahead): --compress bf16, fp16 or topk:RATIO "
                               "with staleness"
                         : o->device && strcmp(o->device, "cpu") ? "runs on the CPU only"
                         : NULL;
        if (no) return bad_usage("--sync ps %s", no);
    }
    /* Under mpirun the processes are the workers (and the servers, the last K). */
    if (o->stages == 0) {
        const int wk = world - o->ps_servers, rt = o->replicas * (o->tensor_parallel > 1 ? o->tensor_parallel : 1);
        if (world > 1 && rt > 1 && (wk <= 0 || wk % rt != 0)) {
            fprintf(stderr, "pipeline-run: mpirun -np %d%s is not a multiple of --replicas %d x --tensor-parallel %d "
                    "(the processes are stages x replicas x tensor-parallel ranks; docs/distributed.md, \"Rank "
                    "layout\")\n", wk, o->ps_servers > 0 ? " less --servers" : "", o->replicas,
                    o->tensor_parallel > 1 ? o->tensor_parallel : 1);
            return 2;
        }
        o->stages = wk > 0 && wk % rt == 0 ? wk / rt : 1;
    }
    if (o->overlap_steps > 1) {
        const char *no = world > 1 ? "runs in one process only (not under mpirun)"
                         : o->rebalance || o->rebalance_at ? "cannot be combined with --rebalance (a move needs "
                                                             "every step's own measurements)"
                         : NULL;
        if (no) return bad_usage("--overlap-steps %s", no);
    }
    if (o->allreduce_set && world <= 1 && !o->simulate)
        return bad_usage("%s", "--allreduce applies to runs under mpirun (and to --simulate) only");
    if (o->simulate + o->plan + (o->generate != NULL) > 1)
        return bad_usage("%s", "--simulate, --plan and --generate are separate modes; give one");
    if (o->calibrate && !o->simulate)
        return bad_usage("%s", "--calibrate applies to --simulate only");
    if (o->calibrate && o->flops_per_s > 0)
        return bad_usage("%s", "--calibrate measures the compute rate that --flops-per-s gives; give one");
    if (o->generate && !o->init_from)
        return bad_usage("%s", "--generate needs --init-from FILE (the trained weights)");
    if ((o->metrics || o->eval_every) && (o->simulate || o->plan || o->generate))
        return bad_usage("%s", "--metrics and --eval-every apply to training, not to --simulate, --plan "
                               "or --generate");
    if ((o->rebalance || o->rebalance_at || o->rebalance_gain) && (o->simulate || o->plan || o->generate))
        return bad_usage("%s", "--rebalance, --rebalance-at and --rebalance-gain apply to training");
    if (ckpt_flags && !o->checkpoint_dir)
        return bad_usage("%s", "--checkpoint-every, --keep and --max-restarts need --checkpoint-dir DIR");
    if ((o->checkpoint_dir || o->resume) && (o->simulate || o->plan || o->generate))
        return bad_usage("%s", "--checkpoint-dir and --resume apply to training, not to --simulate, --plan or "
                               "--generate");
    if (o->resume && o->init_from)
        return bad_usage("%s", "--resume restores the weights itself; give --resume or --init-from, not both");
    if (o->max_restarts > 0 && world > 1)
        return bad_usage("%s", "--max-restarts supervises one process; under mpirun re-run mpirun with "
                               "tools/pipeline-launch (docs/checkpoints.md)");
    if ((o->simulate || o->plan || o->generate) && world > 1)
        return bad_usage("%s", "--simulate, --plan and --generate run in one process, not under mpirun");
    if (o->generate) {
        /* One window of one sample through the stages. */
        o->batch = 1;
        o->micro_batches = 1;
        o->micro_set = 1;
        o->replicas = 1;
    }
    const int prc = check_parallel_flags(o, world);
    if (prc) return prc;
    const int64_t R = o->replicas;
    default_micro_batches(o);
    if (o->batch % (R * o->micro_batches) != 0) {
        if (R > 1)
            fprintf(stderr, "pipeline-run: --batch %lld is not divisible by --replicas %d x --micro-batches "
                    "%d (each replica takes batch / replicas samples, in micro-batches)\n",
                    (long long)o->batch, o->replicas, o->micro_batches);
        else
            fprintf(stderr, "pipeline-run: --batch %lld is not divisible by --micro-batches %d\n",
                    (long long)o->batch, o->micro_batches);
        return 2;
    }
    if (pw_grad_groups(o->grad_groups, o->replicas, o->micro_batches, NULL) < 0)
    {
        fprintf(stderr, "pipeline-run: --grad-groups %d: must divide --replicas x "
                "--micro-batches (%d x %d)\n", o->grad_groups, o->replicas, o->micro_batches);
        return 2;
    }
    return check_device_flag(o, world);
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

/* Per-stage table: where the time went, against the schedule's theory. */
static void print_summary(const pw_pipeline *t, int stages)
{
    double theory = pw_pipeline_theory_bubble(t);
    const int C = pw_pipeline_n_chunks(t);
    if (C > stages) printf("\n(one row per chunk; a rank's busy and idle times cover all its chunks)");
    printf("\nstage  nodes        busy s   idle s   bubble   theory   stash slots (used/planned)\n");
    double busy = 0, total = 0;
    for (int st = 0; st < C; st++) {
        pw_pipeline_stage_stats ss;
        pw_pipeline_stage_stats_get(t, st, &ss);
        double idle = ss.total_s - ss.busy_s;
        printf("%5d  [%3lld,%3lld)  %8.2f %8.2f  %6.1f%%  %6.1f%%   %d/%d\n", st,
               (long long)ss.node_begin, (long long)ss.node_end, ss.busy_s, idle,
               ss.total_s > 0 ? 100.0 * idle / ss.total_s : 0.0, 100.0 * theory, ss.peak_slots,
               ss.slots);
        if (st >= stages) continue; /* chunks 0..S-1 sit on distinct ranks */
        busy += ss.busy_s;
        total += ss.total_s;
    }
    printf("  all  %-10s  %8.2f %8.2f  %6.1f%%  %6.1f%%\n", "", busy, total - busy,
           total > 0 ? 100.0 * (total - busy) / total : 0.0, 100.0 * theory);
}

/* ---- runs under mpirun ---- */

/* Set under mpirun: every error is reported by the process that met it,
 * named, and then stops the whole run (MPI_Abort), so no process waits for
 * one that is gone. */
static pw_transport *g_mpi;
static char g_who[96];

static int fail(const char *what)
{
    /* The engine's own messages already name the MPI rank. */
    const char *who = strncmp(pw_last_error(), "MPI rank ", 9) == 0 ? "" : g_who;
    fprintf(stderr, "pipeline-run: %s%s%s\n", who, what, pw_last_error());
    if (g_mpi) {
        fflush(NULL);
        pw_transport_abort(g_mpi, 1);
    }
    return 1;
}

/* An error printed by the caller: under mpirun, stop every process. */
static void stop_all(void)
{
    if (!g_mpi) return;
    fflush(NULL);
    pw_transport_abort(g_mpi, 1);
}

/* Test hook (docs/distributed.md): PW_TEST_FAULT=MODE:RANK:STEP makes MPI
 * rank RANK (0 in one process) fail after step STEP: "kill" (SIGKILL),
 * "exit" (exits with status 3 on the spot), "error" (reports an error),
 * "hang" (sleeps; the others' watchdog must notice) or "term" (SIGTERM to
 * itself: a preemption at a known step, docs/checkpoints.md). */
static void maybe_fault(int64_t step)
{
    const char *spec = getenv("PW_TEST_FAULT");
    /* In one process the rank is 0. A restarted run (the --max-restarts
     * supervisor or tools/pipeline-launch set PW_RESTART) does not fail
     * again, so a test can see it finish. */
    const char *restart = getenv("PW_RESTART");
    if (!spec || (restart && strcmp(restart, "0") != 0)) return;
    char mode[16] = "";
    int rank = -1;
    long long at = -1;
    if (sscanf(spec, "%15[a-z]:%d:%lld", mode, &rank, &at) != 3 || rank != (g_mpi ? g_mpi->world_rank : 0) ||
        at != step)
        return;
    fflush(NULL);
    if (!strcmp(mode, "kill")) raise(SIGKILL);
    if (!strcmp(mode, "term")) {
        raise(SIGTERM); /* as if sent now: the run stops at this step boundary */
        return;
    }
    if (!strcmp(mode, "exit")) exit(3);
    if (!strcmp(mode, "hang"))
        for (;;) pause();
    if (!strcmp(mode, "error")) {
        pw_error(PW_ERR_INTERNAL, "step %lld: injected fault (PW_TEST_FAULT=%s)", at, spec);
        fail("");
    }
}

/* A process that leaves before the run is over (an early exit, or an exit
 * from a library we link) says so before mpirun stops the others. */
static int g_finished;
static void report_early_exit(void)
{
    if (g_mpi && !g_finished) {
        fprintf(stderr, "pipeline-run: %sexited before the end of the run\n", g_who);
        fflush(stderr);
    }
}

/* ---- signals (docs/pipeline-run.md, "Signals and exit codes") ----
 * The first SIGINT or SIGTERM only sets g_signal: the training loop stops at
 * the next step boundary (under mpirun every process at the same one), says
 * so, writes the trace it was asked for and exits 128 + the signal. A second
 * one stops at once: the handler unlinks the temp files of atomic writes in
 * flight, after letting a create in progress on another thread (the
 * background checkpoint writer) finish, and stopping any later one
 * (pw_tmpfile_abort_all, runtime/tmpfile.h; it and _exit are
 * async-signal-safe). */
static volatile sig_atomic_t g_signal;
static pthread_t g_main_thread; /* the one that handles them (install_signals) */

static void on_signal(int sig)
{
    /* Any thread may receive it; the main thread acts, so that a second
     * signal interrupts the thread that writes the files (a temp file
     * registered but not yet created when another thread unlinked them all
     * was left behind). pthread_kill is async-signal-safe. */
    if (!pthread_equal(pthread_self(), g_main_thread)) {
        pthread_kill(g_main_thread, sig);
        return;
    }
    if (g_signal) {
        pw_tmpfile_abort_all();
        static const char msg[] = "pipeline-run: second signal: stopping now\n";
        ssize_t k = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void)k;
        _exit(128 + sig);
    }
    g_signal = sig;
}

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    g_main_thread = pthread_self();
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* The signal that stops the run at this step boundary, 0: none. Under
 * mpirun the processes agree (an all-gather per step: the first process
 * that saw one decides), so all stop after the same step. */
static int stop_signal(void)
{
    int mine = g_signal;
    if (!g_mpi) return mine;
    int *all = calloc((size_t)g_mpi->world_size, sizeof *all), sig = mine;
    if (!all || pw_transport_allgather(g_mpi, &mine, sizeof mine, all) != PW_OK) {
        free(all);
        fail(""); /* a process is stalled (named) or gone: MPI_Abort */
        return mine;
    }
    for (int w = g_mpi->world_size - 1; w >= 0; w--)
        if (all[w]) sig = all[w];
    free(all);
    return sig;
}

static int64_t micro_size(const options *o);

/* One finished training-state checkpoint, said on stdout (a
 * pw_state_report_fn; arg: the options). */
static void report_checkpoint(const pw_state_done *d, void *arg)
{
    const options *o = arg;
    if (o->quiet) return;
    printf("checkpoint %s: %.2f MiB in %.3f s%s (snapshot %.4f s on the training thread%s)\n", d->path,
           (double)d->bytes / (1 << 20), d->write_s, g_mpi ? " by all processes" : " in the background",
           d->snapshot_s, d->stall_s > 0.0005 ? ", waited for the previous write" : "");
    fflush(stdout);
}

/* The checkpoint on SIGTERM/SIGINT (a preempted job saves where it
 * stopped): with --checkpoint-dir, the state after the last finished step
 * (every process at the same step), written and waited for. Returns 1 when
 * it is complete (the run then exits PW_EXIT_RESUMABLE), 0 without
 * --checkpoint-dir, -1 after a failed write was reported (exit 1). Called
 * on every process once the run has stopped. */
static int checkpoint_on_signal(pw_pipeline *t, const options *o, pw_state_writer *w, int64_t step)
{
    if (!w) return 0;
    if (pw_state_writer_finish(w, t, step, report_checkpoint, (void *)o) != PW_OK) {
        fail("checkpoint on the signal: ");
        return -1;
    }
    if (!g_mpi || g_mpi->world_rank == 0)
        fprintf(stderr, "pipeline-run: checkpointed at step %lld in %s/step-%08lld; resume with --resume %s "
                "(exit %d)\n", (long long)step, o->checkpoint_dir, (long long)step, o->checkpoint_dir,
                PW_EXIT_RESUMABLE);
    return 1;
}

/* What fixes the numbers, not the layout (stages, replicas and the
 * micro-batches each takes, schedule, threads, processes): --save's "run"
 * metadata, so a checkpoint is the same bytes whichever layout wrote it. */
static void run_extra(const options *o, char *extra, size_t n)
{
    snprintf(extra, n, "data=%s batch=%lld micro_batch=%lld grad_groups=%d optimizer=%s lr=%g", o->data,
             (long long)o->batch, (long long)micro_size(o),
             pw_grad_groups(o->grad_groups, o->replicas, o->micro_batches, NULL), pw_optim_name(o->optim.kind),
             (double)o->optim.lr);
}

/* --resume, before anything is built: the layout fitted to the checkpoint
 * (pw_state_fit_layout: its micro-batch size fixes the micro-batches when
 * --micro-batches is not given; under mpirun a process count that no
 * longer fits --stages x --replicas takes world / stages replicas). *note
 * receives what changed. 0, or 2 after a message. */
static int resume_layout(options *o, const pw_state_meta *m, int world, char *note, size_t n)
{
    note[0] = '\0';
    if (pw_state_fit_layout(m, world, o->stages, o->batch, o->grad_groups, &o->replicas, &o->micro_batches,
                            &o->micro_set) != PW_OK) {
        pw_clear_error();
        fprintf(stderr, "pipeline-run: --resume: --batch %lld does not split into %d replicas x %d micro-batches "
                "(the checkpoint's micro-batches hold %lld samples)\n", (long long)o->batch, o->replicas,
                o->micro_batches, (long long)m->run.micro_batch);
        return 2;
    }
    if (m->layout.replicas > 0 && m->layout.replicas != o->replicas) {
        const int G = pw_grad_groups(o->grad_groups, o->replicas, o->micro_batches, NULL);
        snprintf(note, n, "pipeline-run: resuming on %d replica%s where the checkpoint's run had %d: the same "
                 "global batch %lld, %d micro-batches of %lld per replica; %s\n", o->replicas,
                 o->replicas > 1 ? "s" : "", m->layout.replicas, (long long)o->batch, o->micro_batches,
                 (long long)micro_size(o),
                 pw_grad_groups_identical(G, o->replicas) && pw_grad_groups_identical(G, m->layout.replicas)
                     ? "bit-identical (gradient groups / replicas is a power of two)"
                     : "equal to rounding only (gradient groups / replicas is not a power of two for "
                       "both runs; docs/checkpoints.md)");
    }
    return 0;
}

/* Under mpirun: one row per process (pw_pipeline_gather_process_stats,
 * collective), printed by world rank 0. */
static void print_summary_mpi(pw_pipeline *t, int quiet)
{
    const int W = g_mpi->world_size;
    pw_pipeline_process_stats *all = calloc((size_t)W, sizeof *all);
    if (!all) pw_error(PW_ERR_NOMEM, "out of memory");
    if (!all || pw_pipeline_gather_process_stats(t, all) != PW_OK) {
        free(all);
        fail("summary: ");
        return;
    }
    if (g_mpi->world_rank == 0 && !quiet) {
        double theory = pw_pipeline_theory_bubble(t);
        printf("\nrank  replica stage  nodes        busy s   idle s   bubble   theory   all-reduce s "
               "(exposed)   slots\n");
        for (int w = 0; w < W; w++) {
            const pw_pipeline_process_stats *r = &all[w];
            double idle = r->total_s - r->busy_s;
            printf("%4d  %7d %5d  [%3lld,%3lld)  %8.2f %8.2f  %6.1f%%  %6.1f%%   %8.3f (%8.3f)   %d/%d\n", w,
                   r->replica, r->stage, (long long)r->node_begin, (long long)r->node_end, r->busy_s, idle,
                   r->total_s > 0 ? 100.0 * idle / r->total_s : 0.0, 100.0 * theory, r->allreduce_s,
                   r->allreduce_wait_s, r->peak_slots, r->slots);
        }
    }
    free(all);
}

/* "run.json" -> "run.rank3.json" under mpirun (each process writes its own
 * track; the same clock on one host). */
static void trace_path(const char *path, char *out, size_t n)
{
    pw_trace_rank_path(path, g_mpi ? g_mpi->world_rank : -1, out, n);
}

/* {"type":"rebalance", ...} after a move; {"type":"rebalance_gain", ...}
 * when its gain is measured (a window of steps later), into the metrics
 * log (world rank 0 writes). 0, or 1 after the error. */
static int metrics_rebalance(pw_pipeline_metrics *mx, const pr_rebalance_event *ev, int64_t step)
{
    pw_metrics_log *log = pw_pipeline_metrics_log(mx);
    if (!log || !(ev->moved || ev->measured)) return 0;
    if (ev->measured) {
        pw_metrics_move_gain_rec g = {.step = step, .move_step = ev->measured_of, .step_ms_before = 1e3 * ev->before_s,
                                      .step_ms_after = 1e3 * ev->after_s, .measured_gain = ev->measured_gain};
        if (pw_metrics_log_move_gain(log, &g) != PW_OK) return fail("metrics: ");
    }
    if (!ev->moved) return 0;
    pw_metrics_move_rec m = {
        .step = ev->step, .forced = ev->forced, .revert = ev->revert, .refine = ev->refine, .old_cuts = ev->old_cuts, .new_cuts = ev->new_cuts,
        .n_cuts = ev->n_cuts, .predicted_gain = ev->forced || ev->refine ? NAN : ev->predicted_gain,
        .step_ms_before = ev->forced ? NAN : 1e3 * ev->measured_step_s,
        .predicted_step_ms = ev->forced ? NAN : 1e3 * ev->predicted_step_s, .move_ms = 1e3 * ev->move_s,
        .moved_bytes = (int64_t)ev->bytes,
    };
    if (pw_metrics_log_move(log, &m) != PW_OK) return fail("metrics: ");
    return 0;
}
static int start_mpi(int *argc, char ***argv, options *o, int world)
{
    if (!pw_mpi_built()) {
        fprintf(stderr, "pipeline-run: started by mpirun with %d processes, but this build has no MPI; "
                "configure with -DPW_MPI=ON and an MPI library (Debian: libopenmpi-dev), or run "
                "without mpirun (--replicas works in one process)\n", world);
        return 2;
    }
    pw_mpi_config mc = {.n_ranks = o->stages, .n_replicas = o->replicas, .allreduce = o->allreduce,
                        .watchdog_s = o->watchdog_s, .link_latency_s = o->link_latency,
                        .link_bandwidth = o->link_bandwidth, .n_servers = o->ps_servers,
                        .n_tensor = o->tensor_parallel};
    /* MPI start-up waits for every process before the watchdog exists: a
     * process that never arrives ends the wait after the watchdog's time
     * (at least 10 s: starting MPI on a loaded machine takes seconds). */
    const double wd = o->watchdog_s > 0 ? o->watchdog_s : 60.0;
    pr_startup_guard *guard = pr_startup_guard_arm(wd > 10 ? wd : 10);
    const pw_status created = pw_mpi_transport_create(argc, argv, &mc, &g_mpi);
    pr_startup_guard_done(guard);
    if (created != PW_OK) {
        fprintf(stderr, "pipeline-run: %s\n", pw_last_error());
        return 1;
    }
    if (g_mpi->server >= 0)
        snprintf(g_who, sizeof g_who, "MPI rank %d (server %d): ", g_mpi->world_rank, g_mpi->server);
    else if (g_mpi->n_tp > 1)
        snprintf(g_who, sizeof g_who, "MPI rank %d (replica %d, stage %d, tensor rank %d): ", g_mpi->world_rank,
                 g_mpi->replica, g_mpi->rank, g_mpi->tp_rank);
    else
        snprintf(g_who, sizeof g_who, "MPI rank %d (replica %d, stage %d): ", g_mpi->world_rank, g_mpi->replica,
                 g_mpi->rank);
    atexit(report_early_exit);
    if (g_mpi->world_rank != 0) o->quiet = 2; /* only rank 0 talks */
    else if (!o->quiet && g_mpi->n_tp > 1)
        printf("pipeline-run: MPI: %d processes = %d stage%s x %d replica%s x %d tensor-parallel ranks (rank w runs "
               "replica w / %d, stage (w / %d) %% %d, tensor rank w %% %d); %s\n", g_mpi->world_size, o->stages,
               o->stages > 1 ? "s" : "", o->replicas, o->replicas > 1 ? "s" : "", g_mpi->n_tp,
               o->stages * g_mpi->n_tp, g_mpi->n_tp, o->stages, g_mpi->n_tp, g_mpi->desc);
    else if (!o->quiet)
        printf("pipeline-run: MPI: %d processes = %d stage%s x %d replica%s (rank w runs replica w / %d, "
               "stage w %% %d); %s\n", g_mpi->world_size, o->stages, o->stages > 1 ? "s" : "", o->replicas,
               o->replicas > 1 ? "s" : "", o->stages, o->stages, g_mpi->desc);
    if (g_mpi->world_rank == 0 && !o->quiet && o->ps_servers > 0)
        printf("pipeline-run: MPI: + %d parameter server%s (rank%s %d..%d), %s\n", o->ps_servers,
               o->ps_servers > 1 ? "s" : "", o->ps_servers > 1 ? "s" : "", g_mpi->world_size,
               g_mpi->world_size + o->ps_servers - 1,
               o->staleness > 0 ? "stale-synchronous" : "synchronous (the same bytes as the tree all-reduce)");
    if (o->staleness > 0 && g_mpi->world_rank == 0 && !o->quiet)
        printf("pipeline-run: MPI: a replica runs at most %d step%s ahead of the slowest (--staleness)\n",
               o->staleness, o->staleness > 1 ? "s" : "");
    return 0;
}

/* ---- schedules, forecasts, plans, generation ---- */

/* --schedule: a kind name, "auto" (*is_auto) or a readable CSV file. */
static int resolve_schedule(const options *o, pw_schedule_kind *kind, const char **csv, int *is_auto)
{
    *kind = PW_SCHEDULE_1F1B;
    *csv = NULL;
    *is_auto = 0;
    if (!strcmp(o->schedule, "auto")) {
        *is_auto = 1;
        return 0;
    }
    if (pw_schedule_kind_parse(o->schedule, kind) == PW_OK && *kind != PW_SCHEDULE_CUSTOM) return 0;
    if (access(o->schedule, R_OK) != 0) {
        fprintf(stderr, "pipeline-run: %s--schedule: '%s' is not gpipe, 1f1b, interleaved, zb-h1, zb-h2, zb-v, "
                "zb-auto, dualpipev, auto or a readable CSV file\n", g_who, o->schedule);
        return 2;
    }
    *csv = o->schedule;
    return 0;
}

/* --stages not given: parse_args guessed the core count (/ --replicas) or
 * the GPU count; lower it to the most stages this graph can make. A run
 * cuts the graph into stages x V chunks of at least one node each (V, the
 * chunks per rank: interleaved's --chunks-per-rank or 2, zb-v and dualpipev
 * 2, others 1), so at most n_nodes / V stages; each replica is a whole pipeline, so
 * replicas do not change the bound. --schedule auto is bounded at V = 1
 * (its candidates with more chunks than nodes say "not applicable"). A CSV
 * schedule fixes the stage count (and, unless given, the micro-batches)
 * itself. The micro-batch default follows the stage count. 0 or 2. */
static int default_stages(const pw_graph *g, options *o)
{
    if (!o->stages_default) return 0;
    const int guess = o->stages;
    pw_schedule_kind kind;
    int V = o->chunks_per_rank > 0 ? o->chunks_per_rank : 1;
    if (pw_schedule_kind_parse(o->schedule, &kind) == PW_OK && kind != PW_SCHEDULE_CUSTOM) {
        if (kind == PW_SCHEDULE_ZB_V || kind == PW_SCHEDULE_DUALPIPE_V) V = 2;
        else if (kind == PW_SCHEDULE_INTERLEAVED && !o->chunks_per_rank) V = 2;
    } else if (strcmp(o->schedule, "auto") != 0) {
        pw_schedule *s = NULL;
        /* An unreadable or bad CSV is reported, with its reason, later. */
        if (access(o->schedule, R_OK) != 0 || pw_schedule_load_csv(o->schedule, &s) != PW_OK) return 0;
        o->stages = s->n_ranks;
        if (!o->micro_set) {
            o->micro_batches = s->n_micro;
            o->micro_set = 1;
        }
        pw_schedule_destroy(s);
        if (o->batch % ((int64_t)o->replicas * o->micro_batches) != 0) {
            fprintf(stderr, "pipeline-run: --batch %lld is not divisible by --replicas %d x the %d "
                    "micro-batches of %s\n", (long long)o->batch, o->replicas, o->micro_batches, o->schedule);
            return 2;
        }
        return 0;
    }
    const int most = g->n_nodes / V > 0 ? g->n_nodes / V : 1;
    if (o->stages > most) {
        o->stages = most;
        if (!o->quiet)
            printf("pipeline-run: --stages defaults to %d, not %d (%s): graph '%s' has %d nodes, %d chunk%s "
                   "per stage with %s; pass --stages to choose\n", most, guess, o->stages_why, g->name,
                   g->n_nodes, V, V > 1 ? "s" : "", o->schedule);
    }
    default_micro_batches(o);
    return 0;
}

/* Compute rate of this machine on this graph: a whole-graph program at the
 * micro-batch size, forward + backward timed a few times (median-free:
 * the best of 3 after one warm-up). */
static int64_t micro_size(const options *o)
{
    return o->batch / ((int64_t)o->micro_batches * o->replicas);
}

static pw_forecast_config forecast_config(const pw_graph *g, const options *o, double rate)
{
    pw_forecast_config fc = pw_forecast_defaults();
    fc.graph = g;
    fc.stages = o->stages;
    fc.replicas = o->replicas;
    fc.micro_batches = o->micro_batches;
    fc.micro_batch_size = micro_size(o);
    fc.chunks_per_rank = o->chunks_per_rank;
    if (rate > 0) fc.flops_per_s = rate;
    if (o->link_bandwidth > 0) fc.link_bandwidth = o->link_bandwidth;
    /* The link carries the replicas' all-reduce too (as the throttle of a run does). */
    if (o->link_bandwidth > 0) fc.allreduce_bandwidth = o->link_bandwidth;
    if (o->link_set) fc.link_latency_s = o->link_latency;
    /* The replicas' sum as the run would do it (--simulate: the ring unless
     * --allreduce says otherwise, as before --allreduce existed). */
    if (o->allreduce_set) fc.allreduce_algo = o->allreduce;
    fc.compress = o->compress;
    if (o->sync_set) fc.ps_servers = o->ps_servers;
    fc.optim_state_floats = o->optim.kind == PW_OPTIM_ADAMW ? 2 : 1;
    return fc;
}

/* --memory-budget as one number (forecasts take one budget per rank). */
static int one_budget(const options *o, int64_t *out)
{
    *out = 0;
    if (!o->memory_budget) return 0;
    if (strchr(o->memory_budget, ',')) {
        fprintf(stderr, "pipeline-run: --memory-budget: --simulate and --schedule auto take one budget for "
                "every rank, not a list ('%s')\n", o->memory_budget);
        return 2;
    }
    if (pw_parse_bytes(o->memory_budget, out) != PW_OK) {
        fprintf(stderr, "pipeline-run: --memory-budget: %s\n", pw_last_error());
        return 2;
    }
    return 0;
}

static const char *fmt_link(double latency, double bandwidth, char *buf, size_t n)
{
    if (bandwidth > 0) snprintf(buf, n, "%.3g us, %.3g GB/s", latency * 1e6, bandwidth * 1e-9);
    else snprintf(buf, n, "%.3g us, no bandwidth limit", latency * 1e6);
    return buf;
}

/* --simulate --topology: where the ranks went, the links by class, and the
 * links of the slowest class (the class that takes longest for the largest
 * message: they set the pace of every micro-batch that crosses them). */
static void print_links(const pw_forecast *f)
{
    printf("  placement     %s\n", f->placement);
    if (f->n_links == 0) return;
    int count[PW_LINK_N] = {0}, first[PW_LINK_N] = {0};
    int64_t most = 0;
    for (int k = 0; k < f->n_links; k++) {
        const pw_forecast_link *l = &f->links[k];
        if (count[l->cls]++ == 0) first[l->cls] = k;
        if (l->bytes > most) most = l->bytes;
    }
    char fig[64];
    int slow = -1;
    double slow_t = -1;
    printf("  links         %d between stages:", f->n_links);
    const char *sep = " ";
    for (int c = 0; c < PW_LINK_N; c++) {
        if (!count[c]) continue;
        const pw_forecast_link *l = &f->links[first[c]];
        double t = l->latency + (l->bandwidth > 0 ? (double)most / l->bandwidth : 0.0);
        if (t > slow_t) slow_t = t, slow = c;
        printf("%s%d %s (%s)", sep, count[c], pw_link_class_name((pw_link_class)c),
               fmt_link(l->latency, l->bandwidth, fig, sizeof fig));
        sep = ", ";
    }
    printf("\n");
    double worst = 0;
    for (int k = 0; k < f->n_links; k++)
        if ((int)f->links[k].cls == slow && f->links[k].time > worst) worst = f->links[k].time;
    printf("  slowest links %s, up to %.3f ms per activation message", pw_link_class_name((pw_link_class)slow),
           worst * 1e3);
    if (count[slow] == f->n_links) {
        printf(": every link\n");
        return;
    }
    printf(", stages");
    int shown = 0, more = 0;
    for (int k = 0; k < f->n_links; k++) {
        const pw_forecast_link *l = &f->links[k];
        if ((int)l->cls != slow) continue;
        int dup = 0; /* interleaved chunks repeat rank pairs */
        for (int j = 0; j < k && !dup; j++)
            dup = f->links[j].src == l->src && f->links[j].dst == l->dst;
        if (dup) continue;
        if (shown < 8) printf(" %d->%d", l->src, l->dst), shown++;
        else more++;
    }
    printf(more ? " and %d more\n" : "\n", more);
}

static void print_forecast(const pw_forecast *f, const pw_forecast_config *fc)
{
    printf("pipeline-run: forecast for %s: %d stage%s x %d replica%s, %d micro-batches of %lld, schedule %s",
           fc->graph->name, fc->stages, fc->stages > 1 ? "s" : "", fc->replicas, fc->replicas > 1 ? "s" : "",
           fc->micro_batches, (long long)fc->micro_batch_size, pw_schedule_kind_name(f->schedule));
    if (f->chunks_per_rank > 1) printf(" (v=%d)", f->chunks_per_rank);
    printf(", %.3g FLOP/s per rank\n", fc->flops_per_s);
    printf("  step time     %.3f ms\n", f->step_time * 1e3);
    printf("  bubble        %.1f%% (steady state %.1f%%)\n", 100.0 * f->bubble, 100.0 * f->steady_bubble);
    printf("  samples/s     %.1f\n", f->samples_per_s);
    const double MiB = 1024.0 * 1024.0;
    int64_t lo = INT64_MAX, hi = 0;
    int at_lo = 0, at_hi = 0;
    for (int r = 0; r < f->n_ranks; r++) {
        if (f->peak_memory[r] < lo) lo = f->peak_memory[r], at_lo = r;
        if (f->peak_memory[r] > hi) hi = f->peak_memory[r], at_hi = r;
    }
    if (f->n_ranks <= 16) {
        printf("  peak memory per stage (MiB):");
        for (int r = 0; r < f->n_ranks; r++) printf(" %.1f", (double)f->peak_memory[r] / MiB);
        printf("\n");
    } else {
        printf("  peak memory per stage: max %.1f MiB (stage %d), min %.1f MiB (stage %d), %d stages\n",
               (double)hi / MiB, at_hi, (double)lo / MiB, at_lo, f->n_ranks);
    }
    if (fc->memory_budget > 0)
        printf("  memory budget %.1f MiB per stage: %s\n", (double)fc->memory_budget / MiB,
               f->fits ? "fits" : "does NOT fit");
    if (fc->tensor > 1)
        printf("  tensor        T = %d per stage (one rank's figures above); its all-reduces %.3f ms per micro-batch "
               "(the busiest stage, F and B)%s%s\n", fc->tensor, f->tp_time * 1e3, fc->topology ? ", " : "",
               fc->topology ? pw_link_class_name((pw_link_class)f->tp_cls) : "");
    if (fc->replicas > 1)
        printf("  all-reduce    %.3f ms per step across %d replicas (stage %d, the slowest%s%s)\n",
               f->allreduce_time * 1e3, fc->replicas, f->allreduce_stage, fc->topology ? "; ring " : "",
               fc->topology ? pw_link_class_name((pw_link_class)f->allreduce_cls) : "");
    if (fc->topology) print_links(f);
}

/* --simulate: nothing trains, no data is loaded. */
static int run_simulate(const pw_graph *g, const options *o)
{
    pw_schedule_kind kind;
    const char *csv;
    int is_auto, rc;
    if ((rc = resolve_schedule(o, &kind, &csv, &is_auto)) != 0) return rc;
    if (csv) {
        fprintf(stderr, "pipeline-run: --simulate takes a schedule kind or auto, not a CSV file (%s)\n", csv);
        return 2;
    }
    pw_forecast_config fc = forecast_config(g, o, o->flops_per_s);
    if ((rc = one_budget(o, &fc.memory_budget)) != 0) return rc;
    fc.schedule = kind;
    /* Tensor parallelism: one rank's graph (the last rank's, the largest
     * parts) cut at the whole graph's FLOP cuts (pw_forecast_config.tensor). */
    pw_graph *rank_g = NULL;
    pw_partition tp_part = {0};
    if (o->tensor_parallel > 1) {
        const int C = o->stages * (kind == PW_SCHEDULE_ZB_V ? 2
                                   : kind == PW_SCHEDULE_INTERLEAVED ? (o->chunks_per_rank > 0 ? o->chunks_per_rank : 2)
                                                                      : 1);
        if (is_auto) {
            fprintf(stderr, "pipeline-run: --simulate --tensor-parallel takes a schedule kind, not auto\n");
            return 2;
        }
        if (pw_graph_tp_rank(g, o->tensor_parallel, o->tensor_parallel - 1, &rank_g) != PW_OK ||
            pw_partition_make(g, C, PW_PARTITION_FLOPS, &tp_part) != PW_OK) {
            fprintf(stderr, "pipeline-run: --simulate --tensor-parallel %d: %s\n", o->tensor_parallel, pw_last_error());
            pw_graph_destroy(rank_g);
            return 1;
        }
        fc.graph = rank_g;
        fc.tensor = o->tensor_parallel;
        fc.cuts = tp_part.begin;
    }
    if (o->calibrate) {
        double step = 0;
        if (pw_forecast_calibrate(&fc, &fc.flops_per_s, &step) != PW_OK) {
            fprintf(stderr, "pipeline-run: --calibrate: %s\n", pw_last_error());
            pw_graph_destroy(rank_g);
            pw_partition_free(&tp_part);
            return 1;
        }
        printf("pipeline-run: --calibrate: a one-stage step of %d micro-batches of %lld takes %.3f ms here: "
               "%.3g FLOP/s per rank\n", fc.micro_batches, (long long)fc.micro_batch_size, step * 1e3,
               fc.flops_per_s);
    }
    pw_trace *tr = NULL;
    hwloc_topology_t topo = NULL;
    pw_forecast f;
    memset(&f, 0, sizeof f);
    if (o->topology) {
        /* Place the ranks on it; the link flags then set the links between
         * hosts, the other classes keep their defaults (docs/schedules.md). */
        if (pw_topology_load_spec(o->topology, &topo) != PW_OK) {
            fprintf(stderr, "pipeline-run: --topology: %s\n", pw_last_error());
            rc = 1;
            goto out;
        }
        fc.topology = topo;
        if (o->link_bandwidth > 0) fc.host_bandwidth = o->link_bandwidth;
        if (o->link_latency_set) fc.host_latency_s = o->link_latency;
    }
    if (is_auto) {
        printf("pipeline-run: --schedule auto: candidates at %.3g FLOP/s per rank (%s)\n", fc.flops_per_s,
               o->flops_per_s > 0 ? "--flops-per-s" : o->calibrate ? "--calibrate"
               : "the forecast default; set --flops-per-s");
        if (pw_forecast_auto(&fc, &f, stdout) != PW_OK) {
            fprintf(stderr, "pipeline-run: --schedule auto: %s\n", pw_last_error());
            rc = 1;
            goto out;
        }
        fc.schedule = f.schedule;
        fc.chunks_per_rank = f.chunks_per_rank;
        pw_forecast_free(&f);
        memset(&f, 0, sizeof f);
    }
    if (o->trace) {
        int v = fc.chunks_per_rank > 2 ? fc.chunks_per_rank : 2;
        int64_t per = 16 * (int64_t)fc.micro_batches * v + 64;
        if (pw_trace_create(fc.stages, per, &tr) != PW_OK) {
            fprintf(stderr, "pipeline-run: --trace: %s\n", pw_last_error());
            rc = 1;
            goto out;
        }
        fc.trace = tr;
    }
    rc = 0;
    if (pw_forecast_run(&fc, &f) != PW_OK) {
        fprintf(stderr, "pipeline-run: --simulate: %s\n", pw_last_error());
        rc = 1;
        goto out;
    }
    print_forecast(&f, &fc);
    if (o->trace) {
        if (pw_forecast_write_trace(&fc, &f, o->trace) != PW_OK) {
            fprintf(stderr, "pipeline-run: --trace: %s\n", pw_last_error());
            rc = 1;
            goto out;
        }
        printf("simulated trace written to %s\n", o->trace);
    }
out:
    pw_forecast_free(&f);
    pw_trace_destroy(tr);
    if (topo) hwloc_topology_destroy(topo);
    pw_graph_destroy(rank_g);
    pw_partition_free(&tp_part);
    return rc;
}

/* --schedule auto before training: forecast every kind, keep the fastest
 * that fits, print the table and the reason. */
static int choose_auto(const pw_graph *g, const options *o, pw_schedule_kind *kind, int *v)
{
    double rate = o->flops_per_s;
    const char *src = "--flops-per-s";
    if (rate <= 0) {
        /* The forecasts' own calibration: the rate at which their cost model
         * takes as long as a one-stage step measured here. */
        pw_forecast_config cal = forecast_config(g, o, 0);
        if (pw_forecast_calibrate(&cal, &rate, NULL) != PW_OK) {
            pw_clear_error();
            rate = 0;
        }
        src = "calibrated: a one-stage step of the whole graph on this machine (pw_forecast_calibrate)";
        if (rate <= 0) {
            rate = pw_forecast_defaults().flops_per_s;
            src = "the forecast default (measuring failed)";
        }
    }
    pw_forecast_config fc = forecast_config(g, o, rate);
    int rc;
    if ((rc = one_budget(o, &fc.memory_budget)) != 0) return rc;
    if (!o->quiet)
        printf("pipeline-run: --schedule auto: compute rate %.3g FLOP/s per stage (%s)\n", rate, src);
    pw_forecast best;
    memset(&best, 0, sizeof best);
    if (pw_forecast_auto(&fc, &best, o->quiet ? NULL : stdout) != PW_OK) {
        fprintf(stderr, "pipeline-run: --schedule auto: %s\n", pw_last_error());
        return 1;
    }
    *kind = best.schedule;
    *v = best.chunks_per_rank;
    pw_forecast_free(&best);
    return 0;
}

/* What a plan borrows (a CSV schedule, the profile, the devices, the
 * topology, this machine's GPUs), freed with it. */
typedef struct plan_run {
    pw_plan *plan;
    pw_schedule *custom;
    pw_profile *prof;
    pw_device_spec *devs;
    hwloc_topology_t topo;
    pw_plan_local *local;        /* --device cuda: this machine's GPUs and topology */
} plan_run;

static void plan_run_free(plan_run *pr)
{
    pw_plan_destroy(pr->plan);
    pw_plan_local_destroy(pr->local);
    if (pr->topo) hwloc_topology_destroy(pr->topo);
    free(pr->devs);
    pw_profile_destroy(pr->prof);
    pw_schedule_destroy(pr->custom);
    memset(pr, 0, sizeof *pr);
}
/* The planner's flags besides --memory-budget (which --schedule auto also
 * takes). Any planner flag makes training run the plan's cuts. */
static int planner_flags(const options *o)
{
    return o->balance_set || o->profile || o->topology || o->device_speeds || o->link_set || o->gpu_memory;
}

/* pw_plan_make from the flags, for --plan and for training (which then runs
 * plan->part.begin). `what` prefixes the planner's own error ("--plan: ").
 * Returns 0, or the exit status after printing the error. */
static int make_plan(const pw_graph *g, const options *o, pw_schedule_kind kind, const char *csv,
                     const char *what, plan_run *pr)
{
    memset(pr, 0, sizeof *pr);
    pw_plan_config pc = pw_plan_defaults();
    pc.graph = g;
    pc.stages = o->stages;
    pc.replicas = o->replicas;
    pc.micro_batches = o->micro_batches;
    pc.micro_batch_size = micro_size(o);
    pc.schedule = kind;
    pc.method = o->partition;
    pc.balance = o->balance;
    if (o->flops_per_s > 0) pc.flops_per_s = o->flops_per_s;
    pc.link_bandwidth = o->link_bandwidth;
    pc.link_latency = o->link_latency;
    pc.optim = o->optim.kind;
    pc.recompute = o->recompute;
    pc.grad_groups = o->grad_groups;
    if (csv) {
        if (pw_schedule_load_csv(csv, &pr->custom) != PW_OK) {
            fprintf(stderr, "pipeline-run: %s--schedule: %s\n", g_who, pw_last_error());
            return 1;
        }
        pc.custom = pr->custom;
    }
    if (o->balance == PW_BALANCE_TIME || o->profile) {
        /* Under mpirun every process plans for itself: they agree on the
         * cuts only when they read one profile measured beforehand. */
        if (g_mpi && (!o->profile || access(o->profile, R_OK) != 0)) {
            fprintf(stderr, "pipeline-run: %s--balance time under mpirun needs a --profile FILE measured "
                    "beforehand (pipeline-run GRAPH --plan --balance time --profile FILE, same batch and "
                    "micro-batches), so that every process plans the same cuts\n", g_who);
            return 2;
        }
        pw_profile_config prc = {.micro_batch = micro_size(o), .threads = o->threads ? o->threads : 1,
                                 .optim = o->optim.kind};
        int measured = 0;
        if (pw_profile_load_or_measure(o->profile, g, &prc, &pr->prof, &measured) != PW_OK) {
            fprintf(stderr, "pipeline-run: %s--profile: %s\n", g_who, pw_last_error());
            return 1;
        }
        if (!o->quiet)
            printf("pipeline-run: profile %s%s\n", measured ? "measured" : "loaded from ",
                   measured ? (o->profile ? " and written" : " (not saved: no --profile)") : o->profile);
        pc.profile = pr->prof;
        if (!o->balance_set) pc.balance = PW_BALANCE_TIME;
    }
    if (o->device_speeds || o->memory_budget) {
        if (pw_plan_parse_devices(o->device_speeds, o->memory_budget, o->stages, &pr->devs) != PW_OK) {
            fprintf(stderr, "pipeline-run: %s%s\n", g_who, pw_last_error());
            return 2;
        }
        pc.devices = pr->devs;
    }
    if (o->gpu_memory) {
        if (pw_parse_bytes(o->gpu_memory, &pc.gpu_memory) != PW_OK || pc.gpu_memory <= 0) {
            fprintf(stderr, "pipeline-run: %s--gpu-memory: '%s' is not a size > 0 (e.g. 16G)\n", g_who,
                    o->gpu_memory);
            return 2;
        }
    }
    if (o->topology) {
        if (pw_topology_load_spec(o->topology, &pr->topo) != PW_OK) {
            fprintf(stderr, "pipeline-run: %s--topology: %s\n", g_who, pw_last_error());
            return 1;
        }
        pc.topology = pr->topo;
        pc.topology_name = o->topology;
    } else if (pw_plan_local_devices(o->device ? o->device : "cpu", &pc, &pr->local) != PW_OK) {
        /* --device cuda[:N]: the plan places on this machine's GPUs (the
         * ones the run uses, in device order) with their free memory, on
         * this machine's topology for their cores. */
        fprintf(stderr, "pipeline-run: %s--device %s: %s\n", g_who, o->device, pw_last_error());
        return 1;
    }
    if (pw_plan_make(&pc, &pr->plan) != PW_OK) {
        fprintf(stderr, "pipeline-run: %s%s%s\n", g_who, what, pw_last_error());
        return 1;
    }
    return 0;
}

/* --plan: pw_plan_make + pw_plan_print; no data, no training. */
static int run_plan(const pw_graph *g, const options *o)
{
    pw_schedule_kind kind;
    const char *csv;
    int is_auto, rc;
    if ((rc = resolve_schedule(o, &kind, &csv, &is_auto)) != 0) return rc;
    if (is_auto) {
        fprintf(stderr, "pipeline-run: --plan needs a schedule kind or CSV file, not auto (try --simulate "
                "--schedule auto)\n");
        return 2;
    }
    plan_run pr;
    rc = make_plan(g, o, kind, csv, "--plan: ", &pr);
    if (rc == 0 && pw_plan_print(stdout, pr.plan) != PW_OK) {
        fprintf(stderr, "pipeline-run: --plan: %s\n", pw_last_error());
        rc = 1;
    }
    plan_run_free(&pr);
    return rc;
}

/* --parallel auto: the layout search (tools/pipeline-run/parallel.h) takes
 * the axes the flags fixed and chooses the rest; training then runs the
 * choice with the forecast's FLOP-balanced cuts. Its --memory-budget is
 * spent on the search. 0 or the exit status. */
static int choose_parallel(const pw_graph *g, options *o)
{
    pr_parallel_request rq = {.graph = g, .graph_path = o->graph, .batch = o->batch, .processes = o->processes,
                              .topology = o->topology, .memory_budget = o->memory_budget,
                              .flops_per_s = o->flops_per_s, .optim = o->optim.kind,
                              .grad_groups = o->grad_groups, .pins = pw_layout_space_defaults(),
                              .quiet = o->quiet};
    pw_layout_space *p = &rq.pins;
    p->stages = o->stages_default ? 0 : o->stages;
    p->replicas = o->replicas_set ? o->replicas : 0;
    p->tensor = o->tensor_parallel;
    p->threads = o->threads;
    p->micro_batches = o->micro_set ? o->micro_batches : 0;
    p->chunks_per_rank = o->chunks_per_rank;
    p->recompute = o->recompute ? 1 : -1;
    if (o->schedule_set && strcmp(o->schedule, "auto")) {
        int is_auto, rc;
        const char *csv;
        if ((rc = resolve_schedule(o, &p->schedule, &csv, &is_auto)) != 0) return rc;
        p->schedule_pinned = 1;
    }
    pw_layout l;
    const int rc = pr_parallel_auto(&rq, &l);
    if (rc) return rc;
    o->stages = l.stages;
    o->stages_default = 0;
    o->replicas = l.replicas;
    o->tensor_parallel = l.tensor > 1 ? l.tensor : 0;
    o->threads = l.threads;
    o->micro_batches = l.micro_batches;
    o->micro_set = 1;
    o->schedule = pw_schedule_kind_name(l.schedule);
    o->chunks_per_rank = l.schedule == PW_SCHEDULE_INTERLEAVED ? l.chunks_per_rank : 0;
    o->recompute = l.recompute;
    o->partition = PW_PARTITION_FLOPS;
    o->memory_budget = NULL;
    o->topology = NULL;
    pw_cpu_set_threads(o->threads);
    return 0;
}

/* A one-window token data set of zeros: what a pipeline needs to be built
 * for --generate without loading any corpus. */
/* Under mpirun, PW_DEBUG=INFO says what this process loaded (the MPI tests
 * check that a middle stage loads nothing). */
static void log_data(const pw_dataset *d, const char *split)
{
    if (!d || !pw_log_enabled(PW_LOG_INFO, PW_SUB_DATA)) return;
    const unsigned have = PW_DATA_ALL & ~d->missing;
    PW_INFO(PW_SUB_DATA, "%s%s data %s: %lld samples, loaded %s (%lld bytes)", g_who, split, d->name,
            (long long)d->n, have == PW_DATA_ALL ? "inputs and labels" : have == PW_DATA_INPUTS ? "inputs only"
            : have == PW_DATA_LABELS ? "labels only" : "nothing (its stages read neither inputs nor labels)",
            (long long)d->loaded_bytes);
}

/* Loads the training data and the test split (when the spec has one): all
 * of it in one process; under mpirun only the sides this process's chunks
 * read (pw_pipeline_data_parts on the finished config). 0, or 1 after
 * reporting the error. */
static int load_data(const options *o, const pw_graph *g, const pw_pipeline_config *pc, pw_dataset **train,
                     pw_dataset **test)
{
    if (o->generate) {
        if (pw_generate_dataset(g, train) != PW_OK) *train = NULL; /* no test set */
        if (!*train) fail("--generate: ");
        return *train ? 0 : 1;
    }
    unsigned parts = PW_DATA_ALL, test_parts = PW_DATA_ALL;
    if (pw_pipeline_data_parts(pc, 0, &parts) != PW_OK || pw_pipeline_data_parts(pc, 1, &test_parts) != PW_OK) {
        fail("");
        return 1;
    }
    if (pw_dataset_from_spec_parts(o->data, 1, g, parts, train) != PW_OK) {
        fail("--data: ");
        return 1;
    }
    log_data(*train, "train");
    if (pw_dataset_spec_has_test(o->data)) {
        /* Checked against the graph now, not at the first evaluation (a token
         * id outside the vocabulary, named with its shard and position). */
        if (pw_dataset_from_spec_parts(o->data, 0, g, test_parts, test) != PW_OK ||
            pw_dataset_check_graph(g, *test) != PW_OK) {
            fail("--data (test set): ");
            return 1;
        }
        log_data(*test, "test");
    } else if (!o->quiet) {
        printf("pipeline-run: --data %s has no test set; accuracy is not reported\n", o->data);
    }
    return 0;
}

/* ---- the training run ---- */

/* Everything one run holds; finish_process frees it. */
typedef struct run {
    options o;
    int world;                   /* processes mpirun started (1: none) */
    pw_state *resume;            /* --resume */
    pw_graph *g;
    pw_dataset *train, *test;
    double entropy;              /* the held-out split's unigram entropy (token data), else -1 */
    pw_schedule_kind kind;       /* resolved (--schedule auto: chosen) */
    const char *csv;             /* --schedule FILE */
    int memory_limit;            /* zb-auto's micro-batches in flight per stage (0: 2p) */
    int use_plan;                /* training runs the plan's cuts (the planner's flags) */
    pw_partition_method plan_method;
    pw_balance plan_balance;
    pw_pipeline_config pc;
    pw_pipeline *t;
    pw_state_writer *ckw;        /* --checkpoint-dir */
    pw_pipeline_metrics *mx;     /* --metrics */
    pr_rebalance *rbl;           /* --rebalance, --rebalance-at */
    pw_profile *prof;            /* --balance time's op times (--rebalance decides with them too) */
    /* The training loop's. */
    int64_t spe, total, start;   /* steps per epoch, the last step, steps done before this run */
    int tty;                     /* the progress line is redrawn in place */
    pw_step_stats s;
    pw_eval_stats ev;
    double t0;                   /* training started */
    double step_s, first_step_s; /* inside pw_pipeline_step (evaluations excluded) */
    int stopped;                 /* the signal that stopped training (stop_signal) */
    int checkpointed;            /* 1: the signal's checkpoint is complete */
    int64_t steps_done;          /* for the shutdown's progress board */
} run;

static const char *signal_name(int sig)
{
    return sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal";
}

/* --resume: opened before anything is built or written, so a checkpoint
 * that cannot be read is refused here; its layout sets the micro-batches.
 * 0, or the exit status after the message. */
static int open_resume(run *r, char *note, size_t n)
{
    note[0] = '\0';
    if (!r->o.resume) return 0;
    if (pw_state_open(r->o.resume, &r->resume) != PW_OK) {
        fprintf(stderr, "pipeline-run: %s\n", pw_last_error());
        return 1;
    }
    /* The workers' count: --sync ps's servers are not replicas, and a
     * stage's T tensor-parallel processes are one rank of the layout. */
    const int T = r->o.tensor_parallel > 1 ? r->o.tensor_parallel : 1;
    int rc = resume_layout(&r->o, pw_state_get_meta(r->resume), (r->world - r->o.ps_servers) / T, note, n);
    if (rc) {
        pw_state_close(r->resume);
        r->resume = NULL;
    }
    return rc;
}

static int load_graph(run *r)
{
    if (pw_graph_parse_file(r->o.graph, &r->g) != PW_OK) {
        fprintf(stderr, "%s%s\n", g_who, pw_last_error());
        return 1;
    }
    if (r->o.print_graph && r->o.quiet < 2) pw_graph_print(r->g, stdout);
    int rc;
    if (r->o.parallel && (rc = choose_parallel(r->g, &r->o)) != 0) return rc; /* --parallel auto */
    return default_stages(r->g, &r->o);
}

/* The schedule to train with (--schedule auto: forecast and chosen), and
 * whether training runs a plan's cuts: the planner's flags make it (the
 * cuts --plan prints), refused when it does not fit. --schedule auto has
 * already applied a lone --memory-budget to a schedule of several chunks
 * per rank, which the planner does not cut. */
static int choose_schedule(run *r)
{
    int is_auto = 0, rc;
    if ((rc = resolve_schedule(&r->o, &r->kind, &r->csv, &is_auto)) != 0) return rc;
    if (is_auto) {
        int v = 0;
        if ((rc = choose_auto(r->g, &r->o, &r->kind, &v)) != 0) return rc;
        r->o.chunks_per_rank = v;
    }
    r->memory_limit = 0; /* zb-auto's; 0: its default, 2p */
    if (r->o.memory_limit &&
        pw_schedule_memory_limit_parse(r->o.memory_limit, r->o.stages, &r->memory_limit) != PW_OK) {
        fprintf(stderr, "pipeline-run: %s--memory-limit: %s\n", g_who, pw_last_error());
        return 2;
    }
    r->use_plan = planner_flags(&r->o) || (r->o.memory_budget && !(is_auto && r->o.chunks_per_rank > 1));
    return 0;
}

/* The pipeline's configuration from the flags (and the plan's cuts). */
static void pipeline_config(run *r, const plan_run *pr)
{
    const options *o = &r->o;
    pw_pipeline_config pc = pw_pipeline_defaults();
    pc.graph = r->g;
    pc.batch = o->batch;
    pc.micro_batches = o->micro_batches;
    pc.stages = o->stages;
    pc.schedule = r->kind;
    pc.schedule_csv = r->csv;
    pc.partition = o->partition;
    pc.optim = o->optim;
    pc.seed = o->seed;
    pc.shuffle = o->shuffle;
    pc.watchdog_s = o->watchdog_s;
    pc.pin = o->pin;
    pc.threads = o->threads;
    pc.grad_groups = o->grad_groups;
    pc.tensor_parallel = o->tensor_parallel;
    pc.check = o->check;
    pc.replicas = o->replicas;
    pc.buckets = o->buckets;
    pc.clip_grad_norm = o->clip;
    pc.post_validate = o->post_validate;
    pc.overlap_steps = o->overlap_steps;
    pc.compress = o->compress;
    pc.transport = g_mpi;
    pc.link = (pw_link){.latency_s = o->link_latency, .bandwidth = o->link_bandwidth};
    pc.ps_servers = o->ps_servers;
    pc.ps_staleness = o->staleness;
    pc.chunks_per_rank = o->chunks_per_rank;
    pc.memory_limit = r->memory_limit;
    pc.recompute = o->recompute;
    pc.device = o->device;
    pc.math = (int)o->gpu_math;
    pc.no_graphs = o->no_gpu_graphs;
    if (r->use_plan) {
        pc.cuts = pr->plan->part.begin;
        pc.n_cuts = pr->plan->part.n_stages + 1;
    }
    r->plan_method = r->use_plan ? pr->plan->part.method : o->partition;
    r->plan_balance = r->use_plan ? pr->plan->balance : PW_BALANCE_FLOPS;
    r->pc = pc;
}

/* What the pipeline needs before it is made: the metrics log (before the
 * data, the slow part: a log that cannot be written fails now), the data
 * (once the layout is known: under mpirun a process loads only the sides
 * its chunks read, docs/distributed.md), the run's length, and a resumed
 * checkpoint's agreement (another graph or other math is refused before
 * anything runs). 0, or 1 after the error. */
static int prepare(run *r)
{
    const options *o = &r->o;
    if (o->metrics && pw_pipeline_metrics_open(o->metrics, o->stages, g_mpi, &r->mx) != PW_OK)
        return fail("--metrics: ");
    if (load_data(o, r->g, &r->pc, &r->train, &r->test) != 0) return 1;
    r->entropy = r->test && r->test->x_dtype == PW_I32 ? pw_dataset_unigram_entropy(r->test) : -1;
    const int64_t spe0 = r->train->n / o->batch;
    const int64_t total0 = o->steps ? o->steps : o->epochs * (spe0 > 0 ? spe0 : 1);
    r->pc.train = r->train;
    r->pc.optim.decay_steps = total0; /* --lr-schedule decays over this run */
    if (o->trace) r->pc.trace_events = pw_pipeline_trace_capacity(o->micro_batches, o->buckets, total0);
    if (r->resume) {
        pw_state_run run = pw_state_run_of(&r->pc, o->data);
        if (pw_state_check(r->resume, r->g, &run) != PW_OK) return fail("");
    }
    return 0;
}

/* --init-from, --resume's restore and --checkpoint-dir's writer, once the
 * pipeline exists. 0, or 1 after the error. */
static int restore_and_checkpoints(run *r)
{
    const options *o = &r->o;
    if (o->init_from && pw_pipeline_load(r->t, o->init_from, NULL) != PW_OK) return fail("--init-from: ");
    if (r->resume) {
        const pw_state_meta *m = pw_state_get_meta(r->resume);
        if (pw_state_restore(r->resume, r->t, o->replicas) != PW_OK) return fail("--resume: ");
        if (!o->quiet)
            printf("pipeline-run: resumed from %s: step %lld (epoch %lld, %lld of its steps done); written by "
                   "pipewright %s on %d stage%s x %d replica%s%s%.0d, schedule %s, %d process%s\n", m->path,
                   (long long)m->step, (long long)m->epoch + 1, (long long)m->step_in_epoch, m->version,
                   m->layout.stages, m->layout.stages > 1 ? "s" : "", m->layout.replicas,
                   m->layout.replicas > 1 ? "s" : "", m->layout.tensor_parallel > 1 ? " x T " : "",
                   m->layout.tensor_parallel > 1 ? m->layout.tensor_parallel : 0, m->layout.schedule,
                   m->layout.processes, m->layout.processes > 1 ? "es" : "");
        /* --compress: the error-feedback state where the checkpoint has it. */
        char why[600];
        if (pw_state_restore_compress(r->resume, r->t, why, sizeof why) != PW_OK) return fail("--resume: ");
        if (why[0])
            fprintf(stderr, "pipeline-run: --resume with --compress %s: the error-feedback state (residuals%s) "
                    "is not restored: %s; it starts again from zero\n", o->compress.kind == PW_COMPRESS_TOPK
                    ? "topk" : "powersgd", o->compress.kind == PW_COMPRESS_POWERSGD ? ", Q" : "", why);
    }
    if (!o->checkpoint_dir) return 0;
    static char extra[320];
    run_extra(o, extra, sizeof extra);
    pw_state_config sc = {
        .dir = o->checkpoint_dir, .keep = o->keep, .every = o->checkpoint_every, .graph = r->g,
        .run = pw_state_run_of(&r->pc, o->data), .layout = pw_state_layout_of(r->t), .extra = extra,
        .transport = g_mpi, .resumed = r->resume,
        .foreground = getenv("PW_CHECKPOINT_FOREGROUND") != NULL,
    };
    if (pw_state_writer_create(&sc, &r->ckw) != PW_OK) return fail("");
    return 0;
}

/* --rebalance, --rebalance-at: the rebalancer watches the pipeline's step
 * times (tools/pipeline-run/rebalance.h); one budget for every stage. 0, or
 * the exit status after the error. */
static int open_rebalance(run *r)
{
    const options *o = &r->o;
    if (!o->rebalance && !o->rebalance_at) return 0;
    pw_plan_config rp = pw_plan_defaults();
    rp.graph = r->g;
    rp.stages = o->stages;
    rp.replicas = o->replicas;
    rp.micro_batches = o->micro_batches;
    rp.micro_batch_size = micro_size(o);
    rp.optim = o->optim.kind;
    rp.recompute = o->recompute;
    rp.grad_groups = o->grad_groups;
    pr_rebalance_config rc = {.mode = o->rebalance, .min_gain = o->rebalance_gain, .forced = o->rebalance_at,
                              .plan = rp, .profile = r->prof, .t = g_mpi, .quiet = o->quiet};
    int st;
    if (rc.mode && (st = one_budget(o, &rc.plan.memory_budget)) != 0) return st;
    return pr_rebalance_open(&rc, r->t, &r->rbl);
}

/* Schedule, plan, configuration, data, pipeline, restored state. 0, or the
 * exit status after the error. */
static int build(run *r)
{
    int rc;
    if ((rc = choose_schedule(r)) != 0) return rc;
    plan_run pr = {0};
    if (r->use_plan) {
        if ((rc = make_plan(r->g, &r->o, r->kind, r->csv, "", &pr)) != 0) {
            plan_run_free(&pr);
            return rc;
        }
        if (!r->o.quiet && pw_plan_print(stdout, pr.plan) != PW_OK) {
            plan_run_free(&pr);
            return fail("plan: ");
        }
    }
    pipeline_config(r, &pr);
    rc = prepare(r);
    if (rc == 0 && pw_pipeline_create(&r->pc, &r->t) != PW_OK) rc = fail("");
    r->prof = pr.prof; /* --rebalance decides with the same op times */
    pr.prof = NULL;
    plan_run_free(&pr); /* the pipeline keeps a copy of the cuts */
    if (rc) return rc;
    if ((rc = restore_and_checkpoints(r)) != 0) return rc;
    return open_rebalance(r);
}

/* --generate: text after the prompt, no training. */
static int run_generate(run *r)
{
    pw_generate_config gc = pw_generate_defaults();
    gc.graph = r->g;
    gc.prompt = r->o.generate;
    gc.tokens = r->o.gen_tokens;
    gc.temperature = r->o.temperature;
    gc.top_k = r->o.top_k;
    gc.seed = r->o.seed;
    char *text = NULL;
    if (pw_generate(r->t, &gc, &text) != PW_OK) return fail("--generate: ");
    fputs(text, stdout);
    fputs("\n", stdout);
    free(text);
    return 0;
}

/* The lines before training: graph, stages and schedule, replicas, data
 * and optimizer. The planned memory is summed over every process
 * (collective under mpirun: every process takes part). */
static void print_header(const run *r)
{
    const options *o = &r->o;
    double planned = 0;
    if (pw_pipeline_planned_bytes(r->t, &planned) != PW_OK) fail("");
    if (o->quiet) return;
    const pw_graph *g = r->g;
    pw_op_cost cost;
    pw_graph_total_cost(g, &cost);
    const pw_partition *part = pw_pipeline_partition(r->t);
    printf("pipeline-run: %s: %d nodes, %d parameter tensors (%.2f M values), %.1f MiB planned\n",
           g->name, g->n_nodes, g->n_params, (double)cost.param_bytes / 4e6, planned / (1 << 20));
    if (r->use_plan)
        printf("pipeline-run: %d stage%s (planned %s partition, balance %s:", o->stages,
               o->stages > 1 ? "s" : "", pw_partition_method_name(r->plan_method),
               pw_balance_name(r->plan_balance));
    else
        printf("pipeline-run: %d stage%s (%s partition:", o->stages, o->stages > 1 ? "s" : "",
               pw_partition_method_name(part->method));
    for (int st = 0; st < part->n_stages; st++) printf(" [%d,%d)", part->begin[st], part->begin[st + 1]);
    if (pw_pipeline_chunks_per_rank(r->t) > 1) printf(" = %d chunks per stage", pw_pipeline_chunks_per_rank(r->t));
    if (o->recompute) printf(", recompute");
    printf("), schedule %s, theoretical bubble %.1f%%\n", r->csv ? r->csv : pw_schedule_kind_name(r->kind),
           100.0 * pw_pipeline_theory_bubble(r->t));
    char blas[96], coretype[32];
    if (!o->device && pw_cpu_blas_describe(blas, sizeof blas, coretype, sizeof coretype))
        printf("pipeline-run: note: the CPU BLAS (%s) does not know this processor and runs a kernel "
               "without AVX, several times slower; OPENBLAS_CORETYPE=%s selects a faster one "
               "(docs/performance.md, \"The BLAS kernel\")\n", blas, coretype);
    const pw_schedule *sched = pw_pipeline_schedule(r->t);
    if (o->replicas > 1) {
        const int G = pw_grad_groups(o->grad_groups, o->replicas, o->micro_batches, NULL);
        char same[160];
        if (o->compress.kind != PW_COMPRESS_NONE) {
            char zn[32];
            pw_compress_name(&o->compress, zn, sizeof zn);
            snprintf(same, sizeof same, "compressed as %s (docs/distributed.md, \"Compression\"): not the bits "
                     "of 1 replica", zn);
        } else if (g_mpi && o->allreduce != PW_ALLREDUCE_TREE && o->allreduce != PW_ALLREDUCE_AUTO && o->replicas > 2)
            snprintf(same, sizeof same, "equal to 1 replica to rounding only (--allreduce %s%s)",
                     o->allreduce == PW_ALLREDUCE_RING ? "ring" : o->allreduce == PW_ALLREDUCE_MPI ? "mpi" : "hierarchical",
                     o->allreduce == PW_ALLREDUCE_HIER ? ", unless hosts hold contiguous power-of-two groups" : "");
        else if (pw_grad_groups_identical(G, o->replicas))
            snprintf(same, sizeof same, "the same bits as 1 replica (%d gradient groups)", G);
        else
            snprintf(same, sizeof same, "equal to 1 replica to rounding only (%d gradient groups; "
                     "--grad-groups %d makes it bit-identical)", G, o->replicas);
        printf("pipeline-run: %d replicas, each %lld samples of every batch; gradients summed in %d "
               "bucket%s per stage%s; %s\n", o->replicas, (long long)(o->batch / o->replicas), sched->n_buckets,
               sched->n_buckets > 1 ? "s" : "", g_mpi ? "" : " (in-process tree all-reduce)", same);
    } else if (o->compress.kind != PW_COMPRESS_NONE) {
        printf("pipeline-run: --compress has no effect with one replica (nothing is summed across replicas)\n");
    }
    char lr_sched[96] = "";
    if (o->optim.schedule != PW_LR_CONSTANT)
        snprintf(lr_sched, sizeof lr_sched, " %s to %g", pw_lr_schedule_name(o->optim.schedule),
                 (double)o->optim.min_lr);
    if (o->optim.warmup_steps > 0)
        snprintf(lr_sched + strlen(lr_sched), sizeof lr_sched - strlen(lr_sched), " after %lld warm-up steps",
                 (long long)o->optim.warmup_steps);
    printf("pipeline-run: data %s: %lld train / %lld test samples; batch %lld = %d x %d x %lld; "
           "%s lr %g%s; %lld steps (%lld per epoch)\n",
           r->train->name, (long long)r->train->n, r->test ? (long long)r->test->n : 0LL, (long long)o->batch,
           o->replicas, o->micro_batches, (long long)(o->batch / o->micro_batches / o->replicas),
           pw_optim_name(o->optim.kind), (double)o->optim.lr, lr_sched, (long long)r->total, (long long)r->spe);
    fflush(stdout);
}

/* The progress line after step i (of this run's loop), at most every
 * 0.1 s on a terminal, else every tenth of an epoch, and at each epoch's end. */
static void print_progress(const run *r, int64_t i, int epoch_done, double *last_print)
{
    const options *o = &r->o;
    double now = now_s();
    double rate = (double)(i + 1 - r->start) * (double)o->batch / (now - r->t0);
    const int64_t print_every = r->spe / 10 > 0 ? r->spe / 10 : 1;
    if (o->quiet || !(r->tty ? (now - *last_print > 0.1 || epoch_done) : ((i + 1) % print_every == 0 || epoch_done)))
        return;
    char eta[32], norm[48] = "";
    fmt_time((double)(r->total - i - 1) * (double)o->batch / rate, eta, sizeof eta);
    if (o->clip > 0 && pw_pipeline_grad_norm(r->t) >= 0) /* --sync ps: the one the servers sent back */
        snprintf(norm, sizeof norm, "  grad norm %.3g", pw_pipeline_grad_norm(r->t));
    const int64_t n_epochs = (r->total + r->spe - 1) / r->spe;
    printf("%sepoch %lld/%lld  step %lld/%lld  loss %.4f%s  %.0f samples/s  bubble %.1f%%  "
           "ETA %s%s", r->tty ? "\r\033[K" : "", (long long)r->s.epoch + 1, (long long)n_epochs,
           (long long)r->s.step_in_epoch, (long long)r->spe, r->s.loss, norm, rate,
           100.0 * pw_pipeline_last_bubble(r->t), eta, r->tty ? "" : "\n");
    fflush(stdout);
    *last_print = now;
}

/* `sep` then "test loss L  test accuracy A%", or a language model's
 * held-out loss. */
static void print_eval(const run *r, const char *sep)
{
    if (r->entropy >= 0)
        printf("%sheld-out loss %.4f nats (unigram entropy %.4f)  accuracy %.2f%%", sep, r->ev.loss, r->entropy,
               100.0 * r->ev.accuracy);
    else
        printf("%stest loss %.4f  test accuracy %.2f%%", sep, r->ev.loss, 100.0 * r->ev.accuracy);
}

/* Evaluates the held-out split and logs it. 0, or 1 after the error
 * (`newline`: end the progress line first). */
static int evaluate(run *r, int newline)
{
    double te = now_s();
    if (pw_pipeline_evaluate(r->t, r->test, &r->ev) != PW_OK) {
        if (newline) printf("\n");
        return fail("evaluation: ");
    }
    if (pw_pipeline_metrics_eval(r->mx, &r->s, &r->ev, r->entropy, now_s() - te, now_s() - r->t0) != PW_OK)
        return fail("--metrics: ");
    return 0;
}

/* --eval-every: between epochs; the progress line is redrawn after. */
static int eval_between_epochs(run *r)
{
    if (evaluate(r, r->tty) != 0) return 1;
    if (!r->o.quiet) {
        printf("%sstep %lld:", r->tty ? "\r\033[K" : "", (long long)r->s.step);
        print_eval(r, " ");
        printf("  (%.1f s)\n", now_s() - r->t0);
        fflush(stdout);
    }
    return 0;
}

/* An epoch's end (or the run's last step): the MPI progress board, the
 * evaluation, the epoch's line. */
static int end_epoch(run *r, double epoch_loss, int64_t epoch_steps)
{
    if (r->tty) printf("\n");
    pw_transport_phase(g_mpi, PW_PHASE_EPOCH, r->s.step);
    pw_transport_test_point(g_mpi, "epoch", r->s.step);
    if (r->test && evaluate(r, 0) != 0) return 1;
    if (!r->o.quiet) {
        printf("epoch %lld: train loss %.4f", (long long)r->s.epoch + 1, epoch_loss / (double)epoch_steps);
        if (r->test) print_eval(r, "  ");
        printf("  (%.1f s)\n", now_s() - r->t0);
        fflush(stdout);
    }
    return 0;
}

/* The steps, from the first this run has to do (a resumed run's start)
 * to the last, until a signal stops them at a step boundary. 0, or 1
 * after the error. */
/* With --overlap-steps: how many steps the next engine run may take from
 * step index i (0-based): up to N, never past a step boundary that needs
 * every rank stopped — the end of the run or of the epoch, a checkpoint or
 * an evaluation due (the loop's checks and writes happen after each step
 * of the run, so the last step of a run must be the one that needs them). */
static int run_length(const run *r, int64_t i)
{
    const options *o = &r->o;
    int64_t n = o->overlap_steps > 1 ? o->overlap_steps : 1;
    const int64_t step = i + 1; /* the first step of the run, 1-based */
    if (n > r->total - i) n = r->total - i;
    const int64_t to_epoch = r->spe - i % r->spe;
    if (n > to_epoch) n = to_epoch;
    const int64_t every[2] = {o->checkpoint_dir ? o->checkpoint_every : 0, r->test ? o->eval_every : 0};
    for (int k = 0; k < 2; k++)
        if (every[k] > 0) {
            const int64_t to_due = every[k] - (step - 1) % every[k]; /* steps up to and including the next due */
            if (n > to_due) n = to_due;
        }
    return n < 1 ? 1 : (int)n;
}

static int train_loop(run *r)
{
    const options *o = &r->o;
    double last_print = r->t0, epoch_loss = 0.0;
    int64_t epoch_steps = 0;
    pw_step_stats runs[64];
    pw_pipeline_metrics_start(r->mx, r->t);
    for (int64_t i = r->start; i < r->total;) {
        /* A step boundary (with --staleness S every S + 1 steps: an all-gather is a barrier). */
        if ((i - r->start) % (o->staleness + 1) == 0 && (r->stopped = stop_signal()) != 0) break;
        const int n = run_length(r, i);
        double ts = now_s();
        pw_status step_st = n > 1 ? pw_pipeline_steps(r->t, n, runs) : pw_pipeline_step(r->t, &runs[0]);
        /* A run's steps overlap: each is given the run's mean time. */
        const double dt = (now_s() - ts) / n;
        if (i == r->start) r->first_step_s = dt;
        r->step_s += (i == r->start ? n - 1 : n) * dt;
        if (step_st != PW_OK) {
            if (r->tty) printf("\n");
            return fail("");
        }
        for (int j = 0; j < n; j++, i++) {
            r->s = runs[j];
            if (pw_pipeline_metrics_step(r->mx, r->t, &r->s, dt, now_s() - r->t0) != PW_OK) return fail("--metrics: ");
            if (r->rbl) { /* a step boundary: the cuts may move */
                pr_rebalance_event rev;
                if (pr_rebalance_step(r->rbl, &r->t, r->s.step, dt, &rev) || metrics_rebalance(r->mx, &rev, r->s.step))
                    return 1;
                if (rev.moved) pw_pipeline_metrics_start(r->mx, r->t); /* a new engine counts from zero */
            }
            maybe_fault(r->s.step);
            r->steps_done = r->s.step;
            epoch_loss += r->s.loss;
            epoch_steps++;
            /* --checkpoint-every's checkpoints (the last step's is written at
             * the end), and the report of each that completed. */
            if (r->ckw && pw_state_writer_step(r->ckw, r->t, &r->s, r->total, report_checkpoint, (void *)o) != PW_OK)
                return fail("checkpoint: ");
            const int epoch_done = r->s.step_in_epoch == r->spe || i + 1 == r->total;
            print_progress(r, i, epoch_done, &last_print);
            if (!epoch_done && r->test && o->eval_every > 0 && r->s.step % o->eval_every == 0 &&
                eval_between_epochs(r) != 0)
                return 1;
            if (epoch_done) {
                if (end_epoch(r, epoch_loss, epoch_steps) != 0) return 1;
                epoch_loss = 0.0;
                epoch_steps = 0;
            }
        }
    }
    if (!r->stopped) r->stopped = stop_signal(); /* one that came during the last step */
    return 0;
}

/* --save and --trace after training. 0, or 1 after the error. */
static int write_outputs(run *r)
{
    const options *o = &r->o;
    if (o->save && !r->stopped) {
        char extra[320];
        run_extra(o, extra, sizeof extra);
        pw_checkpoint_info info = {.step = r->s.step, .epoch = r->s.epoch + 1, .seed = o->seed, .extra = extra};
        if (pw_pipeline_save(r->t, o->save, &info) != PW_OK) return fail("--save: ");
        if (!o->quiet) printf("saved %s\n", o->save);
    }
    if (o->trace) {
        char path[4096];
        trace_path(o->trace, path, sizeof path);
        if (pw_pipeline_write_trace(r->t, path) != PW_OK) return fail("--trace: ");
        if (!o->quiet) printf("trace written to %s%s\n", path, g_mpi ? " (one file per process)" : "");
    }
    return 0;
}

/* The tables and the final lines of a run that finished. */
static void print_results(const run *r)
{
    const options *o = &r->o;
    if (g_mpi) print_summary_mpi(r->t, o->quiet);
    else if (!o->quiet) print_summary(r->t, o->stages);
    if (o->quiet < 2 && r->total - r->start > 1 && r->step_s > 0.0)
        /* The steady rate: the first step pays one-time set-up (a GPU's
         * kernel loading and cuBLAS's first choices, the first pages
         * touched), and evaluations are not training. */
        printf("training rate: %.1f samples/s over steps %lld-%lld (first step %.3f s, evaluations "
               "excluded)\n", (double)(r->total - r->start - 1) * (double)o->batch / r->step_s,
               (long long)r->start + 2, (long long)r->total, r->first_step_s);
    if (o->quiet < 2) {
        printf("done: %lld steps in %.1f s; final train loss %.4f", (long long)r->s.step, now_s() - r->t0,
               r->s.loss);
        if (r->test) printf("; test accuracy %.2f%%", 100.0 * r->ev.accuracy);
        printf("\n");
    }
}

/* After the loop: the signal's checkpoint or the last one, the files asked
 * for, the results. The exit status: 0; after a signal 75 when a
 * checkpoint makes the run resumable, else the shell's 128 + the signal
 * (130 SIGINT, 143 SIGTERM); 1 after an error. */
static int finish_training(run *r)
{
    const options *o = &r->o;
    if (r->stopped) {
        if (r->tty) printf("\n");
        fflush(stdout);
        if (!g_mpi || g_mpi->world_rank == 0)
            fprintf(stderr, "pipeline-run: interrupted by %s at step %lld; stopping\n", signal_name(r->stopped),
                    (long long)r->s.step);
        r->checkpointed = checkpoint_on_signal(r->t, o, r->ckw, r->s.step);
        if (r->checkpointed < 0) return 1;
    }
    /* The end of the run: its last step, and the wait for every write. */
    if (r->ckw && !r->stopped &&
        pw_state_writer_finish(r->ckw, r->t, r->s.step, report_checkpoint, (void *)o) != PW_OK)
        return fail("checkpoint: ");
    if (write_outputs(r) != 0) return 1;
    if (!r->stopped && (r->stopped = stop_signal()) != 0 && (!g_mpi || g_mpi->world_rank == 0))
        fprintf(stderr, "pipeline-run: interrupted by %s after the last step (%lld); its files are written\n",
                signal_name(r->stopped), (long long)r->s.step);
    if (r->stopped) return r->checkpointed > 0 ? PW_EXIT_RESUMABLE : 128 + r->stopped;
    print_results(r);
    return 0;
}

/* Training: the run's length, the header, the loop, the end. */
static int train(run *r)
{
    const options *o = &r->o;
    r->spe = pw_pipeline_steps_per_epoch(r->t);
    r->total = o->steps ? o->steps : o->epochs * r->spe;
    /* mpirun forwards output through a terminal of its own: no \r updates. */
    r->tty = isatty(STDOUT_FILENO) && !o->quiet && !g_mpi;
    print_header(r);
    r->t0 = now_s();
    r->start = r->resume ? pw_state_get_meta(r->resume)->step : 0; /* steps done before this run */
    r->s.step = r->start;
    r->s.epoch = r->start > 0 ? (r->start - 1) / r->spe : 0;
    if (train_loop(r) != 0) return 1;
    return finish_training(r);
}

/* Everything after the options and the processes are set up. */
static int run_main(run *r)
{
    int rc;
    if ((rc = load_graph(r)) != 0) return rc;
    if (g_mpi && g_mpi->server >= 0) { /* --sync ps: this process is a server (stages/train/ps.h) */
        pw_transport_phase(g_mpi, PW_PHASE_STEP, 0);
        pw_ps_server_stats ss = {0};
        const pw_ps_server_config sc = {.graph = r->g, .transport = g_mpi, .staleness_lr = r->o.staleness_lr,
                                        .stats = &ss};
        if (pw_ps_serve(&sc) != PW_OK) return fail("");
        if (r->o.staleness > 0) { /* the staleness of what it applied, known exactly (the summary line) */
            char line[512];
            int at = snprintf(line, sizeof line, "pipeline-run: parameter server %d: %lld updates; gradients by "
                              "staleness tau:", g_mpi->server, (long long)ss.updates);
            for (int i = 0; i < PW_PS_TAU_BINS && at < (int)sizeof line - 40; i++)
                if (ss.tau[i]) at += snprintf(line + at, sizeof line - (size_t)at, "%s %d%s: %lld", line[at - 1] == ':' ? "" : ",",
                                              i + 1, i == PW_PS_TAU_BINS - 1 ? "+" : "", (long long)ss.tau[i]);
            printf("%s; mean learning-rate factor %.3f (--staleness-lr %s)\n", line,
                   ss.updates ? ss.lr_factor_sum / (double)ss.updates : 1.0, pw_ps_stale_lr_name(r->o.staleness_lr));
            fflush(stdout);
        }
        return 0;
    }
    if (r->o.parallel && r->o.plan) return 0; /* --plan --parallel auto: printed */
    if (r->o.simulate) return run_simulate(r->g, &r->o);
    if (r->o.plan) return run_plan(r->g, &r->o);
    if ((rc = build(r)) != 0) return rc;
    if (r->o.generate) return run_generate(r);
    return train(r);
}

/* Every process leaves together: an error stops the others (MPI_Abort);
 * otherwise each waits (bounded by the watchdog) until every process is
 * done before MPI_Finalize, which would otherwise wait for a hung one for
 * good. Frees the run; returns `status`. */
static int finish_process(run *r, int status)
{
    if (status != 0 && !r->stopped) stop_all();
    if (g_mpi) {
        pw_transport_phase(g_mpi, PW_PHASE_SHUTDOWN, r->steps_done);
        if (pw_transport_barrier(g_mpi) != PW_OK) fail("shutdown: ");
    }
    pw_tmpfile_unlink_all(); /* nothing is in flight here; a failed write cleaned up already */
    pw_pipeline_metrics_close(r->mx);
    g_finished = 1;
    pw_state_writer_destroy(r->ckw);
    pr_rebalance_close(r->rbl);
    pw_profile_destroy(r->prof);
    pw_state_close(r->resume);
    pw_pipeline_destroy(r->t);
    pw_dataset_destroy(r->train);
    pw_dataset_destroy(r->test);
    pw_graph_destroy(r->g);
    pw_transport_destroy(g_mpi);
    return status;
}

int main(int argc, char **argv)
{
    static run r; /* zeroed */
#ifdef PW_HAVE_CUDA
    /* The stage program's CUDA backend (pw_stages does not link CUDA). */
    if (pw_backend_register(pw_backend_cuda()) != PW_OK) {
        fprintf(stderr, "pipeline-run: %s\n", pw_last_error());
        return 1;
    }
#endif
    int rc = parse_args(argc, argv, &r.o);
    if (rc) return rc == 1 ? 0 : rc;
    r.world = pw_mpi_launched_size();
    /* --max-restarts: this process supervises; the training runs in its
     * children (tools/pipeline-run/supervise.h). */
    if (r.o.max_restarts > 0 && !getenv("PW_SUPERVISED"))
        return pw_supervise(argc, argv, r.o.checkpoint_dir, r.o.max_restarts, r.o.quiet);
    char resume_note[512];
    if ((rc = open_resume(&r, resume_note, sizeof resume_note)) != 0) return rc;
    if (r.world > 1 && (rc = start_mpi(&argc, &argv, &r.o, r.world)) != 0) {
        pw_state_close(r.resume);
        return rc;
    }
    /* Said even with --quiet: the run goes on with another replica count. */
    if (resume_note[0] && (!g_mpi || g_mpi->world_rank == 0)) fputs(resume_note, stderr);
    install_signals(); /* after MPI_Init: ours, not the library's */
    if (r.o.threads) pw_cpu_set_threads(r.o.threads);
    return finish_process(&r, run_main(&r));
}
