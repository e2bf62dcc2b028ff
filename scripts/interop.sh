#!/usr/bin/env bash
# Interoperability check of `qalora export` (docs/export.md), not run by CI: llama.cpp
# (llama-cpp-python), transformers and PEFT load what qalora exports and compute the same
# logits as qalora.
#
# Environment:
#   VENV     virtual environment to create or reuse (default /tmp/qalora-interop-venv); missing
#            packages (torch, transformers, peft, gguf, numpy, llama-cpp-python) are installed
#   BASE     a GPTQ / RTN INT4 g32 SmolLM2 folder to start from; default: quantize $SMOLLM2
#   SMOLLM2  the SmolLM2-135M-Instruct GGUF (default: $QALORA_SMOLLM2 or the fetch-model path)
#   WORK     scratch folder (default /tmp/qalora-interop)
#   QALORA   the qalora binary (default build/qalora)
#   DATA     the shared data folder (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-/tmp/qalora-interop-venv}
WORK=${WORK:-/tmp/qalora-interop}
QALORA=${QALORA:-build/qalora}
DATA=${DATA:-../shared/data}
SMOLLM2=${SMOLLM2:-${QALORA_SMOLLM2:-${XDG_CACHE_HOME:-$HOME/.cache}/qalora/models/SmolLM2-135M-Instruct.Q4_1.gguf}}
PROMPT="The capital of France is a city where"

step() { printf '\n== %s\n' "$*"; }

step "python environment: $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
need=()
for pkg in torch transformers peft gguf numpy safetensors; do
  "$PY" -c "import $pkg" 2>/dev/null || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] || "$PY" -m pip install "${need[@]}"
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  echo "installing llama-cpp-python (builds llama.cpp: 10+ minutes on two cores)"
  CMAKE_ARGS="-DLLAMA_CURL=OFF" "$PY" -m pip install llama-cpp-python
fi

[ -x "$QALORA" ] || { echo "error: $QALORA not found (build it first)" >&2; exit 1; }
mkdir -p "$WORK"

if [ -z "${BASE:-}" ]; then
  BASE=$WORK/base
  step "GPTQ INT4 g32 of $SMOLLM2 -> $BASE"
  [ -f "$SMOLLM2" ] || { echo "error: $SMOLLM2 not found (scripts/fetch-model.sh)" >&2; exit 1; }
  "$QALORA" quantize -m "$SMOLLM2" --method gptq --bits 4 -g 32 \
    --calib "$DATA/text/wikitext2_test.txt" --calib-samples 16 --calib-len 256 -o "$BASE"
fi

step "tiny QA-LoRA and LoRA adapters on $BASE"
for kind in qalora lora; do
  rm -rf "${WORK:?}/$kind"
  "$QALORA" train -m "$BASE" --data "$DATA/instruct/alpaca_en_demo.json" --adapter "$kind" \
    --rank 8 --alpha 16 --learning-rate 1e-3 --max-steps 3 --grad-accum 2 --max-seq-len 96 \
    --eval-fraction 0.02 --out "$WORK/$kind" > "$WORK/train-$kind.log"
  tail -n 2 "$WORK/train-$kind.log"
done

step "merge and export"
"$QALORA" merge -m "$BASE" --adapter "$WORK/qalora" --out "$WORK/merged" --fidelity-text none --force
"$QALORA" export -m "$WORK/merged" --format gguf -o "$WORK/merged.gguf" --force | grep -v '^  '
"$QALORA" export -m "$WORK/merged" --format hf -o "$WORK/merged-hf" --force | tail -n 1
# The dense folder as GGUF (all F32): llama.cpp then computes in fp32 too, which isolates the
# file format (metadata, tokenizer, tensor layout) from llama.cpp's quantized arithmetic.
"$QALORA" export -m "$WORK/merged-hf" --format gguf -o "$WORK/dense.gguf" --force | sed -n 2p
"$QALORA" export -m "$BASE" --format hf -o "$WORK/base-hf" --force | tail -n 1
"$QALORA" export -m "$BASE" --adapter "$WORK/lora" --format peft -o "$WORK/lora-peft" --force | tail -n 1

# `qalora logits` prints the token ids, then the last position's logits.
ours() { "$QALORA" logits "$@" -p "$PROMPT" | sed -n 2p; }
IDS=$("$QALORA" logits -m "$WORK/merged.gguf" -p "$PROMPT" | sed -n 1p)
ours -m "$WORK/merged.gguf" > "$WORK/ours-gguf.txt"
ours -m "$WORK/merged-hf" > "$WORK/ours-hf.txt"
ours -m "$WORK/base-hf" --adapter "$WORK/lora-peft" > "$WORK/ours-peft.txt"
ours -m "$WORK/dense.gguf" > "$WORK/ours-dense.txt"

step "compare (token ids: $IDS)"
"$PY" - "$WORK" "$IDS" <<'EOF'
import sys

import numpy as np

work, ids = sys.argv[1], [int(t) for t in sys.argv[2].split()]


def ours(name):
    return np.array([float(v) for v in open(f"{work}/{name}.txt").read().split()], dtype=np.float64)


def report(what, theirs, mine):
    d = np.abs(theirs.astype(np.float64) - mine)
    print(f"{what}: max |logit diff| {d.max():.4g} (logit range {mine.min():.2f}..{mine.max():.2f}), "
          f"argmax {int(theirs.argmax())} vs {int(mine.argmax())}")


# llama.cpp on the exported GGUF. Its extra CPU buffer types (AMX, repacked weights) are turned
# off: they only re-lay the weights for speed, and AMX dies with SIGILL where the kernel (or a
# sandbox) does not grant it.
from llama_cpp import llama_cpp as llama_c

default_params = llama_c.llama_model_default_params


def model_params():
    p = default_params()
    p.use_extra_bufts = False
    return p


llama_c.llama_model_default_params = model_params
from llama_cpp import Llama

F32 = 0  # ggml type of the KV cache (llama.cpp's default is F16)
for name, mine, note in [
    ("dense.gguf", "ours-dense", "F32 weights"),
    ("merged.gguf", "ours-gguf", "Q4_1 weights: llama.cpp rounds activations to 8 bits"),
]:
    llm = Llama(model_path=f"{work}/{name}", n_ctx=64, logits_all=True, verbose=False,
                type_k=F32, type_v=F32)
    llm.eval(ids)
    report(f"llama.cpp vs qalora, {name} ({note})", np.array(llm.scores[len(ids) - 1]), ours(mine))

import torch
from transformers import AutoModelForCausalLM

x = torch.tensor([ids])
with torch.no_grad():
    model = AutoModelForCausalLM.from_pretrained(f"{work}/merged-hf", dtype=torch.float32)
    report("transformers vs qalora, merged-hf", model(x).logits[0, -1].numpy(), ours("ours-hf"))

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(f"{work}/base-hf", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, f"{work}/lora-peft")
    report("peft vs qalora, base-hf + lora-peft", peft(x).logits[0, -1].numpy(), ours("ours-peft"))
EOF
