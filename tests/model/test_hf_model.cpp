#include <cstring>
#include <nlohmann/json.hpp>

#include "model/model_compare.h"
#include "model/random_model.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/model.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::expect_same_model;
using test::expect_same_tensor;

Tensor row_numbered(int64_t rows, int64_t cols) {
  Tensor t = Tensor::zeros({rows, cols});
  float* d = t.mutable_data();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) d[r * cols + c] = static_cast<float>(r * 100 + c);
  return t;
}

json read_json(const fs::path& p) {
  return json::parse(read_file(p));
}

void write_json(const fs::path& p, const json& j) {
  write_file_atomic(p, j.dump(2));
}

// The error message of `f`, checked to be one line naming `file`.
template <typename F>
std::string error_of(F&& f, const std::string& file) {
  try {
    f();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    return msg;
  }
  ADD_FAILURE() << "no error";
  return "";
}

// Rewrites model.safetensors keeping only the tensors `keep` accepts.
template <typename Keep>
void filter_tensors(const fs::path& dir, Keep&& keep) {
  std::vector<StWriteTensor> kept;
  {
    const SafetensorsFile st = SafetensorsFile::open(dir / "model.safetensors");
    for (const StTensorInfo& t : st.tensors())
      if (keep(t.name))
        kept.push_back({t.name, t.dtype, t.shape, {st.data(t), st.data(t) + (t.end - t.begin)}});
  }
  write_safetensors(dir / "model.safetensors", kept);
}

TEST(HfModelTest, PermuteRopeRowsMapsPairsToHalvesAndBack) {
  const int64_t heads = 3, head_dim = 8, half = head_dim / 2;
  const Tensor w = row_numbered(heads * head_dim, 5);
  const Tensor hf = permute_rope_rows(w, heads, head_dim, true);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < half; ++i) {
      // Adjacent pair (2i, 2i+1) of head h lands on (i, i + d/2) of the same head.
      EXPECT_EQ(hf.row(h * head_dim + i)[0], static_cast<float>((h * head_dim + 2 * i) * 100));
      EXPECT_EQ(hf.row(h * head_dim + i + half)[0],
                static_cast<float>((h * head_dim + 2 * i + 1) * 100));
      EXPECT_EQ(hf.row(h * head_dim + i + half)[4],
                static_cast<float>((h * head_dim + 2 * i + 1) * 100 + 4));
    }
  expect_same_tensor(permute_rope_rows(hf, heads, head_dim, false), w, "to_hf then back");

  Tensor bias = Tensor::zeros({heads * head_dim});
  for (int64_t i = 0; i < bias.numel(); ++i) bias.mutable_data()[i] = static_cast<float>(i);
  const Tensor hf_bias = permute_rope_rows(bias, heads, head_dim, true);
  EXPECT_EQ(hf_bias.data()[1], 2.0f);
  EXPECT_EQ(hf_bias.data()[half], 1.0f);
  expect_same_tensor(permute_rope_rows(hf_bias, heads, head_dim, false), bias,
                     "bias to_hf then back");

  EXPECT_THROW(permute_rope_rows(w, 4, head_dim, true), Error);
  EXPECT_THROW(permute_rope_rows(row_numbered(9, 2), 3, 3, true), Error);
}

TEST(HfModelTest, SaveLoadRoundTripIsBitIdenticalWithBiasesAndScaling) {
  const fs::path dir = test::temp_dir() / "qwen";
  Model m = test::make_random_model({.qkv_bias = true}, 11);  // GQA, head_dim != dim / heads
  m.config.arch = "qwen2";
  m.config.rope_theta = 1e6f;
  m.config.norm_eps = 1e-6f;
  m.config.rope_scaling = {RopeScaling::Type::Llama3, 8.0f, 1.0f, 4.0f, 8192};
  save_hf_model(m, dir);

  const json cfg = read_json(dir / "config.json");
  EXPECT_EQ(cfg["architectures"][0], "Qwen2ForCausalLM");
  EXPECT_EQ(cfg["head_dim"], 8);
  EXPECT_EQ(cfg["rms_norm_eps"].get<double>(), 1e-6);  // the float's shortest decimal, not 9.99e-07
  EXPECT_EQ(cfg["tie_word_embeddings"], false);

  // On disk q/k are in the Hugging Face halves layout.
  const SafetensorsFile st = SafetensorsFile::open(dir / "model.safetensors");
  EXPECT_EQ(st.metadata().at("format"), "pt");
  expect_same_tensor(st.load_f32(*st.find("model.layers.1.self_attn.k_proj.weight")),
                     permute_rope_rows(m.layers[1].k.weight, 3, 8, true), "k_proj on disk");
  expect_same_tensor(st.load_f32(*st.find("model.layers.0.self_attn.q_proj.bias")),
                     permute_rope_rows(m.layers[0].q.bias, 6, 8, true), "q_proj bias on disk");

  const Model r = load_hf_model(dir);
  EXPECT_EQ(r.format, ModelFormat::HuggingFace);
  EXPECT_EQ(r.config.arch, "qwen2");
  EXPECT_EQ(r.config.head_dim, 8);
  EXPECT_EQ(r.config.n_kv_heads, 3);
  EXPECT_EQ(r.config.context_length, m.config.context_length);
  EXPECT_EQ(r.config.rope_theta, 1e6f);
  EXPECT_EQ(r.config.norm_eps, 1e-6f);
  EXPECT_TRUE(r.config.qkv_bias);
  EXPECT_FALSE(r.config.tied_embeddings);
  EXPECT_EQ(r.config.rope_scaling.type, RopeScaling::Type::Llama3);
  EXPECT_EQ(r.config.rope_scaling.factor, 8.0f);
  EXPECT_EQ(r.config.rope_scaling.original_context, 8192);
  EXPECT_EQ(r.tokenizer, nullptr);
  EXPECT_EQ(r.source_tensors.size(), st.tensors().size());
  expect_same_model(m, r);
  r.validate();
}

TEST(HfModelTest, LoadsShardsListedInTheIndex) {
  const fs::path dir = test::temp_dir();
  const Model m = test::make_random_model({.tied = true}, 5);
  save_hf_model(m, dir);
  {
    // Split into two shards, alternating tensors, with the index HF writes.
    const SafetensorsFile st = SafetensorsFile::open(dir / "model.safetensors");
    std::vector<StWriteTensor> shard[2];
    json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
    for (size_t i = 0; i < st.tensors().size(); ++i) {
      const StTensorInfo& t = st.tensors()[i];
      shard[i % 2].push_back(
          {t.name, t.dtype, t.shape, {st.data(t), st.data(t) + (t.end - t.begin)}});
      index["weight_map"][t.name] = cat("model-0000", i % 2 + 1, "-of-00002.safetensors");
    }
    write_safetensors(dir / "model-00001-of-00002.safetensors", shard[0]);
    write_safetensors(dir / "model-00002-of-00002.safetensors", shard[1]);
    write_json(dir / "model.safetensors.index.json", index);
  }
  fs::remove(dir / "model.safetensors");
  const Model r = load_hf_model(dir);
  EXPECT_TRUE(r.config.tied_embeddings);
  EXPECT_TRUE(r.output.empty());
  expect_same_model(m, r);

  json index = read_json(dir / "model.safetensors.index.json");
  index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors";
  index["weight_map"]["model.embed_tokens.weight"] = "model-00002-of-00002.safetensors";
  write_json(dir / "model.safetensors.index.json", index);
  const std::string msg = error_of([&] { load_hf_model(dir); }, "model.safetensors.index.json");
  EXPECT_NE(msg.find("does not contain it"), std::string::npos) << msg;
}

TEST(HfModelTest, RejectsQuantizedConfigsAndMissingOrMisshapenTensors) {
  const fs::path dir = test::temp_dir();
  save_hf_model(test::make_random_model({}, 3), dir);
  const json good = read_json(dir / "config.json");
  const std::string cfg_file = (dir / "config.json").string();

  json q = good;
  q["quantization_config"] = {{"quant_method", "awq"}, {"bits", 4}};
  write_json(dir / "config.json", q);
  std::string msg = error_of([&] { load_hf_model(dir); }, cfg_file);
  EXPECT_NE(msg.find("quantization_config (quant_method 'awq') is not supported"),
            std::string::npos)
      << msg;

  json arch = good;
  arch["architectures"] = {"GPT2LMHeadModel"};
  write_json(dir / "config.json", arch);
  msg = error_of([&] { load_hf_model(dir); }, cfg_file);
  EXPECT_NE(msg.find("GPT2LMHeadModel"), std::string::npos) << msg;

  json missing = good;
  missing.erase("hidden_size");
  write_json(dir / "config.json", missing);
  msg = error_of([&] { load_hf_model(dir); }, cfg_file);
  EXPECT_NE(msg.find("'hidden_size'"), std::string::npos) << msg;

  json vocab = good;
  vocab["vocab_size"] = 98;
  write_json(dir / "config.json", vocab);
  msg = error_of([&] { load_hf_model(dir); }, "model.safetensors");
  EXPECT_NE(msg.find("'model.embed_tokens.weight' has shape [97, 52], expected [98, 52]"),
            std::string::npos)
      << msg;

  write_json(dir / "config.json", good);
  filter_tensors(dir,
                 [](const std::string& n) { return n != "model.layers.1.mlp.up_proj.weight"; });
  msg = error_of([&] { load_hf_model(dir); }, "model.safetensors");
  EXPECT_NE(msg.find("'model.layers.1.mlp.up_proj.weight' is missing"), std::string::npos) << msg;

  fs::remove(dir / "model.safetensors");
  msg = error_of([&] { load_hf_model(dir); }, dir.string());
  EXPECT_NE(msg.find("no model.safetensors"), std::string::npos) << msg;
}

TEST(HfModelTest, WithoutTieFieldAMissingLmHeadMeansTied) {
  const fs::path dir = test::temp_dir();
  save_hf_model(test::make_random_model({.tied = true}, 9), dir);
  json cfg = read_json(dir / "config.json");
  cfg.erase("tie_word_embeddings");
  cfg["head_dim"] = nullptr;  // some configs write null; the default dim / heads applies
  cfg["num_attention_heads"] = 4;
  cfg["num_key_value_heads"] = 2;
  cfg["hidden_size"] = 52;
  write_json(dir / "config.json", cfg);
  // dim 52 / 4 heads gives head_dim 13, which does not match the saved q_proj rows.
  EXPECT_THROW(load_hf_model(dir), Error);

  cfg["num_attention_heads"] = 6;
  cfg["num_key_value_heads"] = 3;
  cfg["head_dim"] = 8;
  write_json(dir / "config.json", cfg);
  EXPECT_TRUE(load_hf_model(dir).config.tied_embeddings);
}

Model stories260k() {
  return load_llama2c_model(test::data_dir() / "models/stories260K/stories260K.bin");
}

TEST(HfModelTest, Stories260KWeightsRoundTripThroughAHfFolder) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  const fs::path dir = test::temp_dir();
  Model m = stories260k();
  m.tokenizer = nullptr;  // the tokenizer round trip is tested on its own below
  save_hf_model(m, dir);
  const Model r = load_hf_model(dir);
  EXPECT_EQ(r.config.dim, 64);
  EXPECT_EQ(r.config.n_kv_heads, 4);
  EXPECT_EQ(r.config.hidden_dim, 172);
  EXPECT_EQ(r.config.context_length, 512);
  EXPECT_EQ(r.config.norm_eps, 1e-5f);
  EXPECT_TRUE(r.config.tied_embeddings);
  expect_same_model(m, r);  // q/k permuted to HF and back is the identity
}

TEST(HfModelTest, Stories260KTokenizerRoundTripsThroughAHfFolder) {
  QL_REQUIRE_DATA("models/stories260K/tok512.bin");
  const fs::path dir = test::temp_dir();
  const Model m = stories260k();
  ASSERT_NE(m.tokenizer, nullptr);
  save_hf_model(m, dir);
  ASSERT_TRUE(fs::exists(dir / "tokenizer.json"));
  const Model r = load_hf_model(dir);
  ASSERT_NE(r.tokenizer, nullptr);
  EXPECT_EQ(r.tokenizer->vocab_size(), m.tokenizer->vocab_size());
  const std::string text = "Zoo was a little girl.";
  EXPECT_EQ(r.tokenizer->encode(text, true), m.tokenizer->encode(text, true));
}

}  // namespace
}  // namespace qalora
