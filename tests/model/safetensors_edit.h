// Test helper: rewrites a safetensors file through an edit of its tensor list, to build
// corrupt or inconsistent model folders.
#pragma once

#include <filesystem>
#include <vector>

#include "qalora/io/safetensors.h"

namespace qalora::test {

// `edit` receives every tensor (bytes copied) and may change, drop or add entries.
template <typename Edit>
void edit_safetensors(const std::filesystem::path& file, Edit&& edit) {
  std::vector<StWriteTensor> tensors;
  {
    const SafetensorsFile st = SafetensorsFile::open(file);
    for (const StTensorInfo& t : st.tensors())
      tensors.push_back({t.name, t.dtype, t.shape, {st.data(t), st.data(t) + (t.end - t.begin)}});
  }
  edit(tensors);
  write_safetensors(file, tensors);
}

// Replaces the tensor of the same name.
inline void replace_tensor(const std::filesystem::path& file, const StWriteTensor& tensor) {
  edit_safetensors(file, [&](std::vector<StWriteTensor>& all) {
    for (StWriteTensor& t : all)
      if (t.name == tensor.name) t = tensor;
  });
}

}  // namespace qalora::test
