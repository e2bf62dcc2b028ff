#include "qalora/core/tensor.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/core/mapped_file.h"

namespace qalora {

std::string shape_str(const Shape& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

void check_shape(std::string_view source, std::string_view name, const Shape& actual,
                 const Shape& expected, std::string_view context) {
  QL_CHECK(actual == expected, source, ": tensor '", name, "' has shape ", shape_str(actual),
           ", expected ", shape_str(expected), context);
}

namespace {

std::shared_ptr<const RowCodec> element_codec(const char* type, int64_t row_len, size_t size,
                                              void (*decode)(const uint8_t*, float*, int64_t),
                                              float (*dot)(const uint8_t*, const float*, int64_t)) {
  auto c = std::make_shared<RowCodec>();
  c->type = type;
  c->row_bytes = static_cast<size_t>(row_len) * size;
  c->decode = decode;
  c->dot = dot;
  return c;
}

void f32_row(const uint8_t* src, float* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

float f32_dot_row(const uint8_t* src, const float* x, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    float w = 0.0f;
    std::memcpy(&w, src + 4 * i, 4);  // the rows of an F32 view may be unaligned
    acc += w * x[i];
  }
  return acc;
}

}  // namespace

std::shared_ptr<const RowCodec> f32_codec(int64_t row_len) {
  return element_codec("F32", row_len, 4, f32_row, f32_dot_row);
}

std::shared_ptr<const RowCodec> half_codec(int64_t row_len) {
  return element_codec("F16", row_len, 2, fp16_to_fp32_row, fp16_dot_row);
}

std::shared_ptr<const RowCodec> bf16_codec(int64_t row_len) {
  return element_codec("BF16", row_len, 2, bf16_to_fp32_row, bf16_dot_row);
}

int64_t Tensor::numel() const {
  if (empty()) return 0;
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

int64_t Tensor::row_len() const {
  const int64_t r = rows();
  return r == 0 ? 0 : numel() / r;
}

int64_t Tensor::stored_bytes() const {
  return encoded() ? rows() * static_cast<int64_t>(codec_->row_bytes)
                   : numel() * static_cast<int64_t>(sizeof(float));
}

Tensor Tensor::zeros(Shape shape) {
  return allocate(std::move(shape), true);
}

Tensor Tensor::allocate(Shape shape, bool zero) {
  int64_t n = 1;
  for (int64_t d : shape) {
    QL_CHECK(d >= 0, "tensor shape ", shape_str(shape), " has a negative dimension");
    n *= d;
  }
  const auto size = static_cast<size_t>(std::max<int64_t>(n, 1));
  std::shared_ptr<float[]> buf(zero ? new float[size]() : new float[size]);
  Tensor t;
  t.shape_ = std::move(shape);
  t.data_ = buf.get();
  t.owned_ = true;
  t.owner_ = std::move(buf);
  return t;
}

Tensor Tensor::view(const float* data, Shape shape, std::shared_ptr<const void> owner,
                    bool file_backed) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.data_ = const_cast<float*>(data);  // views are read-only until mutable_data() copies them
  t.owned_ = false;
  t.file_backed_ = file_backed;
  t.owner_ = std::move(owner);
  return t;
}

Tensor Tensor::encoded(const uint8_t* data, Shape shape, std::shared_ptr<const RowCodec> codec,
                       std::shared_ptr<const void> owner, bool file_backed) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.raw_ = data;
  t.codec_ = std::move(codec);
  t.file_backed_ = file_backed;
  t.owner_ = std::move(owner);
  return t;
}

const float* Tensor::data() const {
  if (encoded())
    throw std::logic_error(cat("a tensor stored as ", codec_->type, " ", shape_str(shape_),
                               " was read as fp32 without decoding"));
  return data_;
}

float* Tensor::mutable_data() {
  if (encoded()) {
    *this = decoded();
  } else if (!owned_ && data_ != nullptr) {
    Tensor copy = zeros(shape_);
    std::memcpy(copy.data_, data_, static_cast<size_t>(numel()) * sizeof(float));
    *this = std::move(copy);
  }
  return data_;
}

const uint8_t* Tensor::row_bytes_at(int64_t stored_row) const {
  return raw_ + static_cast<size_t>(stored_row) * codec_->row_bytes;
}

void Tensor::decode_rows(int64_t r0, int64_t r1, float* out) const {
  const int64_t n = row_len();
  if (!encoded()) {
    std::memcpy(out, data_ + r0 * n, static_cast<size_t>((r1 - r0) * n) * sizeof(float));
    return;
  }
  for (int64_t r = r0; r < r1; ++r)
    codec_->decode(row_bytes_at(order_ ? (*order_)[static_cast<size_t>(r)] : r), out + (r - r0) * n,
                   n);
}

void Tensor::dot_rows(int64_t r0, int64_t r1, const float* x, int64_t T, float* y,
                      int64_t y_stride) const {
  const int64_t n = row_len();
  auto dot_each = [&](auto&& row_dot) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t t = 0; t < T; ++t) y[t * y_stride + r - r0] = row_dot(r, x + t * n);
  };
  if (encoded() && codec_->dot != nullptr) {
    dot_each([&](int64_t r, const float* xt) {
      return codec_->dot(row_bytes_at(order_ ? (*order_)[static_cast<size_t>(r)] : r), xt, n);
    });
    return;
  }
  thread_local std::vector<float> decoded_row;
  decoded_row.resize(static_cast<size_t>(n));
  int64_t decoded = -1;
  dot_each([&](int64_t r, const float* xt) {
    const float* w = encoded() ? decoded_row.data() : data_ + r * n;
    if (encoded() && decoded != r) {
      decode_rows(r, r + 1, decoded_row.data());
      decoded = r;
    }
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += w[i] * xt[i];
    return acc;
  });
}

void Tensor::decode_all(float* out) const {
  const int64_t rows_n = rows(), n = row_len();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows_n; ++r) decode_rows(r, r + 1, out + r * n);
}

Tensor Tensor::decoded() const {
  if (!encoded()) return *this;
  Tensor out = allocate(shape_, false);  // every element is written below
  decode_all(out.data_);
  return out;
}

Tensor Tensor::permuted_rows(const std::vector<int64_t>& order) const {
  // Entries of the first dimension, which for a vector are its elements.
  QL_CHECK(!shape_.empty() && static_cast<int64_t>(order.size()) == shape_[0] &&
               (!encoded() || rank() >= 2),
           "permuted_rows: ", order.size(), " rows given for a tensor of shape ",
           shape_str(shape_));
  if (encoded()) {
    Tensor out = *this;
    auto composed = std::make_shared<std::vector<int64_t>>(order.size());
    for (size_t r = 0; r < order.size(); ++r)
      (*composed)[r] = order_ ? (*order_)[static_cast<size_t>(order[r])] : order[r];
    out.order_ = std::move(composed);
    return out;
  }
  const int64_t n = shape_[0] == 0 ? 0 : numel() / shape_[0];
  Tensor out = zeros(shape_);
  for (size_t r = 0; r < order.size(); ++r)
    std::memcpy(out.data_ + static_cast<int64_t>(r) * n, data_ + order[r] * n,
                static_cast<size_t>(n) * sizeof(float));
  return out;
}

const uint16_t* Tensor::bf16_values() const {
  if (!encoded() || order_ || codec_->type != "BF16" ||
      codec_->row_bytes != static_cast<size_t>(row_len()) * sizeof(uint16_t) ||
      reinterpret_cast<uintptr_t>(raw_) % alignof(uint16_t) != 0)
    return nullptr;
  return reinterpret_cast<const uint16_t*>(raw_);
}

const void* Tensor::stored_data() const {
  return encoded() ? static_cast<const void*>(raw_) : data_;
}

void Tensor::release_pages() const {
  if (file_backed_ && !empty())
    release_mapped_pages(stored_data(), static_cast<size_t>(stored_bytes()));
}

void Tensor::prefetch_pages() const {
  if (file_backed_ && !empty())
    prefetch_mapped_pages(stored_data(), static_cast<size_t>(stored_bytes()));
}

}  // namespace qalora
