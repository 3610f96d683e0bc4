#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qgait {
namespace {

#if defined(__x86_64__)
bool os_allows_amx() {
#if defined(__linux__)
  // Linux requires each process to request the AMX tile-data state before using it.
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

Isa detect() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512 && __builtin_cpu_supports("amx-int8") && __builtin_cpu_supports("amx-tile") &&
      os_allows_amx())
    return Isa::AMX;
  if (avx512) return Isa::AVX512;
  if (avx2) return Isa::AVX2;
#endif
  return Isa::Scalar;
}

// A cap: the level, and whether the AVX2 level may use AVX-VNNI (only "avx2" says no).
struct Cap {
  Isa isa;
  bool avx_vnni;
};

Cap parse_cap(const std::string& name) {
  if (name == "scalar") return {Isa::Scalar, true};
  if (name == "avx2") return {Isa::AVX2, false};
  if (name == "avx2_vnni") return {Isa::AVX2, true};
  if (name == "avx512") return {Isa::AVX512, true};
  if (name == "amx") return {Isa::AMX, true};
  throw std::invalid_argument("unknown ISA '" + name +
                              "' (expected scalar, avx2, avx2_vnni, avx512 or amx)");
}

Cap initial_cap() {
  const char* env = std::getenv("QGAIT_CPU_ISA");
  if (env == nullptr || *env == '\0') return {Isa::AMX, true};
  try {
    return parse_cap(env);
  } catch (const std::exception&) {
    return {Isa::AMX, true};  // an unknown value must not break import; the Python side warns
  }
}

std::atomic<int>& cap_ref() {
  static std::atomic<int> cap{static_cast<int>(initial_cap().isa)};
  return cap;
}

std::atomic<bool>& avx_vnni_cap() {
  static std::atomic<bool> on{initial_cap().avx_vnni};
  return on;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

bool cpu_has_vnni() {
#if defined(__x86_64__)
  static const bool v = detected_isa() >= Isa::AVX512 && __builtin_cpu_supports("avx512vnni");
  return v;
#else
  return false;
#endif
}

bool cpu_has_avx_vnni() {
#if defined(__x86_64__)
  static const bool v = detected_isa() >= Isa::AVX2 && __builtin_cpu_supports("avxvnni");
  return v;
#else
  return false;
#endif
}

bool cpu_uses_avx_vnni() {
  return cpu_has_avx_vnni() && avx_vnni_cap().load(std::memory_order_relaxed);
}

bool cpu_has_amx_int8() { return detected_isa() >= Isa::AMX; }

Isa cpu_isa() {
  const int cap = cap_ref().load(std::memory_order_relaxed);
  const int det = static_cast<int>(detected_isa());
  return static_cast<Isa>(cap < det ? cap : det);
}

void set_isa_cap(const std::string& name) {
  const Cap c = parse_cap(name);
  cap_ref().store(static_cast<int>(c.isa));
  avx_vnni_cap().store(c.avx_vnni);
}

std::string cpu_isa_name() {
  const Isa isa = cpu_isa();
  return isa == Isa::AVX2 && cpu_uses_avx_vnni() ? "avx2_vnni" : isa_name(isa);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::AVX2: return "avx2";
    case Isa::AVX512: return "avx512";
    case Isa::AMX: return "amx";
  }
  return "scalar";
}

}  // namespace qgait
