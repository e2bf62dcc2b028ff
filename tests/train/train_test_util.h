// The small models, adapters and sequence that the training-step tests share (CPU and CUDA).
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "model/random_model.h"
#include "qalora/adapters/adapter.h"
#include "qalora/quant/quantize_model.h"
#include "qalora/train/train_step.h"

namespace qalora::test {

struct Case {
  std::string name;
  std::string method;  // "" = dense base
  int bits;
  AdapterKind kind;
  AdapterPool pool;
  bool tied;
};

inline std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.name;
}

// dim 40 and hidden 24 with groups of 16: every layer has a ragged last group (8 inputs).
inline Model make_base(const Case& c) {
  test::RandomModelShape shape;
  shape.vocab = 29, shape.dim = 40, shape.hidden = 24, shape.layers = 2;
  shape.heads = 4, shape.kv_heads = 2, shape.head_dim = 10, shape.tied = c.tied;
  Model m = test::make_random_model(shape, 7);
  if (!c.method.empty()) {
    QuantizeOptions q;
    q.method = c.method;
    q.bits = c.bits;
    q.group_size = c.method == "nf4" ? kCodebookBlock : 16;
    quantize_model(m, q, {});
  }
  return m;
}

inline AdapterSet make_adapters(const Model& m, const Case& c, float dropout) {
  AdapterConfig cfg;
  cfg.kind = c.kind;
  cfg.pool = c.pool;
  cfg.rank = 3;
  cfg.alpha = 6.0f;
  cfg.dropout = dropout;
  cfg.seed = 11;
  AdapterSet set = create_adapters(m, cfg);
  test::randomize_adapter_b(set, 5);
  return set;
}

inline const std::vector<int32_t> kTokens = {1, 5, 17, 3, 28, 9, 9, 0, 21, 14, 2};
inline const std::vector<uint8_t> kTarget = {0, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1};

inline std::vector<float> all_grads(const AdapterSet& set) {
  std::vector<float> g;
  for (const LoraAdapter& a : set.adapters) {
    g.insert(g.end(), a.grad_A.begin(), a.grad_A.end());
    g.insert(g.end(), a.grad_B.begin(), a.grad_B.end());
  }
  return g;
}

inline std::vector<float> grads_with(const Model& m, AdapterSet& set, TrainStepOptions options) {
  TrainSession session(m, set, 16, options);
  zero_adapter_grads(set);
  int64_t n = 0;
  session.forward_backward(kTokens, kTarget, 0.5f, 1234, n);
  return all_grads(set);
}

// Every base the step supports: dense, NF4 and affine INT2/3/4, LoRA and QA-LoRA, tied head.
inline const std::vector<Case> kBaseCases = {
    Case{"lora_dense", "", 0, AdapterKind::Lora, AdapterPool::Average, false},
    Case{"lora_nf4", "nf4", 4, AdapterKind::Lora, AdapterPool::Average, true},
    Case{"lora_int4", "rtn", 4, AdapterKind::Lora, AdapterPool::Average, false},
    Case{"qalora_int4_avg", "rtn", 4, AdapterKind::QaLora, AdapterPool::Average, false},
    Case{"qalora_int3_sum", "rtn", 3, AdapterKind::QaLora, AdapterPool::Sum, true},
    Case{"qalora_int2_avg", "rtn", 2, AdapterKind::QaLora, AdapterPool::Average, false}};

}  // namespace qalora::test
