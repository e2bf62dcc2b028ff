#include <array>
#include <cstring>
#include <fstream>

#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/gguf.h"
#include "qalora/model/model.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

fs::path stories_bin() {
  return test::data_dir() / "models/stories260K/stories260K.bin";
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel()) * sizeof(float)) == 0;
}

// A checkpoint whose float k (counting from the first after the header) has the value k.
fs::path write_checkpoint(const fs::path& path, const std::array<int32_t, 7>& header,
                          size_t floats) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header.data()), sizeof(header));
  for (size_t k = 0; k < floats; ++k) {
    const auto v = static_cast<float>(k);
    out.write(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  return path;
}

TEST(Llama2cTest, LoadsStories260KConfigAndLayout) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  const Model m = load_llama2c_model(stories_bin());
  const ModelConfig& c = m.config;
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.hidden_dim, 172);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.context_length, 512);
  EXPECT_EQ(c.rope_theta, 10000.0f);
  EXPECT_EQ(c.norm_eps, 1e-5f);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_TRUE(m.output.empty());
  EXPECT_EQ(m.format, ModelFormat::Llama2c);
  EXPECT_EQ(m.source_tensors.size(), 13u);  // 11 weight arrays + 2 legacy RoPE tables
  EXPECT_EQ(m.parameter_count(), 260032);
  m.validate();

  // rms_final sits just before the two RoPE tables (512 x 4 floats each) at the end of the file.
  const std::string raw = read_file(stories_bin());
  float first_final = 0;
  std::memcpy(&first_final, raw.data() + raw.size() - 4 * (2 * 512 * 4 + 64), 4);
  EXPECT_EQ(m.final_norm.data()[0], first_final);
  float first_wk_layer2 = 0;  // after embeddings, rms_att and wq, then two layers of wk
  std::memcpy(&first_wk_layer2,
              raw.data() + 28 + 4 * (512 * 64 + 5 * 64 + 5 * 64 * 64 + 2 * 32 * 64), 4);
  EXPECT_EQ(m.layers[2].k.weight.data()[0], first_wk_layer2);
}

TEST(Llama2cTest, WeightsAreBitIdenticalToTheGguf) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.gguf");
  const Model m = load_llama2c_model(stories_bin());
  const GgufFile g = GgufFile::open(test::data_dir() / "models/stories260K/stories260K.gguf");
  EXPECT_TRUE(same_bits(m.tok_embeddings, g.load_f32("token_embd.weight")));
  EXPECT_TRUE(same_bits(m.tok_embeddings, g.load_f32("output.weight")));  // stored untied there
  EXPECT_TRUE(same_bits(m.final_norm, g.load_f32("output_norm.weight")));
  for (size_t l = 0; l < m.layers.size(); ++l) {
    const LayerWeights& L = m.layers[l];
    const std::pair<const char*, const Tensor*> pairs[] = {
        {"attn_norm", &L.attn_norm},  {"attn_q", &L.q.weight},      {"attn_k", &L.k.weight},
        {"attn_v", &L.v.weight},      {"attn_output", &L.o.weight}, {"ffn_norm", &L.ffn_norm},
        {"ffn_gate", &L.gate.weight}, {"ffn_up", &L.up.weight},     {"ffn_down", &L.down.weight}};
    for (const auto& [name, t] : pairs) {
      const std::string gguf_name = cat("blk.", l, ".", name, ".weight");
      EXPECT_TRUE(same_bits(*t, g.load_f32(gguf_name))) << gguf_name;
    }
  }
}

TEST(Llama2cTest, FindsTheTokenizerBesideTheCheckpoint) {
  QL_REQUIRE_DATA("models/stories260K/tok512.bin");
  const Model m = load_llama2c_model(stories_bin());
  ASSERT_NE(m.tokenizer, nullptr);
  EXPECT_EQ(m.tokenizer->vocab_size(), 512);
  EXPECT_EQ(m.tokenizer->piece(1), "<s>");
}

TEST(Llama2cTest, NegativeVocabMeansAnUntiedClassifierAfterTheRopeTables) {
  const fs::path dir = test::temp_dir();
  // dim 8, hidden 12, 1 layer, 2 heads, 1 kv head (head_dim 4, kv_dim 4), vocab 10, seq_len 3.
  const size_t before_wcls = 10 * 8 + 8 + 64 + 32 + 32 + 64 + 8 + 96 + 96 + 96 + 8 + 2 * 3 * 2;
  const fs::path path = write_checkpoint(dir / "m.bin", {8, 12, 1, 2, 1, -10, 3}, before_wcls + 80);
  const Model m = load_llama2c_model(path);
  EXPECT_FALSE(m.config.tied_embeddings);
  EXPECT_EQ(m.config.vocab_size, 10);
  ASSERT_EQ(m.output.shape(), (Shape{10, 8}));
  EXPECT_EQ(m.output.data()[0], static_cast<float>(before_wcls));
  EXPECT_EQ(m.layers[0].k.weight.shape(), (Shape{4, 8}));
  EXPECT_EQ(m.layers[0].v.weight.data()[0], static_cast<float>(80 + 8 + 64 + 32));
  EXPECT_EQ(m.layers[0].up.weight.data()[0],
            static_cast<float>(80 + 8 + 64 + 32 + 32 + 64 + 8 + 96 + 96));
  EXPECT_EQ(m.tokenizer, nullptr);  // none beside it
  m.validate();

  // Tied with the same file: the classifier's 80 floats are now extra.
  const fs::path tied =
      write_checkpoint(dir / "tied.bin", {8, 12, 1, 2, 1, 10, 3}, before_wcls + 80);
  try {
    load_llama2c_model(tied);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    const size_t expected = 28 + 4 * before_wcls;
    EXPECT_NE(msg.find(tied.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find(cat("should be ", expected, " bytes")), std::string::npos) << msg;
    EXPECT_NE(msg.find(cat("got ", expected + 320)), std::string::npos) << msg;
  }
}

TEST(Llama2cTest, RejectsImplausibleHeaders) {
  const fs::path dir = test::temp_dir();
  const auto message = [](const fs::path& p) {
    try {
      load_llama2c_model(p);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(
      message(write_checkpoint(dir / "a.bin", {8, 12, 1, 3, 1, 10, 3}, 0)).find("n_heads (3)"),
      std::string::npos);
  EXPECT_NE(
      message(write_checkpoint(dir / "b.bin", {8, 12, 1, 2, 4, 10, 3}, 0)).find("n_kv_heads is 4"),
      std::string::npos);
  EXPECT_NE(
      message(write_checkpoint(dir / "c.bin", {8, 0, 1, 2, 1, 10, 3}, 0)).find("hidden_dim is 0"),
      std::string::npos);
  { std::ofstream(dir / "short.bin", std::ios::binary) << "tiny"; }
  EXPECT_NE(message(dir / "short.bin").find("too short"), std::string::npos);
}

}  // namespace
}  // namespace qalora
