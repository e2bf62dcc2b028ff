#!/usr/bin/env python3
"""Independent reference tokenizations for the C++ tokenizer tests.

  spm   MODEL STRINGS.json OUT.json        ids from the `sentencepiece` library (no BOS)
  hf    TOKENIZER.json STRINGS.json OUT.json   ids from Hugging Face `tokenizers` (no BOS)
        and the text it decodes them back to
  pre   FLAVOUR STRINGS.json OUT.json      pre-token strings from `tokenizers` pre-tokenizers

Exits with status 3 and a one-line message when a needed package is missing.
"""
import json
import sys

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def need(module):
    try:
        return __import__(module)
    except ImportError:
        print(f"python package '{module}' is not installed (pip install {module})", file=sys.stderr)
        sys.exit(3)


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False)


def spm(model, strings):
    sp = need("sentencepiece").SentencePieceProcessor(model_file=model)
    return [sp.encode(s) for s in strings]


def hf(tokenizer_json, strings):
    tok = need("tokenizers").Tokenizer.from_file(tokenizer_json)
    out = []
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False).ids
        out.append({"ids": ids, "text": tok.decode(ids, skip_special_tokens=False)})
    return out


def pre(flavour, strings):
    pt = need("tokenizers").pre_tokenizers
    split = lambda regex: pt.Split(need("tokenizers").Regex(regex), behavior="isolated")
    chain = {
        "gpt2": [split(GPT2_REGEX)],
        "llama3": [split(LLAMA3_REGEX)],
        "qwen2": [split(QWEN2_REGEX)],
        "smollm": [pt.Digits(individual_digits=True), split(GPT2_REGEX)],
    }[flavour]
    seq = pt.Sequence(chain)
    return [[piece for piece, _ in seq.pre_tokenize_str(s)] for s in strings]


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {"spm": spm, "hf": hf, "pre": pre}[cmd]
    save(args[2], fn(args[0], load(args[1])))


if __name__ == "__main__":
    main()
