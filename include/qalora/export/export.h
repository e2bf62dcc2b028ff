// Exporting a model to the formats other tools run (SPEC §8, docs/export.md):
//   GGUF v3 (llama.cpp / ollama): llama-architecture and tokenizer metadata, each weight in the
//        smallest type that holds it exactly (an affine INT4 model with groups of a multiple
//        of 32 goes to Q4_1 code for code), or a type the caller forces;
//   GPTQ safetensors + config.json quantization_config (transformers, GPTQModel, vLLM);
//   dense Hugging Face safetensors (every quantized linear dequantized).
// Every exported weight is compared with the model's own values as the consumer decodes them;
// the report lists the differences per tensor.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "qalora/adapters/adapter.h"
#include "qalora/io/gguf.h"
#include "qalora/model/model.h"

namespace qalora {

// One exported weight. dw = what the consumer decodes - the model's value (fp32), over every
// element; dm = the stored group offset - the model's (Q4_1 rounds offsets to fp16, GPTQ stores
// integer zero points, so a merged QA-LoRA model's fp32 offsets move).
struct TensorExport {
  std::string name;    // the name in the output file
  std::string type;    // as written: "Q4_1", "F16", "gptq 4-bit", "F32 (dense)", ...
  std::string source;  // what the model holds: "affine 4-bit g32", "nf4", "f32"
  std::string note;    // why the tensor is not in the requested type; empty when it is
  int64_t elements = 0;
  double max_abs_dw = 0;
  double sum_sq_dw = 0;  // for the relative Frobenius error
  double sum_sq_w = 0;
  double max_abs_dm = 0;
  bool exact() const { return max_abs_dw == 0; }
  double relative_error() const;  // ||dw||_F / ||w||_F (0 for a zero tensor)
};

struct ExportReport {
  std::string format;  // gguf, gptq, hf, peft
  std::string path;
  std::vector<TensorExport> tensors;

  double max_abs_dw() const;
  double max_abs_dm() const;
  double relative_error() const;  // over every tensor together
  bool exact() const { return max_abs_dw() == 0; }
  // {"format", "path", "exact", "max_abs_dw", "relative_error", "max_abs_dm", "types": {type:
  // count}, "tensors": [{name, type, source, note, elements, max_abs_dw, relative_error,
  // max_abs_dm}]}.
  nlohmann::json to_json() const;
};

struct GgufExportOptions {
  // The type of the seven linears of every block; nullopt = auto (the smallest exact type).
  // Embeddings, the head and norms never follow it (they keep their source type, norms F32).
  std::optional<GgmlType> type;
  bool allow_lossy = false;
};

// Whether an affine matrix can go to GGUF as Q4_1 from its codes (at most 4 bits, contiguous
// groups, rows and groups multiples of 32), its offsets then stored in fp16.
bool gguf_q4_1_codes(const QMatrix& q);

// Writes `path` atomically. Per linear weight (and the embeddings / head, under auto):
//  - auto: the first of these that decodes to the model's values exactly: the tensor's source
//    GGUF type (for a quantized weight only a block type), then for an affine QMatrix Q4_0 /
//    Q4_1 (bits <= 4) and Q8_0 written from its codes, then F16, BF16, F32. Q4_1 rounds
//    the offsets to fp16 (its storage precision, SPEC §4); that counts as exact here and is
//    reported as dm / dw.
//  - a forced type: used when it holds the weight exactly (Q4_1 as above); otherwise Error
//    unless allow_lossy (then quantize_row of the dequantized weight). A dense weight takes any
//    forced type (the user asked to quantize it).
//  - rows whose length is not a multiple of 32 cannot be a block type (ggml's rule): they take
//    the auto float type, with a note.
// Norms are F32; q/k rows of qwen2 go back to the halves RoPE layout (llama.cpp's NEOX rope).
// Throws Error before writing anything for a lossy tensor without allow_lossy.
ExportReport export_gguf(const Model& model, const std::filesystem::path& path,
                         const GgufExportOptions& options);

struct GptqExportOptions {
  bool v2 = false;  // checkpoint_format gptq_v2 (zeros as is), else gptq (zero - 1)
  bool allow_lossy = false;
};

// Whether export_gptq packs `q` (rows and columns fill whole int32 words at its bits); an
// affine matrix that packs has its offsets stored as integer zero points.
bool gptq_packable(const QMatrix& q);

// Writes a GPTQ folder into `dir` (created if needed; the CLI passes the temporary folder of
// write_folder_atomic):
// model.safetensors with qweight / qzeros / scales (F16) / g_idx per linear in the Hugging Face
// layout (q/k rows in the halves RoPE order), embeddings, norms and an untied head (F16 where
// exact, else F32), config.json with quantization_config, quantize_config.json and the tokenizer
// files. Zero points are z = round(-m / s) clamped to [0, 2^b - 1] ([1, 2^b - 1] for v1, which
// cannot store 0): exact for offsets of the form -s z, rounded otherwise (reported). A scale
// that is not an fp16 value is an Error unless allow_lossy. Linears whose sizes do not fill
// whole int32 words at b bits are written dense (as GPTQModel writes modules it skips) and
// named in quantization_config.modules_in_block_to_quantize. Throws Error for a model with no
// quantized linear, NF4/FP4, or act-order groups (g_idx).
ExportReport export_gptq(const Model& model, const std::filesystem::path& dir,
                         const GptqExportOptions& options);

// A copy of `model` whose quantized linears (and quantized head) are dense fp32 weights.
Model dequantized_model(const Model& model);

// The model as a dense Hugging Face folder in `dir` (save_hf_model of dequantized_model(model),
// with `adapter` merged dense when given (merge_dense)), each block dequantized and merged as it
// is written, so memory holds one dense block; its float tensors F32 or rounded to F16 / BF16
// (`floats`). Dequantizing and the RoPE row move are exact: the report lists only the rounded
// tensors, with their errors.
ExportReport export_hf(const Model& model, const std::filesystem::path& dir,
                       DenseFloats floats = DenseFloats::F32, const AdapterSet* adapter = nullptr);

// Calls write(tmp) with an empty folder beside `dir`, then renames it to `dir`. An existing
// `dir` (folder or file) is an Error unless `replace`; it is then swapped out and removed only
// after the new folder is in place. The temporary folder is removed when write throws.
void write_folder_atomic(const std::filesystem::path& dir, bool replace,
                         const std::function<void(const std::filesystem::path&)>& write);

}  // namespace qalora
