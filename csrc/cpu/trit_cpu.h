// Torch-free CPU kernels for trit-plane linears (the layouts they read are built in
// ptqtp/backends/cpu_layouts.py).
//
// Three GEMV families, picked at run time by ISA (cpu_best_isa) and activation dtype:
//   bf16dot (AVX-512 BF16, bf16 activations): per (row, group) a table of the nine bf16 weight values; one
//     vpermw decodes 32 weights of a row, which feed one vdpbf16ps per token. With AMX-BF16 (Bf16DotProblem::amx,
//     "bf16amx") the decoded 16 rows x 32 columns are a tile that one tdpbf16ps multiplies by all tokens.
//   lut27 (AVX-512F): per token and chunk of 3 columns a table of the 27 signed sums d0*x0 + d1*x1 + d2*x2,
//     looked up for 16 rows x 1 plane by one vpermt2ps on a 5-bit code per (row, chunk, plane).
//   lut3 (AVX2 + scalar twin): per chunk the 8 subset sums of 3 columns, looked up by vpermps with the +1 (P)
//     and -1 (N) masks: t . x = S[P] - S[N].
// lut27 and lut3: no multiplication per weight; the two scales multiply the partial sums once per (row, group).
//
// Activations come in as float32 (the binding converts bf16 / fp16); outputs are float32 with the bias added
// (the binding casts to the activation dtype when that is not float32).
#pragma once
#include <cstdint>

namespace ptqtp_cpu {

enum Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// Best kernel ISA this CPU and OS run: AMX-BF16 on top of AVX512-BF16 (the bf16dot decode with AMX dot
// products), AVX-512F+BW+BF16 (bf16dot for bf16 activations, lut27 otherwise), AVX-512F+BW (lut27), AVX2+FMA
// (lut3), or generic (lut3 scalar).
int cpu_best_isa();

// ---- lut3 (AVX2 and generic) -------------------------------------------------------------------------------
constexpr int kRowsPerBlock = 8;    // AVX2 fp32 lanes: one lane per output row
constexpr int kChunk = 3;           // columns per lookup: 2^3 subset sums fill one AVX2 register
constexpr int kChunksPerWord = 10;  // 3-bit codes per int32 word

// tables (G * W * 10 * 8): subset sums of x per (group, chunk); chunks past a group's end or past K sum zeros.
void build_tables(const float* x, int64_t k, int64_t group_size, int64_t groups, int64_t words, float* tables);

// One block of 8 rows for m tokens. codes: int32 (R, G, 2, 2, W, 8); scales: float (R, G, 2, 8);
// tables: m x (G * W * 10 * 8); y: m rows of stride y_stride; this block's outputs (rows < n) written at rb * 8,
// plus bias[row] when bias is not null.
void gemv_lut3_block(const float* tables, int64_t m, const int32_t* codes, const float* scales, int64_t groups,
                     int64_t words, int64_t chunks, int64_t rb, int64_t n, const float* bias, float* y,
                     int64_t y_stride, bool use_avx2);

// ---- lut27 (AVX-512F) --------------------------------------------------------------------------------------
constexpr int kLut27Rows = 16;          // fp32 lanes of a zmm register: one lane per output row
constexpr int kLut27CodesPerWord = 6;   // 5-bit codes per int32 word: bits 0, 5, 10, 16, 21, 26; 15 and 31 spare
constexpr int kLut27TableFloats = 32;   // 27 sums + 5 zeros: two zmm registers, the vpermt2ps table
constexpr int kLut27MaxTokens = 16;     // decode path only (GEMV_MAX_M)
constexpr int kLut27GrainBlocks = 4;    // 16-row blocks per claimed piece of work (64 rows)

struct Lut27Problem {
  const float* x;         // (m, k) float32, row stride x_stride
  int64_t x_stride;
  const int32_t* codes;   // (R16, G, 2, W, 16) int32, see ptqtp/layouts.py
  const uint16_t* scales; // (R16, G, 2, 16) float16 bits
  const float* bias;      // (n,) or null
  float* y;               // (m, n) float32, row stride y_stride
  int64_t y_stride;
  float* tables;          // scratch: m * G * C * 32 floats
  float* partial;         // scratch: m * R16 * 16 floats (used only when the groups are walked in tiles)
  int64_t m, n, k, group_size, groups, chunks, words;
  bool tail_in_spare;     // a last chunk of <= 2 columns has its 4-bit code in bits 15, 31 of words 0 and 1
  int64_t tile_groups;    // groups per pass over the rows (keeps m tables of that many groups in L2)
  int threads;
};

bool lut27_compiled();  // false when this compiler could not build the AVX-512 code
void gemv_lut27(const Lut27Problem& p);

// ---- bf16dot (AVX-512F/BW + AVX512-BF16), bfloat16 activations --------------------------------------------
constexpr int kBf16DotUnit = 64;          // columns per 32-byte unit of codes (two 4-bit codes per byte)
constexpr int kBf16DotMaxPieceRows = 32;  // rows walked together per pass over a block of columns

struct Bf16DotProblem {
  const uint16_t* x;      // bf16 bits, unit-major, each group zero-padded to U units of 64 columns:
                          // (G * U, m, 64), or with amx (G * U, 2, 16, m, 2): per half unit, column pairs x tokens
  const uint8_t* codes;   // (N, G, U, 32): byte j of a unit = code of column j | code of column 32 + j << 4
  const float* scales;    // (N, G, 2) float32: a1, a2
  const float* bias;      // (n,) or null
  float* y;               // (m, n) float32, row stride y_stride
  int64_t y_stride;
  int64_t m, n, groups, units;
  int64_t grain_rows;     // rows per claimed piece of work
  int threads;
  bool amx;               // dot products on AMX tiles (needs amx_usable())
};

bool bf16dot_compiled();
bool amx_usable();  // this CPU has AMX-BF16 and the OS granted this process the tile state (asked once)
// x (m <= 16, k) bf16 bits, row-major, into the amx activation layout of Bf16DotProblem::x (all of it written)
void amx_activations(const uint16_t* x, int64_t m, int64_t k, int64_t group_size, int64_t groups, int64_t units,
                     uint16_t* out);
void gemv_bf16dot(const Bf16DotProblem& p);

// ---- dense GEMV (AVX-512F float32 / AVX512-BF16 bfloat16): the Linears a quantized model keeps dense ----------
constexpr int kDenseGemvMaxTokens = 4;

struct DenseGemvProblem {
  const void* x;          // (m, k) float32 or bf16 bits, row stride x_stride
  int64_t x_stride;
  const void* w;          // (n, k) in x's dtype, row stride w_stride
  int64_t w_stride;
  bool bf16;              // x and w are bf16 (else float32)
  const float* bias;      // (n,) or null
  float* y;               // (m, n) float32, row stride y_stride
  int64_t y_stride;
  int64_t m, n, k;        // m <= kDenseGemvMaxTokens
  int64_t grain_rows;     // rows per claimed piece of work
  int threads;
};

bool dense_gemv_compiled();
void gemv_dense(const DenseGemvProblem& p);

// One dense row from the storage format: packed planes p0/p1 (ceil(k/5) bytes each), float scales s0/s1 (G).
void dequantize_row(const uint8_t* p0, const uint8_t* p1, const float* s0, const float* s1, int64_t k,
                    int64_t group_size, float* out);

}  // namespace ptqtp_cpu
