// Low-rank adapters on the linear layers of a frozen base (SPEC §4): LoRA on any base (dense =
// LoRA, NF4/FP4 = QLoRA, integer = GPTQ-LoRA) and QA-LoRA, whose A acts on the group-pooled
// input so that B A folds into the offsets of an affine quantized base.
//
// Shapes, named once: T tokens, I = in features, O = out features, r rank, G pooling group,
// L = ceil(I / G) groups (the last one may be smaller), C = A's columns (I for LoRA, L for
// QA-LoRA).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qalora/core/tensor.h"

namespace qalora {

struct Model;
struct Linear;
struct LayerWeights;

enum class AdapterKind { Lora, QaLora };
enum class AdapterPool { Average, Sum };  // QA-LoRA pooling: mean over the group, or its sum
enum class AdapterInit { Kaiming, Gaussian };

// The seven linear layers of a block, in LayerWeights order.
enum class Target : uint8_t { Q, K, V, O, Gate, Up, Down };
inline constexpr int kNumTargets = 7;
const char* target_name(Target t);  // "q_proj", "k_proj", ..., "down_proj"
// The linear layer of `layer` that `t` names.
const Linear& target_linear(const LayerWeights& layer, Target t);
Linear& target_linear(LayerWeights& layer, Target t);
std::vector<Target> all_targets();  // the seven, in LayerWeights order ("all-linear")
// "q_proj,v_proj" or "all-linear" (also "all"); duplicates removed, LayerWeights order.
// Throws Error naming the unknown entry and listing the valid names.
std::vector<Target> parse_targets(std::string_view list);
const char* adapter_kind_name(AdapterKind k);  // "lora", "qalora"
AdapterKind parse_adapter_kind(std::string_view name);
const char* adapter_pool_name(AdapterPool p);  // "avg", "sum"
AdapterPool parse_adapter_pool(std::string_view name);
const char* adapter_init_name(AdapterInit i);  // "kaiming", "gaussian"
AdapterInit parse_adapter_init(std::string_view name);

struct AdapterConfig {
  AdapterKind kind = AdapterKind::Lora;
  int64_t rank = 64;
  float alpha = 16.0f;
  float dropout = 0.05f;
  bool rslora = false;  // scale alpha / sqrt(r) instead of alpha / r
  std::vector<Target> targets = all_targets();
  AdapterInit init = AdapterInit::Kaiming;
  AdapterPool pool = AdapterPool::Average;  // QA-LoRA only
  uint64_t seed = 0;                        // initialization of A

  float scale() const;  // alpha / r, or alpha / sqrt(r) with rslora
};

// What an adapter was trained on, to refuse loading it onto another base.
struct BaseIdentity {
  std::string name;  // ModelConfig::name (may be empty)
  std::string arch;
  int64_t vocab_size = 0, dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0;
  std::string quant_method;  // QuantInfo::method; empty for a dense base
  int bits = 0;
  int64_t group_size = 0;
};
BaseIdentity base_identity(const Model& model);

// The adapter of one target layer.
struct LoraAdapter {
  int64_t layer = 0;
  Target target = Target::Q;
  int64_t in = 0, out = 0;  // I, O of the base layer
  int64_t group_size = 0;   // QA-LoRA: G (the layer's quantization group); 0 for LoRA
  int64_t n_groups = 0;     // QA-LoRA: L; 0 for LoRA
  // QA-LoRA: AdapterConfig::pool, copied here because the ops of lora.h see only the adapter.
  AdapterPool pool = AdapterPool::Average;
  Tensor A;                   // [r, C]
  Tensor B;                   // [O, r]
  std::vector<float> grad_A;  // [r, C]; empty until the trainer allocates gradients
  std::vector<float> grad_B;  // [O, r]

  int64_t rank() const { return A.dim(0); }
  int64_t a_cols() const { return A.dim(1); }  // C
  bool pooled() const { return group_size > 0; }
};

struct AdapterSet {
  AdapterConfig config;
  BaseIdentity base;
  std::vector<LoraAdapter> adapters;  // by layer, then target (LayerWeights order)

  // nullptr when (layer, target) carries no adapter.
  const LoraAdapter* find(int64_t layer, Target t) const;
  LoraAdapter* find(int64_t layer, Target t);
  int64_t parameter_count() const;
};

// Adapters for every target of every layer of `model`: A initialised from config.seed
// (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(C), 1/sqrt(C)), or Gaussian with standard
// deviation 1/r as PEFT's "gaussian"), B = 0. Each (layer, target) draws from its own stream,
// so one layer's A does not depend on which other targets exist.
// QA-LoRA takes G from each layer's affine quantization group and is refused, with the reason
// and what to do instead, on a base it cannot merge into: dense, NF4/FP4, or act-order without
// static groups (a non-contiguous g_idx). Throws Error on rank < 1, dropout outside [0, 1),
// a non-finite alpha, an empty or repeated target list.
AdapterSet create_adapters(const Model& model, const AdapterConfig& config);

// Throws Error "<source>: ..." naming the first mismatch between an adapter set and `model`:
// an invalid config (as create_adapters), layer count, a missing, extra or repeated adapter, a
// layer's in/out features, QA-LoRA group size, group count or pooling, the shapes of A and B,
// or a QA-LoRA set on a base it cannot merge into.
void check_adapters_match(const AdapterSet& set, const Model& model, std::string_view source);

}  // namespace qalora
