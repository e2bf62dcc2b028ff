#include "qalora/ops/gemm.h"

#include <cblas.h>
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <map>
#include <tuple>
#include <vector>

#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/core/reused_buffer.h"
#include "qalora/ops/blas.h"

#ifdef QALORA_WITH_DNNL
#include <dnnl.hpp>
#endif

namespace qalora::ops {

namespace {

std::atomic<ComputeType> g_compute_type{ComputeType::Fp32};

// Elements of a bf16 conversion before it is worth splitting across threads.
constexpr int64_t kParallelConversion = int64_t{1} << 15;
// Products of fewer multiply-adds stay in fp32: converting the operands and calling oneDNN
// cost more than the product itself (stories260K's 64-wide layers ran 20% slower in bf16).
constexpr int64_t kMinBf16Work = int64_t{1} << 20;

#ifdef QALORA_WITH_DNNL
dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN builds a kernel for each shape, stride and scaling (tens of microseconds, more than a
// small attention product takes); a training step meets a few dozen of them, so they are kept.
using MatmulKey =
    std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float, float>;
constexpr size_t kMaxCachedMatmuls = 512;

struct Matmul {
  dnnl::memory::desc a, b, c;
  dnnl::matmul primitive;
};

Matmul make_matmul(const MatmulKey& key) {
  const auto [trans_a, trans_b, M, N, K, lda, ldb, ldc, alpha, beta] = key;
  using dt = dnnl::memory::data_type;
  // A [M, K] and B [K, N] as oneDNN sees them; a transposed operand is the same bytes read
  // with swapped strides.
  const dnnl::memory::desc a({M, K}, dt::bf16,
                             trans_a ? dnnl::memory::dims{1, lda} : dnnl::memory::dims{lda, 1});
  const dnnl::memory::desc b({K, N}, dt::bf16,
                             trans_b ? dnnl::memory::dims{1, ldb} : dnnl::memory::dims{ldb, 1});
  const dnnl::memory::desc c({M, N}, dt::f32, dnnl::memory::dims{ldc, 1});
  dnnl::primitive_attr attr;
  if (alpha != 1.0f) attr.set_output_scales(0, {alpha});
  if (beta != 0.0f) {
    dnnl::post_ops ops;
    ops.append_sum(beta);
    attr.set_post_ops(ops);
  }
  return {
      a, b, c,
      dnnl::matmul(dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), attr, cpu_engine()))};
}

const Matmul& cached_matmul(const MatmulKey& key) {
  // Per thread: attention runs its products from inside a parallel loop.
  thread_local std::map<MatmulKey, Matmul> cache;
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() >= kMaxCachedMatmuls) cache.clear();  // evaluation of many lengths
  return cache.emplace(key, make_matmul(key)).first->second;
}
#endif

// Linux (5.16 and later) keeps the AMX tile data out of a process's saved state until the
// process asks for it; the first tile instruction before that kills it with SIGILL. Asked once
// per process, here rather than trusted to the library that runs the tiles. An older kernel,
// or one that refuses, leaves AMX unusable: the products then run on AVX512-BF16 or fp32.
bool amx_tile_data_permitted() {
#ifdef __linux__
  constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl code (asm/prctl.h)
  constexpr long kXfeatureXtiledata = 18;     // the XSAVE component of the tile data
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// AMX-BF16: CPUID leaf 7, subleaf 0, EDX bit 22 (not every compiler's __builtin_cpu_supports
// knows the name), with the operating system's permission to use the tiles. Once per process.
bool cpu_has_amx_bf16() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    const bool cpu =
        __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) != 0 && ((edx >> 22) & 1u) != 0;
    return cpu && amx_tile_data_permitted();
  }();
  return usable;
}

void check_bf16_available() {
  QL_CHECK(bf16_available(), "compute type bf16: ",
           cpu_has_native_bf16()
               ? "this build has no oneDNN (apt-get install libdnnl-dev, then rebuild)"
               : "this CPU has no native bf16 instructions (AVX512-BF16 or AMX-BF16); use fp32");
}

// One value as to_bf16 converts it: subnormals flushed to signed zero, as the instruction
// below does.
inline uint16_t to_bf16_flushed(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const bool subnormal = (bits & 0x7f800000u) == 0;
  return fp32_to_bf16(std::bit_cast<float>(subnormal ? bits & 0x80000000u : bits));
}

// One row of to_bf16 on CPUs without AVX512-BF16 (where only tests call it).
void to_bf16_row(const float* x, int64_t n, uint16_t* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = to_bf16_flushed(x[i]);
}

// VCVTNEPS2BF16: round to nearest even, NaN stays NaN (quieted), subnormals become zero.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void to_bf16_row_avx512(
    const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        std::bit_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i))));
  if (i < n) {
    const auto tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(
        out + i, tail,
        std::bit_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, x + i))));
  }
}

// A [rows, cols] block of an operand, as packed bf16 in `buf`.
const uint16_t* packed_bf16(const float* x, int64_t rows, int64_t cols, int64_t ld,
                            std::vector<uint16_t>& buf) {
  uint16_t* out = reused_buffer(buf, rows * cols);
  to_bf16(x, rows, cols, ld, out);
  return out;
}

}  // namespace

const char* compute_type_name(ComputeType type) {
  return type == ComputeType::Bf16 ? "bf16" : "fp32";
}

ComputeType parse_compute_type(std::string_view text) {
  if (text == "fp32") return ComputeType::Fp32;
  if (text == "bf16") return ComputeType::Bf16;
  if (text == "auto") return default_compute_type();
  throw Error("compute type: expected fp32, bf16 or auto, got '" + std::string(text) + "'");
}

bool cpu_has_native_bf16() {
  // Once per process: every bf16 product checks it, and CPUID traps to the hypervisor on a VM.
  static const bool native = [] {
    __builtin_cpu_init();
    // AMX first, so that its permission is asked before any product runs.
    const bool amx = cpu_has_amx_bf16();
    return amx || __builtin_cpu_supports("avx512bf16");
  }();
  return native;
}

bool bf16_available() {
#ifdef QALORA_WITH_DNNL
  return cpu_has_native_bf16();
#else
  return false;
#endif
}

ComputeType default_compute_type() {
  return bf16_available() ? ComputeType::Bf16 : ComputeType::Fp32;
}

ComputeType compute_type() {
  return g_compute_type.load(std::memory_order_relaxed);
}

void set_compute_type(ComputeType type) {
  if (type == ComputeType::Bf16) check_bf16_available();
  g_compute_type.store(type, std::memory_order_relaxed);
}

const char* bf16_isa_name() {
  if (!bf16_available()) return "none";
  return cpu_has_amx_bf16() ? "AMX-BF16" : "AVX512-BF16";
}

double gemm_peak_gflops(ComputeType type) {
  if (type == ComputeType::Fp32) return sgemm_peak_gflops();
  if (!bf16_available()) return 0.0;
  constexpr int64_t n = 2048;
  const std::vector<uint16_t> a(static_cast<size_t>(n * n), fp32_to_bf16(1.0f));
  std::vector<float> c(a.size());
  // The warm-up run also builds oneDNN's kernel.
  const double best = best_seconds(3, [&] {
    gemm_bf16(false, true, n, n, n, 1.0f, a.data(), n, a.data(), n, 0.0f, c.data(), n);
  });
  return 2.0 * static_cast<double>(n * n * n) / best / 1e9;
}

void to_bf16(const float* x, int64_t rows, int64_t cols, int64_t ld, uint16_t* out) {
  static const auto row_fn =
      __builtin_cpu_supports("avx512bf16") ? to_bf16_row_avx512 : to_bf16_row;
  // Not a parallel region with a false `if`: even that sets up a team, which costs more than
  // converting a row (attention converts its blocks row by row).
  if (rows * cols <= kParallelConversion || omp_in_parallel()) {
    for (int64_t r = 0; r < rows; ++r) row_fn(x + r * ld, cols, out + r * cols);
    return;
  }
#pragma omp parallel for
  for (int64_t r = 0; r < rows; ++r) row_fn(x + r * ld, cols, out + r * cols);
}

void to_bf16_ref(const float* x, int64_t rows, int64_t cols, int64_t ld, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = x[r * ld + c];
      out[r * cols + c] =
          fp32_to_bf16(std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.0f, v) : v);
    }
}

void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
               int64_t ldc) {
  check_bf16_available();
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum: C = beta C, which oneDNN does not take
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.0f ? 0.0f : beta * C[m * ldc + n];
    return;
  }
#ifdef QALORA_WITH_DNNL
  const Matmul& mm =
      cached_matmul(MatmulKey{trans_a, trans_b, M, N, K, lda, ldb, ldc, alpha, beta});
  dnnl::engine& engine = cpu_engine();
  // oneDNN reads its inputs only; its memory objects take non-const pointers.
  dnnl::memory a(mm.a, engine, const_cast<uint16_t*>(A));
  dnnl::memory b(mm.b, engine, const_cast<uint16_t*>(B));
  dnnl::memory c(mm.c, engine, C);
  thread_local dnnl::stream stream(engine);
  mm.primitive.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
  stream.wait();
#else
  (void)trans_a, (void)trans_b, (void)K, (void)alpha, (void)A, (void)lda, (void)B, (void)ldb,
      (void)beta, (void)C, (void)ldc;
#endif
}

void gemm_bf16_ref(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                   const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta,
                   float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const uint16_t a = trans_a ? A[k * lda + m] : A[m * lda + k];
        const uint16_t b = trans_b ? B[n * ldb + k] : B[k * ldb + n];
        acc += static_cast<double>(bf16_to_fp32(a)) * bf16_to_fp32(b);
      }
      float& c = C[m * ldc + n];
      c = static_cast<float>(alpha * acc + (beta == 0.0f ? 0.0 : static_cast<double>(beta) * c));
    }
}

bool use_bf16(int64_t M, int64_t N, int64_t K) {
  return compute_type() == ComputeType::Bf16 && M * N * K >= kMinBf16Work;
}

Operand make_operand(const float* x, int64_t rows, int64_t cols, bool bf16,
                     std::vector<uint16_t>& buf) {
  if (!bf16) return {x};
  return {x, packed_bf16(x, rows, cols, cols, buf)};
}

void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const Operand& A, int64_t lda, const Operand& B, int64_t ldb, float beta, float* C,
               int64_t ldc) {
  thread_local std::vector<uint16_t> a_buf, b_buf;
  // An operand converted here is packed: its row stride becomes its row length.
  const auto bf16_of = [](const Operand& x, int64_t rows, int64_t cols, int64_t& ld,
                          std::vector<uint16_t>& buf) {
    if (x.bf16 != nullptr) return x.bf16;
    const uint16_t* packed = packed_bf16(x.f32, rows, cols, ld, buf);
    ld = cols;
    return packed;
  };
  const uint16_t* a = bf16_of(A, trans_a ? K : M, trans_a ? M : K, lda, a_buf);
  const uint16_t* b = bf16_of(B, trans_b ? N : K, trans_b ? K : N, ldb, b_buf);
  gemm_bf16(trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, C, ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const Operand& A, int64_t lda, const Operand& B, int64_t ldb, float beta, float* C,
          int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (use_bf16(M, N, K))
    return gemm_bf16(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  const auto b = [](int64_t v) { return static_cast<blasint>(v); };
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, b(M), b(N), b(K), alpha, A.f32, b(lda), B.f32,
              b(ldb), beta, C, b(ldc));
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm(trans_a, trans_b, M, N, K, alpha, Operand(A), lda, Operand(B), ldb, beta, C, ldc);
}

}  // namespace qalora::ops
