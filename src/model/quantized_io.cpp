// Quantized linears of Hugging Face folders: qalora's native folder (written and read back bit
// for bit; the format is documented in docs/formats.md) and GPTQ checkpoints (read only).
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#include "model/hf_folder.h"
#include "qalora/core/fp16.h"
#include "qalora/core/mapped_file.h"
#include "qalora/quant/gptq_checkpoint.h"
#include "qalora/quant/qmatrix_rows.h"
#include "qalora/quant/quantize.h"

namespace qalora::hf {

namespace fs = std::filesystem;

namespace {

constexpr const char* kNativeMethod = "qalora";
constexpr int64_t kNativeVersion = 1;

const std::pair<const char*, Linear LayerWeights::*> kLinears[] = {
    {"q_proj", &LayerWeights::q},       {"k_proj", &LayerWeights::k},
    {"v_proj", &LayerWeights::v},       {"o_proj", &LayerWeights::o},
    {"gate_proj", &LayerWeights::gate}, {"up_proj", &LayerWeights::up},
    {"down_proj", &LayerWeights::down}};

// ---- settings -------------------------------------------------------------------------------

FolderQuant read_native(const json& j, const std::string& file) {
  QL_CHECK(j.is_object(), file, ": expected a JSON object");
  const ConfigJson c(j, file);
  FolderQuant q;
  q.kind = FolderQuant::Kind::Native;
  q.file = file;
  const int64_t version = c.integer("format_version");
  QL_CHECK(version == kNativeVersion, file, ": format_version is ", version, ", expected ",
           kNativeVersion, " (written by a newer qalora?)");
  const std::string type = c.string_or("quant_type", "");
  if (type == "affine") {
    q.type = QuantType::Affine;
  } else if (type == "nf4") {
    q.type = QuantType::NF4;
  } else if (type == "fp4") {
    q.type = QuantType::FP4;
  } else {
    fail(file, ": field 'quant_type' is '", type, "', expected affine, nf4 or fp4");
  }
  const int64_t bits = c.integer("bits");
  const int64_t group = c.integer("group_size");
  if (q.type == QuantType::Affine) {
    QL_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, file, ": field 'bits' is ", bits,
             ", expected 2, 3, 4 or 8 for affine");
    QL_CHECK(group == -1 || group >= 1, file, ": field 'group_size' is ", group,
             ", expected -1 (per channel) or a positive size");
  } else {
    QL_CHECK(bits == 4, file, ": field 'bits' is ", bits, ", expected 4 for ", type);
    QL_CHECK(group == kCodebookBlock, file, ": field 'group_size' is ", group, ", expected ",
             kCodebookBlock, " (the ", type, " absmax block)");
  }
  const std::string layout = c.string_or("qk_rope_layout", "halves");
  QL_CHECK(layout == "halves" || layout == "pairs", file, ": field 'qk_rope_layout' is '", layout,
           "', expected halves or pairs");
  q.qk_halves = layout == "halves";

  if (c.has("head")) {  // {"bits": b, "group_size": g}: lm_head is an affine QMatrix
    const ConfigJson head(j["head"], file + " head");
    const int64_t hb = head.integer("bits"), hg = head.integer("group_size");
    QL_CHECK(hb == 2 || hb == 3 || hb == 4 || hb == 8, file, ": field 'head.bits' is ", hb,
             ", expected 2, 3, 4 or 8");
    QL_CHECK(hg >= 1, file, ": field 'head.group_size' is ", hg, ", expected a positive size");
    q.head_bits = static_cast<int>(hb);
    q.head_group_size = hg;
  }

  QuantInfo& info = q.info;
  info.method = c.string_or("method", type);
  info.bits = static_cast<int>(bits);
  info.group_size = group;
  info.sym = c.bool_or("sym", false);
  info.act_order = c.bool_or("act_order", false);
  info.static_groups = c.bool_or("static_groups", false);
  info.double_quant = c.bool_or("double_quant", false);
  info.damp = static_cast<float>(c.float_or("damp", 0.0));
  info.calibration = c.string_or("calibration", "");
  return q;
}

FolderQuant read_gptq(const json& j, const std::string& file) {
  QL_CHECK(j.is_object(), file, ": expected a JSON object");
  const ConfigJson c(j, file);
  FolderQuant q;
  q.kind = FolderQuant::Kind::Gptq;
  q.file = file;
  const int64_t bits = c.integer("bits");
  QL_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, file, ": GPTQ field 'bits' is ", bits,
           ", expected 2, 3, 4 or 8");
  const int64_t group = c.integer("group_size");
  QL_CHECK(group == -1 || group >= 1, file, ": GPTQ field 'group_size' is ", group,
           ", expected -1 (per channel) or a positive size");
  // GPTQModel writes checkpoint_format; some versions wrote format.
  const std::string format = c.string_or("checkpoint_format", c.string_or("format", "gptq"));
  QL_CHECK(format == "gptq" || format == "gptq_v2", file, ": checkpoint_format '", format,
           "' is not supported (expected gptq or gptq_v2; other layouts such as marlin repack "
           "the weights)");
  q.gptq_v2 = format == "gptq_v2";
  QL_CHECK(!c.bool_or("lm_head", false), file,
           ": lm_head is true: a quantized output head is not supported");
  const std::string base = c.string_or("model_file_base_name", "");
  if (!base.empty()) q.weights_file = base + ".safetensors";

  QuantInfo& info = q.info;
  info.method = "gptq";
  info.bits = static_cast<int>(bits);
  info.group_size = group;
  info.sym = c.bool_or("sym", true);
  info.act_order = c.bool_or("desc_act", false);
  info.static_groups = c.bool_or("static_groups", false);
  info.damp = static_cast<float>(c.float_or("damp_percent", 0.0));
  return q;
}

[[noreturn]] void refuse_method(const std::string& file, const std::string& where,
                                const std::string& method) {
  fail(file, ": ", where, " (quant_method '", method,
       "') is not supported: qalora loads GPTQ checkpoints (gptq) and its own quantized folders "
       "(qalora); convert to one of those or use a dense checkpoint");
}

// ---- native tensors -------------------------------------------------------------------------

std::vector<float> floats_of(const Tensor& t) {
  return {t.data(), t.data() + t.numel()};
}

// A stored tensor (fp16 group parameters, absmax constants) as an fp32 vector. Its file pages are
// dropped afterwards: left resident they would add their size again to the process (0.8 GB of
// fp16 scales and offsets at 7B, g32) until the kernel reclaimed them.
std::vector<float> floats_releasing(const Tensor& stored) {
  std::vector<float> v = floats_of(stored.decoded());
  stored.release_pages();
  return v;
}

// Stored group parameters: F16 ones stay a view of the mapped file (no copy, and their pages
// are dropped with the block's codes when a pass is done with it); others become fp32.
GroupParams group_params(const HfWeights& w, const std::string& name, const Shape& shape,
                         const std::string& ctx) {
  const Tensor stored = w.stored(name, shape, ctx);
  if (stored.stored_type() != "F16") return floats_releasing(stored);
  const uint8_t* bytes = w.raw(name, StDtype::F16, shape, ctx);
  return GroupParams::half(
      ByteBuffer::view(bytes, static_cast<size_t>(2 * stored.numel()), w.owner(name)));
}

template <typename T>
std::vector<T> copy_of(const uint8_t* bytes, int64_t n) {
  std::vector<T> v(static_cast<size_t>(n));
  if (n > 0) std::memcpy(v.data(), bytes, v.size() * sizeof(T));
  return v;
}

// The contiguous group map i / G: what an absent g_idx means.
std::vector<int32_t> contiguous_groups(int64_t cols, int64_t group_size) {
  std::vector<int32_t> g(static_cast<size_t>(cols));
  for (int64_t i = 0; i < cols; ++i) g[i] = static_cast<int32_t>(i / group_size);
  return g;
}

QMatrix load_native(const HfWeights& w, const FolderQuant& q, const std::string& prefix,
                    int64_t out, int64_t in) {
  const std::string ctx = cat(" (", q.file, ": ", quant_type_name(q.type), ", ", q.info.bits,
                              "-bit, group size ", q.info.group_size, ")");
  QMatrix m = q.type == QuantType::Affine
                  ? make_affine(out, in, q.info.bits, resolve_group_size(q.info.group_size, in))
                  : make_codebook(q.type, out, in);
  const std::string qname = prefix + ".qweight";
  const uint8_t* codes = w.raw(qname, StDtype::U8, {out, m.row_bytes()}, ctx);
  m.codes = ByteBuffer::view(codes, static_cast<size_t>(out * m.row_bytes()), w.owner(qname));
  // Kernels may read whole 32-column chunks, so the padding codes must be the zeros we write.
  if (in % kQChunk != 0) {
    uint8_t chunk[kQChunk];
    for (int64_t r = 0; r < out; ++r) {
      unpack_row(std::as_const(m).row_codes(r) + (in / kQChunk) * chunk_bytes(m.bits), kQChunk,
                 m.bits, chunk);
      for (int64_t k = in % kQChunk; k < kQChunk; ++k)
        QL_CHECK(chunk[k] == 0, w.file_of(qname), ": tensor '", qname, "' row ", r, " has code ",
                 int{chunk[k]}, " in its padding past column ", in, ", expected 0");
    }
  }

  if (m.type == QuantType::Affine) {
    const std::string gname = prefix + ".g_idx";
    m.g_idx = copy_of<int32_t>(w.raw(gname, StDtype::I32, {in}, ctx), in);
    for (int64_t i = 0; i < in; ++i)
      QL_CHECK(m.g_idx[i] >= 0 && m.g_idx[i] < in, w.file_of(gname), ": tensor '", gname, "' [", i,
               "] is ", m.g_idx[i], ", expected a group in 0..", in - 1);
    // Contiguous groups are left implicit so kernels take their fast path.
    if (m.g_idx == contiguous_groups(in, m.group_size)) m.g_idx.clear();
    const Shape groups = {out, m.n_groups()};
    if (q.describe_only) {
      for (const char* field : {".scales", ".offsets"}) w.stored(prefix + field, groups, ctx);
      m.scales = std::vector<float>();  // shapes checked, nothing decoded or kept
      m.offsets = std::vector<float>();
      return m;
    }
    m.scales = group_params(w, prefix + ".scales", groups, ctx);
    m.offsets = group_params(w, prefix + ".offsets", groups, ctx);
  } else if (w.has(prefix + ".absmax_codes")) {
    const int64_t n = m.n_blocks(), n_scales = (n + DoubleQuant::kBlock - 1) / DoubleQuant::kBlock;
    m.absmax_dq.codes = copy_of<uint8_t>(w.raw(prefix + ".absmax_codes", StDtype::U8, {n}, ctx), n);
    m.absmax_dq.scales = floats_of(w.get(prefix + ".absmax_scales", {n_scales}, ctx));
    m.absmax_dq.mean = w.get(prefix + ".absmax_mean", {1}, ctx).data()[0];
    m.absmax = double_dequantize(m.absmax_dq);
  } else {
    m.absmax = floats_releasing(w.stored(prefix + ".absmax", {m.n_blocks()}, ctx));
  }
  m.validate(cat(w.file_of(qname), ": ", prefix));
  return m;
}

// ---- GPTQ tensors ---------------------------------------------------------------------------

QMatrix load_gptq(const HfWeights& w, const FolderQuant& q, const std::string& prefix, int64_t out,
                  int64_t in) {
  const int b = q.info.bits;
  const int64_t G = resolve_group_size(q.info.group_size, in);
  const int64_t L = (in + G - 1) / G;
  const std::string qweight = prefix + ".qweight", qzeros = prefix + ".qzeros";
  const std::string scales = prefix + ".scales", g_idx = prefix + ".g_idx";
  const auto name = [&](const std::string& t) { return cat(w.file_of(t), ": tensor '", t, "'"); };
  QL_CHECK(in * b % 32 == 0, name(qweight), ": ", in, " inputs of ", b,
           " bits do not fill whole int32 words, which GPTQ packing needs");
  QL_CHECK(out * b % 32 == 0, name(qzeros), ": ", out, " outputs of ", b,
           " bits do not fill whole int32 words, which GPTQ packing needs");
  const std::string ctx = cat(" (GPTQ ", b, "-bit, group size ", q.info.group_size, ", [out ", out,
                              ", in ", in, "], ", L, " groups; ", q.file, ")");
  GptqLinear t;
  t.in = in;
  t.out = out;
  t.qweight = w.raw(qweight, StDtype::I32, {in * b / 32, out}, ctx);
  t.qzeros = w.raw(qzeros, StDtype::I32, {L, out * b / 32}, ctx);
  t.qzeros_bytes = L * out * b / 32 * 4;
  t.scales = w.stored(scales, {L, out}, ctx);
  if (w.has(g_idx)) t.g_idx = w.raw(g_idx, StDtype::I32, {in}, ctx);
  t.qzeros_name = name(qzeros);
  t.scales_name = name(scales);
  t.g_idx_name = name(g_idx);
  t.mapping = w.owner(qweight);
  t.qzeros_mapping = w.owner(qzeros);
  QMatrix m = gptq_to_qmatrix(t, {b, G, q.gptq_v2});
  if (t.g_idx) release_mapped_pages(t.g_idx, static_cast<size_t>(in * 4));  // copied
  return m;
}

}  // namespace

FolderQuant read_folder_quant(const json& config, const std::string& config_file,
                              const fs::path& dir) {
  const fs::path qc_path = dir / "quantize_config.json";
  const bool has_qc = fs::exists(qc_path);
  const json qc = has_qc ? parse_json_file(qc_path) : json();
  const std::string qc_file = qc_path.string();
  const std::string qc_method =
      qc.is_object() ? ConfigJson(qc, qc_file).string_or("quant_method", "") : "";

  if (config.contains("quantization_config") && !config["quantization_config"].is_null()) {
    const json& block = config["quantization_config"];
    const std::string block_file = config_file + " quantization_config";
    const std::string method =
        block.is_object() ? ConfigJson(block, block_file).string_or("quant_method", "") : "";
    if (method == kNativeMethod)
      return has_qc ? read_native(qc, qc_file) : read_native(block, block_file);
    if (method != "gptq")
      refuse_method(config_file, "quantization_config", method.empty() ? "none" : method);
    FolderQuant q = read_gptq(block, block_file);
    // AutoGPTQ keeps the weights' file name in quantize_config.json only.
    const std::string base =
        qc.is_object() ? ConfigJson(qc, qc_file).string_or("model_file_base_name", "") : "";
    if (q.weights_file.empty() && !base.empty()) q.weights_file = base + ".safetensors";
    return q;
  }
  if (!has_qc) return {};
  if (qc_method == kNativeMethod) return read_native(qc, qc_file);
  if (!qc_method.empty() && qc_method != "gptq")
    refuse_method(qc_file, "quantize_config.json", qc_method);
  return read_gptq(qc, qc_file);  // AutoGPTQ writes no quant_method here
}

QMatrix load_quantized_weight(const HfWeights& w, const FolderQuant& q, const std::string& prefix,
                              int64_t out, int64_t in) {
  // Either kind may keep some linears dense (GPTQModel can skip modules).
  if (!w.has(prefix + ".qweight") && w.has(prefix + ".weight")) return {};
  return q.kind == FolderQuant::Kind::Gptq ? load_gptq(w, q, prefix, out, in)
                                           : load_native(w, q, prefix, out, in);
}

bool has_quantized_linear_in(std::span<const LayerWeights> layers) {
  for (const LayerWeights& L : layers)
    for (const auto& [name, member] : kLinears)
      if ((L.*member).quantized()) return true;
  return false;
}

bool has_quantized_linear(const Model& model) {
  return has_quantized_linear_in(model.layers);
}

namespace {

void check_same_type(const QMatrix& m, const std::string& name, QuantType type, int bits,
                     const std::string& first_name, const std::string& where) {
  QL_CHECK(m.type == type && m.bits == bits, where, ": ", name, " is ", quant_type_name(m.type),
           " ", m.bits, "-bit but ", first_name, " is ", quant_type_name(type), " ", bits,
           "-bit; a quantized folder holds one quantization");
}

}  // namespace

void check_same_quantization(const LayerWeights& block, int64_t index, const NativeLayout& layout,
                             const std::string& where) {
  for (const auto& [name, member] : kLinears) {
    const QMatrix& m = (block.*member).qweight;
    if (!m.codes.empty())
      check_same_type(m, cat("layer ", index, " ", name), layout.type, layout.bits, layout.first,
                      where);
  }
}

NativeLayout native_layout(const Model& model, const std::string& where) {
  return native_layout(model.quant, model.layers, where);
}

NativeLayout native_layout(const QuantInfo& info, std::span<const LayerWeights> layers,
                           const std::string& where, int64_t first_index) {
  const QMatrix* first = nullptr;
  std::string first_name;
  int64_t derived_group = -1;  // the largest group smaller than its row: G, unless per channel
  for (size_t l = 0; l < layers.size(); ++l)
    for (const auto& [name, member] : kLinears) {
      const QMatrix& m = (layers[l].*member).qweight;
      if (m.codes.empty()) continue;
      const std::string this_name = cat("layer ", first_index + static_cast<int64_t>(l), " ", name);
      if (!first) {
        first = &m;
        first_name = this_name;
      }
      check_same_type(m, this_name, first->type, first->bits, first_name, where);
      if (m.group_size < m.cols) derived_group = std::max(derived_group, m.group_size);
    }
  QL_CHECK(first != nullptr, where, ": the model has no quantized linear layer");

  NativeLayout layout;
  layout.type = first->type;
  layout.bits = first->bits;
  layout.first = first_name;
  if (layout.type != QuantType::Affine)
    layout.group_size = kCodebookBlock;
  else
    layout.group_size = !info.empty() && info.group_size != 0 ? info.group_size : derived_group;
  QL_CHECK(info.empty() || info.bits == layout.bits, where, ": model.quant says ", info.bits,
           " bits but the linear layers hold ", layout.bits, "-bit codes");

  for (size_t l = 0; l < layers.size(); ++l)
    for (const auto& [name, member] : kLinears) {
      const QMatrix& m = (layers[l].*member).qweight;
      if (m.codes.empty()) continue;
      const int64_t index = first_index + static_cast<int64_t>(l);
      m.validate(cat(where, ": layer ", index, " ", name));
      if (layout.type == QuantType::Affine) {
        const int64_t expected = resolve_group_size(layout.group_size, m.cols);
        QL_CHECK(m.group_size == expected, where, ": layer ", index, " ", name, " has group size ",
                 m.group_size, ", expected ", expected, " (the folder's group size ",
                 layout.group_size, " over ", m.cols, " inputs)");
      }
    }
  return layout;
}

json native_quant_json(const Model& model, const NativeLayout& layout) {
  const QuantInfo& info = model.quant;
  json j;
  j["quant_method"] = kNativeMethod;
  j["format_version"] = kNativeVersion;
  j["quant_type"] = quant_type_name(layout.type);
  j["bits"] = layout.bits;
  j["group_size"] = layout.group_size;
  // The runtime's own row order: q/k load as views of the file, no permuted copy.
  j["qk_rope_layout"] = "pairs";
  j["method"] = info.method.empty() ? quant_type_name(layout.type) : info.method;
  j["sym"] = info.sym;
  j["act_order"] = info.act_order;
  j["static_groups"] = info.static_groups;
  j["double_quant"] = info.double_quant;
  j["damp"] = json_float(info.damp);
  j["calibration"] = info.calibration;
  if (!model.head_q.codes.empty())
    j["head"] = {{"bits", model.head_q.bits}, {"group_size", model.head_q.group_size}};
  return j;
}

namespace {

// Group parameters as F16 (their bytes as they are when held in fp16), or F32 where a value
// is not an fp16 number.
StWriteTensor st_params(std::string name, const GroupParams& p, Shape shape) {
  if (!p.is_half())
    return st_float(std::move(name), p.read(0, p.size(), nullptr), std::move(shape), StDtype::F16);
  return st_raw(std::move(name), StDtype::F16, std::move(shape),
                std::vector<uint8_t>(p.bytes(), p.bytes() + p.byte_size()));
}

}  // namespace

void add_quantized_weight(std::vector<StWriteTensor>& out, const std::string& prefix,
                          const QMatrix& w) {
  out.push_back(st_raw(prefix + ".qweight", StDtype::U8, {w.rows, w.row_bytes()},
                       std::vector<uint8_t>(w.codes.begin(), w.codes.end())));
  if (w.type == QuantType::Affine) {
    const int64_t L = w.n_groups();
    out.push_back(st_params(prefix + ".scales", w.scales, {w.rows, L}));
    out.push_back(st_params(prefix + ".offsets", w.offsets, {w.rows, L}));
    out.push_back(st_raw(prefix + ".g_idx", StDtype::I32, {w.cols},
                         w.g_idx.empty() ? contiguous_groups(w.cols, w.group_size) : w.g_idx));
  } else if (!w.absmax_dq.empty()) {
    const DoubleQuant& dq = w.absmax_dq;
    const auto n = static_cast<int64_t>(dq.codes.size());
    const auto n_scales = static_cast<int64_t>(dq.scales.size());
    out.push_back(st_raw(prefix + ".absmax_codes", StDtype::U8, {n}, dq.codes));
    out.push_back(st_raw(prefix + ".absmax_scales", StDtype::F32, {n_scales}, dq.scales));
    out.push_back(st_raw(prefix + ".absmax_mean", StDtype::F32, {1}, std::vector<float>{dq.mean}));
  } else {
    out.push_back(st_raw(prefix + ".absmax", StDtype::F32, {w.n_blocks()}, w.absmax));
  }
}

StWriteTensor st_float(std::string name, const float* data, Shape shape, StDtype dtype) {
  return st_float(std::move(name), Tensor::view(data, std::move(shape), nullptr), dtype);
}

namespace {

// How one row came through its conversion to F16 / BF16.
struct RowRounding {
  bool exact = true;      // bit for bit
  bool overflow = false;  // a finite value became infinite (F16's range)
  double max_abs_dw = 0, sum_sq_dw = 0, sum_sq_w = 0;
};

// t's values as `dtype` (F16 or BF16, nearest even), row by row from whatever storage the
// tensor has (the output is the only copy), and whether each row came through exactly; with
// `measure`, also its errors.
std::vector<uint16_t> to_halves(const Tensor& t, StDtype dtype, bool measure,
                                std::vector<RowRounding>& rows_out) {
  const int64_t rows = t.rows(), n = t.row_len();
  const bool f16 = dtype == StDtype::F16;
  std::vector<uint16_t> half(static_cast<size_t>(rows * n));
  rows_out.assign(static_cast<size_t>(rows), {});
#pragma omp parallel
  {
    std::vector<float> row(static_cast<size_t>(n)), back(static_cast<size_t>(n));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      t.decode_rows(r, r + 1, row.data());
      uint16_t* h = half.data() + r * n;
      if (f16) {  // the group parameters of a 7B model: 400 M values, vectorised
        fp32_to_fp16_row(row.data(), h, n);
        fp16_to_fp32_row(reinterpret_cast<const uint8_t*>(h), back.data(), n);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          h[i] = fp32_to_bf16(row[i]);
          back[static_cast<size_t>(i)] = bf16_to_fp32(h[i]);
        }
      }
      RowRounding& rr = rows_out[static_cast<size_t>(r)];
      rr.exact = std::memcmp(back.data(), row.data(), row.size() * sizeof(float)) == 0;
      if (!measure) continue;
      for (size_t i = 0; i < row.size(); ++i) {
        const double w = row[i], d = rr.exact ? 0.0 : static_cast<double>(back[i]) - w;
        rr.overflow = rr.overflow || (std::isinf(back[i]) && std::isfinite(row[i]));
        rr.max_abs_dw = std::max(rr.max_abs_dw, std::abs(d));
        rr.sum_sq_dw += d * d;
        rr.sum_sq_w += w * w;
      }
    }
  }
  return half;
}

}  // namespace

StWriteTensor st_float(std::string name, const Tensor& t, StDtype dtype) {
  if (dtype == StDtype::F16 || dtype == StDtype::BF16) {
    std::vector<RowRounding> rows;
    std::vector<uint16_t> half = to_halves(t, dtype, false, rows);
    if (std::all_of(rows.begin(), rows.end(), [](const RowRounding& r) { return r.exact; }))
      return st_raw(std::move(name), dtype, t.shape(), half);
  }
  std::vector<float> values(static_cast<size_t>(t.numel()));
  t.decode_rows(0, t.rows(), values.data());
  return st_raw(std::move(name), StDtype::F32, t.shape(), values);
}

StWriteTensor st_rounded(std::string name, const Tensor& t, StDtype dtype,
                         FloatRounding& rounding) {
  std::vector<RowRounding> rows;
  std::vector<uint16_t> half = to_halves(t, dtype, true, rows);
  rounding = {name, t.numel()};
  for (const RowRounding& r : rows) {
    QL_CHECK(!r.overflow, "tensor '", name,
             "' has values beyond F16's range (|w| > 65504); "
             "store it as BF16 or F32");
    rounding.max_abs_dw = std::max(rounding.max_abs_dw, r.max_abs_dw);
    rounding.sum_sq_dw += r.sum_sq_dw;
    rounding.sum_sq_w += r.sum_sq_w;
  }
  return st_raw(std::move(name), dtype, t.shape(), half);
}

}  // namespace qalora::hf
