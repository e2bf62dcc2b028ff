// Chat templates. Models ship a Jinja template; instead of a Jinja interpreter we recognise the
// few formats Llama-family models use and render them natively, matching Hugging Face's
// apply_chat_template output for those templates.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qalora/tokenizer/tokenizer.h"

namespace qalora {

enum class ChatFormat { ChatML, Llama2, Llama3, Zephyr };

const char* chat_format_name(ChatFormat format);  // "chatml", "llama2", "llama3", "zephyr"
// Throws Error listing the known names when `name` is none of them.
ChatFormat parse_chat_format(std::string_view name);

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

class ChatTemplate {
 public:
  // The format is recognised from the tokenizer's chat template text, or, when the model has
  // none, from the chat marker tokens in its vocabulary. nullopt when neither says.
  static std::optional<ChatTemplate> detect(const Tokenizer& tok);
  // An explicit format (--chat-template); the default system prompt still comes from the
  // model's template when it is of that format.
  static ChatTemplate with_format(ChatFormat format, const Tokenizer& tok);

  // The prompt text, with special tokens spelled out: encode it with add_bos = false and
  // parse_special = true (templates that want BOS write it themselves).
  std::string render(std::span<const ChatMessage> messages, bool add_generation_prompt) const;
  // Tokens that end the assistant's turn (present in the vocabulary), EOS included.
  std::vector<int32_t> stop_tokens() const { return stop_tokens_; }

  ChatFormat format() const { return format_; }
  // The system prompt the template inserts when the conversation has none (may be empty).
  const std::string& default_system() const { return default_system_; }

 private:
  ChatTemplate(ChatFormat format, const Tokenizer& tok);

  ChatFormat format_;
  std::string bos_;  // BOS/EOS piece text, for templates that spell them
  std::string eos_;
  std::string default_system_;
  std::vector<int32_t> stop_tokens_;
};

}  // namespace qalora
