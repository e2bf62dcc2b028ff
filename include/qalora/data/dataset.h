// Training data (SPEC §6): files of instruction, chat or plain-text examples become token
// sequences with a loss mask, and batches are drawn from them in a resumable order.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qalora/model/chat.h"
#include "qalora/tokenizer/tokenizer.h"

namespace qalora {

enum class DataFormat { Auto, Alpaca, InputOutput, Chat, ShareGpt, Text };
const char* data_format_name(DataFormat f);  // "auto", "alpaca", "io", "chat", "sharegpt", "text"
DataFormat parse_data_format(std::string_view name);  // throws Error listing the names

// One training sequence. target[t] = 1 when tokens[t] is predicted by the loss (the logits at
// position t - 1 are scored against it); target[0] is always 0.
struct Example {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> target;
  int64_t target_count() const;
};

struct DataOptions {
  DataFormat format = DataFormat::Auto;  // Auto: from the extension and the first record
  bool train_on_source = false;          // also train on prompt tokens (chat: on every token)
  int64_t source_max_len = 1024;         // prompt tokens kept (truncated from the left, BOS stays)
  int64_t target_max_len = 256;          // response tokens kept (truncated on the right)
  int64_t max_seq_len = 512;             // text: window length; all formats: hard cap
  std::optional<ChatFormat> chat_template;  // chat/sharegpt: none = the model's own template
};

// The options as train_config.json records them ({"format", "train_on_source", "source_max_len",
// "target_max_len", "max_seq_len", "chat_template": a name or "model"}), and back; fields
// missing from the JSON keep their defaults, unknown names throw Error.
nlohmann::json data_options_to_json(const DataOptions& options);
DataOptions data_options_from_json(const nlohmann::json& json);

struct DataStats {
  int64_t records = 0;    // records (text: windows) read from the file, skipped ones included
  int64_t truncated = 0;  // shortened to fit the limits
  int64_t skipped = 0;    // dropped: nothing left to train on (empty response, ...)
  int64_t tokens = 0;
  int64_t target_tokens = 0;
  // "999 records, 12 truncated, 0 skipped, 151234 tokens (40321 trained)"
  std::string summary() const;
};

struct Dataset {
  std::filesystem::path source;
  DataFormat format = DataFormat::Auto;  // as resolved
  std::vector<Example> examples;
  DataStats stats;
};

// Reads and tokenizes `path`: a JSON array or JSON lines (one object per line, blank lines
// allowed), or plain text. Auto detection: a .txt file is text; otherwise the first record's
// keys decide: instruction = alpaca, messages = chat, conversations = sharegpt, input and
// output = io.
//
// alpaca {instruction, input?, output, history?} and io {input, output}: source = BOS (when the
// tokenizer adds one) + the prompt, target = the response + EOS, tokenized separately as the
// QLoRA reference does. The alpaca prompt is SPEC §6's template; `history`
// ([[user, assistant], ...] earlier turns) goes between its preamble and the final
// instruction, each turn as "### Instruction:\n{user}\n\n### Response: {assistant}\n\n", with
// loss only on the final response unless train_on_source. The io prompt is `input` verbatim.
// Limits: the source keeps its last source_max_len tokens, the target its first target_max_len;
// beyond max_seq_len the source loses tokens from its left (after BOS), then the target from
// its right. Records with an empty response are skipped.
//
// chat {messages: [{role, content}]} (system, user, assistant) and sharegpt
// {conversations: [{from, value}]} (system, human/user, gpt/assistant): the conversation is
// rendered with options.chat_template or the model's template and encoded whole with special
// tokens parsed (no BOS beyond what the template writes), as the chat command encodes it. The
// targets are each assistant turn's content and its end-of-turn marker (e.g. "<|im_end|>"):
// the tokens that start inside the text rendering the turn adds after the generation prompt,
// up to the last stop token there. A system message may only come first. Only max_seq_len
// applies (the right end is cut).
//
// text: the file is tokenized whole and cut into consecutive windows of max_seq_len tokens,
// each BOS (when the tokenizer adds one) + max_seq_len - 1 text tokens; every token but the
// first is a target; a final window shorter than 2 tokens is dropped.
//
// Errors are one line naming the file and line (JSON lines) or record number (JSON array,
// 1-based; malformed JSON there reports the line): malformed JSON, a missing or mistyped
// field, an unknown role, no examples, an unreadable file, no chat template.
Dataset load_dataset(const std::filesystem::path& path, const Tokenizer& tok,
                     const DataOptions& options);

// Moves a seeded random `fraction` (in [0, 1)) of `data`'s examples into the returned
// held-out set: round(fraction * n), at least one when fraction > 0 and n >= 2, and never all.
// Both sets keep the file order. records/tokens/target_tokens of both stats are recounted;
// truncated and skipped stay with `data`.
Dataset split_heldout(Dataset& data, double fraction, uint64_t seed);

// Where a Batcher stands; saved in checkpoints so that a resumed run sees the same batches.
struct BatcherState {
  int64_t epoch = 0;
  int64_t position = 0;  // next index into the epoch's order
};

// Batches of example indices. Each epoch is a seeded permutation of all examples (seed and
// epoch determine it, independently of the platform's standard library); with
// group_by_length, as Hugging Face's length-grouped sampler, megabatches of 50 * batch_size
// consecutive indices are sorted by length, longest first (ties keep the permutation's order),
// so a batch holds sequences of similar length. The last short batch of an epoch is kept.
// `data` must outlive the Batcher.
class Batcher {
 public:
  Batcher(const Dataset& data, int64_t batch_size, bool group_by_length, uint64_t seed);
  // The next batch; moves to the next epoch when the current one is exhausted.
  std::vector<int64_t> next();
  int64_t batches_per_epoch() const;
  const BatcherState& state() const { return state_; }
  // Throws Error unless epoch >= 0 and position is a batch boundary within the epoch.
  void restore(const BatcherState& state);

 private:
  void build_order();
  const Dataset& data_;
  int64_t batch_size_;
  bool group_by_length_;
  uint64_t seed_;
  BatcherState state_;
  std::vector<int64_t> order_;  // of state_.epoch
};

}  // namespace qalora
