#!/usr/bin/env bash
# Coverage-guided fuzzing of every input parser (libFuzzer + ASan + UBSan, clang; fuzz/).
#   scripts/fuzz.sh [--minutes N | --seconds N] [TARGET...]   fuzz each target for N minutes
#                                                              (default 10), one at a time
#   scripts/fuzz.sh --replay [--seconds N] [TARGET...]        replay seeds and fuzz/regressions
#                                                              (CI), then fuzz N seconds each
# Builds build-fuzz/ (the library and fuzz targets only), writes the seed corpora to
# build-fuzz/seeds, and grows a corpus per target in build-fuzz/corpus (FUZZ_CORPUS overrides),
# which later runs continue from. A crash, leak, timeout or out-of-memory input lands in
# build-fuzz/artifacts/<target>/; once fixed at its root, keep it in fuzz/regressions/<target>/.
# Prints a table: executions, coverage (edges), new crash inputs. Exits non-zero on any crash.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(gguf safetensors hf_folder llama2c tokenizer adapter dataset eval_tasks chat)
SECONDS_EACH=600
REPLAY=0
TARGETS=()
while (($#)); do
  case "$1" in
    --minutes) SECONDS_EACH=$(($2 * 60)); shift 2 ;;
    --seconds) SECONDS_EACH=$2; shift 2 ;;
    --replay) REPLAY=1; SECONDS_EACH=0; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
((${#TARGETS[@]})) || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
  [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || { echo "fuzz.sh: unknown target $t (known: ${ALL_TARGETS[*]})" >&2; exit 2; }
done

BUILD_DIR=build-fuzz
CORPUS=${FUZZ_CORPUS:-$BUILD_DIR/corpus}
# -O1 with line tables, as the sanitizer test build; a unity build (a quarter less compile time,
# which CI feels). MPI, oneDNN and CUDA off: the targets run single-process and multiply no
# matrices.
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DQALORA_FUZZ=ON -DQALORA_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG" \
  -DCMAKE_UNITY_BUILD=ON \
  -DQALORA_BUILD_TESTS=OFF -DQALORA_BUILD_BENCH=OFF -DQALORA_MPI=OFF -DQALORA_DNNL=OFF >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" --target fuzz
rm -rf "$BUILD_DIR/seeds"
"$BUILD_DIR/fuzz/qalora_fuzz_seeds" "$BUILD_DIR/seeds"

# The parsers are single-threaded; the library's OpenMP team would only add noise.
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=passive
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# rss/malloc limits: no input of a few kilobytes may make a reader allocate more than its own
# sizes justify. timeout: seconds per input.
LIMITS=(-rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10)

failed=0
rows=()
for t in "${TARGETS[@]}"; do
  bin=$BUILD_DIR/fuzz/fuzz_$t
  artifacts=$BUILD_DIR/artifacts/$t
  log=$BUILD_DIR/logs/$t.log
  mkdir -p "$CORPUS/$t" "$artifacts" "$(dirname "$log")"
  : >"$log"
  before=$(find "$artifacts" -type f | wc -l)
  dirs=("$BUILD_DIR/seeds/$t")
  [[ -d fuzz/regressions/$t ]] && dirs+=("fuzz/regressions/$t")
  status=0
  if ((REPLAY)); then
    # Every seed and regression input once (-runs=0 stops after loading them).
    "$bin" "${LIMITS[@]}" -runs=0 -print_final_stats=1 -artifact_prefix="$artifacts/" "${dirs[@]}" \
      >>"$log" 2>&1 || status=$?
  fi
  if ((status == 0 && SECONDS_EACH > 0)); then
    echo "fuzz.sh: $t for ${SECONDS_EACH}s (log: $log)"
    "$bin" "${LIMITS[@]}" -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
      -dict="fuzz/$t.dict" -artifact_prefix="$artifacts/" "$CORPUS/$t" "${dirs[@]}" \
      >>"$log" 2>&1 || status=$?
  fi
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  new=$(($(find "$artifacts" -type f | wc -l) - before))
  if ((status != 0)); then
    failed=1
    echo "fuzz.sh: $t failed (exit $status); the report:" >&2
    grep -m1 -A12 'ERROR: \|runtime error\|==ERROR\|deadly signal\|Test unit written' "$log" >&2 || tail -20 "$log" >&2
  fi
  rows+=("$(printf '%-12s %12s %8s %8s %s' "$t" "${execs:--}" "${cov:--}" "$new" \
    "$( ((status)) && echo "FAILED" || echo "ok")")")
done

printf '\n%-12s %12s %8s %8s %s\n' target executions edges crashes result
printf '%s\n' "${rows[@]}"
exit "$failed"
