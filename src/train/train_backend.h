// The compute behind a TrainSession: the CPU's (train_step.cpp) or the GPU's (src/cuda). The
// host logic both share (input checks, scored positions, gradient allocation, dropout seeds)
// lives here, so that a step means the same on either device.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "qalora/train/train_step.h"

namespace qalora {

struct TrainSession::Impl {
  Impl(const Model& m, AdapterSet& a, int64_t max_tokens, TrainStepOptions o);
  virtual ~Impl() = default;

  // The pieces of a step, which TrainSession runs in order (the schedule, checkpointing
  // included, is the same on every device). The activations of the last forward stay in the
  // backend's buffers.
  virtual void embed(std::span<const int32_t> tokens) = 0;  // -> the first block's input
  // Block li's input -> its output, saving what its backward needs; p = dropout probability.
  virtual void block_forward(int64_t li, int64_t T, float p, uint64_t seed, TrainStepStats& st) = 0;
  // Final norm, head and chunked cross-entropy over next_ids; with `backward`, leaves the
  // gradient of the last block's output for block_backward. Returns the loss sum.
  virtual double head_loss(int64_t T, float grad_scale, bool backward, TrainStepStats& st) = 0;
  // Block li's output gradient -> its input gradient, adding the adapters' gradients. `fresh`:
  // block_forward(li) has just run (recomputation), so its attention output is still current.
  virtual void block_backward(int64_t li, int64_t T, float p, uint64_t seed, bool fresh,
                              TrainStepStats& st) = 0;
  // Before a forward: a device backend brings the adapters' current parameters over (and,
  // with `gradients`, clears its gradient sums).
  virtual void begin(bool gradients) { (void)gradients; }
  // After block_backward(li): the layer's gradients are in the adapters' host gradients.
  virtual void layer_done(int64_t li) { (void)li; }
  // Waits for the queued work, so that phase times measure it.
  virtual void sync() {}
  virtual int64_t activation_bytes() const = 0;

  void check_input(std::span<const int32_t> tokens, std::span<const uint8_t> target) const;
  // Position t predicts tokens[t + 1] when that token is a target (else next_ids[t] = -1);
  // returns the number of scored positions.
  int64_t set_next_ids(std::span<const int32_t> tokens, std::span<const uint8_t> target);

  const Model& model;
  AdapterSet& adapters;
  int64_t max_tokens;
  TrainStepOptions options;
  int64_t D, H, KV, Hd, F, V, QD, KVD, R;
  std::vector<int32_t> next_ids;  // [max_tokens] target id per position, -1 = not scored
};

// Each adapter draws its dropout mask from its own stream, so that one layer's mask does not
// depend on which other targets carry adapters.
uint64_t adapter_seed(uint64_t step_seed, int64_t layer, Target t);

inline double matmul_flops(int64_t T, int64_t in, int64_t out) {
  return 2.0 * static_cast<double>(T) * static_cast<double>(in) * static_cast<double>(out);
}

// The GPU's step (src/cuda/train_step_cuda.cpp); only in builds with the CUDA backend.
std::unique_ptr<TrainSession::Impl> make_cuda_train_step(const Model& model, AdapterSet& adapters,
                                                         int64_t max_tokens,
                                                         TrainStepOptions options);

}  // namespace qalora
