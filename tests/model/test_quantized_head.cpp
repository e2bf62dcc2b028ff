// The output head kept in its GGUF source quantization (Q8_0 / Q4_0 / Q4_1 as an exact affine
// QMatrix): exact conversion, logits equal to the float head's, and the native folder round trip.
#include <gtest/gtest.h>

#include <cmath>

#include "model/random_model.h"
#include "qalora/io/gguf.h"
#include "qalora/model/runtime.h"
#include "qalora/quant/quantize.h"
#include "test_util.h"

namespace qalora {
namespace {

// w [rows, cols] in ggml blocks of `type`, and what ggml's reference decodes them to.
std::pair<std::vector<uint8_t>, std::vector<float>> encode(GgmlType type,
                                                           const std::vector<float>& w,
                                                           int64_t rows, int64_t cols) {
  const size_t row_bytes = ggml_row_bytes(type, cols);
  std::vector<uint8_t> blocks(row_bytes * rows);
  std::vector<float> decoded(w.size());
  for (int64_t j = 0; j < rows; ++j) {
    quantize_row(type, &w[j * cols], &blocks[j * row_bytes], cols);
    dequantize_row(type, &blocks[j * row_bytes], &decoded[j * cols], cols);
  }
  return {std::move(blocks), std::move(decoded)};
}

TEST(QuantizedHead, GgmlBlocksConvertExactly) {
  const int64_t rows = 5, cols = 96;
  const std::vector<float> w = test::random_normal(rows * cols, 1, 0.3f);
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1}) {
    const auto [blocks, expected] = encode(type, w, rows, cols);
    const auto q = ggml_to_qmatrix(type, blocks.data(), rows, cols);
    ASSERT_TRUE(q.has_value()) << ggml_type_name(type);
    q->validate("converted");
    EXPECT_TRUE(q->scales.is_half() && q->offsets.is_half()) << ggml_type_name(type);
    // Repacked when read, freed by release_pages and repacked the same when read again.
    for (int pass = 0; pass < 2; ++pass) {
      const Tensor got = dequantize(*q);
      for (size_t i = 0; i < w.size(); ++i)
        ASSERT_EQ(got.data()[i], expected[i]) << ggml_type_name(type) << " element " << i;
      q->release_pages();
    }
  }
  std::vector<uint8_t> f16(2 * cols);
  EXPECT_FALSE(ggml_to_qmatrix(GgmlType::F16, f16.data(), 1, cols).has_value());
}

// Symmetric blocks' offsets are -8 d (Q4_0) or -128 d (Q8_0): where one would overflow fp16,
// all of them are held in fp32 and the weights stay exact.
TEST(QuantizedHead, SymmetricBlocksWhoseOffsetsOverflowFp16StayExact) {
  const int64_t rows = 2, cols = 64;
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0}) {
    const float big = type == GgmlType::Q8_0 ? 600.0f * 127 : 9000.0f * 8;  // d = 600 or 9000
    std::vector<float> w = test::random_normal(rows * cols, 2, 0.3f);
    w[cols + 5] = type == GgmlType::Q8_0 ? big : -big;  // the block's extreme (Q4_0: signed)
    const auto [blocks, expected] = encode(type, w, rows, cols);
    const auto q = ggml_to_qmatrix(type, blocks.data(), rows, cols);
    ASSERT_TRUE(q.has_value());
    EXPECT_TRUE(q->scales.is_half());
    EXPECT_FALSE(q->offsets.is_half()) << ggml_type_name(type);
    const Tensor got = dequantize(*q);
    for (size_t i = 0; i < w.size(); ++i)
      ASSERT_EQ(got.data()[i], expected[i]) << ggml_type_name(type) << " element " << i;
  }
}

// A model whose head is an 8-bit g32 QMatrix (as from a Q8_0 GGUF): its logits equal those of
// the dequantized float head, and a native quantized folder stores and restores it bit for bit.
TEST(QuantizedHead, NativeFolderRoundTripAndLogits) {
  for (bool tied : {true, false}) {
    test::RandomModelShape shape;
    shape.dim = 64;  // a multiple of the 32-element blocks
    shape.tied = tied;
    Model m = test::make_random_model(shape, 9);
    Tensor& head = tied ? m.tok_embeddings : m.output;
    m.head_q = quantize_rtn(head.data(), head.dim(0), head.dim(1), 8, 32, false);
    head = dequantize(m.head_q);
    const std::vector<int32_t> ids = {1, 5, 9, 33, 2};
    Model dense_head = m;
    dense_head.head_q = QMatrix();
    const std::vector<float> a = InferenceSession(m).forward_last(ids),
                             b = InferenceSession(dense_head).forward_last(ids);
    for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-4 * (1 + std::fabs(b[i])));

    for (LayerWeights& L : m.layers)  // native folders are written for quantized models
      for (Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) {
        l->qweight = quantize_rtn(l->weight.data(), l->out_features(), l->in_features(), 4, 32, false);
        l->weight = Tensor();
      }
    const auto dir = test::temp_dir() / "q";
    save_hf_model(m, dir);
    const Model r = load_model(dir);
    EXPECT_EQ(r.head_q.codes, m.head_q.codes);
    EXPECT_EQ(r.head_q.scales, m.head_q.scales);
    EXPECT_EQ(r.head_q.offsets, m.head_q.offsets);
    EXPECT_EQ(r.config.tied_embeddings, tied);
    const Tensor& rhead = tied ? r.tok_embeddings : r.output;
    ASSERT_EQ(rhead.numel(), head.numel());
    for (int64_t i = 0; i < head.numel(); ++i) ASSERT_EQ(rhead.data()[i], head.data()[i]);
    EXPECT_EQ(InferenceSession(r).forward_last(ids), InferenceSession(m).forward_last(ids));
  }
}

// SmolLM2's tied head is Q8_0 in the GGUF: it stays 8-bit, and its logits match the float head.
TEST(QuantizedHead, SmolLM2KeepsItsQ8Head) {
  QL_REQUIRE_SMOLLM2();
  const Model m = load_model(test::smollm2_path());
  ASSERT_FALSE(m.head_q.codes.empty());
  EXPECT_EQ(m.head_q.bits, 8);
  EXPECT_EQ(m.head_q.group_size, 32);
  Model dense_head = m;
  dense_head.head_q = QMatrix();
  const std::vector<int32_t> ids = m.require_tokenizer().encode("The capital of France is", false);
  const std::vector<float> a = InferenceSession(m, 64).forward_last(ids),
                           b = InferenceSession(dense_head, 64).forward_last(ids);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  EXPECT_LT(std::sqrt(diff / norm), 1e-5);
}

}  // namespace
}  // namespace qalora
