// The QA-LoRA merge on the real models (issue acceptance): at INT4, INT3 and INT2 with groups of
// 32, average and sum pooling, the merged model's logits stay within 1e-2 of the unmerged
// adapter's and its perplexity agrees to three significant digits, on stories260K (whose down
// projection has 172 inputs: a ragged last group) and SmolLM2-135M.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "model/random_model.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/mapped_file.h"
#include "qalora/model/model.h"
#include "qalora/quant/quantize_model.h"
#include "test_util.h"

namespace qalora {
namespace {

const char* kStoriesBin = "models/stories260K/stories260K.bin";
const char* kStoriesTok = "models/stories260K/tok512.bin";
const char* kTinyStories = "text/tinystories_val.txt";

// Within half a unit of the third significant digit.
bool same_3_digits(double a, double b) {
  return std::abs(a - b) <= 5e-4 * std::abs(b);
}

// `amplitude` sizes B so that the adapter moves the perplexity visibly without wrecking the
// model (its A keeps the Kaiming initialisation).
void expect_exact_merges(const Model& fp32, const std::vector<int32_t>& tokens, int64_t ctx,
                         float amplitude) {
  for (const int bits : {4, 3, 2}) {
    Model base = fp32;
    QuantizeOptions q;
    q.method = "rtn";
    q.bits = bits;
    q.group_size = 32;
    quantize_model(base, q, {});
    for (const AdapterPool pool : {AdapterPool::Average, AdapterPool::Sum}) {
      SCOPED_TRACE(testing::Message() << "INT" << bits << " " << adapter_pool_name(pool));
      AdapterConfig cfg;
      cfg.kind = AdapterKind::QaLora;
      cfg.pool = pool;
      cfg.rank = 8;
      cfg.alpha = 16;
      AdapterSet set = create_adapters(base, cfg);
      // Sum pooling feeds A group sums, 32 times the averages: a smaller B keeps the change alike.
      const bool sum = pool == AdapterPool::Sum;
      test::randomize_adapter_b(set, 40 + static_cast<uint64_t>(2 * bits + sum),
                                sum ? amplitude / 32 : amplitude);
      Model merged = base;
      merge_qalora(merged, set);

      const MergeFidelity f = merge_fidelity(base, &set, merged, tokens, ctx);
      EXPECT_LE(f.max_abs_logit_diff, 1e-2);
      EXPECT_TRUE(same_3_digits(f.ppl_merged, f.ppl_unmerged))
          << f.ppl_merged << " vs " << f.ppl_unmerged;
      // The adapter must matter, or the comparison above proves nothing (checked once per base:
      // both pools use adapters of the same size).
      if (sum) continue;
      const MergeFidelity without = merge_fidelity(base, &set, base, tokens, ctx);
      EXPECT_GT(std::abs(without.ppl_merged - without.ppl_unmerged), 0.005 * f.ppl_unmerged)
          << "adapter off: " << without.ppl_merged << ", on: " << without.ppl_unmerged;
    }
  }
}

std::vector<int32_t> tinystories_tokens(const Model& m, size_t n) {
  std::vector<int32_t> ids = m.require_tokenizer().encode(
      read_file(test::data_dir() / kTinyStories).substr(0, 20000), /*add_bos=*/false);
  ids.resize(std::min(ids.size(), n));
  return ids;
}

TEST(MergeReal, Stories260KQaLoraMergesExactlyAtInt432) {
  QL_REQUIRE_DATA(kStoriesBin);
  QL_REQUIRE_DATA(kTinyStories);
  const Model m =
      load_model(test::data_dir() / kStoriesBin, {.tokenizer = test::data_dir() / kStoriesTok});
  expect_exact_merges(m, tinystories_tokens(m, 1024), 256, 0.5f);
}

TEST(MergeReal, SmolLm2QaLoraMergesExactlyAtInt432) {
  QL_SKIP_UNDER_SANITIZERS("three quantizations of SmolLM2; stories260K covers the same code");
  QL_REQUIRE_SMOLLM2();
  QL_REQUIRE_DATA(kTinyStories);
  const Model m = load_model(test::smollm2_path());
  expect_exact_merges(m, tinystories_tokens(m, 128), 128, 0.2f);
}

}  // namespace
}  // namespace qalora
