#include "fixtures.h"

#include <cstdio>
#include <memory>

#include "model/random_model.h"
#include "qalora/quant/quantize_model.h"

namespace qalora::fuzz {

TokenizerData tiny_tokenizer_data() {
  TokenizerData d;
  d.kind = TokenizerKind::SentencePiece;
  d.tokens = {"<unk>", "<s>", "</s>"};
  d.types = {TokenType::Unknown, TokenType::Control, TokenType::Control};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    d.tokens.push_back(buf);
    d.types.push_back(TokenType::Byte);
  }
  for (const char* piece :
       {"\xe2\x96\x81", "\xe2\x96\x81Hello", "\xe2\x96\x81the", "e", "t", "a", "o",
        "\xe2\x96\x81"
        "a",
        "er", "in", "on", "an", "re", "s", "l"}) {
    d.tokens.push_back(piece);
    d.types.push_back(TokenType::Normal);
  }
  for (const char* marker : {"<|im_start|>", "<|im_end|>"}) {
    d.tokens.push_back(marker);
    d.types.push_back(TokenType::Control);
  }
  // Longer pieces merge first.
  for (const std::string& t : d.tokens) d.scores.push_back(static_cast<float>(t.size()));
  d.unk_id = 0, d.bos_id = 1, d.eos_id = 2;
  d.chat_template =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
      "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}";
  return d;
}

const Tokenizer& tiny_tokenizer() {
  static const Tokenizer tok(tiny_tokenizer_data());
  return tok;
}

namespace {

Model make_tiny_model(bool quantized) {
  test::RandomModelShape shape;
  shape.vocab = tiny_tokenizer().vocab_size();
  // As small as a GPTQ checkpoint can pack (rows and columns fill int32 words at 4 bits), so
  // that seeds of every format stay a few kilobytes.
  shape.dim = 8, shape.hidden = 16, shape.layers = 1, shape.heads = 1, shape.kv_heads = 1;
  shape.head_dim = 8, shape.context = 32, shape.tied = true;
  Model m = test::make_random_model(shape, 7);
  m.tokenizer = std::make_shared<const Tokenizer>(tiny_tokenizer_data());
  if (quantized) {
    QuantizeOptions q;
    q.group_size = 8;
    quantize_model(m, q, {});
  }
  return m;
}

}  // namespace

const Model& tiny_model(bool quantized) {
  static const Model dense = make_tiny_model(false);
  static const Model affine = make_tiny_model(true);
  return quantized ? affine : dense;
}

}  // namespace qalora::fuzz
