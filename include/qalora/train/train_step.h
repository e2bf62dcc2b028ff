// One training step's compute: the model's forward over a whole sequence with the activations
// the backward needs, the chunked cross-entropy, and the backward down to the adapters. The
// base is frozen: gradients flow through its (possibly quantized) weights and only adapter
// parameters receive them. Every op runs through `ops::` and the adapter ops of lora.h — the
// list a second (GPU) backend implements; host code (data, schedule, checkpoints) never sees
// the buffers.
//
// Shapes, named once: T tokens, D model dim, H query heads, KV key/value heads, Hd head dim,
// F MLP features, V vocabulary, r adapter rank.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "qalora/adapters/adapter.h"
#include "qalora/core/device.h"
#include "qalora/model/model.h"

namespace qalora {

// Time and useful work of the step's phases, accumulated across calls (for `bench --train`).
struct TrainStepStats {
  double forward_seconds = 0;   // model forward, including the recomputation of checkpointing
  double backward_seconds = 0;  // cross-entropy and the backward
  double flops = 0;             // matmul work actually done (recomputation included)
  // Where the time went, forward and backward together:
  double base_seconds = 0;       // the frozen linear layers of the blocks
  double adapter_seconds = 0;    // adapter forward and backward
  double attention_seconds = 0;  // attention forward, backward and recomputation
  double head_seconds = 0;       // final norm, output head and cross-entropy
  int64_t tokens = 0;
  void reset() { *this = {}; }
};

struct TrainStepOptions {
  // Keep only each block's input and recompute the block inside its backward: activation
  // memory drops from n_layers blocks to one, for one more forward.
  bool grad_checkpoint = false;
  int64_t loss_chunk = 256;  // tokens per cross-entropy chunk ([chunk, V] logits at a time)
  // The longest single sequence of a packed batch (0: max_tokens); attention buffers are
  // sized by it.
  int64_t max_sequence = 0;
  // Where the step computes. On a GPU the weights are uploaded once (quantized ones stay
  // quantized there); the adapters' parameters go up and their gradients come back each step.
  Device device = {};
};

// One sequence of a batch: its tokens, which of them are targets, and its dropout seed.
struct TrainSequence {
  std::span<const int32_t> tokens;
  std::span<const uint8_t> target;
  uint64_t dropout_seed = 0;
};

class TrainSession {
 public:
  // Buffers are sized for batches of up to max_tokens tokens in all.
  TrainSession(const Model& model, AdapterSet& adapters, int64_t max_tokens,
               TrainStepOptions options = {});
  ~TrainSession();
  TrainSession(const TrainSession&) = delete;
  TrainSession& operator=(const TrainSession&) = delete;

  // Forward and backward of one sequence. The loss is the sum of -log p(tokens[t]) over the
  // positions t with target[t] = 1; grad_scale * d(loss)/d(adapter) is added to the adapters'
  // grad_A / grad_B (allocated here on first use). Dropout masks derive from dropout_seed.
  // Returns the loss sum (nats) and sets `targets` to the number of scored tokens.
  // `on_layer_done(l)`, when given, runs once layer l's backward has added its gradients
  // (layers in descending order): data-parallel training starts summing them there.
  double forward_backward(std::span<const int32_t> tokens, std::span<const uint8_t> target,
                          float grad_scale, uint64_t dropout_seed, int64_t& targets,
                          const std::function<void(int64_t layer)>& on_layer_done = {});
  // The same for several sequences packed into one pass (no padding: each sequence attends to
  // itself only, with positions from 0, and draws its own dropout masks), which gives the sum
  // of their separate results up to the order of float sums. Bigger products: faster, above
  // all on a GPU.
  double forward_backward(std::span<const TrainSequence> batch, float grad_scale, int64_t& targets,
                          const std::function<void(int64_t layer)>& on_layer_done = {});
  // The same loss without dropout and without gradients (held-out evaluation).
  double loss(std::span<const int32_t> tokens, std::span<const uint8_t> target, int64_t& targets);

  // Bytes of activation buffers held (for memory reports).
  int64_t activation_bytes() const;
  TrainStepStats& stats() { return stats_; }

  // The device's compute behind the session (src/train/train_backend.h), opaque here.
  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  TrainStepStats stats_;
};

// Sets every adapter's gradients to zero (allocating them when absent).
void zero_adapter_grads(AdapterSet& adapters);

}  // namespace qalora
