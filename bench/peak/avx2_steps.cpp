// What one core of an AVX2-class CPU (no VNNI) can do per u8 x s8 multiply-add, measured: the
// inner step of three int8 convolution tiles, run on data in L1 so that only the core's
// execution limits show. bench/avx2_ceiling.py builds it, times each step kind and sets the
// packed convolutions' speed beside them.
//
//   0  vpmaddubsw alone, registers only: the multiplier's ceiling (32 multiply-adds each);
//   1  qgait's int16 step (tile_maddubs in csrc/cpu/packed_conv3d_avx2.cpp): 6 pixels x 16
//      channels, per pixel one broadcast of 4 codes, 2 vpmaddubsw and 2 vpaddw into int16 sums;
//   2  an int8 GEMM's exact step without VNNI (what oneDNN's AVX2 kernels run): 5 pixels x 16
//      channels, each vpmaddubsw widened at once, vpmaddwd by ones and vpaddd into int32;
//   3  the int16 step as 4 pixels x 24 channels (two weight vectors in registers, the third a
//      memory operand): fewer broadcasts per product. Not a qgait kernel: how much a wider
//      tile could add.
//
// Each step of kind k does kMacs[k] multiply-adds; a kind's rate is steps x kMacs / time.
#include <cstdint>

namespace {

alignas(64) uint8_t g_act[6][4096 + 256];  // rows staggered by 256 B: no L1 set conflicts
alignas(64) int8_t g_w[64 * 1024];

constexpr int64_t kWalk = 100;  // steps per walk over the (L1-resident) weights

#define QS_CLOBBER                                                                          \
  "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",   \
      "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"
#define QS_ARGS                                                                             \
  [a0] "r"(g_act[0]), [a1] "r"(g_act[1]), [a2] "r"(g_act[2]), [a3] "r"(g_act[3]),           \
      [a4] "r"(g_act[4]), [a5] "r"(g_act[5])
#define QS_BC(p) "vpbroadcastd (%[a" #p "], %[o]), %%ymm13\n\t"
// kind 1: pixel p's int16 sums in ymm a, b (weights in ymm14, ymm15)
#define QS_I16(p, a, b)                                                                     \
  QS_BC(p) "vpmaddubsw %%ymm14, %%ymm13, %%ymm12\n\tvpaddw %%ymm12, %%ymm" #a ", %%ymm" #a  \
           "\n\tvpmaddubsw %%ymm15, %%ymm13, %%ymm13\n\tvpaddw %%ymm13, %%ymm" #b ", %%ymm" #b \
           "\n\t"
// kind 2: pixel p's int32 sums in ymm a, b (ones in ymm11)
#define QS_I32(p, a, b)                                                                     \
  QS_BC(p) "vpmaddubsw %%ymm14, %%ymm13, %%ymm12\n\tvpmaddwd %%ymm11, %%ymm12, %%ymm12\n\t" \
           "vpaddd %%ymm12, %%ymm" #a ", %%ymm" #a "\n\tvpmaddubsw %%ymm15, %%ymm13, %%ymm13\n\t" \
           "vpmaddwd %%ymm11, %%ymm13, %%ymm13\n\tvpaddd %%ymm13, %%ymm" #b ", %%ymm" #b "\n\t"
// kind 3: pixel p's int16 sums in ymm a, b, c (third weight vector from memory)
#define QS_W24(p, a, b, c)                                                                  \
  QS_BC(p) "vpmaddubsw %%ymm14, %%ymm13, %%ymm12\n\tvpaddw %%ymm12, %%ymm" #a ", %%ymm" #a  \
           "\n\tvpmaddubsw %%ymm15, %%ymm13, %%ymm12\n\tvpaddw %%ymm12, %%ymm" #b ", %%ymm" #b \
           "\n\tvpmaddubsw 64(%[w]), %%ymm13, %%ymm13\n\tvpaddw %%ymm13, %%ymm" #c ", %%ymm" #c \
           "\n\t"
#define QS_WALK(LOAD, BODY, WBYTES)                                                         \
  for (int64_t r = 0; r < walks; ++r) {                                                     \
    const int8_t* w = g_w;                                                                  \
    int64_t o = 0, n = kWalk;                                                               \
    __asm__ volatile("1:\n\t" LOAD BODY "add $" #WBYTES ", %[w]\n\tadd $4, %[o]\n\t"        \
                     "dec %[n]\n\tjnz 1b\n\t"                                                \
                     : [w] "+r"(w), [o] "+r"(o), [n] "+r"(n)                                \
                     : QS_ARGS                                                              \
                     : QS_CLOBBER);                                                         \
  }
#define QS_LOAD2 "vmovdqu (%[w]), %%ymm14\n\tvmovdqu 32(%[w]), %%ymm15\n\t"
#define QS_MUL(r) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #r "\n\t"

__attribute__((target("avx2"), noinline)) void run(int kind, int64_t walks) {
  switch (kind) {
    case 0:
      for (int64_t r = 0; r < walks; ++r) {
        int64_t n = kWalk;
        __asm__ volatile("1:\n\t" QS_MUL(0) QS_MUL(1) QS_MUL(2) QS_MUL(3) QS_MUL(4) QS_MUL(5)
                             QS_MUL(6) QS_MUL(7) QS_MUL(8) QS_MUL(9) QS_MUL(10) QS_MUL(11)
                         "dec %[n]\n\tjnz 1b\n\t"
                         : [n] "+r"(n)
                         :
                         : QS_CLOBBER);
      }
      break;
    case 1:
      QS_WALK(QS_LOAD2, QS_I16(0, 0, 1) QS_I16(1, 2, 3) QS_I16(2, 4, 5) QS_I16(3, 6, 7)
                            QS_I16(4, 8, 9) QS_I16(5, 10, 11), 64)
      break;
    case 2:
      QS_WALK(QS_LOAD2, QS_I32(0, 0, 1) QS_I32(1, 2, 3) QS_I32(2, 4, 5) QS_I32(3, 6, 7)
                            QS_I32(4, 8, 9), 64)
      break;
    case 3:
      QS_WALK(QS_LOAD2, QS_W24(0, 0, 1, 2) QS_W24(1, 3, 4, 5) QS_W24(2, 6, 7, 8)
                            QS_W24(3, 9, 10, 11), 96)
      break;
    default:
      break;
  }
}

constexpr int64_t kMacs[] = {12 * 32, 12 * 32, 10 * 32, 12 * 32};
constexpr int kKinds = sizeof(kMacs) / sizeof(kMacs[0]);

}  // namespace

extern "C" int avx2_step_kinds() { return kKinds; }

// Multiply-adds one step of `kind` does (0 for an unknown kind).
extern "C" int64_t avx2_step_macs(int kind) {
  return kind >= 0 && kind < kKinds ? kMacs[kind] : 0;
}

// Runs at least `macs` multiply-adds of `kind` on the calling thread; returns the number run.
extern "C" int64_t avx2_steps(int kind, int64_t macs) {
  if (avx2_step_macs(kind) == 0) return 0;
  const int64_t walks = macs / (kMacs[kind] * kWalk) + 1;
  run(kind, walks);
  return walks * kWalk * kMacs[kind];
}

extern "C" int has_avx2() { return __builtin_cpu_supports("avx2") != 0; }
