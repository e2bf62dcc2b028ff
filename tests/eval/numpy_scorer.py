"""Independent log-likelihood scorer over an independent float64 numpy forward of a GGUF
Llama model (gguf-py's dequantizers): the cross-check for `qalora eval`'s scoring. Same model
math as tests/model/numpy_forward.py, restructured to load the weights once, to compute each
item's context once and all its continuations in one masked batch on top of the context's K/V.

usage: numpy_scorer.py MODEL.gguf REQUESTS.json OUT.json
REQUESTS.json: {"items": [{"context": [ids], "continuations": [[ids], ...]}, ...]}
OUT.json:      {"loglik": [[per choice], ...]}: the sum of log p(continuation token | everything
before it) over each continuation, natural log.
Exit 3 when gguf/numpy are missing.
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


def log_softmax(logits):
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def main():
    model_path, requests_path, out_path = sys.argv[1:4]
    model = Model(model_path)
    with open(requests_path) as f:
        items = json.load(f)["items"]
    out = []
    for item in items:
        # The context once; then every continuation (but its last token) in one batch on top of
        # the context's K/V, each continuation seeing only the context and itself.
        ctx = item["context"]
        n = len(ctx)
        ctx_logits, cache = model.forward(ctx, None, np.arange(n), causal_mask(n, n))
        last = log_softmax(ctx_logits[-1])
        fed = [c[:-1] for c in item["continuations"]]
        total = sum(len(f) for f in fed)
        if total > 0:
            ids, positions = [], []
            mask = np.full((total, n + total), -np.inf)
            mask[:, :n] = 0
            start = 0
            for f in fed:
                ids.extend(f)
                positions.extend(range(n, n + len(f)))
                mask[start:start + len(f), n + start:n + start + len(f)] = causal_mask(len(f), len(f))
                start += len(f)
            logits = log_softmax(model.forward(ids, cache, positions, mask)[0])
        start = 0
        scores = []
        for cont, f in zip(item["continuations"], fed):
            rows = [last] + [logits[start + i] for i in range(len(f))]
            start += len(f)
            scores.append(float(sum(row[t] for row, t in zip(rows, cont))))
        out.append(scores)
    with open(out_path, "w") as f:
        json.dump({"loglik": out}, f)


if __name__ == "__main__":
    main()
