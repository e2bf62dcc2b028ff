#include "qalora/train/train_step.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "qalora/adapters/lora.h"
#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "qalora/core/hash.h"
#include "qalora/model/runtime.h"
#include "qalora/ops/matmul_stored.h"
#include "qalora/ops/ops.h"
#include "train_backend.h"

namespace qalora {

namespace {

// dx[T, in] = dy[T, out] W for a frozen linear, dense or quantized.
void linear_backward_input(const Linear& l, const float* dy, float* dx, int64_t T) {
  if (l.quantized())
    qmatmul_backward_input(dx, dy, l.qweight, T);
  else
    ops::matmul_backward_input(dx, dy, l.weight, T);
}

void add_into(float* y, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

using Buf = std::vector<float>;

// What one block's backward needs from its forward. The norms' outputs, the MLP activation,
// the attention probabilities and output are recomputed in the backward instead (a few percent
// of the step's work): kept for every layer they would be most of the activation memory.
struct BlockActs {
  Buf q;               // [T, H * Hd] after RoPE
  Buf k, v;            // [T, KV * Hd] (k after RoPE)
  Buf x_mid;           // [T, D] residual stream after attention
  Buf gate, up;        // [T, F] before the activation
  Buf u[kNumTargets];  // [T, r] per adapted target
};

}  // namespace

uint64_t adapter_seed(uint64_t step_seed, int64_t layer, Target t) {
  return derive_seed(step_seed, static_cast<uint64_t>(layer * kNumTargets + static_cast<int>(t)));
}

TrainSession::Impl::Impl(const Model& m, AdapterSet& a, int64_t T, TrainStepOptions o)
    : model(m), adapters(a), max_tokens(T), options(o) {
  const ModelConfig& c = m.config;
  D = c.dim, H = c.n_heads, KV = c.n_kv_heads, Hd = c.head_dim, F = c.hidden_dim;
  V = c.vocab_size, QD = c.q_dim(), KVD = c.kv_dim(), R = a.config.rank;
  QL_CHECK(T > 0, "training: the sequence length must be positive, got ", T);
  QL_CHECK(options.loss_chunk > 0, "training: the loss chunk must be positive, got ",
           options.loss_chunk);
  check_adapters_match(a, m, "adapters");
  next_ids.resize(static_cast<size_t>(T));
}

void TrainSession::Impl::check_input(std::span<const int32_t> tokens,
                                     std::span<const uint8_t> target) const {
  const auto T = static_cast<int64_t>(tokens.size());
  QL_CHECK(T > 0 && T <= max_tokens, "training: a sequence of ", T,
           " tokens does not fit the session's 1..", max_tokens, " tokens");
  QL_CHECK(target.size() == tokens.size(), "training: ", target.size(), " target flags for ", T,
           " tokens");
  for (int32_t id : tokens)
    QL_CHECK(id >= 0 && id < V, "training: token id ", id, " is out of range [0, ", V, ")");
}

int64_t TrainSession::Impl::set_next_ids(std::span<const int32_t> tokens,
                                         std::span<const uint8_t> target) {
  const auto T = static_cast<int64_t>(tokens.size());
  int64_t n = 0;
  for (int64_t t = 0; t < T; ++t) {
    const bool scored = t + 1 < T && target[static_cast<size_t>(t + 1)];
    next_ids[static_cast<size_t>(t)] = scored ? tokens[static_cast<size_t>(t + 1)] : -1;
    n += scored;
  }
  return n;
}

namespace {

struct CpuTrainStep final : TrainSession::Impl {
  std::vector<float> rope_cos, rope_sin;
  std::vector<Buf> x_in;        // [n_layers + 1][T, D]: block inputs, then the last block's output
  std::vector<BlockActs> acts;  // one per layer, or one shared with grad_checkpoint
  // Shared by all layers, valid for the block being run: a norm's output [T, D] (input of
  // q/k/v or gate/up), silu(gate) * up [T, F] (input of down), the attention's softmax
  // probabilities [H, T, T] and output [T, H * Hd] (input of o).
  Buf xn, hidden, probs, att;
  Buf xf, logits, losses;  // final norm output [T, D]; [chunk, V]; [chunk]
  // dgate first holds the gradient of down's input, then in place that of gate.
  Buf dx, dxn, dtmp, datt, dq, dk, dv, dgate, dup;
  Buf lora_scratch, attn_scratch;

  CpuTrainStep(const Model& m, AdapterSet& a, int64_t T, TrainStepOptions o) : Impl(m, a, T, o) {
    const ModelConfig& c = m.config;
    rope_tables(c, T, rope_cos, rope_sin);
    const auto n = [&](int64_t k) { return static_cast<size_t>(T * k); };
    x_in.assign(static_cast<size_t>(c.n_layers + 1), Buf(n(D)));
    acts.resize(options.grad_checkpoint ? 1 : static_cast<size_t>(c.n_layers));
    for (BlockActs& b : acts) {
      b.q.resize(n(QD)), b.k.resize(n(KVD)), b.v.resize(n(KVD));
      b.x_mid.resize(n(D)), b.gate.resize(n(F)), b.up.resize(n(F));
      for (Target t : a.config.targets) b.u[static_cast<int>(t)].resize(n(R));
    }
    xn.resize(n(D)), hidden.resize(n(F)), probs.resize(static_cast<size_t>(H * T * T));
    att.resize(n(QD));
    const int64_t chunk = std::min(options.loss_chunk, T);
    xf.resize(n(D)), logits.resize(static_cast<size_t>(chunk * V));
    losses.resize(static_cast<size_t>(chunk));
    const int64_t widest = std::max({D, F, QD});
    dx.resize(n(D)), dxn.resize(n(D)), dtmp.resize(n(widest)), datt.resize(n(QD));
    dq.resize(n(QD)), dk.resize(n(KVD)), dv.resize(n(KVD));
    dgate.resize(n(F)), dup.resize(n(F));
    lora_scratch.resize(n(widest + R));
    attn_scratch.resize(static_cast<size_t>(ops::attention_backward_scratch(T, H)));
  }

  BlockActs& acts_of(int64_t layer) {
    return acts[options.grad_checkpoint ? 0 : static_cast<size_t>(layer)];
  }

  // y[T, out] = x W^T (+ bias) + the target's adapter, saving the adapter's u.
  void linear(int64_t layer, Target t, const float* x, float* y, BlockActs& b, int64_t T, float p,
              uint64_t seed, TrainStepStats& st) {
    const Linear& l = target_linear(model.layers[static_cast<size_t>(layer)], t);
    // Exact activations: a short sequence would otherwise take the int8 decode GEMV.
    auto t0 = Clock::now();
    linear_forward(l.weight, l.qweight, l.bias, x, y, T, DecodeActivations::Exact);
    st.flops += matmul_flops(T, l.in_features(), l.out_features());
    st.base_seconds += seconds_since(t0);
    if (const LoraAdapter* a = adapters.find(layer, t)) {
      t0 = Clock::now();
      lora_forward(*a, adapters.config.scale(), x, T, p, adapter_seed(seed, layer, t), y,
                   b.u[static_cast<int>(t)].data(), lora_scratch.data());
      st.flops += matmul_flops(T, a->a_cols() + a->out, R);
      st.adapter_seconds += seconds_since(t0);
    }
  }

  // dx[T, in] (= or +=) the input gradient of `linear` given dy, adapter gradients added.
  void linear_backward(int64_t layer, Target t, const float* dy, const float* x, float* dx_out,
                       bool accumulate, BlockActs& b, int64_t T, float p, uint64_t seed,
                       TrainStepStats& st) {
    const Linear& l = target_linear(model.layers[static_cast<size_t>(layer)], t);
    auto t0 = Clock::now();
    if (accumulate) {
      linear_backward_input(l, dy, dtmp.data(), T);
      add_into(dx_out, dtmp.data(), T * l.in_features());
    } else {
      linear_backward_input(l, dy, dx_out, T);
    }
    st.flops += matmul_flops(T, l.in_features(), l.out_features());
    st.base_seconds += seconds_since(t0);
    if (LoraAdapter* a = adapters.find(layer, t)) {
      t0 = Clock::now();
      lora_backward(*a, adapters.config.scale(), dy, x, b.u[static_cast<int>(t)].data(), T, p,
                    adapter_seed(seed, layer, t), dx_out, lora_scratch.data());
      st.flops += 2.0 * matmul_flops(T, a->a_cols() + a->out, R);
      st.adapter_seconds += seconds_since(t0);
    }
  }

  // x_in[layer] -> x_in[layer + 1], saving the block's activations.
  void block_forward(int64_t li, int64_t T, float p, uint64_t seed, TrainStepStats& st) override {
    const LayerWeights& L = model.layers[static_cast<size_t>(li)];
    const float eps = model.config.norm_eps;
    BlockActs& b = acts_of(li);
    const float* x = x_in[static_cast<size_t>(li)].data();
    float* x_out = x_in[static_cast<size_t>(li + 1)].data();
    ops::rmsnorm_forward(xn.data(), x, L.attn_norm.data(), T, D, eps);
    linear(li, Target::Q, xn.data(), b.q.data(), b, T, p, seed, st);
    linear(li, Target::K, xn.data(), b.k.data(), b, T, p, seed, st);
    linear(li, Target::V, xn.data(), b.v.data(), b, T, p, seed, st);
    ops::rope_forward(b.q.data(), T, H, Hd, 0, rope_cos.data(), rope_sin.data());
    ops::rope_forward(b.k.data(), T, KV, Hd, 0, rope_cos.data(), rope_sin.data());
    attention(b, T, st);
    linear(li, Target::O, att.data(), b.x_mid.data(), b, T, p, seed, st);
    add_into(b.x_mid.data(), x, T * D);
    ops::rmsnorm_forward(xn.data(), b.x_mid.data(), L.ffn_norm.data(), T, D, eps);
    linear(li, Target::Gate, xn.data(), b.gate.data(), b, T, p, seed, st);
    linear(li, Target::Up, xn.data(), b.up.data(), b, T, p, seed, st);
    ops::swiglu_forward(hidden.data(), b.gate.data(), b.up.data(), T * F);
    linear(li, Target::Down, hidden.data(), x_out, b, T, p, seed, st);
    add_into(x_out, b.x_mid.data(), T * D);
    if (streams_weights(T)) L.release_pages();
  }

  // `att` and `probs` from the block's q, k, v.
  void attention(const BlockActs& b, int64_t T, TrainStepStats& st) {
    const auto t0 = Clock::now();
    ops::attention_train_forward(att.data(), probs.data(), b.q.data(), b.k.data(), b.v.data(), T, H,
                                 KV, Hd);
    st.flops += 2.0 * static_cast<double>(H * Hd) * static_cast<double>(T * (T + 1));
    st.attention_seconds += seconds_since(t0);
  }

  // dx: the gradient of the block's output on entry, of its input on return. `fresh`: the
  // block's forward has just run (recomputation), so `att` and `probs` still hold its values.
  void block_backward(int64_t li, int64_t T, float p, uint64_t seed, bool fresh,
                      TrainStepStats& st) override {
    const LayerWeights& L = model.layers[static_cast<size_t>(li)];
    const float eps = model.config.norm_eps;
    BlockActs& b = acts_of(li);
    ops::swiglu_forward(hidden.data(), b.gate.data(), b.up.data(), T * F);
    linear_backward(li, Target::Down, dx.data(), hidden.data(), dgate.data(), false, b, T, p, seed,
                    st);
    ops::swiglu_backward(dgate.data(), dup.data(), dgate.data(), b.gate.data(), b.up.data(), T * F);
    ops::rmsnorm_forward(xn.data(), b.x_mid.data(), L.ffn_norm.data(), T, D, eps);
    linear_backward(li, Target::Gate, dgate.data(), xn.data(), dxn.data(), false, b, T, p, seed,
                    st);
    linear_backward(li, Target::Up, dup.data(), xn.data(), dxn.data(), true, b, T, p, seed, st);
    ops::rmsnorm_backward(dx.data(), dxn.data(), b.x_mid.data(), L.ffn_norm.data(), T, D, eps);

    if (!fresh) attention(b, T, st);
    linear_backward(li, Target::O, dx.data(), att.data(), datt.data(), false, b, T, p, seed, st);
    const auto t_att = Clock::now();
    ops::attention_train_backward(dq.data(), dk.data(), dv.data(), datt.data(), probs.data(),
                                  b.q.data(), b.k.data(), b.v.data(), T, H, KV, Hd,
                                  attn_scratch.data());
    st.flops += 4.0 * static_cast<double>(H * Hd) * static_cast<double>(T * (T + 1));
    st.attention_seconds += seconds_since(t_att);
    ops::rope_backward(dq.data(), T, H, Hd, 0, rope_cos.data(), rope_sin.data());
    ops::rope_backward(dk.data(), T, KV, Hd, 0, rope_cos.data(), rope_sin.data());
    const float* x = x_in[static_cast<size_t>(li)].data();
    ops::rmsnorm_forward(xn.data(), x, L.attn_norm.data(), T, D, eps);
    linear_backward(li, Target::Q, dq.data(), xn.data(), dxn.data(), false, b, T, p, seed, st);
    linear_backward(li, Target::K, dk.data(), xn.data(), dxn.data(), true, b, T, p, seed, st);
    linear_backward(li, Target::V, dv.data(), xn.data(), dxn.data(), true, b, T, p, seed, st);
    ops::rmsnorm_backward(dx.data(), dxn.data(), x, L.attn_norm.data(), T, D, eps);
    if (streams_weights(T)) L.release_pages();
  }

  void embed(std::span<const int32_t> tokens) override {
    const auto T = static_cast<int64_t>(tokens.size());
    float* x = x_in[0].data();
    for (int64_t t = 0; t < T; ++t) {
      const int32_t id = tokens[static_cast<size_t>(t)];
      model.tok_embeddings.decode_rows(id, id + 1, x + t * D);
    }
  }

  // Final norm, head and cross-entropy in chunks of tokens; with `backward`, leaves the
  // gradient of the last block's output in dx.
  double head_loss(int64_t T, float grad_scale, bool backward, TrainStepStats& st) override {
    const auto t0 = Clock::now();
    const float* x_last = x_in.back().data();
    ops::rmsnorm_forward(xf.data(), x_last, model.final_norm.data(), T, D, model.config.norm_eps);
    const Tensor& head = model.head();
    const bool dense_head = !head.empty();
    if (backward) std::fill(dxn.begin(), dxn.begin() + T * D, 0.0f);
    double loss = 0;
    const int64_t chunk = static_cast<int64_t>(losses.size());
    for (int64_t c0 = 0; c0 < T; c0 += chunk) {
      const int64_t n = std::min(chunk, T - c0);
      const int32_t* ids = next_ids.data() + c0;
      // Prompt tokens carry no loss: their logits are never needed.
      if (std::all_of(ids, ids + n, [](int32_t id) { return id < 0; })) continue;
      linear_forward(head, dense_head ? QMatrix() : model.head_q, Tensor(), xf.data() + c0 * D,
                     logits.data(), n, DecodeActivations::Exact);
      loss +=
          ops::cross_entropy_forward_backward(logits.data(), losses.data(), ids, n, V, grad_scale);
      st.flops += matmul_flops(n, D, V);
      if (!backward) continue;
      if (dense_head)
        ops::matmul_backward_input(dxn.data() + c0 * D, logits.data(), head, n);
      else
        qmatmul_backward_input(dxn.data() + c0 * D, logits.data(), model.head_q, n);
      st.flops += matmul_flops(n, D, V);
    }
    if (backward) {
      std::fill(dx.begin(), dx.begin() + T * D, 0.0f);
      ops::rmsnorm_backward(dx.data(), dxn.data(), x_last, model.final_norm.data(), T, D,
                            model.config.norm_eps);
    }
    if (streams_weights(T)) head.release_pages();
    st.head_seconds += seconds_since(t0);
    return loss;
  }

  int64_t activation_bytes() const override {
    size_t floats = xn.size() + hidden.size() + probs.size() + att.size() + xf.size() +
                    logits.size() + losses.size() + dx.size() + dxn.size() + dtmp.size() +
                    datt.size() + dq.size() + dk.size() + dv.size() + dgate.size() + dup.size() +
                    lora_scratch.size() + attn_scratch.size();
    for (const Buf& b : x_in) floats += b.size();
    for (const BlockActs& b : acts) {
      floats += b.q.size() + b.k.size() + b.v.size() + b.x_mid.size() + b.gate.size() + b.up.size();
      for (const Buf& u : b.u) floats += u.size();
    }
    return static_cast<int64_t>(floats * sizeof(float) + next_ids.size() * sizeof(int32_t));
  }
};

std::unique_ptr<TrainSession::Impl> make_step(const Model& model, AdapterSet& adapters,
                                              int64_t max_tokens, TrainStepOptions options) {
#ifdef QALORA_WITH_CUDA
  if (options.device.cuda()) {
    require_device(options.device);
    return make_cuda_train_step(model, adapters, max_tokens, options);
  }
#else
  require_device(options.device);  // refuses a GPU: this build has no CUDA backend
#endif
  return std::make_unique<CpuTrainStep>(model, adapters, max_tokens, options);
}

}  // namespace

TrainSession::TrainSession(const Model& model, AdapterSet& adapters, int64_t max_tokens,
                           TrainStepOptions options)
    : impl_(make_step(model, adapters, max_tokens, options)) {}

TrainSession::~TrainSession() = default;

double TrainSession::forward_backward(std::span<const int32_t> tokens,
                                      std::span<const uint8_t> target, float grad_scale,
                                      uint64_t dropout_seed, int64_t& targets,
                                      const std::function<void(int64_t layer)>& on_layer_done) {
  Impl& m = *impl_;
  m.check_input(tokens, target);
  const auto T = static_cast<int64_t>(tokens.size());
  const int64_t layers = m.model.config.n_layers;
  const float p = m.adapters.config.dropout;
  targets = m.set_next_ids(tokens, target);
  if (targets == 0) return 0.0;
  for (LoraAdapter& a : m.adapters.adapters)
    if (a.grad_A.empty()) {
      a.grad_A.assign(static_cast<size_t>(a.A.numel()), 0.0f);
      a.grad_B.assign(static_cast<size_t>(a.B.numel()), 0.0f);
    }

  const auto t0 = Clock::now();
  m.begin(true);
  m.embed(tokens);
  for (int64_t li = 0; li < layers; ++li) m.block_forward(li, T, p, dropout_seed, stats_);
  m.sync();
  stats_.forward_seconds += seconds_since(t0);

  const auto t1 = Clock::now();
  double recompute_s = 0;
  const double loss = m.head_loss(T, grad_scale, true, stats_);
  for (int64_t li = layers - 1; li >= 0; --li) {
    if (m.options.grad_checkpoint) {
      // Reruns the block from its saved input with the same dropout masks.
      const auto tr = Clock::now();
      m.block_forward(li, T, p, dropout_seed, stats_);
      m.sync();
      recompute_s += seconds_since(tr);
    }
    m.block_backward(li, T, p, dropout_seed, m.options.grad_checkpoint, stats_);
    m.layer_done(li);
    if (on_layer_done) on_layer_done(li);
  }
  m.sync();
  stats_.forward_seconds += recompute_s;
  stats_.backward_seconds += seconds_since(t1) - recompute_s;
  stats_.tokens += T;
  return loss;
}

double TrainSession::loss(std::span<const int32_t> tokens, std::span<const uint8_t> target,
                          int64_t& targets) {
  Impl& m = *impl_;
  m.check_input(tokens, target);
  const auto T = static_cast<int64_t>(tokens.size());
  targets = m.set_next_ids(tokens, target);
  if (targets == 0) return 0.0;
  TrainStepStats unused;
  m.begin(false);
  m.embed(tokens);
  for (int64_t li = 0; li < m.model.config.n_layers; ++li) m.block_forward(li, T, 0.0f, 0, unused);
  return m.head_loss(T, 0.0f, false, unused);
}

int64_t TrainSession::activation_bytes() const {
  return impl_->activation_bytes();
}

void zero_adapter_grads(AdapterSet& adapters) {
  for (LoraAdapter& a : adapters.adapters) {
    a.grad_A.assign(static_cast<size_t>(a.A.numel()), 0.0f);
    a.grad_B.assign(static_cast<size_t>(a.B.numel()), 0.0f);
  }
}

}  // namespace qalora
