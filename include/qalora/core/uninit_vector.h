// A std::vector whose resize leaves new elements uninitialised. A buffer sized for the worst
// case then takes physical memory only for what is written (the OS maps pages on first touch):
// the training step sizes its activations for a full packed batch but touches the rows of the
// batch at hand.
#pragma once

#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace qalora {

template <typename T>
struct UninitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <typename U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  // Value-initialisation (what resize asks for) becomes default-initialisation: none for
  // arithmetic types.
  template <typename U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

template <typename T>
using UninitVector = std::vector<T, UninitAllocator<T>>;

}  // namespace qalora
