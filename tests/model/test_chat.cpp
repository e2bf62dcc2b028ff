#include <gtest/gtest.h>

#include <vector>

#include "qalora/core/error.h"
#include "qalora/model/chat.h"

namespace qalora {
namespace {

// A tiny SentencePiece vocabulary holding the special tokens the templates refer to.
Tokenizer make_tokenizer(const std::vector<std::string>& extra, std::string chat_template) {
  TokenizerData d;
  d.tokens = {"<unk>", "<s>", "</s>"};
  d.types = {TokenType::Unknown, TokenType::Control, TokenType::Control};
  for (const auto& piece : extra) {
    d.tokens.push_back(piece);
    d.types.push_back(TokenType::Control);
  }
  d.scores.assign(d.tokens.size(), 0.0f);
  d.unk_id = 0;
  d.bos_id = 1;
  d.eos_id = 2;
  d.chat_template = std::move(chat_template);
  return Tokenizer(std::move(d));
}

// SmolLM2-135M-Instruct's template, as stored in its GGUF (real newlines inside the literals).
const char* kSmolLM2Template =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}";

TEST(ChatTemplate, ChatMLMatchesHuggingFace) {
  const Tokenizer tok = make_tokenizer({"<|im_start|>", "<|im_end|>"}, kSmolLM2Template);
  const auto t = ChatTemplate::detect(tok);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->format(), ChatFormat::ChatML);
  EXPECT_EQ(t->default_system(),
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face");

  const std::vector<ChatMessage> with_system = {{"system", "Be brief."}, {"user", "Hi"}};
  EXPECT_EQ(t->render(with_system, true),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");

  const std::vector<ChatMessage> conversation = {
      {"user", "Hi"}, {"assistant", "Hello!"}, {"user", "Bye"}};
  EXPECT_EQ(t->render(conversation, false),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
            "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n");

  const auto stops = t->stop_tokens();
  EXPECT_EQ(stops, (std::vector<int32_t>{2, tok.find_token("<|im_end|>")}));
}

TEST(ChatTemplate, DefaultSystemFromJinjaSourceWithEscapedNewlines) {
  const Tokenizer tok = make_tokenizer(
      {"<|im_start|>", "<|im_end|>"},
      "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
      "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}");
  EXPECT_EQ(ChatTemplate::detect(tok)->default_system(), "You are a helpful assistant.");
}

TEST(ChatTemplate, ChatMLWithoutDefaultSystem) {
  const Tokenizer tok =
      make_tokenizer({"<|im_start|>", "<|im_end|>"},
                     "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                     "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}");
  const auto t = ChatTemplate::detect(tok);
  EXPECT_EQ(t->default_system(), "");
  EXPECT_EQ(t->render(std::vector<ChatMessage>{{"user", "Hi"}}, true),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, Llama2) {
  const Tokenizer tok = make_tokenizer({}, "{{ bos_token + '[INST] ' + content + ' [/INST]' }}");
  const auto t = ChatTemplate::detect(tok);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->format(), ChatFormat::Llama2);
  const std::vector<ChatMessage> m = {
      {"system", "Sys"}, {"user", "Hi "}, {"assistant", "Hello"}, {"user", "Bye"}};
  EXPECT_EQ(t->render(m, true),
            "<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] Bye [/INST]");
}

TEST(ChatTemplate, Llama3FromVocabulary) {
  const Tokenizer tok =
      make_tokenizer({"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}, "");
  const auto t = ChatTemplate::detect(tok);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->format(), ChatFormat::Llama3);
  EXPECT_EQ(t->render(std::vector<ChatMessage>{{"system", "S"}, {"user", "U\n"}}, true),
            "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n");
  EXPECT_EQ(t->stop_tokens(), (std::vector<int32_t>{2, tok.find_token("<|eot_id|>")}));
}

TEST(ChatTemplate, Zephyr) {
  const Tokenizer tok = make_tokenizer({}, "{{ '<|user|>\\n' + message['content'] + eos_token }}");
  const auto t = ChatTemplate::detect(tok);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->format(), ChatFormat::Zephyr);
  EXPECT_EQ(t->render(std::vector<ChatMessage>{{"system", "S"}, {"user", "U"}}, true),
            "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n");
}

TEST(ChatTemplate, NoneDetectedAndExplicitOverride) {
  const Tokenizer tok = make_tokenizer({}, "");
  EXPECT_FALSE(ChatTemplate::detect(tok).has_value());
  const ChatTemplate t = ChatTemplate::with_format(parse_chat_format("chatml"), tok);
  EXPECT_EQ(t.format(), ChatFormat::ChatML);
  EXPECT_EQ(t.default_system(), "");
  EXPECT_THROW(parse_chat_format("alpaca"), Error);
}

}  // namespace
}  // namespace qalora
