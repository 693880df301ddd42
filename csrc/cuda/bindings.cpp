// ptqtp._C_cuda: torch binding of the CUDA decode GEMV. Validates devices, dtypes and shapes (naming them in
// errors) and launches on the current stream; ptqtp/backends/cuda.py adds the bias and casts back.
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "trit_cuda.h"

namespace {

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                   int64_t group_size) {
  TORCH_CHECK(x.is_cuda() && packed.is_cuda() && scales.is_cuda(), "ptqtp cuda gemv: tensors must be on CUDA");
  TORCH_CHECK(x.device() == packed.device() && x.device() == scales.device(),
              "ptqtp cuda gemv: x, packed and scales must be on the same device");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "ptqtp cuda gemv: x must be (M, K), got ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1), nb = (k + 4) / 5, groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(packed.dim() == 3 && packed.size(0) == 2 && packed.size(2) == nb &&
                  packed.scalar_type() == torch::kUInt8,
              "ptqtp cuda gemv: packed must be uint8 (2, N, ", nb, "), got ", packed.sizes());
  const int64_t n = packed.size(1);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == 2 && scales.size(1) == n && scales.size(2) == groups &&
                  scales.scalar_type() == torch::kHalf,
              "ptqtp cuda gemv: scales must be float16 (2, ", n, ", ", groups, "), got ", scales.sizes());
  TORCH_CHECK(m * k < (int64_t(1) << 31) && 2 * n * nb < (int64_t(1) << 40), "ptqtp cuda gemv: shape too large");
  ptqtp_cuda::Act act;
  switch (x.scalar_type()) {
    case torch::kFloat32: act = ptqtp_cuda::Act::kFloat32; break;
    case torch::kHalf: act = ptqtp_cuda::Act::kFloat16; break;
    case torch::kBFloat16: act = ptqtp_cuda::Act::kBFloat16; break;
    default: TORCH_CHECK(false, "ptqtp cuda gemv: activations must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto pc = packed.contiguous();
  const auto sc = scales.contiguous();
  auto y = torch::empty({m, n}, x.options().dtype(torch::kFloat32));
  const cudaError_t err = ptqtp_cuda::launch_trit_gemv(
      act, xc.data_ptr(), pc.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()),
      y.data_ptr<float>(), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
      static_cast<int>(group_size), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "ptqtp cuda gemv: launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptqtp CUDA kernels (decode GEMV)";
  m.def("gemv", &gemv, "y (M, N) float32 from x (M, K), packed (2, N, ceil(K/5)) uint8, scales (2, N, G) fp16");
}
