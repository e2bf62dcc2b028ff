// Task readers (text of each benchmark's prompt), their errors, and the GSM8K answer matching.
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/eval/gsm8k.h"
#include "qalora/eval/tasks.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

fs::path write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

// The message of the Error `fn` throws (empty when it does not throw).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(EvalTasks, ParsesTaskNamesAndRejectsUnknownOnes) {
  EXPECT_EQ(parse_task("hellaswag"), TaskKind::Hellaswag);
  EXPECT_STREQ(task_name(parse_task("gsm8k")), "gsm8k");
  const std::string e = error_of([] { parse_task("hellaswog"); });
  EXPECT_NE(e.find("unknown task \"hellaswog\""), std::string::npos) << e;
  EXPECT_NE(e.find("winogrande"), std::string::npos) << e;  // lists the known ones
}

TEST(EvalTasks, QueryChoicesGoldFormat) {
  const fs::path f = write_text(test::temp_dir() / "mc.jsonl",
                                R"({"query": "Q: 2+2?", "choices": ["4", "fünf"], "gold": 0})"
                                "\n\n"
                                R"({"query": "Q: sky?", "choices": ["blue", "green", "red"], "gold": 2})"
                                "\n");
  const auto items = read_mc_task(TaskKind::Mc, f);
  ASSERT_EQ(items.size(), 2u);
  EXPECT_EQ(items[0].contexts, (std::vector<std::string>{"Q: 2+2?", "Q: 2+2?"}));
  EXPECT_EQ(items[0].continuations, (std::vector<std::string>{" 4", " fünf"}));
  EXPECT_EQ(items[0].norm_chars, (std::vector<int64_t>{1, 4}));  // characters, not bytes
  EXPECT_EQ(items[1].gold, 2);
  EXPECT_EQ(items[1].index, 1);
}

TEST(EvalTasks, ArcReadsAi2Layout) {
  const fs::path f = write_text(
      test::temp_dir() / "arc.jsonl",
      R"({"question": {"stem": "Which is a gas?", "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}]}, "answerKey": "B"})"
      "\n");
  const auto items = read_mc_task(TaskKind::Arc, f);
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].contexts[0], "Question: Which is a gas?\nAnswer:");
  EXPECT_EQ(items[0].continuations[1], " steam");
  EXPECT_EQ(items[0].gold, 1);
}

TEST(EvalTasks, HellaswagPreprocessAsTheHarness) {
  EXPECT_EQ(hellaswag_preprocess(" How to [title] Cook rice [header] well.  Now "),
            "How to. Cook rice well. Now");
  EXPECT_EQ(capitalize("a few WOMEN"), "A few women");
  const fs::path f = write_text(
      test::temp_dir() / "hs.jsonl",
      R"({"activity_label": "Pole vault", "ctx_a": "A man runs.", "ctx_b": "the MAN", "ctx": "", "endings": ["jumps [step] high.", "sits."], "label": "1"})"
      "\n");
  const auto items = read_mc_task(TaskKind::Hellaswag, f);
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].contexts[0], "Pole vault: A man runs. The man");
  EXPECT_EQ(items[0].continuations[0], " jumps high.");
  EXPECT_EQ(items[0].norm_chars[0], 11);
  EXPECT_EQ(items[0].gold, 1);
}

TEST(EvalTasks, WinograndeScoresTheSharedContinuation) {
  const fs::path f = write_text(
      test::temp_dir() / "wg.jsonl",
      R"({"context_options": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "was sad.", "gold": 1})"
      "\n");
  const auto items = read_mc_task(TaskKind::Winogrande, f);
  ASSERT_EQ(items.size(), 1u);
  EXPECT_EQ(items[0].contexts[1], "Ann beat Bo so Bo");
  EXPECT_EQ(items[0].continuations, (std::vector<std::string>{" was sad.", " was sad."}));
}

TEST(EvalTasks, ReaderErrorsNameFileLineAndField) {
  const fs::path dir = test::temp_dir();
  const fs::path hs = write_text(
      dir / "hs.jsonl",
      R"({"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["c", "d"], "label": 0})"
      "\n");
  std::string e = error_of([&] { read_mc_task(TaskKind::Arc, hs); });
  EXPECT_NE(e.find("hs.jsonl line 1: missing field \"query\""), std::string::npos) << e;
  const fs::path bad_gold = write_text(
      dir / "gold.jsonl", R"({"query": "q", "choices": ["a", "b"], "gold": 0})"
                          "\n"
                          R"({"query": "q", "choices": ["a", "b"], "gold": 2})");
  e = error_of([&] { read_mc_task(TaskKind::Piqa, bad_gold); });
  EXPECT_NE(e.find("line 2: gold 2 out of range for 2 choices"), std::string::npos) << e;
  const fs::path empty = write_text(dir / "empty.jsonl", "\n \n");
  e = error_of([&] { read_mc_task(TaskKind::Boolq, empty); });
  EXPECT_NE(e.find("holds no items"), std::string::npos) << e;
  const fs::path malformed = write_text(dir / "bad.jsonl", "{\"query\": \n");
  e = error_of([&] { read_mc_task(TaskKind::Mc, malformed); });
  EXPECT_NE(e.find("line 1: malformed JSON"), std::string::npos) << e;
  e = error_of([&] { read_gsm8k(bad_gold); });
  EXPECT_NE(e.find("missing field \"question\""), std::string::npos) << e;
}

// A two-subject MMLU folder; the CSV has quoted fields with commas, quotes and a newline.
fs::path write_mmlu(const fs::path& dir) {
  const std::string header = "question,choice0,choice1,choice2,choice3,answer\n";
  write_text(dir / "dev" / "anatomy_dev.csv",
             header + "Bones?,206,\"1,000\",12,3,0\n\"Say \"\"hi\"\"\nnow\",a,b,c,d,3\n");
  write_text(dir / "test" / "anatomy_test.csv", header + "Heart?,1,2,3,4,2\nLungs?,1,2,3,4,1\n");
  write_text(dir / "dev" / "virology_dev.csv", header + "V?,a,b,c,d,1\nW?,a,b,c,d,2\n");
  write_text(dir / "test" / "virology_test.csv", header + "Flu?,w,x,y,z,3\n");
  return dir;
}

TEST(EvalTasks, MmluPromptIsTheHarnessPrompt) {
  const fs::path dir = write_mmlu(test::temp_dir() / "mmlu");
  const auto items = read_mmlu(dir, 2, 0, 1);
  ASSERT_EQ(items.size(), 3u);
  const std::string expected =
      "The following are multiple choice questions (with answers) about anatomy.\n\n"
      "Bones?\nA. 206\nB. 1,000\nC. 12\nD. 3\nAnswer: A\n\n"
      "Say \"hi\"\nnow\nA. a\nB. b\nC. c\nD. d\nAnswer: D\n\n"
      "Heart?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:";
  EXPECT_EQ(items[0].contexts[0], expected);
  EXPECT_EQ(items[0].continuations, (std::vector<std::string>{" A", " B", " C", " D"}));
  EXPECT_EQ(items[0].gold, 2);
  EXPECT_EQ(items[0].group, "anatomy");
  EXPECT_EQ(expected.substr(0, items[0].prefix_chars).size(), items[0].prefix_chars);
  EXPECT_TRUE(expected.substr(items[0].prefix_chars).starts_with("Heart?"));
  EXPECT_EQ(items[2].group, "virology");
  EXPECT_EQ(std::string(mmlu_category("virology")), "other");
  EXPECT_EQ(std::string(mmlu_category("anatomy")), "stem");
  // 0-shot: the header alone, then the question.
  EXPECT_TRUE(read_mmlu(dir, 0, 0, 1)[0].contexts[0].ends_with("anatomy.\n\nHeart?\nA. 1\nB. "
                                                                "2\nC. 3\nD. 4\nAnswer:"));
}

TEST(EvalTasks, MmluErrors) {
  const fs::path dir = write_mmlu(test::temp_dir() / "mmlu");
  std::string e = error_of([&] { read_mmlu(dir, 3, 0, 1); });
  EXPECT_NE(e.find("--shots 3 exceeds the 2 examples of"), std::string::npos) << e;
  EXPECT_NE(e.find("anatomy_dev.csv"), std::string::npos) << e;
  write_text(dir / "test" / "virology_test.csv",
             "question,choice0,choice1,choice2,choice3,answer\nFlu?,w,x,y,z,4\n");
  e = error_of([&] { read_mmlu(dir, 0, 0, 1); });
  EXPECT_NE(e.find("answer must be an index 0-3, got \"4\""), std::string::npos) << e;
  e = error_of([&] { read_mmlu(dir / "nowhere", 0, 0, 1); });
  EXPECT_NE(e.find("test/<subject>_test.csv"), std::string::npos) << e;
}

TEST(EvalTasks, SeededSubsetIsReproducibleSortedAndDistinct) {
  const auto a = seeded_subset(1000, 50, 7), b = seeded_subset(1000, 50, 7);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, seeded_subset(1000, 50, 8));
  ASSERT_EQ(a.size(), 50u);
  EXPECT_TRUE(std::is_sorted(a.begin(), a.end()));
  EXPECT_EQ(std::adjacent_find(a.begin(), a.end()), a.end());
  EXPECT_EQ(seeded_subset(5, 0, 1).size(), 5u);
  EXPECT_EQ(seeded_subset(5, 9, 1).size(), 5u);
}

TEST(EvalGsm8k, AnswerExtractionAndNormalisation) {
  EXPECT_EQ(gsm8k_marked_number("so 3 + 4 = 7\n#### 1,234"), "1,234");
  EXPECT_EQ(gsm8k_normalize("1,234"), "1234");
  EXPECT_EQ(gsm8k_normalize(" $18. "), "18");
  EXPECT_EQ(gsm8k_marked_number("no mark 5"), std::nullopt);
  EXPECT_EQ(gsm8k_marked_number("#### -3.5 dollars"), "-3.5");
  EXPECT_EQ(gsm8k_last_number("She pays $12, then 3 more. Total: -$15."), "-$15.");
  EXPECT_EQ(gsm8k_normalize(*gsm8k_last_number("She pays $12, then 3 more. Total: -$15.")),
            "-15");
  EXPECT_EQ(gsm8k_last_number("no digits here."), std::nullopt);
  const Gsm8kItem shot{0, "1+1?", "2\n#### 2"};
  EXPECT_EQ(gsm8k_prompt(std::span(&shot, 1), "2+2?"),
            "Question: 1+1?\nAnswer: 2\n#### 2\n\nQuestion: 2+2?\nAnswer:");
}

}  // namespace
}  // namespace qalora
