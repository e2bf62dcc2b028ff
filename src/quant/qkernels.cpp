// Optimized quantized-linear kernels: the dispatcher and the portable fallback. Decode (few
// tokens) streams the packed codes once through a fused dequantize + dot product per row;
// prefill and training dequantize the weight and hand it to BLAS, so the dequantization cost
// is amortised over T tokens. The AVX2 and AVX-512 kernels live in qkernels_avx2.cpp and
// qkernels_avx512.cpp; one is picked at run time from the CPU's features.
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/reused_buffer.h"
#include "qalora/ops/gemm.h"
#include "qalora/quant/qmatrix.h"
#include "quant/qkernels_internal.h"

namespace qalora {
namespace qk {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Portable:
      return "portable";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx512Vnni:
      return "avx512vnni";
  }
  return "?";
}

bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Portable:
      return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::Avx512Vnni:
      return isa_supported(Isa::Avx512) && __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == Isa::Portable;
#endif
}

namespace {

const KernelTable* table_for(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case Isa::Avx512Vnni:
      return &kAvx512VnniTable;
    case Isa::Avx512:
      return &kAvx512Table;
    case Isa::Avx2:
      return &kAvx2Table;
    default:
      return &kPortableTable;
  }
#else
  (void)isa;  // only the portable kernels exist off x86
  return &kPortableTable;
#endif
}

// The best ISA this CPU runs, or the one QALORA_ISA names (to compare kernels, or to keep
// decode in exact fp32 arithmetic on a VNNI machine: QALORA_ISA=avx512).
const KernelTable* best_table() {
  if (const char* want = std::getenv("QALORA_ISA")) {
    for (Isa isa : kAllIsas)
      if (std::string_view(want) == isa_name(isa)) {
        QL_CHECK(isa_supported(isa), "QALORA_ISA=", want, ": this CPU cannot run it");
        return table_for(isa);
      }
    QL_CHECK(false, "QALORA_ISA=", want, ": expected portable, avx2, avx512 or avx512vnni");
  }
  for (Isa isa : {Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2})
    if (isa_supported(isa)) return table_for(isa);
  return &kPortableTable;
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

// Codes of one packed chunk, one byte each (layouts: qmatrix.h).
template <int B>
void decode_chunk(const uint8_t* p, uint8_t* q) {
  if constexpr (B == 8) {
    for (int k = 0; k < 32; ++k) q[k] = p[k];
  } else if constexpr (B == 4) {
    for (int k = 0; k < 16; ++k) {
      q[k] = p[k] & 15;
      q[k + 16] = static_cast<uint8_t>(p[k] >> 4);
    }
  } else {
    for (int s = 0; s < 4; ++s)
      for (int k = 0; k < 8; ++k) q[k + 8 * s] = (p[k] >> (2 * s)) & 3;
    if constexpr (B == 3)
      for (int k = 0; k < 32; ++k)
        q[k] = static_cast<uint8_t>(q[k] | (((p[8 + k / 8] >> (k % 8)) & 1) << 2));
  }
}

template <int B>
void portable_dequant(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  const int64_t I = w.cols, nc = w.padded_cols() / kQChunk;
  const bool affine = w.type == QuantType::Affine, aligned = affine_chunk_aligned(w);
  const int64_t L = affine ? w.n_groups() : 0;
  std::vector<int32_t> groups_buf;
  const int32_t* groups = affine ? column_groups(w, groups_buf) : nullptr;
  const float* book = affine ? nullptr : codebook(w.type);
  uint8_t q[kQChunk];
  for (int64_t j = r0; j < r1; ++j) {
    float* o = out + (j - r0) * I;
    const auto [s, m] = affine ? row_params(w, j, 1, L) : RowParams{};
    for (int64_t c = 0; c < nc; ++c) {
      decode_chunk<B>(w.row_codes(j) + c * chunk_bytes(B), q);
      const int64_t i0 = c * kQChunk, n = std::min(kQChunk, I - i0);
      if (aligned) {
        // One group per chunk: no per-column lookup (which compilers turn into slow gathers).
        const float sg = s[groups[i0]], mg = m[groups[i0]];
        for (int64_t k = 0; k < n; ++k) o[i0 + k] = sg * static_cast<float>(q[k]) + mg;
      } else if (affine) {
        for (int64_t k = 0; k < n; ++k)
          o[i0 + k] = s[groups[i0 + k]] * static_cast<float>(q[k]) + m[groups[i0 + k]];
      } else {
        for (int64_t k = 0; k < n; ++k)
          o[i0 + k] = book[q[k]] * w.absmax[(j * I + i0 + k) / kCodebookBlock];
      }
    }
  }
}

void portable_dequant_rows(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  switch (w.bits) {
    case 2:
      return portable_dequant<2>(w, r0, r1, out);
    case 3:
      return portable_dequant<3>(w, r0, r1, out);
    case 4:
      return portable_dequant<4>(w, r0, r1, out);
    default:
      return portable_dequant<8>(w, r0, r1, out);
  }
}

float portable_dot(const float* a, const float* b, int64_t n) {
  // Eight partial sums: vectorisable without reassociation flags, and more accurate.
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int u = 0; u < 8; ++u) acc[u] += a[i + u] * b[i + u];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// Calls f(r0, r1) on an even split of rows 0..n-1 over the OpenMP threads; single-threaded
// when the work (elements touched) is too small to pay for waking the pool.
template <typename F>
void parallel_rows(int64_t n, int64_t work, F&& f) {
  constexpr int64_t kMinParallelWork = 1 << 15;
#pragma omp parallel if (work >= kMinParallelWork)
  {
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t r0 = n * tid / nth, r1 = n * (tid + 1) / nth;
    if (r0 < r1) f(r0, r1);
  }
}

thread_local std::vector<float> tl_weights;   // dequantized weight (prefill, backward)
thread_local std::vector<uint16_t> tl_weights_bf16;  // the same in bf16 (bf16 products)
thread_local std::vector<float> tl_x;         // padded activations (GEMV)
thread_local std::vector<float> tl_xsum;      // per-group activation sums (GEMV)
thread_local std::vector<int8_t> tl_xq;       // int8 activations (int8 GEMV)
thread_local std::vector<float> tl_xd;        // their per-lane chunk scales (int8 GEMV)
thread_local std::vector<float> tl_xdc;       // the same per chunk
thread_local std::vector<float> tl_rows;      // dequantized rows (portable GEMV, bf16 decoding)
thread_local std::vector<int32_t> tl_groups;  // group of each column (GEMV, odd layouts)
thread_local std::vector<GemvArgs> tl_args;   // one per product (GEMV)

// n floats starting on a 64-byte boundary: the GEMV reads every token's x once per chunk per
// row, and a vector load that splits a cache line costs two (up to 1.6x at T = 4).
float* aligned_scratch(std::vector<float>& v, int64_t n) {
  constexpr int64_t kAlign = 64 / sizeof(float);
  float* p = reused_buffer(v, n + kAlign);
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % 64 / sizeof(float));
  return p + (misalign ? kAlign - misalign : 0);
}

bool uses_int8(const KernelTable& k, const QMatrix& w) {
  return k.gemv_int8_rows && int8_gemv_layout(w) && (k.int8_bits >> w.bits & 1u);
}

// The products share x, and so its padded copy and whatever the kernels derive from it (group
// sums, int8 codes): same_activation_layout holds for all their matrices. One thread team runs
// the rows of all the products, split evenly.
void gemv(std::span<const QProduct> ps, const float* x, int64_t T, DecodeActivations activations,
          const KernelTable& k) {
  for (const QProduct& p : ps) p.w->prepare();
  const QMatrix& w = *ps.front().w;
  const int64_t I = w.cols, P = w.padded_cols();
  // Zero-padded copies let the kernels read whole chunks without tail masks.
  float* xp = aligned_scratch(tl_x, T * P);
  for (int64_t t = 0; t < T; ++t) {
    std::copy(x + t * I, x + (t + 1) * I, xp + t * P);
    std::fill(xp + t * P + I, xp + (t + 1) * P, 0.0f);
  }
  GemvArgs shared;
  shared.w = &w;
  shared.x = xp;
  shared.x_stride = P;
  shared.T = T;
  if (w.type == QuantType::Affine) shared.L = w.n_groups();
  const bool int8 = activations == DecodeActivations::Int8 && uses_int8(k, w);
  if (int8) {
    shared.xq_stride = int8_stride(w);
    int8_t* xq = reused_buffer(tl_xq, T * shared.xq_stride);
    float* xd = reused_buffer(tl_xd, T * shared.xq_stride / 4);
    float* xdc = reused_buffer(tl_xdc, T * shared.xq_stride / kQChunk);
    float* xs = reused_buffer(tl_xsum, T * shared.L);
    quantize_activations(xp, P, T, w, xq, xd, xdc, xs);
    shared.xq = xq;
    shared.xd = xd;
    shared.xdc = xdc;
    shared.xsum = xs;
  } else if (k.gemv_rows && affine_chunk_aligned(w)) {
    const int64_t G = w.group_size, L = shared.L;
    float* xs = reused_buffer(tl_xsum, T * L);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < L; ++g) {
        double s = 0.0;
        for (int64_t i = g * G; i < std::min(I, (g + 1) * G); ++i) s += xp[t * P + i];
        xs[t * L + g] = static_cast<float>(s);
      }
    shared.xsum = xs;
  } else if (k.gemv_rows && w.type == QuantType::Affine) {
    shared.groups = column_groups(w, tl_groups);
  }
  auto run = [&](const GemvArgs& a, int64_t r0, int64_t r1) {
    if (int8) return k.gemv_int8_rows(a, r0, r1);
    if (k.gemv_rows) return k.gemv_rows(a, r0, r1);
    // No fused kernel: dequantize a few rows at a time (amortising the per-call set-up) and
    // dot them with each token.
    constexpr int64_t kRowBlock = 16;
    const QMatrix& m = *a.w;
    float* rows = reused_buffer(tl_rows, kRowBlock * I);
    for (int64_t j0 = r0; j0 < r1; j0 += kRowBlock) {
      const int64_t j1 = std::min(r1, j0 + kRowBlock);
      k.dequant_rows(m, j0, j1, rows);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t t = 0; t < T; ++t)
          a.y[t * m.rows + j] =
              k.dot(rows + (j - j0) * I, xp + t * P, I) + (a.bias ? a.bias[j] : 0.0f);
    }
  };
  std::vector<GemvArgs>& args = tl_args;
  args.assign(ps.size(), shared);
  int64_t total = 0;
  for (size_t m = 0; m < ps.size(); ++m) {
    args[m].w = ps[m].w;
    args[m].b = QBytes(*ps[m].w);
    args[m].y = ps[m].y;
    args[m].bias = ps[m].bias;
    total += ps[m].w->rows;
  }
  parallel_rows(total, total * I * T, [&](int64_t r0, int64_t r1) {
    for (int64_t m = 0, first = 0; m < static_cast<int64_t>(args.size()); ++m) {
      const int64_t rows = args[m].w->rows;
      const int64_t a0 = std::max(r0, first), a1 = std::min(r1, first + rows);
      if (a0 < a1) run(args[m], a0 - first, a1 - first);
      first += rows;
    }
  });
}

}  // namespace

Isa active_isa() {
  return table().isa;
}

Isa force_isa(Isa isa) {
  QL_CHECK(isa_supported(isa), "quantized kernels: this CPU cannot run ", isa_name(isa));
  const Isa prev = active_isa();
  g_table.store(table_for(isa), std::memory_order_release);
  return prev;
}

bool affine_chunk_aligned(const QMatrix& w) {
  return w.type == QuantType::Affine && w.g_idx.empty() &&
         (w.group_size % kQChunk == 0 || w.group_size >= w.cols);
}

const int32_t* column_groups(const QMatrix& w, std::vector<int32_t>& buf) {
  buf.assign(static_cast<size_t>(w.padded_cols()), 0);
  if (!w.g_idx.empty()) {
    std::copy(w.g_idx.begin(), w.g_idx.end(), buf.begin());
  } else {
    // Group by group, not i / G: the portable GEMV calls this for every 16 rows, and a
    // division per column cost more than dequantizing them.
    for (int64_t i0 = 0, g = 0; i0 < w.cols; i0 += w.group_size, ++g)
      std::fill(buf.begin() + i0, buf.begin() + std::min(w.cols, i0 + w.group_size),
                static_cast<int32_t>(g));
  }
  return buf.data();
}

bool int8_gemv_used(Isa isa, const QMatrix& w) {
  return uses_int8(*table_for(isa), w);
}

bool int8_gemv_layout(const QMatrix& w) {
  return affine_chunk_aligned(w) && (w.bits == 2 || w.bits == 4 || w.bits == 8);
}

const uint8_t* int8_lane_order(int bits) {
  // How one vector of a chunk pair's packed bytes unpacks (layouts: qmatrix.h).
  static const auto orders = [] {
    std::array<std::array<uint8_t, 64>, 3> o{};  // bits 2, 4, 8
    for (int k = 0; k < 64; ++k) {
      // 2-bit: the pair's 16 bytes (8 per chunk) four times, at bit shifts 0, 2, 4, 6.
      const int shift = k / 16, b2 = k % 16;
      o[0][k] = static_cast<uint8_t>((b2 < 8 ? 0 : 32) + b2 % 8 + 8 * shift);
      // 4-bit: the pair's 32 bytes (16 per chunk) twice, low nibbles then high nibbles.
      const int nibble = k / 32, b4 = k % 32;
      o[1][k] = static_cast<uint8_t>((b4 < 16 ? 0 : 32) + b4 % 16 + 16 * nibble);
      // 8-bit: the bytes in column order.
      o[2][k] = static_cast<uint8_t>(k);
    }
    return o;
  }();
  return orders[bits == 2 ? 0 : bits == 4 ? 1 : 2].data();
}

unsigned int8_second_chunk_lanes(int bits) {
  const uint8_t* order = int8_lane_order(bits);
  unsigned m = 0;
  for (int l = 0; l < 16; ++l)
    if (order[4 * l] >= kQChunk) m |= 1u << l;
  return m;
}

int64_t int8_stride(const QMatrix& w) {
  return (w.padded_cols() + 2 * kQChunk - 1) / (2 * kQChunk) * (2 * kQChunk);
}

float quantize_chunk_int8(const float* x, int64_t n, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    amax = std::max(amax, std::abs(x[i]));
    finite = finite && std::isfinite(x[i]);
  }
  if (!finite) {
    // A NaN or inf activation makes the chunk's scale NaN, so it reaches the output as in fp32.
    std::fill(q, q + n, int8_t{0});
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  // |x * inv| <= 127 up to rounding, so the clamp only guards that last ulp.
  for (int64_t i = 0; i < n; ++i)
    q[i] = static_cast<int8_t>(std::clamp(std::nearbyint(x[i] * inv), -127.0f, 127.0f));
  return amax / 127.0f;
}

void quantize_activations(const float* x, int64_t x_stride, int64_t T, const QMatrix& w, int8_t* xq,
                          float* xd, float* xdc, float* xsum) {
  const int64_t S = int8_stride(w), nc = w.padded_cols() / kQChunk, L = w.n_groups();
  const int64_t cpg = L == 1 ? nc : w.group_size / kQChunk;
  const uint8_t* order = int8_lane_order(w.bits);
  int8_t q[2 * kQChunk];
  float d[2];
  std::fill(xsum, xsum + T * L, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t v = 0; v < S / (2 * kQChunk); ++v) {
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t c = 2 * v + h;
        if (c < nc) {
          d[h] = quantize_chunk_int8(x + t * x_stride + c * kQChunk, kQChunk, q + h * kQChunk);
          int32_t qsum = 0;
          for (int k = 0; k < kQChunk; ++k) qsum += q[h * kQChunk + k];
          xsum[t * L + c / cpg] += d[h] * static_cast<float>(qsum);
        } else {
          d[h] = 0.0f;
          std::fill(q + h * kQChunk, q + (h + 1) * kQChunk, int8_t{0});
        }
      }
      int8_t* out = xq + t * S + v * 2 * kQChunk;
      for (int k = 0; k < 2 * kQChunk; ++k) out[k] = q[order[k]];
      float* scales = xd + t * (S / 4) + v * 16;
      for (int l = 0; l < 16; ++l) scales[l] = d[order[4 * l] / kQChunk];
      std::copy(d, d + 2, xdc + t * (S / kQChunk) + 2 * v);
    }
}

void gemv_int8_ref(float* y, const float* x, const QMatrix& w, const float* bias, int64_t T) {
  const int64_t O = w.rows, I = w.cols, L = w.n_groups();
  std::vector<int8_t> q(static_cast<size_t>(I));
  std::vector<float> d(static_cast<size_t>((I + kQChunk - 1) / kQChunk));
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * I;
    for (int64_t c = 0; c * kQChunk < I; ++c)
      d[c] = quantize_chunk_int8(xt + c * kQChunk, std::min(kQChunk, I - c * kQChunk),
                                 q.data() + c * kQChunk);
    std::vector<double> xsum(static_cast<size_t>(L), 0.0);  // of x^
    for (int64_t i = 0; i < I; ++i)
      xsum[w.group_of(i)] += static_cast<double>(d[i / kQChunk]) * q[i];
    for (int64_t j = 0; j < O; ++j) {
      double acc = bias ? bias[j] : 0.0;
      for (int64_t i = 0; i < I; ++i)
        acc += static_cast<double>(w.scales[j * L + w.group_of(i)]) * d[i / kQChunk] *
               code_at(w, j, i) * q[i];
      for (int64_t g = 0; g < L; ++g) acc += static_cast<double>(w.offsets[j * L + g]) * xsum[g];
      y[t * O + j] = static_cast<float>(acc);
    }
  }
}

const KernelTable kPortableTable = {Isa::Portable,         nullptr,     nullptr, 0,
                                    portable_dequant_rows, portable_dot};

}  // namespace qk

const char* qkernel_isa() {
  return qk::isa_name(qk::active_isa());
}

void dequantize_rows(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  w.prepare();
  const qk::KernelTable& k = qk::table();
  qk::parallel_rows(r1 - r0, (r1 - r0) * w.cols, [&](int64_t a, int64_t b) {
    k.dequant_rows(w, r0 + a, r0 + b, out + a * w.cols);
  });
}

bool same_activation_layout(const QMatrix& a, const QMatrix& b) {
  return a.cols == b.cols && a.type == b.type && a.bits == b.bits && a.group_size == b.group_size &&
         a.g_idx == b.g_idx;
}

void qmatmul_forward_shared(std::span<const QProduct> products, const float* x, int64_t T,
                            DecodeActivations activations) {
  if (products.empty()) return;
  const bool shareable = std::all_of(products.begin(), products.end(), [&](const QProduct& p) {
    return same_activation_layout(*p.w, *products.front().w);
  });
  if (T > qk::kGemvMaxTokens || !shareable || T <= 0) {
    // Prefill is compute-bound: nothing worth sharing between the GEMMs.
    for (const QProduct& p : products) qmatmul_forward(p.y, x, *p.w, p.bias, T, activations);
    return;
  }
  qk::gemv(products, x, T, activations, qk::table());
}

namespace {

// w as bf16, decoded a few rows at a time into a buffer that stays in cache and converted from
// there: the fp32 copy of the whole weight is never written.
const uint16_t* dequantize_bf16(const QMatrix& w) {
  constexpr int64_t kRows = 8;
  w.prepare();
  uint16_t* out = reused_buffer(qk::tl_weights_bf16, w.rows * w.cols);
  const qk::KernelTable& k = qk::table();
  qk::parallel_rows(w.rows, w.rows * w.cols, [&](int64_t a, int64_t b) {
    float* rows = reused_buffer(qk::tl_rows, kRows * w.cols);
    for (int64_t r = a; r < b; r += kRows) {
      const int64_t n = std::min(kRows, b - r);
      k.dequant_rows(w, r, r + n, rows);
      ops::to_bf16(rows, n, w.cols, w.cols, out + r * w.cols);
    }
  });
  return out;
}

}  // namespace

void qmatmul_forward(float* y, const float* x, const QMatrix& w, const float* bias, int64_t T,
                     DecodeActivations activations) {
  const int64_t O = w.rows, I = w.cols;
  if (T <= 0) return;
  if (T <= qk::kGemvMaxTokens) {
    const QProduct p{&w, bias, y};
    return qk::gemv({&p, 1}, x, T, activations, qk::table());
  }
  for (int64_t t = 0; t < T; ++t)
    if (bias) std::copy(bias, bias + O, y + t * O);
  const float beta = bias ? 1.0f : 0.0f;
  if (ops::use_bf16(T, O, I))
    return ops::gemm_bf16(false, true, T, O, I, 1.0f, x, I, {nullptr, dequantize_bf16(w)}, I, beta,
                          y, O);
  float* W = reused_buffer(qk::tl_weights, O * I);
  dequantize_rows(w, 0, O, W);
  ops::gemm(false, true, T, O, I, 1.0f, x, I, W, I, beta, y, O);
}

void qmatmul_backward_input(float* dx, const ops::Operand& dy, const QMatrix& w, int64_t T,
                            bool accumulate) {
  const int64_t O = w.rows, I = w.cols;
  if (T <= 0) return;
  const float beta = accumulate ? 1.0f : 0.0f;
  if (ops::use_bf16(T, I, O))
    return ops::gemm_bf16(false, false, T, I, O, 1.0f, dy, O, {nullptr, dequantize_bf16(w)}, I,
                          beta, dx, I);
  float* W = reused_buffer(qk::tl_weights, O * I);
  dequantize_rows(w, 0, O, W);
  ops::gemm(false, false, T, I, O, 1.0f, dy.f32, O, W, I, beta, dx, I);
}

}  // namespace qalora
