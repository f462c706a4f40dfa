// Matrix products with GGML-quantised weights that stay packed (CPU).
//
// Few rows (decode): the activations are quantised to integer blocks of 32 (int8 for the layers,
// 15-bit for the output head) and each weight block is dotted with them in integers, as llama.cpp
// does. Many rows (prefill): weight tiles are dequantised into a reused buffer and handed to
// torch's GEMM. Output rows of W are split over torch's thread pool. quant_impl.h is compiled
// three times — portable, AVX2+FMA and AVX-512 VNNI — and the caller names the path (`isa`), so
// one build runs on every x86 CPU and tests can exercise every path the CPU has.

#include "quant_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace pagedllm_quant {
namespace {

// GGML type ids (ggml.h), the keys the Python side passes.
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kMXFP4 = 39;
constexpr int kIsaPortable = 0, kIsaAvx2 = 1, kIsaAvx512Vnni = 2;

namespace portable {
#include "quant_impl.h"
}  // namespace portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#define PAGEDLLM_SIMD
namespace avx2 {
#include "quant_impl.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vl,avx512vnni")
#define PAGEDLLM_VNNI
#define PAGEDLLM_AVX512
namespace avx512vnni {
#include "quant_impl.h"
}  // namespace avx512vnni
#pragma GCC pop_options
#undef PAGEDLLM_VNNI
#undef PAGEDLLM_AVX512
#undef PAGEDLLM_SIMD

// Calls NAMESPACE::call for the instruction set `isa` names.
#define PAGEDLLM_BY_ISA(isa, ...)                          \
  do {                                                     \
    if ((isa) == kIsaAvx512Vnni) avx512vnni::__VA_ARGS__;  \
    else if ((isa) == kIsaAvx2) avx2::__VA_ARGS__;         \
    else portable::__VA_ARGS__;                            \
  } while (0)

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw"))
    return kIsaAvx512Vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kIsaAvx2;
  return kIsaPortable;
}

struct FormatInfo {
  int64_t block_elems, block_bytes;
};

FormatInfo format_info(int64_t type) {
  switch (type) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    case kMXFP4: return {32, 17};
  }
  TORCH_CHECK(false, "GGML type ", type, " has no packed kernel");
}

// Calls body.template operator()<Type>() for the run-time type id.
template <typename Body>
void with_format(int64_t type, Body&& body) {
  switch (type) {
    case kQ4_0: return body.template operator()<kQ4_0>();
    case kQ4_1: return body.template operator()<kQ4_1>();
    case kQ5_0: return body.template operator()<kQ5_0>();
    case kQ5_1: return body.template operator()<kQ5_1>();
    case kQ8_0: return body.template operator()<kQ8_0>();
    case kQ4_K: return body.template operator()<kQ4_K>();
    case kQ5_K: return body.template operator()<kQ5_K>();
    case kQ6_K: return body.template operator()<kQ6_K>();
    case kMXFP4: return body.template operator()<kMXFP4>();
  }
  TORCH_CHECK(false, "GGML type ", type, " has no packed kernel");
}

void check_weight(const at::Tensor& w, int64_t type, int64_t k) {
  const FormatInfo f = format_info(type);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "packed weight must be 2-d uint8");
  TORCH_CHECK(k > 0 && k % f.block_elems == 0 && w.size(1) == k / f.block_elems * f.block_bytes,
              "packed weight rows of ", w.size(1), " bytes do not hold ", k, " values of type ", type);
}

// Calls body(part, lo, hi) for the rows [lo, hi) of each part that fall in the stacked rows [n0, n1).
template <typename Body>
void for_part_rows(const std::vector<Part>& parts, int64_t n0, int64_t n1, Body&& body) {
  for (const Part& p : parts) {
    const int64_t lo = std::max(n0, p.first_row) - p.first_row, hi = std::min(n1, p.first_row + p.rows) - p.first_row;
    if (lo < hi) body(p, lo, hi);
  }
}

}  // namespace

void check_isa(int64_t isa) {
  TORCH_CHECK(isa >= kIsaPortable && isa <= best_isa(), "instruction set ", isa, " is not available on this CPU");
}

std::vector<Part> parts_of(const std::vector<at::Tensor>& ws, const std::vector<int64_t>& types, int64_t k) {
  TORCH_CHECK(!ws.empty() && ws.size() == types.size(), "one type per weight part");
  std::vector<Part> parts;
  int64_t first = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    check_weight(ws[i], types[i], k);
    parts.push_back({ws[i].data_ptr<uint8_t>(), types[i], ws[i].size(0), ws[i].size(1), first});
    first += ws[i].size(0);
  }
  return parts;
}

void quantize_activations(const float* x, int64_t m, int64_t k, int64_t x_stride, uint8_t* out, bool wide,
                          int64_t isa) {
  const int64_t row_bytes = activation_row_bytes(k, wide);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    PAGEDLLM_BY_ISA(isa, quantize_rows(x + begin * x_stride, end - begin, k, x_stride, out + begin * row_bytes, wide));
  });
}

void silu_mul_rows(float* gate_up, int64_t m, int64_t n, int64_t isa) {
  for (int64_t r = 0; r < m; ++r, gate_up += 2 * n) PAGEDLLM_BY_ISA(isa, silu_mul_row(gate_up, gate_up + n, n));
}

void lora_rows(const float* x, int64_t x_stride, int64_t m, const int64_t* rows, int64_t count, int64_t k,
               const float* a_t, int64_t r, const float* b_t, int64_t n, float* out, int64_t out_stride, int64_t isa) {
  if (rows == nullptr) count = m;
  const auto row_of = [&](int64_t i) { return rows == nullptr ? i : rows[i]; };
  std::vector<float> low(count * r);
  for (int64_t i = 0; i < count; ++i) PAGEDLLM_BY_ISA(isa, lora_low(x + row_of(i) * x_stride, k, a_t, r, low.data() + i * r));
  at::parallel_for(0, n, 1024, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < count; ++i)
      PAGEDLLM_BY_ISA(isa, lora_add(low.data() + i * r, r, b_t + c0, n, c1 - c0, out + row_of(i) * out_stride + c0));
  });
}

void matmul_parts(const uint8_t* xq, int64_t m, const std::vector<Part>& parts, int64_t k, float* out,
                  int64_t out_stride, bool wide, bool accumulate, int64_t isa) {
  // Enough rows per task that a thread's share is worth waking it for.
  const int64_t grain = std::max<int64_t>(8, 32768 / std::max<int64_t>(1, parts[0].row_bytes * m));
  at::parallel_for(0, rows_of(parts), grain, [&](int64_t n0, int64_t n1) {
    for_part_rows(parts, n0, n1, [&](const Part& p, int64_t lo, int64_t hi) {
      with_format(p.type, [&]<int kType>() {
        PAGEDLLM_BY_ISA(isa, matmul_quantised<kType>(p.data, p.row_bytes, xq, wide, m, k, out + p.first_row, out_stride,
                                                     lo, hi, accumulate));
      });
    });
  });
}

namespace {

// gate_up [M, 2n] bfloat16 → silu(gate) · up [M, n] bfloat16 (SwiGLU's activation for the prefill's
// bfloat16 MLP): one pass in float32 and one rounding, where torch's silu then mul rounds twice.
at::Tensor silu_and_mul(const at::Tensor& gate_up, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kBFloat16 && gate_up.is_contiguous() &&
              gate_up.size(1) % 2 == 0, "gate_up must be contiguous [M, 2n] bfloat16");
  const int64_t m = gate_up.size(0), n = gate_up.size(1) / 2;
  at::Tensor out = at::empty({m, n}, gate_up.options());
  const c10::BFloat16* in = gate_up.data_ptr<c10::BFloat16>();
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, m, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) PAGEDLLM_BY_ISA(isa, silu_mul_row(in + r * 2 * n, in + r * 2 * n + n, n, o + r * n));
  });
  return out;
}

// scores [B, R, C] bfloat16, C ≥ R, in place → the causal softmax of each row: row r of a matrix sees
// its first C − R + r + 1 keys (the queries are the last R of C positions), the rest become 0. One
// pass in float32 over the visible keys only; the chunked prefill attention's mask and softmax.
void causal_softmax_(at::Tensor& scores, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(scores.dim() == 3 && scores.scalar_type() == at::kBFloat16 && scores.is_contiguous() &&
              scores.size(2) >= scores.size(1), "scores must be contiguous [B, R, C ≥ R] bfloat16");
  const int64_t rows = scores.size(1), cols = scores.size(2);
  c10::BFloat16* data = scores.data_ptr<c10::BFloat16>();
  at::parallel_for(0, scores.size(0) * rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> tmp(cols);
    for (int64_t r = r0; r < r1; ++r)
      PAGEDLLM_BY_ISA(isa, softmax_row(data + r * cols, cols - rows + r % rows + 1, cols, tmp.data()));
  });
}

void check_out(const at::Tensor& out, int64_t m, int64_t n) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.stride(1) == 1 && out.size(0) == m &&
              out.size(1) == n, "out must be [M, N] float32 with unit column stride");
}

// x [M, K] float32 → [M, K/32 * 48] uint8 of int8 blocks.
at::Tensor quantize_q8(const at::Tensor& x, int64_t isa) {
  check_isa(isa);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) % 32 == 0, "x must be [M, 32k] float32");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({xc.size(0), activation_row_bytes(xc.size(1), false)}, xc.options().dtype(at::kByte));
  quantize_activations(xc.data_ptr<float>(), xc.size(0), xc.size(1), xc.size(1), out.data_ptr<uint8_t>(), false, isa);
  return out;
}

// out [M, N] = dequant(x_q8) · Wᵀ.
void matmul_q8(const at::Tensor& xq, const std::vector<at::Tensor>& ws, const std::vector<int64_t>& types, int64_t k,
               at::Tensor& out, int64_t isa) {
  check_isa(isa);
  const std::vector<Part> parts = parts_of(ws, types, k);
  TORCH_CHECK(xq.scalar_type() == at::kByte && xq.is_contiguous() && xq.size(1) == activation_row_bytes(k, false),
              "xq must be Q8 rows");
  check_out(out, xq.size(0), rows_of(parts));
  matmul_parts(xq.data_ptr<uint8_t>(), xq.size(0), parts, k, out.data_ptr<float>(), out.stride(0), false, false, isa);
}

// out [M, N] = x · Wᵀ with x float32, rounded to 15-bit blocks (the output head: fine enough that
// near-tied tokens keep their order, still integer dot products).
void matmul_q15(const at::Tensor& x, const std::vector<at::Tensor>& ws, const std::vector<int64_t>& types, int64_t k,
                at::Tensor& out, int64_t isa) {
  check_isa(isa);
  const std::vector<Part> parts = parts_of(ws, types, k);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == k && x.stride(1) == 1,
              "x must be [M, K] float32 with unit column stride");
  const int64_t m = x.size(0);
  check_out(out, m, rows_of(parts));
  at::Tensor xq = at::empty({m, activation_row_bytes(k, true)}, x.options().dtype(at::kByte));
  quantize_activations(x.data_ptr<float>(), m, k, x.stride(0), xq.data_ptr<uint8_t>(), true, isa);
  matmul_parts(xq.data_ptr<uint8_t>(), m, parts, k, out.data_ptr<float>(), out.stride(0), true, false, isa);
}

template <typename Out>
void dequantize_rows(const uint8_t* w, int64_t row_bytes, int64_t type, int64_t k, Out* out, int64_t rows,
                     int64_t isa) {
  const int64_t blocks = k / format_info(type).block_elems;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    with_format(type, [&]<int kType>() {
      for (int64_t r = r0; r < r1; ++r) PAGEDLLM_BY_ISA(isa, dequantize_row<kType>(w + r * row_bytes, blocks, out + r * k));
    });
  });
}

// W [N, row_bytes] → [N, K] in `dtype` (float32 or bfloat16).
at::Tensor dequantize(const at::Tensor& w, int64_t type, int64_t k, at::ScalarType dtype, int64_t isa) {
  check_isa(isa);
  check_weight(w, type, k);
  at::Tensor out = at::empty({w.size(0), k}, w.options().dtype(dtype));
  if (dtype == at::kFloat)
    dequantize_rows(w.data_ptr<uint8_t>(), w.size(1), type, k, out.data_ptr<float>(), w.size(0), isa);
  else if (dtype == at::kBFloat16)
    dequantize_rows(w.data_ptr<uint8_t>(), w.size(1), type, k, out.data_ptr<c10::BFloat16>(), w.size(0), isa);
  else
    TORCH_CHECK(false, "dequantize to ", dtype, " is not supported");
  return out;
}

// dst[M, N] (row stride dst_stride) = src[M, N] (contiguous bfloat16) widened to float32. torch's
// copy_ into a strided float slice took ~13% of a Qwen-sized prefill; bf16 → f32 is a 16-bit shift.
void widen_bf16_rows(const c10::BFloat16* src, int64_t m, int64_t n, float* dst, int64_t dst_stride) {
  at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* in = reinterpret_cast<const uint16_t*>(src + r * n);
      uint32_t* out = reinterpret_cast<uint32_t*>(dst + r * dst_stride);
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(in[i]) << 16;
    }
  });
}

// out [M, N] = x · dequant(W)ᵀ through the vendor GEMM, dequantising `tile_rows` rows of W at a
// time into one buffer that stays in cache. The GEMM runs in x's dtype.
void matmul_dequant(const at::Tensor& x, const std::vector<at::Tensor>& ws, const std::vector<int64_t>& types,
                    int64_t k, at::Tensor& out, int64_t tile_rows, int64_t isa) {
  check_isa(isa);
  const std::vector<Part> parts = parts_of(ws, types, k);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be [M, K] float32 or bfloat16");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == parts.back().first_row + parts.back().rows,
              "out must be [M, N]");
  TORCH_CHECK(tile_rows > 0, "tile_rows must be positive");
  const at::ScalarType dtype = x.scalar_type();
  // A part's tiles are made equal (to 16 rows): a short last tile runs the GEMM at half its rate.
  const int64_t buffer_rows = tile_rows + 15;
  at::Tensor buffer = at::empty({buffer_rows, k}, x.options());
  const bool widen = dtype == at::kBFloat16 && out.scalar_type() == at::kFloat && out.stride(1) == 1;
  at::Tensor product = at::empty({x.size(0) * buffer_rows}, x.options());  // [M, rows] per tile, contiguous
  for (const Part& p : parts) {
    const int64_t tiles = (p.rows + tile_rows - 1) / tile_rows;
    const int64_t even_rows = ((p.rows + tiles - 1) / tiles + 15) / 16 * 16;
    for (int64_t r0 = 0; r0 < p.rows; r0 += even_rows) {
      const int64_t rows = std::min(even_rows, p.rows - r0);
      at::Tensor tile = buffer.narrow(0, 0, rows);
      const uint8_t* src = p.data + r0 * p.row_bytes;
      if (dtype == at::kFloat) dequantize_rows(src, p.row_bytes, p.type, k, tile.data_ptr<float>(), rows, isa);
      else dequantize_rows(src, p.row_bytes, p.type, k, tile.data_ptr<c10::BFloat16>(), rows, isa);
      at::Tensor dst = out.narrow(1, p.first_row + r0, rows);
      if (dtype == out.scalar_type()) {
        at::mm_out(dst, x, tile.t());
      } else if (widen) {
        at::Tensor part = product.narrow(0, 0, x.size(0) * rows).view({x.size(0), rows});
        at::mm_out(part, x, tile.t());
        widen_bf16_rows(part.data_ptr<c10::BFloat16>(), x.size(0), rows, dst.data_ptr<float>(), out.stride(0));
      } else {
        dst.copy_(at::mm(x, tile.t()));
      }
    }
  }
}

}  // namespace
}  // namespace pagedllm_quant

using namespace pagedllm_quant;

TORCH_LIBRARY(pagedllm_quant, m) {
  m.def("best_isa() -> int", best_isa);
  m.def("quantize_q8(Tensor x, int isa) -> Tensor", quantize_q8);
  m.def("matmul_q8(Tensor xq, Tensor[] ws, int[] types, int k, Tensor(a!) out, int isa) -> ()", matmul_q8);
  m.def("matmul_q15(Tensor x, Tensor[] ws, int[] types, int k, Tensor(a!) out, int isa) -> ()", matmul_q15);
  m.def("dequantize(Tensor w, int type, int k, ScalarType dtype, int isa) -> Tensor", dequantize);
  m.def("silu_and_mul(Tensor gate_up, int isa) -> Tensor", silu_and_mul);
  m.def("causal_softmax_(Tensor(a!) scores, int isa) -> ()", causal_softmax_);
  m.def("matmul_dequant(Tensor x, Tensor[] ws, int[] types, int k, Tensor(a!) out, int tile_rows, int isa) -> ()",
        matmul_dequant);
}
