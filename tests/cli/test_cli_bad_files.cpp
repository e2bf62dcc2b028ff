// Corrupted and inconsistent model files given to the CLI: each must end in exactly one
// "error: ..." line naming the file, and a non-zero exit (never a crash).
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "qalora/core/mapped_file.h"
#include "qalora/io/gguf.h"
#include "qalora/model/model.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

const char* kGguf = "models/stories260K/stories260K.gguf";

std::string stories_gguf_bytes() {
  return read_file(test::data_dir() / kGguf);
}

fs::path write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

// Byte offset of the tensor-info record of `name`: just past its name string.
size_t tensor_info_offset(const std::string& file, const std::string& name) {
  std::string key(8, '\0');
  const uint64_t len = name.size();
  std::memcpy(key.data(), &len, 8);
  key += name;
  const size_t at = file.find(key);
  EXPECT_NE(at, std::string::npos) << name;
  return at + key.size();
}

template <typename T>
void poke(std::string& file, size_t offset, T value) {
  std::memcpy(file.data() + offset, &value, sizeof(T));
}

test::CliResult info(const fs::path& model) {
  return test::run_cli({"info", model.string()});
}

TEST(CliBadFiles, TruncatedGguf) {
  QL_REQUIRE_DATA(kGguf);
  const std::string file = stories_gguf_bytes();
  const fs::path dir = test::temp_dir();
  for (size_t keep : {size_t{3}, size_t{100}, file.size() / 2, file.size() - 1}) {
    const fs::path p =
        write_bytes(dir / ("cut" + std::to_string(keep) + ".gguf"), file.substr(0, keep));
    test::expect_one_line_error(info(p), p.filename().string());
  }
}

TEST(CliBadFiles, WrongMagic) {
  QL_REQUIRE_DATA(kGguf);
  std::string file = stories_gguf_bytes();
  file.replace(0, 4, "GGUX");
  const fs::path p = write_bytes(test::temp_dir() / "magic.gguf", file);
  test::expect_one_line_error(info(p), "magic.gguf");
}

TEST(CliBadFiles, UnknownTensorTypeAndOffsetPastTheEnd) {
  QL_REQUIRE_DATA(kGguf);
  const fs::path dir = test::temp_dir();
  const std::string good = stories_gguf_bytes();
  // The record after the name: n_dims u32, dims u64[n_dims], type u32, offset u64.
  const size_t rec = tensor_info_offset(good, "token_embd.weight");
  uint32_t n_dims = 0;
  std::memcpy(&n_dims, good.data() + rec, 4);
  const size_t type_at = rec + 4 + 8 * n_dims;

  std::string bad_type = good;
  poke<uint32_t>(bad_type, type_at, 99);
  test::expect_one_line_error(info(write_bytes(dir / "type.gguf", bad_type)), "type.gguf");

  std::string bad_offset = good;
  poke<uint64_t>(bad_offset, type_at + 4, uint64_t{1} << 40);
  test::expect_one_line_error(info(write_bytes(dir / "offset.gguf", bad_offset)), "offset.gguf");
}

TEST(CliBadFiles, InconsistentShapesInGguf) {
  QL_REQUIRE_DATA(kGguf);
  const GgufFile src = GgufFile::open(test::data_dir() / kGguf);
  GgufWriter w;
  for (const auto& [key, value] : src.metadata()) w.copy_kv(src, key);
  for (const GgufTensorInfo& t : src.tensors()) {
    if (t.name == "blk.0.attn_q.weight") {
      w.add_f32_tensor(t.name, Tensor::zeros({t.shape[0], t.shape[1] - 4}));  // 60 inputs, not 64
    } else {
      w.add_f32_tensor(t.name, src.load_f32(t));
    }
  }
  const fs::path p = test::temp_dir() / "shapes.gguf";
  w.write(p);
  test::expect_one_line_error(info(p), "blk.0.attn_q.weight");
}

TEST(CliBadFiles, CorruptedSafetensorsAndInconsistentConfig) {
  QL_REQUIRE_DATA(kGguf);
  const fs::path dir = test::temp_dir() / "hf";
  save_hf_model(load_model(test::data_dir() / kGguf), dir);
  const std::string weights = read_file(dir / "model.safetensors");
  const std::string config = read_file(dir / "config.json");

  std::string huge_header = weights;
  poke<uint64_t>(huge_header, 0, uint64_t{1} << 50);  // header length past the end of the file
  write_bytes(dir / "model.safetensors", huge_header);
  test::expect_one_line_error(info(dir), "model.safetensors");

  write_bytes(dir / "model.safetensors", weights.substr(0, weights.size() - 17));  // truncated
  test::expect_one_line_error(info(dir), "model.safetensors");

  write_bytes(dir / "model.safetensors", weights);
  std::string wrong = config;
  const size_t at = wrong.find("\"intermediate_size\": 172");
  ASSERT_NE(at, std::string::npos) << config;
  wrong.replace(at, std::strlen("\"intermediate_size\": 172"), "\"intermediate_size\": 180");
  write_bytes(dir / "config.json", wrong);
  test::expect_one_line_error(info(dir), "mlp");
}

TEST(CliBadFiles, PickleCheckpointIsRefused) {
  const fs::path p =
      write_bytes(test::temp_dir() / "pytorch_model.bin", std::string("\x80\x02}q\x00.", 6));
  test::expect_one_line_error(info(p), "safetensors");
}

}  // namespace
}  // namespace qalora
