#!/usr/bin/env bash
# README command 1: install what is missing, build, train the example model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/build.sh build
./build/pipeline-run examples/fashion_mlp.graph "$@"
