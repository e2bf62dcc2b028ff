# The peer on a GPU: PyTorch + PEFT LoRA training of a Hugging Face folder in bf16 on CUDA, with
# the CPU peer's settings (LoRA r 64 / alpha 16 / dropout 0.05 on all linear layers, AdamW,
# seq 512): tokens/s and peak GPU memory, as JSON, for scripts/gpu-check.sh to print beside
# `qalora bench --train --device cuda`.
#   python3 bench/peft_gpu_train.py HF_FOLDER [--batch N] [--steps N]
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("folder")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--steps", type=int, default=5)
ap.add_argument("--seq", type=int, default=512)
a = ap.parse_args()

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(a.folder, dtype=torch.bfloat16).cuda()
model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05,
                                         target_modules="all-linear", task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device="cuda")


def step():
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


step()  # warm-up: allocations, kernel selection
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
t0 = time.time()
for _ in range(a.steps):
    step()
torch.cuda.synchronize()
dt = (time.time() - t0) / a.steps
print(json.dumps({"peer": "PyTorch + PEFT LoRA bf16", "torch": torch.__version__,
                  "batch": a.batch, "seq": a.seq, "tokens_per_s": round(a.batch * a.seq / dt, 1),
                  "step_s": round(dt, 4),
                  "gpu_peak_bytes": torch.cuda.max_memory_allocated()}))
