// Encoded tensors (rows kept in their file's type, decoded per use) and the products that read
// them a tile at a time, against the plain fp32 kernels on odd shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/core/tensor.h"
#include "qalora/ops/gemm.h"
#include "qalora/ops/matmul_stored.h"
#include "qalora/ops/ops.h"
#include "test_util.h"

namespace qalora {
namespace {

using test::encoded_of;
using test::Halves;
using test::random_halves;

// The bf16 copy of a stored weight (the training step keeps one of its head): an encoded
// weight decoded tile by tile, and a dense one converted whole, give the reference conversion
// of the fp32 values; 1100 x 1000 spans two tiles, the second a partial one.
TEST(EncodedTensor, ToBf16OfAStoredWeightMatchesTheReference) {
  const int64_t rows = 1100, cols = 1000;
  for (const bool bf16 : {false, true}) {
    const Halves h = random_halves(rows * cols, 21, bf16);
    std::vector<uint16_t> ref(static_cast<size_t>(rows * cols));
    ops::to_bf16_ref(h.values.data(), rows, cols, cols, ref.data());
    std::vector<uint16_t> tiled(ref.size(), 0xFFFF), whole(ref.size(), 0xFFFF);
    ops::to_bf16(encoded_of(h, rows, cols, bf16), tiled.data());
    Tensor dense = Tensor::zeros({rows, cols});
    std::copy(h.values.begin(), h.values.end(), dense.mutable_data());
    ops::to_bf16(dense, whole.data());
    EXPECT_EQ(tiled, ref) << (bf16 ? "BF16" : "F16");
    EXPECT_EQ(whole, ref) << (bf16 ? "BF16" : "F16");
  }
}

// BF16 rows in order are handed to bf16 products as stored. They hold the values that the
// decode-and-round path would produce, so both give the same bits; views that are not plain
// BF16 rows (F16, permuted) have none and take the tile path.
TEST(EncodedTensor, Bf16RowsEnterBf16ProductsAsStored) {
  const int64_t out = 300, in = 70, T = 53;  // in: a tail after 64-wide vectors
  const Halves h = random_halves(out * in, 31, true);
  const Tensor w = encoded_of(h, out, in, true);
  ASSERT_NE(w.bf16_values(), nullptr);
  EXPECT_EQ(w.bf16_values()[5], fp32_to_bf16(h.values[5]));
  EXPECT_EQ(encoded_of(random_halves(out * in, 31, false), out, in, false).bf16_values(), nullptr);
  std::vector<int64_t> order(static_cast<size_t>(out));
  for (int64_t r = 0; r < out; ++r) order[static_cast<size_t>(r)] = r;
  const Tensor tiled = w.permuted_rows(order);  // the same rows, read through the tile path
  EXPECT_EQ(tiled.bf16_values(), nullptr);
  if (!ops::bf16_available()) GTEST_SKIP() << "no bf16 matrix path on this CPU or build";
  test::ComputeTypeScope bf16(ops::ComputeType::Bf16);
  ASSERT_TRUE(ops::use_bf16(T, out, in));
  const std::vector<float> x = test::random_uniform(T * in, 32);
  const std::vector<float> dy = test::random_uniform(T * out, 33);
  std::vector<float> y(static_cast<size_t>(T * out)), y_tiled(y.size());
  ops::matmul_forward(y.data(), x.data(), w, nullptr, T);
  ops::matmul_forward(y_tiled.data(), x.data(), tiled, nullptr, T);
  EXPECT_EQ(y, y_tiled);
  for (const bool accumulate : {false, true}) {
    std::vector<float> dx(static_cast<size_t>(T * in), 0.5f), dx_tiled(dx);
    ops::matmul_backward_input(dx.data(), dy.data(), w, T, accumulate);
    ops::matmul_backward_input(dx_tiled.data(), dy.data(), tiled, T, accumulate);
    EXPECT_EQ(dx, dx_tiled) << (accumulate ? "accumulating" : "");
  }
  std::vector<uint16_t> copy(static_cast<size_t>(out * in)), ref(copy.size());
  ops::to_bf16(w, copy.data());
  ops::to_bf16_ref(h.values.data(), out, in, in, ref.data());
  EXPECT_EQ(copy, ref);
}

// In bf16, encoded rows are rounded to bf16 as they are decoded, a tile at a time. Against the
// plain bf16 reference (the same rounded inputs, exact products summed in double): 600 x 4099
// F16 spans three tiles of 255 rows, the last partial, whose input gradients add up in dx.
TEST(EncodedTensor, Bf16TilesMatchTheBf16Reference) {
  if (!ops::bf16_available()) GTEST_SKIP() << "no bf16 matrix path on this CPU or build";
  test::ComputeTypeScope bf16(ops::ComputeType::Bf16);
  const int64_t out = 600, in = 4099, T = 7;
  const Halves h = random_halves(out * in, 41, false);
  const Tensor w = encoded_of(h, out, in, false);
  const std::vector<float> x = test::random_uniform(T * in, 42);
  const std::vector<float> dy = test::random_uniform(T * out, 43);
  const auto rounded = [](const std::vector<float>& v, int64_t rows, int64_t cols) {
    std::vector<uint16_t> r(v.size());
    ops::to_bf16_ref(v.data(), rows, cols, cols, r.data());
    return r;
  };
  const std::vector<uint16_t> w16 = rounded(h.values, out, in), x16 = rounded(x, T, in),
                              dy16 = rounded(dy, T, out);
  std::vector<float> y(static_cast<size_t>(T * out)), y_ref(y.size());
  ops::matmul_forward(y.data(), x.data(), w, nullptr, T);
  ops::gemm_bf16_ref(false, true, T, out, in, 1.0f, x16.data(), in, w16.data(), in, 0.0f,
                     y_ref.data(), out);
  test::expect_close(y, y_ref, 1e-5f, "forward");
  for (const bool accumulate : {false, true}) {
    std::vector<float> dx(static_cast<size_t>(T * in), 0.25f), dx_ref(dx);
    ops::matmul_backward_input(dx.data(), dy.data(), w, T, accumulate);
    ops::gemm_bf16_ref(false, false, T, in, out, 1.0f, dy16.data(), out, w16.data(), in,
                       accumulate ? 1.0f : 0.0f, dx_ref.data(), in);
    test::expect_close(dx, dx_ref, 1e-5f, accumulate ? "backward, accumulating" : "backward");
  }
}

// The row conversion (F16C where the build has it) against the scalar one, element for element,
// on a length with a tail: normal values, the rounding ties, subnormal results, overflow to
// infinity, infinities and signed zeros.
TEST(EncodedTensor, Fp32ToFp16RowMatchesTheScalarConversion) {
  std::vector<float> x = test::random_uniform(1000, 3, -70000.0f, 70000.0f);
  const auto small = test::random_uniform(1000, 4, -1e-4f, 1e-4f);
  x.insert(x.end(), small.begin(), small.end());
  for (const float v : {0.0f, -0.0f, 1.0f + 1.0f / 2048, 1.0f + 3.0f / 2048, 65504.0f, 65520.0f,
                        -65520.0f, 6e-8f, 3e-8f, 2.98e-8f, -5.96e-8f, INFINITY, -INFINITY, 1e-30f})
    x.push_back(v);
  std::vector<uint16_t> got(x.size() + 1, 0xABCD);
  fp32_to_fp16_row(x.data(), got.data(), static_cast<int64_t>(x.size()));
  for (size_t i = 0; i < x.size(); ++i)
    ASSERT_EQ(got[i], fp32_to_fp16(x[i])) << "value " << x[i] << " at " << i;
  EXPECT_EQ(got.back(), 0xABCD) << "wrote past the end";
}

TEST(EncodedTensor, DecodesF16AndBf16RowsAndRefusesPlainAccess) {
  for (bool bf16 : {false, true}) {
    const int64_t rows = 7, cols = 13;  // 13: a tail after the 8-wide F16C conversion
    const Halves h = random_halves(rows * cols, 3, bf16);
    const Tensor t = encoded_of(h, rows, cols, bf16);
    EXPECT_TRUE(t.encoded());
    EXPECT_EQ(t.stored_type(), bf16 ? "BF16" : "F16");
    EXPECT_EQ(t.stored_bytes(), rows * cols * 2);
    EXPECT_THROW(t.data(), std::logic_error);
    std::vector<float> mid(3 * cols);
    t.decode_rows(2, 5, mid.data());
    EXPECT_EQ(std::memcmp(mid.data(), h.values.data() + 2 * cols, mid.size() * sizeof(float)), 0);
    const Tensor d = t.decoded();
    ASSERT_FALSE(d.encoded());
    EXPECT_EQ(std::memcmp(d.data(), h.values.data(), h.values.size() * sizeof(float)), 0);
  }
}

TEST(EncodedTensor, PermutedRowsComposeWithoutCopying) {
  const int64_t rows = 6, cols = 5;
  const Halves h = random_halves(rows * cols, 4, false);
  const Tensor t = encoded_of(h, rows, cols, false);
  const std::vector<int64_t> a = {5, 3, 1, 0, 2, 4}, b = {1, 0, 3, 2, 5, 4};
  const Tensor ta = t.permuted_rows(a), tab = ta.permuted_rows(b);
  EXPECT_TRUE(tab.encoded());
  // Row r of tab is row b[r] of ta, which is row a[b[r]] of t; the plain path agrees.
  const Tensor plain = t.decoded().permuted_rows(a).permuted_rows(b);
  const Tensor got = tab.decoded();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      EXPECT_EQ(got.data()[r * cols + c], h.values[a[b[r]] * cols + c]);
      EXPECT_EQ(plain.data()[r * cols + c], h.values[a[b[r]] * cols + c]);
    }
}

// dot_rows from the stored bytes (F16, BF16, unaligned F32) and through a decoded copy (a codec
// without a dot), on reordered rows, against a double-precision dot of the decoded rows; the
// lengths leave tails after the 8, 16 and 32-wide loops.
TEST(EncodedTensor, DotRowsMatchTheDecodedRows) {
  for (const int64_t cols : {1, 15, 16, 33, 75, 4099}) {
    const int64_t rows = 5, T = 2;
    const Halves h = random_halves(rows * cols, 21, false);
    auto f32 = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(4 * rows * cols + 1));
    std::memcpy(f32->data() + 1, h.values.data(), h.values.size() * sizeof(float));
    auto no_dot = std::make_shared<RowCodec>(*half_codec(cols));
    no_dot->dot = nullptr;
    const Halves b = random_halves(rows * cols, 21, true);
    const std::vector<std::pair<std::string, Tensor>> cases = {
        {"F16", encoded_of(h, rows, cols, false)},
        {"BF16", encoded_of(b, rows, cols, true)},
        {"F32", Tensor::encoded(f32->data() + 1, {rows, cols}, f32_codec(cols), f32, false)},
        {"F16 without dot",
         Tensor::encoded(h.bytes->data(), {rows, cols}, no_dot, h.bytes, false)}};
    const std::vector<int64_t> order = {3, 0, 4, 1, 2};
    const std::vector<float> x = test::random_uniform(T * cols, 22);
    for (const auto& [name, t] : cases) {
      SCOPED_TRACE(cat(name, " cols ", cols));
      const Tensor permuted = t.permuted_rows(order), plain = permuted.decoded();
      std::vector<float> y(static_cast<size_t>(T * 3), -1.0f);
      permuted.dot_rows(1, 4, x.data(), T, y.data(), 3);
      for (int64_t t_ = 0; t_ < T; ++t_)
        for (int64_t r = 1; r < 4; ++r) {
          double ref = 0.0, mag = 0.0;
          for (int64_t i = 0; i < cols; ++i) {
            ref += static_cast<double>(plain.data()[r * cols + i]) * x[t_ * cols + i];
            mag += std::abs(static_cast<double>(plain.data()[r * cols + i]) * x[t_ * cols + i]);
          }
          EXPECT_NEAR(y[t_ * 3 + r - 1], ref, 1e-6 * mag + 1e-7) << "token " << t_ << " row " << r;
        }
    }
  }
}

// Products with an encoded W against the plain reference on its decoded copy: tokens on both
// sides of the GEMV/GEMM switch, rows that are not a multiple of the GEMV block or of the
// decoding tile (4099 inputs: tiles of 255 rows, so 600 rows take three), with and without bias.
TEST(EncodedTensor, ProductsMatchThePlainReferenceOnOddShapes) {
  struct Case {
    int64_t out, in, tokens;
  };
  for (const Case c : {Case{37, 19, 1}, Case{37, 19, 3}, Case{29, 75, 1}, Case{61, 45, 5},
                       Case{40, 4099, 2}, Case{600, 4099, 7}}) {
    for (bool bf16 : {false, true}) {
      const std::string what = cat(c.out, "x", c.in, " T=", c.tokens, bf16 ? " bf16" : " f16");
      const Halves h = random_halves(c.out * c.in, 11, bf16);
      const Tensor w = encoded_of(h, c.out, c.in, bf16);
      const std::vector<float> x = test::random_uniform(c.tokens * c.in, 12);
      const std::vector<float> bias = test::random_uniform(c.out, 13);
      std::vector<float> y(static_cast<size_t>(c.tokens * c.out)), ref(y.size());
      ops::matmul_forward(y.data(), x.data(), w, bias.data(), c.tokens);
      ops::matmul_forward_ref(ref.data(), x.data(), h.values.data(), bias.data(), c.tokens, c.in,
                              c.out);
      test::expect_close(y, ref, 2e-5f, what + " forward");

      const std::vector<float> dy = test::random_uniform(c.tokens * c.out, 14);
      std::vector<float> dx(static_cast<size_t>(c.tokens * c.in), 7.0f), dref(dx.size());
      ops::matmul_backward_input(dx.data(), dy.data(), w, c.tokens);
      ops::matmul_backward_input_ref(dref.data(), dy.data(), h.values.data(), c.tokens, c.in,
                                     c.out);
      test::expect_close(dx, dref, 2e-5f, what + " backward");
      // Accumulating: every tile adds to what dx held (the first tile included).
      for (float& v : dref) v += 7.0f;
      std::fill(dx.begin(), dx.end(), 7.0f);
      ops::matmul_backward_input(dx.data(), dy.data(), w, c.tokens, true);
      test::expect_close(dx, dref, 2e-5f, what + " backward, accumulating");
    }
  }
}

}  // namespace
}  // namespace qalora
