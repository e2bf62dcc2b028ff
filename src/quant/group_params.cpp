#include "qalora/quant/group_params.h"

#include <algorithm>
#include <cstring>

#include "qalora/core/fp16.h"

namespace qalora {

GroupParams::GroupParams(std::vector<float> values)
    : bytes_(ByteBuffer::adopt(std::move(values))) {}

GroupParams GroupParams::half(ByteBuffer bytes) {
  GroupParams p;
  p.bytes_ = std::move(bytes);
  p.half_ = true;
  return p;
}

GroupParams GroupParams::single(ByteBuffer bytes) {
  GroupParams p;
  p.bytes_ = std::move(bytes);
  return p;
}

float GroupParams::operator[](int64_t i) const {
  if (!half_) return floats()[i];
  uint16_t h = 0;
  std::memcpy(&h, bytes_.data() + 2 * i, 2);
  return fp16_to_fp32(h);
}

const float* GroupParams::read(const uint8_t* bytes, bool half, int64_t i, int64_t n, float* buf) {
  if (!half) return reinterpret_cast<const float*>(bytes) + i;
  fp16_to_fp32_row(bytes + 2 * i, buf, n);
  return buf;
}

std::vector<float> GroupParams::to_vector() const {
  const int64_t n = size();
  if (!half_) return {floats(), floats() + n};
  std::vector<float> v(static_cast<size_t>(n));
  read(0, n, v.data());
  return v;
}

float* GroupParams::writable() {
  if (half_) {
    bytes_ = ByteBuffer::adopt(to_vector());
    half_ = false;
  }
  return reinterpret_cast<float*>(bytes_.data());
}

void GroupParams::assign(int64_t n, float value) {
  bytes_ = ByteBuffer::adopt(std::vector<float>(static_cast<size_t>(n), value));
  half_ = false;
}

bool GroupParams::to_half_if_exact() {
  if (half_) return true;
  const int64_t n = size();
  const float* values = floats();
  std::vector<uint16_t> h(static_cast<size_t>(n));
  fp32_to_fp16_row(values, h.data(), n);
  // fp16 numbers convert back to the same bits (a NaN's payload may not: it stays fp32).
  float back[1024];
  for (int64_t i = 0; i < n; i += 1024) {
    const int64_t k = std::min<int64_t>(1024, n - i);
    fp16_to_fp32_row(reinterpret_cast<const uint8_t*>(h.data() + i), back, k);
    if (std::memcmp(back, values + i, static_cast<size_t>(k) * sizeof(float)) != 0) return false;
  }
  bytes_ = ByteBuffer::adopt(std::move(h));
  half_ = true;
  return true;
}

bool GroupParams::operator==(const GroupParams& other) const {
  return size() == other.size() && to_vector() == other.to_vector();
}

}  // namespace qalora
