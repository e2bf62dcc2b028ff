#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qalora/core/atomic_file.h"
#include "qalora/core/byte_buffer.h"
#include "qalora/core/mapped_file.h"
#include "qalora/core/resources.h"
#include "test_util.h"

namespace qalora {
namespace {

#ifdef __linux__
TEST(Resources, TouchedHeapCountsAsPrivateAndRaisesThePeak) {
  constexpr int64_t kBytes = int64_t{64} << 20;
  const ResidentSplit before = resident_now();
  ASSERT_GT(before.private_bytes, 0);
  ASSERT_GT(before.file_bytes, 0);  // the test binary itself is a mapped file
  // Fresh pages from the kernel: malloc may hand back memory an earlier test left resident.
  void* mapped = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mapped, MAP_FAILED);
  auto* block = static_cast<char*>(mapped);
  std::memset(block, 1, kBytes);
  const ResidentSplit after = resident_now();
  EXPECT_GE(after.private_bytes - before.private_bytes, kBytes * 9 / 10);
  EXPECT_GE(peak_rss_bytes(), after.private_bytes + after.file_bytes - (int64_t{4} << 20));
  EXPECT_EQ(block[kBytes - 1], 1);
  munmap(mapped, kBytes);
}

// Streaming passes drop a block's mapped weights once done with it: they must leave this
// process's resident memory and read back unchanged afterwards (from the page cache).
TEST(Resources, ReleasedMappedPagesLeaveResidentMemoryAndReadBackUnchanged) {
  constexpr size_t kBytes = size_t{64} << 20;
  std::vector<uint8_t> content(kBytes);
  for (size_t i = 0; i < kBytes; ++i) content[i] = static_cast<uint8_t>(i * 2654435761u >> 24);
  const auto path = test::temp_dir() / "mapped.bin";
  write_file_atomic(path, std::string_view(reinterpret_cast<const char*>(content.data()), kBytes));
  const auto file = MappedFile::open(path);
  // An odd start and length: the partial pages at both ends stay, everything between goes.
  const ByteBuffer view = ByteBuffer::view(file->data() + 100, kBytes - 200, file);
  const int64_t before = resident_now().file_bytes;
  uint64_t sum = 0;
  for (size_t i = 0; i < view.size(); i += 512) sum += view[i];
  const int64_t touched = resident_now().file_bytes;
  EXPECT_GE(touched - before, static_cast<int64_t>(kBytes) * 9 / 10);
  view.release_pages();
  EXPECT_LE(resident_now().file_bytes - before, static_cast<int64_t>(kBytes) / 10);
  uint64_t again = 0;
  for (size_t i = 0; i < view.size(); i += 512) again += view[i];
  EXPECT_EQ(again, sum);
  EXPECT_TRUE(std::equal(view.begin(), view.end(), content.begin() + 100));

  ByteBuffer owned;
  owned.assign(1 << 20, 7);
  owned.release_pages();  // owned bytes are not a mapping: untouched
  EXPECT_EQ(owned[(1 << 20) - 1], 7);
}
#endif

}  // namespace
}  // namespace qalora
