#!/usr/bin/env bash
# Regenerates the fine-tuning results of docs/training.md on stories260K: the held-out loss of
# the fp32 model, and of GPTQ g32 INT4 / INT3 / INT2 models before and after LoRA (GPTQ-LoRA)
# and QA-LoRA training on TinyStories text with the same data, steps and schedule.
#   scripts/training-runs.sh            (writes build/training/table.md and the runs' folders)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${QALORA_DATA_DIR:-../shared/data}
QALORA=${QALORA:-build/qalora}
OUT=build/training
STEPS=${STEPS:-200}
MODEL=(-m "$DATA/models/stories260K/stories260K.bin" --tokenizer "$DATA/models/stories260K/tok512.bin")
TEXT=$DATA/text/tinystories_val.txt
TRAIN=(--data "$TEXT" --max-seq-len 128 --rank 8 --alpha 16 --learning-rate 2e-3 --lr-scheduler cosine
       --grad-accum 4 --eval-fraction 0.02 --seed 1 --no-progress)
rm -rf "$OUT" && mkdir -p "$OUT"

# The fp32 model: its held-out loss on the same split (the loss before the first step), and
# what LoRA reaches from it.
"$QALORA" train "${MODEL[@]}" "${TRAIN[@]}" --max-steps "$STEPS" --out "$OUT/fp32" > "$OUT/fp32.log"
read -r FP32 FP32_LORA < <(awk '/held-out loss: / {print $3, $5}' "$OUT/fp32.log")
{
  echo "| base | adapter | held-out loss before | after | gap to the fp32 base closed |"
  echo "|---|---|---|---|---|"
  echo "| fp32 | lora | $FP32 | $FP32_LORA | |"
} > "$OUT/table.md"
for bits in 4 3 2; do
  "$QALORA" quantize "${MODEL[@]}" --method gptq --bits "$bits" -g 32 --calib "$TEXT" \
    --calib-samples 64 --calib-len 256 -o "$OUT/gptq$bits" > /dev/null
  for adapter in lora qalora; do
    "$QALORA" train -m "$OUT/gptq$bits" "${TRAIN[@]}" --max-steps "$STEPS" --adapter "$adapter" \
      --out "$OUT/gptq$bits-$adapter" > "$OUT/gptq$bits-$adapter.log"
    read -r before after < <(awk '/held-out loss: / {print $3, $5}' "$OUT/gptq$bits-$adapter.log")
    closed=$(awk -v b="$before" -v a="$after" -v f="$FP32" 'BEGIN {printf "%.0f%%", 100 * (b - a) / (b - f)}')
    echo "| GPTQ INT$bits g32 | $adapter | $before | $after | $closed |" >> "$OUT/table.md"
  done
done
cat "$OUT/table.md"
