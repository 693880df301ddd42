// The dense GEMV (AVX-512F float32, AVX512-BF16 bfloat16) for the Linear a quantized model keeps dense: its
// output head. At decode the head is the largest single read of a small model (SmolLM2-135M's 49152 x 576 head
// is 113 MB in float32, more than all its quantized Linears together), and torch's CPU matrix-vector product
// streams it at 9-12 GB/s on this 2-core machine; rows claimed in pieces by both cores (parallel.h) stream at
// 28-31 GB/s, 2-3x that. Torch-free, compiled with target attributes like the other kernels.
//
// Rows are read one after another, in address order: per row two accumulators per token (M <= 4) over the
// whole row (K of a head is small: the hidden size), one horizontal sum per (row, token) at the end: float32
// products summed in float32 (float32 weights), or pairs of bf16 products summed by `vdpbf16ps` into float32
// (bf16 weights and activations), as oneDNN does. An earlier version walked 4 rows side by side (one weight
// vector of each per step, sharing the activation loads) and streamed up to 40 % slower on Zen 4: 49152 x 576
// bf16 2.9-3.0 ms against 1.8-2.2, fp32 4.7-5.4 against 3.0-4.7 (eval/KERNELS.md).
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

// one row r, every token: y[t][r] = w[r] . x[t] + bias[r]
template <int M>
PTQTP_AVX512F void row_f32(const DenseGemvProblem& p, int64_t r) {
  const float* x = static_cast<const float*>(p.x);
  const float* w = static_cast<const float*>(p.w) + r * p.w_stride;
  __m512 acc[M][2];
#pragma GCC unroll 4
  for (int t = 0; t < M; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= p.k; c += 32) {
    const __m512 w0 = _mm512_loadu_ps(w + c), w1 = _mm512_loadu_ps(w + c + 16);
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) {
      acc[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * p.x_stride + c), acc[t][0]);
      acc[t][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * p.x_stride + c + 16), acc[t][1]);
    }
  }
  for (; c < p.k; c += 16) {
    const int64_t left = std::min<int64_t>(16, p.k - c);
    const __mmask16 mask = static_cast<__mmask16>(left == 16 ? 0xFFFFu : (1u << left) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(mask, w + c);
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t)
      acc[t][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + t * p.x_stride + c), acc[t][0]);
  }
  const float b = p.bias ? p.bias[r] : 0.0f;
#pragma GCC unroll 4
  for (int t = 0; t < M; ++t) p.y[t * p.y_stride + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) + b;
}

template <int M>
PTQTP_AVX512BF16_D void row_bf16(const DenseGemvProblem& p, int64_t r) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const uint16_t* w = static_cast<const uint16_t*>(p.w) + r * p.w_stride;
  __m512 acc[M][2];
#pragma GCC unroll 4
  for (int t = 0; t < M; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 64 <= p.k; c += 64) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + c), w1 = (__m512bh)_mm512_loadu_si512(w + c + 32);
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t) {
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, (__m512bh)_mm512_loadu_si512(x + t * p.x_stride + c));
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, (__m512bh)_mm512_loadu_si512(x + t * p.x_stride + c + 32));
    }
  }
  for (; c < p.k; c += 32) {  // zeros past K: 0 * 0 adds nothing
    const int64_t left = std::min<int64_t>(32, p.k - c);
    const __mmask32 mask = static_cast<__mmask32>(left == 32 ? 0xFFFFFFFFu : (1u << left) - 1u);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + c);
#pragma GCC unroll 4
    for (int t = 0; t < M; ++t)
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + t * p.x_stride + c));
  }
  const float b = p.bias ? p.bias[r] : 0.0f;
#pragma GCC unroll 4
  for (int t = 0; t < M; ++t) p.y[t * p.y_stride + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) + b;
}

// rows [ra, rb), in address order
template <int M>
void rows_as(const DenseGemvProblem& p, int64_t ra, int64_t rb) {
  if (p.bf16)
    for (int64_t r = ra; r < rb; ++r) row_bf16<M>(p, r);
  else
    for (int64_t r = ra; r < rb; ++r) row_f32<M>(p, r);
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
