// Merging a trained adapter into its base (SPEC §4), and measuring how faithful the merged model
// is to the base running the adapter unmerged.
//   merge_qalora: the exact QA-LoRA merge into the offsets of an affine quantized base; the
//                 result is still a b-bit model with the same codes and scales.
//   merge_dense:  W + scale * B A in fp32 for any adapter (quantized layers are dequantized
//                 first); the lossless but unquantized path.
// The model keeps no record of a merge; `qalora merge` writes merge.json beside the weights.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

#include "qalora/adapters/adapter.h"
#include "qalora/model/model.h"

namespace qalora {

// Folds every adapter of a QA-LoRA `set` into its layer's offsets:
//   m'[j,l] = m[j,l] + scale * (B A)[j,l] / |l|  (average pooling, |l| the true group size),
//   m'[j,l] = m[j,l] + scale * (B A)[j,l]        (sum pooling),
// with B A and the sum in double, rounded once to fp32. Codes, scales and everything else stay
// bit-identical. Throws Error (one line) when the set is not QA-LoRA or does not match `model`
// (check_adapters_match).
void merge_qalora(Model& model, const AdapterSet& set);
// The same for the adapters of block `index` only, on that block. The caller checks `set` (a
// QA-LoRA set that matches the model).
void merge_qalora_block(LayerWeights& block, int64_t index, const AdapterSet& set);
// save_hf_model of `model` after merge_qalora, written a block at a time: memory holds the fp32
// offsets of one merged block, not of the whole model (about 0.8 GB at 7B, 8 GB at 70B). Throws
// as merge_qalora does.
void save_merged_qalora(const Model& model, const AdapterSet& set,
                        const std::filesystem::path& dir);

// Every adapted layer becomes the fp32 weight W + scale * B A (LoRA) or
// W[j,i] + scale * (B A)[j,g(i)] / |g(i)| (QA-LoRA, average; without / |g| for sum), W
// dequantized first when quantized. Layers without an adapter keep their form, so a quantized
// base with some targets left out stays a mixed model (save_hf_model writes dense linears into a
// quantized folder and load_hf_model reads them back); model.quant becomes empty only when no
// quantized linear remains. Throws Error when `set` does not match `model`.
void merge_dense(Model& model, const AdapterSet& set);
// The same for the adapters of block `index` only, on that block (for writers that produce a
// model a block at a time). The caller checks `set` against the model (check_adapters_match).
void merge_dense_block(LayerWeights& block, int64_t index, const AdapterSet& set);
// save_hf_model of `model` after merge_dense (its float tensors as `floats` says), written a
// block at a time: memory holds one merged block, not a merged copy of the model (whose adapted
// linears are all fp32).
void save_merged_dense(const Model& model, const AdapterSet& set, const std::filesystem::path& dir,
                       DenseFloats floats = DenseFloats::F32);

struct MergeFidelity {
  double max_abs_logit_diff = 0;  // over every position and vocabulary entry
  double mean_kl = 0;             // mean over positions of KL(unmerged || merged), nats
  double ppl_unmerged = 0;
  double ppl_merged = 0;
  int64_t tokens = 0;  // positions compared (logit rows, BOS rows included)
};

// Runs `unmerged_base` with `set` applied unmerged (as is when `set` is null: export compares a
// model with the form it stores) and `merged` on windows of `ctx` positions of
// `tokens` (non-overlapping; each window starts with BOS when the merged model's tokenizer adds
// one, as `qalora perplexity`), takes the logits of every position of both, and compares them;
// KL and the perplexities are computed in double. Throws Error on a vocabulary mismatch, a
// context below 2 or above either model's, or too few tokens.
MergeFidelity merge_fidelity(const Model& unmerged_base, const AdapterSet* set,
                             const Model& merged, std::span<const int32_t> tokens, int64_t ctx);

// The two halves of merge_fidelity, for a merge done in place (one model in memory, not two):
// the reference logits of every window, taken before the merge, then the comparison with the
// merged model. The reference holds tokens x vocab floats.
struct FidelityReference {
  std::vector<int32_t> tokens;
  int64_t ctx = 0;
  int64_t vocab = 0;
  int32_t bos = -1;           // the BOS each window starts with; -1 = none
  std::vector<float> logits;  // [positions of every window, vocab], windows in order
  double nll_sum = 0;         // of the positions perplexity() scores
  int64_t tokens_scored = 0;
};
FidelityReference fidelity_reference(const Model& model, const AdapterSet* set,
                                     std::span<const int32_t> tokens, int64_t ctx);
MergeFidelity merge_fidelity(const FidelityReference& reference, const Model& merged);

}  // namespace qalora
