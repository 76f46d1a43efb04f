#!/usr/bin/env bash
# Dynamic load balancing (pipeline-run --rebalance auto) against the best
# static split, side by side, on this machine (docs/performance.md,
# "Rebalancing a running pipeline"):
#
#   (a) the example MLP (examples/fashion_mlp.graph) on 2 stages, started
#       from a deliberately bad split ([0,1) [1,8): the first stage only
#       flattens), against every 2-stage split (exhaustive);
#   (b) the tiny GPT (examples/tiny_gpt_quick.graph) on 3 stages with stage 1
#       slowed (PW_TEST_SLOW=1:SLOW: every compute callback of rank 1 takes
#       SLOW times as long), against every split whose cuts lie on block
#       boundaries, then every split within ±1 node of the best of those, and the rebalancer's own final cuts;
#   (c) the same GPT with stage 1 slowed from step HALF on (half-way).
#
#   bash tools/bench/bench_rebalance.sh [BUILD_DIR] [ROUNDS] [SLOW]
#
# A static split is a run with --rebalance-at 1:CUTS (the cuts move once,
# after step 1) timed over its later steps. Each round runs every candidate
# and the rebalancing runs one after another; the figures are the medians
# of the rounds. Step times: the median of the metrics log's step_ms over
# the steps named. The machine is shared: the load average is printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
build="${1:-build}"
rounds="${2:-3}"
slow="${3:-2.5}"
run="$build/pipeline-run"
tmp="$(mktemp -d /tmp/pw_bench_rebalance_XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
mlp="examples/fashion_mlp.graph --stages 2 --batch 64 --micro-batches 8 --no-pin --quiet"
gpt="examples/tiny_gpt_quick.graph --stages 3 --batch 12 --micro-batches 6 --data text:fortunes --no-pin --quiet"

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "nan"; else print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# Median step_ms of the steps in [from, to] of a metrics log.
steps_ms() { jq -r --argjson a "$2" --argjson b "$3" 'select(.type=="step" and .step>=$a and .step<=$b) | .step_ms' "$1" | median; }
# The step after which the first automatic move at or after step $2 (default
# 1) was made (0: none).
first_move() { jq -r --argjson a "${2:-1}" 'select(.type=="rebalance" and .forced==false and .step>=$a) | .step' "$1" | head -1 | awk 'BEGIN{s=0} {s=$1} END{print s}'; }
# Moves undone because they measured slower (revert, refinement's way back
# included), refinement moves (trials and the way back), and automatic moves in all.
reverts() { echo "$(jq -r 'select(.type=="rebalance" and .revert==true) | .step' "$1" | wc -l)/$(jq -r 'select(.type=="rebalance" and .refine==true) | .step' "$1" | wc -l)/$(jq -r 'select(.type=="rebalance" and .forced==false) | .step' "$1" | wc -l)"; }
last_cuts() { jq -r 'select(.type=="rebalance" and .forced==false) | .new_cuts | .[1:-1] | map(tostring) | join(",")' "$1" | tail -1; }

# static LABEL ENV CUTS STEPS FLAGS...: one static run, its median step ms
# over steps 6..STEPS appended to $tmp/LABEL.
static() {
    local label="$1" env="$2" cuts="$3" steps="$4"; shift 4
    env $env "$run" "$@" --steps "$steps" --rebalance-at "1:$cuts" --metrics "$tmp/s.jsonl" >/dev/null
    steps_ms "$tmp/s.jsonl" 6 "$steps" >> "$tmp/$label"
}

mlp_splits="1 2 3 4 5 6 7"
gpt_coarse="2,12 2,22 2,32 2,42 12,22 12,32 12,42 22,32 22,42 32,42"
echo "bench_rebalance: $rounds rounds, PW_TEST_SLOW factor $slow; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$rounds"); do
    # (a) every 2-stage split, then the rebalancing run from [0,1).
    for c in $mlp_splits; do static "a_static_$c" "" "$c" 60 $mlp; done
    "$run" $mlp --steps 150 --rebalance-at 1:1 --rebalance auto --metrics "$tmp/a.jsonl" >/dev/null
    m=$(first_move "$tmp/a.jsonl")
    echo "$m" >> "$tmp/a_move"
    steps_ms "$tmp/a.jsonl" 3 "$m" >> "$tmp/a_before"
    steps_ms "$tmp/a.jsonl" $((m + 5)) 150 >> "$tmp/a_after"
    steps_ms "$tmp/a.jsonl" 121 150 >> "$tmp/a_end"
    reverts "$tmp/a.jsonl" >> "$tmp/a_rev"
    echo "$(last_cuts "$tmp/a.jsonl")" >> "$tmp/a_cuts"
    # (b) coarse splits, then the rebalancing run (slow from the start).
    for c in $gpt_coarse; do static "b_static_$c" "PW_TEST_SLOW=1:$slow" "$c" 30 $gpt; done
    PW_TEST_SLOW=1:$slow "$run" $gpt --steps 100 --rebalance auto --metrics "$tmp/b.jsonl" >/dev/null
    m=$(first_move "$tmp/b.jsonl")
    echo "$m" >> "$tmp/b_move"
    echo "$(last_cuts "$tmp/b.jsonl")" >> "$tmp/b_cuts"
    steps_ms "$tmp/b.jsonl" 3 "$m" >> "$tmp/b_before"
    steps_ms "$tmp/b.jsonl" $((m + 5)) 100 >> "$tmp/b_after"
    steps_ms "$tmp/b.jsonl" 71 100 >> "$tmp/b_end"
    reverts "$tmp/b.jsonl" >> "$tmp/b_rev"
    # (c) slowed half-way.
    PW_TEST_SLOW=1:$slow@80 "$run" $gpt --steps 160 --rebalance auto --metrics "$tmp/c.jsonl" >/dev/null
    m=$(first_move "$tmp/c.jsonl" 80)
    echo "$m" >> "$tmp/c_move"
    jq -r 'select(.type=="rebalance" and .forced==false and .step<80) | .step' "$tmp/c.jsonl" | wc -l >> "$tmp/c_early"
    steps_ms "$tmp/c.jsonl" 10 79 >> "$tmp/c_fast"
    steps_ms "$tmp/c.jsonl" 81 "$m" >> "$tmp/c_before"
    steps_ms "$tmp/c.jsonl" $((m + 5)) 160 >> "$tmp/c_after"
    steps_ms "$tmp/c.jsonl" 131 160 >> "$tmp/c_end"
    reverts "$tmp/c.jsonl" >> "$tmp/c_rev"
    echo "$(last_cuts "$tmp/c.jsonl")" >> "$tmp/c_cuts"
done
# (b, c) the fine search around the best coarse split, and the rebalancer's
# own cuts as a static split, in the same number of rounds.
best=""; best_ms=1e300
for c in $gpt_coarse; do
    v=$(median < "$tmp/b_static_$c")
    if awk -v x="$v" -v y="$best_ms" 'BEGIN{exit !(x < y)}'; then best="$c"; best_ms="$v"; fi
done
b1=${best%,*}; b2=${best#*,}
fine=""
for d1 in -1 0 1; do for d2 in -1 0 1; do
    x=$((b1 + d1)); y=$((b2 + d2))
    if [ $x -ge 1 ] && [ $y -gt $x ] && [ $y -le 44 ] && [ "$x,$y" != "$best" ]; then fine="$fine $x,$y"; fi
done; done
own="$(sort "$tmp/b_cuts" | uniq -c | sort -rn | head -1 | awk '{print $2}')"
case " $fine $gpt_coarse " in *" $own "*) ;; *) fine="$fine $own" ;; esac
echo "bench_rebalance: fine search around $best: $(echo $fine | wc -w) splits (the rebalancer's own: $own)"
for r in $(seq 1 "$rounds"); do
    for c in $fine; do static "b_static_$c" "PW_TEST_SLOW=1:$slow" "$c" 30 $gpt; done
done

report_best() { # prefix: prints "best_ms cuts"
    local b="" bm=1e300
    for f in "$tmp/$1"_*; do
        v=$(median < "$f")
        if awk -v x="$v" -v y="$bm" 'BEGIN{exit !(x < y)}'; then b="${f##*_}"; bm="$v"; fi
    done
    echo "$bm $b"
}
read -r a_best a_cuts < <(report_best a_static)
read -r b_best b_cuts < <(report_best b_static)
a_after=$(median < "$tmp/a_after"); b_after=$(median < "$tmp/b_after"); c_after=$(median < "$tmp/c_after")
echo
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-40s %10s %10s %12s %10s %10s %8s\n' scenario before_ms after_ms best_static move_step vs_best ""
printf '%-40s %10.2f %10.2f %8.2f [%s] %10s %9.1f%%\n' "(a) MLP 2 stages from [0,1) [1,8)" \
    "$(median < "$tmp/a_before")" "$a_after" "$a_best" "$a_cuts" "$(median < "$tmp/a_move")" \
    "$(awk -v x="$a_after" -v y="$a_best" 'BEGIN{print 100*(x/y-1)}')"
printf '%-40s %10.2f %10.2f %8.2f [%s] %10s %9.1f%%\n' "(b) GPT 3 stages, stage 1 x$slow" \
    "$(median < "$tmp/b_before")" "$b_after" "$b_best" "$b_cuts" "$(median < "$tmp/b_move")" \
    "$(awk -v x="$b_after" -v y="$b_best" 'BEGIN{print 100*(x/y-1)}')"
printf '%-40s %10.2f %10.2f %8.2f [%s] %10s %9.1f%%\n' "(c) GPT, stage 1 x$slow from step 80" \
    "$(median < "$tmp/c_before")" "$c_after" "$b_best" "$b_cuts" "$(median < "$tmp/c_move")" \
    "$(awk -v x="$c_after" -v y="$b_best" 'BEGIN{print 100*(x/y-1)}')"
echo "(c) before the slowdown (steps 10-79): $(median < "$tmp/c_fast") ms; moves before the slowdown per run: $(tr '\n' ' ' < "$tmp/c_early")"
echo "first automatic move (step) per round: (a) $(tr '\n' ' ' < "$tmp/a_move") (b) $(tr '\n' ' ' < "$tmp/b_move") (c) $(tr '\n' ' ' < "$tmp/c_move")"
echo "the last 30 steps of each run (the state it settled in; median over rounds, and vs the best static): (a) $(median < "$tmp/a_end") ms $(awk -v x="$(median < "$tmp/a_end")" -v y="$a_best" 'BEGIN{printf "%+.1f%%", 100*(x/y-1)}')  (b) $(median < "$tmp/b_end") ms $(awk -v x="$(median < "$tmp/b_end")" -v y="$b_best" 'BEGIN{printf "%+.1f%%", 100*(x/y-1)}')  (c) $(median < "$tmp/c_end") ms $(awk -v x="$(median < "$tmp/c_end")" -v y="$b_best" 'BEGIN{printf "%+.1f%%", 100*(x/y-1)}')"
echo "reverts/refinement moves/automatic moves per round: (a) $(tr '\n' ' ' < "$tmp/a_rev") (b) $(tr '\n' ' ' < "$tmp/b_rev") (c) $(tr '\n' ' ' < "$tmp/c_rev")"
echo "the cuts each run ended with (interior cuts; empty: never moved): (a) $(tr '\n' ' ' < "$tmp/a_cuts") (b) $(tr '\n' ' ' < "$tmp/b_cuts") (c) $(tr '\n' ' ' < "$tmp/c_cuts")"
echo "every static split (median ms over rounds):"
for f in "$tmp"/a_static_* "$tmp"/b_static_*; do printf '  %-24s %8.2f\n' "${f##*/}" "$(median < "$f")"; done
