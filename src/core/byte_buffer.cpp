#include "qalora/core/byte_buffer.h"

#include <cstring>
#include <utility>

#include "qalora/core/mapped_file.h"

namespace qalora {

const uint8_t* DerivedBytes::fill_now() {
  const std::lock_guard lock(mutex_);
  if (const uint8_t* p = ready_.load(std::memory_order_relaxed)) return p;  // filled meanwhile
  bytes_ = std::make_unique_for_overwrite<uint8_t[]>(size_);
  fill_(bytes_.get());
  if (release_source_) release_source_();
  ready_.store(bytes_.get(), std::memory_order_release);
  return bytes_.get();
}

void DerivedBytes::drop() {
  const std::lock_guard lock(mutex_);
  ready_.store(nullptr, std::memory_order_relaxed);
  bytes_.reset();
  if (release_source_) release_source_();
}

ByteBuffer ByteBuffer::view(const uint8_t* data, size_t size, std::shared_ptr<const void> owner) {
  ByteBuffer b;
  b.owner_ = std::move(owner);
  b.data_ = data;
  b.size_ = size;
  b.owned_ = false;
  return b;
}

ByteBuffer ByteBuffer::derived(size_t size, std::function<void(uint8_t*)> fill,
                               std::function<void()> release_source) {
  ByteBuffer b;
  b.derived_ = std::make_shared<DerivedBytes>(size, std::move(fill), std::move(release_source));
  b.size_ = size;
  b.owned_ = false;
  return b;
}

void ByteBuffer::assign(size_t n, uint8_t value) {
  *this = adopt(std::vector<uint8_t>(n, value));
}

bool ByteBuffer::operator==(const ByteBuffer& other) const {
  return size_ == other.size_ && (size_ == 0 || std::memcmp(data(), other.data(), size_) == 0);
}

void ByteBuffer::release_pages() const {
  if (derived_) {
    derived_->drop();
  } else if (!owned_) {
    release_mapped_pages(data_, size_);
  }
}

uint8_t* ByteBuffer::data() {
  // Owned and not shared with a copy: write in place.
  if (!owned_ || owner_.use_count() > 1) {
    const uint8_t* from = std::as_const(*this).data();
    auto bytes = std::make_shared<std::vector<uint8_t>>(from, from + size_);
    derived_.reset();
    data_ = bytes->data();
    owned_ = true;
    owner_ = std::move(bytes);
  }
  return const_cast<uint8_t*>(data_);
}

}  // namespace qalora
