// Block kernels of renoise, one copy per instruction set: included by renoise.cpp through
// isa_instances.h, which defines PDMD_ISA. Arithmetic only (raw pointers, float32).
template <> struct RenoiseKernels<PDMD_ISA> {
  template <typename T> using S = typename Io<T>::S;

  // out = a * x + b * y
  template <typename T>
  static void axpby_block(const S<T>* __restrict__ x, const S<T>* __restrict__ y, int64_t len, float a, float b,
                          S<T>* __restrict__ out) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = Io<T>::store(a * Io<T>::load(x[i]) + b * Io<T>::load(y[i]));
  }

  // ox = a * g, on = b * g (either may be null)
  template <typename T>
  static void scale2_block(const S<T>* __restrict__ g, int64_t len, float a, float b, S<T>* __restrict__ ox,
                           S<T>* __restrict__ on) {
    if (ox && on) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float v = Io<T>::load(g[i]);
        ox[i] = Io<T>::store(a * v);
        on[i] = Io<T>::store(b * v);
      }
    } else {
      S<T>* __restrict__ o = ox ? ox : on;
      const float k = ox ? a : b;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) o[i] = Io<T>::store(k * Io<T>::load(g[i]));
    }
  }
};
