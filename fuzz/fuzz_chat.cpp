// Chat templates: the first part is a model's chat template text (as a tokenizer carries it),
// the second a conversation, one message a line: the first character picks the role (s, u, a,
// anything else as the role name itself up to a tab) and the rest is the content. The template
// is recognised, then the conversation rendered in the recognised and in every explicit format
// and encoded as the chat command encodes it.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "fixtures.h"
#include "fuzz_util.h"
#include "qalora/model/chat.h"

namespace {

using namespace qalora;

std::vector<ChatMessage> parse_conversation(std::string_view text) {
  std::vector<ChatMessage> messages;
  while (!text.empty()) {
    const size_t end = std::min(text.find('\n'), text.size());
    std::string_view line = text.substr(0, end);
    text.remove_prefix(std::min(end + 1, text.size()));
    if (line.empty()) continue;
    ChatMessage m;
    if (line[0] == 's' || line[0] == 'u' || line[0] == 'a') {
      m.role = line[0] == 's' ? "system" : line[0] == 'u' ? "user" : "assistant";
      m.content = line.substr(1);
    } else {
      const size_t tab = std::min(line.find('\t'), line.size());
      m.role = line.substr(0, tab);
      m.content = line.substr(std::min(tab + 1, line.size()));
    }
    messages.push_back(std::move(m));
  }
  return messages;
}

void render_and_encode(const ChatTemplate& chat, const Tokenizer& tok,
                       const std::vector<ChatMessage>& messages) {
  for (const bool generation_prompt : {false, true}) {
    const std::string prompt = chat.render(messages, generation_prompt);
    (void)tok.decode(tok.encode(prompt, false, true));
  }
  (void)chat.stop_tokens();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string_view> parts = fuzz::split_parts(fuzz::as_text(data, size), 2);
  TokenizerData d = fuzz::tiny_tokenizer_data();
  d.chat_template = parts[0];
  fuzz::accept_errors([&] {
    const Tokenizer tok(std::move(d));
    const std::vector<ChatMessage> messages = parse_conversation(parts[1]);
    if (const auto detected = ChatTemplate::detect(tok))
      render_and_encode(*detected, tok, messages);
    for (const ChatFormat format :
         {ChatFormat::ChatML, ChatFormat::Llama2, ChatFormat::Llama3, ChatFormat::Zephyr})
      render_and_encode(ChatTemplate::with_format(format, tok), tok, messages);
  });
  return 0;
}
