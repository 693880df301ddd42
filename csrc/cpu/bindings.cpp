// ptqtp._C: torch bindings of the CPU kernels. Checks shapes and dtypes (naming them in errors), reads bf16 /
// fp16 activations into float32, runs the torch-free kernels (OpenMP over output-row blocks) and returns y in
// the activation dtype with the bias added in float32 before the one cast, as the reference does.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "parallel.h"
#include "trit_cpu.h"

namespace {

using namespace ptqtp_cpu;

// per-calling-thread scratch, grown on demand and reused: no allocation per call once warm
float* scratch(std::vector<float>& buf, int64_t count) {
  if (static_cast<int64_t>(buf.size()) < count) buf.resize(count);
  return buf.data();
}
thread_local std::vector<float> tl_x, tl_y, tl_tables, tl_partial;
thread_local std::vector<uint16_t> tl_xb;

// x (..., K) as M float32 rows: the tensor itself when it already is (row stride returned), else a converted copy
const float* x_as_float(const torch::Tensor& x, int64_t m, int64_t k, int64_t& stride) {
  if (x.scalar_type() == torch::kFloat32) {
    if (x.is_contiguous()) {
      stride = k;
      return x.data_ptr<float>();
    }
    if (x.dim() == 2 && x.stride(1) == 1) {
      stride = x.stride(0);
      return x.data_ptr<float>();
    }
  }
  float* dst = scratch(tl_x, m * k);
  stride = k;
  const auto xc = x.contiguous();
  if (x.scalar_type() == torch::kBFloat16) {
    const auto* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    for (int64_t i = 0; i < m * k; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(dst + i, &bits, 4);
    }
  } else if (x.scalar_type() == torch::kHalf) {
    const auto* src = xc.data_ptr<at::Half>();
    for (int64_t i = 0; i < m * k; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    std::memcpy(dst, xc.data_ptr<float>(), m * k * sizeof(float));
  }
  return dst;
}

// y (..., N) in dtype, from x (..., K): float32 outputs are written by the kernel in place; others go through a
// float scratch
std::vector<int64_t> out_shape(const torch::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

struct Output {
  torch::Tensor y;
  float* f32;
  Output(const std::vector<int64_t>& shape, int64_t m, int64_t n, torch::ScalarType dtype)
      : y(torch::empty(shape, torch::dtype(dtype))) {
    f32 = dtype == torch::kFloat32 ? y.data_ptr<float>() : scratch(tl_y, m * n);
  }
  torch::Tensor finish() {
    const int64_t count = y.numel();
    if (y.scalar_type() == torch::kBFloat16) {
      auto* o = y.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < count; ++i) o[i] = at::BFloat16(f32[i]);  // round to nearest even, as .to()
    } else if (y.scalar_type() == torch::kHalf) {
      auto* o = y.data_ptr<at::Half>();
      for (int64_t i = 0; i < count; ++i) o[i] = at::Half(f32[i]);
    }
    return y;
  }
};

void check_x(const torch::Tensor& x, int64_t k, const char* who) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k, who, ": x must be (..., ", k, "), got ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == torch::kFloat32 || t == torch::kBFloat16 || t == torch::kHalf, who,
              ": x must be float32, bfloat16 or float16, got ", t);
}

const float* bias_f32(const c10::optional<torch::Tensor>& bias, int64_t n, torch::Tensor& keep) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "ptqtp gemv: bias must be (", n, "), got ", bias->sizes());
  keep = bias->to(torch::kFloat32).contiguous();
  return keep.data_ptr<float>();
}

torch::Tensor gemv_lut3_op(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                           const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t group_size,
                           bool allow_avx2) {
  check_x(x, k, "ptqtp gemv_lut3");
  const int64_t m = x.numel() / k;
  TORCH_CHECK(codes.dim() == 6 && codes.scalar_type() == torch::kInt32 && codes.is_contiguous() &&
                  codes.size(2) == 2 && codes.size(3) == 2 && codes.size(5) == kRowsPerBlock,
              "ptqtp gemv_lut3: codes must be contiguous int32 (R, G, 2, 2, W, 8), got ", codes.sizes());
  const int64_t rblocks = codes.size(0), groups = codes.size(1), words = codes.size(4);
  const int64_t chunks = (group_size + kChunk - 1) / kChunk;
  TORCH_CHECK(rblocks * kRowsPerBlock >= n && groups * group_size >= k && words * kChunksPerWord >= chunks,
              "ptqtp gemv_lut3: codes ", codes.sizes(), " do not fit N=", n, " K=", k, " group_size=", group_size);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.dim() == 4 &&
                  scales.size(0) == rblocks && scales.size(1) == groups,
              "ptqtp gemv_lut3: scales must be contiguous float32 (R, G, 2, 8), got ", scales.sizes());
  torch::Tensor bias_keep;
  const float* bp = bias_f32(bias, n, bias_keep);
  int64_t xs = 0;
  const float* xp = x_as_float(x, m, k, xs);
  const int64_t slots = words * kChunksPerWord;
  float* tp = scratch(tl_tables, m * groups * slots * 8);
  for (int64_t t = 0; t < m; ++t) build_tables(xp + t * xs, k, group_size, groups, words, tp + t * groups * slots * 8);
  Output out(out_shape(x, n), m, n, x.scalar_type());
  const bool avx2 = allow_avx2 && cpu_best_isa() >= kAvx2;
  const int32_t* cp = codes.data_ptr<int32_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = out.f32;
  parallel_items(rblocks, 8, at::get_num_threads(), [&](int64_t rb0, int64_t rb1) {
    for (int64_t rb = rb0; rb < rb1; ++rb) gemv_lut3_block(tp, m, cp, sp, groups, words, chunks, rb, n, bp, yp, n, avx2);
  });
  return out.finish();
}

torch::Tensor gemv_lut27_op(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                            const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t group_size,
                            bool tail_in_spare, int64_t tile_bytes, int64_t min_work) {
  check_x(x, k, "ptqtp gemv_lut27");
  const int64_t m = x.numel() / k;
  TORCH_CHECK(cpu_best_isa() >= kAvx512, "ptqtp gemv_lut27: this CPU (or this build) has no AVX-512F/BW");
  TORCH_CHECK(codes.dim() == 5 && codes.scalar_type() == torch::kInt32 && codes.is_contiguous() &&
                  codes.size(2) == 2 && codes.size(4) == kLut27Rows,
              "ptqtp gemv_lut27: codes must be contiguous int32 (R16, G, 2, W, 16), got ", codes.sizes());
  const int64_t r16 = codes.size(0), groups = codes.size(1), words = codes.size(3);
  const int64_t chunks = (group_size + 2) / 3;
  const int64_t need_words = tail_in_spare ? chunks / kLut27CodesPerWord
                                           : (chunks + kLut27CodesPerWord - 1) / kLut27CodesPerWord;
  TORCH_CHECK(r16 == (n + kLut27Rows - 1) / kLut27Rows && groups == (k + group_size - 1) / group_size &&
                  words == need_words &&
                  (!tail_in_spare || (chunks % kLut27CodesPerWord == 1 && group_size % 3 != 0 && words >= 2)),
              "ptqtp gemv_lut27: codes ", codes.sizes(), " do not fit N=", n, " K=", k, " group_size=", group_size);
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.dim() == 4 &&
                  scales.size(0) == r16 && scales.size(1) == groups && scales.size(2) == 2 &&
                  scales.size(3) == kLut27Rows,
              "ptqtp gemv_lut27: scales must be contiguous float16 (R16, G, 2, 16), got ", scales.sizes());
  TORCH_CHECK(m >= 1 && m <= kLut27MaxTokens, "ptqtp gemv_lut27: M=", m, " tokens, the decode kernel takes 1..",
              kLut27MaxTokens);
  torch::Tensor bias_keep;
  Lut27Problem p{};
  p.bias = bias_f32(bias, n, bias_keep);
  p.x = x_as_float(x, m, k, p.x_stride);
  p.codes = codes.data_ptr<int32_t>();
  p.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  p.m = m;
  p.n = n;
  p.k = k;
  p.group_size = group_size;
  p.groups = groups;
  p.chunks = chunks;
  p.words = words;
  p.tail_in_spare = tail_in_spare;
  const int64_t group_table_bytes = m * chunks * kLut27TableFloats * 4;
  p.tile_groups = tile_bytes > 0 ? std::max<int64_t>(1, tile_bytes / group_table_bytes) : groups;
  // a thread costs a wake-up and a join (microseconds): small layers run on fewer threads, each with at least
  // `min_work` (16-row block, group, token) units
  const int64_t work = r16 * groups * m;
  p.threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                      min_work > 0 ? work / min_work : work)));
  p.tables = scratch(tl_tables, m * groups * chunks * kLut27TableFloats);
  p.partial = p.tile_groups < groups ? scratch(tl_partial, m * r16 * kLut27Rows) : nullptr;
  Output out(out_shape(x, n), m, n, x.scalar_type());
  p.y = out.f32;
  p.y_stride = n;
  gemv_lut27(p);
  return out.finish();
}

torch::Tensor gemv_bf16dot_op(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                              const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k, int64_t group_size,
                              int64_t grain_rows, bool amx) {
  check_x(x, k, "ptqtp gemv_bf16dot");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "ptqtp gemv_bf16dot: x must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK(cpu_best_isa() >= (amx ? kAmx : kAvx512Bf16), "ptqtp gemv_bf16dot: this CPU (or this build) has no ",
              amx ? "AMX-BF16 (or the OS refused its tile state)" : "AVX512-BF16");
  const int64_t m = x.numel() / k, groups = (k + group_size - 1) / group_size;
  const int64_t units = (group_size + kBf16DotUnit - 1) / kBf16DotUnit;
  // bf16dot: codes (N, G, U, 32), scales (N, G, 2); amx: rows in blocks of 16, (R, G, U, 16, 32) and (R, G, 16, 2)
  const std::vector<int64_t> want_codes = amx ? std::vector<int64_t>{(n + 15) / 16, groups, units, 16, 32}
                                              : std::vector<int64_t>{n, groups, units, 32};
  const std::vector<int64_t> want_scales = amx ? std::vector<int64_t>{(n + 15) / 16, groups, 16, 2}
                                               : std::vector<int64_t>{n, groups, 2};
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.sizes() == want_codes,
              "ptqtp gemv_bf16dot: codes must be contiguous uint8 ", c10::IntArrayRef(want_codes), ", got ",
              codes.sizes());
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() && scales.sizes() == want_scales,
              "ptqtp gemv_bf16dot: scales must be contiguous float32 ", c10::IntArrayRef(want_scales), ", got ",
              scales.sizes());
  TORCH_CHECK(m >= 1 && m <= kLut27MaxTokens, "ptqtp gemv_bf16dot: M=", m, " tokens, the decode kernel takes 1..",
              kLut27MaxTokens);
  torch::Tensor bias_keep;
  Bf16DotProblem p{};
  p.bias = bias_f32(bias, n, bias_keep);
  // x by unit of 64 columns, groups zero-padded: (G * U, m, 64), the columns of a unit for every token side by
  // side; for AMX (G * U, 2, 16, m, 2), the B tiles: per half unit, row p holds columns 2p and 2p + 1 of every token
  const auto xc = x.contiguous();
  const auto* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  // 64-byte aligned: an unaligned zmm load spans two cache lines (measured 5-15 % slower)
  // amx_activations writes every element; the unit copy below leaves the group padding to a zero fill
  const int64_t xb_size = groups * units * m * kBf16DotUnit + 32;
  amx ? tl_xb.resize(xb_size) : tl_xb.assign(xb_size, 0);
  uint16_t* xb = tl_xb.data() + (-(reinterpret_cast<uintptr_t>(tl_xb.data()) / 2) & 31);
  if (amx) {
    amx_activations(src, m, k, group_size, groups, units, xb);
  } else {
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t c0 = g * group_size + u * kBf16DotUnit;
        const int64_t cols = std::min<int64_t>({kBf16DotUnit, group_size - u * kBf16DotUnit, k - c0});
        if (cols <= 0) continue;
        for (int64_t t = 0; t < m; ++t)
          std::memcpy(xb + ((g * units + u) * m + t) * kBf16DotUnit, src + t * k + c0, cols * 2);
      }
  }
  p.x = xb;
  p.codes = codes.data_ptr<uint8_t>();
  p.scales = scales.data_ptr<float>();
  p.m = m;
  p.n = n;
  p.groups = groups;
  p.units = units;
  p.grain_rows = grain_rows;
  p.threads = at::get_num_threads();
  p.amx = amx;
  Output out(out_shape(x, n), m, n, x.scalar_type());
  p.y = out.f32;
  p.y_stride = n;
  gemv_bf16dot(p);
  return out.finish();
}

torch::Tensor gemv_dense_op(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                           int64_t grain_rows) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1, "ptqtp gemv_dense: weight must be (N, K) with unit column stride, got ",
              w.sizes(), " strides ", w.strides());
  const int64_t n = w.size(0), k = w.size(1);
  check_x(x, k, "ptqtp gemv_dense");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf16 || x.scalar_type() == torch::kFloat32) && w.scalar_type() == x.scalar_type(),
              "ptqtp gemv_dense: x and weight must both be float32 or both bfloat16, got ", x.scalar_type(), " and ",
              w.scalar_type());
  TORCH_CHECK(cpu_best_isa() >= (bf16 ? kAvx512Bf16 : kAvx512) && dense_gemv_compiled(),
              "ptqtp gemv_dense: this CPU (or this build) has no ", bf16 ? "AVX512-BF16" : "AVX-512");
  const int64_t m = x.numel() / k;
  TORCH_CHECK(m >= 1 && m <= kDenseGemvMaxTokens, "ptqtp gemv_dense: M=", m, " tokens, the kernel takes 1..",
              kDenseGemvMaxTokens);
  const auto xc = x.contiguous();
  torch::Tensor bias_keep;
  DenseGemvProblem p{};
  p.bias = bias_f32(bias, n, bias_keep);
  p.x = xc.data_ptr();
  p.x_stride = k;
  p.w = w.data_ptr();
  p.w_stride = w.stride(0);
  p.bf16 = bf16;
  p.m = m;
  p.n = n;
  p.k = k;
  p.grain_rows = grain_rows;
  p.threads = at::get_num_threads();
  Output out(out_shape(x, n), m, n, x.scalar_type());
  p.y = out.f32;
  p.y_stride = n;
  gemv_dense(p);
  return out.finish();
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
      dequantize_row(pp + r * nb, pp + (n + r) * nb, ssp + r * groups, ssp + (n + r) * groups, k, group_size, dst);
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

const char* isa_name(int isa) {
  return isa == kAmx ? "amx" : isa == kAvx512Bf16 ? "avx512bf16" : isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2"
                                                                                                  : "generic";
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptqtp CPU kernels (lut27 AVX-512 GEMV, lut3 AVX2 / generic GEMV, dequantize)";
  m.def("gemv_lut27", &gemv_lut27_op, "y (..., N) in x.dtype from x (..., K) and the lut27 layout (AVX-512F)");
  m.def("gemv_bf16dot", &gemv_bf16dot_op,
        "y (..., N) in bf16 from bf16 x (..., K) and the bf16dot layout (amx: the dot products on AMX tiles)");
  m.def("contention_stalls", [] { return contention().stalls.load(); },
        "calls whose threads stalled on a busy machine so far (each switches the next calls to one thread)");
  m.def("gemv_dense", &gemv_dense_op,
        "y (..., N) in x.dtype from x (..., K) and a dense (N, K) weight of the same dtype (float32 / bf16, M <= 4)");
  m.def("gemv_lut3", &gemv_lut3_op, "y (..., N) in x.dtype from x (..., K) and the lut3 layout (AVX2 or generic)");
  m.def("dequantize", &dequantize, "dense (N, K) weight from the storage format");
  m.def("best_isa", [] { return std::string(isa_name(cpu_best_isa())); },
        "best kernel ISA of this CPU and build: amx, avx512bf16, avx512, avx2 or generic");
}
