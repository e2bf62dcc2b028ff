#include "qalora/tokenizer/pretokenize.h"

#include <cstdint>

#include "qalora/tokenizer/unicode.h"

namespace qalora {
namespace {

constexpr const char* kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr const char* kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

enum Class : uint8_t { kOther, kLetter, kNumber, kSpace };

// One pass of a split regex over code points [begin, end) of `cls`/`cps`; every position is
// matched by some alternative because each code point falls in exactly one class.
class Splitter {
 public:
  Splitter(const std::vector<unicode::CodePoint>& cps, const std::vector<uint8_t>& cls)
      : cps_(cps), cls_(cls) {}

  // Returns the end of the match starting at i (always > i), for code points before `end`.
  size_t match(PreTokenizer pre, size_t i, size_t end) const {
    const bool llama_like = pre == PreTokenizer::Llama3 || pre == PreTokenizer::Qwen2;
    if (size_t n = contraction(i, end, llama_like)) return i + n;
    if (!llama_like) {
      for (Class c : {kLetter, kNumber, kOther}) {
        const size_t k = i + (cp(i) == ' ' ? 1 : 0);
        if (k < end && cls_[k] == c) return run(k, end, c);
      }
      return whitespace(i, end);
    }
    if (cls_[i] == kLetter) return run(i, end, kLetter);
    if (cls_[i] != kNumber && !is_newline(i) && i + 1 < end && cls_[i + 1] == kLetter)
      return run(i + 1, end, kLetter);
    if (cls_[i] == kNumber) {
      const size_t max_digits = pre == PreTokenizer::Llama3 ? 3 : 1;
      size_t j = i;
      while (j < end && j - i < max_digits && cls_[j] == kNumber) ++j;
      return j;
    }
    const size_t k = i + (cp(i) == ' ' ? 1 : 0);
    if (k < end && cls_[k] == kOther) {
      size_t j = run(k, end, kOther);
      while (j < end && is_newline(j)) ++j;
      return j;
    }
    // \s*[\r\n]+ : the longest whitespace prefix that ends in a newline.
    const size_t ws_end = run(i, end, kSpace);
    for (size_t j = ws_end; j > i; --j)
      if (is_newline(j - 1)) return j;
    return whitespace(i, end);
  }

 private:
  uint32_t cp(size_t i) const { return cps_[i].cp; }
  bool is_newline(size_t i) const { return cp(i) == '\r' || cp(i) == '\n'; }
  size_t run(size_t i, size_t end, Class c) const {
    while (i < end && cls_[i] == c) ++i;
    return i;
  }
  // 's 't 're 've 'm 'll 'd: code points matched, or 0.
  size_t contraction(size_t i, size_t end, bool ignore_case) const {
    if (cp(i) != '\'' || i + 1 >= end) return 0;
    const auto lower = [&](size_t k) -> uint32_t {
      const uint32_t c = cp(k);
      return ignore_case && c >= 'A' && c <= 'Z' ? c + 32 : c;
    };
    const uint32_t a = lower(i + 1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 >= end) return 0;
    const uint32_t b = lower(i + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
  }
  // \s+(?!\S)|\s+ : a whitespace run, leaving its last space to the word that follows.
  size_t whitespace(size_t i, size_t end) const {
    const size_t j = run(i, end, kSpace);
    if (j == end || j - i < 2) return j;
    return j - 1;
  }

  const std::vector<unicode::CodePoint>& cps_;
  const std::vector<uint8_t>& cls_;
};

}  // namespace

bool pre_tokenizer_from_name(std::string_view name, PreTokenizer& out) {
  if (name.empty() || name == "gpt2" || name == "default" || name == "gpt-2") {
    out = PreTokenizer::Gpt2;
  } else if (name == "llama3" || name == "llama-bpe" || name == "llama-v3" || name == "smaug-bpe" ||
             name == "dbrx") {
    out = PreTokenizer::Llama3;
  } else if (name == "qwen2" || name == "deepseek-r1-qwen") {
    out = PreTokenizer::Qwen2;
  } else if (name == "smollm" || name == "starcoder" || name == "refact") {
    out = PreTokenizer::SmolLm;
  } else {
    return false;
  }
  return true;
}

const char* pre_tokenizer_name(PreTokenizer pre) {
  switch (pre) {
    case PreTokenizer::Gpt2:
      return "gpt2";
    case PreTokenizer::Llama3:
      return "llama3";
    case PreTokenizer::Qwen2:
      return "qwen2";
    case PreTokenizer::SmolLm:
      return "smollm";
  }
  return "gpt2";
}

const char* pre_tokenizer_regex(PreTokenizer pre) {
  switch (pre) {
    case PreTokenizer::Llama3:
      return kLlama3Regex;
    case PreTokenizer::Qwen2:
      return kQwen2Regex;
    case PreTokenizer::Gpt2:
    case PreTokenizer::SmolLm:
      return kGpt2Regex;
  }
  return kGpt2Regex;
}

std::vector<std::string_view> pre_tokenize(std::string_view text, PreTokenizer pre) {
  const std::vector<unicode::CodePoint> cps = unicode::decode_utf8(text);
  std::vector<uint8_t> cls(cps.size());
  for (size_t i = 0; i < cps.size(); ++i) {
    const uint32_t c = cps[i].cp;
    cls[i] = unicode::is_letter(c)       ? kLetter
             : unicode::is_number(c)     ? kNumber
             : unicode::is_whitespace(c) ? kSpace
                                         : kOther;
  }
  const auto offset = [&](size_t i) { return i < cps.size() ? cps[i].offset : text.size(); };
  std::vector<std::string_view> out;
  const Splitter splitter(cps, cls);
  const PreTokenizer regex = pre == PreTokenizer::SmolLm ? PreTokenizer::Gpt2 : pre;
  const auto split = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end;) {
      const size_t j = splitter.match(regex, i, end);
      out.push_back(text.substr(offset(i), offset(j) - offset(i)));
      i = j;
    }
  };
  if (pre != PreTokenizer::SmolLm) {
    split(0, cps.size());
    return out;
  }
  // SmolLM (HF Digits(individual_digits=true) before ByteLevel): each number code point stands
  // alone and the regex never sees across it.
  size_t start = 0;
  for (size_t i = 0; i < cps.size(); ++i) {
    if (cls[i] != kNumber) continue;
    split(start, i);
    out.push_back(text.substr(cps[i].offset, cps[i].len));
    start = i + 1;
  }
  split(start, cps.size());
  return out;
}

}  // namespace qalora
