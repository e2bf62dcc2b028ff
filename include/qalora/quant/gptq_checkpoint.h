// GPTQ checkpoints as AutoGPTQ / GPTQModel publish them (SPEC §2), converted into QMatrix.
//
// Per linear [out, in] with b-bit codes and L = ceil(in / G) groups:
//   qweight int32 [in * b / 32, out]  codes q[i, j], packed down each column (along the input)
//   qzeros  int32 [L, out * b / 32]   zero points z[l, j], packed along each row (the output)
//   scales  fp16  [L, out]
//   g_idx   int32 [in]                group of each input (act-order makes it non-contiguous)
// Value k of a packed stream sits at bits [b*k, b*k + b) of its consecutive little-endian
// uint32 words, so 3-bit values straddle words. checkpoint_format "gptq" (v1) stores z - 1,
// "gptq_v2" stores z. W[j, i] = scales[g, j] * (q[i, j] - z[g, j]) with g = g_idx[i], which is
// the QMatrix affine form s * q + m with m = -s * z (exact in fp32 for fp16 scales).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "qalora/core/tensor.h"
#include "qalora/quant/qmatrix.h"

namespace qalora {

struct GptqFormat {
  int bits = 4;
  int64_t group_size = 128;  // resolved: 1..in
  bool v2 = false;           // zeros stored as is (gptq_v2), else minus one (gptq)
};

// One linear's tensors, shapes already checked; the int32 data is raw little-endian bytes (it
// may be unaligned in a mapped file). The names prefix the error messages ("<file>: tensor 'x'").
struct GptqLinear {
  int64_t in = 0, out = 0;
  const uint8_t* qweight = nullptr;  // [in * bits / 32, out]
  const uint8_t* qzeros = nullptr;   // [L, out * bits / 32]
  int64_t qzeros_bytes = 0;
  Tensor scales;                     // [L, out] as stored (decoded per use)
  const uint8_t* g_idx = nullptr;    // [in]; null = contiguous groups
  // The file mapping qweight lies in, kept alive by the matrix; its pages are dropped once
  // repacked. Null: qweight is the caller's memory, which must outlive the matrix.
  std::shared_ptr<const void> mapping;
  std::shared_ptr<const void> qzeros_mapping;  // the same for qzeros (it may sit in another shard)
  std::string qzeros_name, scales_name, g_idx_name;
  // Drops the pages of qzeros and scales (mapped) from resident memory.
  void release_params() const;
};

// Value k of a packed stream whose words lie `stride` words apart.
uint32_t gptq_unpack(const uint32_t* words, int64_t stride, int64_t k, int bits);

// The QMatrix of a GPTQ linear. g_idx is kept only when it is not i / G. The codes and group
// parameters are repacked from the checkpoint's tensors when first read and freed by
// release_pages() (derived ByteBuffers), so a checkpoint costs memory only while a pass uses
// each linear; the tensors must outlive the matrix unless mapped. Throws Error naming
// the tensor and position for a zero point above 2^b - 1, a group out of range, or a scale that
// is not finite.
QMatrix gptq_to_qmatrix(const GptqLinear& t, const GptqFormat& f);

}  // namespace qalora
