// Tensor: an fp32 array with a row-major shape. Storage is either owned or a view into memory
// kept alive by `owner` (a mapped file), so F32 weights load without a copy.
#pragma once

#include <cstdint>
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

class Tensor {
 public:
  Tensor() = default;
  static Tensor zeros(Shape shape);
  // A view of `data` (not copied); `owner` keeps the memory alive.
  static Tensor view(const float* data, Shape shape, std::shared_ptr<const void> owner);

  bool empty() const { return data_ == nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(size_t i) const { return shape_.at(i); }
  size_t rank() const { return shape_.size(); }
  int64_t numel() const;

  const float* data() const { return data_; }
  // Writable access; views of mapped files are copied into owned memory first.
  float* mutable_data();
  std::span<const float> span() const { return {data_, static_cast<size_t>(numel())}; }
  const float* row(int64_t i) const { return data_ + i * shape_.back(); }

 private:
  Shape shape_;
  float* data_ = nullptr;
  bool owned_ = false;
  std::shared_ptr<const void> owner_;
};

}  // namespace qalora
