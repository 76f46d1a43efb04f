#!/usr/bin/env bash
# Side-by-side speed of two revisions: builds REV (default: the commit before
# deterministic threading) in a git worktree under /tmp and the working tree
# in ./build, then runs the same benchmark from each, alternating, ROUNDS
# times, and prints every figure and the medians.
#
#   bash tools/bench/compare_rev.sh [REV] [ROUNDS]
#
# Used for docs/performance.md ("Deterministic threading"): single-stage
# MLP training at 1 and 2 threads (bench_mlp) and the tiny GPT's training
# rate on 1 stage (bench_gpt --only training).
set -euo pipefail
cd "$(dirname "$0")/../.."
rev="${1:-0c2fc4d}"
rounds="${2:-5}"
base="/tmp/pw-compare-$(git rev-parse --short "$rev")"
if [ ! -d "$base" ]; then
    git worktree add --detach "$base" "$rev" >/dev/null
fi
echo "building $rev in $base and the working tree in build/"
cmake -S "$base" -B "$base/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPW_CUDA=OFF -DPW_TESTS=OFF >/dev/null
cmake --build "$base/build" -j"$(nproc)" --target bench_mlp bench_gpt >/dev/null
bash scripts/build.sh build >/dev/null
cmake --build build --target bench_mlp bench_gpt >/dev/null

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

run_pair() { # label, command line (binary name first, without directory)
    local label="$1"; shift
    local b_file n_file
    b_file=$(mktemp); n_file=$(mktemp)
    for ((i = 0; i < rounds; i++)); do
        "$base/build/$@" | awk -v f="$b_file" '/training  /{print $2 >> f}' >/dev/null
        "./build/$@" | awk -v f="$n_file" '/training  /{print $2 >> f}' >/dev/null
    done
    local b n
    b=$(median <"$b_file"); n=$(median <"$n_file")
    printf '%-34s %s: %s | now: %s | median %s vs %s GFLOP/s = %.3f\n' "$label" "$rev" \
        "$(tr '\n' ' ' <"$b_file")" "$(tr '\n' ' ' <"$n_file")" "$b" "$n" "$(awk -v a="$n" -v b="$b" 'BEGIN {print a / b}')"
    rm -f "$b_file" "$n_file"
}

gpt_pair() {
    local b_file n_file
    b_file=$(mktemp); n_file=$(mktemp)
    for ((i = 0; i < rounds; i++)); do
        "$base/build/bench_gpt" --only training --rounds 1 --steps 4 "$@" | awk -v f="$b_file" '$1 ~ /^[0-9]+$/ && NF >= 5 {print $4 >> f}'
        ./build/bench_gpt --only training --rounds 1 --steps 4 "$@" | awk -v f="$n_file" '$1 ~ /^[0-9]+$/ && NF >= 5 {print $4 >> f}'
    done
    local b n
    b=$(median <"$b_file"); n=$(median <"$n_file")
    printf '%-34s %s: %s | now: %s | median %s vs %s tokens/s = %.3f\n' "tiny GPT, 1 stage, 2 threads" "$rev" \
        "$(tr '\n' ' ' <"$b_file")" "$(tr '\n' ' ' <"$n_file")" "$b" "$n" "$(awk -v a="$n" -v b="$b" 'BEGIN {print a / b}')"
    rm -f "$b_file" "$n_file"
}

run_pair "bench_mlp, 2 threads" bench_mlp --threads 2 --rounds 3
run_pair "bench_mlp, 1 thread" bench_mlp --threads 1 --rounds 3
run_pair "bench_mlp, 2 threads, 8 micro-batches" bench_mlp --threads 2 --micro-batches 8 --rounds 3
gpt_pair --threads 2
