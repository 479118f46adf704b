// The streaming passes over one block's elements (ginger_hf/fused.py describes the step): SIMD helpers on
// float vectors of W lanes, the bfloat16 conversions, pass 1 (the sums) and pass 2 (the writes). Within a
// chunk of at most CHUNK elements the passes sweep one basis row at a time (the chunk stays in cache), so
// any rank works with the same code. Pass 1 reads only; pass 2 recomputes the momentum from (m, g) instead of
// reading a stored one. Included by _cpu_kernel.cpp after ginger_interface.h and _cpu_solve.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int W = 16;  // vector width in floats
typedef float vf __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef double vd __attribute__((vector_size(W / 2 * 8)));
typedef float vf8 __attribute__((vector_size(W / 2 * 4)));

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
// Squares of a float vector summed in double: exact products, no overflow for any finite float.
inline vd sq2(vf a, vf b) {
  vf8 a0, a1, b0, b1;
  std::memcpy(&a0, &a, sizeof a0); std::memcpy(&a1, (const char*)&a + sizeof a0, sizeof a1);
  std::memcpy(&b0, &b, sizeof b0); std::memcpy(&b1, (const char*)&b + sizeof b0, sizeof b1);
  vd x0 = __builtin_convertvector(a0, vd), x1 = __builtin_convertvector(a1, vd);
  vd y0 = __builtin_convertvector(b0, vd), y1 = __builtin_convertvector(b1, vd);
  return x0 * y0 + x1 * y1;
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

// One block: k elements; basis row j at U + j * ustride; refresh: curvature vector given; ahead: how far
// past each chunk to ask memory for the data of later work (0: leave it to the hardware).
struct Block {
  int64_t k, refresh, ustride, ahead;
};

// Ask for the lines of [p, p + bytes) ahead of their use, into L2 (write: they will be written). A row
// block's data lies in n + 4 streams far apart, each too short for the hardware prefetchers to run ahead:
// the whole step asks for the next block's chunk while it works on this one's.
constexpr int kCacheLine = 64;
inline void prefetch(const void* p, int64_t bytes, bool write) {
  const char* c = (const char*)p;
  for (int64_t x = 0; x < bytes; x += kCacheLine) {
    if (write) __builtin_prefetch(c + x, 1, 2);
    else __builtin_prefetch(c + x, 0, 2);
  }
}
std::vector<Block> block_rows(int nb, const int64_t* rows) {  // from BlockRow rows
  std::vector<Block> out(nb);
  for (int i = 0; i < nb; ++i, rows += BlockRow::count)
    out[i] = {rows[BlockRow::k], rows[BlockRow::refresh], rows[BlockRow::ustride]};
  return out;
}

constexpr int64_t CHUNK = 2048;  // elements per chunk: n + 6 rows of it stay in cache

struct Scratch {
  std::vector<float> v;
  explicit Scratch(int rows) : v((size_t)rows * CHUNK + W) {}
  float* at(int i) { return v.data() + (size_t)i * CHUNK; }
};

// The refresh sums need exact products: r^2 = c.c - |k|^2 cancels when c lies near span(U), so the
// Gram and U c are formed from float inputs widened to double (float x float is exact in double).
constexpr int WD = W / 2;  // doubles per vector
inline vd ldd(const double* p) { vd v; std::memcpy(&v, p, sizeof v); return v; }
inline void widen(const float* in, double* out, int64_t Lp) {
  for (int64_t x = 0; x < Lp; x += W) {
    vf v = ld(in + x);
    vf8 lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, (const char*)&v + sizeof lo, sizeof hi);
    vd a = __builtin_convertvector(lo, vd), b = __builtin_convertvector(hi, vd);
    std::memcpy(out + x, &a, sizeof a);
    std::memcpy(out + x + WD, &b, sizeof b);
  }
}
inline double hsumd(vd v) { return hsum(v); }

// Gram entries G[i][j] (i <= j) of rows u[i0..i0+NI) x u[j0..j0+NJ) over Lp elements, in double.
template <int NI, int NJ>
void gram_tile(const double* const* u, int i0, int j0, int64_t Lp, double* G, int n) {
  vd acc[NI][NJ] = {};
  for (int64_t x = 0; x < Lp; x += WD) {
    vd a[NI], b[NJ];
    for (int i = 0; i < NI; ++i) a[i] = ldd(u[i0 + i] + x);
    for (int j = 0; j < NJ; ++j) b[j] = ldd(u[j0 + j] + x);
    for (int i = 0; i < NI; ++i) for (int j = 0; j < NJ; ++j) acc[i][j] += a[i] * b[j];
  }
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j)
      if (i0 + i <= j0 + j) G[(i0 + i) * n + j0 + j] += hsumd(acc[i][j]);
}
template <int NI>
void gram_row(const double* const* u, int i0, int n, int64_t Lp, double* G) {
  for (int j0 = i0; j0 < n; j0 += 4) {
    switch (n - j0 >= 4 ? 4 : n - j0) {
      case 4: gram_tile<NI, 4>(u, i0, j0, Lp, G, n); break;
      case 3: gram_tile<NI, 3>(u, i0, j0, Lp, G, n); break;
      case 2: gram_tile<NI, 2>(u, i0, j0, Lp, G, n); break;
      default: gram_tile<NI, 1>(u, i0, j0, Lp, G, n); break;
    }
  }
}
void gram(const double* const* u, int n, int64_t Lp, double* G) {
  for (int i0 = 0; i0 < n; i0 += 4) {
    switch (n - i0 >= 4 ? 4 : n - i0) {
      case 4: gram_row<4>(u, i0, n, Lp, G); break;
      case 3: gram_row<3>(u, i0, n, Lp, G); break;
      case 2: gram_row<2>(u, i0, n, Lp, G); break;
      default: gram_row<1>(u, i0, n, Lp, G); break;
    }
  }
}
inline double dot(const float* a, const float* b, int64_t Lp) {
  vf acc = vf{};
  for (int64_t x = 0; x < Lp; x += W) acc += ld(a + x) * ld(b + x);
  return hsum(acc);
}
inline double dotd(const double* a, const double* b, int64_t Lp) {
  vd acc = vd{};
  for (int64_t x = 0; x < Lp; x += WD) acc += ldd(a + x) * ldd(b + x);
  return hsumd(acc);
}

// Pass 1 on elements [x0, x1) of one block; reads only. With mv = lerp(m, g, w1) it adds
// U m', m'.m', g.g and, on refresh, the Gram U U^T (upper triangle), U c, c.c, c.m' to out.
template <class S, class P>
void pass1(int n, const Block& b, const S* U, const S* m, const P* g, const P* c, float w1, int64_t x0,
           int64_t x1, double* out, const StatsView& sv, Scratch& sc, std::vector<double>& wide) {
  const bool R = b.refresh;
  double cc = 0, cm = 0, mm = 0, gg = 0;
  const float* u[kMaxRank];
  const double* ud[kMaxRank];
  for (int64_t xb = x0; xb < x1; xb += CHUNK) {
    const int64_t L = xb + CHUNK < x1 ? CHUNK : x1 - xb, Lp = (L + W - 1) / W * W;
    if (b.ahead) {
      for (int j = 0; j < n; ++j) prefetch(U + j * b.ustride + xb + b.ahead, L * sizeof(S), R);
      prefetch(m + xb + b.ahead, L * sizeof(S), true);
      prefetch(g + xb + b.ahead, L * sizeof(P), false);
      if (R) prefetch(c + xb + b.ahead, L * sizeof(P), false);
    }
    for (int j = 0; j < n; ++j) u[j] = src(U + j * b.ustride + xb, sc.at(j), L);
    const float* mi = src(m + xb, sc.at(n), L);
    const float* gi = src(g + xb, sc.at(n + 1), L);
    const float* ci = R ? src(c + xb, sc.at(n + 2), L) : nullptr;
    float* mv = sc.at(n + 3);
    vd amm = vd{}, agg = vd{}, acc = vd{};
    vf acm = vf{};
    for (int64_t x = 0; x < Lp; x += W) {
      vf mx = lerp<S>(ld(mi + x), ld(gi + x), w1), gx = ld(gi + x);
      st(mv + x, mx);
      amm += sq2(mx, mx);
      agg += sq2(gx, gx);
      if (R) { vf cx = ld(ci + x); acc += sq2(cx, cx); acm += cx * mx; }
    }
    mm += hsum(amm); gg += hsum(agg);
    if (R) { cc += hsum(acc); cm += hsum(acm); }
    for (int j = 0; j < n; ++j) out[sv.um + j] += dot(u[j], mv, Lp);
    if (R) {
      double* cd = wide.data() + (size_t)n * CHUNK;
      widen(ci, cd, Lp);
      for (int j = 0; j < n; ++j) {
        double* row = wide.data() + (size_t)j * CHUNK;
        widen(u[j], row, Lp);
        ud[j] = row;
        out[sv.uc + j] += dotd(row, cd, Lp);
      }
      gram(ud, n, Lp, out + sv.gram);
    }
  }
  out[sv.mm] += mm; out[sv.gg] += gg;
  if (R) { out[sv.cc] += cc; out[sv.cm] += cm; }
}

// Pass 2 on [x0, x1): m <- lerp(m, g, w1); v = v_u.U + v_c c (refresh); u = scale (m - a.U + along v),
// clipped to [-rho, rho]; p <- p * decay - lr * u; on refresh U <- U - shift v^T (a rank-one reflection).
// Returns how many coordinates the clip cut.
template <class S, class P>
int64_t pass2(int n, const Block& b, S* U, S* m, const P* g, P* p, const P* c, float w1, const float* coef,
              const CoefView& cv, int64_t x0, int64_t x1, Scratch& sc) {
  const bool R = b.refresh;
  const vf scale = splat(coef[cv.scale]), along = splat(coef[cv.along]), nlr = splat(-coef[cv.lr]);
  const vf decay = splat(coef[cv.decay]), rho = splat(coef[cv.rho]), nrho = splat(-coef[cv.rho]);
  const vf v_c = splat(coef[cv.v_c]);
  const bool do_decay = coef[cv.decay] != 1.f;
  int64_t clipped = 0;
  for (int64_t xb = x0; xb < x1; xb += CHUNK) {
    const int64_t L = xb + CHUNK < x1 ? CHUNK : x1 - xb, Lp = (L + W - 1) / W * W;
    const float* mi = src(m + xb, sc.at(0), L);
    const float* gi = src(g + xb, sc.at(1), L);
    if (b.ahead) prefetch(p + xb + b.ahead, L * sizeof(P), true);
    const float* pi = src(p + xb, sc.at(2), L);
    const float* ci = R ? src(c + xb, sc.at(3), L) : nullptr;
    float* dir = sc.at(4);
    float* v = sc.at(5);
    float* ubuf = sc.at(6);
    for (int64_t x = 0; x < Lp; x += W) {
      st(dir + x, lerp<S>(ld(mi + x), ld(gi + x), w1));
      if (R) st(v + x, v_c * ld(ci + x));
    }
    float* mo = dst(m + xb, sc.at(0), L);
    for (int64_t x = 0; x < Lp; x += W) st(mo + x, ld(dir + x));  // m' (before dir changes)
    flush(m + xb, mo, L);
    for (int j = 0; j < n; ++j) {
      const float* uj = src(U + j * b.ustride + xb, ubuf, L);
      const vf a = splat(coef[cv.shrink + j]), v_u = splat(coef[cv.v_u + j]);
      for (int64_t x = 0; x < Lp; x += W) {
        vf ux = ld(uj + x);
        st(dir + x, ld(dir + x) - a * ux);
        if (R) st(v + x, ld(v + x) + v_u * ux);
      }
    }
    float* po = dst(p + xb, sc.at(2), L);
    vu nclip = vu{};
    for (int64_t x = 0; x < Lp; x += W) {
      vf d = ld(dir + x);
      if (R) d += along * ld(v + x);
      d *= scale;
      vu cut = (vu)(d > rho) | (vu)(d < nrho);
      nclip += cut & 1u;
      d = d > rho ? rho : d;
      d = d < nrho ? nrho : d;
      vf pv = ld(pi + x);
      if (is_bf16<P>()) d = round_bf16(d);
      if (do_decay) { pv *= decay; if (is_bf16<P>()) pv = round_bf16(pv); }
      st(po + x, pv + nlr * d);
    }
    {
      uint32_t t[W]; std::memcpy(t, &nclip, sizeof t);
      for (int i = 0; i < W; ++i) clipped += t[i];  // padding is 0 there, never cut
    }
    flush(p + xb, po, L);
    if (R) {
      for (int j = 0; j < n; ++j) {
        S* Uj = U + j * b.ustride + xb;
        const float* uj = src(Uj, ubuf, L);
        float* uo = dst(Uj, ubuf, L);
        const vf shift = splat(coef[cv.shift + j]);
        for (int64_t x = 0; x < Lp; x += W) st(uo + x, ld(uj + x) - shift * ld(v + x));
        flush(Uj, uo, L);
      }
    }
  }
  return clipped;
}

}  // namespace
