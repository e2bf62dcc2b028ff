#!/usr/bin/env bash
# The main job on the default model: a chat answer and the WikiText-2 perplexity at ctx 512.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$(scripts/fetch-model.sh)
DATA=${QALORA_DATA_DIR:-../shared/data}
build/qalora info "$MODEL"
build/qalora chat --model "$MODEL" --prompt "What is the capital of France? Answer in one sentence." -n 64 --temp 0
build/qalora perplexity --model "$MODEL" --text "$DATA/text/wikitext2_test.txt" --ctx 512
