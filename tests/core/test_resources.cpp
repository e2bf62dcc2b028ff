#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>

#include "qalora/core/resources.h"

namespace qalora {
namespace {

#ifdef __linux__
TEST(Resources, TouchedHeapCountsAsPrivateAndRaisesThePeak) {
  constexpr int64_t kBytes = int64_t{64} << 20;
  const ResidentSplit before = resident_now();
  ASSERT_GT(before.private_bytes, 0);
  ASSERT_GT(before.file_bytes, 0);  // the test binary itself is a mapped file
  auto block = std::make_unique<char[]>(kBytes);
  std::memset(block.get(), 1, kBytes);
  const ResidentSplit after = resident_now();
  EXPECT_GE(after.private_bytes - before.private_bytes, kBytes * 9 / 10);
  EXPECT_GE(peak_rss_bytes(), after.private_bytes + after.file_bytes - (int64_t{4} << 20));
  EXPECT_EQ(block[kBytes - 1], 1);
}
#endif

}  // namespace
}  // namespace qalora
