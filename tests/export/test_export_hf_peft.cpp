// Dense Hugging Face export (same logits as the model it came from) and PEFT adapter export
// (the documented keys, shapes and config; loads back onto the Hugging Face model).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "export/export_test_util.h"
#include "qalora/adapters/adapter_io.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/core/mapped_file.h"
#include "qalora/export/export.h"
#include "qalora/io/safetensors.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::all_logits;

// Rank-4 adapters of `kind` on every linear of `base`, with a random (nonzero) B.
AdapterSet random_adapters(const Model& base, AdapterKind kind, uint64_t seed) {
  AdapterConfig cfg;
  cfg.kind = kind;
  cfg.rank = 4;
  cfg.alpha = 8;
  AdapterSet set = create_adapters(base, cfg);
  test::randomize_adapter_b(set, seed);
  return set;
}

TEST(ExportHf, DenseFolderReadsBackToTheSameLogits) {
  for (const bool tied : {true, false}) {
    const Model src =
        test::quantized(test::make_random_model(test::aligned_shape(tied), 15), "rtn", 3, 32);
    const fs::path dir = test::temp_dir() / "hf";
    const ExportReport r = export_hf(src, dir);
    EXPECT_TRUE(r.exact());
    const Model back = load_hf_model(dir);
    EXPECT_TRUE(back.quant.empty());
    EXPECT_FALSE(back.layers[0].q.quantized());
    EXPECT_FALSE(fs::exists(dir / "quantize_config.json"));
    EXPECT_EQ(all_logits(back), all_logits(dequantized_model(src))) << (tied ? "tied" : "untied");
    EXPECT_LE(test::max_abs_diff(all_logits(back), all_logits(src)), 1e-4);
  }
}

// --type bf16 / f16: every float tensor is stored rounded (nearest even), config.json says so,
// An adapter merged a block at a time as the folder is written reads back to the same logits
// as the whole model merged first (merge_dense), for LoRA and QA-LoRA on an INT4 base.
TEST(ExportHf, AdapterMergedPerBlockEqualsTheWholeModelMerged) {
  const Model base =
      test::quantized(test::make_random_model(test::aligned_shape(true), 20), "rtn", 4, 32);
  for (const AdapterKind kind : {AdapterKind::Lora, AdapterKind::QaLora}) {
    SCOPED_TRACE(adapter_kind_name(kind));
    const AdapterSet set = random_adapters(base, kind, 21);
    const fs::path dir = test::temp_dir() / "hf";
    const ExportReport r = export_hf(base, dir, DenseFloats::F32, &set);
    EXPECT_TRUE(r.exact());
    Model merged = base;
    merge_dense(merged, set);
    EXPECT_EQ(all_logits(load_hf_model(dir)), all_logits(merged));
    EXPECT_NE(all_logits(merged), all_logits(dequantized_model(base)));
  }
}

// and the report gives each tensor's error, which a model read back shows.
TEST(ExportHf, FloatsRoundedToBf16OrF16WithTheirErrors) {
  const Model src = test::make_random_model(test::aligned_shape(false), 18);
  for (const DenseFloats floats : {DenseFloats::BF16, DenseFloats::F16}) {
    const bool bf16 = floats == DenseFloats::BF16;
    SCOPED_TRACE(bf16 ? "bf16" : "f16");
    const fs::path dir = test::temp_dir() / "hf";
    const ExportReport r = export_hf(src, dir, floats);
    ASSERT_FALSE(r.tensors.empty());
    EXPECT_FALSE(r.exact());
    EXPECT_GT(r.relative_error(), 0.0);
    EXPECT_LT(r.relative_error(), bf16 ? 1.0 / 256 : 1.0 / 2048);
    const SafetensorsFile st = SafetensorsFile::open(dir / "model.safetensors");
    EXPECT_EQ(st.tensors().size(), r.tensors.size());
    for (const StTensorInfo& t : st.tensors())
      EXPECT_EQ(t.dtype, bf16 ? StDtype::BF16 : StDtype::F16) << t.name;
    const auto config = nlohmann::json::parse(read_file(dir / "config.json"));
    EXPECT_EQ(config.at("torch_dtype"), bf16 ? "bfloat16" : "float16");

    const Model back = load_hf_model(dir);
    const Tensor up_back = back.layers[1].up.weight.decoded();
    const std::span<const float> up = up_back.span();
    const std::span<const float> want = src.layers[1].up.weight.span();
    double max_dw = 0.0;
    for (size_t i = 0; i < up.size(); ++i) {
      const float rounded = bf16 ? bf16_to_fp32(fp32_to_bf16(want[i])) : round_to_fp16(want[i]);
      ASSERT_EQ(up[i], rounded) << i;
      max_dw = std::max(max_dw, std::abs(static_cast<double>(up[i]) - want[i]));
    }
    const auto reported =
        std::ranges::find(r.tensors, "model.layers.1.mlp.up_proj.weight", &TensorExport::name);
    ASSERT_NE(reported, r.tensors.end());
    EXPECT_EQ(reported->max_abs_dw, max_dw);
  }
}

TEST(ExportHf, RoundingRefusesF16OverflowAndQuantizedFolders) {
  Model src = test::make_random_model(test::aligned_shape(false), 19);
  src.layers[0].up.weight.mutable_data()[3] = 1e5f;
  const fs::path dir = test::temp_dir() / "hf";
  try {
    export_hf(src, dir, DenseFloats::F16);
    ADD_FAILURE() << "a value beyond F16's range was written";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.up_proj.weight"), std::string::npos)
        << e.what();
  }
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_NO_THROW(export_hf(src, dir, DenseFloats::BF16));
  const Model q = test::quantized(src, "rtn", 4, 32);
  EXPECT_THROW(save_hf_model(q, test::temp_dir() / "q", DenseFloats::BF16), Error);
}

const char* const kModules[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                "mlp.down_proj"};

TEST(ExportPeft, KeysShapesAndConfigAsDocumentedAndLoadsOntoTheHfModel) {
  const Model base =
      test::quantized(test::make_random_model(test::aligned_shape(false), 16), "rtn", 4, 32);
  const fs::path dir = test::temp_dir();
  save_hf_model(base, dir / "base");
  const Model hf = load_hf_model(dir / "base");
  for (const AdapterKind kind : {AdapterKind::QaLora, AdapterKind::Lora}) {
    SCOPED_TRACE(adapter_kind_name(kind));
    AdapterSet set = random_adapters(base, kind, 17);
    const fs::path out = dir / adapter_kind_name(kind);
    save_peft_adapter(set, base, out);
    EXPECT_FALSE(fs::exists(out / "qalora_adapter.json")) << "PEFT files only";

    const auto config = nlohmann::json::parse(read_file(out / "adapter_config.json"));
    EXPECT_EQ(config.at("peft_type"), "LORA");
    EXPECT_EQ(config.at("r"), 4);
    EXPECT_EQ(config.at("lora_alpha"), 8.0);
    EXPECT_EQ(config.at("use_rslora"), false);
    EXPECT_EQ(config.at("target_modules").size(), 7u);
    EXPECT_EQ(config.value("use_qalora", false), kind == AdapterKind::QaLora);
    if (kind == AdapterKind::QaLora) {
      EXPECT_EQ(config.at("qalora_group_size"), 32);
    }

    const SafetensorsFile st = SafetensorsFile::open(out / "adapter_model.safetensors");
    EXPECT_EQ(st.tensors().size(), 2u * 7u * 2u);
    for (int64_t l = 0; l < 2; ++l)
      for (size_t t = 0; t < 7; ++t) {
        const Linear& lin = target_linear(base.layers[l], all_targets()[t]);
        const std::string p = cat("base_model.model.model.layers.", l, ".", kModules[t]);
        const StTensorInfo* a = st.find(p + ".lora_A.weight");
        const StTensorInfo* b = st.find(p + ".lora_B.weight");
        ASSERT_NE(a, nullptr) << p;
        ASSERT_NE(b, nullptr) << p;
        const int64_t cols =
            kind == AdapterKind::QaLora ? lin.in_features() / 32 : lin.in_features();
        EXPECT_EQ(a->shape, (Shape{4, cols})) << p;
        EXPECT_EQ(b->shape, (Shape{lin.out_features(), 4})) << p;
      }
    const AdapterSet loaded = load_adapter(out, hf);
    EXPECT_LE(test::max_abs_diff(all_logits(hf, &loaded), all_logits(base, &set)), 1e-4);
  }
}

TEST(ExportPeft, RaggedQaLoraGroupsAreRefused) {
  const Model base =
      test::quantized(test::make_random_model(test::ragged_shape(), 18), "rtn", 4, 16);
  const AdapterSet set = test::random_qalora(base, 19);
  const fs::path out = test::temp_dir() / "peft";
  try {
    save_peft_adapter(set, base, out);
    ADD_FAILURE() << "ragged groups were written as PEFT files";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("PEFT cannot express"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out / "adapter_config.json"));
}

}  // namespace
}  // namespace qalora
