#include <fstream>

#include "model/random_model.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/model/model.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

fs::path stories(const char* file) {
  return test::data_dir() / "models/stories260K" / file;
}

std::string load_error(const fs::path& path, const LoadOptions& options = {}) {
  try {
    load_model(path, options);
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    return msg;
  }
  return "no error";
}

fs::path write_bytes(const fs::path& path, const std::string& bytes) {
  write_file_atomic(path, bytes);
  return path;
}

TEST(LoadModelTest, RefusesPickleCheckpointsByNameAndByMagic) {
  const fs::path dir = test::temp_dir();
  const std::string refusal =
      ": pickle checkpoints are not loaded (they can execute code); convert to safetensors "
      "(model.safetensors) first";
  const fs::path files[] = {
      write_bytes(dir / "pytorch_model.bin", "anything"),
      write_bytes(dir / "adapter.pt", "x"),
      write_bytes(dir / "weights.pth", "x"),
      write_bytes(dir / "last.ckpt", "x"),
      write_bytes(dir / "legacy.bin", std::string("\x80\x02\x7d\x71", 4) + std::string(40, '\0')),
      write_bytes(dir / "zipped.bin", std::string("PK\x03\x04", 4) + std::string(40, '\0')),
  };
  for (const fs::path& f : files) EXPECT_EQ(load_error(f), f.string() + refusal);

  // A Hugging Face folder whose only weights are pickled, with or without config.json.
  const fs::path folder = dir / "hf";
  fs::create_directories(folder);
  write_bytes(folder / "pytorch_model.bin", "x");
  EXPECT_EQ(load_error(folder), (folder / "pytorch_model.bin").string() + refusal);
  write_bytes(folder / "config.json", "{}");
  EXPECT_EQ(load_error(folder), (folder / "pytorch_model.bin").string() + refusal);
}

TEST(LoadModelTest, DetectsHfFoldersAndTheirSafetensorsFile) {
  const fs::path dir = test::temp_dir() / "hf";
  const Model m = test::make_random_model({}, 21);
  save_hf_model(m, dir);
  write_bytes(dir / "pytorch_model.bin", "x");  // ignored when safetensors are present
  const Model a = load_model(dir);
  EXPECT_EQ(a.format, ModelFormat::HuggingFace);
  EXPECT_EQ(a.config.n_kv_heads, 3);
  const Model b = load_model(dir / "model.safetensors");
  EXPECT_EQ(b.format, ModelFormat::HuggingFace);
  EXPECT_EQ(b.parameter_count(), m.parameter_count());
}

TEST(LoadModelTest, ReportsUnknownAndMissingInputs) {
  const fs::path dir = test::temp_dir();
  EXPECT_NE(load_error(dir / "nope.gguf").find("no such file"), std::string::npos);
  const fs::path txt = write_bytes(dir / "notes.txt", "hello");
  EXPECT_NE(load_error(txt).find("unknown model format"), std::string::npos);
  EXPECT_NE(load_error(dir).find("no config.json"), std::string::npos);
  const fs::path lone = write_bytes(dir / "lone.safetensors", "x");
  EXPECT_NE(load_error(lone).find("needs the config.json"), std::string::npos);
}

TEST(LoadModelTest, LoadsLlama2cWithATokenizerOption) {
  QL_REQUIRE_DATA("models/stories260K/tok512.bin");
  const fs::path dir = test::temp_dir();
  // Copied alone, the checkpoint has no tokenizer beside it until the option names one.
  fs::copy_file(stories("stories260K.bin"), dir / "stories260K.bin");
  const Model bare = load_model(dir / "stories260K.bin");
  EXPECT_EQ(bare.format, ModelFormat::Llama2c);
  EXPECT_EQ(bare.tokenizer, nullptr);
  const Model m = load_model(dir / "stories260K.bin", {.tokenizer = stories("tok512.bin")});
  ASSERT_NE(m.tokenizer, nullptr);
  EXPECT_EQ(m.tokenizer->vocab_size(), 512);

  EXPECT_NE(load_error(dir / "stories260K.bin", {.tokenizer = dir / "tok.xml"})
                .find("unknown tokenizer file"),
            std::string::npos);
}

TEST(LoadModelTest, ReportsTheExactSizeOfATruncatedLlama2cCheckpoint) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  const fs::path path = test::temp_dir() / "cut.bin";
  const std::string raw = read_file(stories("stories260K.bin"));
  write_bytes(path, raw.substr(0, raw.size() - 4));
  const std::string msg = load_error(path);
  EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("should be 1056540 bytes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("got 1056536"), std::string::npos) << msg;
}

TEST(LoadModelTest, DetectsGgufByExtensionAndMagic) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.gguf");
  const fs::path renamed = test::temp_dir() / "stories.weights";
  fs::copy_file(stories("stories260K.gguf"), renamed);
  for (const fs::path& p : {stories("stories260K.gguf"), renamed}) {
    const Model m = load_model(p);
    EXPECT_EQ(m.format, ModelFormat::Gguf) << p;
    EXPECT_EQ(m.config.dim, 64) << p;
  }
}

}  // namespace
}  // namespace qalora
