// ByteBuffer: bytes that are owned, a read-only view of memory kept alive by an owner (a mapped
// file), or derived: computed from a source when first read and dropped again when released.
// A quantized folder's packed codes are used where the file has them instead of being copied;
// a file whose layout the kernels cannot read (a GGUF's blocks, a GPTQ checkpoint's columns) is
// repacked one matrix at a time, as a pass reaches it. Copies share the bytes; the first write
// through a non-const accessor gives a copy its own bytes (copy on write), so a mapped view is
// never written.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

namespace qalora {

// The state of a derived buffer, shared by its copies. Thread-safe: kernels on several threads
// may be the first to read it.
class DerivedBytes {
 public:
  DerivedBytes(size_t size, std::function<void(uint8_t*)> fill,
               std::function<void()> release_source)
      : size_(size), fill_(std::move(fill)), release_source_(std::move(release_source)) {}
  const uint8_t* get() {
    if (const uint8_t* p = ready_.load(std::memory_order_acquire)) return p;
    return fill_now();
  }
  // Frees the bytes (the next get() computes them again) and drops the source's pages.
  void drop();
  size_t size() const { return size_; }

 private:
  const uint8_t* fill_now();
  size_t size_;
  std::function<void(uint8_t*)> fill_;
  std::function<void()> release_source_;
  std::mutex mutex_;
  std::unique_ptr<uint8_t[]> bytes_;
  std::atomic<const uint8_t*> ready_{nullptr};
};

class ByteBuffer {
 public:
  ByteBuffer() = default;
  static ByteBuffer view(const uint8_t* data, size_t size, std::shared_ptr<const void> owner);
  // Owns `values`' bytes without copying them.
  template <typename T>
  static ByteBuffer adopt(std::vector<T> values) {
    auto owner = std::make_shared<std::vector<T>>(std::move(values));
    ByteBuffer b;
    b.data_ = reinterpret_cast<const uint8_t*>(owner->data());
    b.size_ = owner->size() * sizeof(T);
    b.owner_ = std::move(owner);
    return b;
  }
  // `size` bytes that fill(out) computes when they are first read, and that release_pages()
  // frees until they are read again. fill must give the same bytes every time; it may use
  // OpenMP (inside a parallel region it runs on one thread). release_source, if given, runs
  // after each fill and with each release: the source's pages are not needed meanwhile.
  static ByteBuffer derived(size_t size, std::function<void(uint8_t*)> fill,
                            std::function<void()> release_source = {});

  // n copies of `value`, owned.
  void assign(size_t n, uint8_t value);

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  const uint8_t* data() const { return derived_ ? derived_->get() : data_; }
  uint8_t* data();  // unshares first (a derived buffer becomes an owned copy)
  const uint8_t* begin() const { return data(); }
  const uint8_t* end() const { return data() + size_; }
  uint8_t operator[](size_t i) const { return data()[i]; }
  // Drops a view's pages from resident memory (release_mapped_pages: views are of read-only
  // file mappings) and frees a derived buffer's bytes; no-op for owned bytes.
  void release_pages() const;
  // Equal bytes (wherever they live).
  bool operator==(const ByteBuffer& other) const;

 private:
  std::shared_ptr<const void> owner_;
  std::shared_ptr<DerivedBytes> derived_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool owned_ = true;
};

}  // namespace qalora
