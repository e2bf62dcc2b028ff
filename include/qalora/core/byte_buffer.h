// ByteBuffer: bytes that are either owned or a read-only view of memory kept alive by an owner
// (a mapped file), so a quantized folder's packed codes are used where the file has them
// instead of being copied. Copies share the bytes; the first write through a non-const
// accessor gives a copy its own bytes (copy on write), so a mapped view is never written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace qalora {

class ByteBuffer {
 public:
  ByteBuffer() = default;
  static ByteBuffer view(const uint8_t* data, size_t size, std::shared_ptr<const void> owner);

  // n copies of `value`, owned.
  void assign(size_t n, uint8_t value);

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const uint8_t* data() const { return data_; }
  uint8_t* data();  // unshares first
  const uint8_t* begin() const { return data_; }
  const uint8_t* end() const { return data_ + size_; }
  uint8_t operator[](size_t i) const { return data_[i]; }
  // Drops a view's pages from resident memory (release_mapped_pages: views are of read-only
  // file mappings); no-op for owned bytes.
  void release_pages() const;
  // Equal bytes (wherever they live).
  bool operator==(const ByteBuffer& other) const;

 private:
  std::shared_ptr<const void> owner_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool owned_ = true;
};

}  // namespace qalora
