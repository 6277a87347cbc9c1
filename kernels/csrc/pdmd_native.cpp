// CPU implementation of the AdamW8bitV optimizer step and the library's build_info, registered as
// torch.library ops `pdmd_native::*`. The loss ops live in <op>.cpp, one file each; shared helpers in common.h.
#include "common.h"

#include <string>

namespace {

// ---------------------------------------------------------------- AdamW8bitV optimizer step
// Semantics: kernels/pdmd_kernels/optim_step.py (step_reference). Per block of kOptBlock values:
// read p, g, 8-bit codes and the block's (lo, hi) once, write p, codes and (lo, hi) once; v lives in
// a block-sized stack buffer. Random numbers come from a counter-based hash of (seed, index, stream),
// so they do not depend on how blocks are split across threads.
constexpr int64_t kOptBlock = 256;      // values per quantisation block (optim_step.BLOCK)
constexpr float kLevels = 254.0f;       // optim_step.LEVELS
constexpr float kMaxRange = 40.0f;      // optim_step.MAX_RANGE

PDMD_INLINE uint64_t mix64(uint64_t x) {  // splitmix64's finaliser: a bijection with full avalanche
  x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27; x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
PDMD_INLINE uint64_t rand64(uint64_t key, uint64_t i) { return mix64(key + i * 0x9e3779b97f4a7c15ull); }

// No fused multiply-adds here: each float32 operation rounds as in the reference's separate torch ops
// (no-math-errno: sqrt is one instruction, without an errno branch).
template <typename TP, typename TG>
__attribute__((optimize("fp-contract=off", "no-math-errno")))
void adamw8bitv_blocks(typename Io<TP>::S* __restrict__ p, const typename Io<TG>::S* __restrict__ g,
                       uint8_t* __restrict__ codes, float* __restrict__ scales, int64_t n, int64_t b0, int64_t b1,
                       float lr, float decay, float beta2, float one_minus_beta2, float eps, float inv_bc2,
                       uint64_t seed, bool sr_state, bool sr_weight) {
  const uint64_t key_state = mix64(seed * 2 + 1), key_weight = mix64(seed * 2 + 2);
  float v[kOptBlock], lv[kOptBlock];
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t off = blk * kOptBlock, len = n - off < kOptBlock ? std::max<int64_t>(n - off, 0) : kOptBlock;
    uint8_t* c = codes + off;
    const float lo0 = scales[2 * blk], hi0 = scales[2 * blk + 1], step0 = (hi0 - lo0) / kLevels;
    // v = beta2 dequant(codes) + (1 - beta2) g^2 (padding has g = 0), then the weight update
    for (int64_t i = 0; i < kOptBlock; ++i) {
      const float e = std::exp2(lo0 + (float(c[i]) - 1.0f) * step0);  // for every code: no branch
      v[i] = beta2 * (c[i] > 0 ? e : 0.0f);
    }
    for (int64_t i = 0; i < len; ++i) {
      const float gi = Io<TG>::load(g[off + i]);
      const float vi = v[i] + one_minus_beta2 * gi * gi;
      v[i] = vi;
      const float upd = gi / (std::sqrt(vi * inv_bc2) + eps);
      const float pi = Io<TP>::load(p[off + i]) * decay - lr * upd;
      if constexpr (std::is_same_v<TP, c10::BFloat16>) {
        if (sr_weight) {  // add 16 random bits below the bfloat16 mantissa, then truncate
          const uint32_t r = uint32_t(rand64(key_weight, uint64_t(off + i)) >> 48);
          p[off + i] = uint16_t((bits(pi) + r) >> 16);
          continue;
        }
      }
      p[off + i] = Io<TP>::store(pi);
    }
    // re-quantise: log2 code over the block's [lo, hi], capped at kMaxRange octaves
    float hi = -1e30f, lo = 1e30f;
    for (int64_t i = 0; i < kOptBlock; ++i) {
      const bool nz = v[i] > 0.0f;
      lv[i] = std::log2(nz ? v[i] : 1.0f);
    }
    for (int64_t i = 0; i < kOptBlock; ++i) {
      const bool nz = v[i] > 0.0f;
      const float h = nz ? lv[i] : -1e30f, l = nz ? lv[i] : 1e30f;
      hi = h > hi ? h : hi;
      lo = l < lo ? l : lo;
    }
    if (hi < -1e29f) {
      hi = 0.0f; lo = 0.0f;
    } else {
      lo = lo > hi - kMaxRange ? lo : hi - kMaxRange;
    }
    const float step = (hi - lo) / kLevels, inv = step > 0.0f ? 1.0f / step : 0.0f;
    for (int64_t i = 0; i < kOptBlock; ++i) {
      const float r = sr_state ? float(rand64(key_state, uint64_t(off + i)) >> 40) * 0x1.0p-24f : 0.5f;
      const float pos = ((lv[i] > lo ? lv[i] : lo) - lo) * inv;
      const float f = std::floor(pos + r), q = f < 0.0f ? 0.0f : (f > kLevels ? kLevels : f);
      c[i] = v[i] > 0.0f ? uint8_t(q + 1.0f) : uint8_t(0);
    }
    scales[2 * blk] = lo;
    scales[2 * blk + 1] = hi;
  }
}

// In place: v <- beta2 v + (1 - beta2) g^2; p <- p (1 - lr wd) - lr g / (sqrt(v / bc2) + eps).
void adamw8bitv_step(at::Tensor p, const at::Tensor& g, at::Tensor codes, at::Tensor scales, double lr,
                     double beta2, double eps, double weight_decay, double bias_correction2, int64_t seed,
                     bool stochastic_state, bool stochastic_weight) {
  TORCH_CHECK_VALUE(p.device().is_cpu() && g.device().is_cpu() && codes.device().is_cpu() &&
                        scales.device().is_cpu(), "p, g, codes and scales must be CPU tensors");
  TORCH_CHECK_VALUE(p.is_contiguous(), "p must be contiguous");
  const auto pt = p.scalar_type(), gt = g.scalar_type();
  TORCH_CHECK_VALUE(pt == at::kFloat || pt == at::kBFloat16 || pt == at::kHalf,
                    "p must be float32, bfloat16 or float16, got ", pt);
  TORCH_CHECK_VALUE(gt == at::kFloat || gt == at::kBFloat16 || gt == at::kHalf,
                    "g must be float32, bfloat16 or float16, got ", gt);
  const int64_t n = p.numel();
  TORCH_CHECK_VALUE(g.numel() == n, "g must have p's numel ", n, ", got ", g.numel());
  const int64_t nblocks = std::max<int64_t>(1, (n + kOptBlock - 1) / kOptBlock);
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == nblocks * kOptBlock,
                    "codes must be a contiguous uint8 tensor of ", nblocks * kOptBlock, " values");
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == 2 * nblocks,
                    "scales must be a contiguous float32 [", nblocks, ", 2] tensor");
  TORCH_CHECK_VALUE(bias_correction2 > 0.0, "bias_correction2 must be > 0, got ", bias_correction2);
  const at::Tensor G = g.contiguous();
  uint8_t* c = codes.mutable_data_ptr<uint8_t>();
  float* s = scales.mutable_data_ptr<float>();
  // scalars rounded to float32 as torch does for a python float times a float32 tensor
  const float lr_f = float(lr), decay = float(1.0 - lr * weight_decay), b2 = float(beta2),
              omb2 = float(1.0 - beta2), eps_f = float(eps), inv_bc2 = float(1.0 / bias_correction2);
  const uint64_t seed_u = uint64_t(seed);
  dispatch(pt, [&](auto ptag) {
    using TP = decltype(ptag);
    dispatch(gt, [&](auto gtag) {
      using TG = decltype(gtag);
      auto pp = raw_mut<TP>(p);
      const auto gg = raw<TG>(G);
      at::parallel_for(0, nblocks, kParallelMin / kOptBlock, [&](int64_t b0, int64_t b1) {
        adamw8bitv_blocks<TP, TG>(pp, gg, c, s, n, b0, b1, lr_f, decay, b2, omb2, eps_f, inv_bc2, seed_u,
                                  stochastic_state, stochastic_weight);
      });
    });
  });
}

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
  m.def("adamw8bitv_step(Tensor(a!) p, Tensor g, Tensor(b!) codes, Tensor(c!) scales, float lr, float beta2, "
        "float eps, float weight_decay, float bias_correction2, int seed, bool stochastic_state, "
        "bool stochastic_weight) -> ()");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(pdmd_native, CPU, m) {
  m.impl("adamw8bitv_step", &adamw8bitv_step);
}
