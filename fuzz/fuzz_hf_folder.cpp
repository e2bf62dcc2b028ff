// Hugging Face folders through load_model: config.json (with or without a quantization_config),
// quantize_config.json (qalora's native quantized folders and GPTQ checkpoints),
// model.safetensors and tokenizer.json. The first byte's low bit asks for describe_only (what
// `qalora info` loads).
#include <cstddef>
#include <cstdint>

#include "fuzz_util.h"
#include "qalora/model/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qalora;
  if (size == 0) return 0;
  const std::filesystem::path dir = fuzz::fresh_dir();
  fuzz::write_parts(dir, fuzz::as_text(data + 1, size - 1),
                    {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json"});
  LoadOptions options;
  options.describe_only = (data[0] & 1) != 0;
  fuzz::accept_errors([&] {
    Model m = load_model(dir, options);
    if (m.tokenizer != nullptr) (void)m.tokenizer->encode("Hello world", true);
  });
  return 0;
}
