// Decoding's few-row products and cache attention for XLA:CPU, as jax.ffi custom calls
// (specjax.models.cpu_kernels).
//
// Decoding multiplies a few rows (γ+1 times the batch) by each weight matrix. XLA:CPU sends one
// row to Eigen's matrix-vector path and more to a GEMM that reads the weights at about two
// thirds of the one-row rate. The product kernels stream each weight matrix once per 8 rows,
// contiguously and prefetched ahead, so verifying γ+1 <= 8 tokens reads the same bytes as one
// decode step. Attention's two small dots per layer cost XLA more in dispatch than in bytes;
// the attention kernel reads only the cache slots each query sees.
//
// The product kernels sum every output element in an order that depends only on the weight's
// shape and the thread count, and the attention kernel computes each query row alone, never
// depending on the number of rows: one row and eight give bit-identical results, which keeps
// speculative (γ+1 rows) and plain (one row) decoding token-identical.
//
//   specjax_rows_matmul    y[M, O] = x[M, I] @ w[I, O]     (a Linear kernel, [in, out])
//   specjax_rows_matmul_t  y[M, O] = x[M, I] @ w[O, I]^T   (a tied embedding, [vocab, hidden])
//   specjax_attend         attention of a few query rows over the KV cache's visible slots

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include <immintrin.h>

#ifndef __AVX512F__
#error "specjax's CPU kernels need AVX-512 (x86-64); XLA's own dot is used instead"
#endif

namespace ffi = xla::ffi;

namespace {

// Split [0, n) into `parts` ranges whose boundaries are multiples of `align`.
int64_t Boundary(int64_t n, int64_t parts, int64_t part, int64_t align) {
  if (part >= parts) return n;
  int64_t b = (n * part / parts) / align * align;
  return std::min(b, n);
}

// How many rows of w ahead of those being read each step asks the cache for. The hardware
// prefetcher alone leaves a few-row product waiting on memory between its FMAs: with it, the
// 135M target's 210 layer products over 4 rows took 18.2 ms instead of 20.3, over 8 rows 20.4
// instead of 34.1, and the tied output layer over 4 rows 2.3 instead of 5.0 (in cache). A
// prefetch is a hint: one past the matrix's last row reads nothing and cannot fault.
constexpr int64_t kPrefetchRows = 8;

// Calls f(std::integral_constant<int, mb>{}, m0) for each block of mb <= 8 of the M rows, m0
// its first row: the block size is a template argument, so a kernel's accumulators stay in
// registers. Each row's sums are the same in any block.
template <typename F>
void ForRowBlocks(int64_t M, F f) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: f(std::integral_constant<int, 1>{}, m0); break;
      case 2: f(std::integral_constant<int, 2>{}, m0); break;
      case 3: f(std::integral_constant<int, 3>{}, m0); break;
      case 4: f(std::integral_constant<int, 4>{}, m0); break;
      case 5: f(std::integral_constant<int, 5>{}, m0); break;
      case 6: f(std::integral_constant<int, 6>{}, m0); break;
      case 7: f(std::integral_constant<int, 7>{}, m0); break;
      default: f(std::integral_constant<int, 8>{}, m0); break;
    }
  }
}

// y[M, O] = x[:, i0:i1] @ w[i0:i1, :]. Eight rows of w at a time, walked along O in 16-float
// vectors: the eight streams are contiguous, each vector of w is loaded once and multiplied
// into M register accumulators (M <= 8, a template argument so they stay in registers).
template <int M>
void AccumulateRowsM(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t i0, int64_t i1) {
  std::memset(y, 0, sizeof(float) * M * O);
  constexpr int kRows = 8;
  int64_t i = i0;
  for (; i + kRows <= i1; i += kRows) {
    const float* wi = w + i * O;
    int64_t o = 0;
    for (; o + 16 <= O; o += 16) {
      __m512 acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm512_loadu_ps(y + m * O + o);
      for (int k = 0; k < kRows; ++k) {
        _mm_prefetch(reinterpret_cast<const char*>(wi + (k + kPrefetchRows) * O + o), _MM_HINT_T0);
        const __m512 wv = _mm512_loadu_ps(wi + k * O + o);
        for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * I + i + k]), wv, acc[m]);
      }
      for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * O + o, acc[m]);
    }
    for (; o < O; ++o) {
      for (int m = 0; m < M; ++m) {
        float a = y[m * O + o];
        for (int k = 0; k < kRows; ++k) a = std::fma(x[m * I + i + k], wi[k * O + o], a);
        y[m * O + o] = a;
      }
    }
  }
  for (; i < i1; ++i) {
    for (int m = 0; m < M; ++m)
      for (int64_t o = 0; o < O; ++o) y[m * O + o] = std::fma(x[m * I + i], w[i * O + o], y[m * O + o]);
  }
}

void AccumulateRows(const float* x, const float* w, float* y, int64_t M, int64_t I, int64_t O, int64_t i0,
                    int64_t i1) {
  ForRowBlocks(M, [&](auto mb, int64_t m0) {
    AccumulateRowsM<decltype(mb)::value>(x + m0 * I, w, y + m0 * O, I, O, i0, i1);
  });
}

// Sixteen sums at once: lane t of the result is acc[kLaneOf[t]] summed over its 16 lanes, with
// the pairs _mm512_reduce_add_ps adds (lane l with l+8, then l+4, l+2, l+1), so each sum is bit
// for bit the one-vector reduction's (float addition is commutative), in 15 shuffle-adds
// instead of 16 reductions of 4 dependent steps each.
constexpr int kLaneOf[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

inline __m512 HalvesAdd(__m512 a, __m512 b, int step) {
  switch (step) {
    case 0:  // 256-bit halves: [a0-7 + a8-15, b0-7 + b8-15]
      return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    case 1:  // 128-bit quarters, pairs (0, 1) and (2, 3) of each operand's four
      return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    case 2:  // within 128 bits: l + l+2
      return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
    default:  // within 128 bits: l + l+1
      return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
  }
}

inline __m512 Reduce16(const __m512* acc) {
  __m512 s0[8], s1[4], s2[2];
  for (int k = 0; k < 8; ++k) s0[k] = HalvesAdd(acc[2 * k], acc[2 * k + 1], 0);
  for (int k = 0; k < 4; ++k) s1[k] = HalvesAdd(s0[2 * k], s0[2 * k + 1], 1);
  for (int k = 0; k < 2; ++k) s2[k] = HalvesAdd(s1[2 * k], s1[2 * k + 1], 2);
  return HalvesAdd(s2[0], s2[1], 3);
}

// y[:, o0:o1] = x[M, I] @ w[o0:o1, :]^T. R rows of w (contiguous, length I) at a time, each
// 16-float vector of them loaded once and multiplied into M·R <= 16 register accumulators
// (the M vectors of x are loaded once per step; x stays in L1). Every y element sums its 16
// lanes (Reduce16's pairs), then the tail I % 16, in the same order whatever M and R are.
template <int M, int R>
void DotRowsMR(const float* x, const float* w, float* y, int64_t ldy, int64_t I, int64_t o0, int64_t o1) {
  static_assert(M * R <= 16, "at most 16 accumulators");
  const int64_t I16 = I / 16 * 16;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    const float* wo = w + o * I;
    __m512 acc[16];
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t i = 0; i < I16; i += 16) {
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * I + i);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(wo + kPrefetchRows * I + r * I + i), _MM_HINT_T0);
        const __m512 wv = _mm512_loadu_ps(wo + r * I + i);
        for (int m = 0; m < M; ++m) acc[r * M + m] = _mm512_fmadd_ps(xv[m], wv, acc[r * M + m]);
      }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, Reduce16(acc));
    for (int t = 0; t < 16; ++t) {
      const int k = kLaneOf[t];
      if (k >= M * R) continue;
      const int r = k / M, m = k % M;
      float s = sums[t];
      for (int64_t i = I16; i < I; ++i) s = std::fma(x[m * I + i], wo[r * I + i], s);
      y[m * ldy + o + r] = s;
    }
  }
  if (o < o1) DotRowsMR<M, 1>(x, w, y, ldy, I, o, o1);
}

template <int M>
void DotRowsM(const float* x, const float* w, float* y, int64_t ldy, int64_t I, int64_t o0, int64_t o1) {
  DotRowsMR<M, (16 / M < 8 ? 16 / M : 8)>(x, w, y, ldy, I, o0, o1);
}

void DotRows(const float* x, const float* w, float* y, int64_t M, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  ForRowBlocks(M, [&](auto mb, int64_t m0) { DotRowsM<decltype(mb)::value>(x + m0 * I, w, y + m0 * O, O, I, o0, o1); });
}

// Runs work(part) for part in [0, parts) on the caller and XLA's intra-op threads. A part is
// claimed by whoever gets to it first, so the caller never waits on a task still in a queue
// (no deadlock when every pool thread is busy); late tasks find nothing left and return.
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t parts = 0;
  std::function<void(int64_t)> work;
  void Drain() {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_acq_rel)) < parts;) {
      work(p);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t parts, std::function<void(int64_t)> work) {
  if (parts <= 1) {
    if (parts == 1) work(0);
    return;
  }
  auto job = std::make_shared<Job>();
  job->parts = parts;
  job->work = std::move(work);
  for (int64_t t = 1; t < parts; ++t) pool.Schedule([job] { job->Drain(); });
  job->Drain();
  while (job->done.load(std::memory_order_acquire) < parts) _mm_pause();
  job->work = nullptr;  // late tasks only touch the counters
}

int64_t Parts(ffi::ThreadPool& pool, int64_t n, int64_t min_per_part) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min(threads, n / min_per_part));
}

ffi::Error RowsMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) return ffi::Error::InvalidArgument("rows_matmul: shapes");
  const int64_t M = xd[0], I = xd[1], O = wd[1];
  const int64_t parts = Parts(pool, I, 64);
  std::vector<float> scratch((parts - 1) * M * O);
  float* out = y->typed_data();
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  ParallelFor(pool, parts, [&](int64_t p) {
    float* dst = p == 0 ? out : scratch.data() + (p - 1) * M * O;
    AccumulateRows(xs, ws, dst, M, I, O, Boundary(I, parts, p, 4), Boundary(I, parts, p + 1, 4));
  });
  for (int64_t p = 1; p < parts; ++p) {  // fixed order: the sum does not depend on who ran what
    const float* src = scratch.data() + (p - 1) * M * O;
    for (int64_t k = 0; k < M * O; ++k) out[k] += src[k];
  }
  return ffi::Error::Success();
}

ffi::Error RowsMatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) return ffi::Error::InvalidArgument("rows_matmul_t: shapes");
  const int64_t M = xd[0], I = xd[1], O = wd[0];
  const int64_t parts = Parts(pool, O, 256);
  float* out = y->typed_data();
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  ParallelFor(pool, parts, [&](int64_t p) {
    DotRows(xs, ws, out, M, I, O, Boundary(O, parts, p, 16), Boundary(O, parts, p + 1, 16));
  });
  return ffi::Error::Success();
}


// out[r, m, :] = softmax_s(q[r, m, :] · k[r, s, :] / divisor, s < limit[r, m]) @ v[r, :, s]:
// attention of decoding's few query rows over a [R, S, E] / [R, E, S] cache, reading only the
// visible slots (a query at position p sees slots 0..p). Each (r, m) is computed alone, the
// same way for any number of rows.
inline float Dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + i), _mm512_maskz_loadu_ps(tail, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

void AttendRow(const float* q, const float* k, const float* v, float* out, int64_t S, int64_t E, int64_t limit,
               float divisor, float* p) {
  limit = std::max<int64_t>(0, std::min(limit, S));
  if (limit == 0) {  // nothing visible: XLA's softmax over an all-masked row is uniform
    for (int64_t e = 0; e < E; ++e) {
      float acc = 0;
      for (int64_t s = 0; s < S; ++s) acc += v[e * S + s];
      out[e] = acc / static_cast<float>(S);
    }
    return;
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < limit; ++s) {
    p[s] = Dot(q, k + s * E, E) / divisor;
    mx = std::max(mx, p[s]);
  }
  float sum = 0;
  for (int64_t s = 0; s < limit; ++s) {
    p[s] = std::exp(p[s] - mx);
    sum += p[s];
  }
  for (int64_t s = 0; s < limit; ++s) p[s] /= sum;
  for (int64_t e = 0; e < E; ++e) out[e] = Dot(p, v + e * S, limit);
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                  ffi::Buffer<ffi::S32> limit, ffi::ResultBuffer<ffi::F32> out, float divisor) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), ld = limit.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || ld.size() != 2 || kd[0] != qd[0] || kd[2] != qd[2] ||
      vd[0] != qd[0] || vd[1] != qd[2] || vd[2] != kd[1] || ld[0] != qd[0] || ld[1] != qd[1])
    return ffi::Error::InvalidArgument("attend: shapes");
  const int64_t R = qd[0], M = qd[1], E = qd[2], S = kd[1];
  const float* qs = q.typed_data();
  const float* ks = k.typed_data();
  const float* vs = v.typed_data();
  const int32_t* ls = limit.typed_data();
  float* os = out->typed_data();
  const int64_t rows = R * M;
  const int64_t parts = rows >= 8 ? Parts(pool, rows, 4) : 1;
  ParallelFor(pool, parts, [&](int64_t part) {
    std::vector<float> p(S);
    for (int64_t row = Boundary(rows, parts, part, 1); row < Boundary(rows, parts, part + 1, 1); ++row) {
      const int64_t r = row / M;
      AttendRow(qs + row * E, ks + r * S * E, vs + r * E * S, os + row * E, S, E, ls[row], divisor, p.data());
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(specjax_rows_matmul, RowsMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(specjax_rows_matmul_t, RowsMatmulT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(specjax_attend, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("divisor"));
