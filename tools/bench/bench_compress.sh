#!/usr/bin/env bash
# Gradient compression (pipeline-run --compress; docs/distributed.md,
# "Compression"), on this machine (docs/performance.md, "Gradient
# compression"):
#
#   accuracy  Fashion-MNIST, the example MLP (examples/fashion_mlp.graph),
#             2 replicas x 2 stages, 3 epochs, the README's flags (1F1B,
#             batch 64, 8 micro-batches, SGD, seed 1), once per mode: the
#             test accuracy after each epoch and the whole run's time;
#   timing    the same model for STEPS steps per run, the modes one after
#             another, ROUNDS rounds: the median samples/s of each mode,
#             and from one traced run per mode pipe-trace's bytes before
#             and after compression and the exposed all-reduce time.
#
#   bash tools/bench/bench_compress.sh accuracy|timing [BUILD_DIR] [ROUNDS] [STEPS]
#
# LINK_BW=B (bytes/s) runs the timing over a slow link (--link-bandwidth B
# --link-latency LINK_LAT, default 1e-4 s; docs/distributed.md, "Slow
# links"), where the bytes compression saves are what the step waits for.
#
# The machine is shared: the load average is printed with each run. Set
# OPENBLAS_CORETYPE=SkylakeX by hand for the faster kernel (this machine's
# OpenBLAS 0.3.21 does not know the CPU); say so with the figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
what="${1:-timing}"
build="${2:-build}"
rounds="${3:-3}"
steps="${4:-300}"
run="$build/pipeline-run"
tmp="$(mktemp -d /tmp/pw_bench_compress_XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
modes="none bf16 fp16 topk:0.01 powersgd:4"
base="examples/fashion_mlp.graph --data fashion-mnist --stages 2 --replicas 2 --schedule 1f1b --batch 64
      --micro-batches 8 --optimizer sgd --seed 1 --no-pin"
if [ -n "${LINK_BW:-}" ]; then base="$base --link-bandwidth $LINK_BW --link-latency ${LINK_LAT:-1e-4}"; fi

if [ "$what" = accuracy ]; then
    for m in $modes; do
        echo "=== --compress $m   ($(uptime | sed 's/.*load/load/'))"
        t0=$(date +%s.%N)
        # shellcheck disable=SC2086
        "$run" $base --epochs 3 --compress "$m" | grep -E "^epoch|^done"
        t1=$(date +%s.%N)
        echo "wall $(echo "$t1 - $t0" | bc) s   ($(uptime | sed 's/.*load/load/'))"
    done
    exit 0
fi

declare -A rates
for r in $(seq 1 "$rounds"); do
    for m in $modes; do
        # shellcheck disable=SC2086
        rate=$("$run" $base --steps "$steps" --compress "$m" | sed -n 's/^training rate: \([0-9.]*\) samples.*/\1/p')
        echo "round $r --compress $m: $rate samples/s   ($(uptime | sed 's/.*load/load/'))"
        rates[$m]="${rates[$m]:-} $rate"
    done
done
echo
echo "mode        median samples/s   bytes: fp32 -> wire (ratio), exposed all-reduce ms/step (all ranks)"
for m in $modes; do
    med=$(echo "${rates[$m]}" | tr ' ' '\n' | sed '/^$/d' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    # shellcheck disable=SC2086
    "$run" $base --steps 60 --compress "$m" --quiet --trace "$tmp/t.json" > /dev/null
    ar=$("$build/pipe-trace" --json "$tmp/t.json" | python3 -c '
import json, sys
d = json.load(sys.stdin)
a = d.get("allreduce") or {}
na = max(d.get("steps_analysed", 1), 1)
print("%.2f MiB -> %.2f MiB (%.1fx), %.2f" % (a.get("bytes", 0) / 2**20, a.get("wire_bytes", 0) / 2**20,
      a.get("ratio", 0), d["total"]["exposed_allreduce_us"] / 1e3 / na))')
    printf "%-11s %16s   %s\n" "$m" "$med" "$ar"
done
