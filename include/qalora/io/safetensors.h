// safetensors: u64 little-endian header length, JSON header {name: {dtype, shape,
// data_offsets}} (plus optional __metadata__), then raw little-endian data.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qalora/core/mapped_file.h"
#include "qalora/core/tensor.h"

namespace qalora {

enum class StDtype { F32, F16, BF16, I32, I8, U8, I64, F64, BOOL, U16, I16, U32, U64 };
const char* st_dtype_name(StDtype d);
size_t st_dtype_size(StDtype d);

struct StTensorInfo {
  std::string name;
  StDtype dtype;
  Shape shape;
  size_t begin;  // byte offsets into the data section
  size_t end;
};

class SafetensorsFile {
 public:
  // Validates header JSON, dtypes, shapes vs byte ranges, and ranges vs file size. Ranges may
  // overlap or come in any order; they only have to lie inside the data section.
  static SafetensorsFile open(const std::filesystem::path& path);
  const std::string& path() const { return file_->path(); }
  std::shared_ptr<const MappedFile> mapping() const { return file_; }
  const std::vector<StTensorInfo>& tensors() const { return tensors_; }
  const StTensorInfo* find(std::string_view name) const;  // nullptr when absent
  // Raw little-endian bytes of any dtype (end - begin of them).
  const uint8_t* data(const StTensorInfo& t) const;
  // A float tensor as stored: F32 a zero-copy view when 4-byte aligned (else a copy), F16 and
  // BF16 encoded views decoded per use; throws Error naming the file and tensor for other dtypes.
  Tensor load(const StTensorInfo& t) const;
  // The same as a plain fp32 array (F16 and BF16 converted).
  Tensor load_f32(const StTensorInfo& t) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::shared_ptr<MappedFile> file_;
  size_t data_offset_ = 0;
  std::vector<StTensorInfo> tensors_;                 // in header order
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// Writes a safetensors file atomically. Tensors are stored in the order given; the header is
// padded with spaces to a multiple of 8 bytes so that the data section stays 8-byte aligned.
struct StWriteTensor {
  std::string name;
  StDtype dtype;
  Shape shape;
  std::vector<uint8_t> bytes;
};
void write_safetensors(const std::filesystem::path& path, const std::vector<StWriteTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// The same for a file too large to hold: the header comes from `specs`, and `produce` hands the
// tensors over one at a time, in that order and matching them, to the function it is given, so
// memory holds what the producer holds. A tensor that does not match its spec, or a missing or
// extra one, is an Error and the file is not written.
struct StTensorSpec {
  std::string name;
  StDtype dtype;
  Shape shape;
};
using StTensorSink = std::function<void(const StWriteTensor&)>;
void write_safetensors(const std::filesystem::path& path, const std::vector<StTensorSpec>& specs,
                       const std::function<void(const StTensorSink&)>& produce,
                       const std::map<std::string, std::string>& metadata = {});
StWriteTensor st_f32(std::string name, const Tensor& t);  // copies the data as F32

}  // namespace qalora
