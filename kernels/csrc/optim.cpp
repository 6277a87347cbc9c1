// AdamW8bitV optimizer step on CPU: `pdmd_native::adamw8bitv_step` (one tensor) and
// `pdmd_native::adamw8bitv_multi_step` (every tensor of a parameter group in one parallel loop).
//
// Semantics: kernels/pdmd_kernels/optim_step.py (step_reference). Per block of kOptBlock values:
// read p, g, 8-bit codes and the block's (lo, hi) once, write p, codes and (lo, hi) once; v lives in
// a block-sized stack buffer. Random numbers come from a counter-based hash of (the tensor's seed,
// the element's index in its tensor, stream), so they do not depend on how the blocks are split into
// work items or across threads: the multi-tensor step is bit-identical to one step per tensor.
// Self-contained (its own element access helpers) so that it builds apart from the loss ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

#define PDMD_OPT_INLINE inline __attribute__((always_inline))
PDMD_OPT_INLINE uint32_t fbits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
PDMD_OPT_INLINE float from_fbits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

typedef uint16_t u16a __attribute__((may_alias));

// Element access as float32, bit-exact with c10's conversions (round to nearest even on store).
template <typename T> struct Elt;
template <> struct Elt<float> {
  using S = float;
  static PDMD_OPT_INLINE float load(S v) { return v; }
  static PDMD_OPT_INLINE S store(float f) { return f; }
};
template <> struct Elt<c10::BFloat16> {
  using S = u16a;
  static PDMD_OPT_INLINE float load(S v) { return from_fbits(uint32_t(v) << 16); }
  static PDMD_OPT_INLINE S store(float f) {  // NaN stays NaN (as c10::BFloat16)
    const uint32_t u = fbits(f);
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(r);
  }
};
template <> struct Elt<c10::Half> {  // integer/float32 ops only (bit-exact with F16C), so it vectorises
  using S = u16a;
  static PDMD_OPT_INLINE float load(S h) {
    const uint32_t two_w = uint32_t(h) << 17;
    const float normal = from_fbits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = from_fbits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_fbits(((uint32_t(h) & 0x8000u) << 16) | (two_w < (1u << 27) ? fbits(subnormal) : fbits(normal)));
  }
  static PDMD_OPT_INLINE S store(float f) {
    const uint32_t w = fbits(f), shl1_w = w + w;
    float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    base += from_fbits((std::max(shl1_w & 0xFF000000u, 0x71000000u) >> 1) + 0x07800000u);
    const uint32_t b = fbits(base);
    const uint32_t nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
    return uint16_t(((w >> 16) & 0x8000u) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

template <typename F> void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, "pdmd_native: unsupported dtype ", st);
  }
}

constexpr int64_t kOptBlock = 256;      // values per quantisation block (optim_step.BLOCK)
constexpr float kLevels = 254.0f;       // optim_step.LEVELS
constexpr float kMaxRange = 40.0f;      // optim_step.MAX_RANGE
constexpr int64_t kItemBlocks = 128;    // blocks per work item: 32768 values, worth a thread on its own

// exp2 and log2 of float32 values, computed in float64 with IEEE operations only (no libm: glibc picks an
// FMA or a plain variant of exp2f/log2f by CPU at run time, which can round differently), then rounded
// once to float32: within 0.5 ulp + 1e-12 relative of the exact value, and the same bits on every x86-64.
// Branch-free integer tricks instead of floor/frexp/int conversions, so that the block loops vectorise
// (SSE2 has no vector int64 <-> double conversion). No FMA contraction: every operation rounds alone.
PDMD_OPT_INLINE double dbits(uint64_t u) { double d; std::memcpy(&d, &u, 8); return d; }
PDMD_OPT_INLINE uint64_t ubits(double d) { uint64_t u; std::memcpy(&u, &d, 8); return u; }
constexpr double kRound = 0x1.8p52;  // x + kRound rounds x to an integer, held in the low mantissa bits

__attribute__((optimize("fp-contract=off", "no-math-errno", "no-trapping-math"))) PDMD_OPT_INLINE float det_exp2(float xf) {
  double x = xf;
  x = x > 200.0 ? 200.0 : (x < -200.0 ? -200.0 : x);  // beyond float32's range either way; NaN stays NaN
  const double shifted = x + kRound, k = shifted - kRound, f = x - k;  // k = round(x), exact, |f| <= 0.5
  // 2^f = e^(f ln 2) by Taylor to degree 10: remainder < 0.35^11 / 11! < 3e-13 relative
  double p = 7.054911620801121e-09;  // ln2^i / i!, i = 10 .. 0
  p = p * f + 1.0178086009239696e-07;
  p = p * f + 1.3215486790144305e-06;
  p = p * f + 1.5252733804059838e-05;
  p = p * f + 0.00015403530393381606;
  p = p * f + 0.0013333558146428441;
  p = p * f + 0.009618129107628477;
  p = p * f + 0.055504108664821576;
  p = p * f + 0.2402265069591007;
  p = p * f + 0.6931471805599453;
  p = p * f + 1.0;
  // times 2^k: k's low 12 bits (two's complement) shifted into the exponent field; |k| <= 200 stays normal
  return float(dbits(ubits(p) + (ubits(shifted) << 52)));  // one rounding, subnormal and overflow included
}

__attribute__((optimize("fp-contract=off", "no-math-errno", "no-trapping-math"))) PDMD_OPT_INLINE float det_log2(float xf) {  // xf > 0
  const uint64_t u = ubits(double(xf));  // float32 subnormals are normal float64 values
  // x = 2^k m with m in [sqrt(1/2), sqrt(2)): subtract sqrt(1/2)'s bits (+ 2^62 keeps it positive)
  const uint64_t t = u - 0x3fe6a09e667f3bcdull + (1024ull << 52), kb = t >> 52;  // kb = k + 1024
  const double m = dbits(u - (kb << 52) + (1024ull << 52));
  const double k = dbits(kb | 0x4330000000000000ull) - (0x1p52 + 1024.0);
  // log2 m = 2 / ln 2 * atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172: series to s^15,
  // remainder < 0.0295^8 / 17 < 4e-14 relative; |k + log2 m| >= 0.5 when k != 0 (no cancellation)
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;
  double q = 1.0 / 15.0;
  q = q * s2 + 1.0 / 13.0;
  q = q * s2 + 1.0 / 11.0;
  q = q * s2 + 1.0 / 9.0;
  q = q * s2 + 1.0 / 7.0;
  q = q * s2 + 1.0 / 5.0;
  q = q * s2 + 1.0 / 3.0;
  q = q * s2 + 1.0;
  const float r = float(k + 2.8853900817779268 * (s * q));  // 2 / ln 2
  return xf <= FLT_MAX ? r : xf;  // +inf and NaN pass through
}

PDMD_OPT_INLINE uint64_t mix64(uint64_t x) {  // splitmix64's finaliser: a bijection with full avalanche
  x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27; x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
PDMD_OPT_INLINE uint64_t rand64(uint64_t key, uint64_t i) { return mix64(key + i * 0x9e3779b97f4a7c15ull); }

// No fused multiply-adds here: each float32 operation rounds as in the reference's separate torch ops
// (no-math-errno: sqrt is one instruction, without an errno branch).
template <typename TP, typename TG>
__attribute__((optimize("fp-contract=off", "no-math-errno", "no-trapping-math")))
void adamw8bitv_blocks(typename Elt<TP>::S* __restrict__ p, const typename Elt<TG>::S* __restrict__ g,
                       uint8_t* __restrict__ codes, float* __restrict__ scales, int64_t n, int64_t b0, int64_t b1,
                       float lr, float decay, float beta2, float one_minus_beta2, float eps, float inv_bc2,
                       uint64_t seed, bool sr_state, bool sr_weight) {
  const uint64_t key_state = mix64(seed * 2 + 1), key_weight = mix64(seed * 2 + 2);
  float v[kOptBlock], lv[kOptBlock], w[kOptBlock], u[kOptBlock];  // v, log2 v, new weights, uniforms
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t off = blk * kOptBlock, len = n - off < kOptBlock ? std::max<int64_t>(n - off, 0) : kOptBlock;
    uint8_t* c = codes + off;
    const float lo0 = scales[2 * blk], hi0 = scales[2 * blk + 1], step0 = (hi0 - lo0) / kLevels;
    // v = beta2 dequant(codes) + (1 - beta2) g^2 (padding has g = 0), then the weight update
    for (int64_t i = 0; i < kOptBlock; ++i) {
      const float e = det_exp2(lo0 + (float(c[i]) - 1.0f) * step0);  // for every code: no branch
      v[i] = beta2 * (c[i] > 0 ? e : 0.0f);
    }
    for (int64_t i = 0; i < len; ++i) {  // branch-free: vectorises
      const float gi = Elt<TG>::load(g[off + i]);
      const float vi = v[i] + one_minus_beta2 * gi * gi;
      v[i] = vi;
      const float upd = gi / (std::sqrt(vi * inv_bc2) + eps);
      w[i] = Elt<TP>::load(p[off + i]) * decay - lr * upd;
    }
    if (std::is_same_v<TP, c10::BFloat16> && sr_weight) {
      for (int64_t i = 0; i < len; ++i) {  // add 16 random bits below the bfloat16 mantissa, then truncate
        const uint32_t r = uint32_t(rand64(key_weight, uint64_t(off + i)) >> 48);
        p[off + i] = uint16_t((fbits(w[i]) + r) >> 16);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) p[off + i] = Elt<TP>::store(w[i]);
    }
    // re-quantise: log2 code over the block's [lo, hi], capped at kMaxRange octaves
    float hi = -1e30f, lo = 1e30f;
    for (int64_t i = 0; i < kOptBlock; ++i) {
      const bool nz = v[i] > 0.0f;
      lv[i] = det_log2(nz ? v[i] : 1.0f);
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
    if (sr_state) {
      for (int64_t i = 0; i < kOptBlock; ++i) u[i] = float(rand64(key_state, uint64_t(off + i)) >> 40) * 0x1.0p-24f;
    } else {
      for (int64_t i = 0; i < kOptBlock; ++i) u[i] = 0.5f;
    }
    for (int64_t i = 0; i < kOptBlock; ++i) {
      const float r = u[i];
      const float pos = ((lv[i] > lo ? lv[i] : lo) - lo) * inv;
      const float f = std::floor(pos + r), q = f < 0.0f ? 0.0f : (f > kLevels ? kLevels : f);
      c[i] = v[i] > 0.0f ? uint8_t(q + 1.0f) : uint8_t(0);
    }
    scales[2 * blk] = lo;
    scales[2 * blk + 1] = hi;
  }
}

// One tensor's checked inputs, its float32 scalars and its block count.
struct OptTensor {
  at::Tensor p, g;  // g made contiguous here (p must already be: it is written in place)
  uint8_t* codes;
  float* scales;
  int64_t n, nblocks;
  float inv_bc2;
  uint64_t seed;
};

OptTensor check_tensor(const at::Tensor& p, const at::Tensor& g, at::Tensor& codes, at::Tensor& scales,
                       double bias_correction2, int64_t seed, int64_t index) {
  const std::string at_ = index < 0 ? std::string() : " (tensor " + std::to_string(index) + ")";
  TORCH_CHECK_VALUE(p.device().is_cpu() && g.device().is_cpu() && codes.device().is_cpu() &&
                        scales.device().is_cpu(), "p, g, codes and scales must be CPU tensors", at_);
  TORCH_CHECK_VALUE(p.is_contiguous(), "p must be contiguous", at_);
  const auto pt = p.scalar_type(), gt = g.scalar_type();
  TORCH_CHECK_VALUE(pt == at::kFloat || pt == at::kBFloat16 || pt == at::kHalf,
                    "p must be float32, bfloat16 or float16, got ", pt, at_);
  TORCH_CHECK_VALUE(gt == at::kFloat || gt == at::kBFloat16 || gt == at::kHalf,
                    "g must be float32, bfloat16 or float16, got ", gt, at_);
  const int64_t n = p.numel();
  TORCH_CHECK_VALUE(g.numel() == n, "g must have p's numel ", n, ", got ", g.numel(), at_);
  const int64_t nblocks = std::max<int64_t>(1, (n + kOptBlock - 1) / kOptBlock);
  TORCH_CHECK_VALUE(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == nblocks * kOptBlock,
                    "codes must be a contiguous uint8 tensor of ", nblocks * kOptBlock, " values", at_);
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == 2 * nblocks,
                    "scales must be a contiguous float32 [", nblocks, ", 2] tensor", at_);
  TORCH_CHECK_VALUE(bias_correction2 > 0.0, "bias_correction2 must be > 0, got ", bias_correction2, at_);
  return OptTensor{p, g.contiguous(), codes.mutable_data_ptr<uint8_t>(), scales.mutable_data_ptr<float>(), n,
                   nblocks, float(1.0 / bias_correction2), uint64_t(seed)};
}

// In place, for every tensor: v <- beta2 v + (1 - beta2) g^2; p <- p (1 - lr wd) - lr g / (sqrt(v / bc2) + eps).
// One parallel loop over (tensor, chunk of kItemBlocks blocks) work items covers all tensors.
void multi_step(std::vector<OptTensor>& ts, double lr, double beta2, double eps, double weight_decay,
                bool stochastic_state, bool stochastic_weight) {
  // scalars rounded to float32 as torch does for a python float times a float32 tensor
  const float lr_f = float(lr), decay = float(1.0 - lr * weight_decay), b2 = float(beta2),
              omb2 = float(1.0 - beta2), eps_f = float(eps);
  struct Item { int64_t t, b0, b1; };
  std::vector<Item> items;
  for (int64_t t = 0; t < int64_t(ts.size()); ++t)
    for (int64_t b = 0; b < ts[t].nblocks; b += kItemBlocks)
      items.push_back({t, b, std::min(b + kItemBlocks, ts[t].nblocks)});
  at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      OptTensor& o = ts[items[i].t];
      dispatch_float(o.p.scalar_type(), [&](auto ptag) {
        using TP = decltype(ptag);
        dispatch_float(o.g.scalar_type(), [&](auto gtag) {
          using TG = decltype(gtag);
          auto pp = reinterpret_cast<typename Elt<TP>::S*>(o.p.mutable_data_ptr<TP>());
          auto gg = reinterpret_cast<const typename Elt<TG>::S*>(o.g.const_data_ptr<TG>());
          const bool srw = stochastic_weight && std::is_same_v<TP, c10::BFloat16>;
          adamw8bitv_blocks<TP, TG>(pp, gg, o.codes, o.scales, o.n, items[i].b0, items[i].b1, lr_f, decay, b2,
                                    omb2, eps_f, o.inv_bc2, o.seed, stochastic_state, srw);
        });
      });
    }
  });
}

void adamw8bitv_step(at::Tensor p, const at::Tensor& g, at::Tensor codes, at::Tensor scales, double lr,
                     double beta2, double eps, double weight_decay, double bias_correction2, int64_t seed,
                     bool stochastic_state, bool stochastic_weight) {
  std::vector<OptTensor> ts{check_tensor(p, g, codes, scales, bias_correction2, seed, -1)};
  multi_step(ts, lr, beta2, eps, weight_decay, stochastic_state, stochastic_weight);
}

void adamw8bitv_multi_step(at::TensorList p, at::TensorList g, at::TensorList codes, at::TensorList scales,
                           at::IntArrayRef seeds, at::ArrayRef<double> bias_correction2, double lr, double beta2,
                           double eps, double weight_decay, bool stochastic_state, bool stochastic_weight) {
  const size_t T = p.size();
  TORCH_CHECK_VALUE(g.size() == T && codes.size() == T && scales.size() == T && seeds.size() == T &&
                        bias_correction2.size() == T,
                    "p, g, codes, scales, seeds and bias_correction2 must have one entry per tensor (", T, ")");
  std::vector<OptTensor> ts;
  ts.reserve(T);
  for (size_t t = 0; t < T; ++t) {
    at::Tensor c = codes[t], s = scales[t];
    ts.push_back(check_tensor(p[t], g[t], c, s, bias_correction2[t], seeds[t], int64_t(t)));
  }
  multi_step(ts, lr, beta2, eps, weight_decay, stochastic_state, stochastic_weight);
}

// For the tests: the step's exp2 and log2 (float32 in, float32 out) on every value of x.
std::tuple<at::Tensor, at::Tensor> optim_exp2_log2(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kFloat, "x must be a float32 CPU tensor");
  const at::Tensor X = x.contiguous();
  at::Tensor e = at::empty_like(X), l = at::empty_like(X);
  const float* xp = X.const_data_ptr<float>();
  float *ep = e.mutable_data_ptr<float>(), *lp = l.mutable_data_ptr<float>();
  for (int64_t i = 0; i < X.numel(); ++i) {
    ep[i] = det_exp2(xp[i]);
    lp[i] = xp[i] > 0.0f ? det_log2(xp[i]) : NAN;
  }
  return {e, l};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdmd_native, m) {
  m.def("adamw8bitv_step(Tensor(a!) p, Tensor g, Tensor(b!) codes, Tensor(c!) scales, float lr, float beta2, "
        "float eps, float weight_decay, float bias_correction2, int seed, bool stochastic_state, "
        "bool stochastic_weight) -> ()");
  m.def("adamw8bitv_multi_step(Tensor(a!)[] p, Tensor[] g, Tensor(b!)[] codes, Tensor(c!)[] scales, int[] seeds, "
        "float[] bias_correction2, float lr, float beta2, float eps, float weight_decay, bool stochastic_state, "
        "bool stochastic_weight) -> ()");
  m.def("_optim_exp2_log2(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pdmd_native, CPU, m) {
  m.impl("adamw8bitv_step", &adamw8bitv_step);
  m.impl("adamw8bitv_multi_step", &adamw8bitv_multi_step);
  m.impl("_optim_exp2_log2", &optim_exp2_log2);
}
