// ptqtp._C_cuda: torch binding of the CUDA decode kernel. Validates devices, dtypes and shapes (naming them in
// errors), allocates the output (and the split-K workspace) and launches on the current stream, so the call
// is capturable in a CUDA graph.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "trit_cuda.h"

namespace {

torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                   const c10::optional<torch::Tensor>& bias, const torch::Tensor& locks, int64_t out_features,
                   int64_t in_features, int64_t group_size, int64_t split, int64_t blocks_per_split) {
  TORCH_CHECK(x.is_cuda() && codes.device() == x.device() && scales.device() == x.device() &&
                  locks.device() == x.device(),
              "ptqtp cuda gemv: x, codes, scales and locks must be on one CUDA device");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= ptqtp_cuda::kMaxM && x.size(1) == in_features,
              "ptqtp cuda gemv: x must be (M <= ", ptqtp_cuda::kMaxM, ", ", in_features, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16,
              "ptqtp cuda gemv: activations must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(codes.dim() == 5 && codes.size(2) == 2 && codes.size(3) == 32 && codes.size(4) == 4 &&
                  codes.scalar_type() == torch::kInt && codes.is_contiguous(),
              "ptqtp cuda gemv: codes must be contiguous int32 (Np/8, KB, 2, 32, 4), got ", codes.sizes());
  const int64_t n_padded = codes.size(0) * 8, k_blocks = codes.size(1);
  TORCH_CHECK(scales.dim() == 3 && scales.size(1) == 2 && scales.size(2) == n_padded &&
                  scales.scalar_type() == torch::kHalf && scales.is_contiguous(),
              "ptqtp cuda gemv: scales must be contiguous float16 (G, 2, ", n_padded, "), got ", scales.sizes());
  TORCH_CHECK(out_features >= 1 && out_features <= n_padded && in_features <= k_blocks * ptqtp_cuda::kBlockCols,
              "ptqtp cuda gemv: out_features=", out_features, ", in_features=", in_features,
              " do not fit the layout ", codes.sizes());
  TORCH_CHECK(locks.scalar_type() == torch::kInt && locks.numel() >= n_padded / ptqtp_cuda::kRowsPerBlock,
              "ptqtp cuda gemv: locks must be int32 with at least ", n_padded / ptqtp_cuda::kRowsPerBlock,
              " entries");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.stride(1) == 1 ? x : x.contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == out_features, "ptqtp cuda gemv: bias must have ", out_features, " entries");
    b = bias->to(x.device(), x.scalar_type()).contiguous();
  }
  const int64_t m = x.size(0);
  auto y = torch::empty({m, out_features}, x.options());
  torch::Tensor ws;
  if (split > 1) ws = torch::empty({split, m, out_features}, x.options().dtype(torch::kFloat32));
  ptqtp_cuda::GemvArgs a{};
  a.x = xc.data_ptr();
  a.stride_xm = xc.stride(0);
  a.codes = codes.data_ptr<int32_t>();
  a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.workspace = split > 1 ? ws.data_ptr<float>() : nullptr;
  a.locks = locks.data_ptr<int32_t>();
  a.m = static_cast<int>(m);
  a.n = static_cast<int>(out_features);
  a.n_padded = static_cast<int>(n_padded);
  a.k = static_cast<int>(in_features);
  a.k_blocks = static_cast<int>(k_blocks);
  a.groups = static_cast<int>(scales.size(0));
  a.group_size = static_cast<int>(group_size);
  a.split = static_cast<int>(split);
  a.blocks_per_split = static_cast<int>(blocks_per_split);
  const auto act = x.scalar_type() == torch::kHalf ? ptqtp_cuda::Act::kFloat16 : ptqtp_cuda::Act::kBFloat16;
  const cudaError_t err = ptqtp_cuda::launch_trit_gemv(act, a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != cudaErrorInvalidValue, "ptqtp cuda gemv: the kernel does not take group_size=", group_size,
              ", split=", split, " x ", blocks_per_split, " blocks of ", k_blocks, " (or a misaligned layout)");
  TORCH_CHECK(err == cudaSuccess, "ptqtp cuda gemv: launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptqtp CUDA kernels: decode (M <= 16) on the GPU trit2 layout";
  m.def("gemv", &gemv,
        "y (M, N) in x.dtype = x (M, K) @ W.T + bias from the trit2 layout (codes, scales); K split into `split` "
        "parts of `blocks_per_split` 256-column blocks, `locks` int32 zeros",
        pybind11::arg("x"), pybind11::arg("codes"), pybind11::arg("scales"), pybind11::arg("bias"),
        pybind11::arg("locks"), pybind11::arg("out_features"), pybind11::arg("in_features"),
        pybind11::arg("group_size"), pybind11::arg("split"), pybind11::arg("blocks_per_split"));
}
