#include "qalora/eval/tasks.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <numeric>
#include <nlohmann/json.hpp>
#include <random>
#include <utility>

#include "qalora/core/error.h"
#include "qalora/core/strings.h"
#include "qalora/core/hash.h"
#include "qalora/core/mapped_file.h"

namespace qalora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr std::array<std::pair<TaskKind, const char*>, 10> kTaskNames = {{
    {TaskKind::Mc, "mc"},
    {TaskKind::Arc, "arc"},
    {TaskKind::Hellaswag, "hellaswag"},
    {TaskKind::Piqa, "piqa"},
    {TaskKind::Boolq, "boolq"},
    {TaskKind::Winogrande, "winogrande"},
    {TaskKind::Mmlu, "mmlu"},
    {TaskKind::Cloze, "cloze"},
    {TaskKind::Gsm8k, "gsm8k"},
    {TaskKind::Ppl, "ppl"},
}};

// The format a task expects, for error messages.
const char* expected_format(TaskKind kind) {
  switch (kind) {
    case TaskKind::Arc:
      return "{query, choices, gold} or AI2's {question: {stem, choices}, answerKey}";
    case TaskKind::Hellaswag:
      return "{activity_label, ctx_a, ctx_b, endings, label}";
    case TaskKind::Winogrande:
      return "{context_options, continuation, gold}";
    case TaskKind::Cloze:
      return "{context, continuation}";
    case TaskKind::Gsm8k:
      return "{question, answer}";
    default:
      return "{query, choices, gold}";
  }
}

// One record of a JSON lines file and where it came from, for error messages.
struct Line {
  int64_t number;  // 1-based
  json value;
};

struct Where {
  TaskKind kind;
  const fs::path& path;
  int64_t line;
};

std::string at(const Where& w) {
  return cat(task_name(w.kind), ": ", w.path.string(), " line ", w.line);
}

std::vector<Line> read_json_lines(TaskKind kind, const fs::path& path) {
  QL_CHECK(fs::is_regular_file(path), task_name(kind), ": cannot open ", path.string(),
           ": no such file");
  const std::string text = read_file(path);
  std::vector<Line> lines;
  size_t begin = 0;
  for (int64_t number = 1; begin < text.size(); ++number) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    const std::string_view line(text.data() + begin, end - begin);
    begin = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    json value = json::parse(line, nullptr, /*allow_exceptions=*/false);
    QL_CHECK(!value.is_discarded(), task_name(kind), ": ", path.string(), " line ", number,
             ": malformed JSON (expected one object per line, ", expected_format(kind), ")");
    QL_CHECK(value.is_object(), task_name(kind), ": ", path.string(), " line ", number,
             ": expected a JSON object ", expected_format(kind), ", got ", value.type_name());
    lines.push_back({number, std::move(value)});
  }
  QL_CHECK(!lines.empty(), task_name(kind), ": ", path.string(), " holds no items (expected JSON lines ",
           expected_format(kind), ")");
  return lines;
}

const json& field(const json& obj, const char* key, const Where& w) {
  const auto it = obj.find(key);
  QL_CHECK(it != obj.end(), at(w), ": missing field \"", key, "\" (expected ",
           expected_format(w.kind), ")");
  return *it;
}

std::string string_field(const json& obj, const char* key, const Where& w) {
  const json& v = field(obj, key, w);
  QL_CHECK(v.is_string(), at(w), ": field \"", key, "\" must be a string, got ", v.type_name());
  return v.get<std::string>();
}

std::vector<std::string> strings_field(const json& obj, const char* key, const Where& w) {
  const json& v = field(obj, key, w);
  QL_CHECK(v.is_array() && v.size() >= 2, at(w), ": field \"", key,
           "\" must be an array of at least 2 strings, got ", v.is_array() ? "an array of " : "",
           v.is_array() ? std::to_string(v.size()) : v.type_name());
  std::vector<std::string> out;
  for (const json& s : v) {
    QL_CHECK(s.is_string(), at(w), ": field \"", key, "\" must hold strings, got ", s.type_name());
    out.push_back(s.get<std::string>());
  }
  return out;
}

// A gold index: an integer or a string of digits (HellaSwag's "label" is sometimes a string).
int64_t gold_field(const json& obj, const char* key, size_t n_choices, const Where& w) {
  const json& v = field(obj, key, w);
  const std::string text = v.is_string() ? v.get<std::string>() : "";
  int64_t gold = -1;
  if (v.is_number_integer()) {
    gold = v.get<int64_t>();
  } else if (!text.empty() && text.size() < 10 &&
             std::all_of(text.begin(), text.end(),
                         [](char c) { return std::isdigit(static_cast<unsigned char>(c)); })) {
    gold = std::stoll(text);
  } else {
    fail(at(w), ": field \"", key, "\" must be an integer index, got ", v.dump());
  }
  QL_CHECK(gold >= 0 && gold < static_cast<int64_t>(n_choices), at(w), ": ", key, " ", gold,
           " out of range for ", n_choices, " choices");
  return gold;
}

McItem shared_context_item(int64_t index, const std::string& context,
                           const std::vector<std::string>& choices, int64_t gold) {
  McItem item;
  item.index = index;
  item.gold = gold;
  for (const std::string& choice : choices) {
    item.contexts.push_back(context);
    item.continuations.push_back(std::string(" ").append(choice));
    item.norm_chars.push_back(utf8_length(choice));
  }
  return item;
}

McItem read_query_item(const json& obj, int64_t index, const Where& w) {
  const std::string query = string_field(obj, "query", w);
  const auto choices = strings_field(obj, "choices", w);
  return shared_context_item(index, query, choices, gold_field(obj, "gold", choices.size(), w));
}

// AI2's ARC layout; answerKey is a label such as "A" or "3".
McItem read_ai2_arc_item(const json& obj, int64_t index, const Where& w) {
  const json& question = field(obj, "question", w);
  QL_CHECK(question.is_object(), at(w), ": field \"question\" must be an object {stem, choices}");
  const std::string stem = string_field(question, "stem", w);
  const json& choices = field(question, "choices", w);
  QL_CHECK(choices.is_array() && choices.size() >= 2, at(w),
           ": field \"choices\" must be an array of at least 2 {text, label}");
  const std::string key = string_field(obj, "answerKey", w);
  std::vector<std::string> texts;
  int64_t gold = -1;
  for (const json& c : choices) {
    QL_CHECK(c.is_object(), at(w), ": each of \"choices\" must be an object {text, label}");
    if (string_field(c, "label", w) == key) gold = static_cast<int64_t>(texts.size());
    texts.push_back(string_field(c, "text", w));
  }
  QL_CHECK(gold >= 0, at(w), ": answerKey \"", key, "\" is none of the choices' labels");
  return shared_context_item(index, "Question: " + stem + "\nAnswer:", texts, gold);
}

McItem read_hellaswag_item(const json& obj, int64_t index, const Where& w) {
  const std::string context = string_field(obj, "activity_label", w) + ": " +
                              string_field(obj, "ctx_a", w) + " " +
                              capitalize(string_field(obj, "ctx_b", w));
  std::vector<std::string> endings = strings_field(obj, "endings", w);
  for (std::string& e : endings) e = hellaswag_preprocess(e);
  return shared_context_item(index, hellaswag_preprocess(context), endings,
                             gold_field(obj, "label", endings.size(), w));
}

McItem read_winogrande_item(const json& obj, int64_t index, const Where& w) {
  const auto options = strings_field(obj, "context_options", w);
  std::string continuation = string_field(obj, "continuation", w);
  continuation.insert(0, 1, ' ');
  McItem item;
  item.index = index;
  item.contexts = options;
  item.continuations.assign(options.size(), continuation);
  item.norm_chars.assign(options.size(), utf8_length(continuation) - 1);
  item.gold = gold_field(obj, "gold", options.size(), w);
  return item;
}

// RFC 4180 CSV: quoted fields may hold commas, newlines and doubled quotes.
std::vector<std::vector<std::string>> parse_csv(const std::string& text, const fs::path& path) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string cell;
  bool quoted = false;
  bool any = false;  // the current row has content (blank lines are skipped)
  const auto end_row = [&] {
    if (any) {
      row.push_back(std::move(cell));
      rows.push_back(std::move(row));
    }
    row.clear();
    cell.clear();
    any = false;
  };
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quoted) {
      if (c != '"') {
        cell += c;
      } else if (i + 1 < text.size() && text[i + 1] == '"') {
        cell += '"';
        ++i;
      } else {
        quoted = false;
      }
    } else if (c == '"') {
      quoted = any = true;
    } else if (c == ',') {
      row.push_back(std::move(cell));
      cell.clear();
      any = true;
    } else if (c == '\n' || c == '\r') {
      end_row();
    } else {
      cell += c;
      any = true;
    }
  }
  QL_CHECK(!quoted, "mmlu: ", path.string(), ": unterminated quoted field at the end of the file");
  end_row();
  return rows;
}

struct MmluRow {
  std::string question;
  std::vector<std::string> choices;
  int64_t answer;
};

std::vector<MmluRow> read_mmlu_csv(const fs::path& path) {
  QL_CHECK(fs::is_regular_file(path), "mmlu: cannot open ", path.string(), ": no such file");
  const auto rows = parse_csv(read_file(path), path);
  const std::vector<std::string> header = {"question", "choice0", "choice1",
                                           "choice2",  "choice3", "answer"};
  QL_CHECK(!rows.empty() && rows[0] == header, "mmlu: ", path.string(),
           ": expected the header question,choice0,choice1,choice2,choice3,answer");
  std::vector<MmluRow> out;
  for (size_t r = 1; r < rows.size(); ++r) {
    QL_CHECK(rows[r].size() == 6, "mmlu: ", path.string(), " row ", r, ": expected 6 fields, got ",
             rows[r].size());
    const std::string& a = rows[r][5];
    QL_CHECK(a.size() == 1 && a[0] >= '0' && a[0] <= '3', "mmlu: ", path.string(), " row ", r,
             ": answer must be an index 0-3, got \"", a, "\"");
    out.push_back({rows[r][0], {rows[r][1], rows[r][2], rows[r][3], rows[r][4]}, a[0] - '0'});
  }
  QL_CHECK(!out.empty(), "mmlu: ", path.string(), " holds no questions");
  return out;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
}

}  // namespace

const char* task_name(TaskKind kind) {
  for (const auto& [k, name] : kTaskNames)
    if (k == kind) return name;
  return "?";
}

TaskKind parse_task(std::string_view name) {
  std::string known;
  for (const auto& [kind, n] : kTaskNames) {
    if (name == n) return kind;
    known += known.empty() ? n : cat(", ", n);
  }
  fail("unknown task \"", name, "\" (known: ", known, ")");
}

bool is_multiple_choice(TaskKind kind) {
  return kind != TaskKind::Cloze && kind != TaskKind::Gsm8k && kind != TaskKind::Ppl;
}

bool reports_acc_norm(TaskKind kind) {
  return kind == TaskKind::Mc || kind == TaskKind::Arc || kind == TaskKind::Hellaswag ||
         kind == TaskKind::Piqa;
}

bool uses_shots(TaskKind kind) { return kind == TaskKind::Mmlu || kind == TaskKind::Gsm8k; }

std::vector<McItem> read_mc_task(TaskKind kind, const fs::path& path) {
  QL_CHECK(is_multiple_choice(kind) && kind != TaskKind::Mmlu, task_name(kind),
           " is not a multiple-choice task read from JSON lines");
  std::vector<McItem> items;
  for (const Line& line : read_json_lines(kind, path)) {
    const Where w{kind, path, line.number};
    const auto index = static_cast<int64_t>(items.size());
    switch (kind) {
      case TaskKind::Hellaswag:
        items.push_back(read_hellaswag_item(line.value, index, w));
        break;
      case TaskKind::Winogrande:
        items.push_back(read_winogrande_item(line.value, index, w));
        break;
      case TaskKind::Arc:
        items.push_back(line.value.contains("answerKey") ? read_ai2_arc_item(line.value, index, w)
                                                         : read_query_item(line.value, index, w));
        break;
      default:
        items.push_back(read_query_item(line.value, index, w));
    }
  }
  return items;
}

std::string hellaswag_preprocess(std::string_view text) {
  std::string s(trim(text));
  replace_all(s, " [title]", ". ");
  std::string out;
  // Non-greedy "\[.*?\]": from each '[' to the next ']'; an unclosed '[' stays.
  for (size_t i = 0; i < s.size(); ++i) {
    const size_t close = s[i] == '[' ? s.find(']', i) : std::string::npos;
    if (close != std::string::npos) {
      i = close;
    } else {
      out += s[i];
    }
  }
  replace_all(out, "  ", " ");
  return out;
}

std::string capitalize(std::string_view text) {
  std::string out(text);
  for (size_t i = 0; i < out.size(); ++i) {
    const auto c = static_cast<unsigned char>(out[i]);
    if (c < 0x80) out[i] = static_cast<char>(i == 0 ? std::toupper(c) : std::tolower(c));
  }
  return out;
}

int64_t utf8_length(std::string_view text) {
  return std::count_if(text.begin(), text.end(),
                       [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; });
}

const char* mmlu_category(std::string_view subject) {
  static const std::vector<std::pair<std::string_view, const char*>> kCategories = {
      {"abstract_algebra", "stem"},
      {"anatomy", "stem"},
      {"astronomy", "stem"},
      {"business_ethics", "other"},
      {"clinical_knowledge", "other"},
      {"college_biology", "stem"},
      {"college_chemistry", "stem"},
      {"college_computer_science", "stem"},
      {"college_mathematics", "stem"},
      {"college_medicine", "other"},
      {"college_physics", "stem"},
      {"computer_security", "stem"},
      {"conceptual_physics", "stem"},
      {"econometrics", "social_sciences"},
      {"electrical_engineering", "stem"},
      {"elementary_mathematics", "stem"},
      {"formal_logic", "humanities"},
      {"global_facts", "other"},
      {"high_school_biology", "stem"},
      {"high_school_chemistry", "stem"},
      {"high_school_computer_science", "stem"},
      {"high_school_european_history", "humanities"},
      {"high_school_geography", "social_sciences"},
      {"high_school_government_and_politics", "social_sciences"},
      {"high_school_macroeconomics", "social_sciences"},
      {"high_school_mathematics", "stem"},
      {"high_school_microeconomics", "social_sciences"},
      {"high_school_physics", "stem"},
      {"high_school_psychology", "social_sciences"},
      {"high_school_statistics", "stem"},
      {"high_school_us_history", "humanities"},
      {"high_school_world_history", "humanities"},
      {"human_aging", "other"},
      {"human_sexuality", "social_sciences"},
      {"international_law", "humanities"},
      {"jurisprudence", "humanities"},
      {"logical_fallacies", "humanities"},
      {"machine_learning", "stem"},
      {"management", "other"},
      {"marketing", "other"},
      {"medical_genetics", "other"},
      {"miscellaneous", "other"},
      {"moral_disputes", "humanities"},
      {"moral_scenarios", "humanities"},
      {"nutrition", "other"},
      {"philosophy", "humanities"},
      {"prehistory", "humanities"},
      {"professional_accounting", "other"},
      {"professional_law", "humanities"},
      {"professional_medicine", "other"},
      {"professional_psychology", "social_sciences"},
      {"public_relations", "social_sciences"},
      {"security_studies", "social_sciences"},
      {"sociology", "social_sciences"},
      {"us_foreign_policy", "social_sciences"},
      {"virology", "other"},
      {"world_religions", "humanities"},
  };
  for (const auto& [name, category] : kCategories)
    if (name == subject) return category;
  fail("mmlu: unknown subject \"", subject, "\" (expected one of the 57 MMLU subjects)");
}

std::string mmlu_question(std::string_view question, const std::vector<std::string>& choices) {
  std::string out(trim(question));
  for (size_t i = 0; i < choices.size(); ++i)
    out += cat("\n", static_cast<char>('A' + i), ". ", choices[i]);
  return out + "\nAnswer:";
}

std::vector<McItem> read_mmlu(const fs::path& folder, int64_t shots, int64_t limit_per_subject,
                              uint64_t seed) {
  QL_CHECK(shots >= 0, "mmlu: --shots must be >= 0, got ", shots);
  const fs::path test_dir = folder / "test";
  QL_CHECK(fs::is_directory(test_dir), "mmlu: ", folder.string(),
           " must be a folder holding test/<subject>_test.csv (and dev/ for shots), no ",
           test_dir.string());
  std::vector<std::string> subjects;
  const std::string suffix = "_test.csv";
  for (const auto& entry : fs::directory_iterator(test_dir)) {
    const std::string name = entry.path().filename().string();
    if (name.size() > suffix.size() && name.ends_with(suffix))
      subjects.push_back(name.substr(0, name.size() - suffix.size()));
  }
  QL_CHECK(!subjects.empty(), "mmlu: ", test_dir.string(), " holds no <subject>_test.csv files");
  std::sort(subjects.begin(), subjects.end());

  std::vector<McItem> items;
  for (size_t s = 0; s < subjects.size(); ++s) {
    const std::string& subject = subjects[s];
    mmlu_category(subject);  // rejects unknown subjects early
    std::string readable = subject;
    std::replace(readable.begin(), readable.end(), '_', ' ');
    std::string prefix =
        "The following are multiple choice questions (with answers) about " + readable + ".\n\n";
    if (shots > 0) {
      const fs::path dev_path = folder / "dev" / (subject + "_dev.csv");
      const auto dev = read_mmlu_csv(dev_path);
      QL_CHECK(shots <= static_cast<int64_t>(dev.size()), "mmlu: --shots ", shots, " exceeds the ",
               dev.size(), " examples of ", dev_path.string());
      for (int64_t k = 0; k < shots; ++k) {
        const MmluRow& row = dev[static_cast<size_t>(k)];
        prefix += mmlu_question(row.question, row.choices) + " " +
                  static_cast<char>('A' + row.answer) + "\n\n";
      }
    }
    const auto test = read_mmlu_csv(test_dir / (subject + suffix));
    for (size_t i : seeded_subset(test.size(), limit_per_subject, derive_seed(seed, s))) {
      McItem item;
      item.index = static_cast<int64_t>(i);
      item.group = subject;
      item.gold = test[i].answer;
      item.prefix_chars = prefix.size();
      const std::string context = prefix + mmlu_question(test[i].question, test[i].choices);
      for (char letter = 'A'; letter <= 'D'; ++letter) {
        item.contexts.push_back(context);
        item.continuations.push_back(std::string(" ") + letter);
        item.norm_chars.push_back(1);
      }
      items.push_back(std::move(item));
    }
  }
  return items;
}

std::vector<ClozeItem> read_cloze(const fs::path& path) {
  std::vector<ClozeItem> items;
  for (const Line& line : read_json_lines(TaskKind::Cloze, path)) {
    const Where w{TaskKind::Cloze, path, line.number};
    ClozeItem item{static_cast<int64_t>(items.size()), string_field(line.value, "context", w),
                   string_field(line.value, "continuation", w)};
    QL_CHECK(!item.continuation.empty(), at(w), ": field \"continuation\" is empty");
    items.push_back(std::move(item));
  }
  return items;
}

std::vector<Gsm8kItem> read_gsm8k(const fs::path& path) {
  std::vector<Gsm8kItem> items;
  for (const Line& line : read_json_lines(TaskKind::Gsm8k, path)) {
    const Where w{TaskKind::Gsm8k, path, line.number};
    Gsm8kItem item{static_cast<int64_t>(items.size()), string_field(line.value, "question", w),
                   string_field(line.value, "answer", w)};
    QL_CHECK(item.answer.find("####") != std::string::npos, at(w),
             ": field \"answer\" must end with \"#### <number>\"");
    items.push_back(std::move(item));
  }
  return items;
}

std::vector<size_t> seeded_subset(size_t n, int64_t limit, uint64_t seed) {
  std::vector<size_t> idx(n);
  std::iota(idx.begin(), idx.end(), size_t{0});
  if (limit <= 0 || static_cast<size_t>(limit) >= n) return idx;
  // Partial Fisher-Yates: the first `limit` slots become a uniform sample.
  std::mt19937_64 rng(seed);
  const auto k = static_cast<size_t>(limit);
  for (size_t i = 0; i < k; ++i) {
    std::uniform_int_distribution<size_t> pick(i, n - 1);
    std::swap(idx[i], idx[pick(rng)]);
  }
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  return idx;
}

}  // namespace qalora
