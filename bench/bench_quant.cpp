// Quantized-linear benchmarks at the SmolLM2-135M shapes.
//   Gemv/quant (decode, T = 1; exact:1 = fp32 activations where the ISA has an int8 GEMV):
//     each quantization against fp32 cblas_sgemv of the same shape,
//     run alternately in one loop so that a shared machine's load hits both alike. GBps is
//     the effective weight bandwidth: bytes of codes + parameters as held in memory (fp32
//     scales/offsets/absmax) per second; fp32_GBps the same for sgemv; x_fp32 the speed-up.
//   Prefill256/quant (T = 256): dequantize + sgemm against sgemm on the fp32 weight, also
//     interleaved; GFLOPS counts 2 T I O; of_sgemm is fp32 time / quantized time (1 = equal).
//   The counters of these two use each side's fastest call (see time_pair); Time is the mean.
//   GemvLayer7B/quant: decode through a 7B layer from memory against a pure read (of_read).
//   Dequantize: the non-BLAS part of prefill and backward, as GB/s of fp32 written.
//   build/bench/bench_quant [--benchmark_filter=Gemv]   (OMP_NUM_THREADS sets the threads;
//   QALORA_ISA=portable|avx2|avx512|avx512vnni forces the kernels' instruction set)
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "qalora/quant/qmatrix.h"
#include "qalora/quant/quantize.h"

namespace {

using qalora::QMatrix;
using qalora::QuantType;

std::vector<float> random_vec(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 0.05f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// The quantizations benchmarked (affine RTN bits_group, per-row INT8, NF4).
enum Kind : int64_t { kQ4g128, kQ3g128, kQ2g128, kQ8g128, kInt8, kNF4, kQ4g32 };
const char* kind_name(int64_t k) {
  static const char* names[] = {"q4_g128", "q3_g128", "q2_g128", "q8_g128",
                                "int8",    "nf4",     "q4_g32"};
  return names[k];
}

QMatrix quantized(int64_t kind, const std::vector<float>& W, int64_t O, int64_t I) {
  switch (kind) {
    case kQ4g128:
      return qalora::quantize_rtn(W.data(), O, I, 4, 128, false);
    case kQ3g128:
      return qalora::quantize_rtn(W.data(), O, I, 3, 128, false);
    case kQ2g128:
      return qalora::quantize_rtn(W.data(), O, I, 2, 128, false);
    case kQ8g128:
      return qalora::quantize_rtn(W.data(), O, I, 8, 128, false);
    case kInt8:
      return qalora::quantize_int8(W.data(), O, I);
    case kNF4:
      return qalora::quantize_codebook(QuantType::NF4, W.data(), O, I, false);
    default:
      return qalora::quantize_rtn(W.data(), O, I, 4, 32, false);
  }
}

// Bytes the kernels stream per call: codes plus the fp32 parameters they read.
double weight_bytes(const QMatrix& w) {
  return static_cast<double>(w.codes.size() +
                             4 * (w.scales.size() + w.offsets.size() + w.absmax.size()));
}

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Runs the fp32 call and the quantized call alternately each iteration, timing each, so a
// shared machine's changing load hits both alike; the benchmark's time is the quantized
// call's mean (manual time). Returns the fastest call of each, {fp32, quantized} seconds: on
// a loaded machine the minimum is the stable measure of the kernel itself.
template <typename Fp32, typename Quant>
std::pair<double, double> time_pair(benchmark::State& state, Fp32&& fp32, Quant&& quant) {
  double tf = 1e30, tq = 1e30;
  for (auto _ : state) {
    auto t0 = Clock::now();
    fp32();
    const double f = since(t0);
    t0 = Clock::now();
    quant();
    const double q = since(t0);
    tf = std::min(tf, f);
    tq = std::min(tq, q);
    state.SetIterationTime(q);
  }
  return {tf, tq};
}

void sgemm_nt(float* y, const float* x, const float* W, int64_t T, int64_t I, int64_t O) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(O),
              static_cast<int>(I), 1.0f, x, static_cast<int>(I), W, static_cast<int>(I), 0.0f, y,
              static_cast<int>(O));
}

void sgemv(float* y, const float* x, const float* W, int64_t I, int64_t O) {
  cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(O), static_cast<int>(I), 1.0f, W,
              static_cast<int>(I), x, 1, 0.0f, y, 1);
}

void BM_GemvFp32(benchmark::State& state) {
  const int64_t I = state.range(0), O = state.range(1);
  const auto W = random_vec(static_cast<size_t>(O * I), 1), x = random_vec(size_t(I), 2);
  std::vector<float> y(static_cast<size_t>(O));
  for (auto _ : state) {
    sgemv(y.data(), x.data(), W.data(), I, O);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GBps"] = benchmark::Counter(
      4.0 * static_cast<double>(O * I) * static_cast<double>(state.iterations()) / 1e9,
      benchmark::Counter::kIsRate);
}

// One decode step (T = 1) against sgemv on the fp32 weight of the same shape, interleaved.
// exact = 1: fp32 activations even where the ISA has an int8 GEMV.
void BM_GemvQuant(benchmark::State& state) {
  const int64_t kind = state.range(0), I = state.range(1), O = state.range(2);
  const bool exact = state.range(3) != 0;
  const auto activations =
      exact ? qalora::DecodeActivations::Exact : qalora::DecodeActivations::Int8;
  const auto W = random_vec(static_cast<size_t>(O * I), 1), x = random_vec(size_t(I), 2);
  const QMatrix w = quantized(kind, W, O, I);
  std::vector<float> y(static_cast<size_t>(O)), yf(y.size());
  const auto [tf, tq] = time_pair(
      state, [&] { sgemv(yf.data(), x.data(), W.data(), I, O); },
      [&] { qalora::qmatmul_forward(y.data(), x.data(), w, nullptr, 1, activations); });
  benchmark::DoNotOptimize(y.data());
  benchmark::DoNotOptimize(yf.data());
  state.SetLabel(std::string(kind_name(kind)) + " " + qalora::qkernel_isa() +
                 (exact ? " exact" : ""));
  state.counters["GBps"] = weight_bytes(w) / tq / 1e9;
  state.counters["fp32_GBps"] = 4.0 * static_cast<double>(O * I) / tf / 1e9;
  state.counters["x_fp32"] = tf / tq;  // speed-up over sgemv
}

void gemv_args(benchmark::internal::Benchmark* b) {
  for (auto [I, O] : {std::pair<int64_t, int64_t>{576, 1536}, {1536, 576}})
    for (int64_t kind : {kQ4g128, kQ4g32, kQ3g128, kQ2g128, kQ8g128, kInt8, kNF4}) {
      b->Args({kind, I, O, 0});
      // The layouts an int8 GEMV may take, once more with exact activations.
      if (kind != kQ3g128 && kind != kNF4) b->Args({kind, I, O, 1});
    }
}
BENCHMARK(BM_GemvFp32)
    ->Name("Gemv/fp32_sgemv")
    ->Args({576, 1536})
    ->Args({1536, 576})
    ->UseRealTime();
BENCHMARK(BM_GemvQuant)
    ->Name("Gemv/quant")
    ->ArgNames({"kind", "I", "O", "exact"})
    ->Apply(gemv_args)
    ->UseManualTime();

// Decode through one Llama-2-7B layer's seven linears (200M weights, 100+ MB quantized: far
// beyond the caches, so the GEMVs stream from memory as in a real 7B decode) against a pure
// read of as many bytes (cblas_sasum), interleaved. of_read = read time / GEMV time: the
// share of the machine's read bandwidth the decode reaches.
void BM_GemvLayer7B(benchmark::State& state) {
  const int64_t kind = state.range(0), D = 4096, F = 11008;
  const auto W = random_vec(static_cast<size_t>(D * F), 1), x = random_vec(size_t(F), 2);
  std::vector<QMatrix> ws;
  for (int i = 0; i < 4; ++i) ws.push_back(quantized(kind, W, D, D));  // q, k, v, o
  for (int i = 0; i < 2; ++i) ws.push_back(quantized(kind, W, F, D));  // gate, up
  ws.push_back(quantized(kind, W, D, F));                              // down
  double bytes = 0.0;
  for (const QMatrix& w : ws) bytes += weight_bytes(w);
  const std::vector<float> plain(static_cast<size_t>(bytes / sizeof(float)), 1.0f);
  std::vector<float> y(static_cast<size_t>(F));
  float sink = 0.0f;
  const auto [tr, tq] = time_pair(
      state, [&] { sink += cblas_sasum(static_cast<int>(plain.size()), plain.data(), 1); },
      [&] {
        for (const QMatrix& w : ws) qalora::qmatmul_forward(y.data(), x.data(), w, nullptr, 1);
      });
  benchmark::DoNotOptimize(sink);
  benchmark::DoNotOptimize(y.data());
  state.SetLabel(std::string(kind_name(kind)) + " " + qalora::qkernel_isa());
  state.counters["GBps"] = bytes / tq / 1e9;
  state.counters["read_GBps"] = bytes / tr / 1e9;
  state.counters["of_read"] = tr / tq;
}
BENCHMARK(BM_GemvLayer7B)
    ->Name("GemvLayer7B/quant")
    ->ArgName("kind")
    ->Arg(kQ4g32)
    ->Arg(kQ4g128)
    ->Arg(kQ8g128)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

void BM_PrefillFp32(benchmark::State& state) {
  const int64_t T = 256, I = state.range(0), O = state.range(1);
  const auto W = random_vec(static_cast<size_t>(O * I), 1), x = random_vec(size_t(T * I), 2);
  std::vector<float> y(static_cast<size_t>(T * O));
  for (auto _ : state) {
    sgemm_nt(y.data(), x.data(), W.data(), T, I, O);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOPS"] = benchmark::Counter(
      2.0 * static_cast<double>(T * I * O) * static_cast<double>(state.iterations()) / 1e9,
      benchmark::Counter::kIsRate);
}

// Prefill of 256 tokens (dequantize + sgemm) against sgemm on the fp32 weight, interleaved.
void BM_PrefillQuant(benchmark::State& state) {
  const int64_t kind = state.range(0), T = 256, I = state.range(1), O = state.range(2);
  const auto W = random_vec(static_cast<size_t>(O * I), 1), x = random_vec(size_t(T * I), 2);
  const QMatrix w = quantized(kind, W, O, I);
  std::vector<float> y(static_cast<size_t>(T * O)), yf(y.size());
  const auto [tf, tq] = time_pair(
      state, [&] { sgemm_nt(yf.data(), x.data(), W.data(), T, I, O); },
      [&] { qalora::qmatmul_forward(y.data(), x.data(), w, nullptr, T); });
  benchmark::DoNotOptimize(y.data());
  benchmark::DoNotOptimize(yf.data());
  const double flops = 2.0 * static_cast<double>(T * I * O);
  state.SetLabel(std::string(kind_name(kind)) + " " + qalora::qkernel_isa());
  state.counters["GFLOPS"] = flops / tq / 1e9;
  state.counters["fp32_GFLOPS"] = flops / tf / 1e9;
  state.counters["of_sgemm"] = tf / tq;  // 1 = as fast as fp32 prefill
}

// Dequantization alone (the part of prefill and backward that is not BLAS), as GB/s of fp32
// written.
void BM_Dequantize(benchmark::State& state) {
  const int64_t kind = state.range(0), I = state.range(1), O = state.range(2);
  const QMatrix w = quantized(kind, random_vec(static_cast<size_t>(O * I), 1), O, I);
  std::vector<float> W(static_cast<size_t>(O * I));
  for (auto _ : state) {
    qalora::dequantize_rows(w, 0, O, W.data());
    benchmark::DoNotOptimize(W.data());
  }
  state.SetLabel(std::string(kind_name(kind)) + " " + qalora::qkernel_isa());
  state.counters["out_GBps"] = benchmark::Counter(
      4.0 * static_cast<double>(O * I) * static_cast<double>(state.iterations()) / 1e9,
      benchmark::Counter::kIsRate);
}

const std::vector<std::pair<int64_t, int64_t>> kPrefillShapes = {
    {576, 576}, {576, 1536}, {1536, 576}};
void prefill_fp32_args(benchmark::internal::Benchmark* b) {
  for (auto [I, O] : kPrefillShapes) b->Args({I, O});
}
void prefill_args(benchmark::internal::Benchmark* b) {
  for (auto [I, O] : kPrefillShapes)
    for (int64_t kind : {kQ4g128, kNF4}) b->Args({kind, I, O});
}
BENCHMARK(BM_PrefillFp32)
    ->Name("Prefill256/fp32_sgemm")
    ->Apply(prefill_fp32_args)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_PrefillQuant)
    ->Name("Prefill256/quant")
    ->ArgNames({"kind", "I", "O"})
    ->Apply(prefill_args)
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Dequantize)
    ->Name("Dequantize")
    ->Apply(prefill_args)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

int main(int argc, char** argv) {
  // QALORA_ISA=portable|avx2|avx512|avx512vnni benchmarks another ISA than the best one.
  std::fprintf(stderr, "quantized kernels: %s\n", qalora::qkernel_isa());
  benchmark::AddCustomContext("qkernel_isa", qalora::qkernel_isa());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
