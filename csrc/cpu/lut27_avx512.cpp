// The lut27 GEMV (AVX-512F), torch-free. Compiled with target attributes only, so this file builds (and the
// extension imports) with compilers and on CPUs without AVX-512; cpu_best_isa() picks it at run time.
//
// Per token and chunk of 3 columns (chunks never cross a group; a group of g columns has C = ceil(g/3)), the
// table holds the 27 sums d0*x0 + d1*x1 + d2*x2, d in {-1, 0, 1}, at code (d0+1) + 3(d1+1) + 9(d2+1), padded
// to 32 floats (two zmm). One vpermt2ps, which reads only the low 5 bits of each 32-bit index lane, looks up 16
// rows x 3 columns of one plane; a 5-bit shift brings the next chunk's code down. Both planes share the table.
// Per (row, group, plane) the partial sum is multiplied once by its fp32 scale.
//
// Work split: the calling thread builds the tables, then threads claim ranges of kLut27GrainBlocks 16-row
// blocks (parallel.h) and walk each in passes of `tile_groups` groups, so that the m tables of one pass stay in
// L2 while every code word is read from memory exactly once per call. Within a pass, 4 (or fewer, at the end
// of a range) row blocks share each table load: 8 lookups per two table loads.
#include "trit_cpu.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PTQTP_LUT27 1
#else
#define PTQTP_LUT27 0
#endif

#include "parallel.h"

namespace ptqtp_cpu {

bool lut27_compiled() { return PTQTP_LUT27 != 0; }

#if PTQTP_LUT27

#define PTQTP_AVX512 __attribute__((target("avx512f,avx512bw")))

namespace {

// digits d0, d1, d2 of every table entry e = (d0+1) + 3(d1+1) + 9(d2+1), zero past e = 26
struct Digits {
  alignas(64) float d[3][kLut27TableFloats];
  Digits() {
    for (int e = 0; e < kLut27TableFloats; ++e) {
      d[0][e] = e < 27 ? static_cast<float>(e % 3 - 1) : 0.0f;
      d[1][e] = e < 27 ? static_cast<float>(e / 3 % 3 - 1) : 0.0f;
      d[2][e] = e < 27 ? static_cast<float>(e / 9 - 1) : 0.0f;
    }
  }
};
const Digits kDigits;

// tables of token t, group g: C chunks x 32 floats. The sums are formed as (d0*x0 + d1*x1) + d2*x2: each
// product is exact (d in {-1, 0, 1}), so every entry is the float sum of its terms in column order.
PTQTP_AVX512 void build_group_tables(const Lut27Problem& p, int64_t t, int64_t g) {
  const float* x = p.x + t * p.x_stride;
  float* tab = p.tables + (t * p.groups + g) * p.chunks * kLut27TableFloats;
  const int64_t g0 = g * p.group_size, g_end = std::min(g0 + p.group_size, p.k);
  const __m512 d0l = _mm512_load_ps(kDigits.d[0]), d0h = _mm512_load_ps(kDigits.d[0] + 16);
  const __m512 d1l = _mm512_load_ps(kDigits.d[1]), d1h = _mm512_load_ps(kDigits.d[1] + 16);
  const __m512 d2l = _mm512_load_ps(kDigits.d[2]), d2h = _mm512_load_ps(kDigits.d[2] + 16);
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t col = g0 + 3 * c;
    const __m512 x0 = _mm512_set1_ps(col < g_end ? x[col] : 0.0f);
    const __m512 x1 = _mm512_set1_ps(col + 1 < g_end ? x[col + 1] : 0.0f);
    const __m512 x2 = _mm512_set1_ps(col + 2 < g_end ? x[col + 2] : 0.0f);
    const __m512 lo = _mm512_fmadd_ps(d2l, x2, _mm512_fmadd_ps(d1l, x1, _mm512_mul_ps(d0l, x0)));
    const __m512 hi = _mm512_fmadd_ps(d2h, x2, _mm512_fmadd_ps(d1h, x1, _mm512_mul_ps(d0h, x0)));
    _mm512_storeu_ps(tab + c * kLut27TableFloats, lo);
    _mm512_storeu_ps(tab + c * kLut27TableFloats + 16, hi);
  }
}

// Index registers for the chunks of one code word. A word holds chunk i at bits 5i (i < 3, low 16-bit half)
// or 16 + 5(i - 3) (i >= 3, high half). vpermt2ps reads bits 0-4 of each 32-bit lane, so the next chunk of a
// half is brought down by a 16-bit multiply-high by 2^11 (a right shift by 5 within each 16-bit half), and the
// high half by vpmaddwd with (0, 1) (lane = sign-extended high half): both run on the multiply pipes, not on
// the shuffle pipe the lookups need (a vpsrld per lookup would share it and cost about 40% more).
struct Codes {
  __m512i k_shift5, k_high;
  PTQTP_AVX512 Codes() : k_shift5(_mm512_set1_epi16(1 << 11)), k_high(_mm512_set1_epi32(1 << 16)) {}
  PTQTP_AVX512 __m512i first(const int32_t* w) const { return _mm512_loadu_si512(w); }
  PTQTP_AVX512 __m512i next(__m512i i) const { return _mm512_mulhi_epu16(i, k_shift5); }
  PTQTP_AVX512 __m512i high(const int32_t* w) const { return _mm512_madd_epi16(_mm512_loadu_si512(w), k_high); }
};

// The spare bits 15 and 31 of words 0 and 1 hold the 4-bit code of a last chunk with at most 2 columns
// (bits 0, 1 in word 0; bits 2, 3 in word 1), for the table entries 0..8 (third column's digit -1, x2 = 0).
PTQTP_AVX512 inline __m512i tail_code(const int32_t* w0, const int32_t* w1) {
  const __m512i a = _mm512_srli_epi32(_mm512_loadu_si512(w0), 15);  // bit 0 <- 15, bit 16 <- 31
  const __m512i b = _mm512_srli_epi32(_mm512_loadu_si512(w1), 13);  // bit 2 <- 15, bit 18 <- 31
  // bits 0 and 16 from a, the rest from b; then keep bits 0, 2, 16, 18 and fold 16, 18 down to 1, 3
  const __m512i c = _mm512_ternarylogic_epi32(a, b, _mm512_set1_epi32(0x00010001), 0xE4);  // c ? a : b
  const __m512i d = _mm512_and_si512(c, _mm512_set1_epi32(0x00050005));
  return _mm512_or_si512(d, _mm512_srli_epi32(d, 15));
}

// acc[t][j] += table(t, chunk)[idx[j]] for T tokens x J (block, plane) pairs: each token's table load pair serves
// J lookups, each index register T
template <int T, int J>
PTQTP_AVX512 inline void look(__m512 (&acc)[T][J], const __m512i (&idx)[J], const float* const (&tab)[T],
                              int64_t at) {
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t) {
    // Keep the code in source order: the empty volatile asm statements stay in order, the table address comes
    // out of one and every sum goes through one, so GCC cannot hoist later chunks' loads and lookups above this
    // chunk's (it does otherwise, and spills the accumulators). The CPU overlaps the chunks by itself.
    const float* tp = tab[t] + at;
    __asm__ volatile("" : "+r"(tp));
    const __m512 lo = _mm512_loadu_ps(tp), hi = _mm512_loadu_ps(tp + 16);
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) {
      acc[t][j] = _mm512_add_ps(acc[t][j], _mm512_permutex2var_ps(lo, idx[j], hi));
      __asm__ volatile("" : "+v"(acc[t][j]));
    }
  }
}

// the first N (1..6) chunks of word w of every (block, plane) pair, for T tokens
template <int T, int J, int N>
PTQTP_AVX512 inline void word(__m512 (&acc)[T][J], const int32_t* const (&cw)[J], int64_t w,
                              const float* const (&tab)[T], const Codes& k) {
  const int64_t at = w * kLut27CodesPerWord * kLut27TableFloats;
  __m512i idx[J];
#pragma GCC unroll 16
  for (int j = 0; j < J; ++j) idx[j] = k.first(cw[j] + w * kLut27Rows);
#pragma GCC unroll 6
  for (int i = 0; i < N; ++i) {
    if (i == 3) {
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) idx[j] = k.high(cw[j] + w * kLut27Rows);
    } else if (i > 0) {
#pragma GCC unroll 16
      for (int j = 0; j < J; ++j) idx[j] = k.next(idx[j]);
    }
    look<T, J>(acc, idx, tab, at + i * kLut27TableFloats);
  }
}

// one group for tokens t0 .. t0+T-1: every chunk, then the scales, into tot[t][b]
template <int T, int B>
PTQTP_AVX512 inline void group_tokens(const Lut27Problem& p, const int32_t* const (&cw)[2 * B], int64_t rb, int64_t g,
                                      int64_t t0, float (*tot)[B][kLut27Rows], const Codes& k) {
  constexpr int J = 2 * B;
  const int64_t C = p.chunks, G = p.groups;
  const int64_t full = p.tail_in_spare ? p.words : C / kLut27CodesPerWord;  // words holding 6 codes
  const int rest = p.tail_in_spare ? 0 : static_cast<int>(C - full * kLut27CodesPerWord);  // codes in word `full`
  const float* tab[T];
  for (int t = 0; t < T; ++t) tab[t] = p.tables + ((t0 + t) * G + g) * C * kLut27TableFloats;
  __m512 acc[T][J];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int64_t w = 0; w < full; ++w) word<T, J, kLut27CodesPerWord>(acc, cw, w, tab, k);
  switch (rest) {
    case 1: word<T, J, 1>(acc, cw, full, tab, k); break;
    case 2: word<T, J, 2>(acc, cw, full, tab, k); break;
    case 3: word<T, J, 3>(acc, cw, full, tab, k); break;
    case 4: word<T, J, 4>(acc, cw, full, tab, k); break;
    case 5: word<T, J, 5>(acc, cw, full, tab, k); break;
    default: break;
  }
  if (p.tail_in_spare) {
    __m512i idx[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) idx[j] = tail_code(cw[j], cw[j] + kLut27Rows);
    look<T, J>(acc, idx, tab, (C - 1) * kLut27TableFloats);
  }
  for (int b = 0; b < B; ++b) {
    const uint16_t* sp = p.scales + (((rb + b) * G + g) * 2) * kLut27Rows;
    const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp)));
    const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + kLut27Rows)));
    for (int t = 0; t < T; ++t) {
      __m512 s = _mm512_load_ps(tot[t0 + t][b]);
      s = _mm512_fmadd_ps(s0, acc[t][2 * b], s);
      s = _mm512_fmadd_ps(s1, acc[t][2 * b + 1], s);
      _mm512_store_ps(tot[t0 + t][b], s);
    }
  }
}

// B row blocks (16 rows each) starting at rb, groups [g0, g1), every token, TM tokens at a time (then fewer).
// `tot` (m x B x 16) carries the running sums between passes: zeroed on the first pass, finished (bias, store
// to y) on the last.
template <int B, int TM>
PTQTP_AVX512 void blocks(const Lut27Problem& p, int64_t rb, int64_t g0, int64_t g1, bool first, bool last) {
  constexpr int J = 2 * B;  // (block, plane) pairs: one code register each, one accumulator per token
  const int64_t W = p.words, G = p.groups, m = p.m;
  const Codes k;
  alignas(64) float tot[kLut27MaxTokens][B][kLut27Rows];
  float* part = p.partial + rb * kLut27Rows;  // (m, R16 * 16) running sums between passes
  const int64_t part_stride = (p.n + kLut27Rows - 1) / kLut27Rows * kLut27Rows;
  for (int64_t t = 0; t < m; ++t)
    for (int b = 0; b < B; ++b) {
      if (first)
        _mm512_store_ps(tot[t][b], _mm512_setzero_ps());
      else
        _mm512_store_ps(tot[t][b], _mm512_loadu_ps(part + t * part_stride + b * kLut27Rows));
    }

  const int64_t ahead = 2 * B * G * 2 * W * kLut27Rows;  // the same group two passes (2 x B blocks) ahead
  for (int64_t g = g0; g < g1; ++g) {
    const int32_t* cw[J];
    for (int b = 0; b < B; ++b)
      for (int pl = 0; pl < 2; ++pl) cw[2 * b + pl] = p.codes + (((rb + b) * G + g) * 2 + pl) * W * kLut27Rows;
    // into L2, two passes of B blocks ahead (one pass, or an L1 hint, measured slower): the hardware
    // prefetcher barely starts on streams this short (a block of a 576-column layer is 4.6 KB), so a decode
    // step of a small model stalls on memory
    for (int j = 0; j < J; ++j)
      for (int64_t w = 0; w < W; ++w)
        _mm_prefetch(reinterpret_cast<const char*>(cw[j] + ahead + w * kLut27Rows), _MM_HINT_T1);
    int64_t t = 0;
    for (; t + TM <= m; t += TM) group_tokens<TM, B>(p, cw, rb, g, t, tot, k);
    switch (m - t) {  // fewer than TM tokens left
      case 1: group_tokens<1, B>(p, cw, rb, g, t, tot, k); break;
      case 2: if (TM > 2) group_tokens<2, B>(p, cw, rb, g, t, tot, k); break;
      case 3: if (TM > 3) group_tokens<3, B>(p, cw, rb, g, t, tot, k); break;
      default: break;
    }
  }

  for (int64_t t = 0; t < m; ++t)
    for (int b = 0; b < B; ++b) {
      const int64_t r0 = (rb + b) * kLut27Rows;
      if (!last) {
        _mm512_storeu_ps(part + t * part_stride + b * kLut27Rows, _mm512_load_ps(tot[t][b]));
        continue;
      }
      const int live = static_cast<int>(std::min<int64_t>(kLut27Rows, p.n - r0));
      if (live <= 0) continue;
      const __mmask16 mask = static_cast<__mmask16>((1u << live) - 1u);
      __m512 v = _mm512_load_ps(tot[t][b]);
      if (p.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.bias + r0));
      _mm512_mask_storeu_ps(p.y + t * p.y_stride + r0, mask, v);
    }
}

// row blocks [rb0, rb1) for groups [g0, g1). One token: 4 blocks share each table load (8 lookups per pair of
// loads). Several tokens: 2 blocks x up to 4 tokens, so that each code register serves every token of the tile.
template <int B, int TM>
PTQTP_AVX512 void block_range_as(const Lut27Problem& p, int64_t rb0, int64_t rb1, int64_t g0, int64_t g1) {
  const bool first = g0 == 0, last = g1 == p.groups;
  int64_t rb = rb0;
  for (; rb + B <= rb1; rb += B) blocks<B, TM>(p, rb, g0, g1, first, last);
  if (B > 2)
    for (; rb + 2 <= rb1; rb += 2) blocks<2, TM>(p, rb, g0, g1, first, last);
  for (; rb < rb1; ++rb) blocks<1, TM>(p, rb, g0, g1, first, last);
}

PTQTP_AVX512 void block_range(const Lut27Problem& p, int64_t rb0, int64_t rb1, int64_t g0, int64_t g1) {
  if (p.m == 1)
    block_range_as<4, 1>(p, rb0, rb1, g0, g1);
  else if (p.m == 2)
    block_range_as<2, 2>(p, rb0, rb1, g0, g1);
  else if (p.m == 3)
    block_range_as<2, 3>(p, rb0, rb1, g0, g1);
  else
    block_range_as<2, 4>(p, rb0, rb1, g0, g1);
}

}  // namespace

void gemv_lut27(const Lut27Problem& p) {
  const int64_t r16 = (p.n + kLut27Rows - 1) / kLut27Rows;
  const int64_t tile = std::max<int64_t>(1, std::min(p.tile_groups, p.groups));
  for (int64_t i = 0; i < p.m * p.groups; ++i) build_group_tables(p, i / p.groups, i % p.groups);
  parallel_items(r16, kLut27GrainBlocks, p.threads, [&](int64_t rb0, int64_t rb1) {
    for (int64_t g0 = 0; g0 < p.groups; g0 += tile) block_range(p, rb0, rb1, g0, std::min(g0 + tile, p.groups));
  });
}

#else  // not x86: never selected (cpu_best_isa() returns generic)

void gemv_lut27(const Lut27Problem&) {}

#endif

}  // namespace ptqtp_cpu
