// Merging adapters into their base: the exact QA-LoRA offset merge keeps codes and scales and
// reproduces the unmerged logits at INT4/3/2 with ragged groups; the dense merge does the same
// for LoRA and QA-LoRA; merge_fidelity measures the difference; bad input is refused.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "export/export_test_util.h"
#include "model/model_compare.h"
#include "model/random_model.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/error.h"
#include "qalora/model/model.h"
#include "qalora/model/runtime.h"
#include "qalora/quant/quantize_model.h"
#include "test_util.h"

namespace qalora {
namespace {

Model quantized_model(int bits, uint64_t seed) {
  return test::quantized(test::make_random_model(test::ragged_shape(), seed), "rtn", bits, 16);
}

// The INT4 model or its dense original.
Model int4_or_dense(bool quantized, uint64_t seed) {
  return quantized ? quantized_model(4, seed) : test::make_random_model(test::ragged_shape(), seed);
}

const std::vector<int32_t> kTokens = {1, 4, 30, 7, 7, 12, 0, 19, 3, 22, 28, 5, 16, 9};

std::vector<float> logits(const Model& m, const AdapterSet* set) {
  InferenceSession session(m, 32, set);
  std::vector<float> out(kTokens.size() * static_cast<size_t>(m.config.vocab_size));
  session.forward(kTokens, out, /*all_logits=*/true);
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(static_cast<double>(a[i]) - b[i]));
  return d;
}

TEST(MergeQaLora, OffsetMergeReproducesTheUnmergedModel) {
  for (const int bits : {4, 3, 2})
    for (const AdapterPool pool : {AdapterPool::Average, AdapterPool::Sum}) {
      SCOPED_TRACE(testing::Message() << "INT" << bits << " " << adapter_pool_name(pool));
      const Model base = quantized_model(bits, 3);
      AdapterConfig cfg;
      cfg.kind = AdapterKind::QaLora;
      cfg.pool = pool;
      cfg.rank = 4;
      cfg.alpha = 6;
      AdapterSet set = create_adapters(base, cfg);
      test::randomize_adapter_b(set, 9);
      Model merged = base;
      merge_qalora(merged, set);

      const std::vector<float> want = logits(base, &set);
      EXPECT_LE(max_abs_diff(logits(merged, nullptr), want), 1e-4);
      EXPECT_GT(max_abs_diff(logits(base, nullptr), want), 1e-2)
          << "the adapter must change the logits";
      EXPECT_EQ(merged.quant.method, "rtn");
      for (size_t l = 0; l < base.layers.size(); ++l)
        for (const Target t : all_targets()) {
          const QMatrix& before = target_linear(base.layers[l], t).qweight;
          const QMatrix& after = target_linear(merged.layers[l], t).qweight;
          EXPECT_EQ(after.codes, before.codes) << target_name(t);
          EXPECT_TRUE(test::same_bits(after.scales, before.scales)) << target_name(t);
          EXPECT_FALSE(test::same_bits(after.offsets, before.offsets)) << target_name(t);
        }
    }
}

// The rule itself, element by element in double, on the ragged last group.
TEST(MergeQaLora, OffsetsMoveByScaledBAOverTheTrueGroupSize) {
  const Model base = quantized_model(4, 5);
  AdapterConfig cfg;
  cfg.kind = AdapterKind::QaLora;
  cfg.rank = 3;
  cfg.alpha = 5;
  cfg.targets = {Target::Q};
  AdapterSet set = create_adapters(base, cfg);
  test::randomize_adapter_b(set, 11);
  Model merged = base;
  merge_qalora(merged, set);
  const LoraAdapter& a = set.adapters[0];
  const QMatrix& before = base.layers[0].q.qweight;
  const QMatrix& after = merged.layers[0].q.qweight;
  const int64_t L = before.n_groups();
  ASSERT_EQ(L, 3);
  const double sizes[] = {16, 16, 8};
  for (int64_t j = 0; j < before.rows; ++j)
    for (int64_t l = 0; l < L; ++l) {
      double ba = 0;
      for (int64_t k = 0; k < a.rank(); ++k)
        ba += static_cast<double>(a.B.data()[j * a.rank() + k]) * a.A.data()[k * L + l];
      const double want = before.offsets[j * L + l] + cfg.scale() * ba / sizes[l];
      EXPECT_NEAR(after.offsets[j * L + l], want, 1e-6 * (1 + std::abs(want))) << j << "," << l;
    }
}

TEST(MergeQaLora, SavedMergedModelLoadsBackBitForBit) {
  const Model base = quantized_model(3, 6);
  AdapterConfig cfg;
  cfg.kind = AdapterKind::QaLora;
  cfg.rank = 2;
  AdapterSet set = create_adapters(base, cfg);
  test::randomize_adapter_b(set, 12);
  Model merged = base;
  merge_qalora(merged, set);
  const auto dir = test::temp_dir() / "merged";
  save_hf_model(merged, dir);
  const Model loaded = load_model(dir);
  for (size_t l = 0; l < merged.layers.size(); ++l)
    for (const Target t : all_targets()) {
      const QMatrix& want = target_linear(merged.layers[l], t).qweight;
      const QMatrix& got = target_linear(loaded.layers[l], t).qweight;
      EXPECT_EQ(got.bits, 3);
      EXPECT_EQ(got.codes, want.codes);
      EXPECT_TRUE(test::same_bits(got.offsets, want.offsets)) << "merged offsets need fp32 storage";
    }
  EXPECT_EQ(logits(loaded, nullptr), logits(merged, nullptr));
}

TEST(MergeDense, LoraOnDenseAndOnInt4EqualsTheUnmergedModel) {
  for (const bool quantized : {false, true})
    for (const bool all : {true, false}) {
      SCOPED_TRACE(testing::Message() << (quantized ? "INT4" : "dense") << (all ? " all" : ""));
      const Model base = int4_or_dense(quantized, 7);
      const std::vector<float> base_before = logits(base, nullptr);
      AdapterConfig cfg;
      cfg.rank = 3;
      cfg.alpha = 5;
      cfg.rslora = true;
      if (!all) cfg.targets = parse_targets("q_proj,v_proj,down_proj");
      AdapterSet set = create_adapters(base, cfg);
      test::randomize_adapter_b(set, 10);
      Model merged = base;
      merge_dense(merged, set);

      const std::vector<float> want = logits(base, &set);
      EXPECT_LE(max_abs_diff(logits(merged, nullptr), want), 1e-4);
      EXPECT_GT(max_abs_diff(base_before, want), 1e-2);
      EXPECT_EQ(logits(base, nullptr), base_before) << "the base must not change";
      EXPECT_FALSE(merged.layers[1].v.quantized());
      EXPECT_EQ(merged.layers[1].k.quantized(), quantized && !all);
      EXPECT_EQ(merged.quant.empty(), !(quantized && !all)) << "quant info of a mixed model";
    }
}

// save_merged_qalora writes a block at a time what save_hf_model writes after merge_qalora: the
// same codes, scales and fp32 offsets, bit for bit, with some targets left without an adapter;
// and the base it reads stays unmerged.
TEST(MergeQaLora, WrittenABlockAtATimeEqualsTheMergedModelSaved) {
  const Model base = quantized_model(4, 13);
  AdapterConfig cfg;
  cfg.kind = AdapterKind::QaLora;
  cfg.rank = 3;
  cfg.targets = parse_targets("q_proj,v_proj,down_proj");
  AdapterSet set = create_adapters(base, cfg);
  test::randomize_adapter_b(set, 15);
  const std::vector<float> base_logits = logits(base, nullptr);
  Model merged = base;
  merge_qalora(merged, set);
  const auto dir = test::temp_dir();
  save_hf_model(merged, dir / "whole");
  save_merged_qalora(base, set, dir / "blocks");
  EXPECT_EQ(logits(base, nullptr), base_logits);
  const Model want = load_model(dir / "whole"), got = load_model(dir / "blocks");
  EXPECT_EQ(got.quant.method, want.quant.method);
  for (size_t l = 0; l < want.layers.size(); ++l)
    for (const Target t : all_targets()) {
      const QMatrix& w = target_linear(want.layers[l], t).qweight;
      const QMatrix& g = target_linear(got.layers[l], t).qweight;
      EXPECT_EQ(g.codes, w.codes) << l << " " << target_name(t);
      EXPECT_TRUE(test::same_bits(g.scales, w.scales)) << l << " " << target_name(t);
      EXPECT_TRUE(test::same_bits(g.offsets, w.offsets)) << l << " " << target_name(t);
    }
  EXPECT_EQ(logits(got, nullptr), logits(want, nullptr));
  AdapterConfig lora;
  lora.rank = 2;
  EXPECT_THROW(save_merged_qalora(base, create_adapters(base, lora), dir / "lora"), Error);
}

// save_merged_dense writes a block at a time what save_hf_model writes of the merged model: the
// same logits bit for bit, the same mixed form where some targets have no adapter, the same
// quantization record.
TEST(MergeDense, WrittenABlockAtATimeEqualsTheMergedModelSaved) {
  for (const bool quantized : {false, true})
    for (const bool all : {true, false}) {
      SCOPED_TRACE(testing::Message() << (quantized ? "INT4" : "dense") << (all ? " all" : ""));
      const Model base = int4_or_dense(quantized, 9);
      AdapterConfig cfg;
      cfg.rank = 3;
      if (!all) cfg.targets = parse_targets("q_proj,v_proj,down_proj");
      AdapterSet set = create_adapters(base, cfg);
      test::randomize_adapter_b(set, 11);
      Model merged = base;
      merge_dense(merged, set);
      const auto dir = test::temp_dir();
      save_hf_model(merged, dir / "whole");
      save_merged_dense(base, set, dir / "blocks");
      const Model want = load_model(dir / "whole"), got = load_model(dir / "blocks");
      EXPECT_EQ(got.quant.method, want.quant.method);
      EXPECT_EQ(got.layers[1].k.quantized(), want.layers[1].k.quantized());
      EXPECT_EQ(got.layers[1].v.quantized(), want.layers[1].v.quantized());
      EXPECT_EQ(logits(got, nullptr), logits(want, nullptr));
    }
}

// merge --requantize merges each block just before quantize_model reaches it (BeforeBlock): the
// same codes, scales and offsets as merging the whole model first, for RTN and for GPTQ (whose
// calibration runs through the merged, quantized blocks in both).
TEST(MergeDense, MergedBlockByBlockAsQuantizedEqualsMergedFirst) {
  const Model base = quantized_model(4, 12);
  AdapterConfig cfg;
  cfg.rank = 3;
  cfg.targets = parse_targets("q_proj,v_proj,down_proj");
  AdapterSet set = create_adapters(base, cfg);
  test::randomize_adapter_b(set, 14);
  const std::vector<std::vector<int32_t>> windows = {kTokens, {kTokens.rbegin(), kTokens.rend()}};
  for (const char* method : {"rtn", "gptq"}) {
    SCOPED_TRACE(method);
    QuantizeOptions o;
    o.method = method;
    o.bits = 3;
    o.group_size = 16;
    Model first = base, streamed = base;
    merge_dense(first, set);
    quantize_model(first, o, windows);
    quantize_model(streamed, o, windows, {}, {}, [&](int64_t index, LayerWeights& block) {
      merge_dense_block(block, index, set);
    });
    for (size_t l = 0; l < base.layers.size(); ++l)
      for (const Target t : all_targets()) {
        const QMatrix& want = target_linear(first.layers[l], t).qweight;
        const QMatrix& got = target_linear(streamed.layers[l], t).qweight;
        ASSERT_EQ(got.codes, want.codes) << "layer " << l << " " << target_name(t);
        EXPECT_TRUE(test::same_bits(got.scales, want.scales));
        EXPECT_TRUE(test::same_bits(got.offsets, want.offsets));
      }
  }
}

TEST(MergeDense, QaLoraEqualsTheUnmergedModel) {
  for (const AdapterPool pool : {AdapterPool::Average, AdapterPool::Sum}) {
    const Model base = quantized_model(2, 8);
    AdapterConfig cfg;
    cfg.kind = AdapterKind::QaLora;
    cfg.pool = pool;
    cfg.rank = 4;
    AdapterSet set = create_adapters(base, cfg);
    test::randomize_adapter_b(set, 13);
    Model merged = base;
    merge_dense(merged, set);
    EXPECT_TRUE(merged.quant.empty());
    EXPECT_LE(max_abs_diff(logits(merged, nullptr), logits(base, &set)), 1e-4)
        << adapter_pool_name(pool);
  }
}

TEST(MergeFidelity, MeasuresTheMergeAgainstTheUnmergedModel) {
  const Model base = quantized_model(4, 14);
  AdapterConfig cfg;
  cfg.kind = AdapterKind::QaLora;
  cfg.rank = 4;
  AdapterSet set = create_adapters(base, cfg);
  test::randomize_adapter_b(set, 15);
  Model merged = base;
  merge_qalora(merged, set);
  std::vector<int32_t> text(45);
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<int32_t>((i * 7 + 3) % 31);

  const MergeFidelity f = merge_fidelity(base, &set, merged, text, 16);
  // No tokenizer, so no BOS: windows of 16, 16 and 13 positions.
  EXPECT_EQ(f.tokens, 45);
  EXPECT_LE(f.max_abs_logit_diff, 1e-4);
  EXPECT_LT(f.mean_kl, 1e-8);
  EXPECT_GT(f.ppl_unmerged, 1.0);
  EXPECT_NEAR(f.ppl_merged, f.ppl_unmerged, 1e-5 * f.ppl_unmerged);

  // The bare base as the "merged" model: the adapter's whole effect shows.
  const MergeFidelity off = merge_fidelity(base, &set, base, text, 16);
  EXPECT_GT(off.max_abs_logit_diff, 1e-2);
  EXPECT_GT(off.mean_kl, 1e-4);
  EXPECT_NEAR(off.ppl_unmerged, f.ppl_unmerged, 1e-9 * f.ppl_unmerged);
  EXPECT_GT(std::abs(off.ppl_merged - off.ppl_unmerged), 1e-3);
}

TEST(MergeErrors, RefusesWhatCannotBeMerged) {
  const Model base = quantized_model(4, 16);
  Model merged = base;
  const AdapterSet lora = create_adapters(base, AdapterConfig{});
  EXPECT_THROW(merge_qalora(merged, lora), Error);

  test::RandomModelShape other = test::ragged_shape();
  other.hidden = 32;
  other.vocab = 29;
  Model other_model = test::make_random_model(other, 16);
  QuantizeOptions q;
  q.method = "rtn";
  q.group_size = 16;
  quantize_model(other_model, q, {});
  AdapterConfig cfg;
  cfg.kind = AdapterKind::QaLora;
  const AdapterSet foreign = create_adapters(other_model, cfg);
  EXPECT_THROW(merge_qalora(merged, foreign), Error);
  EXPECT_THROW(merge_dense(merged, foreign), Error);

  const AdapterSet own = create_adapters(base, cfg);
  const std::vector<int32_t> text = {1, 2, 3, 4};
  EXPECT_THROW(merge_fidelity(base, &own, base, text, 1), Error);
  EXPECT_THROW(merge_fidelity(base, &own, other_model, text, 4), Error) << "vocabulary";
  try {
    merge_qalora(merged, lora);
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("qalora"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace qalora
