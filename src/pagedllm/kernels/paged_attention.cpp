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
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAGEDLLM_DECODE_BF16
#define PAGEDLLM_SIMD
#define PAGEDLLM_AVX512
#include "simd_exp.h"  // exp2_16
#endif

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
  const float* slopes;   // every query head's slope, or nullptr
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

// One task: a sequence's keys [begin, end) for a run of kv_heads of its kv heads and their query heads
// (kv_heads · group), whose query is its token last − 1; the pointers given start at the run's first.
struct DecodeTask {
  const float* query;      // [heads][dim], the sequence's
  const int64_t* offsets;  // offsets[t − begin]: where token t's row of kv head 0 starts in the K (and V) half
  int64_t row;             // pool elements from one kv head's row to the next
  int64_t begin, end, last, kv_heads, group;
  int64_t heads() const { return kv_heads * group; }
};

// The softmax partials of a task, per query head kDim + 2 floats: the values summed with weights
// exp(logit − peak) (unnormalised), the peak logit, and Σ exp(logit − peak) — or, `whole` (the task
// has all of the keys), the weights already divided by that sum and 1. Pass 1 scores the keys (each
// row loaded once for its group), then the exponentials, then pass 2 sums the values per head in
// registers, kHeadTile heads at a time.
template <typename T, int64_t kDim>
void attend_keys(const DecodeTask& task, const T* __restrict__ keys, const T* __restrict__ values, ScoreMods mods,
                 bool whole, float* __restrict__ scores, float* __restrict__ partials) {
  constexpr int64_t kLanes = kDim / 8, kStride = kDim + 2;
  const int64_t n = task.end - task.begin, group = task.group;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t h = 0; h < task.kv_heads; ++h) {
      Float8 k[kLanes];
      load_row<kDim>(keys + task.offsets[i] + h * task.row, k);
      for (int64_t g = h * group; g < (h + 1) * group; ++g) {
        Float8 acc = load8(task.query + g * kDim) * k[0];
        for (int64_t l = 1; l < kLanes; ++l) acc += load8(task.query + g * kDim + 8 * l) * k[l];
        scores[g * n + i] = sum8(acc) * mods.scale;
      }
    }
  }
  for (int64_t g = 0; g < task.heads(); ++g) {
    float* row = scores + g * n;
    modify_scores(row, n, task.begin, task.last, mods.slopes ? mods.slopes[g] : 0.f, mods.softcap);
    const float peak = *std::max_element(row, row + n);
    float total = 0.f;
    for (int64_t i = 0; i < n; ++i) total += (row[i] = std::exp(row[i] - peak));
    if (whole) {  // the weights normalised before the values are summed, as a single pass computes them
      const float inv = 1.f / total;
      for (int64_t i = 0; i < n; ++i) row[i] *= inv;
      total = 1.f;
    }
    partials[g * kStride + kDim] = peak, partials[g * kStride + kDim + 1] = total;
  }
  // Pass 2 reads each value row once for kHeadTile heads (once per head, it cost a conversion a head).
  for (int64_t h = 0; h < task.kv_heads; ++h) {
    for (int64_t g0 = h * group; g0 < (h + 1) * group; g0 += kHeadTile) {
      const int64_t tile = std::min(kHeadTile, (h + 1) * group - g0);
      Float8 acc[kHeadTile][kLanes] = {};
      for (int64_t i = 0; i < n; ++i) {
        Float8 v[kLanes];
        load_row<kDim>(values + task.offsets[i] + h * task.row, v);
        for (int64_t g = 0; g < tile; ++g) {
          const float p = scores[(g0 + g) * n + i];
          for (int64_t l = 0; l < kLanes; ++l) acc[g][l] += p * v[l];
        }
      }
      for (int64_t g = 0; g < tile; ++g) __builtin_memcpy(partials + (g0 + g) * kStride, acc[g], sizeof acc[g]);
    }
  }
}

#if defined(PAGEDLLM_DECODE_BF16)
// ---- bfloat16 products (AVX-512 BF16) ------------------------------------------------------------
// The float path spends, per key and query head, kDim / 8 FMAs and a horizontal sum: with 7 query heads
// a kv head (Qwen2.5) it is bound by its arithmetic, not by reading the cache. Here lanes run over
// keys: a tile of 16 keys' rows, as bfloat16 pairs (32-bit words), is transposed once, so a query head's
// 16 scores are kDim / 2 vdpbf16ps against its broadcast words, and the transposition is shared by the
// group's heads. For the values two keys' rows are interleaved into words (v[t][d], v[t + 1][d]) and
// weighted by the broadcast pair of the two keys' probabilities. Scores are base 2 (the query carries
// log2 e), so 2^x to ~4e-5 is enough for weights rounded to bfloat16.

constexpr int64_t kTileKeys = 16;    // keys a score tile transposes together, one a lane
constexpr int64_t kValueKeys = 64;   // keys a value tile stages as interleaved pairs
constexpr float kPadScore = -1e30f;  // past the last key (finite: this build assumes -ffast-math); 2^x of it is 0

// 16 values of a pool row from value i on, as floats (q8_0: i a multiple of 16, within one 32-value block).
inline __m512 floats16(const float* row, int64_t i) { return _mm512_loadu_ps(row + i); }
inline __m512 floats16(const c10::Half* row, int64_t i) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)));
}
inline __m512 floats16(const c10::BFloat16* row, int64_t i) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 floats16(const uint8_t* row, int64_t i) {
  const uint8_t* block = row + i / 32 * 34;
  c10::Half d;
  __builtin_memcpy(&d, block, sizeof d);
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 + i % 32));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(static_cast<float>(d)));
}

inline __m512i bf16_words(__m512 low, __m512 high) {  // 32 floats as 16 words of bfloat16 pairs, in order
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));
}

// 32 values of a row from value i on as 16 words (pairs of neighbouring values).
template <typename T>
inline __m512i row_words(const T* row, int64_t i) { return bf16_words(floats16(row, i), floats16(row, i + 16)); }
inline __m512i row_words(const c10::BFloat16* row, int64_t i) { return _mm512_loadu_si512(row + i); }

// Dims [i, i + 32) of rows a and b interleaved: low holds words (a[d], b[d]) for d in [i, i + 16), high the rest.
template <typename T>
inline void interleave_rows(const T* a, const T* b, int64_t i, __m512i& low, __m512i& high) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  low = _mm512_permutexvar_epi16(order, bf16_words(floats16(a, i), floats16(b, i)));
  high = _mm512_permutexvar_epi16(order, bf16_words(floats16(a, i + 16), floats16(b, i + 16)));
}
inline void interleave_rows(const c10::BFloat16* a, const c10::BFloat16* b, int64_t i, __m512i& low, __m512i& high) {
  const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  const __m512i ra = _mm512_loadu_si512(a + i), rb = _mm512_loadu_si512(b + i);
  low = _mm512_permutex2var_epi16(ra, first, rb);
  high = _mm512_permutex2var_epi16(ra, second, rb);
}

// r[i] (16 words of row i) → r[j] (word j of the 16 rows).
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c]: 128-bit lane L holds word 4L + c of rows i .. i + 3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // the lanes: word 4L + c gathers lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44), v3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_i32x4(v0, v2, 0x88), t[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    t[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88), t[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// scores[h][0 .. 16) for heads g0 .. g0 + NB: their query words (pairs, kDim / 2 a head) against the
// transposed tile `columns` (word j of 16 keys at columns[16 j]).
template <int NB, int64_t kDim>
inline void score_heads(const uint32_t* query, const uint32_t* columns, float* scores, int64_t stride) {
  __m512 acc[NB];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t j = 0; j < kDim / 2; ++j) {
    const __m512i k = _mm512_load_si512(columns + 16 * j);
    for (int h = 0; h < NB; ++h)
      acc[h] = dot_pairs(acc[h], k, _mm512_set1_epi32(static_cast<int>(query[h * kDim / 2 + j])));
  }
  for (int h = 0; h < NB; ++h) _mm512_storeu_ps(scores + h * stride, acc[h]);
}

// out[h · out_stride + d0 ..] += Σ_pairs P[h][pair] · V[pair][d0 ..] for NB heads and DV vectors of dims;
// `values` holds the tile's interleaved pairs (dim words a pair), `probs` the heads' weight pairs.
template <int NB, int DV>
inline void weigh_heads(const uint32_t* values, int64_t dim, int64_t pairs, const uint32_t* probs, int64_t prob_stride,
                        float* out, int64_t out_stride) {
  __m512 acc[NB][DV];
  for (int h = 0; h < NB; ++h)
    for (int j = 0; j < DV; ++j) acc[h][j] = _mm512_loadu_ps(out + h * out_stride + 16 * j);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i v[DV];
    for (int j = 0; j < DV; ++j) v[j] = _mm512_load_si512(values + p * dim + 16 * j);
    for (int h = 0; h < NB; ++h) {
      const __m512i w = _mm512_set1_epi32(static_cast<int>(probs[h * prob_stride + p]));
      for (int j = 0; j < DV; ++j) acc[h][j] = dot_pairs(acc[h][j], v[j], w);
    }
  }
  for (int h = 0; h < NB; ++h)
    for (int j = 0; j < DV; ++j) _mm512_storeu_ps(out + h * out_stride + 16 * j, acc[h][j]);
}

// Runs body.template operator()<NB>(g0) over the group's heads, kMost at a time and the rest.
template <int kMost, typename Body>
inline void over_heads(int64_t group, Body&& body) {
  int64_t g0 = 0;
  for (; g0 + kMost <= group; g0 += kMost) body.template operator()<kMost>(g0);
  [&]<int... N>(std::integer_sequence<int, N...>) {
    ((group - g0 == N + 1 ? body.template operator()<N + 1>(g0) : void()), ...);
  }(std::make_integer_sequence<int, kMost - 1>{});
}

// A per-thread buffer, 64-byte aligned for the tile loads, grown as needed.
template <typename T>
struct Aligned {
  T* data = nullptr;
  size_t size = 0;
  T* get(size_t n) {
    if (n > size) {
      std::free(data);
      data = static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64));
      size = n;
    }
    return data;
  }
  ~Aligned() { std::free(data); }
};

// Rows [i0, i0 + 16) of kv head h (zeros past n) transposed into columns: word j of the 16 keys at columns[16 j].
template <typename T, int64_t kDim>
inline void transpose_tile(const DecodeTask& task, const T* keys, int64_t h, int64_t i0, int64_t n, uint32_t* columns) {
  for (int64_t c = 0; c < kDim / 2; c += 16) {
    __m512i r[16];
    for (int64_t i = 0; i < 16; ++i)
      r[i] = i0 + i < n ? row_words(keys + task.offsets[i0 + i] + h * task.row, 2 * c) : _mm512_setzero_si512();
    transpose16(r);
    for (int64_t j = 0; j < 16; ++j) _mm512_store_si512(columns + (c + j) * 16, r[j]);
  }
}

// Value rows [i0, i0 + 2 · pairs) of kv head h as interleaved pairs: staged[p · kDim + d] = (v[i0 + 2p][d], v[i0 + 2p + 1][d]).
template <typename T, int64_t kDim>
inline void stage_values(const DecodeTask& task, const T* values, int64_t h, int64_t i0, int64_t pairs, int64_t n,
                         uint32_t* staged) {
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t i = i0 + 2 * p;
    const T* a = values + task.offsets[i] + h * task.row;
    const T* b = i + 1 < n ? values + task.offsets[i + 1] + h * task.row : a;  // an odd count: its weight is 0
    for (int64_t d = 0; d < kDim; d += 32) {
      __m512i low, high;
      interleave_rows(a, b, d, low, high);
      _mm512_store_si512(staged + p * kDim + d, low);
      _mm512_store_si512(staged + p * kDim + d + 16, high);
    }
  }
}

// Each head's base-2 scores (row of `stride`, n real) → its bfloat16 weights as pairs of neighbouring
// keys, and its partial's peak (natural units) and total.
template <int64_t kDim>
void softmax_heads(const DecodeTask& task, ScoreMods mods, bool whole, int64_t stride, float* scores, uint32_t* probs,
                   float* partials) {
  const int64_t n = task.end - task.begin;
  for (int64_t g = 0; g < task.heads(); ++g) {
    float* row = scores + g * stride;
    const float slope = mods.slopes ? mods.slopes[g] : 0.f;
    if (mods.softcap > 0.f || slope != 0.f) {  // in natural units
      for (int64_t i = 0; i < n; ++i) row[i] *= 1.f / kLog2e;
      modify_scores(row, n, task.begin, task.last, slope, mods.softcap);
      for (int64_t i = 0; i < n; ++i) row[i] *= kLog2e;
    }
    std::fill(row + n, row + stride, kPadScore);
    __m512 peak16 = _mm512_set1_ps(kPadScore);
    for (int64_t i = 0; i < stride; i += 16) peak16 = _mm512_max_ps(peak16, _mm512_loadu_ps(row + i));
    const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(peak16));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < stride; i += 16) {
      const __m512 p = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(row + i), peak));
      sum = _mm512_add_ps(sum, p);
      _mm512_storeu_ps(row + i, p);
    }
    float total = _mm512_reduce_add_ps(sum);
    const __m512 norm = _mm512_set1_ps(whole ? 1.f / total : 1.f);
    if (whole) total = 1.f;  // the weights normalised before the values are summed, as the float path does
    for (int64_t i = 0; i < stride; i += 32)
      _mm512_storeu_si512(probs + g * stride / 2 + i / 2, bf16_words(_mm512_mul_ps(_mm512_loadu_ps(row + i), norm),
                                                                     _mm512_mul_ps(_mm512_loadu_ps(row + i + 16), norm)));
    float* part = partials + g * (kDim + 2);
    std::fill(part, part + kDim, 0.f);
    part[kDim] = _mm512_cvtss_f32(peak) / kLog2e, part[kDim + 1] = total;
  }
}

// attend_keys with bfloat16 products (the same partials out; see above).
template <typename T, int64_t kDim>
void attend_keys_bf16(const DecodeTask& task, const T* __restrict__ keys, const T* __restrict__ values, ScoreMods mods,
                      bool whole, float* __restrict__, float* __restrict__ partials) {
  static_assert(kDim % 32 == 0, "bfloat16 rows are read 32 values at a time");
  constexpr int kDimVectors = kDim % 64 == 0 ? 4 : kDim % 48 == 0 ? 3 : 2;  // a value block's dims, in 16-value vectors
  const int64_t n = task.end - task.begin, stride = (n + 31) / 32 * 32;  // score rows padded to whole weight words
  const int64_t heads = task.heads(), group = task.group;
  thread_local Aligned<uint32_t> query_buf, column_buf, prob_buf, value_buf;
  thread_local Aligned<float> score_buf;
  uint32_t* qw = query_buf.get(heads * kDim / 2);
  uint32_t* columns = column_buf.get(kTileKeys * kDim / 2);
  uint32_t* probs = prob_buf.get(heads * stride / 2);
  uint32_t* staged = value_buf.get(kValueKeys / 2 * kDim);
  float* scores = score_buf.get(heads * stride);
  const float unit = mods.scale * kLog2e;
  for (int64_t j = 0; j < heads * kDim / 2; ++j)
    qw[j] = c10::BFloat16(task.query[2 * j] * unit).x | static_cast<uint32_t>(c10::BFloat16(task.query[2 * j + 1] * unit).x) << 16;
  for (int64_t i0 = 0; i0 < n; i0 += kTileKeys) {  // pass 1: scores, 16 keys of every kv head a tile
    for (int64_t h = 0; h < task.kv_heads; ++h) {
      transpose_tile<T, kDim>(task, keys, h, i0, n, columns);
      over_heads<8>(group, [&]<int NB>(int64_t g0) {
        const int64_t g = h * group + g0;
        score_heads<NB, kDim>(qw + g * kDim / 2, columns, scores + g * stride + i0, stride);
      });
    }
  }
  softmax_heads<kDim>(task, mods, whole, stride, scores, probs, partials);
  for (int64_t i0 = 0; i0 < n; i0 += kValueKeys) {  // pass 2: the values, kValueKeys keys of every kv head a tile
    const int64_t pairs = (std::min(kValueKeys, n - i0) + 1) / 2;
    for (int64_t h = 0; h < task.kv_heads; ++h) {
      stage_values<T, kDim>(task, values, h, i0, pairs, n, staged);
      for (int64_t d0 = 0; d0 < kDim; d0 += 16 * kDimVectors)
        over_heads<4>(group, [&]<int NB>(int64_t g0) {
          const int64_t g = h * group + g0;
          weigh_heads<NB, kDimVectors>(staged + d0, kDim, pairs, probs + g * stride / 2 + i0 / 2, stride / 2,
                                       partials + g * (kDim + 2) + d0, kDim + 2);
        });
    }
  }
}
#endif

// out[head_dim] = the softmax-weighted values of one query head from its tasks' partials (each
// partial `stride` floats apart: dim sums, then peak and total), the peaks brought to a common one; a sink
// (gpt-oss; `sink` points at its logit, or is null) is one more term of the denominator with no value.
void merge_partials(const float* partials, int64_t count, int64_t stride, int64_t dim, const float* sink, float* out) {
  float peak = sink ? *sink : -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < count; ++c)
    if (partials[c * stride + dim + 1] != 0.f) peak = std::max(peak, partials[c * stride + dim]);  // shares with keys
  float total = sink ? std::exp(*sink - peak) : 0.f;
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
using Attend = void (*)(const DecodeTask&, const T*, const T*, ScoreMods, bool, float*, float*);

bool decode_has_bf16() {
#if defined(PAGEDLLM_DECODE_BF16)
  return true;
#else
  return false;
#endif
}

// Whether a call takes its products in bfloat16: asked for, built, and a head size of whole 32-value runs.
bool bf16_path(bool asked, int64_t head_dim) { return asked && decode_has_bf16() && head_dim % 32 == 0; }

// The task body for a head size and path.
template <typename T>
Attend<T> pick_attend(int64_t head_dim, bool bf16) {
#if defined(PAGEDLLM_DECODE_BF16)
  if (bf16) {
    switch (head_dim) {
      case 32: return attend_keys_bf16<T, 32>;
      case 64: return attend_keys_bf16<T, 64>;
      case 96: return attend_keys_bf16<T, 96>;
      case 128: return attend_keys_bf16<T, 128>;
      default: return attend_keys_bf16<T, 256>;
    }
  }
#endif
  switch (head_dim) {
    case 64: return attend_keys<T, 64>;
    case 128: return attend_keys<T, 128>;
    case 96: return attend_keys<T, 96>;
    case 80: return attend_keys<T, 80>;
    case 256: return attend_keys<T, 256>;
    case 32: return attend_keys<T, 32>;
    default: return attend_keys<T, 16>;
  }
}

template <typename T>
void decode_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                      const at::Tensor& context_lens, double scale, int64_t sliding_window, double softcap,
                      const float* slopes, bool bf16, const float* sinks, at::Tensor& out) {
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
  const bool bf16_products = bf16_path(bf16, head_dim);
  const auto attend = pick_attend<T>(head_dim, bf16_products);
  const auto window = [&](int64_t seq) {
    const int64_t last = lens[seq];
    return std::pair<int64_t, int64_t>(sliding_window > 0 ? std::max<int64_t>(0, last - sliding_window) : 0, last);
  };
  // A task is a share of one sequence's keys for a run of its kv heads: all of them on the bfloat16 path
  // (a token's rows of every kv head lie side by side and are read as one stream: 1-12% faster than a
  // task per kv head, measured), one on the float path (there a task per kv head was 8-12% faster).
  // Where the units (sequence, run) do not split evenly over the threads and are few (one sequence on
  // 2 threads), each unit's keys are split into one share per thread, of at least 32 keys
  // (flash-decoding's split), whose softmax partials are merged after; and every unit into shares of
  // at most kShareKeys keys.
  int64_t longest = 0;
  for (int64_t seq = 0; seq < seqs; ++seq) longest = std::max(longest, window(seq).second - window(seq).first);
  const int64_t threads = at::get_num_threads();
  const int64_t runs = bf16_products ? 1 : kv_heads, run_heads = kv_heads / runs, units = seqs * runs;
  const bool uneven = units % threads != 0 && units < 8 * threads;
  const int64_t shares = std::max(uneven ? std::max<int64_t>(1, std::min(threads, longest / 32)) : 1,
                                  (longest + kShareKeys - 1) / kShareKeys);
  const int64_t stride = head_dim + 2;  // a partial: the head's summed values, its peak, its total
  std::vector<float> partials(seqs * shares * heads * stride);
  at::parallel_for(0, units * shares, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> offsets;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t unit = index / shares, share = index % shares, seq = unit / runs, run = unit % runs;
      const auto [first, last] = window(seq);
      const int64_t per_share = (last - first + shares - 1) / shares;
      const int64_t key_begin = std::min(last, first + share * per_share), key_end = std::min(last, key_begin + per_share);
      const int64_t head0 = run * run_heads * group;
      float* part = partials.data() + ((seq * shares + share) * heads + head0) * stride;
      if (key_end == key_begin) {
        for (int64_t g = 0; g < run_heads * group; ++g) part[g * stride + head_dim + 1] = 0.f;  // a share with no keys
        continue;
      }
      offsets.resize(key_end - key_begin);
      const int64_t* blocks = tables + seq * max_blocks;
      for (int64_t t = key_begin; t < key_end; ++t)  // one division a key, not one a key and head
        offsets[t - key_begin] = (blocks[t / block_size] * block_size + t % block_size) * token_stride;
      scores.resize(run_heads * group * (key_end - key_begin));
      const DecodeTask task{q_all + (seq * heads + head0) * head_dim, offsets.data(), row, key_begin, key_end, last,
                            run_heads, group};
      const ScoreMods mods{static_cast<float>(scale), static_cast<float>(softcap), slopes ? slopes + head0 : nullptr};
      const int64_t first_row = run * run_heads * row;
      // With sinks the partials stay unnormalised: the merge adds the sink to the denominator.
      attend(task, keys + first_row, values + first_row, mods, shares == 1 && !sinks, scores.data(), part);
    }
  });
  at::parallel_for(0, seqs * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t seq = index / heads, head = index % heads;
      merge_partials(partials.data() + (seq * shares * heads + head) * stride, shares, heads * stride, head_dim,
                     sinks ? sinks + head : nullptr, out_all + index * head_dim);
    }
  });
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
// this step's included); softcap 0: none; alibi: [heads] float32 slopes, or none; sinks: [heads] float32
// attention-sink logits, or none.
// bf16: products in bfloat16 where built (AVX-512 BF16) and the head size is a multiple of 32.
// Returns [seqs, heads, dim] float32.
at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& kv_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  double scale, int64_t sliding_window, double softcap,
                                  const std::optional<at::Tensor>& alibi, bool bf16,
                                  const std::optional<at::Tensor>& sinks) {
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
  TORCH_CHECK(!sinks || (sinks->scalar_type() == at::kFloat && sinks->numel() == query.size(1)),
              "sinks must hold one float32 logit per query head");
  const at::Tensor q = query.contiguous();
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  const at::Tensor slopes = alibi ? alibi->contiguous() : at::Tensor();
  const float* s = alibi ? slopes.data_ptr<float>() : nullptr;
  const at::Tensor sink_logits = sinks ? sinks->contiguous() : at::Tensor();
  const float* k = sinks ? sink_logits.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty_like(q);
  switch (kv_cache.scalar_type()) {
    case at::kFloat: decode_attention<float>(q, kv_cache, tables, lens, scale, sliding_window, softcap, s, bf16, k, out); break;
    case at::kBFloat16:
      decode_attention<c10::BFloat16>(q, kv_cache, tables, lens, scale, sliding_window, softcap, s, bf16, k, out);
      break;
    case at::kHalf: decode_attention<c10::Half>(q, kv_cache, tables, lens, scale, sliding_window, softcap, s, bf16, k, out); break;
    case at::kByte: decode_attention<uint8_t>(q, kv_cache, tables, lens, scale, sliding_window, softcap, s, bf16, k, out); break;
    default: TORCH_CHECK(false, "kv_cache dtype ", kv_cache.scalar_type(), " has no kernel");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(pagedllm, m) {
  m.def("paged_decode_attention(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int sliding_window, float softcap=0., Tensor? alibi=None, bool bf16=False, Tensor? sinks=None) -> Tensor",
        paged_decode_attention);
  m.def("decode_has_bf16() -> bool", decode_has_bf16);
}
