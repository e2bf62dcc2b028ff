// The in-memory Llama-family model: configuration, fp32 weights and tokenizer. Every loader
// produces this form, with RoPE in the adjacent-pair layout (llama2.c / GGUF): Hugging Face
// q_proj/k_proj rows are permuted on load and back on save.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qalora/core/tensor.h"
#include "qalora/quant/qmatrix.h"
#include "qalora/tokenizer/tokenizer.h"

namespace qalora {

enum class ModelFormat { Gguf, HuggingFace, Llama2c };
const char* model_format_name(ModelFormat f);

struct RopeScaling {
  enum class Type { None, Linear, Llama3 };
  Type type = Type::None;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;     // llama3
  float high_freq_factor = 4.0f;    // llama3
  int64_t original_context = 8192;  // llama3
};

struct ModelConfig {
  std::string arch = "llama";
  std::string name;
  int64_t vocab_size = 0;
  int64_t dim = 0;         // hidden size
  int64_t hidden_dim = 0;  // MLP intermediate size
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;  // usually dim / n_heads
  int64_t context_length = 2048;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  // Per-frequency divisors (GGUF rope_freqs.weight, Llama 3.1); empty = none.
  std::vector<float> rope_freq_factors;
  float norm_eps = 1e-5f;
  bool tied_embeddings = false;
  bool qkv_bias = false;  // Qwen2

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
};

// y = W x + b with W [out, in], either fp32 (`weight`) or quantized (`qweight`, and `weight`
// empty); bias empty when absent.
struct Linear {
  Tensor weight;
  QMatrix qweight;
  Tensor bias;
  bool quantized() const { return !qweight.codes.empty(); }
  int64_t out_features() const { return quantized() ? qweight.rows : weight.dim(0); }
  int64_t in_features() const { return quantized() ? qweight.cols : weight.dim(1); }
  // The fp32 weight, dequantized when quantized.
  Tensor dense_weight() const { return quantized() ? dequantize(qweight) : weight.decoded(); }
  // Drops its memory-mapped bytes from resident memory (see release_mapped_pages).
  void release_pages() const;
};

// How the linear layers were quantized (quantize_config.json); method empty = not quantized.
struct QuantInfo {
  std::string method;  // rtn, gptq, nf4, fp4, int8
  int bits = 0;
  int64_t group_size = 0;  // -1 = per channel
  bool sym = false;
  bool act_order = false;
  bool static_groups = false;
  bool double_quant = false;
  float damp = 0.0f;
  std::string calibration;  // what GPTQ calibrated on, for the record
  bool empty() const { return method.empty(); }
};

struct LayerWeights {
  Tensor attn_norm;  // [dim]
  Linear q, k, v, o;
  Tensor ffn_norm;  // [dim]
  Linear gate, up, down;
  // Drops the block's memory-mapped weights from resident memory: a pass over many tokens calls
  // it once done with the block, so resident memory holds one block of a mapped model, not all.
  void release_pages() const;
};

// What the source file stored, for `qalora info`.
struct SourceTensor {
  std::string name;
  std::string type;
  Shape shape;
};

struct Model {
  ModelConfig config;
  Tensor tok_embeddings;  // [vocab, dim]
  std::vector<LayerWeights> layers;
  Tensor final_norm;                           // [dim]
  Tensor output;                               // [vocab, dim]; empty when tied to tok_embeddings
  QuantInfo quant;                             // of the seven linear layers of every block
  // The head in its source quantization where a QMatrix holds it exactly (GGUF Q8_0/Q4_0/Q4_1):
  // the runtime computes logits from it (as llama.cpp does) instead of the fp32 copy. Empty
  // otherwise.
  QMatrix head_q;
  std::shared_ptr<const Tokenizer> tokenizer;  // null when none was found

  ModelFormat format = ModelFormat::Gguf;
  std::string source_path;
  std::vector<SourceTensor> source_tensors;

  const Tensor& head() const { return output.empty() ? tok_embeddings : output; }
  int64_t parameter_count() const;
  // Checks every tensor's shape against the config; throws Error naming tensor, expected, actual.
  void validate() const;
  // Throws Error telling the user to pass --tokenizer when there is none.
  const Tokenizer& require_tokenizer() const;
};

struct LoadOptions {
  std::filesystem::path tokenizer;  // overrides/adds the tokenizer (llama2.c needs one)
  // What `qalora info` shows and no more: a quantized folder's affine linears keep their codes
  // (mapped, unread) but not their group parameters, so such a model cannot be run.
  bool describe_only = false;
};

// Detects the format from the path: *.gguf, a folder with config.json, or a llama2.c .bin.
// Pickle checkpoints (pytorch_model.bin, *.pt, *.pth) are refused, naming safetensors instead.
Model load_model(const std::filesystem::path& path, const LoadOptions& options = {});

// describe_only (LoadOptions): Q4_0 / Q8_0 linears skip the scan of their block scales that
// decides how their offsets are held (ggml_to_qmatrix), so `info` reads no tensor data.
Model load_gguf_model(const std::filesystem::path& path, bool describe_only = false);
// Only the tokenizer of a GGUF file (tokenizer.ggml.*), without loading its weights.
std::shared_ptr<const Tokenizer> load_gguf_tokenizer(const std::filesystem::path& path);
// config.json (Llama / Mistral / Qwen2) + model.safetensors or the shards of
// model.safetensors.index.json + tokenizer.json (else tokenizer.model; else no tokenizer).
// Quantized folders: qalora's own (docs/formats.md) and GPTQ checkpoints (AutoGPTQ /
// GPTQModel, v1 or v2 zeros) load into Linear::qweight; other quant_methods are refused.
Model load_hf_model(const std::filesystem::path& dir, bool describe_only = false);
// Finds tok<vocab>.bin or tokenizer.bin beside the checkpoint; no tokenizer when neither exists.
Model load_llama2c_model(const std::filesystem::path& path);
// How a dense folder stores its float tensors: F32 (exact), or every one rounded to F16 or BF16
// (nearest even), as Hugging Face checkpoints are usually published.
enum class DenseFloats { F32, F16, BF16 };
// What that rounding did to one tensor.
struct FloatRounding {
  std::string name;
  int64_t elements = 0;
  double max_abs_dw = 0, sum_sq_dw = 0, sum_sq_w = 0;
};

// Creates `dir` and writes config.json + model.safetensors (`floats`) + tokenizer.json and
// tokenizer_config.json when the model has a tokenizer, all atomically; q/k rows are permuted to
// the Hugging Face RoPE layout. Refuses models with per-frequency RoPE factors, and values beyond
// F16's range with DenseFloats::F16. A model with quantized linears is written as a native
// quantized folder (docs/formats.md) that loads back bit for bit (`floats` must be F32 there).
// Returns what rounding to F16 / BF16 did to each tensor (nothing for F32).
std::vector<FloatRounding> save_hf_model(const Model& model, const std::filesystem::path& dir,
                                         DenseFloats floats = DenseFloats::F32);

// save_hf_model one block at a time, for commands that produce blocks in order and drop each
// once written (quantize, merge): blocks are buffered until about `shard_bytes` have collected,
// then written as one safetensors shard (one model.safetensors when a single shard suffices,
// else model-0000i-of-0000n.safetensors with their index). Everything is written to
// "<dir>.partial" and moved into `dir` by finish(), config.json last; a writer destroyed before
// finish() (an error, an interrupted run) leaves `dir` untouched.
class ModelFolderWriter {
 public:
  static constexpr int64_t kDefaultShardBytes = int64_t{1} << 28;
  // `model` supplies the configuration, quantization record, tokenizer, source tensor types and,
  // at finish(), the embeddings, final norm and head; its blocks are not read.
  ModelFolderWriter(const Model& model, const std::filesystem::path& dir,
                    int64_t shard_bytes = kDefaultShardBytes,
                    DenseFloats floats = DenseFloats::F32);
  ~ModelFolderWriter();
  ModelFolderWriter(const ModelFolderWriter&) = delete;
  ModelFolderWriter& operator=(const ModelFolderWriter&) = delete;
  // Blocks in order 0..n_layers-1.
  void write_block(int64_t index, const LayerWeights& block);
  void finish();
  // The rounding of each float tensor written so far (see save_hf_model).
  const std::vector<FloatRounding>& rounding() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// save_hf_model of `record` whose blocks are `model`'s, each copied, changed by
// change(block, index) (dequantized, an adapter merged into it) and written, then its pages in
// `model` dropped: memory holds one changed block, not a changed copy of the model. Returns the
// rounding as save_hf_model does.
std::vector<FloatRounding> save_hf_model_by_block(
    const Model& record, const Model& model, const std::filesystem::path& dir, DenseFloats floats,
    const std::function<void(LayerWeights& block, int64_t index)>& change);

// Inverse frequencies of the head_dim / 2 rotary pairs, scaling applied; position p of pair
// i rotates by angle p * result[i].
std::vector<double> rope_inv_freq(const ModelConfig& config);
// cos/sin [positions, head_dim / 2] of those angles for positions 0..positions-1 (the tables
// ops::rope_forward reads), computed in double.
void rope_tables(const ModelConfig& config, int64_t positions, std::vector<float>& cos,
                 std::vector<float>& sin);

// RoPE layout conversion of q_proj/k_proj rows (per head). `to_hf` = adjacent pairs -> halves.
Tensor permute_rope_rows(const Tensor& w, int64_t n_heads, int64_t head_dim, bool to_hf);
// The same for a quantized weight: rows move with their codes and group parameters (throws
// for NF4/FP4 rows that do not own whole absmax blocks, see permute_rows in qmatrix_rows.h).
QMatrix permute_rope_rows(const QMatrix& w, int64_t n_heads, int64_t head_dim, bool to_hf);
// The same for a whole q/k linear: its weight (dense or quantized) and bias.
Linear permute_rope_rows(const Linear& lin, int64_t n_heads, int64_t head_dim, bool to_hf);
// Row r of the converted matrix is row result[r] of the original.
std::vector<int64_t> rope_row_order(int64_t n_heads, int64_t head_dim, bool to_hf);

}  // namespace qalora
