// QALORA_HD marks the small functions that the CPU code and the CUDA kernels both call, so that
// the two backends compute the same thing from one definition.
#pragma once

#if defined(__CUDACC__)
#define QALORA_HD __host__ __device__
#else
#define QALORA_HD
#endif
