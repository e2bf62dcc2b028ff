"""Independent Llama forward pass in float64 numpy over a GGUF file, read and dequantized by
gguf-py: the cross-check for qalora's loader + runtime on a real model. `Model` is also imported
by tests/eval/numpy_scorer.py.

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


class Model:
    def __init__(self, path):
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
        self.n_layers = int(field(f"{arch}.block_count"))
        self.n_heads = int(field(f"{arch}.attention.head_count"))
        self.n_kv = int(field(f"{arch}.attention.head_count_kv"))
        self.eps = float(field(f"{arch}.attention.layer_norm_rms_epsilon"))
        key = f"{arch}.rope.freq_base"
        self.theta = float(field(key)) if key in reader.fields else 10000.0
        self.emb = weight("token_embd.weight")
        self.head = weight("output.weight") if "output.weight" in tensors else self.emb
        self.out_norm = weight("output_norm.weight")
        self.hd = self.emb.shape[1] // self.n_heads
        names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                 "ffn_gate", "ffn_up", "ffn_down"]
        self.layers = [{n: weight(f"blk.{l}.{n}.weight") for n in names}
                       for l in range(self.n_layers)]

    def rmsnorm(self, x, w):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, positions):  # x [T, heads, hd]; GGUF rotates adjacent pairs (2i, 2i+1)
        inv = self.theta ** (-np.arange(0, self.hd, 2) / self.hd)
        ang = positions[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        y = np.empty_like(x)
        y[..., 0::2] = a * cos - b * sin
        y[..., 1::2] = a * sin + b * cos
        return y

    def forward(self, ids, cache, positions, mask):
        """Feeds ids at `positions` after the cached keys; mask [T, cached + T] is added to the
        attention scores. Returns (logits [T, vocab], the cache with these keys appended)."""
        T = len(ids)
        positions = np.asarray(positions, dtype=np.float64)
        x = self.emb[ids]
        new_cache = []
        group = self.n_heads // self.n_kv
        for l, w in enumerate(self.layers):
            h = self.rmsnorm(x, w["attn_norm"])
            q = self.rope((h @ w["attn_q"].T).reshape(T, self.n_heads, self.hd), positions)
            k = self.rope((h @ w["attn_k"].T).reshape(T, self.n_kv, self.hd), positions)
            v = (h @ w["attn_v"].T).reshape(T, self.n_kv, self.hd)
            if cache is not None:
                k = np.concatenate([cache[l][0], k])
                v = np.concatenate([cache[l][1], v])
            new_cache.append((k, v))
            att = np.empty((T, self.n_heads, self.hd))
            for hh in range(self.n_heads):
                s = q[:, hh] @ k[:, hh // group].T / np.sqrt(self.hd) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                att[:, hh] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, hh // group]
            x = x + att.reshape(T, -1) @ w["attn_output"].T
            h = self.rmsnorm(x, w["ffn_norm"])
            g = h @ w["ffn_gate"].T
            u = h @ w["ffn_up"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ w["ffn_down"].T
        return self.rmsnorm(x, self.out_norm) @ self.head.T, new_cache


def causal_mask(rows, cols):
    """Row t sees columns 0 .. cols - rows + t."""
    return np.triu(np.full((rows, cols), -np.inf), k=cols - rows + 1)


def main():
    path, out, ids = sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]]
    T = len(ids)
    logits, _ = Model(path).forward(ids, None, np.arange(T), causal_mask(T, T))
    with open(out, "w") as f:
        json.dump({"logits": logits[-1].tolist()}, f)


if __name__ == "__main__":
    main()
