// Adapter folders through load_adapter: the native files (qalora_adapter.json + .safetensors)
// and PEFT's (adapter_config.json + adapter_model.safetensors), onto the tiny dense base (first
// byte even) or its RTN-quantized twin (odd), which QA-LoRA adapters need.
#include <cstddef>
#include <cstdint>

#include "fixtures.h"
#include "fuzz_util.h"
#include "qalora/adapters/adapter_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qalora;
  if (size == 0) return 0;
  const Model& base = fuzz::tiny_model(data[0] % 2 == 1);
  const std::filesystem::path dir = fuzz::fresh_dir();
  fuzz::write_parts(dir, fuzz::as_text(data + 1, size - 1),
                    {"qalora_adapter.json", "qalora_adapter.safetensors", "adapter_config.json",
                     "adapter_model.safetensors"});
  fuzz::accept_errors([&] { (void)load_adapter(dir, base); });
  return 0;
}
