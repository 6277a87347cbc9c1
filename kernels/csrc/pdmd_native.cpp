// The library's build_info and its torch.library namespace `pdmd_native`. The loss ops live in <op>.cpp, one file
// each (shared helpers in common.h); the AdamW8bitV step in optim.cpp (self-contained).
#include "common.h"

#include <string>

namespace {

std::string build_info() {
  std::string isa = "generic";
#if defined(__AVX512F__)
  isa = "avx512";
#elif defined(__AVX2__)
  isa = "avx2";
#elif defined(__SSE4_2__)
  isa = "sse4.2";
#endif
#ifndef PDMD_NATIVE_ARCH_NAME
#define PDMD_NATIVE_ARCH_NAME "unknown"
#endif
  return std::string("torch ") + TORCH_VERSION + ", " + isa + " (arch " + PDMD_NATIVE_ARCH_NAME + "), block " +
         std::to_string(kBlock);
}

}  // namespace

TORCH_LIBRARY(pdmd_native, m) {
  m.def("build_info() -> str", &build_info);
}
