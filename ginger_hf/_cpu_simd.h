// SIMD on float vectors of W lanes (GCC/Clang vector extensions), the bfloat16 conversions, and the
// loads that bring a block's elements into float. Included by _cpu_passes.h.
#pragma once
#include <cstdint>
#include <cstring>

namespace {

constexpr int W = 16;  // vector width in floats
typedef float vf __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef double vd __attribute__((vector_size(W / 2 * 8)));
typedef float vf8 __attribute__((vector_size(W / 2 * 4)));
constexpr int WD = W / 2;  // doubles per vector

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline double hsum(vf v) {  // pairwise: short dependency chain, smaller rounding error
  float t[W]; std::memcpy(t, &v, sizeof v);
  for (int h = W / 2; h > 0; h /= 2) for (int i = 0; i < h; ++i) t[i] += t[i + h];
  return t[0];
}
inline double hsum(vd v) {
  double t[W / 2]; std::memcpy(t, &v, sizeof v);
  double s = 0; for (int i = 0; i < W / 2; ++i) s += t[i];
  return s;
}
// The halves of a float vector, widened to double.
inline void halves(vf v, vd& lo, vd& hi) {
  vf8 a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, (const char*)&v + sizeof a, sizeof b);
  lo = __builtin_convertvector(a, vd);
  hi = __builtin_convertvector(b, vd);
}
// Squares of a float vector summed in double: exact products, no overflow for any finite float.
inline vd sq2(vf a, vf b) {
  vd x0, x1, y0, y1;
  halves(a, x0, x1);
  halves(b, y0, y1);
  return x0 * y0 + x1 * y1;
}
// Ends x's expression here: its product cannot be fused into the next addition, so the compiler fuses the
// other one. Pins the rounding of a + b * c + d * e (which product shares the addition's rounding) to one
// choice on every build (fused multiply-adds round once).
inline void round_here(vf& x) {
#if defined(__x86_64__)
  asm("" : "+v"(x));
#else
  asm("" : "+m"(x));
#endif
}
inline vu round_bf16_bits(vf x) {  // round to nearest even bfloat16: the high 16 bits
  vu b = (vu)x;
  return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}
inline vf round_bf16(vf x) { return (vf)(round_bf16_bits(x) << 16); }

struct bf16 { uint16_t bits; };
template <class T> constexpr bool is_bf16() { return sizeof(T) == 2; }

// Bring L elements into float (the tensor itself when possible), zero-padded to a multiple of W.
inline const float* src(const float* p, float* buf, int64_t L) {
  if (L % W == 0) return p;
  std::memcpy(buf, p, L * 4);
  for (int64_t i = L; i < (L + W - 1) / W * W; ++i) buf[i] = 0.f;
  return buf;
}
inline const float* src(const bf16* p, float* buf, int64_t L) {
  int64_t x = 0;
  for (; x + W <= L; x += W) {
    vh h; std::memcpy(&h, p + x, sizeof h);
    st(buf + x, (vf)(__builtin_convertvector(h, vu) << 16));
  }
  for (; x < L; ++x) { uint32_t u = uint32_t(p[x].bits) << 16; std::memcpy(buf + x, &u, 4); }
  for (; x < (L + W - 1) / W * W; ++x) buf[x] = 0.f;
  return buf;
}
// Where to compute an output of L elements (the tensor itself when possible), then write it back.
inline float* dst(float* p, float* buf, int64_t L) { return L % W == 0 ? p : buf; }
inline float* dst(bf16*, float* buf, int64_t) { return buf; }
inline void flush(float* p, const float* buf, int64_t L) { if (p != buf) std::memcpy(p, buf, L * 4); }
inline void flush(bf16* p, const float* buf, int64_t L) {
  int64_t x = 0;
  for (; x + W <= L; x += W) {
    vh h = __builtin_convertvector(round_bf16_bits(ld(buf + x)), vh);
    std::memcpy(p + x, &h, sizeof h);
  }
  for (; x < L; ++x) {
    uint32_t u; std::memcpy(&u, buf + x, 4);
    p[x].bits = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

// torch.lerp(m, g, w1) in float (its two formulas), rounded like the state dtype.
template <class S>
inline vf lerp(vf m, vf g, float w1) {
  vf r = w1 < 0.5f ? m + splat(w1) * (g - m) : g - splat(1.f - w1) * (g - m);
  return is_bf16<S>() ? round_bf16(r) : r;
}

// The refresh sums need exact products: r^2 = c.c - |k|^2 cancels when c lies near span(U), so the
// Gram and U c are formed from float inputs widened to double (float x float is exact in double).
inline vd ldd(const double* p) { vd v; std::memcpy(&v, p, sizeof v); return v; }
inline void widen(const float* in, double* out, int64_t Lp) {
  for (int64_t x = 0; x < Lp; x += W) {
    vd a, b;
    halves(ld(in + x), a, b);
    std::memcpy(out + x, &a, sizeof a);
    std::memcpy(out + x + WD, &b, sizeof b);
  }
}
inline double hsumd(vd v) { return hsum(v); }

}  // namespace
