#!/usr/bin/env bash
# Regenerates the quantization quality table of docs/quantization.md: perplexity of the fp32
# base and of every method / bits / group size on SmolLM2-135M-Instruct (WikiText-2 test, ctx
# 512, the first $SMOL_WINDOWS windows) and stories260K (TinyStories validation, ctx 512).
# GPTQ calibrates on 128 x 512 tokens from a part of the same file that is never evaluated.
#   scripts/quality-table.sh [smollm2|stories260k|all]   (writes build/quality/*.md, *.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${QALORA_DATA_DIR:-../shared/data}
QALORA=${QALORA:-build/qalora}
OUT=build/quality
SMOL_WINDOWS=${SMOL_WINDOWS:-40}
mkdir -p "$OUT"

# method bits group extra-flags label
CONFIGS=(
  "rtn 4 32 - RTN"         "gptq 4 32 - GPTQ"
  "rtn 4 128 - RTN"        "gptq 4 128 - GPTQ"
  "rtn 3 32 - RTN"         "gptq 3 32 - GPTQ"
  "rtn 3 128 - RTN"        "gptq 3 128 - GPTQ"
  "rtn 2 32 - RTN"         "gptq 2 32 - GPTQ"
  "rtn 2 64 - RTN"         "gptq 2 64 - GPTQ"
  "gptq 4 128 --act-order,--static-groups GPTQ act-order+static"
  "nf4 4 64 - NF4"         "nf4 4 64 --double-quant NF4+DQ"
  "fp4 4 64 - FP4"         "int8 8 -1 - INT8"
)

ppl_of() {  # model text ctx max-windows -> ppl
  "$QALORA" perplexity -m "$1" ${TOKENIZER:+--tokenizer "$TOKENIZER"} --text "$2" --ctx "$3" \
    --max-windows "$4" 2>/dev/null | awk '/^ppl:/ {print $2}'
}

run_model() {  # name model eval-text calib-text ctx max-windows
  local name=$1 model=$2 eval=$3 calib=$4 ctx=$5 windows=$6
  local md="$OUT/$name.md" jsonl="$OUT/$name.jsonl"
  : >"$jsonl"
  local base
  base=$(ppl_of "$model" "$eval" "$ctx" "$windows")
  {
    echo "| method | bits | group | bits/weight | ppl | vs fp32 |"
    echo "|---|---|---|---|---|---|"
    echo "| fp32 base | 32 | - | 32 | $base | 1.000 |"
  } >"$md"
  for cfg in "${CONFIGS[@]}"; do
    read -r method bits group flags label <<<"$cfg"
    local dir="$OUT/$name-$method-$bits-$group${flags//[-,]/}"
    local args=(quantize -m "$model" --method "$method" --bits "$bits" --group-size "$group" --out "$dir")
    [[ -n "${TOKENIZER:-}" ]] && args+=(--tokenizer "$TOKENIZER")
    [[ "$flags" != "-" ]] && IFS=, read -r -a extra <<<"$flags" && args+=("${extra[@]}")
    [[ "$method" == gptq ]] && args+=(--calib "$calib" --calib-samples 128 --calib-len 512 --seed 0)
    local log
    log=$("$QALORA" "${args[@]}" 2>/dev/null)
    local bpw secs ppl
    bpw=$(awk -F'[(,]' '/^linear layers:/ {for (i = 1; i <= NF; ++i) if ($i ~ /bits\/weight/) {split($i, a, " "); print a[1]}}' <<<"$log")
    secs=$(awk '/^time:/ {print $2}' <<<"$log")
    ppl=$(ppl_of "$dir" "$eval" "$ctx" "$windows")
    local group_label=$group
    [[ "$group" == -1 ]] && group_label="per channel"
    [[ "$method" == nf4 || "$method" == fp4 ]] && group_label="64 (absmax block)"
    printf '| %s | %s | %s | %s | %s | %.3f |\n' "$label" "$bits" "$group_label" "$bpw" "$ppl" \
      "$(awk -v a="$ppl" -v b="$base" 'BEGIN {print a / b}')" >>"$md"
    printf '{"model":"%s","method":"%s","label":"%s","bits":%s,"group":%s,"bits_per_weight":%s,"ppl":%s,"base_ppl":%s,"quantize_seconds":%s}\n' \
      "$name" "$method" "$label" "$bits" "$group" "$bpw" "$ppl" "$base" "$secs" >>"$jsonl"
    rm -rf "$dir"
    tail -n 1 "$md"
  done
}

which=${1:-all}
if [[ "$which" == all || "$which" == smollm2 ]]; then
  wiki="$DATA/text/wikitext2_test.txt"
  # Evaluate on the first 40 windows (the first ~90 KB); calibrate on the last 600 KB.
  tail -c 600000 "$wiki" >"$OUT/wikitext2-calib.txt"
  TOKENIZER="" run_model smollm2 "$(scripts/fetch-model.sh)" "$wiki" "$OUT/wikitext2-calib.txt" 512 "$SMOL_WINDOWS"
fi
if [[ "$which" == all || "$which" == stories260k ]]; then
  stories="$DATA/text/tinystories_val.txt"
  # Evaluate on the first 400 KB; calibrate on the rest.
  head -c 400000 "$stories" >"$OUT/tinystories-eval.txt"
  tail -c +400001 "$stories" >"$OUT/tinystories-calib.txt"
  TOKENIZER="$DATA/models/stories260K/tok512.bin" run_model stories260k \
    "$DATA/models/stories260K/stories260K.bin" "$OUT/tinystories-eval.txt" "$OUT/tinystories-calib.txt" 512 0
fi
