// GGUF v2/v3 reader and writer. Shapes are reported row-major (outermost first), i.e. the
// reverse of GGUF's ne[] order: a linear weight with ne = {in, out} has shape [out, in].
#pragma once

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "qalora/core/mapped_file.h"
#include "qalora/core/tensor.h"
#include "qalora/quant/qmatrix.h"

namespace qalora {

enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
};

struct GgmlTypeTraits {
  const char* name;
  int64_t block_size;  // elements per block
  size_t block_bytes;  // bytes per block
  bool can_dequantize;
  bool can_quantize;  // quantize_row supports it (the GGUF export types)
};
// nullptr for a type number this reader does not know.
const GgmlTypeTraits* ggml_type_traits(uint32_t type);
const char* ggml_type_name(GgmlType type);
// Bytes of a row of n elements; throws when n is not a multiple of the block size.
size_t ggml_row_bytes(GgmlType type, int64_t n);
// Dequantizes n elements (n a multiple of the block size) to fp32, bit-exact with ggml's
// reference dequantizers. `src` needs no particular alignment.
void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n);
// Encodes n elements (n a multiple of the block size) as F32, F16, BF16, Q8_0, Q4_0 or Q4_1,
// byte-identical to ggml's reference (round-to-nearest) quantizers. Throws Error for other
// types and for non-finite input to the block types.
void quantize_row(GgmlType type, const float* src, void* dst, int64_t n);
// Q4_0 / Q4_1 / Q8_0 / Q4_K rows [rows, cols] as the exactly equal affine QMatrix (each
// 32-element block or Q4_K sub-block is a group of 32); nullopt for other types. The codes and
// group parameters are repacked from `data` when first read (derived ByteBuffers) and freed by
// release_pages(): `data` must outlive the matrix. `file`: the mapping `data` lies in, kept
// alive by the matrix, whose pages are dropped once repacked; null for the caller's memory.
// Q4_0 and Q8_0 read their blocks' scales once here, to tell whether fp16 offsets hold them,
// unless the matrix is only to be described (its offsets are then taken as fp16 unread).
std::optional<QMatrix> ggml_to_qmatrix(GgmlType type, const uint8_t* data, int64_t rows,
                                       int64_t cols,
                                       const std::shared_ptr<const MappedFile>& file = nullptr,
                                       bool describe_only = false);

enum class GgufValueType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

struct GgufArray;
// Scalars are widened: all unsigned ints -> uint64_t, signed -> int64_t, floats -> double.
using GgufValue =
    std::variant<uint64_t, int64_t, double, bool, std::string, std::shared_ptr<GgufArray>>;
struct GgufArray {
  GgufValueType type;
  std::vector<GgufValue> values;
};

struct GgufTensorInfo {
  std::string name;
  Shape shape;  // row-major
  GgmlType type;
  uint64_t offset;  // relative to the data section
  size_t nbytes;
};

class GgufFile {
 public:
  // Parses and validates the header, metadata and tensor table; throws Error naming the file
  // and the field on truncation, bad magic, unknown types, offsets past the end, etc.
  static GgufFile open(const std::filesystem::path& path);

  uint32_t version() const { return version_; }
  const std::string& path() const { return file_->path(); }
  size_t alignment() const { return alignment_; }

  bool has(std::string_view key) const;
  const GgufValue* find(std::string_view key) const;
  // The stored type of a key (ARRAY for arrays; GgufArray::type is the element type).
  std::optional<GgufValueType> value_type(std::string_view key) const;
  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return kv_; }
  // Typed getters: throw Error naming key, expected and actual type when present but wrong;
  // the *_or forms return the fallback when the key is absent.
  std::string get_string(std::string_view key) const;
  std::string get_string_or(std::string_view key, std::string fallback) const;
  int64_t get_int(std::string_view key) const;
  int64_t get_int_or(std::string_view key, int64_t fallback) const;
  double get_float_or(std::string_view key, double fallback) const;
  bool get_bool_or(std::string_view key, bool fallback) const;
  std::vector<std::string> get_string_array(std::string_view key) const;
  std::vector<double> get_float_array(std::string_view key) const;
  std::vector<int64_t> get_int_array(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(std::string_view name) const;
  const uint8_t* tensor_data(const GgufTensorInfo& info) const;
  const std::shared_ptr<MappedFile>& mapping() const { return file_; }
  // fp32 tensor: a zero-copy view for F32 data, dequantized otherwise.
  Tensor load_f32(const GgufTensorInfo& info) const;
  Tensor load_f32(std::string_view name) const;  // throws Error when the tensor is missing
  // The tensor as stored: a view for F32, an encoded view (decoded per use) for other types.
  Tensor load(const GgufTensorInfo& info) const;

 private:
  std::shared_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  size_t alignment_ = 32;
  size_t data_offset_ = 0;
  std::map<std::string, GgufValue, std::less<>> kv_;
  std::map<std::string, GgufValueType, std::less<>> kv_types_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

// Builds a GGUF v3 file in memory and writes it atomically. Keys and tensors keep the order in
// which they were first added; setting a key again replaces its value. The alignment is 32
// unless "general.alignment" is set (a u32 power of two).
class GgufWriter {
 public:
  // `type` is the on-disk type: a scalar type for scalars, ARRAY for arrays (whose elements,
  // nested arrays included, are written as GgufArray::type). Throws Error when the value does
  // not fit the type.
  void set(std::string key, GgufValue value, GgufValueType type);
  // Copies a key with its stored type from another file; throws Error when it is missing.
  void copy_kv(const GgufFile& src, std::string_view key);
  void set_u32(std::string key, uint32_t v);
  void set_f32(std::string key, float v);
  void set_bool(std::string key, bool v);
  void set_string(std::string key, std::string v);
  void set_string_array(std::string key, const std::vector<std::string>& v);
  void set_f32_array(std::string key, const std::vector<float>& v);
  void set_i32_array(std::string key, const std::vector<int32_t>& v);
  // `data` holds the tensor already encoded in `type` (ggml_row_bytes per row).
  void add_tensor(std::string name, const Shape& shape, GgmlType type, std::vector<uint8_t> data);
  void add_f32_tensor(std::string name, const Tensor& t);
  // Encodes `t` row by row with quantize_row.
  void add_quantized_tensor(std::string name, const Tensor& t, GgmlType type);
  // From the next tensor on, tensor data is appended to `file` instead of staying in memory, so
  // a model is exported one tensor at a time; write() copies it behind the header, and the
  // file is removed when the writer goes. Call before adding any tensor.
  void spill_data_to(const std::filesystem::path& file);
  void write(const std::filesystem::path& path) const;

  GgufWriter();
  GgufWriter(const GgufWriter&) = delete;
  GgufWriter& operator=(const GgufWriter&) = delete;
  ~GgufWriter();

 private:
  struct Entry {
    std::string key;
    GgufValue value;
    GgufValueType type;
  };
  struct PendingTensor {
    std::string name;
    Shape shape;
    GgmlType type;
    std::vector<uint8_t> data;  // empty when spilled
    size_t bytes = 0;
  };
  std::vector<Entry> kv_;
  std::vector<PendingTensor> tensors_;
  std::filesystem::path spill_path_;
  std::unique_ptr<std::ofstream> spill_;
};

}  // namespace qalora
