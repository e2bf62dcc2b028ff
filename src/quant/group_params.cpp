#include "qalora/quant/group_params.h"

#include <algorithm>
#include <cstring>

#include "qalora/core/fp16.h"

namespace qalora {

GroupParams::GroupParams(std::vector<float> values) : f32_(std::move(values)) {}

GroupParams GroupParams::half(ByteBuffer bytes) {
  GroupParams p;
  p.f16_ = std::move(bytes);
  p.half_ = true;
  return p;
}

float GroupParams::operator[](int64_t i) const {
  if (!half_) return f32_[static_cast<size_t>(i)];
  uint16_t h = 0;
  std::memcpy(&h, f16_.data() + 2 * i, 2);
  return fp16_to_fp32(h);
}

const float* GroupParams::read(int64_t i, int64_t n, float* buf) const {
  if (!half_) return f32_.data() + i;
  fp16_to_fp32_row(f16_.data() + 2 * i, buf, n);
  return buf;
}

std::vector<float> GroupParams::to_vector() const {
  if (!half_) return f32_;
  std::vector<float> v(static_cast<size_t>(size()));
  read(0, size(), v.data());
  return v;
}

float* GroupParams::writable() {
  if (half_) {
    f32_ = to_vector();
    f16_ = {};
    half_ = false;
  }
  return f32_.data();
}

void GroupParams::assign(int64_t n, float value) {
  f32_.assign(static_cast<size_t>(n), value);
  f16_ = {};
  half_ = false;
}

bool GroupParams::to_half_if_exact() {
  if (half_) return true;
  const int64_t n = size();
  ByteBuffer bytes;
  bytes.assign(static_cast<size_t>(2 * n), 0);
  auto* h = reinterpret_cast<uint16_t*>(bytes.data());
  fp32_to_fp16_row(f32_.data(), h, n);
  // fp16 numbers convert back to the same bits (a NaN's payload may not: it stays fp32).
  float back[1024];
  for (int64_t i = 0; i < n; i += 1024) {
    const int64_t k = std::min<int64_t>(1024, n - i);
    fp16_to_fp32_row(bytes.begin() + 2 * i, back, k);
    if (std::memcmp(back, f32_.data() + i, static_cast<size_t>(k) * sizeof(float)) != 0)
      return false;
  }
  f16_ = std::move(bytes);
  f32_ = {};
  half_ = true;
  return true;
}

bool GroupParams::operator==(const GroupParams& other) const {
  return size() == other.size() && to_vector() == other.to_vector();
}

}  // namespace qalora
