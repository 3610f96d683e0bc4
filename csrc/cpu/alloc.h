// Large CPU outputs without 4 KiB page faults on every call.
//
// A tensor above glibc's mmap threshold (dynamic, at most 32 MiB) gets fresh memory from the
// kernel on every allocation and returns it on free, so a kernel writing a fresh output pays one
// page fault per 4 KiB on its first touch: on the development VM 4.6x the whole time of
// soft_fake_quant's forward + backward on 16M floats (bench/paired_malloc.py). Asking for
// transparent huge pages on the 2 MiB-aligned interior before the first touch makes that 512x
// fewer faults. Harmless on memory already mapped (a kept heap, a reused block), a no-op where
// THP is off or "never", and the same advice torch gives every allocation when
// THP_MEM_ALLOC_ENABLE=1. Only for CPU tensors; values are untouched.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace qgait {
namespace cpu {

inline void advise_huge(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (!t.device().is_cpu() || t.nbytes() < 2 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + t.nbytes()) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline at::Tensor empty_huge(at::IntArrayRef shape, const at::TensorOptions& opt) {
  at::Tensor t = at::empty(shape, opt);
  advise_huge(t);
  return t;
}

// empty_like for a contiguous x.
inline at::Tensor empty_like_huge(const at::Tensor& x) {
  at::Tensor t = at::empty_like(x);
  advise_huge(t);
  return t;
}

}  // namespace cpu
}  // namespace qgait
