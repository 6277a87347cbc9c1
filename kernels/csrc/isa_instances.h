// Compiles the kernels file named by PDMD_KERNELS once per instruction set (see common.h, "instruction-set
// dispatch"). Included inside the op file's anonymous namespace, after the primary template the kernels
// file specialises (e.g. `template <int ISA> struct SubKernels;`); each inclusion defines the
// specialisation for PDMD_ISA. No include guard: included once per op file, on purpose.
//
// The AVX2 and AVX-512 copies get their instruction set from `#pragma GCC target` on top of the
// file's -march (x86-64-v2 by default). Neither enables FMA ("avx2" does not imply "fma"), and the
// library is built with -ffp-contract=off, so every float32 operation rounds as in the baseline copy;
// the loops do the same operations in the same order (sums in 16 fixed lanes, which one AVX-512 or two
// AVX2 or four SSE registers hold), only more of them per instruction.
#ifndef PDMD_KERNELS
#error "define PDMD_KERNELS (the kernels file) before including isa_instances.h"
#endif

#define PDMD_ISA kIsaBaseline
#include PDMD_KERNELS
#undef PDMD_ISA

#if PDMD_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2")
#define PDMD_ISA kIsaAvx2
#include PDMD_KERNELS
#undef PDMD_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#define PDMD_ISA kIsaAvx512
#include PDMD_KERNELS
#undef PDMD_ISA
#pragma GCC pop_options
#endif

#undef PDMD_KERNELS
