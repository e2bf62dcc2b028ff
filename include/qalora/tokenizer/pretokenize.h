// GPT-2-family pre-tokenizers: the split regexes of GPT-2, Llama-3 and Qwen2, and SmolLM's
// digit isolation, implemented by hand over Unicode categories (no regex library).
#pragma once

#include <string_view>
#include <vector>

namespace qalora {

enum class PreTokenizer {
  Gpt2,    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  Llama3,  // (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
           // ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  Qwen2,   // Llama3 with \p{N} taken one at a time
  SmolLm,  // every \p{N} is its own piece, then the Gpt2 split on the rest
};

// Maps GGUF's tokenizer.ggml.pre names; returns false for a name it does not know.
bool pre_tokenizer_from_name(std::string_view name, PreTokenizer& out);
// The canonical name written back out ("gpt2", "llama3", "qwen2", "smollm").
const char* pre_tokenizer_name(PreTokenizer pre);
// The split regex as Hugging Face `tokenizers` spells it (SmolLm: the Gpt2 one after Digits).
const char* pre_tokenizer_regex(PreTokenizer pre);

// Splits text into consecutive, non-empty pieces covering it exactly.
std::vector<std::string_view> pre_tokenize(std::string_view text, PreTokenizer pre);

}  // namespace qalora
