// safetensors: one file through SafetensorsFile (selector byte even), or a sharded set
// (selector byte odd): model.safetensors.index.json and two shards read as the Hugging Face
// folder loader reads them (HfWeights), every tensor fetched by name.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "model/hf_folder.h"
#include "qalora/io/safetensors.h"

namespace {

using namespace qalora;

void read_single(const std::filesystem::path& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  (void)f.metadata();
  for (const StTensorInfo& t : f.tensors()) {
    (void)f.find(t.name);
    (void)f.data(t);
    // Non-float dtypes are refused with an Error: expected.
    fuzz::accept_errors([&] { (void)f.load(t).decoded(); });
    fuzz::accept_errors([&] { (void)f.load_f32(t); });
  }
}

void read_sharded(const std::filesystem::path& dir) {
  const hf::HfWeights w(dir);
  for (const SourceTensor& t : w.source_tensors()) {
    (void)w.file_of(t.name);
    fuzz::accept_errors([&] { (void)w.get(t.name, t.shape); });
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::filesystem::path dir = fuzz::fresh_dir();
  const std::string_view input = fuzz::as_text(data + 1, size - 1);
  fuzz::accept_errors([&] {
    if (data[0] % 2 == 0) {
      read_single(fuzz::write_file(dir, "model.safetensors", input));
    } else {
      fuzz::write_parts(dir, input,
                        {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                         "model-00002-of-00002.safetensors"});
      read_sharded(dir);
    }
  });
  return 0;
}
