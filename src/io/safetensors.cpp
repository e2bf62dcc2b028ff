#include "qalora/io/safetensors.h"

#include <array>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"

namespace qalora {

namespace {

struct DtypeInfo {
  StDtype dtype;
  const char* name;
  size_t size;
};

constexpr std::array<DtypeInfo, 13> kDtypes = {{
    {StDtype::F32, "F32", 4},
    {StDtype::F16, "F16", 2},
    {StDtype::BF16, "BF16", 2},
    {StDtype::I32, "I32", 4},
    {StDtype::I8, "I8", 1},
    {StDtype::U8, "U8", 1},
    {StDtype::I64, "I64", 8},
    {StDtype::F64, "F64", 8},
    {StDtype::BOOL, "BOOL", 1},
    {StDtype::U16, "U16", 2},
    {StDtype::I16, "I16", 2},
    {StDtype::U32, "U32", 4},
    {StDtype::U64, "U64", 8},
}};

const DtypeInfo& dtype_info(StDtype d) {
  for (const DtypeInfo& info : kDtypes)
    if (info.dtype == d) return info;
  fail("safetensors: invalid dtype enum value ", static_cast<int>(d));
}

// Element count of `shape`; false on a negative dimension or size_t overflow.
bool checked_numel(const Shape& shape, size_t& numel) {
  numel = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    const auto ud = static_cast<size_t>(d);
    if (ud != 0 && numel > std::numeric_limits<size_t>::max() / ud) return false;
    numel *= ud;
  }
  return true;
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// One header entry: {dtype, shape, data_offsets}, checked against the data section size.
StTensorInfo parse_entry(const std::string& file, const std::string& name,
                         const nlohmann::ordered_json& j, size_t data_size) {
  const std::string where = cat(file, ": tensor '", name, "'");
  QL_CHECK(j.is_object(), where, ": header entry must be an object, got ", j.type_name());

  const auto dt = j.find("dtype");
  QL_CHECK(dt != j.end() && dt->is_string(), where, ": missing string field 'dtype'");
  const std::string dtype_name = dt->get<std::string>();
  const DtypeInfo* info = nullptr;
  for (const DtypeInfo& d : kDtypes)
    if (dtype_name == d.name) info = &d;
  QL_CHECK(info != nullptr, where, ": unknown dtype '", dtype_name,
           "' (expected F32, F16, BF16, I32, I8, U8, I16, U16, I64, U32, U64, F64 or BOOL)");

  const auto sh = j.find("shape");
  QL_CHECK(sh != j.end() && sh->is_array(), where, ": missing array field 'shape'");
  Shape shape;
  for (const auto& d : *sh) {
    QL_CHECK(d.is_number_unsigned(), where, ": shape ", sh->dump(),
             " must hold non-negative integers");
    const auto v = d.get<uint64_t>();
    QL_CHECK(v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), where,
             ": shape dimension ", v, " is too large");
    shape.push_back(static_cast<int64_t>(v));
  }

  const auto off = j.find("data_offsets");
  QL_CHECK(off != j.end() && off->is_array() && off->size() == 2 &&
               (*off)[0].is_number_unsigned() && (*off)[1].is_number_unsigned(),
           where, ": 'data_offsets' must be [begin, end] with non-negative integers");
  const auto begin = (*off)[0].get<uint64_t>();
  const auto end = (*off)[1].get<uint64_t>();
  QL_CHECK(begin <= end, where, ": data_offsets [", begin, ", ", end, "] has begin > end");
  QL_CHECK(end <= data_size, where, ": data_offsets [", begin, ", ", end,
           "] run past the end of the data section (", data_size, " bytes)");

  size_t numel = 0;
  QL_CHECK(checked_numel(shape, numel) && numel <= std::numeric_limits<size_t>::max() / info->size,
           where, ": shape ", shape_str(shape), " is too large");
  QL_CHECK(numel * info->size == end - begin, where, ": shape ", shape_str(shape), " x ",
           info->name, " needs ", numel * info->size, " bytes, data_offsets [", begin, ", ", end,
           "] hold ", end - begin);
  return StTensorInfo{name, info->dtype, std::move(shape), static_cast<size_t>(begin),
                      static_cast<size_t>(end)};
}

}  // namespace

const char* st_dtype_name(StDtype d) {
  return dtype_info(d).name;
}
size_t st_dtype_size(StDtype d) {
  return dtype_info(d).size;
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  SafetensorsFile st;
  st.file_ = MappedFile::open(path);
  const std::string& name = st.file_->path();
  const size_t size = st.file_->size();
  QL_CHECK(size >= 8, name, ": file is ", size,
           " bytes, too short for the 8-byte safetensors header length");
  const uint64_t header_len = read_u64_le(st.file_->data());
  QL_CHECK(header_len <= size - 8, name, ": header length ", header_len,
           " runs past the end of the file (", size, " bytes)");
  st.data_offset_ = 8 + static_cast<size_t>(header_len);
  const size_t data_size = size - st.data_offset_;

  nlohmann::ordered_json header;
  try {
    header =
        nlohmann::ordered_json::parse(st.file_->data() + 8, st.file_->data() + st.data_offset_);
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e999
    fail(name, ": header is not valid JSON: ", e.what());
  }
  QL_CHECK(header.is_object(), name, ": header must be a JSON object, got ", header.type_name());

  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      QL_CHECK(value.is_object(), name, ": __metadata__ must be an object of strings");
      for (const auto& [mk, mv] : value.items()) {
        QL_CHECK(mv.is_string(), name, ": __metadata__ value for '", mk, "' must be a string, got ",
                 mv.type_name());
        st.metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    st.index_[key] = st.tensors_.size();
    st.tensors_.push_back(parse_entry(name, key, value, data_size));
  }
  return st;
}

const StTensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* SafetensorsFile::data(const StTensorInfo& t) const {
  return file_->data() + data_offset_ + t.begin;
}

Tensor SafetensorsFile::load(const StTensorInfo& t) const {
  const uint8_t* src = data(t);
  const int64_t rows = t.shape.size() <= 1 ? 1 : t.shape[0];
  const int64_t row_len =
      rows == 0 ? 0 : static_cast<int64_t>((t.end - t.begin) / st_dtype_size(t.dtype)) / rows;
  switch (t.dtype) {
    case StDtype::F32:
      if (reinterpret_cast<uintptr_t>(src) % alignof(float) == 0)
        return Tensor::view(reinterpret_cast<const float*>(src), t.shape, file_, true);
      return Tensor::encoded(src, t.shape, f32_codec(row_len), file_).decoded();
    case StDtype::F16:
      return Tensor::encoded(src, t.shape, half_codec(row_len), file_);
    case StDtype::BF16:
      return Tensor::encoded(src, t.shape, bf16_codec(row_len), file_);
    default:
      fail(path(), ": tensor '", t.name, "' has dtype ", st_dtype_name(t.dtype),
           ", expected F32, F16 or BF16 for a float tensor");
  }
}

Tensor SafetensorsFile::load_f32(const StTensorInfo& t) const {
  return load(t).decoded();
}

void write_safetensors(const std::filesystem::path& path, const std::vector<StTensorSpec>& specs,
                       const std::function<void(const StTensorSink&)>& produce,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<size_t> sizes;
  size_t offset = 0;
  for (const StTensorSpec& t : specs) {
    QL_CHECK(!header.contains(t.name), path.string(), ": duplicate tensor name '", t.name, "'");
    size_t numel = 0;
    QL_CHECK(checked_numel(t.shape, numel), path.string(), ": tensor '", t.name, "' shape ",
             shape_str(t.shape), " overflows");
    sizes.push_back(numel * st_dtype_size(t.dtype));
    header[t.name] = {{"dtype", st_dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + sizes.back()}}};
    offset += sizes.back();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  write_file_atomic(path, [&](std::ostream& out) {
    std::array<char, 8> len{};
    for (size_t i = 0; i < 8; ++i) len[i] = static_cast<char>((text.size() >> (8 * i)) & 0xffu);
    out.write(len.data(), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    size_t k = 0;
    produce([&](const StWriteTensor& t) {
      QL_CHECK(k < specs.size(), path.string(), ": tensor '", t.name, "' is beyond the ",
               specs.size(), " tensors of the header");
      const StTensorSpec& want = specs[k];
      QL_CHECK(t.name == want.name && t.dtype == want.dtype && t.shape == want.shape &&
                   t.bytes.size() == sizes[k],
               path.string(), ": tensor ", k, " is '", t.name, "' ", shape_str(t.shape), " x ",
               st_dtype_name(t.dtype), " in ", t.bytes.size(), " bytes, the header says '",
               want.name, "' ", shape_str(want.shape), " x ", st_dtype_name(want.dtype), " in ",
               sizes[k], " bytes");
      out.write(reinterpret_cast<const char*>(t.bytes.data()),
                static_cast<std::streamsize>(t.bytes.size()));
      ++k;
    });
    QL_CHECK(k == specs.size(), path.string(), ": ", k, " tensors written, the header has ",
             specs.size());
  });
}

void write_safetensors(const std::filesystem::path& path, const std::vector<StWriteTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<StTensorSpec> specs;
  for (const StWriteTensor& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
  write_safetensors(
      path, specs,
      [&](const StTensorSink& write) {
        for (const StWriteTensor& t : tensors) write(t);
      },
      metadata);
}

StWriteTensor st_f32(std::string name, const Tensor& t) {
  std::vector<uint8_t> bytes(static_cast<size_t>(t.numel()) * sizeof(float));
  if (!bytes.empty()) std::memcpy(bytes.data(), t.decoded().data(), bytes.size());
  return StWriteTensor{std::move(name), StDtype::F32, t.shape(), std::move(bytes)};
}

}  // namespace qalora
