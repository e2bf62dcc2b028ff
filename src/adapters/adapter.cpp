#include "qalora/adapters/adapter.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#include <utility>

#include "qalora/core/error.h"
#include "qalora/core/strings.h"
#include "qalora/model/model.h"

namespace qalora {

namespace {

constexpr std::array<const char*, kNumTargets> kTargetNames = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};

// "layer 3 q_proj", the way every per-adapter message names its layer.
std::string where(int64_t layer, Target t) {
  return cat("layer ", layer, " ", target_name(t));
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// `prefix` is "" or "<source>: ".
void check_config(const AdapterConfig& c, std::string_view prefix) {
  QL_CHECK(c.rank >= 1, prefix, "adapter rank expected >= 1, got ", c.rank);
  QL_CHECK(c.dropout >= 0.0f && c.dropout < 1.0f, prefix,
           "adapter dropout expected in [0, 1), got ", c.dropout);
  QL_CHECK(std::isfinite(c.alpha), prefix, "adapter alpha expected a finite number, got ", c.alpha);
  QL_CHECK(!c.targets.empty(), prefix, "adapter targets expected at least one, got none");
  std::array<bool, kNumTargets> seen{};
  for (Target t : c.targets) {
    bool& s = seen.at(static_cast<size_t>(t));
    QL_CHECK(!s, prefix, "adapter targets list ", target_name(t), " twice");
    s = true;
  }
}

// Why QA-LoRA cannot fold into the offsets of `lin`, or "" when it can: it needs affine
// groups that are contiguous runs of G columns (g_idx absent or equal to i / G).
std::string qalora_unmergeable(const Linear& lin) {
  constexpr const char* kNeeds =
      "qalora needs an affine integer base with contiguous groups (RTN/GPTQ, or GPTQ act-order "
      "with static groups); ";
  if (!lin.quantized())
    return cat(kNeeds, "this layer is dense (not quantized) — use --adapter lora, or quantize the ",
               "base first (qalora quantize --method rtn or gptq)");
  const QMatrix& w = lin.qweight;
  if (w.type != QuantType::Affine)
    return cat(kNeeds, "this base is ", w.type == QuantType::NF4 ? "NF4" : "FP4",
               " — use --adapter lora (QLoRA), or quantize with --method gptq/rtn");
  for (size_t i = 0; i < w.g_idx.size(); ++i) {
    if (w.g_idx[i] != static_cast<int64_t>(i) / w.group_size)
      return cat(kNeeds, "this base has act-order groups (g_idx of column ", i, " is ", w.g_idx[i],
                 ", not ", static_cast<int64_t>(i) / w.group_size,
                 ") — quantize with --act-order --static-groups or without --act-order, or use ",
                 "--adapter lora");
  }
  return {};
}

// A [r, C] drawn from its own stream of (seed, layer, target): std::seed_seq is specified
// by the standard, so the init is the same on every platform's mt19937_64.
void init_a(Tensor& A, const AdapterConfig& c, int64_t layer, Target t) {
  const auto lo = [](uint64_t v) { return static_cast<uint32_t>(v); };
  const auto hi = [](uint64_t v) { return static_cast<uint32_t>(v >> 32); };
  const auto ul = static_cast<uint64_t>(layer);
  std::seed_seq seq{lo(c.seed), hi(c.seed), lo(ul), hi(ul), static_cast<uint32_t>(t)};
  std::mt19937_64 rng(seq);
  float* a = A.mutable_data();
  if (c.init == AdapterInit::Kaiming) {
    // kaiming_uniform_(a = sqrt(5)) on [r, C]: gain sqrt(2 / (1 + 5)), bound
    // gain * sqrt(3 / C) = 1 / sqrt(C).
    const float bound = 1.0f / std::sqrt(static_cast<float>(A.dim(1)));
    std::uniform_real_distribution<float> dist(-bound, bound);
    for (int64_t i = 0; i < A.numel(); ++i) a[i] = dist(rng);
  } else {
    std::normal_distribution<float> dist(0.0f, 1.0f / static_cast<float>(c.rank));
    for (int64_t i = 0; i < A.numel(); ++i) a[i] = dist(rng);
  }
}

}  // namespace

namespace {

// The member of LayerWeights each target names, in Target order.
constexpr std::array<Linear LayerWeights::*, kNumTargets> kTargetMembers = {
    &LayerWeights::q,    &LayerWeights::k,  &LayerWeights::v,   &LayerWeights::o,
    &LayerWeights::gate, &LayerWeights::up, &LayerWeights::down};

Linear LayerWeights::*target_member(Target t) {
  const auto i = static_cast<size_t>(t);
  QL_CHECK(i < kTargetMembers.size(), "adapter target ", i, " is not one of the ", kNumTargets,
           " linears");
  return kTargetMembers[i];
}

}  // namespace

const Linear& target_linear(const LayerWeights& layer, Target t) {
  return layer.*target_member(t);
}

Linear& target_linear(LayerWeights& layer, Target t) {
  return layer.*target_member(t);
}

const char* target_name(Target t) {
  return kTargetNames.at(static_cast<size_t>(t));
}

std::vector<Target> all_targets() {
  std::vector<Target> targets;
  for (int i = 0; i < kNumTargets; ++i) targets.push_back(static_cast<Target>(i));
  return targets;
}

std::vector<Target> parse_targets(std::string_view list) {
  std::array<bool, kNumTargets> chosen{};
  size_t pos = 0;
  while (pos <= list.size()) {
    const size_t comma = std::min(list.find(',', pos), list.size());
    const std::string_view entry = trim(list.substr(pos, comma - pos));
    pos = comma + 1;
    if (entry == "all-linear" || entry == "all") {
      chosen.fill(true);
      continue;
    }
    const auto it = std::find(kTargetNames.begin(), kTargetNames.end(), entry);
    QL_CHECK(it != kTargetNames.end(), "adapter target '", entry,
             "' is unknown: expected a comma-separated list of q_proj, k_proj, v_proj, o_proj, ",
             "gate_proj, up_proj, down_proj, or all-linear");
    chosen[static_cast<size_t>(it - kTargetNames.begin())] = true;
  }
  std::vector<Target> targets = all_targets();
  std::erase_if(targets, [&](Target t) { return !chosen[static_cast<size_t>(t)]; });
  return targets;
}

const char* adapter_kind_name(AdapterKind k) {
  return k == AdapterKind::Lora ? "lora" : "qalora";
}

AdapterKind parse_adapter_kind(std::string_view name) {
  if (name == "lora") return AdapterKind::Lora;
  if (name == "qalora") return AdapterKind::QaLora;
  fail("adapter kind '", name, "' is unknown: expected lora or qalora");
}

const char* adapter_pool_name(AdapterPool p) {
  return p == AdapterPool::Average ? "avg" : "sum";
}

AdapterPool parse_adapter_pool(std::string_view name) {
  if (name == "avg") return AdapterPool::Average;
  if (name == "sum") return AdapterPool::Sum;
  fail("adapter pooling '", name, "' is unknown: expected avg or sum");
}

const char* adapter_init_name(AdapterInit i) {
  return i == AdapterInit::Kaiming ? "kaiming" : "gaussian";
}

AdapterInit parse_adapter_init(std::string_view name) {
  if (name == "kaiming") return AdapterInit::Kaiming;
  if (name == "gaussian") return AdapterInit::Gaussian;
  fail("adapter init '", name, "' is unknown: expected kaiming or gaussian");
}

float AdapterConfig::scale() const {
  const auto r = static_cast<float>(rank);
  return alpha / (rslora ? std::sqrt(r) : r);
}

BaseIdentity base_identity(const Model& model) {
  const ModelConfig& c = model.config;
  BaseIdentity b;
  b.name = c.name;
  b.arch = c.arch;
  b.vocab_size = c.vocab_size;
  b.dim = c.dim;
  b.hidden_dim = c.hidden_dim;
  b.n_layers = c.n_layers;
  b.n_heads = c.n_heads;
  b.n_kv_heads = c.n_kv_heads;
  b.quant_method = model.quant.method;
  b.bits = model.quant.bits;
  b.group_size = model.quant.group_size;
  return b;
}

const LoraAdapter* AdapterSet::find(int64_t layer, Target t) const {
  const auto it = std::find_if(adapters.begin(), adapters.end(), [&](const LoraAdapter& a) {
    return a.layer == layer && a.target == t;
  });
  return it == adapters.end() ? nullptr : &*it;
}

LoraAdapter* AdapterSet::find(int64_t layer, Target t) {
  return const_cast<LoraAdapter*>(std::as_const(*this).find(layer, t));
}

int64_t AdapterSet::parameter_count() const {
  int64_t n = 0;
  for (const LoraAdapter& a : adapters) n += a.A.numel() + a.B.numel();
  return n;
}

AdapterSet create_adapters(const Model& model, const AdapterConfig& config) {
  check_config(config, "");
  const bool qalora = config.kind == AdapterKind::QaLora;
  AdapterSet set;
  set.config = config;
  set.base = base_identity(model);
  for (size_t l = 0; l < model.layers.size(); ++l) {
    const auto layer = static_cast<int64_t>(l);
    for (Target t : config.targets) {
      const Linear& lin = target_linear(model.layers[l], t);
      LoraAdapter a;
      a.layer = layer;
      a.target = t;
      a.in = lin.in_features();
      a.out = lin.out_features();
      if (qalora) {
        const std::string why = qalora_unmergeable(lin);
        QL_CHECK(why.empty(), where(layer, t), ": ", why);
        a.group_size = lin.qweight.group_size;
        a.n_groups = ceil_div(a.in, a.group_size);
        a.pool = config.pool;
      }
      a.A = Tensor::zeros({config.rank, qalora ? a.n_groups : a.in});
      init_a(a.A, config, layer, t);
      a.B = Tensor::zeros({a.out, config.rank});
      set.adapters.push_back(std::move(a));
    }
  }
  return set;
}

void check_adapters_match(const AdapterSet& set, const Model& model, std::string_view source) {
  const std::string prefix = cat(source, ": ");
  check_config(set.config, prefix);
  const bool qalora = set.config.kind == AdapterKind::QaLora;
  const auto n_layers = static_cast<int64_t>(model.layers.size());
  // A set read from PEFT files may not know its base (n_layers = 0); its adapters still must fit.
  QL_CHECK(set.base.n_layers == 0 || set.base.n_layers == n_layers, prefix, "layer count expected ",
           n_layers, " (the base), got ", set.base.n_layers);
  for (const LoraAdapter& a : set.adapters) {
    QL_CHECK(a.layer >= 0 && a.layer < n_layers, prefix, where(a.layer, a.target),
             ": layer expected 0..", n_layers - 1, " (the base has ", n_layers, "), got ", a.layer);
    QL_CHECK(std::find(set.config.targets.begin(), set.config.targets.end(), a.target) !=
                 set.config.targets.end(),
             prefix, where(a.layer, a.target), ": target expected one of the config's targets, ",
             "got ", target_name(a.target));
  }
  const auto expected = static_cast<size_t>(n_layers) * set.config.targets.size();
  for (int64_t layer = 0; layer < n_layers; ++layer) {
    for (Target t : set.config.targets) {
      const std::string at = cat(prefix, where(layer, t));
      const LoraAdapter* a = set.find(layer, t);
      QL_CHECK(a != nullptr, at, ": adapter expected (", target_name(t), " is a target), got none");
      const Linear& lin = target_linear(model.layers[static_cast<size_t>(layer)], t);
      QL_CHECK(a->in == lin.in_features(), at, ": in features expected ", lin.in_features(),
               ", got ", a->in);
      QL_CHECK(a->out == lin.out_features(), at, ": out features expected ", lin.out_features(),
               ", got ", a->out);
      QL_CHECK(a->pooled() == qalora, at, ": group size expected ", qalora ? "> 0 (qalora)" : "0",
               ", got ", a->group_size);
      if (qalora) {
        const std::string why = qalora_unmergeable(lin);
        QL_CHECK(why.empty(), at, ": ", why);
        QL_CHECK(a->group_size == lin.qweight.group_size, at, ": group size expected ",
                 lin.qweight.group_size, " (the base's quantization group), got ", a->group_size);
        QL_CHECK(a->n_groups == ceil_div(a->in, a->group_size), at, ": group count expected ",
                 ceil_div(a->in, a->group_size), ", got ", a->n_groups);
        QL_CHECK(a->pool == set.config.pool, at, ": pooling expected ",
                 adapter_pool_name(set.config.pool), ", got ", adapter_pool_name(a->pool));
      }
      check_shape(source, cat(where(layer, t), " lora_A"), a->A.shape(),
                  {set.config.rank, qalora ? a->n_groups : a->in});
      check_shape(source, cat(where(layer, t), " lora_B"), a->B.shape(), {a->out, set.config.rank});
    }
  }
  QL_CHECK(set.adapters.size() == expected, prefix, "adapter count expected ", expected, " (",
           n_layers, " layers x ", set.config.targets.size(), " targets), got ",
           set.adapters.size(), " (a layer and target repeated)");
}

}  // namespace qalora
