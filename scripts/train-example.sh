#!/usr/bin/env bash
# README command 1: install what is missing, build, train the example model.
# Every flag the README promises is given here, so the run is the same on any
# machine (2 or 64 cores): 3 epochs, 2 pipeline stages, 1F1B, 8 micro-batches
# of 8, SGD at the defaults. Extra arguments are passed on and, coming last,
# override these (e.g. --epochs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/build.sh build
./build/pipeline-run examples/fashion_mlp.graph --data fashion-mnist --epochs 3 --stages 2 \
    --schedule 1f1b --batch 64 --micro-batches 8 --optimizer sgd --seed 1 "$@"
