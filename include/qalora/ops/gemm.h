// The dense matrix product under every layer, in the process's compute type:
//   fp32: OpenBLAS sgemm;
//   bf16: both inputs rounded to bfloat16 (nearest even), products accumulated in fp32
//         (oneDNN's matmul: AMX tiles or AVX512-BF16 dot products, chosen by oneDNN at run
//         time; AMX counts only once Linux has granted this process the tile data, which is
//         asked for the first time the bf16 support is checked). Offered only where the CPU
//         has native bf16 instructions and the build has oneDNN; elsewhere fp32 is the path.
// Outputs, adapters, optimizer state and everything between the products stay fp32: bf16 is
// the format of a product's inputs only, as in PyTorch's autocast.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace qalora::ops {

enum class ComputeType { Fp32, Bf16 };

const char* compute_type_name(ComputeType type);
// "fp32", "bf16" or "auto" (default_compute_type()); anything else is an Error naming it.
ComputeType parse_compute_type(std::string_view text);

// Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16).
bool cpu_has_native_bf16();
// Whether the bf16 path can run here: the CPU has it and the build has oneDNN.
bool bf16_available();
// bf16 where available, else fp32.
ComputeType default_compute_type();
// The process-wide compute type: fp32 until set. Setting bf16 where it is not available is an
// Error that says why.
ComputeType compute_type();
void set_compute_type(ComputeType type);
// The instructions bf16 products run on here ("AMX-BF16", "AVX512-BF16"), or "none".
const char* bf16_isa_name();
// The rate of a 2048^3 product in `type` now, in GFLOP/s (best of three after a warm-up): the
// peak that speed figures are compared with. 0 for bf16 where it is not available.
double gemm_peak_gflops(ComputeType type);

// C[M, N] = alpha op(A) op(B) + beta C, row-major; op(X) = X^T when trans_x. A is [M, K]
// ([K, M] when trans_a) with row stride lda, B is [K, N] ([N, K] when trans_b) with row stride
// ldb. Runs in compute_type(), except that products of fewer than 2^20 multiply-adds always
// run in fp32 (bf16 would not pay for its conversions there). Safe to call from inside an
// OpenMP parallel region (then it runs on the calling thread only).
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

// Whether gemm() runs an M x N x K product in bf16 now.
bool use_bf16(int64_t M, int64_t N, int64_t K);

// A product's input: its fp32 values and, optionally, the same values already in bf16, laid
// out alike (same row stride). A bf16 product uses the copy instead of converting the operand
// again, so an operand that several products read (a gradient, a frozen weight decoded once)
// is converted once.
struct Operand {
  Operand(const float* values) : f32(values) {}  // NOLINT: an fp32 array is an Operand
  Operand(const float* values, const uint16_t* bf16_copy) : f32(values), bf16(bf16_copy) {}
  Operand at(int64_t offset) const { return {f32 + offset, bf16 ? bf16 + offset : nullptr}; }

  const float* f32;
  const uint16_t* bf16 = nullptr;
};
// x [rows, cols] (contiguous) as an Operand; with `bf16`, its copy is converted into `buf`.
Operand make_operand(const float* x, int64_t rows, int64_t cols, bool bf16,
                     std::vector<uint16_t>& buf);

// gemm() on Operands: the same choice of fp32 or bf16, the same result, with the bf16 copies
// used where the operands carry them.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const Operand& A, int64_t lda, const Operand& B, int64_t ldb, float beta, float* C,
          int64_t ldc);
// The product in bf16 whatever its size, for callers that decide once for a family of
// products (requires bf16_available()); an operand without a bf16 copy is converted, one
// whose f32 is null must carry one (a frozen weight decoded straight into bf16).
void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const Operand& A, int64_t lda, const Operand& B, int64_t ldb, float beta, float* C,
               int64_t ldc);

// The same product with the inputs already in bf16 (requires bf16_available()).
void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
               const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta, float* C,
               int64_t ldc);
// Its plain reference: every product of bf16 values exact, summed in double.
void gemm_bf16_ref(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                   const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta,
                   float* C, int64_t ldc);

// out[r * cols + c] = bf16(x[r * ld + c]) for a rows x cols block (threads split the rows):
// round to nearest even, NaN quieted, subnormals flushed to signed zero (as AVX512-BF16's
// conversion does).
void to_bf16(const float* x, int64_t rows, int64_t cols, int64_t ld, uint16_t* out);
void to_bf16_ref(const float* x, int64_t rows, int64_t cols, int64_t ld, uint16_t* out);

}  // namespace qalora::ops
