// The library's build_info, its instruction-set choice and its torch.library namespace `pdmd_native`. The loss ops
// live in <op>.cpp, one file each (shared helpers in common.h, block kernels in <op>.kernels.h, compiled once per
// instruction set by isa_instances.h); the AdamW8bitV step in optim.cpp (self-contained).
#include "common.h"

#include <string>

namespace {

const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

// Whether this CPU (and its OS: the checks include the saved register state) runs a kernels copy.
bool cpu_runs(int isa) {
  if (isa == kIsaBaseline) return true;
#if PDMD_MULTI_ISA
  __builtin_cpu_init();
  if (isa == kIsaAvx2) return __builtin_cpu_supports("avx2");
  if (isa == kIsaAvx512)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

int best_isa() {
  for (int isa = kIsaAvx512; isa > kIsaBaseline; --isa)
    if (cpu_runs(isa)) return isa;
  return kIsaBaseline;
}

std::string build_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#elif defined(__SSE4_2__)
  return "sse4.2";
#else
  return "generic";
#endif
}

// The kernels copies this CPU runs, in order ("baseline" = the build's -march: x86-64-v2 by default).
std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (int isa = kIsaBaseline; isa <= kIsaAvx512; ++isa)
    if (cpu_runs(isa)) out.emplace_back(kIsaNames[isa]);
  return out;
}

std::string isa() { return kIsaNames[pdmd_native_isa::active.load()]; }

// Picks the kernels copy: "auto" (the best this CPU runs), "baseline", "avx2" or "avx512"; returns the
// previous one. Every copy computes the same bits (see common.h): this changes only the speed.
std::string set_isa(c10::string_view name) {
  const std::string before = isa();
  if (name == "auto") {
    pdmd_native_isa::active.store(best_isa());
    return before;
  }
  for (int i = kIsaBaseline; i <= kIsaAvx512; ++i) {
    if (name != kIsaNames[i]) continue;
    TORCH_CHECK_VALUE(cpu_runs(i), "the kernels' instruction set '", std::string(name),
                      "' is not available on this CPU or in this build (available: ",
                      c10::Join(", ", isas()), ")");
    pdmd_native_isa::active.store(i);
    return before;
  }
  TORCH_CHECK_VALUE(false, "instruction set must be auto, baseline, avx2 or avx512, got '", std::string(name), "'");
}

std::string build_info() {
#ifndef PDMD_NATIVE_ARCH_NAME
#define PDMD_NATIVE_ARCH_NAME "unknown"
#endif
  return std::string("torch ") + TORCH_VERSION + ", " + build_isa() + " (arch " + PDMD_NATIVE_ARCH_NAME + "), block " +
         std::to_string(kBlock) + ", kernels " + isa() + " (of " + c10::Join(" ", isas()) + ")";
}

}  // namespace

namespace pdmd_native_isa {
std::atomic<int> active{best_isa()};
}

TORCH_LIBRARY(pdmd_native, m) {
  m.def("build_info() -> str", &build_info);
  m.def("isa() -> str", &isa);
  m.def("isas() -> str[]", &isas);
  m.def("set_isa(str name) -> str", &set_isa);
}
