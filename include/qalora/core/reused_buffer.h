// Per-call working buffers that are kept between calls (usually thread_local).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qalora {

// buf's storage, grown to at least n elements and never shrunk: callers ask for sizes that
// alternate (attention's blocks, a model's differently shaped layers), and regrowing would
// allocate and clear memory on every call.
template <typename T>
T* reused_buffer(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

}  // namespace qalora
