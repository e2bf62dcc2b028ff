"""Independent log-likelihood scorer over an independent float64 numpy forward of a GGUF
Llama model (gguf-py's dequantizers; the model of tests/model/numpy_forward.py): the
cross-check for `qalora eval`'s scoring. Each item's context runs once and all its continuations
in one masked batch on top of the context's K/V.

usage: numpy_scorer.py MODEL.gguf REQUESTS.json OUT.json
REQUESTS.json: {"items": [{"context": [ids], "continuations": [[ids], ...]}, ...]}
OUT.json:      {"loglik": [[per choice], ...]}: the sum of log p(continuation token | everything
before it) over each continuation, natural log.
Exit 3 when gguf/numpy are missing.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "model"))
from numpy_forward import Model, causal_mask, np  # noqa: E402 (exits 3 without gguf/numpy)


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
