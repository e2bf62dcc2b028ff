// Internals of the Hugging Face folder loader and writer shared by hf_model.cpp (dense
// tensors, config.json) and quantized_io.cpp (quantized linears: qalora's native folder and
// GPTQ checkpoints).
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/model.h"

namespace qalora::hf {

using nlohmann::json;

nlohmann::json parse_json_file(const std::filesystem::path& path);
// config.json of a model (quantization_config not included).
nlohmann::json config_json(const Model& model);
// Shortest decimal that reads back as `f`, so config.json shows 1e-05 rather than 9.99999974e-06.
double json_float(float f);

// Typed access to a JSON object; a null value counts as absent (some configs write
// "head_dim": null). Errors name `file` and the key.
class ConfigJson {
 public:
  ConfigJson(const json& j, std::string file) : j_(j), file_(std::move(file)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_[key].is_null(); }
  int64_t integer(const char* key) const {
    QL_CHECK(has(key), file_, ": missing required field '", key, "'");
    QL_CHECK(j_[key].is_number_integer(), file_, ": field '", key, "' must be an integer, got ",
             j_[key].dump());
    return j_[key].get<int64_t>();
  }
  // Sizes and counts, all of which must be positive; below 2^31 (no model's are larger), so
  // that products of them cannot overflow.
  int64_t positive(const char* key) const {
    const int64_t v = integer(key);
    QL_CHECK(v > 0 && v <= INT32_MAX, file_, ": field '", key,
             "' must be a positive integer below 2^31, got ", v);
    return v;
  }
  int64_t positive_or(const char* key, int64_t fallback) const {
    return has(key) ? positive(key) : fallback;
  }
  double float_or(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    QL_CHECK(j_[key].is_number(), file_, ": field '", key, "' must be a number, got ",
             j_[key].dump());
    return j_[key].get<double>();
  }
  bool bool_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    QL_CHECK(j_[key].is_boolean(), file_, ": field '", key, "' must be true or false, got ",
             j_[key].dump());
    return j_[key].get<bool>();
  }
  std::string string_or(const char* key, std::string fallback) const {
    return has(key) && j_[key].is_string() ? j_[key].get<std::string>() : fallback;
  }
  const std::string& file() const { return file_; }

 private:
  const json& j_;
  std::string file_;
};

// The safetensors files of a folder and where each tensor lives.
class HfWeights {
 public:
  // model.safetensors, else the shards of model.safetensors.index.json, else `fallback_file`
  // (GPTQ's model_file_base_name) when given.
  HfWeights(const std::filesystem::path& dir, const std::string& fallback_file = {});

  bool has(const std::string& name) const { return where_.count(name) != 0; }
  // The file holding `name` (the first file when it is missing), for messages.
  const std::string& file_of(const std::string& name) const;
  // The tensor as fp32 (F32, F16 or BF16 in the file), checked against the expected shape;
  // `context` ends the shape error (what implies the shape).
  Tensor get(const std::string& name, const Shape& expected,
             const std::string& context = " from config.json") const;
  // The same tensor as stored (F16/BF16 decoded per use, see Tensor::encoded): for weights.
  Tensor stored(const std::string& name, const Shape& expected,
                const std::string& context = " from config.json") const;
  // The raw little-endian bytes of a tensor that must have `dtype` and the expected shape.
  const uint8_t* raw(const std::string& name, StDtype dtype, const Shape& expected,
                     const std::string& context) const;
  std::vector<SourceTensor> source_tensors() const;
  // What keeps the memory of raw(name) alive (its file's mapping).
  std::shared_ptr<const void> owner(const std::string& name) const;

 private:
  void open_shards(const std::filesystem::path& dir, const std::filesystem::path& index_path);
  const std::pair<size_t, const StTensorInfo*>& locate(const std::string& name) const;

  std::vector<SafetensorsFile> shards_;
  std::map<std::string, std::pair<size_t, const StTensorInfo*>> where_;
};

// How a folder stores its linear layers, from config.json's quantization_config or
// quantize_config.json.
struct FolderQuant {
  enum class Kind { Dense, Native, Gptq };
  Kind kind = Kind::Dense;
  std::string file;  // where the settings came from, for messages
  QuantInfo info;
  QuantType type = QuantType::Affine;
  bool qk_halves = true;       // q/k rows in the Hugging Face RoPE layout (older native folders)
  bool gptq_v2 = false;        // GPTQ zeros stored as is, else minus one
  bool describe_only = false;  // native affine linears without group parameters (LoadOptions)
  std::string weights_file;    // GPTQ model_file_base_name + ".safetensors", when given
  // Native folders whose output head kept its source quantization (affine; lm_head.qweight).
  int head_bits = 0;  // 0 = a float head
  int64_t head_group_size = 0;
};
// Throws Error for quant_methods other than gptq and qalora, and for invalid settings.
FolderQuant read_folder_quant(const json& config, const std::string& config_file,
                              const std::filesystem::path& dir);
// The quantized weight [out, in] of linear `prefix` in the folder's row order; an empty
// QMatrix when the folder keeps this linear dense (only `prefix.weight` present).
QMatrix load_quantized_weight(const HfWeights& w, const FolderQuant& q, const std::string& prefix,
                              int64_t out, int64_t in);

// What a quantized model's folder records: one type, bits and group size for all its
// quantized linears (checked).
struct NativeLayout {
  QuantType type = QuantType::Affine;
  int bits = 0;
  std::string first;       // the linear whose type and bits the others must share, for messages
  int64_t group_size = 0;  // -1 = per channel; NF4/FP4: the absmax block
};
bool has_quantized_linear(const Model& model);
bool has_quantized_linear_in(std::span<const LayerWeights> layers);
NativeLayout native_layout(const Model& model, const std::string& where);
// The same over some of the model's blocks (those a streaming writer has seen).
// `first_index`: the model's index of layers[0], for messages.
NativeLayout native_layout(const QuantInfo& quant, std::span<const LayerWeights> layers,
                           const std::string& where, int64_t first_index = 0);
// Throws the error native_layout gives for a linear of `block` whose type or bits differ from
// the layout's.
void check_same_quantization(const LayerWeights& block, int64_t index, const NativeLayout& layout,
                             const std::string& where);
// quantize_config.json, also config.json's quantization_config.
json native_quant_json(const Model& model, const NativeLayout& layout);
void add_quantized_weight(std::vector<StWriteTensor>& out, const std::string& prefix,
                          const QMatrix& w);
// A float tensor stored as `dtype` (F16 or BF16) when every value survives the conversion
// exactly, else as F32.
StWriteTensor st_float(std::string name, const float* data, Shape shape, StDtype dtype);
StWriteTensor st_float(std::string name, const Tensor& t, StDtype dtype);
// A float tensor rounded to `dtype` (F16 or BF16, nearest even) whatever it loses, which
// `rounding` records; a value beyond F16's range is an Error naming the tensor.
StWriteTensor st_rounded(std::string name, const Tensor& t, StDtype dtype, FloatRounding& rounding);
// A tensor whose elements are stored as they are in memory (codes, int32 words, fp32 values).
template <typename T>
StWriteTensor st_raw(std::string name, StDtype dtype, Shape shape, const std::vector<T>& v) {
  std::vector<uint8_t> bytes(v.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), v.data(), bytes.size());
  return {std::move(name), dtype, std::move(shape), std::move(bytes)};
}
// The same for bytes already laid out as stored, taken over without a copy.
inline StWriteTensor st_raw(std::string name, StDtype dtype, Shape shape,
                            std::vector<uint8_t>&& bytes) {
  return {std::move(name), dtype, std::move(shape), std::move(bytes)};
}

}  // namespace qalora::hf
