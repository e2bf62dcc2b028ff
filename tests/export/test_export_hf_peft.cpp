// Dense Hugging Face export (same logits as the model it came from) and PEFT adapter export
// (the documented keys, shapes and config; loads back onto the Hugging Face model).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "export/export_test_util.h"
#include "qalora/adapters/adapter_io.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/export/export.h"
#include "qalora/io/safetensors.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::all_logits;

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
    AdapterConfig cfg;
    cfg.kind = kind;
    cfg.rank = 4;
    cfg.alpha = 8;
    AdapterSet set = create_adapters(base, cfg);
    test::randomize_adapter_b(set, 17);
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
