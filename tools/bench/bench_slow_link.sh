#!/bin/sh
# bench_slow_link.sh — the tiny GPT with 2 replicas (2 MPI processes, one
# stage each) over a slow link (runtime/link.h: --link-bandwidth,
# --link-latency), per all-reduce algorithm, beside the simulator's forecast
# of the same run (pipeline-run --simulate --calibrate with the same link).
#
#   tools/bench/bench_slow_link.sh [BUILD_DIR]      (default: build)
#
# Environment: STEPS (default 12), BATCH (default 8), MB (micro-batches,
# default 2), REPS (default 3: runs alternate the variants, medians are
# reported), BWS (default "1e9 1e8"), LAT (default 5e-5 s per message),
# ALGOS (default "ring tree hierarchical mpi"), COMPRESS (default "none":
# the compression modes crossed with ALGOS, e.g. "none bf16 fp16 topk:0.01
# powersgd:4"), PS (default empty; "1": also the parameter server, --sync
# ps with one server, a third process, with each of COMPRESS's modes:
# ps/MODE; PowerSGD's two round trips through the server included). The simulator's forecast is given
# per variant (--simulate --calibrate --allreduce A --compress C: the
# link's time of what the variant sends; not the compressors' compute).
#
# On a shared machine, run it at real-time priority (as root):
#   chrt -f 50 tools/bench/bench_slow_link.sh build
#
# The two processes are two "hosts" (PW_TEST_HOSTS=0,1), so the
# hierarchical all-reduce's phase across hosts is on the slow link (with one
# member per host it is a tree of the two leaders). Figures per run: the
# training rate pipeline-run prints (steps 2..N), the step time it implies,
# and rank 0's all-reduce time and exposed all-reduce (the time OPTIM
# waited for buckets: the "(exposed)" column of the rank table), per step.
# For the parameter server the all-reduce columns are the pushes, and "pull
# ms" is the time rank 0's OPTIM waited for the servers' new parameters
# (its PS_PULL trace events, per step; the PS runs are traced for it).
# The held-out split is a few windows of a small text, so the run's one
# evaluation costs little.
set -eu
B=${1:-build}
STEPS=${STEPS:-12}
BATCH=${BATCH:-8}
MB=${MB:-2}
REPS=${REPS:-3}
BWS=${BWS:-"1e9 1e8"}
LAT=${LAT:-5e-5}
ALGOS=${ALGOS:-"ring tree hierarchical mpi"}
COMPRESS=${COMPRESS:-none}
PS=${PS:-}
G=examples/tiny_gpt_quick.graph
RUN="$B/pipeline-run"
T=$(mktemp -d /tmp/pw_slow_link.XXXXXX)
trap 'rm -rf "$T"' EXIT
# A small corpus: 20 KB of repeated sentences (its last 10% held out).
i=0
while [ $i -lt 400 ]; do
    echo "the quick brown fox jumps over the lazy dog. a stitch in time saves nine."
    i=$((i + 1))
done | head -c 20000 > "$T/text.txt"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
COMMON="$G --data text:$T/text.txt --stages 1 --replicas 2 --steps $STEPS --batch $BATCH --micro-batches $MB --no-pin --buckets 4"
echo "# $(date -u +%FT%TZ) $(uptime)"
echo "# OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-unset} STEPS=$STEPS BATCH=$BATCH MB=$MB REPS=$REPS LAT=$LAT"

# One run: prints "rate step_ms allreduce_ms exposed_ms pull_ms" (per step, rank 0).
one() {
    np=2 hosts=0,1 trace=""
    case "$*" in *"--sync ps"*) np=3 hosts=0,1,1 trace="--trace $T/ps.json" ;; esac
    rm -f "$T"/ps.rank*.json
    out=$(PW_TEST_HOSTS=$hosts timeout 600 mpirun --oversubscribe --bind-to none --mca btl self,vader -np $np \
        "$RUN" $COMMON $trace "$@" 2>&1) || { echo "FAILED: $*" >&2; echo "$out" >&2; echo "nan nan nan nan nan"; return; }
    pull=-
    [ -n "$trace" ] && pull=$(sed -n 's/.*"name": "PS_PULL".*"dur": \([0-9.]*\).*/\1/p' "$T/ps.rank0.json" |
        awk -v s="$STEPS" '{t += $1} END {printf "%.2f", t / 1e3 / s}')
    rate=$(echo "$out" | sed -n 's/^training rate: \([0-9.]*\) samples.*/\1/p')
    # rank table: rank replica stage nodes... busy idle bubble theory allreduce (exposed) slots
    row=$(echo "$out" | awk '$1 == "0" && $2 == "0" && $3 == "0" {print; exit}')
    ar=$(echo "$row" | sed -E 's/.* ([0-9.]+) +\( *([0-9.]+)\).*/\1/')
    ex=$(echo "$row" | sed -E 's/.* ([0-9.]+) +\( *([0-9.]+)\).*/\2/')
    awk -v r="$rate" -v b="$BATCH" -v a="$ar" -v e="$ex" -v s="$STEPS" -v p="$pull" \
        'BEGIN {printf "%s %.1f %.2f %.2f %s\n", r, 1e3 * b / r, 1e3 * a / s, 1e3 * e / s, p}'
}

median() { sort -n | awk '{v[NR] = $1} END {if (!NR) print "-"; else print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

VARIANTS=""
for z in $COMPRESS; do
    for a in $ALGOS; do VARIANTS="$VARIANTS $a/$z"; done
done
if [ -n "$PS" ]; then
    for z in $COMPRESS; do
        VARIANTS="$VARIANTS ps/$z"
    done
fi
flags() { # variant -> pipeline-run flags
    a=${1%%/*} z=${1#*/}
    if [ "$a" = ps ]; then echo "--sync ps --servers 1 --compress $z"; else echo "--allreduce $a --compress $z"; fi
}

for bw in none $BWS; do
    if [ "$bw" = none ]; then link=""; else link="--link-bandwidth $bw --link-latency $LAT"; fi
    : > "$T/res"
    r=0
    while [ $r -lt "$REPS" ]; do
        for v in $VARIANTS; do
            echo "$v $(one $(flags "$v") $link)" >> "$T/res"
        done
        r=$((r + 1))
    done
    echo
    echo "link: ${bw} B/s${link:+, $LAT s per message}  (medians of $REPS; per step, MPI rank 0)"
    printf "%-22s %10s %10s %12s %12s %10s %12s %12s\n" variant "samples/s" "step ms" "all-red ms" "exposed ms" \
        "pull ms" "sim step" "sim all-red"
    for v in $VARIANTS; do
        printf "%-22s" "$v"
        for col in 2 3 4 5 6; do
            m=$(awk -v a="$v" -v c=$col '$1 == a && $c != "-" {print $c}' "$T/res" | median)
            printf " %10s" "$m"
        done
        sim=$("$RUN" $G --simulate --calibrate --stages 1 --replicas 2 --batch "$BATCH" --micro-batches "$MB" \
              $(flags "$v") $link 2>&1 | awk '/step time/ {s = $3} /all-reduce/ {a = $2} END {print s, a}')
        set -- $sim
        printf " %12s %12s\n" "$1" "$2"
    done
done
