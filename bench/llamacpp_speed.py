#!/usr/bin/env python3
"""Prefill and decode speed of llama.cpp (llama-cpp-python) on a GGUF, measured the way
`qalora bench` measures ours: a 256-token prompt, then 64 tokens decoded one at a time, best
of 3 runs. Run it from a throw-away venv beside `qalora bench -m MODEL --prompt-tokens 256
--gen-tokens 64 --reps 3`, alternating, on an otherwise idle machine.

usage: llamacpp_speed.py MODEL.gguf [THREADS]
"""
import sys
import time

from llama_cpp import Llama


def main() -> None:
    model = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=512,
                verbose=False)
    prompt = list(range(100, 356))  # 256 tokens
    best_prefill = best_decode = 0.0
    for _ in range(3):
        llm.reset()
        t = time.time()
        llm.eval(prompt)
        best_prefill = max(best_prefill, len(prompt) / (time.time() - t))
        t = time.time()
        for i in range(64):
            llm.eval([1000 + i])
        best_decode = max(best_decode, 64 / (time.time() - t))
    print(f"llama.cpp prefill {best_prefill:.1f} tok/s, decode {best_decode:.1f} tok/s")


if __name__ == "__main__":
    main()
