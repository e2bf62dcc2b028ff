// GGUF: the reader (header, metadata, tensor table, every tensor's data) and then the model
// loader on the same file, which reads the hyperparameters and the tokenizer.
#include <cstddef>
#include <cstdint>
#include <string>
#include <variant>

#include "fuzz_util.h"
#include "qalora/io/gguf.h"
#include "qalora/model/model.h"

namespace {

using namespace qalora;

// Tensors up to this many elements are also decoded: enough for the seeds' tiny models, and
// bounded so that a tensor table repeating one big range does not make a run slow.
constexpr int64_t kDecodeLimit = int64_t{1} << 16;

void read_metadata(const GgufFile& f) {
  for (const auto& entry : f.metadata()) {
    const std::string& key = entry.first;  // named: clang 14 lambdas cannot capture a binding
    (void)f.value_type(key);
    // Each typed getter throws Error on a type mismatch: the expected outcome for most keys.
    fuzz::accept_errors([&] { (void)f.get_string(key); });
    fuzz::accept_errors([&] { (void)f.get_int(key); });
    fuzz::accept_errors([&] { (void)f.get_float_or(key, 0.0); });
    fuzz::accept_errors([&] { (void)f.get_bool_or(key, false); });
    if (std::holds_alternative<std::shared_ptr<GgufArray>>(entry.second)) {
      fuzz::accept_errors([&] { (void)f.get_string_array(key); });
      fuzz::accept_errors([&] { (void)f.get_float_array(key); });
      fuzz::accept_errors([&] { (void)f.get_int_array(key); });
    }
  }
}

void read_tensors(const GgufFile& f) {
  for (const GgufTensorInfo& info : f.tensors()) {
    (void)f.find_tensor(info.name);
    (void)f.tensor_data(info);
    fuzz::accept_errors([&] {
      const Tensor stored = f.load(info);
      if (stored.numel() <= kDecodeLimit) (void)f.load_f32(info).decoded();
    });
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = fuzz::write_file(fuzz::fresh_dir(), "model.gguf", fuzz::as_text(data, size));
  fuzz::accept_errors([&] {
    const GgufFile f = GgufFile::open(path);
    read_metadata(f);
    read_tensors(f);
    Model m = load_model(path);
    if (m.tokenizer != nullptr) (void)m.tokenizer->encode("Hello world", true);
  });
  return 0;
}
