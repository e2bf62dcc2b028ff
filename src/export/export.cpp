// What every exporter shares: the report of differences, the atomic folder swap, and the dense
// Hugging Face export.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "export/export_internal.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"

namespace qalora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace exporting {

void add_difference(TensorExport& t, const float* model, const float* written, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double w = model[i];
    const double d = static_cast<double>(written[i]) - w;
    t.max_abs_dw = std::max(t.max_abs_dw, std::abs(d));
    t.sum_sq_dw += d * d;
    t.sum_sq_w += w * w;
  }
  t.elements += n;
}

std::string describe(const QMatrix* q) {
  if (q == nullptr) return "f32";
  if (q->type != QuantType::Affine) return quant_type_name(q->type);
  return cat("affine ", q->bits, "-bit g", q->group_size, q->g_idx.empty() ? "" : " act-order");
}

}  // namespace exporting

double TensorExport::relative_error() const {
  return sum_sq_w > 0 ? std::sqrt(sum_sq_dw / sum_sq_w) : (sum_sq_dw > 0 ? INFINITY : 0.0);
}

double ExportReport::max_abs_dw() const {
  double m = 0;
  for (const TensorExport& t : tensors) m = std::max(m, t.max_abs_dw);
  return m;
}

double ExportReport::max_abs_dm() const {
  double m = 0;
  for (const TensorExport& t : tensors) m = std::max(m, t.max_abs_dm);
  return m;
}

double ExportReport::relative_error() const {
  TensorExport all;
  for (const TensorExport& t : tensors) {
    all.sum_sq_dw += t.sum_sq_dw;
    all.sum_sq_w += t.sum_sq_w;
  }
  return all.relative_error();
}

json ExportReport::to_json() const {
  json types = json::object();
  json list = json::array();
  for (const TensorExport& t : tensors) {
    types[t.type] = types.value(t.type, 0) + 1;
    list.push_back({{"name", t.name},
                    {"type", t.type},
                    {"source", t.source},
                    {"note", t.note},
                    {"elements", t.elements},
                    {"max_abs_dw", t.max_abs_dw},
                    {"relative_error", t.relative_error()},
                    {"max_abs_dm", t.max_abs_dm}});
  }
  return {{"format", format},
          {"path", path},
          {"exact", exact()},
          {"max_abs_dw", max_abs_dw()},
          {"relative_error", relative_error()},
          {"max_abs_dm", max_abs_dm()},
          {"types", types},
          {"tensors", list}};
}

namespace {

// What killed writers of `target` left beside it: their unfinished folders go, and an output
// moved aside to be replaced comes back when its replacement never arrived.
void clean_up_after_dead_writers(const fs::path& parent, const fs::path& target) {
  const std::string stem = target.filename().string();
  std::error_code ec;
  for_each_left_by_dead_process(parent, cat(".", stem, ".tmp."),
                                [&](const fs::path& p) { fs::remove_all(p, ec); });
  for_each_left_by_dead_process(parent, cat(".", stem, ".old."), [&](const fs::path& p) {
    if (!fs::exists(target))
      fs::rename(p, target, ec);
    else
      fs::remove_all(p, ec);
  });
}

}  // namespace

void write_folder_atomic(const fs::path& dir, bool replace,
                         const std::function<void(const fs::path&)>& write) {
  QL_CHECK(!dir.empty(), "export: the output path is empty");
  fs::path target = fs::absolute(dir).lexically_normal();
  if (!target.has_filename()) target = target.parent_path();  // "out/"
  const fs::path parent = target.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  QL_CHECK(!ec, parent.string(), ": cannot create folder: ", ec.message());
  clean_up_after_dead_writers(parent, target);
  const bool exists = fs::exists(fs::symlink_status(dir));
  QL_CHECK(replace || !exists, dir.string(), ": already exists (use --force to replace it)");
  const std::string stem = target.filename().string();
  const fs::path tmp = parent / cat(".", stem, ".tmp.", ::getpid());
  const fs::path old = parent / cat(".", stem, ".old.", ::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  QL_CHECK(!ec, tmp.string(), ": cannot create the temporary folder: ", ec.message());
  try {
    write(tmp);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  if (exists) {
    fs::remove_all(old, ec);
    fs::rename(target, old, ec);
    QL_CHECK(!ec, dir.string(), ": cannot move the old output aside: ", ec.message());
  }
  fs::rename(tmp, target, ec);
  QL_CHECK(!ec, dir.string(), ": cannot rename ", tmp.string(), " into place: ", ec.message());
  if (exists) fs::remove_all(old, ec);
}

namespace {

// Each quantized linear of the block turned into a dense fp32 weight.
void dequantize_block(LayerWeights& block) {
  for (Linear* lin : {&block.q, &block.k, &block.v, &block.o, &block.gate, &block.up, &block.down})
    if (lin->quantized()) {
      lin->weight = lin->dense_weight();
      lin->qweight = QMatrix();
    }
}

// The model without its quantization record and quantized head (the float head / embedding
// already hold the head's exact dequantization); its blocks are left as they are.
Model without_quantization(const Model& model) {
  Model m = model;
  m.quant = QuantInfo();
  m.head_q = QMatrix();
  return m;
}

}  // namespace

Model dequantized_model(const Model& model) {
  Model m = without_quantization(model);
  for (LayerWeights& L : m.layers) dequantize_block(L);
  return m;
}

ExportReport export_hf(const Model& model, const fs::path& dir, DenseFloats floats,
                       const AdapterSet* adapter) {
  if (adapter != nullptr) check_adapters_match(*adapter, model, "export");
  // A block at a time: the dense fp32 copy of a whole 7B model would not fit in memory.
  const std::vector<FloatRounding> rounding = save_hf_model_by_block(
      without_quantization(model), model, dir, floats, [&](LayerWeights& block, int64_t l) {
        dequantize_block(block);
        if (adapter != nullptr) merge_dense_block(block, l, *adapter);
      });
  // Dequantization and the RoPE row move are exact: every weight is the model's own value,
  // unless rounded to F16 / BF16, which the report measures per tensor.
  ExportReport report;
  for (const FloatRounding& r : rounding) {
    TensorExport& t = report.tensors.emplace_back();
    t.name = r.name;
    t.type = floats == DenseFloats::F16 ? "F16" : "BF16";
    t.source = "f32";
    t.elements = r.elements;
    t.max_abs_dw = r.max_abs_dw;
    t.sum_sq_dw = r.sum_sq_dw;
    t.sum_sq_w = r.sum_sq_w;
  }
  report.format = "hf";
  report.path = dir.string();
  return report;
}

}  // namespace qalora
