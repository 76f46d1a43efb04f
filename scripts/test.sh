#!/usr/bin/env bash
# README command 2: install what is missing, build, run the whole test suite:
# the optimised build, then the AddressSanitizer+UndefinedBehaviorSanitizer
# build (skip with PW_TEST_FAST=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

echo "== build (RelWithDebInfo)"
bash scripts/build.sh build
echo "== tests"
(cd build && ctest --output-on-failure --timeout 600)

if [ "${PW_TEST_FAST:-0}" != "1" ]; then
    echo "== build (address,undefined sanitizers)"
    bash scripts/build.sh build-asan -DPW_SANITIZE=address,undefined
    echo "== tests under sanitizers"
    (cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        ctest --output-on-failure --timeout 900)
fi
echo "== all tests passed"
