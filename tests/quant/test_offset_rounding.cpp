// Offsets onto fp16 / GPTQ zero points: the grids, the error feedback against a plain OBQ
// reference that inverts the remaining Hessian at every step, the pooled Hessians against
// activations computed by hand, and a merged QA-LoRA model stored closer to itself than by
// rounding each offset to its nearest value.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "export/export_test_util.h"
#include "model/random_model.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/ops/ops.h"
#include "qalora/quant/offset_rounding.h"
#include "qalora/quant/quantize_model.h"
#include "test_util.h"

namespace qalora {
namespace {

using OffsetKind = OffsetGrid::Kind;

TEST(OffsetGrid, NearestValues) {
  EXPECT_EQ(zero_point(-0.31f, 0.1f, 4, 0), 3);
  EXPECT_EQ(zero_point(-9.0f, 0.1f, 4, 0), 15) << "clamped to 2^bits - 1";
  EXPECT_EQ(zero_point(0.2f, 0.1f, 4, 0), 0);
  EXPECT_EQ(zero_point(0.2f, 0.1f, 4, 1), 1) << "v1 cannot store 0";
  EXPECT_EQ(zero_point(0.7f, 0.0f, 3, 0), 4) << "a zero scale decodes to 0 for any z";
  const OffsetGrid fp16{OffsetKind::Fp16};
  for (const float m : {0.1f, -1.2345678f, 3.0e-6f, 100.03f})
    EXPECT_EQ(fp16.nearest(m, 0.5f, 4), round_to_fp16(m));
  const OffsetGrid zeros{OffsetKind::ZeroPoints, 0};
  EXPECT_FLOAT_EQ(zeros.nearest(-0.31f, 0.1f, 4), -0.3f);
}

// A merged-looking affine matrix: fp16 scales, offsets -s z plus an fp32 shift per group.
QMatrix merged_matrix(int64_t rows, int64_t cols, int64_t group, uint64_t seed) {
  QMatrix q = make_affine(rows, cols, 4, group);
  const std::vector<float> s = test::random_uniform(std::ssize(q.scales), seed, 0.01f, 0.05f);
  const std::vector<float> shift = test::random_normal(std::ssize(q.offsets), seed + 1, 0.01f);
  float* const scales = q.scales.writable();
  float* const offsets = q.offsets.writable();
  for (size_t g = 0; g < s.size(); ++g) {
    scales[g] = round_to_fp16(s[g]);
    offsets[g] = -scales[g] * static_cast<float>(3 + g % 9) + shift[g];
  }
  return q;
}

// 2/n sum p p^T of group sums whose inputs share a common component, as real activations do.
std::vector<double> correlated_hessian(int64_t L, uint64_t seed) {
  const int64_t n = 64 * L;
  const std::vector<float> common = test::random_normal(n, seed);
  const std::vector<float> own = test::random_normal(n * L, seed + 1);
  std::vector<double> H(static_cast<size_t>(L * L), 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t a = 0; a < L; ++a)
      for (int64_t b = 0; b < L; ++b)
        H[a * L + b] += 2.0 / static_cast<double>(n) * (3.0 * common[t] + own[t * L + a]) *
                        (3.0 * common[t] + own[t * L + b]);
  return H;
}

double output_error(const QMatrix& before, const QMatrix& after, const std::vector<double>& H) {
  const int64_t L = before.n_groups();
  double sum = 0;
  for (int64_t j = 0; j < before.rows; ++j)
    for (int64_t a = 0; a < L; ++a)
      for (int64_t b = 0; b < L; ++b)
        sum += (static_cast<double>(after.offsets[j * L + a]) - before.offsets[j * L + a]) *
               H[a * L + b] *
               (static_cast<double>(after.offsets[j * L + b]) - before.offsets[j * L + b]);
  return sum;
}

// Optimal Brain Quantization as first written: after rounding group l, the groups still free
// (F) move by -(w_l - r) [H_F^-1]_{:,l} / [H_F^-1]_{ll}, with H_F^-1 the inverse of the damped
// Hessian restricted to F, recomputed by Gauss-Jordan elimination at every step.
std::vector<float> reference_rounding(const QMatrix& q, const OffsetGrid& grid,
                                      const std::vector<double>& H, double damp) {
  const int64_t L = q.n_groups();
  double mean_diag = 0;
  for (int64_t a = 0; a < L; ++a) mean_diag += H[a * L + a] / static_cast<double>(L);
  const std::vector<float> offsets = q.offsets.to_vector();
  std::vector<float> out(offsets.size());
  for (int64_t j = 0; j < q.rows; ++j) {
    std::vector<double> w(offsets.begin() + j * L, offsets.begin() + (j + 1) * L);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t n = L - l;  // F = {l, ..., L-1}
      std::vector<double> A(static_cast<size_t>(n * 2 * n), 0.0);
      for (int64_t a = 0; a < n; ++a) {
        for (int64_t b = 0; b < n; ++b) A[a * 2 * n + b] = H[(l + a) * L + l + b];
        A[a * 2 * n + a] += damp * mean_diag;
        A[a * 2 * n + n + a] = 1.0;
      }
      for (int64_t c = 0; c < n; ++c) {  // no pivoting: the matrix is positive definite
        const double p = A[c * 2 * n + c];
        for (int64_t k = 0; k < 2 * n; ++k) A[c * 2 * n + k] /= p;
        for (int64_t r = 0; r < n; ++r) {
          if (r == c) continue;
          const double f = A[r * 2 * n + c];
          for (int64_t k = 0; k < 2 * n; ++k) A[r * 2 * n + k] -= f * A[c * 2 * n + k];
        }
      }
      const auto inv = [&](int64_t a, int64_t b) { return A[a * 2 * n + n + b]; };
      const float r = grid.nearest(static_cast<float>(w[l]), q.scales[j * L + l], q.bits);
      out[j * L + l] = r;
      const double e = (w[l] - r) / inv(0, 0);
      for (int64_t a = 1; a < n; ++a) w[l + a] -= e * inv(a, 0);
    }
  }
  return out;
}

TEST(RoundOffsets, WithoutHessianEachGoesToItsNearestValue) {
  for (const OffsetGrid grid : {OffsetGrid{OffsetKind::Fp16}, OffsetGrid{OffsetKind::ZeroPoints, 1}}) {
    const QMatrix before = merged_matrix(9, 72, 16, 3);  // ragged: groups 16 x 4 and 8
    QMatrix q = before;
    OffsetRounding report;
    round_offsets(q, grid, nullptr, report);
    double max_dm = 0;
    for (int64_t g = 0; g < q.offsets.size(); ++g) {
      EXPECT_EQ(q.offsets[g], grid.nearest(before.offsets[g], before.scales[g], 4));
      max_dm = std::max(max_dm, std::abs(static_cast<double>(q.offsets[g]) - before.offsets[g]));
    }
    EXPECT_EQ(report.linears, 1);
    EXPECT_EQ(report.max_abs_dm, max_dm);
    EXPECT_GT(max_dm, 0.0);
    EXPECT_EQ(q.codes, before.codes);
    EXPECT_EQ(q.scales, before.scales);
  }
}

TEST(RoundOffsets, ErrorFeedbackMatchesThePlainReferenceAndBeatsNearest) {
  const double damp = 0.01;
  for (const OffsetGrid grid : {OffsetGrid{OffsetKind::Fp16}, OffsetGrid{OffsetKind::ZeroPoints, 0}}) {
    const QMatrix before = merged_matrix(40, 88, 8, 5);  // L = 11
    const std::vector<double> H = correlated_hessian(before.n_groups(), 6);
    QMatrix q = before;
    OffsetRounding report;
    round_offsets(q, grid, &H, report, damp);
    const std::vector<float> want = reference_rounding(before, grid, H, damp);
    int64_t same = 0;
    for (size_t g = 0; g < want.size(); ++g) {
      EXPECT_EQ(q.offsets[g], grid.nearest(q.offsets[g], q.scales[g], 4)) << "on the grid";
      same += q.offsets[g] == want[g];
    }
    // Rounding decisions may differ where a value lies within float noise of a tie.
    EXPECT_GE(same, std::ssize(want) * 99 / 100);

    QMatrix nearest = before;
    OffsetRounding plain;
    round_offsets(nearest, grid, nullptr, plain);
    const double fb = output_error(before, q, H), near = output_error(before, nearest, H);
    EXPECT_NEAR(report.output_error, fb, 1e-9 * near);
    EXPECT_NEAR(report.nearest_error, near, 1e-9 * near);
    EXPECT_LT(fb, 0.7 * near);
  }
}

TEST(RoundOffsets, RefusesWhatHasNoOffsets) {
  QMatrix q = merged_matrix(4, 32, 16, 7);
  OffsetRounding report;
  const std::vector<double> wrong(9, 1.0);
  EXPECT_THROW(round_offsets(q, {OffsetKind::Fp16}, &wrong, report), Error);
  q.g_idx.assign(32, 0);
  EXPECT_THROW(round_offsets(q, {OffsetKind::Fp16}, nullptr, report), Error);
}

Model quantized_random_model(uint64_t seed) {
  return test::quantized(test::make_random_model(test::ragged_shape(), seed), "rtn", 4, 16);
}

TEST(PooledInputHessians, MatchTheGroupSumsOfTheFirstLayersInputs) {
  const Model m = quantized_random_model(8);
  const std::vector<std::vector<int32_t>> windows = {{1, 4, 30, 7, 7, 12}, {0, 19, 3, 22}};
  const auto H = pooled_input_hessians(m, windows);
  ASSERT_EQ(std::ssize(H), m.config.n_layers * kNumTargets);

  // q/k/v of layer 0 see rmsnorm(embedding): computed here without the model's runtime.
  const int64_t D = m.config.dim, L = m.layers[0].q.qweight.n_groups(), G = 16;
  ASSERT_EQ(L, 3);  // 40 inputs: 16, 16, 8
  std::vector<double> want(static_cast<size_t>(L * L), 0.0);
  int64_t n = 0;
  std::vector<float> xn(static_cast<size_t>(D));
  for (const auto& w : windows)
    for (const int32_t token : w) {
      ops::rmsnorm_forward(xn.data(), m.tok_embeddings.row(token), m.layers[0].attn_norm.data(), 1,
                           D, m.config.norm_eps);
      std::vector<double> p(static_cast<size_t>(L), 0.0);
      for (int64_t i = 0; i < D; ++i) p[i / G] += xn[i];
      for (int64_t a = 0; a < L; ++a)
        for (int64_t b = 0; b < L; ++b) want[a * L + b] += p[a] * p[b];
      ++n;
    }
  for (const Target t : {Target::Q, Target::K, Target::V}) {
    const std::vector<double>& got = H[static_cast<size_t>(t)];
    ASSERT_EQ(std::ssize(got), L * L);
    for (int64_t i = 0; i < L * L; ++i)
      EXPECT_NEAR(got[i], 2.0 / static_cast<double>(n) * want[i], 1e-4 * std::abs(want[i]) + 1e-5);
  }
  for (const auto& h : H) EXPECT_FALSE(h.empty()) << "every linear is affine with groups";
}

TEST(RoundModelOffsets, AMergedModelStoredCloserToItselfThanByNearestRounding) {
  const Model base = quantized_random_model(9);
  AdapterConfig cfg;
  cfg.kind = AdapterKind::QaLora;
  cfg.rank = 4;
  AdapterSet set = create_adapters(base, cfg);
  test::randomize_adapter_b(set, 10);
  Model merged = base;
  merge_qalora(merged, set);
  std::vector<int32_t> text(120);
  for (size_t i = 0; i < text.size(); ++i) text[i] = static_cast<int32_t>((i * 11 + 5) % 31);
  std::vector<std::vector<int32_t>> windows;
  for (size_t at = 0; at < text.size(); at += 30)
    windows.emplace_back(text.begin() + static_cast<int64_t>(at), text.begin() + static_cast<int64_t>(at + 30));

  const OffsetGrid zeros{OffsetKind::ZeroPoints, 0};
  const auto all = [](const QMatrix&) { return true; };
  EXPECT_EQ(offsets_off_grid(base, {OffsetKind::Fp16}, all), 0) << "RTN stores fp16 offsets";
  EXPECT_EQ(offsets_off_grid(merged, zeros, all), 2 * kNumTargets);

  const auto H = pooled_input_hessians(merged, windows);
  Model feedback = merged, nearest = merged;
  const OffsetRounding r = round_model_offsets(feedback, zeros, &H, all);
  round_model_offsets(nearest, zeros, nullptr, all);
  EXPECT_EQ(r.linears, 2 * kNumTargets);
  EXPECT_LT(r.output_error, r.nearest_error);
  EXPECT_EQ(offsets_off_grid(feedback, zeros, all), 0);
  const MergeFidelity f = merge_fidelity(merged, nullptr, feedback, text, 30);
  const MergeFidelity g = merge_fidelity(merged, nullptr, nearest, text, 30);
  EXPECT_LT(f.mean_kl, g.mean_kl);
  EXPECT_GT(g.mean_kl, 0.0);
}

}  // namespace
}  // namespace qalora
