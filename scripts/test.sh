#!/usr/bin/env bash
# Builds (if needed) and runs the whole test suite under CTest. Integration tests use
# ../shared/data and the default model fetched by scripts/setup.sh, and skip when absent.
#   scripts/test.sh            Release build in build/
#   scripts/test.sh --sanitize AddressSanitizer + UBSan build in build-asan/
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=build
ARGS=(-DCMAKE_BUILD_TYPE=Release)
if [[ "${1:-}" == "--sanitize" ]]; then
  BUILD_DIR=build-asan
  # -O1 with line tables only: the sanitizer build takes about half as long as at -O2 -g, and
  # reports still name the file and line. No CUDA backend: nvcc's objects are not instrumented.
  ARGS=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG"
        -DQALORA_SANITIZE=ON -DQALORA_BUILD_BENCH=OFF -DQALORA_CUDA=OFF)
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi
# CTest runs tests in parallel, each with its own OpenMP team: sleeping (not spinning) idle
# threads keep oversubscribed cores from stalling each other.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
cmake -S . -B "$BUILD_DIR" -G Ninja "${ARGS[@]}" >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$(nproc)"
