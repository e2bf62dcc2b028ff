// Read-only memory map of a whole file; weights of F32 tensors are used in place.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>

namespace qalora {

class MappedFile {
 public:
  // Throws Error naming the path when the file cannot be opened or mapped.
  static std::shared_ptr<MappedFile> open(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

// Drops the whole pages inside [data, data + size) of a read-only file mapping from this
// process's resident memory; the page cache keeps them, so a later read faults them back in
// without disk I/O unless the kernel needed the memory meanwhile. Partial pages at either end
// stay: a neighbouring tensor may be using them.
void release_mapped_pages(const void* data, size_t size);
// Reads the pages of [data, data + size) of a file mapping from disk and maps them
// (MADV_POPULATE_READ; where the kernel lacks it, starts reading them without waiting:
// MADV_WILLNEED). Blocks until they are in: a helper thread that asks for the next layer's
// weights while the pass computes on this one overlaps the reading with the work.
void prefetch_mapped_pages(const void* data, size_t size);

// Reads a whole (small) text or binary file; throws Error naming the path on failure.
std::string read_file(const std::filesystem::path& path);

}  // namespace qalora
