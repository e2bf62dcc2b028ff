#!/usr/bin/env python3
"""Writes a PEFT LoRA adapter folder for a tiny Llama model, independently of qalora, for
test_adapter_io.cpp.

OUT_DIR gets adapter_config.json (every field PEFT 0.17 writes) and adapter_model.safetensors
with keys base_model.model.model.layers.N.{self_attn,mlp}.<module>.lora_{A,B}.weight, float32,
standard normal values from --seed, in the Hugging Face layout: q_proj/k_proj output rows rotate
halves. With --qalora-group G it is a QA-LoRA adapter (use_qalora, qalora_group_size G,
lora_A [r, in/G]), whose forward is y += scaling * B A (L * mean_G(x)), L = in/G.

EXPECTED (a safetensors file) gets, per adapted module, in qalora's adjacent-pair RoPE layout:
  layers.N.<module>.A, .B   what qalora should load (QA-LoRA: A * L in float64 rounded to
                            float32, the average-pooling form);
  layers.N.<module>.delta   the dense [out, in] change PEFT's forward makes to W:
                            scaling * B A, or for QA-LoRA scaling * (B A)[:, i // G] * L / G.

usage: peft_writer.py OUT_DIR EXPECTED --dim D --hidden H --layers N --heads HQ --kv-heads HK
       --head-dim HD --rank R --alpha A [--rslora] --targets LIST|all-linear
       [--qalora-group G] [--seed S]
"""
import argparse
import json
import os
import struct
import sys

try:
    import numpy as np
except ImportError as e:  # reported as a skip by the C++ test
    print(f"numpy is not installed: {e}", file=sys.stderr)
    sys.exit(3)

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_f32(path, tensors):
    """Minimal safetensors writer: {name: float32 array}, data in insertion order."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def halves_to_pairs(w, n_heads, head_dim):
    """Rows of each head: Hugging Face's (j * head_dim/2 + i) becomes pair row (2 i + j)."""
    per_head = w.reshape(n_heads, 2, head_dim // 2, -1)  # [head, j, i, cols]
    return per_head.transpose(0, 2, 1, 3).reshape(n_heads * head_dim, -1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("expected")
    for name in ["dim", "hidden", "layers", "heads", "kv_heads", "head_dim", "rank"]:
        p.add_argument("--" + name.replace("_", "-"), type=int, required=True)
    p.add_argument("--alpha", type=float, required=True)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--targets", required=True)
    p.add_argument("--qalora-group", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    q_dim, kv_dim = a.heads * a.head_dim, a.kv_heads * a.head_dim
    shapes = {"q_proj": (q_dim, a.dim), "k_proj": (kv_dim, a.dim), "v_proj": (kv_dim, a.dim),
              "o_proj": (a.dim, q_dim), "gate_proj": (a.hidden, a.dim),
              "up_proj": (a.hidden, a.dim), "down_proj": (a.dim, a.hidden)}
    modules = MODULES if a.targets == "all-linear" else a.targets.split(",")
    scaling = a.alpha / (np.sqrt(a.rank) if a.rslora else a.rank)
    G = a.qalora_group
    rng = np.random.default_rng(a.seed)

    weights, expected = {}, {}
    for layer in range(a.layers):
        for module in modules:
            out, inp = shapes[module]
            cols = inp // G if G else inp
            A = rng.standard_normal((a.rank, cols)).astype(np.float32)
            B = rng.standard_normal((out, a.rank)).astype(np.float32)
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            weights[key + ".lora_A.weight"] = A
            weights[key + ".lora_B.weight"] = B

            BA = B.astype(np.float64) @ A.astype(np.float64)
            if G:
                L = inp // G
                delta = scaling * np.repeat(BA, G, axis=1) * L / G
                A_ours = (A.astype(np.float64) * L).astype(np.float32)
            else:
                delta = scaling * BA
                A_ours = A
            if module in ("q_proj", "k_proj"):
                heads = a.heads if module == "q_proj" else a.kv_heads
                B = halves_to_pairs(B, heads, a.head_dim)
                delta = halves_to_pairs(delta, heads, a.head_dim)
            name = f"layers.{layer}.{module}"
            expected[name + ".A"] = A_ours
            expected[name + ".B"] = B
            expected[name + ".delta"] = delta.astype(np.float32)

    # PEFT stores target_modules as a set: any order.
    target_modules = a.targets if a.targets == "all-linear" else \
        [modules[i] for i in rng.permutation(len(modules))]
    alpha = int(a.alpha) if a.alpha == int(a.alpha) else a.alpha
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tiny-llama",
        "bias": "none", "corda_config": None, "eva_config": None, "exclude_modules": None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False, "lora_dropout": 0.05,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "qalora_group_size": G if G else 16, "r": a.rank,
        "rank_pattern": {}, "revision": None, "target_modules": target_modules,
        "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_dora": False,
        "use_qalora": bool(G), "use_rslora": a.rslora,
    }
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_f32(os.path.join(a.out_dir, "adapter_model.safetensors"), weights)
    save_f32(a.expected, expected)


if __name__ == "__main__":
    main()
