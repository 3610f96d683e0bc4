// Stand-in for the CUDA toolkit header under the CPU emulation (-DQGAIT_CUDA_EMU).
#pragma once
#include "../cuda_emu.h"
