// CPU implementation of pdmd_kernels' renoise, registered as torch.library ops `pdmd_native::*`
// (a fragment: the library is declared in pdmd_native.cpp). Design notes: common.h.
// Semantics: kernels/pdmd_kernels/reference.py and kernels/pdmd_kernels/ops/<op>.py.
#include "common.h"

namespace {

// ---------------------------------------------------------------- renoise
template <int ISA> struct RenoiseKernels;  // the block kernels, one specialisation per instruction set
#define PDMD_KERNELS "renoise.kernels.h"
#include "isa_instances.h"

// x_t = alpha_ts x_s + sigma_ts noise, float32 math, in x_s's dtype.
at::Tensor renoise(const at::Tensor& x_s, const at::Tensor& noise, const at::Tensor& alpha_ts,
                   const at::Tensor& sigma_ts) {
  check_batch(x_s, "x_s");
  check_like(noise, "noise", x_s, "x_s");
  const int64_t B = x_s.size(0), N = x_s.numel() / B;
  const auto a = coef(alpha_ts, "alpha_ts", B), s = coef(sigma_ts, "sigma_ts", B);
  const at::Tensor X = x_s.contiguous(), E = noise.contiguous();
  at::Tensor out = fresh_like(X);
  dispatch(X.scalar_type(), [&](auto tag) { with_isa([&](auto isa) {
    using T = decltype(tag);
    using K = RenoiseKernels<decltype(isa)::value>;
    const auto x = raw<T>(X), e = raw<T>(E);
    const auto o = raw_mut<T>(out);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      K::template axpby_block<T>(x + off, e + off, len, float(a[b]), float(s[b]), o + off);
    });
  }); });
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
  if (needs[0]) gx = fresh_like(G);
  if (needs[1]) gn = fresh_like(G);
  if (!needs[0] && !needs[1]) return {gx, gn};
  dispatch(G.scalar_type(), [&](auto tag) { with_isa([&](auto isa) {
    using T = decltype(tag);
    using K = RenoiseKernels<decltype(isa)::value>;
    const auto g = raw<T>(G);
    const auto ox = raw_mut<T>(gx), on = raw_mut<T>(gn);
    for_blocks(B, N, [&](int64_t b, int64_t off, int64_t len, int64_t) {
      K::template scale2_block<T>(g + off, len, float(a[b]), float(s[b]), ox ? ox + off : nullptr, on ? on + off : nullptr);
    });
  }); });
  return {gx, gn};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdmd_native, m) {
  m.def("renoise(Tensor x_s, Tensor noise, Tensor alpha_ts, Tensor sigma_ts) -> Tensor");
  m.def("renoise_bwd(Tensor grad, Tensor alpha_ts, Tensor sigma_ts, bool[2] needs) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pdmd_native, CPU, m) {
  m.impl("renoise", &renoise);
  m.impl("renoise_bwd", &renoise_bwd);
}
