// Tokenizers: SentencePiece-style BPE with byte fallback (GGUF `llama`, tokenizer.model,
// llama2.c tok*.bin) and GPT-2 byte-level BPE (GGUF `gpt2`, tokenizer.json). Every source is
// first read into TokenizerData, then one Tokenizer serves all of them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qalora {

// Token kinds, numbered as GGUF's tokenizer.ggml.token_type.
enum class TokenType : int32_t {
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
};

enum class TokenizerKind { SentencePiece, Gpt2 };

struct TokenizerData {
  TokenizerKind kind = TokenizerKind::SentencePiece;
  std::vector<std::string>
      tokens;  // piece text as stored (SPM uses U+2581 for space, GPT-2 the byte map)
  std::vector<float> scores;        // SentencePiece merge priorities (empty for GPT-2)
  std::vector<TokenType> types;     // same length as tokens
  std::vector<std::string> merges;  // GPT-2 merges "left right", highest priority first
  std::string pre;  // GPT-2 pre-tokenizer flavour: "gpt2", "llama3", "smollm", "qwen2", ...
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  int32_t unk_id = -1;
  int32_t pad_id = -1;  // -1: the tokenizer falls back to eos (or unk) for padding
  bool add_bos = true;
  bool add_eos = false;
  bool add_space_prefix = true;  // SentencePiece: prepend a space to the text
  std::string chat_template;     // Jinja source as found in the model, if any
};

class Tokenizer {
 public:
  explicit Tokenizer(TokenizerData data);  // validates; throws Error on inconsistent data
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // parse_special: text such as "<|im_start|>" that spells a control (or unknown) token becomes
  // that token (longest match first); otherwise it is tokenized as plain text. User-defined
  // tokens are always split out, as SentencePiece, Hugging Face and llama.cpp do. Never appends
  // EOS. SentencePiece: the space prefix goes before the text and after each special token.
  std::vector<int32_t> encode(std::string_view text, bool add_bos,
                              bool parse_special = false) const;
  // Exact inverse of encode (without BOS/EOS) for any valid UTF-8 text. Control tokens render
  // as their text unless skip_special; byte tokens give raw bytes, which may be partial UTF-8.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  int32_t vocab_size() const;
  const std::string& piece(int32_t id) const;  // raw stored piece
  TokenType type(int32_t id) const;
  int32_t bos_id() const;
  int32_t eos_id() const;
  int32_t pad_id() const;  // never -1: falls back to eos, then unk, then 0
  int32_t unk_id() const;
  bool add_bos() const;
  bool is_special(int32_t id) const;                 // control tokens (BOS/EOS/chat markers)
  int32_t find_token(std::string_view piece) const;  // -1 if absent
  const TokenizerData& data() const;

 private:
  friend class StreamDecoder;
  // Appends the text of one token. `segment_start` is true at the start and after a special
  // token, where SentencePiece's added space prefix is stripped; it is updated.
  void decode_append(int32_t id, bool skip_special, bool& segment_start, std::string& out) const;

  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Streaming decode for generation: returns the text that became complete with each new token
// (UTF-8 sequences split across byte tokens are held back until whole). The concatenation of
// every push() and the final flush() equals decode(ids, skip_special). O(1) work per token.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = false)
      : tok_(tok), skip_special_(skip_special) {}
  std::string push(int32_t id);  // throws Error for an id out of range
  std::string flush();           // whatever is held back, complete or not

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  bool segment_start_ = true;
  std::string pending_;  // decoded bytes not yet returned: an incomplete UTF-8 tail
};

// Readers for each on-disk source. Each throws Error naming the file and field on bad input.
TokenizerData read_llama2c_tokenizer(const std::filesystem::path& path, int32_t vocab_size);
TokenizerData read_sentencepiece_model(const std::filesystem::path& path);  // tokenizer.model
// tokenizer.json plus, when present beside it, tokenizer_config.json (bos/eos, add_bos, chat
// template) and generation_config.json.
TokenizerData read_hf_tokenizer(const std::filesystem::path& tokenizer_json);
// Writes tokenizer.json + tokenizer_config.json into `dir` (atomically), readable by
// read_hf_tokenizer and by Hugging Face `tokenizers`.
void write_hf_tokenizer(const TokenizerData& data, const std::filesystem::path& dir);

}  // namespace qalora
