// The adapters' dropout mask, a pure function of (seed, token, column), so that the backward, a
// recomputed forward and the CUDA backend all draw the same mask without storing it.
#pragma once

#include <cmath>
#include <cstdint>

#include "qalora/core/hash.h"
#include "qalora/core/host_device.h"

namespace qalora {

// Element (t, c) of a [T, C] input draws 16 bits, lane c % 4 of a counter-based hash of
// (seed, t, c / 4): any element is drawn without the ones before it, and one hash serves four
// elements.
struct DropoutMask {
  uint64_t key = 0;         // splitmix64(seed)
  uint32_t threshold = 0;   // a lane below it drops its element
  float keep_scale = 1.0f;  // 1 / (1 - p), applied to the kept elements

  QALORA_HD uint64_t hash(int64_t t, int64_t c, int64_t C) const {
    const auto block = static_cast<uint64_t>(t * ((C + 3) / 4) + c / 4);
    return splitmix64(key + block * 0x9E3779B97F4A7C15ULL);
  }
  QALORA_HD bool keeps(uint64_t hash_of_c, int64_t c) const {
    return static_cast<uint32_t>((hash_of_c >> (16 * (c % 4))) & 0xFFFF) >= threshold;
  }
};

// The mask of dropout probability p (0 <= p < 1; the caller checks) for `seed`.
inline DropoutMask dropout_mask(float p, uint64_t seed) {
  return {splitmix64(seed), static_cast<uint32_t>(std::ceil(static_cast<double>(p) * 65536.0)),
          1.0f / (1.0f - p)};
}

}  // namespace qalora
