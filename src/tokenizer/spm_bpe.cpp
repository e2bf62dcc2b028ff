#include <string>

#include "qalora/tokenizer/bpe.h"
#include "qalora/tokenizer/unicode.h"

namespace qalora {

SpmEncoder::SpmEncoder(const TokenizerData& data) : data_(data) {
  byte_ids_.fill(-1);
  for (size_t i = 0; i < data.tokens.size(); ++i) {
    const auto id = static_cast<int32_t>(i);
    switch (data.types[i]) {
      case TokenType::Normal:
      case TokenType::UserDefined:
      case TokenType::Unused:
        mergeable_.emplace(data.tokens[i], id);  // keeps the first id of a duplicated piece
        break;
      case TokenType::Byte:
        if (const int b = parse_byte_piece(data.tokens[i]); b >= 0 && byte_ids_[b] < 0)
          byte_ids_[b] = id;
        break;
      default:
        break;
    }
  }
  // A piece with U+2581 after another character (e.g. from treat_whitespace_as_suffix) can span
  // word starts; then the text is merged as a whole.
  split_words_ = true;
  for (const auto& [piece, id] : mergeable_) {
    const std::string_view p = piece;
    for (size_t pos = p.find(kSpmSpace, 1); pos != std::string_view::npos;
         pos = p.find(kSpmSpace, pos + 1))
      if (pos < kSpmSpace.size() || p.substr(pos - kSpmSpace.size(), kSpmSpace.size()) != kSpmSpace)
        split_words_ = false;
  }
}

void SpmEncoder::encode(std::string_view text, bool space_prefix, std::vector<int32_t>& out) const {
  std::string norm;
  norm.reserve(text.size() + 16);
  if (space_prefix) norm += kSpmSpace;
  for (char c : text) {
    if (c == ' ')
      norm += kSpmSpace;
    else
      norm += c;
  }
  if (!split_words_) {
    encode_word(norm, out);
    return;
  }
  // Words start at a U+2581 that follows another character; no piece crosses that boundary,
  // so words merge independently, and each distinct word only once.
  std::unordered_map<std::string_view, std::vector<int32_t>> cache;
  const std::string_view all = norm;
  size_t start = 0;
  const auto flush = [&](size_t end) {
    if (end == start) return;
    auto [it, fresh] = cache.try_emplace(all.substr(start, end - start));
    if (fresh) encode_word(it->first, it->second);
    out.insert(out.end(), it->second.begin(), it->second.end());
    start = end;
  };
  for (size_t pos = all.find(kSpmSpace, 1); pos != std::string_view::npos;
       pos = all.find(kSpmSpace, pos + 1))
    if (all.substr(pos - kSpmSpace.size(), kSpmSpace.size()) != kSpmSpace) flush(pos);
  flush(all.size());
}

void SpmEncoder::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  const auto find = [&](uint32_t begin, uint32_t len) -> int32_t {
    const auto it = mergeable_.find(word.substr(begin, len));
    return it == mergeable_.end() ? -1 : it->second;
  };
  std::vector<BpeSymbol> syms;
  for (const unicode::CodePoint& cp : unicode::decode_utf8(word)) {
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({cp.offset, cp.len, find(cp.offset, cp.len), n - 1, n + 1});
  }
  if (syms.empty()) return;
  syms.back().next = -1;

  bpe_merge(
      syms,
      [&](const BpeSymbol& l, const BpeSymbol& r) -> std::optional<std::pair<double, int32_t>> {
        const int32_t id = find(l.begin, l.len + r.len);
        if (id < 0) return std::nullopt;
        return std::pair<double, int32_t>{data_.scores[id], id};
      });

  for (int32_t i = 0; i >= 0; i = syms[i].next) {
    const BpeSymbol& s = syms[i];
    if (s.id >= 0) {
      out.push_back(s.id);
      continue;
    }
    // Not a piece: spell it as byte tokens, or as unk when the vocabulary has no byte pieces.
    bool all_bytes = true;
    for (uint32_t k = 0; k < s.len; ++k)
      all_bytes = all_bytes && byte_ids_[static_cast<uint8_t>(word[s.begin + k])] >= 0;
    if (!all_bytes) {
      if (data_.unk_id >= 0) out.push_back(data_.unk_id);
      continue;
    }
    for (uint32_t k = 0; k < s.len; ++k)
      out.push_back(byte_ids_[static_cast<uint8_t>(word[s.begin + k])]);
  }
}

}  // namespace qalora
