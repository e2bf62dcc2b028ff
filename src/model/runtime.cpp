#include "qalora/model/runtime.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "qalora/adapters/lora.h"
#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "qalora/ops/matmul_stored.h"
#include "qalora/ops/ops.h"
#include "qalora/quant/qmatrix.h"

namespace qalora {

void set_num_threads(int threads) {
  const int n = threads > 0 ? threads : omp_get_num_procs();
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

int num_threads() {
  return omp_get_max_threads();
}

InferenceSession::InferenceSession(const Model& model, int64_t max_context,
                                   const AdapterSet* adapters)
    : model_(model), adapters_(adapters) {
  if (adapters_) check_adapters_match(*adapters_, model, "--adapter");
  const ModelConfig& c = model.config;
  max_ctx_ = max_context > 0 ? max_context : std::min<int64_t>(c.context_length, 4096);
  QL_CHECK(max_ctx_ > 0, model.source_path, ": context length must be positive, got ", max_ctx_);
  const auto cache = static_cast<size_t>(c.n_layers * c.n_kv_heads * max_ctx_ * c.head_dim);
  k_cache_.assign(cache, 0.0f);
  v_cache_.assign(cache, 0.0f);
  rope_tables(c, max_ctx_, rope_cos_, rope_sin_);
}

InferenceSession::~InferenceSession() = default;

void InferenceSession::truncate(int64_t pos) {
  QL_CHECK(pos >= 0 && pos <= pos_, "cannot truncate the KV cache to position ", pos, ": it holds ",
           pos_, " positions");
  pos_ = pos;
}

void InferenceSession::ensure_buffers(int64_t T) {
  const ModelConfig& c = model_.config;
  auto grow = [](std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  };
  grow(x_, T * c.dim);
  grow(xn_, T * c.dim);
  grow(q_, T * c.q_dim());
  grow(k_, T * c.kv_dim());
  grow(v_, T * c.kv_dim());
  grow(att_, T * std::max(c.q_dim(), c.dim));
  grow(gate_, T * c.hidden_dim);
  grow(up_, T * c.hidden_dim);
}

void InferenceSession::linear(const Linear& l, const float* x, float* y, int64_t T) {
  project(l.weight, l.qweight, l.bias, x, y, T);
}

void linear_forward(const Tensor& weight, const QMatrix& qweight, const Tensor& bias,
                    const float* x, float* y, int64_t T, DecodeActivations activations) {
  const float* b = bias.empty() ? nullptr : bias.data();
  if (!qweight.codes.empty())
    qmatmul_forward(y, x, qweight, b, T, activations);
  else
    ops::matmul_forward(y, x, weight, b, T);
}

void linear_forward_shared(std::span<const LinearOutput> outputs, const float* x, int64_t T) {
  thread_local std::vector<QProduct> products;  // reused: this runs several times per layer
  products.clear();
  for (const LinearOutput& o : outputs) {
    const Linear& l = *o.linear;
    if (l.quantized())
      products.push_back({&l.qweight, l.bias.empty() ? nullptr : l.bias.data(), o.y});
    else
      linear_forward(l, x, o.y, T);
  }
  qmatmul_forward_shared(products, x, T);
}

void InferenceSession::linears(std::span<const LinearOutput> outputs, const float* x, int64_t T) {
  const auto t0 = Clock::now();
  linear_forward_shared(outputs, x, T);
  stats_.linear_seconds += seconds_since(t0);
  for (const LinearOutput& o : outputs)
    stats_.linear_flops += 2.0 * static_cast<double>(T) *
                           static_cast<double>(o.linear->in_features() * o.linear->out_features());
}

void InferenceSession::adapt(int64_t layer, Target target, const float* x, float* y, int64_t T) {
  if (observer_) observer_(layer, target, x, T);
  const LoraAdapter* a = adapters_ ? adapters_->find(layer, target) : nullptr;
  if (!a) return;
  const auto t0 = Clock::now();
  const auto need = [](std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  };
  need(adapter_u_, T * a->rank());
  need(adapter_in_, T * a->a_cols());
  lora_forward(*a, adapters_->config.scale(), x, T, {}, y, adapter_u_.data(), adapter_in_.data());
  stats_.linear_seconds += seconds_since(t0);
  stats_.linear_flops +=
      2.0 * static_cast<double>(T * a->rank()) * static_cast<double>(a->a_cols() + a->out);
}

void InferenceSession::project(const Tensor& weight, const QMatrix& qweight, const Tensor& bias,
                               const float* x, float* y, int64_t T, DecodeActivations activations) {
  const auto t0 = Clock::now();
  linear_forward(weight, qweight, bias, x, y, T, activations);
  const bool quantized = !qweight.codes.empty();
  const int64_t in = quantized ? qweight.cols : weight.dim(1);
  const int64_t out = quantized ? qweight.rows : weight.dim(0);
  stats_.linear_seconds += seconds_since(t0);
  stats_.linear_flops += 2.0 * static_cast<double>(T) * static_cast<double>(in * out);
}

void InferenceSession::forward(std::span<const int32_t> tokens, std::span<float> logits,
                               bool all_logits) {
  const auto T = static_cast<int64_t>(tokens.size());
  std::vector<int64_t> rows(all_logits ? static_cast<size_t>(T) : 1);
  std::iota(rows.begin(), rows.end(), all_logits ? 0 : T - 1);
  run(tokens, nullptr, rows, logits);
}

void InferenceSession::forward_packed(std::span<const int32_t> tokens, const PackedLayout& layout,
                                      std::span<const int64_t> rows, std::span<float> logits) {
  const auto T = static_cast<int64_t>(tokens.size());
  QL_CHECK(std::ssize(layout.positions) == T && std::ssize(layout.visible) == T,
           "forward_packed: a layout of ", layout.positions.size(), " positions and ",
           layout.visible.size(), " visibility entries for ", T, " tokens");
  for (int64_t p : layout.positions)
    QL_CHECK(p >= 0 && p < max_ctx_, "forward_packed: position ", p, " is outside the ", max_ctx_,
             "-token context");
  run(tokens, &layout, rows, logits);
}

void InferenceSession::run(std::span<const int32_t> tokens, const PackedLayout* layout,
                           std::span<const int64_t> rows, std::span<float> logits) {
  const auto t_start = Clock::now();
  const ModelConfig& c = model_.config;
  const auto T = static_cast<int64_t>(tokens.size());
  QL_CHECK(T > 0, "forward: no tokens to process (empty prompt?)");
  QL_CHECK(pos_ + T <= max_ctx_, "context full: ", pos_, " cached + ", T, " new tokens exceed the ",
           max_ctx_, "-token context (use --ctx to enlarge it)");
  for (int32_t id : tokens)
    QL_CHECK(id >= 0 && id < c.vocab_size, "token id ", id, " is out of range [0, ", c.vocab_size,
             ")");
  const auto rows_out = std::ssize(rows);
  for (int64_t r : rows)
    QL_CHECK(r >= 0 && r < T, "forward: logits of row ", r, " asked of a batch of ", T);
  QL_CHECK(static_cast<int64_t>(logits.size()) >= rows_out * c.vocab_size,
           "forward: logits buffer holds ", logits.size(), " floats, need ",
           rows_out * c.vocab_size);

  ensure_buffers(T);
  const int64_t D = c.dim, H = c.n_heads, KV = c.n_kv_heads, Hd = c.head_dim, F = c.hidden_dim;
  float* x = x_.data();
  float* xn = xn_.data();
  for (int64_t t = 0; t < T; ++t) {
    const int32_t id = tokens[static_cast<size_t>(t)];
    model_.tok_embeddings.decode_rows(id, id + 1, x + t * D);
  }

  const int64_t layer_cache = KV * max_ctx_ * Hd;
  for (int64_t li = 0; li < c.n_layers; ++li) {
    const LayerWeights& L = model_.layers[static_cast<size_t>(li)];
    float* kc = k_cache_.data() + li * layer_cache;
    float* vc = v_cache_.data() + li * layer_cache;

    ops::rmsnorm_forward(xn, x, L.attn_norm.data(), T, D, c.norm_eps);
    const LinearOutput qkv[] = {{&L.q, q_.data()}, {&L.k, k_.data()}, {&L.v, v_.data()}};
    linears(qkv, xn, T);
    adapt(li, Target::Q, xn, q_.data(), T);
    adapt(li, Target::K, xn, k_.data(), T);
    adapt(li, Target::V, xn, v_.data(), T);
    if (layout) {
      ops::rope_forward_at(q_.data(), T, H, Hd, layout->positions.data(), rope_cos_.data(),
                           rope_sin_.data());
      ops::rope_forward_at(k_.data(), T, KV, Hd, layout->positions.data(), rope_cos_.data(),
                           rope_sin_.data());
    } else {
      ops::rope_forward(q_.data(), T, H, Hd, pos_, rope_cos_.data(), rope_sin_.data());
      ops::rope_forward(k_.data(), T, KV, Hd, pos_, rope_cos_.data(), rope_sin_.data());
    }
    ops::kv_cache_store(kc, vc, k_.data(), v_.data(), T, pos_, KV, Hd, max_ctx_);
    const auto t_att = Clock::now();
    ops::attention_forward(att_.data(), q_.data(), kc, vc, T, pos_, H, KV, Hd, max_ctx_,
                           layout ? std::span<const ops::VisibleKeys>(layout->visible)
                                  : std::span<const ops::VisibleKeys>());
    stats_.attention_seconds += seconds_since(t_att);
    linear(L.o, att_.data(), xn, T);
    adapt(li, Target::O, att_.data(), xn, T);
    for (int64_t i = 0; i < T * D; ++i) x[i] += xn[i];

    ops::rmsnorm_forward(xn, x, L.ffn_norm.data(), T, D, c.norm_eps);
    const LinearOutput gate_up[] = {{&L.gate, gate_.data()}, {&L.up, up_.data()}};
    linears(gate_up, xn, T);
    adapt(li, Target::Gate, xn, gate_.data(), T);
    adapt(li, Target::Up, xn, up_.data(), T);
    ops::swiglu_forward(gate_.data(), gate_.data(), up_.data(), T * F);
    linear(L.down, gate_.data(), xn, T);
    adapt(li, Target::Down, gate_.data(), xn, T);
    for (int64_t i = 0; i < T * D; ++i) x[i] += xn[i];
    if (!keep_weights_ && streams_weights(T)) L.release_pages();
  }

  for (int64_t i = 0; i < rows_out; ++i)
    ops::rmsnorm_forward(xn + i * D, x + rows[static_cast<size_t>(i)] * D, model_.final_norm.data(),
                         1, D, c.norm_eps);
  // Logits in exact arithmetic: int8 activations would move them by ~0.5%, enough to swap
  // the greedy choice when the top two are that close.
  project(model_.head(), model_.head_q, Tensor(), xn, logits.data(), rows_out,
          DecodeActivations::Exact);
  if (!keep_weights_ && streams_weights(T)) {
    model_.head().release_pages();
    model_.head_q.release_pages();
  }

  pos_ += T;
  stats_.tokens += T;
  stats_.total_seconds += seconds_since(t_start);
}

std::vector<float> InferenceSession::forward_last(std::span<const int32_t> tokens) {
  std::vector<float> logits(static_cast<size_t>(model_.config.vocab_size));
  forward(tokens, logits, false);
  return logits;
}

std::vector<double> reference_forward(const Model& model, std::span<const int32_t> tokens,
                                      const AdapterSet* adapters) {
  const ModelConfig& c = model.config;
  const auto T = static_cast<int64_t>(tokens.size());
  const int64_t D = c.dim, H = c.n_heads, KV = c.n_kv_heads, Hd = c.head_dim, F = c.hidden_dim;
  const int64_t V = c.vocab_size;
  for (int32_t id : tokens)
    QL_CHECK(id >= 0 && id < V, "token id ", id, " is out of range [0, ", V, ")");
  using Vec = std::vector<double>;
  auto rmsnorm = [&](const Vec& in, const Tensor& w) {
    Vec out(in.size());
    for (int64_t t = 0; t < T; ++t) {
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += in[t * D + i] * in[t * D + i];
      const double inv = 1.0 / std::sqrt(ss / static_cast<double>(D) + c.norm_eps);
      for (int64_t i = 0; i < D; ++i) out[t * D + i] = in[t * D + i] * inv * w.data()[i];
    }
    return out;
  };
  auto matmul = [&](const Vec& in, const Tensor& w, const Tensor& b) {
    const int64_t O = w.dim(0), I = w.dim(1);
    Vec out(static_cast<size_t>(T * O));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < O; ++o) {
        double acc = b.empty() ? 0.0 : b.data()[o];
        for (int64_t i = 0; i < I; ++i) acc += in[t * I + i] * w.data()[o * I + i];
        out[t * O + o] = acc;
      }
    return out;
  };
  // out += scale * B A xin, xin = in (LoRA) or its group means / sums (QA-LoRA).
  auto adapt = [&](const Vec& in, int64_t layer, Target target, Vec& out) {
    const LoraAdapter* a = adapters ? adapters->find(layer, target) : nullptr;
    if (!a) return;
    const int64_t I = a->in, O = a->out, C = a->a_cols(), r = a->rank();
    const double scale = adapters->config.scale();
    for (int64_t t = 0; t < T; ++t) {
      Vec xin(static_cast<size_t>(C), 0.0);
      for (int64_t i = 0; i < I; ++i) xin[a->pooled() ? i / a->group_size : i] += in[t * I + i];
      if (a->pooled() && a->pool == AdapterPool::Average)
        for (int64_t l = 0; l < C; ++l)
          xin[l] /= static_cast<double>(std::min(a->group_size, I - l * a->group_size));
      for (int64_t k = 0; k < r; ++k) {
        double u = 0;
        for (int64_t j = 0; j < C; ++j) u += a->A.data()[k * C + j] * xin[j];
        for (int64_t o = 0; o < O; ++o) out[t * O + o] += scale * a->B.data()[o * r + k] * u;
      }
    }
  };
  const Vec inv_freq = rope_inv_freq(c);
  auto rope = [&](Vec& v, int64_t heads) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < Hd / 2; ++i) {
          const double ang = static_cast<double>(t) * inv_freq[i];
          double* p = &v[(t * heads + h) * Hd + 2 * i];
          const double a = p[0], b = p[1];
          p[0] = a * std::cos(ang) - b * std::sin(ang);
          p[1] = a * std::sin(ang) + b * std::cos(ang);
        }
  };

  Vec x(static_cast<size_t>(T * D));
  std::vector<float> row(static_cast<size_t>(D));
  for (int64_t t = 0; t < T; ++t) {
    model.tok_embeddings.decode_rows(tokens[t], tokens[t] + 1, row.data());
    for (int64_t i = 0; i < D; ++i) x[t * D + i] = row[i];
  }
  for (int64_t li = 0; li < c.n_layers; ++li) {
    const LayerWeights& L = model.layers[static_cast<size_t>(li)];
    Vec xn = rmsnorm(x, L.attn_norm);
    Vec q = matmul(xn, L.q.dense_weight(), L.q.bias), k = matmul(xn, L.k.dense_weight(), L.k.bias);
    Vec v = matmul(xn, L.v.dense_weight(), L.v.bias);
    adapt(xn, li, Target::Q, q);
    adapt(xn, li, Target::K, k);
    adapt(xn, li, Target::V, v);
    rope(q, H);
    rope(k, KV);
    Vec att(static_cast<size_t>(T * H * Hd), 0.0);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t kvh = h / (H / KV);
        Vec s(static_cast<size_t>(t + 1));
        double mx = -1e300, sum = 0;
        for (int64_t p = 0; p <= t; ++p) {
          double acc = 0;
          for (int64_t i = 0; i < Hd; ++i)
            acc += q[(t * H + h) * Hd + i] * k[(p * KV + kvh) * Hd + i];
          s[p] = acc / std::sqrt(static_cast<double>(Hd));
          mx = std::max(mx, s[p]);
        }
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (int64_t p = 0; p <= t; ++p)
          for (int64_t i = 0; i < Hd; ++i)
            att[(t * H + h) * Hd + i] += s[p] / sum * v[(p * KV + kvh) * Hd + i];
      }
    Vec o = matmul(att, L.o.dense_weight(), Tensor());
    adapt(att, li, Target::O, o);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    xn = rmsnorm(x, L.ffn_norm);
    Vec g = matmul(xn, L.gate.dense_weight(), Tensor()),
        u = matmul(xn, L.up.dense_weight(), Tensor());
    adapt(xn, li, Target::Gate, g);
    adapt(xn, li, Target::Up, u);
    Vec hidden(static_cast<size_t>(T * F));
    for (size_t i = 0; i < hidden.size(); ++i) hidden[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    Vec d = matmul(hidden, L.down.dense_weight(), Tensor());
    adapt(hidden, li, Target::Down, d);
    for (size_t i = 0; i < x.size(); ++i) x[i] += d[i];
  }
  return matmul(rmsnorm(x, model.final_norm), model.head().decoded(), Tensor());
}

}  // namespace qalora
