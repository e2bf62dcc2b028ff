// The training step on a CUDA GPU: the CPU step's schedule (TrainSession in train_step.cpp)
// over the ops of kernels.h. Weights are uploaded once; frozen linears run as bf16 tensor-core
// products with fp32 accumulation, dequantizing quantized weights into one reused buffer;
// adapters, norms, softmax and the loss stay fp32. The adapters' parameters go up at the start
// of each forward and their gradients come back layer by layer, so the host's optimizer,
// checkpoints and data-parallel reduction are the CPU run's.
#include <algorithm>
#include <array>
#include <vector>

#include "device_weights.h"
#include "kernels.h"
#include "qalora/model/model.h"
#include "runtime.h"
#include "train/train_backend.h"

namespace qalora {

namespace {

using Floats = cuda::DeviceBuffer<float>;

// The adapters' products on the tensor cores: with r = 64 against 4096-wide layers they would
// otherwise take, in fp32, about as long as the frozen layers' bf16 products.
constexpr auto kAdapterMath = cuda::Blas::Fp32Math::Tf32;

struct DeviceLinear {
  int64_t in = 0, out = 0;
  std::unique_ptr<cuda::DeviceQMatrix> q;  // quantized, or else:
  cuda::DeviceBuffer<uint16_t> dense;      // [out, in] bf16
  Floats bias;                             // [out] or empty

  DeviceLinear(const Tensor& weight, const QMatrix& qweight, const Tensor& b) {
    if (!qweight.codes.empty()) {
      q = std::make_unique<cuda::DeviceQMatrix>(qweight);
      in = qweight.cols, out = qweight.rows;
    } else {
      dense = cuda::upload_bf16(weight);
      in = weight.dim(1), out = weight.dim(0);
    }
    if (!b.empty()) bias.upload(b.span());
  }
};

struct DeviceLayer {
  Floats attn_norm, ffn_norm;
  std::vector<DeviceLinear> linears;  // by Target
};

struct DeviceAdapter {
  Floats A, B, grad_A, grad_B;
};

// A block's saved activations (TrainSession::Impl::BlockActs) in GPU memory.
struct BlockStore {
  Floats q, k, v, x_mid, gate, up;
  std::array<Floats, kNumTargets> u;
  Floats att, lse;  // the attention's output [T, QD] and log-sum-exp per row [H, T]
};

struct CudaTrainStep final : TrainSession::Impl {
  std::unique_ptr<cuda::Blas> blas_handle;  // made once the session's device is current
  std::vector<DeviceLayer> layers;
  Floats final_norm;
  std::unique_ptr<DeviceLinear> head;
  std::vector<DeviceAdapter> dev_adapters;  // parallel to adapters.adapters
  Floats rope_cos, rope_sin;
  std::vector<Floats> x_store;  // [n_layers + 1][T, D]
  std::vector<BlockStore> store;
  // The base's shared buffers; delta [H, T] for the attention's backward.
  Floats xn_b, hidden_b, delta, xf, logits, losses;
  Floats dx_b, dxn_b, datt_b, dq_b, dk_b, dv_b, dgate_b, dup_b, lora_scratch;
  cuda::DeviceBuffer<uint16_t> act_bf16, weight_bf16;
  cuda::DeviceBuffer<int32_t> d_next_ids, d_rows;
  // The batch's rows, per token, in d_rows: position in its sequence, its sequence's first row
  // and end (set by embed).
  const int32_t *positions = nullptr, *seq_begin = nullptr, *seq_end = nullptr;
  std::vector<float> host_x, host_losses, host_grad;
  std::vector<int32_t> host_rows;

  CudaTrainStep(const Model& m, AdapterSet& a, int64_t T, TrainStepOptions o) : Impl(m, a, T, o) {
    QL_CUDA(cudaSetDevice(options.device.index));
    blas_handle = std::make_unique<cuda::Blas>();
    const ModelConfig& c = m.config;
    int64_t widest_weight = 0;
    for (const LayerWeights& L : m.layers) {
      DeviceLayer& d = layers.emplace_back();
      d.attn_norm.upload(L.attn_norm.span());
      d.ffn_norm.upload(L.ffn_norm.span());
      for (int t = 0; t < kNumTargets; ++t) {
        const Linear& l = target_linear(L, static_cast<Target>(t));
        const DeviceLinear& dl = d.linears.emplace_back(l.weight, l.qweight, l.bias);
        if (dl.q) widest_weight = std::max(widest_weight, dl.in * dl.out);
      }
      L.release_pages();  // the host copy is not read again
    }
    final_norm.upload(m.final_norm.span());
    const Tensor& h = m.head();
    head = h.empty() ? std::make_unique<DeviceLinear>(Tensor(), m.head_q, Tensor())
                     : std::make_unique<DeviceLinear>(h, QMatrix(), Tensor());
    if (head->q) widest_weight = std::max(widest_weight, head->in * head->out);
    weight_bf16.resize(widest_weight);
    for (const LoraAdapter& ad : a.adapters) {
      DeviceAdapter& d = dev_adapters.emplace_back();
      d.A.resize(ad.A.numel()), d.B.resize(ad.B.numel());
      d.grad_A.resize(ad.A.numel()), d.grad_B.resize(ad.B.numel());
    }

    std::vector<float> cos, sin;
    rope_tables(c, T, cos, sin);
    rope_cos.upload(cos), rope_sin.upload(sin);
    x_store.resize(static_cast<size_t>(c.n_layers + 1));
    for (Floats& b : x_store) b.resize(T * D), x_in.push_back(b.data());
    store.resize(options.grad_checkpoint ? 1 : static_cast<size_t>(c.n_layers));
    for (BlockStore& b : store) {
      b.q.resize(T * QD), b.k.resize(T * KVD), b.v.resize(T * KVD);
      b.x_mid.resize(T * D), b.gate.resize(T * F), b.up.resize(T * F);
      for (Target t : a.config.targets) b.u[static_cast<int>(t)].resize(T * R);
      b.att.resize(T * QD), b.lse.resize(H * T);  // small: every block keeps its attention
    }
    const int64_t chunk = std::min(options.loss_chunk, T), widest = std::max({D, F, QD});
    xn_b.resize(T * D), hidden_b.resize(T * F), delta.resize(H * T);
    xf.resize(T * D), logits.resize(chunk * V), losses.resize(chunk);
    dx_b.resize(T * D), dxn_b.resize(T * D), datt_b.resize(T * QD);
    dq_b.resize(T * QD), dk_b.resize(T * KVD), dv_b.resize(T * KVD);
    dgate_b.resize(T * F), dup_b.resize(T * F);
    lora_scratch.resize(T * (widest + R));
    xn = xn_b.data(), hidden = hidden_b.data();
    dx = dx_b.data(), dxn = dxn_b.data(), datt = datt_b.data();
    dq = dq_b.data(), dk = dk_b.data(), dv = dv_b.data(), dgate = dgate_b.data(),
    dup = dup_b.data();
    act_bf16.resize(std::max(T * widest, chunk * V));
    d_next_ids.resize(T), d_rows.resize(3 * T);
    host_x.resize(static_cast<size_t>(T * D));
    host_losses.resize(static_cast<size_t>(chunk));
  }

  cuda::Blas& blas() { return *blas_handle; }

  BlockActs acts_of(int64_t li) override {
    BlockStore& b = store[options.grad_checkpoint ? 0 : static_cast<size_t>(li)];
    BlockActs acts{b.q.data(),    b.k.data(),  b.v.data(), b.x_mid.data(),
                   b.gate.data(), b.up.data(), {},         b.att.data()};
    for (size_t t = 0; t < b.u.size(); ++t) acts.u[t] = b.u[t].data();
    return acts;
  }
  DeviceAdapter& dev_adapter(const LoraAdapter& a) {
    return dev_adapters[static_cast<size_t>(&a - adapters.adapters.data())];
  }

  const uint16_t* weight_of(const DeviceLinear& l) {
    if (!l.q) return l.dense.data();
    cuda::dequantize_bf16(l.q->view, weight_bf16.data());
    return weight_bf16.data();
  }

  // y[T, out] = x W^T (+ bias), or with beta = 1 added to y.
  void base_forward(const DeviceLinear& l, const float* x, float* y, int64_t T) {
    cuda::to_bf16(x, act_bf16.data(), T * l.in);
    blas().gemm_bf16(false, true, T, l.out, l.in, 1.0f, act_bf16.data(), l.in, weight_of(l), l.in,
                     0.0f, y, l.out);
    if (l.bias.size() > 0) cuda::add_bias(y, l.bias.data(), T, l.out);
  }

  // dx[T, in] = dy W (beta 0) or dx += dy W (beta 1).
  void base_backward(const DeviceLinear& l, const float* dy, float* dx_out, int64_t T, float beta) {
    cuda::to_bf16(dy, act_bf16.data(), T * l.out);
    blas().gemm_bf16(false, false, T, l.in, l.out, 1.0f, act_bf16.data(), l.out, weight_of(l), l.in,
                     beta, dx_out, l.in);
  }

  // Each sequence's rows of x [T, C] with its own mask (as dropout_forward over runs).
  static void dropout(float* x, int64_t C, const AdapterDropout& d) {
    int64_t row = 0;
    for (const DropoutRun& run : d.runs) {
      cuda::dropout_forward(x + row * C, run.rows, C, d.p, run.seed);
      row += run.rows;
    }
  }

  // The adapter's input dropout(x) or dropout(P(x)) [T, C]: x itself when neither applies.
  const float* adapter_input(const LoraAdapter& a, const float* x, int64_t T,
                             const AdapterDropout& d) {
    if (!a.pooled() && d.p == 0.0f) return x;
    float* xin = lora_scratch.data();
    if (a.pooled())
      cuda::pool_groups_forward(xin, x, T, a.in, a.group_size, a.pool == AdapterPool::Average);
    else
      QL_CUDA(cudaMemcpy(xin, x, static_cast<size_t>(T * a.in) * sizeof(float),
                         cudaMemcpyDeviceToDevice));
    dropout(xin, a.a_cols(), d);
    return xin;
  }

  void linear(int64_t li, Target t, const float* x, float* y, const BlockActs& b, int64_t T,
              float p, TrainStepStats& st) override {
    const DeviceLinear& l = layers[static_cast<size_t>(li)].linears[static_cast<size_t>(t)];
    base_forward(l, x, y, T);
    st.flops += matmul_flops(T, l.in, l.out);
    const LoraAdapter* a = adapters.find(li, t);
    if (a == nullptr) return;
    const DeviceAdapter& d = dev_adapter(*a);
    const int64_t C = a->a_cols(), O = a->out;
    float* u = b.u[static_cast<size_t>(t)];
    const float* xin = adapter_input(*a, x, T, adapter_dropout(li, t, p));
    blas().sgemm(false, true, T, R, C, 1.0f, xin, C, d.A.data(), C, 0.0f, u, R, kAdapterMath);
    blas().sgemm(false, true, T, O, R, adapters.config.scale(), u, R, d.B.data(), R, 1.0f, y, O,
                 kAdapterMath);
    st.flops += matmul_flops(T, C + O, R);
  }

  // As lora_backward on the CPU: gradients of B and A, then the input gradient.
  void linear_backward(int64_t li, Target t, const float* dy, const float* x, float* dx_out,
                       bool accumulate, const BlockActs& b, int64_t T, float p,
                       TrainStepStats& st) override {
    const DeviceLinear& l = layers[static_cast<size_t>(li)].linears[static_cast<size_t>(t)];
    base_backward(l, dy, dx_out, T, accumulate ? 1.0f : 0.0f);
    st.flops += matmul_flops(T, l.in, l.out);
    const LoraAdapter* a = adapters.find(li, t);
    if (a == nullptr) return;
    DeviceAdapter& d = dev_adapter(*a);
    const int64_t C = a->a_cols(), O = a->out, I = a->in;
    const float scale = adapters.config.scale();
    const AdapterDropout& drop = adapter_dropout(li, t, p);
    float* g = lora_scratch.data() + T * C;  // [T, r] = scale * dy B
    blas().sgemm(false, false, T, R, O, scale, dy, O, d.B.data(), R, 0.0f, g, R, kAdapterMath);
    blas().sgemm(true, false, O, R, T, scale, dy, O, b.u[static_cast<size_t>(t)], R, 1.0f,
                 d.grad_B.data(), R, kAdapterMath);
    const float* xin = adapter_input(*a, x, T, drop);
    blas().sgemm(true, false, R, C, T, 1.0f, g, R, xin, C, 1.0f, d.grad_A.data(), C, kAdapterMath);
    st.flops += 2.0 * matmul_flops(T, C + O, R);
    if (!a->pooled() && p == 0.0f) {
      blas().sgemm(false, false, T, I, R, 1.0f, g, R, d.A.data(), C, 1.0f, dx_out, I, kAdapterMath);
      return;
    }
    float* dxin = lora_scratch.data();
    blas().sgemm(false, false, T, C, R, 1.0f, g, R, d.A.data(), C, 0.0f, dxin, C, kAdapterMath);
    dropout(dxin, C, drop);  // the scaled mask is its own adjoint
    if (a->pooled())
      cuda::pool_groups_backward(dx_out, dxin, T, I, a->group_size,
                                 a->pool == AdapterPool::Average);
    else
      cuda::add_into(dx_out, dxin, T * I);
  }

  void embed() override {
    const auto T = static_cast<int64_t>(tokens.size());
    for (int64_t t = 0; t < T; ++t) {
      const int32_t id = tokens[static_cast<size_t>(t)];
      model.tok_embeddings.decode_rows(id, id + 1, host_x.data() + t * D);
    }
    QL_CUDA(cudaMemcpy(x_in[0], host_x.data(), static_cast<size_t>(T * D) * sizeof(float),
                       cudaMemcpyHostToDevice));
    // Per token: its position in its sequence, and the rows of that sequence.
    host_rows.resize(static_cast<size_t>(3 * T));
    for (const Segment& s : segments)
      for (int64_t t = s.begin; t < s.begin + s.length; ++t) {
        host_rows[static_cast<size_t>(t)] = static_cast<int32_t>(t - s.begin);
        host_rows[static_cast<size_t>(T + t)] = static_cast<int32_t>(s.begin);
        host_rows[static_cast<size_t>(2 * T + t)] = static_cast<int32_t>(s.begin + s.length);
      }
    QL_CUDA(cudaMemcpy(d_next_ids.data(), next_ids.data(), static_cast<size_t>(T) * sizeof(int32_t),
                       cudaMemcpyHostToDevice));
    QL_CUDA(cudaMemcpy(d_rows.data(), host_rows.data(), host_rows.size() * sizeof(int32_t),
                       cudaMemcpyHostToDevice));
    positions = d_rows.data(), seq_begin = positions + T, seq_end = positions + 2 * T;
  }

  const float* norm_weight(int64_t li, Norm n) const {
    const DeviceLayer& L = layers[static_cast<size_t>(li)];
    return (n == Norm::Attention ? L.attn_norm : L.ffn_norm).data();
  }
  void norm_forward(float* out, const float* x, int64_t li, Norm n, int64_t T) override {
    cuda::rmsnorm_forward(out, x, norm_weight(li, n), T, D, model.config.norm_eps);
  }
  void norm_backward(float* dx_out, const float* dout, const float* x, int64_t li, Norm n,
                     int64_t T) override {
    cuda::rmsnorm_backward(dx_out, dout, x, norm_weight(li, n), T, D, model.config.norm_eps);
  }
  void rope(float* x, int64_t heads, int64_t T, bool backward) override {
    (backward ? cuda::rope_backward : cuda::rope_forward)(x, T, heads, Hd, positions,
                                                          rope_cos.data(), rope_sin.data());
  }
  bool keeps_attention() const override { return !options.grad_checkpoint; }
  float* lse_of(int64_t li) {
    return store[options.grad_checkpoint ? 0 : static_cast<size_t>(li)].lse.data();
  }
  void attention_forward(int64_t li, const BlockActs& b, int64_t T, TrainStepStats&) override {
    cuda::attention_forward(b.att, lse_of(li), b.q, b.k, b.v, seq_begin, T, H, KV, Hd);
  }
  void attention_backward(int64_t li, const BlockActs& b, int64_t T, TrainStepStats&) override {
    cuda::attention_backward(dq, dk, dv, delta.data(), datt, b.att, lse_of(li), b.q, b.k, b.v,
                             seq_begin, seq_end, T, H, KV, Hd);
  }
  void add(float* y, const float* x, int64_t n) override { cuda::add_into(y, x, n); }
  void swiglu_forward(float* out, const float* gate, const float* up, int64_t n) override {
    cuda::swiglu_forward(out, gate, up, n);
  }
  void swiglu_backward(float* dg, float* du, const float* dout, const float* gate, const float* up,
                       int64_t n) override {
    cuda::swiglu_backward(dg, du, dout, gate, up, n);
  }

  double head_loss(int64_t T, float grad_scale, bool backward, TrainStepStats& st) override {
    const float* x_last = x_in.back();
    cuda::rmsnorm_forward(xf.data(), x_last, final_norm.data(), T, D, model.config.norm_eps);
    if (backward) QL_CUDA(cudaMemset(dxn, 0, static_cast<size_t>(T * D) * sizeof(float)));
    double loss = 0;
    const int64_t chunk = losses.size();
    for (int64_t c0 = 0; c0 < T; c0 += chunk) {
      const int64_t n = std::min(chunk, T - c0);
      const int32_t* ids = next_ids.data() + c0;
      if (std::all_of(ids, ids + n, [](int32_t id) { return id < 0; })) continue;
      base_forward(*head, xf.data() + c0 * D, logits.data(), n);
      cuda::cross_entropy(logits.data(), losses.data(), d_next_ids.data() + c0, n, V, grad_scale);
      losses.download({host_losses.data(), static_cast<size_t>(n)});
      for (int64_t i = 0; i < n; ++i) loss += host_losses[static_cast<size_t>(i)];
      st.flops += matmul_flops(n, D, V);
      if (!backward) continue;
      base_backward(*head, logits.data(), dxn + c0 * D, n, 0.0f);
      st.flops += matmul_flops(n, D, V);
    }
    if (backward) {
      QL_CUDA(cudaMemset(dx, 0, static_cast<size_t>(T * D) * sizeof(float)));
      cuda::rmsnorm_backward(dx, dxn, x_last, final_norm.data(), T, D, model.config.norm_eps);
    }
    return loss;
  }

  void begin(bool gradients) override {
    for (const LoraAdapter& a : adapters.adapters) {
      DeviceAdapter& d = dev_adapter(a);
      d.A.upload(a.A.span());
      d.B.upload(a.B.span());
      if (gradients) d.grad_A.zero(), d.grad_B.zero();
    }
  }

  void layer_done(int64_t li) override {
    for (LoraAdapter& a : adapters.adapters) {
      if (a.layer != li) continue;
      const DeviceAdapter& d = dev_adapter(a);
      add_download(d.grad_A, a.grad_A);
      add_download(d.grad_B, a.grad_B);
    }
  }

  void add_download(const Floats& device, std::vector<float>& host) {
    host_grad.resize(host.size());
    device.download(host_grad);
    for (size_t i = 0; i < host.size(); ++i) host[i] += host_grad[i];
  }

  void sync() override { QL_CUDA(cudaDeviceSynchronize()); }

  int64_t activation_bytes() const override {
    int64_t bytes = 0;
    for (const Floats* b : {&xn_b, &hidden_b, &delta, &xf, &logits, &losses, &dx_b, &dxn_b, &datt_b,
                            &dq_b, &dk_b, &dv_b, &dgate_b, &dup_b, &lora_scratch})
      bytes += b->bytes();
    for (const Floats& b : x_store) bytes += b.bytes();
    for (const BlockStore& b : store) {
      for (const Floats* f : {&b.q, &b.k, &b.v, &b.x_mid, &b.gate, &b.up, &b.att, &b.lse})
        bytes += f->bytes();
      for (const Floats& u : b.u) bytes += u.bytes();
    }
    return bytes + act_bf16.bytes() + weight_bf16.bytes() + d_next_ids.bytes() + d_rows.bytes();
  }
};

}  // namespace

std::unique_ptr<TrainSession::Impl> make_cuda_train_step(const Model& model, AdapterSet& adapters,
                                                         int64_t max_tokens,
                                                         TrainStepOptions options) {
  return std::make_unique<CudaTrainStep>(model, adapters, max_tokens, options);
}

}  // namespace qalora
