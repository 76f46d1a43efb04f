#!/usr/bin/env bash
# tests/gpu/run.sh — everything GPU-related in one command, for a lent GPU
# machine (no network):
#   1. configure and build into build-gpu (PW_CUDA=ON; all targets), or, on
#      a bare GPU machine, use what tests/gpu/pack.sh built and packed
#      elsewhere (PW_GPU_PREBUILT=.gpucarry);
#   2. the CUDA tests (tests/test_cuda_ops.c: every CUDA op against the CPU op;
#      tests/test_cuda_pipeline.c: 2- and 3-stage pipelines on one GPU byte-
#      identical to one stage there, and close to the CPU;
#      tests/test_op_table.c's op_table::cuda: every row of the op table
#      against the CPU); a failing test runs again under compute-sanitizer;
#   3. the GPU benchmark (tools/bench/bench_cuda.c), fp32, TF32 and bf16 GEMMs;
#   4. the tiny GPT (examples/tiny_gpt.graph) through pipeline-run: 1 stage
#      and 4 stages on the GPU (fp32, and 1 stage with TF32 and bf16 GEMMs),
#      1 stage on the CPU (steady tokens/s);
#   5. the quick GPT example trained on the GPU (README's flags);
#   6. a short table.
# It never installs anything: a missing dependency stops the configure step
# with CMake's message. Logs go to build-gpu/gpu-logs/ (/tmp/pw-gpu-logs with
# PW_GPU_PREBUILT), and as one archive to $OUT/gpu-logs.tar.gz when the caller
# sets OUT, as the device runner does.
#
#   bash tests/gpu/run.sh                  # everything
#   PW_GPU_QUICK=1 bash tests/gpu/run.sh   # tests, and a shorter benchmark
#   PW_CUDA_ARCHS="80;90" bash tests/gpu/run.sh   # other GPUs (default 90)
#   PW_GPU_ALL_TESTS=1 bash tests/gpu/run.sh      # also the whole ctest suite
#   PW_GPU_BUILD_DIR=dir bash tests/gpu/run.sh    # another build directory
#   bash tests/gpu/pack.sh    # here; then on the GPU machine (device tool:
#   PW_GPU_PREBUILT=.gpucarry bash tests/gpu/run.sh    # carry .gpucarry)
#   PW_GPU_SANITIZE_ALL=1 bash tests/gpu/run.sh   # the CUDA tests under
#                             compute-sanitizer (memcheck, racecheck, synccheck)
#   PW_GPU_TEST_TIMEOUT / _BENCH_ / _GPT_ / _TRAIN_TIMEOUT, PW_GPU_TRAIN_STEPS:
#                             seconds per step, and the quick GPT's steps
#
# Exit status: 0 when the CUDA tests pass (or skip without a GPU, which is
# reported in the table), 1 when a test fails or the build does.
set -uo pipefail
cd "$(dirname "$0")/../.."
# The device runner brings back at most a few files from $OUT: all logs go
# there as one archive, whatever way the script ends.
save_logs() {
    if [ -n "${OUT:-}" ] && [ -d "${OUT}" ] && [ -d "${logs:-}" ]; then
        tar czf "$OUT/gpu-logs.tar.gz" -C "$(dirname "$logs")" "$(basename "$logs")" 2>/dev/null || true
    fi
}
trap save_logs EXIT
trap "exit 143" TERM
build="${PW_GPU_BUILD_DIR:-build-gpu}"
logs="$build/gpu-logs"
jobs=$(nproc)
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$jobs}"
status=0
t_start=$(date +%s)
# Time limits of each step (seconds): a lent machine's time is short, so a
# hang costs one step, not the call.
t_test="${PW_GPU_TEST_TIMEOUT:-900}"
t_bench="${PW_GPU_BENCH_TIMEOUT:-600}"
t_gpt="${PW_GPU_GPT_TIMEOUT:-300}"

say() { printf '\n== %s\n' "$*"; }
secs() { echo $(( $(date +%s) - $1 )); }

say "GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "nvidia-smi not found: the CUDA tests will skip unless the runtime finds a device"
fi
if [ -n "${PW_GPU_PREBUILT:-}" ]; then
    # Binaries built elsewhere by tests/gpu/pack.sh, with their libraries.
    pre="$PW_GPU_PREBUILT"
    say "prebuilt binaries ($pre, from tests/gpu/pack.sh)"
    prelib="${TMPDIR:-/tmp}/pw-gpu-lib"
    mkdir -p "$prelib" && tar xJf "$pre/libs.tar.xz" -C "$prelib" || exit 1
    cudalib=""
    for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -e "$d/libcublas.so.13" ] && cudalib="$d" && break
    done
    if [ -z "$cudalib" ]; then # e.g. only the Python wheels' copies
        f=$(find / -name 'libcublas.so.13' -not -path '/proc/*' 2>/dev/null | head -1)
        [ -n "$f" ] && cudalib=$(dirname "$f")
        f=$(find / -name 'libcudart.so.13' -not -path '/proc/*' 2>/dev/null | head -1)
        [ -n "$f" ] && cudalib="$cudalib:$(dirname "$f")"
    fi
    export LD_LIBRARY_PATH="$prelib:$cudalib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    if [ -d "$pre/fortunes" ] && [ ! -e /usr/share/games/fortunes ]; then
        mkdir -p /usr/share/games && ln -s "$PWD/$pre/fortunes" /usr/share/games/fortunes
    fi
    if ldd "$pre/bin/pipeline-run" "$pre/bin/test_cuda_ops" | grep "not found"; then
        echo "missing shared libraries (above)"; exit 1
    fi
    build="$pre/bin"
    logs="${TMPDIR:-/tmp}/pw-gpu-logs"
    mkdir -p "$logs"
    build_s=0
else
command -v nvcc >/dev/null 2>&1 || { echo "nvcc not found (expected /usr/local/cuda/bin/nvcc)"; exit 1; }
nvcc --version | tail -2

say "configure + build ($build, $jobs jobs)"
mkdir -p "$build"
t0=$(date +%s)
if ! cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPW_CUDA=ON \
        -DPW_CUDA_ARCHS="${PW_CUDA_ARCHS:-90}" >"$build/configure.log" 2>&1; then
    cat "$build/configure.log"; exit 1
fi
grep "pipewright:" "$build/configure.log" | sed 's/^-- //'
if ! grep -q "✓ CUDA backend" "$build/configure.log"; then
    echo "the CUDA backend is not enabled in this configure (see above)"; exit 1
fi
mkdir -p "$logs"
if ! cmake --build "$build" -j"$jobs" >"$logs/build.log" 2>&1; then
    grep -E "error|Error" "$logs/build.log" | head -40; exit 1
fi
grep -E "warning" "$logs/build.log" | head -20 || true
build_s=$(secs "$t0")
echo "built in ${build_s} s"
fi

if [ "${PW_GPU_SANITIZE_ALL:-0}" = "1" ]; then
    # Every CUDA test under compute-sanitizer instead of the usual steps:
    # memcheck (out-of-bounds and misaligned accesses, leaks, API errors) on
    # both test programs, racecheck (shared-memory hazards) and synccheck on
    # the tests of the tiled kernels. Ends with each tool's error summary.
    command -v compute-sanitizer >/dev/null 2>&1 || { echo "compute-sanitizer not found"; exit 1; }
    cs() { # log name, tool, binary, filter
        timeout "$t_test" compute-sanitizer --tool "$2" --target-processes all --print-limit 30 \
            "$build/$3" --jobs 1 ${4:+--filter=$4} >"$logs/$1.log" 2>&1
        local rc=$?
        local errs
        errs=$(grep -o "ERROR SUMMARY: [0-9]* error" "$logs/$1.log" | awk '{s += $3} END {print s + 0}')
        local synth
        synth=$(grep -o "Tested: [0-9]* | Passing: [0-9]* | Failing: [0-9]*" "$logs/$1.log" | tail -1)
        printf '%-34s %s\n' "$1" "errors: $errs; ${synth:-no result} (exit $rc)"
        grep -m 5 -E "^========= (Invalid|Race|Barrier|Program hit|.*ERROR)" "$logs/$1.log" || true
        [ "$rc" -ne 0 ] || [ "$errs" -ne 0 ] && status=1
    }
    say "compute-sanitizer"
    cs memcheck_ops memcheck test_cuda_ops
    cs memcheck_pipeline memcheck test_cuda_pipeline
    cs racecheck_reductions racecheck test_cuda_ops 'cuda_ops/reductions_over_rows_bit_exact'
    cs racecheck_attention racecheck test_cuda_ops 'cuda_ops/attention'
    cs synccheck_ops synccheck test_cuda_ops
    printf '%-34s %s\n' "total" "$(secs "$t_start") s, exit $status"
    exit $status
fi

say "CUDA tests (test_cuda_ops)"
t0=$(date +%s)
timeout "$t_test" "$build/test_cuda_ops" --verbose --jobs 1 >"$logs/test_cuda_ops.log" 2>&1
test_rc=$?
grep -E "^\[(FAIL|SKIP|PASS)|Synthesis|error|differ" "$logs/test_cuda_ops.log" | head -60
test_s=$(secs "$t0")
synth=$(grep -o "Tested: [0-9]* | Passing: [0-9]* | Failing: [0-9]* | Crashing: [0-9]*" \
        "$logs/test_cuda_ops.log" | tail -1)
skipped=$(grep -c "^\[SKIP\]" "$logs/test_cuda_ops.log" || true)
[ "$test_rc" -ne 0 ] && status=1
diagnose() { # binary log: the first failing or crashing test again under compute-sanitizer
    local t
    t=$(grep -E "^\[(FAIL|----)\] [a-z_0-9]+::[a-z_0-9]+" "$2" | grep -o "[a-z_0-9]*::[a-z_0-9]*" | head -1)
    [ -z "$t" ] && t=$(grep -oE "Test #?[a-z_0-9]+::[a-z_0-9]+ (crashed|timed out)" "$2" | grep -o "[a-z_0-9]*::[a-z_0-9]*" | head -1)
    if [ -n "$t" ] && command -v compute-sanitizer >/dev/null 2>&1 && [ "${PW_GPU_SANITIZE:-1}" = "1" ]; then
        say "compute-sanitizer on ${t/::/\/}"
        timeout "${PW_GPU_SANITIZE_TIMEOUT:-90}" compute-sanitizer --print-limit 20 "$1" --filter="${t/::/\/}" --jobs 1 --verbose \
            >"$2.sanitizer" 2>&1
        grep -v "^\[----\]   " "$2.sanitizer" | head -60
    fi
}
[ "$test_rc" -ne 0 ] && diagnose "$build/test_cuda_ops" "$logs/test_cuda_ops.log"

say "CUDA pipeline tests (test_cuda_pipeline)"
t0=$(date +%s)
timeout "$t_test" "$build/test_cuda_pipeline" --verbose --jobs 1 >"$logs/test_cuda_pipeline.log" 2>&1
pipe_rc=$?
grep -E "^\[(FAIL|SKIP|PASS)|Synthesis|error|differ|GPU vs CPU" "$logs/test_cuda_pipeline.log" | head -40
pipe_s=$(secs "$t0")
pipe_synth=$(grep -o "Tested: [0-9]* | Passing: [0-9]* | Failing: [0-9]* | Crashing: [0-9]*" \
        "$logs/test_cuda_pipeline.log" | tail -1)
pipe_skipped=$(grep -c "^\[SKIP\]" "$logs/test_cuda_pipeline.log" || true)
[ "$pipe_rc" -ne 0 ] && status=1
[ "$pipe_rc" -ne 0 ] && diagnose "$build/test_cuda_pipeline" "$logs/test_cuda_pipeline.log"

say "op table on the GPU (test_op_table_cuda: every op's rows against the CPU)"
t0=$(date +%s)
timeout "$t_test" "$build/test_op_table_cuda" --filter op_table/cuda --verbose --jobs 1 \
    >"$logs/test_op_table_cuda.log" 2>&1
table_rc=$?
grep -E "^\[(FAIL|SKIP|PASS|ERR )|Synthesis|differ|error" "$logs/test_op_table_cuda.log" | head -60
table_s=$(secs "$t0")
table_synth=$(grep -o "Tested: [0-9]* | Passing: [0-9]* | Failing: [0-9]* | Crashing: [0-9]*" \
        "$logs/test_op_table_cuda.log" | tail -1)
[ "$table_rc" -ne 0 ] && status=1

if [ "${PW_GPU_ALL_TESTS:-0}" = "1" ]; then
    say "whole test suite (ctest)"
    (cd "$build" && ctest --output-on-failure --timeout 900 -LE mpi) >"$logs/ctest.log" 2>&1 || status=1
    tail -5 "$logs/ctest.log"
fi

say "benchmark (bench_cuda)"
iters=20; rows=4096
[ "${PW_GPU_QUICK:-0}" = "1" ] && iters=5 && rows=1024
bench_rc=0
for m in fp32 tf32 bf16; do
    timeout "$t_bench" "$build/bench_cuda" --math $m --iters $iters --rows $rows --threads "$jobs" \
        >"$logs/bench_cuda_$m.log" 2>&1
    rc=$?
    # The op-against-CPU half does not depend on the GEMM mode: once is enough.
    if [ $m = fp32 ]; then grep -v "^SUMMARY" "$logs/bench_cuda_$m.log"
    else sed -n '/^SUMMARY/d; /^CUDA ops against CPU/q; p' "$logs/bench_cuda_$m.log"; fi
    [ $rc -ne 0 ] && bench_rc=$rc
done
[ "$bench_rc" -ne 0 ] && [ "$bench_rc" -ne 77 ] && status=1

say "tiny GPT through pipeline-run (tokens/s = samples/s x 128)"
# The steady training rate pipeline-run prints ("training rate": steps 2..N,
# without the first step's set-up and without the evaluation).
gpt_steps=40; cpu_steps=12
[ "${PW_GPU_QUICK:-0}" = "1" ] && gpt_steps=25 && cpu_steps=6
gpt() { # name, steps, extra flags; sets gpt_result (tokens/s, or - when it failed)
    gpt_result="-"
    timeout "$t_gpt" "$build/pipeline-run" examples/tiny_gpt.graph --data text:fortunes --batch 32 \
        --micro-batches 8 --steps "$2" --optimizer adamw --lr 1e-3 --no-pin $3 \
        >"$logs/gpt_$1.log" 2>&1
    local rc=$?
    local sps
    sps=$(grep -o "training rate: [0-9.]* samples/s" "$logs/gpt_$1.log" | tail -1 | awk '{print $3}')
    if [ "$rc" -ne 0 ] || [ -z "$sps" ]; then
        echo "gpt $1: exit $rc"; tail -3 "$logs/gpt_$1.log"
        # No GPU here is a skip, as for the tests; a time-out is only slow.
        grep -q "no CUDA device" "$logs/gpt_$1.log" && return
        [ "$rc" -ne 124 ] && status=1
        return
    fi
    gpt_result=$(echo "$sps" | awk '{printf "%.0f", $1 * 128}')
}
gpt gpu1 "$gpt_steps" "--device cuda --stages 1 --trace $logs/gpt_gpu1.json"; gpt_gpu1=$gpt_result
echo "GPU, 1 stage:  $gpt_gpu1 tokens/s"
gpt gpu4 "$gpt_steps" "--device cuda --stages 4 --trace $logs/gpt_gpu4.json"; gpt_gpu4=$gpt_result
echo "GPU, 4 stages: $gpt_gpu4 tokens/s"
gpt gpu1nog "$gpt_steps" "--device cuda --stages 1 --no-gpu-graphs"; gpt_gpu1nog=$gpt_result
gpt gpu4nog "$gpt_steps" "--device cuda --stages 4 --no-gpu-graphs"; gpt_gpu4nog=$gpt_result
echo "GPU without CUDA graphs, 1 / 4 stages: $gpt_gpu1nog / $gpt_gpu4nog tokens/s"
gpt gpu2x2 "$gpt_steps" "--device cuda --stages 2 --replicas 2"; gpt_gpu2x2=$gpt_result
echo "GPU, 2 stages x 2 replicas on the one GPU: $gpt_gpu2x2 tokens/s"
gpt gpu1tf32 "$gpt_steps" "--device cuda --stages 1 --gpu-math tf32"; gpt_gpu1tf32=$gpt_result
gpt gpu1bf16 "$gpt_steps" "--device cuda --stages 1 --gpu-math bf16"; gpt_gpu1bf16=$gpt_result
echo "GPU, 1 stage, TF32 / bf16 GEMMs: $gpt_gpu1tf32 / $gpt_gpu1bf16 tokens/s"
gpt cpu1 "$cpu_steps" "--device cpu --stages 1 --threads $jobs"; gpt_cpu1=$gpt_result
echo "CPU, 1 stage ($jobs threads): $gpt_cpu1 tokens/s"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }'; }

say "the quick GPT example trains on the GPU (examples/tiny_gpt_quick.graph, README's flags)"
train_steps="${PW_GPU_TRAIN_STEPS:-2500}"
t0=$(date +%s)
timeout "${PW_GPU_TRAIN_TIMEOUT:-900}" "$build/pipeline-run" examples/tiny_gpt_quick.graph \
    --data text:fortunes --device cuda --stages 2 --steps "$train_steps" --batch 32 \
    --micro-batches 4 --optimizer adamw --lr 3e-3 --lr-schedule cosine --warmup 100 \
    >"$logs/train_quick.log" 2>&1
train_rc=$?
train_s=$(secs "$t0")
grep -E "held-out|^done|error" "$logs/train_quick.log" | tail -4
heldout=$(grep -o "held-out loss [0-9.]*" "$logs/train_quick.log" | tail -1 | awk '{print $3}')
[ "$train_rc" -ne 0 ] && ! grep -q "no CUDA device" "$logs/train_quick.log" && status=1

say "summary"
sum() { grep -h "^SUMMARY $1" "$logs/bench_cuda_$2.log" 2>/dev/null; }
device=$(sum device fp32 | cut -d' ' -f3-)
printf '%-34s %s\n' "device" "${device:-none (benchmark skipped: exit $bench_rc)}"
printf '%-34s %s\n' "build (configure + all targets)" "${build_s} s"
printf '%-34s %s\n' "test_cuda_ops" "${synth:-no result} | skipped: $skipped (exit $test_rc, ${test_s} s)"
printf '%-34s %s\n' "test_cuda_pipeline" "${pipe_synth:-no result} | skipped: $pipe_skipped (exit $pipe_rc, ${pipe_s} s)"
printf '%-34s %s\n' "test_op_table_cuda" "${table_synth:-no result} (exit $table_rc, ${table_s} s)"
for m in fp32 tf32 bf16; do
    w=$(sum gemm_worst_ratio $m | awk '{print $3}')
    sq=$(sum "gemm square_4096.fwd" $m | awk '{printf "%s TFLOP/s (cuBLAS %s)", $4, $5}')
    printf '%-34s %s\n' "GEMM $m: worst op/cuBLAS ratio" "${w:--}"
    printf '%-34s %s\n' "GEMM $m: 4096^3 linear_fwd" "${sq:--}"
done
for op in attention_fwd attention_bwd_input layernorm_fwd "softmax_xent_fwd" gelu_fwd embedding_bwd_weight; do
    r=$(sum "op $op " fp32 | head -1 | awk '{printf "cpu %s ms, gpu %s ms, x%s", $4, $5, $6}')
    printf '%-34s %s\n' "$op" "${r:--}"
done
printf '%-34s %s\n' "tiny GPT tokens/s: GPU 1 stage" "${gpt_gpu1:--}"
printf '%-34s %s\n' "tiny GPT tokens/s: GPU 4 stages" "${gpt_gpu4:--} (x$(ratio "$gpt_gpu4" "$gpt_gpu1") of 1 stage)"
printf '%-34s %s\n' "tiny GPT tokens/s: no graphs 1 / 4" "${gpt_gpu1nog:--} / ${gpt_gpu4nog:--} (graphs: x$(ratio "$gpt_gpu1" "$gpt_gpu1nog") / x$(ratio "$gpt_gpu4" "$gpt_gpu4nog"))"
printf '%-34s %s\n' "tiny GPT tokens/s: 2 stages x 2 repl" "${gpt_gpu2x2:--}"
printf '%-34s %s\n' "tiny GPT tokens/s: GPU tf32 / bf16" "${gpt_gpu1tf32:--} / ${gpt_gpu1bf16:--}"
printf '%-34s %s\n' "tiny GPT tokens/s: CPU 1 stage" "${gpt_cpu1:--} (GPU 1 stage: x$(ratio "$gpt_gpu1" "$gpt_cpu1"))"
printf '%-34s %s\n' "quick GPT trained, ${train_steps} steps" "held-out ${heldout:--} nats (exit $train_rc, ${train_s} s)"
printf '%-34s %s\n' "total" "$(secs "$t_start") s, exit $status"
exit $status
