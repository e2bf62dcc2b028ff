// Internals shared by the tokenizer sources: the BPE merge loop, the two encoders, and the
// validation every reader and the Tokenizer constructor run on TokenizerData.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "qalora/tokenizer/pretokenize.h"
#include "qalora/tokenizer/tokenizer.h"

namespace qalora {

constexpr std::string_view kSpmSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// Throws Error naming `source` (a file path, or "tokenizer data") on inconsistent data: sizes,
// ids out of range, merges naming unknown pieces, an unknown pre-tokenizer.
void validate_tokenizer_data(const TokenizerData& data, std::string_view source);

// "<0x1F>" -> 0x1F; -1 when the piece is not a byte piece.
int parse_byte_piece(std::string_view piece);

// Splits a GPT-2 merge "left right" at its single space; false if it has none or several.
bool split_merge(std::string_view merge, std::string_view& left, std::string_view& right);

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using PieceMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

// A symbol of a word being merged: a byte range of the word and its current token id.
struct BpeSymbol {
  uint32_t begin, len;
  int32_t id;          // -1 when the range is not a token
  int32_t prev, next;  // neighbours in the live list, -1 at the ends
};

// Repeatedly merges the adjacent pair with the highest priority (ties: leftmost) until no pair
// merges. `pair(left, right)` returns {priority, merged id} or nothing. Uses a heap with lazy
// invalidation, so a word of n symbols costs O(n log n) rather than O(n^2).
template <typename PairFn>
void bpe_merge(std::vector<BpeSymbol>& syms, PairFn&& pair) {
  struct Candidate {
    double priority;
    int32_t left, right;
    uint32_t left_len, right_len;  // lengths when queued: a later change makes the entry stale
    int32_t id;
    bool operator<(const Candidate& o) const {
      return priority != o.priority ? priority < o.priority : left > o.left;
    }
  };
  std::priority_queue<Candidate> queue;
  const auto consider = [&](int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    if (const auto m = pair(syms[l], syms[r]))
      queue.push({m->first, l, r, syms[l].len, syms[r].len, m->second});
  };
  for (size_t i = 0; i + 1 < syms.size(); ++i)
    consider(static_cast<int32_t>(i), static_cast<int32_t>(i + 1));
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    BpeSymbol& l = syms[c.left];
    BpeSymbol& r = syms[c.right];
    if (l.len != c.left_len || r.len != c.right_len || l.next != c.right) continue;
    l.len += r.len;
    l.id = c.id;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.left;
    r.len = 0;  // dead: stale entries naming it fail the length check
    consider(l.prev, c.left);
    consider(c.left, l.next);
  }
}

// SentencePiece BPE: score-ordered merges of code points, byte fallback, unk last.
class SpmEncoder {
 public:
  explicit SpmEncoder(const TokenizerData& data);
  // Encodes one text fragment (no special tokens inside); `space_prefix` prepends U+2581.
  void encode(std::string_view text, bool space_prefix, std::vector<int32_t>& out) const;

 private:
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  const TokenizerData& data_;
  PieceMap mergeable_;  // pieces a merge may produce: normal, user-defined, unused
  std::array<int32_t, 256> byte_ids_{};
  bool split_words_ = false;  // no piece spans a word start, so words can be merged one by one
};

// GPT-2 byte-level BPE: pre-tokenize, map bytes to printable characters, merge by rank.
class Gpt2Encoder {
 public:
  Gpt2Encoder(const TokenizerData& data, const PieceMap& pieces);
  void encode(std::string_view text, std::vector<int32_t>& out) const;

 private:
  struct Merge {
    int32_t rank, id;
  };
  static uint64_t key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  PreTokenizer pre_ = PreTokenizer::Gpt2;
  std::unordered_map<uint64_t, Merge> merges_;
  std::array<int32_t, 256> byte_ids_{};  // token of each byte's mapped character, or -1
};

}  // namespace qalora
