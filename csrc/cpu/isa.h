// Runtime CPU feature dispatch. Kernels are compiled for several ISAs in one binary (gcc
// target attributes) and the widest one the CPU supports is chosen at run time. The level
// can be capped (never raised) with the env var QGAIT_CPU_ISA=scalar|avx2|avx512|amx or
// torch.ops.qgait._set_cpu_isa, which is how the tests exercise every fallback on one CPU.
#pragma once
#include <string>

namespace qgait {

enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2, AMX = 3 };

Isa cpu_isa();                  // level used now: min(detected, cap)
Isa detected_isa();             // widest level the CPU (and OS) support
bool cpu_has_vnni();            // AVX512-VNNI (vpdpbusd)
bool cpu_has_avx_vnni();        // AVX-VNNI (VEX vpdpbusd on ymm; Alder Lake, Zen 5, ...)
bool cpu_has_amx_int8();        // AMX tiles usable (CPU flag and OS permission granted)
void set_isa_cap(Isa cap);      // cap the level (tests)
const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // throws on unknown names

}  // namespace qgait
