// QMatrix layout, packing, codebooks, double quantization and the reference kernels.
#include "qalora/quant/qmatrix.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "qalora/core/error.h"

namespace qalora {

const char* quant_type_name(QuantType type) {
  switch (type) {
    case QuantType::Affine: return "affine";
    case QuantType::NF4: return "nf4";
    case QuantType::FP4: return "fp4";
  }
  return "?";
}

int64_t QMatrix::n_groups() const {
  if (type != QuantType::Affine) return 0;
  if (g_idx.empty()) return group_size > 0 ? (cols + group_size - 1) / group_size : 0;
  return 1 + *std::max_element(g_idx.begin(), g_idx.end());
}

int64_t QMatrix::storage_bytes() const {
  // Affine parameters from the layout, so a model loaded to be described counts them too.
  const auto params = type == QuantType::Affine
                          ? rows * n_groups() * 2 * 2 + static_cast<int64_t>(g_idx.size()) * 4
                      : absmax_dq.empty()
                          ? static_cast<int64_t>(absmax.size()) * 4
                          : static_cast<int64_t>(absmax_dq.codes.size() + 4 * absmax_dq.scales.size() + 4);
  return static_cast<int64_t>(codes.size()) + params;
}

void QMatrix::prepare() const {
  (void)codes.data();
  (void)scales.bytes();
  (void)offsets.bytes();
}

void QMatrix::release_pages() const {
  codes.release_pages();
  scales.release_pages();
  offsets.release_pages();
}

void QMatrix::compact_params() {
  scales.to_half_if_exact();
  offsets.to_half_if_exact();
}

void QMatrix::validate(std::string_view context) const {
  auto expect = [&](std::string_view field, int64_t actual, int64_t expected) {
    if (actual != expected)
      fail(context, ": ", field, " has ", actual, " elements, expected ", expected);
  };
  if (rows <= 0 || cols <= 0) fail(context, ": shape [", rows, ", ", cols, "] is empty");
  if (type == QuantType::Affine) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
      fail(context, ": bits is ", bits, ", expected 2, 3, 4 or 8");
    if (g_idx.empty() && (group_size < 1 || group_size > cols))
      fail(context, ": group size is ", group_size, ", expected 1..", cols);
    if (!g_idx.empty()) {
      expect("g_idx", static_cast<int64_t>(g_idx.size()), cols);
      const auto [lo, hi] = std::minmax_element(g_idx.begin(), g_idx.end());
      if (*lo < 0 || *hi >= cols)
        fail(context, ": g_idx holds ", *lo, "..", *hi, ", expected groups in 0..", cols - 1);
    }
    expect("scales", static_cast<int64_t>(scales.size()), rows * n_groups());
    expect("offsets", static_cast<int64_t>(offsets.size()), rows * n_groups());
  } else {
    if (bits != 4) fail(context, ": ", quant_type_name(type), " has bits ", bits, ", expected 4");
    if (group_size != kCodebookBlock)
      fail(context, ": block size is ", group_size, ", expected ", kCodebookBlock);
    expect("absmax", static_cast<int64_t>(absmax.size()), n_blocks());
    if (!absmax_dq.empty()) {
      expect("absmax codes", static_cast<int64_t>(absmax_dq.codes.size()), n_blocks());
      expect("absmax scales", static_cast<int64_t>(absmax_dq.scales.size()),
             (n_blocks() + DoubleQuant::kBlock - 1) / DoubleQuant::kBlock);
    }
  }
  expect("codes", static_cast<int64_t>(codes.size()), rows * row_bytes());
}

QMatrix make_affine(int64_t rows, int64_t cols, int bits, int64_t group_size) {
  QMatrix w;
  w.rows = rows;
  w.cols = cols;
  w.bits = bits;
  w.group_size = group_size;
  w.codes.assign(static_cast<size_t>(rows * w.row_bytes()), 0);
  w.scales.assign(static_cast<size_t>(rows * w.n_groups()), 0.0f);
  w.offsets.assign(w.scales.size(), 0.0f);
  return w;
}

QMatrix make_codebook(QuantType type, int64_t rows, int64_t cols) {
  QMatrix w;
  w.type = type;
  w.rows = rows;
  w.cols = cols;
  w.bits = 4;
  w.group_size = kCodebookBlock;
  w.codes.assign(static_cast<size_t>(rows * w.row_bytes()), 0);
  w.absmax.assign(static_cast<size_t>(w.n_blocks()), 0.0f);
  return w;
}

namespace {
// pack_row for 2, 4 and 8 bits: code k of a chunk goes to byte k % CB at shift (k / CB) * B
// (code_slot()), written with the widths known so that whole chunks pack in vectors.
template <int B>
void pack_row_pow2(const uint8_t* codes, int64_t cols, uint8_t* packed) {
  constexpr int64_t CB = chunk_bytes(B);
  for (int64_t c0 = 0; c0 < cols; c0 += kQChunk) {
    const int64_t n = std::min<int64_t>(kQChunk, cols - c0);
    uint8_t* chunk = packed + c0 / kQChunk * CB;
    if (n == kQChunk) {
      for (int64_t b = 0; b < CB; ++b) {
        unsigned byte = 0;
        for (int64_t s = 0; s < kQChunk / CB; ++s)
          byte |= unsigned{codes[c0 + s * CB + b]} << (s * B);
        chunk[b] = static_cast<uint8_t>(byte);
      }
    } else {
      for (int64_t k = 0; k < n; ++k)
        chunk[k % CB] = static_cast<uint8_t>(chunk[k % CB] | (codes[c0 + k] << (k / CB * B)));
    }
  }
}
}  // namespace

void pack_row(const uint8_t* codes, int64_t cols, int bits, uint8_t* packed) {
  const int64_t chunks = (cols + kQChunk - 1) / kQChunk;
  std::memset(packed, 0, static_cast<size_t>(chunks * chunk_bytes(bits)));
  switch (bits) {
    case 2:
      return pack_row_pow2<2>(codes, cols, packed);
    case 4:
      return pack_row_pow2<4>(codes, cols, packed);
    case 8:
      return pack_row_pow2<8>(codes, cols, packed);
    default:
      break;
  }
  for (int64_t i = 0; i < cols; ++i) {
    uint8_t* chunk = packed + (i / kQChunk) * chunk_bytes(bits);
    const int k = static_cast<int>(i % kQChunk);
    const uint8_t q = codes[i];
    const CodeSlot s = code_slot(bits, k);
    if (bits == 3) {
      chunk[s.byte] = static_cast<uint8_t>(chunk[s.byte] | ((q & 3) << s.shift));
      chunk[8 + k / 8] = static_cast<uint8_t>(chunk[8 + k / 8] | (((q >> 2) & 1) << (k % 8)));
    } else {
      chunk[s.byte] = static_cast<uint8_t>(chunk[s.byte] | (q << s.shift));
    }
  }
}

void unpack_row(const uint8_t* packed, int64_t cols, int bits, uint8_t* codes) {
  for (int64_t i = 0; i < cols; ++i)
    codes[i] = unpack_code(packed + (i / kQChunk) * chunk_bytes(bits), bits,
                           static_cast<int>(i % kQChunk));
}

uint8_t code_at(const QMatrix& w, int64_t row, int64_t col) {
  return unpack_code(w.row_codes(row) + (col / kQChunk) * chunk_bytes(w.bits), w.bits,
                     static_cast<int>(col % kQChunk));
}

// NF4: the QLoRA normal-float levels (bitsandbytes' table): quantiles of N(0, 1) normalised
// to [-1, 1] with an exact zero; tests/quant re-derive them from the definition.
static constexpr float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
// FP4: E2M1 (sign, two exponent bits, one mantissa bit; values 0, 0.5, 1, 1.5, 2, 3, 4, 6)
// divided by 6 so the largest magnitude is 1; code bit 3 is the sign.
static constexpr float kFP4[16] = {0.0f,        1.0f / 12,  2.0f / 12,  3.0f / 12,
                                   4.0f / 12,   6.0f / 12,  8.0f / 12,  1.0f,
                                   -0.0f,       -1.0f / 12, -2.0f / 12, -3.0f / 12,
                                   -4.0f / 12,  -6.0f / 12, -8.0f / 12, -1.0f};

const float* nf4_codebook() { return kNF4; }
const float* fp4_codebook() { return kFP4; }
const float* codebook(QuantType type) {
  QL_CHECK(type != QuantType::Affine, "affine quantization has no codebook");
  return type == QuantType::NF4 ? kNF4 : kFP4;
}

DoubleQuant double_quantize(const std::vector<float>& values) {
  DoubleQuant dq;
  const auto n = static_cast<int64_t>(values.size());
  if (n == 0) return dq;
  double sum = 0.0;
  for (float v : values) sum += v;
  dq.mean = static_cast<float>(sum / static_cast<double>(n));
  dq.codes.resize(values.size());
  for (int64_t b0 = 0; b0 < n; b0 += DoubleQuant::kBlock) {
    const int64_t b1 = std::min(n, b0 + DoubleQuant::kBlock);
    float amax = 0.0f;
    for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(values[i] - dq.mean));
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    dq.scales.push_back(scale);
    for (int64_t i = b0; i < b1; ++i) {
      const float q = std::nearbyint((values[i] - dq.mean) / scale);
      dq.codes[i] = static_cast<uint8_t>(std::clamp(q, -127.0f, 127.0f) + 128.0f);
    }
  }
  return dq;
}

std::vector<float> double_dequantize(const DoubleQuant& dq) {
  std::vector<float> out(dq.codes.size());
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<float>(static_cast<int>(dq.codes[i]) - 128) *
                 dq.scales[i / DoubleQuant::kBlock] +
             dq.mean;
  return out;
}

float dequant_at(const QMatrix& w, int64_t row, int64_t col) {
  const uint8_t q = code_at(w, row, col);
  if (w.type == QuantType::Affine) {
    const int64_t g = row * w.n_groups() + w.group_of(col);
    return w.scales[g] * static_cast<float>(q) + w.offsets[g];
  }
  return codebook(w.type)[q] * w.absmax[(row * w.cols + col) / w.group_size];
}

void dequantize_rows_ref(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  for (int64_t j = r0; j < r1; ++j)
    for (int64_t i = 0; i < w.cols; ++i) out[(j - r0) * w.cols + i] = dequant_at(w, j, i);
}

Tensor dequantize(const QMatrix& w) {
  Tensor t = Tensor::zeros({w.rows, w.cols});
  dequantize_rows(w, 0, w.rows, t.mutable_data());
  return t;
}

void qmatmul_forward_ref(float* y, const float* x, const QMatrix& w, const float* bias,
                         int64_t T) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < w.rows; ++j) {
      double acc = bias ? bias[j] : 0.0;
      for (int64_t i = 0; i < w.cols; ++i)
        acc += static_cast<double>(dequant_at(w, j, i)) * x[t * w.cols + i];
      y[t * w.rows + j] = static_cast<float>(acc);
    }
}

void qmatmul_backward_input_ref(float* dx, const float* dy, const QMatrix& w, int64_t T) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < w.cols; ++i) {
      double acc = 0.0;
      for (int64_t j = 0; j < w.rows; ++j)
        acc += static_cast<double>(dequant_at(w, j, i)) * dy[t * w.rows + j];
      dx[t * w.cols + i] = static_cast<float>(acc);
    }
}

}  // namespace qalora
