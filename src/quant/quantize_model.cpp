// Model-level quantization. GPTQ runs true-sequentially per block: q/k/v, then o, then
// gate/up, then down, each stage's Hessian built from activations computed with the layers
// quantized before it, so later layers learn to absorb the earlier layers' rounding.
#include "qalora/quant/quantize_model.h"

#include <cblas.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <future>
#include <random>

#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "qalora/model/runtime.h"
#include "qalora/ops/ops.h"
#include "qalora/quant/quantize.h"

namespace qalora {

void validate_quantize_options(const QuantizeOptions& o) {
  const std::string& m = o.method;
  const bool affine = m == "rtn" || m == "gptq";
  const bool codebook = m == "nf4" || m == "fp4";
  QL_CHECK(affine || codebook || m == "int8", "--method: '", m,
           "' is not a method, expected rtn, gptq, nf4, fp4 or int8");
  if (affine)
    QL_CHECK(o.bits == 2 || o.bits == 3 || o.bits == 4 || o.bits == 8, "--bits: ", m,
             " quantizes to 2, 3, 4 or 8 bits, got ", o.bits);
  if (codebook) QL_CHECK(o.bits == 4, "--bits: ", m, " is a 4-bit format, got ", o.bits);
  if (m == "int8") QL_CHECK(o.bits == 8, "--bits: int8 is 8-bit, got ", o.bits);
  if (affine)
    QL_CHECK(o.group_size == -1 || o.group_size >= 1, "--group-size: expected -1 (per channel) ",
             "or a positive size, got ", o.group_size);
  if (codebook)
    QL_CHECK(o.group_size == kCodebookBlock, "--group-size: ", m, " uses absmax blocks of ",
             kCodebookBlock, ", got ", o.group_size);
  if (m == "int8")
    QL_CHECK(o.group_size == -1, "--group-size: int8 is per channel (-1), got ", o.group_size);
  QL_CHECK(!o.sym || affine, "--sym: applies to rtn and gptq, not ", m);
  QL_CHECK(!o.act_order || m == "gptq", "--act-order: applies to gptq, not ", m);
  QL_CHECK(!o.static_groups || o.act_order, "--static-groups: only with --act-order");
  QL_CHECK(o.damp > 0.0 && o.damp < 1.0, "--damp: expected a value in (0, 1), got ", o.damp);
  QL_CHECK(!o.double_quant || codebook, "--double-quant: applies to nf4 and fp4, not ", m);
}

std::vector<std::vector<int32_t>> calibration_windows(const std::vector<int32_t>& tokens,
                                                      int64_t samples, int64_t length,
                                                      uint64_t seed, const std::string& source) {
  QL_CHECK(samples >= 1, "--calib-samples: expected at least 1, got ", samples);
  QL_CHECK(length >= 2, "--calib-len: expected at least 2 tokens, got ", length);
  const auto n = static_cast<int64_t>(tokens.size());
  QL_CHECK(n >= length, source, ": calibration text has ", n, " tokens, fewer than --calib-len ",
           length);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> start(0, n - length);
  std::vector<std::vector<int32_t>> windows;
  for (int64_t s = 0; s < samples; ++s) {
    const int64_t i = start(rng);
    windows.emplace_back(tokens.begin() + i, tokens.begin() + i + length);
  }
  return windows;
}

double relative_output_error(const float* W, const float* Q, int64_t rows, int64_t cols,
                             const std::vector<double>& H) {
  const std::vector<float> Hf(H.begin(), H.end());
  auto quad = [&](const std::vector<float>& A) {  // tr(A H A^T)
    std::vector<float> AH(A.size());
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                static_cast<int>(cols), static_cast<int>(cols), 1.0f, A.data(),
                static_cast<int>(cols), Hf.data(), static_cast<int>(cols), 0.0f, AH.data(),
                static_cast<int>(cols));
    double tr = 0.0;
    for (size_t i = 0; i < A.size(); ++i) tr += static_cast<double>(A[i]) * AH[i];
    return tr;
  };
  std::vector<float> w(W, W + rows * cols), d(w.size());
  for (size_t i = 0; i < d.size(); ++i) d[i] = W[i] - Q[i];
  const double base = quad(w);
  return base > 0.0 ? std::sqrt(std::max(0.0, quad(d)) / base) : 0.0;
}

namespace {

const char* const kLinearNames[] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                    "gate_proj", "up_proj", "down_proj"};

// The seven linears of a block, in kLinearNames order (const or not, as the block).
template <typename Layer>
auto block_linears(Layer& L) {
  return std::array{&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down};
}

// Data-free methods: each linear on its own.
QMatrix quantize_weight(const Tensor& w, const QuantizeOptions& o) {
  const int64_t rows = w.dim(0), cols = w.dim(1);
  if (o.method == "rtn") return quantize_rtn(w.data(), rows, cols, o.bits, o.group_size, o.sym);
  if (o.method == "int8") return quantize_int8(w.data(), rows, cols);
  return quantize_codebook(o.method == "nf4" ? QuantType::NF4 : QuantType::FP4, w.data(), rows,
                           cols, o.double_quant);
}

// RTN and INT8 quantize each row on its own: a stored (F16, BF16) weight is then decoded a row
// at a time inside the quantizer, never whole into fp32. At 7B that saved 26 GB of fp32 writes
// and two passes over them per model.
bool row_wise(const QuantizeOptions& o) {
  return o.method == "rtn" || o.method == "int8";
}

QMatrix quantize_stored_rows(const Tensor& w, const QuantizeOptions& o, const std::string& name) {
  const int64_t rows = w.dim(0), cols = w.dim(1);
  std::atomic<int64_t> bad_row{rows};  // the first row with a non-finite value
  const WeightRows decode = [&](int64_t j, float* scratch) {
    w.decode_rows(j, j + 1, scratch);
    if (first_non_finite(scratch, cols) >= 0) {
      int64_t seen = bad_row.load();
      while (j < seen && !bad_row.compare_exchange_weak(seen, j)) {
      }
      std::fill(scratch, scratch + cols, 0.0f);  // the result is discarded: keep it defined
    }
    return static_cast<const float*>(scratch);
  };
  QMatrix q = o.method == "rtn" ? quantize_rtn(decode, rows, cols, o.bits, o.group_size, o.sym)
                                : quantize_int8(decode, rows, cols);
  if (const int64_t j = bad_row.load(); j < rows) {
    std::vector<float> row(static_cast<size_t>(cols));
    w.decode_rows(j, j + 1, row.data());
    const int64_t i = first_non_finite(row.data(), cols);
    fail(name, ": weight [", j, ", ", i, "] is ", row[static_cast<size_t>(i)],
         ", expected a finite value");
  }
  return q;
}

// Activations of every calibration window through one block, with the rope tables they need.
struct Calibration {
  const ModelConfig& c;
  int64_t N, T;
  std::vector<float> h;    // [N, T, dim] block input, then the residual stream
  std::vector<float> act;  // [N, T, max(q_dim, hidden)] attention output or MLP hidden
  std::vector<float> cos, sin;

  Calibration(const Model& m, const std::vector<std::vector<int32_t>>& windows)
      : c(m.config), N(static_cast<int64_t>(windows.size())),
        T(static_cast<int64_t>(windows.front().size())) {
    const int64_t D = c.dim;
    h.resize(static_cast<size_t>(N * T * D));
    act.resize(static_cast<size_t>(N * T * std::max(c.q_dim(), c.hidden_dim)));
    for (int64_t s = 0; s < N; ++s)
      for (int64_t t = 0; t < T; ++t) {
        const int32_t id = windows[s][t];
        QL_CHECK(id >= 0 && id < c.vocab_size, "calibration token id ", id, " is out of range");
        m.tok_embeddings.decode_rows(id, id + 1, &h[(s * T + t) * D]);
      }
    rope_tables(c, T, cos, sin);
  }
  float* h_of(int64_t s) { return h.data() + s * T * c.dim; }
  float* act_of(int64_t s, int64_t width) { return act.data() + s * T * width; }
};

}  // namespace

QuantizeWork quantize_model(Model& model, const QuantizeOptions& o,
                            const std::vector<std::vector<int32_t>>& calibration,
                            const LayerCallback& on_layer, const BlockCallback& on_block,
                            const BeforeBlock& before_block) {
  validate_quantize_options(o);
  const ModelConfig& c = model.config;
  QuantizeWork work;
  QuantInfo& qi = model.quant;
  qi = QuantInfo{};
  qi.method = o.method;
  qi.bits = o.bits;
  qi.group_size = o.group_size;
  qi.sym = o.sym;
  qi.act_order = o.act_order;
  qi.static_groups = o.static_groups;
  qi.double_quant = o.double_quant;
  qi.damp = o.method == "gptq" ? static_cast<float>(o.damp) : 0.0f;

  // The weight in fp32, checked: a nan/inf weight is reported before it is quantized. Stored
  // (F16, BF16) weights are decoded into one buffer reused for every linear: a fresh 180 MB
  // allocation per 7B linear cost a page fault and a cleared page per 4 KB (7.6 M faults, as
  // much system time as the quantization's own).
  std::vector<float> decoded;
  auto source_weight = [&](const Linear& l, int64_t li, const char* name) {
    Tensor w;
    if (l.quantized() || !l.weight.encoded()) {
      w = l.dense_weight();
    } else {
      decoded.resize(static_cast<size_t>(l.weight.numel()));
      l.weight.decode_all(decoded.data());
      w = Tensor::view(decoded.data(), l.weight.shape(), nullptr);
    }
    check_finite(w.data(), w.dim(0), w.dim(1), cat(model.source_path, ": layer ", li, " ", name));
    return w;
  };
  // The source's pages are dropped as soon as its quantized form exists: quantizing reads the
  // model once, and resident memory holds one linear of it at a time.
  auto finish_linear = [&](Linear& l, QMatrix q, int64_t li, const char* name, Clock::time_point t0,
                           double rel_err) {
    l.weight.release_pages();
    l.qweight = std::move(q);
    l.weight = Tensor();
    if (on_layer) on_layer({li, name, seconds_since(t0), rel_err});
  };
  auto finish_block = [&](int64_t li) {
    for (Tensor* t : {&model.layers[li].attn_norm, &model.layers[li].ffn_norm}) t->release_pages();
    if (on_block) on_block(li, model.layers[li]);
  };

  if (o.method != "gptq") {
    for (int64_t li = 0; li < c.n_layers; ++li) {
      if (before_block) before_block(li, model.layers[li]);
      // The next block's weights are read from disk and mapped while this one is quantized (by
      // a helper thread: the request waits for the reads).
      std::future<void> next;
      if (li + 1 < c.n_layers)
        next = std::async(std::launch::async, [&, li] {
          for (const Linear* l : block_linears(model.layers[li + 1])) l->weight.prefetch_pages();
        });
      const auto linears = block_linears(model.layers[li]);
      for (size_t k = 0; k < linears.size(); ++k) {
        const auto t0 = Clock::now();
        const Linear& l = *linears[k];
        const std::string name = cat(model.source_path, ": layer ", li, " ", kLinearNames[k]);
        QMatrix q = row_wise(o) && !l.quantized() && l.weight.encoded()
                        ? quantize_stored_rows(l.weight, o, name)
                        : quantize_weight(source_weight(l, li, kLinearNames[k]), o);
        finish_linear(*linears[k], std::move(q), li, kLinearNames[k], t0, -1.0);
      }
      finish_block(li);
    }
  } else {
    QL_CHECK(!calibration.empty(), "GPTQ needs calibration text (--calib)");
    GptqOptions g;
    g.bits = o.bits;
    g.group_size = o.group_size;
    g.sym = o.sym;
    g.act_order = o.act_order;
    g.static_groups = o.static_groups;
    g.damp = o.damp;
    Calibration cal(model, calibration);
    const int64_t N = cal.N, T = cal.T, D = c.dim, F = c.hidden_dim, Q = c.q_dim(),
                  KVD = c.kv_dim(), H = c.n_heads, KV = c.n_kv_heads, Hd = c.head_dim;
    // Linears and Hessians run on chunks of whole windows (~4096 tokens: big GEMMs, bounded
    // scratch); only RoPE and attention go window by window.
    const int64_t S = std::max<int64_t>(1, 4096 / T), rows = S * T;
    std::vector<float> xn(static_cast<size_t>(rows * D)), q(static_cast<size_t>(rows * Q)),
        k(static_cast<size_t>(rows * KVD)), v(k.size()), kc(static_cast<size_t>(T * KVD)),
        vc(kc.size()), up(static_cast<size_t>(rows * F)), out(static_cast<size_t>(rows * D));
    auto for_chunks = [&](const std::function<void(int64_t s0, int64_t n)>& body) {
      for (int64_t s0 = 0; s0 < N; s0 += S) body(s0, std::min(S, N - s0));
    };
    auto forward = [&](const Linear& l, const float* x, float* y, int64_t n_rows) {
      linear_forward(l, x, y, n_rows);
      work.flops += 2.0 * static_cast<double>(n_rows * l.in_features() * l.out_features());
    };
    auto add_rows = [&](HessianAccumulator& acc, const float* x, int64_t n_rows, int64_t width) {
      acc.add(x, n_rows);
      work.flops += static_cast<double>(n_rows * width * (width + 1));  // ssyrk
    };

    // GPTQ of the given linears of block li on one Hessian, factored once for all of them.
    auto quantize_stage = [&](int64_t li, const HessianAccumulator& acc,
                              std::initializer_list<int> which) {
      const GptqFactor factor = gptq_factor(acc, g);
      const auto n = static_cast<double>(acc.cols());
      work.flops += 2.0 / 3.0 * n * n * n;  // Cholesky factorization and triangular inverse
      const auto linears = block_linears(model.layers[li]);
      for (int k_idx : which) {
        const auto t0 = Clock::now();
        Linear& l = *linears[k_idx];
        const Tensor w = source_weight(l, li, kLinearNames[k_idx]);
        GptqResult res = gptq_quantize(w.data(), w.dim(0), factor, g);
        // The sweep's updates (~rows n^2) and the error's triangular solve (rows n^2).
        work.flops += 2.0 * static_cast<double>(w.dim(0)) * n * n;
        finish_linear(l, std::move(res.q), li, kLinearNames[k_idx], t0, res.relative_error);
      }
    };

    for (int64_t li = 0; li < c.n_layers; ++li) {
      LayerWeights& L = model.layers[li];
      if (before_block) before_block(li, L);
      HessianAccumulator h_qkv(D);
      for_chunks([&](int64_t s0, int64_t n) {
        ops::rmsnorm_forward(xn.data(), cal.h_of(s0), L.attn_norm.data(), n * T, D, c.norm_eps);
        add_rows(h_qkv, xn.data(), n * T, D);
      });
      quantize_stage(li, h_qkv, {0, 1, 2});

      HessianAccumulator h_o(Q);
      for_chunks([&](int64_t s0, int64_t n) {
        ops::rmsnorm_forward(xn.data(), cal.h_of(s0), L.attn_norm.data(), n * T, D, c.norm_eps);
        forward(L.q, xn.data(), q.data(), n * T);
        forward(L.k, xn.data(), k.data(), n * T);
        forward(L.v, xn.data(), v.data(), n * T);
        for (int64_t s = 0; s < n; ++s) {
          float* qs = q.data() + s * T * Q;
          float* ks = k.data() + s * T * KVD;
          const float* vs = v.data() + s * T * KVD;
          ops::rope_forward(qs, T, H, Hd, 0, cal.cos.data(), cal.sin.data());
          ops::rope_forward(ks, T, KV, Hd, 0, cal.cos.data(), cal.sin.data());
          ops::kv_cache_store(kc.data(), vc.data(), ks, vs, T, 0, KV, Hd, T);
          ops::attention_forward(cal.act_of(s0 + s, Q), qs, kc.data(), vc.data(), T, 0, H, KV,
                                 Hd, T);
          work.flops += 2.0 * static_cast<double>(H * Hd) * static_cast<double>(T * (T + 1));
        }
        add_rows(h_o, cal.act_of(s0, Q), n * T, Q);
      });
      quantize_stage(li, h_o, {3});

      HessianAccumulator h_mlp(D);
      for_chunks([&](int64_t s0, int64_t n) {
        float* hs = cal.h_of(s0);
        forward(L.o, cal.act_of(s0, Q), out.data(), n * T);
        for (int64_t i = 0; i < n * T * D; ++i) hs[i] += out[i];
        ops::rmsnorm_forward(xn.data(), hs, L.ffn_norm.data(), n * T, D, c.norm_eps);
        add_rows(h_mlp, xn.data(), n * T, D);
      });
      quantize_stage(li, h_mlp, {4, 5});

      HessianAccumulator h_down(F);
      for_chunks([&](int64_t s0, int64_t n) {
        ops::rmsnorm_forward(xn.data(), cal.h_of(s0), L.ffn_norm.data(), n * T, D, c.norm_eps);
        float* hidden = cal.act_of(s0, F);
        forward(L.gate, xn.data(), hidden, n * T);
        forward(L.up, xn.data(), up.data(), n * T);
        ops::swiglu_forward(hidden, hidden, up.data(), n * T * F);
        add_rows(h_down, hidden, n * T, F);
      });
      quantize_stage(li, h_down, {6});
      for_chunks([&](int64_t s0, int64_t n) {
        float* hs = cal.h_of(s0);
        forward(L.down, cal.act_of(s0, F), out.data(), n * T);
        for (int64_t i = 0; i < n * T * D; ++i) hs[i] += out[i];
      });
      finish_block(li);
    }
  }
  return work;
}

}  // namespace qalora
