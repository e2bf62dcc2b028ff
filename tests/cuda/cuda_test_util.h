// Helpers of the CUDA tests: skip without a GPU, and move vectors to and from the device.
#pragma once

#include <gtest/gtest.h>

#include <vector>

#include "cuda/runtime.h"
#include "qalora/core/device.h"

#define QL_REQUIRE_GPU()                                                         \
  do {                                                                           \
    std::string why;                                                             \
    if (::qalora::cuda::device_count(&why) == 0)                                 \
      GTEST_SKIP() << "no CUDA device (" << why << "): the GPU check needs one"; \
  } while (0)

namespace qalora::test {

template <typename T>
cuda::DeviceBuffer<T> to_device(const std::vector<T>& host) {
  cuda::DeviceBuffer<T> d;
  d.upload(host);
  return d;
}

template <typename T>
std::vector<T> to_host(const cuda::DeviceBuffer<T>& d) {
  std::vector<T> host(static_cast<size_t>(d.size()));
  d.download(host);
  return host;
}

// |a - b| <= atol + rtol * |b| element by element, naming the first failure.
inline void expect_close(const std::vector<float>& a, const std::vector<float>& b, float atol,
                         float rtol, const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_NEAR(a[i], b[i], atol + rtol * std::abs(b[i])) << what << "[" << i << "]";
}

}  // namespace qalora::test
