// CPU implementation of pdmd_kernels' subinterval_loss (and the in-place backward scaling shared with dmd_loss), registered as torch.library ops `pdmd_native::*`
// (a fragment: the library is declared in pdmd_native.cpp). Design notes: common.h.
// Semantics: kernels/pdmd_kernels/reference.py and kernels/pdmd_kernels/ops/<op>.py.
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

template <int ISA> struct SubKernels;  // the block kernels, one specialisation per instruction set
#define PDMD_KERNELS "subinterval_loss.kernels.h"
#include "isa_instances.h"

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
  dispatch(pred.scalar_type(), [&](auto tag) { with_isa([&](auto isa) {
    using T = decltype(tag);
    using K = SubKernels<decltype(isa)::value>;
    const auto p = raw<T>(P), x = raw<T>(X), e = raw<T>(E);
    partial.assign(B * std::max<int64_t>(1, (N + kBlock - 1) / kBlock), 0.0);
    nblk = for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      partial[task] = K::template residual_sq_sum<T>(p + off, x + off, e + off, len, c[b]);
    });
  }); });
  auto sums = per_sample(partial, B, nblk);
  for (int64_t b = 0; b < B; ++b) sums[b] = c[b].w * sums[b] / double(N);
  return float_vector(sums);
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
  if (needs[0]) gp = fresh_like(P);
  if (needs[1]) gx = fresh_like(X);
  if (needs[2]) gn = fresh_like(E);
  if (!needs[0] && !needs[1] && !needs[2]) return {gp, gx, gn};
  dispatch(pred.scalar_type(), [&](auto tag) { with_isa([&](auto isa) {
    using T = decltype(tag);
    using K = SubKernels<decltype(isa)::value>;
    const auto p = raw<T>(P), x = raw<T>(X), e = raw<T>(E);
    const auto op = raw_mut<T>(gp), ox = raw_mut<T>(gx), oe = raw_mut<T>(gn);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      const double k = 2.0 * g[b] * c[b].w / double(N);
      K::template grad_block<T>(p + off, x + off, e + off, len, c[b], float(k * c[b].st), float(-k * c[b].b),
                                float(-k * c[b].a), op ? op + off : nullptr, ox ? ox + off : nullptr,
                                oe ? oe + off : nullptr);
    });
  }); });
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
  if (needs[0]) gp = fresh_like(P);
  if (needs[1]) gx = fresh_like(X);
  if (needs[2]) gn = fresh_like(E);
  std::vector<double> partial;
  int64_t nblk = 0;
  dispatch(pred.scalar_type(), [&](auto tag) { with_isa([&](auto isa) {
    using T = decltype(tag);
    using K = SubKernels<decltype(isa)::value>;
    const auto p = raw<T>(P), x = raw<T>(X), e = raw<T>(E);
    const auto op = raw_mut<T>(gp), ox = raw_mut<T>(gx), oe = raw_mut<T>(gn);
    partial.assign(B * std::max<int64_t>(1, (N + kBlock - 1) / kBlock), 0.0);
    nblk = for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t task) {
      const double k = 2.0 * c[b].w / double(N);
      partial[task] = K::template train_block<T>(p + off, x + off, e + off, len, c[b], float(k * c[b].st),
                                                 float(-k * c[b].b), float(-k * c[b].a), op ? op + off : nullptr,
                                                 ox ? ox + off : nullptr, oe ? oe + off : nullptr);
    });
  }); });
  auto sums = per_sample(partial, B, nblk);
  for (int64_t b = 0; b < B; ++b) sums[b] = c[b].w * sums[b] / double(N);
  return {float_vector(sums), gp, gx, gn};
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
  // A row scaled by exactly 1 is left as it is: kf * v == v for every float32 v (and the 16-bit store of
  // it gives back its bits, NaN payloads aside), so the common loss.sum().backward() costs no pass here.
  if (std::all_of(kb.begin(), kb.end(), [](double v) { return float(v) == 1.0f; })) return;
  dispatch(g.scalar_type(), [&](auto tag) { with_isa([&](auto isa) {
    using T = decltype(tag);
    using K = SubKernels<decltype(isa)::value>;
    const auto o = raw_mut<T>(g);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      const float kf = float(kb[b]);
      if (kf != 1.0f) K::template scale_block<T>(o + off, len, kf);
    });
  }); });
}

// k[b] * g[b, :] into a fresh tensor of g's dtype (float32 math, one rounding: as torch's
// (g * k).to(g.dtype)): the backward of a one-pass op when the saved gradient must stay as it is
// (a per-sample incoming gradient, e.g. from loss.mean(), may come again through the same graph).
at::Tensor scale_rows(const at::Tensor& g, const at::Tensor& k) {
  check_batch(g, "g");
  const int64_t B = g.size(0), N = g.numel() / B;
  const auto kb = coef(k, "k", B);
  const at::Tensor G = g.contiguous();
  at::Tensor out = fresh_like(G);
  dispatch(G.scalar_type(), [&](auto tag) { with_isa([&](auto isa) {
    using T = decltype(tag);
    using K = SubKernels<decltype(isa)::value>;
    const auto v = raw<T>(G);
    const auto o = raw_mut<T>(out);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      K::template scale_to_block<T>(v + off, len, float(kb[b]), o + off);
    });
  }); });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdmd_native, m) {
  m.def("subinterval_loss_fwd(Tensor pred, Tensor x_s, Tensor noise, Tensor alpha_s, Tensor sigma_s, "
        "Tensor alpha_t, Tensor sigma_t, float clamp_max, str prediction) -> Tensor");
  m.def("subinterval_loss_bwd(Tensor grad, Tensor pred, Tensor x_s, Tensor noise, Tensor alpha_s, "
        "Tensor sigma_s, Tensor alpha_t, Tensor sigma_t, float clamp_max, str prediction, bool[3] needs) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("subinterval_loss_train(Tensor pred, Tensor x_s, Tensor noise, Tensor alpha_s, Tensor sigma_s, "
        "Tensor alpha_t, Tensor sigma_t, float clamp_max, str prediction, bool[3] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scale_rows_(Tensor(a!) g, Tensor k) -> ()");
  m.def("scale_rows(Tensor g, Tensor k) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdmd_native, CPU, m) {
  m.impl("subinterval_loss_fwd", &subinterval_loss_fwd);
  m.impl("subinterval_loss_bwd", &subinterval_loss_bwd);
  m.impl("subinterval_loss_train", &subinterval_loss_train);
  m.impl("scale_rows_", &scale_rows_);
  m.impl("scale_rows", &scale_rows);
}
