// Internal to the quantized kernels: the per-ISA kernel table the dispatcher in qkernels.cpp
// calls, and a switch for tests to force one ISA so every path is checked on one machine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "qalora/quant/qmatrix.h"

namespace qalora::qk {

// Avx512Vnni is Avx512 plus int8 dot products: its decode GEMV quantizes the activations to
// int8 (gemv_int8_rows below); every other kernel is the Avx512 one.
enum class Isa { Portable, Avx2, Avx512, Avx512Vnni };
inline constexpr Isa kAllIsas[] = {Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni};
const char* isa_name(Isa isa);
// Whether this CPU can run `isa` (Portable always).
bool isa_supported(Isa isa);
// The ISA the kernels use now: the best supported one unless forced.
Isa active_isa();
// Makes the kernels use `isa` until the next call (throws Error if unsupported); returns the
// previous one. Not thread-safe against kernels running concurrently: for tests and benches.
Isa force_isa(Isa isa);

// A matrix's bytes, looked up once per kernel call rather than per row: a repacked matrix's
// (ByteBuffer::derived) sit behind a pointer chase, which per row cost a 7B decode 5%.
struct QBytes {
  const uint8_t* codes = nullptr;
  const uint8_t* scales = nullptr;  // affine: fp16 or fp32 as stored
  const uint8_t* offsets = nullptr;
  bool scales_half = false, offsets_half = false;
  QBytes() = default;
  explicit QBytes(const QMatrix& w)
      : codes(w.codes.data()),
        scales(w.scales.bytes()),
        offsets(w.offsets.bytes()),
        scales_half(w.scales.is_half()),
        offsets_half(w.offsets.is_half()) {}
};

// The fused GEMV's inputs, prepared once per call by the dispatcher and shared by all rows.
struct GemvArgs {
  const QMatrix* w = nullptr;
  QBytes b;                  // of *w
  const float* x = nullptr;  // [T, padded_cols], zero past cols (no tail masks needed)
  int64_t x_stride = 0;      // padded_cols
  int64_t L = 0;             // affine: w.n_groups()
  // Affine with chunk-aligned groups: [T, L] sums of x over each group (of x^ for the int8
  // GEMV).
  const float* xsum = nullptr;
  // Affine otherwise: the group of each column, [padded_cols] (column_groups).
  const int32_t* groups = nullptr;
  float* y = nullptr;           // [T, rows]
  const float* bias = nullptr;  // [rows] or null
  int64_t T = 0;                // 1..kGemvMaxTokens
  // gemv_int8_rows only: x quantized by quantize_activations.
  const int8_t* xq = nullptr;  // [T, xq_stride]
  const float* xd = nullptr;   // [T, xq_stride / 4]
  const float* xdc = nullptr;  // [T, xq_stride / 32]: the d_c of each chunk
  int64_t xq_stride = 0;
};
inline constexpr int64_t kGemvMaxTokens = 4;

// f(std::integral_constant<int, T>{}) for a GEMV's token count T (1..kGemvMaxTokens): the
// kernels are templates on it, so that each count gets its own unrolled loop.
template <typename F>
inline void with_tokens(int64_t T, F&& f) {
  static_assert(kGemvMaxTokens == 4, "with_tokens names every count up to kGemvMaxTokens");
  switch (T) {
    case 1:
      return f(std::integral_constant<int, 1>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    default:
      return f(std::integral_constant<int, 4>{});
  }
}

// The int8-activation GEMV (llama.cpp's Q8 activations, in spirit): every 32-column chunk of x
// becomes x^ = d_c * q with q in [-127, 127] and d_c = max|x_c| / 127, and y = x^ W^T:
//   y_j = sum_c s[j,g(c)] d_c (codes_jc . q_c) + sum_g m[j,g] sum(x^_g) + bias_j.
// The offsets must see x^ too: with sum(x) instead, a symmetric weight's m = -s 2^(bits-1)
// would multiply the rounding of x by 2^(bits-1) (5% logit error on SmolLM2's Q8_0 head).
// So the error against the fp32 GEMV is W (x^ - x), at most sum_c d_c / 2 * sum_{i in c}
// |W[j,i]| per output. It serves affine 2/4/8-bit weights with contiguous groups that start
// on chunk boundaries (int8_gemv_layout), of the widths each ISA's table lists.
bool int8_gemv_layout(const QMatrix& w);
// Whether `isa`'s decode GEMV takes w's activations as int8 (when allowed to).
bool int8_gemv_used(Isa isa, const QMatrix& w);

// The int8 kernel reads two chunks (64 columns) of x per vector, in the order in which one
// vector of the weight's packed bytes unpacks: byte k of the unpacked vector holds column
// (2v) * 32 + int8_lane_order(bits)[k] of the pair. Every 4-byte lane stays within one chunk.
const uint8_t* int8_lane_order(int bits);

// Bit l set: 4-byte lane l (of 16) of a vector comes from the pair's second chunk.
unsigned int8_second_chunk_lanes(int bits);

// The groups of chunks 2v and 2v + 1, advanced one vector at a time (no division per vector).
struct VectorGroups {
  int64_t per_group, last, g = 0, k = 0;  // k: chunk 2v's index within its group g
  int64_t first() const { return g; }
  int64_t second() const { return std::min(k + 1 < per_group ? g : g + 1, last); }
  void next() {
    for (k += 2; k >= per_group; k -= per_group) ++g;
  }
};

// x [T, padded cols] -> xq [T, xq_stride] in int8_lane_order, xd [T, xq_stride / 4]: the
// d_c of the chunk each 4-byte lane of xq comes from, xdc [T, xq_stride / 32]: the d_c in
// chunk order (zero past the last chunk), and xsum [T, n_groups]: the group sums of x^.
// xq_stride = padded cols rounded up to 64.
int64_t int8_stride(const QMatrix& w);
void quantize_activations(const float* x, int64_t x_stride, int64_t T, const QMatrix& w, int8_t* xq,
                          float* xd, float* xdc, float* xsum);
// The scale of one chunk and its int8 codes: the definition both the kernel's input and the
// reference below use.
float quantize_chunk_int8(const float* x, int64_t n, int8_t* q);
// The plain reference of the int8 GEMV: the formula above, element by element in double.
void gemv_int8_ref(float* y, const float* x, const QMatrix& w, const float* bias, int64_t T);

// Affine with contiguous groups that start on chunk boundaries (G % 32 == 0, or one group
// per row): one scale and offset per chunk, and the GEMV can use
// y_j = sum_g s[j,g] (q_jg . x_g) + m[j,g] sum(x_g). Other affine layouts (g_idx, odd G) look
// the parameters up per column.
bool affine_chunk_aligned(const QMatrix& w);

// The group of every column (w.g_idx, or i / group_size), zero-padded to padded_cols so whole
// chunks can be loaded; kept in `buf`.
const int32_t* column_groups(const QMatrix& w, std::vector<int32_t>& buf);

// Decode streams every weight from memory once per token; the hardware prefetcher restarts
// cold at every GEMV call, so the kernels ask for rows 8 KB of codes ahead of use (a distance
// in bytes: 24 rows ahead, once best at 576 columns, overran the L1 cache at 4096), and for
// those rows' scales and offsets too, which sit in arrays of their own and otherwise missed
// the cache on every row (a quarter of the 7B decode's time waited on the offsets' loads).
inline constexpr int64_t kPrefetchBytes = 8192;
// The cache lines of bytes [begin, min(end, size)) of data.
inline void prefetch_range(const void* data, int64_t begin, int64_t end, int64_t size) {
  const auto* bytes = static_cast<const char*>(data);
  const auto first = reinterpret_cast<uintptr_t>(bytes + begin) & ~uintptr_t{63};
  const auto last = reinterpret_cast<uintptr_t>(bytes + std::min(end, size));
  for (uintptr_t b = first; b < last; b += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(b), 0, 3);
}
// Rows [row, row + n) ahead of the GEMV's affine matrix with L groups per row.
inline void prefetch_rows(const GemvArgs& a, int64_t L, int64_t row, int64_t n) {
  const QMatrix& w = *a.w;
  const int64_t rb = w.row_bytes();
  row += std::max<int64_t>(1, kPrefetchBytes / rb);
  prefetch_range(a.b.codes, row * rb, (row + n) * rb, w.rows * rb);
  const int64_t sb = L * (a.b.scales_half ? 2 : 4), ob = L * (a.b.offsets_half ? 2 : 4);
  prefetch_range(a.b.scales, row * sb, (row + n) * sb, w.rows * sb);
  prefetch_range(a.b.offsets, row * ob, (row + n) * ob, w.rows * ob);
}

// The scales and offsets of rows [row, row + n) as fp32, [n, L] each: pointers into fp32
// storage, or this thread's buffers filled from fp16 (a few hundred values a row, beside the
// row's codes; where the kernel waits on memory this costs less than reading fp32 parameters
// would, but a compute-bound kernel pays for it: the G = 32 int8 GEMVs convert in registers).
struct RowParams {
  const float* s;
  const float* m;
};
inline RowParams row_params(const QBytes& b, int64_t row, int64_t n, int64_t L) {
  thread_local std::vector<float> buf;
  if (std::ssize(buf) < 2 * n * L && (b.scales_half || b.offsets_half))
    buf.resize(static_cast<size_t>(2 * n * L));
  return {GroupParams::read(b.scales, b.scales_half, row * L, n * L, buf.data()),
          GroupParams::read(b.offsets, b.offsets_half, row * L, n * L, buf.data() + n * L)};
}
inline RowParams row_params(const QMatrix& w, int64_t row, int64_t n, int64_t L) {
  return row_params(QBytes(w), row, n, L);
}

struct KernelTable {
  Isa isa;
  // Rows r0..r1-1 of y for any layout, single-threaded. Null: dequantize rows + dot instead.
  void (*gemv_rows)(const GemvArgs& a, int64_t r0, int64_t r1);
  // The int8-activation GEMV for int8_gemv_layout weights of the widths in int8_bits (bit b
  // set: b-bit codes), or null.
  void (*gemv_int8_rows)(const GemvArgs& a, int64_t r0, int64_t r1);
  unsigned int8_bits;
  // out[(j - r0) * cols + i] for rows r0..r1-1, any layout, single-threaded.
  void (*dequant_rows)(const QMatrix& w, int64_t r0, int64_t r1, float* out);
  // sum a[i] * b[i].
  float (*dot)(const float* a, const float* b, int64_t n);
};

extern const KernelTable kPortableTable;
extern const KernelTable kAvx2Table;
extern const KernelTable kAvx512Table;
extern const KernelTable kAvx512VnniTable;
// The AVX-512 VNNI int8 GEMV (qkernels_avx512vnni.cpp).
void gemv_int8_rows_avx512vnni(const GemvArgs& a, int64_t r0, int64_t r1);
inline constexpr unsigned kInt8Bits248 = (1u << 2) | (1u << 4) | (1u << 8);

}  // namespace qalora::qk
