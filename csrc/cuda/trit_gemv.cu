// Decode kernel (1 <= M <= 16 tokens) on tensor cores, reading the GPU "trit2" layout (see trit_cuda.h).
//
// A block is 4 warps; a warp owns 32 output rows (four mma n-tiles of 8) over the block's range of K. Per
// 256-column layout block each lane issues eight 128-bit loads (4 n-tiles x 2 planes; a warp-wide load is one
// contiguous 512-byte tile), all in flight before the first use. A word holds exactly the digits that its lane's
// mma.m16n8k16 B fragments need for 64 columns, so one B register (two trits) costs a shift, an AND-OR into
// the mantissa of 1024 (fp16) or 128 (bf16) and a subtraction: no table, no division, no select. The
// activations of the block's K range are staged once per block in shared memory (zero-padded; rows >= M read a
// zero row) and fed by ldmatrix. Each plane's partial sums stay in fp32 mma accumulators for one group, then
// take their two scales (the group size is a template parameter, so where groups end is known at compile
// time). Split-K: every split stores fp32 partials, and the last block of a row block to finish (a counter)
// sums them in split order, adds the bias, casts and stores, and resets the counter: one launch, deterministic.
#include "trit_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ptqtp_cuda {
namespace {

constexpr int kWarps = kRowsPerBlock / 32;
constexpr int kTilesPerWarp = 4;        // n-tiles of 8 rows per warp
constexpr int kSmemBudget = 48 * 1024;  // staged activations per block (the default limit, no opt-in)
constexpr int kPad = 8;                 // elements appended to each staged row: ldmatrix rows hit distinct banks

template <typename T>
struct Traits;

template <>
struct Traits<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024): OR a digit d into the mantissa -> 1024 + d
  __device__ static uint32_t trits(uint32_t bits) {  // (1024 + d) - 1025 = t, exact
    const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&bits), __half2half2(__ushort_as_half(0x6401)));
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static float to_float(__half v) { return __half2float(v); }
};

template <>
struct Traits<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bfloat162(128, 128): 128 + d, exact with 7 mantissa bits
  __device__ static uint32_t trits(uint32_t bits) {  // (128 + d) - 129 = t
#if __CUDA_ARCH__ >= 800
    const __nv_bfloat162 v = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&bits),
                                     __bfloat162bfloat162(__ushort_as_bfloat16(0x4301)));
    return *reinterpret_cast<const uint32_t*>(&v);
#else
    __trap();
    return 0;
#endif
  }
  __device__ static void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// (a & mask) | magic in one LOP3: left to itself the compiler emits an AND and an OR (one immediate each)
template <uint32_t kMask, uint32_t kMagic>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "n"(kMask), "n"(kMagic));
  return r;
}

template <int J>
__device__ __forceinline__ uint32_t word(const int4& v) {
  return static_cast<uint32_t>(J == 0 ? v.x : J == 1 ? v.y : J == 2 ? v.z : v.w);
}

// Columns [col0, col0 + cols) of x's rows 0..M-1 into rows 0..M-1 of the stage, zeros past K; row M all zero.
template <typename T>
__device__ void stage_activations(T* xs, const T* x, const GemvArgs& a, int col0, int cols, int pitch) {
  const bool vec = a.stride_xm % 8 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  const int vecs = cols / 8;
  for (int i = threadIdx.x; i < (a.m + 1) * vecs; i += blockDim.x) {
    const int r = i / vecs, c = (i % vecs) * 8, gc = col0 + c;
    int4 v = make_int4(0, 0, 0, 0);
    if (r < a.m) {
      const T* src = x + r * a.stride_xm + gc;
      if (vec && gc + 8 <= a.k) {
        v = __ldg(reinterpret_cast<const int4*>(src));
      } else {
        T tmp[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) tmp[e] = gc + e < a.k ? src[e] : Traits<T>::from_float(0.0f);
        v = *reinterpret_cast<const int4*>(tmp);
      }
    }
    *reinterpret_cast<int4*>(xs + r * pitch + c) = v;
  }
}

// acc += a1 * part[0] + a2 * part[1] for group g (fragment column 2q, 2q + 1 = rows of a half2), part = 0.
__device__ __forceinline__ void apply_scales(float (&acc)[kTilesPerWarp][4], float (&part)[2][kTilesPerWarp][4],
                                             const __half* scales, const GemvArgs& a, int tile0, int q, int g) {
  if (g < a.groups) {  // groups past the last hold only the zero trits of the K padding
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t) {
      const int row = (tile0 + t) * 8 + 2 * q;
      const float2 s0 = __half22float2(*reinterpret_cast<const __half2*>(scales + (size_t)(2 * g) * a.n_padded + row));
      const float2 s1 =
          __half22float2(*reinterpret_cast<const __half2*>(scales + (size_t)(2 * g + 1) * a.n_padded + row));
      acc[t][0] += s0.x * part[0][t][0] + s1.x * part[1][t][0];
      acc[t][1] += s0.y * part[0][t][1] + s1.y * part[1][t][1];
      acc[t][2] += s0.x * part[0][t][2] + s1.x * part[1][t][2];
      acc[t][3] += s0.y * part[0][t][3] + s1.y * part[1][t][3];
    }
  }
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[p][t][e] = 0.0f;
}

// One 64-column sub-block J of a layout block: 4 k-tiles x 4 n-tiles x 2 planes of mma.
template <typename T, int J>
__device__ __forceinline__ void sub_block(float (&part)[2][kTilesPerWarp][4], const int4 (&w)[2][kTilesPerWarp],
                                          uint32_t a_addr) {
#pragma unroll
  for (int kt = 0; kt < 4; ++kt) {
    uint32_t af[4];
    ldmatrix_x4(af, a_addr + (64 * J + 16 * kt) * sizeof(T));
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t)
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const uint32_t bits = word<J>(w[p][t]) >> (4 * kt);  // fields 2kt (register 0) and 2kt + 1 (register 1)
        const uint32_t b0 = Traits<T>::trits(and_or<0x00030003u, Traits<T>::kMagic>(bits));
        const uint32_t b1 = Traits<T>::trits(and_or<0x00030003u, Traits<T>::kMagic>(bits >> 2));
        Traits<T>::mma(part[p][t], af, b0, b1);
      }
  }
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kWarps * 32, 3) trit_gemv_kernel(const GemvArgs a, int chunk_blocks) {
  static_assert(kBlockCols % GROUP == 0 && GROUP % 64 == 0, "a group is whole 64-column sub-blocks of a block");
  extern __shared__ __align__(16) unsigned char smem[];
  T* xs = reinterpret_cast<T*>(smem);  // (M + 1, pitch)
  const T* x = static_cast<const T*>(a.x);
  const int4* codes = reinterpret_cast<const int4*>(a.codes);
  const __half* scales = reinterpret_cast<const __half*>(a.scales);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, q = lane & 3;
  const int tile0 = (blockIdx.x * kWarps + warp) * kTilesPerWarp;  // first n-tile of this warp
  const int kb_begin = blockIdx.y * a.blocks_per_split;
  const int kb_end = min(kb_begin + a.blocks_per_split, a.k_blocks);
  const int pitch = chunk_blocks * kBlockCols + kPad;
  // ldmatrix.x4: lanes 0-15 give rows 0-15 at column 0, lanes 16-31 rows 0-15 at column 8 of each k-tile
  const int a_row = min(lane & 15, a.m);  // row M of the stage is zero
  const uint32_t a_lane = static_cast<uint32_t>(__cvta_generic_to_shared(xs + a_row * pitch + (lane >> 4) * 8));

  float acc[kTilesPerWarp][4] = {};
  float part[2][kTilesPerWarp][4] = {};
  for (int c0 = kb_begin; c0 < kb_end; c0 += chunk_blocks) {
    const int c1 = min(c0 + chunk_blocks, kb_end);
    __syncthreads();  // the previous chunk's readers are done
    stage_activations(xs, x, a, c0 * kBlockCols, (c1 - c0) * kBlockCols, pitch);
    __syncthreads();
    for (int kb = c0; kb < c1; ++kb) {
      int4 w[2][kTilesPerWarp];
#pragma unroll
      for (int t = 0; t < kTilesPerWarp; ++t)
#pragma unroll
        for (int p = 0; p < 2; ++p)  // streamed once: evict-first
          w[p][t] = __ldcs(codes + ((static_cast<size_t>(tile0 + t) * a.k_blocks + kb) * 2 + p) * 32 + lane);
      const uint32_t a_addr = a_lane + (kb - c0) * kBlockCols * sizeof(T);
      const int g0 = kb * (kBlockCols / GROUP);  // first group of this block
      // a group ends after sub-block J when 64 (J + 1) is a multiple of GROUP: known at compile time
      sub_block<T, 0>(part, w, a_addr);
      if constexpr (64 % GROUP == 0) apply_scales(acc, part, scales, a, tile0, q, g0 + 64 / GROUP - 1);
      sub_block<T, 1>(part, w, a_addr);
      if constexpr (128 % GROUP == 0) apply_scales(acc, part, scales, a, tile0, q, g0 + 128 / GROUP - 1);
      sub_block<T, 2>(part, w, a_addr);
      if constexpr (192 % GROUP == 0) apply_scales(acc, part, scales, a, tile0, q, g0 + 192 / GROUP - 1);
      sub_block<T, 3>(part, w, a_addr);
      apply_scales(acc, part, scales, a, tile0, q, g0 + 256 / GROUP - 1);
    }
  }

  // accumulator e of n-tile t: token gid + 8 (e >> 1), row (tile0 + t) * 8 + 2q + (e & 1)
  T* y = static_cast<T*>(a.y);
  const T* bias = static_cast<const T*>(a.bias);
  if (a.split == 1) {
#pragma unroll
    for (int t = 0; t < kTilesPerWarp; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int token = gid + 8 * (e >> 1), row = (tile0 + t) * 8 + 2 * q + (e & 1);
        if (token < a.m && row < a.n)
          y[static_cast<size_t>(token) * a.n + row] =
              Traits<T>::from_float(acc[t][e] + (bias ? Traits<T>::to_float(bias[row]) : 0.0f));
      }
    return;
  }
  float* ws = a.workspace + static_cast<size_t>(blockIdx.y) * a.m * a.n;
#pragma unroll
  for (int t = 0; t < kTilesPerWarp; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int token = gid + 8 * (e >> 1), row = (tile0 + t) * 8 + 2 * q + (e & 1);
      if (token < a.m && row < a.n) ws[static_cast<size_t>(token) * a.n + row] = acc[t][e];
    }
  __threadfence();  // this block's partials are visible device-wide before the counter moves
  __syncthreads();
  __shared__ int last;
  if (threadIdx.x == 0) last = atomicAdd(a.locks + blockIdx.x, 1) == a.split - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int row0 = blockIdx.x * kRowsPerBlock;
  for (int i = threadIdx.x; i < a.m * kRowsPerBlock; i += blockDim.x) {
    const int token = i / kRowsPerBlock, row = row0 + i % kRowsPerBlock;
    if (row >= a.n) continue;
    float v = bias ? Traits<T>::to_float(bias[row]) : 0.0f;
    float sum = 0.0f;
    for (int s = 0; s < a.split; ++s)  // split order: the sum does not depend on which block came last
      sum += __ldcg(a.workspace + (static_cast<size_t>(s) * a.m + token) * a.n + row);
    y[static_cast<size_t>(token) * a.n + row] = Traits<T>::from_float(sum + v);
  }
  if (threadIdx.x == 0) a.locks[blockIdx.x] = 0;  // zero again for the next launch on this stream
}

template <typename T, int GROUP>
cudaError_t launch(const GemvArgs& a, cudaStream_t stream) {
  const int rows = a.m + 1;  // + the zero row
  int chunk = (kSmemBudget / (rows * static_cast<int>(sizeof(T))) - kPad) / kBlockCols;
  chunk = max(1, min(chunk, a.blocks_per_split));
  const size_t smem = static_cast<size_t>(rows) * (chunk * kBlockCols + kPad) * sizeof(T);
  const dim3 grid(a.n_padded / kRowsPerBlock, a.split);
  trit_gemv_kernel<T, GROUP><<<grid, kWarps * 32, smem, stream>>>(a, chunk);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_group(const GemvArgs& a, cudaStream_t stream) {
  switch (a.group_size) {
    case 64: return launch<T, 64>(a, stream);
    case 128: return launch<T, 128>(a, stream);
    case 256: return launch<T, 256>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_trit_gemv(Act act, const GemvArgs& a, cudaStream_t stream) {
  const bool ok = a.m >= 1 && a.m <= kMaxM && a.n >= 1 && a.n <= a.n_padded && a.n_padded % kRowsPerBlock == 0 &&
                  a.k >= 1 && a.k <= a.k_blocks * kBlockCols && a.split >= 1 && a.blocks_per_split >= 1 &&
                  (a.split - 1) * a.blocks_per_split < a.k_blocks &&
                  (a.split == 1 || (a.workspace != nullptr && a.locks != nullptr)) &&
                  (reinterpret_cast<uintptr_t>(a.codes) & 15) == 0 && (reinterpret_cast<uintptr_t>(a.scales) & 3) == 0;
  if (!ok) return cudaErrorInvalidValue;
  return act == Act::kFloat16 ? launch_group<__half>(a, stream) : launch_group<__nv_bfloat16>(a, stream);
}

}  // namespace ptqtp_cuda
