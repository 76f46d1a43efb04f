#!/usr/bin/env bash
# tests/gpu/pack.sh — prepare a bare GPU machine's run, here (issue 9).
#
# A lent GPU machine has the CUDA toolkit and driver but none of the
# project's Debian packages (hwloc, libevent, Criterion, OpenBLAS, jansson,
# OpenMPI, the fortunes corpus) and cannot fetch them. This script builds
# the CUDA targets here (build-gpu, PW_CUDA=ON, sm_90 by default) and puts
# into .gpucarry/ (ignored by git) everything the run needs there:
#   bin/         test_cuda_ops, test_cuda_pipeline, test_op_table_cuda, bench_cuda,
#                pipeline-run
#   libs.tar.xz  their shared libraries, except the C runtime and CUDA's own
#   fortunes/    the text corpus of `--data text:fortunes`
# Then, on the GPU machine, from the repository root:
#   PW_GPU_PREBUILT=.gpucarry bash tests/gpu/run.sh
# (the device tool: carry ".gpucarry"). Without PW_GPU_PREBUILT run.sh builds
# on the GPU machine itself, which needs the packages installed there.
set -euo pipefail
cd "$(dirname "$0")/../.."
build="${PW_GPU_BUILD_DIR:-build-gpu}"
carry=.gpucarry
[ -d /usr/local/cuda/bin ] && export PATH="/usr/local/cuda/bin:$PATH"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPW_CUDA=ON \
    -DPW_CUDA_ARCHS="${PW_CUDA_ARCHS:-90}" >"$build.cmake.log" 2>&1 ||
    { cat "$build.cmake.log"; exit 1; }
grep -q "✓ CUDA backend" "$build.cmake.log" ||
    { echo "pack.sh: the CUDA backend is not enabled (see $build.cmake.log)"; exit 1; }
bins="test_cuda_ops test_cuda_pipeline test_op_table_cuda bench_cuda pipeline-run"
# shellcheck disable=SC2086
cmake --build "$build" -j"$(nproc)" --target $bins >"$build.build.log" 2>&1 ||
    { grep -E "error" "$build.build.log" | head -40; exit 1; }
rm -rf "$carry"
mkdir -p "$carry/bin" "$carry/lib" "$carry/fortunes"
for b in $bins; do cp "$build/$b" "$carry/bin/"; done
# The shared libraries the binaries load, less what every Linux machine with
# a CUDA driver has (glibc, libstdc++, libgcc) and CUDA's own libraries,
# which must match the GPU machine's driver and come from its toolkit.
for b in $bins; do ldd "$build/$b"; done | awk '/=> \//{print $3}' | sort -u |
    grep -v -E '/(libc|libm|libpthread|libdl|librt|libresolv|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnccl)\.so' |
    while read -r lib; do cp -L "$lib" "$carry/lib/"; done
tar cJf "$carry/libs.tar.xz" -C "$carry/lib" .
rm -rf "$carry/lib"
if [ -d /usr/share/games/fortunes ]; then
    find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' \
        -exec cp {} "$carry/fortunes/" \;
fi
# (.gitignore lists /.gpucarry/)
du -sh "$carry"
