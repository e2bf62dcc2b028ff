// Adapter files. One folder holds both layouts, written at every save:
//   native: qalora_adapter.json (AdapterConfig, BaseIdentity, per-layer group layout) +
//           qalora_adapter.safetensors (A and B of every target, fp32, pair RoPE layout);
//   PEFT:   adapter_config.json + adapter_model.safetensors (SPEC §8): keys
//           base_model.model.model.layers.N.{self_attn,mlp}.<target>.lora_{A,B}.weight, q/k
//           lora_B rows in the Hugging Face (halves) RoPE layout; QA-LoRA as PEFT's use_qalora
//           with A rescaled so that PEFT computes the same function. What PEFT cannot express
//           (ragged QA-LoRA groups) is not written as PEFT files; README.md in the folder says
//           why.
#pragma once

#include <filesystem>

#include "qalora/adapters/adapter.h"

namespace qalora {

struct Model;

// Writes both layouts into `dir` (created if needed), every file atomically. `model` is the
// base (for the RoPE permutation and PEFT's module names).
void save_adapter(const AdapterSet& set, const Model& model, const std::filesystem::path& dir);

// Writes only the PEFT layout (adapter_config.json + adapter_model.safetensors) into `dir`
// (created if needed), atomically per file. Throws Error, one line naming the first obstacle,
// when PEFT cannot express the set (ragged QA-LoRA groups, or several group sizes).
void save_peft_adapter(const AdapterSet& set, const Model& model, const std::filesystem::path& dir);

// Reads `dir`: the native files when present, else the PEFT files (a PEFT adapter trained on
// the Hugging Face model included: q/k lora_B rows are permuted to the pair layout). Checks the
// result against `model` (check_adapters_match); any mismatch, missing file or malformed field
// is an Error naming the file and field.
AdapterSet load_adapter(const std::filesystem::path& dir, const Model& model);

}  // namespace qalora
