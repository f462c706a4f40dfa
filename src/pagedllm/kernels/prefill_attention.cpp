// Prefill attention for the CPU in one fused pass: new tokens (whole prompts, or chunks against a
// long cached prefix) attend to the paged K/V cache in place, query tiles against key tiles with an
// online softmax, so no score matrix is materialised and no cache is gathered. Every instruction
// set's path is in this one build (prefill_impl.h, included per namespace) and the caller picks one
// at run time, as for the packed-weight kernels; products in bfloat16 where the CPU has AVX-512 BF16
// and the caller asks for them, else float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace pagedllm_prefill {
namespace {

constexpr int64_t kIsaPortable = 0, kIsaAvx2 = 1, kIsaAvx512 = 2;  // the ids of kernels.ISA_NAMES

struct PrefillArgs {
  const float* q;  // [tokens, heads, dim]
  float* out;      // the same shape
  int64_t heads, kv_heads, dim;
  const void* pool;  // [2, pool_blocks, block_size, kv_heads, row] of the pool's type
  int64_t pool_blocks, block_size, row;
  const int64_t* tables;  // [seqs, table_stride]
  int64_t table_stride;
  const int64_t* query_start;   // [seqs + 1] each sequence's first token in q
  const int64_t* context_lens;  // [seqs] its tokens in the cache, the new ones included
  float scale, softcap;         // softcap 0: none
  int64_t window;               // 0: none
  const float* alibi;           // [heads] slopes, or null
  const float* sinks;           // [heads] attention-sink logits, or null
};

struct PrefillTask {
  int64_t seq, kv_head, row0, rows;
};

namespace portable {
#include "prefill_impl.h"
}  // namespace portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define PAGEDLLM_SIMD
namespace avx2 {
#include "simd_exp.h"
#include "prefill_impl.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
#define PAGEDLLM_AVX512
namespace avx512 {
#include "simd_exp.h"
#include "prefill_impl.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")
#define PAGEDLLM_BF16
namespace avx512bf16 {
#include "simd_exp.h"
#include "prefill_impl.h"
}  // namespace avx512bf16
#pragma GCC pop_options
#undef PAGEDLLM_BF16
#undef PAGEDLLM_AVX512
#undef PAGEDLLM_SIMD

bool has_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}

// Runs of new tokens per task: about 8192 / dim queries of a group (measured best; 4096 / dim and
// 16384 / dim were 10-40% slower), fewer where that would leave threads idle.
std::vector<PrefillTask> plan_tasks(const PrefillArgs& a, int64_t seqs, int64_t threads, int64_t& lanes) {
  const int64_t group = a.heads / a.kv_heads;
  int64_t longest = 1, tokens = a.query_start[seqs];
  for (int64_t s = 0; s < seqs; ++s) longest = std::max(longest, a.query_start[s + 1] - a.query_start[s]);
  int64_t rows = std::max<int64_t>(1, std::min(longest, 8192 / a.dim / group));
  while (rows > 1 && (tokens / rows + seqs) * a.kv_heads < 4 * threads) rows /= 2;
  lanes = (rows * group + 15) / 16 * 16;  // a multiple of every path's vector width
  std::vector<PrefillTask> tasks;
  for (int64_t s = 0; s < seqs; ++s)
    for (int64_t r = 0; r < a.query_start[s + 1] - a.query_start[s]; r += rows)
      for (int64_t h = 0; h < a.kv_heads; ++h)
        tasks.push_back({s, h, r, std::min(rows, a.query_start[s + 1] - a.query_start[s] - r)});
  // The longest tasks (those seeing the most keys) first, so the last ones to finish are short.
  std::stable_sort(tasks.begin(), tasks.end(), [&](const PrefillTask& x, const PrefillTask& y) {
    const auto end = [&](const PrefillTask& t) {
      return a.context_lens[t.seq] - (a.query_start[t.seq + 1] - a.query_start[t.seq]) + t.row0 + t.rows;
    };
    return end(x) > end(y);
  });
  return tasks;
}

template <typename T>
void run(const PrefillArgs& a, int64_t seqs, bool bf16, int64_t isa) {
  const int64_t threads = at::get_num_threads();
  int64_t lanes = 0;
  const std::vector<PrefillTask> tasks = plan_tasks(a, seqs, threads, lanes);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(threads, tasks.size()), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {  // each worker takes tasks until none is left
      if (bf16) avx512bf16::prefill_tasks<T>(a, tasks, lanes, true, next);
      else if (isa == kIsaAvx512) avx512::prefill_tasks<T>(a, tasks, lanes, false, next);
      else if (isa == kIsaAvx2) avx2::prefill_tasks<T>(a, tasks, lanes, false, next);
      else portable::prefill_tasks<T>(a, tasks, lanes, false, next);
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& tables,
                  const at::Tensor& query_start, const at::Tensor& context_lens, const std::optional<at::Tensor>& alibi,
                  const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous [tokens, heads, dim] float32");
  const int64_t dim = q.size(2);
  TORCH_CHECK(dim % 16 == 0, "head dim must be a multiple of 16");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous() && q.size(1) % kv_cache.size(3) == 0,
              "kv_cache must be contiguous [2, blocks, block_size, kv_heads, row] with kv_heads dividing heads");
  const auto type = kv_cache.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kByte,
              "kv_cache must be float32, float16, bfloat16 or q8_0 bytes");
  TORCH_CHECK(kv_cache.size(4) == (type == at::kByte ? dim / 32 * 34 : dim) && (type != at::kByte || dim % 32 == 0),
              "kv_cache rows do not hold one head of ", dim, " values");
  const int64_t seqs = context_lens.numel();
  for (const at::Tensor* t : {&tables, &query_start, &context_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "block tables and lengths must be contiguous int64");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == seqs && query_start.numel() == seqs + 1, "one table and start per sequence");
  const int64_t* start = query_start.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  TORCH_CHECK(start[0] == 0 && start[seqs] == q.size(0), "query_start must run from 0 to the tokens of q");
  for (int64_t s = 0; s < seqs; ++s)
    TORCH_CHECK(start[s + 1] >= start[s] && lens[s] >= start[s + 1] - start[s] &&
                lens[s] <= tables.size(1) * kv_cache.size(2), "sequence ", s, ": lengths do not fit its block table");
  if (alibi) TORCH_CHECK(alibi->scalar_type() == at::kFloat && alibi->is_contiguous() && alibi->numel() == q.size(1),
                         "alibi must be one float32 slope per head");
  if (sinks) TORCH_CHECK(sinks->scalar_type() == at::kFloat && sinks->is_contiguous() && sinks->numel() == q.size(1),
                         "sinks must be one float32 logit per head");
}

// q [tokens, heads, dim] float32 (each sequence's new tokens, in order) → attention over each sequence's
// cached keys, in place through its block table; [tokens, heads, dim] float32.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& tables,
                             const at::Tensor& query_start, const at::Tensor& context_lens, double scale,
                             int64_t window, double softcap, const std::optional<at::Tensor>& alibi, bool bf16,
                             int64_t isa, const std::optional<at::Tensor>& sinks) {
  check_inputs(q, kv_cache, tables, query_start, context_lens, alibi, sinks);
  TORCH_CHECK(!bf16 || has_bf16(), "bfloat16 products need AVX-512 BF16");
  TORCH_CHECK(isa >= kIsaPortable && isa <= kIsaAvx512, "unknown instruction set ", isa);
  at::Tensor out = at::empty_like(q);
  if (q.size(0) == 0) return out;
  const PrefillArgs a{q.data_ptr<float>(), out.data_ptr<float>(), q.size(1), kv_cache.size(3), q.size(2),
                      kv_cache.data_ptr(), kv_cache.size(1), kv_cache.size(2), kv_cache.size(4),
                      tables.data_ptr<int64_t>(), tables.size(1), query_start.data_ptr<int64_t>(),
                      context_lens.data_ptr<int64_t>(), static_cast<float>(scale), static_cast<float>(softcap),
                      window, alibi ? alibi->data_ptr<float>() : nullptr, sinks ? sinks->data_ptr<float>() : nullptr};
  const int64_t seqs = context_lens.numel();
  switch (kv_cache.scalar_type()) {
    case at::kFloat: run<float>(a, seqs, bf16, isa); break;
    case at::kHalf: run<c10::Half>(a, seqs, bf16, isa); break;
    case at::kBFloat16: run<c10::BFloat16>(a, seqs, bf16, isa); break;
    default: run<uint8_t>(a, seqs, bf16, isa); break;
  }
  return out;
}

}  // namespace
}  // namespace pagedllm_prefill

TORCH_LIBRARY_FRAGMENT(pagedllm_quant, m) {
  m.def("prefill_has_bf16() -> bool", pagedllm_prefill::has_bf16);
  m.def("prefill_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor query_start, Tensor context_lens, "
        "float scale, int window, float softcap, Tensor? alibi, bool bf16, int isa, Tensor? sinks=None) -> Tensor",
        pagedllm_prefill::prefill_attention);
}
