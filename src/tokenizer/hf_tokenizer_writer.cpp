// Writes TokenizerData as Hugging Face tokenizer.json + tokenizer_config.json. GPT-2 data
// becomes ByteLevel BPE with the matching pre-tokenizer; SentencePiece data becomes BPE with
// byte fallback as in Llama-2's tokenizer.json, with merges derived from the piece scores.
#include <algorithm>
#include <nlohmann/json.hpp>
#include <tuple>

#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/tokenizer/bpe.h"
#include "qalora/tokenizer/unicode.h"

namespace qalora {
namespace {

using nlohmann::json;

json byte_level(bool use_regex) {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", false},
          {"trim_offsets", true},
          {"use_regex", use_regex}};
}

json gpt2_pre_tokenizer(PreTokenizer pre) {
  switch (pre) {
    case PreTokenizer::Gpt2:
      return byte_level(true);
    case PreTokenizer::SmolLm:
      return {
          {"type", "Sequence"},
          {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)}}};
    case PreTokenizer::Llama3:
    case PreTokenizer::Qwen2:
      return {{"type", "Sequence"},
              {"pretokenizers",
               {{{"type", "Split"},
                 {"pattern", {{"Regex", pre_tokenizer_regex(pre)}}},
                 {"behavior", "Isolated"},
                 {"invert", false}},
                byte_level(false)}}};
  }
  return byte_level(true);
}

// SentencePiece merges as BPE merges: every split of a piece into two pieces, ranked by the
// score of the merged piece (best first), so BPE's lowest-rank-first order is SentencePiece's
// highest-score-first order.
json spm_merges(const TokenizerData& d, const PieceMap& ids) {
  std::vector<std::tuple<float, int32_t, int32_t, int32_t>> merges;  // -score, piece, left, right
  for (size_t i = 0; i < d.tokens.size(); ++i) {
    const TokenType t = d.types[i];
    if (t != TokenType::Normal && t != TokenType::UserDefined && t != TokenType::Unused) continue;
    const std::string_view piece = d.tokens[i];
    for (const unicode::CodePoint& cp : unicode::decode_utf8(piece)) {
      if (cp.offset == 0) continue;
      const auto l = ids.find(piece.substr(0, cp.offset));
      const auto r = ids.find(piece.substr(cp.offset));
      if (l != ids.end() && r != ids.end())
        merges.emplace_back(-d.scores[i], static_cast<int32_t>(i), l->second, r->second);
    }
  }
  std::sort(merges.begin(), merges.end());
  json out = json::array();
  for (const auto& [neg_score, piece, l, r] : merges)
    out.push_back(d.tokens[l] + " " + d.tokens[r]);
  return out;
}

json bos_template(const TokenizerData& d) {
  if (!d.add_bos || d.bos_id < 0) return nullptr;
  const std::string& bos = d.tokens[d.bos_id];
  const json special = {{"SpecialToken", {{"id", bos}, {"type_id", 0}}}};
  const auto seq = [](const char* id, int type_id) {
    return json{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
  };
  return {{"type", "TemplateProcessing"},
          {"single", {special, seq("A", 0)}},
          {"pair", {special, seq("A", 0), special, seq("B", 1)}},
          {"special_tokens", {{bos, {{"id", bos}, {"ids", {d.bos_id}}, {"tokens", {bos}}}}}}};
}

}  // namespace

void write_hf_tokenizer(const TokenizerData& data, const std::filesystem::path& dir) {
  const std::string where = (dir / "tokenizer.json").string();
  validate_tokenizer_data(data, where);
  const bool spm = data.kind == TokenizerKind::SentencePiece;

  PieceMap ids;
  json vocab = json::object();
  json added = json::array();
  for (size_t i = 0; i < data.tokens.size(); ++i) {
    const std::string& piece = data.tokens[i];
    const auto [it, fresh] = ids.emplace(piece, static_cast<int32_t>(i));
    QL_CHECK(fresh, where, ": tokens[", i, "]: expected unique pieces (JSON vocab keys), got \"",
             piece, "\" again (first at id ", it->second, ")");
    vocab[piece] = i;
    const TokenType t = data.types[i];
    if (t == TokenType::Control || t == TokenType::Unknown || t == TokenType::UserDefined)
      added.push_back({{"id", i},
                       {"content", piece},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", t != TokenType::UserDefined}});
  }

  json tok = {
      {"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}, {"added_tokens", added}};
  json model = {{"type", "BPE"},
                {"dropout", nullptr},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"ignore_merges", false},
                {"vocab", std::move(vocab)}};
  if (spm) {
    json normalizers = json::array();
    if (data.add_space_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", kSpmSpace}});
    normalizers.push_back(
        {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpmSpace}});
    tok["normalizer"] = {{"type", "Sequence"}, {"normalizers", normalizers}};
    tok["pre_tokenizer"] = nullptr;
    json decoders = {{{"type", "Replace"}, {"pattern", {{"String", kSpmSpace}}}, {"content", " "}},
                     {{"type", "ByteFallback"}},
                     {{"type", "Fuse"}}};
    if (data.add_space_prefix)
      decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
    tok["decoder"] = {{"type", "Sequence"}, {"decoders", decoders}};
    model["unk_token"] = data.unk_id >= 0 ? json(data.tokens[data.unk_id]) : json(nullptr);
    model["fuse_unk"] = true;
    model["byte_fallback"] = true;
    model["merges"] = spm_merges(data, ids);
  } else {
    PreTokenizer pre = PreTokenizer::Gpt2;
    pre_tokenizer_from_name(data.pre, pre);
    tok["normalizer"] = nullptr;
    tok["pre_tokenizer"] = gpt2_pre_tokenizer(pre);
    tok["decoder"] = byte_level(true);
    model["unk_token"] = nullptr;
    model["fuse_unk"] = false;
    model["byte_fallback"] = false;
    model["merges"] = data.merges;
  }
  tok["post_processor"] = bos_template(data);
  tok["model"] = std::move(model);

  const auto name = [&](int32_t id) { return id >= 0 ? json(data.tokens[id]) : json(nullptr); };
  json config = {{"tokenizer_class", "PreTrainedTokenizerFast"},
                 {"bos_token", name(data.bos_id)},
                 {"eos_token", name(data.eos_id)},
                 {"unk_token", name(data.unk_id)},
                 {"pad_token", name(data.pad_id)},
                 {"add_bos_token", data.add_bos},
                 {"add_eos_token", data.add_eos},
                 {"clean_up_tokenization_spaces", false}};
  if (!data.chat_template.empty()) config["chat_template"] = data.chat_template;

  std::filesystem::create_directories(dir);
  write_file_atomic(dir / "tokenizer.json", tok.dump(1));
  write_file_atomic(dir / "tokenizer_config.json", config.dump(2));
}

}  // namespace qalora
