// Tokenizer readers, by the first byte: 0 tokenizer.json (+ tokenizer_config.json and
// generation_config.json beside it), 1 SentencePiece tokenizer.model, 2 llama2.c tokenizer.bin
// (the vocabulary size in the next byte). What a reader accepts is then built into a Tokenizer
// and used, so that its tables are exercised.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "fuzz_util.h"
#include "qalora/tokenizer/tokenizer.h"

namespace {

using namespace qalora;

TokenizerData read(uint8_t selector, std::string_view input, const std::filesystem::path& dir) {
  switch (selector % 3) {
    case 0:
      fuzz::write_parts(dir, input,
                        {"tokenizer.json", "tokenizer_config.json", "generation_config.json"});
      return read_hf_tokenizer(dir / "tokenizer.json");
    case 1:
      return read_sentencepiece_model(fuzz::write_file(dir, "tokenizer.model", input));
    default: {
      if (input.empty()) return read_llama2c_tokenizer(fuzz::write_file(dir, "tok.bin", ""), 0);
      const auto vocab = static_cast<uint8_t>(input[0]);
      return read_llama2c_tokenizer(fuzz::write_file(dir, "tok.bin", input.substr(1)), vocab);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::filesystem::path dir = fuzz::fresh_dir();
  fuzz::accept_errors([&] {
    const Tokenizer tok(read(data[0], fuzz::as_text(data + 1, size - 1), dir));
    const std::vector<int32_t> ids =
        tok.encode("Hello, world! <|im_start|>  caf\xc3\xa9 \xe2\x96\x81x\n", true, true);
    (void)tok.decode(ids);
    (void)tok.decode(ids, true);
    StreamDecoder stream(tok);
    for (const int32_t id : ids) (void)stream.push(id);
    (void)stream.flush();
  });
  return 0;
}
