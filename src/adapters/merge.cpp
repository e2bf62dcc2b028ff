#include "qalora/adapters/merge.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "qalora/adapters/lora.h"
#include "qalora/core/error.h"
#include "qalora/eval/perplexity.h"
#include "qalora/model/model.h"
#include "qalora/model/runtime.h"

namespace qalora {

namespace {

// The base layer an adapter sits on, to be rewritten.
Linear& adapted_linear(Model& model, const LoraAdapter& a) {
  return target_linear(model.layers[static_cast<size_t>(a.layer)], a.target);
}

// scale * B A: [O, C] in double.
std::vector<double> scaled_product(const LoraAdapter& a, double scale) {
  const int64_t r = a.rank(), C = a.a_cols();
  const float* A = a.A.data();
  const float* B = a.B.data();
  std::vector<double> d(static_cast<size_t>(a.out * C), 0.0);
#pragma omp parallel for if (a.out * r * C > (1 << 20))
  for (int64_t o = 0; o < a.out; ++o) {
    double* row = d.data() + o * C;
    for (int64_t k = 0; k < r; ++k) {
      const double b = scale * static_cast<double>(B[o * r + k]);
      const float* arow = A + k * C;
      for (int64_t c = 0; c < C; ++c) row[c] += b * static_cast<double>(arow[c]);
    }
  }
  return d;
}

bool has_quantized_linear(const Model& model) {
  for (const LayerWeights& layer : model.layers)
    for (const Target t : all_targets())
      if (target_linear(layer, t).quantized()) return true;
  return false;
}

// log-softmax of one row of logits, in double.
void log_softmax(const float* logits, int64_t n, std::vector<double>& out) {
  out.resize(static_cast<size_t>(n));
  double max_logit = logits[0];
  for (int64_t v = 0; v < n; ++v) max_logit = std::max(max_logit, static_cast<double>(logits[v]));
  double sum = 0;
  for (int64_t v = 0; v < n; ++v) sum += std::exp(static_cast<double>(logits[v]) - max_logit);
  const double lse = max_logit + std::log(sum);
  for (int64_t v = 0; v < n; ++v) out[v] = static_cast<double>(logits[v]) - lse;
}

}  // namespace

namespace {

void check_qalora_set(const AdapterSet& set, const Model& model) {
  QL_CHECK(set.config.kind == AdapterKind::QaLora, "merge: the adapter is ",
           adapter_kind_name(set.config.kind),
           ", expected qalora (only QA-LoRA folds exactly into the quantized offsets)");
  check_adapters_match(set, model, "merge");
}

}  // namespace

void merge_qalora(Model& model, const AdapterSet& set) {
  check_qalora_set(set, model);
  for (size_t l = 0; l < model.layers.size(); ++l)
    merge_qalora_block(model.layers[l], static_cast<int64_t>(l), set);
}

void merge_qalora_block(LayerWeights& block, int64_t index, const AdapterSet& set) {
  const double scale = set.config.scale();
  for (const LoraAdapter& a : set.adapters) {
    if (a.layer != index) continue;
    QMatrix& w = target_linear(block, a.target).qweight;
    const int64_t G = a.group_size, L = a.n_groups;
    const std::vector<double> d = scaled_product(a, scale);
    float* offsets = w.offsets.writable();  // fp32 from here on: the sums are not fp16 numbers
    for (int64_t l = 0; l < L; ++l) {
      // The last group may be smaller; average pooling divides by its true size.
      const double len = static_cast<double>(std::min(G, a.in - l * G));
      const double factor = a.pool == AdapterPool::Average ? 1.0 / len : 1.0;
      for (int64_t j = 0; j < a.out; ++j) {
        float& m = offsets[j * L + l];
        m = static_cast<float>(static_cast<double>(m) + d[static_cast<size_t>(j * L + l)] * factor);
      }
    }
  }
}

void save_merged_qalora(const Model& model, const AdapterSet& set,
                        const std::filesystem::path& dir) {
  check_qalora_set(set, model);
  save_hf_model_by_block(model, model, dir, DenseFloats::F32, [&](LayerWeights& block, int64_t l) {
    merge_qalora_block(block, l, set);
  });
}

namespace {

// lin becomes the fp32 weight W + scale * B A (merge_dense's rule for one adapter).
void merge_into_dense(Linear& lin, const LoraAdapter& a, double scale) {
  // Written into a fresh tensor: a copied Model shares its fp32 weights with the original.
  const Tensor base = lin.dense_weight();
  Tensor merged = Tensor::zeros(base.shape());
  float* w = merged.mutable_data();
  std::copy(base.data(), base.data() + base.numel(), w);
  const std::vector<double> d = scaled_product(a, scale);
  if (a.pooled()) {
    // The QA-LoRA delta is constant over each group: spread it with the pooling adjoint E.
    const std::vector<float> delta(d.begin(), d.end());
    pool_groups_backward(w, delta.data(), a.out, a.in, a.group_size, a.pool);
  } else {
    for (size_t i = 0; i < d.size(); ++i)
      w[i] = static_cast<float>(static_cast<double>(w[i]) + d[i]);
  }
  lin.weight = std::move(merged);
  lin.qweight = QMatrix{};
}

}  // namespace

void merge_dense(Model& model, const AdapterSet& set) {
  check_adapters_match(set, model, "merge");
  for (const LoraAdapter& a : set.adapters)
    merge_into_dense(adapted_linear(model, a), a, set.config.scale());
  if (!has_quantized_linear(model)) model.quant = QuantInfo{};
}

void merge_dense_block(LayerWeights& block, int64_t index, const AdapterSet& set) {
  for (const LoraAdapter& a : set.adapters)
    if (a.layer == index) merge_into_dense(target_linear(block, a.target), a, set.config.scale());
}

void save_merged_dense(const Model& model, const AdapterSet& set, const std::filesystem::path& dir,
                       DenseFloats floats) {
  check_adapters_match(set, model, "merge");
  // What merge_dense would leave outside the blocks: the quantization record stays only while a
  // quantized linear has no adapter. The writer reads everything but the blocks from it.
  Model record = model;
  bool quantized_left = false;
  for (size_t l = 0; l < model.layers.size(); ++l)
    for (const Target t : all_targets())
      quantized_left = quantized_left || (target_linear(model.layers[l], t).quantized() &&
                                          set.find(static_cast<int64_t>(l), t) == nullptr);
  if (!quantized_left) record.quant = QuantInfo{};
  save_hf_model_by_block(record, model, dir, floats,
                         [&](LayerWeights& block, int64_t l) { merge_dense_block(block, l, set); });
}

namespace {

int32_t window_bos(const Model& model) {
  return model.tokenizer && model.tokenizer->add_bos() ? model.tokenizer->bos_id() : -1;
}

void check_window_context(const Model& model, int64_t ctx) {
  QL_CHECK(ctx >= 2 && ctx <= model.config.context_length,
           "merge fidelity: context expected in [2, ", model.config.context_length, "], got ", ctx);
}

PerplexityOptions window_options(int64_t ctx) {
  PerplexityOptions o;
  o.ctx = ctx;
  o.progress = false;
  return o;
}

}  // namespace

FidelityReference fidelity_reference(const Model& model, const AdapterSet* set,
                                     std::span<const int32_t> tokens, int64_t ctx) {
  check_window_context(model, ctx);
  FidelityReference ref;
  ref.tokens.assign(tokens.begin(), tokens.end());
  ref.ctx = ctx;
  ref.vocab = model.config.vocab_size;
  ref.bos = window_bos(model);
  InferenceSession session(model, ctx, set);
  // perplexity() cuts the windows (the same cut the comparison makes) and scores them.
  const auto run = [&](std::span<const int32_t> window, std::span<float> logits) {
    session.reset();
    session.forward(window, logits, /*all_logits=*/true);
    ref.logits.insert(ref.logits.end(), logits.begin(), logits.end());
  };
  const PerplexityResult r = perplexity(tokens, ref.vocab, ref.bos, run, window_options(ctx));
  ref.nll_sum = r.nll_sum;
  ref.tokens_scored = r.tokens_scored;
  return ref;
}

MergeFidelity merge_fidelity(const FidelityReference& reference, const Model& merged) {
  const int64_t vocab = merged.config.vocab_size, ctx = reference.ctx;
  QL_CHECK(reference.vocab == vocab, "merge fidelity: the merged model has ", vocab,
           " vocabulary entries, the base ", reference.vocab);
  check_window_context(merged, ctx);
  QL_CHECK(window_bos(merged) == reference.bos, "merge fidelity: the merged model's BOS (",
           window_bos(merged), ") differs from the base's (", reference.bos, ")");
  InferenceSession session(merged, ctx);
  MergeFidelity f;
  double kl_sum = 0;
  size_t at = 0;  // start of the current window's rows in reference.logits
  std::vector<double> lp_reference, lp_merged;
  const auto compare = [&](std::span<const int32_t> window, std::span<float> logits) {
    session.reset();
    session.forward(window, logits, /*all_logits=*/true);
    const auto n = static_cast<int64_t>(window.size());
    QL_CHECK(at + logits.size() <= reference.logits.size(),
             "merge fidelity: the merged model scored more windows than the reference");
    for (int64_t p = 0; p < n; ++p) {
      const float* u = reference.logits.data() + at + p * vocab;
      const float* m = logits.data() + p * vocab;
      log_softmax(u, vocab, lp_reference);
      log_softmax(m, vocab, lp_merged);
      double kl = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        f.max_abs_logit_diff =
            std::max(f.max_abs_logit_diff, std::abs(static_cast<double>(u[v]) - m[v]));
        kl += std::exp(lp_reference[v]) * (lp_reference[v] - lp_merged[v]);
      }
      kl_sum += kl;
    }
    at += logits.size();
    f.tokens += n;
  };
  const PerplexityResult r =
      perplexity(reference.tokens, vocab, reference.bos, compare, window_options(ctx));
  QL_CHECK(at == reference.logits.size() && r.tokens_scored == reference.tokens_scored,
           "merge fidelity: scored ", reference.tokens_scored, " tokens unmerged but ",
           r.tokens_scored, " merged");
  f.mean_kl = kl_sum / static_cast<double>(f.tokens);
  f.ppl_merged = r.ppl;
  f.ppl_unmerged = std::exp(reference.nll_sum / static_cast<double>(reference.tokens_scored));
  return f;
}

MergeFidelity merge_fidelity(const Model& unmerged_base, const AdapterSet* set, const Model& merged,
                             std::span<const int32_t> tokens, int64_t ctx) {
  QL_CHECK(unmerged_base.config.vocab_size == merged.config.vocab_size,
           "merge fidelity: the merged model has ", merged.config.vocab_size,
           " vocabulary entries, the base ", unmerged_base.config.vocab_size);
  return merge_fidelity(fidelity_reference(unmerged_base, set, tokens, ctx), merged);
}

}  // namespace qalora
