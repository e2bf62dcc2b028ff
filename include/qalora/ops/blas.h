// The BLAS library under the dense kernels (OpenBLAS, OpenMP build).
#pragma once

namespace qalora {

// OpenBLAS picks its kernels from the CPU model when it loads. On virtual machines whose CPUID
// names a generic model it can fall back to its SSE3 (Prescott) kernels, 6-8x slower than the
// AVX-512 or AVX2 ones the CPU runs. When that happened, this re-executes the program once with
// OPENBLAS_CORETYPE naming the kernels the CPU's features allow (SkylakeX or Haswell); it
// returns when no change is needed, when OPENBLAS_CORETYPE is already set, or when re-executing
// fails. Call it first in main(), before any thread starts.
void select_blas_kernels(char** argv);

// The fp32 GEMM rate this BLAS reaches now, in GFLOP/s: the best of three cblas_sgemm 2048^3
// after a warm-up (about a second). The peak that speed figures are compared with.
double sgemm_peak_gflops();

// The kernel family OpenBLAS is using ("skylakex", "haswell", "zen", ...).
const char* blas_core_name();

}  // namespace qalora
