// CPU implementations of the pdmd_kernels loss ops (subinterval_loss, dmd_loss, renoise), registered as torch.library ops `pdmd_native::*`.
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
#include "common.h"

namespace {

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


// The training path in one pass: loss [B] and the gradients of sum_b loss[b] (grad = 1) with respect to
// the inputs asked for in `needs`, reading pred, x_s and noise once. Autograd's backward then only
// scales these by the incoming per-sample gradient. The loss sum runs in the same lanes as
// subinterval_loss_fwd, so the values are bit-identical to it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> subinterval_loss_train(
    const at::Tensor& pred, const at::Tensor& x_s, const at::Tensor& noise, const at::Tensor& alpha_s,
    const at::Tensor& sigma_s, const at::Tensor& alpha_t, const at::Tensor& sigma_t, double clamp_max,
    c10::string_view prediction, std::array<bool, 3> needs) {
  check_batch(pred, "pred");
  check_like(x_s, "x_s", pred, "pred");
  check_like(noise, "noise", pred, "pred");
  const int64_t B = pred.size(0), N = pred.numel() / B;
  const auto c = subinterval_coefs(alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, B);
  const at::Tensor P = pred.contiguous(), X = x_s.contiguous(), E = noise.contiguous();
  at::Tensor gp, gx, gn;
  if (needs[0]) gp = at::empty_like(P);
  if (needs[1]) gx = at::empty_like(X);
  if (needs[2]) gn = at::empty_like(E);
  std::vector<double> partial;
  int64_t nblk = 0;
  dispatch(pred.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto p = raw<T>(P), x = raw<T>(X), e = raw<T>(E);
    const auto op = raw_mut<T>(gp), ox = raw_mut<T>(gx), oe = raw_mut<T>(gn);
    partial.assign(B * std::max<int64_t>(1, (N + kBlock - 1) / kBlock), 0.0);
    nblk = for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      // the common case (the fake-score update) in float32: one loop, sum and store together. Not for 16-bit
      // types: GCC does not vectorise the rounding store inside the lane loop (measured 1.3x slower).
      if (std::is_same_v<T, float> && op && !ox && !oe) {
        const float kp = float(2.0 * c[b].w / double(N) * c[b].st);
        const SubCoef cb = c[b];
        const auto pp = p + off, xx = x + off, ee = e + off;
        const auto o = op + off;
        // the same lanes as residual_sq_sum: the loss is bit-identical to subinterval_loss_fwd's
        partial[task] = lane_sums<1>(len, [&](int64_t i, float* t) {
          const float r = cb.st * Io<T>::load(pp[i]) - cb.a * Io<T>::load(ee[i]) - cb.b * Io<T>::load(xx[i]);
          t[0] = r * r;
          o[i] = Io<T>::store(kp * r);
        })[0];
        return;
      }
      partial[task] = residual_sq_sum<T>(p + off, x + off, e + off, len, c[b]);
      if (op || ox || oe) {  // the block is still in cache: this second loop reads no memory again
        const double k = 2.0 * c[b].w / double(N);
        subinterval_grad_block<T>(p + off, x + off, e + off, len, c[b], float(k * c[b].st), float(-k * c[b].b),
                                  float(-k * c[b].a), op ? op + off : nullptr, ox ? ox + off : nullptr,
                                  oe ? oe + off : nullptr);
      }
    });
  });
  auto sums = per_sample(partial, B, nblk);
  for (int64_t b = 0; b < B; ++b) sums[b] = c[b].w * sums[b] / double(N);
  return {float_vector(sums), gp, gx, gn};
}

// ---------------------------------------------------------------- DMD surrogate loss
// real = uncond + scale[b] * (cond - uncond) (or cond), scale a per-sample [B] tensor (no recompile per value); theory: g = w * (real - fake);
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
std::vector<double> dmd_norm(const DmdIn& in, const std::vector<double>& scale, double min_norm,
                             std::vector<double>* dsq) {
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
    nblk = for_blocks(in.B, in.N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      const auto s = normalized_sums<T, HasU>(x + off, c + off, HasU ? u + off : nullptr, f + off, len,
                                              float(scale[b]), dsq != nullptr);
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
                                                const std::optional<at::Tensor>& real_uncond, const at::Tensor& scale_t,
                                                const std::optional<at::Tensor>& weight, c10::string_view form,
                                                double min_norm) {
  const DmdIn in = dmd_inputs(x, real_cond, fake, real_uncond, form);
  const auto w = dmd_weight(weight, in);
  const auto scale = coef(scale_t, "guidance_scale", in.B);
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
      partial[task] = theory_sq_sum<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale[b]), w[b]);
    });
  });
  auto loss = per_sample(partial, in.B, nblk);
  for (auto& v : loss) v *= 0.5;
  return {float_vector(loss), at::empty({0}, at::TensorOptions().dtype(at::kFloat))};
}

// grad[b] * g in x's dtype; `norm` (from dmd_loss_fwd) skips the normaliser pass of form 'normalized'.
at::Tensor dmd_loss_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& real_cond,
                        const at::Tensor& fake, const std::optional<at::Tensor>& real_uncond, const at::Tensor& scale_t,
                        const std::optional<at::Tensor>& weight, c10::string_view form, double min_norm,
                        const std::optional<at::Tensor>& norm) {
  const DmdIn in = dmd_inputs(x, real_cond, fake, real_uncond, form);
  const auto w = dmd_weight(weight, in);
  const auto scale = coef(scale_t, "guidance_scale", in.B);
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
      dmd_grad_block<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale[b]), in.theory, k,
                              float(g[b]), o + off);
    });
  });
  return out;
}


// The training path: (loss [B], norm [B] or [0], g) with g the gradient of sum_b loss[b], in x's dtype.
// Theory: one pass over cond/uncond/fake per block (the square sum and the store share the block in
// cache). Normalized: the normaliser needs the whole sample first, so one pass for the sums and one
// for g (x is read once).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dmd_loss_train(
    const at::Tensor& x, const at::Tensor& real_cond, const at::Tensor& fake,
    const std::optional<at::Tensor>& real_uncond, const at::Tensor& scale_t,
    const std::optional<at::Tensor>& weight, c10::string_view form, double min_norm) {
  const DmdIn in = dmd_inputs(x, real_cond, fake, real_uncond, form);
  const auto w = dmd_weight(weight, in);
  const auto scale = coef(scale_t, "guidance_scale", in.B);
  std::vector<double> loss(in.B, 0.0), nrm, dsq, partial;
  if (!in.theory) {
    nrm = dmd_norm(in, scale, min_norm, &dsq);
    for (int64_t b = 0; b < in.B; ++b)
      loss[b] = std::isfinite(nrm[b]) ? 0.5 * dsq[b] / (nrm[b] * nrm[b]) : 0.0;
  }
  at::Tensor out = at::empty_like(in.X);
  int64_t nblk = 0;
  dispatch_dmd(in, [&](auto tag, auto has_u) {
    using T = decltype(tag);
    constexpr bool HasU = decltype(has_u)::value;
    const auto c = raw<T>(in.C), f = raw<T>(in.F);
    const auto u = HasU ? raw<T>(in.U) : nullptr;
    const auto o = raw_mut<T>(out);
    partial.assign(in.B * std::max<int64_t>(1, (in.N + kBlock - 1) / kBlock), 0.0);
    nblk = for_blocks(in.B, in.N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      if (std::is_same_v<T, float> && in.theory) {  // one loop: square sum (theory_sq_sum's lanes) and store
        // (float32 only, as in subinterval_loss_train)
        const float sc = float(scale[b]), wb = w[b];
        const auto cc = c + off, uu = HasU ? u + off : nullptr, ff = f + off;
        const auto oo = o + off;
        partial[task] = lane_sums<1>(len, [&](int64_t i, float* t) {
          const float g = wb * ((HasU ? Io<T>::load(uu[i]) + sc * (Io<T>::load(cc[i]) - Io<T>::load(uu[i]))
                                      : Io<T>::load(cc[i])) - Io<T>::load(ff[i]));
          t[0] = g * g;
          oo[i] = Io<T>::store(g);
        })[0];
        return;
      }
      if (in.theory)  // 16-bit types: the sum, then the store while the block is in cache
        partial[task] = theory_sq_sum<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale[b]), w[b]);
      const float k = in.theory ? float(w[b]) : float(1.0 / nrm[b]);
      dmd_grad_block<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale[b]), in.theory, k, 1.0f,
                              o + off);
    });
  });
  if (in.theory) {
    loss = per_sample(partial, in.B, nblk);
    for (auto& v : loss) v *= 0.5;
    return {float_vector(loss), at::empty({0}, at::TensorOptions().dtype(at::kFloat)), out};
  }
  return {float_vector(loss), float_vector(nrm), out};
}

// ---------------------------------------------------------------- backward of the one-pass ops
// g[b, :] *= k[b] in place, float32 math, in g's dtype: what autograd's backward of a one-pass op does
// with its kept gradient (torch's mixed-dtype in-place multiply of a bfloat16 tensor by a float32
// scale is not vectorised on CPU and took longer than the whole forward).
void scale_rows_(at::Tensor g, const at::Tensor& k) {
  check_batch(g, "g");
  TORCH_CHECK_VALUE(g.is_contiguous(), "g must be contiguous");
  const int64_t B = g.size(0), N = g.numel() / B;
  const auto kb = coef(k, "k", B);
  dispatch(g.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const auto o = raw_mut<T>(g);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      const float kf = float(kb[b]);
      auto* __restrict__ v = o + off;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) v[i] = Io<T>::store(kf * Io<T>::load(v[i]));
    });
  });
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

}  // namespace

// A fragment: the library itself (TORCH_LIBRARY) is declared in pdmd_native.cpp with the optimizer ops.
TORCH_LIBRARY_FRAGMENT(pdmd_native, m) {
  m.def("subinterval_loss_fwd(Tensor pred, Tensor x_s, Tensor noise, Tensor alpha_s, Tensor sigma_s, "
        "Tensor alpha_t, Tensor sigma_t, float clamp_max, str prediction) -> Tensor");
  m.def("subinterval_loss_bwd(Tensor grad, Tensor pred, Tensor x_s, Tensor noise, Tensor alpha_s, "
        "Tensor sigma_s, Tensor alpha_t, Tensor sigma_t, float clamp_max, str prediction, bool[3] needs) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("dmd_loss_fwd(Tensor x, Tensor real_cond, Tensor fake, Tensor? real_uncond, Tensor scale, "
        "Tensor? weight, str form, float min_norm) -> (Tensor, Tensor)");
  m.def("dmd_loss_bwd(Tensor grad, Tensor x, Tensor real_cond, Tensor fake, Tensor? real_uncond, Tensor scale, "
        "Tensor? weight, str form, float min_norm, Tensor? norm) -> Tensor");
  m.def("subinterval_loss_train(Tensor pred, Tensor x_s, Tensor noise, Tensor alpha_s, Tensor sigma_s, "
        "Tensor alpha_t, Tensor sigma_t, float clamp_max, str prediction, bool[3] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dmd_loss_train(Tensor x, Tensor real_cond, Tensor fake, Tensor? real_uncond, Tensor scale, "
        "Tensor? weight, str form, float min_norm) -> (Tensor, Tensor, Tensor)");
  m.def("scale_rows_(Tensor(a!) g, Tensor k) -> ()");
  m.def("renoise(Tensor x_s, Tensor noise, Tensor alpha_ts, Tensor sigma_ts) -> Tensor");
  m.def("renoise_bwd(Tensor grad, Tensor alpha_ts, Tensor sigma_ts, bool[2] needs) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pdmd_native, CPU, m) {
  m.impl("subinterval_loss_fwd", &subinterval_loss_fwd);
  m.impl("subinterval_loss_bwd", &subinterval_loss_bwd);
  m.impl("dmd_loss_fwd", &dmd_loss_fwd);
  m.impl("dmd_loss_bwd", &dmd_loss_bwd);
  m.impl("subinterval_loss_train", &subinterval_loss_train);
  m.impl("dmd_loss_train", &dmd_loss_train);
  m.impl("scale_rows_", &scale_rows_);
  m.impl("renoise", &renoise);
  m.impl("renoise_bwd", &renoise_bwd);
}
