// Adapter configuration and creation: names and their parsing, the scale, initialization,
// QA-LoRA's groups taken from the base (ragged last group, per channel) and its refusal on
// bases it cannot merge into, and check_adapters_match.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "model/random_model.h"
#include "qalora/adapters/adapter.h"
#include "qalora/core/error.h"
#include "qalora/quant/quantize_model.h"

namespace qalora {
namespace {

// Runs `f`, expecting an Error whose message contains every one of `parts`.
template <typename F>
void expect_error(F&& f, std::initializer_list<std::string_view> parts) {
  try {
    f();
    ADD_FAILURE() << "expected an Error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (std::string_view p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg;
  }
}

// dim 52 and MLP 100 with groups of 32 leave last groups of 20 and 4; q_dim = 48 (o_proj).
Model small_model(int64_t dim = 52) {
  test::RandomModelShape shape;
  shape.dim = dim;
  return test::make_random_model(shape, 1);
}

Model quantized_model(const std::string& method, int64_t group_size, int64_t dim = 52) {
  Model m = small_model(dim);
  QuantizeOptions o;
  o.method = method;
  o.group_size = group_size;
  quantize_model(m, o, {});
  return m;
}

AdapterConfig config(AdapterKind kind, int64_t rank = 4) {
  AdapterConfig c;
  c.kind = kind;
  c.rank = rank;
  c.seed = 5;
  return c;
}

TEST(AdapterNames, ParseWhatTheyPrint) {
  for (int i = 0; i < kNumTargets; ++i) {
    const auto t = static_cast<Target>(i);
    EXPECT_EQ(parse_targets(target_name(t)), std::vector<Target>{t});
  }
  EXPECT_EQ(parse_targets("v_proj, q_proj,v_proj"), (std::vector<Target>{Target::Q, Target::V}));
  EXPECT_EQ(parse_targets("all-linear").size(), 7u);
  EXPECT_EQ(parse_targets("all"), parse_targets("all-linear"));
  EXPECT_EQ(parse_targets("down_proj,all").back(), Target::Down);
  expect_error([] { parse_targets("q_proj,x_proj"); }, {"'x_proj'", "q_proj", "all-linear"});
  expect_error([] { parse_targets(""); }, {"''"});
  expect_error([] { parse_targets("q_proj,"); }, {"''"});

  for (AdapterKind k : {AdapterKind::Lora, AdapterKind::QaLora})
    EXPECT_EQ(parse_adapter_kind(adapter_kind_name(k)), k);
  for (AdapterPool p : {AdapterPool::Average, AdapterPool::Sum})
    EXPECT_EQ(parse_adapter_pool(adapter_pool_name(p)), p);
  for (AdapterInit i : {AdapterInit::Kaiming, AdapterInit::Gaussian})
    EXPECT_EQ(parse_adapter_init(adapter_init_name(i)), i);
  expect_error([] { parse_adapter_kind("dora"); }, {"'dora'", "lora or qalora"});
  expect_error([] { parse_adapter_pool("max"); }, {"'max'", "avg or sum"});
  expect_error([] { parse_adapter_init("zeros"); }, {"'zeros'", "kaiming or gaussian"});
}

TEST(AdapterConfig, Scale) {
  AdapterConfig c;
  c.rank = 64;
  c.alpha = 16.0f;
  EXPECT_FLOAT_EQ(c.scale(), 0.25f);
  c.rslora = true;
  EXPECT_FLOAT_EQ(c.scale(), 2.0f);
}

TEST(AdapterCreate, RefusesBadConfigs) {
  const Model m = small_model();
  const auto refuse = [&](AdapterConfig c, std::initializer_list<std::string_view> parts) {
    expect_error([&] { create_adapters(m, c); }, parts);
  };
  AdapterConfig c = config(AdapterKind::Lora);
  c.rank = 0;
  refuse(c, {"rank expected >= 1, got 0"});
  c = config(AdapterKind::Lora);
  c.dropout = 1.0f;
  refuse(c, {"dropout expected in [0, 1), got 1"});
  c.dropout = -0.1f;
  refuse(c, {"dropout", "-0.1"});
  c = config(AdapterKind::Lora);
  c.alpha = std::numeric_limits<float>::quiet_NaN();
  refuse(c, {"alpha"});
  c = config(AdapterKind::Lora);
  c.targets.clear();
  refuse(c, {"targets expected at least one"});
  c.targets = {Target::Q, Target::Q};
  refuse(c, {"q_proj twice"});
}

TEST(AdapterCreate, LoraShapesAndKaimingInit) {
  const Model m = small_model();
  AdapterConfig c = config(AdapterKind::Lora, 8);
  c.targets = {Target::Q, Target::O, Target::Down};
  const AdapterSet set = create_adapters(m, c);
  ASSERT_EQ(set.adapters.size(), 2u * 3u);
  const int64_t ins[] = {52, 48, 100}, outs[] = {48, 52, 52};
  int64_t params = 0;
  for (size_t j = 0; j < set.adapters.size(); ++j) {
    const LoraAdapter& a = set.adapters[j];
    EXPECT_EQ(a.layer, static_cast<int64_t>(j / 3));
    EXPECT_EQ(a.target, c.targets[j % 3]);
    EXPECT_EQ(a.in, ins[j % 3]);
    EXPECT_EQ(a.out, outs[j % 3]);
    EXPECT_FALSE(a.pooled());
    EXPECT_EQ(a.A.shape(), (Shape{8, a.in}));
    EXPECT_EQ(a.B.shape(), (Shape{a.out, 8}));
    for (float b : a.B.span()) ASSERT_EQ(b, 0.0f);
    // U(-1/sqrt(I), 1/sqrt(I)): inside the bound, reaching near it, centred.
    const double bound = 1.0 / std::sqrt(static_cast<double>(a.in));
    double mx = 0.0, sum = 0.0;
    for (float v : a.A.span()) {
      mx = std::max(mx, std::abs(static_cast<double>(v)));
      sum += v;
    }
    EXPECT_LE(mx, bound);
    EXPECT_GT(mx, 0.95 * bound);
    // The mean of n uniforms has standard deviation bound / sqrt(3 n).
    const auto n = static_cast<double>(a.A.numel());
    EXPECT_LT(std::abs(sum / n), 5 * bound / std::sqrt(3 * n));
    params += a.A.numel() + a.B.numel();
  }
  EXPECT_EQ(set.parameter_count(), params);
  EXPECT_EQ(set.find(1, Target::O), &set.adapters[4]);
  EXPECT_EQ(set.find(1, Target::V), nullptr);
  EXPECT_EQ(set.find(2, Target::Q), nullptr);
}

TEST(AdapterCreate, GaussianInitHasStandardDeviationOneOverRank) {
  const Model m = small_model();
  AdapterConfig c = config(AdapterKind::Lora, 4);
  c.init = AdapterInit::Gaussian;
  const AdapterSet set = create_adapters(m, c);
  double sum = 0.0, sq = 0.0, n = 0.0;
  for (const LoraAdapter& a : set.adapters)
    for (float v : a.A.span()) {
      sum += v;
      sq += static_cast<double>(v) * v;
      n += 1;
    }
  const double mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
  EXPECT_NEAR(sd, 0.25, 0.25 * 0.05);  // n ~ 3700: the sample sd is within ~1.2% (one sigma)
  EXPECT_NEAR(mean, 0.0, 0.02);
}

TEST(AdapterCreate, InitIsSeededPerLayerAndTarget) {
  const Model m = small_model();
  AdapterConfig c = config(AdapterKind::Lora);
  c.targets = {Target::Q, Target::V};
  const AdapterSet both = create_adapters(m, c);
  const AdapterSet again = create_adapters(m, c);
  c.targets = {Target::V};
  const AdapterSet only_v = create_adapters(m, c);
  c.seed = 6;
  const AdapterSet other_seed = create_adapters(m, c);
  const auto values = [](const AdapterSet& s, int64_t layer, Target t) {
    const Tensor& A = s.find(layer, t)->A;
    return std::vector<float>(A.span().begin(), A.span().end());
  };
  EXPECT_EQ(values(both, 1, Target::Q), values(again, 1, Target::Q));
  // One layer's A does not depend on which other targets exist.
  EXPECT_EQ(values(both, 1, Target::V), values(only_v, 1, Target::V));
  EXPECT_NE(values(both, 1, Target::V), values(other_seed, 1, Target::V));
  EXPECT_NE(values(both, 0, Target::V), values(both, 1, Target::V));
}

TEST(AdapterCreate, QaLoraTakesRaggedGroupsFromTheBase) {
  const Model m = quantized_model("rtn", 32);
  const AdapterSet set = create_adapters(m, config(AdapterKind::QaLora, 6));
  ASSERT_EQ(set.adapters.size(), 2u * kNumTargets);
  for (const LoraAdapter& a : set.adapters) {
    EXPECT_EQ(a.group_size, 32);
    EXPECT_EQ(a.n_groups, (a.in + 31) / 32);  // 52 -> 2, 48 -> 2, 100 -> 4
    EXPECT_EQ(a.A.shape(), (Shape{6, a.n_groups}));
    EXPECT_EQ(a.B.shape(), (Shape{a.out, 6}));
    const double bound = 1.0 / std::sqrt(static_cast<double>(a.n_groups));
    for (float v : a.A.span()) ASSERT_LE(std::abs(static_cast<double>(v)), bound);
  }
  EXPECT_EQ(set.find(0, Target::Down)->n_groups, 4);
  EXPECT_EQ(set.base.quant_method, "rtn");
  EXPECT_EQ(set.base.group_size, 32);
  check_adapters_match(set, m, "adapter");

  // Per channel: one group of all inputs.
  const Model pc = quantized_model("rtn", -1);
  for (const LoraAdapter& a : create_adapters(pc, config(AdapterKind::QaLora)).adapters) {
    EXPECT_EQ(a.group_size, a.in);
    EXPECT_EQ(a.n_groups, 1);
  }
}

TEST(AdapterCreate, QaLoraRefusedOnBasesItCannotMergeInto) {
  const AdapterConfig qa = config(AdapterKind::QaLora);
  expect_error([&] { create_adapters(small_model(), qa); },
               {"layer 0 q_proj", "dense", "--adapter lora"});
  const Model nf4 = quantized_model("nf4", 64);
  expect_error([&] { create_adapters(nf4, qa); }, {"layer 0 q_proj", "NF4", "--adapter lora"});
  // QLoRA is LoRA on the same base.
  EXPECT_EQ(create_adapters(nf4, config(AdapterKind::Lora)).adapters.size(), 2u * kNumTargets);

  // act-order without static groups: a column outside its run of G.
  Model m = quantized_model("rtn", 32);
  QMatrix& w = m.layers[1].gate.qweight;
  w.g_idx.resize(static_cast<size_t>(w.cols));
  for (size_t i = 0; i < w.g_idx.size(); ++i) w.g_idx[i] = static_cast<int32_t>(i / 32);
  EXPECT_NO_THROW(create_adapters(m, qa));  // g_idx = i / G is contiguous
  std::swap(w.g_idx[3], w.g_idx[40]);
  expect_error([&] { create_adapters(m, qa); },
               {"layer 1 gate_proj", "act-order", "--static-groups", "--adapter lora"});
}

TEST(AdapterMatch, NamesTheFirstMismatch) {
  const Model m = quantized_model("rtn", 32);
  const AdapterSet set = create_adapters(m, config(AdapterKind::QaLora));
  check_adapters_match(set, m, "run/adapter");

  Model one_layer = quantized_model("rtn", 32);
  one_layer.layers.pop_back();
  one_layer.config.n_layers = 1;
  expect_error([&] { check_adapters_match(set, one_layer, "run/adapter"); },
               {"run/adapter: layer count expected 1", "got 2"});
  AdapterSet unknown_base = set;
  unknown_base.base.n_layers = 0;  // as read from PEFT files
  expect_error([&] { check_adapters_match(unknown_base, one_layer, "run/adapter"); },
               {"layer 1 q_proj: layer expected 0..0"});

  expect_error([&] { check_adapters_match(set, quantized_model("rtn", 32, 60), "run/adapter"); },
               {"run/adapter: layer 0 q_proj: in features expected 60, got 52"});
  expect_error([&] { check_adapters_match(set, quantized_model("rtn", 16), "run/adapter"); },
               {"layer 0 q_proj: group size expected 16", "got 32"});
  expect_error([&] { check_adapters_match(set, quantized_model("nf4", 64), "run/adapter"); },
               {"run/adapter: layer 0 q_proj: qalora needs", "NF4"});

  AdapterSet missing = set;
  missing.adapters.erase(missing.adapters.begin() + 3);
  expect_error([&] { check_adapters_match(missing, m, "a"); },
               {"a: layer 0 o_proj: adapter expected", "got none"});
  AdapterSet repeated = set;
  repeated.adapters.push_back(set.adapters[0]);
  expect_error([&] { check_adapters_match(repeated, m, "a"); },
               {"adapter count expected 14", "got 15"});
  AdapterSet bad_groups = set;
  bad_groups.adapters[2].n_groups = 3;
  expect_error([&] { check_adapters_match(bad_groups, m, "a"); },
               {"layer 0 v_proj: group count expected 2, got 3"});
  AdapterSet bad_pool = set;
  bad_pool.adapters[1].pool = AdapterPool::Sum;
  expect_error([&] { check_adapters_match(bad_pool, m, "a"); },
               {"layer 0 k_proj: pooling expected avg, got sum"});
  AdapterSet bad_shape = set;
  bad_shape.adapters[5].B = Tensor::zeros({bad_shape.adapters[5].out, 5});
  expect_error([&] { check_adapters_match(bad_shape, m, "a"); },
               {"layer 0 up_proj lora_B", "expected [100, 4]"});
  AdapterSet bad_rank = set;
  bad_rank.config.rank = 0;
  expect_error([&] { check_adapters_match(bad_rank, m, "a"); }, {"a: adapter rank expected"});

  // A LoRA set on the same base: groups must be absent.
  AdapterSet lora = create_adapters(m, config(AdapterKind::Lora));
  check_adapters_match(lora, m, "a");
  lora.adapters[0].group_size = 32;
  expect_error([&] { check_adapters_match(lora, m, "a"); }, {"group size expected 0, got 32"});
}

TEST(AdapterBase, IdentityFromConfigAndQuantInfo) {
  const Model m = quantized_model("rtn", 32);
  const BaseIdentity b = base_identity(m);
  EXPECT_EQ(b.name, m.config.name);
  EXPECT_EQ(b.arch, "llama");
  EXPECT_EQ(b.vocab_size, 97);
  EXPECT_EQ(b.dim, 52);
  EXPECT_EQ(b.hidden_dim, 100);
  EXPECT_EQ(b.n_layers, 2);
  EXPECT_EQ(b.n_heads, 6);
  EXPECT_EQ(b.n_kv_heads, 3);
  EXPECT_EQ(b.quant_method, "rtn");
  EXPECT_EQ(b.bits, 4);
  EXPECT_EQ(b.group_size, 32);
  EXPECT_EQ(base_identity(small_model()).quant_method, "");
}

}  // namespace
}  // namespace qalora
