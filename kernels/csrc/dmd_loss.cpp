// CPU implementation of pdmd_kernels' dmd_loss, registered as torch.library ops `pdmd_native::*`
// (a fragment: the library is declared in pdmd_native.cpp). Design notes: common.h.
// Semantics: kernels/pdmd_kernels/reference.py and kernels/pdmd_kernels/ops/<op>.py.
#include "common.h"

namespace {

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

template <int ISA> struct DmdKernels;  // the block kernels, one specialisation per instruction set
#define PDMD_KERNELS "dmd_loss.kernels.h"
#include "isa_instances.h"

// for the inputs' dtype, whether uncond is given and the active instruction set:
// Calls f(T{}, std::bool_constant<HasU>{}, std::integral_constant<int, ISA>{}) (the active instruction set).
template <typename F> void dispatch_dmd(const DmdIn& in, F&& f) {
  dispatch(in.X.scalar_type(), [&](auto tag) {
    with_isa([&](auto isa) {
      if (in.U.defined()) f(tag, std::true_type{}, isa);
      else f(tag, std::false_type{}, isa);
    });
  });
}

// Per-sample clamped normaliser max(mean|x - real|, min_norm) (and, if asked, sum of finite d^2).
std::vector<double> dmd_norm(const DmdIn& in, const std::vector<double>& scale, double min_norm,
                             std::vector<double>* dsq) {
  std::vector<double> p1, p2;
  int64_t nblk = 0;
  dispatch_dmd(in, [&](auto tag, auto has_u, auto isa) {
    using T = decltype(tag);
    constexpr bool HasU = decltype(has_u)::value;
    using K = DmdKernels<decltype(isa)::value>;
    const auto x = raw<T>(in.X), c = raw<T>(in.C), f = raw<T>(in.F);
    const auto u = HasU ? raw<T>(in.U) : nullptr;
    const int64_t n = in.B * std::max<int64_t>(1, (in.N + kBlock - 1) / kBlock);
    p1.assign(n, 0.0);
    p2.assign(n, 0.0);
    nblk = for_blocks(in.B, in.N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      const auto s = K::template normalized_sums<T, HasU>(x + off, c + off, HasU ? u + off : nullptr, f + off, len,
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
  dispatch_dmd(in, [&](auto tag, auto has_u, auto isa) {
    using T = decltype(tag);
    constexpr bool HasU = decltype(has_u)::value;
    using K = DmdKernels<decltype(isa)::value>;
    const auto c = raw<T>(in.C), f = raw<T>(in.F);
    const auto u = HasU ? raw<T>(in.U) : nullptr;
    partial.assign(in.B * std::max<int64_t>(1, (in.N + kBlock - 1) / kBlock), 0.0);
    nblk = for_blocks(in.B, in.N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      partial[task] = K::template theory_sq_sum<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale[b]), w[b]);
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
  at::Tensor out = fresh_like(in.X);
  dispatch_dmd(in, [&](auto tag, auto has_u, auto isa) {
    using T = decltype(tag);
    constexpr bool HasU = decltype(has_u)::value;
    using K = DmdKernels<decltype(isa)::value>;
    const auto c = raw<T>(in.C), f = raw<T>(in.F);
    const auto u = HasU ? raw<T>(in.U) : nullptr;
    const auto o = raw_mut<T>(out);
    for_blocks(in.B, in.N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      const float k = in.theory ? float(g[b] * w[b]) : float(1.0 / nrm[b]);
      K::template grad_block<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale[b]), in.theory, k,
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
  at::Tensor out = fresh_like(in.X);
  int64_t nblk = 0;
  dispatch_dmd(in, [&](auto tag, auto has_u, auto isa) {
    using T = decltype(tag);
    constexpr bool HasU = decltype(has_u)::value;
    using K = DmdKernels<decltype(isa)::value>;
    const auto c = raw<T>(in.C), f = raw<T>(in.F);
    const auto u = HasU ? raw<T>(in.U) : nullptr;
    const auto o = raw_mut<T>(out);
    partial.assign(in.B * std::max<int64_t>(1, (in.N + kBlock - 1) / kBlock), 0.0);
    nblk = for_blocks(in.B, in.N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      if (in.theory) {
        partial[task] = K::template theory_train_block<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len,
                                                                float(scale[b]), w[b], o + off);
      } else {
        K::template grad_block<T, HasU>(c + off, HasU ? u + off : nullptr, f + off, len, float(scale[b]), false,
                                        float(1.0 / nrm[b]), 1.0f, o + off);
      }
    });
  });
  if (in.theory) {
    loss = per_sample(partial, in.B, nblk);
    for (auto& v : loss) v *= 0.5;
    return {float_vector(loss), at::empty({0}, at::TensorOptions().dtype(at::kFloat)), out};
  }
  return {float_vector(loss), float_vector(nrm), out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdmd_native, m) {
  m.def("dmd_loss_fwd(Tensor x, Tensor real_cond, Tensor fake, Tensor? real_uncond, Tensor scale, "
        "Tensor? weight, str form, float min_norm) -> (Tensor, Tensor)");
  m.def("dmd_loss_bwd(Tensor grad, Tensor x, Tensor real_cond, Tensor fake, Tensor? real_uncond, Tensor scale, "
        "Tensor? weight, str form, float min_norm, Tensor? norm) -> Tensor");
  m.def("dmd_loss_train(Tensor x, Tensor real_cond, Tensor fake, Tensor? real_uncond, Tensor scale, "
        "Tensor? weight, str form, float min_norm) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pdmd_native, CPU, m) {
  m.impl("dmd_loss_fwd", &dmd_loss_fwd);
  m.impl("dmd_loss_bwd", &dmd_loss_bwd);
  m.impl("dmd_loss_train", &dmd_loss_train);
}
