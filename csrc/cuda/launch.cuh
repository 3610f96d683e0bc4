// How the .cu files launch kernels and declare dynamic shared memory, so that the same source
// builds with nvcc and, with -DQGAIT_CUDA_EMU, as host C++ against the CPU emulation
// (emu/cuda_emu.h; docs/cuda_emulation.md):
//   QGAIT_LAUNCH(grid, block, smem, stream, kernel)(args...)
//       == kernel<<<grid, block, smem, stream>>>(args...)
//   QGAIT_DYNAMIC_SMEM(float, smem);                           ==  extern __shared__ float smem[];
// QGAIT_EMU_SMALL_GRID (emulation builds only) shrinks each kernel's grid cap so that
// grid-stride loops and multi-chunk reductions run on small tensors; each .cu reads it where
// it sets its limits.
#pragma once
#include <cuda_runtime.h>

#ifdef QGAIT_CUDA_EMU
#define QGAIT_LAUNCH(grid, block, smem, stream, ...) \
  ::qgait_emu::make_launch(grid, block, smem, stream, #__VA_ARGS__, __VA_ARGS__)
#define QGAIT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(QGAIT_EMU_DYN_SMEM())
#else
#if defined(QGAIT_EMU_SMALL_GRID)
#error "QGAIT_EMU_SMALL_GRID is for emulation builds (-DQGAIT_CUDA_EMU) only"
#endif
#define QGAIT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define QGAIT_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif
