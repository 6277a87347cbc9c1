// CPU implementations of the pdmd_kernels ops, registered as torch.library ops `pdmd_native::*`.
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
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 8192;       // elements of one sample per parallel task
constexpr int64_t kParallelMin = 32768; // fewer elements than this per thread: not worth a thread

// ---------------------------------------------------------------- element access, float32 math
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

at::Tensor float_vector(const std::vector<double>& v) {
  at::Tensor out = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  for (size_t i = 0; i < v.size(); ++i) o[i] = float(v[i]);
  return out;
}

// ---------------------------------------------------------------- subinterval loss
// r = st * pred - a * noise - b * x_s, loss = w * mean(r^2), w = min(1 / st^2, clamp_max).
struct SubCoef { float st, a, b; double w; };

std::vector<SubCoef> subinterval_coefs(const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                                       const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                                       double clamp_max, c10::string_view prediction, int64_t B) {
  const bool flow = prediction == "flow", x0 = prediction == "x0", eps = prediction == "eps";
  TORCH_CHECK_VALUE(flow || x0 || eps, "prediction must be 'flow', 'x0' or 'eps', got '",
                    std::string(prediction), "'");
  const auto as = coef(alpha_s, "alpha_s", B), ss = coef(sigma_s, "sigma_s", B);
  const auto at_ = coef(alpha_t, "alpha_t", B), st = coef(sigma_t, "sigma_t", B);
  std::vector<SubCoef> c(B);
  for (int64_t i = 0; i < B; ++i) {
    const double ats = at_[i] / as[i];
    // factored difference of squares (as the reference and Triton): exactly 0 at t = s under FMA contraction
    const double sts = std::sqrt(std::max(st[i] - ats * ss[i], 0.0) * (st[i] + ats * ss[i]));
    double a, b;
    if (flow) {
      a = (as[i] * as[i] * st[i] + at_[i] * ss[i] * ss[i]) / (as[i] * as[i]);
      b = -sts / as[i];
    } else if (x0) {
      a = -(at_[i] * ss[i] * ss[i]) / (as[i] * as[i]);
      b = sts / as[i];
    } else {
      a = st[i];
      b = 0.0;
    }
    const double inv = 1.0 / (sts * sts);  // inf at t = s: the clamp takes over
    c[i] = {float(sts), float(a), float(b), std::min(inv, clamp_max)};  // NaN stays NaN
  }
  return c;
}

template <typename T>
float residual_sq_sum(const typename Io<T>::S* __restrict__ p, const typename Io<T>::S* __restrict__ x,
                      const typename Io<T>::S* __restrict__ n, int64_t len, SubCoef c) {
  return lane_sums<1>(len, [&](int64_t i, float* t) {
    const float r = c.st * Io<T>::load(p[i]) - c.a * Io<T>::load(n[i]) - c.b * Io<T>::load(x[i]);
    t[0] = r * r;
  })[0];
}

at::Tensor subinterval_loss_fwd(const at::Tensor& pred, const at::Tensor& x_s, const at::Tensor& noise,
                                const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                                const at::Tensor& alpha_t, const at::Tensor& sigma_t, double clamp_max,
                                c10::string_view prediction) {
  check_batch(pred, "pred");
  check_like(x_s, "x_s", pred, "pred");
  check_like(noise, "noise", pred, "pred");
  const int64_t B = pred.size(0), N = pred.numel() / B;
  const auto c = subinterval_coefs(alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, B);
  const at::Tensor P = pred.contiguous(), X = x_s.contiguous(), E = noise.contiguous();
  std::vector<double> partial;
  int64_t nblk = 0;
  dispatch(pred.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto p = raw<T>(P), x = raw<T>(X), e = raw<T>(E);
    partial.assign(B * std::max<int64_t>(1, (N + kBlock - 1) / kBlock), 0.0);
    nblk = for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      partial[task] = residual_sq_sum<T>(p + off, x + off, e + off, len, c[b]);
    });
  });
  auto sums = per_sample(partial, B, nblk);
  for (int64_t b = 0; b < B; ++b) sums[b] = c[b].w * sums[b] / double(N);
  return float_vector(sums);
}

template <typename T>
void subinterval_grad_block(const typename Io<T>::S* __restrict__ p, const typename Io<T>::S* __restrict__ x,
                            const typename Io<T>::S* __restrict__ n, int64_t len, SubCoef c, float kp,
                            float kx, float kn, typename Io<T>::S* __restrict__ gp,
                            typename Io<T>::S* __restrict__ gx, typename Io<T>::S* __restrict__ gn) {
  // One loop per combination actually asked for, so an unneeded gradient costs no store.
#define PDMD_R (c.st * Io<T>::load(p[i]) - c.a * Io<T>::load(n[i]) - c.b * Io<T>::load(x[i]))
  if (gp && gx && gn) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float r = PDMD_R;
      gp[i] = Io<T>::store(kp * r); gx[i] = Io<T>::store(kx * r); gn[i] = Io<T>::store(kn * r);
    }
  } else if (gp && !gx && !gn) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) gp[i] = Io<T>::store(kp * PDMD_R);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float r = PDMD_R;
      if (gp) gp[i] = Io<T>::store(kp * r);
      if (gx) gx[i] = Io<T>::store(kx * r);
      if (gn) gn[i] = Io<T>::store(kn * r);
    }
  }
#undef PDMD_R
}

// Gradients of sum_b grad[b] * loss[b] with respect to (pred, x_s, noise), in the input dtype;
// an entry of `needs` that is false gives an undefined tensor (None in Python).
std::tuple<at::Tensor, at::Tensor, at::Tensor> subinterval_loss_bwd(
    const at::Tensor& grad, const at::Tensor& pred, const at::Tensor& x_s, const at::Tensor& noise,
    const at::Tensor& alpha_s, const at::Tensor& sigma_s, const at::Tensor& alpha_t,
    const at::Tensor& sigma_t, double clamp_max, c10::string_view prediction, std::array<bool, 3> needs) {
  check_batch(pred, "pred");
  check_like(x_s, "x_s", pred, "pred");
  check_like(noise, "noise", pred, "pred");
  const int64_t B = pred.size(0), N = pred.numel() / B;
  const auto c = subinterval_coefs(alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, B);
  const auto g = coef(grad, "grad", B);
  const at::Tensor P = pred.contiguous(), X = x_s.contiguous(), E = noise.contiguous();
  at::Tensor gp, gx, gn;
  if (needs[0]) gp = at::empty_like(P);
  if (needs[1]) gx = at::empty_like(X);
  if (needs[2]) gn = at::empty_like(E);
  if (!needs[0] && !needs[1] && !needs[2]) return {gp, gx, gn};
  dispatch(pred.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto p = raw<T>(P), x = raw<T>(X), e = raw<T>(E);
    const auto op = raw_mut<T>(gp), ox = raw_mut<T>(gx), oe = raw_mut<T>(gn);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      const double k = 2.0 * g[b] * c[b].w / double(N);
      subinterval_grad_block<T>(p + off, x + off, e + off, len, c[b], float(k * c[b].st),
                                float(-k * c[b].b), float(-k * c[b].a), op ? op + off : nullptr,
                                ox ? ox + off : nullptr, oe ? oe + off : nullptr);
    });
  });
  return {gp, gx, gn};
}

// ---------------------------------------------------------------- DMD surrogate loss
// real = uncond + scale * (cond - uncond) (or cond); theory: g = w * (real - fake);
// normalized: g = (fake - real) / max(mean|x - real|, min_norm), non-finite g -> 0.
// Loss 0.5 * sum(g^2) per sample, gradient in x: grad[b] * g.
struct DmdIn {
  at::Tensor X, C, U, F;  // contiguous; U undefined without uncond
  int64_t B, N;
  bool theory;
};

DmdIn dmd_inputs(const at::Tensor& x, const at::Tensor& real_cond, const at::Tensor& fake,
                 const std::optional<at::Tensor>& real_uncond, c10::string_view form) {
  TORCH_CHECK_VALUE(form == "theory" || form == "normalized", "form must be 'theory' or 'normalized', got '",
                    std::string(form), "'");
  check_batch(x, "x");
  check_like(real_cond, "real_cond", x, "x");
  check_like(fake, "fake", x, "x");
  DmdIn in{x.contiguous(), real_cond.contiguous(), at::Tensor(), fake.contiguous(), x.size(0),
           x.numel() / x.size(0), form == "theory"};
  if (real_uncond.has_value() && real_uncond->defined()) {
    check_like(*real_uncond, "real_uncond", x, "x");
    in.U = real_uncond->contiguous();
  }
  return in;
}

std::vector<float> dmd_weight(const std::optional<at::Tensor>& weight, const DmdIn& in) {
  if (!in.theory) return {};
  TORCH_CHECK_VALUE(weight.has_value() && weight->defined(), "dmd_loss form 'theory' needs a per-sample weight [B]");
  const auto w = coef(*weight, "weight", in.B);
  return std::vector<float>(w.begin(), w.end());
}

// The guided teacher prediction at element i (uncond pointer u may be null: template HasU).
#define PDMD_REAL (HasU ? Io<T>::load(u[i]) + scale * (Io<T>::load(c[i]) - Io<T>::load(u[i])) : Io<T>::load(c[i]))

template <typename T, bool HasU>
float theory_sq_sum(const typename Io<T>::S* __restrict__ c, const typename Io<T>::S* __restrict__ u,
                    const typename Io<T>::S* __restrict__ f, int64_t len, float scale, float w) {
  return lane_sums<1>(len, [&](int64_t i, float* t) {
    const float g = w * (PDMD_REAL - Io<T>::load(f[i]));
    t[0] = g * g;
  })[0];
}

// (sum |x - real|, sum over finite d of d^2) with d = fake - real.
template <typename T, bool HasU>
std::pair<float, float> normalized_sums(const typename Io<T>::S* __restrict__ x, const typename Io<T>::S* __restrict__ c,
                                        const typename Io<T>::S* __restrict__ u, const typename Io<T>::S* __restrict__ f,
                                        int64_t len, float scale, bool with_d) {
  // s1 by the same loop in both cases: the backward's normaliser equals the forward's bit for bit.
  // Two single sums (a second pass over a block that is still in cache): GCC 12 does not vectorise
  // one loop with two lane accumulators.
  const float s1 = lane_sums<1>(len, [&](int64_t i, float* t) { t[0] = std::fabs(Io<T>::load(x[i]) - PDMD_REAL); })[0];
  if (!with_d) return {s1, 0.f};
  const float s2 = lane_sums<1>(len, [&](int64_t i, float* t) {
    const float d = Io<T>::load(f[i]) - PDMD_REAL;
    t[0] = std::fabs(d) <= FLT_MAX ? d * d : 0.f;  // finite d only (NaN compares false); a float compare vectorises
  })[0];
  return {s1, s2};
}

template <typename T, bool HasU>
void dmd_grad_block(const typename Io<T>::S* __restrict__ c, const typename Io<T>::S* __restrict__ u,
                    const typename Io<T>::S* __restrict__ f, int64_t len, float scale, bool theory, float k,
                    float gb, typename Io<T>::S* __restrict__ out) {
  if (theory) {  // k = grad[b] * w[b]
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = Io<T>::store(k * (PDMD_REAL - Io<T>::load(f[i])));
  } else {  // k = 1 / norm[b]
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float g = (Io<T>::load(f[i]) - PDMD_REAL) * k;
      out[i] = Io<T>::store(gb * (is_finite(g) ? g : 0.f));
    }
  }
}
#undef PDMD_REAL

// Calls f(T{}, std::bool_constant<HasU>{}) for the inputs' dtype and whether uncond is given.
template <typename F> void dispatch_dmd(const DmdIn& in, F&& f) {
  dispatch(in.X.scalar_type(), [&](auto tag) {
    if (in.U.defined()) f(tag, std::true_type{});
    else f(tag, std::false_type{});
  });
}

// Per-sample clamped normaliser max(mean|x - real|, min_norm) (and, if asked, sum of finite d^2).
std::vector<double> dmd_norm(const DmdIn& in, double scale, double min_norm, std::vector<double>* dsq) {
  std::vector<double> p1, p2;
  int64_t nblk = 0;
  dispatch_dmd(in, [&](auto tag, auto has_u) {
    using T = decltype(tag);
    constexpr bool HasU = decltype(has_u)::value;
    const auto x = raw<T>(in.X), c = raw<T>(in.C), f = raw<T>(in.F);
    const auto u = HasU ? raw<T>(in.U) : nullptr;
    const int64_t n = in.B * std::max<int64_t>(1, (in.N + kBlock - 1) / kBlock);
    p1.assign(n, 0.0);
    p2.assign(n, 0.0);
    nblk = for_blocks(in.B, in.N, [&](int64_t, int64_t off, int64_t len, int64_t task) {
      const auto s = normalized_sums<T, HasU>(x + off, c + off, HasU ? u + off : nullptr, f + off, len,
                                              float(scale), dsq != nullptr);
      p1[task] = s.first;
      p2[task] = s.second;
    });
  });
  auto norm = per_sample(p1, in.B, nblk);
  for (auto& v : norm) {
    // NaN stays NaN (as clamp_min); rounded to float32, the dtype it is returned in, so that a
    // backward given the forward's normaliser computes exactly what one recomputing it does.
    v = double(float(std::max(v / double(in.N), min_norm)));
  }
  if (dsq) *dsq = per_sample(p2, in.B, nblk);
  return norm;
}

// Returns (loss [B], norm [B]: the normaliser of form 'normalized', empty [0] for 'theory'), float32.
std::tuple<at::Tensor, at::Tensor> dmd_loss_fwd(const at::Tensor& x, const at::Tensor& real_cond,
                                                const at::Tensor& fake,
                                                const std::optional<at::Tensor>& real_uncond, double scale,
                                                const std::optional<at::Tensor>& weight, c10::string_view form,
                                                double min_norm) {
  const DmdIn in = dmd_inputs(x, real_cond, fake, real_uncond, form);
  const auto w = dmd_weight(weight, in);
  if (!in.theory) {
    std::vector<double> dsq;
    const auto norm = dmd_norm(in, scale, min_norm, &dsq);
    std::vector<double> loss(in.B);
    // sum(g^2) = sum(d^2) / norm^2 over finite d; an infinite or NaN normaliser zeroes every g.
    for (int64_t b = 0; b < in.B; ++b)
      loss[b] = std::isfinite(norm[b]) ? 0.5 * dsq[b] / (norm[b] * norm[b]) : 0.0;
    return {float_vector(loss), float_vector(norm)};
  }
  std::vector<double> partial;
  int64_t nblk = 0;
  dispatch_dmd(in, [&](auto tag, auto has_u) {
    using T = decltype(tag);
    constexpr bool HasU = decltype(has_u)::value;
    const auto c = raw<T>(in.C), f = raw<T>(in.F);
    const auto u = HasU ? raw<T>(in.U) : nullptr;
    partial.assign(in.B * std::max<int64_t>(1, (in.N + kBlock - 1) / kBlock), 0.0);
    nblk = for_blocks(in.B, in.N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      partial[task] = theory_sq_sum<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale), w[b]);
    });
  });
  auto loss = per_sample(partial, in.B, nblk);
  for (auto& v : loss) v *= 0.5;
  return {float_vector(loss), at::empty({0}, at::TensorOptions().dtype(at::kFloat))};
}

// grad[b] * g in x's dtype; `norm` (from dmd_loss_fwd) skips the normaliser pass of form 'normalized'.
at::Tensor dmd_loss_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& real_cond,
                        const at::Tensor& fake, const std::optional<at::Tensor>& real_uncond, double scale,
                        const std::optional<at::Tensor>& weight, c10::string_view form, double min_norm,
                        const std::optional<at::Tensor>& norm) {
  const DmdIn in = dmd_inputs(x, real_cond, fake, real_uncond, form);
  const auto w = dmd_weight(weight, in);
  const auto g = coef(grad, "grad", in.B);
  std::vector<double> nrm;
  if (!in.theory)
    nrm = (norm.has_value() && norm->defined() && norm->numel() > 0) ? coef(*norm, "norm", in.B)
                                                                      : dmd_norm(in, scale, min_norm, nullptr);
  at::Tensor out = at::empty_like(in.X);
  dispatch_dmd(in, [&](auto tag, auto has_u) {
    using T = decltype(tag);
    constexpr bool HasU = decltype(has_u)::value;
    const auto c = raw<T>(in.C), f = raw<T>(in.F);
    const auto u = HasU ? raw<T>(in.U) : nullptr;
    const auto o = raw_mut<T>(out);
    for_blocks(in.B, in.N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      const float k = in.theory ? float(g[b] * w[b]) : float(1.0 / nrm[b]);
      dmd_grad_block<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale), in.theory, k,
                              float(g[b]), o + off);
    });
  });
  return out;
}

// ---------------------------------------------------------------- renoise
template <typename T>
void axpby_block(const typename Io<T>::S* __restrict__ x, const typename Io<T>::S* __restrict__ y, int64_t len,
                 float a, float b, typename Io<T>::S* __restrict__ out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] = Io<T>::store(a * Io<T>::load(x[i]) + b * Io<T>::load(y[i]));
}

template <typename T>
void scale2_block(const typename Io<T>::S* __restrict__ g, int64_t len, float a, float b,
                  typename Io<T>::S* __restrict__ ox, typename Io<T>::S* __restrict__ on) {
  if (ox && on) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float v = Io<T>::load(g[i]);
      ox[i] = Io<T>::store(a * v);
      on[i] = Io<T>::store(b * v);
    }
  } else {
    typename Io<T>::S* __restrict__ o = ox ? ox : on;
    const float k = ox ? a : b;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) o[i] = Io<T>::store(k * Io<T>::load(g[i]));
  }
}

// x_t = alpha_ts x_s + sigma_ts noise, float32 math, in x_s's dtype.
at::Tensor renoise(const at::Tensor& x_s, const at::Tensor& noise, const at::Tensor& alpha_ts,
                   const at::Tensor& sigma_ts) {
  check_batch(x_s, "x_s");
  check_like(noise, "noise", x_s, "x_s");
  const int64_t B = x_s.size(0), N = x_s.numel() / B;
  const auto a = coef(alpha_ts, "alpha_ts", B), s = coef(sigma_ts, "sigma_ts", B);
  const at::Tensor X = x_s.contiguous(), E = noise.contiguous();
  at::Tensor out = at::empty_like(X);
  dispatch(X.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto x = raw<T>(X), e = raw<T>(E);
    const auto o = raw_mut<T>(out);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      axpby_block<T>(x + off, e + off, len, float(a[b]), float(s[b]), o + off);
    });
  });
  return out;
}

// Gradients (x_s, noise) of sum(grad * x_t): alpha_ts * grad and sigma_ts * grad, in grad's dtype.
std::tuple<at::Tensor, at::Tensor> renoise_bwd(const at::Tensor& grad, const at::Tensor& alpha_ts,
                                               const at::Tensor& sigma_ts, std::array<bool, 2> needs) {
  check_batch(grad, "grad");
  const int64_t B = grad.size(0), N = grad.numel() / B;
  const auto a = coef(alpha_ts, "alpha_ts", B), s = coef(sigma_ts, "sigma_ts", B);
  const at::Tensor G = grad.contiguous();
  at::Tensor gx, gn;
  if (needs[0]) gx = at::empty_like(G);
  if (needs[1]) gn = at::empty_like(G);
  if (!needs[0] && !needs[1]) return {gx, gn};
  dispatch(G.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto g = raw<T>(G);
    const auto ox = raw_mut<T>(gx), on = raw_mut<T>(gn);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      scale2_block<T>(g + off, len, float(a[b]), float(s[b]), ox ? ox + off : nullptr, on ? on + off : nullptr);
    });
  });
  return {gx, gn};
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
  m.def("subinterval_loss_fwd(Tensor pred, Tensor x_s, Tensor noise, Tensor alpha_s, Tensor sigma_s, "
        "Tensor alpha_t, Tensor sigma_t, float clamp_max, str prediction) -> Tensor");
  m.def("subinterval_loss_bwd(Tensor grad, Tensor pred, Tensor x_s, Tensor noise, Tensor alpha_s, "
        "Tensor sigma_s, Tensor alpha_t, Tensor sigma_t, float clamp_max, str prediction, bool[3] needs) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("dmd_loss_fwd(Tensor x, Tensor real_cond, Tensor fake, Tensor? real_uncond, float scale, "
        "Tensor? weight, str form, float min_norm) -> (Tensor, Tensor)");
  m.def("dmd_loss_bwd(Tensor grad, Tensor x, Tensor real_cond, Tensor fake, Tensor? real_uncond, float scale, "
        "Tensor? weight, str form, float min_norm, Tensor? norm) -> Tensor");
  m.def("renoise(Tensor x_s, Tensor noise, Tensor alpha_ts, Tensor sigma_ts) -> Tensor");
  m.def("renoise_bwd(Tensor grad, Tensor alpha_ts, Tensor sigma_ts, bool[2] needs) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(pdmd_native, CPU, m) {
  m.impl("subinterval_loss_fwd", &subinterval_loss_fwd);
  m.impl("subinterval_loss_bwd", &subinterval_loss_bwd);
  m.impl("dmd_loss_fwd", &dmd_loss_fwd);
  m.impl("dmd_loss_bwd", &dmd_loss_bwd);
  m.impl("renoise", &renoise);
  m.impl("renoise_bwd", &renoise_bwd);
}
