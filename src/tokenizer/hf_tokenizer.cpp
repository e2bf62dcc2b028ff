// Hugging Face tokenizer.json (BPE models only) plus tokenizer_config.json and
// generation_config.json beside it. Byte-level BPE becomes TokenizerKind::Gpt2; BPE with byte
// fallback and U+2581 spaces (Llama-2 style) becomes SentencePiece, with scores derived from the
// merge ranks so that score order equals merge order.
#include <algorithm>
#include <nlohmann/json.hpp>

#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/tokenizer/bpe.h"

namespace qalora {
namespace {

using nlohmann::json;

json parse_json(const std::filesystem::path& path) {
  try {
    return json::parse(read_file(path));
  } catch (const json::exception& e) {
    fail(path.string(), ": expected valid JSON, got a parse error: ", e.what());
  }
}

// True when `node` or anything inside it is an object with "type": type.
bool has_component(const json& node, std::string_view type) {
  if (node.is_object()) {
    if (const auto it = node.find("type"); it != node.end() && it->is_string() && *it == type)
      return true;
    for (const auto& [key, child] : node.items())
      if (has_component(child, type)) return true;
  } else if (node.is_array()) {
    for (const auto& child : node)
      if (has_component(child, type)) return true;
  }
  return false;
}

// All objects of the given type inside `node`, in document order.
void find_components(const json& node, std::string_view type, std::vector<const json*>& out) {
  if (node.is_object()) {
    if (const auto it = node.find("type"); it != node.end() && it->is_string() && *it == type)
      out.push_back(&node);
    for (const auto& [key, child] : node.items()) find_components(child, type, out);
  } else if (node.is_array()) {
    for (const auto& child : node) find_components(child, type, out);
  }
}

// tokenizer_config.json spells a token as a string or as {"content": ...}.
std::string token_content(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return {};
}

PreTokenizer infer_pre_tokenizer(const json& pre, const std::string& p) {
  std::vector<const json*> splits;
  find_components(pre, "Split", splits);
  if (splits.empty()) {
    std::vector<const json*> digits;
    find_components(pre, "Digits", digits);
    if (!digits.empty()) {
      QL_CHECK(
          digits[0]->value("individual_digits", false), p,
          ": pre_tokenizer Digits.individual_digits: expected true, got false (not supported)");
      return PreTokenizer::SmolLm;
    }
    return PreTokenizer::Gpt2;
  }
  // contains/at, not operator[]: on a const json a missing key reads freed memory.
  const json::json_pointer regex_at("/pattern/Regex");
  const std::string regex = splits[0]->contains(regex_at) && splits[0]->at(regex_at).is_string()
                                ? splits[0]->at(regex_at).get<std::string>()
                                : "";
  for (PreTokenizer pt : {PreTokenizer::Gpt2, PreTokenizer::Llama3, PreTokenizer::Qwen2})
    if (regex == pre_tokenizer_regex(pt)) return pt;
  fail(p,
       ": pre_tokenizer Split.pattern.Regex: expected the GPT-2, Llama-3 or Qwen2 split regex, got "
       "\"",
       regex, "\"");
}

int32_t id_of(const TokenizerData& d, const std::string& piece) {
  if (piece.empty()) return -1;
  const auto it = std::find(d.tokens.begin(), d.tokens.end(), piece);
  return it == d.tokens.end() ? -1 : static_cast<int32_t>(it - d.tokens.begin());
}

// A value of a type the reader does not check for (nlohmann's type_error from get or value)
// still ends as one line naming the file: the readers below are function-try-blocks.
[[noreturn]] void fail_json_type(const std::filesystem::path& path, const json::exception& e) {
  fail(path.string(), ": a value has an unexpected JSON type: ", e.what());
}

void read_tokenizer_config(const std::filesystem::path& path, TokenizerData& d) try {
  const json cfg = parse_json(path);
  QL_CHECK(cfg.is_object(), path.string(), ": expected a JSON object, got ", cfg.type_name());
  const std::pair<const char*, int32_t*> ids[] = {{"bos_token", &d.bos_id},
                                                  {"eos_token", &d.eos_id},
                                                  {"unk_token", &d.unk_id},
                                                  {"pad_token", &d.pad_id}};
  for (const auto& [field, id] : ids) {
    if (!cfg.contains(field) || cfg[field].is_null()) continue;
    const std::string content = token_content(cfg[field]);
    const int32_t found = id_of(d, content);
    QL_CHECK(found >= 0, path.string(), ": ", field, ": expected a token of the vocabulary, got \"",
             content, "\"");
    *id = found;
  }
  if (cfg.contains("add_bos_token") && cfg["add_bos_token"].is_boolean())
    d.add_bos = cfg["add_bos_token"];
  if (cfg.contains("add_eos_token") && cfg["add_eos_token"].is_boolean())
    d.add_eos = cfg["add_eos_token"];
  if (cfg.contains("chat_template")) {
    const json& t = cfg["chat_template"];
    if (t.is_string()) {
      d.chat_template = t.get<std::string>();
    } else if (t.is_array()) {  // named templates: prefer "default"
      for (const json& named : t)
        if (named.is_object() && named.contains("template") &&
            (d.chat_template.empty() || named.value("name", "") == "default"))
          d.chat_template = named["template"].get<std::string>();
    }
  }
} catch (const json::exception& e) {
  fail_json_type(path, e);
}

void read_generation_config(const std::filesystem::path& path, TokenizerData& d) {
  const json cfg = parse_json(path);
  const auto first_id = [&](const char* field) -> int32_t {
    if (!cfg.is_object() || !cfg.contains(field)) return -1;
    const json& v = cfg[field];
    const json& first = v.is_array() && !v.empty() ? v[0] : v;
    return first.is_number_integer() ? first.get<int32_t>() : -1;
  };
  // tokenizer_config.json wins; this only fills what it left unset.
  if (d.bos_id < 0) d.bos_id = first_id("bos_token_id");
  if (d.eos_id < 0) d.eos_id = first_id("eos_token_id");
  if (d.pad_id < 0) d.pad_id = first_id("pad_token_id");
}

}  // namespace

TokenizerData read_hf_tokenizer(const std::filesystem::path& tokenizer_json) try {
  const std::string p = tokenizer_json.string();
  const json j = parse_json(tokenizer_json);
  QL_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), p,
           ": model: expected an object, got ",
           j.is_object() && j.contains("model") ? j["model"].type_name() : "nothing");
  const json& model = j["model"];
  const std::string model_type = model.value("type", "BPE");
  QL_CHECK(model_type == "BPE", p, ": model.type: expected \"BPE\", got \"", model_type,
           "\" (not supported)");
  QL_CHECK(model.contains("vocab") && model["vocab"].is_object(), p,
           ": model.vocab: expected an object mapping piece -> id, got ",
           model.contains("vocab") ? model["vocab"].type_name() : "nothing");
  QL_CHECK(model.contains("merges") && model["merges"].is_array(), p,
           ": model.merges: expected an array, got ",
           model.contains("merges") ? model["merges"].type_name() : "nothing");

  TokenizerData d;
  const json& vocab = model["vocab"];
  const json added = j.contains("added_tokens") && j["added_tokens"].is_array() ? j["added_tokens"]
                                                                                : json::array();
  constexpr int64_t kMaxId = int64_t{1} << 24;
  int64_t max_id = -1;
  for (const auto& [piece, id] : vocab.items()) {
    QL_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < kMaxId, p,
             ": model.vocab[\"", piece, "\"]: expected an id in 0..", kMaxId - 1, ", got ",
             id.dump());
    max_id = std::max(max_id, id.get<int64_t>());
  }
  for (size_t i = 0; i < added.size(); ++i) {
    const json& a = added[i];
    QL_CHECK(a.is_object() && a.contains("id") && a["id"].is_number_integer() &&
                 a["id"].get<int64_t>() >= 0 && a["id"].get<int64_t>() < kMaxId &&
                 a.contains("content") && a["content"].is_string(),
             p, ": added_tokens[", i, "]: expected {\"id\": 0..", kMaxId - 1,
             ", \"content\": string}, got ", a.dump());
    max_id = std::max(max_id, a["id"].get<int64_t>());
  }
  const auto n = static_cast<size_t>(max_id + 1);
  std::vector<bool> seen(n, false);
  d.tokens.resize(n);
  d.types.assign(n, TokenType::Normal);
  for (const auto& [piece, id] : vocab.items()) {
    d.tokens[id.get<size_t>()] = piece;
    seen[id.get<size_t>()] = true;
  }
  for (const json& a : added) {
    const auto id = a["id"].get<size_t>();
    d.tokens[id] = a["content"].get<std::string>();
    d.types[id] = a.value("special", false) ? TokenType::Control : TokenType::UserDefined;
    seen[id] = true;
  }
  const auto gap = std::find(seen.begin(), seen.end(), false);
  QL_CHECK(gap == seen.end(), p, ": model.vocab: expected ids 0..", n - 1,
           " without gaps, got no piece for id ", gap - seen.begin());

  std::vector<std::pair<std::string, std::string>> merges;
  const json& jm = model["merges"];
  merges.reserve(jm.size());
  for (size_t i = 0; i < jm.size(); ++i) {
    const json& m = jm[i];
    std::string_view left, right;
    if (m.is_string() && split_merge(m.get_ref<const std::string&>(), left, right)) {
      merges.emplace_back(left, right);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      fail(p, ": model.merges[", i, "]: expected \"left right\" or [\"left\", \"right\"], got ",
           m.dump());
    }
  }

  const json pre = j.contains("pre_tokenizer") ? j["pre_tokenizer"] : json();
  const json normalizer = j.contains("normalizer") ? j["normalizer"] : json();
  const bool byte_level = has_component(pre, "ByteLevel");
  const bool spm_like = model.value("byte_fallback", false) || has_component(pre, "Metaspace") ||
                        normalizer.dump().find(kSpmSpace) != std::string::npos;
  QL_CHECK(byte_level || spm_like, p,
           ": pre_tokenizer: expected ByteLevel (GPT-2 style) or a SentencePiece-",
           "style BPE (byte_fallback, U+2581 spaces), got ", pre.dump().substr(0, 200));

  if (byte_level) {
    d.kind = TokenizerKind::Gpt2;
    d.pre = pre_tokenizer_name(infer_pre_tokenizer(pre, p));
    d.add_space_prefix = false;
    d.add_bos = false;
    for (auto& [l, r] : merges) d.merges.push_back(l + " " + r);
  } else {
    d.kind = TokenizerKind::SentencePiece;
    // Merge rank r makes its piece score -r; pieces no merge produces rank after all of them.
    PieceMap ids;
    for (size_t i = 0; i < n; ++i) ids.emplace(d.tokens[i], static_cast<int32_t>(i));
    d.scores.assign(n, -static_cast<float>(merges.size()) - 1.0f);
    std::vector<bool> scored(n, false);
    for (size_t r = 0; r < merges.size(); ++r) {
      const std::string merged = merges[r].first + merges[r].second;
      const auto it = ids.find(merged);
      QL_CHECK(it != ids.end(), p, ": model.merges[", r, "]: merged piece \"", merged,
               "\" is not in the vocabulary");
      for (const std::string& part : {merges[r].first, merges[r].second})
        QL_CHECK(ids.contains(part), p, ": model.merges[", r, "]: piece \"", part,
                 "\" is not in the vocabulary");
      if (!scored[it->second]) d.scores[it->second] = -static_cast<float>(r);
      scored[it->second] = true;
    }
    for (size_t i = 0; i < n; ++i)
      if (d.types[i] == TokenType::Normal && parse_byte_piece(d.tokens[i]) >= 0)
        d.types[i] = TokenType::Byte;
    std::vector<const json*> metaspace;
    find_components(pre, "Metaspace", metaspace);
    const bool prepends = normalizer.dump().find("\"Prepend\"") != std::string::npos;
    const bool metaspace_prepends =
        !metaspace.empty() && metaspace[0]->value("add_prefix_space", true) &&
        metaspace[0]->value("prepend_scheme", std::string("always")) != "never";
    d.add_space_prefix = prepends || metaspace_prepends;
    d.add_bos = true;
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    d.unk_id = id_of(d, model["unk_token"].get<std::string>());
    if (d.unk_id >= 0 && d.types[d.unk_id] == TokenType::Control)
      d.types[d.unk_id] = TokenType::Unknown;
  }
  // Without tokenizer_config.json, a TemplateProcessing that starts with a special token shows
  // that it is added as BOS.
  const json post = j.contains("post_processor") ? j["post_processor"] : json();
  std::vector<const json*> templates;
  find_components(post, "TemplateProcessing", templates);
  if (!templates.empty()) {
    const json single = templates[0]->value("single", json::array());
    const bool starts_special = !single.empty() && single[0].contains("SpecialToken");
    d.add_bos = starts_special;
    if (starts_special) d.bos_id = id_of(d, single[0]["SpecialToken"].value("id", std::string()));
  }

  const auto dir = tokenizer_json.parent_path();
  if (std::filesystem::exists(dir / "tokenizer_config.json"))
    read_tokenizer_config(dir / "tokenizer_config.json", d);
  if (std::filesystem::exists(dir / "generation_config.json"))
    read_generation_config(dir / "generation_config.json", d);
  if (d.bos_id < 0) d.add_bos = false;
  validate_tokenizer_data(d, p);
  return d;
} catch (const json::exception& e) {
  fail_json_type(tokenizer_json, e);
}

}  // namespace qalora
