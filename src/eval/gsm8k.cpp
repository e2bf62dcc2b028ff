#include "qalora/eval/gsm8k.h"

#include <algorithm>
#include <cctype>

#include "qalora/core/error.h"
#include "qalora/eval/scorer.h"
#include "qalora/model/sampler.h"
#include "qalora/tokenizer/tokenizer.h"

namespace qalora {

namespace {

bool is_digit(char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; }
bool is_number_char(char c) { return is_digit(c) || c == '.' || c == ',' || c == '$'; }

}  // namespace

std::string gsm8k_prompt(std::span<const Gsm8kItem> shots, std::string_view question) {
  std::string prompt;
  for (const Gsm8kItem& shot : shots)
    prompt += "Question: " + shot.question + "\nAnswer: " + shot.answer + "\n\n";
  prompt += "Question: ";
  prompt += question;
  return prompt + "\nAnswer:";
}

std::string gsm8k_normalize(std::string_view answer) {
  std::string out;
  for (char c : answer)
    if (c != ',' && c != '$') out += c;
  const size_t b = out.find_first_not_of(" \t\n");
  if (b == std::string::npos) return {};
  out = out.substr(b, out.find_last_not_of(" \t\n") - b + 1);
  if (!out.empty() && out.back() == '.') out.pop_back();
  return out;
}

std::optional<std::string> gsm8k_marked_number(std::string_view text) {
  const size_t mark = text.find("####");
  if (mark == std::string_view::npos) return std::nullopt;
  size_t i = text.find_first_not_of(' ', mark + 4);
  if (i == std::string_view::npos) return std::nullopt;
  const size_t begin = i;
  if (text[i] == '-') ++i;
  while (i < text.size() && (is_digit(text[i]) || text[i] == '.' || text[i] == ',')) ++i;
  const std::string_view number = text.substr(begin, i - begin);
  if (std::none_of(number.begin(), number.end(), is_digit)) return std::nullopt;
  return std::string(number);
}

std::optional<std::string> gsm8k_last_number(std::string_view text) {
  std::optional<std::string> last;
  for (size_t i = 0; i < text.size();) {
    if (!is_number_char(text[i])) {
      ++i;
      continue;
    }
    const size_t begin = i > 0 && text[i - 1] == '-' ? i - 1 : i;
    while (i < text.size() && is_number_char(text[i])) ++i;
    const std::string_view run = text.substr(begin, i - begin);
    if (std::any_of(run.begin(), run.end(), is_digit)) last = std::string(run);
  }
  return last;
}

Generation generate_until(CachedSession& cache, const Tokenizer& tok,
                          Prompt prompt, std::span<const std::string> stops,
                          std::span<const int32_t> stop_tokens, int64_t max_new_tokens) {
  const int64_t room = cache.max_context() - max_new_tokens;
  QL_CHECK(max_new_tokens >= 1 && room >= 1, "--max-new-tokens must be in [1, ",
           cache.max_context() - 1, "] for a context of ", cache.max_context(), ", got ",
           max_new_tokens);
  QL_CHECK(!prompt.ids.empty(), "generate_until: empty prompt");
  Generation g;
  const int64_t drop = std::max<int64_t>(0, static_cast<int64_t>(prompt.ids.size()) - room);
  if (drop > 0) {
    prompt.ids.erase(prompt.ids.begin(), prompt.ids.begin() + drop);
    g.truncated = true;
  }
  const auto n = static_cast<int64_t>(prompt.ids.size());
  std::vector<int64_t> ends;
  if (prompt.prefix - drop > 0 && prompt.prefix - drop < n) ends.push_back(prompt.prefix - drop);
  ends.push_back(n);
  const auto cut_at_stop = [&] {
    size_t cut = std::string::npos;
    for (const std::string& s : stops) cut = std::min(cut, g.text.find(s));
    if (cut == std::string::npos) return false;
    g.text.resize(cut);
    return true;
  };

  std::vector<float> logits;
  cache.run(prompt.ids, ends, n - 1, logits);
  StreamDecoder decoder(tok, /*skip_special=*/true);
  while (g.tokens < max_new_tokens) {
    const int32_t token = argmax(logits);
    if (std::find(stop_tokens.begin(), stop_tokens.end(), token) != stop_tokens.end()) break;
    g.text += decoder.push(token);
    ++g.tokens;
    if (cut_at_stop()) return g;
    if (g.tokens == max_new_tokens) break;
    cache.append(token, logits);
  }
  g.text += decoder.flush();
  cut_at_stop();
  return g;
}

}  // namespace qalora
