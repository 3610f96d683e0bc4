// The int8 multiply-accumulate ceiling of this CPU: `macs` u8 x s8 -> s32 multiply-adds as
// AVX-512 VNNI vpdpbusd on registers only (no memory traffic), split over `threads` threads.
// bench_packed_conv3d.py builds it with the system compiler and times it for each layer's MAC
// count next to the convolutions, so "% of peak" is measured, not taken from a datasheet.
#include <immintrin.h>

#include <cstdint>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int kAcc = 24;  // independent accumulators: enough to cover latency x throughput

// One step = kAcc vpdpbusd into zmm8..zmm31 from zmm0 (u8) and zmm1 (s8), written as assembly
// so that the compiler can neither fold the chains nor keep the accumulators in memory.
#define QGAIT_DP(r) "vpdpbusd %%zmm1, %%zmm0, %%zmm" #r "\n\t"
__attribute__((target("avx512f,avx512vnni"), noinline)) void run(int64_t steps) {
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm0, %%zmm0, %%zmm0\n\t"
      "vpternlogd $0xff, %%zmm1, %%zmm1, %%zmm1\n\t"
      "1:\n\t"
      QGAIT_DP(8) QGAIT_DP(9) QGAIT_DP(10) QGAIT_DP(11) QGAIT_DP(12) QGAIT_DP(13)
      QGAIT_DP(14) QGAIT_DP(15) QGAIT_DP(16) QGAIT_DP(17) QGAIT_DP(18) QGAIT_DP(19)
      QGAIT_DP(20) QGAIT_DP(21) QGAIT_DP(22) QGAIT_DP(23) QGAIT_DP(24) QGAIT_DP(25)
      QGAIT_DP(26) QGAIT_DP(27) QGAIT_DP(28) QGAIT_DP(29) QGAIT_DP(30) QGAIT_DP(31)
      "dec %0\n\t"
      "jnz 1b\n\t"
      : "+r"(steps)
      :
      : "cc", "xmm0", "xmm1", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
        "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
        "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}
#undef QGAIT_DP

}  // namespace

// Runs at least `macs` multiply-adds (one vpdpbusd is 64) on `threads` threads.
extern "C" void int8_peak(int64_t macs, int threads) {
  const int64_t steps = macs / (64 * kAcc) / threads + 1;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([steps] { run(steps); });
  for (auto& th : pool) th.join();
}

extern "C" int has_vnni() { return __builtin_cpu_supports("avx512vnni") != 0; }

// The AMX-INT8 ceiling: tdpbusd (16 x 16 x 64 = 16,384 multiply-adds) into four independent
// sum tiles from operand tiles loaded once, no memory traffic in the loop.
namespace {
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-int8"), noinline)) void run_amx(int64_t steps) {
  AmxConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  alignas(64) static const uint8_t ones[1024] = {1};
  asm volatile("" : : "r"(&cfg) : "memory");  // g++ 12 sees 8 bytes read by ldtilecfg
  _tile_loadconfig(&cfg);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < steps; ++i) {
    _tile_dpbusd(0, 4, 6);
    _tile_dpbusd(1, 4, 7);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_release();
}
}  // namespace

// 1 when this process may use AMX-INT8 tiles (the CPU has them and Linux granted the state).
extern "C" int has_amx() {
  if (!__builtin_cpu_supports("amx-int8")) return 0;
#if defined(__linux__)
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#else
  return 0;
#endif
}

// Runs at least `macs` multiply-adds as tdpbusd on `threads` threads (has_amx() first).
extern "C" void amx_peak(int64_t macs, int threads) {
  const int64_t steps = macs / (4 * 16384) / threads + 1;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([steps] { run_amx(steps); });
  for (auto& th : pool) th.join();
}
