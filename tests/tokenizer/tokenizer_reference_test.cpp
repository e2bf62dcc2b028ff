// Cross-checks against independent implementations run at test time: the `sentencepiece`
// library on Llama-2's tokenizer.model, Hugging Face `tokenizers` on tokenizer.json files we
// write (SmolLM2's GPT-2 vocabulary, Llama-2's and llama2.c's SentencePiece vocabularies), and
// `tokenizers` pre-tokenizers for the hand-written split regexes.
#include <sys/wait.h>

#include <cstdlib>
#include <nlohmann/json.hpp>

#include "qalora/core/atomic_file.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/gguf.h"
#include "qalora/tokenizer/pretokenize.h"
#include "qalora/tokenizer/tokenizer.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const std::vector<std::string>& tricky_strings() {
  static const std::vector<std::string> strings = {
      "Hello world",
      "hello",
      " leading space",
      "  two leading spaces",
      "trailing spaces  ",
      "multiple   spaces   inside",
      "\t\n",
      "tab\tand\nnewline\r\nend",
      "\n\n\nparagraphs\n\n  indented\n",
      "12345",
      "3.14159 and 1,000,000 and 007",
      "\xD9\xA3\xD9\xA4\xD9\xA5 Arabic-Indic digits \xE2\x85\xA0\xE2\x85\xA1",
      "emoji \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD and flag \xF0\x9F\x87\xAB\xF0\x9F\x87\xB7",
      "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE3\x83\x86\xE3\x82\xAD\xE3\x82\xB9\xE3\x83"
      "\x88",
      "\xE4\xB8\xAD\xE6\x96\x87\xEF\xBC\x8C\xE6\xA0\x87\xE7\x82\xB9\xE3\x80\x82",
      "\xED\x95\x9C\xEA\xB5\xAD\xEC\x96\xB4 "
      "\xCE\x95\xCE\xBB\xCE\xBB\xCE\xB7\xCE\xBD\xCE\xB9\xCE\xBA\xCE\xAC "
      "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82, \xD0\xBC\xD0\xB8\xD1\x80!",
      "combining: e\xCC\x81 a\xCC\x88 n\xCC\x83 e\xCC\x81\xCC\x81\xCC\x81",
      "<s> typed as text </s>",
      "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
      "<unk> and <0x41> and \\xff\\xfe",
      "don't I'll we've they're she'd it's YOU'RE 'sup",
      "mixed123abc456def",
      "   ",
      " ",
      "",
      "a",
      "zero\xE2\x80\x8Bwidth nbsp\xC2\xA0here ideographic\xE3\x80\x80space line\xE2\x80\xA8sep",
      "\xC3\xBCmlaut \xC3\x84rger \xC3\x9F",
      "code: def f(x):\n    return x**2  # comment\n",
      "!!!???... $100 & 50% off; email@example.com https://x.y/z?q=1",
      "\xE2\x96\x81 literal U+2581 and \xC4\xA0 literal G-dot",
      "\x01\x02\x7F control chars",
      "\xF0\x9F\x98\x80\xF0\x9F\x98\x83\xF0\x9F\x98\x84",
      std::string(300, 'x') + " long word",
  };
  return strings;
}

// Runs tests/tokenizer/reference_tokenize.py with `args`.
int run_reference(const std::vector<std::string>& args, std::string& err) {
  return test::run_python(fs::path(__FILE__).parent_path() / "reference_tokenize.py", args, err);
}

#define RUN_REFERENCE(...)                                                   \
  do {                                                                       \
    std::string reference_err_;                                              \
    const int rc_ = run_reference({__VA_ARGS__}, reference_err_);            \
    if (rc_ == test::kPythonMissing)                                         \
      GTEST_SKIP() << "reference tokenizer unavailable: " << reference_err_; \
    ASSERT_EQ(rc_, 0) << reference_err_;                                     \
  } while (0)

fs::path write_strings(const fs::path& dir, const std::vector<std::string>& strings) {
  const fs::path path = dir / "strings.json";
  write_file_atomic(path, json(strings).dump());
  return path;
}

std::string shown(const std::string& text) {
  return text.size() <= 200 ? text : text.substr(0, 200) + "...";
}

// Compares id lists, reporting the first difference rather than dumping long vectors.
void expect_same_ids(const std::vector<int32_t>& actual, const std::vector<int32_t>& expected,
                     const std::string& text) {
  size_t i = 0;
  while (i < actual.size() && i < expected.size() && actual[i] == expected[i]) ++i;
  if (i == actual.size() && i == expected.size()) return;
  const auto window = [&](const std::vector<int32_t>& v) {
    std::string s;
    for (size_t k = i >= 3 ? i - 3 : 0; k < std::min(v.size(), i + 4); ++k)
      s += std::to_string(v[k]) + " ";
    return s;
  };
  ADD_FAILURE() << "ids differ at index " << i << " (sizes " << actual.size() << " vs "
                << expected.size() << "): ours [" << window(actual) << "] reference ["
                << window(expected) << "] for text \"" << shown(text) << "\"";
}

std::string optional_text(const char* relpath) {
  const fs::path p = test::data_dir() / relpath;
  return fs::exists(p) ? read_file(p) : std::string();
}

// SmolLM2's tokenizer as its GGUF stores it (tokenizer.ggml.*).
TokenizerData smollm2_tokenizer() {
  const GgufFile f = GgufFile::open(test::smollm2_path());
  TokenizerData d;
  d.kind = TokenizerKind::Gpt2;
  d.tokens = f.get_string_array("tokenizer.ggml.tokens");
  for (int64_t t : f.get_int_array("tokenizer.ggml.token_type"))
    d.types.push_back(static_cast<TokenType>(t));
  d.merges = f.get_string_array("tokenizer.ggml.merges");
  d.pre = f.get_string("tokenizer.ggml.pre");
  d.bos_id = static_cast<int32_t>(f.get_int("tokenizer.ggml.bos_token_id"));
  d.eos_id = static_cast<int32_t>(f.get_int("tokenizer.ggml.eos_token_id"));
  d.unk_id = static_cast<int32_t>(f.get_int("tokenizer.ggml.unknown_token_id"));
  d.pad_id = static_cast<int32_t>(f.get_int("tokenizer.ggml.padding_token_id"));
  d.add_bos = f.get_bool_or("tokenizer.ggml.add_bos_token", true);
  d.add_space_prefix = false;
  d.chat_template = f.get_string("tokenizer.chat_template");
  return d;
}

void expect_round_trips(const Tokenizer& tok, const std::vector<std::string>& strings) {
  for (const std::string& s : strings) {
    for (bool parse_special : {false, true}) {
      const auto ids = tok.encode(s, /*add_bos=*/false, parse_special);
      EXPECT_EQ(tok.decode(ids), s)
          << "parse_special=" << parse_special << " text \"" << shown(s) << "\"";
    }
  }
}

// Ill-formed UTF-8 made of bytes that SmolLM2's byte-level vocabulary has pieces for.
std::vector<std::string> with_invalid_utf8(std::vector<std::string> strings) {
  strings.push_back("broken \xE2\x82 utf-8, a lone \x80 continuation and a dangling \xC3");
  return strings;
}

// SentencePiece writes spaces as U+2581, so a literal U+2581 decodes as a space (as in the
// sentencepiece library itself); those strings cannot round-trip.
std::vector<std::string> without_literal_spm_space(const std::vector<std::string>& strings) {
  std::vector<std::string> out;
  for (const auto& s : strings)
    if (s.find("\xE2\x96\x81") == std::string::npos) out.push_back(s);
  return out;
}

TEST(TokenizerReference, SentencePieceMatchesSentencePieceLibrary) {
  QL_REQUIRE_DATA("tokenizers/llama2-spm/tokenizer.model");
  const fs::path model = test::data_dir() / "tokenizers/llama2-spm/tokenizer.model";
  const fs::path dir = test::temp_dir();
  std::vector<std::string> strings = tricky_strings();
  if (std::string story = optional_text("text/tinystories_val.txt"); !story.empty())
    strings.push_back(story);
  RUN_REFERENCE("spm", model.string(), write_strings(dir, strings).string(),
                (dir / "out.json").string());
  const json expected = json::parse(read_file(dir / "out.json"));

  const Tokenizer tok(read_sentencepiece_model(model));
  ASSERT_EQ(tok.vocab_size(), 32000);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.pad_id(), 2);  // Llama-2 has no pad token: falls back to EOS
  for (size_t i = 0; i < strings.size(); ++i)
    expect_same_ids(tok.encode(strings[i], false, false), expected[i].get<std::vector<int32_t>>(),
                    strings[i]);
  expect_round_trips(tok, without_literal_spm_space(with_invalid_utf8(strings)));
  expect_round_trips(tok, {"overlong \xC0\xAF and \xFF\xFE bytes"});
}

TEST(TokenizerReference, SentencePieceHfExportMatchesTokenizersLibrary) {
  QL_REQUIRE_DATA("tokenizers/llama2-spm/tokenizer.model");
  const fs::path dir = test::temp_dir();
  const TokenizerData data =
      read_sentencepiece_model(test::data_dir() / "tokenizers/llama2-spm/tokenizer.model");
  write_hf_tokenizer(data, dir / "hf");
  const auto& strings = tricky_strings();
  RUN_REFERENCE("hf", (dir / "hf/tokenizer.json").string(), write_strings(dir, strings).string(),
                (dir / "out.json").string());
  const json expected = json::parse(read_file(dir / "out.json"));

  const Tokenizer ours(data);
  const Tokenizer reread(read_hf_tokenizer(dir / "hf/tokenizer.json"));
  EXPECT_EQ(reread.bos_id(), 1);
  EXPECT_EQ(reread.eos_id(), 2);
  EXPECT_TRUE(reread.add_bos());
  for (size_t i = 0; i < strings.size(); ++i) {
    const auto ref = expected[i]["ids"].get<std::vector<int32_t>>();
    expect_same_ids(ours.encode(strings[i], false, true), ref, strings[i]);
    expect_same_ids(reread.encode(strings[i], false, true), ref, strings[i]);
  }
  expect_round_trips(reread, without_literal_spm_space(strings));
}

TEST(TokenizerReference, Llama2cTokenizerHfExportMatchesTokenizersLibrary) {
  QL_REQUIRE_DATA("models/stories260K/tok512.bin");
  const fs::path dir = test::temp_dir();
  const TokenizerData data =
      read_llama2c_tokenizer(test::data_dir() / "models/stories260K/tok512.bin", 512);
  write_hf_tokenizer(data, dir / "hf");
  std::vector<std::string> strings = tricky_strings();
  strings.push_back("Zoo");
  RUN_REFERENCE("hf", (dir / "hf/tokenizer.json").string(), write_strings(dir, strings).string(),
                (dir / "out.json").string());
  const json expected = json::parse(read_file(dir / "out.json"));
  const Tokenizer tok(data);
  for (size_t i = 0; i < strings.size(); ++i)
    expect_same_ids(tok.encode(strings[i], false, true),
                    expected[i]["ids"].get<std::vector<int32_t>>(), strings[i]);
}

TEST(TokenizerReference, Gpt2SmolLM2MatchesTokenizersLibrary) {
  QL_REQUIRE_SMOLLM2();
  const fs::path dir = test::temp_dir();
  const TokenizerData data = smollm2_tokenizer();
  ASSERT_EQ(data.tokens.size(), 49152u);
  ASSERT_EQ(data.merges.size(), 48900u);
  ASSERT_EQ(data.pre, "smollm");
  write_hf_tokenizer(data, dir / "hf");

  std::vector<std::string> strings = tricky_strings();
  const std::string wiki = optional_text("text/wikitext2_test.txt");
  if (!wiki.empty()) strings.push_back(wiki);
  RUN_REFERENCE("hf", (dir / "hf/tokenizer.json").string(), write_strings(dir, strings).string(),
                (dir / "out.json").string());
  const json expected = json::parse(read_file(dir / "out.json"));

  const Tokenizer ours(data);
  EXPECT_EQ(ours.bos_id(), 1);
  EXPECT_EQ(ours.eos_id(), 2);
  EXPECT_EQ(ours.pad_id(), 2);
  EXPECT_FALSE(ours.add_bos());
  EXPECT_TRUE(ours.is_special(ours.find_token("<|im_start|>")));
  const Tokenizer reread(read_hf_tokenizer(dir / "hf/tokenizer.json"));
  EXPECT_EQ(reread.data().tokens, data.tokens);
  EXPECT_EQ(reread.data().types, data.types);
  EXPECT_EQ(reread.data().merges, data.merges);
  EXPECT_EQ(reread.data().pre, "smollm");
  EXPECT_EQ(reread.data().chat_template, data.chat_template);
  EXPECT_EQ(reread.bos_id(), 1);
  EXPECT_EQ(reread.eos_id(), 2);
  EXPECT_EQ(reread.pad_id(), 2);
  EXPECT_FALSE(reread.add_bos());
  for (size_t i = 0; i < strings.size(); ++i) {
    const auto ref = expected[i]["ids"].get<std::vector<int32_t>>();
    expect_same_ids(ours.encode(strings[i], false, true), ref, strings[i]);
    expect_same_ids(reread.encode(strings[i], false, true), ref, strings[i]);
    EXPECT_EQ(ours.decode(ref), expected[i]["text"].get<std::string>())
        << "text \"" << shown(strings[i]) << "\"";
  }
  expect_round_trips(ours, with_invalid_utf8(strings));
}

TEST(TokenizerReference, PreTokenizersMatchTokenizersLibrary) {
  const fs::path dir = test::temp_dir();
  std::vector<std::string> strings = tricky_strings();
  strings.push_back(
      "x  \n\n  y \r\n\r\n z\t\t\n 1234567 \xD9\xA3\xD9\xA4\xD9\xA5\xD9\xA6 a1b22c333d4444");
  strings.push_back("HE'S 'LL 'Re ''s ' s 'x !\n\n!?\r\n ... \n   \xE2\x80\x83\xE2\x80\x83word");
  const fs::path strings_path = write_strings(dir, strings);
  for (PreTokenizer pre :
       {PreTokenizer::Gpt2, PreTokenizer::Llama3, PreTokenizer::Qwen2, PreTokenizer::SmolLm}) {
    const std::string name = pre_tokenizer_name(pre);
    RUN_REFERENCE("pre", name, strings_path.string(), (dir / (name + ".json")).string());
    const json expected = json::parse(read_file(dir / (name + ".json")));
    for (size_t i = 0; i < strings.size(); ++i) {
      std::vector<std::string> ours;
      for (std::string_view piece : pre_tokenize(strings[i], pre)) ours.emplace_back(piece);
      EXPECT_EQ(ours, expected[i].get<std::vector<std::string>>())
          << name << " on \"" << shown(strings[i]) << "\"";
    }
  }
}

}  // namespace
}  // namespace qalora
