// A quantized matrix to bf16, one thread per element, reading the packed codes with the CPU's
// own unpacking (qalora/quant/qcode.h). The frozen linears dequantize into a reused buffer
// right before their tensor-core product, so the weights stay quantized in GPU memory.
#include <cuda_bf16.h>

#include "kernels.h"
#include "qalora/quant/qcode.h"
#include "reduce.cuh"
#include "runtime.h"

namespace qalora::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void dequantize_kernel(const QMatrixView w, __nv_bfloat16* out) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= w.rows * w.cols) return;
  const int64_t row = n / w.cols, col = n % w.cols;
  const uint8_t* chunk = w.codes + row * w.row_bytes + col / kQChunk * chunk_bytes(w.bits);
  const uint8_t q = unpack_code(chunk, w.bits, static_cast<int>(col % kQChunk));
  float value;
  if (w.affine) {
    const int64_t g = row * w.n_groups + (w.g_idx ? w.g_idx[col] : col / w.group_size);
    // Unfused, as the CPU's dequant_at computes it (an FMA would round once less).
    value = __fadd_rn(__fmul_rn(w.scales[g], static_cast<float>(q)), w.offsets[g]);
  } else {
    value = w.codebook[q] * w.absmax[n / w.group_size];
  }
  out[n] = __float2bfloat16_rn(value);
}

}  // namespace

void dequantize_bf16(const QMatrixView& w, uint16_t* out) {
  const int64_t n = w.rows * w.cols;
  if (n == 0) return;
  dequantize_kernel<<<blocks_for(n, kThreads), kThreads>>>(w,
                                                           reinterpret_cast<__nv_bfloat16*>(out));
  check_launch("dequantize_bf16");
}

}  // namespace qalora::cuda
