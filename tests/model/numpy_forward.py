"""Independent Llama forward pass in float64 numpy over a GGUF file, read and dequantized by
gguf-py: the cross-check for qalora's loader + runtime on a real model.

usage: numpy_forward.py MODEL.gguf OUT.json ID [ID ...]
Writes {"logits": [...]} for the last position. Exit 3 when gguf/numpy are missing.
"""
import json
import sys

try:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
except ImportError as e:  # reported as a skip by the C++ test
    print(f"missing python package: {e}", file=sys.stderr)
    sys.exit(3)


def main():
    path, out, ids = sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]]
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}

    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]][0]

    def weight(name):
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        return w.reshape([int(d) for d in reversed(t.shape)])  # row-major [out, in]

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_layers = int(field(f"{arch}.block_count"))
    n_heads = int(field(f"{arch}.attention.head_count"))
    n_kv = int(field(f"{arch}.attention.head_count_kv"))
    eps = float(field(f"{arch}.attention.layer_norm_rms_epsilon"))
    theta = float(field(f"{arch}.rope.freq_base")) if f"{arch}.rope.freq_base" in reader.fields else 10000.0

    emb = weight("token_embd.weight")
    head = weight("output.weight") if "output.weight" in tensors else emb
    dim = emb.shape[1]
    hd = dim // n_heads
    T = len(ids)

    def rmsnorm(x, w):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w

    # GGUF llama stores q/k rows so that RoPE rotates adjacent pairs (2i, 2i+1).
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):  # x [T, heads, hd]
        a, b = x[..., 0::2], x[..., 1::2]
        y = np.empty_like(x)
        y[..., 0::2] = a * cos - b * sin
        y[..., 1::2] = a * sin + b * cos
        return y

    x = emb[ids]
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for l in range(n_layers):
        p = f"blk.{l}."
        h = rmsnorm(x, weight(p + "attn_norm.weight"))
        q = rope((h @ weight(p + "attn_q.weight").T).reshape(T, n_heads, hd))
        k = rope((h @ weight(p + "attn_k.weight").T).reshape(T, n_kv, hd))
        v = (h @ weight(p + "attn_v.weight").T).reshape(T, n_kv, hd)
        group = n_heads // n_kv
        att = np.empty((T, n_heads, hd))
        for hh in range(n_heads):
            s = q[:, hh] @ k[:, hh // group].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=-1, keepdims=True))
            att[:, hh] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, hh // group]
        x = x + att.reshape(T, -1) @ weight(p + "attn_output.weight").T
        h = rmsnorm(x, weight(p + "ffn_norm.weight"))
        g = h @ weight(p + "ffn_gate.weight").T
        u = h @ weight(p + "ffn_up.weight").T
        x = x + (g / (1 + np.exp(-g)) * u) @ weight(p + "ffn_down.weight").T
    logits = rmsnorm(x[-1], weight("output_norm.weight")) @ head.T
    with open(out, "w") as f:
        json.dump({"logits": logits.tolist()}, f)


if __name__ == "__main__":
    main()
