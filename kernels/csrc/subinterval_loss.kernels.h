// Block kernels of subinterval_loss (and the backward's in-place scaling), one copy per instruction set:
// included by subinterval_loss.cpp through isa_instances.h, which defines PDMD_ISA. Arithmetic only (raw
// pointers, float32); the tensors, checks and the parallel loop are in subinterval_loss.cpp.
template <> struct SubKernels<PDMD_ISA> {
  template <typename T> using S = typename Io<T>::S;

// the residual at element i: r = st * pred - a * noise - b * x_s
#define PDMD_R(p, x, n, c) (c.st * Io<T>::load(p[i]) - c.a * Io<T>::load(n[i]) - c.b * Io<T>::load(x[i]))

  template <typename T>
  static float residual_sq_sum(const S<T>* __restrict__ p, const S<T>* __restrict__ x, const S<T>* __restrict__ n,
                               int64_t len, SubCoef c) {
    return lane_sums<1>(len, [&](int64_t i, float* t) {
      const float r = PDMD_R(p, x, n, c);
      t[0] = r * r;
    })[0];
  }

  template <typename T>
  static void grad_block(const S<T>* __restrict__ p, const S<T>* __restrict__ x, const S<T>* __restrict__ n,
                         int64_t len, SubCoef c, float kp, float kx, float kn, S<T>* __restrict__ gp,
                         S<T>* __restrict__ gx, S<T>* __restrict__ gn) {
    // One loop per combination actually asked for, so an unneeded gradient costs no store.
    if (gp && gx && gn) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float r = PDMD_R(p, x, n, c);
        gp[i] = Io<T>::store(kp * r); gx[i] = Io<T>::store(kx * r); gn[i] = Io<T>::store(kn * r);
      }
    } else if (gp && !gx && !gn) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) gp[i] = Io<T>::store(kp * PDMD_R(p, x, n, c));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const float r = PDMD_R(p, x, n, c);
        if (gp) gp[i] = Io<T>::store(kp * r);
        if (gx) gx[i] = Io<T>::store(kx * r);
        if (gn) gn[i] = Io<T>::store(kn * r);
      }
    }
  }

  // The training path's block: returns the block's square sum (residual_sq_sum's lanes: the loss is
  // bit-identical to the forward op's) and stores the gradients asked for (null pointers: not asked).
  template <typename T>
  static float train_block(const S<T>* __restrict__ p, const S<T>* __restrict__ x, const S<T>* __restrict__ n,
                           int64_t len, SubCoef c, float kp, float kx, float kn, S<T>* __restrict__ gp,
                           S<T>* __restrict__ gx, S<T>* __restrict__ gn) {
    // the common case (the fake-score update) in float32: one loop, sum and store together. Not for
    // 16-bit types: GCC does not vectorise the rounding store inside the lane loop (measured 1.3x slower).
    if (std::is_same_v<T, float> && gp && !gx && !gn) {
      return lane_sums<1>(len, [&](int64_t i, float* t) {
        const float r = PDMD_R(p, x, n, c);
        t[0] = r * r;
        gp[i] = Io<T>::store(kp * r);
      })[0];
    }
    const float s = residual_sq_sum<T>(p, x, n, len, c);
    // the block is still in cache: this second loop reads no memory again
    if (gp || gx || gn) grad_block<T>(p, x, n, len, c, kp, kx, kn, gp, gx, gn);
    return s;
  }
#undef PDMD_R

  // v[i] = k * v[i] in float32 math, in v's dtype
  template <typename T> static void scale_block(S<T>* __restrict__ v, int64_t len, float k) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) v[i] = Io<T>::store(k * Io<T>::load(v[i]));
  }

  // out[i] = k * v[i] in float32 math, in v's dtype
  template <typename T>
  static void scale_to_block(const S<T>* __restrict__ v, int64_t len, float k, S<T>* __restrict__ out) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[i] = Io<T>::store(k * Io<T>::load(v[i]));
  }
};
