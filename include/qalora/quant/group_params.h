// GroupParams: the scales or the offsets of an affine QMatrix, [rows, n_groups] values held as
// fp16 or as fp32. fp16 is what quantizers produce and folders store, so a loaded folder's
// parameters stay a view of its mapped file (half the memory of fp32 and a sixth less to read
// per decoded token at G = 32); fp32 is kept where a value is not an fp16 number (a merged
// QA-LoRA's offsets, a GPTQ checkpoint's m = -s z) and wherever a caller writes values.
#pragma once

#include <cstdint>
#include <vector>

#include "qalora/core/byte_buffer.h"

namespace qalora {

class GroupParams {
 public:
  GroupParams() = default;
  GroupParams(std::vector<float> values);  // NOLINT(google-explicit-constructor): fp32 storage
  // fp16 values (2 bytes each, little-endian, any alignment): a file view, owned or derived
  // bytes.
  static GroupParams half(ByteBuffer bytes);
  // fp32 values (4 bytes each, aligned): owned or derived bytes.
  static GroupParams single(ByteBuffer bytes);

  int64_t size() const { return static_cast<int64_t>(bytes_.size()) / (half_ ? 2 : 4); }
  bool empty() const { return size() == 0; }
  bool is_half() const { return half_; }

  float operator[](int64_t i) const;
  // Values [i, i + n) as fp32: a pointer into fp32 storage, or `buf` (n floats) filled from fp16.
  const float* read(int64_t i, int64_t n, float* buf) const { return read(bytes(), half_, i, n, buf); }
  // The same from stored bytes looked up beforehand (the kernels' per-row reads).
  static const float* read(const uint8_t* bytes, bool half, int64_t i, int64_t n, float* buf);
  std::vector<float> to_vector() const;
  // The stored bytes (fp16 or fp32), for prefetching and for writing files as they are.
  const uint8_t* bytes() const { return bytes_.data(); }
  const ByteBuffer& buffer() const { return bytes_; }
  int64_t byte_size() const { return static_cast<int64_t>(bytes_.size()); }

  // fp32 values to write: fp16 storage becomes fp32 first (the values are unchanged).
  float* writable();
  void assign(int64_t n, float value);
  // Stores the values as fp16 when every one of them is an fp16 number; returns whether it does.
  bool to_half_if_exact();

  // Drops the pages of a file view or a derived buffer (see ByteBuffer::release_pages).
  void release_pages() const { bytes_.release_pages(); }
  bool operator==(const GroupParams& other) const;

 private:
  const float* floats() const { return reinterpret_cast<const float*>(bytes_.data()); }
  ByteBuffer bytes_;
  bool half_ = false;
};

}  // namespace qalora
