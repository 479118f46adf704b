// Two streaming passes of a Ginger step on CPU (see ginger_hf/fused.py for the math).
// Plain C++17, no torch headers: built once with the system compiler and loaded with ctypes.
// Each pass takes all blocks of one dtype pair at once and splits the total work
// between std::threads, so there is one call per pass, not one per tensor.
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int W = 16;           // vector width in floats
constexpr int64_t B = 4096;     // elements per block: float partial sums, then double
typedef float vf __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { vf v; for (int i = 0; i < W; ++i) v[i] = x; return v; }
inline double hsum(vf v) {  // pairwise: short dependency chain, smaller rounding error
  float t[W]; std::memcpy(t, &v, sizeof v);
  for (int h = W / 2; h > 0; h /= 2) for (int i = 0; i < h; ++i) t[i] += t[i + h];
  return t[0];
}
inline vf round_bf16(vf x) {  // round to nearest even bfloat16, kept as float
  vu b = (vu)x;
  b += 0x7FFFu + ((b >> 16) & 1u);
  b &= 0xFFFF0000u;
  return (vf)b;
}

struct bf16 { uint16_t bits; };

// Bring L elements of a tensor into float (pointer to the data itself when possible).
inline const float* src(const float* p, float* buf, int64_t L) {
  if (L % W == 0) return p;
  std::memcpy(buf, p, L * 4);
  int64_t Lp = (L + W - 1) / W * W;
  for (int64_t i = L; i < Lp; ++i) buf[i] = 0.f;
  return buf;
}
inline const float* src(const bf16* p, float* buf, int64_t L) {
  int64_t Lp = (L + W - 1) / W * W;
  for (int64_t i = 0; i < L; ++i) { uint32_t u = uint32_t(p[i].bits) << 16; std::memcpy(buf + i, &u, 4); }
  for (int64_t i = L; i < Lp; ++i) buf[i] = 0.f;
  return buf;
}
// Where to compute an output of L elements (the tensor itself when possible), then write it back.
inline float* dst(float* p, float* buf, int64_t L) { return L % W == 0 ? p : buf; }
inline float* dst(bf16*, float* buf, int64_t) { return buf; }
inline void flush(float* p, const float* buf, int64_t L) { if (p != buf) std::memcpy(p, buf, L * 4); }
inline void flush(bf16* p, const float* buf, int64_t L) {
  for (int64_t i = 0; i < L; ++i) {
    uint32_t u; std::memcpy(&u, buf + i, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    p[i].bits = uint16_t(u >> 16);
  }
}
template <class T> constexpr bool is_bf16() { return sizeof(T) == 2; }

struct Scratch {
  std::vector<float> v;
  explicit Scratch(int n) : v((n + 4) * B + W) {}
  float* at(int i) { return v.data() + i * B; }
};

// Pass 1 on elements [x0, x1) of one block: m <- lerp(m, g, w1) in place, and the sums
// out = [G (N*N, upper triangle), U c (N), U m (N), c.c, c.m] (refresh) or [U m] only.
template <int N, bool R, class S, class P>
void pass1(int64_t d, S* U, S* m, const P* g, const P* c, float w1, int64_t x0, int64_t x1, double* out,
           Scratch& sc) {
  double G[N * N] = {0}, kc[N] = {0}, wm[N] = {0}, cc = 0, cm = 0;
  const vf vw1 = splat(w1), vw2 = splat(1.f - w1);
  const bool low = w1 < 0.5f;  // torch.lerp's two formulas
  for (int64_t xb = x0; xb < x1; xb += B) {
    const int64_t L = xb + B < x1 ? B : x1 - xb, Lp = (L + W - 1) / W * W;
    const float* u[N];
    for (int j = 0; j < N; ++j) u[j] = src(U + j * d + xb, sc.at(j), L);
    const float* mi = src(m + xb, sc.at(N), L);
    const float* gi = src(g + xb, sc.at(N + 1), L);
    const float* ci = R ? src(c + xb, sc.at(N + 2), L) : nullptr;
    float* mo = dst(m + xb, sc.at(N + 3), L);
    vf aG[N * N > 0 ? N * N : 1], ak[N], aw[N], acc = splat(0), acm = splat(0);
    for (int j = 0; j < N; ++j) { ak[j] = splat(0); aw[j] = splat(0); }
    if (R) for (int j = 0; j < N * N; ++j) aG[j] = splat(0);
    for (int64_t x = 0; x < Lp; x += W) {
      vf mv = ld(mi + x), gv = ld(gi + x);
      mv = low ? mv + vw1 * (gv - mv) : gv - vw2 * (gv - mv);
      if (is_bf16<S>()) mv = round_bf16(mv);
      st(mo + x, mv);
      vf uj[N];
      for (int j = 0; j < N; ++j) { uj[j] = ld(u[j] + x); aw[j] += uj[j] * mv; }
      if (R) {
        vf cv = ld(ci + x);
        for (int j = 0; j < N; ++j) {
          ak[j] += uj[j] * cv;
          for (int i = 0; i <= j; ++i) aG[i * N + j] += uj[i] * uj[j];
        }
        acc += cv * cv; acm += cv * mv;
      }
    }
    flush(m + xb, mo, L);
    for (int j = 0; j < N; ++j) { wm[j] += hsum(aw[j]); if (R) kc[j] += hsum(ak[j]); }
    if (R) {
      for (int j = 0; j < N; ++j) for (int i = 0; i <= j; ++i) G[i * N + j] += hsum(aG[i * N + j]);
      cc += hsum(acc); cm += hsum(acm);
    }
  }
  for (int j = 0; j < N * N; ++j) out[j] += G[j];
  for (int j = 0; j < N; ++j) { out[N * N + j] += kc[j]; out[N * N + N + j] += wm[j]; }
  out[N * N + 2 * N] += cc; out[N * N + 2 * N + 1] += cm;
}

// Pass 2 on [x0, x1): u = scale * (m - a.U - beta c), clipped to [-rho, rho];
// p <- p * decay - lr * u; on refresh U <- M U + b c^T in place.
// coef = [scale, beta, lr, decay, rho, a (N), b (N), M (N*N, row-major)].
template <int N, bool R, class S, class P>
void pass2(int64_t d, S* U, const S* m, P* p, const P* c, const float* coef, int64_t x0, int64_t x1, Scratch& sc) {
  const vf scale = splat(coef[0]), beta = splat(coef[1]), nlr = splat(-coef[2]), decay = splat(coef[3]);
  const vf rho = splat(coef[4]), nrho = splat(-coef[4]);
  const bool do_decay = coef[3] != 1.f;
  vf a[N], b[N], M[N * N];
  for (int j = 0; j < N; ++j) { a[j] = splat(coef[5 + j]); b[j] = splat(coef[5 + N + j]); }
  for (int j = 0; j < N * N; ++j) M[j] = splat(coef[5 + 2 * N + j]);
  for (int64_t xb = x0; xb < x1; xb += B) {
    const int64_t L = xb + B < x1 ? B : x1 - xb, Lp = (L + W - 1) / W * W;
    const float* u[N];
    float* uo[N];
    for (int j = 0; j < N; ++j) {
      u[j] = src(U + j * d + xb, sc.at(j), L);
      uo[j] = R ? dst(U + j * d + xb, sc.at(j), L) : nullptr;
    }
    const float* mi = src(m + xb, sc.at(N), L);
    const float* pi = src(p + xb, sc.at(N + 1), L);
    const float* ci = R ? src(c + xb, sc.at(N + 2), L) : nullptr;
    float* po = dst(p + xb, sc.at(N + 1), L);
    for (int64_t x = 0; x < Lp; x += W) {
      vf uj[N];
      for (int j = 0; j < N; ++j) uj[j] = ld(u[j] + x);
      vf dir = ld(mi + x), cv = splat(0);
      for (int j = 0; j < N; ++j) dir -= a[j] * uj[j];
      if (R) { cv = ld(ci + x); dir -= beta * cv; }
      dir *= scale;
      dir = dir > rho ? rho : dir;
      dir = dir < nrho ? nrho : dir;
      vf pv = ld(pi + x);
      if (is_bf16<P>()) dir = round_bf16(dir);
      if (do_decay) { pv *= decay; if (is_bf16<P>()) pv = round_bf16(pv); }
      pv += nlr * dir;
      st(po + x, pv);
      if (R) {
        for (int i = 0; i < N; ++i) {
          vf acc = b[i] * cv;
          for (int j = 0; j < N; ++j) acc += M[i * N + j] * uj[j];
          st(uo[i] + x, acc);
        }
      }
    }
    flush(p + xb, po, L);
    if (R) for (int j = 0; j < N; ++j) flush(U + j * d + xb, uo[j], L);
  }
}

// Block i's meta = [n, d, refresh]; ptrs = 4 data pointers. Thread t takes, in every block, the
// element range whose cumulative (weighted) work falls in its share; ranges are W-aligned.
struct Plan {
  std::vector<int64_t> start;  // cumulative weighted work before block i
  int64_t total = 0;
  Plan(int nb, const int64_t* meta, bool pass2) : start(nb) {
    for (int i = 0; i < nb; ++i) {
      int64_t n = meta[3 * i], d = meta[3 * i + 1], r = meta[3 * i + 2];
      start[i] = total;
      total += d * (pass2 ? (r ? 2 * n + 4 : n + 3) : (r ? n + 4 : n + 2));
    }
  }
  int64_t bound(int i, const int64_t* meta, int t, int nt, bool pass2) const {
    int64_t n = meta[3 * i], d = meta[3 * i + 1], r = meta[3 * i + 2];
    int64_t w = pass2 ? (r ? 2 * n + 4 : n + 3) : (r ? n + 4 : n + 2);
    int64_t T = (int64_t)((__int128)total * t / nt) - start[i];
    if (T <= 0) return 0;
    int64_t x = (T + w - 1) / w;
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
  S* U = (S*)ptr[0]; S* m = (S*)ptr[1]; const P* g = (const P*)ptr[2]; const P* c = (const P*)ptr[3];
  if (r) pass1<N, true, S, P>(d, U, m, g, c, w1, x0, x1, out, sc);
  else pass1<N, false, S, P>(d, U, m, g, c, w1, x0, x1, out, sc);
}
template <int N, class S, class P>
void p2_block(bool r, int64_t d, int64_t* ptr, const float* coef, int64_t x0, int64_t x1, Scratch& sc) {
  S* U = (S*)ptr[0]; const S* m = (const S*)ptr[1]; P* p = (P*)ptr[2]; const P* c = (const P*)ptr[3];
  if (r) pass2<N, true, S, P>(d, U, m, p, c, coef, x0, x1, sc);
  else pass2<N, false, S, P>(d, U, m, p, c, coef, x0, x1, sc);
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
void run_pass2(int nb, const int64_t* meta, int64_t* ptrs, const float* coef, int cstride, int nt) {
  Plan plan(nb, meta, true);
  run_threads(nt, [&](int t) {
    Scratch sc(16);
    for (int i = 0; i < nb; ++i) {
      int64_t x0 = plan.bound(i, meta, t, nt, true), x1 = plan.bound(i, meta, t + 1, nt, true);
      if (x0 >= x1) continue;
      int n = (int)meta[3 * i];
#define P2(K) p2_block<K, S, P>(meta[3 * i + 2], meta[3 * i + 1], ptrs + 4 * i, coef + (int64_t)i * cstride, x0, x1, sc)
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

int ginger_pass1(int sdt, int pdt, int nb, const int64_t* meta, int64_t* ptrs, float w1, double* out, int stride,
                 int nt) {
  if (sdt == 0 && pdt == 0) run_pass1<float, float>(nb, meta, ptrs, w1, out, stride, nt);
  else if (sdt == 0 && pdt == 1) run_pass1<float, bf16>(nb, meta, ptrs, w1, out, stride, nt);
  else if (sdt == 1 && pdt == 0) run_pass1<bf16, float>(nb, meta, ptrs, w1, out, stride, nt);
  else if (sdt == 1 && pdt == 1) run_pass1<bf16, bf16>(nb, meta, ptrs, w1, out, stride, nt);
  else return 1;
  return 0;
}

int ginger_pass2(int sdt, int pdt, int nb, const int64_t* meta, int64_t* ptrs, const float* coef, int cstride,
                 int nt) {
  if (sdt == 0 && pdt == 0) run_pass2<float, float>(nb, meta, ptrs, coef, cstride, nt);
  else if (sdt == 0 && pdt == 1) run_pass2<float, bf16>(nb, meta, ptrs, coef, cstride, nt);
  else if (sdt == 1 && pdt == 0) run_pass2<bf16, float>(nb, meta, ptrs, coef, cstride, nt);
  else if (sdt == 1 && pdt == 1) run_pass2<bf16, bf16>(nb, meta, ptrs, coef, cstride, nt);
  else return 1;
  return 0;
}
}
