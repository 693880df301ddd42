// Torch-free CUDA decode kernel for trit-plane linears on the GPU "trit2" layout (ptqtp/backends/gpu_layouts.py):
// y (M, N) = x (M, K) @ (a1 T1 + a2 T2)^T + bias in the activation dtype, for 1 <= M <= kMaxM, in one launch.
//
//   codes   int32   (Np / 8, KB, 2 planes, 32 lanes, 4 words): 2-bit digits d = t + 1, 1 KiB per (8 rows, 256 cols)
//   scales  fp16    (G, 2 planes, Np)
// N is padded to Np (a multiple of kRowsPerBlock), K to 256 * KB; the group size is one of 64, 128, 256.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ptqtp_cuda {

constexpr int kMaxM = 16;           // tokens per launch: the M of one mma.m16n8k16
constexpr int kRowsPerBlock = 128;  // 4 warps x 32 rows; the layout pads N to a multiple of it
constexpr int kBlockCols = 256;     // columns per layout block

enum class Act { kFloat16, kBFloat16 };

struct GemvArgs {
  const void* x;         // (M, K) activations, unit stride along K, row stride stride_xm elements
  long long stride_xm;
  const int32_t* codes;  // layout codes, 16-byte aligned
  const uint16_t* scales;  // layout scales (fp16 bits)
  const void* bias;      // (N,) in the activation dtype, or nullptr
  void* y;               // (M, N) in the activation dtype, contiguous
  float* workspace;      // (split, M, N) float32 when split > 1
  int* locks;            // >= Np / kRowsPerBlock int32 zeros when split > 1; left zero
  int m, n, n_padded, k, k_blocks, groups, group_size;
  int split, blocks_per_split;  // K split: blockIdx.y takes layout blocks [y * per, min((y + 1) * per, KB))
};

// Returns cudaSuccess, cudaErrorInvalidValue for arguments the kernel does not take, or the launch error.
cudaError_t launch_trit_gemv(Act act, const GemvArgs& args, cudaStream_t stream);

}  // namespace ptqtp_cuda
