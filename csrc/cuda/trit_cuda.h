// Torch-free CUDA decode GEMV for trit-plane linears, reading the storage layout of ptqtp/format.py directly:
// packed uint8 (2, N, NB = ceil(K/5)), byte = d0 + 3 d1 + 9 d2 + 27 d3 + 81 d4 with trit t = d - 1, and
// fp16 scales (2, N, G). y (M, N) float32 = x (M, K) @ (a1 T1 + a2 T2)^T, for 1 <= M <= kMaxM.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ptqtp_cuda {

constexpr int kMaxM = 8;

enum class Act { kFloat32, kFloat16, kBFloat16 };

// Returns cudaSuccess or the launch error; x/packed/scales/y are device pointers, rows contiguous.
cudaError_t launch_trit_gemv(Act act, const void* x, const uint8_t* packed, const uint16_t* scales, float* y, int m,
                             int n, int k, int group_size, cudaStream_t stream);

}  // namespace ptqtp_cuda
