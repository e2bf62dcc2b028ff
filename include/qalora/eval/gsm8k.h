// GSM8K (SPEC §7): k-shot chain-of-thought prompts, greedy generation until a stop sequence,
// and exact match of the final number, as lm-evaluation-harness's gsm8k task scores it.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qalora/eval/tasks.h"

namespace qalora {

class CachedSession;
class Tokenizer;
struct Prompt;

// "Question: <q>\nAnswer: <a>\n\n" per shot, then "Question: <q>\nAnswer:".
std::string gsm8k_prompt(std::span<const Gsm8kItem> shots, std::string_view question);

// The harness's answer normalisation: commas and "$" removed, a trailing "." dropped, spaces
// trimmed.
std::string gsm8k_normalize(std::string_view answer);
// The number after the first "####" (the reference's answer, and the "strict" match of a
// generation); nullopt when there is none.
std::optional<std::string> gsm8k_marked_number(std::string_view text);
// The last number in the text (the "flexible" match): digits with optional sign, "$", ","
// and "."; nullopt when there is none.
std::optional<std::string> gsm8k_last_number(std::string_view text);

struct Generation {
  std::string text;        // cut before the first stop sequence
  int64_t tokens = 0;      // generated tokens
  bool truncated = false;  // the prompt lost tokens on the left to fit the context
};

// Greedy generation after `prompt` (its shared prefix is computed once while consecutive
// prompts share it) until a stop sequence appears in the text, a token of `stop_tokens`, the
// cache is full, or max_new_tokens. A prompt that leaves fewer than max_new_tokens free
// positions loses tokens on its left.
Generation generate_until(CachedSession& cache, const Tokenizer& tok,
                          Prompt prompt, std::span<const std::string> stops,
                          std::span<const int32_t> stop_tokens, int64_t max_new_tokens);

}  // namespace qalora
