// Training data loading: every format on small files written here, checked through the loss
// mask (the decoded target runs must be exactly the responses and their end markers), the
// truncation rules, auto detection, one-line errors, text packing, and the shared real data.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/data/dataset.h"
#include "qalora/model/model.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using Ids = std::vector<int32_t>;
using Strings = std::vector<std::string>;

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

fs::path write(const fs::path& dir, const std::string& name, const std::string& contents) {
  const fs::path p = dir / name;
  write_file_atomic(p, contents);
  return p;
}

// The llama2.c 512-token SentencePiece vocabulary: adds BOS, no chat template.
const Tokenizer& tok512() {
  static const Tokenizer tok(
      read_llama2c_tokenizer(test::data_dir() / "models/stories260K/tok512.bin", 512));
  return tok;
}
#define REQUIRE_TOK512() QL_REQUIRE_DATA("models/stories260K/tok512.bin")

// SmolLM2's GPT-2 byte-level tokenizer with its ChatML template.
const Tokenizer& smollm2() {
  static const std::shared_ptr<const Tokenizer> tok = load_gguf_tokenizer(test::smollm2_path());
  return *tok;
}

std::string eos_text(const Tokenizer& tok) {
  return tok.decode(Ids{tok.eos_id()});
}
std::string bos_text(const Tokenizer& tok) {
  return tok.add_bos() ? tok.decode(Ids{tok.bos_id()}) : "";
}

// The decoded maximal runs of tokens whose target flag is `flag`.
Strings runs(const Tokenizer& tok, const Example& ex, bool flag) {
  Strings out;
  Ids run;
  for (size_t t = 0; t <= ex.tokens.size(); ++t) {
    if (t < ex.tokens.size() && (ex.target[t] != 0) == flag) {
      run.push_back(ex.tokens[t]);
    } else if (!run.empty()) {
      out.push_back(tok.decode(run));
      run.clear();
    }
  }
  return out;
}

Ids concat(Ids a, const Ids& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

void expect_well_formed(const Example& ex) {
  ASSERT_EQ(ex.tokens.size(), ex.target.size());
  ASSERT_FALSE(ex.target.empty());
  EXPECT_EQ(ex.target[0], 0);
  EXPECT_GT(ex.target_count(), 0);
}

const std::string kPreamble =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n";
const std::string kPreambleWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n";

TEST(DataFormat, NamesRoundTripAndUnknownNameListsThem) {
  for (DataFormat f : {DataFormat::Auto, DataFormat::Alpaca, DataFormat::InputOutput,
                       DataFormat::Chat, DataFormat::ShareGpt, DataFormat::Text})
    EXPECT_EQ(parse_data_format(data_format_name(f)), f);
  const std::string msg = error_of([] { parse_data_format("csv"); });
  EXPECT_NE(msg.find("'csv'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("alpaca, io, chat, sharegpt, text"), std::string::npos) << msg;
}

TEST(DataAlpaca, MaskIsTheResponseAndEosWithBothPrompts) {
  QL_REQUIRE_SMOLLM2();
  const Tokenizer& tok = smollm2();
  const fs::path p = write(test::temp_dir(), "a.json", R"([
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}
  ])");
  const Dataset d = load_dataset(p, tok, {});
  EXPECT_EQ(d.format, DataFormat::Alpaca);
  EXPECT_EQ(d.stats.records, 2);
  EXPECT_EQ(d.stats.skipped, 0);
  EXPECT_EQ(d.stats.truncated, 0);
  ASSERT_EQ(d.examples.size(), 2u);
  const std::string prompt0 = kPreamble + "### Instruction:\nName a color.\n\n### Response: ";
  const std::string prompt1 = kPreambleWithInput +
                              "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
                              "### Response: ";
  for (const Example& ex : d.examples) expect_well_formed(ex);
  EXPECT_EQ(runs(tok, d.examples[0], false), Strings{bos_text(tok) + prompt0});
  EXPECT_EQ(runs(tok, d.examples[0], true), Strings{"Blue." + eos_text(tok)});
  EXPECT_EQ(runs(tok, d.examples[1], false), Strings{bos_text(tok) + prompt1});
  EXPECT_EQ(runs(tok, d.examples[1], true), Strings{"The sum is 5." + eos_text(tok)});
  // Source and target are tokenized separately, as the QLoRA reference does.
  EXPECT_EQ(d.examples[1].tokens,
            concat(concat(tok.encode(prompt1, tok.add_bos()), tok.encode("The sum is 5.", false)),
                   Ids{tok.eos_id()}));
  EXPECT_EQ(d.stats.tokens, int64_t(d.examples[0].tokens.size() + d.examples[1].tokens.size()));
  EXPECT_EQ(d.stats.target_tokens, d.examples[0].target_count() + d.examples[1].target_count());
}

TEST(DataAlpaca, SentencePieceSourceStartsWithBos) {
  REQUIRE_TOK512();
  const Tokenizer& tok = tok512();
  const fs::path p =
      write(test::temp_dir(), "a.jsonl",
            "{\"instruction\": \"Tell a story.\", \"output\": \"Once upon a time.\"}\n");
  const Dataset d = load_dataset(p, tok, {});
  ASSERT_EQ(d.examples.size(), 1u);
  const Example& ex = d.examples[0];
  expect_well_formed(ex);
  EXPECT_EQ(ex.tokens[0], tok.bos_id());
  EXPECT_EQ(runs(tok, ex, true), Strings{"Once upon a time." + eos_text(tok)});
  EXPECT_EQ(runs(tok, ex, false),
            Strings{"<s>" + kPreamble + "### Instruction:\nTell a story.\n\n### Response: "});
}

TEST(DataAlpaca, HistoryTurnsGoBeforeTheFinalInstructionAndAreNotTrained) {
  QL_REQUIRE_SMOLLM2();
  const Tokenizer& tok = smollm2();
  const fs::path p = write(test::temp_dir(), "h.json", R"([{
    "instruction": "And the third?", "input": "", "output": "Three.",
    "history": [["First?", "One."], ["Second?", "Two."]]}])");
  const std::string prompt = kPreamble +
                             "### Instruction:\nFirst?\n\n### Response: One.\n\n"
                             "### Instruction:\nSecond?\n\n### Response: Two.\n\n"
                             "### Instruction:\nAnd the third?\n\n### Response: ";
  const Dataset d = load_dataset(p, tok, {});
  ASSERT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(runs(tok, d.examples[0], false), Strings{bos_text(tok) + prompt});
  EXPECT_EQ(runs(tok, d.examples[0], true), Strings{"Three." + eos_text(tok)});

  DataOptions all;
  all.train_on_source = true;
  const Dataset s = load_dataset(p, tok, all);
  ASSERT_EQ(s.examples.size(), 1u);
  EXPECT_EQ(s.examples[0].tokens, d.examples[0].tokens);
  EXPECT_EQ(s.examples[0].target_count(), int64_t(s.examples[0].tokens.size()) - 1);
  EXPECT_EQ(s.examples[0].target[0], 0);
}

TEST(DataInputOutput, PromptIsTheInputVerbatimAndEmptyResponsesAreSkipped) {
  QL_REQUIRE_SMOLLM2();
  const Tokenizer& tok = smollm2();
  const fs::path p = write(test::temp_dir(), "io.jsonl",
                           "{\"input\": \"Q: 2+2?\\nA:\", \"output\": \" 4\"}\n"
                           "\n"
                           "{\"input\": \"Q: nothing\", \"output\": \"\"}\n");
  const Dataset d = load_dataset(p, tok, {});
  EXPECT_EQ(d.format, DataFormat::InputOutput);
  EXPECT_EQ(d.stats.records, 2);
  EXPECT_EQ(d.stats.skipped, 1);
  ASSERT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(runs(tok, d.examples[0], false), Strings{bos_text(tok) + "Q: 2+2?\nA:"});
  EXPECT_EQ(runs(tok, d.examples[0], true), Strings{" 4" + eos_text(tok)});
}

// io records on the BOS-adding SentencePiece vocabulary: the source keeps BOS and its end, the
// target its start; over max_seq_len the source shrinks first.
TEST(DataTruncation, SourceFromTheLeftTargetFromTheRightAndCounted) {
  REQUIRE_TOK512();
  const Tokenizer& tok = tok512();
  const std::string input = "Once upon a time there was a little girl who loved the park";
  const std::string output = "She played with her big red ball every day";
  const Ids src = tok.encode(input, true);
  const Ids tgt = concat(tok.encode(output, false), Ids{tok.eos_id()});
  ASSERT_GT(src.size(), 8u);
  ASSERT_GT(tgt.size(), 6u);
  const fs::path p = write(test::temp_dir(), "t.jsonl",
                           "{\"input\": \"" + input + "\", \"output\": \"" + output + "\"}\n" +
                               "{\"input\": \"Hi\", \"output\": \"Yo\"}\n");
  const auto tail = [](const Ids& v, size_t n) { return Ids(v.end() - long(n), v.end()); };
  const auto head = [](const Ids& v, size_t n) { return Ids(v.begin(), v.begin() + long(n)); };
  const Ids bos = {tok.bos_id()};

  DataOptions o;
  o.source_max_len = 5;
  Dataset d = load_dataset(p, tok, o);
  EXPECT_EQ(d.stats.truncated, 1);
  ASSERT_EQ(d.examples.size(), 2u);
  EXPECT_EQ(d.examples[0].tokens, concat(concat(bos, tail(src, 4)), tgt));
  EXPECT_EQ(d.examples[0].target_count(), int64_t(tgt.size()));

  o = {};
  o.target_max_len = 3;
  d = load_dataset(p, tok, o);
  EXPECT_EQ(d.stats.truncated, tok.encode("Yo", false).size() + 1 > 3 ? 2 : 1);
  EXPECT_EQ(d.examples[0].tokens, concat(src, head(tgt, 3)));  // EOS cut too, as the reference

  o = {};
  o.max_seq_len = int64_t(tgt.size()) + 3;  // source: BOS + its last 2 tokens
  d = load_dataset(p, tok, o);
  EXPECT_EQ(d.stats.truncated, 1);
  EXPECT_EQ(d.examples[0].tokens, concat(concat(bos, tail(src, 2)), tgt));

  o = {};
  o.max_seq_len = int64_t(tgt.size()) - 1;  // source: BOS alone, target loses 2
  d = load_dataset(p, tok, o);
  EXPECT_EQ(d.examples[0].tokens, concat(bos, head(tgt, tgt.size() - 2)));
  EXPECT_EQ(d.examples[0].target_count(), int64_t(tgt.size()) - 2);
  EXPECT_EQ(d.stats.truncated, 1);  // "Hi" / "Yo" fits
  EXPECT_EQ(d.examples[1].tokens,
            concat(tok.encode("Hi", true), concat(tok.encode("Yo", false), Ids{tok.eos_id()})));
  EXPECT_EQ(d.stats.skipped, 0);
}

const char* kChatJsonl =
    R"({"messages": [{"role": "system", "content": "Be brief."}, )"
    R"({"role": "user", "content": "Hi"}, )"
    R"({"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit."}, )"
    R"({"role": "assistant", "content": "Apple."}]})"
    "\n";
const char* kShareGptJson =
    R"([{"conversations": [{"from": "system", "value": "Be brief."}, )"
    R"({"from": "human", "value": "Hi"}, )"
    R"({"from": "gpt", "value": "Hello!"}, {"from": "user", "value": "Name a fruit."}, )"
    R"({"from": "assistant", "value": "Apple."}]}])";

TEST(DataChat, ChatMLTrainsAssistantTurnsAndTheirEndMarkerOnly) {
  QL_REQUIRE_SMOLLM2();
  const Tokenizer& tok = smollm2();
  const fs::path dir = test::temp_dir();
  const Dataset d = load_dataset(write(dir, "c.jsonl", kChatJsonl), tok, {});
  EXPECT_EQ(d.format, DataFormat::Chat);
  ASSERT_EQ(d.examples.size(), 1u);
  const Example& ex = d.examples[0];
  expect_well_formed(ex);
  const std::string text =
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
      "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
      "<|im_start|>assistant\nApple.<|im_end|>\n";
  // Encoded whole, exactly as the chat command encodes the rendered conversation.
  EXPECT_EQ(ex.tokens, tok.encode(text, false, true));
  EXPECT_EQ(runs(tok, ex, true), (Strings{"Hello!<|im_end|>", "Apple.<|im_end|>"}));
  EXPECT_EQ(
      runs(tok, ex, false),
      (Strings{"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\n",
               "\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", "\n"}));

  const Dataset s = load_dataset(write(dir, "s.json", kShareGptJson), tok, {});
  EXPECT_EQ(s.format, DataFormat::ShareGpt);
  ASSERT_EQ(s.examples.size(), 1u);
  EXPECT_EQ(s.examples[0].tokens, ex.tokens);
  EXPECT_EQ(s.examples[0].target, ex.target);

  DataOptions all;
  all.train_on_source = true;
  const Dataset a = load_dataset(write(dir, "c2.jsonl", kChatJsonl), tok, all);
  EXPECT_EQ(a.examples[0].target_count(), int64_t(ex.tokens.size()) - 1);
}

TEST(DataChat, DefaultSystemPromptIsRenderedButNotTrained) {
  QL_REQUIRE_SMOLLM2();
  const Tokenizer& tok = smollm2();
  const fs::path p = write(test::temp_dir(), "c.jsonl",
                           R"({"messages": [{"role": "user", "content": "Hi"}, )"
                           R"({"role": "assistant", "content": "Hey."}]})");
  const Dataset d = load_dataset(p, tok, {});
  ASSERT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(runs(tok, d.examples[0], true), Strings{"Hey.<|im_end|>"});
  const Strings prompt = runs(tok, d.examples[0], false);
  ASSERT_FALSE(prompt.empty());
  EXPECT_NE(prompt[0].find("<|im_start|>system\nYou are a helpful AI assistant"), std::string::npos)
      << prompt[0];
}

// Llama 2's template on its SentencePiece vocabulary: the turn after "[/INST]" is text, not a
// special token, so the mask boundary falls inside the SentencePiece stream.
TEST(DataChat, Llama2TemplateOnSentencePiece) {
  QL_REQUIRE_DATA("tokenizers/llama2-spm/tokenizer.model");
  const Tokenizer tok(
      read_sentencepiece_model(test::data_dir() / "tokenizers/llama2-spm/tokenizer.model"));
  DataOptions o;
  o.chat_template = ChatFormat::Llama2;
  const Dataset d = load_dataset(write(test::temp_dir(), "c.jsonl", kChatJsonl), tok, o);
  ASSERT_EQ(d.examples.size(), 1u);
  const Example& ex = d.examples[0];
  expect_well_formed(ex);
  // Decoding a run strips the SentencePiece space that starts it.
  EXPECT_EQ(runs(tok, ex, true), (Strings{"Hello! </s>", "Apple. </s>"}));
  EXPECT_EQ(runs(tok, ex, false), (Strings{"<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]",
                                           "<s>[INST] Name a fruit. [/INST]"}));
}

TEST(DataChat, ZephyrTemplateOnAVocabularyWithoutChatMarkers) {
  REQUIRE_TOK512();
  const Tokenizer& tok = tok512();
  const fs::path p = write(test::temp_dir(), "c.jsonl", kChatJsonl);
  const std::string msg = error_of([&] { load_dataset(p, tok, {}); });
  EXPECT_NE(msg.find("c.jsonl"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--chat-template chatml|llama2|llama3|zephyr"), std::string::npos) << msg;

  DataOptions o;
  o.chat_template = ChatFormat::Zephyr;
  const Dataset d = load_dataset(p, tok, o);
  ASSERT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(runs(tok, d.examples[0], true), (Strings{"Hello!</s>", "Apple.</s>"}));
}

TEST(DataChat, MaxSeqLenCutsTheRightEndAndConversationsWithoutAnswersAreSkipped) {
  QL_REQUIRE_SMOLLM2();
  const Tokenizer& tok = smollm2();
  const fs::path dir = test::temp_dir();
  const Dataset full = load_dataset(write(dir, "c.jsonl", kChatJsonl), tok, {});
  const Example& ex = full.examples[0];
  DataOptions o;
  o.max_seq_len = int64_t(ex.tokens.size()) - 5;
  const Dataset cut = load_dataset(write(dir, "c.jsonl", kChatJsonl), tok, o);
  EXPECT_EQ(cut.stats.truncated, 1);
  ASSERT_EQ(cut.examples.size(), 1u);
  EXPECT_EQ(cut.examples[0].tokens, Ids(ex.tokens.begin(), ex.tokens.end() - 5));
  EXPECT_EQ(cut.examples[0].target, std::vector<uint8_t>(ex.target.begin(), ex.target.end() - 5));

  const fs::path p = write(
      dir, "q.jsonl",
      std::string(kChatJsonl) + R"({"messages": [{"role": "user", "content": "Anyone?"}]})" + "\n");
  const Dataset d = load_dataset(p, tok, {});
  EXPECT_EQ(d.stats.records, 2);
  EXPECT_EQ(d.stats.skipped, 1);
  EXPECT_EQ(d.examples.size(), 1u);
}

TEST(DataText, PackedWindowsStartWithBosAndCoverTheText) {
  REQUIRE_TOK512();
  const Tokenizer& tok = tok512();
  std::string text;
  for (int i = 0; i < 12; ++i)
    text += "Tim saw a big dog. The dog was happy and ran to the park.\n";
  const Ids ids = tok.encode(text, false);
  // A window length whose last window holds exactly one text token after BOS.
  int64_t len = 3;
  while (int64_t(ids.size()) % (len - 1) != 1) ++len;
  DataOptions o;
  o.max_seq_len = len;
  const Dataset d = load_dataset(write(test::temp_dir(), "t.txt", text), tok, o);
  EXPECT_EQ(d.format, DataFormat::Text);
  const auto windows = int64_t(ids.size()) / (len - 1) + 1;
  EXPECT_EQ(d.stats.records, windows);
  ASSERT_EQ(int64_t(d.examples.size()), windows);
  Ids joined;
  for (size_t w = 0; w < d.examples.size(); ++w) {
    const Example& ex = d.examples[w];
    expect_well_formed(ex);
    EXPECT_EQ(int64_t(ex.tokens.size()), w + 1 < d.examples.size() ? len : 2);
    EXPECT_EQ(ex.tokens[0], tok.bos_id());
    EXPECT_EQ(ex.target_count(), int64_t(ex.tokens.size()) - 1);
    joined.insert(joined.end(), ex.tokens.begin() + 1, ex.tokens.end());
  }
  EXPECT_EQ(joined, ids);
}

TEST(DataText, WithoutBosWindowsAreFullLengthAndALoneLastTokenIsDropped) {
  QL_REQUIRE_SMOLLM2();
  const Tokenizer& tok = smollm2();
  if (tok.add_bos()) GTEST_SKIP() << "SmolLM2's tokenizer adds BOS here";
  std::string text;
  for (int i = 0; i < 9; ++i) text += "The quick brown fox jumps over the lazy dog. ";
  const Ids ids = tok.encode(text, false);
  int64_t len = 2;
  while (int64_t(ids.size()) % len != 1) ++len;
  DataOptions o;
  o.max_seq_len = len;
  o.format = DataFormat::Text;  // explicit, whatever the name says
  const Dataset d = load_dataset(write(test::temp_dir(), "t.md", text), tok, o);
  EXPECT_EQ(d.stats.records, int64_t(ids.size()) / len + 1);
  EXPECT_EQ(d.stats.skipped, 1);
  ASSERT_EQ(int64_t(d.examples.size()), int64_t(ids.size()) / len);
  Ids joined;
  for (const Example& ex : d.examples) {
    EXPECT_EQ(int64_t(ex.tokens.size()), len);
    joined.insert(joined.end(), ex.tokens.begin(), ex.tokens.end());
  }
  EXPECT_EQ(joined, Ids(ids.begin(), ids.end() - 1));
}

TEST(DataAuto, DetectsEachFormatFromExtensionAndFirstRecord) {
  REQUIRE_TOK512();
  const Tokenizer& tok = tok512();
  const fs::path dir = test::temp_dir();
  DataOptions o;
  o.chat_template = ChatFormat::ChatML;
  const auto format_of = [&](const std::string& name, const std::string& contents) {
    return load_dataset(write(dir, name, contents), tok, o).format;
  };
  EXPECT_EQ(format_of("a.json", R"([{"instruction": "x", "output": "y"}])"), DataFormat::Alpaca);
  EXPECT_EQ(format_of("i.jsonl", R"({"input": "x", "output": "y"})"), DataFormat::InputOutput);
  EXPECT_EQ(format_of("c.jsonl", kChatJsonl), DataFormat::Chat);
  EXPECT_EQ(format_of("s.json", kShareGptJson), DataFormat::ShareGpt);
  EXPECT_EQ(format_of("t.txt", R"({"input": "x", "output": "y"})"), DataFormat::Text);
  // JSON lines in a .json file.
  EXPECT_EQ(format_of("l.json",
                      "{\"input\": \"x\", \"output\": \"y\"}\n{\"input\": \"z\", "
                      "\"output\": \"w\"}\n"),
            DataFormat::InputOutput);

  const std::string msg = error_of(
      [&] { load_dataset(write(dir, "q.jsonl", R"({"question": "x", "answer": "y"})"), tok, o); });
  EXPECT_NE(msg.find("q.jsonl:1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("{answer, question}"), std::string::npos) << msg;
  EXPECT_NE(msg.find("alpaca, io, chat, sharegpt, text"), std::string::npos) << msg;
}

TEST(DataErrors, OneLineMessagesNameTheFileAndPlace) {
  REQUIRE_TOK512();
  const Tokenizer& tok = tok512();
  const fs::path dir = test::temp_dir();
  const auto error_for = [&](const std::string& name, const std::string& contents,
                             DataOptions o = {}) {
    const std::string msg = error_of([&] { load_dataset(write(dir, name, contents), tok, o); });
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    EXPECT_NE(msg.find(name), std::string::npos) << msg;
    return msg;
  };
  const auto has = [](const std::string& msg, const std::string& part) {
    EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
  };
  const std::string ok = R"({"instruction": "x", "output": "y"})";
  DataOptions alpaca, chat, chat_format;
  alpaca.format = DataFormat::Alpaca;
  chat.chat_template = chat_format.chat_template = ChatFormat::ChatML;
  chat_format.format = DataFormat::Chat;

  has(error_for("bad.jsonl", ok + "\n" + ok + "\n{\"instruction\": \"x\",\n"),
      "bad.jsonl:3: malformed JSON");
  has(error_for("bad.json", "[\n" + ok + ",\n" + ok + ",\n  {\"instruction\" \"x\"}\n]"),
      "bad.json:4: malformed JSON");
  has(error_for("miss.json", "[" + ok + R"(, {"instruction": "x"}])"),
      "miss.json: record 2: missing field 'output'");
  has(error_for("type.jsonl", ok + "\n\n" + R"({"instruction": "x", "output": 3})"),
      "type.jsonl:3: field 'output' must be a string, got number");
  has(error_for("hist.json", R"([{"instruction": "x", "output": "y", "history": [["a"]]}])"),
      "field 'history[0]' must be a [user, assistant] pair");
  has(error_for("obj.json", R"([["x", "y"]])", alpaca),
      "obj.json: record 1: expected a JSON object, got array");
  has(error_for("empty.json", "[]"), "no examples");
  has(error_for("empty.jsonl", "\n\n"), "no examples");
  has(error_for("skip.jsonl", R"({"instruction": "x", "output": ""})"), "no examples");
  has(error_for("empty.txt", ""), "no examples");
  has(error_for("wrong.jsonl", ok, chat_format), "wrong.jsonl:1: missing field 'messages'");
  has(error_for("role.jsonl", R"({"messages": [{"role": "bot", "content": "x"}]})", chat),
      "role.jsonl:1: unknown role 'bot' in field 'messages[0].role'");
  has(error_for("srole.json", R"([{"conversations": [{"from": "model", "value": "x"}]}])", chat),
      "expected system, human, user, gpt or assistant");
  has(error_for(
          "sys.jsonl",
          R"({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]})",
          chat),
      "field 'messages[1]' is a system message after the first");
  has(error_for("content.jsonl", R"({"messages": [{"role": "user", "content": ["x"]}]})", chat),
      "field 'messages[0].content' must be a string, got array");
  has(error_for("nocontent.jsonl", R"({"messages": [{"role": "user"}]})", chat),
      "missing field 'messages[0].content'");

  const std::string gone = error_of([&] { load_dataset(dir / "absent.json", tok, {}); });
  EXPECT_NE(gone.find("absent.json"), std::string::npos) << gone;
  const std::string folder = error_of([&] { load_dataset(dir, tok, {}); });
  EXPECT_NE(folder.find(dir.string()), std::string::npos) << folder;
}

// The shared instruction sets, on the tokenizer every checkout has.
TEST(DataRealFiles, AlpacaDemoAndLimaLoadWithTheirRecordCounts) {
  QL_REQUIRE_DATA("instruct/alpaca_en_demo.json");
  QL_REQUIRE_DATA("instruct/lima.json");
  REQUIRE_TOK512();
  const Tokenizer& tok = tok512();
  for (const auto& [name, records] :
       {std::pair{"instruct/alpaca_en_demo.json", 999}, std::pair{"instruct/lima.json", 1029}}) {
    const Dataset d = load_dataset(test::data_dir() / name, tok, {});
    SCOPED_TRACE(name);
    EXPECT_EQ(d.format, DataFormat::Alpaca);
    EXPECT_EQ(d.stats.records, records);
    EXPECT_EQ(int64_t(d.examples.size()), records - d.stats.skipped);
    EXPECT_GT(int64_t(d.examples.size()), records * 9 / 10);
    int64_t tokens = 0, targets = 0;
    for (const Example& ex : d.examples) {
      expect_well_formed(ex);
      EXPECT_LE(int64_t(ex.tokens.size()), DataOptions{}.max_seq_len);
      tokens += int64_t(ex.tokens.size());
      targets += ex.target_count();
    }
    EXPECT_EQ(d.stats.tokens, tokens);
    EXPECT_EQ(d.stats.target_tokens, targets);
    EXPECT_NE(d.stats.summary().find(std::to_string(records) + " records"), std::string::npos);
  }
}

}  // namespace
}  // namespace qalora
