// The native quantized model folder: save -> load is bit-identical (codes, group parameters,
// g_idx, absmax, every other tensor) and so are the logits, for every quantization the project
// produces, on odd shapes and on the real stories260K.
#include <bit>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "model/model_compare.h"
#include "model/random_model.h"
#include "model/safetensors_edit.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/model.h"
#include "qalora/model/quant_summary.h"
#include "qalora/model/runtime.h"
#include "qalora/quant/qmatrix_rows.h"
#include "qalora/quant/quantize.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::expect_same_model;
using test::expect_same_qmatrix;
using test::expect_same_tensor;

using test::kLinears;
using test::same_bits;

std::vector<float> all_logits(const Model& m) {
  std::vector<int32_t> tokens;
  for (int32_t t = 0; t < 12; ++t)
    tokens.push_back((t * 37 + 5) % static_cast<int32_t>(m.config.vocab_size));
  InferenceSession s(m, 32);
  std::vector<float> logits(tokens.size() * static_cast<size_t>(m.config.vocab_size));
  s.forward(tokens, logits, /*all_logits=*/true);
  return logits;
}

void expect_same_logits(const Model& a, const Model& b) {
  const std::vector<float> x = all_logits(a), y = all_logits(b);
  for (const float v : x) ASSERT_TRUE(std::isfinite(v));
  EXPECT_TRUE(same_bits(x, y)) << "logits differ after the round trip";
}

// Quantizes every block linear with `quantize(weight) -> QMatrix` and records `info`.
template <typename F>
void quantize_linears(Model& m, const QuantInfo& info, F&& quantize) {
  for (LayerWeights& L : m.layers)
    for (const auto& [name, member] : kLinears) {
      Linear& lin = L.*member;
      lin.qweight = quantize(lin.weight);
      lin.weight = Tensor();
    }
  m.quant = info;
}

QuantInfo rtn_info(int bits, int64_t group_size) {
  QuantInfo q;
  q.method = "rtn";
  q.bits = bits;
  q.group_size = group_size;
  return q;
}

void quantize_rtn_all(Model& m, int bits, int64_t group_size) {
  quantize_linears(m, rtn_info(bits, group_size), [&](const Tensor& w) {
    return quantize_rtn(w.data(), w.dim(0), w.dim(1), bits, group_size, /*sym=*/false);
  });
}

void quantize_codebook_all(Model& m, QuantType type, bool double_quant) {
  QuantInfo q;
  q.method = quant_type_name(type);
  q.bits = 4;
  q.group_size = kCodebookBlock;
  q.double_quant = double_quant;
  quantize_linears(m, q, [&](const Tensor& w) {
    return quantize_codebook(type, w.data(), w.dim(0), w.dim(1), double_quant);
  });
}

json read_json(const fs::path& p) {
  return json::parse(read_file(p));
}

Model round_trip(const Model& m, const fs::path& dir) {
  save_hf_model(m, dir);
  Model r = load_model(dir);
  EXPECT_EQ(r.format, ModelFormat::HuggingFace);
  return r;
}

// ---- RTN over bits and group sizes, odd shapes ------------------------------------------------

class RtnFolder : public ::testing::TestWithParam<std::tuple<int, int64_t>> {};

TEST_P(RtnFolder, SaveLoadIsBitIdentical) {
  const auto [bits, group] = GetParam();
  // dim 52, hidden 100, GQA 6/3 heads of 8, q/k/v biases: no dimension is a multiple of 32.
  Model m = test::make_random_model({.qkv_bias = true}, 40 + static_cast<uint64_t>(bits));
  m.config.arch = "qwen2";
  quantize_rtn_all(m, bits, group);
  const fs::path dir = test::temp_dir();
  const Model r = round_trip(m, dir);
  expect_same_model(m, r);
  expect_same_logits(m, r);

  const json qc = read_json(dir / "quantize_config.json");
  EXPECT_EQ(qc["quant_method"], "qalora");
  EXPECT_EQ(qc["quant_type"], "affine");
  EXPECT_EQ(qc["bits"], bits);
  EXPECT_EQ(qc["group_size"], group);
  EXPECT_EQ(qc["qk_rope_layout"], "pairs");
  EXPECT_EQ(read_json(dir / "config.json")["quantization_config"], qc);

  // On disk: the packed codes as they are, fp16 parameters, q/k in the runtime's row order (so
  // that loading maps them instead of permuting a copy).
  const SafetensorsFile st = SafetensorsFile::open(dir / "model.safetensors");
  const QMatrix& k = m.layers[1].k.qweight;
  const StTensorInfo* qweight = st.find("model.layers.1.self_attn.k_proj.qweight");
  ASSERT_NE(qweight, nullptr);
  EXPECT_EQ(qweight->dtype, StDtype::U8);
  EXPECT_EQ(qweight->shape, (Shape{k.rows, k.row_bytes()}));
  EXPECT_EQ(std::memcmp(st.data(*qweight), k.codes.data(), k.codes.size()), 0);
  const StTensorInfo* scales = st.find("model.layers.1.self_attn.k_proj.scales");
  ASSERT_NE(scales, nullptr);
  EXPECT_EQ(scales->dtype, StDtype::F16);
  EXPECT_EQ(scales->shape, (Shape{k.rows, k.n_groups()}));
  const StTensorInfo* g_idx = st.find("model.layers.0.mlp.down_proj.g_idx");
  ASSERT_NE(g_idx, nullptr);
  EXPECT_EQ(g_idx->dtype, StDtype::I32);
  EXPECT_EQ(g_idx->shape, (Shape{100}));
  EXPECT_EQ(st.find("model.layers.0.mlp.down_proj.weight"), nullptr);
}

INSTANTIATE_TEST_SUITE_P(BitsAndGroups, RtnFolder,
                         ::testing::Combine(::testing::Values(2, 3, 4, 8),
                                            ::testing::Values(int64_t{32}, int64_t{48},
                                                              int64_t{-1})),
                         [](const auto& p) {
                           const int64_t g = std::get<1>(p.param);
                           return "b" + std::to_string(std::get<0>(p.param)) + "_" +
                                  (g < 0 ? std::string("per_channel") : "g" + std::to_string(g));
                         });

// Folders written before quantized q/k were kept in the runtime's order hold them in the Hugging
// Face halves order and say so; they load to the same model.
TEST(QuantizedFolder, HalvesLayoutFolderLoadsToTheSameModel) {
  Model m = test::make_random_model({}, 41);
  quantize_rtn_all(m, 4, 32);
  Model halves = m;
  for (LayerWeights& L : halves.layers) {
    L.q = permute_rope_rows(L.q, m.config.n_heads, m.config.head_dim, true);
    L.k = permute_rope_rows(L.k, m.config.n_kv_heads, m.config.head_dim, true);
  }
  const fs::path dir = test::temp_dir();
  save_hf_model(halves, dir);
  json qc = read_json(dir / "quantize_config.json");
  qc["qk_rope_layout"] = "halves";
  json config = read_json(dir / "config.json");
  config["quantization_config"] = qc;
  write_file_atomic(dir / "quantize_config.json", qc.dump(2));
  write_file_atomic(dir / "config.json", config.dump(2));
  const Model r = load_model(dir);
  expect_same_model(m, r);
  expect_same_logits(m, r);
}

// ---- NF4 / FP4 -------------------------------------------------------------------------------

struct CodebookCase {
  QuantType type;
  bool double_quant;
  test::RandomModelShape shape;
  const char* name;
};

class CodebookFolder : public ::testing::TestWithParam<CodebookCase> {};

TEST_P(CodebookFolder, SaveLoadIsBitIdentical) {
  const CodebookCase& c = GetParam();
  Model m = test::make_random_model(c.shape, 7);
  quantize_codebook_all(m, c.type, c.double_quant);
  const fs::path dir = test::temp_dir();
  const Model r = round_trip(m, dir);
  expect_same_model(m, r);
  expect_same_logits(m, r);
  const json qc = read_json(dir / "quantize_config.json");
  EXPECT_EQ(qc["quant_type"], quant_type_name(c.type));
  EXPECT_EQ(qc["group_size"], 64);
  EXPECT_EQ(qc["double_quant"], c.double_quant);
  EXPECT_EQ(qc["qk_rope_layout"], "pairs");
  const SafetensorsFile st = SafetensorsFile::open(dir / "model.safetensors");
  EXPECT_EQ(st.find("model.layers.0.mlp.up_proj.absmax") != nullptr, !c.double_quant);
  EXPECT_EQ(st.find("model.layers.0.mlp.up_proj.absmax_codes") != nullptr, c.double_quant);
}

constexpr test::RandomModelShape kDim64 = {
    .vocab = 61, .dim = 64, .hidden = 100, .heads = 4, .kv_heads = 2, .head_dim = 16};
// q_proj [144, 128] has 288 absmax constants, and the block of 256 ends inside head 5.
constexpr test::RandomModelShape kDqCrossing = {
    .vocab = 50, .dim = 128, .hidden = 64, .layers = 1, .heads = 6, .kv_heads = 3, .head_dim = 24};

INSTANTIATE_TEST_SUITE_P(
    Types, CodebookFolder,
    ::testing::Values(CodebookCase{QuantType::NF4, false, kDim64, "nf4"},
                      CodebookCase{QuantType::NF4, true, kDim64, "nf4_dq"},
                      CodebookCase{QuantType::FP4, false, kDim64, "fp4"},
                      CodebookCase{QuantType::FP4, true, kDim64, "fp4_dq"},
                      // dim 52: absmax blocks straddle rows.
                      CodebookCase{QuantType::NF4, false, {}, "nf4_straddling"},
                      CodebookCase{QuantType::FP4, true, {}, "fp4_dq_straddling"},
                      CodebookCase{QuantType::NF4, true, kDqCrossing, "nf4_dq_crossing"},
                      CodebookCase{QuantType::NF4, false, kDqCrossing, "nf4_crossing"}),
    [](const auto& p) { return std::string(p.param.name); });

// ---- act-order, explicit contiguous g_idx, mixed linears, source precision -------------------

TEST(QuantizedFolder, ActOrderGroupMapSurvivesAndAContiguousOneIsDropped) {
  Model m = test::make_random_model({}, 3);
  quantize_rtn_all(m, 4, 16);
  m.quant.method = "gptq";
  m.quant.act_order = true;
  m.quant.sym = true;
  m.quant.damp = 0.01f;
  m.quant.calibration = "wiki.txt: 4 x 64 tokens, seed 1";
  std::mt19937_64 rng(5);
  for (LayerWeights& L : m.layers)
    for (const auto& [name, member] : kLinears) {
      QMatrix& q = (L.*member).qweight;
      std::vector<int64_t> perm(static_cast<size_t>(q.cols));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      q.g_idx.assign(static_cast<size_t>(q.cols), 0);
      for (int64_t c = 0; c < q.cols; ++c)
        q.g_idx[perm[c]] = static_cast<int32_t>(c / q.group_size);
    }
  const fs::path dir = test::temp_dir();
  Model r = round_trip(m, dir);
  expect_same_model(m, r);
  expect_same_logits(m, r);
  EXPECT_EQ(read_json(dir / "quantize_config.json")["act_order"], true);

  // An explicit g_idx equal to i / G comes back implicit, for the kernels' fast path.
  QMatrix& up = m.layers[0].up.qweight;
  for (int64_t i = 0; i < up.cols; ++i) up.g_idx[i] = static_cast<int32_t>(i / up.group_size);
  r = round_trip(m, dir);
  EXPECT_TRUE(r.layers[0].up.qweight.g_idx.empty());
  EXPECT_FALSE(r.layers[0].gate.qweight.g_idx.empty());
  up.g_idx.clear();
  expect_same_model(m, r);
}

TEST(QuantizedFolder, DenseLinearsAndSourcePrecisionAreKept) {
  Model m = test::make_random_model({.tied = false}, 8);
  // The source stored the embeddings and one norm as F16 (values exactly fp16) and the head as
  // BF16 under its GGUF name; a "F16" final norm whose values fp16 cannot hold stays F32.
  for (Tensor* t : {&m.tok_embeddings, &m.layers[0].attn_norm}) {
    float* d = t->mutable_data();
    for (int64_t i = 0; i < t->numel(); ++i) d[i] = fp16_to_fp32(fp32_to_fp16(d[i]));
  }
  float* head = m.output.mutable_data();
  for (int64_t i = 0; i < m.output.numel(); ++i) head[i] = bf16_to_fp32(fp32_to_bf16(head[i]));
  m.source_tensors = {{"model.embed_tokens.weight", "F16", {}},
                      {"blk.0.attn_norm.weight", "F16", {}},
                      {"output.weight", "BF16", {}},
                      {"model.norm.weight", "F16", {}}};
  quantize_rtn_all(m, 3, 32);
  m.layers[1].down.weight = test::make_random_model({}, 8).layers[1].down.weight;
  m.layers[1].down.qweight = QMatrix();
  const fs::path dir = test::temp_dir();
  const Model r = round_trip(m, dir);
  expect_same_model(m, r);
  expect_same_logits(m, r);
  const SafetensorsFile st = SafetensorsFile::open(dir / "model.safetensors");
  EXPECT_EQ(st.find("model.embed_tokens.weight")->dtype, StDtype::F16);
  EXPECT_EQ(st.find("model.layers.0.input_layernorm.weight")->dtype, StDtype::F16);
  EXPECT_EQ(st.find("model.layers.1.input_layernorm.weight")->dtype, StDtype::F32);
  EXPECT_EQ(st.find("lm_head.weight")->dtype, StDtype::BF16);
  EXPECT_EQ(st.find("model.norm.weight")->dtype, StDtype::F32);
  EXPECT_EQ(st.find("model.layers.1.mlp.down_proj.weight")->dtype, StDtype::F32);
  EXPECT_EQ(st.find("model.layers.1.mlp.down_proj.qweight"), nullptr);

  // Saving the dense model into the same folder removes the quantized settings.
  save_hf_model(test::make_random_model({}, 8), dir);
  EXPECT_FALSE(fs::exists(dir / "quantize_config.json"));
  EXPECT_TRUE(load_model(dir).quant.empty());
}

TEST(QuantizedFolder, OffsetsThatFp16CannotHoldAreStoredAsF32) {
  Model m = test::make_random_model({}, 4);
  quantize_rtn_all(m, 4, 32);
  m.layers[0].v.qweight.offsets.writable()[3] = 1.0f / 3.0f;  // as GPTQ's m = -s * z can be
  const fs::path dir = test::temp_dir();
  const Model r = round_trip(m, dir);
  expect_same_model(m, r);
  const SafetensorsFile st = SafetensorsFile::open(dir / "model.safetensors");
  EXPECT_EQ(st.find("model.layers.0.self_attn.v_proj.offsets")->dtype, StDtype::F32);
  EXPECT_EQ(st.find("model.layers.0.self_attn.v_proj.scales")->dtype, StDtype::F16);
  EXPECT_EQ(st.find("model.layers.1.self_attn.v_proj.offsets")->dtype, StDtype::F16);
}

TEST(QuantizedFolder, RefusesMixedQuantizations) {
  Model m = test::make_random_model({}, 4);
  quantize_rtn_all(m, 4, 32);
  const Tensor w = test::make_random_model({}, 4).layers[1].o.weight;
  m.layers[1].o.qweight = quantize_rtn(w.data(), w.dim(0), w.dim(1), 3, 32, false);
  try {
    save_hf_model(m, test::temp_dir());
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1 o_proj is affine 3-bit but layer 0 q_proj is "
                                         "affine 4-bit"),
              std::string::npos)
        << e.what();
  }
}

// ---- QMatrix row permutation -----------------------------------------------------------------

TEST(QuantizedFolder, RowPermutationMovesRowsWithTheirParameters) {
  const Model m = test::make_random_model({.dim = 64}, 2);
  const Tensor& w = m.layers[0].q.weight;  // [48, 64]
  std::vector<int64_t> order(48);
  std::iota(order.begin(), order.end(), 0);
  std::reverse(order.begin(), order.end());
  Tensor reversed = Tensor::zeros(w.shape());
  for (int64_t r = 0; r < 48; ++r)
    std::memcpy(reversed.mutable_data() + r * 64, w.row(order[r]), 64 * sizeof(float));
  for (const QMatrix& q : {quantize_rtn(w.data(), 48, 64, 3, 24, false),
                           quantize_codebook(QuantType::NF4, w.data(), 48, 64, false),
                           quantize_codebook(QuantType::FP4, w.data(), 48, 64, true)}) {
    const QMatrix p = permute_rows(q, order, "test");
    expect_same_tensor(
        dequantize(p),
        [&] {
          const Tensor d = dequantize(q);
          Tensor t = Tensor::zeros(d.shape());
          for (int64_t r = 0; r < 48; ++r)
            std::memcpy(t.mutable_data() + r * 64, d.row(order[r]), 64 * sizeof(float));
          return t;
        }(),
        quant_type_name(q.type));
    expect_same_qmatrix(permute_rows(p, order, "test"), q, "reversed twice");
  }
  // NF4 rows of 52 columns do not own whole absmax blocks.
  const Tensor w52 = test::make_random_model({}, 2).layers[0].q.weight;
  const QMatrix nf4 = quantize_codebook(QuantType::NF4, w52.data(), 48, 52, false);
  try {
    permute_rows(nf4, order, "q_proj");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("q_proj: nf4 absmax blocks of 64 elements straddle rows "
                                         "of 52 columns"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(permute_rows(nf4, std::vector<int64_t>(48, 0), "x"), Error);
}

// ---- bad native folders ----------------------------------------------------------------------

template <typename F>
std::string load_error(F&& edit) {
  const fs::path dir = test::temp_dir();
  Model m = test::make_random_model({}, 6);
  quantize_rtn_all(m, 4, 32);
  save_hf_model(m, dir);
  edit(dir);
  try {
    load_model(dir);
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    return msg;
  }
  return "no error";
}

void edit_config(const fs::path& dir, const char* key, const json& value) {
  json q = read_json(dir / "quantize_config.json");
  q[key] = value;
  write_file_atomic(dir / "quantize_config.json", q.dump());
}

void replace_tensor(const fs::path& dir, const StWriteTensor& tensor) {
  test::replace_tensor(dir / "model.safetensors", tensor);
}

TEST(QuantizedFolder, BadSettingsAndTensorsAreOneLineErrors) {
  const auto has = [](const std::string& msg, const std::string& part) {
    EXPECT_NE(msg.find(part), std::string::npos) << msg;
  };
  has(load_error([](const fs::path& d) { edit_config(d, "bits", 5); }),
      "quantize_config.json: field 'bits' is 5, expected 2, 3, 4 or 8 for affine");
  has(load_error([](const fs::path& d) { edit_config(d, "quant_type", "int3"); }),
      "field 'quant_type' is 'int3', expected affine, nf4 or fp4");
  has(load_error([](const fs::path& d) { edit_config(d, "group_size", 0); }),
      "field 'group_size' is 0, expected -1 (per channel) or a positive size");
  has(load_error([](const fs::path& d) { edit_config(d, "format_version", 2); }),
      "format_version is 2, expected 1");
  has(load_error([](const fs::path& d) {
        replace_tensor(d, {"model.layers.0.self_attn.q_proj.scales",
                           StDtype::F32,
                           {48, 1},
                           std::vector<uint8_t>(48 * 4)});
      }),
      "tensor 'model.layers.0.self_attn.q_proj.scales' has shape [48, 1], expected [48, 2]");
  has(load_error([](const fs::path& d) {
        std::vector<int32_t> g(52, 0);
        g[7] = 52;
        replace_tensor(
            d, {"model.layers.1.mlp.up_proj.g_idx",
                StDtype::I32,
                {52},
                {reinterpret_cast<uint8_t*>(g.data()), reinterpret_cast<uint8_t*>(g.data() + 52)}});
      }),
      "tensor 'model.layers.1.mlp.up_proj.g_idx' [7] is 52, expected a group in 0..51");
  has(load_error([](const fs::path& d) {
        // Row 0 of gate_proj [100, 52] with a code in column 60, past the 52 real ones.
        std::vector<uint8_t> codes(100 * 32, 0);
        codes[16 + 12] = 0x10;
        replace_tensor(d, {"model.layers.0.mlp.gate_proj.qweight", StDtype::U8, {100, 32}, codes});
      }),
      "tensor 'model.layers.0.mlp.gate_proj.qweight' row 0 has code 1 in its padding past "
      "column 52, expected 0");
  has(load_error([](const fs::path& d) {
        replace_tensor(d, {"model.layers.0.self_attn.v_proj.qweight",
                           StDtype::I32,
                           {24, 8},
                           std::vector<uint8_t>(24 * 8 * 4)});
      }),
      "tensor 'model.layers.0.self_attn.v_proj.qweight' has dtype I32, expected U8");
}

// ---- the real stories260K --------------------------------------------------------------------

Model stories260k() {
  return load_model(test::data_dir() / "models/stories260K/stories260K.bin");
}

TEST(QuantizedFolder, Stories260KRoundTripsForRtnAndNf4) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  QL_REQUIRE_DATA("models/stories260K/tok512.bin");
  const Model dense = stories260k();
  ASSERT_EQ(dense.config.hidden_dim, 172);  // down_proj: 172 inputs, G = 32 leaves 12
  for (const auto& [bits, group] : {std::pair{4, int64_t{32}}, std::pair{3, int64_t{48}},
                                    std::pair{2, int64_t{-1}}, std::pair{8, int64_t{128}}}) {
    SCOPED_TRACE(testing::Message() << bits << "-bit, group " << group);
    Model m = stories260k();
    quantize_rtn_all(m, bits, group);
    const fs::path dir = test::temp_dir();
    const Model r = round_trip(m, dir);
    expect_same_model(m, r);
    expect_same_logits(m, r);
    ASSERT_NE(r.tokenizer, nullptr);
    EXPECT_EQ(r.tokenizer->encode("Zoo was a little girl.", true),
              dense.tokenizer->encode("Zoo was a little girl.", true));
  }
  Model m = stories260k();
  quantize_codebook_all(m, QuantType::NF4, true);
  const fs::path dir = test::temp_dir();
  const Model r = round_trip(m, dir);
  expect_same_model(m, r);
  expect_same_logits(m, r);
  EXPECT_EQ(read_json(dir / "quantize_config.json")["qk_rope_layout"], "pairs");
}

// `info` loads to describe: the same layout and byte counts, and no group parameters decoded.
TEST(QuantizedFolder, DescribeOnlyLoadSkipsTheGroupParameters) {
  Model m = test::make_random_model({}, 13);
  quantize_rtn_all(m, 3, 48);
  const fs::path dir = test::temp_dir();
  save_hf_model(m, dir);
  const Model full = load_model(dir);
  const Model described = load_model(dir, {.tokenizer = {}, .describe_only = true});
  const QuantSummary a = quant_summary(full), b = quant_summary(described);
  EXPECT_EQ(b.quantized, a.quantized);
  EXPECT_EQ(b.quantized_bytes, a.quantized_bytes);
  EXPECT_EQ(b.type, a.type);
  EXPECT_EQ(b.bits, 3);
  for (const LayerWeights& L : described.layers)
    for (const auto& [name, member] : kLinears) {
      const QMatrix& q = (L.*member).qweight;
      EXPECT_TRUE(q.scales.empty() && q.offsets.empty()) << name;
      EXPECT_EQ(q.group_size, 48) << name;
    }
  EXPECT_EQ(described.parameter_count(), full.parameter_count());
}

TEST(QuantizedFolder, InfoShowsTheQuantization) {
  Model m = test::make_random_model({}, 12);
  quantize_rtn_all(m, 4, 32);
  m.quant.act_order = true;
  const fs::path dir = test::temp_dir();
  save_hf_model(m, dir);
  const test::CliResult r = test::run_cli({"info", dir.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("quantization:      rtn, affine 4-bit, group 32, act-order\n"),
            std::string::npos)
      << r.out;
  int64_t bytes = 0, fp32 = 0;
  for (const LayerWeights& L : m.layers)
    for (const auto& [name, member] : kLinears) {
      bytes += (L.*member).qweight.storage_bytes();
      fp32 += 4 * (L.*member).qweight.rows * (L.*member).qweight.cols;
    }
  EXPECT_NE(r.out.find(cat("14 of 14 quantized, ", bytes, " bytes vs ", fp32, " as fp32")),
            std::string::npos)
      << r.out;

  const test::CliResult j = test::run_cli({"info", "--json", dir.string()});
  ASSERT_EQ(j.exit_code, 0) << j.err;
  const json q = json::parse(j.out)["quantization"];
  EXPECT_EQ(q["method"], "rtn");
  EXPECT_EQ(q["bits"], 4);
  EXPECT_EQ(q["group_size"], 32);
  EXPECT_EQ(q["act_order"], true);
  EXPECT_EQ(q["quantized_bytes"], bytes);
  EXPECT_EQ(q["fp32_bytes"], fp32);
}

}  // namespace
}  // namespace qalora
