// Block kernels of dmd_loss, one copy per instruction set: included by dmd_loss.cpp through
// isa_instances.h, which defines PDMD_ISA. Arithmetic only (raw pointers, float32); the tensors,
// checks and the parallel loop are in dmd_loss.cpp. The uncond pointer u may be null (template HasU).
template <> struct DmdKernels<PDMD_ISA> {
  template <typename T> using S = typename Io<T>::S;

// The guided teacher prediction at element i.
#define PDMD_REAL (HasU ? Io<T>::load(u[i]) + scale * (Io<T>::load(c[i]) - Io<T>::load(u[i])) : Io<T>::load(c[i]))

  template <typename T, bool HasU>
  static float theory_sq_sum(const S<T>* __restrict__ c, const S<T>* __restrict__ u, const S<T>* __restrict__ f,
                             int64_t len, float scale, float w) {
    return lane_sums<1>(len, [&](int64_t i, float* t) {
      const float g = w * (PDMD_REAL - Io<T>::load(f[i]));
      t[0] = g * g;
    })[0];
  }

  // (sum |x - real|, sum over finite d of d^2) with d = fake - real.
  template <typename T, bool HasU>
  static std::pair<float, float> normalized_sums(const S<T>* __restrict__ x, const S<T>* __restrict__ c,
                                                 const S<T>* __restrict__ u, const S<T>* __restrict__ f, int64_t len,
                                                 float scale, bool with_d) {
    // s1 by the same loop in both cases: the backward's normaliser equals the forward's bit for bit.
    // Two single sums (a second pass over a block that is still in cache): GCC 12 does not vectorise
    // one loop with two lane accumulators.
    const float s1 = lane_sums<1>(len, [&](int64_t i, float* t) { t[0] = std::fabs(Io<T>::load(x[i]) - PDMD_REAL); })[0];
    if (!with_d) return {s1, 0.f};
    const float s2 = lane_sums<1>(len, [&](int64_t i, float* t) {
      const float d = Io<T>::load(f[i]) - PDMD_REAL;
      // finite d only: d * d for every d, then its bits masked to +0 where d's exponent is all ones.
      // Written as integer arithmetic: with a select (`finite ? d * d : 0`, by a float compare or by
      // is_finite) GCC turned the sum into a conditional add and kept the loop scalar, 3x slower than
      // the other sums (the value is the same either way: +0 added).
      const uint32_t keep = uint32_t((bits(d) & 0x7f800000u) != 0x7f800000u) * 0xffffffffu;
      t[0] = from_bits(bits(d * d) & keep);
    })[0];
    return {s1, s2};
  }

  template <typename T, bool HasU>
  static void grad_block(const S<T>* __restrict__ c, const S<T>* __restrict__ u, const S<T>* __restrict__ f,
                         int64_t len, float scale, bool theory, float k, float gb, S<T>* __restrict__ out) {
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

  // The theory form's training block: the square sum (theory_sq_sum's lanes: the loss is bit-identical
  // to the forward op's) and g = w * (real - fake) stored.
  template <typename T, bool HasU>
  static float theory_train_block(const S<T>* __restrict__ c, const S<T>* __restrict__ u,
                                  const S<T>* __restrict__ f, int64_t len, float scale, float w,
                                  S<T>* __restrict__ out) {
    if (std::is_same_v<T, float>) {  // one loop: sum and store together (float32 only, as in subinterval_loss)
      return lane_sums<1>(len, [&](int64_t i, float* t) {
        const float g = w * (PDMD_REAL - Io<T>::load(f[i]));
        t[0] = g * g;
        out[i] = Io<T>::store(g);
      })[0];
    }
    // 16-bit types: the sum, then the store while the block is in cache
    const float s = theory_sq_sum<T, HasU>(c, u, f, len, scale, w);
    grad_block<T, HasU>(c, u, f, len, scale, true, w, 1.0f, out);
    return s;
  }
#undef PDMD_REAL
};
