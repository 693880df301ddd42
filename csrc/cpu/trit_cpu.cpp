// Torch-free CPU kernels: ISA detection, the lut3 GEMV (AVX2, compiled for that target only and chosen at run
// time, and its portable generic twin) and the dequantize of the storage format. lut27 lives in lut27_avx512.cpp.
#include "trit_cpu.h"

#include <algorithm>
#include <cmath>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the AVX2 kernel below; other CPUs build the generic one only
#endif

namespace ptqtp_cpu {

int cpu_best_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();  // libgcc also checks that the OS saves the ymm / zmm state (XCR0)
  if (lut27_compiled() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return !bf16dot_compiled() || !__builtin_cpu_supports("avx512bf16") ? kAvx512 : amx_usable() ? kAmx : kAvx512Bf16;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kGeneric;
}

void build_tables(const float* x, int64_t k, int64_t group_size, int64_t groups, int64_t words, float* tables) {
  const int64_t slots = words * kChunksPerWord;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = g * group_size;
    const int64_t g_end = std::min(g0 + group_size, k);
    for (int64_t c = 0; c < slots; ++c) {
      float v[kChunk];
      for (int i = 0; i < kChunk; ++i) {
        const int64_t col = g0 + c * kChunk + i;
        v[i] = col < g_end ? x[col] : 0.0f;
      }
      float* t = tables + (g * slots + c) * 8;
      t[0] = 0.0f;
      t[1] = v[0];
      t[2] = v[1];
      t[3] = v[0] + v[1];
      t[4] = v[2];
      t[5] = v[0] + v[2];
      t[6] = v[1] + v[2];
      t[7] = (v[0] + v[1]) + v[2];
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2,fma"))) static void gemv_block_avx2(const float* tables, int64_t m,
                                                                const int32_t* codes, const float* scales,
                                                                int64_t groups, int64_t words, int64_t chunks,
                                                                int64_t rb, int64_t n, const float* bias, float* y,
                                                                int64_t y_stride) {
  const int64_t r0 = rb * kRowsPerBlock;
  const int live = static_cast<int>(std::min<int64_t>(kRowsPerBlock, n - r0));
  const int64_t slots = words * kChunksPerWord;
  const int64_t block_words = groups * 4 * words * kRowsPerBlock;
  for (int64_t t = 0; t < m; ++t) {
    const int32_t* cp = codes + rb * block_words;
    const float* sp = scales + rb * groups * 2 * kRowsPerBlock;
    const float* tab = tables + t * groups * slots * 8;
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256 p0 = _mm256_setzero_ps(), n0 = _mm256_setzero_ps();
      __m256 p1 = _mm256_setzero_ps(), n1 = _mm256_setzero_ps();
      for (int64_t w = 0; w < words; ++w) {
        __m256i cp0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + (0 * words + w) * 8));
        __m256i cn0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + (1 * words + w) * 8));
        __m256i cp1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + (2 * words + w) * 8));
        __m256i cn1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cp + (3 * words + w) * 8));
        const float* tw = tab + (g * slots + w * kChunksPerWord) * 8;
        const int64_t nc = std::min<int64_t>(kChunksPerWord, chunks - w * kChunksPerWord);
        for (int64_t c = 0; c < nc; ++c) {
          // vpermps reads only the low 3 bits of each lane: the code of chunk c after c shifts by 3
          const __m256 tv = _mm256_loadu_ps(tw + c * 8);
          p0 = _mm256_add_ps(p0, _mm256_permutevar8x32_ps(tv, cp0));
          n0 = _mm256_add_ps(n0, _mm256_permutevar8x32_ps(tv, cn0));
          p1 = _mm256_add_ps(p1, _mm256_permutevar8x32_ps(tv, cp1));
          n1 = _mm256_add_ps(n1, _mm256_permutevar8x32_ps(tv, cn1));
          cp0 = _mm256_srli_epi32(cp0, kChunk);
          cn0 = _mm256_srli_epi32(cn0, kChunk);
          cp1 = _mm256_srli_epi32(cp1, kChunk);
          cn1 = _mm256_srli_epi32(cn1, kChunk);
        }
      }
      total = _mm256_fmadd_ps(_mm256_loadu_ps(sp), _mm256_sub_ps(p0, n0), total);
      total = _mm256_fmadd_ps(_mm256_loadu_ps(sp + 8), _mm256_sub_ps(p1, n1), total);
      cp += 4 * words * kRowsPerBlock;
      sp += 2 * kRowsPerBlock;
    }
    alignas(32) float out[kRowsPerBlock];
    _mm256_store_ps(out, total);
    for (int i = 0; i < live; ++i) y[t * y_stride + r0 + i] = bias ? out[i] + bias[r0 + i] : out[i];
  }
}
#endif

static void gemv_block_generic(const float* tables, int64_t m, const int32_t* codes, const float* scales,
                               int64_t groups, int64_t words, int64_t chunks, int64_t rb, int64_t n,
                               const float* bias, float* y, int64_t y_stride) {
  const int64_t r0 = rb * kRowsPerBlock;
  const int live = static_cast<int>(std::min<int64_t>(kRowsPerBlock, n - r0));
  const int64_t slots = words * kChunksPerWord;
  const int64_t block_words = groups * 4 * words * kRowsPerBlock;
  for (int64_t t = 0; t < m; ++t) {
    const float* tab = tables + t * groups * slots * 8;
    for (int lane = 0; lane < live; ++lane) {
      const int32_t* cp = codes + rb * block_words + lane;
      const float* sp = scales + rb * groups * 2 * kRowsPerBlock + lane;
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // P1, N1, P2, N2
        for (int64_t w = 0; w < words; ++w) {
          const float* tw = tab + (g * slots + w * kChunksPerWord) * 8;
          const int64_t nc = std::min<int64_t>(kChunksPerWord, chunks - w * kChunksPerWord);
          for (int q = 0; q < 4; ++q) {
            uint32_t word = static_cast<uint32_t>(cp[(q * words + w) * kRowsPerBlock]);
            for (int64_t c = 0; c < nc; ++c, word >>= kChunk) acc[q] += tw[c * 8 + (word & 7u)];
          }
        }
        total = std::fma(sp[0], acc[0] - acc[1], total);
        total = std::fma(sp[kRowsPerBlock], acc[2] - acc[3], total);
        cp += 4 * words * kRowsPerBlock;
        sp += 2 * kRowsPerBlock;
      }
      y[t * y_stride + r0 + lane] = bias ? total + bias[r0 + lane] : total;
    }
  }
}

void gemv_lut3_block(const float* tables, int64_t m, const int32_t* codes, const float* scales, int64_t groups,
                     int64_t words, int64_t chunks, int64_t rb, int64_t n, const float* bias, float* y,
                     int64_t y_stride, bool use_avx2) {
#if defined(__x86_64__) || defined(__i386__)
  if (use_avx2) {
    gemv_block_avx2(tables, m, codes, scales, groups, words, chunks, rb, n, bias, y, y_stride);
    return;
  }
#endif
  gemv_block_generic(tables, m, codes, scales, groups, words, chunks, rb, n, bias, y, y_stride);
}

namespace {
struct TritTable {  // trits of every byte value: digit i of b is (b / 3^i) % 3, minus 1
  int8_t t[256][5];
  TritTable() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0, v = b; i < 5; ++i, v /= 3) t[b][i] = static_cast<int8_t>(v % 3 - 1);
  }
};
const TritTable kTrits;
}  // namespace

void dequantize_row(const uint8_t* p0, const uint8_t* p1, const float* s0, const float* s1, int64_t k,
                    int64_t group_size, float* out) {
  for (int64_t g0 = 0, g = 0; g0 < k; g0 += group_size, ++g) {
    const int64_t g_end = std::min(g0 + group_size, k);
    const float a = s0[g], b = s1[g];
    for (int64_t col = g0; col < g_end; ++col) {
      const int8_t t0 = kTrits.t[p0[col / 5]][col % 5];
      const int8_t t1 = kTrits.t[p1[col / 5]][col % 5];
      // same float32 sum as the torch reference (a*t0 + b*t1), so prefill matches it bit for bit
      out[col] = a * static_cast<float>(t0) + b * static_cast<float>(t1);
    }
  }
}

}  // namespace ptqtp_cpu
