#!/usr/bin/env bash
# The main job on the default model (SmolLM2-135M-Instruct), end to end, each stage's output and
# figures printed as it goes: quantize (GPTQ INT4, groups of 32) -> fine-tune a QA-LoRA adapter
# on Alpaca -> merge it exactly into the INT4 offsets -> export a GGUF that llama.cpp and ollama
# run -> evaluate and chat with that file.   OUT=build/demo STEPS=15 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(scripts/fetch-model.sh)
DATA=${QALORA_DATA_DIR:-../shared/data}
OUT=${OUT:-build/demo}
STEPS=${STEPS:-15}
Q=build/qalora
ALPACA=$DATA/instruct/alpaca_en_demo.json
# The held-out split `train` takes, scored again on every model below.
SPLIT=(--data "$ALPACA" --eval-fraction 0.05 --seed 42 --no-progress)
rm -rf "$OUT" && mkdir -p "$OUT"
start=$SECONDS
stage() { printf '\n== %s (at %d s)\n' "$*" $((SECONDS - start)); }

stage "1/6 the model"
$Q info "$MODEL"
stage "2/6 quantize: GPTQ INT4, groups of 32, calibrated on LIMA text"
$Q quantize -m "$MODEL" --method gptq --bits 4 -g 32 --calib "$DATA/instruct/lima.json" \
  --calib-samples 32 --calib-len 512 -o "$OUT/gptq4"
stage "3/6 fine-tune a QA-LoRA adapter on Alpaca ($STEPS steps of 8 examples)"
$Q train -m "$OUT/gptq4" --data "$ALPACA" --adapter qalora --max-steps "$STEPS" --grad-accum 8 \
  --learning-rate 1e-3 --seed 42 --out "$OUT/qalora"
stage "4/6 merge into the INT4 offsets (exact; compared with the unmerged adapter)"
$Q merge -m "$OUT/gptq4" --adapter "$OUT/qalora" --out "$OUT/merged"
stage "5/6 export GGUF (Q4_1: the same codes and scales, offsets rounded to fp16 with error feedback)"
# Per-tensor lines left out: the summary says what changed (only offsets rounded to fp16).
$Q export -m "$OUT/merged" --format gguf -o "$OUT/merged.gguf" | grep -v "^  blk\."
stage "6/6 evaluate and chat with the GGUF"
echo "held-out Alpaca loss, the original model:"
$Q perplexity -m "$MODEL" "${SPLIT[@]}" | grep -E "^(loss|ppl)"
echo "held-out Alpaca loss, the INT4 model before fine-tuning:"
$Q perplexity -m "$OUT/gptq4" "${SPLIT[@]}" | grep -E "^(loss|ppl)"
echo "held-out Alpaca loss, the exported INT4 model after QA-LoRA:"
$Q perplexity -m "$OUT/merged.gguf" "${SPLIT[@]}" | grep -E "^(loss|ppl)"
$Q eval -m "$OUT/merged.gguf" --task arc --data "$DATA/eval/mc/arc_easy.jsonl" --limit 200 --no-progress
$Q chat -m "$OUT/merged.gguf" --prompt "Give three tips for staying healthy." -n 96 --temp 0
printf '\ndone in %d s: %s\n' $((SECONDS - start)) "$OUT/merged.gguf"
