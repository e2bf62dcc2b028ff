// Kernel benchmarks. Every case reports GFLOP/s and its ratio to this machine's GEMM peak in the
// compute type it ran in: fp32 measured at start-up as the best of a few 2048^3 cblas_sgemm
// runs, bf16 (the attention cases with a second argument 1) as ops::gemm_peak_gflops measures
// it. The reference kernels are benchmarked beside the optimized ones so their speed-up can be
// read off directly.
//   build/bench_ops [--benchmark_filter=Linear]   (OMP_NUM_THREADS sets the threads)
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "qalora/ops/gemm.h"
#include "qalora/ops/ops.h"

namespace {

std::vector<float> random_vec(size_t n) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

double gemm_peak_gflops() {
  static const double peak = [] {
    const int n = 2048;
    auto a = random_vec(size_t{n} * n), b = random_vec(size_t{n} * n),
         c = random_vec(size_t{n} * n);
    double best = 0;
    for (int rep = 0; rep < 4; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(),
                  n, 0.0f, c.data(), n);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 2.0 * n * n * n / s / 1e9);
    }
    std::fprintf(stderr, "fp32 GEMM peak (2048^3 sgemm): %.1f GFLOP/s\n", best);
    return best;
  }();
  return peak;
}

void report(benchmark::State& state, double flops_per_iter) {
  const double gflops = flops_per_iter * static_cast<double>(state.iterations()) / 1e9;
  state.counters["GFLOPS"] = benchmark::Counter(gflops, benchmark::Counter::kIsRate);
  // A rate counter divides by the elapsed time, so this reads as the fraction of peak reached:
  // the peak of the compute type the case ran in.
  static const double bf16_peak =
      qalora::ops::bf16_available() ? qalora::ops::gemm_peak_gflops(qalora::ops::ComputeType::Bf16)
                                    : 0.0;
  const bool bf16 = qalora::ops::compute_type() == qalora::ops::ComputeType::Bf16;
  state.counters["of_peak"] = benchmark::Counter(gflops / (bf16 ? bf16_peak : gemm_peak_gflops()),
                                                 benchmark::Counter::kIsRate);
}

// Sets the process's compute type for one benchmark (bf16 when asked and available; a bf16 case
// is skipped where it is not) and puts fp32 back after it.
class ComputeScope {
 public:
  ComputeScope(benchmark::State& state, bool bf16) {
    if (bf16 && !qalora::ops::bf16_available()) {
      state.SkipWithError("bf16 not available on this CPU or build");
      return;
    }
    qalora::ops::set_compute_type(bf16 ? qalora::ops::ComputeType::Bf16
                                       : qalora::ops::ComputeType::Fp32);
  }
  ~ComputeScope() { qalora::ops::set_compute_type(qalora::ops::ComputeType::Fp32); }
  ComputeScope(const ComputeScope&) = delete;
  ComputeScope& operator=(const ComputeScope&) = delete;
};

// Linear layer y[T, O] = x[T, I] W[O, I]^T at the shapes of SmolLM2-135M (T prompt tokens).
template <bool kReference>
void BM_Linear(benchmark::State& state) {
  const int64_t T = state.range(0), I = state.range(1), O = state.range(2);
  auto x = random_vec(static_cast<size_t>(T * I)), W = random_vec(static_cast<size_t>(O * I));
  std::vector<float> y(static_cast<size_t>(T * O));
  for (auto _ : state) {
    if constexpr (kReference) {
      qalora::ops::matmul_forward_ref(y.data(), x.data(), W.data(), nullptr, T, I, O);
    } else {
      qalora::ops::matmul_forward(y.data(), x.data(), W.data(), nullptr, T, I, O);
    }
    benchmark::DoNotOptimize(y.data());
  }
  report(state, 2.0 * static_cast<double>(T * I * O));
}

void linear_shapes(benchmark::internal::Benchmark* b) {
  for (int64_t T : {1, 256}) {
    b->Args({T, 576, 576});   // q, o
    b->Args({T, 576, 192});   // k, v
    b->Args({T, 576, 1536});  // gate, up
    b->Args({T, 1536, 576});  // down
  }
}
BENCHMARK(BM_Linear<false>)
    ->Name("Linear/blas")
    ->Apply(linear_shapes)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Linear<true>)
    ->Name("Linear/reference")
    ->Args({16, 576, 576})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Linear<false>)
    ->Name("Linear/blas")
    ->Args({16, 576, 576})
    ->Unit(benchmark::kMicrosecond);

template <bool kReference>
void BM_Attention(benchmark::State& state) {
  const int64_t T = state.range(0), H = 9, KV = 3, Hd = 64, stride = 1024;
  auto q = random_vec(static_cast<size_t>(T * H * Hd));
  auto k = random_vec(static_cast<size_t>(KV * stride * Hd)), v = k;
  std::vector<float> out(q.size());
  for (auto _ : state) {
    if constexpr (kReference) {
      qalora::ops::attention_forward_ref(out.data(), q.data(), k.data(), v.data(), T, 0, H, KV, Hd,
                                         stride);
    } else {
      qalora::ops::attention_forward(out.data(), q.data(), k.data(), v.data(), T, 0, H, KV, Hd,
                                     stride);
    }
    benchmark::DoNotOptimize(out.data());
  }
  // QK^T and PV over the causal triangle (counting the full square, as BLAS computes it).
  report(state, 4.0 * static_cast<double>(H * T * T * Hd));
}
BENCHMARK(BM_Attention<false>)
    ->Name("Attention/optimized")
    ->Arg(64)
    ->Arg(512)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Attention<true>)->Name("Attention/reference")->Arg(64)->Unit(benchmark::kMicrosecond);

// Training attention over one whole sequence at SmolLM2-135M's head shapes: the forward that
// saves the probabilities, and the backward. FLOPs count the causal triangle, the work actually
// needed (the kernels skip the blocks above the diagonal): QK^T and PV forward; dO V^T, dS K,
// dS^T Q and P^T dO backward.
// Arg 1 picks the compute type: 0 fp32, 1 bf16 (skipped where the CPU or build lacks it).
template <bool kReference, bool kBackward>
void BM_AttentionTrain(benchmark::State& state) {
  const int64_t T = state.range(0), H = 9, KV = 3, Hd = 64;
  const ComputeScope compute(state, state.range(1) != 0);
  if (state.error_occurred()) return;
  auto q = random_vec(static_cast<size_t>(T * H * Hd)), dout = q;
  auto k = random_vec(static_cast<size_t>(T * KV * Hd)), v = k;
  std::vector<float> out(q.size()), probs(static_cast<size_t>(H * T * T)), dq(q.size()),
      dk(k.size()), dv(v.size()),
      scratch(static_cast<size_t>(qalora::ops::attention_backward_scratch(T, H)));
  const auto forward =
      kReference ? qalora::ops::attention_train_forward_ref : qalora::ops::attention_train_forward;
  const auto backward = kReference ? qalora::ops::attention_train_backward_ref
                                   : qalora::ops::attention_train_backward;
  forward(out.data(), probs.data(), q.data(), k.data(), v.data(), T, H, KV, Hd);
  for (auto _ : state) {
    if constexpr (kBackward) {
      backward(dq.data(), dk.data(), dv.data(), dout.data(), probs.data(), q.data(), k.data(),
               v.data(), T, H, KV, Hd, scratch.data());
      benchmark::DoNotOptimize(dv.data());
    } else {
      forward(out.data(), probs.data(), q.data(), k.data(), v.data(), T, H, KV, Hd);
      benchmark::DoNotOptimize(out.data());
    }
  }
  const double products = kBackward ? 4.0 : 2.0;
  report(state, products * static_cast<double>(H * Hd * T * (T + 1)));  // 2 T(T+1)/2 Hd each
}
BENCHMARK(BM_AttentionTrain<false, false>)
    ->Name("AttentionTrain/forward")
    ->ArgsProduct({{64, 512}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_AttentionTrain<false, true>)
    ->Name("AttentionTrain/backward")
    ->ArgsProduct({{64, 512}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_AttentionTrain<true, false>)
    ->Name("AttentionTrain/forward_reference")
    ->Args({64, 0})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_AttentionTrain<true, true>)
    ->Name("AttentionTrain/backward_reference")
    ->Args({64, 0})
    ->Unit(benchmark::kMicrosecond);

// dx[T, I] = dy[T, O] W[O, I], the input gradient of a linear layer, at the shapes of BM_Linear.
void BM_MatmulBackwardInput(benchmark::State& state) {
  const int64_t T = state.range(0), I = state.range(1), O = state.range(2);
  auto dy = random_vec(static_cast<size_t>(T * O)), W = random_vec(static_cast<size_t>(O * I));
  std::vector<float> dx(static_cast<size_t>(T * I));
  for (auto _ : state) {
    qalora::ops::matmul_backward_input(dx.data(), dy.data(), W.data(), T, I, O);
    benchmark::DoNotOptimize(dx.data());
  }
  report(state, 2.0 * static_cast<double>(T * I * O));
}
BENCHMARK(BM_MatmulBackwardInput)
    ->Name("MatmulBackwardInput/blas")
    ->Apply(linear_shapes)
    ->Unit(benchmark::kMicrosecond);

// Cross-entropy forward and backward over a chunk of T tokens and SmolLM2's 49152-entry
// vocabulary. No GEMM, so no fraction of peak: GBps counts the logits read and the gradient
// written. Each iteration runs on the previous one's output, which is just as valid logits.
template <bool kReference>
void BM_CrossEntropy(benchmark::State& state) {
  const int64_t T = state.range(0), V = 49152;
  auto logits = random_vec(static_cast<size_t>(T * V));
  for (auto& x : logits) x *= 8.0f;
  std::vector<float> losses(static_cast<size_t>(T));
  std::vector<int32_t> targets(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) targets[t] = static_cast<int32_t>((t * 7919) % V);
  const auto fn = kReference ? qalora::ops::cross_entropy_forward_backward_ref
                             : qalora::ops::cross_entropy_forward_backward;
  for (auto _ : state) {
    benchmark::DoNotOptimize(fn(logits.data(), losses.data(), targets.data(), T, V, 1.0f));
  }
  state.counters["GBps"] = benchmark::Counter(
      2.0 * 4.0 * static_cast<double>(T * V) * static_cast<double>(state.iterations()) / 1e9,
      benchmark::Counter::kIsRate);
}
BENCHMARK(BM_CrossEntropy<false>)
    ->Name("CrossEntropy/optimized")
    ->Arg(64)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CrossEntropy<true>)
    ->Name("CrossEntropy/reference")
    ->Arg(64)
    ->Unit(benchmark::kMicrosecond);

// One decode step's attention over all 30 layers of SmolLM2 with `pos` cached positions: the
// caches (17 MB at pos 384) cycle as in a real step, so keys and values come from memory.
// GBps: K and V bytes read per second.
void BM_AttentionDecode(benchmark::State& state) {
  const int64_t pos = state.range(0), layers = 30, H = 9, KV = 3, Hd = 64, stride = pos + 1;
  auto q = random_vec(static_cast<size_t>(H * Hd));
  auto k = random_vec(static_cast<size_t>(layers * KV * stride * Hd)), v = k;
  std::vector<float> out(q.size());
  for (auto _ : state)
    for (int64_t l = 0; l < layers; ++l) {
      const size_t off = static_cast<size_t>(l * KV * stride * Hd);
      qalora::ops::attention_forward(out.data(), q.data(), k.data() + off, v.data() + off, 1, pos,
                                     H, KV, Hd, stride);
      benchmark::DoNotOptimize(out.data());
    }
  state.counters["GBps"] =
      benchmark::Counter(2.0 * 4.0 * static_cast<double>(layers * KV * (pos + 1) * Hd) *
                             static_cast<double>(state.iterations()) / 1e9,
                         benchmark::Counter::kIsRate);
}
BENCHMARK(BM_AttentionDecode)
    ->Name("AttentionDecode/30_layers")
    ->Arg(384)
    ->Arg(1024)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
