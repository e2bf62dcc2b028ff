// QMatrix: a quantized weight matrix W [rows = out, cols = in] in the in-memory layout the
// kernels read, and the plain reference kernels every optimized kernel is tested against.
//
// Two families (SPEC §3):
//   Affine  W[j,i] ~= s[j,g] * q[j,i] + m[j,g], q in [0, 2^bits), g = group of column i.
//           Groups run along the input dim: contiguous (g = i / G, the last group may be
//           shorter) or given per column by g_idx (GPTQ act-order without static groups).
//           Per-channel is G = cols. INT8 is affine with bits 8, G = cols.
//   NF4/FP4 W[j,i] ~= codebook[q[j,i]] * absmax[(j * cols + i) / block], 4-bit codes, block 64
//           along the flattened weight (as bitsandbytes), so a block may straddle two rows.
//
// Codes are packed row by row; each row is padded to a multiple of kQChunk = 32 columns with
// zero codes, and each 32-column chunk takes 4 * bits bytes:
//   bits 8: byte k = code k.
//   bits 4: byte k = code k (low nibble) | code k + 16 (high nibble), k < 16.
//   bits 2: byte k = codes k, k + 8, k + 16, k + 24 at bit offsets 0, 2, 4, 6, k < 8.
//   bits 3: the low two bits of the 32 codes as a bits-2 chunk (8 bytes), then their third
//           bits as one little-endian uint32 (bit k = code k), 4 bytes.
// These layouts let SIMD kernels unpack a chunk with a few shifts and masks. The same bytes
// are stored in the native model folder, so a loaded folder's codes are its mapped file.
//
// A file whose layout differs (a GGUF's blocks, a GPTQ checkpoint's columns) is repacked into
// this one matrix by matrix when a pass first reads it, and freed with the pass's block
// (derived ByteBuffers), so it costs memory only while used, as a mapped folder does.
//
// Scales and offsets are GroupParams: fp16 as folders store them (a view of the mapped file),
// fp32 where a value needs it. Quantizers round them to fp16 (the default storage precision)
// before computing codes, so what is evaluated is what is saved; GPTQ checkpoints give
// m = -s * z and merged QA-LoRA offsets are arbitrary, both kept in fp32.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "qalora/core/byte_buffer.h"
#include "qalora/core/tensor.h"
#include "qalora/ops/gemm.h"
#include "qalora/quant/group_params.h"
#include "qalora/quant/qcode.h"

namespace qalora {

enum class QuantType : uint8_t { Affine, NF4, FP4 };
const char* quant_type_name(QuantType type);  // "affine", "nf4", "fp4"

inline constexpr int64_t kCodebookBlock = 64;  // NF4/FP4 absmax block (flattened elements)

// bitsandbytes-style double quantization of the NF4/FP4 absmax constants: subtract their mean,
// then 8-bit symmetric codes (stored + 128) with one fp32 scale per 256 constants.
struct DoubleQuant {
  static constexpr int64_t kBlock = 256;
  std::vector<uint8_t> codes;  // [n]
  std::vector<float> scales;   // [ceil(n / 256)]
  float mean = 0.0f;
  bool empty() const { return codes.empty(); }
};
DoubleQuant double_quantize(const std::vector<float>& values);
std::vector<float> double_dequantize(const DoubleQuant& dq);

struct QMatrix {
  QuantType type = QuantType::Affine;
  int bits = 4;
  int64_t rows = 0;
  int64_t cols = 0;
  // Affine: group size G (1..cols; cols = per channel). NF4/FP4: absmax block length.
  int64_t group_size = 0;
  ByteBuffer codes;            // [rows, row_bytes()]; a view of the file for loaded folders
  GroupParams scales;          // Affine: [rows, n_groups()]
  GroupParams offsets;         // Affine: [rows, n_groups()]
  std::vector<int32_t> g_idx;  // Affine: [cols] group of each column; empty = contiguous
  std::vector<float> absmax;   // NF4/FP4: [n_blocks()], decoded from absmax_dq when present
  DoubleQuant absmax_dq;       // NF4/FP4 with double quantization: what is stored

  int64_t padded_cols() const { return (cols + kQChunk - 1) / kQChunk * kQChunk; }
  int64_t row_bytes() const { return padded_cols() / kQChunk * chunk_bytes(bits); }
  // Affine: number of groups L (ceil(cols / G), or 1 + max g_idx).
  int64_t n_groups() const;
  // NF4/FP4: number of absmax blocks over the flattened rows * cols elements.
  int64_t n_blocks() const { return (rows * cols + group_size - 1) / group_size; }
  int64_t group_of(int64_t col) const {
    return g_idx.empty() ? col / group_size : static_cast<int64_t>(g_idx[col]);
  }
  const uint8_t* row_codes(int64_t row) const { return codes.data() + row * row_bytes(); }
  uint8_t* row_codes(int64_t row) { return codes.data() + row * row_bytes(); }
  // Bytes of codes + group parameters, as stored (fp16 scales/offsets, fp32 absmax).
  int64_t storage_bytes() const;
  // Computes the bytes of a matrix repacked on first use (ByteBuffer::derived) now: kernels call
  // it before their parallel regions, so that the repacking can use every thread.
  void prepare() const;
  // Drops the codes and group parameters of a mapped or repacked matrix from resident memory
  // (ByteBuffer::release_pages); they come back when next read.
  void release_pages() const;
  // Affine: holds each of scales and offsets in fp16 when all of its values are fp16 numbers.
  void compact_params();
  // Throws Error "<context>: <field> ... expected .., got .." on any inconsistency.
  void validate(std::string_view context) const;
};

// An empty matrix with zero codes and storage sized for the given layout.
QMatrix make_affine(int64_t rows, int64_t cols, int bits, int64_t group_size);
QMatrix make_codebook(QuantType type, int64_t rows, int64_t cols);

// Packs `cols` codes (each < 2^bits) into one row of row_bytes and back.
void pack_row(const uint8_t* codes, int64_t cols, int bits, uint8_t* packed);
void unpack_row(const uint8_t* packed, int64_t cols, int bits, uint8_t* codes);
uint8_t code_at(const QMatrix& w, int64_t row, int64_t col);

// The 16 values of the NF4 and FP4 codebooks, ascending for NF4; indexed by code.
const float* nf4_codebook();
const float* fp4_codebook();
const float* codebook(QuantType type);

// Element (row, col) of the dequantized matrix: the definition the kernels are tested against.
float dequant_at(const QMatrix& w, int64_t row, int64_t col);

// out[r1 - r0, cols] = rows r0..r1-1 dequantized. `_ref` is element by element.
void dequantize_rows(const QMatrix& w, int64_t r0, int64_t r1, float* out);
void dequantize_rows_ref(const QMatrix& w, int64_t r0, int64_t r1, float* out);
Tensor dequantize(const QMatrix& w);

// How the decode GEMV (T <= 4) may treat the activations. Int8: with AVX-512 VNNI (2/4/8-bit
// affine codes) or AVX2 (2/4-bit) it rounds x to int8 per 32 columns, as llama.cpp does, for
// about twice the speed; the result is then exactly x^ W^T with |x^ - x| <= max|x_chunk| / 254, a
// relative error near 0.5% on each output. Exact: fp32 arithmetic throughout, for outputs
// where that noise matters (logits, whose top two can be that close).
enum class DecodeActivations { Int8, Exact };

// y[T, rows] = x[T, cols] W^T (+ bias[rows]); bias may be null. GEMV for small T (decode),
// dequantize-a-tile + GEMM for larger T (prefill, training).
void qmatmul_forward(float* y, const float* x, const QMatrix& w, const float* bias, int64_t T,
                     DecodeActivations activations = DecodeActivations::Int8);
void qmatmul_forward_ref(float* y, const float* x, const QMatrix& w, const float* bias, int64_t T);
// Products of one x with several matrices (q/k/v, gate/up). Matrices with the same
// activation layout (cols, type, bits, group size and g_idx) share one preparation of x and
// one thread team in the decode GEMV; others are run one by one.
struct QProduct {
  const QMatrix* w;
  const float* bias;  // [w->rows] or null
  float* y;           // [T, w->rows]
};
bool same_activation_layout(const QMatrix& a, const QMatrix& b);
void qmatmul_forward_shared(std::span<const QProduct> products, const float* x, int64_t T,
                            DecodeActivations activations = DecodeActivations::Int8);

// dx[T, cols] = dy[T, rows] W (+= with `accumulate`): the input gradient of y = x W^T (the
// frozen-base backward). A bf16 copy of dy is used where the product runs in bf16.
void qmatmul_backward_input(float* dx, const ops::Operand& dy, const QMatrix& w, int64_t T,
                            bool accumulate = false);
void qmatmul_backward_input_ref(float* dx, const float* dy, const QMatrix& w, int64_t T);

// The instruction set the optimized kernels dispatched to on this machine.
const char* qkernel_isa();

}  // namespace qalora
