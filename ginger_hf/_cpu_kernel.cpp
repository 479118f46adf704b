// A Ginger step on CPU (the math: ginger_hf/fused.py, ginger_hf/solve.py). Plain C++17, no torch
// headers: built once with the system compiler and loaded with ctypes.
//
// Two ways to run a step, each call covering every block of one rank n and one dtype pair:
// - ginger_step, the whole step: after a scan for non-finite inputs, eight blocks at a time take their
//   passes 1, their small solves and their passes 2 while the eight are in cache (_cpu_batch.h). Whole
//   blocks are dealt to threads in contiguous runs of about equal cost: for many small blocks (rows).
// - the two passes (ginger_pass1, ginger_pass2) with the batched solves between them, called from
//   Python: for huge blocks, whose elements are split between threads in contiguous shares of the
//   work, and for sharded tensors, whose sums are completed across ranks between the passes.
// Blocks are rows of tensors or whole tensors, each described by (k, refresh, U stride) and its data.
//
// The passes are in _cpu_passes.h (SIMD helpers: _cpu_simd.h), the small solves in _cpu_solve.h (their
// eigen-solvers: _cpu_eigh.h); every table exchanged with Python is
// a row of named fields from the generated ginger_interface.h (ginger_hf/kernel_interface.py). Where the
// outputs go inside a block's row of sums or coefficients comes from the caller (solve.py's layouts).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "ginger_interface.h"  // generated from ginger_hf/kernel_interface.py: the tables' named fields
#include "_cpu_solve.h"        // the small per-block solves
#include "_cpu_passes.h"       // the streaming passes over a block
#include "_cpu_batch.h"        // a whole step's blocks, eight at a time

namespace {

// Thread t takes the contiguous share [total * t / nt, total * (t + 1) / nt) of the weighted work;
// within a block the share is an element range, W-aligned.
struct Plan {
  std::vector<int64_t> start;
  std::vector<int64_t> weight;
  int64_t total = 0;
  Plan(int nb, const Block* blocks, int n, bool second) : start(nb), weight(nb) {
    for (int i = 0; i < nb; ++i) {
      const bool r = blocks[i].refresh;
      weight[i] = second ? (r ? 2 * n + 6 : n + 4) : (r ? (n * n + 5 * n) / 2 + 4 : n + 3);
      start[i] = total;
      total += blocks[i].k * weight[i];
    }
  }
  int64_t bound(int i, int64_t k, int t, int nt) const {
    int64_t share = (int64_t)((__int128)total * t / nt) - start[i];
    if (share <= 0) return 0;
    int64_t x = (share + weight[i] - 1) / weight[i];
    x = (x + W - 1) / W * W;
    return x < k ? x : k;
  }
};

// Runs f(0) .. f(nt - 1), one per thread. With OpenMP (the build asks for it) the threads are the process's
// OpenMP pool, which is torch's own (the same libgomp, loaded once): the threads torch just used for the
// backward pass take the work, instead of spinning beside new threads that compete with them for the cores.
template <class F>
void run_threads(int nt, F&& f) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(nt)
  for (int t = 0; t < nt; ++t) f(t);
#else
  std::vector<std::thread> th;
  for (int t = 1; t < nt; ++t) th.emplace_back(f, t);
  f(0);
  for (auto& x : th) x.join();
#endif
}

template <class S, class P>
void run_pass1(int n, int nb, const Block* blocks, const int64_t* ptrs, float w1, double* out,
               const StatsView& sv, int nt) {
  Plan plan(nb, blocks, n, false);
  std::mutex lock;
  run_threads(nt, [&](int t) {
    Scratch sc(n + 4);
    std::vector<double> wide((size_t)n * kWideStride);
    std::vector<double> part(sv.width);
    for (int i = 0; i < nb; ++i) {
      const Block& b = blocks[i];
      int64_t x0 = plan.bound(i, b.k, t, nt), x1 = plan.bound(i, b.k, t + 1, nt);
      if (x0 >= x1) continue;
      const int64_t* q = ptrs + Pass1Ptr::count * i;
      const bool whole = x0 == 0 && x1 == b.k;
      double* o = whole ? out + (int64_t)i * sv.width : part.data();
      if (!whole) std::fill(part.begin(), part.end(), 0.0);
      pass1<S, P>(n, b, (const S*)q[Pass1Ptr::U], (const S*)q[Pass1Ptr::m], (const P*)q[Pass1Ptr::g],
                  (const P*)q[Pass1Ptr::c], w1, x0, x1, o, sv, sc, wide);
      if (!whole) {  // a block split between threads: add this share under the lock
        std::lock_guard<std::mutex> g(lock);
        for (int64_t j = 0; j < sv.width; ++j) out[(int64_t)i * sv.width + j] += part[j];
      }
    }
  });
}

template <class S, class P>
int64_t run_pass2(int n, int nb, const Block* blocks, const int64_t* ptrs, float w1, const float* coef,
                  const CoefView& cv, int nt) {
  Plan plan(nb, blocks, n, true);
  std::vector<int64_t> clipped(nt, 0);
  run_threads(nt, [&](int t) {
    Scratch sc(10);
    for (int i = 0; i < nb; ++i) {
      const Block& b = blocks[i];
      int64_t x0 = plan.bound(i, b.k, t, nt), x1 = plan.bound(i, b.k, t + 1, nt);
      if (x0 >= x1) continue;
      const int64_t* q = ptrs + Pass2Ptr::count * i;
      clipped[t] += pass2<S, P>(n, b, (S*)q[Pass2Ptr::U], (S*)q[Pass2Ptr::m], (const P*)q[Pass2Ptr::g], (P*)q[Pass2Ptr::p],
                                (const P*)q[Pass2Ptr::c], w1,
                                coef + (int64_t)i * cv.width, cv, x0, x1, sc);
    }
  });
  int64_t sum = 0;
  for (int64_t c : clipped) sum += c;
  return sum;
}


// ---- A whole step, block by block: pass 1, the small solve, pass 2 while the block is in cache ----

// The tables of a whole step are rows of named fields (ginger_interface.h): TensorRow per tensor (its
// blocks, addresses of its data and small state), Param per tensor (the solve's, with debias as after a
// refresh, then lr, decay = 1 - lr * weight_decay, rho, and debias as without a refresh), Finite per tensor,
// Result per block (Result::untouched: 1 where m' was not finite after all, an overflow).

bool all_finite(const float* x, int64_t k) {
  vf acc = vf{};
  int64_t i = 0;
  for (; i + W <= k; i += W) acc += ld(x + i) * 0.f;  // inf * 0 and nan * 0 are nan
  float tail = 0.f;
  for (; i < k; ++i) tail += x[i] * 0.f;
  float t[W];
  std::memcpy(t, &acc, sizeof t);
  for (int j = 0; j < W; ++j) tail += t[j];
  return tail == 0.f;
}
bool all_finite(const bf16* x, int64_t k) {
  for (int64_t i = 0; i < k; ++i)
    if ((x[i].bits & 0x7f80) == 0x7f80) return false;
  return true;
}

template <class S, class P>
int64_t run_step(int n, int nt_tensors, const int64_t* tensors, const double* params, float w1,
                 const StatsView& sv, const CoefView& cv, double* results, int64_t* finite, int nt) {
  auto row = [&](int t) { return tensors + (int64_t)TensorRow::count * t; };
  std::vector<StepBlock> blocks;
  std::vector<double> cum(1, 0.0);
  for (int t = 0; t < nt_tensors; ++t) {
    const int64_t* T = row(t);
    const bool r = T[TensorRow::refresh];
    const double cost = (double)T[TensorRow::k] * (r ? 3 * n + 10 : 2 * n + 8) + (r ? 40.0 * (n + 1) * (n + 1) : 20.0 * n);
    for (int64_t b = 0; b < T[TensorRow::B]; ++b) {
      blocks.push_back({t, b});
      cum.push_back(cum.back() + cost);
    }
  }
  const int nb = (int)blocks.size();
  std::vector<int> edge(nt + 1, nb);  // contiguous runs of whole blocks per thread, of about equal cost
  edge[0] = 0;
  for (int t = 1; t < nt; ++t) edge[t] = (int)(std::lower_bound(cum.begin(), cum.end(), cum[nb] * t / nt) - cum.begin());
  // Phase 1: which tensors have a non-finite gradient (skipped) or curvature vector (no refresh).
  std::vector<std::vector<char>> bad(nt, std::vector<char>((size_t)Finite::count * nt_tensors, 0));
  run_threads(nt, [&](int t) {
    for (int i = edge[t]; i < edge[t + 1]; ++i) {
      const int64_t* T = row(blocks[i].tensor);
      const int64_t off = blocks[i].b * T[TensorRow::k];
      char* f = bad[t].data() + Finite::count * blocks[i].tensor;
      if (!f[Finite::grad] && !all_finite((const P*)T[TensorRow::g] + off, T[TensorRow::k])) f[Finite::grad] = 1;
      if (T[TensorRow::refresh] && !f[Finite::curvature] && !all_finite((const P*)T[TensorRow::c] + off, T[TensorRow::k]))
        f[Finite::curvature] = 1;
    }
  });
  for (int t = 0; t < nt_tensors; ++t)
    for (int f = 0; f < Finite::count; ++f) {
      bool any_bad = false;
      for (int h = 0; h < nt; ++h) any_bad |= bad[h][Finite::count * t + f] != 0;
      finite[Finite::count * t + f] = !any_bad;
    }
  // Phase 2: the step of every block of the tensors that take one.
  std::vector<int64_t> clipped(nt, 0);
  run_threads(nt, [&](int t) {
    by_rank(n, [&](auto k) {
      clipped[t] = step_blocks<decltype(k), S, P>(n, blocks, edge[t], edge[t + 1], tensors, finite, params, w1, sv,
                                                  cv, results);
    });
  });
  int64_t sum = 0;
  for (int64_t c : clipped) sum += c;
  return sum;
}

// The four dtype pairs of (state S, parameter P): 0 = float32, 1 = bfloat16.
template <template <class, class> class F, class... A>
int64_t by_dtype(int sdt, int pdt, bool& ok, A&&... args) {
  ok = true;
  if (sdt == 0 && pdt == 0) return F<float, float>::run(args...);
  if (sdt == 0 && pdt == 1) return F<float, bf16>::run(args...);
  if (sdt == 1 && pdt == 0) return F<bf16, float>::run(args...);
  if (sdt == 1 && pdt == 1) return F<bf16, bf16>::run(args...);
  ok = false;
  return 0;
}
template <class S, class P> struct Pass1 {
  template <class... A> static int64_t run(A... a) { run_pass1<S, P>(a...); return 0; }
};
template <class S, class P> struct Pass2 {
  template <class... A> static int64_t run(A... a) { return run_pass2<S, P>(a...); }
};
template <class S, class P> struct Step {
  template <class... A> static int64_t run(A... a) { return run_step<S, P>(a...); }
};

}  // namespace

// The C entry points. Return 0 on success, 1 for an unknown dtype code, 2 for a rank out of range.
extern "C" {
int ginger_abi_version() { return kAbiVersion; }

// diag(d) + rho z z^T (m x m) = V diag(lam) V^T, lam ascending (rank_one_eigh: the refresh's eigenproblem).
int ginger_rank_one_eigh(int m, const double* d, const double* z, double rho, double* lam, double* V) {
  if (m < 1 || m > kMaxDim || !(rho >= 0)) return 2;
  rank_one_eigh(m, d, z, rho, lam, V);
  return 0;
}

// blocks: BlockRow per block; ptrs: Pass1Ptr per block (c may be 0 when the block does not refresh);
// out: nb rows of sums (StatsAt places), zeroed.
int ginger_pass1(int sdt, int pdt, int n, int nb, const int64_t* blocks, const int64_t* ptrs, float w1, double* out,
                 const int64_t* stats_at, int nt) {
  if (n < 0 || n > kMaxRank) return 2;
  const std::vector<Block> b = block_rows(nb, blocks);
  bool ok;
  by_dtype<Pass1>(sdt, pdt, ok, n, nb, b.data(), ptrs, w1, out, StatsView(stats_at), nt);
  return ok ? 0 : 1;
}

// ptrs: Pass2Ptr per block. coef: nb rows of float coefficients (CoefAt places). *clipped: coordinates cut by rho.
int ginger_pass2(int sdt, int pdt, int n, int nb, const int64_t* blocks, const int64_t* ptrs, float w1,
                 const float* coef, const int64_t* coef_at, int nt, int64_t* clipped) {
  if (n < 0 || n > kMaxRank) return 2;
  const std::vector<Block> b = block_rows(nb, blocks);
  bool ok;
  *clipped = by_dtype<Pass2>(sdt, pdt, ok, n, nb, b.data(), ptrs, w1, coef, CoefView(coef_at), nt);
  return ok ? 0 : 1;
}

// The refresh solve of nb blocks of rank n: stats (nb rows, StatsAt places), s (nb x n), R (nb x n x n), e (nb),
// params (nb x kSolveParams, Param's first fields), out (nb rows: coefficients, then RefreshOut's fields).
int ginger_solve_refresh(int n, int nb, const double* stats, const int64_t* stats_at, const double* s,
                         const double* R, const double* e, const double* params, double* out,
                         const int64_t* coef_at, int nt) {
  if (n < 1 || n > kMaxRank) return 2;
  const StatsView sv(stats_at);
  const CoefView cv(coef_at);
  const int64_t width = RefreshOut(n, cv.width).width;
  run_threads(nt, [&](int t) {  // contiguous shares: no cache line of out is written by two threads
    solve_blocks(n, (int)((int64_t)nb * t / nt), (int)((int64_t)nb * (t + 1) / nt), stats, sv, s, R, e, params, out,
                 width, cv);
  });
  return 0;
}

// The keep solve of nb blocks of rank n (see keep_block); out: nb rows of coefficients, then KeepOut's fields.
int ginger_solve_keep(int n, int nb, const double* stats, const int64_t* stats_at, const double* s,
                      const double* R, const double* e, const double* params, double* out, const int64_t* coef_at) {
  if (n < 1 || n > kMaxRank) return 2;
  const StatsView sv(stats_at);
  const CoefView cv(coef_at);
  const int64_t width = cv.width + KeepOut::count;
  for (int i = 0; i < nb; ++i)
    keep_block(n, stats + (int64_t)i * sv.width, sv, s + (int64_t)i * n, R + (int64_t)i * n * n, e[i],
               params + (int64_t)i * kSolveParams, out + (int64_t)i * width, cv);
  return 0;
}

// A whole step of the tensors of rank n: tensors (count TensorRow), params (count Param), results (one Result
// per block, tensor by tensor), finite (count Finite). A tensor with a non-finite gradient is left untouched;
// one with a non-finite curvature vector steps without its refresh. Whole blocks per thread: for many small
// blocks (rows); a few huge ones take the two-pass calls above.
int ginger_step(int sdt, int pdt, int n, int count, const int64_t* tensors, const double* params, float w1,
                const int64_t* stats_at, const int64_t* coef_at, double* results, int64_t* finite, int nt,
                int64_t* clipped) {
  if (n < 1 || n > kMaxRank) return 2;
  bool ok;
  *clipped = by_dtype<Step>(sdt, pdt, ok, n, count, tensors, params, w1, StatsView(stats_at), CoefView(coef_at),
                            results, finite, nt);
  return ok ? 0 : 1;
}
}
