// The hybrid models' recurrent layers on the CPU, their states read and written in place in each
// sequence's slot. Gated DeltaNet's decode step: for every sequence of the step (one new token each), the
// causal convolution's step over its q, k and v, their l2 norms, the gated delta rule's update of each
// value head's state matrix, and the output's gated RMS norm — one pass over each state, no intermediate
// tensor. The causal depthwise convolution over any number of new tokens a sequence (prefill chunks, LFM2).
// Every instruction set's path is in this one build (recurrent_impl.h, included per namespace) and the
// caller picks one at run time, as for the packed-weight kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace pagedllm_recurrent {
namespace {

constexpr int64_t kIsaPortable = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;  // the ids of kernels.ISA_NAMES

struct DeltaNetArgs {
  const float* proj;  // [seqs, proj_stride]: q (key heads · dk) | k | v (value heads · dv) | z | b | a
  int64_t proj_stride, channels;  // channels: the convolution's, q | k | v
  const float* conv_weight;  // [channels, taps]
  int64_t taps;
  const float *a_log, *dt_bias, *norm_weight;  // [value heads], [value heads], [dv]
  float eps;
  float* conv_state;  // [slots, taps − 1, channels]
  float* matrices;    // [slots, value heads, dk, dv]
  const int64_t* slots;
  const bool* fresh;
  int64_t key_heads, value_heads, key_dim, value_dim;
  bool tiled;  // value head h reads key head h mod key heads (else h / (value heads / key heads))
  float* out;  // [seqs, value heads · dv]
};

struct ConvArgs {
  const float* x;  // [tokens, channels]: each sequence's new inputs, in order
  const float *weight, *bias;  // [channels, taps], [channels] or null
  int64_t channels, taps;
  float* state;  // [slots, taps − 1, channels]: each sequence's last inputs, oldest first
  const int64_t *slots, *query_start;  // [seqs], [seqs + 1]
  const bool* fresh;
  bool silu;
  float* out;  // [tokens, channels]
};

namespace portable {
#include "recurrent_impl.h"
}  // namespace portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define PAGEDLLM_SIMD
namespace avx2 {
#include "recurrent_impl.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
#define PAGEDLLM_AVX512
namespace avx512 {
#include "recurrent_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#undef PAGEDLLM_AVX512
#undef PAGEDLLM_SIMD

void check(const at::Tensor& t, at::ScalarType type, int64_t dims, const char* what) {
  TORCH_CHECK(t.scalar_type() == type && t.dim() == dims && t.is_contiguous(), what, " must be a contiguous ",
              dims, "-d tensor of ", type);
}

// proj [seqs, 2·key heads·dk + 2·value heads·dv + 2·value heads] float32 (the in-projection of each
// sequence's one new token) → [seqs, value heads·dv] float32, the states in conv_state [slots, taps − 1,
// channels] and matrices [slots, value heads, dk, dv] (float32) advanced by one token in place.
at::Tensor delta_net_decode(const at::Tensor& proj, const at::Tensor& conv_weight, const at::Tensor& a_log,
                            const at::Tensor& dt_bias, const at::Tensor& norm_weight, double eps,
                            at::Tensor& conv_state, at::Tensor& matrices, const at::Tensor& slots,
                            const at::Tensor& fresh, int64_t key_heads, bool tiled, int64_t isa) {
  check(proj, at::kFloat, 2, "proj");
  check(conv_weight, at::kFloat, 2, "conv_weight");
  check(matrices, at::kFloat, 4, "matrices");
  check(conv_state, at::kFloat, 3, "conv_state");
  check(slots, at::kLong, 1, "slots");
  check(fresh, at::kBool, 1, "fresh");
  const int64_t value_heads = matrices.size(1), dk = matrices.size(2), dv = matrices.size(3);
  const int64_t channels = 2 * key_heads * dk + value_heads * dv, seqs = proj.size(0);
  TORCH_CHECK(key_heads > 0 && value_heads % key_heads == 0, "value heads must be a multiple of key heads");
  TORCH_CHECK(proj.size(1) == channels + value_heads * dv + 2 * value_heads, "proj width does not fit the heads");
  TORCH_CHECK(conv_weight.size(0) == channels && conv_state.size(2) == channels &&
              conv_state.size(1) == conv_weight.size(1) - 1 && conv_weight.size(1) >= 2, "convolution shapes disagree");
  TORCH_CHECK(conv_state.size(0) == matrices.size(0) && slots.numel() == seqs && fresh.numel() == seqs,
              "one slot and one fresh flag per sequence");
  for (const at::Tensor* t : {&a_log, &dt_bias}) check(*t, at::kFloat, 1, "A_log and dt_bias");
  check(norm_weight, at::kFloat, 1, "norm_weight");
  TORCH_CHECK(a_log.numel() == value_heads && dt_bias.numel() == value_heads && norm_weight.numel() == dv,
              "A_log and dt_bias need one value a value head, the norm one a value");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t s = 0; s < seqs; ++s)
    TORCH_CHECK(slot[s] >= 0 && slot[s] < matrices.size(0), "sequence ", s, ": slot out of range");
  TORCH_CHECK(isa >= kIsaPortable && isa <= kIsaAvx512, "unknown instruction set ", isa);
  at::Tensor out = at::empty({seqs, value_heads * dv}, proj.options());
  const DeltaNetArgs a{proj.data_ptr<float>(), proj.size(1), channels, conv_weight.data_ptr<float>(),
                       conv_weight.size(1), a_log.data_ptr<float>(), dt_bias.data_ptr<float>(),
                       norm_weight.data_ptr<float>(), static_cast<float>(eps), conv_state.data_ptr<float>(),
                       matrices.data_ptr<float>(), slot, fresh.data_ptr<bool>(), key_heads, value_heads, dk, dv,
                       tiled, out.data_ptr<float>()};
  at::parallel_for(0, seqs * key_heads, 1, [&](int64_t t0, int64_t t1) {
    if (isa == kIsaAvx512) avx512::delta_net_tasks(a, t0, t1);
    else if (isa == kIsaAvx2) avx2::delta_net_tasks(a, t0, t1);
    else portable::delta_net_tasks(a, t0, t1);
  });
  return out;
}

// x [tokens, channels] float32 → the causal depthwise convolution of each sequence's inputs continuing
// from the last taps − 1 it saw (state [slots, taps − 1, channels] float32, then updated to its new last
// ones), optionally through SiLU: [tokens, channels] float32.
at::Tensor causal_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       at::Tensor& state, const at::Tensor& slots, const at::Tensor& fresh,
                       const at::Tensor& query_start, bool silu, int64_t isa) {
  check(x, at::kFloat, 2, "x");
  check(weight, at::kFloat, 2, "weight");
  check(state, at::kFloat, 3, "state");
  check(slots, at::kLong, 1, "slots");
  check(fresh, at::kBool, 1, "fresh");
  check(query_start, at::kLong, 1, "query_start");
  const int64_t channels = x.size(1), taps = weight.size(1), seqs = slots.numel();
  TORCH_CHECK(weight.size(0) == channels && state.size(2) == channels && state.size(1) == taps - 1 && taps >= 2,
              "convolution shapes disagree");
  if (bias) check(*bias, at::kFloat, 1, "bias");
  TORCH_CHECK(!bias || bias->numel() == channels, "one bias a channel");
  TORCH_CHECK(fresh.numel() == seqs && query_start.numel() == seqs + 1, "one slot, fresh flag and start a sequence");
  const int64_t* start = query_start.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  TORCH_CHECK(start[0] == 0 && start[seqs] == x.size(0), "query_start must run from 0 to the tokens of x");
  for (int64_t s = 0; s < seqs; ++s)
    TORCH_CHECK(start[s + 1] > start[s] && slot[s] >= 0 && slot[s] < state.size(0), "sequence ", s,
                ": no new tokens, or its slot out of range");
  TORCH_CHECK(isa >= kIsaPortable && isa <= kIsaAvx512, "unknown instruction set ", isa);
  at::Tensor out = at::empty_like(x);
  const ConvArgs a{x.data_ptr<float>(), weight.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, channels,
                   taps, state.data_ptr<float>(), slot, start, fresh.data_ptr<bool>(), silu, out.data_ptr<float>()};
  constexpr int64_t kRows = 16;  // tokens a task: its rows' weights and history stay in cache
  const int64_t seq_tasks = (x.size(0) + kRows - 1) / kRows;
  at::parallel_for(0, seq_tasks, 1, [&](int64_t t0, int64_t t1) {
    if (isa == kIsaAvx512) avx512::conv_rows(a, seqs, t0 * kRows, std::min(t1 * kRows, x.size(0)));
    else if (isa == kIsaAvx2) avx2::conv_rows(a, seqs, t0 * kRows, std::min(t1 * kRows, x.size(0)));
    else portable::conv_rows(a, seqs, t0 * kRows, std::min(t1 * kRows, x.size(0)));
  });
  at::parallel_for(0, seqs, 1, [&](int64_t s0, int64_t s1) {  // every read done: the histories move on
    for (int64_t s = s0; s < s1; ++s) portable::conv_history(a, s);
  });
  return out;
}

}  // namespace
}  // namespace pagedllm_recurrent

TORCH_LIBRARY_FRAGMENT(pagedllm_quant, m) {
  m.def("delta_net_decode(Tensor proj, Tensor conv_weight, Tensor a_log, Tensor dt_bias, Tensor norm_weight, "
        "float eps, Tensor(a!) conv_state, Tensor(b!) matrices, Tensor slots, Tensor fresh, int key_heads, "
        "bool tiled, int isa) -> Tensor",
        pagedllm_recurrent::delta_net_decode);
  m.def("causal_conv(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) state, Tensor slots, Tensor fresh, "
        "Tensor query_start, bool silu, int isa) -> Tensor",
        pagedllm_recurrent::causal_conv);
}
