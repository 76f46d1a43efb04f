#!/usr/bin/env bash
# README command 2: install what is missing, build, run the whole test suite:
#   1. the layering check (scripts/check-layering.sh), the optimised build and every test (the examples' ctest entries run
#      examples/custom_trainer and examples/graph_trainer small), then the MPI
#      tests (mpirun on loopback with 2, 3 and 4 processes; skipped with a
#      message without mpirun), then the install as a user's program sees it
#      (scripts/check-install.sh), and the examples' own Makefiles against
#      that install through pkg-config alone;
#   2. the AddressSanitizer + UndefinedBehaviorSanitizer build and every test;
#   3. the ThreadSanitizer build: the engine's and the backend's tests (threads
#      completing actions asynchronously), the determinism matrix's diagonal
#      and the kernels' thread checks (the CPU thread team), the runner's tests (tests/test_examples_api.c),
#      and a real pipeline run, also writing checkpoints from the background
#      thread;
#   4. every libFuzzer harness for 60 s (scripts/fuzz.sh; clang).
# PW_TEST_FAST=1 runs only the first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Nothing about the BLAS is set here: OPENBLAS_NUM_THREADS, OPENBLAS_CORETYPE
# and OPENBLAS_L2_SIZE stay as the machine has them, and the determinism
# tests must pass whatever they say.

# Criterion runs each test in a child process and does not always turn a
# sanitizer report into a failure, so the logs are searched too.
check_log() {
    if grep -E "ERROR: (Address|Leak)Sanitizer|runtime error:|WARNING: ThreadSanitizer" "$1" >/dev/null; then
        echo "!! sanitizer reports in $1:"
        grep -E -A8 "ERROR: (Address|Leak)Sanitizer|runtime error:|WARNING: ThreadSanitizer" "$1" | head -60
        exit 1
    fi
}

echo "== layering: no room includes a header of a room it may not use (docs/architecture.md)"
bash scripts/check-layering.sh
echo "== build (RelWithDebInfo)"
bash scripts/build.sh build
echo "== tests"
(cd build && ctest --output-on-failure --timeout 900 -LE mpi)
echo "== MPI tests: pipeline-run under mpirun on loopback, 2, 3 (the all-reduce algorithms) and 4 processes (skipped without mpirun)"
(cd build && ctest --output-on-failure --timeout 900 -L mpi)
echo "== install: headers as C11 and C++17, pkg-config and find_package programs, the examples' Makefiles, exports (scripts/check-install.sh)"
bash scripts/check-install.sh build

if [ "${PW_TEST_FAST:-0}" != "1" ]; then
    echo "== build (address,undefined sanitizers)"
    bash scripts/build.sh build-asan -DPW_SANITIZE=address,undefined
    echo "== tests under AddressSanitizer + UndefinedBehaviorSanitizer"
    (cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        ctest --output-on-failure --timeout 1800 2>&1 | tee ../build-asan/ctest.log | tail -25)
    check_log build-asan/ctest.log

    echo "== build (thread sanitizer)"
    bash scripts/build.sh build-tsan -DPW_SANITIZE=thread
    echo "== engine, backend, determinism, CPU-kernel thread, runner and tensor-parallel tests (asynchronous completions, the CPU thread team, tensor-parallel ranks as threads) and a 3-stage pipeline run under ThreadSanitizer"
    export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
    (cd build-tsan && ctest --output-on-failure --timeout 1800 -R '^(test_engine|test_backend|test_determinism|test_cpu_threads|test_examples_api|test_tensor_parallel|test_tp_state)$' 2>&1 \
        | tee ctest.log | tail -5)
    check_log build-tsan/ctest.log
    ./build-tsan/pipeline-run examples/fashion_mlp.graph --data synthetic:2048:784:10 \
        --stages 3 --micro-batches 6 --batch 48 --steps 20 --quiet --no-pin 2>&1 \
        | tee build-tsan/pipeline.log | tail -3
    check_log build-tsan/pipeline.log
    # Training-state checkpoints: the background writer thread beside the workers.
    rm -rf build-tsan/ckpt
    ./build-tsan/pipeline-run examples/fashion_mlp.graph --data synthetic:2048:784:10 \
        --stages 3 --micro-batches 6 --batch 48 --steps 20 --quiet --no-pin --optimizer adamw \
        --checkpoint-dir build-tsan/ckpt --checkpoint-every 2 2>&1 | tee build-tsan/checkpoint.log | tail -1
    check_log build-tsan/checkpoint.log

    # Every reader of user files for 60 s on its seed corpus (docs/building.md,
    # "Fuzzing"); at least three at a time keeps the phase near 5 minutes.
    echo "== fuzzing: each libFuzzer harness 60 s (scripts/fuzz.sh)"
    PW_FUZZ_JOBS="${PW_FUZZ_JOBS:-$(( $(nproc) > 3 ? $(nproc) : 3 ))}" bash scripts/fuzz.sh 60
fi
echo "== all tests passed"
