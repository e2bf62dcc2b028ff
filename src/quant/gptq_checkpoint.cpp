#include "qalora/quant/gptq_checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/core/mapped_file.h"

namespace qalora {

namespace {

// The words of a packed tensor, copied out of a possibly unaligned mapping.
std::vector<uint32_t> words_of(const uint8_t* bytes, int64_t n) {
  std::vector<uint32_t> w(static_cast<size_t>(n));
  if (n > 0) std::memcpy(w.data(), bytes, static_cast<size_t>(n) * sizeof(uint32_t));
  return w;
}

// visit(l, j, s, z) for every group l < L and output j: its scale and its zero point (the
// stored one plus one for checkpoint_format gptq).
template <typename Visit>
void each_group(const GptqLinear& t, const GptqFormat& f, Visit visit) {
  const int b = f.bits;
  const int64_t L = (t.in + f.group_size - 1) / f.group_size, out = t.out;
  const Tensor scales = t.scales.decoded();
  const std::vector<uint32_t> zeros = words_of(t.qzeros, L * out * b / 32);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t j = 0; j < out; ++j) {
      const uint32_t z = gptq_unpack(zeros.data() + l * (out * b / 32), 1, j, b) + (f.v2 ? 0u : 1u);
      visit(l, j, scales.data()[l * out + j], z);
    }
}

// Nibble i of w in the low nibble of byte i.
uint64_t spread_nibbles(uint32_t w) {
  uint64_t x = w;
  x = (x | x << 16) & 0x0000FFFF0000FFFFull;
  x = (x | x << 8) & 0x00FF00FF00FF00FFull;
  return (x | x << 4) & 0x0F0F0F0F0F0F0F0Full;
}

// 4-bit codes of n output columns, whole chunks: word row 4c + t holds inputs 32c + 8t .. + 7
// of each column, so a chunk's byte k (code k | code k + 16 << 4) takes its nibbles from word
// rows 4c and 4c + 2 (k < 8) or 4c + 1 and 4c + 3. Per element unpacking took 17 s per pass
// over a 7B checkpoint.
void pack_4bit_block(const uint32_t* words, int64_t n, int64_t in, uint8_t* packed,
                     int64_t row_bytes) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < in / kQChunk; ++c) {
      const uint32_t* w = words + 4 * c * n + j;
      const uint64_t lo = spread_nibbles(w[0]) | spread_nibbles(w[2 * n]) << 4;
      const uint64_t hi = spread_nibbles(w[n]) | spread_nibbles(w[3 * n]) << 4;
      uint8_t* chunk = packed + j * row_bytes + c * chunk_bytes(4);
      std::memcpy(chunk, &lo, 8);
      std::memcpy(chunk + 8, &hi, 8);
    }
}

// The codes in QMatrix rows, repacked from qweight when first read. Blocks of output columns,
// inputs in order: each block's words are copied out of the (possibly unaligned) mapping one
// contiguous run per word row.
ByteBuffer repacked_codes(const GptqLinear& t, int b, int64_t row_bytes) {
  const int64_t in = t.in, out = t.out, word_rows = in * b / 32;
  const uint8_t* const qweight = t.qweight;
  std::function<void()> release;
  if (t.mapping)
    release = [qweight, word_rows, out, mapping = t.mapping] {
      release_mapped_pages(qweight, static_cast<size_t>(word_rows * out * 4));
    };
  return ByteBuffer::derived(
      static_cast<size_t>(out * row_bytes),
      [=](uint8_t* packed) {
        constexpr int64_t kCols = 64;
#pragma omp parallel
        {
          std::vector<uint32_t> words(static_cast<size_t>(word_rows * kCols));
          std::vector<uint8_t> codes(static_cast<size_t>(kCols * in));
#pragma omp for schedule(static)
          for (int64_t j0 = 0; j0 < out; j0 += kCols) {
            const int64_t n = std::min(kCols, out - j0);
            for (int64_t r = 0; r < word_rows; ++r)
              std::memcpy(words.data() + r * n, qweight + (r * out + j0) * 4,
                          static_cast<size_t>(n) * 4);
            if (b == 4 && in % kQChunk == 0) {
              pack_4bit_block(words.data(), n, in, packed + j0 * row_bytes, row_bytes);
              continue;
            }
            for (int64_t i = 0; i < in; ++i)
              for (int64_t j = 0; j < n; ++j)
                codes[j * in + i] = static_cast<uint8_t>(gptq_unpack(words.data() + j, n, i, b));
            for (int64_t j = 0; j < n; ++j)
              pack_row(codes.data() + j * in, in, b, packed + (j0 + j) * row_bytes);
          }
        }
      },
      std::move(release));
}

}  // namespace

void GptqLinear::release_params() const {
  scales.release_pages();
  if (qzeros_mapping) release_mapped_pages(qzeros, static_cast<size_t>(qzeros_bytes));
}

uint32_t gptq_unpack(const uint32_t* words, int64_t stride, int64_t k, int bits) {
  const int64_t bit = k * bits;
  const int64_t w = bit / 32;
  const auto shift = static_cast<unsigned>(bit % 32);
  uint64_t v = words[w * stride] >> shift;
  if (shift + static_cast<unsigned>(bits) > 32)
    v |= uint64_t{words[(w + 1) * stride]} << (32 - shift);
  return static_cast<uint32_t>(v & ((uint64_t{1} << bits) - 1));
}

QMatrix gptq_to_qmatrix(const GptqLinear& t, const GptqFormat& f) {
  const int b = f.bits;
  const int64_t G = f.group_size, in = t.in, out = t.out;
  const int64_t L = (in + G - 1) / G;
  QMatrix q;
  q.bits = b;
  q.rows = out;
  q.cols = in;
  q.group_size = G;

  if (t.g_idx != nullptr) {
    std::vector<int32_t> g(static_cast<size_t>(in));
    std::memcpy(g.data(), t.g_idx, g.size() * sizeof(int32_t));
    bool contiguous = true;
    for (int64_t i = 0; i < in; ++i) {
      QL_CHECK(g[i] >= 0 && g[i] < L, t.g_idx_name, ": g_idx[", i, "] is ", g[i],
               ", expected a group in 0..", L - 1, " (", L, " groups of ", G, " over ", in,
               " inputs)");
      contiguous = contiguous && g[i] == i / G;
    }
    // Contiguous groups are left implicit so kernels take their fast path.
    if (!contiguous) q.g_idx = std::move(g);
  }
  const int64_t Lq = q.n_groups();  // groups act-order never uses beyond the last are dropped

  // Checked here, so that a bad checkpoint fails at load with its one-line error; the values
  // are produced again when a pass first reads them (an error there would be inside a kernel).
  const uint32_t maxq = (1u << b) - 1;
  bool half_scales = true;
  each_group(t, f, [&](int64_t l, int64_t j, float s, uint32_t z) {
    QL_CHECK(z <= maxq, t.qzeros_name, ": zero point [", l, ", ", j, "] is ", z, " (stored ",
             z - (f.v2 ? 0u : 1u), " + 1, checkpoint_format gptq), above ", maxq, ", the largest ",
             b, "-bit code");
    QL_CHECK(std::isfinite(s), t.scales_name, ": scale [", l, ", ", j, "] is ", s,
             ", expected a finite value");
    half_scales = half_scales && fp16_to_fp32(fp32_to_fp16(s)) == s;
  });
  t.release_params();
  // [out, Lq] from the checkpoint's [L, out]: scales as fp16 where the checkpoint has fp16 ones,
  // offsets m = -s z in fp32 (exact: fp16 s times z < 2^8).
  const auto params = [&](bool offsets, bool half) {
    return ByteBuffer::derived(
        static_cast<size_t>(out * Lq * (half ? 2 : 4)),
        [t, f, Lq, offsets, half](uint8_t* bytes) {
          each_group(t, f, [&](int64_t l, int64_t j, float s, uint32_t z) {
            if (l >= Lq) return;
            const float v = offsets ? -s * static_cast<float>(z) : s;
            if (half) {
              const uint16_t h = fp32_to_fp16(v);
              std::memcpy(bytes + 2 * (j * Lq + l), &h, 2);
            } else {
              std::memcpy(bytes + 4 * (j * Lq + l), &v, 4);
            }
          });
        },
        [t] { t.release_params(); });
  };
  q.scales = half_scales ? GroupParams::half(params(false, true))
                         : GroupParams::single(params(false, false));
  q.offsets = GroupParams::single(params(true, false));
  q.codes = repacked_codes(t, b, q.row_bytes());
  return q;
}

}  // namespace qalora
