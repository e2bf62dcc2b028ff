#include "qalora/tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <optional>

#include "qalora/core/error.h"
#include "qalora/tokenizer/bpe.h"
#include "qalora/tokenizer/unicode.h"

namespace qalora {
namespace {

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    if (s.substr(i, from.size()) == from) {
      out += to;
      i += from.size();
    } else {
      out += s[i++];
    }
  }
  return out;
}

// Text that a special token stands for, as matched in encode and produced by decode.
bool splits_out(TokenType t) {
  return t == TokenType::Control || t == TokenType::Unknown || t == TokenType::UserDefined;
}

const char* type_name(TokenizerKind kind) {
  return kind == TokenizerKind::SentencePiece ? "SentencePiece" : "GPT-2";
}

}  // namespace

int parse_byte_piece(std::string_view piece) {
  if (piece.size() != 6 || !piece.starts_with("<0x") || piece[5] != '>') return -1;
  int value = 0;
  for (char c : piece.substr(3, 2)) {
    int digit;
    if (c >= '0' && c <= '9')
      digit = c - '0';
    else if (c >= 'A' && c <= 'F')
      digit = c - 'A' + 10;
    else if (c >= 'a' && c <= 'f')
      digit = c - 'a' + 10;
    else
      return -1;
    value = value * 16 + digit;
  }
  return value;
}

bool split_merge(std::string_view merge, std::string_view& left, std::string_view& right) {
  const size_t space = merge.find(' ');
  if (space == std::string_view::npos || space == 0 || space + 1 == merge.size() ||
      merge.find(' ', space + 1) != std::string_view::npos)
    return false;
  left = merge.substr(0, space);
  right = merge.substr(space + 1);
  return true;
}

void validate_tokenizer_data(const TokenizerData& data, std::string_view source) {
  const size_t n = data.tokens.size();
  QL_CHECK(n > 0, source, ": tokens: expected at least one piece, got 0");
  QL_CHECK(n < (size_t{1} << 31), source, ": tokens: expected fewer than 2^31 pieces, got ", n);
  QL_CHECK(data.types.size() == n, source, ": token types: expected ", n,
           " entries (one per token), got ", data.types.size());
  if (data.kind == TokenizerKind::SentencePiece || !data.scores.empty())
    QL_CHECK(data.scores.size() == n, source, ": scores: expected ", n,
             " entries (one per token), got ", data.scores.size());
  for (size_t i = 0; i < n; ++i) {
    const auto t = static_cast<int32_t>(data.types[i]);
    QL_CHECK(t >= 1 && t <= 6, source, ": token types[", i, "]: expected 1..6, got ", t);
  }
  const std::pair<const char*, int32_t> ids[] = {{"bos_id", data.bos_id},
                                                 {"eos_id", data.eos_id},
                                                 {"unk_id", data.unk_id},
                                                 {"pad_id", data.pad_id}};
  for (const auto& [name, id] : ids)
    QL_CHECK(id >= -1 && id < static_cast<int64_t>(n), source, ": ", name,
             ": expected -1 or an id below ", n, ", got ", id);
  if (data.kind != TokenizerKind::Gpt2) return;

  PreTokenizer pre;
  QL_CHECK(pre_tokenizer_from_name(data.pre, pre), source,
           ": pre-tokenizer: expected one of gpt2, llama3, ",
           "llama-bpe, qwen2, smollm, starcoder, got \"", data.pre, "\"");
  PieceMap pieces;
  pieces.reserve(n);
  for (size_t i = 0; i < n; ++i) pieces.emplace(data.tokens[i], static_cast<int32_t>(i));
  std::string merged;
  for (size_t i = 0; i < data.merges.size(); ++i) {
    std::string_view left, right;
    QL_CHECK(split_merge(data.merges[i], left, right), source, ": merges[", i,
             "]: expected \"left right\" with one space, got \"", data.merges[i], "\"");
    for (std::string_view part : {left, right})
      QL_CHECK(pieces.contains(part), source, ": merges[", i, "] = \"", data.merges[i],
               "\": piece \"", part, "\" is not in the vocabulary");
    merged.assign(left).append(right);
    QL_CHECK(pieces.contains(merged), source, ": merges[", i, "] = \"", data.merges[i],
             "\": merged piece \"", merged, "\" is not in the vocabulary");
  }
}

struct Tokenizer::Impl {
  TokenizerData data;
  PieceMap pieces;                // piece -> first id
  std::vector<std::string> text;  // what each token decodes to (before the prefix strip)
  std::optional<SpmEncoder> spm;
  std::optional<Gpt2Encoder> gpt2;
  struct Special {
    std::string_view text;
    int32_t id;
    bool always;  // user-defined: split out even without parse_special
  };
  std::array<std::vector<Special>, 256> specials;  // by first byte, longest first
  bool any_always = false;

  explicit Impl(TokenizerData d) : data(std::move(d)) {
    const size_t n = data.tokens.size();
    pieces.reserve(n);
    text.resize(n);
    const bool spm_kind = data.kind == TokenizerKind::SentencePiece;
    for (size_t i = 0; i < n; ++i) {
      const auto id = static_cast<int32_t>(i);
      const std::string& piece = data.tokens[i];
      pieces.emplace(piece, id);
      const TokenType type = data.types[i];
      if (splits_out(type) || spm_kind) {
        text[i] = spm_kind ? replace_all(piece, kSpmSpace, " ") : piece;
        if (const int b = parse_byte_piece(piece); spm_kind && type == TokenType::Byte && b >= 0)
          text[i] = std::string(1, static_cast<char>(b));
      } else {
        for (const unicode::CodePoint& cp : unicode::decode_utf8(piece)) {
          const int b = unicode::gpt2_char_to_byte(cp.cp);
          if (b >= 0)
            text[i] += static_cast<char>(b);
          else
            text[i] += piece.substr(cp.offset, cp.len);  // not a byte-level piece: keep as is
        }
      }
    }
    for (size_t i = 0; i < n; ++i) {
      if (!splits_out(data.types[i]) || text[i].empty()) continue;
      const bool always = data.types[i] == TokenType::UserDefined;
      specials[static_cast<uint8_t>(text[i][0])].push_back(
          {text[i], static_cast<int32_t>(i), always});
      any_always = any_always || always;
    }
    for (auto& list : specials)
      std::stable_sort(list.begin(), list.end(), [](const Special& a, const Special& b) {
        return a.text.size() > b.text.size();
      });
    if (spm_kind)
      spm.emplace(data);
    else
      gpt2.emplace(data, pieces);
  }

  // The special token spelled at text[pos], longest match, or nullptr.
  const Special* special_at(std::string_view s, size_t pos, bool parse_special) const {
    for (const Special& sp : specials[static_cast<uint8_t>(s[pos])])
      if ((parse_special || sp.always) && s.substr(pos, sp.text.size()) == sp.text) return &sp;
    return nullptr;
  }
};

Tokenizer::Tokenizer(TokenizerData data) {
  validate_tokenizer_data(data, "tokenizer data");
  impl_ = std::make_unique<Impl>(std::move(data));
}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_bos,
                                       bool parse_special) const {
  const Impl& m = *impl_;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && m.data.bos_id >= 0) out.push_back(m.data.bos_id);
  bool after_special = true;  // SentencePiece prefixes a space at the start and after specials
  const auto encode_text = [&](std::string_view fragment) {
    if (fragment.empty()) return;
    if (m.spm)
      m.spm->encode(fragment, after_special && m.data.add_space_prefix, out);
    else
      m.gpt2->encode(fragment, out);
    after_special = false;
  };
  size_t start = 0;
  if (parse_special || m.any_always) {
    for (size_t i = 0; i < text.size();) {
      const Impl::Special* sp = m.special_at(text, i, parse_special);
      if (!sp) {
        ++i;
        continue;
      }
      encode_text(text.substr(start, i - start));
      out.push_back(sp->id);
      after_special = true;
      i += sp->text.size();
      start = i;
    }
  }
  encode_text(text.substr(start));
  return out;
}

void Tokenizer::decode_append(int32_t id, bool skip_special, bool& segment_start,
                              std::string& out) const {
  const Impl& m = *impl_;
  QL_CHECK(id >= 0 && id < vocab_size(), "decode: token id ", id, " is out of range: expected 0..",
           vocab_size() - 1, " for this ", type_name(m.data.kind), " vocabulary");
  const TokenType type = m.data.types[id];
  if (splits_out(type)) {
    if (!(skip_special && is_special(id))) out += m.text[id];
    segment_start = true;
    return;
  }
  std::string_view text = m.text[id];
  if (segment_start && m.spm && m.data.add_space_prefix && type != TokenType::Byte &&
      text.starts_with(' '))
    text.remove_prefix(1);
  out += text;
  segment_start = false;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string out;
  bool segment_start = true;
  for (int32_t id : ids) decode_append(id, skip_special, segment_start, out);
  return out;
}

int32_t Tokenizer::vocab_size() const {
  return static_cast<int32_t>(impl_->data.tokens.size());
}

const std::string& Tokenizer::piece(int32_t id) const {
  QL_CHECK(id >= 0 && id < vocab_size(), "tokenizer: token id ", id,
           " is out of range: expected 0..", vocab_size() - 1);
  return impl_->data.tokens[id];
}

TokenType Tokenizer::type(int32_t id) const {
  QL_CHECK(id >= 0 && id < vocab_size(), "tokenizer: token id ", id,
           " is out of range: expected 0..", vocab_size() - 1);
  return impl_->data.types[id];
}

int32_t Tokenizer::bos_id() const {
  return impl_->data.bos_id;
}
int32_t Tokenizer::eos_id() const {
  return impl_->data.eos_id;
}
int32_t Tokenizer::unk_id() const {
  return impl_->data.unk_id;
}
int32_t Tokenizer::pad_id() const {
  const TokenizerData& d = impl_->data;
  for (int32_t id : {d.pad_id, d.eos_id, d.unk_id})
    if (id >= 0) return id;
  return 0;
}
bool Tokenizer::add_bos() const {
  return impl_->data.add_bos;
}
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size() && impl_->data.types[id] == TokenType::Control;
}
int32_t Tokenizer::find_token(std::string_view piece) const {
  const auto it = impl_->pieces.find(piece);
  return it == impl_->pieces.end() ? -1 : it->second;
}
const TokenizerData& Tokenizer::data() const {
  return impl_->data;
}

std::string StreamDecoder::push(int32_t id) {
  tok_.decode_append(id, skip_special_, segment_start_, pending_);
  // Hold back a trailing lead byte whose continuation bytes have not all arrived yet; anything
  // else (complete or hopelessly ill-formed) goes out now.
  size_t keep = 0;
  for (size_t back = 1; back <= std::min<size_t>(3, pending_.size()); ++back) {
    const auto b = static_cast<uint8_t>(pending_[pending_.size() - back]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: look further back
    const size_t need = (b & 0xE0) == 0xC0   ? 2
                        : (b & 0xF0) == 0xE0 ? 3
                        : (b & 0xF8) == 0xF0 ? 4
                                             : 1;
    if (need > back) keep = back;
    break;
  }
  std::string ready = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return ready;
}

std::string StreamDecoder::flush() {
  std::string rest;
  rest.swap(pending_);
  return rest;
}

}  // namespace qalora
