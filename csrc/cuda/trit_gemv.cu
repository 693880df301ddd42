// Decode GEMV: one warp per ROWS output rows. The row's bytes are walked in spans of 128 (640 columns): lane l
// takes bytes 4l..4l+3 of the span (coalesced), i.e. 20 consecutive columns, which it decodes by constant
// division (unrolled digits). Trits select +x, -x or nothing (no multiply per weight); the two per-plane
// partial sums are scaled once whenever a lane's columns leave a group, then lanes are reduced by shuffles.
#include "trit_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ptqtp_cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRows = 2;          // rows per warp: each activation load serves kRows rows
constexpr int kBytesPerLane = 4;  // 20 columns per lane per span
constexpr int kSpanBytes = 32 * kBytesPerLane;

__device__ __forceinline__ float load_act(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_act(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load_act(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

__device__ __forceinline__ float select(int t, float v) { return t > 0 ? v : (t < 0 ? -v : 0.0f); }

template <int D>
__device__ __forceinline__ int trit(int b) {
  constexpr int kPow[5] = {1, 3, 9, 27, 81};
  return (b / kPow[D]) % 3 - 1;  // constant divisors: multiply-shift, no integer division
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32) trit_gemv_kernel(const T* __restrict__ x,
                                                                const uint8_t* __restrict__ packed,
                                                                const __half* __restrict__ scales,
                                                                float* __restrict__ y, int n, int k, int nb,
                                                                int groups, int group_size) {
  const int lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * kWarps + (threadIdx.x >> 5)) * kRows;
  if (row0 >= n) return;
  const uint8_t* p0[kRows];
  const uint8_t* p1[kRows];
  const __half* s0[kRows];
  const __half* s1[kRows];
  bool live[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = min(row0 + r, n - 1);  // a dead row re-reads the last one and is never stored
    live[r] = row0 + r < n;
    p0[r] = packed + (size_t)row * nb;
    p1[r] = packed + ((size_t)n + row) * nb;
    s0[r] = scales + (size_t)row * groups;
    s1[r] = scales + ((size_t)n + row) * groups;
  }
  float acc[M][kRows], ps0[M][kRows], ps1[M][kRows];
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[i][r] = ps0[i][r] = ps1[i][r] = 0.0f;
  int cur = -1;  // group of the partial sums held in ps0/ps1

  auto flush = [&](int g) {
    if (cur >= 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float a = __half2float(s0[r][cur]), b = __half2float(s1[r][cur]);
#pragma unroll
        for (int i = 0; i < M; ++i) {
          acc[i][r] += a * ps0[i][r] + b * ps1[i][r];
          ps0[i][r] = ps1[i][r] = 0.0f;
        }
      }
    }
    cur = g;
  };

  for (int span = 0; span < nb; span += kSpanBytes) {
    const int byte0 = span + lane * kBytesPerLane;
#pragma unroll
    for (int q = 0; q < kBytesPerLane; ++q) {
      const int byte = byte0 + q;
      if (byte >= nb) break;
      int b0[kRows], b1[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        b0[r] = __ldg(p0[r] + byte);
        b1[r] = __ldg(p1[r] + byte);
      }
#define PTQTP_DIGIT(D)                                                                  \
  {                                                                                     \
    const int col = byte * 5 + D;                                                       \
    if (col < k) {                                                                      \
      const int g = col / group_size;                                                   \
      if (g != cur) flush(g);                                                           \
      _Pragma("unroll") for (int i = 0; i < M; ++i) {                                   \
        const float v = load_act(x + (size_t)i * k + col);                              \
        _Pragma("unroll") for (int r = 0; r < kRows; ++r) {                             \
          ps0[i][r] += select(trit<D>(b0[r]), v);                                       \
          ps1[i][r] += select(trit<D>(b1[r]), v);                                       \
        }                                                                               \
      }                                                                                 \
    }                                                                                   \
  }
      PTQTP_DIGIT(0) PTQTP_DIGIT(1) PTQTP_DIGIT(2) PTQTP_DIGIT(3) PTQTP_DIGIT(4)
#undef PTQTP_DIGIT
    }
  }
  flush(-1);
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float v = acc[i][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && live[r]) y[(size_t)i * n + row0 + r] = v;
    }
}

template <typename T, int M>
cudaError_t launch(const void* x, const uint8_t* packed, const uint16_t* scales, float* y, int n, int k,
                   int group_size, cudaStream_t stream) {
  const int nb = (k + 4) / 5, groups = (k + group_size - 1) / group_size;
  const int rows_per_block = kWarps * kRows;
  const dim3 grid((n + rows_per_block - 1) / rows_per_block);
  trit_gemv_kernel<T, M><<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(x), packed,
                                                           reinterpret_cast<const __half*>(scales), y, n, k, nb,
                                                           groups, group_size);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_m(int m, const void* x, const uint8_t* packed, const uint16_t* scales, float* y, int n, int k,
                     int group_size, cudaStream_t stream) {
  // M tokens are run in chunks the kernel is instantiated for (1, 2, 4, 8)
  for (int i0 = 0; i0 < m;) {
    const int left = m - i0;
    const int step = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    const T* xs = static_cast<const T*>(x) + (size_t)i0 * k;
    float* ys = y + (size_t)i0 * n;
    cudaError_t err = step == 8   ? launch<T, 8>(xs, packed, scales, ys, n, k, group_size, stream)
                      : step == 4 ? launch<T, 4>(xs, packed, scales, ys, n, k, group_size, stream)
                      : step == 2 ? launch<T, 2>(xs, packed, scales, ys, n, k, group_size, stream)
                                  : launch<T, 1>(xs, packed, scales, ys, n, k, group_size, stream);
    if (err != cudaSuccess) return err;
    i0 += step;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_trit_gemv(Act act, const void* x, const uint8_t* packed, const uint16_t* scales, float* y, int m,
                             int n, int k, int group_size, cudaStream_t stream) {
  switch (act) {
    case Act::kFloat32: return launch_m<float>(m, x, packed, scales, y, n, k, group_size, stream);
    case Act::kFloat16: return launch_m<__half>(m, x, packed, scales, y, n, k, group_size, stream);
    case Act::kBFloat16: return launch_m<__nv_bfloat16>(m, x, packed, scales, y, n, k, group_size, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ptqtp_cuda
