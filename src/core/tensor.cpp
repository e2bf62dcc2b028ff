#include "qalora/core/tensor.h"

#include <algorithm>
#include <cstring>

#include "qalora/core/error.h"

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

int64_t Tensor::numel() const {
  if (data_ == nullptr) return 0;
  int64_t n = 1;
  for (int64_t d : shape_) n *= d;
  return n;
}

Tensor Tensor::zeros(Shape shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    QL_CHECK(d >= 0, "tensor shape ", shape_str(shape), " has a negative dimension");
    n *= d;
  }
  std::shared_ptr<float[]> buf(new float[static_cast<size_t>(std::max<int64_t>(n, 1))]());
  Tensor t;
  t.shape_ = std::move(shape);
  t.data_ = buf.get();
  t.owned_ = true;
  t.owner_ = std::move(buf);
  return t;
}

Tensor Tensor::view(const float* data, Shape shape, std::shared_ptr<const void> owner) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.data_ = const_cast<float*>(data);  // views are read-only until mutable_data() copies them
  t.owned_ = false;
  t.owner_ = std::move(owner);
  return t;
}

float* Tensor::mutable_data() {
  if (!owned_ && data_ != nullptr) {
    Tensor copy = zeros(shape_);
    std::memcpy(copy.data_, data_, static_cast<size_t>(numel()) * sizeof(float));
    *this = std::move(copy);
  }
  return data_;
}

}  // namespace qalora
