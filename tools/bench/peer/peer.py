#!/usr/bin/env python3
"""pipewright beside PyTorch eager: the same models, batch, micro-batching,
optimizer, loss and thread count, in alternating rounds of one run.

    /work/venv-torch/bin/python tools/bench/peer/peer.py [--models mlp,gpt,quick]
        [--threads 1,2] [--rounds 3] [--steps 6] [--warmup 2] [--pipeline M:SCHED,...|none]
        [--no-check | --check-only] [--check-steps 5] [--build build]
        [--attention sdpa|manual] [--torch-optimizer default|foreach|fused]
        [--no-torch-passive] [--no-sgemm] [--graphs]

Install PyTorch first, outside the repository (tools/bench/peer/README.md);
without it this prints how and exits 0. pipewright's side is its own tool,
build/pipeline-run, so kernel and schedule changes show up here unchanged.

Each run is a fresh process limited to N threads (OMP_NUM_THREADS,
MKL_NUM_THREADS, OPENBLAS_NUM_THREADS = N; torch.set_num_threads(N) and
set_num_interop_threads(N); pipeline-run --threads N) that trains `--warmup`
+ `--steps` optimizer steps; its figure is the median of the timed steps:
pipewright's from `--metrics` (step_ms: every micro-batch's forward and
backward and the optimizer step), PyTorch's from perf_counter around the
same work (zero_grad, M forward/backward, optimizer.step). Start-up, data
loading and pipeline-run's held-out evaluations are outside both. Rounds run
every configuration once, in reversed order every other round; a figure is
the median over rounds, the ratio is PyTorch's step time / pipewright's.
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)
import files  # noqa: E402 (both without torch: the checks below run without it)
import graphs  # noqa: E402
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
INSTALL = ("python3 -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch\n"
           "  (CPU-only wheels, smaller: add --index-url https://download.pytorch.org/whl/cpu "
           "where that host is reachable)")

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}


def adamw(lr):
    return {"name": "adamw", "lr": lr, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
            "weight_decay": 0.01}


# The models and their settings, shared by both sides. `pipeline`: the
# 2-stage layouts (micro-batches, schedule) pipewright runs beside PyTorch's
# single process at 2 threads; zb-v with 4 micro-batches was the fastest of
# 1f1b / zb-h1 / zb-v at 2, 4, 8 and 16 micro-batches on the 2-core machine
# (docs/performance.md).
MODELS = {
    "mlp": {"title": "MLP 784-2048x4-10", "kind": "mlp", "graph": "tools/bench/peer/mlp.graph",
            "batch": 256, "micro": 1, "optim": SGD, "unit": "samples",
            "pipeline": [(4, "zb-v")]},
    "gpt": {"title": "tiny GPT", "kind": "gpt", "graph": "examples/tiny_gpt.graph",
            "batch": 16, "micro": 4, "optim": adamw(2e-3), "unit": "tokens",
            "pipeline": [(4, "zb-v")]},
    "quick": {"title": "quick GPT", "kind": "gpt", "graph": "examples/tiny_gpt_quick.graph",
              "batch": 32, "micro": 4, "optim": adamw(3e-3), "unit": "tokens",
              "pipeline": [(4, "zb-v")]},
}


def thread_env(n):
    env = dict(os.environ)
    for v in THREAD_VARS:
        env[v] = str(n)
    return env


def optim_flags(o):
    f = ["--optimizer", o["name"], "--lr", repr(o["lr"]), "--weight-decay", repr(o["weight_decay"])]
    if o["name"] == "sgd":
        return f + ["--momentum", repr(o["momentum"])]
    return f + ["--adam-beta1", repr(o["beta1"]), "--adam-beta2", repr(o["beta2"]),
                "--adam-eps", repr(o["eps"])]


def median(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------- sides

class Pipewright:
    """Runs build/pipeline-run for one model; returns its metrics' step lines."""

    def __init__(self, binary, spec, data, directory):
        self.binary, self.spec, self.data, self.dir = binary, spec, data, directory

    def command(self, graph, stages, threads, micro, steps, extra):
        metrics = os.path.join(self.dir, "metrics.jsonl")
        return [self.binary, graph, "--data", self.data, "--batch", str(self.spec["batch"]),
                "--micro-batches", str(micro), "--stages", str(stages), "--threads", str(threads),
                "--steps", str(steps), "--metrics", metrics, "--quiet"] + \
            optim_flags(self.spec["optim"]) + extra, metrics

    def __call__(self, graph, stages, threads, micro, steps, extra):
        cmd, metrics = self.command(graph, stages, threads, micro, steps, extra)
        n = stages * threads
        p = subprocess.run(cmd, env=thread_env(n), cwd=ROOT, capture_output=True, text=True)
        shown = " ".join(["%s=%d" % (v, n) for v in THREAD_VARS] + cmd)
        if p.returncode != 0:
            sys.exit("peer: %s failed (%d):\n%s%s" % (shown, p.returncode, p.stdout, p.stderr))
        with open(metrics) as f:
            lines = [json.loads(line) for line in f]
        return shown, [m for m in lines if m["type"] == "step"]

    def step_times(self, stages, threads, micro, extra, warmup, steps):
        cmd, lines = self(self.spec["graph"], stages, threads, micro, warmup + steps, extra)
        return cmd, [m["step_ms"] * 1e-3 for m in lines[warmup:]]


def torch_times(key, data, threads, warmup, steps, opts, passive=False):
    """Step times of PyTorch in a fresh process limited to `threads` threads;
    `passive`: with OMP_WAIT_POLICY=PASSIVE (its OpenMP threads sleep at once
    instead of spinning when they run out of work)."""
    job = {"model": key, "data": data, "threads": threads, "warmup": warmup, "steps": steps,
           "attention": opts.attention, "optimizer_impl": opts.torch_optimizer}
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", json.dumps(job)]
    env = thread_env(threads)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("peer: the PyTorch worker failed (%d):\n%s%s" % (p.returncode, p.stdout, p.stderr))
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if out["threads"] != threads or out["interop"] != threads:
        sys.exit("peer: PyTorch runs %d / %d threads, not %d" % (out["threads"], out["interop"], threads))
    shown = " ".join(["%s=%d" % (v, threads) for v in THREAD_VARS] +
                     (["OMP_WAIT_POLICY=PASSIVE"] if passive else []))
    return "%s %s %s %s '%s'" % (shown, *cmd), out["step_s"]


def torch_worker(job):
    """The child process: trains the model in PyTorch, prints the timings."""
    import torch
    torch.set_num_threads(job["threads"])
    torch.set_num_interop_threads(job["threads"])
    if job["model"] == "sgemm":
        return torch_sgemm(torch, job)
    import models
    spec = MODELS[job["model"]]
    graph = os.path.join(ROOT, spec["graph"])
    model = models.build(spec["kind"], graph, job["attention"])
    model.train()
    opt = models.make_optimizer(model, spec["optim"], job["optimizer_impl"])
    x, y = read_data(spec, job["data"])
    times = []
    for s in range(job["warmup"] + job["steps"]):
        xb, yb = files.batch_of(x, y, s, spec["batch"])
        t0 = time.perf_counter()
        loss = models.train_step(model, opt, xb, yb, spec["micro"])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"step_s": times[job["warmup"]:], "loss": loss, "threads": torch.get_num_threads(),
                      "interop": torch.get_num_interop_threads()}))


# The BLAS reference: bench_mlp's three GEMM shapes of a 2048-wide layer at
# batch 256 (x·Wᵀ, dy·W, dyᵀ·x), OpenBLAS through bench_mlp's SGEMM line
# and PyTorch's BLAS through torch.mm, at the same thread count.
SGEMM_B, SGEMM_W = 256, 2048
SGEMM_FLOPS = 3 * 2.0 * SGEMM_B * SGEMM_W * SGEMM_W


def torch_sgemm(torch, job):
    g = torch.Generator().manual_seed(7)
    a = torch.rand(SGEMM_B, SGEMM_W, generator=g) - 0.5
    w = (torch.rand(SGEMM_W, SGEMM_W, generator=g) - 0.5) * 0.01
    c, dw = torch.empty(SGEMM_B, SGEMM_W), torch.zeros(SGEMM_W, SGEMM_W)

    def triple():
        torch.mm(a, w.t(), out=c)
        torch.mm(c, w, out=a)
        dw.addmm_(c.t(), a)
    for _ in range(2):
        triple()
    t0 = time.perf_counter()
    for _ in range(job["steps"]):
        triple()
    dt = (time.perf_counter() - t0) / job["steps"]
    print(json.dumps({"step_s": [dt], "threads": torch.get_num_threads(),
                      "interop": torch.get_num_interop_threads()}))


def pw_sgemm(build, threads, steps):
    """Seconds per GEMM triple from bench_mlp's SGEMM line (OpenBLAS's own
    threading, as bench_mlp runs it)."""
    cmd = [os.path.join(ROOT, build, "bench_mlp"), "--threads", str(threads), "--rounds", "1",
           "--steps", str(steps), "--batch", str(SGEMM_B), "--width", str(SGEMM_W)]
    p = subprocess.run(cmd, env=thread_env(threads), cwd=ROOT, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if "SGEMM (same shapes)" in x]
    if p.returncode != 0 or not line:
        sys.exit("peer: %s failed (%d):\n%s%s" % (" ".join(cmd), p.returncode, p.stdout, p.stderr))
    gflops = float(line[0].split(")")[1].split()[0])
    shown = " ".join(["%s=%d" % (v, threads) for v in THREAD_VARS] + cmd)
    return shown, [SGEMM_FLOPS / (gflops * 1e9)]


def measure_sgemm(opts):
    """Markdown rows of the BLAS reference, alternating like the models."""
    print("\nBLAS reference: SGEMM %d x %d x %d, the three shapes of a layer" % (SGEMM_B, SGEMM_W, SGEMM_W))
    rows = [(side, n) for n in opts.threads for side in ("pw", "torch")]
    times = {r: [] for r in rows}
    for r in range(opts.rounds):
        for side, n in (rows if r % 2 == 0 else rows[::-1]):
            if side == "pw":
                cmd, t = pw_sgemm(opts.build, n, max(opts.steps, 5))
            else:
                cmd, t = torch_times("sgemm", None, n, 0, max(opts.steps, 5), opts)
            times[(side, n)].append(t[0])
        print("  round %d: %s" % (r + 1, "  ".join("%s%d %.1f GFLOP/s" % (s, n, SGEMM_FLOPS / times[(s, n)][-1] / 1e9)
                                                for s, n in rows)), flush=True)
    out = []
    for n in opts.threads:
        pw, t = median(times[("pw", n)]), median(times[("torch", n)])
        per_round = [a / b for a, b in zip(times[("torch", n)], times[("pw", n)])]
        out.append("| SGEMM %dx%dx%d (reference) | %d | OpenBLAS `cblas_sgemm` (bench_mlp): %.1f GFLOP/s | "
                   "`torch.mm`: %.1f GFLOP/s | %.2f× (%.2f-%.2f) | %.2f× |" % (
                       SGEMM_B, SGEMM_W, SGEMM_W, n, SGEMM_FLOPS / pw / 1e9, SGEMM_FLOPS / t / 1e9,
                       t / pw, min(per_round), max(per_round),
                       min(times[("torch", n)]) / min(times[("pw", n)])))
    return out


def read_data(spec, data):
    if spec["kind"] == "mlp":
        return files.read_idx_mlp(data)
    return files.read_corpus(data, graphs.read_gpt(os.path.join(ROOT, spec["graph"]))["T"])


def write_data(spec, directory):
    """The data files of one model (16 batches; the runs roll over)."""
    graph = os.path.join(ROOT, spec["graph"])
    if spec["kind"] == "mlp":
        cfg = graphs.read_mlp(graph)
        return files.write_idx_mlp(directory, 16 * spec["batch"], cfg["input"], cfg["layers"][-1][1], 1)
    return files.write_corpus(directory, 16 * spec["batch"], graphs.read_gpt(graph)["T"])


# ----------------------------------------------------------------- runs

class Config(collections.namedtuple("Config", "side stages threads micro schedule passive")):
    """One column of a round: pipewright ("pw") or PyTorch ("torch"); for
    pipewright's pipeline its stage count, micro-batches and schedule; for
    PyTorch whether OMP_WAIT_POLICY=PASSIVE."""

    @property
    def tag(self):  # pw1, torch2, torch2-passive, pipe2x1-zb-v-4
        if self.stages > 1:
            return "pipe%dx%d-%s-%d" % (self.stages, self.threads, self.schedule, self.micro)
        return "%s%d%s" % (self.side, self.threads, "-passive" if self.passive else "")

    @property
    def label(self):
        if self.side == "torch":
            return "OMP_WAIT_POLICY=PASSIVE: " if self.passive else ""
        if self.stages == 1:
            return "1 stage: "
        return "%d stages (%s, %d micro-batches), 1 thread each: " % (self.stages, self.schedule, self.micro)

    @property
    def total_threads(self):
        return self.stages * self.threads


def configurations(spec, threads, layouts, passive):
    """Both sides at each thread count (and PyTorch with passive OpenMP
    waiting where it has several threads), then pipewright's 2-stage
    layouts (1 thread per stage), which go beside PyTorch at 2 threads."""
    rows = []
    for n in threads:
        rows.append(Config("pw", 1, n, spec["micro"], None, False))
        rows.append(Config("torch", 1, n, spec["micro"], None, False))
        if passive and n > 1:
            rows.append(Config("torch", 1, n, spec["micro"], None, True))
    if 2 in threads:
        rows += [Config("pw", 2, 1, m, sched, False) for m, sched in layouts]
    return rows


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def measure(key, spec, pw, data, opts):
    """{config: [per-round median step seconds]}, the load averages seen and
    each configuration's command."""
    layouts = opts.pipeline if opts.pipeline is not None else spec["pipeline"]
    rows = configurations(spec, opts.threads, layouts, opts.torch_passive)
    times, loads, cmds = {r: [] for r in rows}, [], {}
    for r in range(opts.rounds):
        for c in (rows if r % 2 == 0 else rows[::-1]):
            loads.append(loadavg())
            if c.side == "torch":
                cmds[c], t = torch_times(key, data, c.threads, opts.warmup, opts.steps, opts, c.passive)
            else:
                extra = ["--schedule", c.schedule] if c.schedule else []
                cmds[c], t = pw.step_times(c.stages, c.threads, c.micro, extra, opts.warmup, opts.steps)
            times[c].append(median(t))
        print("  round %d: %s" % (r + 1, "  ".join(
            "%s %.1f ms" % (c.tag, times[c][-1] * 1e3) for c in rows)), flush=True)
    return rows, times, loads, cmds


def rate(spec, seconds, T):
    per_step = spec["batch"] * (T if spec["unit"] == "tokens" else 1)
    return per_step / seconds


def table_rows(spec, rows, times, T):
    """Markdown rows: pipewright beside PyTorch at the same thread count. The
    speed-up is PyTorch's median step time / pipewright's, in brackets the
    range of the same ratio within each round; then the ratio of the best
    rounds (on a shared machine the fastest run is the least disturbed)."""
    med = {c: median(v) for c, v in times.items()}
    out = []
    for c in rows:
        for t in (t for t in rows if c.side == "pw" and t.side == "torch" and t.threads == c.total_threads):
            per_round = [a / b for a, b in zip(times[t], times[c])]
            out.append("| %s | %d | %s%.1f ms, %.0f %s/s | %s%.1f ms, %.0f %s/s | **%.2f×** (%.2f-%.2f) | "
                       "%.2f× |" % (
                           spec["title"], c.total_threads, c.label, med[c] * 1e3, rate(spec, med[c], T),
                           spec["unit"], t.label, med[t] * 1e3, rate(spec, med[t], T), spec["unit"],
                           med[t] / med[c], min(per_round), max(per_round), min(times[t]) / min(times[c])))
    return out


# ----------------------------------------------------------------- main

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mlp,gpt,quick")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--pipeline", help="pipewright's 2-stage layouts, M:SCHEDULE[,...] "
                   "(default: each model's, below); 'none' skips them")
    p.add_argument("--no-check", action="store_true", help="skip the numerical cross-check")
    p.add_argument("--check-only", action="store_true", help="only the numerical cross-check")
    p.add_argument("--check-steps", type=int, default=5)
    p.add_argument("--build", default="build", help="pipewright's build directory")
    p.add_argument("--attention", choices=("sdpa", "manual"), default="sdpa",
                   help="PyTorch attention: scaled_dot_product_attention or nanoGPT's explicit one")
    p.add_argument("--torch-optimizer", choices=("default", "foreach", "fused"), default="default")
    p.add_argument("--no-torch-passive", dest="torch_passive", action="store_false",
                   help="skip PyTorch with OMP_WAIT_POLICY=PASSIVE at 2+ threads")
    p.add_argument("--no-sgemm", dest="sgemm", action="store_false",
                   help="skip the BLAS reference (OpenBLAS against PyTorch's BLAS)")
    p.add_argument("--break-twin", choices=("gelu", "causal", "eps", "decay"),
                   help="the cross-check against a deliberately wrong PyTorch twin (it must fail)")
    p.add_argument("--graphs", action="store_true",
                   help="print what the twins read from each graph and exit (no torch needed)")
    p.add_argument("--torch-worker", help=argparse.SUPPRESS)
    o = p.parse_args(argv)
    o.models = o.models.split(",")
    o.threads = [int(t) for t in o.threads.split(",")]
    if o.pipeline is not None:
        o.pipeline = [] if o.pipeline == "none" else \
            [(int(m), sched) for m, sched in (x.split(":") for x in o.pipeline.split(","))]
    bad = [m for m in o.models if m not in MODELS]
    if bad or o.rounds < 1 or o.steps < 1 or o.warmup < 0 or min(o.threads) < 1:
        p.error("unknown model %s (know %s) or a count below 1" % (bad, ",".join(MODELS)))
    return o


def print_graphs(keys):
    """The sizes the PyTorch twins take from each model's graph, without
    torch: a graph the twins do not cover is refused here (exit 1)."""
    for key in keys:
        path = os.path.join(ROOT, MODELS[key]["graph"])
        try:
            cfg = graphs.read_mlp(path) if MODELS[key]["kind"] == "mlp" else graphs.read_gpt(path)
        except graphs.GraphMismatch as e:
            print("peer: %s" % e)
            return 1
        print("%s: %s %s" % (key, MODELS[key]["graph"], json.dumps(cfg, sort_keys=True)))
    return 0


def import_torch():
    """torch, or exit 0 with how to install it (CI never has it)."""
    for v in THREAD_VARS:  # the cross-check runs here, on one thread
        os.environ[v] = "1"
    try:
        import torch
    except Exception as e:  # not installed, or a broken install
        print("peer: skipped: PyTorch is not importable by %s (%s: %s).\n"
              "Install it outside the repository (about 5 GB):\n  %s\n"
              "then run: /work/venv-torch/bin/python tools/bench/peer/peer.py"
              % (sys.executable, type(e).__name__, e, INSTALL))
        sys.exit(0)
    torch.set_num_threads(1)
    return torch


def header(torch, binary, opts):
    git = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    cpu = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
    print("peer: pipewright %s (%s) beside PyTorch %s eager (%s, BLAS %s, CPU %s)" % (
        git, os.path.relpath(binary, ROOT), torch.__version__, sys.executable,
        "MKL" if torch.backends.mkl.is_available() else "other", cpu))
    print("peer: %d cores, load average %.2f; threads %s, %d rounds x (%d warm-up + %d timed steps)" % (
        os.cpu_count(), loadavg(), ",".join(map(str, opts.threads)), opts.rounds, opts.warmup, opts.steps))


def run_model(key, opts, binary):
    import crosscheck
    spec = dict(MODELS[key])
    spec["graph"] = os.path.join(ROOT, spec["graph"])
    T = graphs.read_gpt(spec["graph"])["T"] if spec["kind"] == "gpt" else 1
    with tempfile.TemporaryDirectory(prefix="pw-peer-") as d:
        data = write_data(MODELS[key], d)
        pw = Pipewright(binary, spec, data, d)
        print("\n%s: %s, batch %d in %d micro-batch%s, %s; data %s" % (
            spec["title"], os.path.relpath(spec["graph"], ROOT), spec["batch"], spec["micro"],
            "es" if spec["micro"] > 1 else "", " ".join(optim_flags(spec["optim"])), data), flush=True)
        rows, ok = [], True
        if not opts.check_only:
            cfgs, times, loads, cmds = measure(key, spec, pw, data, opts)
            print("  load average during the runs: %.2f-%.2f" % (min(loads), max(loads)))
            for row, cmd in cmds.items():
                print("  %s: %s" % (row.tag, cmd))
            rows = table_rows(spec, cfgs, times, T)
        if not opts.no_check:
            r = crosscheck.run(spec["kind"], spec, data, lambda s: read_data(MODELS[key], s), pw, d,
                               opts.check_steps)
            print(crosscheck.report(spec["title"], r), flush=True)
            ok = crosscheck.passed(r)
    return rows, ok


def main(argv):
    opts = parse(argv)
    if opts.torch_worker:
        return torch_worker(json.loads(opts.torch_worker))
    if opts.graphs:
        return print_graphs(opts.models)
    torch = import_torch()
    if opts.break_twin:
        import models
        models.FAULT = opts.break_twin
        print("peer: the PyTorch twin is broken on purpose (--break-twin %s)" % opts.break_twin)
    binary = os.path.join(ROOT, opts.build, "pipeline-run")
    if not os.access(binary, os.X_OK):
        sys.exit("peer: %s not found: build pipewright first (README.md)" % binary)
    header(torch, binary, opts)
    rows, failed = [], []
    for key in opts.models:
        r, ok = run_model(key, opts, binary)
        rows += r
        failed += [] if ok else [key]
    if opts.sgemm and not opts.check_only:
        rows += measure_sgemm(opts)
    if rows:
        print("\n| model | threads | pipewright | PyTorch eager | pipewright speed-up (per round) | "
              "best rounds |\n| --- | --- | --- | --- | --- | --- |")
        print("\n".join(rows))
    if failed:
        print("peer: the numerical cross-check failed for %s" % ",".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
