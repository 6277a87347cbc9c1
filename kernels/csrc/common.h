// Shared helpers of the native CPU ops (included by every .cpp here): element access and
// float32 conversions, input checks, the blocked parallel loop and the fixed-lane float32 sums.
// Everything is in an anonymous namespace: each translation unit gets its own internal copy.
#pragma once
//
// Semantics: kernels/pdmd_kernels/reference.py (the float64 reference the tests compare against).
// Design: every latent-size input is read once per op (the normalized DMD backward reads
// x, real_cond, real_uncond a first time for the per-sample normaliser unless the forward's
// normaliser is passed in), arithmetic and accumulation are float32 in loops the compiler
// vectorises, per-sample coefficients are computed in double, and work is split into fixed blocks
// of kBlock elements (OpenMP through at::parallel_for, across samples and blocks). Block partial
// sums are combined in a fixed order, so results do not depend on the thread count; within a block,
// sums run in kLanes fixed lanes (lane_sums), so they do not depend on the CPU's vector width either.
// No temporary of input size is allocated (non-contiguous inputs are made contiguous first).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// ---------------------------------------------------------------- instruction-set dispatch
// The loss ops' block kernels are compiled once per instruction set (isa_instances.h): the baseline of
// the build's -march (x86-64-v2, SSE4.2, by default), and on x86-64 with GCC also AVX2 and AVX-512 copies.
// The library picks one at load time (the best this CPU supports; PDMD_NATIVE_ISA or set_isa to force
// one), held here. Every copy runs the same IEEE float32 operations in the same order (fixed-lane
// sums, no FMA: -ffp-contract=off, and the FMA instructions are not even enabled), so they compute
// the same bits; only the vector width of the loops differs.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PDMD_MULTI_ISA 1
#else
#define PDMD_MULTI_ISA 0
#endif
namespace pdmd_native_isa {
extern std::atomic<int> active;  // defined in pdmd_native.cpp: one value for the whole library
}

namespace {

constexpr int kIsaBaseline = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;

// Calls f(std::integral_constant<int, ISA>{}) for the active instruction set: the op picks its
// kernels' copy once per call (Kernels<decltype(isa)::value>::...).
template <typename F> inline void with_isa(F&& f) {
#if PDMD_MULTI_ISA
  switch (pdmd_native_isa::active.load(std::memory_order_relaxed)) {
    case kIsaAvx512: f(std::integral_constant<int, kIsaAvx512>{}); return;
    case kIsaAvx2: f(std::integral_constant<int, kIsaAvx2>{}); return;
    default: break;
  }
#endif
  f(std::integral_constant<int, kIsaBaseline>{});
}

constexpr int64_t kBlock = 8192;       // elements of one sample per parallel task
constexpr int64_t kParallelMin = 32768; // fewer elements than this per thread: not worth a thread

// ---------------------------------------------------------------- element access, float32 math
// always_inline: these are also called from the optimizer step, compiled with other fp options (no FMA
// contraction), and GCC does not otherwise inline across differing optimisation attributes.
#define PDMD_INLINE inline __attribute__((always_inline))
PDMD_INLINE uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
PDMD_INLINE float from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline bool is_finite(float f) { return (bits(f) & 0x7f800000u) != 0x7f800000u; }

typedef uint16_t u16_alias __attribute__((may_alias));

// IEEE half <-> float with integer and float32 operations only (bit-exact with F16C's
// vcvtph2ps / round-to-nearest-even vcvtps2ph): unlike _cvtsh_ss or a _Float16 cast, GCC vectorises it.
PDMD_INLINE float half_to_float(uint32_t h) {
  const uint32_t two_w = h << 17;  // exponent and mantissa at the top, sign dropped
  const float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;  // inf/NaN survive the scale
  const float subnormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return from_bits(((h & 0x8000u) << 16) | (two_w < (1u << 27) ? bits(subnormal) : bits(normal)));
}
PDMD_INLINE uint16_t float_to_half(float f) {
  const uint32_t w = bits(f), shl1_w = w + w;
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;  // rounds the mantissa, overflows to inf
  base += from_bits((std::max(shl1_w & 0xFF000000u, 0x71000000u) >> 1) + 0x07800000u);
  const uint32_t b = bits(base);
  const uint32_t nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
  return uint16_t(((w >> 16) & 0x8000u) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Io<T>: the raw element type S that a T tensor is read as, and float32 load/store of one element
// written so that loops over them vectorise.
template <typename T> struct Io;
template <> struct Io<float> {
  using S = float;
  static PDMD_INLINE float load(S v) { return v; }
  static PDMD_INLINE S store(float f) { return f; }
};
template <> struct Io<c10::BFloat16> {
  using S = u16_alias;
  static PDMD_INLINE float load(S v) { return from_bits(uint32_t(v) << 16); }
  static PDMD_INLINE S store(float f) {  // round to nearest even, NaN stays NaN (as c10::BFloat16)
    const uint32_t u = bits(f);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(r);
  }
};
template <> struct Io<c10::Half> {
  using S = u16_alias;
  static PDMD_INLINE float load(S v) { return half_to_float(v); }
  static PDMD_INLINE S store(float f) { return float_to_half(f); }
};

template <typename T> inline const typename Io<T>::S* raw(const at::Tensor& t) {
  return reinterpret_cast<const typename Io<T>::S*>(t.const_data_ptr<T>());
}
template <typename T> inline typename Io<T>::S* raw_mut(at::Tensor& t) {
  return t.defined() ? reinterpret_cast<typename Io<T>::S*>(t.mutable_data_ptr<T>()) : nullptr;
}

// Calls f(T{}) with T the C++ type of a float32/bfloat16/float16 tensor.
template <typename F> void dispatch(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, "pdmd_native: unsupported dtype ", st);
  }
}

// ---------------------------------------------------------------- input checks (ValueError)
void check_batch(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " is required");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
                    " must be float32, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) > 0, name,
                    " needs a non-empty leading batch dimension, got shape ", t.sizes());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_batch(t, name);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
                    " (", ref.scalar_type(), "), got ", t.scalar_type());
}

// A per-sample [B] coefficient, as doubles.
std::vector<double> coef(const at::Tensor& c, const char* name, int64_t B) {
  TORCH_CHECK_VALUE(c.defined(), name, " is required");
  TORCH_CHECK_VALUE(c.device().is_cpu(), name, " must be a CPU tensor, got ", c.device());
  TORCH_CHECK_VALUE(c.is_floating_point(), name, " must be a floating tensor, got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == B, name, " must have shape [B] = [", B, "], got ",
                    c.sizes());
  const at::Tensor d = c.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + B);
}

// ---------------------------------------------------------------- blocked parallel loop
// Runs fn(sample, offset, length, task) over every block of kBlock elements of every sample
// (N elements each), OpenMP-parallel across samples and blocks; returns the blocks per sample.
template <typename F> int64_t for_blocks(int64_t B, int64_t N, const F& fn) {
  const int64_t nblk = std::max<int64_t>(1, (N + kBlock - 1) / kBlock);
  const int64_t per_task = std::max<int64_t>(1, std::min(N, kBlock));
  const int64_t grain = std::max<int64_t>(1, kParallelMin / per_task);
  at::parallel_for(0, B * nblk, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, start = (t % nblk) * kBlock;
      fn(b, b * N + start, std::max<int64_t>(0, std::min(kBlock, N - start)), t);
    }
  });
  return nblk;
}

// Per-sample sums of block partials, in block order (independent of the thread count).
std::vector<double> per_sample(const std::vector<double>& partial, int64_t B, int64_t nblk) {
  std::vector<double> out(B, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < nblk; ++j) out[b] += partial[b * nblk + j];
  return out;
}

// ---------------------------------------------------------------- fixed-order float32 sums
// A float32 sum's rounding depends on the order of its additions. `omp simd reduction` lets the
// compiler pick that order from the vector width of -march (4 lanes for SSE, 8 for AVX2, 16 for
// AVX-512) and from whether a loop vectorises at all, so the same inputs gave other bits on another
// CPU, or in two loops summing the same terms. Here the order is written out: lane j adds the terms
// i = j (mod kLanes) in index order, then the lanes are added as a fixed tree. Any vector width up
// to 16 floats computes exactly these additions, so the sums are bit-identical for every -march and
// in every loop that sums the same terms (with -ffp-contract=off: no fused multiply-adds).
constexpr int kLanes = 16;

struct Lanes {
  float v[kLanes] = {};
  PDMD_INLINE float total() {
    for (int w = kLanes / 2; w >= 1; w /= 2)
      for (int j = 0; j < w; ++j) v[j] += v[j + w];
    return v[0];
  }
};

// acc_k += term_k(i) for i in [0, len), the K sums in lanes (see above); term(i, out) writes K floats.
template <int K, typename F> PDMD_INLINE std::array<float, K> lane_sums(int64_t len, F&& term) {
  Lanes acc[K];
  const int64_t full = len - len % kLanes;
  for (int64_t i0 = 0; i0 < full; i0 += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      float t[K];
      term(i0 + j, t);
      for (int k = 0; k < K; ++k) acc[k].v[j] += t[k];
    }
  }
  for (int64_t i = full; i < len; ++i) {
    float t[K];
    term(i, t);
    for (int k = 0; k < K; ++k) acc[k].v[i - full] += t[k];
  }
  std::array<float, K> out;
  for (int k = 0; k < K; ++k) out[k] = acc[k].total();
  return out;
}

// ---------------------------------------------------------------- outputs
// A fresh contiguous output like t. A large one is advised for transparent huge pages before its first
// write: the ops write each output once, straight after allocating it, and at latent sizes the page
// faults of a fresh allocation (one per 4 KiB page, each zeroing it in the kernel) cost more than the
// op's own reads (measured: 16M float32 elements, 64 MB, ~30 ms of faults vs ~12 ms to copy into
// memory already touched). With THP in "madvise" mode (the common default) a 2 MiB page takes one
// fault. Only a hint: the values are the same whether or not the kernel grants huge pages.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 2 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // errors: no advice, same values
#else
  (void)t;
#endif
}

inline at::Tensor fresh_like(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t, at::MemoryFormat::Contiguous);
  advise_huge_pages(out);
  return out;
}

at::Tensor float_vector(const std::vector<double>& v) {
  at::Tensor out = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (size_t i = 0; i < v.size(); ++i) o[i] = float(v[i]);
  return out;
}

}  // namespace
