#!/bin/sh
# pipewright — the parameter server against the all-reduce, with and without
# a slowed worker (docs/distributed.md, "Parameter server"). Runs
# examples/fashion_mlp.graph on synthetic data, 1 stage x 2 replicas under
# mpirun: --allreduce tree (2 processes), --sync ps (3: + 1 server) and
# --sync ps --staleness S (3), each slowed three ways:
#   none         no injected delay
#   slow1        world rank 1 (replica 1) always 3x slower (PW_TEST_SLOW=w1:3)
#   alternating  replica 0 4x slower on odd steps, replica 1 on even ones
#                (PW_TEST_SLOW=w0:4/2,w1:4@2/2): a straggler that moves
# The variants alternate within each round (the machine is shared) and the
# median of ROUNDS rounds is printed: milliseconds per step (batch / rate).
#
#   sh tools/bench/bench_ps.sh BUILD_DIR [ROUNDS] [STEPS] [STALENESS]
set -eu
B=${1:?usage: bench_ps.sh BUILD_DIR [ROUNDS] [STEPS] [STALENESS]}
ROUNDS=${2:-3}
STEPS=${3:-200}
S=${4:-2}
G=$(dirname "$0")/../../examples/fashion_mlp.graph
BATCH=128
MPIRUN="mpirun --oversubscribe --bind-to none --mca btl self,vader"
ARGS="$G --data synthetic:65536:1x28x28:10 --batch $BATCH --steps $STEPS --micro-batches 2 --stages 1 --replicas 2 --no-pin --quiet"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
uptime
for round in $(seq "$ROUNDS"); do
    for slow in none slow1 alternating; do
        case $slow in
        none) env="" ;;
        slow1) env="PW_TEST_SLOW=w1:3" ;;
        alternating) env="PW_TEST_SLOW=w0:4/2,w1:4@2/2" ;;
        esac
        for v in allreduce ps ps-stale; do
            case $v in
            allreduce) cmd="$MPIRUN -np 2 $B/pipeline-run $ARGS" ;;
            ps) cmd="$MPIRUN -np 3 $B/pipeline-run $ARGS --sync ps" ;;
            ps-stale) cmd="$MPIRUN -np 3 $B/pipeline-run $ARGS --sync ps --staleness $S" ;;
            esac
            rate=$(env $env $cmd 2>&1 | sed -n 's/^training rate: \([0-9.]*\) samples.*/\1/p')
            echo "$rate" >> "$OUT/$slow.$v"
        done
    done
done
printf '%-12s %12s %12s %16s   (ms per step, median of %s)\n' delay allreduce "ps sync" "ps staleness $S" "$ROUNDS"
for slow in none slow1 alternating; do
    row=""
    for v in allreduce ps ps-stale; do
        ms=$(sort -n "$OUT/$slow.$v" | awk -v b=$BATCH '{a[NR]=$1} END {m=a[int((NR+1)/2)]; if (m > 0) printf "%.2f", 1000*b/m; else print "?"}')
        row="$row $(printf '%12s' "$ms")"
    done
    printf '%-12s%s\n' "$slow" "$row"
done
uptime
