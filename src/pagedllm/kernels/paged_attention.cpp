// Decode attention that reads K/V in place through block tables (CPU).
//
// One query token per sequence. Work is split over (sequence, kv head) pairs, and over shares of a
// pair's keys where pairs are few, with torch's own thread pool; each task scores its group of
// query heads against its cached keys, takes the exponentials and sums the values, without gathering
// or padding the cache first; shares' partial softmaxes are merged after.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Eight floats as one value: GCC/Clang lower it to AVX2 (or SSE, NEON) without intrinsics.
typedef float Float8 __attribute__((vector_size(32)));

inline Float8 load8(const float* p) {
  Float8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline Float8 load8(const c10::BFloat16* p) {  // bfloat16 is the top half of a float32
  typedef uint16_t Half8 __attribute__((vector_size(16)));
  typedef uint32_t Word8 __attribute__((vector_size(32)));
  Half8 bits;
  __builtin_memcpy(&bits, p, sizeof bits);
  return reinterpret_cast<Float8>(__builtin_convertvector(bits, Word8) << 16);
}

inline Float8 load8(const c10::Half* p) {
  Float8 v;
#if defined(__F16C__)  // this file is built with -march=native: one instruction where the CPU has it
  const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __builtin_memcpy(&v, &wide, sizeof v);
#else
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
#endif
  return v;
}

// A cached head row of kDim values as kDim / 8 vectors. Float rows are read as they are; q8_0 rows
// (T = uint8_t: per 32 values a float16 scale d, then 32 int8 q) are d·q.
template <int64_t kDim, typename T>
inline void load_row(const T* row, Float8* out) {
  for (int64_t i = 0; i < kDim / 8; ++i) out[i] = load8(row + 8 * i);
}

// Eight int8 as floats (GCC turns a vector-extension conversion from int8 into scalar code: 8 × cvtsi2ss).
inline Float8 bytes_to_floats(const uint8_t* p) {
#if defined(__AVX2__)
  const __m256 wide = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  Float8 v;
  __builtin_memcpy(&v, &wide, sizeof v);
  return v;
#else
  Float8 v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(static_cast<int8_t>(p[i]));
  return v;
#endif
}

template <int64_t kDim>
inline void load_row(const uint8_t* row, Float8* out) {
  for (int64_t b = 0; b < kDim / 32; ++b, row += 34) {
    c10::Half d;
    __builtin_memcpy(&d, row, sizeof d);
    const float scale = static_cast<float>(d);
    for (int64_t i = 0; i < 4; ++i) out[4 * b + i] = bytes_to_floats(row + 2 + 8 * i) * scale;
  }
}

// Pool elements per head row of `head_dim` values (q8_0: 34 bytes per 32 values).
template <typename T>
constexpr int64_t row_elements(int64_t head_dim) {
  return std::is_same_v<T, uint8_t> ? head_dim / 32 * 34 : head_dim;
}

inline float sum8(Float8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// How raw scores become logits: × scale, then optionally cap · tanh(s / cap) (Gemma 2) and
// ALiBi's slope · (key position − query position) (BLOOM, Baichuan-13B; slopes per query head).
struct ScoreMods {
  float scale;
  float softcap;         // 0: none
  const float* slopes;   // the group's first head's slope, or nullptr
};

inline void modify_scores(float* row, int64_t n, int64_t first, int64_t last, float slope, float softcap) {
  if (softcap > 0.f) {
    for (int64_t i = 0; i < n; ++i) row[i] = softcap * std::tanh(row[i] / softcap);
  }
  if (slope != 0.f) {  // the query is the sequence's last token, at position last - 1
    for (int64_t i = 0; i < n; ++i) row[i] += slope * static_cast<float>(first + i - (last - 1));
  }
}

constexpr int64_t kHeadTile = 4;  // query heads summed together in pass 2
// A task's most keys: longer sequences are split into shares merged after (as flash-decoding splits
// them over threads), so a task's scores stay in cache — at 16k tokens of Qwen2.5-0.5B's shape one share
// per kv head wrote 458 KB of scores and 24 layers took 17-30 ms; shares of 1,024 keys take 15 ms, every run.
constexpr int64_t kShareKeys = 1024;

// A task's softmax partials for `group` query heads over keys [begin, end) of a sequence whose
// query is its token last − 1: per head, kDim + 2 floats: the values summed with weights
// exp(logit − peak) (unnormalised), the peak logit, and Σ exp(logit − peak) — or, `whole` (the task
// has all of the keys), the weights already divided by that sum and 1. Pass 1 scores the keys (each loaded once for the whole group),
// then the exponentials, then pass 2 sums the values per head in registers.
// offsets[t − begin]: where key t's row starts in `keys` and `values` (paged through the block table).
template <typename T, int64_t kDim>
void attend_keys(const float* __restrict__ query, const T* __restrict__ keys, const T* __restrict__ values,
                 const int64_t* __restrict__ offsets, int64_t begin, int64_t end, int64_t last, int64_t group,
                 ScoreMods mods, bool whole, float* __restrict__ scores, float* __restrict__ partials) {
  constexpr int64_t kLanes = kDim / 8;
  const int64_t n = end - begin;
  const auto row_of = [&](const T* base, int64_t t) { return base + offsets[t - begin]; };
  for (int64_t t = begin; t < end; ++t) {
    Float8 k[kLanes];
    load_row<kDim>(row_of(keys, t), k);
    for (int64_t g = 0; g < group; ++g) {
      Float8 acc = load8(query + g * kDim) * k[0];
      for (int64_t i = 1; i < kLanes; ++i) acc += load8(query + g * kDim + 8 * i) * k[i];
      scores[g * n + (t - begin)] = sum8(acc) * mods.scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* row = scores + g * n;
    modify_scores(row, n, begin, last, mods.slopes ? mods.slopes[g] : 0.f, mods.softcap);
    const float peak = *std::max_element(row, row + n);
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) total += (row[i] = std::exp(row[i] - peak));
    if (whole) {  // the weights normalised before the values are summed, as a single pass computes them
      const float inv = 1.f / total;
      for (int64_t i = 0; i < n; ++i) row[i] *= inv;
      total = 1.f;
    }
    partials[g * (kDim + 2) + kDim] = peak, partials[g * (kDim + 2) + kDim + 1] = total;
  }
  // Pass 2 reads each value row once for kHeadTile heads (once per head, it cost a conversion a head).
  for (int64_t g0 = 0; g0 < group; g0 += kHeadTile) {
    const int64_t tile = std::min(kHeadTile, group - g0);
    Float8 acc[kHeadTile][kLanes] = {};
    for (int64_t t = begin; t < end; ++t) {
      Float8 v[kLanes];
      load_row<kDim>(row_of(values, t), v);
      for (int64_t g = 0; g < tile; ++g) {
        const float p = scores[(g0 + g) * n + (t - begin)];
        for (int64_t i = 0; i < kLanes; ++i) acc[g][i] += p * v[i];
      }
    }
    for (int64_t g = 0; g < tile; ++g) __builtin_memcpy(partials + (g0 + g) * (kDim + 2), acc[g], sizeof acc[g]);
  }
}

// out[head_dim] = the softmax-weighted values of one query head from its tasks' partials (each
// partial `stride` floats apart: dim sums, then peak and total), the peaks brought to a common one.
void merge_partials(const float* partials, int64_t count, int64_t stride, int64_t dim, float* out) {
  float peak = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < count; ++c)
    if (partials[c * stride + dim + 1] != 0.f) peak = std::max(peak, partials[c * stride + dim]);  // shares with keys
  float total = 0.f;
  std::fill(out, out + dim, 0.f);
  for (int64_t c = 0; c < count; ++c) {
    const float* part = partials + c * stride;
    if (part[dim + 1] == 0.f) continue;  // a share with no keys
    const float weight = std::exp(part[dim] - peak);
    total += weight * part[dim + 1];
    for (int64_t i = 0; i < dim; ++i) out[i] += weight * part[i];
  }
  const float inv = 1.f / total;
  for (int64_t i = 0; i < dim; ++i) out[i] *= inv;
}

template <typename T>
void decode_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, double scale, int64_t sliding_window, double softcap,
                      const float* slopes, at::Tensor& out) {
  const int64_t seqs = query.size(0), heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = kv_cache.size(2), kv_heads = kv_cache.size(3);
  const int64_t row = row_elements<T>(head_dim), group = heads / kv_heads, token_stride = kv_heads * row;
  const int64_t max_blocks = block_tables.size(1);
  const T* keys = kv_cache.select(0, 0).data_ptr<T>();
  const T* values = kv_cache.select(0, 1).data_ptr<T>();
  const float* q_all = query.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* out_all = out.data_ptr<float>();
  const auto attend = head_dim == 64 ? attend_keys<T, 64> : head_dim == 128 ? attend_keys<T, 128>
                    : head_dim == 96 ? attend_keys<T, 96> : head_dim == 80 ? attend_keys<T, 80>
                    : head_dim == 256 ? attend_keys<T, 256> : head_dim == 32 ? attend_keys<T, 32> : attend_keys<T, 16>;
  const auto window = [&](int64_t seq) {
    const int64_t last = lens[seq];
    return std::pair<int64_t, int64_t>(sliding_window > 0 ? std::max<int64_t>(0, last - sliding_window) : 0, last);
  };
  // Where the (sequence, kv head) pairs do not split evenly over the threads and are few (one sequence
  // of SmolLM2 has 3: on 2 threads one would take 2), each pair's keys are split into one share per
  // thread, of at least 32 keys (flash-decoding's split), whose softmax partials are merged after;
  // and every pair into shares of at most kShareKeys keys.
  int64_t longest = 0;
  for (int64_t seq = 0; seq < seqs; ++seq) longest = std::max(longest, window(seq).second - window(seq).first);
  const int64_t pairs = seqs * kv_heads, threads = at::get_num_threads();
  const bool uneven = pairs % threads != 0 && pairs < 8 * threads;
  const int64_t shares = std::max(uneven ? std::max<int64_t>(1, std::min(threads, longest / 32)) : 1,
                                  (longest + kShareKeys - 1) / kShareKeys);
  const int64_t stride = head_dim + 2;  // a partial: the head's summed values, its peak, its total
  std::vector<float> partials(shares > 1 ? pairs * shares * group * stride : 0);
  at::parallel_for(0, pairs * shares, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, one(group * stride);
    std::vector<int64_t> offsets;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / shares, share = task % shares, seq = pair / kv_heads, kv_head = pair % kv_heads;
      const auto [first, last] = window(seq);
      const int64_t per_share = (last - first + shares - 1) / shares;
      const int64_t key_begin = std::min(last, first + share * per_share), key_end = std::min(last, key_begin + per_share);
      float* part = shares > 1 ? partials.data() + task * group * stride : one.data();
      scores.resize(group * (key_end - key_begin));
      const int64_t head = (seq * heads + kv_head * group) * head_dim;
      const ScoreMods mods{static_cast<float>(scale), static_cast<float>(softcap),
                           slopes ? slopes + kv_head * group : nullptr};
      offsets.resize(key_end - key_begin);
      const int64_t* blocks = tables + seq * max_blocks;
      for (int64_t t = key_begin; t < key_end; ++t)  // one division a key, not one a key and head
        offsets[t - key_begin] = (blocks[t / block_size] * block_size + t % block_size) * token_stride;
      if (key_end > key_begin)
        attend(q_all + head, keys + kv_head * row, values + kv_head * row, offsets.data(), key_begin, key_end, last,
               group, mods, shares == 1, scores.data(), part);
      else
        for (int64_t g = 0; g < group; ++g) part[g * stride + head_dim + 1] = 0.f;  // a share with no keys
      if (shares == 1)
        for (int64_t g = 0; g < group; ++g) merge_partials(part + g * stride, 1, stride, head_dim, out_all + head + g * head_dim);
    }
  });
  if (shares == 1) return;
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t seq = pair / kv_heads, kv_head = pair % kv_heads;
    for (int64_t g = 0; g < group; ++g)
      merge_partials(partials.data() + (pair * shares * group + g) * stride, shares, group * stride, head_dim,
                     out_all + (seq * heads + kv_head * group + g) * head_dim);
  }
}

// Keep in step with KERNEL_HEAD_DIMS in __init__.py.
bool supported_head_dim(int64_t head_dim) {
  for (int64_t dim : {16, 32, 64, 80, 96, 128, 256}) {
    if (head_dim == dim) return true;
  }
  return false;
}

// query [seqs, heads, dim] float32; kv_cache [2, blocks, block_size, kv_heads, dim] float32, bfloat16
// or float16, or [..., dim / 32 · 34] uint8 (q8_0 rows);
// block_tables [seqs, max_blocks] int64; context_lens [seqs] int64 (tokens in the cache,
// this step's included); softcap 0: none; alibi: [heads] float32 slopes, or none.
// Returns [seqs, heads, dim] float32.
at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& kv_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  double scale, int64_t sliding_window, double softcap,
                                  const std::optional<at::Tensor>& alibi) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat, "query must be [seqs, heads, dim] float32");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous(), "kv_cache must be a contiguous 5-d pool");
  const bool q8 = kv_cache.scalar_type() == at::kByte;
  TORCH_CHECK(supported_head_dim(query.size(2)) && (!q8 || query.size(2) % 32 == 0), "head_dim ", query.size(2),
              " has no kernel");
  TORCH_CHECK(kv_cache.size(4) == (q8 ? row_elements<uint8_t>(query.size(2)) : query.size(2)) &&
              query.size(1) % kv_cache.size(3) == 0, "head shapes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(!alibi || (alibi->scalar_type() == at::kFloat && alibi->numel() == query.size(1)),
              "alibi must hold one float32 slope per query head");
  const at::Tensor q = query.contiguous();
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const at::Tensor slopes = alibi ? alibi->contiguous() : at::Tensor();
  const float* s = alibi ? slopes.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty_like(q);
  switch (kv_cache.scalar_type()) {
    case at::kFloat: decode_attention<float>(q, kv_cache, tables, lens, scale, sliding_window, softcap, s, out); break;
    case at::kBFloat16:
      decode_attention<c10::BFloat16>(q, kv_cache, tables, lens, scale, sliding_window, softcap, s, out);
      break;
    case at::kHalf: decode_attention<c10::Half>(q, kv_cache, tables, lens, scale, sliding_window, softcap, s, out); break;
    case at::kByte: decode_attention<uint8_t>(q, kv_cache, tables, lens, scale, sliding_window, softcap, s, out); break;
    default: TORCH_CHECK(false, "kv_cache dtype ", kv_cache.scalar_type(), " has no kernel");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(pagedllm, m) {
  m.def("paged_decode_attention(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int sliding_window, float softcap=0., Tensor? alibi=None) -> Tensor",
        paged_decode_attention);
}
