#include "qalora/core/byte_buffer.h"

#include <cstring>

#include "qalora/core/mapped_file.h"

namespace qalora {

ByteBuffer ByteBuffer::view(const uint8_t* data, size_t size, std::shared_ptr<const void> owner) {
  ByteBuffer b;
  b.owner_ = std::move(owner);
  b.data_ = data;
  b.size_ = size;
  b.owned_ = false;
  return b;
}

void ByteBuffer::assign(size_t n, uint8_t value) {
  auto bytes = std::make_shared<std::vector<uint8_t>>(n, value);
  data_ = bytes->data();
  size_ = n;
  owned_ = true;
  owner_ = std::move(bytes);
}

bool ByteBuffer::operator==(const ByteBuffer& other) const {
  return size_ == other.size_ && (size_ == 0 || std::memcmp(data_, other.data_, size_) == 0);
}

void ByteBuffer::release_pages() const {
  if (!owned_) release_mapped_pages(data_, size_);
}

uint8_t* ByteBuffer::data() {
  // Owned and not shared with a copy: write in place.
  if (!owned_ || owner_.use_count() > 1) {
    auto bytes = std::make_shared<std::vector<uint8_t>>(data_, data_ + size_);
    data_ = bytes->data();
    owned_ = true;
    owner_ = std::move(bytes);
  }
  return const_cast<uint8_t*>(data_);
}

}  // namespace qalora
