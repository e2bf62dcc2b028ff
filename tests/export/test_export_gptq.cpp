// GPTQ export read back by the project's GPTQ reader (load_hf_model): codes and scales survive,
// the dequantized weights differ by exactly what the report says (nothing for offsets of the
// form -s z), at 2, 3, 4 and 8 bits with v1 and v2 zeros; unsupported models are refused.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "export/export_test_util.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/export/export.h"
#include "qalora/io/safetensors.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::all_logits;

// Largest |back - src| over the dequantized linears of layer l, target t.
double linear_diff(const Model& back, const Model& src, size_t l, Target t) {
  const Tensor a = target_linear(back.layers[l], t).dense_weight();
  const Tensor b = target_linear(src.layers[l], t).dense_weight();
  return test::max_abs_diff(a.data(), b.data(), a.numel());
}

// The report names every linear with exactly the difference the reader sees.
void expect_report_matches(const ExportReport& r, const Model& back, const Model& src) {
  ASSERT_EQ(r.tensors.size(), src.layers.size() * 7);
  size_t i = 0;
  for (size_t l = 0; l < src.layers.size(); ++l)
    for (const Target t : all_targets()) {
      const TensorExport& e = r.tensors[i++];
      EXPECT_NE(e.name.find(cat("layers.", l, ".")), std::string::npos) << e.name;
      EXPECT_NE(e.name.find(target_name(t)), std::string::npos) << e.name;
      EXPECT_EQ(e.max_abs_dw, linear_diff(back, src, l, t)) << e.name;
    }
}

std::map<std::string, std::vector<uint8_t>> raw_tensors(const fs::path& file) {
  const SafetensorsFile st = SafetensorsFile::open(file);
  std::map<std::string, std::vector<uint8_t>> out;
  for (const StTensorInfo& t : st.tensors())
    out[t.name] = std::vector<uint8_t>(st.data(t), st.data(t) + (t.end - t.begin));
  return out;
}

TEST(ExportGptq, ReadsBackAt2348BitsWithV1AndV2Zeros) {
  for (const int bits : {2, 3, 4, 8})
    for (const bool v2 : {false, true})
      for (const bool sym : {true, false}) {
        SCOPED_TRACE(testing::Message()
                     << bits << "-bit " << (v2 ? "v2" : "v1") << (sym ? " sym" : " asym"));
        const Model src = test::quantized(test::make_random_model(test::aligned_shape(false), 11),
                                          "rtn", bits, 32, sym);
        const fs::path dir = test::temp_dir();
        const ExportReport r = export_gptq(src, dir / "gptq", {v2, false});
        const Model back = load_hf_model(dir / "gptq");
        EXPECT_EQ(back.quant.method, "gptq");
        EXPECT_EQ(back.quant.bits, bits);
        expect_report_matches(r, back, src);
        for (size_t l = 0; l < src.layers.size(); ++l)
          for (const Target t : all_targets()) {
            const QMatrix& a = target_linear(back.layers[l], t).qweight;
            const QMatrix& b = target_linear(src.layers[l], t).qweight;
            EXPECT_EQ(a.codes, b.codes) << target_name(t);
            EXPECT_EQ(a.scales, b.scales) << target_name(t);
          }
        // Symmetric zero points are 2^(b-1), so m = -s z is exact in fp16: nothing changes.
        if (sym) {
          EXPECT_TRUE(r.exact());
          EXPECT_EQ(all_logits(back), all_logits(src));
        }
        EXPECT_LT(r.relative_error(), 1e-2);

        const auto config = nlohmann::json::parse(read_file(dir / "gptq" / "config.json"));
        const auto& qc = config.at("quantization_config");
        EXPECT_EQ(qc.at("quant_method"), "gptq");
        EXPECT_EQ(qc.at("bits"), bits);
        EXPECT_EQ(qc.at("group_size"), 32);
        EXPECT_EQ(qc.at("desc_act"), false);
        EXPECT_EQ(qc.at("sym"), sym);
        EXPECT_EQ(qc.at("checkpoint_format"), v2 ? "gptq_v2" : "gptq");
        EXPECT_EQ(config.at("tie_word_embeddings"), false);

        // A GPTQ checkpoint exports to itself, exactly and byte for byte.
        const ExportReport again = export_gptq(back, dir / "again", {v2, false});
        EXPECT_TRUE(again.exact());
        EXPECT_EQ(raw_tensors(dir / "again" / "model.safetensors"),
                  raw_tensors(dir / "gptq" / "model.safetensors"));
      }
}

TEST(ExportGptq, MergedQaLoraZerosAreRoundedAndReported) {
  const Model base =
      test::quantized(test::make_random_model(test::aligned_shape(true), 12), "rtn", 4, 32);
  const Model src = test::merged_qalora(base, 13);
  const fs::path dir = test::temp_dir() / "gptq";
  const ExportReport r = export_gptq(src, dir, {false, false});
  const Model back = load_hf_model(dir);
  expect_report_matches(r, back, src);
  EXPECT_GT(r.max_abs_dm(), 0);
  EXPECT_GT(r.max_abs_dw(), 0);
  EXPECT_LE(r.max_abs_dw(), r.max_abs_dm()) << "a code times s plus m: the offset's change";
  const auto json = r.to_json();
  EXPECT_EQ(json.at("max_abs_dm").get<double>(), r.max_abs_dm());
  EXPECT_EQ(json.at("tensors").size(), 14u);
}

// stories260K's MLP has 172 rows or inputs: at 4 bits they do not fill int32 words and stay
// dense (exactly), named in modules_in_block_to_quantize.
TEST(ExportGptq, LinearsThatDoNotFillWordsStayDense) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  const Model src = test::quantized(test::load_stories(), "rtn", 4, 32, /*sym=*/true);
  const fs::path dir = test::temp_dir() / "gptq";
  const ExportReport r = export_gptq(src, dir, {true, false});
  EXPECT_TRUE(r.exact());
  const Model back = load_hf_model(dir);
  EXPECT_TRUE(back.layers[0].q.quantized());
  EXPECT_FALSE(back.layers[0].down.quantized());
  EXPECT_TRUE(test::same_bits(back.layers[2].down.weight, src.layers[2].down.dense_weight()));
  EXPECT_LE(test::max_abs_diff(all_logits(back), all_logits(src)), 1e-4);
  const auto qc = nlohmann::json::parse(read_file(dir / "config.json")).at("quantization_config");
  EXPECT_EQ(qc.at("modules_in_block_to_quantize"),
            nlohmann::json::array({{"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.o_proj"}}));
}

TEST(ExportGptq, RefusesWhatGptqCannotHold) {
  const Model dense = test::make_random_model(test::aligned_shape(true), 14);
  const fs::path dir = test::temp_dir() / "gptq";
  const auto expect_error = [&](const Model& m, const std::string& mentions) {
    try {
      export_gptq(m, dir, {});
      ADD_FAILURE() << "not refused: " << mentions;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
    }
  };
  expect_error(dense, "no quantized linear");
  expect_error(test::quantized(dense, "nf4", 4, 64), "--format gguf");
  Model act_order = test::quantized(dense, "rtn", 4, 32);
  std::vector<int32_t>& g = act_order.layers[1].up.qweight.g_idx;
  for (int32_t i = 0; i < 64; ++i) g.push_back(i / 32);
  std::swap(g[0], g[40]);
  expect_error(act_order, "--static-groups");
}

}  // namespace
}  // namespace qalora
