// The gradient all-reduce of data-parallel training at real adapter sizes (QA-LoRA r 64 on all
// seven linears): time per call and the bus bandwidth it reaches, 2 (N - 1) / N x bytes / time
// (the bytes each rank sends and receives in a ring all-reduce), to set against a link's speed.
//   mpirun -np 2 build/bench/bench_allreduce     (a plain run: one rank, nothing to measure)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "qalora/dist/communicator.h"

int main() {
  qalora::Communicator& comm = qalora::world();
  const int n = comm.size();
  if (n < 2) {
    std::printf("one rank: start with mpirun -np 2 (or more)\n");
    return 0;
  }
  struct Size {
    const char* what;
    size_t floats;
  };
  const Size sizes[] = {{"SmolLM2-135M r 64", 10'252'800},
                        {"Llama-2-7B r 64", 89'309'184},
                        {"Llama-2-13B r 64", 139'878'400}};
  for (const Size& s : sizes) {
    std::vector<float> g(s.floats, 1.0f);
    double best = 1e30;
    for (int rep = 0; rep < 4; ++rep) {
      comm.barrier();
      const auto t0 = std::chrono::steady_clock::now();
      comm.all_reduce_sum(g.data(), g.size());
      best = std::min(best,
                      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double bytes = 4.0 * static_cast<double>(s.floats);
    if (comm.is_root())
      std::printf("%-20s %7.1f MB  %8.3f s  bus %6.2f GB/s  (%d ranks, %s)\n", s.what, bytes / 1e6,
                  best, 2.0 * (n - 1) / n * bytes / best / 1e9, n, comm.backend());
  }
  return 0;
}
