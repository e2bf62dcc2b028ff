// Tensor: an fp32 array with a row-major shape. Storage is either owned, a view into memory
// kept alive by `owner` (a mapped file), so F32 weights load without a copy, or an encoded view:
// rows kept in the file's own type (F16, BF16, a ggml block type) and decoded to fp32 only when
// an op reads them, so a model never needs an fp32 copy of itself.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace qalora {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& shape);  // "[576, 1536]"

// Throws Error "<source>: tensor '<name>' has shape [..], expected [..]<context>" on mismatch.
void check_shape(std::string_view source, std::string_view name, const Shape& actual,
                 const Shape& expected, std::string_view context = {});

// How an encoded tensor stores a row: `row_bytes` bytes, which `decode` turns into the row's
// `n` fp32 values.
struct RowCodec {
  std::string type;  // "F16", "BF16", "Q6_K", ... as the source file names it
  size_t row_bytes = 0;
  std::function<void(const uint8_t* src, float* dst, int64_t n)> decode;
  // sum_i row[i] x[i] without decoding the row to memory; null where the type has none.
  float (*dot)(const uint8_t* src, const float* x, int64_t n) = nullptr;
};
// F32 (possibly unaligned), F16 and BF16 rows of `row_len` elements.
std::shared_ptr<const RowCodec> f32_codec(int64_t row_len);
std::shared_ptr<const RowCodec> half_codec(int64_t row_len);
std::shared_ptr<const RowCodec> bf16_codec(int64_t row_len);

class Tensor {
 public:
  Tensor() = default;
  static Tensor zeros(Shape shape);
  // A view of `data` (not copied); `owner` keeps the memory alive. `file_backed`: the memory is
  // a read-only file mapping, whose pages release_pages() may drop.
  static Tensor view(const float* data, Shape shape, std::shared_ptr<const void> owner,
                     bool file_backed = false);
  // Rows of `shape[0]` (1 for a scalar) stored at `data` as `codec` says, one after another.
  static Tensor encoded(const uint8_t* data, Shape shape, std::shared_ptr<const RowCodec> codec,
                        std::shared_ptr<const void> owner, bool file_backed = true);

  bool empty() const { return data_ == nullptr && raw_ == nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_.at(i); }
  size_t rank() const { return shape_.size(); }
  int64_t numel() const;
  // A tensor's rows index its first dimension; a vector (or scalar) is one row.
  int64_t rows() const { return shape_.size() <= 1 ? 1 : shape_[0]; }
  int64_t row_len() const;  // elements per row (numel / rows)

  // Encoded tensors have no fp32 array: read them with decode_rows() or decoded().
  bool encoded() const { return codec_ != nullptr; }
  // (Both arms string_view: a std::string arm would make the result a dangling temporary.)
  std::string_view stored_type() const {
    return encoded() ? std::string_view(codec_->type) : std::string_view("F32");
  }
  // Bytes the tensor's values take where they are stored.
  int64_t stored_bytes() const;
  // The stored values, when they are BF16 rows in order (row r at r * row_len()), else null:
  // bf16 products read them as they are, with nothing to decode or round.
  const uint16_t* bf16_values() const;

  // The fp32 array; throws std::logic_error (a bug, not bad input) for an encoded tensor.
  const float* data() const;
  // Writable access; views are copied and encoded tensors decoded into owned memory first.
  float* mutable_data();
  std::span<const float> span() const { return {data(), static_cast<size_t>(numel())}; }
  const float* row(int64_t i) const { return data() + i * shape_.back(); }

  // out[(r1 - r0) * row_len()] = rows r0..r1-1 as fp32, whatever the storage.
  void decode_rows(int64_t r0, int64_t r1, float* out) const;
  // y[t * y_stride + r - r0] = row r . x[t * row_len()] for rows r0..r1-1 and T tokens, from
  // the stored bytes where the codec can (RowCodec::dot), else through a decoded copy.
  void dot_rows(int64_t r0, int64_t r1, const float* x, int64_t T, float* y,
                int64_t y_stride) const;
  // out[numel()] = every row as fp32 (decode_rows of all of them, rows in parallel).
  void decode_all(float* out) const;
  // The tensor as a plain fp32 array: itself when it is one, else a decoded copy.
  Tensor decoded() const;
  // Row r of the result is row order[r] of this tensor: a copy for fp32 arrays, a reordered
  // view (no copy) for encoded tensors.
  Tensor permuted_rows(const std::vector<int64_t>& order) const;
  // Drops the pages of a file-backed view from this process's resident memory (they are read
  // again from the file if used later); no-op for owned memory. Streaming commands call it once
  // they are done with a layer.
  void release_pages() const;
  // Reads a file-backed view's pages ahead of use (prefetch_mapped_pages); no-op for
  // owned memory.
  void prefetch_pages() const;

 private:
  const uint8_t* row_bytes_at(int64_t stored_row) const;
  const void* stored_data() const;  // the bytes as stored: raw_ when encoded, else data_
  static Tensor allocate(Shape shape, bool zero);

  Shape shape_;
  float* data_ = nullptr;
  bool owned_ = false;
  bool file_backed_ = false;
  std::shared_ptr<const void> owner_;
  // Encoded storage: raw_ + codec_; order_ (when set) maps row r to stored row order_[r].
  const uint8_t* raw_ = nullptr;
  std::shared_ptr<const RowCodec> codec_;
  std::shared_ptr<const std::vector<int64_t>> order_;
};

}  // namespace qalora
