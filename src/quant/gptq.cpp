// GPTQ: Hessian accumulation, the inverse Cholesky factor, and the blocked column sweep.
#include "qalora/quant/gptq.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "qalora/core/error.h"
#include "qalora/quant/quantize.h"

extern "C" {
// LAPACK (shipped inside OpenBLAS): Cholesky factorisation and triangular inverse, column-major.
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info);
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void strtri_(const char* uplo, const char* diag, const int* n, float* a, const int* lda, int* info);
void dtrtri_(const char* uplo, const char* diag, const int* n, double* a, const int* lda,
             int* info);
}

namespace qalora {

HessianAccumulator::HessianAccumulator(int64_t cols)
    : cols_(cols), upper_(static_cast<size_t>(cols * cols), 0.0f) {}

void HessianAccumulator::add(const float* x, int64_t T) {
  if (T <= 0) return;
  const int n = static_cast<int>(cols_);
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, n, static_cast<int>(T), 1.0f, x, n, 1.0f,
              upper_.data(), n);
  n_ += T;
}

std::vector<double> HessianAccumulator::hessian() const {
  QL_CHECK(n_ > 0, "GPTQ: no calibration rows reached a layer with ", cols_, " inputs");
  const int64_t n = cols_;
  std::vector<double> H(upper_.size());
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) H[i * n + j] = at(i, j);
  return H;
}

namespace {

// LAPACK by element type (GPTQ factors in fp32, offset rounding in double).
void potrf(const char* uplo, const int* n, float* a, int* info) { spotrf_(uplo, n, a, n, info); }
void potrf(const char* uplo, const int* n, double* a, int* info) { dpotrf_(uplo, n, a, n, info); }
void trtri(const char* uplo, const char* diag, const int* n, float* a, int* info) {
  strtri_(uplo, diag, n, a, n, info);
}
void trtri(const char* uplo, const char* diag, const int* n, double* a, int* info) {
  dtrtri_(uplo, diag, n, a, n, info);
}

// With J the reversal of the index order and J S J = L L^T, U = J L^-1 J is upper triangular and
// U^T U = J (J S J)^-1 J = S^-1: GPTQ's factor from one Cholesky factorization and one triangular
// inverse (2n^3/3 flops), where inverting S and factoring the inverse takes 4n^3/3.
// On success B holds L^-1, row-major and lower, so U[i][j] = B[n^2 - 1 - (i n + j)].
// entry(a, b) gives S[a][b] for a <= b.
template <typename T, typename Entry>
bool reversed_inverse_factor(std::vector<T>& B, int64_t n, const Entry& entry) {
  B.assign(static_cast<size_t>(n * n), T{0});
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) B[i * n + j] = static_cast<T>(entry(n - 1 - i, n - 1 - j));
  // The row-major lower triangle is the column-major upper one LAPACK is told to use.
  const char upper = 'U', non_unit = 'N';
  const int nn = static_cast<int>(n);
  int info = 0;
  potrf(&upper, &nn, B.data(), &info);
  if (info != 0) return false;
  trtri(&upper, &non_unit, &nn, B.data(), &info);
  return info == 0;
}

// reversed_inverse_factor of S + lambda I, lambda = damp * mean(diag S). A Hessian that still is
// not positive definite gets 10x more damping, a few times. Returns the lambda used.
template <typename T, typename Entry>
double factor_damped(std::vector<T>& B, int64_t n, double damp, const Entry& entry) {
  double mean_diag = 0.0;
  for (int64_t a = 0; a < n; ++a) mean_diag += entry(a, a);
  mean_diag /= static_cast<double>(n);
  for (int attempt = 0;; ++attempt) {
    const double lambda = damp * mean_diag;
    if (reversed_inverse_factor(B, n, [&](int64_t a, int64_t b) {
          return entry(a, b) + (a == b ? lambda : 0.0);
        }))
      return lambda;
    QL_CHECK(attempt < 4, "GPTQ: the Hessian of a layer with ", n,
             " inputs is not positive definite even with damp ", damp,
             " (too few calibration tokens?)");
    damp *= 10.0;
  }
}

// Columns per lazy-update block: when every group start is also a block start (or lies inside
// the block that holds the whole group), group parameters see fully error-updated weights.
int64_t sweep_block(int64_t block, int64_t group, int64_t cols) {
  if (group >= cols || group % block == 0) return block;
  if (group < block) return group * (block / group);
  return group;
}

}  // namespace

std::vector<double> damped_inverse_cholesky(const std::vector<double>& H, int64_t n, double damp) {
  QL_CHECK(static_cast<int64_t>(H.size()) == n * n, "Hessian has ", H.size(), " entries, expected ",
           n * n);
  std::vector<double> U;
  factor_damped(U, n, damp, [&](int64_t a, int64_t b) { return H[a * n + b]; });
  std::reverse(U.begin(), U.end());
  return U;
}

namespace {

// GPTQ's factor in fp32, as the reference implementation computes it: twice the speed of double,
// and the damping bounds the condition number. h(a, b) gives H[a][b].
template <typename Hessian>
GptqFactor make_factor(int64_t cols, const GptqOptions& opt, const Hessian& h) {
  QL_CHECK(opt.damp > 0.0 && opt.damp < 1.0, "GPTQ: damp is ", opt.damp, ", expected in (0, 1)");
  GptqFactor f;
  f.cols = cols;
  f.act_order = opt.act_order;
  // A column no calibration input ever reached counts as one with unit variance (its weight
  // cannot matter and is quantized as 0).
  f.dead.resize(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) f.dead[c] = h(c, c) == 0.0;
  auto diag = [&](int64_t c) { return f.dead[c] ? 1.0 : h(c, c); };
  f.perm.resize(static_cast<size_t>(cols));
  std::iota(f.perm.begin(), f.perm.end(), 0);
  if (opt.act_order)
    std::stable_sort(f.perm.begin(), f.perm.end(),
                     [&](int64_t a, int64_t b) { return diag(a) > diag(b); });
  const double lambda = factor_damped(f.U, cols, opt.damp, [&](int64_t a, int64_t b) {
    const int64_t pa = f.perm[a], pb = f.perm[b];
    return pa == pb ? diag(pa) : h(pa, pb);
  });
  std::reverse(f.U.begin(), f.U.end());
  f.added.resize(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) f.added[c] = lambda + (f.dead[f.perm[c]] ? 1.0 : 0.0);
  return f;
}

}  // namespace

GptqFactor gptq_factor(const std::vector<double>& H, int64_t cols, const GptqOptions& opt) {
  QL_CHECK(static_cast<int64_t>(H.size()) == cols * cols, "GPTQ: Hessian has ", H.size(),
           " entries, expected ", cols * cols);
  return make_factor(cols, opt, [&](int64_t a, int64_t b) { return H[a * cols + b]; });
}

GptqFactor gptq_factor(const HessianAccumulator& acc, const GptqOptions& opt) {
  QL_CHECK(acc.samples() > 0, "GPTQ: no calibration rows reached a layer with ", acc.cols(),
           " inputs");
  return make_factor(acc.cols(), opt, [&](int64_t a, int64_t b) { return acc.at(a, b); });
}

GptqResult gptq_quantize(const float* W, int64_t rows, const GptqFactor& f,
                         const GptqOptions& opt) {
  QL_CHECK(opt.bits == 2 || opt.bits == 3 || opt.bits == 4 || opt.bits == 8, "GPTQ: bits is ",
           opt.bits, ", expected 2, 3, 4 or 8");
  QL_CHECK(!opt.static_groups || opt.act_order, "GPTQ: static groups only apply with act-order");
  QL_CHECK(opt.act_order == f.act_order, "GPTQ: the factor was made ",
           f.act_order ? "with" : "without", " act-order, the options say the opposite");
  const int64_t cols = f.cols;
  const int64_t G = resolve_group_size(opt.group_size, cols);
  const int bits = opt.bits;
  const std::vector<int64_t>& perm = f.perm;
  const std::vector<double>& added = f.added;
  const float* U = f.U.data();

  std::vector<float> Wk(W, W + rows * cols);
  for (int64_t i = 0; i < cols; ++i)
    if (f.dead[i])
      for (int64_t j = 0; j < rows; ++j) Wk[j * cols + i] = 0.0f;

  QMatrix q = make_affine(rows, cols, bits, G);
  const int64_t L = q.n_groups();
  float* const scales = q.scales.writable();
  float* const offsets = q.offsets.writable();
  if (opt.static_groups) {
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t g = 0; g < L; ++g) {
        const int64_t i0 = g * G, n = std::min(cols, i0 + G) - i0;
        const AffineParams p = affine_params(Wk.data() + j * cols + i0, n, 1, bits, opt.sym);
        scales[j * L + g] = p.scale;
        offsets[j * L + g] = p.offset;
      }
  }
  const bool dynamic_groups_permuted = opt.act_order && !opt.static_groups;
  if (dynamic_groups_permuted) {
    q.g_idx.resize(static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c) q.g_idx[perm[c]] = static_cast<int32_t>(c / G);
  }

  // Work in the sweep order: Wp[j, c] = W[j, perm[c]].
  std::vector<float> Wp(static_cast<size_t>(rows * cols));
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < cols; ++c) Wp[j * cols + c] = Wk[j * cols + perm[c]];

  // The error is measured on the undamped H: H' = U^-1 U^-T differs from it on the diagonal only.
  double signal = 0.0;  // tr(W H W^T) = ||W U^-1||^2 - sum_c added_c ||W[:, c]||^2
  {
    std::vector<float> WUinv = Wp;
    cblas_strsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit,
                static_cast<int>(rows), static_cast<int>(cols), 1.0f, U, static_cast<int>(cols),
                WUinv.data(), static_cast<int>(cols));
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t c = 0; c < cols; ++c) {
        const double x = WUinv[j * cols + c], w = Wp[j * cols + c];
        signal += x * x - added[c] * w * w;
      }
  }

  const int64_t B = opt.static_groups ? opt.block : sweep_block(opt.block, G, cols);
  // Rows per task: enough that the lazy update is a GEMM, not a stream of U from memory.
  constexpr int64_t kRowChunk = 64;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  // The sweep's errors e satisfy W - Q = e U, so sum e^2 = tr((W - Q) H' (W - Q)^T).
  double noise = 0.0;
  ParallelErrors errors;  // a range no fp16 scale holds
#pragma omp parallel
  {
    std::vector<float> err(static_cast<size_t>(kRowChunk * B));
    std::vector<AffineParams> params(static_cast<size_t>(kRowChunk));
#pragma omp for schedule(dynamic) reduction(+ : noise)
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk)
      errors.capture([&] {
        const int64_t R = std::min(kRowChunk, rows - r0);
        for (int64_t b0 = 0; b0 < cols; b0 += B) {
          const int64_t b1 = std::min(cols, b0 + B), bw = b1 - b0;
          for (int64_t c = b0; c < b1; ++c) {
            const int64_t g = opt.static_groups ? perm[c] / G : c / G;
            for (int64_t r = 0; r < R; ++r) {
              const int64_t j = r0 + r;
              if (opt.static_groups) {
                params[r] = {scales[j * L + g], offsets[j * L + g]};
              } else if (c % G == 0) {
                params[r] = affine_params(Wp.data() + j * cols + c, std::min(G, cols - c), 1, bits,
                                          opt.sym);
                scales[j * L + g] = params[r].scale;
                offsets[j * L + g] = params[r].offset;
              }
              float* wrow = Wp.data() + j * cols;
              const uint8_t code = affine_code(wrow[c], params[r], bits);
              codes[j * cols + perm[c]] = code;
              const float deq = params[r].scale * code + params[r].offset;
              const float e = (wrow[c] - deq) / U[c * cols + c];
              err[r * bw + (c - b0)] = e;
              const double d = Wk[j * cols + perm[c]] - deq;
              noise += static_cast<double>(e) * e - added[c] * d * d;
              const float* urow = U + c * cols;
              for (int64_t c2 = c + 1; c2 < b1; ++c2) wrow[c2] -= e * urow[c2];
            }
          }
          if (b1 < cols)  // lazy update of everything right of the block: W -= Err U[block, rest]
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(R),
                        static_cast<int>(cols - b1), static_cast<int>(bw), -1.0f, err.data(),
                        static_cast<int>(bw), U + b0 * cols + b1, static_cast<int>(cols), 1.0f,
                        Wp.data() + r0 * cols + b1, static_cast<int>(cols));
        }
      });
  }
  errors.rethrow();
  for (int64_t j = 0; j < rows; ++j) pack_row(codes.data() + j * cols, cols, bits, q.row_codes(j));
  q.compact_params();
  return {std::move(q), signal > 0.0 ? std::sqrt(std::max(0.0, noise) / signal) : 0.0};
}

GptqResult gptq_quantize(const float* W, int64_t rows, int64_t cols, const std::vector<double>& H,
                         const GptqOptions& options) {
  return gptq_quantize(W, rows, gptq_factor(H, cols, options), options);
}

}  // namespace qalora
