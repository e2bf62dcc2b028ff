// Evaluation tasks (SPEC §7): the readers that turn a task's data files into items of text.
// Each multiple-choice item is a list of (context, continuation) pairs, one per choice, so the
// scorer (scorer.h) never needs to know which task it serves.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace qalora {

enum class TaskKind { Mc, Arc, Hellaswag, Piqa, Boolq, Winogrande, Mmlu, Cloze, Gsm8k, Ppl };

const char* task_name(TaskKind kind);  // "mc", "arc", ...
// Throws Error listing the known names when `name` is none of them.
TaskKind parse_task(std::string_view name);
// Multiple-choice tasks scored by log-likelihood (everything but cloze, gsm8k and ppl).
bool is_multiple_choice(TaskKind kind);
// Tasks with length-normalised accuracy: as the harness, not where it means nothing (one
// continuation for all choices, single letters) or only favours the longer answer (BoolQ's
// "yes" over "no").
bool reports_acc_norm(TaskKind kind);
// Tasks with few-shot prompts (--shots): mmlu and gsm8k.
bool uses_shots(TaskKind kind);

// Choice i is scored as the log-likelihood of continuations[i] after contexts[i]. Tasks with
// one shared context (most) repeat it; WinoGrande has one context per choice and a shared
// continuation. norm_chars[i] is the length in characters (UTF-8 code points) of choice i
// without its leading delimiter: acc_norm divides the log-likelihood by it.
struct McItem {
  int64_t index = 0;  // position in the data file (0-based), reported per item
  std::vector<std::string> contexts;
  std::vector<std::string> continuations;
  std::vector<int64_t> norm_chars;
  int64_t gold = 0;
  std::string group;        // MMLU subject; empty elsewhere
  size_t prefix_chars = 0;  // MMLU: the contexts start with the subject's header and shots
};

// Reads a multiple-choice task's JSON lines file:
//  mc, piqa, boolq: {query, choices[], gold}; context = query, continuation = " " + choice.
//  arc: the same, or AI2's original {question: {stem, choices: [{text, label}]}, answerKey}
//       with context "Question: <stem>\nAnswer:".
//  hellaswag: {activity_label, ctx_a, ctx_b, endings[], label} preprocessed as
//       lm-evaluation-harness does (hellaswag_preprocess; ctx_b capitalized).
//  winogrande: {context_options[], continuation, gold}: context = each option, continuation =
//       " " + the shared continuation.
// Errors name the file, the line, and the missing or wrong field (a file of another task's
// format fails on its first line), a gold index out of range, or an empty file.
std::vector<McItem> read_mc_task(TaskKind kind, const std::filesystem::path& path);

// lm-evaluation-harness's HellaSwag cleanup: trim, " [title]" -> ". ", drop bracketed tags
// such as "[header]", then "  " -> " ".
std::string hellaswag_preprocess(std::string_view text);
// Python's str.capitalize for ASCII letters: first character upper case, the rest lower case.
std::string capitalize(std::string_view text);
// Number of UTF-8 code points (Python's len of the decoded string).
int64_t utf8_length(std::string_view text);

// MMLU (SPEC §7): `folder` holds test/<subject>_test.csv and, for shots > 0,
// dev/<subject>_dev.csv (CSV with header question,choice0,choice1,choice2,choice3,answer;
// answer an index 0-3). Each item's context is lm-evaluation-harness's prompt: the subject's
// header "The following are multiple choice questions (with answers) about <subject>.\n\n",
// the first `shots` dev examples each followed by " <letter>\n\n", then the question with
// choices "A. ..".."D. .." and "Answer:"; continuations " A".." D". Items keep file order,
// subjects alphabetical, so that a subject's shared prefix is scored once.
// limit_per_subject > 0 keeps a seeded subset of each subject's test items.
std::vector<McItem> read_mmlu(const std::filesystem::path& folder, int64_t shots,
                              int64_t limit_per_subject, uint64_t seed);
// "stem", "humanities", "social_sciences" or "other" (the MMLU paper's map); throws for a
// subject that is not one of the 57.
const char* mmlu_category(std::string_view subject);
// One MMLU question as the harness formats it: "<question>\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:".
std::string mmlu_question(std::string_view question, const std::vector<std::string>& choices);

// cloze: {context, continuation} JSON lines (LAMBADA style); the continuation is appended to
// the context as written (it carries its own leading space).
struct ClozeItem {
  int64_t index = 0;
  std::string context;
  std::string continuation;
};
std::vector<ClozeItem> read_cloze(const std::filesystem::path& path);

// gsm8k: {question, answer} JSON lines; answer ends with "#### <number>".
struct Gsm8kItem {
  int64_t index = 0;
  std::string question;
  std::string answer;
};
std::vector<Gsm8kItem> read_gsm8k(const std::filesystem::path& path);

// `limit` indices of [0, n) drawn without replacement from `seed`, ascending; all of them when
// limit <= 0 or limit >= n.
std::vector<size_t> seeded_subset(size_t n, int64_t limit, uint64_t seed);

}  // namespace qalora
