// Training kernels of the Llama block: the causal attention over a whole sequence that saves
// its probabilities, the input gradients of every forward kernel, and the fused cross-entropy.
// Each has a plain double-precision reference beside it (suffix _ref).
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "ops/ops_internal.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/core/reused_buffer.h"
#include "qalora/ops/gemm.h"
#include "qalora/ops/ops.h"

namespace qalora::ops {

namespace {

// Attention works on blocks of kRowBlock query rows: a block needs the keys up to its last
// row only, so the causal triangle costs little more than half the square, and (block, head)
// pairs give the threads enough independent tasks. 128 rather than 64: half the products,
// each closer to the GEMM peak (with dS in bf16, a 512-token backward took 5-9% less time in
// alternating runs).
// Fixed, so results do not depend on the thread count.
constexpr int64_t kRowBlock = 128;

// Below this much work (T^2 * Hd * H) waking the threads costs more than it saves.
constexpr int64_t kParallelWork = int64_t{1} << 15;

// Cross-entropy sums its exponentials in float over blocks of this many logits, in double
// across blocks.
constexpr int64_t kSumBlock = 256;

// Whether attention's products over T tokens run in bf16: decided once per call from the
// largest block's product, so one call never mixes the two.
bool attention_in_bf16(int64_t T, int64_t Hd) {
  return use_bf16(std::min(T, kRowBlock), T, Hd);
}

inline float value_of(float p) {
  return p;
}
inline float value_of(uint16_t p) {
  return bf16_to_fp32(p);
}

// One row of the score gradient, in place over dP: d = p o (d - sum(p o d)) over the visible
// columns, p the row's probabilities in fp32 or bf16.
template <typename P>
void score_gradient_row(const P* p, float* d, int64_t visible) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < visible; ++j) dot += value_of(p[j]) * d[j];
#pragma omp simd
  for (int64_t j = 0; j < visible; ++j) d[j] = value_of(p[j]) * (d[j] - dot);
}

// C = alpha op(A) op(B) + beta C with B (and A where it has one) in bf16 when B has a copy.
void product(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, Operand A, int64_t lda,
             Operand B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (B.bf16 == nullptr) return gemm(ta, tb, M, N, K, alpha, A.f32, lda, B.f32, ldb, beta, C, ldc);
  gemm_bf16(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

blasint bl(int64_t n) {
  return static_cast<blasint>(n);
}

void check_targets(const int32_t* targets, int64_t T, int64_t V) {
  for (int64_t t = 0; t < T; ++t)
    QL_CHECK(targets[t] < V, "cross_entropy: target of token ", t, " is ", targets[t],
             ", expected < vocabulary size ", V);
}

}  // namespace

void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, int64_t T,
                      int64_t D, float eps) {
#pragma omp parallel for if (T > 8)
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * D;
    const float* dy = dout + t * D;
    float* dxt = dx + t * D;
    double ss = 0.0, dot = 0.0;
#pragma omp simd reduction(+ : ss, dot)
    for (int64_t i = 0; i < D; ++i) {
      ss += static_cast<double>(xt[i]) * xt[i];
      dot += static_cast<double>(dy[i]) * w[i] * xt[i];
    }
    const double r = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    const auto rf = static_cast<float>(r);
    const auto c = static_cast<float>(r * r * r * dot / static_cast<double>(D));
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dxt[i] += rf * w[i] * dy[i] - c * xt[i];
  }
}

void rmsnorm_backward_ref(float* dx, const float* dout, const float* x, const float* w, int64_t T,
                          int64_t D, float eps) {
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0.0, dot = 0.0;
    for (int64_t i = 0; i < D; ++i) {
      ss += static_cast<double>(x[t * D + i]) * x[t * D + i];
      dot += static_cast<double>(dout[t * D + i]) * w[i] * x[t * D + i];
    }
    const double r = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    for (int64_t i = 0; i < D; ++i)
      dx[t * D + i] = static_cast<float>(dx[t * D + i] + r * w[i] * dout[t * D + i] -
                                         x[t * D + i] * r * r * r * dot / static_cast<double>(D));
  }
}

void matmul_backward_input(float* dx, const Operand& dy, const float* W, int64_t T, int64_t I,
                           int64_t O, bool accumulate) {
  const float beta = accumulate ? 1.0f : 0.0f;
  if (T == 1) {
    cblas_sgemv(CblasRowMajor, CblasTrans, bl(O), bl(I), 1.0f, W, bl(I), dy.f32, 1, beta, dx, 1);
  } else {
    gemm(false, false, T, I, O, 1.0f, dy, O, W, I, beta, dx, I);
  }
}

void matmul_backward_input_ref(float* dx, const float* dy, const float* W, int64_t T, int64_t I,
                               int64_t O) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i) {
      double acc = 0.0;
      for (int64_t o = 0; o < O; ++o) acc += static_cast<double>(dy[t * O + o]) * W[o * I + i];
      dx[t * I + i] = static_cast<float>(acc);
    }
}

void rope_backward(float* dx, int64_t T, int64_t H, int64_t Hd, int64_t pos0,
                   const float* cos_table, const float* sin_table) {
  // The transpose of the rotation by +angle is the rotation by -angle.
  rotate_pairs(dx, T, H, Hd, pos0, nullptr, cos_table, sin_table, -1.0f);
}

void rope_backward_ref(float* dx, int64_t T, int64_t H, int64_t Hd, int64_t pos0,
                       const float* cos_table, const float* sin_table) {
  const int64_t half = Hd / 2;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < half; ++i) {
        float* g = dx + (t * H + h) * Hd + 2 * i;
        const double c = cos_table[(pos0 + t) * half + i], s = sin_table[(pos0 + t) * half + i];
        const double a = g[0], b = g[1];
        g[0] = static_cast<float>(a * c + b * s);
        g[1] = static_cast<float>(b * c - a * s);
      }
}

void attention_train_forward(float* out, float* probs, const float* q, const float* k,
                             const float* v, int64_t T, int64_t H, int64_t KV, int64_t Hd) {
  const int64_t group = H / KV, blocks = (T + kRowBlock - 1) / kRowBlock;
  const int64_t qs = H * Hd, ks = KV * Hd;  // row strides of q/out and k/v
  const float scale = 1.0f / std::sqrt(static_cast<float>(Hd));
  const bool bf16 = attention_in_bf16(T, Hd);
  uint16_t* probs16 = bf16 ? reinterpret_cast<uint16_t*>(probs) : nullptr;
  thread_local std::vector<uint16_t> q_buf, k_buf, v_buf;
  // Converted once per call rather than once per (block, head) product that reads them; the
  // probabilities, made block by block, are rounded as they are written.
  const Operand Q = make_operand(q, T, qs, bf16, q_buf), Kall = make_operand(k, T, ks, bf16, k_buf),
                Vall = make_operand(v, T, ks, bf16, v_buf);
  // Later blocks see more keys: they go first so that the dynamic schedule ends balanced.
  // The products run single-threaded inside the parallel loop.
#pragma omp parallel for collapse(2) schedule(dynamic) if (H * T * T * Hd > kParallelWork)
  for (int64_t b = blocks - 1; b >= 0; --b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t i0 = b * kRowBlock, i1 = std::min(T, i0 + kRowBlock), rows = i1 - i0;
      const Operand K = Kall.at((h / group) * Hd), V = Vall.at((h / group) * Hd);
      // The block's scores and softmax in fp32: in probs itself, or (bf16) in a buffer of the
      // thread's whose rows are rounded into probs16 while in cache.
      thread_local std::vector<float> block_buf;
      float* P = bf16 ? reused_buffer(block_buf, rows * T) : probs + (h * T + i0) * T;
      uint16_t* P16 = bf16 ? probs16 + (h * T + i0) * T : nullptr;
      // S[rows, i1] = scale Q_h[i0:i1] K[0:i1]^T (the block's upper corner is masked below).
      product(false, true, rows, i1, Hd, scale, Q.at(i0 * qs + h * Hd), qs, K, ks, 0.0f, P, T);
      for (int64_t i = i0; i < i1; ++i) {
        float* s = P + (i - i0) * T;
        const int64_t visible = i + 1;
        const float mx = max_value(s, visible);
        const float inv = 1.0f / exp_shifted(s, visible, mx);
#pragma omp simd
        for (int64_t j = 0; j < visible; ++j) s[j] *= inv;
        if (P16 != nullptr) {
          uint16_t* s16 = P16 + (i - i0) * T;
          to_bf16(s, 1, visible, T, s16);
          std::fill(s16 + visible, s16 + T, uint16_t{0});  // +0 in bf16
        } else {
          std::fill(s + visible, s + T, 0.0f);
        }
      }
      // O_h[i0:i1] = P[rows, 0:i1] V[0:i1]
      product(false, false, rows, Hd, i1, 1.0f, bf16 ? Operand(nullptr, P16) : Operand(P), T, V, ks,
              0.0f, out + i0 * qs + h * Hd, qs);
    }
  }
}

void attention_train_forward_ref(float* out, float* probs, const float* q, const float* k,
                                 const float* v, int64_t T, int64_t H, int64_t KV, int64_t Hd) {
  const int64_t group = H / KV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(Hd));
  std::vector<double> s(static_cast<size_t>(T));
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / group;
    for (int64_t i = 0; i < T; ++i) {
      double mx = -INFINITY;
      for (int64_t j = 0; j <= i; ++j) {
        double acc = 0.0;
        for (int64_t d = 0; d < Hd; ++d)
          acc += static_cast<double>(q[(i * H + h) * Hd + d]) * k[(j * KV + g) * Hd + d];
        s[j] = acc * scale;
        mx = std::max(mx, s[j]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j <= i; ++j) sum += (s[j] = std::exp(s[j] - mx));
      float* p = probs + (h * T + i) * T;
      for (int64_t j = 0; j < T; ++j) p[j] = j <= i ? static_cast<float>(s[j] / sum) : 0.0f;
      for (int64_t d = 0; d < Hd; ++d) {
        double acc = 0.0;
        for (int64_t j = 0; j <= i; ++j) acc += s[j] / sum * v[(j * KV + g) * Hd + d];
        out[(i * H + h) * Hd + d] = static_cast<float>(acc);
      }
    }
  }
}

int64_t attention_probs_floats(int64_t T, int64_t H, int64_t Hd) {
  const int64_t values = H * T * T;
  return attention_in_bf16(T, Hd) ? (values + 1) / 2 : values;
}

int64_t attention_backward_scratch(int64_t T, int64_t H) {
  return H * T * T;
}

// With S = scale Q K^T, P = softmax(S) row-wise and O = P V:
//   dV = P^T dO,  dP = dO V^T,  dS = P o (dP - rowsum(P o dP)),  dQ = scale dS K,
//   dK = scale dS^T Q,
// where dV and dK sum over the query heads sharing a kv head.
void attention_train_backward(float* dq, float* dk, float* dv, const float* dout,
                              const float* probs, const float* q, const float* k, const float* v,
                              int64_t T, int64_t H, int64_t KV, int64_t Hd, float* scratch) {
  const int64_t group = H / KV, blocks = (T + kRowBlock - 1) / kRowBlock;
  const int64_t qs = H * Hd, ks = KV * Hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Hd));
  const bool bf16 = attention_in_bf16(T, Hd);
  thread_local std::vector<uint16_t> q_buf, k_buf, v_buf, dout_buf;
  const Operand Q = make_operand(q, T, qs, bf16, q_buf), K = make_operand(k, T, ks, bf16, k_buf),
                V = make_operand(v, T, ks, bf16, v_buf),
                dO = make_operand(dout, T, qs, bf16, dout_buf);
  // In bf16, dS [H, T, T] is kept in the first half of scratch's bytes (never read as floats),
  // as the forward kept the probabilities in probs'.
  uint16_t* dS16 = bf16 ? reinterpret_cast<uint16_t*>(scratch) : nullptr;
  const uint16_t* probs16 = bf16 ? reinterpret_cast<const uint16_t*>(probs) : nullptr;
#pragma omp parallel if (H * T * T * Hd > kParallelWork)
  {
    // dS and dQ, per block of query rows: rows i0..i1 need columns 0..i1 only.
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = blocks - 1; b >= 0; --b) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t i0 = b * kRowBlock, i1 = std::min(T, i0 + kRowBlock), rows = i1 - i0;
        const int64_t g = h / group;
        const int64_t at = (h * T + i0) * T;
        // In bf16, dS is kept in bf16 only (its products round it anyway) and the fp32 dP block
        // is made in a buffer of its own.
        thread_local std::vector<float> dp_buf;
        float* dS = dS16 != nullptr ? reused_buffer(dp_buf, rows * T) : scratch + (h * T + i0) * T;
        uint16_t* dS16_block = dS16 != nullptr ? dS16 + at : nullptr;
        // dP[rows, i1] = dO_h[i0:i1] V[0:i1]^T, then turned into dS in place.
        product(false, true, rows, i1, Hd, 1.0f, dO.at(i0 * qs + h * Hd), qs, V.at(g * Hd), ks,
                0.0f, dS, T);
        for (int64_t i = i0; i < i1; ++i) {
          float* d = dS + (i - i0) * T;
          const int64_t visible = i + 1, row = at + (i - i0) * T;
          if (probs16 != nullptr)
            score_gradient_row(probs16 + row, d, visible);
          else
            score_gradient_row(probs + row, d, visible);
          // Masked: the dQ product below and the dK products read up to column i1.
          std::fill(d + visible, d + i1, 0.0f);
          if (dS16_block != nullptr) to_bf16(d, 1, i1, T, dS16_block + (i - i0) * T);
        }
        // dQ_h[i0:i1] = scale dS[rows, 0:i1] K[0:i1]
        product(false, false, rows, Hd, i1, scale, {dS, dS16_block}, T, K.at(g * Hd), ks, 0.0f,
                dq + i0 * qs + h * Hd, qs);
      }
    }
    // dK and dV, per block of key rows: keys j0..j1 get gradients from queries j0..T only.
    // The query heads of a group are summed one after another, always in the same order.
#pragma omp for collapse(2) schedule(dynamic)
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t g = 0; g < KV; ++g) {
        const int64_t j0 = b * kRowBlock, cols = std::min(T, j0 + kRowBlock) - j0;
        const int64_t later = T - j0;  // the queries that see these keys
        for (int64_t r = 0; r < group; ++r) {
          const int64_t h = g * group + r;
          const float beta = r == 0 ? 0.0f : 1.0f;
          // dK[j0:j1] (+)= scale dS[j0:T, j0:j1]^T Q_h[j0:T]
          const int64_t at = (h * T + j0) * T + j0;
          product(true, false, cols, Hd, later, scale,
                  dS16 != nullptr ? Operand(nullptr, dS16 + at) : Operand(scratch + at), T,
                  Q.at(j0 * qs + h * Hd), qs, beta, dk + j0 * ks + g * Hd, ks);
          // dV[j0:j1] (+)= P[j0:T, j0:j1]^T dO_h[j0:T]
          product(true, false, cols, Hd, later, 1.0f,
                  probs16 != nullptr ? Operand(nullptr, probs16 + at) : Operand(probs + at), T,
                  dO.at(j0 * qs + h * Hd), qs, beta, dv + j0 * ks + g * Hd, ks);
        }
      }
    }
  }
}

void attention_train_backward_ref(float* dq, float* dk, float* dv, const float* dout,
                                  const float* probs, const float* q, const float* k,
                                  const float* v, int64_t T, int64_t H, int64_t KV, int64_t Hd,
                                  float* /*scratch*/) {
  const int64_t group = H / KV;
  const double scale = 1.0 / std::sqrt(static_cast<double>(Hd));
  std::vector<double> dk_acc(static_cast<size_t>(T * KV * Hd), 0.0), dv_acc(dk_acc.size(), 0.0);
  std::vector<double> ds(static_cast<size_t>(T));
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / group;
    for (int64_t i = 0; i < T; ++i) {
      const float* p = probs + (h * T + i) * T;
      const float* dO = dout + (i * H + h) * Hd;
      double dot = 0.0;
      for (int64_t j = 0; j <= i; ++j) {
        double dp = 0.0;
        for (int64_t d = 0; d < Hd; ++d)
          dp += static_cast<double>(dO[d]) * v[(j * KV + g) * Hd + d];
        ds[j] = dp;
        dot += p[j] * dp;
      }
      for (int64_t j = 0; j <= i; ++j) ds[j] = p[j] * (ds[j] - dot);
      for (int64_t d = 0; d < Hd; ++d) {
        double acc = 0.0;
        for (int64_t j = 0; j <= i; ++j) acc += ds[j] * k[(j * KV + g) * Hd + d];
        dq[(i * H + h) * Hd + d] = static_cast<float>(scale * acc);
      }
      for (int64_t j = 0; j <= i; ++j)
        for (int64_t d = 0; d < Hd; ++d) {
          dk_acc[(j * KV + g) * Hd + d] += scale * ds[j] * q[(i * H + h) * Hd + d];
          dv_acc[(j * KV + g) * Hd + d] += static_cast<double>(p[j]) * dO[d];
        }
    }
  }
  for (size_t n = 0; n < dk_acc.size(); ++n) {
    dk[n] = static_cast<float>(dk_acc[n]);
    dv[n] = static_cast<float>(dv_acc[n]);
  }
}

// With s = sigmoid(g): d/dg [g s u] = u s (1 + g (1 - s)), d/du = g s.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t N) {
#pragma omp parallel for simd if (N > 65536)
  for (int64_t i = 0; i < N; ++i) {
    const float g = gate[i], d = dout[i];  // read before dgate[i], which may be dout[i]
    const float s = 1.0f / (1.0f + exp_approx(-g));
    dup[i] = d * g * s;
    dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
  }
}

void swiglu_backward_ref(float* dgate, float* dup, const float* dout, const float* gate,
                         const float* up, int64_t N) {
  for (int64_t i = 0; i < N; ++i) {
    const double g = gate[i], d = dout[i];
    const double s = 1.0 / (1.0 + std::exp(-g));
    dup[i] = static_cast<float>(d * g * s);
    dgate[i] = static_cast<float>(d * up[i] * s * (1.0 + g * (1.0 - s)));
  }
}

double cross_entropy_forward_backward(float* logits, float* losses, const int32_t* targets,
                                      int64_t T, int64_t V, float grad_scale) {
  check_targets(targets, T, V);
  std::vector<double> row_loss(static_cast<size_t>(T));  // summed in order after the loop
#pragma omp parallel for schedule(dynamic) if (T > 1 && T * V > kParallelWork)
  for (int64_t t = 0; t < T; ++t) {
    float* l = logits + t * V;
    const int32_t y = targets[t];
    if (y < 0) {
      std::fill(l, l + V, 0.0f);
      losses[t] = 0.0f;
      row_loss[t] = 0.0;
      continue;
    }
    const float target_logit = l[y];
    const float mx = max_value(l, V);
    // Float sums of short blocks, which vectorize (a double reduction over the row does not,
    // and runs ~7x slower), added up in double.
    double sum = 0.0;
    for (int64_t j0 = 0; j0 < V; j0 += kSumBlock)
      sum += exp_shifted(l + j0, std::min(kSumBlock, V - j0), mx);
    const double loss = static_cast<double>(mx) + std::log(sum) - target_logit;
    const auto norm = static_cast<float>(grad_scale / sum);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) l[j] *= norm;
    l[y] -= grad_scale;
    losses[t] = static_cast<float>(loss);
    row_loss[t] = loss;
  }
  return std::accumulate(row_loss.begin(), row_loss.end(), 0.0);
}

double cross_entropy_forward_backward_ref(float* logits, float* losses, const int32_t* targets,
                                          int64_t T, int64_t V, float grad_scale) {
  check_targets(targets, T, V);
  double total = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    float* l = logits + t * V;
    const int32_t y = targets[t];
    if (y < 0) {
      std::fill(l, l + V, 0.0f);
      losses[t] = 0.0f;
      continue;
    }
    double mx = -INFINITY;
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(l[j]));
    double sum = 0.0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(l[j] - mx);
    const double lse = mx + std::log(sum);
    const double loss = lse - l[y];
    for (int64_t j = 0; j < V; ++j)
      l[j] = static_cast<float>((std::exp(l[j] - lse) - (j == y ? 1.0 : 0.0)) * grad_scale);
    losses[t] = static_cast<float>(loss);
    total += loss;
  }
  return total;
}

}  // namespace qalora::ops
