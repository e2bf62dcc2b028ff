// Wall-clock timing for stats and benchmarks.
#pragma once

#include <algorithm>
#include <chrono>

namespace qalora {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The fastest of `runs` runs of `run` after one warm-up run, in seconds: the figure a speed
// measurement on a shared machine reports.
template <typename F>
double best_seconds(int runs, F&& run) {
  run();
  double best = 1e30;
  for (int i = 0; i < runs; ++i) {
    const auto start = Clock::now();
    run();
    best = std::min(best, seconds_since(start));
  }
  return best;
}

}  // namespace qalora
