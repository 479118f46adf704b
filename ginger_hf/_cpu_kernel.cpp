// Two streaming passes of a Ginger step on CPU (see ginger_hf/fused.py for the math).
// Plain C++17, no torch headers: built once with the system compiler and loaded with ctypes.
// Each pass takes all blocks of one dtype pair at once and splits the total work
// between std::threads, so there is one call per pass, not one per tensor.
//
// Reads cost more than writes here (a core's outstanding misses bound its read bandwidth),
// so the passes read each input once: pass 1 is read-only and also checks finiteness,
// pass 2 recomputes the momentum from (m, g) instead of re-reading a stored one.
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int W = 16;           // vector width in floats
constexpr int64_t B = 4096;     // elements per chunk: float partial sums, then double
constexpr int T = 4;            // rows per register tile of the Gram matrix
typedef float vf __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline double hsum(vf v) {  // pairwise: short dependency chain, smaller rounding error
  float t[W]; std::memcpy(t, &v, sizeof v);
  for (int h = W / 2; h > 0; h /= 2) for (int i = 0; i < h; ++i) t[i] += t[i + h];
  return t[0];
}
inline vu round_bf16_bits(vf x) {  // round to nearest even bfloat16: the high 16 bits
  vu b = (vu)x;
  return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}
inline vf round_bf16(vf x) { return (vf)(round_bf16_bits(x) << 16); }

struct bf16 { uint16_t bits; };

// Bring L elements of a tensor into float (the tensor itself when possible; padded with zeros).
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
template <class T> constexpr bool is_bf16() { return sizeof(T) == 2; }

// torch.lerp(m, g, w1) in float (its two formulas), rounded like the state dtype.
template <class S>
inline vf lerp(vf m, vf g, float w1) {
  vf r = w1 < 0.5f ? m + splat(w1) * (g - m) : g - splat(1.f - w1) * (g - m);
  return is_bf16<S>() ? round_bf16(r) : r;
}

struct Scratch {
  std::vector<float> v;
  explicit Scratch(int n) : v((n + 5) * B + W) {}
  float* at(int i) { return v.data() + i * B; }
};

// Over Lp elements: U c and U m for rows [0, NI) of u, and their Gram tile (upper triangle).
template <int NI, bool R>
void diag_tile(const float* const* u, const float* mv, const float* cv, int64_t Lp, double* kc, double* wm,
               double* G, int ldG) {
  vf ak[NI], aw[NI], ag[NI * NI];
  for (int j = 0; j < NI; ++j) ak[j] = aw[j] = vf{};
  for (int j = 0; j < NI * NI; ++j) ag[j] = vf{};
  for (int64_t x = 0; x < Lp; x += W) {
    vf uj[NI], m = ld(mv + x);
    for (int j = 0; j < NI; ++j) { uj[j] = ld(u[j] + x); aw[j] += uj[j] * m; }
    if (R) {
      vf c = ld(cv + x);
      for (int j = 0; j < NI; ++j) {
        ak[j] += uj[j] * c;
        for (int i = 0; i <= j; ++i) ag[i * NI + j] += uj[i] * uj[j];
      }
    }
  }
  for (int j = 0; j < NI; ++j) {
    wm[j] += hsum(aw[j]);
    if (R) {
      kc[j] += hsum(ak[j]);
      for (int i = 0; i <= j; ++i) G[i * ldG + j] += hsum(ag[i * NI + j]);
    }
  }
}

// Over Lp elements: the Gram tile of rows ui[0, NI) against uj[0, NJ).
template <int NI, int NJ>
void cross_tile(const float* const* ui, const float* const* uj, int64_t Lp, double* G, int ldG) {
  vf ag[NI * NJ];
  for (int j = 0; j < NI * NJ; ++j) ag[j] = vf{};
  for (int64_t x = 0; x < Lp; x += W) {
    vf a[NI], b[NJ];
    for (int i = 0; i < NI; ++i) a[i] = ld(ui[i] + x);
    for (int j = 0; j < NJ; ++j) b[j] = ld(uj[j] + x);
    for (int i = 0; i < NI; ++i) for (int j = 0; j < NJ; ++j) ag[i * NJ + j] += a[i] * b[j];
  }
  for (int i = 0; i < NI; ++i) for (int j = 0; j < NJ; ++j) G[i * ldG + j] += hsum(ag[i * NJ + j]);
}

// Pass 1 on elements [x0, x1) of one block; reads only. With mv = lerp(m, g, w1), the momentum
// pass 2 will store, adds to out = [G (N*N, upper triangle), U c (N), U m (N), c.c, c.m, chk]
// (refresh) or to U m and chk only; chk sums x - x over mv and c: NaN iff one is not finite.
template <int N, bool R, class S, class P>
void pass1(int64_t d, const S* U, const S* m, const P* g, const P* c, float w1, int64_t x0, int64_t x1,
           double* out, Scratch& sc) {
  constexpr int REM = N % T == 0 ? T : N % T;  // rows in the last tile
  double* G = out;
  double* kc = out + N * N;
  double* wm = out + N * N + N;
  double cc = 0, cm = 0, chk = 0;
  for (int64_t xb = x0; xb < x1; xb += B) {
    const int64_t L = xb + B < x1 ? B : x1 - xb, Lp = (L + W - 1) / W * W;
    const float* u[N];
    for (int j = 0; j < N; ++j) u[j] = src(U + j * d + xb, sc.at(j), L);
    const float* mi = src(m + xb, sc.at(N), L);
    const float* gi = src(g + xb, sc.at(N + 1), L);
    const float* ci = R ? src(c + xb, sc.at(N + 2), L) : nullptr;
    float* mv = sc.at(N + 3);
    vf acc = vf{}, acm = vf{}, ach = vf{};
    for (int64_t x = 0; x < Lp; x += W) {
      vf mx = lerp<S>(ld(mi + x), ld(gi + x), w1);
      st(mv + x, mx);
      ach += mx - mx;
      if (R) { vf cx = ld(ci + x); ach += cx - cx; acc += cx * cx; acm += cx * mx; }
    }
    chk += hsum(ach);
    if (R) { cc += hsum(acc); cm += hsum(acm); }
    for (int i0 = 0; i0 < N; i0 += T) {
      if (N - i0 >= T) diag_tile<T, R>(u + i0, mv, ci, Lp, kc + i0, wm + i0, G + i0 * N + i0, N);
      else diag_tile<REM, R>(u + i0, mv, ci, Lp, kc + i0, wm + i0, G + i0 * N + i0, N);
      if (!R) continue;
      for (int j0 = i0 + T; j0 < N; j0 += T) {  // i-tile is full here
        if (N - j0 >= T) cross_tile<T, T>(u + i0, u + j0, Lp, G + i0 * N + j0, N);
        else cross_tile<T, REM>(u + i0, u + j0, Lp, G + i0 * N + j0, N);
      }
    }
  }
  out[N * N + 2 * N] += cc; out[N * N + 2 * N + 1] += cm; out[N * N + 2 * N + 2] += chk;
}

// Pass 2 on [x0, x1): m <- lerp(m, g, w1); on refresh v = nu.U + nu_c c;
// u = scale * (m - a.U + ab v), clipped to [-rho, rho]; p <- p * decay - lr * u;
// on refresh U <- U - bt v^T in place (a rank-one reflection: O(N) per element).
// coef = [scale, ab, lr, decay, rho, nu_c, a (N), bt (N), nu (N)].
template <int N, bool R, class S, class P>
void pass2(int64_t d, S* U, S* m, const P* g, P* p, const P* c, float w1, const float* coef, int64_t x0,
           int64_t x1, Scratch& sc) {
  const vf scale = splat(coef[0]), ab = splat(coef[1]), nlr = splat(-coef[2]), decay = splat(coef[3]);
  const vf rho = splat(coef[4]), nrho = splat(-coef[4]), nu_c = splat(coef[5]);
  const bool do_decay = coef[3] != 1.f;
  vf a[N], bt[N], nu[N];
  for (int j = 0; j < N; ++j) { a[j] = splat(coef[6 + j]); bt[j] = splat(coef[6 + N + j]); nu[j] = splat(coef[6 + 2 * N + j]); }
  for (int64_t xb = x0; xb < x1; xb += B) {
    const int64_t L = xb + B < x1 ? B : x1 - xb, Lp = (L + W - 1) / W * W;
    const float* u[N];
    float* uo[N];
    for (int j = 0; j < N; ++j) {
      u[j] = src(U + j * d + xb, sc.at(j), L);
      uo[j] = R ? dst(U + j * d + xb, sc.at(j), L) : nullptr;
    }
    const float* mi = src(m + xb, sc.at(N), L);
    const float* gi = src(g + xb, sc.at(N + 1), L);
    const float* pi = src(p + xb, sc.at(N + 2), L);
    const float* ci = R ? src(c + xb, sc.at(N + 3), L) : nullptr;
    float* mo = dst(m + xb, sc.at(N), L);
    float* po = dst(p + xb, sc.at(N + 2), L);
    for (int64_t x = 0; x < Lp; x += W) {
      vf uj[N];
      for (int j = 0; j < N; ++j) uj[j] = ld(u[j] + x);
      vf mx = lerp<S>(ld(mi + x), ld(gi + x), w1);
      st(mo + x, mx);
      vf dir = mx, v = vf{};
      for (int j = 0; j < N; ++j) dir -= a[j] * uj[j];
      if (R) {
        v = nu_c * ld(ci + x);
        for (int j = 0; j < N; ++j) v += nu[j] * uj[j];
        dir += ab * v;
      }
      dir *= scale;
      dir = dir > rho ? rho : dir;
      dir = dir < nrho ? nrho : dir;
      vf pv = ld(pi + x);
      if (is_bf16<P>()) dir = round_bf16(dir);
      if (do_decay) { pv *= decay; if (is_bf16<P>()) pv = round_bf16(pv); }
      st(po + x, pv + nlr * dir);
      if (R) for (int i = 0; i < N; ++i) st(uo[i] + x, uj[i] - bt[i] * v);
    }
    flush(m + xb, mo, L);
    flush(p + xb, po, L);
    if (R) for (int j = 0; j < N; ++j) flush(U + j * d + xb, uo[j], L);
  }
}

// Block i's meta = [n, d, refresh]; ptrs = 4 data pointers. Thread t takes, in every block, the
// element range whose cumulative (weighted) work falls in its share; ranges are W-aligned.
inline int64_t work(const int64_t* meta, bool second) {
  int64_t n = meta[0], r = meta[2];
  return second ? (r ? 2 * n + 5 : n + 4) : (r ? n + 3 : n + 2);
}
struct Plan {
  std::vector<int64_t> start;  // cumulative weighted work before block i
  int64_t total = 0;
  Plan(int nb, const int64_t* meta, bool second) : start(nb) {
    for (int i = 0; i < nb; ++i) {
      start[i] = total;
      total += meta[3 * i + 1] * work(meta + 3 * i, second);
    }
  }
  int64_t bound(int i, const int64_t* meta, int t, int nt, bool second) const {
    int64_t d = meta[3 * i + 1], w = work(meta + 3 * i, second);
    int64_t T_ = (int64_t)((__int128)total * t / nt) - start[i];
    if (T_ <= 0) return 0;
    int64_t x = (T_ + w - 1) / w;
    x = (x + W - 1) / W * W;
    return x < d ? x : d;
  }
};

template <class F>
void run_threads(int nt, F&& f) {
  std::vector<std::thread> th;
  for (int t = 1; t < nt; ++t) th.emplace_back(f, t);
  f(0);
  for (auto& x : th) x.join();
}

template <int N, class S, class P>
void p1_block(bool r, int64_t d, int64_t* ptr, float w1, int64_t x0, int64_t x1, double* out, Scratch& sc) {
  const S* U = (const S*)ptr[0]; const S* m = (const S*)ptr[1];
  const P* g = (const P*)ptr[2]; const P* c = (const P*)ptr[3];
  if (r) pass1<N, true, S, P>(d, U, m, g, c, w1, x0, x1, out, sc);
  else pass1<N, false, S, P>(d, U, m, g, c, w1, x0, x1, out, sc);
}
template <int N, class S, class P>
void p2_block(bool r, int64_t d, int64_t* ptr, float w1, const float* coef, int64_t x0, int64_t x1, Scratch& sc) {
  S* U = (S*)ptr[0]; S* m = (S*)ptr[1]; const P* g = (const P*)ptr[2]; P* p = (P*)ptr[3];
  const P* c = (const P*)ptr[4];
  if (r) pass2<N, true, S, P>(d, U, m, g, p, c, w1, coef, x0, x1, sc);
  else pass2<N, false, S, P>(d, U, m, g, p, c, w1, coef, x0, x1, sc);
}

#define GINGER_SWITCH_N(n, CALL) \
  switch (n) { \
    case 1: CALL(1); break; case 2: CALL(2); break; case 3: CALL(3); break; case 4: CALL(4); break; \
    case 5: CALL(5); break; case 6: CALL(6); break; case 7: CALL(7); break; case 8: CALL(8); break; \
    case 12: CALL(12); break; case 16: CALL(16); break; default: break; }

template <class S, class P>
void run_pass1(int nb, const int64_t* meta, int64_t* ptrs, float w1, double* out, int stride, int nt) {
  Plan plan(nb, meta, false);
  run_threads(nt, [&](int t) {
    Scratch sc(16);
    for (int i = 0; i < nb; ++i) {
      int64_t x0 = plan.bound(i, meta, t, nt, false), x1 = plan.bound(i, meta, t + 1, nt, false);
      if (x0 >= x1) continue;
      int n = (int)meta[3 * i];
      double* o = out + ((int64_t)t * nb + i) * stride;
#define P1(K) p1_block<K, S, P>(meta[3 * i + 2], meta[3 * i + 1], ptrs + 4 * i, w1, x0, x1, o, sc)
      GINGER_SWITCH_N(n, P1)
#undef P1
    }
  });
}

template <class S, class P>
void run_pass2(int nb, const int64_t* meta, int64_t* ptrs, float w1, const float* coef, int cstride, int nt) {
  Plan plan(nb, meta, true);
  run_threads(nt, [&](int t) {
    Scratch sc(16);
    for (int i = 0; i < nb; ++i) {
      int64_t x0 = plan.bound(i, meta, t, nt, true), x1 = plan.bound(i, meta, t + 1, nt, true);
      if (x0 >= x1) continue;
      int n = (int)meta[3 * i];
#define P2(K) p2_block<K, S, P>(meta[3 * i + 2], meta[3 * i + 1], ptrs + 5 * i, w1, \
                                coef + (int64_t)i * cstride, x0, x1, sc)
      GINGER_SWITCH_N(n, P2)
#undef P2
    }
  });
}

}  // namespace

extern "C" {
// dtype codes: 0 = float32, 1 = bfloat16. Returns 0 on success.
int ginger_supported_rank(int n) {
  return (n >= 1 && n <= 8) || n == 12 || n == 16;
}

// ptrs per block: U, m, g, c (c may be 0 when the block does not refresh).
int ginger_pass1(int sdt, int pdt, int nb, const int64_t* meta, int64_t* ptrs, float w1, double* out, int stride,
                 int nt) {
  if (sdt == 0 && pdt == 0) run_pass1<float, float>(nb, meta, ptrs, w1, out, stride, nt);
  else if (sdt == 0 && pdt == 1) run_pass1<float, bf16>(nb, meta, ptrs, w1, out, stride, nt);
  else if (sdt == 1 && pdt == 0) run_pass1<bf16, float>(nb, meta, ptrs, w1, out, stride, nt);
  else if (sdt == 1 && pdt == 1) run_pass1<bf16, bf16>(nb, meta, ptrs, w1, out, stride, nt);
  else return 1;
  return 0;
}

// ptrs per block: U, m, g, p, c.
int ginger_pass2(int sdt, int pdt, int nb, const int64_t* meta, int64_t* ptrs, float w1, const float* coef,
                 int cstride, int nt) {
  if (sdt == 0 && pdt == 0) run_pass2<float, float>(nb, meta, ptrs, w1, coef, cstride, nt);
  else if (sdt == 0 && pdt == 1) run_pass2<float, bf16>(nb, meta, ptrs, w1, coef, cstride, nt);
  else if (sdt == 1 && pdt == 0) run_pass2<bf16, float>(nb, meta, ptrs, w1, coef, cstride, nt);
  else if (sdt == 1 && pdt == 1) run_pass2<bf16, bf16>(nb, meta, ptrs, w1, coef, cstride, nt);
  else return 1;
  return 0;
}
}
