#!/usr/bin/env bash
# Configures and builds into $1 (default: build), extra args go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-build}"; shift || true
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >"$dir.cmake.log" 2>&1 || {
    cat "$dir.cmake.log"; exit 1; }
grep "pipewright:" "$dir.cmake.log" | sed 's/^-- //'
cmake --build "$dir" -j"$(nproc)" -- --no-print-directory 2>&1 | grep -E "warning|error|Error" || true
cmake --build "$dir" -j"$(nproc)" >/dev/null
