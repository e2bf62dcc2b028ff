// Models that are never materialised in fp32: F16 folders stay encoded and compute like their
// fp32 copy, GGUF Q4_K linears become exact affine QMatrix weights, and the block-by-block
// folder writer (shards, index, atomic publication).
#include <gtest/gtest.h>

#include <cstring>
#include <nlohmann/json.hpp>

#include "export/export_test_util.h"
#include "model/model_compare.h"
#include "model/random_model.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/gguf.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/model.h"
#include "qalora/model/runtime.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

// The model with every weight rounded to fp16 (so an F16 file holds it exactly).
Model fp16_values(Model m) {
  auto round = [](Tensor& t) {
    if (t.empty()) return;
    float* d = t.mutable_data();
    for (int64_t i = 0; i < t.numel(); ++i) d[i] = round_to_fp16(d[i]);
  };
  round(m.tok_embeddings);
  round(m.output);
  for (LayerWeights& L : m.layers)
    for (Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) round(l->weight);
  return m;
}

// Rewrites a saved folder's model.safetensors with every 2-D tensor stored as F16.
void store_matrices_as_f16(const fs::path& dir) {
  const fs::path file = dir / "model.safetensors";
  std::vector<StWriteTensor> out;
  {
    const SafetensorsFile st = SafetensorsFile::open(file);
    for (const StTensorInfo& t : st.tensors()) {
      const Tensor v = st.load_f32(t);
      StWriteTensor w{t.name, StDtype::F32, t.shape, {}};
      if (t.shape.size() == 2) {
        w.dtype = StDtype::F16;
        w.bytes.resize(static_cast<size_t>(v.numel()) * 2);
        for (int64_t i = 0; i < v.numel(); ++i) {
          const uint16_t h = fp32_to_fp16(v.data()[i]);
          std::memcpy(w.bytes.data() + 2 * i, &h, 2);
        }
      } else {
        w = st_f32(t.name, v);
      }
      out.push_back(std::move(w));
    }
  }
  write_safetensors(file, out);
}

TEST(StreamingLoad, F16FolderStaysEncodedAndComputesLikeItsFp32Copy) {
  const Model model = fp16_values(test::make_random_model(test::RandomModelShape{}, 21));
  const fs::path dir = test::temp_dir() / "f16";
  save_hf_model(model, dir);
  store_matrices_as_f16(dir);
  const Model loaded = load_hf_model(dir);
  EXPECT_EQ(loaded.layers[1].gate.weight.stored_type(), "F16");
  EXPECT_EQ(loaded.layers[0].q.weight.stored_type(), "F16");  // rows reordered, not copied
  EXPECT_EQ(loaded.tok_embeddings.stored_type(), "F16");
  test::expect_same_model(loaded, model);
  test::expect_close(test::all_logits(loaded), test::all_logits(model), 1e-5f, "logits");
}

// Random Q4_K blocks (any byte pattern is a valid block) decode exactly as the QMatrix they
// convert to.
TEST(GgufLinears, Q4KBecomesTheExactAffineQMatrix) {
  const int64_t rows = 3, cols = 512;  // two 256-element super-blocks per row
  const size_t block_bytes = 144;
  std::vector<uint8_t> data(static_cast<size_t>(rows * cols / 256) * block_bytes);
  const std::vector<float> noise =
      test::random_uniform(static_cast<int64_t>(data.size()), 5, 0, 255);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(noise[i]);
  for (size_t b = 0; b < data.size() / block_bytes; ++b) {  // d and dmin: finite fp16 values
    const uint16_t d = fp32_to_fp16(0.01f * static_cast<float>(b + 1)), dmin = fp32_to_fp16(0.003f);
    std::memcpy(data.data() + b * block_bytes, &d, 2);
    std::memcpy(data.data() + b * block_bytes + 2, &dmin, 2);
  }
  const auto q = ggml_to_qmatrix(GgmlType::Q4_K, data.data(), rows, cols);
  ASSERT_TRUE(q.has_value());
  EXPECT_EQ(q->bits, 4);
  EXPECT_EQ(q->group_size, 32);
  std::vector<float> want(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    dequantize_row(GgmlType::Q4_K, data.data() + r * (cols / 256) * block_bytes,
                   want.data() + r * cols, cols);
  const Tensor got = dequantize(*q);
  test::expect_close(std::vector<float>(got.data(), got.data() + got.numel()), want, 1e-6f, "Q4_K");
  EXPECT_FALSE(ggml_to_qmatrix(GgmlType::Q4_K, data.data(), 6, 256 + 32).has_value())
      << "rows that are not whole super-blocks";
}

TEST(ModelFolderWriter, ShardsWithAnIndexLoadBackAsTheSameModel) {
  for (const bool quantize : {false, true}) {
    Model model = test::make_random_model(test::aligned_shape(false), 8);
    if (quantize) model = test::quantized(std::move(model), "rtn", 4, 32);
    const fs::path dir = test::temp_dir() / "sharded";
    {
      ModelFolderWriter writer(model, dir, /*shard_bytes=*/1);  // one shard per block
      for (int64_t l = 0; l < model.config.n_layers; ++l) writer.write_block(l, model.layers[l]);
      EXPECT_FALSE(fs::exists(dir / "config.json")) << "published before finish()";
      writer.finish();
    }
    const int64_t shards = model.config.n_layers + 1;
    EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
    EXPECT_TRUE(fs::exists(dir / cat("model-00001-of-0000", shards, ".safetensors")));
    const auto index = nlohmann::json::parse(read_file(dir / "model.safetensors.index.json"));
    EXPECT_EQ(index["weight_map"]["model.norm.weight"],
              cat("model-0000", shards, "-of-0000", shards, ".safetensors"));
    test::expect_same_model(load_hf_model(dir), model);

    // Saving again as one file replaces the shards and the index.
    save_hf_model(model, dir);
    EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
    EXPECT_FALSE(fs::exists(dir / "model.safetensors.index.json"));
    EXPECT_FALSE(fs::exists(dir / cat("model-00001-of-0000", shards, ".safetensors")));
    test::expect_same_model(load_hf_model(dir), model);
    EXPECT_FALSE(fs::exists(fs::path(dir.string() + ".partial")));
  }
}

TEST(ModelFolderWriter, AnUnfinishedWriteLeavesTheFolderAsItWas) {
  const Model model = test::make_random_model(test::RandomModelShape{}, 9);
  const fs::path dir = test::temp_dir() / "out";
  {
    ModelFolderWriter writer(model, dir);
    writer.write_block(0, model.layers[0]);
  }  // destroyed before finish(): an error or an interrupted run
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_FALSE(fs::exists(fs::path(dir.string() + ".partial")));

  save_hf_model(model, dir);
  const Model other = test::make_random_model(test::RandomModelShape{}, 10);
  {
    ModelFolderWriter writer(other, dir);
    writer.write_block(0, other.layers[0]);
    EXPECT_THROW(writer.write_block(0, other.layers[0]), Error) << "blocks out of order";
  }
  test::expect_same_model(load_hf_model(dir), model);
}

}  // namespace
}  // namespace qalora
