#include <string>

#include "qalora/tokenizer/bpe.h"
#include "qalora/tokenizer/unicode.h"

namespace qalora {

Gpt2Encoder::Gpt2Encoder(const TokenizerData& data, const PieceMap& pieces) {
  // validate_tokenizer_data has already checked the pre-tokenizer name and the merges.
  pre_tokenizer_from_name(data.pre, pre_);
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    unicode::append_utf8(ch, unicode::byte_to_gpt2_char(static_cast<uint8_t>(b)));
    const auto it = pieces.find(ch);
    byte_ids_[b] = it == pieces.end() ? -1 : it->second;
  }
  merges_.reserve(data.merges.size());
  std::string merged;
  for (size_t rank = 0; rank < data.merges.size(); ++rank) {
    std::string_view left, right;
    split_merge(data.merges[rank], left, right);
    merged.assign(left).append(right);
    // A repeated merge keeps its first (best) rank.
    merges_.emplace(key(pieces.find(left)->second, pieces.find(right)->second),
                    Merge{static_cast<int32_t>(rank), pieces.find(merged)->second});
  }
}

void Gpt2Encoder::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  std::vector<BpeSymbol> syms(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    const auto n = static_cast<int32_t>(i);
    syms[i] = {static_cast<uint32_t>(i), 1, byte_ids_[static_cast<uint8_t>(word[i])], n - 1, n + 1};
  }
  syms.back().next = -1;
  bpe_merge(
      syms,
      [&](const BpeSymbol& l, const BpeSymbol& r) -> std::optional<std::pair<double, int32_t>> {
        const auto it = merges_.find(key(l.id, r.id));
        if (it == merges_.end()) return std::nullopt;
        return std::pair<double, int32_t>{-static_cast<double>(it->second.rank), it->second.id};
      });
  // A byte without a piece (vocabularies often lack bytes that never occur in UTF-8) is dropped,
  // as Hugging Face's BPE does when it has no unk token.
  for (int32_t i = 0; i >= 0; i = syms[i].next)
    if (syms[i].id >= 0) out.push_back(syms[i].id);
}

void Gpt2Encoder::encode(std::string_view text, std::vector<int32_t>& out) const {
  // Natural text repeats few distinct words, so merging each distinct word once pays off.
  std::unordered_map<std::string_view, std::vector<int32_t>> cache;
  for (std::string_view word : pre_tokenize(text, pre_)) {
    auto [it, fresh] = cache.try_emplace(word);
    if (fresh) encode_word(word, it->second);
    out.insert(out.end(), it->second.begin(), it->second.end());
  }
}

}  // namespace qalora
