#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine, in one command: builds with -DQALORA_CUDA=ON,
# runs the CUDA tests (each op against its CPU reference, the GPU step against the CPU step, a
# 50-step run against the CPU's loss curve and a lossless merge), then the training-step
# benchmark beside PyTorch + PEFT on random-weight 1B and 7B Llama shapes, and prints one table.
# Where the Debian dev packages are missing, it builds against .gpu-bundle/ (made here by
# scripts/gpu-bundle.sh). About 8 minutes on a 16-core H100/H200 machine; --no-7b skips the 7B
# benchmark (about half of that). Logs and the table go to build-cuda/report; where $OUT is set
# (the device tool), the table, the test log and all of it as a .tar.gz are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
report=$PWD/build-cuda/report
rm -rf "$report"
mkdir -p "$report"
bundle=$PWD/.gpu-bundle
args=(-DCMAKE_BUILD_TYPE=Release -DQALORA_CUDA=ON -DQALORA_MPI=OFF -DQALORA_DNNL=OFF
      -DQALORA_BUILD_BENCH=OFF -DCMAKE_CUDA_ARCHITECTURES=native)
if [[ -d $bundle/root ]]; then
  usr=$bundle/root/usr
  blas=$usr/lib/x86_64-linux-gnu/openblas-openmp
  export LD_LIBRARY_PATH=$blas:$usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
  args+=(-DCMAKE_PREFIX_PATH=$usr -DCBLAS_INCLUDE_DIR=$usr/include/x86_64-linux-gnu/openblas-openmp
         -DOPENBLAS_LIBRARY=$blas/libopenblas.so -DQALORA_DATA_DIR=$bundle/data)
fi
[[ -d /usr/local/cuda/bin ]] && export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$report/gpu.txt"
nvcc --version | tail -1

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
step "build"
cmake -S . -B build-cuda -G Ninja "${args[@]}" >"$report/cmake.log"
cmake --build build-cuda -j "$(nproc)" --target qalora qalora_tests >"$report/build.log" 2>&1 ||
  { tail -40 "$report/build.log"; exit 1; }
grep -i "warning" "$report/build.log" | head -20 || true

step "tests"
export OMP_WAIT_POLICY=passive
tests_rc=0
build-cuda/tests/qalora_tests --gtest_brief=1 \
  --gtest_filter='Cuda*:*/Cuda*:TrainStep*:Device*:CliTrain.Gpu*' 2>&1 | tee "$report/tests.log" ||
  tests_rc=$?

step "benchmarks"
work=/tmp/qalora-gpu-check
mkdir -p "$work"
tok=$bundle/data/tokenizers/llama2-spm
writer=$bundle/make_synthetic_llama.py
[[ -f $writer ]] || writer=../shared/bench/make_synthetic_llama.py
[[ -d $tok ]] || tok=../shared/data/tokenizers/llama2-spm
shapes=(1b)
[[ ${1:-} == --no-7b ]] || shapes+=(7b)
for shape in "${shapes[@]}"; do
  hf=$work/$shape q4=$work/$shape-q4
  [[ -d $hf ]] || python3 "$writer" "$hf" "$tok" --shape "$shape" >/dev/null
  [[ -d $q4 ]] || build-cuda/qalora quantize -m "$hf" --method rtn --bits 4 -g 32 -o "$q4" \
    >"$report/quantize-$shape.log"
  for batch in 1 8; do
    build-cuda/qalora bench --train -m "$q4" --device cuda --batch $batch --seq-len 512 --rank 64 \
      --steps 5 --json >"$report/qalora-$shape-b$batch.json" 2>"$report/qalora-$shape-b$batch.log" ||
      { tail -3 "$report/qalora-$shape-b$batch.log"; echo '{}' >"$report/qalora-$shape-b$batch.json"; }
    python3 bench/peft_gpu_train.py "$hf" --batch $batch --steps 5 >"$report/peft-$shape-b$batch.json" \
      2>"$report/peft-$shape-b$batch.log" || echo '{}' >"$report/peft-$shape-b$batch.json"
  done
  rm -rf "$hf"  # the 7B folder is 13 GB
done

step "table"
python3 - "$report" "${shapes[@]}" <<'PY' | tee "$report/table.md"
import json, sys, os
report, shapes = sys.argv[1], sys.argv[2:]
print(f"GPU: {open(os.path.join(report, 'gpu.txt')).read().strip()}")
print("| shape | batch | qalora QA-LoRA INT4 g32 tok/s | % of bf16 peak | GPU memory | PEFT LoRA bf16 tok/s | PEFT GPU peak | speed ratio | memory ratio |")
print("|---|---|---|---|---|---|---|---|---|")
for s in shapes:
    for b in (1, 8):
        q = json.load(open(os.path.join(report, f"qalora-{s}-b{b}.json")))
        p = json.load(open(os.path.join(report, f"peft-{s}-b{b}.json")))
        pt, pm = p.get("tokens_per_s"), p.get("gpu_peak_bytes")
        if "tokens_per_s" not in q:
            print(f"| {s} | {b} | failed (build-cuda/report/qalora-{s}-b{b}.log) | | | {pt or 'n/a'} | | | |")
            continue
        print(f"| {s} | {b} | {q['tokens_per_s']:.0f} | {100 * q['gemm_efficiency']:.1f}% of {q['gemm_peak_gflops'] / 1e3:.0f} TFLOP/s "
              f"| {q['gpu_memory_bytes'] / 1e9:.1f} GB | {pt or 'n/a'} | {pm / 1e9 if pm else 0:.1f} GB "
              f"| {q['tokens_per_s'] / pt if pt else 0:.2f}x | {q['gpu_memory_bytes'] / pm if pm else 0:.2f} |")
PY
if [[ -n ${OUT:-} ]]; then
  cp "$report/table.md" "$report/tests.log" "$OUT/"
  tar -czf "$OUT/report.tar.gz" -C "$report" .
fi
exit "$tests_rc"
