#!/usr/bin/env python3
"""Writes a tiny Llama GPTQ checkpoint folder, independently of qalora, for
test_gptq_checkpoint.cpp.

The folder holds config.json (with quantization_config, or a separate quantize_config.json),
model.safetensors (or two shards and model.safetensors.index.json) with, per linear,
qweight int32 [in*b/32, out], qzeros int32 [L, out*b/32], scales fp16 [L, out] and
g_idx int32 [in], from random integer codes, zero points and scales. Value k of a packed stream
occupies bits [b*k, b*k+b) of consecutive little-endian uint32 words (3-bit values straddle
words); checkpoint format gptq (v1) stores zero - 1, gptq_v2 the zero itself.

EXPECTED gets the dequantized weights W[j, i] = scales[g_idx[i], j] * (q[i, j] - z[g_idx[i], j])
in float32, one tensor [out, in] per linear named by its prefix (Hugging Face row order).

usage: gptq_writer.py OUT_DIR EXPECTED --bits B --group-size G [--act-order] [--format v1|v2]
       [--implicit-format] [--config quantization_config|quantize_config] [--sym] [--shards N]
       [--seed S]
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

VOCAB, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 70, 64, 96, 2, 4, 2, 16

DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
          np.dtype(np.uint16): "BF16"}  # uint16 arrays carry bfloat16 bits


def write_safetensors(path, tensors):
    """tensors: list of (name, numpy array); bfloat16 data is passed as uint16 bits."""
    header, offset, blobs = {}, 0, []
    for name, a in tensors:
        data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def pack_stream(values, bits, axis):
    """Packs `values` (unsigned, < 2^bits) along `axis` into int32 words, bit stream order."""
    v = np.moveaxis(np.asarray(values, dtype=np.uint64), axis, -1)  # [..., n]
    n = v.shape[-1]
    assert n * bits % 32 == 0
    stream = (v[..., :, None] >> np.arange(bits, dtype=np.uint64)) & 1  # [..., n, bits]
    stream = stream.reshape(v.shape[:-1] + (n * bits // 32, 32))
    words = (stream << np.arange(32, dtype=np.uint64)).sum(axis=-1).astype(np.uint32)
    return np.moveaxis(words.view(np.int32), -1, axis)


def linear(rng, out, inp, a):
    bits, maxq = a.bits, (1 << a.bits) - 1
    G = inp if a.group_size == -1 else min(a.group_size, inp)
    L = -(-inp // G)
    q = rng.integers(0, maxq + 1, size=(inp, out))
    if a.sym:
        z = np.full((L, out), 1 << (bits - 1))
    else:
        z = rng.integers(0 if a.format == "v2" else 1, maxq + 1, size=(L, out))
    scales = rng.uniform(0.002, 0.05, size=(L, out)).astype(np.float16)
    if a.act_order:
        # As GPTQ's act-order: columns quantized in a random order, groups in that order.
        perm = rng.permutation(inp)
        g_idx = np.empty(inp, dtype=np.int32)
        g_idx[perm] = np.arange(inp) // G
    else:
        g_idx = (np.arange(inp) // G).astype(np.int32)
    stored_z = z if a.format == "v2" else z - 1
    tensors = {"qweight": pack_stream(q, bits, 0), "qzeros": pack_stream(stored_z, bits, 1),
               "scales": scales, "g_idx": g_idx}
    s = scales.astype(np.float32)[g_idx, :]                    # [in, out]
    w = (s * (q - z[g_idx, :]).astype(np.float32)).T          # [out, in]
    return tensors, np.ascontiguousarray(w.astype(np.float32))


def to_bf16_bits(x):
    return (np.asarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("expected")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--sym", action="store_true")
    p.add_argument("--format", choices=["v1", "v2"], default="v1")
    p.add_argument("--implicit-format", action="store_true", help="omit checkpoint_format (v1)")
    p.add_argument("--config", choices=["quantization_config", "quantize_config"],
                   default="quantization_config")
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.out_dir, exist_ok=True)

    tensors, expected = [], []
    tensors.append(("model.embed_tokens.weight",
                    rng.standard_normal((VOCAB, DIM)).astype(np.float16)))
    shapes = [("self_attn.q_proj", HEADS * HEAD_DIM, DIM),
              ("self_attn.k_proj", KV_HEADS * HEAD_DIM, DIM),
              ("self_attn.v_proj", KV_HEADS * HEAD_DIM, DIM),
              ("self_attn.o_proj", DIM, HEADS * HEAD_DIM),
              ("mlp.gate_proj", HIDDEN, DIM), ("mlp.up_proj", HIDDEN, DIM),
              ("mlp.down_proj", DIM, HIDDEN)]
    for l in range(LAYERS):
        pre = f"model.layers.{l}."
        norm_type = np.float32 if l == 0 else np.float16
        tensors.append((pre + "input_layernorm.weight",
                        (1 + 0.1 * rng.standard_normal(DIM)).astype(norm_type)))
        tensors.append((pre + "post_attention_layernorm.weight",
                        (1 + 0.1 * rng.standard_normal(DIM)).astype(norm_type)))
        for name, out, inp in shapes:
            parts, w = linear(rng, out, inp, a)
            for k, v in parts.items():
                tensors.append((f"{pre}{name}.{k}", v))
            expected.append((pre + name, w))
    tensors.append(("model.norm.weight", np.ones(DIM, dtype=np.float32)))
    tensors.append(("lm_head.weight",
                    to_bf16_bits(0.1 * rng.standard_normal((VOCAB, DIM)))))

    if a.shards == 1:
        write_safetensors(os.path.join(a.out_dir, "model.safetensors"), tensors)
    else:
        weight_map = {}
        for s in range(a.shards):
            file = f"model-{s + 1:05d}-of-{a.shards:05d}.safetensors"
            part = tensors[s::a.shards]
            write_safetensors(os.path.join(a.out_dir, file), part)
            weight_map.update({name: file for name, _ in part})
        with open(os.path.join(a.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    write_safetensors(a.expected, expected)

    quant = {"bits": a.bits, "group_size": a.group_size, "desc_act": a.act_order, "sym": a.sym,
             "damp_percent": 0.01, "true_sequential": True, "static_groups": False}
    if not a.implicit_format:
        quant["checkpoint_format"] = "gptq_v2" if a.format == "v2" else "gptq"
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": DIM, "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "vocab_size": VOCAB, "tie_word_embeddings": False, "torch_dtype": "float16"}
    if a.config == "quantization_config":
        config["quantization_config"] = dict(quant, quant_method="gptq")
    else:
        with open(os.path.join(a.out_dir, "quantize_config.json"), "w") as f:
            json.dump(quant, f, indent=2)
    with open(os.path.join(a.out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


if __name__ == "__main__":
    main()
