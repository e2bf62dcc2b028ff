#include "qalora/ops/ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "ops/ops_internal.h"
#include "qalora/core/error.h"
#include "qalora/ops/gemm.h"

namespace qalora::ops {

namespace {

// axpy written so that -O3 -march=native vectorizes it.
inline void axpy(float* y, float a, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

void exp_forward(float* y, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = exp_approx(x[i]);
}

void exp_forward_ref(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::exp(x[i]);
}

void rmsnorm_forward(float* out, const float* x, const float* w, int64_t T, int64_t D, float eps) {
#pragma omp parallel for if (T > 8)
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * D;
    float* ot = out + t * D;
    // Sum of squares in double: D is small and this keeps the norm accurate for large D too.
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(xt[i]) * xt[i];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) ot[i] = xt[i] * inv * w[i];
  }
}

void rmsnorm_forward_ref(float* out, const float* x, const float* w, int64_t T, int64_t D,
                         float eps) {
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(x[t * D + i]) * x[t * D + i];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    for (int64_t i = 0; i < D; ++i) out[t * D + i] = static_cast<float>(x[t * D + i] * inv * w[i]);
  }
}

void matmul_forward(float* y, const float* x, const float* W, const float* bias, int64_t T,
                    int64_t I, int64_t O) {
  const auto bi = static_cast<blasint>(I), bo = static_cast<blasint>(O);
  if (T == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, bo, bi, 1.0f, W, bi, x, 1, 0.0f, y, 1);
  } else {
    gemm(false, true, T, O, I, 1.0f, x, I, W, I, 0.0f, y, O);
  }
  if (bias != nullptr) {
    for (int64_t t = 0; t < T; ++t) axpy(y + t * O, 1.0f, bias, O);
  }
}

void matmul_forward_ref(float* y, const float* x, const float* W, const float* bias, int64_t T,
                        int64_t I, int64_t O) {
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t o = 0; o < O; ++o) {
      double acc = bias != nullptr ? bias[o] : 0.0;
      for (int64_t i = 0; i < I; ++i) acc += static_cast<double>(x[t * I + i]) * W[o * I + i];
      y[t * O + o] = static_cast<float>(acc);
    }
  }
}

void rope_forward(float* x, int64_t T, int64_t H, int64_t Hd, int64_t pos0, const float* cos_table,
                  const float* sin_table) {
  rotate_pairs(x, T, H, Hd, pos0, nullptr, cos_table, sin_table, 1.0f);
}

void rope_forward_at(float* x, int64_t T, int64_t H, int64_t Hd, const int64_t* positions,
                     const float* cos_table, const float* sin_table) {
  rotate_pairs(x, T, H, Hd, 0, positions, cos_table, sin_table, 1.0f);
}

void rope_forward_at_ref(float* x, int64_t T, int64_t H, int64_t Hd, const int64_t* positions,
                         const float* cos_table, const float* sin_table) {
  const int64_t half = Hd / 2;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < half; ++i) {
        float* v = x + (t * H + h) * Hd + 2 * i;
        const double c = cos_table[positions[t] * half + i], s = sin_table[positions[t] * half + i];
        const double a = v[0], b = v[1];
        v[0] = static_cast<float>(a * c - b * s);
        v[1] = static_cast<float>(a * s + b * c);
      }
    }
  }
}

void rope_forward_ref(float* x, int64_t T, int64_t H, int64_t Hd, int64_t pos0,
                      const float* cos_table, const float* sin_table) {
  std::vector<int64_t> positions(static_cast<size_t>(T));
  std::iota(positions.begin(), positions.end(), pos0);
  rope_forward_at_ref(x, T, H, Hd, positions.data(), cos_table, sin_table);
}

void swiglu_forward(float* out, const float* gate, const float* up, int64_t N) {
#pragma omp parallel for simd if (N > 65536)
  for (int64_t i = 0; i < N; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + exp_approx(-g)) * up[i];
  }
}

void swiglu_forward_ref(float* out, const float* gate, const float* up, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    const double g = gate[i];
    out[i] = static_cast<float>(g / (1.0 + std::exp(-g)) * up[i]);
  }
}

void kv_cache_store(float* k_cache, float* v_cache, const float* k, const float* v, int64_t T,
                    int64_t pos0, int64_t KV, int64_t Hd, int64_t cache_stride) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < KV; ++h) {
      const float* kt = k + (t * KV + h) * Hd;
      for (int64_t i = 0; i < Hd; ++i) k_cache[(h * Hd + i) * cache_stride + pos0 + t] = kt[i];
      std::copy(v + (t * KV + h) * Hd, v + (t * KV + h + 1) * Hd,
                v_cache + (h * cache_stride + pos0 + t) * Hd);
    }
}

namespace {

constexpr int64_t kPosBlock = 64;
constexpr int64_t kHeadDim64 = 64;

// o[kHd] += sum_{p0 <= p < p1} w[p] V[p, kHd], the sum held in registers (a fixed-size local
// array) instead of read and written back per position.
template <int64_t kHd>
void weighted_rows(float* o, const float* w, const float* V, int64_t p0, int64_t p1) {
  float acc[kHd] = {};
  for (int64_t p = p0; p < p1; ++p) {
    const float wp = w[p];
    const float* v = V + p * kHd;
#pragma omp simd
    for (int64_t i = 0; i < kHd; ++i) acc[i] += wp * v[i];
  }
  for (int64_t i = 0; i < kHd; ++i) o[i] += acc[i];
}

// One decoded token (T = 1) over P cached positions. Decoding reads the whole cache once per
// token from memory, so the threads split the positions, not the heads (of which there may be
// fewer KV heads than threads): each reads its share of every key and value once, for all the
// query heads that use it, and keeps a partial softmax (its max, its sum of exponentials and
// its weighted sum of values) per head; the partials are then merged, as in flash-decoding.
void attention_decode(float* out, const float* q, const float* k_cache, const float* v_cache,
                      int64_t P, int64_t H, int64_t KV, int64_t Hd, int64_t cache_stride) {
  const int64_t group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Hd));
  const bool parallel = P * H * Hd > (int64_t{1} << 15);  // else not worth waking threads
  const int64_t slots = parallel ? omp_get_max_threads() : 1;
  const int64_t part = Hd + 2;  // per thread and head: O[Hd], max, sum
  std::vector<float> partial(static_cast<size_t>(slots * H * part));
  int64_t used = 1;
#pragma omp parallel if (parallel)
  {
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
#pragma omp single
    used = nth;
    const int64_t p0 = P * tid / nth, p1 = P * (tid + 1) / nth;
    thread_local std::vector<float> scores;
    if (static_cast<int64_t>(scores.size()) < group * P)
      scores.resize(static_cast<size_t>(group * P));
    for (int64_t kvh = 0; kvh < KV; ++kvh) {
      const float* Kt = k_cache + kvh * Hd * cache_stride;
      const float* V = v_cache + kvh * cache_stride * Hd;
      const float* Q = q + kvh * group * Hd;
      float* s = scores.data();
      // With the keys transposed, the scores of a query are sums of rows of Kt (one per head
      // dimension) scaled by its elements: vector work over positions, no horizontal sums.
      // Blocks of kPosBlock positions keep the sums in registers across the Hd rows.
      for (int64_t r = 0; r < group; ++r)
        for (int64_t pb = p0; pb < p1; pb += kPosBlock) {
          float acc[kPosBlock] = {};
          const int64_t n = std::min(kPosBlock, p1 - pb);
          for (int64_t i = 0; i < Hd; ++i) {
            const float qi = scale * Q[r * Hd + i];
            const float* kt = Kt + i * cache_stride + pb;
            if (n == kPosBlock) {
#pragma omp simd
              for (int64_t j = 0; j < kPosBlock; ++j) acc[j] += qi * kt[j];
            } else {
              for (int64_t j = 0; j < n; ++j) acc[j] += qi * kt[j];
            }
          }
          std::copy(acc, acc + n, s + r * P + pb);
        }
      for (int64_t r = 0; r < group; ++r) {
        float* pr = partial.data() + (tid * H + kvh * group + r) * part;
        float* sr = s + r * P;
        const float mx = max_value(sr + p0, p1 - p0);
        pr[Hd] = mx;
        pr[Hd + 1] = exp_shifted(sr + p0, p1 - p0, mx);
        std::fill(pr, pr + Hd, 0.0f);
      }
      for (int64_t r = 0; r < group; ++r) {
        float* o = partial.data() + (tid * H + kvh * group + r) * part;
        if (Hd == kHeadDim64)
          weighted_rows<kHeadDim64>(o, s + r * P, V, p0, p1);
        else
          for (int64_t p = p0; p < p1; ++p) axpy(o, s[r * P + p], V + p * Hd, Hd);
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    float mx = -INFINITY;
    for (int64_t t = 0; t < used; ++t) {
      const float* pr = partial.data() + (t * H + h) * part;
      if (pr[Hd + 1] > 0.0f) mx = std::max(mx, pr[Hd]);  // empty shares have sum 0
    }
    float* o = out + h * Hd;
    std::fill(o, o + Hd, 0.0f);
    float sum = 0.0f;
    for (int64_t t = 0; t < used; ++t) {
      const float* pr = partial.data() + (t * H + h) * part;
      if (pr[Hd + 1] == 0.0f) continue;
      const float w = std::exp(pr[Hd] - mx);
      sum += w * pr[Hd + 1];
      axpy(o, w, pr, Hd);
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < Hd; ++i) o[i] *= inv;
  }
}

}  // namespace

namespace {

// The cache slots query t (at slot pos0 + t) attends to, as three ascending half-open ranges.
struct KeyRanges {
  int64_t begin[3], end[3];
};

KeyRanges key_ranges(std::span<const VisibleKeys> visible, int64_t t, int64_t pos0) {
  const int64_t own_end = pos0 + t + 1;
  if (visible.empty()) return {{0, 0, 0}, {0, 0, own_end}};
  const VisibleKeys& v = visible[static_cast<size_t>(t)];
  return {{0, v.context_begin, v.own_begin}, {v.prefix_end, v.context_end, own_end}};
}

void check_visible(std::span<const VisibleKeys> visible, int64_t T, int64_t pos0) {
  if (visible.empty()) return;
  QL_CHECK(static_cast<int64_t>(visible.size()) == T, "attention_forward: ", visible.size(),
           " visibility entries for ", T, " queries");
  for (int64_t t = 0; t < T; ++t) {
    const VisibleKeys& v = visible[static_cast<size_t>(t)];
    QL_CHECK(0 <= v.prefix_end && v.prefix_end <= v.context_begin &&
                 v.context_begin <= v.context_end && v.context_end <= v.own_begin &&
                 v.own_begin <= pos0 + t,
             "attention_forward: query ", t, " at slot ", pos0 + t,
             " sees slots that are not ascending ranges before it: [0, ", v.prefix_end, "), [",
             v.context_begin, ", ", v.context_end, "), [", v.own_begin, ", ", pos0 + t, "]");
  }
}

}  // namespace

void attention_forward(float* out, const float* q, const float* k_cache, const float* v_cache,
                       int64_t T, int64_t pos0, int64_t H, int64_t KV, int64_t Hd,
                       int64_t cache_stride, std::span<const VisibleKeys> visible) {
  if (T == 1 && visible.empty())
    return attention_decode(out, q, k_cache, v_cache, pos0 + 1, H, KV, Hd, cache_stride);
  check_visible(visible, T, pos0);
  const int64_t P = pos0 + T;  // keys visible to the last query
  const int64_t group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Hd));
  const int64_t qstride = H * Hd;
#pragma omp parallel if (T * P * H * Hd > (int64_t{1} << 15))
  {
    thread_local std::vector<float> scores;
    if (static_cast<int64_t>(scores.size()) < T * P) scores.resize(static_cast<size_t>(T * P));
#pragma omp for schedule(dynamic)
    for (int64_t h = 0; h < H; ++h) {
      const float* Kt = k_cache + (h / group) * Hd * cache_stride;
      const float* V = v_cache + (h / group) * cache_stride * Hd;
      const float* Q = q + h * Hd;
      float* O = out + h * Hd;
      // S[T, P] = Q_h[T, Hd] Kt[Hd, P]; gemm runs single-threaded inside this parallel loop.
      gemm(false, false, T, P, Hd, scale, Q, qstride, Kt, cache_stride, 0.0f, scores.data(), P);
      for (int64_t t = 0; t < T; ++t) {
        float* s = scores.data() + t * P;
        const KeyRanges r = key_ranges(visible, t, pos0);
        float mx = -std::numeric_limits<float>::infinity();
        for (int k = 0; k < 3; ++k)
          if (r.end[k] > r.begin[k])
            mx = std::max(mx, max_value(s + r.begin[k], r.end[k] - r.begin[k]));
        float sum = 0.0f;
        for (int k = 0; k < 3; ++k) sum += exp_shifted(s + r.begin[k], r.end[k] - r.begin[k], mx);
        const float inv = 1.0f / sum;
        int64_t masked_from = 0;  // the mask: zero weight outside the ranges
        for (int k = 0; k < 3; ++k) {
          if (r.end[k] <= r.begin[k]) continue;
          std::fill(s + masked_from, s + r.begin[k], 0.0f);
          for (int64_t p = r.begin[k]; p < r.end[k]; ++p) s[p] *= inv;
          masked_from = r.end[k];
        }
        std::fill(s + masked_from, s + P, 0.0f);
      }
      // O_h[T, Hd] = S[T, P] V[P, Hd]
      gemm(false, false, T, Hd, P, 1.0f, scores.data(), P, V, Hd, 0.0f, O, qstride);
    }
  }
}

void attention_forward_ref(float* out, const float* q, const float* k_cache, const float* v_cache,
                           int64_t T, int64_t pos0, int64_t H, int64_t KV, int64_t Hd,
                           int64_t cache_stride, std::span<const VisibleKeys> visible) {
  check_visible(visible, T, pos0);
  const int64_t group = H / KV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(Hd));
  for (int64_t t = 0; t < T; ++t) {
    const KeyRanges r = key_ranges(visible, t, pos0);
    std::vector<int64_t> keys;
    for (int k = 0; k < 3; ++k)
      for (int64_t p = r.begin[k]; p < r.end[k]; ++p) keys.push_back(p);
    for (int64_t h = 0; h < H; ++h) {
      const float* Kt = k_cache + (h / group) * Hd * cache_stride;
      const float* V = v_cache + (h / group) * cache_stride * Hd;
      const float* Q = q + (t * H + h) * Hd;
      std::vector<double> s(keys.size());
      double mx = -1e300;
      for (size_t j = 0; j < keys.size(); ++j) {
        double acc = 0.0;
        for (int64_t i = 0; i < Hd; ++i)
          acc += static_cast<double>(Q[i]) * Kt[i * cache_stride + keys[j]];
        s[j] = acc * scale;
        mx = std::max(mx, s[j]);
      }
      double sum = 0.0;
      for (auto& v : s) sum += (v = std::exp(v - mx));
      for (int64_t i = 0; i < Hd; ++i) {
        double acc = 0.0;
        for (size_t j = 0; j < keys.size(); ++j) acc += s[j] / sum * V[keys[j] * Hd + i];
        out[(t * H + h) * Hd + i] = static_cast<float>(acc);
      }
    }
  }
}

}  // namespace qalora::ops
