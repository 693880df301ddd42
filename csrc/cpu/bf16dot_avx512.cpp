// The bf16dot GEMV (AVX-512F/BW + AVX512-BF16), torch-free, for bfloat16 activations. Compiled with target
// attributes only, like lut27: the extension still builds and imports where the compiler or the CPU lacks them.
//
// The weight is decoded, not looked up per token: per (row, group) a 16-entry bf16 table holds the nine values
// a1*t1 + a2*t2 (t in {-1, 0, 1}), formed in float32 and rounded once to bf16, exactly the weight the reference
// uses for bf16 activations; one `vpermw` turns 32 four-bit codes of a row into 32 bf16 weights, and that
// register feeds one `vdpbf16ps` (32 multiply-adds into 16 float32 lanes) per token of the tile. The decode is
// paid once per weight per tile of tokens, so at M > 1 its cost spreads over the tokens, while the lut kernels
// pay one lookup per weight triple, plane and token.
//
// Tiles: R rows x T tokens of accumulators stay in registers over a block of kBlockCols columns (lanes run
// along K; one block up to K = 16384), parked in a small per-piece buffer between blocks; one horizontal sum
// per (row, token) at the end. Activations are read from a bf16 copy made per call, laid out by unit: the 64
// columns of one unit for every token side by side (each group padded with zeros to whole units), so one
// pointer and constant offsets reach every token. Rows are claimed in pieces (parallel.h); the tokens are
// walked in passes of at most 8.
#include "trit_cpu.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define PTQTP_BF16DOT 1
#if defined(__linux__)
#include <sys/syscall.h>  // arch_prctl: the permission to use the AMX tile state
#include <unistd.h>
#endif
#else
#define PTQTP_BF16DOT 0
#endif

#include "parallel.h"

namespace ptqtp_cpu {

bool bf16dot_compiled() { return PTQTP_BF16DOT != 0; }

#if PTQTP_BF16DOT

#define PTQTP_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

namespace {

// t1 and t2 of every code c = (t1+1) + 3(t2+1); zero weight past c = 8
struct Digits {
  alignas(64) float t1[16], t2[16];
  Digits() {
    for (int c = 0; c < 16; ++c) {
      t1[c] = c < 9 ? static_cast<float>(c % 3 - 1) : 0.0f;
      t2[c] = c < 9 ? static_cast<float>(c / 3 - 1) : 0.0f;
    }
  }
};
const Digits kDigits;

constexpr int kMaxTokens = 8;        // tokens per pass over the rows
constexpr int kBlockCols = 16384;    // columns per pass: a pass's activations (8 tokens: 256 KB) stay in L2
constexpr int kPrefetchBytes = 2048; // codes prefetched this far ahead of the unit being decoded

// Running sums of the rows of one piece between column blocks: (rows, tokens, 16 lanes).
struct Partial {
  alignas(64) float v[kBf16DotMaxPieceRows][kMaxTokens][16];
};

// The nine weight values of (row, group) as a bf16 table; words 0-15 and 16-31 alike, so bit 4 of an index
// (the low bit of the other column's code) is free.
PTQTP_AVX512BF16 inline __m512i weight_table(const float* s, __m512 d1, __m512 d2) {
  const __m512 v = _mm512_fmadd_ps(d1, _mm512_set1_ps(s[0]), _mm512_mul_ps(d2, _mm512_set1_ps(s[1])));
  return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

// 64 bf16 weights of one unit of a row: byte j holds the code of column j (bits 0-3) and of column 32 + j
// (bits 4-7). The codes a few units ahead are prefetched: one hardware stream per row of a tile is not
// enough to keep a core fed from memory (single-thread streamed rate 1.5x with the prefetch).
PTQTP_AVX512BF16 inline void decode_unit(const uint8_t* codes, __m512i tab, __m512bh& lo, __m512bh& hi) {
  _mm_prefetch(reinterpret_cast<const char*>(codes) + kPrefetchBytes, _MM_HINT_T0);
  const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
  lo = (__m512bh)_mm512_permutexvar_epi16(c, tab);
  hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(c, 4), tab);
}

// rows r0 .. r0+R-1 (row i of the piece at rp + i), tokens t0 .. t0+T-1, groups [g0, g1): starts from zero on
// the first block, adds the bias and stores to y on the last, keeps the sums in `part` between blocks.
// Software-pipelined: the next unit's weights (and at a group's start the next group's tables) are decoded
// before this unit's dot products, so the dots never wait on a load -> vpermw chain or on the table build
// (vcvtne2ps2bf16 is slow on Zen 4): 1.2 against 1.5 cycles per vdpbf16ps with the layer in L2.
template <int R, int T>
PTQTP_AVX512BF16 void tile(const Bf16DotProblem& p, int64_t r0, int64_t rp, int64_t t0, int64_t g0, int64_t g1,
                           Partial& part) {
  const int64_t G = p.groups, U = p.units;
  const bool first = g0 == 0, last = g1 == G;
  const __m512 d1 = _mm512_load_ps(kDigits.t1), d2 = _mm512_load_ps(kDigits.t2);
  const uint8_t* codes[R];  // row r's unit (g, u) at codes[r] + (g * U + u) * 32
  const float* scales[R];   // row r's group g at scales[r] + 2 * g
  __m512 acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    codes[r] = p.codes + (r0 + r) * G * U * 32;
    scales[r] = p.scales + (r0 + r) * G * 2;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = first ? _mm512_setzero_ps() : _mm512_load_ps(part.v[rp + r][t]);
  }
  const uint16_t* x0 = p.x + t0 * kBf16DotUnit;  // unit u of token t at (u * m + t) * 64
  __m512i tab[R], tab_next[R];
  __m512bh lo[R], hi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    tab[r] = weight_table(scales[r] + 2 * g0, d1, d2);
    decode_unit(codes[r] + g0 * U * 32, tab[r], lo[r], hi[r]);
  }
  for (int64_t g = g0; g < g1; ++g) {
    const bool more = g + 1 < g1;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) tab_next[r] = tab[r];
    if (more) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) tab_next[r] = weight_table(scales[r] + 2 * (g + 1), d1, d2);
    }
    for (int64_t u = 0; u < U; ++u) {
      __m512bh lo_next[R], hi_next[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {  // kept when this is the tile's last unit
        lo_next[r] = lo[r];
        hi_next[r] = hi[r];
      }
      if (u + 1 < U) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) decode_unit(codes[r] + (g * U + u + 1) * 32, tab[r], lo_next[r], hi_next[r]);
      } else if (more) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) decode_unit(codes[r] + (g + 1) * U * 32, tab_next[r], lo_next[r], hi_next[r]);
      }
      // stream each activation vector once through all R rows
      const uint16_t* xu = x0 + (g * U + u) * p.m * kBf16DotUnit;
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m512bh xl = (__m512bh)_mm512_loadu_si512(xu + t * kBf16DotUnit);
        const __m512bh xh = (__m512bh)_mm512_loadu_si512(xu + t * kBf16DotUnit + 32);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], lo[r], xl);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], hi[r], xh);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        lo[r] = lo_next[r];
        hi[r] = hi_next[r];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) tab[r] = tab_next[r];
  }
  if (!last) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) _mm512_store_ps(part.v[rp + r][t], acc[r][t]);
    return;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float b = p.bias ? p.bias[r0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) p.y[(t0 + t) * p.y_stride + r0 + r] = _mm512_reduce_add_ps(acc[r][t]) + b;
  }
}

// rows [ra, rb) (at most kBf16DotMaxPieceRows) for tokens t0 .. t0+T-1, block by block of columns: R rows at a
// time, then one at a time
template <int R, int T>
PTQTP_AVX512BF16 void rows_as(const Bf16DotProblem& p, int64_t ra, int64_t rb, int64_t t0) {
  Partial part;
  const int64_t block = std::max<int64_t>(1, kBlockCols / (p.units * kBf16DotUnit));  // groups per block
  for (int64_t g0 = 0; g0 < p.groups; g0 += block) {
    const int64_t g1 = std::min(p.groups, g0 + block);
    int64_t r = ra;
    for (; r + R <= rb; r += R) tile<R, T>(p, r, r - ra, t0, g0, g1, part);
    for (; r < rb; ++r) tile<1, T>(p, r, r - ra, t0, g0, g1, part);
  }
}

// R x T accumulators: at most 16, so that codes, tables and weights fit in the other registers
PTQTP_AVX512BF16 void rows(const Bf16DotProblem& p, int64_t ra, int64_t rb) {
  for (; ra < rb; ra += kBf16DotMaxPieceRows) {
    const int64_t re = std::min(rb, ra + kBf16DotMaxPieceRows);
    int64_t t0 = 0;
    for (; t0 + kMaxTokens <= p.m; t0 += kMaxTokens) rows_as<2, kMaxTokens>(p, ra, re, t0);
    switch (p.m - t0) {
      case 1: rows_as<4, 1>(p, ra, re, t0); break;
      case 2: rows_as<4, 2>(p, ra, re, t0); break;
      case 3: rows_as<4, 3>(p, ra, re, t0); break;
      case 4: rows_as<4, 4>(p, ra, re, t0); break;
      case 5: rows_as<2, 5>(p, ra, re, t0); break;
      case 6: rows_as<2, 6>(p, ra, re, t0); break;
      case 7: rows_as<2, 7>(p, ra, re, t0); break;
      default: break;
    }
  }
}

// 16 rows of 16 dwords, transposed in registers (unpack 32, unpack 64, two 128-bit lane shuffles)
PTQTP_AVX512BF16 inline void transpose16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {
    b[4 * j] = _mm512_unpacklo_epi64(a[4 * j], a[4 * j + 2]);
    b[4 * j + 1] = _mm512_unpackhi_epi64(a[4 * j], a[4 * j + 2]);
    b[4 * j + 2] = _mm512_unpacklo_epi64(a[4 * j + 1], a[4 * j + 3]);
    b[4 * j + 3] = _mm512_unpackhi_epi64(a[4 * j + 1], a[4 * j + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // b[4j + q], 128-bit lane L: rows 4j..4j+3 of column 4L + q
    const __m512i c1 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0x88), c2 = _mm512_shuffle_i32x4(b[q], b[4 + q], 0xDD);
    const __m512i d1 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0x88);
    const __m512i d2 = _mm512_shuffle_i32x4(b[8 + q], b[12 + q], 0xDD);
    r[q] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    r[8 + q] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
    r[4 + q] = _mm512_shuffle_i32x4(c2, d2, 0x88);
    r[12 + q] = _mm512_shuffle_i32x4(c2, d2, 0xDD);
  }
}

// ---- the same decode, with the dot products on AMX tiles ---------------------------------------------------
// vdpbf16ps does 32 multiply-adds per instruction and token, so at M = 8 bf16dot spends twice as long on dots
// as on decoding. With AMX one tdpbf16ps multiplies a 16 x 32 tile of decoded weights (A: 16 rows, the 32
// columns of half a unit) by the 32 x M activations (B, pairs of columns side by side per token) into 16 x M
// float32 sums (C), in less time than the vector unit takes to decode those rows (about half, measured): the
// decode and the memory stream are left, whatever M. The weights carry their scales (the same nine-value
// tables), so C sums the whole row.
#define PTQTP_AMX __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: tmm0-3 the sums (C) of up to four 16-row blocks, each its own chain of tdpbf16ps so that the
// instruction's latency overlaps (on one thread, two chains were 8 % slower than four; the threads claim pieces
// of BF16DOT_GRAIN_ROWS = 32 rows, two chains, which balances small layers better: pieces of 64 rows timed within
// noise on 4096x4096 and 1536x576); tmm4/5 the decoded weights (A) of one block for the
// unit's low and high 32 columns, reloaded per block; tmm6/7 the activations (B) of those columns.
PTQTP_AMX void amx_configure(int64_t m) {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = static_cast<uint16_t>(t == 4 || t == 5 ? 64 : 4 * m);
  }
  _tile_loadconfig(&c);
}

constexpr int kAmxBlocks = 4;

struct AmxScratch {
  alignas(64) uint16_t a[kAmxBlocks][2][16][32];  // (block, half, row, column): decoded weights, tiles A
  alignas(64) __m512i tab[kAmxBlocks][16];        // the nine-value tables of the current group, per block and row
  alignas(64) float c[16][16];                    // one C tile, to add the bias and store
};

// C of block b += A (s.a[b]) x B, and C of block b to s.c: the intrinsics paste tile numbers into the
// instruction text, so each block gets its own line
PTQTP_AMX inline void amx_dot(int b, const AmxScratch& s) {
  _tile_loadd(4, s.a[b][0], 64);
  _tile_loadd(5, s.a[b][1], 64);
  switch (b) {
#define PTQTP_AMX_DOT(C) case C: _tile_dpbf16ps(C, 4, 6); _tile_dpbf16ps(C, 5, 7); break;
    PTQTP_AMX_DOT(0) PTQTP_AMX_DOT(1) PTQTP_AMX_DOT(2) PTQTP_AMX_DOT(3)
#undef PTQTP_AMX_DOT
  }
}

PTQTP_AMX inline void amx_store(int b, AmxScratch& s) {
  switch (b) {
#define PTQTP_AMX_STORE(C) case C: _tile_stored(C, s.c, 64); break;
    PTQTP_AMX_STORE(0) PTQTP_AMX_STORE(1) PTQTP_AMX_STORE(2) PTQTP_AMX_STORE(3)
#undef PTQTP_AMX_STORE
  }
}

// B (1..4) 16-row blocks from row r0 over all columns: rows past n are decoded as zeros and not stored.
template <int B>
PTQTP_AMX void amx_blocks(const Bf16DotProblem& p, int64_t r0, AmxScratch& s) {
  const int64_t G = p.groups, U = p.units, m = p.m, rb = r0 / 16;
  const __m512 d1 = _mm512_load_ps(kDigits.t1), d2 = _mm512_load_ps(kDigits.t2);
  int live[B];
  for (int b = 0; b < B; ++b) {
    live[b] = static_cast<int>(std::clamp<int64_t>(p.n - r0 - 16 * b, 0, 16));
    for (int r = live[b]; r < 16; ++r)
      for (int h = 0; h < 2; ++h) _mm512_store_si512(s.a[b][h][r], _mm512_setzero_si512());
  }
  _tile_zero(0);
  if (B > 1) _tile_zero(1);
  if (B > 2) _tile_zero(2);
  if (B > 3) _tile_zero(3);
  for (int64_t g = 0; g < G; ++g) {
    for (int b = 0; b < B; ++b) {
      const float* sc = p.scales + ((rb + b) * G + g) * 32;  // (a1, a2) of the block's 16 rows
      for (int r = 0; r < live[b]; ++r) s.tab[b][r] = weight_table(sc + 2 * r, d1, d2);
    }
    for (int64_t u = 0; u < U; ++u) {
      const uint16_t* xb = p.x + (g * U + u) * 64 * m;  // B of the low half; the high half 32 * m further
      _tile_loadd(6, xb, 4 * m);
      _tile_loadd(7, xb + 32 * m, 4 * m);
      for (int b = 0; b < B; ++b) {
        const uint8_t* unit = p.codes + (((rb + b) * G + g) * U + u) * 512;  // 16 rows x 32 bytes
        for (int r = 0; r < live[b]; ++r) {
          __m512bh lo, hi;
          decode_unit(unit + 32 * r, s.tab[b][r], lo, hi);
          _mm512_store_si512(s.a[b][0][r], (__m512i)lo);
          _mm512_store_si512(s.a[b][1][r], (__m512i)hi);
        }
        amx_dot(b, s);
      }
    }
  }
  // C is (row, token); y is (token, row): transposed in registers, one masked store per token (a store per
  // element put the m rows of y, n floats apart, in one L1 set: a quarter of the time at M = 16, n = 4096)
  for (int b = 0; b < B; ++b) {
    amx_store(b, s);
    __m512i c[16];
    for (int r = 0; r < 16; ++r) c[r] = _mm512_load_si512(s.c[r]);
    transpose16(c);
    const int64_t row = r0 + 16 * b;
    const __mmask16 rows = static_cast<__mmask16>((1u << live[b]) - 1u);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(rows, p.bias + row) : _mm512_setzero_ps();
    for (int64_t t = 0; t < m; ++t)
      _mm512_mask_storeu_ps(p.y + t * p.y_stride + row, rows, _mm512_add_ps(_mm512_castsi512_ps(c[t]), bias));
  }
}

PTQTP_AMX void amx_rows(const Bf16DotProblem& p, int64_t ra, int64_t rb) {
  AmxScratch s;
  amx_configure(p.m);
  for (; ra < rb; ra += 16 * kAmxBlocks) {
    switch (std::min<int64_t>(kAmxBlocks, (rb - ra + 15) / 16)) {
      case 1: amx_blocks<1>(p, ra, s); break;
      case 2: amx_blocks<2>(p, ra, s); break;
      case 3: amx_blocks<3>(p, ra, s); break;
      default: amx_blocks<4>(p, ra, s); break;
    }
  }
  _tile_release();
}

}  // namespace

void gemv_bf16dot(const Bf16DotProblem& p) {
  if (p.amx) {  // rows in pieces of whole 16-row blocks
    const int64_t blocks = (p.n + 15) / 16, grain = std::max<int64_t>(1, p.grain_rows / 16);
    parallel_items(blocks, grain, p.threads,
                   [&](int64_t b0, int64_t b1) { amx_rows(p, 16 * b0, std::min(p.n, 16 * b1)); });
    return;
  }
  parallel_items(p.n, p.grain_rows, p.threads, [&](int64_t ra, int64_t rb) { rows(p, ra, rb); });
}

PTQTP_AVX512BF16 void amx_activations(const uint16_t* x, int64_t m, int64_t k, int64_t group_size, int64_t groups,
                                      int64_t units, uint16_t* out) {
  const __mmask16 tokens = static_cast<__mmask16>((1u << m) - 1u);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t c0 = g * group_size + u * kBf16DotUnit;
      const int64_t cols = std::min<int64_t>({kBf16DotUnit, group_size - u * kBf16DotUnit, k - c0});
      for (int h = 0; h < 2; ++h) {
        uint16_t* dst = out + ((g * units + u) * 2 + h) * 16 * m * 2;  // 16 rows of m column pairs
        const int64_t ch = std::clamp<int64_t>(cols - 32 * h, 0, 32);
        const __mmask32 live = ch == 32 ? ~0u : static_cast<__mmask32>((1u << ch) - 1u);
        __m512i r[16];
        for (int64_t t = 0; t < 16; ++t)
          r[t] = t < m && ch > 0 ? _mm512_maskz_loadu_epi16(live, x + t * k + c0 + 32 * h) : _mm512_setzero_si512();
        transpose16(r);
        for (int p = 0; p < 16; ++p) _mm512_mask_storeu_epi32(dst + p * m * 2, tokens, r[p]);
      }
    }
}

bool amx_usable() {
  static const bool usable = [] {
#if defined(__linux__) && defined(__x86_64__)
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;  // AMX-BF16, AMX-TILE
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;  // the OS saves the tile config and data
    // Linux hands out the 8 KB tile state per process on request
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

#else  // not x86: never selected (cpu_best_isa() returns generic)

void gemv_bf16dot(const Bf16DotProblem&) {}
void amx_activations(const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, uint16_t*) {}
bool amx_usable() { return false; }

#endif

}  // namespace ptqtp_cpu
