#!/usr/bin/env bash
# Builds the libFuzzer harnesses (tests/fuzz/fuzz_*.c) into build-fuzz with
# clang, ASan and UBSan, and runs each for SECONDS (default 60) on a copy of
# its seed corpus:
#
#   bash scripts/fuzz.sh                 # every harness, 60 s each
#   bash scripts/fuzz.sh 600 idx text    # two of them, 10 minutes each
#
# New inputs go to build-fuzz/corpus/NAME (kept between runs, so a later run
# continues where this one stopped; tests/fuzz/corpus/ is never written).
# Crashes, leaks, timeouts (-timeout=10 s per input) and allocations over
# -malloc_limit_mb=1024 (or RSS over 2048 MB) fail the run: the input is left
# in build-fuzz/artifacts/NAME/ and the log in build-fuzz/logs/NAME.log.
# Prints one line per harness and exits non-zero when any failed.
# PW_FUZZ_JOBS harnesses run at a time (default: the core count, at least 2).
# docs/building.md, "Fuzzing": reproducing a crash, adding a harness.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=60
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then secs=$1; shift; fi
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for f in tests/fuzz/fuzz_*.c; do n=$(basename "$f" .c); names+=("${n#fuzz_}"); done
fi
for n in "${names[@]}"; do
    [ -f "tests/fuzz/fuzz_$n.c" ] || { echo "fuzz.sh: no harness tests/fuzz/fuzz_$n.c" >&2; exit 2; }
done

if ! command -v clang >/dev/null || ! ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
    bash scripts/deps.sh
fi

dir=build-fuzz
mkdir -p "$dir"
cmake -S . -B "$dir" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPW_FUZZ=ON \
    -DPW_TESTS=OFF -DPW_CUDA=OFF -DPW_MPI=OFF >"$dir.cmake.log" 2>&1 || { cat "$dir.cmake.log"; exit 1; }
grep "pipewright: ✓ fuzzers" "$dir.cmake.log" | sed 's/^-- //'
cmake --build "$dir" --target fuzz -j"$(nproc)" >"$dir/build.log" 2>&1 || {
    grep -E -B2 -A8 "error" "$dir/build.log" | head -80; exit 1; }
if grep -q "warning:" "$dir/build.log"; then grep -A3 "warning:" "$dir/build.log" | head -40; fi

jobs=${PW_FUZZ_JOBS:-$(nproc)}
[ "$jobs" -ge 2 ] 2>/dev/null || jobs=2
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
export HWLOC_HIDE_ERRORS=2

run_one() {
    local n=$1 corpus=$dir/corpus/$1 art=$dir/artifacts/$1/ log=$dir/logs/$1.log rc
    mkdir -p "$corpus" "$art" "$dir/logs"
    cp -n tests/fuzz/corpus/"$n"/* "$corpus"/ 2>/dev/null || true
    # The outer timeout only guards against a harness that ignores
    # -max_total_time (a hang outside an input).
    timeout $((secs + 120)) "./$dir/fuzz_$n" "$corpus" -max_total_time="$secs" \
        -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -close_fd_mask=3 \
        -print_final_stats=1 -artifact_prefix="$art" >"$log" 2>&1 && rc=0 || rc=$?
    echo "$rc" >"$dir/logs/$n.rc"
}

summary() {
    local n=$1 rc=$2 log=$dir/logs/$1.log
    local runs cov result
    runs=$(grep -o "stat::number_of_executed_units: *[0-9]*" "$log" | grep -o "[0-9]*$" | tail -1)
    cov=$(grep -o "cov: [0-9]* ft: [0-9]* corp: [0-9]*" "$log" | tail -1)
    if [ "$rc" -eq 0 ]; then
        result=ok
    else
        result=$(grep -o -m1 -E "ERROR: (libFuzzer: [a-z -]+|AddressSanitizer: [A-Za-z-]+|LeakSanitizer: [a-z ]+)|runtime error: .*" "$log" || true)
        [ -n "$result" ] || result="exit status $rc"
        local input
        input=$(ls -t "$dir/artifacts/$n/" 2>/dev/null | grep -v "^slow-unit" | head -1 || true)
        result="FAILED: $result; input $dir/artifacts/$n/$input, log $log"
    fi
    printf "fuzz %-14s %4ss  %9s runs  %-32s %s\n" "$n" "$secs" "${runs:-?}" "${cov:-cov: ?}" "$result"
}

echo "== fuzzing ${#names[@]} harnesses, ${secs} s each, $jobs at a time (logs in $dir/logs/)"
failed=0
for n in "${names[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    rm -f "$dir/logs/$n.rc"
    run_one "$n" &
done
wait
for n in "${names[@]}"; do
    rc=$(cat "$dir/logs/$n.rc" 2>/dev/null || echo 1)
    summary "$n" "$rc"
    [ "$rc" -eq 0 ] || failed=1
done
if [ "$failed" -ne 0 ]; then
    echo "fuzz: failures above; reproduce one with ./$dir/fuzz_NAME INPUT (docs/building.md, \"Fuzzing\")"
    exit 1
fi
echo "fuzz: all ${#names[@]} harnesses ran ${secs} s without a finding"
