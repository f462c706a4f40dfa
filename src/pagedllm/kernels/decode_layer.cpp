// A decoder layer's work around attention, for few rows (decode), in two calls instead of ~20
// small torch ops: at batch 1 those ops and their Python cost more than reading the weights.
//
//   attention_input:      h = rmsnorm(x); q, k, v = h·W_qkv (+ b); (q, k per-head rmsnorm); rope(q, k);
//                         k, v → cache slots
//   attention_output_mlp: x += attn·W_o; x += down(silu(gate) · up)(rmsnorm(x))
//
// A model's layers live in one DecodeLayers object (weights checked once, at load); a step of one
// query per sequence runs a layer whole (`decode`, the attention kernel in between) or every layer
// of the model (`decode_all`).
//
// Hybrid models (Qwen3.5): gated attention (q_proj gives each head its queries, then as many gate values;
// the attention output is multiplied by sigmoid(gate) before o), and Gated DeltaNet layers — rmsnorm,
// in_proj, the recurrent step (recurrent_layers.cpp: delta_net_decode, on each sequence's state slot),
// out_proj — before the same MLP. These run only whole (`decode`, `decode_delta_net`, `decode_all`).
//
// `lora` adds LoRA adapters to the four products, from the same float32 inputs the module path gives
// them: per adapter in the step, 9 tensors — its rows (int64; empty: every row), then Aᵀ and Bᵀ for
// q/k/v, o, gate/up and down (each pair empty where the adapter leaves that product alone).

#include "quant_kernels.h"

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace pagedllm_quant {
namespace {

// out = x / sqrt(mean(x²) + eps) · weight, per row (float32, as the model's RMSNorm).
void rms_norm_rows(const float* x, int64_t m, int64_t n, const float* weight, float eps, float* out) {
  for (int64_t r = 0; r < m; ++r, x += n, out += n) {
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
    const float inv = 1.f / std::sqrt(sum / n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
  }
}

// Rotate-half rope on `heads` heads of one row, in place.
void rope_row(float* v, int64_t heads, int64_t dim, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h, v += dim) {
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

template <typename T>
void write_cache_row(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// A uint8 pool holds q8_0 rows: per 32 values a float16 scale d = max|x| / 127, then round(x / d) as
// int8 — the same arithmetic as attention.kv_cache.quantize_q8_0, so both paths write the same bytes.
void write_cache_row(const float* src, int64_t n, uint8_t* dst) {
  for (int64_t b = 0; b < n; b += 32, dst += 34) {
    float amax = 0.f;
    for (int64_t i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(src[b + i]));
    const float d = amax / 127, inverse = d > 0 ? 1.f / d : 0.f;
    const c10::Half half_d(d);
    __builtin_memcpy(dst, &half_d, sizeof half_d);
    for (int64_t i = 0; i < 32; ++i) {
      const float q = std::min(127.f, std::max(-127.f, std::nearbyint(src[b + i] * inverse)));
      dst[2 + i] = static_cast<uint8_t>(static_cast<int8_t>(q));
    }
  }
}

// Pool elements a row of n values takes (q8_0: 34 bytes per 32 values).
int64_t cache_row_elements(const at::Tensor& cache, int64_t n) {
  return cache.scalar_type() == at::kByte ? n / 32 * 34 : n;
}

// k and v of each row into the [2, blocks, block_size, kv_heads, row] cache at its slot.
void write_kv(const float* qkv, int64_t m, int64_t row_stride, int64_t k_offset, int64_t kv_size, at::Tensor& cache,
              const int64_t* slots) {
  const int64_t half = cache.numel() / 2, row = cache_row_elements(cache, kv_size);
  const auto write = [&](auto* keys) {
    for (int64_t r = 0; r < m; ++r) {
      const float* src = qkv + r * row_stride + k_offset;
      write_cache_row(src, kv_size, keys + slots[r] * row);
      write_cache_row(src + kv_size, kv_size, keys + half + slots[r] * row);
    }
  };
  if (cache.scalar_type() == at::kByte) return write(cache.data_ptr<uint8_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, cache.scalar_type(), "write_kv",
                                  [&] { write(cache.data_ptr<scalar_t>()); });
}

// m rows of k floats (row stride `stride`) as int8 activation blocks.
at::Tensor quantised_rows(const float* x, int64_t m, int64_t k, int64_t stride, int64_t isa) {
  at::Tensor xq = at::empty({m, activation_row_bytes(k, false)}, at::dtype(at::kByte));
  quantize_activations(x, m, k, stride, xq.data_ptr<uint8_t>(), false, isa);
  return xq;
}

constexpr size_t kLoRATensors = 9;  // per adapter: rows, then Aᵀ, Bᵀ for q/k/v, o, gate/up, down

void check_lora(const std::vector<at::Tensor>& lora, int64_t m) {
  TORCH_CHECK(lora.size() % kLoRATensors == 0, "lora must hold 9 tensors per adapter: rows, then Aᵀ and Bᵀ for "
              "q/k/v, o, gate/up and down");
  for (size_t s = 0; s < lora.size(); s += kLoRATensors) {
    const at::Tensor& rows = lora[s];
    TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(), "LoRA rows must be int64");
    const int64_t* r = rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows.numel(); ++i) TORCH_CHECK(r[i] >= 0 && r[i] < m, "LoRA row ", r[i], " is outside the step");
  }
}

// out [M, N] += (in [M, K] · Aᵀ) · Bᵀ on each adapter's rows, for product `which` (0 q/k/v … 3 down), where
// that adapter updates it (in's and out's rows may be strided views; unit column stride).
void add_lora(const std::vector<at::Tensor>& lora, int which, const at::Tensor& in, at::Tensor& out, int64_t isa) {
  for (size_t s = 0; s < lora.size(); s += kLoRATensors) {
    const at::Tensor &rows = lora[s], &a_t = lora[s + 1 + 2 * which], &b_t = lora[s + 2 + 2 * which];
    if (a_t.numel() == 0) continue;
    TORCH_CHECK(a_t.scalar_type() == at::kFloat && b_t.scalar_type() == at::kFloat && a_t.dim() == 2 && b_t.dim() == 2 &&
                a_t.is_contiguous() && b_t.is_contiguous() && a_t.size(0) == in.size(1) && a_t.size(1) == b_t.size(0) &&
                b_t.size(1) == out.size(1) && in.stride(1) == 1 && out.stride(1) == 1,
                "LoRA update ", which, " does not fit its layer");
    lora_rows(in.data_ptr<float>(), in.stride(0), in.size(0), rows.numel() ? rows.data_ptr<int64_t>() : nullptr,
              rows.numel(), in.size(1), a_t.data_ptr<float>(), a_t.size(1), b_t.data_ptr<float>(), b_t.size(1),
              out.data_ptr<float>(), out.stride(0), isa);
  }
}

void check_rows(const at::Tensor& t, int64_t m, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == m * n, name,
              " must be contiguous float32 with ", n, " values per row");
}

// One decoder layer's weights and constants, checked once when the model is loaded: each step then
// checks only its own tensors. The packed weights stay where the loader put them (the parts point
// into `weights`, which keeps them alive).
struct LayerWeights {
  at::Tensor input_norm, post_norm;
  double input_eps, post_eps;
  std::vector<at::Tensor> weights;
  std::vector<Part> qkv, o, gate_up, down;  // a Gated DeltaNet layer's in_proj and out_proj in qkv and o
  std::optional<at::Tensor> bias, q_norm, k_norm, alibi;
  int64_t hidden, inter, num_heads = 0, num_kv_heads = 0, head_dim = 0, rope_index = 0;
  double scale = 0, softcap = 0;
  int64_t sliding_window = 0;
  bool bf16_attention = false;  // the decode kernel's products in bfloat16
  bool output_gate = false;  // gated attention: each head's q rows followed by its gate rows
  bool delta_net = false;  // the mixer is Gated DeltaNet, not attention
  at::Tensor conv_weight, a_log, dt_bias, mixer_norm;  // Gated DeltaNet's (delta_net_decode's arguments)
  double mixer_eps = 0;
  int64_t key_heads = 0, in_width = 0, value_width = 0;
  bool tiled = false;

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t q_width() const { return output_gate ? 2 * q_size() : q_size(); }  // q_proj's rows
  int64_t kv_size() const { return num_kv_heads * head_dim; }
};

std::vector<Part> held_parts(LayerWeights& l, const std::vector<at::Tensor>& ws, const std::vector<int64_t>& types,
                             int64_t k) {
  std::vector<Part> parts = parts_of(ws, types, k);
  l.weights.insert(l.weights.end(), ws.begin(), ws.end());
  return parts;
}

void check_x(const LayerWeights& l, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(1) == l.hidden,
              "x must be contiguous [M, ", l.hidden, "] float32");
}

// Gated attention's q_proj rows, [heads, q | gate] a row, apart: q [M, heads, dim] and gate [M, heads · dim].
std::pair<at::Tensor, at::Tensor> split_gated_queries(const float* qkv, int64_t m, int64_t width, int64_t heads,
                                                      int64_t dim) {
  at::Tensor q = at::empty({m, heads, dim}, at::dtype(at::kFloat)), gate = at::empty({m, heads * dim}, q.options());
  float *qp = q.data_ptr<float>(), *gp = gate.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      const float* src = qkv + r * width + h * 2 * dim;
      std::copy(src, src + dim, qp + (r * heads + h) * dim);
      std::copy(src + dim, src + 2 * dim, gp + (r * heads + h) * dim);
    }
  return {q, gate};
}

// x [M, hidden] → q [M, heads, dim]; k and v written to kv_cache at `slots` [M]. Gated attention: its
// gate [M, heads · dim] into `gate`.
at::Tensor attention_input(const LayerWeights& l, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           at::Tensor& kv_cache, const at::Tensor& slots, const std::vector<at::Tensor>& lora,
                           int64_t isa, at::Tensor* gate = nullptr) {
  TORCH_CHECK(!l.delta_net && (!l.output_gate || gate), "this fused layer runs only whole (decode)");
  check_isa(isa);
  check_x(l, x);
  const int64_t m = x.size(0), dim = l.head_dim, q_size = l.q_size(), kv_size = l.kv_size();
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.size(0) == 2 && kv_cache.size(3) == l.num_kv_heads,
              "kv_cache must be a contiguous [2, blocks, block_size, kv_heads, row] pool");
  TORCH_CHECK(kv_cache.size(4) == cache_row_elements(kv_cache, dim) && (kv_cache.scalar_type() != at::kByte || dim % 32 == 0),
              "kv_cache rows do not hold head_dim ", dim, " values");
  check_rows(cos, m, dim, "cos");
  check_rows(sin, m, dim, "sin");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == m, "slots must be [M] int64");
  const int64_t cache_slots = kv_cache.numel() / (2 * cache_row_elements(kv_cache, kv_size));
  check_lora(lora, m);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < m; ++r) TORCH_CHECK(slot[r] >= 0 && slot[r] < cache_slots, "slot ", slot[r], " is outside the cache");

  at::Tensor normed = at::empty({m, l.hidden}, x.options());
  rms_norm_rows(x.data_ptr<float>(), m, l.hidden, l.input_norm.data_ptr<float>(), static_cast<float>(l.input_eps),
                normed.data_ptr<float>());
  const at::Tensor xq = quantised_rows(normed.data_ptr<float>(), m, l.hidden, l.hidden, isa);
  const int64_t q_width = l.q_width(), width = q_width + 2 * kv_size;
  at::Tensor qkv = at::empty({m, width}, x.options());
  float* out = qkv.data_ptr<float>();
  matmul_parts(xq.data_ptr<uint8_t>(), m, l.qkv, l.hidden, out, width, false, false, isa);
  if (l.bias) qkv.add_(*l.bias);
  add_lora(lora, 0, normed, qkv, isa);
  at::Tensor q = qkv.narrow(1, 0, q_size).view({m, l.num_heads, dim});
  if (l.output_gate) std::tie(q, *gate) = split_gated_queries(out, m, width, l.num_heads, dim);
  // Row r's q heads (row stride q_stride) and k heads (in qkv, after q_proj's rows).
  float* qp = q.data_ptr<float>();
  const int64_t q_stride = l.output_gate ? q_size : width;
  if (l.q_norm) {  // Qwen3 / Gemma 3: each head of q and k normalised before the rotation
    const float eps = static_cast<float>(l.input_eps);
    for (int64_t r = 0; r < m; ++r) {
      rms_norm_rows(qp + r * q_stride, l.num_heads, dim, l.q_norm->data_ptr<float>(), eps, qp + r * q_stride);
      float* k = out + r * width + q_width;
      rms_norm_rows(k, l.num_kv_heads, dim, l.k_norm->data_ptr<float>(), eps, k);
    }
  }
  for (int64_t r = 0; r < m; ++r) {
    const float *c = cos.data_ptr<float>() + r * dim, *s = sin.data_ptr<float>() + r * dim;
    rope_row(qp + r * q_stride, l.num_heads, dim, c, s);
    rope_row(out + r * width + q_width, l.num_kv_heads, dim, c, s);
  }
  write_kv(out, m, width, q_width, kv_size, kv_cache, slot);
  return q;
}

// x [M, hidden] += down(silu(gate) · up)(rmsnorm(x)): every layer's second half.
void mlp(const LayerWeights& l, at::Tensor& x, const std::vector<at::Tensor>& lora, int64_t isa) {
  const int64_t m = x.size(0), hidden = l.hidden, inter = l.inter;
  float* xp = x.data_ptr<float>();
  at::Tensor normed = at::empty({m, hidden}, x.options());
  rms_norm_rows(xp, m, hidden, l.post_norm.data_ptr<float>(), static_cast<float>(l.post_eps), normed.data_ptr<float>());
  at::Tensor xq = quantised_rows(normed.data_ptr<float>(), m, hidden, hidden, isa);
  at::Tensor gu = at::empty({m, 2 * inter}, x.options());
  float* g = gu.data_ptr<float>();
  matmul_parts(xq.data_ptr<uint8_t>(), m, l.gate_up, hidden, g, 2 * inter, false, false, isa);
  add_lora(lora, 2, normed, gu, isa);
  silu_mul_rows(g, m, inter, isa);  // into the gate half
  xq = quantised_rows(g, m, inter, 2 * inter, isa);
  matmul_parts(xq.data_ptr<uint8_t>(), m, l.down, inter, xp, hidden, false, true, isa);
  at::Tensor silu_out = gu.narrow(1, 0, inter);
  add_lora(lora, 3, silu_out, x, isa);
}

// x [M, hidden] += mixed · W_oᵀ (the mixer's output [M, width] through o_proj / out_proj).
void add_output_projection(const LayerWeights& l, at::Tensor& x, const at::Tensor& mixed, int64_t width,
                           const std::vector<at::Tensor>& lora, int64_t isa) {
  const int64_t m = x.size(0);
  const at::Tensor xq = quantised_rows(mixed.data_ptr<float>(), m, width, width, isa);
  matmul_parts(xq.data_ptr<uint8_t>(), m, l.o, width, x.data_ptr<float>(), l.hidden, false, true, isa);
  add_lora(lora, 1, mixed.view({m, width}), x, isa);
}

// x [M, hidden] += attn·W_oᵀ, then += the SwiGLU MLP of rmsnorm(x). attn: [M, heads·dim].
void attention_output_mlp(const LayerWeights& l, at::Tensor& x, const at::Tensor& attn,
                          const std::vector<at::Tensor>& lora, int64_t isa) {
  check_isa(isa);
  check_x(l, x);
  TORCH_CHECK(!l.delta_net && !l.output_gate, "this fused layer runs only whole (decode)");
  const int64_t m = x.size(0);
  check_rows(attn, m, l.q_size(), "attn");
  check_lora(lora, m);
  add_output_projection(l, x, attn, l.q_size(), lora, isa);
  mlp(l, x, lora, isa);
}

// The whole layer for a step of one query per sequence: attention_input, the paged decode kernel
// (pagedllm::paged_decode_attention, from the attention build, through the dispatcher), the output gate
// where the layer has one, o_proj and the MLP.
void decode(const LayerWeights& l, at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
            const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& context_lens,
            const std::vector<at::Tensor>& lora, int64_t isa) {
  static const auto attend = c10::Dispatcher::singleton()
      .findSchemaOrThrow("pagedllm::paged_decode_attention", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
                        double, const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&)>();
  at::Tensor gate;
  const at::Tensor q = attention_input(l, x, cos, sin, kv_cache, slots, lora, isa, &gate);
  at::Tensor out = attend.call(q, kv_cache, block_tables, context_lens, l.scale, l.sliding_window, l.softcap, l.alibi,
                               l.bf16_attention, std::nullopt).contiguous();
  if (l.output_gate) {  // out · sigmoid(gate), as the module path
    float* o = out.data_ptr<float>();
    const float* g = gate.data_ptr<float>();
    for (int64_t i = 0; i < out.numel(); ++i) o[i] *= 1.f / (1.f + std::exp(-g[i]));
  }
  add_output_projection(l, x, out, l.q_size(), lora, isa);
  mlp(l, x, lora, isa);
}

// A Gated DeltaNet layer whole, every sequence decoding one token: x += out_proj(delta rule step(in_proj(
// rmsnorm(x)))) on each sequence's state slot (conv_state, matrices, advanced in place), then the MLP.
void decode_delta_net(const LayerWeights& l, at::Tensor& x, at::Tensor& conv_state, at::Tensor& matrices,
                      const at::Tensor& state_slots, const at::Tensor& fresh, const std::vector<at::Tensor>& lora,
                      int64_t isa) {
  static const auto step = c10::Dispatcher::singleton()
      .findSchemaOrThrow("pagedllm_quant::delta_net_decode", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                        int64_t)>();
  check_isa(isa);
  check_x(l, x);
  TORCH_CHECK(l.delta_net, "not a Gated DeltaNet layer");
  const int64_t m = x.size(0);
  check_lora(lora, m);
  at::Tensor normed = at::empty({m, l.hidden}, x.options());
  rms_norm_rows(x.data_ptr<float>(), m, l.hidden, l.input_norm.data_ptr<float>(), static_cast<float>(l.input_eps),
                normed.data_ptr<float>());
  const at::Tensor xq = quantised_rows(normed.data_ptr<float>(), m, l.hidden, l.hidden, isa);
  at::Tensor proj = at::empty({m, l.in_width}, x.options());
  matmul_parts(xq.data_ptr<uint8_t>(), m, l.qkv, l.hidden, proj.data_ptr<float>(), l.in_width, false, false, isa);
  add_lora(lora, 0, normed, proj, isa);
  const at::Tensor out = step.call(proj, l.conv_weight, l.a_log, l.dt_bias, l.mixer_norm, l.mixer_eps, conv_state,
                                   matrices, state_slots, fresh, l.key_heads, l.tiled, isa);
  add_output_projection(l, x, out, l.value_width, lora, isa);
  mlp(l, x, lora, isa);
}

// A model's fused decoder layers (models/fused_decode.py), built once after loading. A step calls
// one layer's halves or whole, or, where every layer of the model is here, `decode_all` runs them
// all in one call: at ~60 µs a small model's layer, issuing 30 calls from Python cost ~15 µs each.
struct DecodeLayers : torch::CustomClassHolder {
  std::vector<LayerWeights> layers;

  int64_t add(const at::Tensor& input_norm, double input_eps, const at::Tensor& post_norm, double post_eps,
              const std::vector<at::Tensor>& qkv_ws, const std::vector<int64_t>& qkv_types,
              const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& q_norm,
              const std::optional<at::Tensor>& k_norm, const std::vector<at::Tensor>& o_ws,
              const std::vector<int64_t>& o_types, const std::vector<at::Tensor>& gate_up_ws,
              const std::vector<int64_t>& gate_up_types, const std::vector<at::Tensor>& down_ws,
              const std::vector<int64_t>& down_types, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              double scale, int64_t sliding_window, double softcap, const std::optional<at::Tensor>& alibi,
              bool bf16_attention, int64_t rope_index, bool output_gate) {
    LayerWeights l = with_norms(input_norm, input_eps, post_norm, post_eps);
    l.num_heads = num_heads, l.num_kv_heads = num_kv_heads, l.head_dim = head_dim, l.rope_index = rope_index;
    l.scale = scale, l.sliding_window = sliding_window, l.softcap = softcap, l.bf16_attention = bf16_attention;
    l.output_gate = output_gate;
    TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0 && head_dim % 2 == 0, "bad head shapes");
    const int64_t width = l.q_width() + 2 * l.kv_size();
    l.qkv = held_parts(l, qkv_ws, qkv_types, l.hidden);
    TORCH_CHECK(rows_of(l.qkv) == width, "q/k/v weights have ", rows_of(l.qkv), " rows, heads need ", width);
    l.o = held_parts(l, o_ws, o_types, l.q_size());
    add_mlp(l, gate_up_ws, gate_up_types, down_ws, down_types);
    if (bias) check_rows(*bias, 1, width, "bias");
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q_norm and k_norm come together");
    if (q_norm) {
      check_rows(*q_norm, 1, head_dim, "q_norm");
      check_rows(*k_norm, 1, head_dim, "k_norm");
    }
    TORCH_CHECK(!alibi || (alibi->scalar_type() == at::kFloat && alibi->numel() == num_heads),
                "alibi must hold one float32 slope per query head");
    l.bias = bias, l.q_norm = q_norm, l.k_norm = k_norm, l.alibi = alibi;
    layers.push_back(std::move(l));
    return static_cast<int64_t>(layers.size()) - 1;
  }

  // A Gated DeltaNet layer (its shapes are checked again by delta_net_decode at each step).
  int64_t add_delta_net(const at::Tensor& input_norm, double input_eps, const at::Tensor& post_norm, double post_eps,
                        const std::vector<at::Tensor>& in_ws, const std::vector<int64_t>& in_types,
                        const at::Tensor& conv_weight, const at::Tensor& a_log, const at::Tensor& dt_bias,
                        const at::Tensor& mixer_norm, double mixer_eps, int64_t key_heads, bool tiled,
                        const std::vector<at::Tensor>& out_ws, const std::vector<int64_t>& out_types,
                        const std::vector<at::Tensor>& gate_up_ws, const std::vector<int64_t>& gate_up_types,
                        const std::vector<at::Tensor>& down_ws, const std::vector<int64_t>& down_types) {
    LayerWeights l = with_norms(input_norm, input_eps, post_norm, post_eps);
    l.delta_net = true, l.key_heads = key_heads, l.tiled = tiled, l.mixer_eps = mixer_eps;
    for (const at::Tensor* t : {&conv_weight, &a_log, &dt_bias, &mixer_norm})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "Gated DeltaNet's parameters must be float32");
    l.conv_weight = conv_weight, l.a_log = a_log, l.dt_bias = dt_bias, l.mixer_norm = mixer_norm;
    const int64_t values = a_log.numel(), dv = mixer_norm.numel();
    TORCH_CHECK(key_heads > 0 && values % key_heads == 0 && conv_weight.dim() == 2, "bad Gated DeltaNet shapes");
    l.value_width = values * dv;
    l.qkv = held_parts(l, in_ws, in_types, l.hidden);
    l.in_width = rows_of(l.qkv);
    TORCH_CHECK(l.in_width == conv_weight.size(0) + l.value_width + 2 * values, "in_proj has ", l.in_width,
                " rows, the heads need ", conv_weight.size(0) + l.value_width + 2 * values);
    l.o = held_parts(l, out_ws, out_types, l.value_width);
    add_mlp(l, gate_up_ws, gate_up_types, down_ws, down_types);
    layers.push_back(std::move(l));
    return static_cast<int64_t>(layers.size()) - 1;
  }

  static LayerWeights with_norms(const at::Tensor& input_norm, double input_eps, const at::Tensor& post_norm,
                                 double post_eps) {
    LayerWeights l;
    l.hidden = input_norm.numel();
    check_rows(input_norm, 1, l.hidden, "input_norm");
    check_rows(post_norm, 1, l.hidden, "post_norm");
    l.input_norm = input_norm, l.post_norm = post_norm, l.input_eps = input_eps, l.post_eps = post_eps;
    return l;
  }

  static void add_mlp(LayerWeights& l, const std::vector<at::Tensor>& gate_up_ws,
                      const std::vector<int64_t>& gate_up_types, const std::vector<at::Tensor>& down_ws,
                      const std::vector<int64_t>& down_types) {
    l.gate_up = held_parts(l, gate_up_ws, gate_up_types, l.hidden);
    l.inter = rows_of(l.gate_up) / 2;
    l.down = held_parts(l, down_ws, down_types, l.inter);
    TORCH_CHECK(rows_of(l.o) == l.hidden && rows_of(l.down) == l.hidden && rows_of(l.gate_up) == 2 * l.inter,
                "o, gate/up and down weights do not fit the hidden size");
  }

  const LayerWeights& layer(int64_t index) const {
    TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(layers.size()), "no fused layer ", index);
    return layers[index];
  }

  at::Tensor attention_input(int64_t index, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                             at::Tensor kv_cache, const at::Tensor& slots, const std::vector<at::Tensor>& lora,
                             int64_t isa) {
    return pagedllm_quant::attention_input(layer(index), x, cos, sin, kv_cache, slots, lora, isa);
  }

  void attention_output_mlp(int64_t index, at::Tensor x, const at::Tensor& attn, const std::vector<at::Tensor>& lora,
                            int64_t isa) {
    pagedllm_quant::attention_output_mlp(layer(index), x, attn, lora, isa);
  }

  void decode(int64_t index, at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv_cache,
              const at::Tensor& slots, const at::Tensor& block_tables, const at::Tensor& context_lens,
              const std::vector<at::Tensor>& lora, int64_t isa) {
    pagedllm_quant::decode(layer(index), x, cos, sin, kv_cache, slots, block_tables, context_lens, lora, isa);
  }

  void decode_delta_net(int64_t index, at::Tensor x, at::Tensor conv_state, at::Tensor matrices,
                        const at::Tensor& state_slots, const at::Tensor& fresh, const std::vector<at::Tensor>& lora,
                        int64_t isa) {
    pagedllm_quant::decode_delta_net(layer(index), x, conv_state, matrices, state_slots, fresh, lora, isa);
  }

  // Every layer in order; cos/sin per rotation of the model (a layer's rope_index picks one); `caches` each
  // layer's in order — an attention layer's KV pool, a Gated DeltaNet layer's conv state and matrices (its
  // sequences' slots in `state_slots`, `fresh` where a sequence starts over; empty for other models);
  // `lora` the layers' lists one after the other (each the same length).
  void decode_all(at::Tensor x, const std::vector<at::Tensor>& cos, const std::vector<at::Tensor>& sin,
                  std::vector<at::Tensor> caches, const at::Tensor& slots, const at::Tensor& block_tables,
                  const at::Tensor& context_lens, const at::Tensor& state_slots, const at::Tensor& fresh,
                  const std::vector<at::Tensor>& lora, int64_t isa) {
    const size_t n = layers.size();
    size_t wanted = 0;
    for (const LayerWeights& l : layers) wanted += l.delta_net ? 2 : 1;
    TORCH_CHECK(caches.size() == wanted && lora.size() % std::max<size_t>(n, 1) == 0 && cos.size() == sin.size(),
                "decode_all needs each layer's caches and one LoRA list per layer");
    const size_t per_layer = n ? lora.size() / n : 0;
    size_t cache = 0;
    for (size_t i = 0; i < n; ++i) {
      const LayerWeights& l = layers[i];
      const std::vector<at::Tensor> layer_lora(lora.begin() + i * per_layer, lora.begin() + (i + 1) * per_layer);
      if (l.delta_net) {
        pagedllm_quant::decode_delta_net(l, x, caches[cache], caches[cache + 1], state_slots, fresh, layer_lora, isa);
        cache += 2;
        continue;
      }
      TORCH_CHECK(l.rope_index >= 0 && l.rope_index < static_cast<int64_t>(cos.size()), "no rotation ", l.rope_index);
      pagedllm_quant::decode(l, x, cos[l.rope_index], sin[l.rope_index], caches[cache++], slots, block_tables,
                             context_lens, layer_lora, isa);
    }
  }
};

}  // namespace
}  // namespace pagedllm_quant

TORCH_LIBRARY_FRAGMENT(pagedllm_quant, m) {
  using pagedllm_quant::DecodeLayers;
  m.class_<DecodeLayers>("DecodeLayers")
      .def(torch::init<>())
      .def("add", &DecodeLayers::add)
      .def("add_delta_net", &DecodeLayers::add_delta_net)
      .def("decode_delta_net", &DecodeLayers::decode_delta_net)
      .def("attention_input", &DecodeLayers::attention_input)
      .def("attention_output_mlp", &DecodeLayers::attention_output_mlp)
      .def("decode", &DecodeLayers::decode)
      .def("decode_all", &DecodeLayers::decode_all);
}
