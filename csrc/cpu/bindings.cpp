// ptqtp._C: torch bindings of the CPU kernels. Checks shapes and dtypes (naming them in errors), converts
// activations to float32, runs OpenMP over blocks of 8 output rows. The Python side (ptqtp/backends/cpu.py)
// adds the bias and casts back to the activation dtype.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "trit_cpu.h"

namespace {

torch::Tensor gemv_lut3(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales, int64_t n,
                        int64_t k, int64_t group_size, bool allow_avx2) {
  using namespace ptqtp_cpu;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "ptqtp gemv: x must be (M, ", k, "), got ", x.sizes());
  TORCH_CHECK(codes.dim() == 6 && codes.scalar_type() == torch::kInt32 && codes.is_contiguous() &&
                  codes.size(2) == 2 && codes.size(3) == 2 && codes.size(5) == kRowsPerBlock,
              "ptqtp gemv: codes must be contiguous int32 (R, G, 2, 2, W, 8), got ", codes.sizes());
  const int64_t rblocks = codes.size(0), groups = codes.size(1), words = codes.size(4);
  const int64_t chunks = (group_size + kChunk - 1) / kChunk;
  TORCH_CHECK(rblocks * kRowsPerBlock >= n && groups * group_size >= k && words * kChunksPerWord >= chunks,
              "ptqtp gemv: codes ", codes.sizes(), " do not fit N=", n, " K=", k, " group_size=", group_size);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 4 &&
                  scales.size(0) == rblocks && scales.size(1) == groups,
              "ptqtp gemv: scales must be contiguous float32 (R, G, 2, 8), got ", scales.sizes());
  const auto xf = x.to(torch::kFloat32).contiguous();  // (M, K)
  const int64_t m = xf.size(0);
  const int64_t slots = words * kChunksPerWord;
  auto tables = torch::empty({m, groups * slots * 8}, xf.options());
  for (int64_t t = 0; t < m; ++t)
    build_tables(xf.data_ptr<float>() + t * k, k, group_size, groups, words, tables.data_ptr<float>() + t * groups * slots * 8);
  auto y = torch::empty({m, rblocks * kRowsPerBlock}, xf.options());  // (M, R*8)
  const bool avx2 = allow_avx2 && cpu_has_avx2();
  const float* tp = tables.data_ptr<float>();
  const int32_t* cp = codes.data_ptr<int32_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t stride = rblocks * kRowsPerBlock;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t rb = 0; rb < rblocks; ++rb) gemv_lut3_block(tp, m, cp, sp, groups, words, chunks, rb, yp, stride, avx2);
  return y.narrow(1, 0, n);
}

torch::Tensor dequantize(const torch::Tensor& packed, const torch::Tensor& scales, int64_t k, int64_t group_size,
                         torch::ScalarType dtype) {
  const int64_t nb = (k + 4) / 5, groups = (k + group_size - 1) / group_size;
  TORCH_CHECK(packed.dim() == 3 && packed.size(0) == 2 && packed.size(2) == nb && packed.scalar_type() == torch::kUInt8,
              "ptqtp dequantize: packed must be uint8 (2, N, ", nb, "), got ", packed.sizes());
  const int64_t n = packed.size(1);
  TORCH_CHECK(scales.dim() == 3 && scales.size(0) == 2 && scales.size(1) == n && scales.size(2) == groups,
              "ptqtp dequantize: scales must be (2, ", n, ", ", groups, "), got ", scales.sizes());
  const auto p = packed.contiguous();
  const auto s = scales.to(torch::kFloat32).contiguous();
  auto out = torch::empty({n, k}, torch::TensorOptions().dtype(dtype));
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* ssp = s.data_ptr<float>();
  const bool f32 = dtype == torch::kFloat32;
  TORCH_CHECK(f32 || dtype == torch::kBFloat16 || dtype == torch::kHalf, "ptqtp dequantize: dtype ", dtype,
              " is not float32, bfloat16 or float16");
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(f32 ? 0 : k);
    for (int64_t r = r0; r < r1; ++r) {
      float* dst = f32 ? out.data_ptr<float>() + r * k : row.data();
      ptqtp_cpu::dequantize_row(pp + r * nb, pp + (n + r) * nb, ssp + r * groups, ssp + (n + r) * groups, k,
                                group_size, dst);
      if (dtype == torch::kBFloat16) {
        auto* o = out.data_ptr<at::BFloat16>() + r * k;
        for (int64_t c = 0; c < k; ++c) o[c] = at::BFloat16(row[c]);
      } else if (dtype == torch::kHalf) {
        auto* o = out.data_ptr<at::Half>() + r * k;
        for (int64_t c = 0; c < k; ++c) o[c] = at::Half(row[c]);
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptqtp CPU kernels (lut3 GEMV, dequantize)";
  m.def("gemv_lut3", &gemv_lut3, "y (M, N) float32 from x (M, K) and the lut3 layout");
  m.def("dequantize", &dequantize, "dense (N, K) weight from the storage format");
  m.def("has_avx2", &ptqtp_cpu::cpu_has_avx2, "whether this CPU runs the AVX2 kernel");
}
