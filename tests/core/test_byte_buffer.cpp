// ByteBuffer's derived form: bytes computed from a source on first read, shared by copies,
// freed by release_pages() and computed again when next read; a write gives an owned copy.
#include <gtest/gtest.h>

#include <atomic>
#include <numeric>
#include <thread>
#include <vector>

#include "qalora/core/byte_buffer.h"

namespace qalora {
namespace {

struct Counts {
  std::atomic<int> fills{0}, releases{0};
};

ByteBuffer counted_iota(size_t n, Counts& counts) {
  return ByteBuffer::derived(
      n,
      [n, &counts](uint8_t* out) {
        ++counts.fills;
        std::iota(out, out + n, uint8_t{3});
      },
      [&counts] { ++counts.releases; });
}

TEST(ByteBuffer, DerivedBytesAreFilledOnFirstReadAndSharedByCopies) {
  Counts counts;
  const ByteBuffer b = counted_iota(300, counts);
  EXPECT_EQ(b.size(), 300u);
  EXPECT_EQ(counts.fills, 0) << "nothing is computed before a read";
  const ByteBuffer copy = b;
  EXPECT_EQ(copy[0], 3);
  EXPECT_EQ(b[299], static_cast<uint8_t>(3 + 299));
  EXPECT_EQ(b.data(), copy.data());
  EXPECT_EQ(counts.fills, 1);
  EXPECT_EQ(counts.releases, 1) << "the source is released once its bytes are repacked";
}

TEST(ByteBuffer, ReleasedDerivedBytesAreComputedAgainWhenRead) {
  Counts counts;
  const ByteBuffer b = counted_iota(64, counts);
  const std::vector<uint8_t> first(b.begin(), b.end());
  b.release_pages();
  EXPECT_EQ(counts.releases, 2) << "after the fill, and with the bytes";
  EXPECT_EQ(counts.fills, 1);
  EXPECT_EQ(std::vector<uint8_t>(b.begin(), b.end()), first);
  EXPECT_EQ(counts.fills, 2);
}

TEST(ByteBuffer, ConcurrentFirstReadsFillOnce) {
  Counts counts;
  const ByteBuffer b = counted_iota(1 << 20, counts);
  std::vector<const uint8_t*> seen(8);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < seen.size(); ++t) threads.emplace_back([&, t] { seen[t] = b.data(); });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(counts.fills, 1);
  for (const uint8_t* p : seen) EXPECT_EQ(p, seen[0]);
}

TEST(ByteBuffer, WritingADerivedBufferGivesAnOwnedCopy) {
  Counts counts;
  const ByteBuffer shared = counted_iota(16, counts);
  ByteBuffer b = shared;
  b.data()[0] = 200;
  EXPECT_EQ(b[0], 200);
  EXPECT_EQ(shared[0], 3) << "the derived original is unchanged";
  b.release_pages();  // owned now: nothing to drop
  EXPECT_EQ(b[0], 200);
  EXPECT_EQ(b[1], 4);
  EXPECT_TRUE(b == ByteBuffer(b));
  EXPECT_FALSE(b == shared);
}

TEST(ByteBuffer, AdoptedValuesAreOwnedWithoutACopy) {
  std::vector<float> v = {1.5f, -2.0f};
  const float* at = v.data();
  ByteBuffer b = ByteBuffer::adopt(std::move(v));
  EXPECT_EQ(b.size(), 8u);
  EXPECT_EQ(static_cast<const void*>(std::as_const(b).data()), static_cast<const void*>(at));
  EXPECT_EQ(static_cast<void*>(b.data()), static_cast<const void*>(at)) << "sole owner: in place";
}

}  // namespace
}  // namespace qalora
