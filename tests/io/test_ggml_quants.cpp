// ggml block formats: dequantizers and quantizers against gguf-py (the independent reference,
// when python3 with the gguf package is available) and against hand-built blocks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/io/gguf.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

// Float bits, so that -0.0 vs 0.0 and NaN payloads count as differences.
std::vector<uint32_t> bits(const float* p, size_t n) {
  std::vector<uint32_t> out(n);
  std::memcpy(out.data(), p, n * sizeof(float));
  return out;
}

std::vector<float> dequant(GgmlType type, const std::vector<uint8_t>& src, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  dequantize_row(type, src.data(), out.data(), n);
  return out;
}

std::vector<uint8_t> quant(GgmlType type, const std::vector<float>& src) {
  const auto n = static_cast<int64_t>(src.size());
  std::vector<uint8_t> out(ggml_row_bytes(type, n));
  quantize_row(type, src.data(), out.data(), n);
  return out;
}

template <typename T>
void put(std::vector<uint8_t>& b, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  b.insert(b.end(), p, p + sizeof v);
}

TEST(GgmlTypes, BlockSizesMatchGgml) {
  struct Expect {
    GgmlType type;
    int64_t block_size;
    size_t block_bytes;
  };
  for (const Expect& e : {Expect{GgmlType::F32, 1, 4},
                          {GgmlType::F16, 1, 2},
                          {GgmlType::BF16, 1, 2},
                          {GgmlType::Q4_0, 32, 18},
                          {GgmlType::Q4_1, 32, 20},
                          {GgmlType::Q5_0, 32, 22},
                          {GgmlType::Q5_1, 32, 24},
                          {GgmlType::Q8_0, 32, 34},
                          {GgmlType::Q8_1, 32, 36},
                          {GgmlType::Q2_K, 256, 84},
                          {GgmlType::Q3_K, 256, 110},
                          {GgmlType::Q4_K, 256, 144},
                          {GgmlType::Q5_K, 256, 176},
                          {GgmlType::Q6_K, 256, 210},
                          {GgmlType::Q8_K, 256, 292}}) {
    const GgmlTypeTraits* t = ggml_type_traits(static_cast<uint32_t>(e.type));
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->block_size, e.block_size) << t->name;
    EXPECT_EQ(t->block_bytes, e.block_bytes) << t->name;
    EXPECT_EQ(ggml_row_bytes(e.type, e.block_size * 3), e.block_bytes * 3) << t->name;
  }
  EXPECT_STREQ(ggml_type_name(GgmlType::Q4_K), "Q4_K");
  EXPECT_EQ(ggml_type_traits(4), nullptr);
  EXPECT_EQ(ggml_type_traits(16), nullptr);
  EXPECT_EQ(ggml_type_traits(1000), nullptr);
  EXPECT_THROW(ggml_row_bytes(GgmlType::Q4_0, 33), Error);
  EXPECT_THROW(ggml_row_bytes(GgmlType::Q6_K, 128), Error);
}

TEST(GgmlDequantize, RejectsBadArguments) {
  std::vector<uint8_t> buf(1024);
  std::vector<float> out(512);
  EXPECT_THROW(dequantize_row(GgmlType::Q4_0, buf.data(), out.data(), 48), Error);
  EXPECT_THROW(dequantize_row(GgmlType::Q8_1, buf.data(), out.data(), 32), Error);
  EXPECT_THROW(quantize_row(GgmlType::Q5_0, out.data(), buf.data(), 32), Error);
  EXPECT_THROW(quantize_row(GgmlType::Q4_K, out.data(), buf.data(), 256), Error);
  EXPECT_THROW(quantize_row(GgmlType::Q8_0, out.data(), buf.data(), 31), Error);
  out[5] = std::nanf("");
  EXPECT_THROW(quantize_row(GgmlType::Q4_1, out.data(), buf.data(), 32), Error);
  dequantize_row(GgmlType::Q4_0, buf.data(), out.data(), 0);  // an empty row is fine
}

TEST(GgmlDequantize, HandBuiltLegacyBlocks) {
  // Q4_0: d = 0.5; element j is the low nibble of qs[j], element j+16 the high nibble.
  std::vector<uint8_t> b;
  put(b, fp32_to_fp16(0.5f));
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>(j | (15 - j) << 4));
  std::vector<float> y = dequant(GgmlType::Q4_0, b, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], static_cast<float>(j - 8) * 0.5f);
    EXPECT_EQ(y[j + 16], static_cast<float>(7 - j) * 0.5f);
  }

  // Q4_1: w = d*q + m with d = 0.25, m = -1.
  b.clear();
  put(b, fp32_to_fp16(0.25f));
  put(b, fp32_to_fp16(-1.0f));
  for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>(j | (15 - j) << 4));
  y = dequant(GgmlType::Q4_1, b, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], static_cast<float>(j) * 0.25f - 1.0f);
    EXPECT_EQ(y[j + 16], static_cast<float>(15 - j) * 0.25f - 1.0f);
  }

  // Q5_0 / Q5_1: the fifth bit of element k is bit k of the little-endian u32 qh.
  const uint32_t qh = 0x8001'0003u;  // elements 0, 1, 16 and 31
  for (GgmlType type : {GgmlType::Q5_0, GgmlType::Q5_1}) {
    b.clear();
    put(b, fp32_to_fp16(2.0f));
    if (type == GgmlType::Q5_1) put(b, fp32_to_fp16(1.0f));
    put(b, qh);
    for (int j = 0; j < 16; ++j) b.push_back(static_cast<uint8_t>(j | (15 - j) << 4));
    y = dequant(type, b, 32);
    for (int k = 0; k < 32; ++k) {
      const int q = (k < 16 ? k : 31 - k) | static_cast<int>((qh >> k) & 1u) << 4;
      const float expected = type == GgmlType::Q5_0 ? static_cast<float>(q - 16) * 2.0f
                                                    : static_cast<float>(q) * 2.0f + 1.0f;
      EXPECT_EQ(y[k], expected) << ggml_type_name(type) << " element " << k;
    }
  }

  // Q8_0 and Q8_K: d times the signed bytes.
  b.clear();
  put(b, fp32_to_fp16(-0.125f));
  for (int j = 0; j < 32; ++j) b.push_back(static_cast<uint8_t>(static_cast<int8_t>(j * 8 - 128)));
  y = dequant(GgmlType::Q8_0, b, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], static_cast<float>(j * 8 - 128) * -0.125f);

  b.clear();
  put(b, 0.01f);
  for (int j = 0; j < 256; ++j) b.push_back(static_cast<uint8_t>(j));
  b.resize(292, 0);
  y = dequant(GgmlType::Q8_K, b, 256);
  for (int j = 0; j < 256; ++j) EXPECT_EQ(y[j], 0.01f * static_cast<float>(static_cast<int8_t>(j)));
}

TEST(GgmlQuantize, FloatFormatsRoundTrip) {
  // Values both formats represent exactly, incl. signed zero and the smallest normal half.
  const std::vector<float> exact = {0.0f, -0.0f, 1.0f, -2.5f, 32768.0f, 6.103515625e-05f, 0.5f};
  for (GgmlType type : {GgmlType::F16, GgmlType::BF16})
    EXPECT_EQ(bits(dequant(type, quant(type, exact), 7).data(), 7), bits(exact.data(), 7));
  const std::vector<float> v = {0.1f, -3.14159f, 1e-3f};
  const std::vector<float> h = dequant(GgmlType::F16, quant(GgmlType::F16, v), 3);
  const std::vector<float> bf = dequant(GgmlType::BF16, quant(GgmlType::BF16, v), 3);
  for (size_t i = 0; i < v.size(); ++i) {
    EXPECT_NEAR(h[i], v[i], std::fabs(v[i]) * 0x1p-11f);
    EXPECT_NEAR(bf[i], v[i], std::fabs(v[i]) * 0x1p-8f);
  }
}

// Round-to-nearest error bounds for the block types, on one block and on odd row counts.
TEST(GgmlQuantize, BlockFormatsStayWithinHalfAStep) {
  std::mt19937 rng(42);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (int64_t n : {int64_t{32}, int64_t{96}, int64_t{32 * 7}}) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = dist(rng);
    for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1}) {
      const std::vector<float> y = dequant(type, quant(type, x), n);
      for (int64_t blk = 0; blk < n / 32; ++blk) {
        const auto first = x.begin() + blk * 32, last = first + 32;
        const float lo = *std::min_element(first, last), hi = *std::max_element(first, last);
        const float amax = std::max(-lo, hi);
        // Q4_0 spends code -8 on the largest magnitude and clamps the other end at +7: one step.
        const float step = type == GgmlType::Q8_0   ? amax / 127
                           : type == GgmlType::Q4_0 ? amax / 8
                                                    : (hi - lo) / 15;
        const float bound = (type == GgmlType::Q4_0 ? 1.0f : 0.5f) * step * 1.01f + amax * 2e-3f;
        for (int64_t i = blk * 32; i < blk * 32 + 32; ++i)
          ASSERT_LE(std::fabs(y[i] - x[i]), bound)
              << ggml_type_name(type) << " n=" << n << " i=" << i;
      }
    }
  }
  // A block of zeros has scale 0 and decodes to zeros.
  const std::vector<float> zeros(32, 0.0f);
  for (GgmlType type : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1})
    for (float v : dequant(type, quant(type, zeros), 32)) EXPECT_EQ(v, 0.0f);
}

// gguf-py writes tensors it quantized and dequantized itself; ours must agree bit for bit.
class GgufPyReference : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (std::system("python3 -c 'import gguf, numpy' > /dev/null 2>&1") != 0) {
      skip_reason_ =
          "python3 with the gguf and numpy packages is not available (pip install gguf numpy)";
      return;
    }
    const fs::path script = fs::path(__FILE__).parent_path() / "gguf_reference.py";
    const fs::path dir = fs::path(QALORA_TEST_TMP) / "GgufPyReference";
    fs::create_directories(dir);
    path_ = dir / "reference.gguf";
    const std::string cmd = "python3 '" + script.string() + "' '" + path_.string() + "'";
    if (std::system(cmd.c_str()) != 0) generation_failed_ = true;
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
    ASSERT_FALSE(generation_failed_) << "tests/io/gguf_reference.py failed";
  }
  static inline std::string skip_reason_;
  static inline bool generation_failed_ = false;
  static inline fs::path path_;
};

TEST_F(GgufPyReference, DequantizersMatchBitForBit) {
  const GgufFile f = GgufFile::open(path_);
  for (const char* name : {"F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                           "Q4_K", "Q5_K", "Q6_K"}) {
    SCOPED_TRACE(name);
    const GgufTensorInfo* q = f.find_tensor(name);
    ASSERT_NE(q, nullptr);
    EXPECT_STREQ(ggml_type_name(q->type), name);
    const Tensor ours = f.load_f32(*q);
    const Tensor ref = f.load_f32(std::string(name) + ".deq");
    ASSERT_EQ(ours.shape(), ref.shape());
    const auto n = static_cast<size_t>(ref.numel());
    EXPECT_EQ(bits(ours.data(), n), bits(ref.data(), n));
  }
}

TEST_F(GgufPyReference, QuantizersMatchByteForByte) {
  const GgufFile f = GgufFile::open(path_);
  for (const char* name : {"F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}) {
    SCOPED_TRACE(name);
    const GgufTensorInfo& q = *f.find_tensor(name);
    const Tensor src = f.load_f32(std::string(name) + ".src");
    const int64_t row = src.shape().back();
    const size_t row_bytes = ggml_row_bytes(q.type, row);
    for (int64_t r = 0; r < src.shape()[0]; ++r) {
      std::vector<uint8_t> ours(row_bytes);
      quantize_row(q.type, src.row(r), ours.data(), row);
      const uint8_t* ref = f.tensor_data(q) + static_cast<size_t>(r) * row_bytes;
      EXPECT_EQ(ours, std::vector<uint8_t>(ref, ref + row_bytes)) << "row " << r;
    }
  }
}

TEST_F(GgufPyReference, ReadsMetadataOfEveryType) {
  const GgufFile f = GgufFile::open(path_);
  EXPECT_EQ(f.get_string("general.architecture"), "qalora-reference");
  EXPECT_EQ(f.get_int("ref.u8"), 200);
  EXPECT_EQ(f.get_int("ref.i8"), -5);
  EXPECT_EQ(f.get_int("ref.u16"), 65000);
  EXPECT_EQ(f.get_int("ref.i16"), -32000);
  EXPECT_EQ(f.get_int("ref.u32"), 4000000000);
  EXPECT_EQ(f.get_int("ref.i32"), -2000000000);
  EXPECT_EQ(std::get<uint64_t>(*f.find("ref.u64")), (uint64_t{1} << 63) + 5);
  EXPECT_EQ(f.get_int("ref.i64"), -(int64_t{1} << 62));
  EXPECT_EQ(f.get_float_or("ref.f32", 0), static_cast<double>(0.1f));
  EXPECT_EQ(f.get_float_or("ref.f64", 0), 0.1);
  EXPECT_TRUE(f.get_bool_or("ref.bool", false));
  EXPECT_EQ(f.get_string("ref.string"), "h\xc3\xa9llo\nworld");
  EXPECT_EQ(f.get_string_array("ref.strings"), (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_EQ(f.get_int_array("ref.ints"), (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ(f.get_float_array("ref.floats"), (std::vector<double>{0.5, -1.25}));
  const auto& nested = std::get<std::shared_ptr<GgufArray>>(*f.find("ref.nested"));
  ASSERT_EQ(nested->type, GgufValueType::ARRAY);
  ASSERT_EQ(nested->values.size(), 2u);
  const auto& inner = std::get<std::shared_ptr<GgufArray>>(nested->values[0]);
  EXPECT_EQ(inner->values, (std::vector<GgufValue>{int64_t{1}, int64_t{2}}));
}

}  // namespace
}  // namespace qalora
