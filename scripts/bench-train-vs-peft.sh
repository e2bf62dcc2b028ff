#!/usr/bin/env bash
# Training speed side by side with PyTorch + PEFT (../shared/bench/peft_cpu_train.py), in
# alternating rounds, as docs/training.md reports it: PEFT in fp32 and with bf16 autocast, then
# qalora QA-LoRA r 64 on the Q4_1 GGUF and LoRA r 64 on its Hugging Face export, each in fp32
# and, where the CPU has native bf16, in bf16. LoRA in bf16 trains on the export stored in bf16
# (`--type bf16`), as Hugging Face publishes checkpoints; in fp32 on the fp32 export.
# Seq 512, 2 threads.
#   VENV=/path/to/venv scripts/bench-train-vs-peft.sh [ROUNDS]     (default 3)
# VENV: a throw-away venv with torch transformers peft gguf (see ../shared/bench/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${VENV:?set VENV to a venv with torch, transformers, peft and gguf}"
ROUNDS=${1:-3}
M=${M:-$HOME/.cache/qalora/models/SmolLM2-135M-Instruct.Q4_1.gguf}
HF=build/bench-smol-hf
[[ -d $HF ]] || build/qalora export -m "$M" --format hf -o "$HF" >/dev/null 2>&1
HF16=build/bench-smol-hf-bf16
[[ -d $HF16 ]] || build/qalora export -m "$M" --format hf --type bf16 -o "$HF16" >/dev/null 2>&1
TYPES=(fp32)
grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo && TYPES=(bf16 fp32)
for ((r = 1; r <= ROUNDS; r++)); do
  echo "round $r"
  echo "  peft: $("$VENV/bin/python" ../shared/bench/peft_cpu_train.py "$M" 2 --bf16 2>/dev/null)"
  for type in "${TYPES[@]}"; do
    hf=$HF
    [[ $type == bf16 ]] && hf=$HF16
    for run in "qalora:$M" "lora:$hf"; do
      adapter=${run%%:*} model=${run#*:}
      line=$(build/qalora bench --train -m "$model" --train-adapter "$adapter" --threads 2 \
        --seq-len 512 --steps 3 --compute-dtype "$type" 2>/dev/null | grep throughput)
      echo "  qalora $adapter $type: ${line#*throughput}"
    done
  done
done
