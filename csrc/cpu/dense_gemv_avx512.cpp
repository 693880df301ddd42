// The dense GEMV (AVX-512F float32, AVX512-BF16 bfloat16) for the Linear a quantized model keeps dense: its
// output head. At decode the head is the largest single read of a small model (SmolLM2-135M's 49152 x 576 head
// is 113 MB in float32, more than all its quantized Linears together), and torch's CPU matrix-vector product
// streams it at 9-12 GB/s on this 2-core machine; rows claimed in pieces by both cores (parallel.h) stream at
// about twice that. Torch-free, compiled with target attributes like the other kernels.
//
// Each tile is 4 rows x M tokens (M <= 4) of accumulators over the whole row (K of a head is small: the hidden
// size), one horizontal sum per (row, token) at the end: float32 products summed in float32 (float32 weights),
// or pairs of bf16 products summed by `vdpbf16ps` into float32 (bf16 weights and activations), as oneDNN does.
#include "trit_cpu.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PTQTP_DENSE_GEMV 1
#else
#define PTQTP_DENSE_GEMV 0
#endif

#include "parallel.h"

namespace ptqtp_cpu {

bool dense_gemv_compiled() { return PTQTP_DENSE_GEMV != 0; }

#if PTQTP_DENSE_GEMV

#define PTQTP_AVX512F __attribute__((target("avx512f")))
#define PTQTP_AVX512BF16_D __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace {

constexpr int kRows = 4;  // rows per tile

template <int R, int M>
PTQTP_AVX512F void tile_f32(const DenseGemvProblem& p, int64_t r0) {
  const float* x = static_cast<const float*>(p.x);
  const float* w = static_cast<const float*>(p.w) + r0 * p.w_stride;
  __m512 acc[R][M];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= p.k; c += 16) {
    __m512 xv[M];
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) xv[t] = _mm512_loadu_ps(x + t * p.x_stride + c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * p.w_stride + c);
#pragma GCC unroll 4
      for (int t = 0; t < M; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  if (c < p.k) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (p.k - c)) - 1u);
    __m512 xv[M];
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) xv[t] = _mm512_maskz_loadu_ps(mask, x + t * p.x_stride + c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + r * p.w_stride + c);
#pragma GCC unroll 4
      for (int t = 0; t < M; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float b = p.bias ? p.bias[r0 + r] : 0.0f;
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) p.y[t * p.y_stride + r0 + r] = _mm512_reduce_add_ps(acc[r][t]) + b;
  }
}

template <int R, int M>
PTQTP_AVX512BF16_D void tile_bf16(const DenseGemvProblem& p, int64_t r0) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const uint16_t* w = static_cast<const uint16_t*>(p.w) + r0 * p.w_stride;
  __m512 acc[R][M];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= p.k; c += 32) {
    __m512bh xv[M];
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * p.x_stride + c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * p.w_stride + c);
#pragma GCC unroll 4
      for (int t = 0; t < M; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  if (c < p.k) {  // zeros past K: 0 * 0 adds nothing
    const __mmask32 mask = static_cast<__mmask32>((1ull << (p.k - c)) - 1ull);
    __m512bh xv[M];
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * p.x_stride + c);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * p.w_stride + c);
#pragma GCC unroll 4
      for (int t = 0; t < M; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float b = p.bias ? p.bias[r0 + r] : 0.0f;
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) p.y[t * p.y_stride + r0 + r] = _mm512_reduce_add_ps(acc[r][t]) + b;
  }
}

// rows [ra, rb): tiles of kRows rows, then one row at a time
template <int M>
void rows_as(const DenseGemvProblem& p, int64_t ra, int64_t rb) {
  int64_t r = ra;
  if (p.bf16) {
    for (; r + kRows <= rb; r += kRows) tile_bf16<kRows, M>(p, r);
    for (; r < rb; ++r) tile_bf16<1, M>(p, r);
  } else {
    for (; r + kRows <= rb; r += kRows) tile_f32<kRows, M>(p, r);
    for (; r < rb; ++r) tile_f32<1, M>(p, r);
  }
}

}  // namespace

void gemv_dense(const DenseGemvProblem& p) {
  parallel_items(p.n, p.grain_rows, p.threads, [&](int64_t ra, int64_t rb) {
    switch (p.m) {
      case 1: rows_as<1>(p, ra, rb); break;
      case 2: rows_as<2>(p, ra, rb); break;
      case 3: rows_as<3>(p, ra, rb); break;
      default: rows_as<4>(p, ra, rb); break;
    }
  });
}

#else  // not x86: never selected (cpu_best_isa() returns generic)

void gemv_dense(const DenseGemvProblem&) {}

#endif

}  // namespace ptqtp_cpu
