#include "qalora/train/train_step.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "qalora/adapters/lora.h"
#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "qalora/core/hash.h"
#include "qalora/core/uninit_vector.h"
#include "qalora/model/runtime.h"
#include "qalora/ops/matmul_stored.h"
#include "qalora/ops/ops.h"
#include "train_backend.h"

namespace qalora {

namespace {

// dx[T, in] (+)= dy[T, out] W for a frozen linear, dense or quantized.
void linear_backward_input(const Linear& l, const ops::Operand& dy, float* dx, int64_t T,
                           bool accumulate) {
  if (l.quantized())
    qmatmul_backward_input(dx, dy, l.qweight, T, accumulate);
  else
    ops::matmul_backward_input(dx, dy, l.weight, T, accumulate);
}

// Residual additions longer than this split across the threads.
constexpr int64_t kParallelAdd = int64_t{1} << 15;

void add_into(float* y, const float* x, int64_t n) {
#pragma omp parallel for simd if (n > kParallelAdd)
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

// Sized for a full packed batch, paid for by the rows a batch writes.
using Buf = UninitVector<float>;

// A block's saved activations (TrainSession::Impl::BlockActs) in host memory.
struct BlockStore {
  Buf q, k, v, x_mid, gate, up;
  Buf u[kNumTargets];
  Buf att, probs;  // [T, QD] and [H, T, T] when the step keeps the attention per block
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
  QL_CHECK(options.max_sequence >= 0 && options.max_sequence <= T,
           "training: the longest sequence ", options.max_sequence, " is outside 0..", T);
  max_sequence = options.max_sequence > 0 ? options.max_sequence : T;
  check_adapters_match(a, m, "adapters");
  next_ids.resize(static_cast<size_t>(T));
}

int64_t TrainSession::Impl::set_batch(std::span<const TrainSequence> batch) {
  QL_CHECK(!batch.empty(), "training: an empty batch");
  tokens.clear(), segments.clear();
  int64_t scored = 0;
  for (const TrainSequence& s : batch) {
    const auto n = static_cast<int64_t>(s.tokens.size());
    QL_CHECK(n > 0 && n <= max_sequence, "training: a sequence of ", n,
             " tokens does not fit the session's 1..", max_sequence, " tokens");
    QL_CHECK(static_cast<int64_t>(tokens.size()) + n <= max_tokens, "training: a batch of ",
             tokens.size() + s.tokens.size(), "+ tokens exceeds the session's ", max_tokens);
    QL_CHECK(s.target.size() == s.tokens.size(), "training: ", s.target.size(),
             " target flags for ", n, " tokens");
    for (int32_t id : s.tokens)
      QL_CHECK(id >= 0 && id < V, "training: token id ", id, " is out of range [0, ", V, ")");
    const auto begin = static_cast<int64_t>(tokens.size());
    segments.push_back({begin, n, s.dropout_seed});
    tokens.insert(tokens.end(), s.tokens.begin(), s.tokens.end());
    for (int64_t t = 0; t < n; ++t) {
      const bool is_scored = t + 1 < n && s.target[static_cast<size_t>(t + 1)];
      next_ids[static_cast<size_t>(begin + t)] =
          is_scored ? s.tokens[static_cast<size_t>(t + 1)] : -1;
      scored += is_scored;
    }
  }
  return scored;
}

const AdapterDropout& TrainSession::Impl::adapter_dropout(int64_t li, Target t, float p) {
  dropout_runs.p = p;
  dropout_runs.runs.clear();
  if (p > 0.0f)
    for (const Segment& s : segments)
      dropout_runs.runs.push_back({s.length, adapter_seed(s.seed, li, t)});
  return dropout_runs;
}

void TrainSession::Impl::block_forward(int64_t li, int64_t T, float p, TrainStepStats& st) {
  const BlockActs b = acts_of(li);
  const float* x = x_in[static_cast<size_t>(li)];
  float* x_out = x_in[static_cast<size_t>(li + 1)];
  norm_forward(xn, x, li, Norm::Attention, T);
  linear(li, Target::Q, xn, b.q, b, T, p, st);
  linear(li, Target::K, xn, b.k, b, T, p, st);
  linear(li, Target::V, xn, b.v, b, T, p, st);
  rope(b.q, H, T, false);
  rope(b.k, KV, T, false);
  attention_forward(li, b, T, st);
  st.flops += 2.0 * static_cast<double>(H * Hd) * static_cast<double>(T * (T + 1));
  linear(li, Target::O, b.att, b.x_mid, b, T, p, st);
  add(b.x_mid, x, T * D);
  norm_forward(xn, b.x_mid, li, Norm::Ffn, T);
  linear(li, Target::Gate, xn, b.gate, b, T, p, st);
  linear(li, Target::Up, xn, b.up, b, T, p, st);
  swiglu_forward(hidden, b.gate, b.up, T * F);
  linear(li, Target::Down, hidden, x_out, b, T, p, st);
  add(x_out, b.x_mid, T * D);
  block_done(li, T);
}

void TrainSession::Impl::block_backward(int64_t li, int64_t T, float p, bool fresh,
                                        TrainStepStats& st) {
  const BlockActs b = acts_of(li);
  swiglu_forward(hidden, b.gate, b.up, T * F);
  linear_backward(li, Target::Down, dx, hidden, dgate, false, b, T, p, st);
  swiglu_backward(dgate, dup, dgate, b.gate, b.up, T * F);
  norm_forward(xn, b.x_mid, li, Norm::Ffn, T);
  linear_backward(li, Target::Gate, dgate, xn, dxn, false, b, T, p, st);
  linear_backward(li, Target::Up, dup, xn, dxn, true, b, T, p, st);
  norm_backward(dx, dxn, b.x_mid, li, Norm::Ffn, T);

  if (!fresh && !keeps_attention()) {
    attention_forward(li, b, T, st);
    st.flops += 2.0 * static_cast<double>(H * Hd) * static_cast<double>(T * (T + 1));
  }
  linear_backward(li, Target::O, dx, b.att, datt, false, b, T, p, st);
  attention_backward(li, b, T, st);
  st.flops += 4.0 * static_cast<double>(H * Hd) * static_cast<double>(T * (T + 1));
  rope(dq, H, T, true);
  rope(dk, KV, T, true);
  const float* x = x_in[static_cast<size_t>(li)];
  norm_forward(xn, x, li, Norm::Attention, T);
  linear_backward(li, Target::Q, dq, xn, dxn, false, b, T, p, st);
  linear_backward(li, Target::K, dk, xn, dxn, true, b, T, p, st);
  linear_backward(li, Target::V, dv, xn, dxn, true, b, T, p, st);
  norm_backward(dx, dxn, x, li, Norm::Attention, T);
  block_done(li, T);
}

namespace {

struct CpuTrainStep final : TrainSession::Impl {
  std::vector<float> rope_cos, rope_sin;
  std::vector<Buf> x_store;       // [n_layers + 1][T, D]
  std::vector<BlockStore> store;  // one per layer, or one shared with grad_checkpoint
  // The shared buffers of the base; att and the softmax probabilities probs [H, T, T] for the
  // attention's backward are shared too unless keep_attention.
  Buf xn_b, hidden_b, probs, att_b;
  bool keep_attention = false;
  Buf xf, logits, losses;  // final norm output [T, D]; [chunk, V]; [chunk]
  Buf dx_b, dxn_b, datt_b, dq_b, dk_b, dv_b, dgate_b, dup_b;
  Buf lora_scratch, attn_scratch;
  // A linear's dy in bf16, converted once for the base's and the adapter's products.
  std::vector<uint16_t> dy_bf16;
  // The frozen head in bf16 for the whole session, where that copy is small next to the
  // activations (head_bf16()): each chunk's forward and backward would convert it again.
  std::vector<uint16_t> head_copy;
  bool head_copy_decided = false;

  CpuTrainStep(const Model& m, AdapterSet& a, int64_t T, TrainStepOptions o) : Impl(m, a, T, o) {
    const ModelConfig& c = m.config;
    rope_tables(c, T, rope_cos, rope_sin);
    const auto n = [&](int64_t k) { return static_cast<size_t>(T * k); };
    x_store.resize(static_cast<size_t>(c.n_layers + 1));
    for (Buf& b : x_store) b.resize(n(D)), x_in.push_back(b.data());
    store.resize(options.grad_checkpoint ? 1 : static_cast<size_t>(c.n_layers));
    // Each block keeps its attention probabilities (the backward then skips recomputing the
    // attention, about a quarter of its work) when they take no more memory than what the
    // block saves anyway: short sequences. With checkpointing the block reruns regardless.
    const int64_t saved = QD + 2 * KVD + D + 2 * F + R * std::ssize(a.config.targets);
    // Segment i's probabilities follow the ones before it. They take attention_probs_floats(T_i)
    // floats, which grows as T_i^2 (H T_i per token, half that in bf16): the largest share per
    // token over the lengths a segment can have bounds their sum.
    int64_t probs_per_token = 0;
    for (int64_t L = 1; L <= max_sequence; ++L)
      probs_per_token =
          std::max(probs_per_token, (ops::attention_probs_floats(L, H, Hd) + L - 1) / L);
    keep_attention = !options.grad_checkpoint && probs_per_token <= saved;
    const int64_t probs_size = probs_per_token * T;
    for (BlockStore& b : store) {
      b.q.resize(n(QD)), b.k.resize(n(KVD)), b.v.resize(n(KVD));
      b.x_mid.resize(n(D)), b.gate.resize(n(F)), b.up.resize(n(F));
      for (Target t : a.config.targets) b.u[static_cast<int>(t)].resize(n(R));
      if (keep_attention) b.att.resize(n(QD)), b.probs.resize(static_cast<size_t>(probs_size));
    }
    xn_b.resize(n(D)), hidden_b.resize(n(F));
    if (!keep_attention) att_b.resize(n(QD)), probs.resize(static_cast<size_t>(probs_size));
    const int64_t chunk = std::min(options.loss_chunk, T);
    xf.resize(n(D)), logits.resize(static_cast<size_t>(chunk * V));
    losses.resize(static_cast<size_t>(chunk));
    dx_b.resize(n(D)), dxn_b.resize(n(D)), datt_b.resize(n(QD));
    dq_b.resize(n(QD)), dk_b.resize(n(KVD)), dv_b.resize(n(KVD));
    dgate_b.resize(n(F)), dup_b.resize(n(F));
    int64_t lora_floats = 0;
    for (const LoraAdapter& ad : a.adapters)
      lora_floats = std::max(lora_floats, lora_scratch_floats(ad, T));
    lora_scratch.resize(static_cast<size_t>(lora_floats));
    attn_scratch.resize(static_cast<size_t>(ops::attention_backward_scratch(max_sequence, H)));
    xn = xn_b.data(), hidden = hidden_b.data();
    dx = dx_b.data(), dxn = dxn_b.data(), datt = datt_b.data();
    dq = dq_b.data(), dk = dk_b.data(), dv = dv_b.data(), dgate = dgate_b.data(),
    dup = dup_b.data();
  }

  bool keeps_attention() const override { return keep_attention; }
  Buf& probs_of(int64_t li) {
    return keep_attention ? store[static_cast<size_t>(li)].probs : probs;
  }

  BlockActs acts_of(int64_t li) override {
    BlockStore& b = store[options.grad_checkpoint ? 0 : static_cast<size_t>(li)];
    BlockActs acts{
        b.q.data(),    b.k.data(),  b.v.data(), b.x_mid.data(),
        b.gate.data(), b.up.data(), {},         keep_attention ? b.att.data() : att_b.data()};
    for (int t = 0; t < kNumTargets; ++t)
      acts.u[static_cast<size_t>(t)] = b.u[t].empty() ? nullptr : b.u[t].data();
    return acts;
  }

  const float* norm_weight(int64_t li, Norm n) const {
    const LayerWeights& L = model.layers[static_cast<size_t>(li)];
    return (n == Norm::Attention ? L.attn_norm : L.ffn_norm).data();
  }
  void norm_forward(float* out, const float* x, int64_t li, Norm n, int64_t T) override {
    ops::rmsnorm_forward(out, x, norm_weight(li, n), T, D, model.config.norm_eps);
  }
  void norm_backward(float* dx_out, const float* dout, const float* x, int64_t li, Norm n,
                     int64_t T) override {
    ops::rmsnorm_backward(dx_out, dout, x, norm_weight(li, n), T, D, model.config.norm_eps);
  }

  void linear(int64_t li, Target t, const float* x, float* y, const BlockActs& b, int64_t T,
              float p, TrainStepStats& st) override {
    const Linear& l = target_linear(model.layers[static_cast<size_t>(li)], t);
    // Exact activations: a short sequence would otherwise take the int8 decode GEMV.
    auto t0 = Clock::now();
    linear_forward(l.weight, l.qweight, l.bias, x, y, T, DecodeActivations::Exact);
    st.flops += matmul_flops(T, l.in_features(), l.out_features());
    st.base_seconds += seconds_since(t0);
    if (const LoraAdapter* a = adapters.find(li, t)) {
      t0 = Clock::now();
      lora_forward(*a, adapters.config.scale(), x, T, adapter_dropout(li, t, p), y,
                   b.u[static_cast<size_t>(t)], lora_scratch.data());
      st.flops += matmul_flops(T, a->a_cols() + a->out, R);
      st.adapter_seconds += seconds_since(t0);
    }
  }

  void linear_backward(int64_t li, Target t, const float* dy, const float* x, float* dx_out,
                       bool accumulate, const BlockActs& b, int64_t T, float p,
                       TrainStepStats& st) override {
    const Linear& l = target_linear(model.layers[static_cast<size_t>(li)], t);
    auto t0 = Clock::now();
    const int64_t O = l.out_features(), I = l.in_features();
    const ops::Operand dy_op = ops::make_operand(dy, T, O, ops::use_bf16(T, I, O), dy_bf16);
    linear_backward_input(l, dy_op, dx_out, T, accumulate);
    st.flops += matmul_flops(T, I, O);
    st.base_seconds += seconds_since(t0);
    if (LoraAdapter* a = adapters.find(li, t)) {
      t0 = Clock::now();
      lora_backward(*a, adapters.config.scale(), dy_op, x, b.u[static_cast<size_t>(t)], T,
                    adapter_dropout(li, t, p), dx_out, lora_scratch.data());
      st.flops += 2.0 * matmul_flops(T, a->a_cols() + a->out, R);
      st.adapter_seconds += seconds_since(t0);
    }
  }

  void rope(float* x, int64_t heads, int64_t, bool backward) override {
    for (const Segment& s : segments)
      (backward ? ops::rope_backward : ops::rope_forward)(x + s.begin * heads * Hd, s.length, heads,
                                                          Hd, 0, rope_cos.data(), rope_sin.data());
  }

  // Each segment attends to itself: the ops on its rows, its probabilities after the previous
  // segments'.
  void attention_forward(int64_t li, const BlockActs& b, int64_t, TrainStepStats& st) override {
    const auto t0 = Clock::now();
    Buf& buf = probs_of(li);
    float* probs_at = buf.data();
    int64_t used = 0;
    for (const Segment& s : segments) {
      const int64_t floats = ops::attention_probs_floats(s.length, H, Hd);
      // Sized for the compute type at the session's start; a switch to fp32 would need more.
      QL_CHECK(used + floats <= std::ssize(buf), "attention probabilities need ", used + floats,
               " floats, the session holds ", buf.size(), " (compute type changed since?)");
      ops::attention_train_forward(b.att + s.begin * QD, probs_at, b.q + s.begin * QD,
                                   b.k + s.begin * KVD, b.v + s.begin * KVD, s.length, H, KV, Hd);
      probs_at += floats;
      used += floats;
    }
    st.attention_seconds += seconds_since(t0);
  }

  void attention_backward(int64_t li, const BlockActs& b, int64_t, TrainStepStats& st) override {
    const auto t0 = Clock::now();
    const float* probs_at = probs_of(li).data();
    for (const Segment& s : segments) {
      ops::attention_train_backward(dq + s.begin * QD, dk + s.begin * KVD, dv + s.begin * KVD,
                                    datt + s.begin * QD, probs_at, b.q + s.begin * QD,
                                    b.k + s.begin * KVD, b.v + s.begin * KVD, s.length, H, KV, Hd,
                                    attn_scratch.data());
      probs_at += ops::attention_probs_floats(s.length, H, Hd);
    }
    st.attention_seconds += seconds_since(t0);
  }

  void add(float* y, const float* x, int64_t n) override { add_into(y, x, n); }
  void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) override {
    ops::swiglu_forward(out, gate, up, n);
  }
  void swiglu_backward(float* dg, float* du, const float* dout, const float* gate, const float* up,
                       int64_t n) override {
    ops::swiglu_backward(dg, du, dout, gate, up, n);
  }
  void block_done(int64_t li, int64_t T) override {
    if (streams_weights(T)) model.layers[static_cast<size_t>(li)].release_pages();
  }

  void embed() override {
    const auto T = static_cast<int64_t>(tokens.size());
    float* x = x_in[0];
    for (int64_t t = 0; t < T; ++t) {
      const int32_t id = tokens[static_cast<size_t>(t)];
      model.tok_embeddings.decode_rows(id, id + 1, x + t * D);
    }
  }

  // The dense head in bf16 where its products over n tokens run in bf16: as stored where it is
  // stored in bf16, else a copy where that takes at most an eighth of the activation buffers
  // (converted once per session); else null.
  const uint16_t* head_bf16(int64_t n) {
    if (!ops::use_bf16(n, V, D)) return nullptr;
    if (const uint16_t* stored = model.head().bf16_values()) return stored;
    if (!head_copy_decided) {
      head_copy_decided = true;
      const Tensor& head = model.head();
      if (!head.empty() &&
          8 * V * D * static_cast<int64_t>(sizeof(uint16_t)) <= activation_bytes()) {
        head_copy.resize(static_cast<size_t>(V * D));
        ops::to_bf16(head, head_copy.data());
      }
    }
    return head_copy.empty() ? nullptr : head_copy.data();
  }

  // Final norm, head and cross-entropy in chunks of tokens; with `backward`, leaves the
  // gradient of the last block's output in dx.
  double head_loss(int64_t T, float grad_scale, bool backward, TrainStepStats& st) override {
    const auto t0 = Clock::now();
    const float* x_last = x_in.back();
    ops::rmsnorm_forward(xf.data(), x_last, model.final_norm.data(), T, D, model.config.norm_eps);
    const Tensor& head = model.head();
    const bool dense_head = !head.empty();
    if (backward) std::fill(dxn, dxn + T * D, 0.0f);
    double loss = 0;
    const int64_t chunk = static_cast<int64_t>(losses.size());
    for (int64_t c0 = 0; c0 < T; c0 += chunk) {
      const int64_t n = std::min(chunk, T - c0);
      const int32_t* ids = next_ids.data() + c0;
      // Prompt tokens carry no loss: their logits are never needed.
      if (std::all_of(ids, ids + n, [](int32_t id) { return id < 0; })) continue;
      const uint16_t* head16 = head_bf16(n);
      if (head16 != nullptr)
        ops::gemm_bf16(false, true, n, V, D, 1.0f, xf.data() + c0 * D, D, {nullptr, head16}, D,
                       0.0f, logits.data(), V);
      else
        linear_forward(head, dense_head ? QMatrix() : model.head_q, Tensor(), xf.data() + c0 * D,
                       logits.data(), n, DecodeActivations::Exact);
      loss +=
          ops::cross_entropy_forward_backward(logits.data(), losses.data(), ids, n, V, grad_scale);
      st.flops += matmul_flops(n, D, V);
      if (!backward) continue;
      if (head16 != nullptr)
        ops::gemm_bf16(false, false, n, D, V, 1.0f, logits.data(), V, {nullptr, head16}, D, 0.0f,
                       dxn + c0 * D, D);
      else if (dense_head)
        ops::matmul_backward_input(dxn + c0 * D, logits.data(), head, n);
      else
        qmatmul_backward_input(dxn + c0 * D, logits.data(), model.head_q, n);
      st.flops += matmul_flops(n, D, V);
    }
    if (backward) {
      std::fill(dx, dx + T * D, 0.0f);
      ops::rmsnorm_backward(dx, dxn, x_last, model.final_norm.data(), T, D, model.config.norm_eps);
    }
    if (streams_weights(T)) {
      head.release_pages();
      model.head_q.release_pages();
    }
    st.head_seconds += seconds_since(t0);
    return loss;
  }

  int64_t activation_bytes() const override {
    size_t floats = 0;
    for (const Buf* b :
         {&xn_b, &hidden_b, &probs, &att_b, &xf, &logits, &losses, &dx_b, &dxn_b, &datt_b, &dq_b,
          &dk_b, &dv_b, &dgate_b, &dup_b, &lora_scratch, &attn_scratch})
      floats += b->size();
    for (const Buf& b : x_store) floats += b.size();
    for (const BlockStore& b : store) {
      floats += b.q.size() + b.k.size() + b.v.size() + b.x_mid.size() + b.gate.size() +
                b.up.size() + b.att.size() + b.probs.size();
      for (const Buf& u : b.u) floats += u.size();
    }
    return static_cast<int64_t>(floats * sizeof(float) + next_ids.size() * sizeof(int32_t) +
                                (dy_bf16.size() + head_copy.size()) * sizeof(uint16_t));
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
  const TrainSequence one{tokens, target, dropout_seed};
  return forward_backward({&one, 1}, grad_scale, targets, on_layer_done);
}

double TrainSession::forward_backward(std::span<const TrainSequence> batch, float grad_scale,
                                      int64_t& targets,
                                      const std::function<void(int64_t layer)>& on_layer_done) {
  Impl& m = *impl_;
  targets = m.set_batch(batch);
  if (targets == 0) return 0.0;
  const auto T = static_cast<int64_t>(m.tokens.size());
  const int64_t layers = m.model.config.n_layers;
  const float p = m.adapters.config.dropout;
  for (LoraAdapter& a : m.adapters.adapters)
    if (a.grad_A.empty()) {
      a.grad_A.assign(static_cast<size_t>(a.A.numel()), 0.0f);
      a.grad_B.assign(static_cast<size_t>(a.B.numel()), 0.0f);
    }

  const auto t0 = Clock::now();
  m.begin(true);
  m.embed();
  for (int64_t li = 0; li < layers; ++li) m.block_forward(li, T, p, stats_);
  m.sync();
  stats_.forward_seconds += seconds_since(t0);

  const auto t1 = Clock::now();
  double recompute_s = 0;
  const double loss = m.head_loss(T, grad_scale, true, stats_);
  for (int64_t li = layers - 1; li >= 0; --li) {
    if (m.options.grad_checkpoint) {
      // Reruns the block from its saved input with the same dropout masks.
      const auto tr = Clock::now();
      m.block_forward(li, T, p, stats_);
      m.sync();
      recompute_s += seconds_since(tr);
    }
    m.block_backward(li, T, p, m.options.grad_checkpoint, stats_);
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
  const TrainSequence one{tokens, target, 0};
  targets = m.set_batch({&one, 1});
  if (targets == 0) return 0.0;
  const auto T = static_cast<int64_t>(m.tokens.size());
  TrainStepStats unused;
  m.begin(false);
  m.embed();
  for (int64_t li = 0; li < m.model.config.n_layers; ++li) m.block_forward(li, T, 0.0f, unused);
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
