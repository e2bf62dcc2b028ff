// Format detection for `load_model`, the tokenizer override, and the refusal of pickle files.
#include <array>
#include <fstream>

#include "qalora/core/error.h"
#include "qalora/model/model.h"

namespace qalora {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void refuse_pickle(const fs::path& path) {
  fail(path.string(),
       ": pickle checkpoints are not loaded (they can execute code); convert to safetensors "
       "(model.safetensors) first");
}

std::array<uint8_t, 4> file_magic(const fs::path& path) {
  std::array<uint8_t, 4> magic{};
  std::ifstream in(path, std::ios::binary);
  QL_CHECK(in, path.string(), ": cannot open for reading");
  in.read(reinterpret_cast<char*>(magic.data()), magic.size());
  return magic;  // zero-filled past the end of a short file
}

// torch.save writes a zip archive (PK\3\4) or, before PyTorch 1.6, a raw pickle stream that
// starts with the PROTO opcode 0x80 and protocol 2..5.
bool is_pickle(const fs::path& path, const std::array<uint8_t, 4>& magic) {
  const std::string ext = path.extension().string();
  if (path.filename() == "pytorch_model.bin" || ext == ".pt" || ext == ".pth" || ext == ".ckpt")
    return true;
  if (magic[0] == 0x80 && magic[1] >= 2 && magic[1] <= 5) return true;
  return magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4;
}

Model load_folder(const fs::path& dir, bool describe_only) {
  const bool has_safetensors =
      fs::exists(dir / "model.safetensors") || fs::exists(dir / "model.safetensors.index.json");
  if (!has_safetensors) {
    for (const char* pickle : {"pytorch_model.bin", "pytorch_model.bin.index.json"})
      if (fs::exists(dir / pickle)) refuse_pickle(dir / pickle);
  }
  QL_CHECK(fs::exists(dir / "config.json"), dir.string(),
           ": not a Hugging Face model folder (no config.json)");
  return load_hf_model(dir, describe_only);
}

Model load_file(const fs::path& path, bool describe_only) {
  const std::array<uint8_t, 4> magic = file_magic(path);
  if (is_pickle(path, magic)) refuse_pickle(path);
  const std::string ext = path.extension().string();
  if (ext == ".gguf" || (magic[0] == 'G' && magic[1] == 'G' && magic[2] == 'U' && magic[3] == 'F'))
    return load_gguf_model(path, describe_only);
  if (ext == ".safetensors") {
    // A safetensors file carries no config; its folder does.
    const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
    QL_CHECK(fs::exists(dir / "config.json"), path.string(),
             ": a safetensors file needs the config.json of its Hugging Face folder beside it");
    return load_hf_model(dir, describe_only);
  }
  if (ext == ".bin") return load_llama2c_model(path);
  fail(path.string(),
       ": unknown model format: expected a .gguf file, a Hugging Face folder with config.json, "
       "or a llama2.c .bin checkpoint");
}

std::shared_ptr<const Tokenizer> read_tokenizer_file(const fs::path& path, int64_t vocab_size) {
  const std::string ext = path.extension().string();
  if (ext == ".json") return std::make_shared<const Tokenizer>(read_hf_tokenizer(path));
  if (ext == ".model") return std::make_shared<const Tokenizer>(read_sentencepiece_model(path));
  if (ext == ".bin")
    return std::make_shared<const Tokenizer>(
        read_llama2c_tokenizer(path, static_cast<int32_t>(vocab_size)));
  if (ext == ".gguf") return load_gguf_tokenizer(path);
  fail(path.string(),
       ": unknown tokenizer file: expected tokenizer.json, tokenizer.model, a llama2.c tokenizer "
       ".bin, or a .gguf");
}

}  // namespace

Model load_model(const fs::path& path, const LoadOptions& options) {
  QL_CHECK(fs::exists(path), path.string(), ": no such file or folder");
  Model m = fs::is_directory(path) ? load_folder(path, options.describe_only)
                                   : load_file(path, options.describe_only);
  if (!options.tokenizer.empty())
    m.tokenizer = read_tokenizer_file(options.tokenizer, m.config.vocab_size);
  // A described model lacks group parameters by design; the loaders have checked every tensor
  // they read against the config already.
  if (!options.describe_only) m.validate();
  return m;
}

}  // namespace qalora
