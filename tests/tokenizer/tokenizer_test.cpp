// Tokenizer unit tests on small hand-built vocabularies (expected ids worked out by hand from
// the merge rules), the llama2.c reader, streaming decode, and one-line errors on bad input.
#include "qalora/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/tokenizer/unicode.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using Ids = std::vector<int32_t>;

// <unk> <s> </s>, 256 byte pieces, then the given pieces with their scores.
TokenizerData spm_data(const std::vector<std::pair<std::string, float>>& pieces) {
  TokenizerData d;
  d.kind = TokenizerKind::SentencePiece;
  d.tokens = {"<unk>", "<s>", "</s>"};
  d.types = {TokenType::Unknown, TokenType::Control, TokenType::Control};
  d.scores = {0, 0, 0};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    d.tokens.push_back(buf);
    d.types.push_back(TokenType::Byte);
    d.scores.push_back(0);
  }
  for (const auto& [piece, score] : pieces) {
    d.tokens.push_back(piece);
    d.types.push_back(TokenType::Normal);
    d.scores.push_back(score);
  }
  d.unk_id = 0, d.bos_id = 1, d.eos_id = 2;
  return d;
}
constexpr int32_t kFirstPiece = 259;

// The 256 byte-level characters (ids 0..255 in byte order), then merged pieces and specials.
TokenizerData gpt2_data(const std::vector<std::string>& merges) {
  TokenizerData d;
  d.kind = TokenizerKind::Gpt2;
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    unicode::append_utf8(ch, unicode::byte_to_gpt2_char(static_cast<uint8_t>(b)));
    d.tokens.push_back(ch);
  }
  for (const std::string& m : merges) {
    d.tokens.push_back(m.substr(0, m.find(' ')) + m.substr(m.find(' ') + 1));
    d.merges.push_back(m);
  }
  d.types.assign(d.tokens.size(), TokenType::Normal);
  d.pre = "gpt2";
  d.add_bos = false;
  d.add_space_prefix = false;
  return d;
}

int32_t add_token(TokenizerData& d, const std::string& piece, TokenType type) {
  d.tokens.push_back(piece);
  d.types.push_back(type);
  if (!d.scores.empty()) d.scores.push_back(0);
  return static_cast<int32_t>(d.tokens.size() - 1);
}

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(TokenizerSpm, MergesHighestScoreFirstWithSpacePrefix) {
  // "▁aba": candidates ▁a (-3), ab (-1), ba (-2): ab wins, then nothing else merges.
  const Tokenizer tok(spm_data({{"\xE2\x96\x81", -10},
                                {"a", -10},
                                {"b", -10},
                                {"ab", -1},
                                {"ba", -2},
                                {"\xE2\x96\x81"
                                 "a",
                                 -3}}));
  const int32_t space = kFirstPiece, a = kFirstPiece + 1, ab = kFirstPiece + 3;
  EXPECT_EQ(tok.encode("aba", false), (Ids{space, ab, a}));
  EXPECT_EQ(tok.encode("aba", true), (Ids{1, space, ab, a}));
  EXPECT_EQ(tok.encode("bab", false), (Ids{space, kFirstPiece + 2, ab}));  // ab(-1) beats ba(-2)
  EXPECT_EQ(tok.decode(tok.encode("aba", true)), "<s>aba");
  EXPECT_EQ(tok.decode(tok.encode("aba", true), /*skip_special=*/true), "aba");
}

TEST(TokenizerSpm, EqualScoresMergeLeftmostFirst) {
  TokenizerData d = spm_data({{"a", -10}, {"aa", -1}});
  d.add_space_prefix = false;
  const Tokenizer tok(d);
  EXPECT_EQ(tok.encode("aaa", false), (Ids{kFirstPiece + 1, kFirstPiece}));
}

TEST(TokenizerSpm, SpaceSuffixPieceSpansWords) {
  // treat_whitespace_as_suffix models have pieces like "a▁", whose U+2581 follows one byte: the
  // look for a U+2581 before it threw std::out_of_range (found by fuzzing).
  const Tokenizer tok(
      spm_data({{"a", -10}, {"b", -10}, {"\xE2\x96\x81", -10}, {"a\xE2\x96\x81", -1}}));
  const Ids ids = tok.encode("a b", false);
  EXPECT_EQ(ids, (Ids{kFirstPiece + 2, kFirstPiece + 3, kFirstPiece + 1}));
  EXPECT_EQ(tok.decode(ids), "a b");
}

TEST(TokenizerSpm, ByteFallbackAndUnknown) {
  TokenizerData d = spm_data({{"\xE2\x96\x81", -1}});
  const Tokenizer tok(d);
  // "é" is not a piece: its two UTF-8 bytes become byte tokens.
  EXPECT_EQ(tok.encode("\xC3\xA9", false), (Ids{kFirstPiece, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(tok.decode(tok.encode("\xC3\xA9", false)), "\xC3\xA9");

  TokenizerData no_bytes;
  no_bytes.tokens = {"<unk>", "a"};
  no_bytes.types = {TokenType::Unknown, TokenType::Normal};
  no_bytes.scores = {0, 0};
  no_bytes.unk_id = 0;
  no_bytes.add_space_prefix = false;
  EXPECT_EQ(Tokenizer(no_bytes).encode("a\xC3\xA9"
                                       "a",
                                       false),
            (Ids{1, 0, 1}));
}

TEST(TokenizerSpm, SpecialTokensAndSpacePrefixRoundTrip) {
  TokenizerData d =
      spm_data({{"\xE2\x96\x81", -1}, {"h", -1}, {"i", -1}, {"\xE2\x96\x81h", -0.5f}});
  const int32_t tag = add_token(d, "<tag>", TokenType::UserDefined);
  const Tokenizer tok(d);
  const Ids plain = tok.encode("<s>hi", false, false);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 1), 0)
      << "\"<s>\" is text without parse_special";
  const Ids parsed = tok.encode("<s>hi", false, true);
  ASSERT_EQ(parsed.size(), 3u);
  EXPECT_EQ(parsed[0], 1);
  EXPECT_EQ(parsed[1], kFirstPiece + 3);  // ▁h: the space prefix follows a special token
  EXPECT_EQ(tok.encode("a<tag>b", false).at(2), tag) << "user-defined tokens always split out";
  for (const char* s : {"<s>hi", " <s> hi ", "hi<tag> hi", "<tag><tag>", "  ", ""}) {
    EXPECT_EQ(tok.decode(tok.encode(s, false, true)), s) << s;
    EXPECT_EQ(tok.decode(tok.encode(s, false, false)), s) << s;
  }
  EXPECT_TRUE(tok.encode("", false).empty());
  EXPECT_EQ(tok.encode("", true), Ids{1});
}

TEST(TokenizerGpt2, MergesByRank) {
  EXPECT_EQ(Tokenizer(gpt2_data({"a b", "b c"})).encode("abc", false), (Ids{256, 'c'}));
  EXPECT_EQ(Tokenizer(gpt2_data({"b c", "a b"})).encode("abc", false), (Ids{'a', 256}));
  // Pre-tokenization keeps " b" and "c" apart from "a": "a", " bc" -> Ġ is byte 0x20's char.
  const Tokenizer tok(gpt2_data({"b c", "\xC4\xA0 bc"}));
  EXPECT_EQ(tok.encode("a bc", false), (Ids{'a', 257}));
  EXPECT_EQ(tok.decode(Ids{'a', 257}), "a bc");
}

TEST(TokenizerGpt2, SpecialTokensLongestMatch) {
  TokenizerData d = gpt2_data({});
  const int32_t start = add_token(d, "<|im_start|>", TokenType::Control);
  const int32_t start_long = add_token(d, "<|im_start|>x", TokenType::Control);
  d.eos_id = add_token(d, "<|im_end|>", TokenType::Control);
  const Tokenizer tok(d);
  EXPECT_EQ(tok.encode("<|im_start|>xy", false, true), (Ids{start_long, 'y'}));
  EXPECT_EQ(tok.encode("<|im_start|>y<|im_end|>", false, true), (Ids{start, 'y', d.eos_id}));
  const Ids text = tok.encode("<|im_start|>", false, false);
  EXPECT_GT(text.size(), 1u);
  EXPECT_EQ(tok.decode(text), "<|im_start|>");
  EXPECT_TRUE(tok.is_special(start));
  EXPECT_FALSE(tok.is_special('a'));
  EXPECT_EQ(tok.decode(Ids{start, 'y'}, /*skip_special=*/true), "y");
  EXPECT_EQ(tok.find_token("<|im_end|>"), d.eos_id);
  EXPECT_EQ(tok.find_token("no such piece"), -1);
}

TEST(TokenizerGpt2, PadFallsBackToEosThenUnkThenZero) {
  TokenizerData d = gpt2_data({});
  EXPECT_EQ(Tokenizer(d).pad_id(), 0);
  d.unk_id = 5;
  EXPECT_EQ(Tokenizer(d).pad_id(), 5);
  d.eos_id = 7;
  EXPECT_EQ(Tokenizer(d).pad_id(), 7);
  d.pad_id = 9;
  EXPECT_EQ(Tokenizer(d).pad_id(), 9);
}

TEST(TokenizerGpt2, HfWriterRoundTripsThroughOurReader) {
  TokenizerData d = gpt2_data({"a b", "ab c"});
  d.bos_id = add_token(d, "<|begin|>", TokenType::Control);
  d.eos_id = add_token(d, "<|end|>", TokenType::Control);
  add_token(d, "<user>", TokenType::UserDefined);
  d.pre = "llama3";
  d.add_bos = true;
  d.chat_template = "{{ messages }}";
  const fs::path dir = test::temp_dir();
  write_hf_tokenizer(d, dir);
  const TokenizerData back = read_hf_tokenizer(dir / "tokenizer.json");
  EXPECT_EQ(back.tokens, d.tokens);
  EXPECT_EQ(back.types, d.types);
  EXPECT_EQ(back.merges, d.merges);
  EXPECT_EQ(back.pre, "llama3");
  EXPECT_EQ(back.bos_id, d.bos_id);
  EXPECT_EQ(back.eos_id, d.eos_id);
  EXPECT_TRUE(back.add_bos);
  EXPECT_EQ(back.chat_template, d.chat_template);
}

TEST(TokenizerStream, HoldsBackIncompleteUtf8) {
  const Tokenizer tok(spm_data({{"\xE2\x96\x81", -1}, {"a", -1}}));
  const std::string text = "a \xF0\x9F\x91\x8D\xC3\xA9 a";  // thumbs-up and é as byte tokens
  const Ids ids = tok.encode(text, true);
  StreamDecoder stream(tok, /*skip_special=*/true);
  std::string out;
  for (int32_t id : ids) {
    const std::string piece = stream.push(id);
    for (size_t i = 0; i < piece.size();) {  // every emitted chunk is whole UTF-8
      const size_t len = unicode::utf8_sequence_length(piece, i);
      ASSERT_GT(len, 0u) << "a chunk splits a character after token " << id;
      i += len;
    }
    out += piece;
  }
  out += stream.flush();
  EXPECT_EQ(out, text);
  EXPECT_EQ(out, tok.decode(ids, true));

  StreamDecoder partial(tok);
  EXPECT_EQ(partial.push(3 + 0xE2), "");  // a lone lead byte waits
  EXPECT_EQ(partial.flush(), "\xE2");
}

TEST(TokenizerLlama2c, Tok512EncodesZooWithBos) {
  QL_REQUIRE_DATA("models/stories260K/tok512.bin");
  const TokenizerData d =
      read_llama2c_tokenizer(test::data_dir() / "models/stories260K/tok512.bin", 512);
  const Tokenizer tok(d);
  ASSERT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.piece(1), "<s>");
  EXPECT_EQ(tok.piece(2), "</s>");
  EXPECT_EQ(tok.type(3), TokenType::Byte);
  EXPECT_EQ(tok.piece(259), "\xE2\x96\x81t");  // stored as " t"
  const Ids ids = tok.encode("Zoo", true);
  ASSERT_GE(ids.size(), 2u);
  EXPECT_EQ(ids[0], 1);
  EXPECT_EQ(tok.decode(ids, true), "Zoo");
  EXPECT_EQ(tok.decode(std::span(ids).subspan(1)), "Zoo");
  for (const char* s : {"Once upon a time, there was a little girl.", "  spaced\n\nout\t",
                        "\xF0\x9F\x91\x8D 12345"})
    EXPECT_EQ(tok.decode(tok.encode(s, false)), s);
}

TEST(TokenizerErrors, TruncatedLlama2cFile) {
  QL_REQUIRE_DATA("models/stories260K/tok512.bin");
  const fs::path path = test::temp_dir() / "tok512.bin";
  write_file_atomic(path,
                    read_file(test::data_dir() / "models/stories260K/tok512.bin").substr(0, 1000));
  const std::string msg = error_of([&] { read_llama2c_tokenizer(path, 512); });
  EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

TEST(TokenizerErrors, TruncatedSentencePieceModel) {
  QL_REQUIRE_DATA("tokenizers/llama2-spm/tokenizer.model");
  const fs::path path = test::temp_dir() / "tokenizer.model";
  write_file_atomic(
      path, read_file(test::data_dir() / "tokenizers/llama2-spm/tokenizer.model").substr(0, 5000));
  const std::string msg = error_of([&] { read_sentencepiece_model(path); });
  EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

TEST(TokenizerErrors, HfJsonMissingVocabOrBadMerges) {
  const fs::path dir = test::temp_dir();
  const fs::path path = dir / "tokenizer.json";
  write_file_atomic(
      path, R"({"model": {"type": "BPE", "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}})");
  std::string msg = error_of([&] { read_hf_tokenizer(path); });
  EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.vocab"), std::string::npos) << msg;

  write_hf_tokenizer(gpt2_data({"a b"}), dir);
  nlohmann::json j = nlohmann::json::parse(read_file(path));
  j["model"]["merges"].push_back("a zzz");
  write_file_atomic(path, j.dump());
  msg = error_of([&] { read_hf_tokenizer(path); });
  EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("merges[1]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("zzz"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;

  write_file_atomic(path, "{not json");
  EXPECT_NE(error_of([&] { read_hf_tokenizer(path); }).find(path.string()), std::string::npos);
}

TEST(TokenizerErrors, DecodeIdOutOfRange) {
  const Tokenizer tok(gpt2_data({}));
  const std::string msg = error_of([&] { tok.decode(Ids{'a', 256}); });
  EXPECT_NE(msg.find("256"), std::string::npos) << msg;
  EXPECT_NE(msg.find("out of range"), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { tok.decode(Ids{-1}); }), "(no error)");
  StreamDecoder stream(tok);
  EXPECT_NE(error_of([&] { stream.push(100000); }), "(no error)");
}

TEST(TokenizerErrors, InconsistentData) {
  TokenizerData d = gpt2_data({"a b"});
  d.pre = "mystery";
  EXPECT_NE(error_of([&] { Tokenizer t(d); }).find("mystery"), std::string::npos);
  d = gpt2_data({});
  d.bos_id = 1000;
  EXPECT_NE(error_of([&] { Tokenizer t(d); }).find("bos_id"), std::string::npos);
  d = spm_data({});
  d.scores.pop_back();
  EXPECT_NE(error_of([&] { Tokenizer t(d); }).find("scores"), std::string::npos);
}

}  // namespace
}  // namespace qalora
