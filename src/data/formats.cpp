// Reading training files (SPEC §6): format detection, JSON records with located errors, prompt
// rendering, and tokenization into Examples with their loss masks.
#include <algorithm>
#include <array>
#include <cctype>
#include <nlohmann/json.hpp>
#include <span>

#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/data/dataset.h"

namespace qalora {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr std::array<DataFormat, 6> kFormats = {DataFormat::Auto,        DataFormat::Alpaca,
                                                DataFormat::InputOutput, DataFormat::Chat,
                                                DataFormat::ShareGpt,    DataFormat::Text};

// The QLoRA reference's Alpaca prompt (SPEC §6), without and with an input.
constexpr std::string_view kAlpacaPreamble =
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n";
constexpr std::string_view kAlpacaPreambleWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n";

// One JSON record and where it came from, for error messages.
struct Record {
  json value;
  std::string where;  // "data.jsonl:12" or "data.json: record 7"
};

// 1-based line of the character at 0-based `offset`.
int64_t line_at(std::string_view text, size_t offset) {
  const size_t end = std::min(offset, text.size());
  return 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(end), '\n');
}

// nlohmann's message without its "[json.exception...] parse error at line L, column C: " head:
// the caller reports the place itself.
std::string parse_error_text(const json::exception& e) {
  const std::string_view what = e.what();
  const size_t colon = what.find(": ");
  return std::string(colon == std::string_view::npos ? what : what.substr(colon + 2));
}

std::vector<Record> read_records(const fs::path& path, const std::string& text) {
  const std::string name = path.string();
  std::vector<Record> records;
  const size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && text[first] == '[') {
    json doc;
    try {
      doc = json::parse(text);
    } catch (const json::parse_error& e) {
      // `byte` counts the characters read, the offending one included.
      fail(name, ":", line_at(text, e.byte > 0 ? e.byte - 1 : 0),
           ": malformed JSON: ", parse_error_text(e));
    } catch (const json::out_of_range& e) {
      // A number beyond double's range (1e999), for which nlohmann gives no position.
      fail(name, ": malformed JSON: ", parse_error_text(e));
    }
    records.reserve(doc.size());
    for (size_t i = 0; i < doc.size(); ++i)
      records.push_back({std::move(doc[i]), cat(name, ": record ", i + 1)});
    return records;
  }
  // JSON lines: one object per line; blank lines are allowed.
  size_t line = 0;
  for (size_t at = 0; at < text.size();) {
    size_t end = text.find('\n', at);
    if (end == std::string::npos) end = text.size();
    const std::string_view row = std::string_view(text).substr(at, end - at);
    at = end + 1;
    ++line;
    if (row.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    try {
      records.push_back({json::parse(row), cat(name, ":", line)});
    } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e999
      fail(name, ":", line, ": malformed JSON: ", parse_error_text(e),
           " (expected a JSON array or one JSON object per line)");
    }
  }
  return records;
}

void require_object(const Record& r) {
  QL_CHECK(r.value.is_object(), r.where, ": expected a JSON object, got ", r.value.type_name());
}

// obj[key] as a string; an absent or null optional field is "". `field` names it in messages.
std::string string_field(const json& obj, const char* key, const std::string& where,
                         const std::string& field, bool required) {
  const auto it = obj.find(key);
  if (it == obj.end() || (it->is_null() && !required)) {
    QL_CHECK(!required, where, ": missing field '", field, "'");
    return {};
  }
  QL_CHECK(it->is_string(), where, ": field '", field, "' must be a string, got ", it->type_name());
  return it->get<std::string>();
}

DataFormat detect_format(const Record& first) {
  require_object(first);
  const json& v = first.value;
  if (v.contains("instruction")) return DataFormat::Alpaca;
  if (v.contains("messages")) return DataFormat::Chat;
  if (v.contains("conversations")) return DataFormat::ShareGpt;
  if (v.contains("input") && v.contains("output")) return DataFormat::InputOutput;
  std::string keys;
  for (const auto& item : v.items()) keys += (keys.empty() ? "" : ", ") + item.key();
  fail(first.where, ": cannot tell the data format from the keys {", keys,
       "}: expected instruction (alpaca), input and output (io), messages (chat) or "
       "conversations (sharegpt), or name the format (alpaca, io, chat, sharegpt, text)");
}

// Loading state shared by the record readers.
struct Loader {
  const Tokenizer& tok;
  const DataOptions& opt;
  bool bos;  // sources and text windows start with BOS
  std::optional<ChatTemplate> chat;
  Dataset& out;

  // Keeps `ex` when it has something to train on (target[0] is cleared first).
  void add(Example ex, bool truncated) {
    if (!ex.target.empty()) ex.target[0] = 0;
    const int64_t trained = ex.target_count();
    if (trained == 0) {
      ++out.stats.skipped;
      return;
    }
    out.stats.truncated += truncated ? 1 : 0;
    out.stats.tokens += static_cast<int64_t>(ex.tokens.size());
    out.stats.target_tokens += trained;
    out.examples.push_back(std::move(ex));
  }

  // A prompt and its response under the length limits (see load_dataset).
  void add_pair(std::vector<int32_t> source, std::vector<int32_t> target) {
    const size_t keep = bos ? 1 : 0;  // BOS stays at the front of the source
    const auto drop_source_front = [&](size_t n) {
      const auto from = source.begin() + static_cast<std::ptrdiff_t>(keep);
      source.erase(from, from + static_cast<std::ptrdiff_t>(n));
    };
    bool truncated = false;
    const auto source_max = static_cast<size_t>(opt.source_max_len);
    const auto target_max = static_cast<size_t>(opt.target_max_len);
    const auto seq_max = static_cast<size_t>(opt.max_seq_len);
    if (source.size() > source_max) {
      drop_source_front(source.size() - source_max);
      truncated = true;
    }
    if (target.size() > target_max) {
      target.resize(target_max);
      truncated = true;
    }
    if (source.size() + target.size() > seq_max) {
      size_t excess = source.size() + target.size() - seq_max;
      const size_t from_source = std::min(excess, source.size() - keep);
      drop_source_front(from_source);
      excess -= from_source;
      target.resize(target.size() - std::min(excess, target.size()));
      truncated = true;
    }
    Example ex;
    ex.tokens = std::move(source);
    ex.target.assign(ex.tokens.size(), opt.train_on_source ? 1 : 0);
    ex.tokens.insert(ex.tokens.end(), target.begin(), target.end());
    ex.target.resize(ex.tokens.size(), 1);
    add(std::move(ex), truncated);
  }

  void add_response(const std::string& prompt, const std::string& response) {
    if (response.empty()) {  // nothing to learn but an immediate EOS
      ++out.stats.skipped;
      return;
    }
    std::vector<int32_t> target = tok.encode(response, /*add_bos=*/false);
    target.push_back(tok.eos_id());
    add_pair(tok.encode(prompt, bos), std::move(target));
  }

  void add_alpaca(const Record& r) {
    require_object(r);
    const json& v = r.value;
    const std::string instruction = string_field(v, "instruction", r.where, "instruction", true);
    const std::string input = string_field(v, "input", r.where, "input", false);
    const std::string output = string_field(v, "output", r.where, "output", true);
    std::string prompt(input.empty() ? kAlpacaPreamble : kAlpacaPreambleWithInput);
    if (const auto h = v.find("history"); h != v.end() && !h->is_null()) {
      QL_CHECK(h->is_array(), r.where,
               ": field 'history' must be an array of [user, assistant] pairs, got ",
               h->type_name());
      for (size_t i = 0; i < h->size(); ++i) {
        const json& turn = (*h)[i];
        QL_CHECK(turn.is_array() && turn.size() == 2, r.where, ": field 'history[", i,
                 "]' must be a [user, assistant] pair, got ",
                 turn.is_array() ? cat("an array of ", turn.size()) : turn.type_name());
        for (size_t j = 0; j < 2; ++j)
          QL_CHECK(turn[j].is_string(), r.where, ": field 'history[", i, "][", j,
                   "]' must be a string, got ", turn[j].type_name());
        prompt += cat("### Instruction:\n", turn[0].get<std::string>(),
                      "\n\n### Response: ", turn[1].get<std::string>(), "\n\n");
      }
    }
    prompt += cat("### Instruction:\n", instruction, "\n\n");
    if (!input.empty()) prompt += cat("### Input:\n", input, "\n\n");
    prompt += "### Response: ";
    add_response(prompt, output);
  }

  void add_input_output(const Record& r) {
    require_object(r);
    add_response(string_field(r.value, "input", r.where, "input", true),
                 string_field(r.value, "output", r.where, "output", true));
  }

  std::vector<ChatMessage> chat_messages(const Record& r, bool sharegpt) const {
    require_object(r);
    const char* list_key = sharegpt ? "conversations" : "messages";
    const char* role_key = sharegpt ? "from" : "role";
    const char* text_key = sharegpt ? "value" : "content";
    const auto list = r.value.find(list_key);
    QL_CHECK(list != r.value.end(), r.where, ": missing field '", list_key, "'");
    QL_CHECK(list->is_array(), r.where, ": field '", list_key, "' must be an array, got ",
             list->type_name());
    std::vector<ChatMessage> messages;
    for (size_t i = 0; i < list->size(); ++i) {
      const json& m = (*list)[i];
      const std::string field = cat(list_key, "[", i, "]");
      QL_CHECK(m.is_object(), r.where, ": field '", field, "' must be an object, got ",
               m.type_name());
      const std::string from = string_field(m, role_key, r.where, field + "." + role_key, true);
      std::string role;
      if (from == "system" || from == "user" || from == "assistant") role = from;
      if (sharegpt && from == "human") role = "user";
      if (sharegpt && from == "gpt") role = "assistant";
      QL_CHECK(!role.empty(), r.where, ": unknown role '", from, "' in field '", field, ".",
               role_key, "': expected ",
               sharegpt ? "system, human, user, gpt or assistant" : "system, user or assistant");
      QL_CHECK(role != "system" || i == 0, r.where, ": field '", field,
               "' is a system message after the first message; only the first may be one");
      messages.push_back({role, string_field(m, text_key, r.where, field + "." + text_key, true)});
    }
    return messages;
  }

  // Where each token's text starts in `text`, which `tokens` encodes: the decode is the exact
  // inverse of the encode, so the running length of the decoded text gives the offsets (a byte
  // token inside a multi-byte character starts where that character does).
  std::vector<size_t> token_starts(std::span<const int32_t> tokens, const std::string& text,
                                   const std::string& where) const {
    std::vector<size_t> starts;
    starts.reserve(tokens.size());
    StreamDecoder decoder(tok);
    std::string decoded;
    for (int32_t id : tokens) {
      starts.push_back(decoded.size());
      decoded += decoder.push(id);
    }
    decoded += decoder.flush();
    QL_CHECK(decoded == text, where,
             ": the tokenizer does not decode this conversation back to its text, so its "
             "assistant turns cannot be located");
    return starts;
  }

  // Encodes the whole rendered conversation, as the chat command does, and marks the tokens
  // of each assistant turn: those starting between the text rendered up to the generation
  // prompt and the text rendered with the turn, through the last stop token among them.
  void add_chat(const Record& r, const std::vector<ChatMessage>& messages) {
    const ChatTemplate& t = *chat;
    const std::string full = t.render(messages, /*add_generation_prompt=*/false);
    Example ex;
    ex.tokens = tok.encode(full, /*add_bos=*/false, /*parse_special=*/true);
    ex.target.assign(ex.tokens.size(), opt.train_on_source ? 1 : 0);
    const std::vector<size_t> starts = token_starts(ex.tokens, full, r.where);
    const std::vector<int32_t> stops = t.stop_tokens();
    const std::span<const ChatMessage> all(messages);
    size_t rendered = 0;  // text accounted for by the previous assistant turn
    size_t k = 0;         // first token not yet looked at
    for (size_t i = 0; i < messages.size(); ++i) {
      if (messages[i].role != "assistant") continue;
      const std::string prompt = t.render(all.first(i), /*add_generation_prompt=*/true);
      const std::string with_turn = t.render(all.first(i + 1), /*add_generation_prompt=*/false);
      QL_CHECK(
          prompt.size() >= rendered && with_turn.starts_with(prompt) && full.starts_with(with_turn),
          r.where, ": the ", chat_format_name(t.format()),
          " template renders this conversation differently as it grows (message ", i + 1,
          " changes the text before it), so its assistant turns cannot be located");
      rendered = with_turn.size();
      while (k < starts.size() && starts[k] < prompt.size()) ++k;
      size_t end = k;
      while (end < starts.size() && starts[end] < with_turn.size()) ++end;
      size_t last = end;  // without a stop token the whole turn is trained
      for (size_t j = end; j > k; --j) {
        if (std::find(stops.begin(), stops.end(), ex.tokens[j - 1]) != stops.end()) {
          last = j;
          break;
        }
      }
      std::fill(ex.target.begin() + static_cast<std::ptrdiff_t>(k),
                ex.target.begin() + static_cast<std::ptrdiff_t>(last), 1);
      k = end;
    }
    const bool truncated = ex.tokens.size() > static_cast<size_t>(opt.max_seq_len);
    if (truncated) {
      ex.tokens.resize(static_cast<size_t>(opt.max_seq_len));
      ex.target.resize(ex.tokens.size());
    }
    add(std::move(ex), truncated);
  }

  void add_text(const std::string& text) {
    const std::vector<int32_t> ids = tok.encode(text, /*add_bos=*/false);
    const size_t per_window = static_cast<size_t>(opt.max_seq_len) - (bos ? 1 : 0);
    for (size_t at = 0; at < ids.size(); at += per_window) {
      ++out.stats.records;
      Example ex;
      if (bos) ex.tokens.push_back(tok.bos_id());
      const auto from = ids.begin() + static_cast<std::ptrdiff_t>(at);
      ex.tokens.insert(ex.tokens.end(), from,
                       from + static_cast<std::ptrdiff_t>(std::min(per_window, ids.size() - at)));
      ex.target.assign(ex.tokens.size(), 1);
      add(std::move(ex), false);  // a final window of one token has no target and is skipped
    }
  }
};

}  // namespace

const char* data_format_name(DataFormat f) {
  switch (f) {
    case DataFormat::Auto:
      return "auto";
    case DataFormat::Alpaca:
      return "alpaca";
    case DataFormat::InputOutput:
      return "io";
    case DataFormat::Chat:
      return "chat";
    case DataFormat::ShareGpt:
      return "sharegpt";
    case DataFormat::Text:
      return "text";
  }
  return "?";
}

DataFormat parse_data_format(std::string_view name) {
  for (DataFormat f : kFormats)
    if (name == data_format_name(f)) return f;
  fail("unknown data format '", name, "': expected one of auto, alpaca, io, chat, sharegpt, text");
}

json data_options_to_json(const DataOptions& d) {
  return {{"format", data_format_name(d.format)},
          {"train_on_source", d.train_on_source},
          {"source_max_len", d.source_max_len},
          {"target_max_len", d.target_max_len},
          {"max_seq_len", d.max_seq_len},
          {"chat_template", d.chat_template ? chat_format_name(*d.chat_template) : "model"}};
}

DataOptions data_options_from_json(const json& j) {
  DataOptions d;
  if (!j.is_object()) return d;
  d.format = parse_data_format(j.value("format", "auto"));
  d.train_on_source = j.value("train_on_source", d.train_on_source);
  d.source_max_len = j.value("source_max_len", d.source_max_len);
  d.target_max_len = j.value("target_max_len", d.target_max_len);
  d.max_seq_len = j.value("max_seq_len", d.max_seq_len);
  const std::string chat = j.value("chat_template", "model");
  if (chat != "model") d.chat_template = parse_chat_format(chat);
  return d;
}

int64_t Example::target_count() const {
  return std::count_if(target.begin(), target.end(), [](uint8_t t) { return t != 0; });
}

std::string DataStats::summary() const {
  return cat(records, " records, ", truncated, " truncated, ", skipped, " skipped, ", tokens,
             " tokens (", target_tokens, " trained)");
}

Dataset load_dataset(const fs::path& path, const Tokenizer& tok, const DataOptions& options) {
  QL_CHECK(options.max_seq_len >= 2, "maximum sequence length must be at least 2, got ",
           options.max_seq_len);
  QL_CHECK(options.source_max_len >= 1, "source maximum length must be at least 1, got ",
           options.source_max_len);
  QL_CHECK(options.target_max_len >= 1, "target maximum length must be at least 1, got ",
           options.target_max_len);
  QL_CHECK(!fs::is_directory(path), path.string(), ": is a folder, expected a data file");
  const std::string text = read_file(path);

  Dataset data;
  data.source = path;
  DataFormat format = options.format;
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (format == DataFormat::Auto && ext == ".txt") format = DataFormat::Text;

  Loader loader{tok, options, tok.add_bos() && tok.bos_id() >= 0, std::nullopt, data};
  if (format == DataFormat::Text) {
    loader.add_text(text);
  } else {
    const std::vector<Record> records = read_records(path, text);
    QL_CHECK(!records.empty(), path.string(), ": no examples: the file holds no records");
    if (format == DataFormat::Auto) format = detect_format(records.front());
    const bool chat = format == DataFormat::Chat || format == DataFormat::ShareGpt;
    if (chat) {
      loader.chat = options.chat_template ? ChatTemplate::with_format(*options.chat_template, tok)
                                          : ChatTemplate::detect(tok);
      QL_CHECK(loader.chat, path.string(), ": ", data_format_name(format),
               " data is rendered with a chat template, and the model has none that is "
               "recognised: pass --chat-template chatml|llama2|llama3|zephyr");
    } else {
      QL_CHECK(tok.eos_id() >= 0, path.string(),
               ": the tokenizer has no EOS token to end the responses with");
    }
    for (const Record& r : records) {
      ++data.stats.records;
      switch (format) {
        case DataFormat::Alpaca:
          loader.add_alpaca(r);
          break;
        case DataFormat::InputOutput:
          loader.add_input_output(r);
          break;
        case DataFormat::Chat:
        case DataFormat::ShareGpt:
          loader.add_chat(r, loader.chat_messages(r, format == DataFormat::ShareGpt));
          break;
        case DataFormat::Auto:
        case DataFormat::Text:
          break;  // resolved above
      }
    }
  }
  data.format = format;
  QL_CHECK(!data.examples.empty(), path.string(), ": no examples to train on (",
           data.stats.summary(), ")");
  return data;
}

}  // namespace qalora
