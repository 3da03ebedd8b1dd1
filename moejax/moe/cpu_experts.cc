// SwiGLU experts for XLA:CPU: forward and backward of every expert's FFN on its filled rows.
//
// Why a kernel: with many experts each expert sees a few dozen rows, so every weight byte is
// used a few dozen times. XLA:CPU runs such thin matmuls at a third of its rate on square
// ones and does not overlap reading the next expert's weights with computing this one. Here
// weights are read once per pass, in whole rows (the hardware prefetcher streams them), the
// next rows are prefetched while the current ones are used, the two matmuls that touch a
// weight in the backward share one pass over it, and two threads take experts in turn.
// Built by moejax/moe/cpu_experts.py with -march=native; `bench layer` measures it.
//
// Shapes (float32): x [E, S*C, d], w_in [E, d, 2f] (gate | linear), w_out [E, f, d],
// filled [E, S] int32: segment s of expert e holds tokens in rows s*C .. s*C+filled[e,s]-1,
// zeros after. h [E, S*C, 2f] is the forward's pre-activation, packed: rows 0..n-1 hold the
// n filled rows in order. d and f must be multiples of 16 (checked in Python).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

// The tiles below hold 24-32 accumulators of 16 floats: AVX-512's register file. With fewer or
// narrower registers they would spill, so elsewhere the build fails and the XLA path runs.
#if !defined(__AVX512F__)
#error "the moejax CPU experts kernel needs AVX-512"
#endif
#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr long V = 16;  // floats per vector

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// Not `vf{} + a`: GCC makes that an add on the FMA ports before the broadcast.
inline vf bc(float a) { return reinterpret_cast<vf>(_mm512_set1_ps(a)); }

inline vf vexp(vf x) {  // relative error ~1e-7 on [-87, 88]
  x = x < -87.0f ? bc(-87.0f) : x;
  x = x > 88.0f ? bc(88.0f) : x;
  const vf shifter = bc(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504f + shifter) - shifter;
  vf r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  vf p = bc(1.0f / 720);
  p = p * r + 1.0f / 120; p = p * r + 1.0f / 24; p = p * r + 1.0f / 6;
  p = p * r + 0.5f; p = p * r + 1.0f; p = p * r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale; std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline vf vsigmoid(vf g) { return 1.0f / (1.0f + vexp(-g)); }

// ---- C[n, Q] = A[n, K] @ W[K, Q], W large and read once. ------------------------------------
// W is taken KC whole rows at a time (a sequential read), packed into 64-column panels that
// stay in L1 while 6-row tiles of A run over them; the next KC rows are prefetched meanwhile.
constexpr long KC = 96;

template <int R>
void gemm_tile(const float* A, long lda, const float* P, long kc, float* C, long ldc, int nv,
               bool add, const char* prefetch) {
  vf acc[R][4];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < 4; v++) acc[r][v] = (add && v < nv) ? ld(C + r * ldc + V * v) : vf{};
  for (long k = 0; k < kc; k++) {
    if (prefetch) __builtin_prefetch(prefetch + 64 * k, 0, 2);
    vf w[4];
    for (int v = 0; v < 4; v++) w[v] = ld(P + 64 * k + V * v);
    for (int r = 0; r < R; r++) {
      vf a = bc(A[r * lda + k]);
      for (int v = 0; v < 4; v++) acc[r][v] += a * w[v];
    }
  }
  for (int r = 0; r < R; r++)
    for (int v = 0; v < nv; v++) st(C + r * ldc + V * v, acc[r][v]);
}

void gemm(const float* A, long n, long K, const float* W, long Q, float* C, float* pack) {
  const long panels = (Q + 63) / 64;
  for (long k0 = 0; k0 < K; k0 += KC) {
    const long kc = std::min(KC, K - k0);
    for (long k = 0; k < kc; k++) {
      const float* w = W + (k0 + k) * Q;
      for (long p = 0; p < panels; p++) {
        float* dst = pack + (p * kc + k) * 64;
        for (long v = 0; v < 4; v++)
          st(dst + V * v, p * 64 + V * v < Q ? ld(w + p * 64 + V * v) : vf{});
      }
    }
    const char* next = reinterpret_cast<const char*>(W + (k0 + kc) * Q);
    const long next_bytes = k0 + kc < K ? 4 * std::min(KC, K - k0 - kc) * Q : 0;
    long tile = 0;
    for (long p = 0; p < panels; p++) {
      const int nv = static_cast<int>(std::min(64L, Q - p * 64) / V);
      for (long r0 = 0; r0 < n; r0 += 6, tile++) {
        const char* pf = (tile + 1) * kc * 64 <= next_bytes ? next + tile * kc * 64 : nullptr;
        const float* a = A + r0 * K + k0;
        float* c = C + r0 * Q + p * 64;
        const float* panel = pack + p * kc * 64;
        switch (std::min(6L, n - r0)) {
#define TILE(R) case R: gemm_tile<R>(a, K, panel, kc, c, Q, nv, k0 > 0, pf); break;
          TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
#undef TILE
        }
      }
    }
  }
}

// ---- CT[J, nc] = W[J, K] @ GT[K, nc]: the input gradient, W read row by row. ---------------
template <int NV>
void rows_tile(const float* W, long K, const float* GT, long nc, float* CT) {
  vf acc[8][NV];
  for (int r = 0; r < 8; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = vf{};
  for (long k = 0; k < K; k++) {
    vf g[NV];
    for (int v = 0; v < NV; v++) g[v] = ld(GT + k * nc + V * v);
    for (int r = 0; r < 8; r++) {
      vf w = bc(W[r * K + k]);
      for (int v = 0; v < NV; v++) acc[r][v] += w * g[v];
    }
  }
  for (int r = 0; r < 8; r++)
    for (int v = 0; v < NV; v++) st(CT + r * nc + V * v, acc[r][v]);
}

void rows_block(const float* W, long j0, long K, const float* GT, long nc, float* CT) {
  for (long c0 = 0; c0 < nc; c0 += 3 * V) {
    const float* w = W + j0 * K;
    switch (std::min(3L, (nc - c0) / V)) {
      case 1: rows_tile<1>(w, K, GT + c0, nc, CT + j0 * nc + c0); break;
      case 2: rows_tile<2>(w, K, GT + c0, nc, CT + j0 * nc + c0); break;
      case 3: rows_tile<3>(w, K, GT + c0, nc, CT + j0 * nc + c0); break;
    }
  }
}

// ---- dW[J, Q] = A[n, J]^T @ G[n, Q], G in [n, 3V] column panels: a weight gradient. -----
template <int NV>
void outer_tile(const float* A, long lda, long n, const float* G, long Q, float* dW) {
  vf acc[8][NV];
  for (int r = 0; r < 8; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = vf{};
  for (long c = 0; c < n; c++) {
    vf g[NV];
    for (int v = 0; v < NV; v++) g[v] = ld(G + c * 3 * V + V * v);
    for (int r = 0; r < 8; r++) {
      vf a = bc(A[c * lda + r]);
      for (int v = 0; v < NV; v++) acc[r][v] += a * g[v];
    }
  }
  for (int r = 0; r < 8; r++)
    for (int v = 0; v < NV; v++) st(dW + r * Q + V * v, acc[r][v]);
}

void pack_panels(const float* dy, long n, long K, long q0, long q1, float* panels) {
  for (long q = q0; q < q1; q += 3 * V)
    for (long c = 0; c < n; c++)
      for (long v = 0; v < 3 && q + V * v < K; v++)
        st(panels + (q - q0) * n + c * 3 * V + V * v, ld(dy + c * K + q + V * v));
}

// dW[j0:j0+8, q0:q0+3V] = a[:, j0:j0+8]^T @ one [n, 3V] panel of dy.
void outer_at(const float* a, long n, long j0, long J, const float* panel, long K, long q0,
              float* dW) {
  switch (std::min(3L, (K - q0) / V)) {
    case 1: outer_tile<1>(a + j0, J, n, panel, K, dW + j0 * K + q0); break;
    case 2: outer_tile<2>(a + j0, J, n, panel, K, dW + j0 * K + q0); break;
    case 3: outer_tile<3>(a + j0, J, n, panel, K, dW + j0 * K + q0); break;
  }
}

// The backward of y = a @ W, W [J, K] (J % 8 == 0), a [n, J], dy [n, K]: da^T [J, nc] =
// W @ dy^T and dW [J, K] = a^T @ dy. While all of dy's panels fit in L2 (few rows), 8 rows
// of W at a time do both: one pass over W and dW, and dW's stores drain while the next rows'
// matmul runs. With more rows dy's panels would be re-read from L3 for every 8 rows, so dW
// is made one column panel at a time instead, over all rows.
void weight_backward(const float* W, long J, long K, const float* dyT, long nc, float* daT,
                     const float* a, long n, const float* dy, float* dW) {
  thread_local std::vector<float> panels;
  if (4 * n * K <= (512 << 10)) {
    panels.resize(n * (K + 3 * V));
    pack_panels(dy, n, K, 0, K, panels.data());
    for (long j0 = 0; j0 < J; j0 += 8) {
      rows_block(W, j0, K, dyT, nc, daT);
      for (long q0 = 0; q0 < K; q0 += 3 * V)
        outer_at(a, n, j0, J, panels.data() + q0 * n, K, q0, dW);
    }
    return;
  }
  for (long j0 = 0; j0 < J; j0 += 8) rows_block(W, j0, K, dyT, nc, daT);
  panels.resize(n * 3 * V);
  for (long q0 = 0; q0 < K; q0 += 3 * V) {
    pack_panels(dy, n, K, q0, std::min(q0 + 3 * V, K), panels.data());
    for (long j0 = 0; j0 < J; j0 += 8) outer_at(a, n, j0, J, panels.data(), K, q0, dW);
  }
}

// a [n, m] (row stride lda) -> t [m, nt] (row stride nt): t[j, c] = a[c, j], zero for c >= n.
void transpose(const float* a, long n, long m, long lda, float* t, long nt) {
  for (long j0 = 0; j0 < m; j0 += V)
    for (long c = 0; c < nt; c++)
      for (long j = j0; j < std::min(j0 + V, m); j++) t[j * nt + c] = c < n ? a[c * lda + j] : 0.0f;
}

// swiglu: a = silu(h[:, :f]) * h[:, f:], rows of h [n, 2f] -> a [n, f]
void swiglu(const float* h, long n, long f, float* a) {
  for (long c = 0; c < n; c++)
    for (long j = 0; j < f; j += V) {
      vf g = ld(h + c * 2 * f + j), l = ld(h + c * 2 * f + f + j);
      st(a + c * f + j, g * vsigmoid(g) * l);
    }
}

struct Shapes {
  long E, R, S, d, f;
};

// Rows of expert e's buffer that hold tokens, in order.
long filled_rows(const int32_t* filled, const Shapes& s, long e, std::vector<long>& rows) {
  rows.clear();
  const long cap = s.R / s.S;
  for (long seg = 0; seg < s.S; seg++) {
    const long m = std::clamp<long>(filled[e * s.S + seg], 0, cap);
    for (long i = 0; i < m; i++) rows.push_back(seg * cap + i);
  }
  return static_cast<long>(rows.size());
}

void gather(const float* src, const std::vector<long>& rows, long width, float* dst) {
  for (size_t i = 0; i < rows.size(); i++)
    std::memcpy(dst + i * width, src + rows[i] * width, 4 * width);
}

void scatter(const float* src, const std::vector<long>& rows, long width, long R, float* dst) {
  std::memset(dst, 0, 4 * R * width);
  for (size_t i = 0; i < rows.size(); i++)
    std::memcpy(dst + rows[i] * width, src + i * width, 4 * width);
}

// Runs body(e) for every expert on the calling thread and the pool's others. Tasks that start
// after the work ran out return at once, so waiting only for started ones cannot deadlock.
template <typename Body>
void for_each_expert(ffi::ThreadPool& pool, long E, Body body) {
  struct Job {
    std::atomic<long> next{0};
    std::atomic<int> active{0};
  };
  auto job = std::make_shared<Job>();
  Body* shared_body = &body;
  // A task that starts after the work ran out touches only `job` (kept alive by the task),
  // never `body`, which lives on this call's stack.
  auto work = [job, E, shared_body] {
    job->active++;
    for (long e; (e = job->next++) < E;) (*shared_body)(e);
    job->active--;
  };
  const long helpers = std::min<long>(std::max<long>(pool.num_threads(), 1) - 1, E - 1);
  for (long i = 0; i < helpers; i++) pool.Schedule(decltype(work)(work));
  work();
  while (job->active.load() > 0) std::this_thread::yield();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_in,
                   ffi::Buffer<ffi::F32> w_out, ffi::Buffer<ffi::S32> filled,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> h) {
  const auto xd = x.dimensions();
  const Shapes s{xd[0], xd[1], filled.dimensions()[1], xd[2], w_out.dimensions()[1]};
  const long d = s.d, f = s.f, R = s.R;
  const float *X = x.typed_data(), *Win = w_in.typed_data(), *Wout = w_out.typed_data();
  float *Y = y->typed_data(), *H = h->typed_data();
  for_each_expert(pool, s.E, [&](long e) {
    thread_local std::vector<float> xs, a, ys, pack;
    thread_local std::vector<long> rows;
    const long n = filled_rows(filled.typed_data(), s, e, rows);
    float* he = H + e * R * 2 * f;
    std::memset(he + n * 2 * f, 0, 4 * (R - n) * 2 * f);
    if (n == 0) {
      std::memset(Y + e * R * d, 0, 4 * R * d);
      return;
    }
    xs.resize(n * d); a.resize(n * f); ys.resize(n * d); pack.resize(KC * (2 * f + 64));
    gather(X + e * R * d, rows, d, xs.data());
    gemm(xs.data(), n, d, Win + e * d * 2 * f, 2 * f, he, pack.data());
    swiglu(he, n, f, a.data());
    gemm(a.data(), n, f, Wout + e * f * d, d, ys.data(), pack.data());
    scatter(ys.data(), rows, d, R, Y + e * R * d);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_in,
                    ffi::Buffer<ffi::F32> w_out, ffi::Buffer<ffi::S32> filled,
                    ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> g_in,
                    ffi::ResultBuffer<ffi::F32> g_out) {
  const auto xd = x.dimensions();
  const Shapes s{xd[0], xd[1], filled.dimensions()[1], xd[2], w_out.dimensions()[1]};
  const long d = s.d, f = s.f, R = s.R;
  const float *X = x.typed_data(), *Win = w_in.typed_data(), *Wout = w_out.typed_data();
  const float *H = h.typed_data(), *DY = dy.typed_data();
  float *DX = dx->typed_data(), *GIN = g_in->typed_data(), *GOUT = g_out->typed_data();
  for_each_expert(pool, s.E, [&](long e) {
    thread_local std::vector<float> xs, dys, dyT, daT, a, da, dh, dhT, dxT, dxs;
    thread_local std::vector<long> rows;
    const long n = filled_rows(filled.typed_data(), s, e, rows), nc = (n + V - 1) / V * V;
    float *gin = GIN + e * d * 2 * f, *gout = GOUT + e * f * d;
    if (n == 0) {
      std::memset(DX + e * R * d, 0, 4 * R * d);
      std::memset(gin, 0, 4 * d * 2 * f);
      std::memset(gout, 0, 4 * f * d);
      return;
    }
    xs.resize(n * d); dys.resize(n * d); dyT.resize(d * nc); daT.resize(f * nc);
    a.resize(n * f); da.resize(n * f); dh.resize(n * 2 * f); dhT.resize(2 * f * nc);
    dxT.resize(d * nc); dxs.resize(n * d);
    const float* he = H + e * R * 2 * f;
    gather(X + e * R * d, rows, d, xs.data());
    gather(DY + e * R * d, rows, d, dys.data());
    // y = a @ w_out: da = dy @ w_out^T, g_out = a^T @ dy
    transpose(dys.data(), n, d, d, dyT.data(), nc);
    swiglu(he, n, f, a.data());
    weight_backward(Wout + e * f * d, f, d, dyT.data(), nc, daT.data(), a.data(), n, dys.data(),
                    gout);
    // a = silu(g) * l: dg = da * l * silu'(g), dl = da * silu(g)
    transpose(daT.data(), f, n, nc, da.data(), f);
    for (long c = 0; c < n; c++)
      for (long j = 0; j < f; j += V) {
        const float* hc = he + c * 2 * f;
        vf g = ld(hc + j), l = ld(hc + f + j), sg = vsigmoid(g), dac = ld(da.data() + c * f + j);
        st(dh.data() + c * 2 * f + j, dac * l * sg * (1.0f + g * (1.0f - sg)));
        st(dh.data() + c * 2 * f + f + j, dac * g * sg);
      }
    // h = x @ w_in: dx = dh @ w_in^T, g_in = x^T @ dh
    transpose(dh.data(), n, 2 * f, 2 * f, dhT.data(), nc);
    weight_backward(Win + e * d * 2 * f, d, 2 * f, dhT.data(), nc, dxT.data(), xs.data(), n,
                    dh.data(), gin);
    transpose(dxT.data(), d, n, nc, dxs.data(), d);
    scatter(dxs.data(), rows, d, R, DX + e * R * d);
  });
  return ffi::Error::Success();
}

}  // namespace

// Both take x, w_in, w_out and filled, and run on XLA's CPU thread pool.
static auto ExpertsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

// -> y, h
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxExpertsForward, Forward,
                              ExpertsBinding()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// (h, dy) -> dx, g_in, g_out
XLA_FFI_DEFINE_HANDLER_SYMBOL(MoejaxExpertsBackward, Backward,
                              ExpertsBinding()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
