// llama2.c checkpoints through load_model: model.bin (header, then the weights in llama2.c's
// order) and the tokenizer.bin it picks up beside it.
#include <cstddef>
#include <cstdint>

#include "fuzz_util.h"
#include "qalora/model/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qalora;
  const std::filesystem::path dir = fuzz::fresh_dir();
  fuzz::write_parts(dir, fuzz::as_text(data, size), {"model.bin", "tokenizer.bin"});
  fuzz::accept_errors([&] {
    Model m = load_model(dir / "model.bin");
    if (m.tokenizer != nullptr) (void)m.tokenizer->encode("Hello world", true);
  });
  return 0;
}
