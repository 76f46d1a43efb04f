#!/usr/bin/env bash
# Installs a built tree into a temporary prefix and uses it the way a program
# built on pipewright does (docs/building.md, "Using pipewright from your own
# program"):
#
#   bash scripts/check-install.sh [BUILD_DIR]     # default: build (already built)
#
#   1. headers: the umbrella header and every installed header, each alone in
#      its own file, compile as C11 and as C++17 with -Wall -Wextra -Werror
#      and nothing but -I PREFIX/include;
#   2. linking: tests/install/consumer.c (trains a small 2-stage pipeline) is
#      built via pkg-config against the shared library (C and C++), the
#      static one (--static) and the shared one with -fsanitize=undefined,
#      and via find_package(pipewright) (tests/install/CMakeLists.txt); each
#      program is run. With the CUDA component installed, consumer_cuda.c
#      too (pipewright-cuda, COMPONENTS cuda);
#   3. the examples (examples/custom_trainer, examples/graph_trainer), copied
#      out of the source tree, built by their own Makefiles through pkg-config
#      alone, and run small;
#   4. what is installed: the shared libraries export pw_* symbols only and
#      carry their soname, and no internal header is installed.
#
# Prints one line per check and "check-install: OK"; on the first failure,
# what failed and why, keeps the temporary directory and exits 1. CC and
# CXX choose the compilers (default cc, c++). About 10 s.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
build="${1:-build}"
CC="${CC:-cc}"
CXX="${CXX:-c++}"

fail() {
    echo "check-install: FAIL: $*" >&2
    exit 1
}
step() { echo "check-install: $*"; }

[ -f "$build/CMakeCache.txt" ] || fail "$build is not a configured build (bash scripts/build.sh $build first)"
[ -f "$build/pipewright-internal-headers.txt" ] ||
    fail "$build has no pipewright-internal-headers.txt: reconfigure it (cmake -S . -B $build)"
cache() { sed -n "s/^$1:[A-Z]*=//p" "$build/CMakeCache.txt"; }
version=$(cache CMAKE_PROJECT_VERSION)
libdir_rel=$(cache CMAKE_INSTALL_LIBDIR)
major=${version%%.*}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pw-check-install.XXXXXX")
trap 'st=$?; if [ $st -eq 0 ]; then rm -rf "$tmp"; else echo "check-install: kept $tmp" >&2; fi' EXIT
prefix="$tmp/prefix"
libdir="$prefix/$libdir_rel"

cmake --install "$build" --prefix "$prefix" >"$tmp/install.log" 2>&1 || {
    tail -20 "$tmp/install.log" >&2
    fail "cmake --install $build --prefix $prefix failed (is $build built? bash scripts/build.sh $build)"
}
step "installed $build into $prefix"
export PKG_CONFIG_PATH="$libdir/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"

# ---------------------------------------------------------------- 1. headers
mapfile -t headers < <(cd "$prefix/include" && find pipewright -name '*.h' | sort)
((${#headers[@]})) || fail "no header installed under $prefix/include/pipewright"
[ -f "$prefix/include/pipewright/pipewright.h" ] || fail "the umbrella header pipewright/pipewright.h is not installed"
mkdir -p "$tmp/headers"
# compile_header HEADER LANG STD COMPILER: a file that includes HEADER (twice: its
# include guard) compiles with the strict flags and the one include root.
compile_header() {
    local h=$1 lang=$2 std=$3 cc=$4
    local f="$tmp/headers/$(echo "$h" | tr '/.' '__').$lang"
    printf '#include <%s>\n#include <%s>\nint main(void) { return 0; }\n' "$h" "$h" >"$f"
    if ! "$cc" -x "$lang" "-std=$std" -Wall -Wextra -Werror -fsyntax-only -I "$prefix/include" "$f" \
        >"$f.log" 2>&1; then
        head -15 "$f.log" >&2
        fail "<$h> does not compile alone as $std ($cc -x $lang -std=$std -Wall -Wextra -Werror -I PREFIX/include)"
    fi
}
for h in "${headers[@]}"; do
    compile_header "$h" c c11 "$CC"
    compile_header "$h" c++ c++17 "$CXX"
done
# All of them in one file too: no two public headers may clash.
{ for h in "${headers[@]}"; do echo "#include <$h>"; done; echo 'int main(void) { return 0; }'; } >"$tmp/headers/all.c"
for lang in "c c11 $CC" "c++ c++17 $CXX"; do
    set -- $lang
    "$3" -x "$1" "-std=$2" -Wall -Wextra -Werror -fsyntax-only -I "$prefix/include" "$tmp/headers/all.c" \
        >"$tmp/headers/all.log" 2>&1 || { head -15 "$tmp/headers/all.log" >&2
        fail "the installed headers do not compile together as $2"; }
done
step "headers: ${#headers[@]} compile alone and together as C11 and C++17 (-Wall -Wextra -Werror, -I PREFIX/include only)"

# ---------------------------------------------------------------- 2. linking
pkg-config --exists pipewright || fail "pkg-config does not find pipewright in $libdir/pkgconfig"
[ "$(pkg-config --modversion pipewright)" = "$version" ] ||
    fail "pipewright.pc says version $(pkg-config --modversion pipewright), the build $version"
cflags=$(pkg-config --cflags pipewright)
libs=$(pkg-config --libs pipewright)
# With the .so beside the .a, -lpipewright would pick the .so: name the archive.
static_libs=$(pkg-config --static --libs pipewright | sed 's/-lpipewright\b/-l:libpipewright.a/')
mkdir -p "$tmp/link"

# run NAME: runs $tmp/link/NAME, which must train and exit 0.
run() {
    local exe="$tmp/link/$1"
    "$exe" >"$exe.out" 2>&1 || { cat "$exe.out" >&2; fail "$1 built, but running it failed"; }
}
# link_program NAME COMPILER ARGS...: builds one program, with the compiler's
# message on failure.
link_program() {
    local name=$1; shift
    "$@" -o "$tmp/link/$name" >"$tmp/link/$name.log" 2>&1 || {
        head -20 "$tmp/link/$name.log" >&2
        fail "$name does not build: $*"; }
}
consumer="$src/tests/install/consumer.c"
link_program c_shared "$CC" -std=c11 -Wall -Wextra -Werror "$consumer" $cflags $libs -Wl,-rpath,"$libdir"
run c_shared
loaded=$(ldd "$tmp/link/c_shared")
grep -q "libpipewright.so.$major => $libdir/" <<<"$loaded" ||
    fail "c_shared does not load libpipewright.so.$major from $libdir: $(grep pipewright <<<"$loaded")"
link_program cxx_shared "$CXX" -x c++ -std=c++17 -Wall -Wextra -Werror "$consumer" -x none $cflags $libs \
    -Wl,-rpath,"$libdir"
run cxx_shared
link_program c_static "$CC" -std=c11 -Wall -Wextra -Werror "$consumer" $cflags $static_libs
run c_static
if grep -q 'NEEDED.*libpipewright' <<<"$(readelf -d "$tmp/link/c_static")"; then
    fail "c_static, linked with pkg-config --static, still needs libpipewright.so"
fi
link_program c_ubsan "$CC" -std=c11 -Wall -Wextra -Werror -fsanitize=undefined -fno-sanitize-recover=undefined \
    "$consumer" $cflags $libs -Wl,-rpath,"$libdir"
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 run c_ubsan
grep -q "runtime error" "$tmp/link/c_ubsan.out" && { cat "$tmp/link/c_ubsan.out" >&2; fail "c_ubsan: UBSan report"; }
step "pkg-config: C11 and C++17 on libpipewright.so, C11 on libpipewright.a (--static), C11 with -fsanitize=undefined: built and ran ($(cat "$tmp/link/c_shared.out"))"

with_cuda=OFF
if [ -f "$libdir/pkgconfig/pipewright-cuda.pc" ]; then
    with_cuda=ON
    link_program cuda_shared "$CC" -std=c11 -Wall -Wextra -Werror "$src/tests/install/consumer_cuda.c" \
        $(pkg-config --cflags --libs pipewright-cuda) -Wl,-rpath,"$libdir"
    run cuda_shared
    link_program cuda_static "$CC" -std=c11 -Wall -Wextra -Werror "$src/tests/install/consumer_cuda.c" \
        $(pkg-config --cflags pipewright-cuda) \
        $(pkg-config --static --libs pipewright-cuda | sed 's/-lpipewright\(_cuda\)\?\b/-l:libpipewright\1.a/g')
    run cuda_static
    if grep -q 'NEEDED.*libpipewright' <<<"$(readelf -d "$tmp/link/cuda_static")"; then
        fail "cuda_static, linked with pkg-config --static, still needs a libpipewright*.so"
    fi
    step "pkg-config: pipewright-cuda, shared and --static: built and ran ($(cat "$tmp/link/cuda_shared.out"))"
fi

cmake -S "$src/tests/install" -B "$tmp/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DWITH_CUDA=$with_cuda \
    -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" >"$tmp/cmake.log" 2>&1 || {
    tail -25 "$tmp/cmake.log" >&2; fail "find_package(pipewright CONFIG) fails (tests/install/CMakeLists.txt)"; }
cmake --build "$tmp/cmake" -j"$(nproc)" >"$tmp/cmake-build.log" 2>&1 || {
    grep -E -B2 -A8 "error|Error" "$tmp/cmake-build.log" | head -30 >&2
    fail "the find_package project does not build (tests/install/CMakeLists.txt)"; }
targets="consumer_shared consumer_static consumer_cxx"
[ $with_cuda = ON ] && targets="$targets consumer_cuda consumer_cuda_static"
for t in $targets; do
    cp "$tmp/cmake/$t" "$tmp/link/cmake_$t"
    run "cmake_$t"
done
step "find_package(pipewright CONFIG): $targets built and ran"

# ---------------------------------------------------------------- 3. what is installed
check_exports() {
    local lib=$1 soname
    [ -f "$lib" ] || fail "$lib is not installed"
    soname=$(objdump -p "$lib" | awk '$1 == "SONAME" { print $2 }')
    [ "$soname" = "$(basename "${lib%.*.*}")" ] || fail "$lib has soname '$soname', expected $(basename "${lib%.*.*}")"
    # Version nodes (PIPEWRIGHT_0) are absolute symbols, not exports.
    local bad
    bad=$(nm -D --defined-only "$lib" | awk '$2 != "A" && $3 !~ /^pw_/ { print $3 }')
    [ -z "$bad" ] || fail "$lib exports symbols outside pw_*: $(echo $bad | head -c 400) (cmake/pipewright.map)"
}
check_exports "$libdir/libpipewright.so.$version"
[ "$(readlink "$libdir/libpipewright.so")" = "libpipewright.so.$major" ] &&
    [ "$(readlink "$libdir/libpipewright.so.$major")" = "libpipewright.so.$version" ] ||
    fail "expected libpipewright.so -> libpipewright.so.$major -> libpipewright.so.$version in $libdir"
[ -f "$libdir/libpipewright.a" ] || fail "libpipewright.a is not installed"
exported=$(nm -D --defined-only "$libdir/libpipewright.so.$version" | awk '$2 != "A"' | wc -l)
cuda_note=""
if [ $with_cuda = ON ]; then
    check_exports "$libdir/libpipewright_cuda.so.$version"
    cuda_note=", libpipewright_cuda.so.$version likewise"
fi
if ls "$libdir"/libpw_* >/dev/null 2>&1; then
    fail "module libraries installed ($(cd "$libdir" && ls libpw_*)): users link libpipewright only"
fi
for h in "${headers[@]}"; do
    rel=${h#pipewright/}
    case "$rel" in
        *-internal.h | *_int.h) fail "internal header installed: include/$h" ;;
    esac
    grep -qxF "$rel" "$build/pipewright-internal-headers.txt" &&
        fail "internal header installed: include/$h (not in PW_PUBLIC_HEADERS, cmake/package.cmake)"
done
# ---------------------------------------------------------------- 3. examples
mkdir -p "$tmp/examples"
cp -r "$src/examples/custom_trainer" "$src/examples/graph_trainer" "$tmp/examples/"
for ex in custom_trainer graph_trainer; do
    make -s -C "$tmp/examples/$ex" CC="$CC" LDFLAGS="-Wl,-rpath,$libdir" >"$tmp/examples/$ex.log" 2>&1 || {
        cat "$tmp/examples/$ex.log" >&2
        fail "examples/$ex: its Makefile failed against the install (pkg-config pipewright)"
    }
done
(cd "$tmp/examples" &&
    ./custom_trainer/custom_trainer --schedule zb-h1 --stages 2 --replicas 2 --steps 5 --quiet --no-pin &&
    ./graph_trainer/graph_trainer "$src/examples/fashion_mlp.graph" --stages 2 --steps 3 --quiet --no-pin) \
    >"$tmp/examples/run.log" 2>&1 || {
    cat "$tmp/examples/run.log" >&2
    fail "an example built against the install failed to run"
}
step "examples: custom_trainer and graph_trainer built by their Makefiles (pkg-config only) outside the source tree, and ran"

step "installed: libpipewright.so.$version (soname libpipewright.so.$major, $exported symbols, all pw_*) and .a$cuda_note; no internal header"
echo "check-install: OK"
