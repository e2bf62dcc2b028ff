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
// LAPACK (shipped inside OpenBLAS): Cholesky factorisation and inverse from it, column-major.
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info);
void dpotri_(const char* uplo, const int* n, double* a, const int* lda, int* info);
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
  std::vector<double> H(upper_.size());
  const double scale = 2.0 / static_cast<double>(n_);
  for (int64_t i = 0; i < cols_; ++i)
    for (int64_t j = i; j < cols_; ++j)
      H[i * cols_ + j] = H[j * cols_ + i] = scale * upper_[i * cols_ + j];
  return H;
}

namespace {

// In place: A (symmetric positive definite, n x n) becomes U, upper triangular row-major, with
// A^-1 = U^T U. A column-major lower factor read row-major is exactly that upper factor.
bool inverse_upper_cholesky(std::vector<double>& A, int n) {
  const char lower = 'L';
  int info = 0;
  dpotrf_(&lower, &n, A.data(), &n, &info);
  if (info != 0) return false;
  dpotri_(&lower, &n, A.data(), &n, &info);
  if (info != 0) return false;
  for (int i = 0; i < n; ++i)
    for (int j = i + 1; j < n; ++j) A[j * n + i] = A[i * n + j];
  dpotrf_(&lower, &n, A.data(), &n, &info);
  if (info != 0) return false;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) A[i * n + j] = 0.0;
  return true;
}

// Columns per lazy-update block: when every group start is also a block start (or lies inside
// the block that holds the whole group), group parameters see fully error-updated weights.
int64_t sweep_block(int64_t block, int64_t group, int64_t cols) {
  if (group >= cols || group % block == 0) return block;
  if (group < block) return group * (block / group);
  return group;
}

}  // namespace

std::vector<double> damped_inverse_cholesky(std::vector<double> H, int64_t n, double damp,
                                            double* lambda_used) {
  QL_CHECK(static_cast<int64_t>(H.size()) == n * n, "Hessian has ", H.size(), " entries, expected ",
           n * n);
  double mean_diag = 0.0;
  for (int64_t a = 0; a < n; ++a) mean_diag += H[a * n + a];
  mean_diag /= static_cast<double>(n);
  // A Hessian that still is not positive definite gets 10x more damping, a few times.
  for (int attempt = 0;; ++attempt) {
    std::vector<double> U = H;
    const double lambda = damp * mean_diag;
    for (int64_t a = 0; a < n; ++a) U[a * n + a] += lambda;
    if (inverse_upper_cholesky(U, static_cast<int>(n))) {
      if (lambda_used) *lambda_used = lambda;
      return U;
    }
    QL_CHECK(attempt < 4, "GPTQ: the Hessian of a layer with ", n,
             " inputs is not positive definite even with damp ", damp,
             " (too few calibration tokens?)");
    damp *= 10.0;
  }
}

GptqResult gptq_quantize(const float* W, int64_t rows, int64_t cols, std::vector<double> H,
                         const GptqOptions& opt) {
  QL_CHECK(opt.bits == 2 || opt.bits == 3 || opt.bits == 4 || opt.bits == 8, "GPTQ: bits is ",
           opt.bits, ", expected 2, 3, 4 or 8");
  QL_CHECK(!opt.static_groups || opt.act_order, "GPTQ: static groups only apply with act-order");
  QL_CHECK(opt.damp > 0.0 && opt.damp < 1.0, "GPTQ: damp is ", opt.damp, ", expected in (0, 1)");
  QL_CHECK(static_cast<int64_t>(H.size()) == cols * cols, "GPTQ: Hessian has ", H.size(),
           " entries, expected ", cols * cols);
  const int64_t G = resolve_group_size(opt.group_size, cols);
  const int bits = opt.bits;

  std::vector<float> Wk(W, W + rows * cols);
  std::vector<uint8_t> dead(static_cast<size_t>(cols), 0);
  for (int64_t i = 0; i < cols; ++i) {
    if (H[i * cols + i] != 0.0) continue;
    // A column no calibration input ever reached: its weight cannot matter, quantize it as 0.
    H[i * cols + i] = 1.0;
    dead[i] = 1;
    for (int64_t j = 0; j < rows; ++j) Wk[j * cols + i] = 0.0f;
  }

  QMatrix q = make_affine(rows, cols, bits, G);
  const int64_t L = q.n_groups();
  if (opt.static_groups) {
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t g = 0; g < L; ++g) {
        const int64_t i0 = g * G, n = std::min(cols, i0 + G) - i0;
        const AffineParams p = affine_params(Wk.data() + j * cols + i0, n, 1, bits, opt.sym);
        q.scales[j * L + g] = p.scale;
        q.offsets[j * L + g] = p.offset;
      }
  }

  std::vector<int64_t> perm(static_cast<size_t>(cols));
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order)
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return H[a * cols + a] > H[b * cols + b]; });
  const bool dynamic_groups_permuted = opt.act_order && !opt.static_groups;
  if (dynamic_groups_permuted) {
    q.g_idx.resize(static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c) q.g_idx[perm[c]] = static_cast<int32_t>(c / G);
  }

  // Work in the sweep order: Wp[j, c] = W[j, perm[c]], Hp = H[perm, perm].
  std::vector<float> Wp(static_cast<size_t>(rows * cols));
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < cols; ++c) Wp[j * cols + c] = Wk[j * cols + perm[c]];
  std::vector<double> Hp(H.size());
  for (int64_t a = 0; a < cols; ++a)
    for (int64_t b = 0; b < cols; ++b) Hp[a * cols + b] = H[perm[a] * cols + perm[b]];
  double lambda = 0;
  const std::vector<double> U = damped_inverse_cholesky(std::move(Hp), cols, opt.damp, &lambda);
  const std::vector<float> Uf(U.begin(), U.end());

  // The error is measured on the undamped H: H' = U^-1 U^-T differs from it on the diagonal only.
  std::vector<double> added(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) added[c] = lambda + (dead[perm[c]] ? 1.0 : 0.0);
  double signal = 0.0;  // tr(W H W^T) = ||W U^-1||^2 - sum_c added_c ||W[:, c]||^2
  {
    std::vector<float> WUinv = Wp;
    cblas_strsm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit,
                static_cast<int>(rows), static_cast<int>(cols), 1.0f, Uf.data(),
                static_cast<int>(cols), WUinv.data(), static_cast<int>(cols));
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t c = 0; c < cols; ++c) {
        const double x = WUinv[j * cols + c], w = Wp[j * cols + c];
        signal += x * x - added[c] * w * w;
      }
  }

  const int64_t B = opt.static_groups ? opt.block : sweep_block(opt.block, G, cols);
  constexpr int64_t kRowChunk = 16;
  std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
  // The sweep's errors e satisfy W - Q = e U, so sum e^2 = tr((W - Q) H' (W - Q)^T).
  double noise = 0.0;
#pragma omp parallel
  {
    std::vector<float> err(static_cast<size_t>(kRowChunk * B));
    std::vector<AffineParams> params(static_cast<size_t>(kRowChunk));
#pragma omp for schedule(dynamic) reduction(+ : noise)
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
      const int64_t R = std::min(kRowChunk, rows - r0);
      for (int64_t b0 = 0; b0 < cols; b0 += B) {
        const int64_t b1 = std::min(cols, b0 + B), bw = b1 - b0;
        for (int64_t c = b0; c < b1; ++c) {
          const int64_t g = opt.static_groups ? perm[c] / G : c / G;
          for (int64_t r = 0; r < R; ++r) {
            const int64_t j = r0 + r;
            if (opt.static_groups) {
              params[r] = {q.scales[j * L + g], q.offsets[j * L + g]};
            } else if (c % G == 0) {
              params[r] = affine_params(Wp.data() + j * cols + c, std::min(G, cols - c), 1, bits,
                                        opt.sym);
              q.scales[j * L + g] = params[r].scale;
              q.offsets[j * L + g] = params[r].offset;
            }
            float* wrow = Wp.data() + j * cols;
            const uint8_t code = affine_code(wrow[c], params[r], bits);
            codes[j * cols + perm[c]] = code;
            const float deq = params[r].scale * code + params[r].offset;
            const float e = (wrow[c] - deq) / Uf[c * cols + c];
            err[r * bw + (c - b0)] = e;
            const double d = Wk[j * cols + perm[c]] - deq;
            noise += static_cast<double>(e) * e - added[c] * d * d;
            const float* urow = Uf.data() + c * cols;
            for (int64_t c2 = c + 1; c2 < b1; ++c2) wrow[c2] -= e * urow[c2];
          }
        }
        if (b1 < cols)  // lazy update of everything right of the block: W -= Err U[block, rest]
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(R),
                      static_cast<int>(cols - b1), static_cast<int>(bw), -1.0f, err.data(),
                      static_cast<int>(bw), Uf.data() + b0 * cols + b1, static_cast<int>(cols),
                      1.0f, Wp.data() + r0 * cols + b1, static_cast<int>(cols));
      }
    }
  }
  for (int64_t j = 0; j < rows; ++j) pack_row(codes.data() + j * cols, cols, bits, q.row_codes(j));
  return {std::move(q), signal > 0.0 ? std::sqrt(std::max(0.0, noise) / signal) : 0.0};
}

}  // namespace qalora
