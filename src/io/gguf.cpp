// GGUF reader and writer. The reader trusts nothing in the file: every count, length, type and
// offset is checked against the bytes that are actually there before it is used.
#include "qalora/io/gguf.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <fstream>
#include <limits>
#include <ostream>

#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"

namespace qalora {

static_assert(std::endian::native == std::endian::little,
              "GGUF is little-endian; this reader copies values without swapping bytes");

namespace {

constexpr char kMagic[4] = {'G', 'G', 'U', 'F'};
constexpr uint32_t kWriteVersion = 3;
constexpr uint64_t kDefaultAlignment = 32;
constexpr uint64_t kMaxAlignment = uint64_t{1} << 30;
constexpr uint32_t kMaxDims = 4;
// Nested arrays recurse; a crafted file must not be able to exhaust the stack.
constexpr int kMaxArrayDepth = 8;
// A parsed element takes far more memory than its bytes in the file: reserve at most this many
// up front, so that a corrupt count fails on the missing bytes instead of on the allocation.
constexpr size_t kMaxReserve = size_t{1} << 16;

const char* value_type_name(GgufValueType t) {
  switch (t) {
    case GgufValueType::U8:
      return "u8";
    case GgufValueType::I8:
      return "i8";
    case GgufValueType::U16:
      return "u16";
    case GgufValueType::I16:
      return "i16";
    case GgufValueType::U32:
      return "u32";
    case GgufValueType::I32:
      return "i32";
    case GgufValueType::F32:
      return "f32";
    case GgufValueType::BOOL:
      return "bool";
    case GgufValueType::STRING:
      return "string";
    case GgufValueType::ARRAY:
      return "array";
    case GgufValueType::U64:
      return "u64";
    case GgufValueType::I64:
      return "i64";
    case GgufValueType::F64:
      return "f64";
  }
  return "unknown";
}

bool valid_value_type(uint32_t t) {
  return t <= static_cast<uint32_t>(GgufValueType::F64);
}

// Smallest encoding of one value of a type: bounds array counts before anything is allocated.
size_t min_value_bytes(GgufValueType t) {
  switch (t) {
    case GgufValueType::U8:
    case GgufValueType::I8:
    case GgufValueType::BOOL:
      return 1;
    case GgufValueType::U16:
    case GgufValueType::I16:
      return 2;
    case GgufValueType::U32:
    case GgufValueType::I32:
    case GgufValueType::F32:
      return 4;
    case GgufValueType::U64:
    case GgufValueType::I64:
    case GgufValueType::F64:
    case GgufValueType::STRING:
      return 8;
    case GgufValueType::ARRAY:
      return 12;
  }
  return 1;
}

// Names of ggml types this reader does not decode, for a clearer refusal.
const char* unsupported_type_name(uint32_t t) {
  switch (t) {
    case 4:
      return "Q4_2 (removed from ggml)";
    case 5:
      return "Q4_3 (removed from ggml)";
    case 16:
      return "IQ2_XXS";
    case 17:
      return "IQ2_XS";
    case 18:
      return "IQ3_XXS";
    case 19:
      return "IQ1_S";
    case 20:
      return "IQ4_NL";
    case 21:
      return "IQ3_S";
    case 22:
      return "IQ2_S";
    case 23:
      return "IQ4_XS";
    case 24:
      return "I8";
    case 25:
      return "I16";
    case 26:
      return "I32";
    case 27:
      return "I64";
    case 28:
      return "F64";
    case 29:
      return "IQ1_M";
    case 34:
      return "TQ1_0";
    case 35:
      return "TQ2_0";
    case 39:
      return "MXFP4";
    default:
      return "unknown";
  }
}

// Names read from a file go into one-line messages: escape control bytes, cap the length.
struct Quoted {
  std::string_view s;
};
std::ostream& operator<<(std::ostream& os, Quoted q) {
  constexpr size_t kMaxShown = 96;
  os << '\'';
  for (size_t i = 0; i < q.s.size() && i < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(q.s[i]);
    if (c < 0x20 || c == 0x7f || c == '\'' || c == '\\') {
      constexpr char kHex[] = "0123456789abcdef";
      os << "\\x" << kHex[c >> 4] << kHex[c & 0xf];
    } else {
      os << q.s[i];
    }
  }
  if (q.s.size() > kMaxShown) os << "...";
  return os << '\'';
}

// A field of the file being parsed, printed as e.g. "metadata 'general.name' value" or
// "metadata 'tokenizer.ggml.tokens' value element 17"; index < 0 means no element.
struct Field {
  std::string_view what;
  std::string_view name;  // from the file; quoted when not empty
  std::string_view part;
  int64_t index = -1;
};
std::ostream& operator<<(std::ostream& os, const Field& f) {
  os << f.what;
  if (!f.name.empty()) os << ' ' << Quoted{f.name};
  if (!f.part.empty()) os << ' ' << f.part;
  if (f.index >= 0) os << " element " << f.index;
  return os;
}

class Cursor {
 public:
  explicit Cursor(const MappedFile& file)
      : data_(file.data()), size_(file.size()), path_(file.path()) {}

  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

  template <typename... Args>
  [[noreturn]] void bad(Args&&... args) const {
    fail(path_, ": ", std::forward<Args>(args)...);
  }

  template <typename T>
  T read(const Field& f) {
    need(sizeof(T), f);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const Field& f) {
    const auto len = read<uint64_t>(f);
    if (len > remaining())
      bad(f, " string length: expected at most ", remaining(), " (bytes left in the file), got ",
          len);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return s;
  }

 private:
  void need(size_t n, const Field& f) const {
    if (remaining() < n)
      bad(f, ": expected ", n, " bytes at offset ", pos_, ", got ", remaining(),
          " (file truncated at ", size_, " bytes)");
  }

  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

GgufValue read_value(Cursor& c, GgufValueType type, Field f, int depth) {
  switch (type) {
    case GgufValueType::U8:
      return uint64_t{c.read<uint8_t>(f)};
    case GgufValueType::I8:
      return int64_t{c.read<int8_t>(f)};
    case GgufValueType::U16:
      return uint64_t{c.read<uint16_t>(f)};
    case GgufValueType::I16:
      return int64_t{c.read<int16_t>(f)};
    case GgufValueType::U32:
      return uint64_t{c.read<uint32_t>(f)};
    case GgufValueType::I32:
      return int64_t{c.read<int32_t>(f)};
    case GgufValueType::U64:
      return c.read<uint64_t>(f);
    case GgufValueType::I64:
      return c.read<int64_t>(f);
    case GgufValueType::F32:
      return double{c.read<float>(f)};
    case GgufValueType::F64:
      return c.read<double>(f);
    case GgufValueType::BOOL: {
      const auto b = c.read<uint8_t>(f);
      if (b > 1) c.bad(f, ": expected a bool (0 or 1), got ", int{b});
      return b == 1;
    }
    case GgufValueType::STRING:
      return c.read_string(f);
    case GgufValueType::ARRAY: {
      if (depth >= kMaxArrayDepth)
        c.bad(f, ": expected arrays nested at most ", kMaxArrayDepth, " deep, got deeper");
      const Field header{f.what, f.name, "array header", f.index};
      const auto elem = c.read<uint32_t>(header);
      if (!valid_value_type(elem)) c.bad(header, ": expected an element type 0..12, got ", elem);
      auto arr = std::make_shared<GgufArray>();
      arr->type = static_cast<GgufValueType>(elem);
      const auto count = c.read<uint64_t>(header);
      const size_t fits = c.remaining() / min_value_bytes(arr->type);
      if (count > fits)
        c.bad(header, ": expected at most ", fits, " ", value_type_name(arr->type),
              " elements (what fits in the rest of the file), got ", count);
      arr->values.reserve(std::min<size_t>(static_cast<size_t>(count), kMaxReserve));
      for (uint64_t i = 0; i < count; ++i)
        arr->values.push_back(read_value(
            c, arr->type, {f.what, f.name, "value", static_cast<int64_t>(i)}, depth + 1));
      return arr;
    }
  }
  c.bad(f, ": expected a value type 0..12, got ", static_cast<uint32_t>(type));
}

// A GGUF integer as int64 (unsigned values above INT64_MAX do not fit).
std::optional<int64_t> as_int(const GgufValue& v) {
  if (const auto* u = std::get_if<uint64_t>(&v)) {
    if (*u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
    return static_cast<int64_t>(*u);
  }
  if (const auto* i = std::get_if<int64_t>(&v)) return *i;
  return std::nullopt;
}

std::optional<double> as_float(const GgufValue& v) {
  if (const auto* d = std::get_if<double>(&v)) return *d;
  if (const auto* u = std::get_if<uint64_t>(&v)) return static_cast<double>(*u);
  if (const auto* i = std::get_if<int64_t>(&v)) return static_cast<double>(*i);
  return std::nullopt;
}

bool is_power_of_two(uint64_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}

uint64_t align_up(uint64_t v, uint64_t alignment) {
  return (v + alignment - 1) / alignment * alignment;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Reader

GgufFile GgufFile::open(const std::filesystem::path& path) {
  GgufFile f;
  f.file_ = MappedFile::open(path);
  Cursor c(*f.file_);
  if (c.remaining() < sizeof kMagic)
    c.bad("magic: expected \"GGUF\", got a file of ", c.size(), " bytes");
  char magic[sizeof kMagic];
  for (char& ch : magic) ch = static_cast<char>(c.read<uint8_t>({"magic", "", ""}));
  if (std::memcmp(magic, kMagic, sizeof magic) != 0)
    c.bad("magic: expected \"GGUF\", got ", Quoted{std::string_view(magic, sizeof magic)},
          " (not a GGUF file)");

  f.version_ = c.read<uint32_t>({"version", "", ""});
  if (f.version_ == 1)
    c.bad(
        "version: expected 2 or 3, got 1 (GGUF v1 is obsolete; re-convert the model with a "
        "current llama.cpp)");
  if (f.version_ != 2 && f.version_ != 3) {
    if (__builtin_bswap32(f.version_) == 2 || __builtin_bswap32(f.version_) == 3)
      c.bad("version: expected 2 or 3, got ", f.version_,
            " (a big-endian GGUF; only little-endian files are supported)");
    c.bad("version: expected 2 or 3, got ", f.version_);
  }

  const auto n_tensors = c.read<uint64_t>({"tensor count", "", ""});
  const auto n_kv = c.read<uint64_t>({"metadata count", "", ""});
  // A key/value needs at least 13 bytes, a tensor info at least 32: reject impossible counts
  // before reserving memory for them.
  if (n_kv > c.remaining() / 13)
    c.bad("metadata count: expected at most ", c.remaining() / 13, " (what fits in the file), got ",
          n_kv);
  if (n_tensors > c.remaining() / 32)
    c.bad("tensor count: expected at most ", c.remaining() / 32, " (what fits in the file), got ",
          n_tensors);

  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string what = cat("metadata key #", i);
    std::string key = c.read_string({what, "", ""});
    if (f.kv_.count(key) != 0)
      c.bad(Field{"metadata", key, ""}, ": expected unique keys, got a duplicate");
    const auto type = c.read<uint32_t>({"metadata", key, "type"});
    if (!valid_value_type(type))
      c.bad(Field{"metadata", key, "type"}, ": expected a value type 0..12, got ", type);
    const auto vtype = static_cast<GgufValueType>(type);
    GgufValue value = read_value(c, vtype, {"metadata", key, "value"}, 0);
    f.kv_types_.emplace(key, vtype);
    f.kv_.emplace(std::move(key), std::move(value));
  }

  if (const GgufValue* a = f.find("general.alignment")) {
    const std::optional<int64_t> v = as_int(*a);
    if (!v || !is_power_of_two(static_cast<uint64_t>(*v)) ||
        static_cast<uint64_t>(*v) > kMaxAlignment)
      c.bad("metadata 'general.alignment': expected a power of two up to ", kMaxAlignment, ", got ",
            v ? cat(*v) : cat("a ", value_type_name(*f.value_type("general.alignment"))));
    f.alignment_ = static_cast<size_t>(*v);
  } else {
    f.alignment_ = kDefaultAlignment;
  }

  f.tensors_.reserve(std::min<size_t>(static_cast<size_t>(n_tensors), kMaxReserve));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    const std::string what = cat("tensor #", i, " name");
    GgufTensorInfo t;
    t.name = c.read_string({what, "", ""});
    if (f.tensor_index_.count(t.name) != 0)
      c.bad(Field{"tensor", t.name, "name"}, ": expected unique tensor names, got a duplicate");
    const auto n_dims = c.read<uint32_t>({"tensor", t.name, "n_dims"});
    if (n_dims < 1 || n_dims > kMaxDims)
      c.bad(Field{"tensor", t.name, "n_dims"}, ": expected 1..", kMaxDims, ", got ", n_dims);
    int64_t ne[kMaxDims] = {};
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const std::string part = cat("ne[", d, "]");
      const auto v = c.read<uint64_t>({"tensor", t.name, part});
      if (v == 0 || v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          __builtin_mul_overflow(numel, static_cast<int64_t>(v), &numel))
        c.bad(Field{"tensor", t.name, part}, ": expected a positive size whose product with ",
              "the other dimensions fits in 63 bits, got ", v);
      ne[d] = static_cast<int64_t>(v);
    }
    const auto type = c.read<uint32_t>({"tensor", t.name, "type"});
    const GgmlTypeTraits* traits = ggml_type_traits(type);
    if (traits == nullptr)
      c.bad(Field{"tensor", t.name, "type"}, ": expected a supported ggml type, got ", type, " (",
            unsupported_type_name(type), ")");
    t.type = static_cast<GgmlType>(type);
    if (ne[0] % traits->block_size != 0)
      c.bad(Field{"tensor", t.name, "ne[0]"}, ": expected a multiple of ", traits->block_size,
            " (the ", traits->name, " block size), got ", ne[0]);
    const auto blocks = static_cast<uint64_t>(numel / traits->block_size);
    uint64_t nbytes = 0;
    if (__builtin_mul_overflow(blocks, uint64_t{traits->block_bytes}, &nbytes) ||
        nbytes > std::numeric_limits<size_t>::max())
      c.bad(Field{"tensor", t.name, "size"}, ": expected a byte size that fits in 64 bits, got ",
            blocks, " blocks of ", traits->block_bytes, " bytes");
    t.nbytes = static_cast<size_t>(nbytes);
    for (int d = static_cast<int>(n_dims) - 1; d >= 0; --d) t.shape.push_back(ne[d]);
    t.offset = c.read<uint64_t>({"tensor", t.name, "offset"});
    if (t.offset % f.alignment_ != 0)
      c.bad(Field{"tensor", t.name, "offset"}, ": expected a multiple of the alignment ",
            f.alignment_, ", got ", t.offset);
    f.tensor_index_.emplace(t.name, f.tensors_.size());
    f.tensors_.push_back(std::move(t));
  }

  f.data_offset_ = static_cast<size_t>(align_up(c.pos(), f.alignment_));
  for (const GgufTensorInfo& t : f.tensors_) {
    const size_t avail = f.data_offset_ <= c.size() ? c.size() - f.data_offset_ : 0;
    if (t.offset > avail || t.nbytes > avail - t.offset)
      c.bad(Field{"tensor", t.name, "offset"}, ": expected ", t.nbytes, " bytes of ",
            ggml_type_name(t.type), " data at data section offset ", t.offset,
            " to lie within the file (", avail, " data bytes after offset ", f.data_offset_,
            "), got a range past the end (file truncated?)");
  }
  return f;
}

bool GgufFile::has(std::string_view key) const {
  return kv_.find(key) != kv_.end();
}

const GgufValue* GgufFile::find(std::string_view key) const {
  const auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

std::optional<GgufValueType> GgufFile::value_type(std::string_view key) const {
  const auto it = kv_types_.find(key);
  if (it == kv_types_.end()) return std::nullopt;
  return it->second;
}

namespace {

// Names the stored type ("u32", "array of string") of a present key that a getter rejects.
[[noreturn]] void wrong_type(const GgufFile& f, std::string_view key, const char* expected) {
  const GgufValueType type = *f.value_type(key);
  const std::string stored =
      type == GgufValueType::ARRAY
          ? cat("array of ",
                value_type_name(std::get<std::shared_ptr<GgufArray>>(*f.find(key))->type))
          : value_type_name(type);
  fail(f.path(), ": metadata ", Quoted{key}, ": expected ", expected, ", got ", stored);
}

}  // namespace

std::string GgufFile::get_string(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) fail(path(), ": metadata ", Quoted{key}, ": expected a string, key is missing");
  if (const auto* s = std::get_if<std::string>(v)) return *s;
  wrong_type(*this, key, "a string");
}

std::string GgufFile::get_string_or(std::string_view key, std::string fallback) const {
  return has(key) ? get_string(key) : std::move(fallback);
}

int64_t GgufFile::get_int(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr)
    fail(path(), ": metadata ", Quoted{key}, ": expected an integer, key is missing");
  if (const std::optional<int64_t> i = as_int(*v)) return *i;
  wrong_type(*this, key, "an integer up to 2^63-1");
}

int64_t GgufFile::get_int_or(std::string_view key, int64_t fallback) const {
  return has(key) ? get_int(key) : fallback;
}

double GgufFile::get_float_or(std::string_view key, double fallback) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return fallback;
  if (const std::optional<double> d = as_float(*v)) return *d;
  wrong_type(*this, key, "a number");
}

bool GgufFile::get_bool_or(std::string_view key, bool fallback) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return fallback;
  if (const auto* b = std::get_if<bool>(v)) return *b;
  wrong_type(*this, key, "a bool");
}

namespace {

// Converts every element of an array value with `conv`; nullopt when any does not convert.
template <typename T, typename Conv>
std::optional<std::vector<T>> convert_array(const GgufValue* v, Conv conv) {
  const auto* arr = std::get_if<std::shared_ptr<GgufArray>>(v);
  if (arr == nullptr) return std::nullopt;
  std::vector<T> out;
  out.reserve((*arr)->values.size());
  for (const GgufValue& e : (*arr)->values) {
    std::optional<T> x = conv(e);
    if (!x) return std::nullopt;
    out.push_back(std::move(*x));
  }
  return out;
}

}  // namespace

std::vector<std::string> GgufFile::get_string_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr)
    fail(path(), ": metadata ", Quoted{key}, ": expected an array of string, key is missing");
  auto out = convert_array<std::string>(v, [](const GgufValue& e) -> std::optional<std::string> {
    if (const auto* s = std::get_if<std::string>(&e)) return *s;
    return std::nullopt;
  });
  if (out) return std::move(*out);
  wrong_type(*this, key, "an array of string");
}

std::vector<double> GgufFile::get_float_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr)
    fail(path(), ": metadata ", Quoted{key}, ": expected an array of numbers, key is missing");
  if (auto out = convert_array<double>(v, as_float)) return std::move(*out);
  wrong_type(*this, key, "an array of numbers");
}

std::vector<int64_t> GgufFile::get_int_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr)
    fail(path(), ": metadata ", Quoted{key}, ": expected an array of integers, key is missing");
  if (auto out = convert_array<int64_t>(v, as_int)) return std::move(*out);
  wrong_type(*this, key, "an array of integers");
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* GgufFile::tensor_data(const GgufTensorInfo& info) const {
  // `info` may be a caller's copy: check its range again rather than trust it.
  const size_t avail = file_->size() - std::min(data_offset_, file_->size());
  QL_CHECK(info.offset <= avail && info.nbytes <= avail - info.offset, path(), ": tensor ",
           Quoted{info.name}, " data: expected ", info.nbytes, " bytes at data offset ",
           info.offset, " within the file, got a range past the end");
  return file_->data() + data_offset_ + info.offset;
}

Tensor GgufFile::load(const GgufTensorInfo& info) const {
  const uint8_t* src = tensor_data(info);
  // The shape must agree with nbytes, which tensor_data checked against the file.
  int64_t numel = 1;
  for (int64_t d : info.shape) numel = d > 0 ? numel * d : 0;
  QL_CHECK(!info.shape.empty() && numel > 0, path(), ": tensor ", Quoted{info.name},
           " shape: expected 1..4 positive dimensions, got ", shape_str(info.shape));
  const int64_t row = info.shape.back();
  const size_t row_bytes = ggml_row_bytes(info.type, row);
  QL_CHECK(row_bytes * static_cast<size_t>(numel / row) == info.nbytes, path(), ": tensor ",
           Quoted{info.name}, " size: expected ", row_bytes * static_cast<size_t>(numel / row),
           " bytes for shape ", shape_str(info.shape), ", got ", info.nbytes);
  if (info.type == GgmlType::F32 && reinterpret_cast<uintptr_t>(src) % alignof(float) == 0)
    return Tensor::view(reinterpret_cast<const float*>(src), info.shape, file_, true);
  const GgmlTypeTraits* traits = ggml_type_traits(static_cast<uint32_t>(info.type));
  QL_CHECK(traits->can_dequantize, path(), ": tensor ", Quoted{info.name},
           " type: expected a type that can be dequantized, got ", traits->name);
  // A Tensor row (everything under one index of the first dimension) is a whole number of
  // ggml rows, contiguous, so it decodes in one call.
  auto codec = std::make_shared<RowCodec>();
  codec->type = traits->name;
  codec->row_bytes = info.shape.size() <= 1 ? info.nbytes : info.nbytes / info.shape[0];
  codec->decode = [type = info.type](const uint8_t* s, float* d, int64_t n) {
    dequantize_row(type, s, d, n);
  };
  return Tensor::encoded(src, info.shape, std::move(codec), file_);
}

Tensor GgufFile::load_f32(const GgufTensorInfo& info) const {
  return load(info).decoded();
}

Tensor GgufFile::load_f32(std::string_view name) const {
  const GgufTensorInfo* info = find_tensor(name);
  if (info == nullptr) fail(path(), ": tensor ", Quoted{name}, ": expected in the file, not found");
  return load_f32(*info);
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {

// Checks that `v` can be written as `type`; `where` names the key for the message.
void check_value(const GgufValue& v, GgufValueType type, const std::string& where, int depth) {
  auto wrong = [&](const char* got) {
    fail("GGUF writer: metadata ", Quoted{where}, ": expected a value for type ",
         value_type_name(type), ", got ", got);
  };
  auto check_uint = [&](uint64_t max) {
    const auto* u = std::get_if<uint64_t>(&v);
    if (u == nullptr) wrong("a value of another kind");
    if (*u > max) wrong("an out-of-range integer");
  };
  auto check_int = [&](int64_t min, int64_t max) {
    const auto* i = std::get_if<int64_t>(&v);
    if (i == nullptr) wrong("a value of another kind");
    if (*i < min || *i > max) wrong("an out-of-range integer");
  };
  switch (type) {
    case GgufValueType::U8:
      return check_uint(0xff);
    case GgufValueType::U16:
      return check_uint(0xffff);
    case GgufValueType::U32:
      return check_uint(0xffffffff);
    case GgufValueType::U64:
      return check_uint(std::numeric_limits<uint64_t>::max());
    case GgufValueType::I8:
      return check_int(-128, 127);
    case GgufValueType::I16:
      return check_int(-32768, 32767);
    case GgufValueType::I32:
      return check_int(std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max());
    case GgufValueType::I64:
      return check_int(std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
    case GgufValueType::F32:
    case GgufValueType::F64:
      if (!std::holds_alternative<double>(v)) wrong("a value of another kind");
      return;
    case GgufValueType::BOOL:
      if (!std::holds_alternative<bool>(v)) wrong("a value of another kind");
      return;
    case GgufValueType::STRING:
      if (!std::holds_alternative<std::string>(v)) wrong("a value of another kind");
      return;
    case GgufValueType::ARRAY: {
      const auto* arr = std::get_if<std::shared_ptr<GgufArray>>(&v);
      if (arr == nullptr || *arr == nullptr) wrong("a value that is not an array");
      if (depth >= kMaxArrayDepth) wrong("arrays nested too deep");
      for (const GgufValue& e : (*arr)->values) check_value(e, (*arr)->type, where, depth + 1);
      return;
    }
  }
  wrong("an unknown value type");
}

template <typename T>
void put(std::ostream& out, T v) {
  out.write(reinterpret_cast<const char*>(&v), sizeof v);
}

void put_string(std::ostream& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}

void put_value(std::ostream& out, const GgufValue& v, GgufValueType type) {
  switch (type) {
    case GgufValueType::U8:
      return put(out, static_cast<uint8_t>(std::get<uint64_t>(v)));
    case GgufValueType::U16:
      return put(out, static_cast<uint16_t>(std::get<uint64_t>(v)));
    case GgufValueType::U32:
      return put(out, static_cast<uint32_t>(std::get<uint64_t>(v)));
    case GgufValueType::U64:
      return put(out, std::get<uint64_t>(v));
    case GgufValueType::I8:
      return put(out, static_cast<int8_t>(std::get<int64_t>(v)));
    case GgufValueType::I16:
      return put(out, static_cast<int16_t>(std::get<int64_t>(v)));
    case GgufValueType::I32:
      return put(out, static_cast<int32_t>(std::get<int64_t>(v)));
    case GgufValueType::I64:
      return put(out, std::get<int64_t>(v));
    case GgufValueType::F32:
      return put(out, static_cast<float>(std::get<double>(v)));
    case GgufValueType::F64:
      return put(out, std::get<double>(v));
    case GgufValueType::BOOL:
      return put(out, static_cast<uint8_t>(std::get<bool>(v) ? 1 : 0));
    case GgufValueType::STRING:
      return put_string(out, std::get<std::string>(v));
    case GgufValueType::ARRAY: {
      const GgufArray& arr = *std::get<std::shared_ptr<GgufArray>>(v);
      put(out, static_cast<uint32_t>(arr.type));
      put<uint64_t>(out, arr.values.size());
      for (const GgufValue& e : arr.values) put_value(out, e, arr.type);
      return;
    }
  }
}

void put_padding(std::ostream& out, uint64_t pos, uint64_t alignment) {
  static constexpr char kZeros[64] = {};
  for (uint64_t pad = align_up(pos, alignment) - pos; pad > 0;) {
    const uint64_t n = std::min<uint64_t>(pad, sizeof kZeros);
    out.write(kZeros, static_cast<std::streamsize>(n));
    pad -= n;
  }
}

template <typename T>
GgufValue array_of(GgufValueType type, const std::vector<T>& v) {
  auto arr = std::make_shared<GgufArray>();
  arr->type = type;
  arr->values.reserve(v.size());
  for (const T& x : v) {
    if constexpr (std::is_same_v<T, std::string>)
      arr->values.emplace_back(x);
    else if constexpr (std::is_floating_point_v<T>)
      arr->values.emplace_back(double{x});
    else
      arr->values.emplace_back(int64_t{x});
  }
  return arr;
}

}  // namespace

void GgufWriter::set(std::string key, GgufValue value, GgufValueType type) {
  check_value(value, type, key, 0);
  const auto it =
      std::find_if(kv_.begin(), kv_.end(), [&](const Entry& e) { return e.key == key; });
  if (it != kv_.end()) {
    it->value = std::move(value);
    it->type = type;
  } else {
    kv_.push_back({std::move(key), std::move(value), type});
  }
}

void GgufWriter::copy_kv(const GgufFile& src, std::string_view key) {
  const GgufValue* v = src.find(key);
  if (v == nullptr)
    fail(src.path(), ": metadata ", Quoted{key}, ": expected a key to copy, key is missing");
  set(std::string(key), *v, *src.value_type(key));
}

void GgufWriter::set_u32(std::string key, uint32_t v) {
  set(std::move(key), uint64_t{v}, GgufValueType::U32);
}
void GgufWriter::set_f32(std::string key, float v) {
  set(std::move(key), double{v}, GgufValueType::F32);
}
void GgufWriter::set_bool(std::string key, bool v) {
  set(std::move(key), v, GgufValueType::BOOL);
}
void GgufWriter::set_string(std::string key, std::string v) {
  set(std::move(key), std::move(v), GgufValueType::STRING);
}
void GgufWriter::set_string_array(std::string key, const std::vector<std::string>& v) {
  set(std::move(key), array_of(GgufValueType::STRING, v), GgufValueType::ARRAY);
}
void GgufWriter::set_f32_array(std::string key, const std::vector<float>& v) {
  set(std::move(key), array_of(GgufValueType::F32, v), GgufValueType::ARRAY);
}
void GgufWriter::set_i32_array(std::string key, const std::vector<int32_t>& v) {
  set(std::move(key), array_of(GgufValueType::I32, v), GgufValueType::ARRAY);
}

void GgufWriter::add_tensor(std::string name, const Shape& shape, GgmlType type,
                            std::vector<uint8_t> data) {
  const GgmlTypeTraits* traits = ggml_type_traits(static_cast<uint32_t>(type));
  QL_CHECK(traits != nullptr, "GGUF writer: tensor ", Quoted{name},
           " type: expected a known ggml type, got ", static_cast<uint32_t>(type));
  QL_CHECK(!name.empty(), "GGUF writer: tensor name: expected a non-empty name");
  for (const PendingTensor& t : tensors_)
    QL_CHECK(t.name != name, "GGUF writer: tensor ", Quoted{name},
             ": expected unique names, got a duplicate");
  QL_CHECK(!shape.empty() && shape.size() <= kMaxDims, "GGUF writer: tensor ", Quoted{name},
           " shape: expected 1..", kMaxDims, " dimensions, got ", shape_str(shape));
  int64_t numel = 1;
  for (int64_t d : shape) {
    QL_CHECK(d > 0, "GGUF writer: tensor ", Quoted{name}, " shape: expected positive sizes, got ",
             shape_str(shape));
    numel *= d;
  }
  QL_CHECK(shape.back() % traits->block_size == 0, "GGUF writer: tensor ", Quoted{name},
           " shape: expected a row length that is a multiple of ", traits->block_size, " (",
           traits->name, "), got ", shape_str(shape));
  const size_t expected =
      ggml_row_bytes(type, shape.back()) * static_cast<size_t>(numel / shape.back());
  QL_CHECK(data.size() == expected, "GGUF writer: tensor ", Quoted{name}, " data: expected ",
           expected, " bytes of ", traits->name, " for shape ", shape_str(shape), ", got ",
           data.size());
  const size_t bytes = data.size();
  if (spill_) {
    spill_->write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(bytes));
    QL_CHECK(spill_->good(), spill_path_.string(), ": cannot write tensor ", Quoted{name}, ": ",
             write_failure_reason());
    data = std::vector<uint8_t>();  // frees it: `data = {}` would clear it and keep the capacity
  }
  tensors_.push_back({std::move(name), shape, type, std::move(data), bytes});
}

void GgufWriter::spill_data_to(const std::filesystem::path& file) {
  QL_CHECK(tensors_.empty() && !spill_, "GGUF writer: spill_data_to comes before the first tensor");
  spill_path_ = file;
  spill_ = std::make_unique<std::ofstream>(file, std::ios::binary | std::ios::trunc);
  QL_CHECK(spill_->is_open(), file.string(), ": cannot create the temporary tensor data file");
}

GgufWriter::GgufWriter() = default;

GgufWriter::~GgufWriter() {
  if (!spill_) return;
  spill_.reset();
  std::error_code ignored;  // best effort: a destructor must not throw
  std::filesystem::remove(spill_path_, ignored);
}

void GgufWriter::add_f32_tensor(std::string name, const Tensor& t) {
  std::vector<uint8_t> bytes(static_cast<size_t>(t.numel()) * sizeof(float));
  if (!bytes.empty()) std::memcpy(bytes.data(), t.data(), bytes.size());
  add_tensor(std::move(name), t.shape(), GgmlType::F32, std::move(bytes));
}

void GgufWriter::add_quantized_tensor(std::string name, const Tensor& t, GgmlType type) {
  QL_CHECK(t.rank() >= 1 && t.numel() > 0, "GGUF writer: tensor ", Quoted{name},
           ": expected a non-empty tensor, got shape ", shape_str(t.shape()));
  const int64_t row = t.shape().back();
  const int64_t rows = t.numel() / row;
  const size_t row_bytes = ggml_row_bytes(type, row);
  std::vector<uint8_t> bytes(row_bytes * static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r)
    quantize_row(type, t.row(r), bytes.data() + static_cast<size_t>(r) * row_bytes, row);
  add_tensor(std::move(name), t.shape(), type, std::move(bytes));
}

void GgufWriter::write(const std::filesystem::path& path) const {
  uint64_t alignment = kDefaultAlignment;
  for (const Entry& e : kv_) {
    if (e.key != "general.alignment") continue;
    // llama.cpp reads this key only as a u32.
    const std::optional<int64_t> a = as_int(e.value);
    QL_CHECK(e.type == GgufValueType::U32 && a && is_power_of_two(static_cast<uint64_t>(*a)) &&
                 static_cast<uint64_t>(*a) <= kMaxAlignment,
             path.string(), ": metadata 'general.alignment': expected a u32 power of two up to ",
             kMaxAlignment);
    alignment = static_cast<uint64_t>(*a);
  }
  std::vector<uint64_t> offsets;
  uint64_t data_size = 0;
  for (const PendingTensor& t : tensors_) {
    offsets.push_back(data_size);
    data_size = align_up(data_size + t.bytes, alignment);
  }
  std::ifstream spilled;
  if (spill_) {
    spill_->flush();
    QL_CHECK(spill_->good(), spill_path_.string(),
             ": cannot write the tensor data: ", write_failure_reason());
    spilled.open(spill_path_, std::ios::binary);
    QL_CHECK(spilled.is_open(), spill_path_.string(), ": cannot read back the tensor data");
  }

  write_file_atomic(path, [&](std::ostream& out) {
    out.write(kMagic, sizeof kMagic);
    put(out, kWriteVersion);
    put<uint64_t>(out, tensors_.size());
    put<uint64_t>(out, kv_.size());
    for (const Entry& e : kv_) {
      put_string(out, e.key);
      put(out, static_cast<uint32_t>(e.type));
      put_value(out, e.value, e.type);
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const PendingTensor& t = tensors_[i];
      put_string(out, t.name);
      put(out, static_cast<uint32_t>(t.shape.size()));
      for (auto d = t.shape.rbegin(); d != t.shape.rend(); ++d) put(out, static_cast<uint64_t>(*d));
      put(out, static_cast<uint32_t>(t.type));
      put(out, offsets[i]);
    }
    put_padding(out, static_cast<uint64_t>(out.tellp()), alignment);
    std::vector<char> chunk;
    for (const PendingTensor& t : tensors_) {
      if (spill_) {
        for (size_t done = 0; done < t.bytes; done += chunk.size()) {
          chunk.resize(std::min<size_t>(t.bytes - done, size_t{64} << 20));
          spilled.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
          QL_CHECK(spilled.good(), spill_path_.string(), ": tensor data ended early at ",
                   Quoted{t.name});
          out.write(chunk.data(), static_cast<std::streamsize>(chunk.size()));
        }
      } else {
        out.write(reinterpret_cast<const char*>(t.data.data()),
                  static_cast<std::streamsize>(t.bytes));
      }
      put_padding(out, t.bytes, alignment);
    }
  });
}

}  // namespace qalora
