// Model -> GPTQ checkpoint folder (AutoGPTQ / GPTQModel layout, SPEC §2 and §8): the inverse of
// gptq_to_qmatrix, with integer zero points.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "export/export_internal.h"
#include "model/hf_folder.h"
#include "qalora/adapters/adapter.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/safetensors.h"
#include "qalora/quant/offset_rounding.h"

namespace qalora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using exporting::add_difference;
using exporting::describe;
using hf::st_raw;

// Puts value k of a packed stream at bits [bits * k, bits * k + bits) of the words `stride`
// apart (the inverse of gptq_unpack); the words start at zero.
void gptq_pack(uint32_t* words, int64_t stride, int64_t k, int bits, uint32_t v) {
  const int64_t bit = k * bits;
  const int64_t w = bit / 32;
  const auto shift = static_cast<unsigned>(bit % 32);
  words[w * stride] |= v << shift;
  if (shift + static_cast<unsigned>(bits) > 32) words[(w + 1) * stride] |= v >> (32 - shift);
}

StWriteTensor st_half_or_f32(const std::string& name, const Tensor& t) {
  return hf::st_float(name, t, StDtype::F16);
}

// qweight / qzeros / scales / g_idx of one affine linear, and its differences as the GPTQ reader
// decodes it: W = s16 * (q - z) with s16 the fp16 scale and z = round(-m / s16) clamped.
void add_gptq_linear(std::vector<StWriteTensor>& out, const std::string& prefix, const QMatrix& q,
                     const GptqExportOptions& options, TensorExport& t) {
  const int b = q.bits;
  const int64_t in = q.cols, rows = q.rows, L = q.n_groups();
  const int zmin = options.v2 ? 0 : 1;  // v1 stores z - 1 and cannot hold z = 0
  QMatrix read = q;                             // what the reader will build
  std::vector<uint16_t> scales(static_cast<size_t>(L * rows));
  std::vector<uint32_t> zeros(static_cast<size_t>(L * rows * b / 32), 0u);
  float* const read_scales = read.scales.writable();
  float* const read_offsets = read.offsets.writable();
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t l = 0; l < L; ++l) {
      const float s = q.scales[j * L + l], m = q.offsets[j * L + l];
      const float s16 = round_to_fp16(s);
      QL_CHECK(s16 == s || options.allow_lossy, "export: ", prefix, " (", describe(&q),
               "): scale [", j, ", ", l, "] = ", s,
               " is not an fp16 value, which GPTQ stores; pass --allow-lossy to round it");
      const auto z = static_cast<float>(zero_point(m, s16, b, zmin));
      read_scales[j * L + l] = s16;
      read_offsets[j * L + l] = -s16 * z;
      t.max_abs_dm = std::max(t.max_abs_dm, std::abs(static_cast<double>(-s16 * z) - m));
      scales[l * rows + j] = fp32_to_fp16(s16);
      const auto stored = static_cast<uint32_t>(z) - (options.v2 ? 0u : 1u);
      gptq_pack(zeros.data() + l * (rows * b / 32), 1, j, b, stored);
    }
  std::vector<uint32_t> qweight(static_cast<size_t>(in * b / 32 * rows), 0u);
  std::vector<uint8_t> codes(static_cast<size_t>(in));
  for (int64_t j = 0; j < rows; ++j) {
    unpack_row(q.row_codes(j), in, b, codes.data());
    for (int64_t i = 0; i < in; ++i) gptq_pack(qweight.data() + j, rows, i, b, codes[i]);
  }
  std::vector<int32_t> g_idx(static_cast<size_t>(in));
  for (int64_t i = 0; i < in; ++i) g_idx[i] = static_cast<int32_t>(i / q.group_size);

  out.push_back(st_raw(prefix + ".qweight", StDtype::I32, {in * b / 32, rows}, qweight));
  out.push_back(st_raw(prefix + ".qzeros", StDtype::I32, {L, rows * b / 32}, zeros));
  out.push_back(st_raw(prefix + ".scales", StDtype::F16, {L, rows}, scales));
  out.push_back(st_raw(prefix + ".g_idx", StDtype::I32, {in}, g_idx));
  const Tensor want = dequantize(q), got = dequantize(read);
  add_difference(t, want.data(), got.data(), want.numel());
}

void check_exportable(const Model& model) {
  bool any = false;
  for (size_t l = 0; l < model.layers.size(); ++l)
    for (const Target target : all_targets()) {
      const Linear& lin = target_linear(model.layers[l], target);
      if (!lin.quantized()) continue;
      any = true;
      const QMatrix& q = lin.qweight;
      QL_CHECK(q.type == QuantType::Affine, "export --format gptq: layer ", l, " ",
               target_name(target), " is ", quant_type_name(q.type),
               ", which GPTQ cannot hold (integer codes only): use --format gguf or --format hf, "
               "or quantize with --method gptq / rtn");
      QL_CHECK(q.g_idx.empty(), "export --format gptq: layer ", l, " ", target_name(target),
               " has act-order groups (g_idx) and qalora writes desc_act false only: quantize "
               "with --act-order --static-groups, or use --format gguf / hf");
    }
  QL_CHECK(any,
           "export --format gptq: the model has no quantized linear layer: quantize it first "
           "(qalora quantize --method gptq) or use --format gguf / hf");
}

json quantization_config(const Model& model, const hf::NativeLayout& layout, bool sym,
                         const std::vector<std::string>& dense_modules, bool v2) {
  json q = {{"quant_method", "gptq"},
            {"bits", layout.bits},
            {"group_size", layout.group_size},
            {"sym", sym},
            {"desc_act", false},
            {"static_groups", false},
            {"true_sequential", true},
            {"damp_percent", model.quant.damp > 0 ? hf::json_float(model.quant.damp) : 0.01},
            {"lm_head", false},
            {"checkpoint_format", v2 ? "gptq_v2" : "gptq"}};
  if (!dense_modules.empty()) {
    json keep = json::array();
    for (const Target t : all_targets()) {
      const std::string name = cat(t <= Target::O ? "self_attn." : "mlp.", target_name(t));
      if (std::find(dense_modules.begin(), dense_modules.end(), name) == dense_modules.end())
        keep.push_back(name);
    }
    q["modules_in_block_to_quantize"] = json::array({keep});
  }
  return q;
}

}  // namespace

bool gptq_packable(const QMatrix& q) {
  return q.cols * q.bits % 32 == 0 && q.rows * q.bits % 32 == 0;
}

namespace {

// What the checkpoint holds beyond its tensors: the export report, the linears written dense and
// whether every zero point is the symmetric one.
struct GptqContents {
  ExportReport report;
  std::vector<std::string> dense_modules;
  bool sym = true;
};

// The checkpoint's tensors in file order, handed to `emit` a block (or the embeddings, or the
// final norm and head) at a time.
void gptq_tensors(const Model& model, const GptqExportOptions& options, GptqContents& contents,
                  const std::function<void(const std::vector<StWriteTensor>&)>& emit) {
  const ModelConfig& c = model.config;
  std::vector<StWriteTensor> tensors;
  auto flush = [&] {
    emit(tensors);
    tensors.clear();
  };
  tensors.push_back(st_half_or_f32("model.embed_tokens.weight", model.tok_embeddings));
  flush();
  for (size_t l = 0; l < model.layers.size(); ++l) {
    const LayerWeights& L = model.layers[l];
    const std::string p = cat("model.layers.", l, ".");
    tensors.push_back(st_half_or_f32(p + "input_layernorm.weight", L.attn_norm));
    tensors.push_back(st_half_or_f32(p + "post_attention_layernorm.weight", L.ffn_norm));
    for (const Target t : all_targets()) {
      const Linear& original = target_linear(L, t);
      const int64_t heads = t == Target::Q ? c.n_heads : c.n_kv_heads;
      const Linear lin = t == Target::Q || t == Target::K
                             ? permute_rope_rows(original, heads, c.head_dim, true)
                             : original;
      const std::string module = cat(t <= Target::O ? "self_attn." : "mlp.", target_name(t));
      const std::string prefix = p + module;
      TensorExport e;
      e.name = prefix;
      e.source = describe(lin.quantized() ? &lin.qweight : nullptr);
      if (lin.quantized() && gptq_packable(lin.qweight)) {
        e.type = cat("gptq ", lin.qweight.bits, "-bit");
        add_gptq_linear(tensors, prefix, lin.qweight, options, e);
        const QMatrix& q = lin.qweight;
        for (int64_t g = 0; g < q.rows * q.n_groups(); ++g)
          contents.sym =
              contents.sym && q.offsets[g] == -q.scales[g] * static_cast<float>(1 << (q.bits - 1));
      } else {
        // Written as a plain weight, which the GPTQ loaders keep dense.
        const Tensor w = lin.dense_weight();
        StWriteTensor st = st_half_or_f32(prefix + ".weight", w);
        e.type = cat(st_dtype_name(st.dtype), " (dense)");
        if (lin.quantized())
          e.note = cat(lin.qweight.cols, " inputs and ", lin.qweight.rows, " outputs at ",
                       lin.qweight.bits, " bits do not fill whole int32 words");
        e.elements = w.numel();
        tensors.push_back(std::move(st));
        std::vector<std::string>& dense = contents.dense_modules;
        if (std::find(dense.begin(), dense.end(), module) == dense.end()) dense.push_back(module);
      }
      if (!lin.bias.empty()) tensors.push_back(st_half_or_f32(prefix + ".bias", lin.bias));
      contents.report.tensors.push_back(std::move(e));
    }
    flush();
    L.release_pages();  // encoded and handed over
  }
  tensors.push_back(st_half_or_f32("model.norm.weight", model.final_norm));
  if (!model.output.empty()) tensors.push_back(st_half_or_f32("lm_head.weight", model.output));
  flush();
}

}  // namespace

ExportReport export_gptq(const Model& model, const fs::path& dir,
                         const GptqExportOptions& options) {
  check_exportable(model);
  const hf::NativeLayout layout = hf::native_layout(model, "export --format gptq");
  // The header needs every tensor's shape before the first byte: a first pass encodes the model
  // block by block for them (and for the report), the second encodes it again into the file.
  // Twice the packing work, one block of it in memory.
  GptqContents contents;
  std::vector<StTensorSpec> specs;
  gptq_tensors(model, options, contents, [&](const std::vector<StWriteTensor>& block) {
    for (const StWriteTensor& t : block) specs.push_back({t.name, t.dtype, t.shape});
  });
  ExportReport& report = contents.report;
  report.format = "gptq";
  report.path = dir.string();

  std::error_code ec;
  fs::create_directories(dir, ec);
  QL_CHECK(!ec, dir.string(), ": cannot create folder: ", ec.message());
  if (model.tokenizer) write_hf_tokenizer(model.tokenizer->data(), dir);
  write_safetensors(
      dir / "model.safetensors", specs,
      [&](const StTensorSink& write) {
        GptqContents again;
        gptq_tensors(model, options, again, [&](const std::vector<StWriteTensor>& block) {
          for (const StWriteTensor& t : block) write(t);
        });
      },
      {{"format", "pt"}});
  const json qc =
      quantization_config(model, layout, contents.sym, contents.dense_modules, options.v2);
  write_file_atomic(dir / "quantize_config.json", qc.dump(2) + "\n");
  json config = hf::config_json(model);
  config["quantization_config"] = qc;
  config["torch_dtype"] = "float16";
  write_file_atomic(dir / "config.json", config.dump(2) + "\n");
  return report;
}

}  // namespace qalora
