// Every CUDA op against its CPU reference on odd shapes: tails that are not a multiple of a
// warp, a block or a quantization group.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cuda/device_weights.h"
#include "cuda/kernels.h"
#include "cuda_test_util.h"
#include "qalora/adapters/lora.h"
#include "qalora/core/error.h"
#include "qalora/ops/gemm.h"
#include "qalora/ops/ops.h"
#include "qalora/quant/qmatrix.h"
#include "test_util.h"

namespace qalora {
namespace {

using test::expect_close;
using test::random_uniform;
using test::to_device;
using test::to_host;

TEST(CudaOps, RmsNormForwardAndBackward) {
  QL_REQUIRE_GPU();
  const int64_t T = 7, D = 1027;
  const auto x = random_uniform(T * D, 1, -2, 2), w = random_uniform(D, 2, 0.5f, 1.5f);
  const auto g = random_uniform(T * D, 3), dx0 = random_uniform(T * D, 4);
  std::vector<float> out(x.size()), dx = dx0;
  ops::rmsnorm_forward_ref(out.data(), x.data(), w.data(), T, D, 1e-5f);
  ops::rmsnorm_backward_ref(dx.data(), g.data(), x.data(), w.data(), T, D, 1e-5f);
  auto dX = to_device(x), dW = to_device(w), dG = to_device(g), dDx = to_device(dx0);
  cuda::DeviceBuffer<float> dOut(T * D);
  cuda::rmsnorm_forward(dOut.data(), dX.data(), dW.data(), T, D, 1e-5f);
  cuda::rmsnorm_backward(dDx.data(), dG.data(), dX.data(), dW.data(), T, D, 1e-5f);
  expect_close(to_host(dOut), out, 1e-5f, 1e-5f, "rmsnorm out");
  expect_close(to_host(dDx), dx, 1e-5f, 1e-4f, "rmsnorm dx");
}

// Two packed sequences: positions restart at 0 for the second.
TEST(CudaOps, RopeForwardAndBackwardAtPackedPositions) {
  QL_REQUIRE_GPU();
  const int64_t T = 9, H = 3, Hd = 14;
  const std::vector<int32_t> positions = {0, 1, 2, 3, 4, 0, 1, 2, 3};
  const std::vector<int64_t> positions64(positions.begin(), positions.end());
  const auto x = random_uniform(T * H * Hd, 5), cs = random_uniform(T * Hd / 2, 6),
             sn = random_uniform(T * Hd / 2, 7);
  std::vector<float> fwd = x, bwd = x;
  ops::rope_forward_at_ref(fwd.data(), T, H, Hd, positions64.data(), cs.data(), sn.data());
  ops::rope_backward_ref(bwd.data(), 5, H, Hd, 0, cs.data(), sn.data());
  ops::rope_backward_ref(bwd.data() + 5 * H * Hd, 4, H, Hd, 0, cs.data(), sn.data());
  auto dF = to_device(x), dB = to_device(x);
  const auto dC = to_device(cs), dS = to_device(sn);
  const auto dP = to_device(positions);
  cuda::rope_forward(dF.data(), T, H, Hd, dP.data(), dC.data(), dS.data());
  cuda::rope_backward(dB.data(), T, H, Hd, dP.data(), dC.data(), dS.data());
  expect_close(to_host(dF), fwd, 1e-6f, 1e-6f, "rope forward");
  expect_close(to_host(dB), bwd, 1e-6f, 1e-6f, "rope backward");
}

TEST(CudaOps, SwigluForwardAndBackwardWithAliasedGradient) {
  QL_REQUIRE_GPU();
  const int64_t N = 1000 + 3;
  const auto gate = random_uniform(N, 8, -6, 6), up = random_uniform(N, 9),
             d = random_uniform(N, 10);
  std::vector<float> out(N), dgate(N), dup(N);
  ops::swiglu_forward_ref(out.data(), gate.data(), up.data(), N);
  ops::swiglu_backward_ref(dgate.data(), dup.data(), d.data(), gate.data(), up.data(), N);
  auto dG = to_device(gate), dU = to_device(up), dD = to_device(d);
  cuda::DeviceBuffer<float> dOut(N), dUp(N);
  cuda::swiglu_forward(dOut.data(), dG.data(), dU.data(), N);
  cuda::swiglu_backward(dD.data(), dUp.data(), dD.data(), dG.data(), dU.data(), N);  // in place
  expect_close(to_host(dOut), out, 1e-6f, 1e-5f, "swiglu out");
  expect_close(to_host(dD), dgate, 1e-6f, 1e-5f, "swiglu dgate");
  expect_close(to_host(dUp), dup, 1e-6f, 1e-5f, "swiglu dup");
}

struct AttentionShape {
  int64_t T, H, KV, Hd;
  int64_t split;  // a second packed sequence starts at this row (0: one sequence)
};

class CudaAttention : public ::testing::TestWithParam<AttentionShape> {};

TEST_P(CudaAttention, ForwardAndBackwardMatchTheReference) {
  QL_REQUIRE_GPU();
  const auto [T, H, KV, Hd, split] = GetParam();
  const auto q = random_uniform(T * H * Hd, 11, -2, 2), k = random_uniform(T * KV * Hd, 12, -2, 2),
             v = random_uniform(T * KV * Hd, 13), dout = random_uniform(T * H * Hd, 14);
  std::vector<float> out(q.size()), probs(static_cast<size_t>(H * T * T));
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size()), scratch(probs.size());
  std::vector<int32_t> rows(static_cast<size_t>(2 * T));  // each row's sequence begin, end
  using Rows = std::vector<std::pair<int64_t, int64_t>>;
  for (const auto& [b, e] : split > 0 ? Rows{{0, split}, {split, T}} : Rows{{0, T}}) {
    const int64_t n = e - b, qo = b * H * Hd, ko = b * KV * Hd;
    ops::attention_train_forward_ref(out.data() + qo, probs.data(), q.data() + qo, k.data() + ko,
                                     v.data() + ko, n, H, KV, Hd);
    ops::attention_train_backward_ref(dq.data() + qo, dk.data() + ko, dv.data() + ko,
                                      dout.data() + qo, probs.data(), q.data() + qo, k.data() + ko,
                                      v.data() + ko, n, H, KV, Hd, scratch.data());
    for (int64_t t = b; t < e; ++t)
      rows[static_cast<size_t>(t)] = static_cast<int32_t>(b),
      rows[static_cast<size_t>(T + t)] = static_cast<int32_t>(e);
  }
  const auto dQ = to_device(q), dK = to_device(k), dV = to_device(v), dDout = to_device(dout);
  const auto dRows = to_device(rows);
  cuda::DeviceBuffer<float> dOut(T * H * Hd), lse(H * T), delta(H * T);
  cuda::DeviceBuffer<float> gq(T * H * Hd), gk(T * KV * Hd), gv(T * KV * Hd);
  cuda::attention_forward(dOut.data(), lse.data(), dQ.data(), dK.data(), dV.data(), dRows.data(), T,
                          H, KV, Hd);
  cuda::attention_backward(gq.data(), gk.data(), gv.data(), delta.data(), dDout.data(), dOut.data(),
                           lse.data(), dQ.data(), dK.data(), dV.data(), dRows.data(),
                           dRows.data() + T, T, H, KV, Hd);
  expect_close(to_host(dOut), out, 1e-5f, 1e-4f, "attention out");
  expect_close(to_host(gq), dq, 1e-4f, 1e-3f, "attention dq");
  expect_close(to_host(gk), dk, 1e-4f, 1e-3f, "attention dk");
  expect_close(to_host(gv), dv, 1e-4f, 1e-3f, "attention dv");
}

// Head dims below, at and above a warp (lanes holding 1 to 5 elements, with tails),
// sequences that are not a multiple of the block's warps, and two sequences packed (17 + 28).
INSTANTIATE_TEST_SUITE_P(Shapes, CudaAttention,
                         ::testing::Values(AttentionShape{1, 2, 1, 8, 0},
                                           AttentionShape{37, 6, 2, 40, 0},
                                           AttentionShape{70, 4, 4, 64, 0},
                                           AttentionShape{33, 8, 2, 130, 0},
                                           AttentionShape{45, 6, 3, 40, 17}),
                         [](const auto& param_info) {
                           const AttentionShape& a = param_info.param;
                           return cat("T", a.T, "_H", a.H, "_KV", a.KV, "_Hd", a.Hd,
                                      a.split > 0 ? cat("_split", a.split) : "");
                         });

TEST(CudaOps, CrossEntropyWithIgnoredTokens) {
  QL_REQUIRE_GPU();
  const int64_t T = 5, V = 1001;
  const auto logits = random_uniform(T * V, 15, -8, 8);
  const std::vector<int32_t> targets = {3, -1, 1000, 0, 517};
  std::vector<float> grad = logits, losses(T);
  const double total = ops::cross_entropy_forward_backward_ref(grad.data(), losses.data(),
                                                               targets.data(), T, V, 0.25f);
  auto dL = to_device(logits);
  const auto dT = to_device(targets);
  cuda::DeviceBuffer<float> dLoss(T);
  cuda::cross_entropy(dL.data(), dLoss.data(), dT.data(), T, V, 0.25f);
  const std::vector<float> got = to_host(dLoss);
  expect_close(got, losses, 1e-5f, 1e-5f, "losses");
  double sum = 0;
  for (float l : got) sum += l;
  EXPECT_NEAR(sum, total, 1e-4 * total);
  expect_close(to_host(dL), grad, 1e-7f, 1e-4f, "logit gradients");
}

TEST(CudaOps, GroupPoolingWithARaggedLastGroup) {
  QL_REQUIRE_GPU();
  const int64_t T = 3, I = 100, G = 32, L = 4;
  for (AdapterPool pool : {AdapterPool::Average, AdapterPool::Sum}) {
    const bool avg = pool == AdapterPool::Average;
    const auto x = random_uniform(T * I, 16), d = random_uniform(T * L, 17),
               dx0 = random_uniform(T * I, 18);
    std::vector<float> out(T * L), dx = dx0;
    pool_groups_forward_ref(out.data(), x.data(), T, I, G, pool);
    pool_groups_backward_ref(dx.data(), d.data(), T, I, G, pool);
    auto dX = to_device(x), dD = to_device(d), dDx = to_device(dx0);
    cuda::DeviceBuffer<float> dOut(T * L);
    cuda::pool_groups_forward(dOut.data(), dX.data(), T, I, G, avg);
    cuda::pool_groups_backward(dDx.data(), dD.data(), T, I, G, avg);
    expect_close(to_host(dOut), out, 1e-6f, 1e-6f, avg ? "avg pool" : "sum pool");
    expect_close(to_host(dDx), dx, 1e-6f, 1e-6f, avg ? "avg pool backward" : "sum pool backward");
  }
}

TEST(CudaOps, DropoutDrawsTheCpuMask) {
  QL_REQUIRE_GPU();
  const int64_t T = 5, C = 67;
  const auto x = random_uniform(T * C, 19);
  std::vector<float> cpu = x;
  dropout_forward(cpu.data(), T, C, 0.3f, 4242);
  auto dX = to_device(x);
  cuda::dropout_forward(dX.data(), T, C, 0.3f, 4242);
  EXPECT_EQ(to_host(dX), cpu);
}

// Random codes and group parameters for a matrix of the given layout.
QMatrix random_qmatrix(QuantType type, int bits, int64_t rows, int64_t cols, int64_t G,
                       bool with_g_idx, uint64_t seed) {
  QMatrix w = type == QuantType::Affine ? make_affine(rows, cols, bits, G)
                                        : make_codebook(type, rows, cols);
  const auto u = random_uniform(rows * cols, seed, 0, 1);
  std::vector<uint8_t> codes(static_cast<size_t>(cols));
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t i = 0; i < cols; ++i)
      codes[static_cast<size_t>(i)] = static_cast<uint8_t>(
          u[static_cast<size_t>(j * cols + i)] * static_cast<float>((1 << w.bits) - 1) + 0.5f);
    pack_row(codes.data(), cols, w.bits, w.row_codes(j));
  }
  if (type == QuantType::Affine) {
    if (with_g_idx) {  // act-order: columns in a scattered group order
      w.g_idx.resize(static_cast<size_t>(cols));
      for (int64_t i = 0; i < cols; ++i)
        w.g_idx[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7) % w.n_groups());
    }
    w.scales = random_uniform(static_cast<int64_t>(w.scales.size()), seed + 1, 0.01f, 0.1f);
    w.offsets = random_uniform(static_cast<int64_t>(w.offsets.size()), seed + 2, -0.5f, 0.5f);
  } else {
    w.absmax = random_uniform(w.n_blocks(), seed + 1, 0.1f, 2.0f);
  }
  return w;
}

TEST(CudaOps, DequantizeToBf16EqualsTheCpuDefinition) {
  QL_REQUIRE_GPU();
  struct Layout {
    QuantType type;
    int bits;
    int64_t G;
    bool g_idx;
  };
  for (const Layout& l :
       {Layout{QuantType::Affine, 2, 32, false}, Layout{QuantType::Affine, 3, 32, false},
        Layout{QuantType::Affine, 4, 32, false}, Layout{QuantType::Affine, 4, 100, false},
        Layout{QuantType::Affine, 8, 48, false}, Layout{QuantType::Affine, 4, 32, true},
        Layout{QuantType::NF4, 4, 64, false}, Layout{QuantType::FP4, 4, 64, false}}) {
    const int64_t rows = 7, cols = 100;  // not a multiple of the 32-column chunk
    const QMatrix w = random_qmatrix(l.type, l.bits, rows, cols, l.G, l.g_idx, 20 + l.bits);
    std::vector<float> f32(static_cast<size_t>(rows * cols));
    dequantize_rows_ref(w, 0, rows, f32.data());
    std::vector<uint16_t> expected(f32.size());
    ops::to_bf16_ref(f32.data(), rows, cols, cols, expected.data());
    const cuda::DeviceQMatrix d(w);
    cuda::DeviceBuffer<uint16_t> out(rows * cols);
    cuda::dequantize_bf16(d.view, out.data());
    EXPECT_EQ(to_host(out), expected) << quant_type_name(l.type) << " " << l.bits << " bits, G "
                                      << l.G << (l.g_idx ? " with g_idx" : "");
  }
}

TEST(CudaOps, GemmsMatchTheReferenceForEveryTranspose) {
  QL_REQUIRE_GPU();
  cuda::Blas blas;
  const int64_t M = 37, N = 61, K = 129;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
      const auto a = random_uniform((ta ? K : M) * lda, 30),
                 b = random_uniform((tb ? N : K) * ldb, 31);
      const auto c0 = random_uniform(M * ldc, 32);
      std::vector<uint16_t> a16(a.size()), b16(b.size());
      ops::to_bf16_ref(a.data(), 1, static_cast<int64_t>(a.size()), 0, a16.data());
      ops::to_bf16_ref(b.data(), 1, static_cast<int64_t>(b.size()), 0, b16.data());
      std::vector<float> ref = c0;
      ops::gemm_bf16_ref(ta, tb, M, N, K, 0.5f, a16.data(), lda, b16.data(), ldb, 1.0f, ref.data(),
                         ldc);
      const auto dA = to_device(a16), dB = to_device(b16);
      auto dC = to_device(c0);
      blas.gemm_bf16(ta, tb, M, N, K, 0.5f, dA.data(), lda, dB.data(), ldb, 1.0f, dC.data(), ldc);
      expect_close(to_host(dC), ref, 1e-4f, 1e-4f, "gemm_bf16");

      std::vector<float> sref = c0;
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          double s = 0;
          for (int64_t k = 0; k < K; ++k)
            s += static_cast<double>(ta ? a[k * lda + i] : a[i * lda + k]) *
                 (tb ? b[j * ldb + k] : b[k * ldb + j]);
          sref[i * ldc + j] = static_cast<float>(0.5 * s + sref[i * ldc + j]);
        }
      auto fA = to_device(a), fB = to_device(b), fC = to_device(c0);
      blas.sgemm(ta, tb, M, N, K, 0.5f, fA.data(), lda, fB.data(), ldb, 1.0f, fC.data(), ldc);
      expect_close(to_host(fC), sref, 1e-4f, 1e-4f, "sgemm");
      // TF32: 10-bit mantissas, so about 2^-11 of each |a b|, summed over K = 129 terms.
      auto tC = to_device(c0);
      blas.sgemm(ta, tb, M, N, K, 0.5f, fA.data(), lda, fB.data(), ldb, 1.0f, tC.data(), ldc,
                 cuda::Blas::Fp32Math::Tf32);
      expect_close(to_host(tC), sref, 2e-2f, 1e-3f, "sgemm tf32");
    }
}

}  // namespace
}  // namespace qalora
