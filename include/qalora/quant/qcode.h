// The packed code layout of QMatrix (described in qmatrix.h): chunk geometry and the unpacking
// of one code, shared by the CPU reference kernels and the CUDA dequantizer.
#pragma once

#include <cstdint>

#include "qalora/core/host_device.h"

namespace qalora {

inline constexpr int64_t kQChunk = 32;  // columns per packed chunk

// Bytes of one packed 32-column chunk of `bits`-bit codes.
QALORA_HD constexpr int64_t chunk_bytes(int bits) {
  return 4 * bits;
}
static_assert(chunk_bytes(4) * 8 == kQChunk * 4, "a 4-bit chunk holds 32 codes");
static_assert(chunk_bytes(3) == 8 + 4, "a 3-bit chunk is a 2-bit plane plus a 1-bit plane");

// Byte offset and bit shift of code k (0..31) inside a chunk, for 2, 4 and 8 bits (for 3 bits:
// of its low two bits, in the 2-bit plane).
struct CodeSlot {
  int byte;
  int shift;
};
QALORA_HD constexpr CodeSlot code_slot(int bits, int k) {
  if (bits == 8) return {k, 0};
  if (bits == 4) return {k % 16, 4 * (k / 16)};
  return {k % 8, 2 * (k / 8)};
}

// Code k (0..31) of one packed chunk of `bits` (2, 3, 4 or 8) bits.
QALORA_HD inline uint8_t unpack_code(const uint8_t* chunk, int bits, int k) {
  const CodeSlot s = code_slot(bits, k);
  int q = (chunk[s.byte] >> s.shift) & ((1 << (bits == 3 ? 2 : bits)) - 1);
  if (bits == 3) q |= ((chunk[8 + k / 8] >> (k % 8)) & 1) << 2;
  return static_cast<uint8_t>(q);
}

}  // namespace qalora
