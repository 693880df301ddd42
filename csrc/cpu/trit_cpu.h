// Torch-free CPU kernels for trit-plane linears (see ptqtp/layouts.py for the "lut3" layout they read).
//
// y[m, r] = sum_g  a1[r, g] * (S[P1] - S[N1]) + a2[r, g] * (S[P2] - S[N2])
// where S are the 8 subset sums of 3 activations (one table per chunk of 3 columns and token), and P/N are the
// 3-bit masks of +1/-1 trits of a chunk: no multiplication per weight, the two scales once per (row, group).
#pragma once
#include <cstdint>

namespace ptqtp_cpu {

constexpr int kRowsPerBlock = 8;    // AVX2 fp32 lanes: one lane per output row
constexpr int kChunk = 3;           // columns per lookup: 2^3 subset sums fill one AVX2 register
constexpr int kChunksPerWord = 10;  // 3-bit codes per int32 word

bool cpu_has_avx2();

// tables (G * W * 10 * 8): subset sums of x per (group, chunk); chunks past a group's end or past K sum zeros.
void build_tables(const float* x, int64_t k, int64_t group_size, int64_t groups, int64_t words, float* tables);

// One block of 8 rows for m tokens. codes: int32 (R, G, 2, 2, W, 8); scales: float (R, G, 2, 8);
// tables: m x (G * W * 10 * 8); y: m rows of stride y_stride, this block's 8 outputs written at rb * 8.
void gemv_lut3_block(const float* tables, int64_t m, const int32_t* codes, const float* scales, int64_t groups,
                     int64_t words, int64_t chunks, int64_t rb, float* y, int64_t y_stride, bool use_avx2);

// One dense row from the storage format: packed planes p0/p1 (ceil(k/5) bytes each), float scales s0/s1 (G).
void dequantize_row(const uint8_t* p0, const uint8_t* p1, const float* s0, const float* s1, int64_t k,
                    int64_t group_size, float* out);

}  // namespace ptqtp_cpu
