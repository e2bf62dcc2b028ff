// Bit-for-bit model comparisons shared by the file-format round-trip tests.
#include "model/model_compare.h"

#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <cstring>

namespace qalora::test {

void expect_same_tensor(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  ASSERT_EQ(a.empty(), b.empty()) << what;
  if (a.empty()) return;
  // Values, whatever the storage (an F16 file's tensors stay encoded).
  const Tensor da = a.decoded(), db = b.decoded();
  EXPECT_EQ(std::memcmp(da.data(), db.data(), static_cast<size_t>(a.numel()) * sizeof(float)), 0)
      << what << " differs";
}

void expect_same_qmatrix(const QMatrix& a, const QMatrix& b, const std::string& what) {
  EXPECT_EQ(a.type, b.type) << what;
  EXPECT_EQ(a.bits, b.bits) << what;
  EXPECT_EQ(a.rows, b.rows) << what;
  EXPECT_EQ(a.cols, b.cols) << what;
  EXPECT_EQ(a.group_size, b.group_size) << what;
  EXPECT_EQ(a.codes, b.codes) << what << " codes";
  EXPECT_TRUE(same_bits(a.scales, b.scales)) << what << " scales";
  EXPECT_TRUE(same_bits(a.offsets, b.offsets)) << what << " offsets";
  EXPECT_EQ(a.g_idx, b.g_idx) << what << " g_idx";
  EXPECT_TRUE(same_bits(a.absmax, b.absmax)) << what << " absmax";
  EXPECT_EQ(a.absmax_dq.codes, b.absmax_dq.codes) << what << " absmax codes";
  EXPECT_TRUE(same_bits(a.absmax_dq.scales, b.absmax_dq.scales)) << what << " absmax scales";
  EXPECT_EQ(std::bit_cast<uint32_t>(a.absmax_dq.mean), std::bit_cast<uint32_t>(b.absmax_dq.mean))
      << what << " absmax mean";
}

void expect_same_model(const Model& a, const Model& b) {
  expect_same_tensor(a.tok_embeddings, b.tok_embeddings, "tok_embeddings");
  expect_same_tensor(a.final_norm, b.final_norm, "final_norm");
  expect_same_tensor(a.output, b.output, "output");
  ASSERT_EQ(a.layers.size(), b.layers.size());
  for (size_t l = 0; l < a.layers.size(); ++l) {
    const LayerWeights &x = a.layers[l], &y = b.layers[l];
    const std::string p = "layer " + std::to_string(l) + " ";
    expect_same_tensor(x.attn_norm, y.attn_norm, p + "attn_norm");
    expect_same_tensor(x.ffn_norm, y.ffn_norm, p + "ffn_norm");
    for (const auto& [name, member] : kLinears) {
      const Linear &u = x.*member, &v = y.*member;
      ASSERT_EQ(u.quantized(), v.quantized()) << p + name;
      expect_same_qmatrix(u.qweight, v.qweight, p + name);
      expect_same_tensor(u.weight, v.weight, p + name + ".weight");
      expect_same_tensor(u.bias, v.bias, p + name + ".bias");
    }
  }
  expect_same_qmatrix(a.head_q, b.head_q, "head_q");
  const QuantInfo &q = a.quant, &r = b.quant;
  EXPECT_EQ(q.method, r.method);
  EXPECT_EQ(q.bits, r.bits);
  EXPECT_EQ(q.group_size, r.group_size);
  EXPECT_EQ(q.sym, r.sym);
  EXPECT_EQ(q.act_order, r.act_order);
  EXPECT_EQ(q.static_groups, r.static_groups);
  EXPECT_EQ(q.double_quant, r.double_quant);
  EXPECT_EQ(q.damp, r.damp);
  EXPECT_EQ(q.calibration, r.calibration);
}

}  // namespace qalora::test
