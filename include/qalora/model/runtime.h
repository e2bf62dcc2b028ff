// Inference runtime: the optimized fp32 forward pass with a KV cache. Prefill runs a whole
// batch of tokens through BLAS GEMMs; decoding feeds one token at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "qalora/adapters/adapter.h"
#include "qalora/model/model.h"
#include "qalora/ops/ops.h"

namespace qalora {

// Time and work of the linear layers (q/k/v/o/gate/up/down and the head), for `qalora bench`.
struct ForwardStats {
  double linear_seconds = 0;
  double linear_flops = 0;
  double attention_seconds = 0;
  double total_seconds = 0;
  int64_t tokens = 0;
  void reset() { *this = {}; }
};

// One output of linear_forward_shared (below).
struct LinearOutput {
  const Linear* linear;
  float* y;
};

// Sees the input x [T, in] of linear `target` of block `layer` during a forward.
using LinearInputObserver =
    std::function<void(int64_t layer, Target target, const float* x, int64_t T)>;

struct PackedLayout {
  std::vector<int64_t> positions;
  std::vector<ops::VisibleKeys> visible;
};

class InferenceSession {
 public:
  // max_context: KV cache length (0 = the model's context length, capped at 4096).
  // `adapters` (optional, checked against the model) are applied unmerged, without dropout.
  explicit InferenceSession(const Model& model, int64_t max_context = 0,
                            const AdapterSet* adapters = nullptr);
  ~InferenceSession();
  InferenceSession(const InferenceSession&) = delete;
  InferenceSession& operator=(const InferenceSession&) = delete;

  // Appends `tokens` at positions [position(), position() + n). Writes logits to `logits`:
  // [n, vocab] when all_logits, else [vocab] for the last token. Throws Error on ids out of
  // range, an empty batch, or a cache overflow.
  void forward(std::span<const int32_t> tokens, std::span<float> logits, bool all_logits = false);
  // Convenience: logits of the last token.
  std::vector<float> forward_last(std::span<const int32_t> tokens);
  // Several sequences in one batch (packed scoring): token t sits at RoPE position
  // layout.positions[t] and attends to the cache slots layout.visible[t]; the tokens take slots
  // [position(), position() + n) all the same. Writes the logits of the batch rows `rows`
  // ([rows.size(), vocab]).
  void forward_packed(std::span<const int32_t> tokens, const PackedLayout& layout,
                      std::span<const int64_t> rows, std::span<float> logits);

  int64_t position() const { return pos_; }
  int64_t max_context() const { return max_ctx_; }
  void reset() { pos_ = 0; }
  // Forget everything from position `pos` on (pos <= position()).
  void truncate(int64_t pos);

  const Model& model() const { return model_; }
  ForwardStats& stats() { return stats_; }
  // For sessions that decode: decoding keeps the whole model resident, so a long prompt's
  // pass keeps the weights too instead of dropping them (streams_weights) only to fault them
  // back in, or repack them, for the first generated token.
  void keep_weights_resident() { keep_weights_ = true; }
  // Calls `observer` with every block linear's input from the next forward on (calibration
  // statistics; an empty function stops it).
  void observe_linear_inputs(LinearInputObserver observer) { observer_ = std::move(observer); }

 private:
  void run(std::span<const int32_t> tokens, const PackedLayout* layout,
           std::span<const int64_t> rows, std::span<float> logits);
  void ensure_buffers(int64_t T);
  void linear(const Linear& l, const float* x, float* y, int64_t T);
  void linears(std::span<const LinearOutput> outputs, const float* x, int64_t T);
  // y += the adapter of (layer, target) applied to x, when there is one; x also goes to the
  // observer.
  void adapt(int64_t layer, Target target, const float* x, float* y, int64_t T);
  // linear_forward, timed into stats_.
  void project(const Tensor& weight, const QMatrix& qweight, const Tensor& bias, const float* x,
               float* y, int64_t T, DecodeActivations activations = DecodeActivations::Int8);

  const Model& model_;
  const AdapterSet* adapters_ = nullptr;
  LinearInputObserver observer_;
  int64_t max_ctx_ = 0;
  int64_t pos_ = 0;
  std::vector<float> k_cache_;  // [layer][kv_head][head_dim][pos] (ops::kv_cache_store)
  std::vector<float> v_cache_;
  std::vector<float> rope_cos_, rope_sin_;  // [max_ctx][head_dim / 2]
  ForwardStats stats_;
  bool keep_weights_ = false;
  // Activations of the current batch, grown on demand and reused across calls.
  std::vector<float> x_, xn_, q_, k_, v_, att_, gate_, up_;
  std::vector<float> adapter_u_, adapter_in_;  // lora_forward's u and input scratch
};

// y[T, out] = x[T, in] W^T (+ bias) with W quantized when `qweight` holds codes, else the fp32
// `weight`: the one place that picks the kernel for a linear layer. `activations`: see
// qmatmul_forward (the output head asks for Exact).
void linear_forward(const Tensor& weight, const QMatrix& qweight, const Tensor& bias,
                    const float* x, float* y, int64_t T,
                    DecodeActivations activations = DecodeActivations::Int8);
inline void linear_forward(const Linear& l, const float* x, float* y, int64_t T) {
  linear_forward(l.weight, l.qweight, l.bias, x, y, T);
}
// y_m = x W_m^T (+ b_m) for several linears of one input (q/k/v, gate/up): quantized ones go
// through qmatmul_forward_shared, so decoding prepares x once for all of them.
void linear_forward_shared(std::span<const LinearOutput> outputs, const float* x, int64_t T);

// Plain double-precision forward over a whole sequence, no cache: the golden reference the
// optimized runtime and the training step are tested against, with `adapters` (unmerged, no
// dropout) when given. Returns logits [n, vocab].
std::vector<double> reference_forward(const Model& model, std::span<const int32_t> tokens,
                                      const AdapterSet* adapters = nullptr);

// Whether a pass over T tokens drops each block's memory-mapped weights once done with it, so
// resident memory holds one block of a mapped model instead of all of it. Worth it from a few
// tokens on: faulting a block back in from the page cache (one fault per 64 KB) costs far less
// than its arithmetic. Decoding (1-4 tokens a pass) keeps the weights resident instead of
// faulting the whole model in again for every token.
inline bool streams_weights(int64_t T) { return T >= 16; }

// Sets the threads used by BLAS and OpenMP loops (0 = all cores).
void set_num_threads(int threads);
int num_threads();

}  // namespace qalora
