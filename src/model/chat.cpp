#include "qalora/model/chat.h"

#include <algorithm>
#include <array>

#include "qalora/core/error.h"
#include "qalora/core/strings.h"

namespace qalora {

namespace {

constexpr std::array<ChatFormat, 4> kFormats = {ChatFormat::ChatML, ChatFormat::Llama2,
                                                ChatFormat::Llama3, ChatFormat::Zephyr};

bool contains(std::string_view text, std::string_view what) {
  return text.find(what) != std::string_view::npos;
}

std::optional<ChatFormat> format_from_template(std::string_view tmpl) {
  if (contains(tmpl, "<|im_start|>")) return ChatFormat::ChatML;
  if (contains(tmpl, "<|start_header_id|>")) return ChatFormat::Llama3;
  if (contains(tmpl, "[INST]")) return ChatFormat::Llama2;
  if (contains(tmpl, "<|user|>")) return ChatFormat::Zephyr;
  return std::nullopt;
}

// A ChatML template that inserts a fixed system turn spells it as a string literal:
// '<|im_start|>system\n<text><|im_end|>'. The newline is a real one (GGUF) or the two
// characters \n (Jinja source in tokenizer_config.json).
std::string chatml_default_system(std::string_view tmpl) {
  constexpr std::string_view head = "<|im_start|>system";
  for (size_t at = tmpl.find(head); at != std::string_view::npos; at = tmpl.find(head, at + 1)) {
    std::string_view rest = tmpl.substr(at + head.size());
    if (rest.starts_with("\n")) {
      rest.remove_prefix(1);
    } else if (rest.starts_with("\\n")) {
      rest.remove_prefix(2);
    } else {
      continue;
    }
    const size_t end = rest.find("<|im_end|>");
    if (end == std::string_view::npos) continue;
    const std::string_view text = rest.substr(0, end);
    // Anything Jinja-like means the content comes from the messages, not a literal.
    if (text.empty() || text.find_first_of("'\"{}+") != std::string_view::npos) continue;
    return std::string(text);
  }
  return {};
}

}  // namespace

const char* chat_format_name(ChatFormat format) {
  switch (format) {
    case ChatFormat::ChatML:
      return "chatml";
    case ChatFormat::Llama2:
      return "llama2";
    case ChatFormat::Llama3:
      return "llama3";
    case ChatFormat::Zephyr:
      return "zephyr";
  }
  return "?";
}

ChatFormat parse_chat_format(std::string_view name) {
  for (ChatFormat f : kFormats)
    if (name == chat_format_name(f)) return f;
  fail("unknown chat template '", name, "': expected one of chatml, llama2, llama3, zephyr");
}

ChatTemplate::ChatTemplate(ChatFormat format, const Tokenizer& tok) : format_(format) {
  if (tok.bos_id() >= 0) bos_ = tok.piece(tok.bos_id());
  if (tok.eos_id() >= 0) eos_ = tok.piece(tok.eos_id());
  const std::string& tmpl = tok.data().chat_template;
  if (format == ChatFormat::ChatML && format_from_template(tmpl) == ChatFormat::ChatML)
    default_system_ = chatml_default_system(tmpl);

  std::vector<int32_t> stops;
  if (tok.eos_id() >= 0) stops.push_back(tok.eos_id());
  for (std::string_view marker : {"<|im_end|>", "<|eot_id|>", "<|end_of_text|>"}) {
    const int32_t id = tok.find_token(marker);
    if (id >= 0 && std::find(stops.begin(), stops.end(), id) == stops.end()) stops.push_back(id);
  }
  stop_tokens_ = std::move(stops);
}

std::optional<ChatTemplate> ChatTemplate::detect(const Tokenizer& tok) {
  std::optional<ChatFormat> format = format_from_template(tok.data().chat_template);
  if (!format && tok.find_token("<|im_start|>") >= 0) format = ChatFormat::ChatML;
  if (!format && tok.find_token("<|start_header_id|>") >= 0) format = ChatFormat::Llama3;
  if (!format) return std::nullopt;
  return ChatTemplate(*format, tok);
}

ChatTemplate ChatTemplate::with_format(ChatFormat format, const Tokenizer& tok) {
  return ChatTemplate(format, tok);
}

std::string ChatTemplate::render(std::span<const ChatMessage> messages,
                                 bool add_generation_prompt) const {
  std::string out;
  const auto append = [&out](auto&&... parts) { (out.append(std::string_view(parts)), ...); };
  const bool has_system = !messages.empty() && messages.front().role == "system";
  switch (format_) {
    case ChatFormat::ChatML:
      if (!has_system && !default_system_.empty())
        append("<|im_start|>system\n", default_system_, "<|im_end|>\n");
      for (const auto& m : messages)
        append("<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
      if (add_generation_prompt) append("<|im_start|>assistant\n");
      break;
    case ChatFormat::Llama2: {
      // The system prompt is folded into the first user turn; the template needs no
      // generation prompt because "[/INST]" already hands over to the assistant.
      const auto turns = messages.subspan(has_system ? 1 : 0);
      for (size_t i = 0; i < turns.size(); ++i) {
        std::string content = turns[i].content;
        if (i == 0 && has_system)
          content = "<<SYS>>\n" + messages.front().content + "\n<</SYS>>\n\n" + content;
        if (turns[i].role == "user") {
          append(bos_, "[INST] ", trim(content), " [/INST]");
        } else if (turns[i].role == "assistant") {
          append(" ", trim(content), " ", eos_);
        }
      }
      break;
    }
    case ChatFormat::Llama3:
      append(bos_);
      for (const auto& m : messages)
        append("<|start_header_id|>", m.role, "<|end_header_id|>\n\n", trim(m.content),
               "<|eot_id|>");
      if (add_generation_prompt) append("<|start_header_id|>assistant<|end_header_id|>\n\n");
      break;
    case ChatFormat::Zephyr:
      for (const auto& m : messages) append("<|", m.role, "|>\n", m.content, eos_, "\n");
      if (add_generation_prompt) append("<|assistant|>\n");
      break;
  }
  return out;
}

}  // namespace qalora
