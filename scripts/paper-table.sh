#!/usr/bin/env bash
# The QA-LoRA paper's comparison regenerated in one command (docs/paper-table.md):
#   scripts/paper-table.sh [--quick] [--out DIR]
# Full run: SmolLM2-135M-Instruct on alpaca_en_demo.json (the environment variables STEPS, LR,
# LIMIT, MMLU_LIMIT, PPL_WINDOWS, CALIB_SAMPLES, THREADS and BENCHMARKS size it); --quick: stories260K on
# TinyStories in minutes, exit 1 when the orderings CI checks do not hold.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/paper_table.py "$@"
