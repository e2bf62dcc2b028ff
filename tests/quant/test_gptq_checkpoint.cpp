// GPTQ checkpoints written by an independent numpy writer (tests/quant/gptq_writer.py) load into
// QMatrix weights that dequantize to exactly the writer's W[j, i] = s * (q - z), for bits
// 2/3/4/8, v1 and v2 zeros, act-order g_idx, groups that do not divide the inputs, and shards;
// malformed folders end in one error line.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "model/safetensors_edit.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/model.h"
#include "qalora/model/runtime.h"
#include "qalora/quant/gptq_checkpoint.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr int64_t kHeads = 4, kKvHeads = 2, kHeadDim = 16;  // as gptq_writer.py

struct WriterCase {
  const char* name;
  int bits;
  int64_t group_size;
  bool act_order = false;
  bool v2 = false;
  bool implicit_format = false;  // checkpoint_format absent: v1
  bool quantize_config = false;  // quantize_config.json instead of quantization_config
  bool sym = false;
  int shards = 1;
};
// gtest prints the parameter in test listings; its name says everything.
void PrintTo(const WriterCase& c, std::ostream* os) { *os << c.name; }

// Runs the writer into `dir`: its exit status (test::kPythonMissing without python3 or numpy).
int write_checkpoint(const WriterCase& c, const fs::path& dir, const fs::path& expected,
                     std::string& err) {
  std::vector<std::string> args = {
      dir.string(),   expected.string(),
      "--bits",       std::to_string(c.bits),
      "--group-size", std::to_string(c.group_size),
      "--format",     c.v2 ? "v2" : "v1",
      "--config",     c.quantize_config ? "quantize_config" : "quantization_config",
      "--shards",     std::to_string(c.shards),
      "--seed",       std::to_string(c.bits * 100 + c.group_size)};
  if (c.act_order) args.push_back("--act-order");
  if (c.implicit_format) args.push_back("--implicit-format");
  if (c.sym) args.push_back("--sym");
  return test::run_python(fs::path(__FILE__).parent_path() / "gptq_writer.py", args, err);
}

#define QL_WRITE_GPTQ(writer_case, dir, expected)                                  \
  do {                                                                             \
    std::string err;                                                               \
    const int rc = write_checkpoint(writer_case, dir, expected, err);              \
    if (rc == test::kPythonMissing) GTEST_SKIP() << "python3 with numpy: " << err; \
    ASSERT_EQ(rc, 0) << err;                                                       \
  } while (0)

void expect_same_floats(const Tensor& actual, const Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.shape(), expected.shape()) << what;
  for (int64_t i = 0; i < expected.numel(); ++i)
    if (std::memcmp(actual.data() + i, expected.data() + i, sizeof(float)) != 0) {
      ADD_FAILURE() << what << ": element " << i << " is " << actual.data()[i] << ", expected "
                    << expected.data()[i];
      return;
    }
}

class GptqCheckpoint : public ::testing::TestWithParam<WriterCase> {};

TEST_P(GptqCheckpoint, DequantizesToTheWritersWeightsAndRuns) {
  const WriterCase& c = GetParam();
  const fs::path dir = test::temp_dir() / "gptq", expected_file = test::temp_dir() / "w.st";
  fs::remove_all(dir);
  QL_WRITE_GPTQ(c, dir, expected_file);

  const Model m = load_model(dir);
  EXPECT_EQ(m.quant.method, "gptq");
  EXPECT_EQ(m.quant.bits, c.bits);
  EXPECT_EQ(m.quant.group_size, c.group_size);
  EXPECT_EQ(m.quant.act_order, c.act_order);
  EXPECT_EQ(m.quant.sym, c.sym);

  const SafetensorsFile expected = SafetensorsFile::open(expected_file);
  const std::pair<const char*, Linear LayerWeights::*> linears[] = {
      {"self_attn.q_proj", &LayerWeights::q}, {"self_attn.k_proj", &LayerWeights::k},
      {"self_attn.v_proj", &LayerWeights::v}, {"self_attn.o_proj", &LayerWeights::o},
      {"mlp.gate_proj", &LayerWeights::gate}, {"mlp.up_proj", &LayerWeights::up},
      {"mlp.down_proj", &LayerWeights::down}};
  for (size_t l = 0; l < m.layers.size(); ++l)
    for (const auto& [name, member] : linears) {
      const std::string prefix = cat("model.layers.", l, ".", name);
      const StTensorInfo* t = expected.find(prefix);
      ASSERT_NE(t, nullptr) << prefix;
      Tensor want = expected.load_f32(*t);
      // The loader moves q/k rows to the runtime's RoPE layout, as for dense folders.
      if (member == &LayerWeights::q) want = permute_rope_rows(want, kHeads, kHeadDim, false);
      if (member == &LayerWeights::k) want = permute_rope_rows(want, kKvHeads, kHeadDim, false);
      const Linear& lin = m.layers[l].*member;
      ASSERT_TRUE(lin.quantized()) << prefix;
      // A shuffled group map is kept; with a single group every map is contiguous.
      const bool one_group = c.group_size == -1 || lin.in_features() <= c.group_size;
      EXPECT_EQ(lin.qweight.g_idx.empty(), !c.act_order || one_group) << prefix;
      expect_same_floats(dequantize(lin.qweight), want, prefix);
    }

  InferenceSession session(m, 16);
  const std::vector<int32_t> tokens = {1, 7, 42, 3, 69};
  for (const float v : session.forward_last(tokens)) ASSERT_TRUE(std::isfinite(v));

  // Saved as a native folder, the converted model reads back the same (m = -s * z may need F32).
  const fs::path native = test::temp_dir() / "native";
  fs::remove_all(native);
  save_hf_model(m, native);
  const Model r = load_model(native);
  EXPECT_EQ(r.quant.method, "gptq");
  for (size_t l = 0; l < m.layers.size(); ++l)
    for (const auto& [name, member] : linears) {
      const QMatrix &a = (m.layers[l].*member).qweight, &b = (r.layers[l].*member).qweight;
      EXPECT_EQ(a.codes, b.codes) << name;
      EXPECT_EQ(a.g_idx, b.g_idx) << name;
      EXPECT_EQ(std::memcmp(a.offsets.to_vector().data(), b.offsets.to_vector().data(),
                            static_cast<size_t>(a.offsets.size()) * 4),
                0)
          << name;
    }
}

INSTANTIATE_TEST_SUITE_P(
    Writer, GptqCheckpoint,
    ::testing::Values(
        WriterCase{.name = "b2_g32_v1", .bits = 2, .group_size = 32},
        WriterCase{.name = "b3_g32_actorder_implicit_v1_quantize_config",
                   .bits = 3,
                   .group_size = 32,
                   .act_order = true,
                   .implicit_format = true,
                   .quantize_config = true},
        WriterCase{.name = "b4_g32_actorder_v2",
                   .bits = 4,
                   .group_size = 32,
                   .act_order = true,
                   .v2 = true},
        WriterCase{.name = "b8_g32_v2", .bits = 8, .group_size = 32, .v2 = true},
        // 64 and 96 inputs in groups of 40: the last group is short.
        WriterCase{.name = "b4_g40_actorder_v1", .bits = 4, .group_size = 40, .act_order = true},
        WriterCase{.name = "b3_g40_v2", .bits = 3, .group_size = 40, .v2 = true},
        WriterCase{.name = "b2_g40_actorder_v2",
                   .bits = 2,
                   .group_size = 40,
                   .act_order = true,
                   .v2 = true},
        WriterCase{.name = "b8_g40_actorder_v1", .bits = 8, .group_size = 40, .act_order = true},
        WriterCase{.name = "b4_per_channel_sym_2_shards",
                   .bits = 4,
                   .group_size = -1,
                   .sym = true,
                   .shards = 2},
        WriterCase{.name = "b3_g64_actorder_3_shards_quantize_config",
                   .bits = 3,
                   .group_size = 64,
                   .act_order = true,
                   .quantize_config = true,
                   .shards = 3}),
    [](const auto& p) { return std::string(p.param.name); });

TEST(GptqCheckpoint, UnpacksStreamsThatStraddleWords) {
  // 3-bit values 0..9 in word 0, value 10 across bits 30..31 of word 0 and bit 0 of word 1.
  uint64_t stream = 0;
  for (uint64_t k = 0; k < 21; ++k) stream |= ((k * 5 + 3) % 8) << (3 * k);
  const uint32_t words[2] = {static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)};
  for (int64_t k = 0; k < 21; ++k)
    EXPECT_EQ(gptq_unpack(words, 1, k, 3), static_cast<uint32_t>((k * 5 + 3) % 8)) << k;
  // A stride steps over the words of other columns.
  const uint32_t strided[4] = {words[0], 0xffffffffu, words[1], 0xffffffffu};
  EXPECT_EQ(gptq_unpack(strided, 2, 10, 3), (10u * 5 + 3) % 8);
}

// ---- malformed folders -----------------------------------------------------------------------

class BadGptqFolder : public ::testing::Test {
 protected:
  // A good 4-bit, group 32, act-order v1 folder for each test to break.
  void SetUp() override {
    dir_ = test::temp_dir() / "gptq";
    QL_WRITE_GPTQ((WriterCase{.name = "bad", .bits = 4, .group_size = 32, .act_order = true}), dir_,
                  test::temp_dir() / "w.st");
    ASSERT_NO_THROW(load_model(dir_));
  }
  fs::path weights() const { return dir_ / "model.safetensors"; }
  void edit_config(const std::function<void(json&)>& edit) const {
    json j = json::parse(read_file(dir_ / "config.json"));
    edit(j["quantization_config"]);
    write_file_atomic(dir_ / "config.json", j.dump(2));
  }
  void expect_error(const std::string& mentions) const {
    test::expect_one_line_error(test::run_cli({"info", "-m", dir_.string()}), mentions);
  }
  static StWriteTensor i32(std::string name, Shape shape, std::vector<int32_t> v) {
    std::vector<uint8_t> bytes(v.size() * 4);
    std::memcpy(bytes.data(), v.data(), bytes.size());
    return {std::move(name), StDtype::I32, std::move(shape), std::move(bytes)};
  }
  fs::path dir_;
};

constexpr const char* kQ = "model.layers.0.self_attn.q_proj";

TEST_F(BadGptqFolder, MissingQzeros) {
  test::edit_safetensors(weights(), [](std::vector<StWriteTensor>& all) {
    std::erase_if(all, [](const StWriteTensor& t) { return t.name == cat(kQ, ".qzeros"); });
  });
  expect_error(cat("tensor '", kQ, ".qzeros' is missing"));
}

TEST_F(BadGptqFolder, MisshapedQweightScalesAndGidx) {
  // q_proj: 64 inputs x 4 bits = 8 words down each of 64 columns.
  test::replace_tensor(weights(), i32(cat(kQ, ".qweight"), {4, 64}, std::vector<int32_t>(256)));
  expect_error(cat("tensor '", kQ, ".qweight' has shape [4, 64], expected [8, 64]"));
}

TEST_F(BadGptqFolder, MisshapedScales) {
  test::replace_tensor(
      weights(), {cat(kQ, ".scales"), StDtype::F16, {3, 64}, std::vector<uint8_t>(3 * 64 * 2)});
  expect_error(cat("tensor '", kQ, ".scales' has shape [3, 64], expected [2, 64]"));
}

TEST_F(BadGptqFolder, MisshapedGidx) {
  test::replace_tensor(weights(), i32(cat(kQ, ".g_idx"), {63}, std::vector<int32_t>(63)));
  expect_error(cat("tensor '", kQ, ".g_idx' has shape [63], expected [64]"));
}

TEST_F(BadGptqFolder, QweightOfTheWrongDtype) {
  test::replace_tensor(
      weights(), {cat(kQ, ".qweight"), StDtype::F32, {8, 64}, std::vector<uint8_t>(8 * 64 * 4)});
  expect_error(cat("tensor '", kQ, ".qweight' has dtype F32, expected I32"));
}

TEST_F(BadGptqFolder, GidxOutOfRange) {
  std::vector<int32_t> g(64, 0);
  g[5] = 2;  // 64 inputs in groups of 32: groups 0 and 1
  test::replace_tensor(weights(), i32(cat(kQ, ".g_idx"), {64}, g));
  expect_error(cat("tensor '", kQ, ".g_idx': g_idx[5] is 2, expected a group in 0..1"));
}

TEST_F(BadGptqFolder, ZeroPointAboveTheLargestCode) {
  // v1 stores zero - 1; a stored 15 reads as 16, which 4 bits cannot hold.
  test::replace_tensor(weights(), i32(cat(kQ, ".qzeros"), {2, 8}, std::vector<int32_t>(16, -1)));
  expect_error(cat("tensor '", kQ, ".qzeros': zero point [0, 0] is 16 (stored 15 + 1"));
}

TEST_F(BadGptqFolder, UnsupportedBitsFormatAndMethod) {
  edit_config([](json& q) { q["bits"] = 5; });
  expect_error("config.json quantization_config: GPTQ field 'bits' is 5, expected 2, 3, 4 or 8");
  edit_config([](json& q) {
    q["bits"] = 4;
    q["checkpoint_format"] = "marlin";
  });
  expect_error("checkpoint_format 'marlin' is not supported");
  edit_config([](json& q) { q["quant_method"] = "awq"; });
  expect_error("quantization_config (quant_method 'awq') is not supported");
  edit_config([](json& q) {
    q["quant_method"] = "gptq";
    q["checkpoint_format"] = "gptq";
    q.erase("group_size");
  });
  expect_error("missing required field 'group_size'");
}

TEST_F(BadGptqFolder, AutoGptqWeightsFileNamedInQuantizeConfig) {
  fs::rename(weights(), dir_ / "gptq_model-4bit-32g.safetensors");
  expect_error("no model.safetensors or model.safetensors.index.json");
  write_file_atomic(
      dir_ / "quantize_config.json",
      R"({"bits": 4, "group_size": 32, "model_file_base_name": "gptq_model-4bit-32g"})");
  EXPECT_EQ(load_model(dir_).quant.bits, 4);
}

TEST_F(BadGptqFolder, ALinearLeftDenseLoadsDense) {
  // As GPTQModel writes modules it was told to skip: a plain weight, no GPTQ tensors.
  test::edit_safetensors(weights(), [](std::vector<StWriteTensor>& all) {
    std::erase_if(all, [](const StWriteTensor& t) { return t.name.starts_with(kQ); });
    all.push_back({cat(kQ, ".weight"), StDtype::F32, {64, 64}, std::vector<uint8_t>(64 * 64 * 4)});
  });
  const Model m = load_model(dir_);
  EXPECT_FALSE(m.layers[0].q.quantized());
  EXPECT_TRUE(m.layers[0].k.quantized());
  const test::CliResult r = test::run_cli({"info", dir_.string()});
  EXPECT_NE(r.out.find("13 of 14 quantized"), std::string::npos) << r.out;
}

TEST_F(BadGptqFolder, InfoShowsTheCheckpoint) {
  const test::CliResult r = test::run_cli({"info", "-m", dir_.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("quantization:      gptq, affine 4-bit, group 32, act-order\n"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("14 of 14 quantized"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace qalora
