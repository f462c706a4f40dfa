// What quant_matmul.cpp offers the other sources of the packed-weight build (decode_layer.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace pagedllm_quant {

// A weight given in parts (e.g. q, k, v of different types): their rows are stacked, in order.
struct Part {
  const uint8_t* data;
  int64_t type, rows, row_bytes, first_row;
};

void check_isa(int64_t isa);
std::vector<Part> parts_of(const std::vector<at::Tensor>& ws, const std::vector<int64_t>& types, int64_t k);
inline int64_t rows_of(const std::vector<Part>& parts) { return parts.back().first_row + parts.back().rows; }

// Activations are quantised to blocks of 32: int8 (48 bytes a block) or, `wide`, 15-bit as two int8 halves (80);
// the AVX-512 path keeps them in groups of four blocks (the last one padded), which take no more room.
inline int64_t activation_row_bytes(int64_t k, bool wide) { return (k / 32 + 3) / 4 * 4 * (wide ? 80 : 48); }
void quantize_activations(const float* x, int64_t m, int64_t k, int64_t x_stride, uint8_t* out, bool wide,
                          int64_t isa);

// gate_up [M, 2·n] → its first n columns = silu(gate) · up (vectorised, with a polynomial exp).
void silu_mul_rows(float* gate_up, int64_t m, int64_t n, int64_t isa);

// out[row] (rows out_stride apart) += (x[row] · a_t[K, R]) · b_t[R, N] (float32) for the `count` rows
// listed in `rows`, or for rows 0..m-1 where `rows` is null: a LoRA adapter's update of a few rows;
// torch's GEMMs cost more to call than these products take.
void lora_rows(const float* x, int64_t x_stride, int64_t m, const int64_t* rows, int64_t count, int64_t k,
               const float* a_t, int64_t r, const float* b_t, int64_t n, float* out, int64_t out_stride, int64_t isa);

// out[M, N] (row stride out_stride) = x · Wᵀ, or += with `accumulate`; x quantised as above.
void matmul_parts(const uint8_t* xq, int64_t m, const std::vector<Part>& parts, int64_t k, float* out,
                  int64_t out_stride, bool wide, bool accumulate, int64_t isa);

}  // namespace pagedllm_quant
