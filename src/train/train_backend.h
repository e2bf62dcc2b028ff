// The compute behind a TrainSession: the CPU's (train_step.cpp) or the GPU's (src/cuda). The
// host logic both share (input checks, scored positions, gradient allocation, dropout seeds)
// lives here, so that a step means the same on either device.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "qalora/adapters/lora.h"
#include "qalora/train/train_step.h"

namespace qalora {

struct TrainSession::Impl {
  Impl(const Model& m, AdapterSet& a, int64_t max_tokens, TrainStepOptions o);
  virtual ~Impl() = default;

  // A block's saved activations, in the backend's memory (one set per layer, or one shared
  // with grad_checkpoint). Norm outputs and SwiGLU's output are recomputed in the backward
  // instead (a few percent of the work), and so is the attention unless keeps_attention().
  struct BlockActs {
    float *q, *k, *v;                   // [T, QD], [T, KVD] x2, q and k after RoPE
    float* x_mid;                       // [T, D] residual stream after attention
    float *gate, *up;                   // [T, F] before the activation
    std::array<float*, kNumTargets> u;  // [T, r] per adapted target (null otherwise)
    // [T, QD] the attention's output (the input of o): the block's own when the backend
    // keeps_attention(), else one buffer all blocks share.
    float* att;
  };
  // Buffers shared by all layers, in the backend's memory, set by its constructor: the block
  // inputs x_in[0..n_layers] (the last is the last block's output) [T, D]; a norm's output xn
  // [T, D]; silu(gate) * up [T, F]; the gradients dx (of the block output, then input) and dxn
  // [T, D], datt, dq [T, QD], dk, dv [T, KVD], and dgate, dup [T, F] (dgate first holds the
  // gradient of down's input).
  std::vector<float*> x_in;
  float *xn = nullptr, *hidden = nullptr;
  float *dx = nullptr, *dxn = nullptr, *datt = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr,
        *dgate = nullptr, *dup = nullptr;

  // The sequences of the pass: rows [begin, begin + length) of every activation, each with its
  // dropout seed (set_batch).
  struct Segment {
    int64_t begin, length;
    uint64_t seed;
  };
  std::vector<Segment> segments;
  int64_t max_sequence;  // the longest segment a batch may hold

  // Block li's input -> its output, saving what its backward needs; p = dropout probability.
  void block_forward(int64_t li, int64_t T, float p, TrainStepStats& st);
  // dx: the gradient of block li's output on entry, of its input on return; adds the adapters'
  // gradients. `fresh`: block_forward(li) has just run (recomputation), so the attention's
  // output and what its backward needs are still current.
  void block_backward(int64_t li, int64_t T, float p, bool fresh, TrainStepStats& st);
  // The dropout of target t's adapter in layer li: each segment's seed derived for it.
  const AdapterDropout& adapter_dropout(int64_t li, Target t, float p);

  // ---- What a backend implements, in its own memory.
  virtual void embed() = 0;  // tokens -> x_in[0]
  // Final norm, head and chunked cross-entropy over next_ids; with `backward`, leaves the
  // gradient of the last block's output in dx. Returns the loss sum.
  virtual double head_loss(int64_t T, float grad_scale, bool backward, TrainStepStats& st) = 0;
  virtual BlockActs acts_of(int64_t li) = 0;
  enum class Norm { Attention, Ffn };
  // out[T, D] = the layer's norm of x; dx[T, D] += its input gradient given dout.
  virtual void norm_forward(float* out, const float* x, int64_t li, Norm n, int64_t T) = 0;
  virtual void norm_backward(float* dx, const float* dout, const float* x, int64_t li, Norm n,
                             int64_t T) = 0;
  // y[T, out] = x W^T (+ bias) + the target's adapter, saving the adapter's u in b.
  // p = dropout probability (adapter_dropout gives the masks).
  virtual void linear(int64_t li, Target t, const float* x, float* y, const BlockActs& b, int64_t T,
                      float p, TrainStepStats& st) = 0;
  // dx[T, in] (= or, with `accumulate`, +=) the input gradient of `linear` given dy, with the
  // adapter's gradients added to its sums.
  virtual void linear_backward(int64_t li, Target t, const float* dy, const float* x, float* dx,
                               bool accumulate, const BlockActs& b, int64_t T, float p,
                               TrainStepStats& st) = 0;
  // In place on x [T, heads, Hd]: RoPE at each segment's positions 0, 1, ..., or its adjoint.
  virtual void rope(float* x, int64_t heads, int64_t T, bool backward) = 0;
  // b.att from b's q, k, v (and whatever the backward needs); then dq, dk, dv from datt.
  // Causal within each segment.
  virtual void attention_forward(int64_t li, const BlockActs& b, int64_t T, TrainStepStats& st) = 0;
  virtual void attention_backward(int64_t li, const BlockActs& b, int64_t T,
                                  TrainStepStats& st) = 0;
  // True when every block keeps its attention's output and what its backward needs, so the
  // backward does not recompute them.
  virtual bool keeps_attention() const = 0;
  virtual void add(float* y, const float* x, int64_t n) = 0;  // y += x
  virtual void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) = 0;
  // dgate may alias dout.
  virtual void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                               const float* up, int64_t n) = 0;
  // After block li's forward or backward (the CPU drops the layer's mapped pages there).
  virtual void block_done(int64_t li, int64_t T) { (void)li, (void)T; }
  // Before a forward: a device backend brings the adapters' current parameters over (and,
  // with `gradients`, clears its gradient sums).
  virtual void begin(bool gradients) { (void)gradients; }
  // After block_backward(li): the layer's gradients are in the adapters' host gradients.
  virtual void layer_done(int64_t li) { (void)li; }
  // Waits for the queued work, so that phase times measure it.
  virtual void sync() {}
  virtual int64_t activation_bytes() const = 0;

  // Checks the batch and sets tokens, segments and next_ids (position t predicts the next
  // token of its sequence when that token is a target, else -1); returns the scored count.
  int64_t set_batch(std::span<const TrainSequence> batch);

  const Model& model;
  AdapterSet& adapters;
  int64_t max_tokens;
  TrainStepOptions options;
  int64_t D, H, KV, Hd, F, V, QD, KVD, R;
  std::vector<int32_t> tokens;    // the batch's tokens, concatenated
  std::vector<int32_t> next_ids;  // [max_tokens] target id per position, -1 = not scored
  AdapterDropout dropout_runs;    // adapter_dropout's result
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
