// GroupParams: fp16 and fp32 storage of the same values read alike, and fp16 is kept only for
// values it holds exactly.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <memory>
#include <vector>

#include "qalora/core/fp16.h"
#include "qalora/quant/group_params.h"

namespace qalora {
namespace {

// 37 values (a tail past the 8- and 16-wide conversions), each an fp16 number, -0 among them.
std::vector<float> fp16_values() {
  std::vector<float> v;
  for (int i = 0; i < 37; ++i) {
    const auto x = static_cast<float>(i);
    v.push_back(round_to_fp16(std::sin(0.7f * x) * 3.0f * std::fmod(x, 5.0f)));
  }
  v[4] = -0.0f;
  v[9] = 65504.0f;   // the largest fp16
  v[10] = 0x1p-24f;  // the smallest subnormal
  return v;
}

std::vector<uint32_t> bits_of(const std::vector<float>& v) {
  std::vector<uint32_t> b;
  for (const float x : v) b.push_back(std::bit_cast<uint32_t>(x));
  return b;
}

TEST(GroupParams, HalfAndFloatStorageReadTheSameValues) {
  const std::vector<float> values = fp16_values();
  GroupParams f(values);
  GroupParams h(values);
  ASSERT_TRUE(h.to_half_if_exact());
  EXPECT_FALSE(f.is_half());
  EXPECT_TRUE(h.is_half());
  EXPECT_EQ(h.byte_size(), 2 * f.size());
  EXPECT_EQ(bits_of(h.to_vector()), bits_of(values));
  for (int64_t i = 0; i < f.size(); ++i)
    EXPECT_EQ(std::bit_cast<uint32_t>(h[i]), bits_of(values)[i]);
  // A range starting at an odd element (unaligned fp16 reads) through the tail.
  std::vector<float> buf(30);
  const float* r = h.read(5, 30, buf.data());
  EXPECT_EQ(r, buf.data());
  for (int64_t i = 0; i < 30; ++i) EXPECT_EQ(r[i], values[static_cast<size_t>(5 + i)]);
  EXPECT_EQ(f.read(5, 30, nullptr), reinterpret_cast<const float*>(f.bytes()) + 5);  // no copy
  EXPECT_TRUE(f == h);
}

TEST(GroupParams, ValuesFp16CannotHoldStayFloat) {
  // A NaN whose payload's low bits fp16 cannot keep (the plain quiet NaN converts back exactly).
  for (const float odd : {1.0f / 3.0f, 70000.0f, 1e-9f, std::bit_cast<float>(0x7fc00001u)}) {
    std::vector<float> values = fp16_values();
    values[20] = odd;
    GroupParams p(values);
    EXPECT_FALSE(p.to_half_if_exact()) << odd;
    EXPECT_FALSE(p.is_half());
    EXPECT_EQ(bits_of(p.to_vector()), bits_of(values));
  }
}

TEST(GroupParams, AViewIsReadInPlaceAndCopiedBeforeAWrite) {
  const std::vector<float> values = fp16_values();
  auto file = std::make_shared<std::vector<uint16_t>>();
  for (const float v : values) file->push_back(fp32_to_fp16(v));
  const auto* bytes = reinterpret_cast<const uint8_t*>(file->data());
  GroupParams p = GroupParams::half(ByteBuffer::view(bytes, 2 * file->size(), file));
  EXPECT_EQ(p.bytes(), bytes);  // no copy
  const GroupParams shared = p;
  float* w = p.writable();
  w[3] = 1.0f / 3.0f;
  EXPECT_FALSE(p.is_half());
  EXPECT_EQ(p[3], 1.0f / 3.0f);
  EXPECT_EQ(p[4], values[4]);
  EXPECT_TRUE(shared.is_half());  // the view and its copy are untouched
  EXPECT_EQ(shared[3], values[3]);
  EXPECT_EQ(fp16_to_fp32((*file)[3]), values[3]);
}

}  // namespace
}  // namespace qalora
