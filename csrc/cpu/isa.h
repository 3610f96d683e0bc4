// Runtime CPU feature dispatch. Kernels are compiled for several ISAs in one binary (gcc
// target attributes) and the widest one the CPU supports is chosen at run time. The level
// can be capped (never raised) with the env var QGAIT_CPU_ISA=scalar|avx2|avx2_vnni|avx512|amx
// or torch.ops.qgait._set_cpu_isa, which is how the tests exercise every fallback on one CPU.
// avx2_vnni is the AVX2 level with AVX-VNNI (VEX vpdpbusd) where the CPU has it; avx2 is plain
// AVX2 + FMA (the class of CPUs without any VNNI), even on a CPU that has AVX-VNNI.
#pragma once
#include <string>

namespace qgait {

enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2, AMX = 3 };

Isa cpu_isa();                  // level used now: min(detected, cap)
Isa detected_isa();             // widest level the CPU (and OS) support
bool cpu_has_vnni();            // AVX512-VNNI (vpdpbusd)
bool cpu_has_avx_vnni();        // AVX-VNNI (VEX vpdpbusd on ymm; Alder Lake, Zen 5, ...)
bool cpu_uses_avx_vnni();       // the CPU has it and the cap allows it (not capped to avx2)
bool cpu_has_amx_int8();        // AMX tiles usable (CPU flag and OS permission granted)
void set_isa_cap(const std::string& name);  // cap the level (tests); throws on unknown names
std::string cpu_isa_name();     // the level used now, avx2_vnni included
const char* isa_name(Isa isa);

}  // namespace qgait
