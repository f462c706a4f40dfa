// The body of the quantised kernels, included once per instruction set by quant_matmul.cpp
// inside its own namespace and `#pragma GCC target`, so one build carries every path and the
// caller picks one at run time. The SIMD paths share their structure (one weight row at a time,
// activations in groups of four blocks) with 512-bit (VNNI) or 256-bit registers; the portable one
// is plain loops.
//
// Every GGML block format is read as 32-weight sub-blocks: 32 unsigned integers q and, per half
// of 16, a scale and an offset, so that weight = scale·q + offset. Activations are quantised to
// blocks of 32 (int8, or 15-bit for the head; one float scale, the sum of each half), so that a sub-block's dot
// product is Σ_half scale·dx·Σ(q·a) + offset·dx·Σa — integer work inside, float terms per half.

struct Coef {
  float scale[2];
  float offset[2];
};

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline void nibbles16(const uint8_t* qs, uint8_t* q) {  // low nibbles → 0..15, high → 16..31
  for (int i = 0; i < 16; ++i) {
    q[i] = qs[i] & 0x0F;
    q[i + 16] = qs[i] >> 4;
  }
}

inline void uniform(Coef& c, float scale, float offset) {
  c.scale[0] = c.scale[1] = scale;
  c.offset[0] = c.offset[1] = offset;
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (llama.cpp's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* s, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

template <int kType>
struct Format;

template <>
struct Format<kQ4_0> {
  static constexpr int kBytes = 18, kSub = 1;
  static void decode(const uint8_t* b, int, uint8_t* q, Coef& c) {
    const float d = fp16(b);
    uniform(c, d, -8.f * d);
    nibbles16(b + 2, q);
  }
};

template <>
struct Format<kQ4_1> {
  static constexpr int kBytes = 20, kSub = 1;
  static void decode(const uint8_t* b, int, uint8_t* q, Coef& c) {
    uniform(c, fp16(b), fp16(b + 2));
    nibbles16(b + 4, q);
  }
};

inline void high_bits32(const uint8_t* qh, uint8_t* q) {  // bit i of a little-endian uint32 → q[i] bit 4
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  for (int i = 0; i < 32; ++i) q[i] |= ((bits >> i) & 1) << 4;
}

template <>
struct Format<kQ5_0> {
  static constexpr int kBytes = 22, kSub = 1;
  static void decode(const uint8_t* b, int, uint8_t* q, Coef& c) {
    const float d = fp16(b);
    uniform(c, d, -16.f * d);
    nibbles16(b + 6, q);
    high_bits32(b + 2, q);
  }
};

template <>
struct Format<kQ5_1> {
  static constexpr int kBytes = 24, kSub = 1;
  static void decode(const uint8_t* b, int, uint8_t* q, Coef& c) {
    uniform(c, fp16(b), fp16(b + 2));
    nibbles16(b + 8, q);
    high_bits32(b + 4, q);
  }
};

template <>
struct Format<kQ8_0> {
  static constexpr int kBytes = 34, kSub = 1;
  static void decode(const uint8_t* b, int, uint8_t* q, Coef& c) {
    const float d = fp16(b);
    uniform(c, d, -128.f * d);  // stored signed; read as unsigned q + 128
    for (int i = 0; i < 32; ++i) q[i] = static_cast<uint8_t>(b[2 + i] ^ 0x80);
  }
};

// MXFP4 (gpt-oss): an E8M0 exponent e, scale d = 2^(e − 128) (llama.cpp's e8m0_to_fp32_half, its table
// holding twice the E2M1 values), then 16 bytes of nibbles indexing that table: read as q = value + 12
// (0..24, unsigned like the other formats) with the offset −12·d.
inline float e8m0_half(uint8_t e) {
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float d;
  std::memcpy(&d, &bits, 4);
  return d;
}
alignas(16) constexpr uint8_t kMxfp4Shifted[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

template <>
struct Format<kMXFP4> {
  static constexpr int kBytes = 17, kSub = 1;
  static void decode(const uint8_t* b, int, uint8_t* q, Coef& c) {
    const float d = e8m0_half(b[0]);
    uniform(c, d, -12.f * d);
    nibbles16(b + 1, q);
    for (int i = 0; i < 32; ++i) q[i] = kMxfp4Shifted[q[i]];
  }
};

template <>
struct Format<kQ4_K> {
  static constexpr int kBytes = 144, kSub = 8;
  static void decode(const uint8_t* b, int j, uint8_t* q, Coef& c) {
    uint8_t sc, m;
    scale_min_k4(j, b + 4, &sc, &m);
    uniform(c, fp16(b) * sc, -fp16(b + 2) * m);
    const uint8_t* qs = b + 16 + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int i = 0; i < 32; ++i) q[i] = (qs[i] >> shift) & 0x0F;
  }
};

template <>
struct Format<kQ5_K> {
  static constexpr int kBytes = 176, kSub = 8;
  static void decode(const uint8_t* b, int j, uint8_t* q, Coef& c) {
    uint8_t sc, m;
    scale_min_k4(j, b + 4, &sc, &m);
    uniform(c, fp16(b) * sc, -fp16(b + 2) * m);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48 + 32 * (j / 2);
    const int shift = 4 * (j % 2);
    for (int i = 0; i < 32; ++i) q[i] = ((qs[i] >> shift) & 0x0F) | (((qh[i] >> j) & 1) << 4);
  }
};

template <>
struct Format<kQ6_K> {
  static constexpr int kBytes = 210, kSub = 8;
  // Sub-block j: half n = j / 4 of the super-block, quarter k = j % 4 of that half.
  static void decode(const uint8_t* b, int j, uint8_t* q, Coef& c) {
    const int n = j / 4, k = j % 4;
    const uint8_t* ql = b + 64 * n + 32 * (k % 2);
    const uint8_t* qh = b + 128 + 32 * n;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * n + 2 * k;
    const float d = fp16(b + 208);
    const int lshift = 4 * (k / 2), hshift = 2 * k;
    for (int i = 0; i < 32; ++i) q[i] = ((ql[i] >> lshift) & 0x0F) | (((qh[i] >> hshift) & 3) << 4);
    for (int h = 0; h < 2; ++h) {
      c.scale[h] = d * sc[h];
      c.offset[h] = -32.f * d * sc[h];
    }
  }
};

// One activation row's sub-block, as the quantisers write it: int8 for the layers, and for the
// output head (where int8 rounding flips near-tied tokens) 15-bit integers 128·hi + lo, kept as two
// int8 halves so that the head takes the same byte dot products as the layers, twice.
// After the integers: {d, d, d·Σq of elements 0..15, d·Σq of 16..31}, one 4-float vector that
// multiplies a weight sub-block's {scale, scale, offset, offset} in one instruction.
struct Q8Block {
  int8_t q[32];
  float d[2];
  float dsum[2];

  static constexpr float kMax = 127.f;
  int value(int i) const { return q[i]; }
  void set(int i, int v) { q[i] = static_cast<int8_t>(v); }
};
static_assert(sizeof(Q8Block) == 48, "Q8Block layout");

struct Q15Block {
  int8_t hi[32];  // −127..127
  int8_t lo[32];  // 0..127
  float d[2];
  float dsum[2];

  static constexpr float kMax = 127.f * 128.f;  // ±16256: hi stays within ±127, so its sign can be flipped
  int value(int i) const { return 128 * hi[i] + lo[i]; }
  void set(int i, int v) { hi[i] = static_cast<int8_t>(v >> 7), lo[i] = static_cast<int8_t>(v & 127); }
};
static_assert(sizeof(Q15Block) == 80, "Q15Block layout");

template <typename Block>
inline void quantize_row(const float* x, int64_t k, Block* out) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / Block::kMax, inv = d > 0.f ? 1.f / d : 0.f;
    int sums[2] = {0, 0};
    for (int i = 0; i < 32; ++i) {
      const int v = static_cast<int>(std::nearbyint(x[i] * inv));
      out[b].set(i, v);
      sums[i / 16] += v;
    }
    out[b].d[0] = out[b].d[1] = d;
    out[b].dsum[0] = d * sums[0];
    out[b].dsum[1] = d * sums[1];
  }
}

inline void store(float* out, float v, bool accumulate) { *out = accumulate ? *out + v : v; }

// Blocks from one activation row to the next: a whole number of groups of four (activation_row_bytes).
inline int64_t activation_stride(int64_t k) { return (k / 32 + 3) / 4 * 4; }

// Dequantising a row ahead of a GEMM asks for its blocks 16 KiB ahead. (Measured for the decode
// products when they read four rows side by side: 2.7x on a 30 MB head against no prefetch; they now
// read one row at a time, which the hardware prefetchers follow alone.)
constexpr int kPrefetchBytes = 16384;

template <int kBlockBytes>
inline void prefetch_ahead(const uint8_t* block, int64_t lead = kPrefetchBytes) {
  for (int offset = 0; offset < kBlockBytes; offset += 64)
    __builtin_prefetch(block + lead + offset);
}

#include "simd_exp.h"

#if defined(PAGEDLLM_SIMD)
// quantize_row for int8 blocks, eight lanes at a time: the same products and round-to-nearest-even
// as the scalar template (the default MXCSR rounding), so both give the same bytes.
inline void quantize_row(const float* x, int64_t k, Q8Block* out) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the lane interleave of the packs
  for (int64_t b = 0; b < k / 32; ++b, x += 32) {
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) amax = _mm256_max_ps(amax, _mm256_and_ps(v[j] = _mm256_loadu_ps(x + 8 * j), magnitude));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float d = top / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
    const __m256i halves = _mm256_hadd_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    // hadd lanes: {a01, a23, b01, b23 | a45, a67, b45, b67} for the first (a) and second (b) 16 values.
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(halves), _mm256_extracti128_si256(halves, 1));
    const int first = _mm_extract_epi32(s4, 0) + _mm_extract_epi32(s4, 1);
    const int second = _mm_extract_epi32(s4, 2) + _mm_extract_epi32(s4, 3);
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].q), _mm256_permutevar8x32_epi32(bytes, order));
    out[b].d[0] = out[b].d[1] = d;
    out[b].dsum[0] = d * first;
    out[b].dsum[1] = d * second;
  }
}

// gate[i] = silu(gate[i]) · up[i]
inline void silu_mul_row(float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sig = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(sig, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}
#else
inline void silu_mul_row(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}
#endif


#if defined(PAGEDLLM_SIMD)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A 32-weight-block format as the row kernels read it: bytes, where the nibbles start,
// and how its offset follows from the block header (a stored minimum m, or a fixed multiple of d).
template <int kType>
struct SmallBlock {
  static constexpr int kBytes = Format<kType>::kBytes;
  static constexpr int kNibbles = kType == kMXFP4 ? 1 : kType == kQ4_0 ? 2 : kType == kQ4_1 ? 4 : kType == kQ5_0 ? 6 : 8;
  static constexpr bool kHasMin = kType == kQ4_1 || kType == kQ5_1;
  static constexpr float kOffset = kType == kQ4_0 ? -8.f : kType == kQ5_0 ? -16.f : kType == kMXFP4 ? -12.f : 0.f;  // × d
  static constexpr bool kHasOffset = kHasMin || kOffset != 0.f;
};

// The headers of four blocks `stride` apart (a row's consecutive blocks): each one's scale d, and its
// offset per unit of Σx; zero past the first kValid.
template <int kType, int kValid = 4>
inline void four_headers(const uint8_t* w, int64_t stride, __m128& d, __m128& offset) {
  using B = SmallBlock<kType>;
  if constexpr (kType == kMXFP4) {  // one exponent byte a block
    const auto scale = [&](int i) { return i < kValid ? e8m0_half(w[i * stride]) : 0.f; };
    d = _mm_setr_ps(scale(0), scale(1), scale(2), scale(3));
    offset = _mm_mul_ps(d, _mm_set1_ps(B::kOffset));
    return;
  }
  // The first two fp16 of each block: {d, m} (or d and two bytes that are not used).
  const auto head = [&](int i) { return i < kValid ? static_cast<int>(load_u32(w + i * stride)) : 0; };
  const __m128i heads = _mm_setr_epi32(head(0), head(1), head(2), head(3));
  const __m256 dm = _mm256_cvtph_ps(heads);  // d0 m0 d1 m1 d2 m2 d3 m3
  d = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0)));
  if constexpr (B::kHasMin) offset = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(1, 3, 5, 7, 0, 0, 0, 0)));
  else offset = _mm_mul_ps(d, _mm_set1_ps(B::kOffset));
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i low4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }

inline __m256i nibbles_simd(const uint8_t* qs) {  // 16 bytes → low nibbles in lane 0, high in lane 1
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return low4(_mm256_set_m128i(_mm_srli_epi16(v, 4), v));
}

inline __m256i fifth_bits(const uint8_t* qh) {  // bit i of a uint32 → 0x10 in byte i
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
#if defined(PAGEDLLM_VNNI)
  return _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10));  // the bits are a byte mask already
#else
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                        _mm256_set1_epi64x(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
#endif
}

// Per format: the 32 unsigned integers of sub-block j as one vector, and its scales and offsets
// (Format<>::decode's arithmetic, vectorised by hand where the compiler would not).
template <int kType> __m256i simd_q(const uint8_t* b, int j);
template <> inline __m256i simd_q<kQ4_0>(const uint8_t* b, int) { return nibbles_simd(b + 2); }
template <> inline __m256i simd_q<kQ4_1>(const uint8_t* b, int) { return nibbles_simd(b + 4); }
template <> inline __m256i simd_q<kQ5_0>(const uint8_t* b, int) {
  return _mm256_or_si256(nibbles_simd(b + 6), fifth_bits(b + 2));
}
template <> inline __m256i simd_q<kQ5_1>(const uint8_t* b, int) {
  return _mm256_or_si256(nibbles_simd(b + 8), fifth_bits(b + 4));
}
template <> inline __m256i simd_q<kQ8_0>(const uint8_t* b, int) { return load32(b + 2); }  // signed
inline __m256i mxfp4_table() { return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kMxfp4Shifted))); }
template <> inline __m256i simd_q<kMXFP4>(const uint8_t* b, int) { return _mm256_shuffle_epi8(mxfp4_table(), nibbles_simd(b + 1)); }
template <> inline __m256i simd_q<kQ4_K>(const uint8_t* b, int j) {
  return low4(_mm256_srli_epi16(load32(b + 16 + 32 * (j / 2)), 4 * (j % 2)));
}
template <> inline __m256i simd_q<kQ5_K>(const uint8_t* b, int j) {
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(load32(b + 16), j), _mm256_set1_epi8(1));
  return _mm256_or_si256(low4(_mm256_srli_epi16(load32(b + 48 + 32 * (j / 2)), 4 * (j % 2))),
                         _mm256_slli_epi16(high, 4));
}
template <> inline __m256i simd_q<kQ6_K>(const uint8_t* b, int j) {
  const int n = j / 4, k = j % 4;
  const __m256i low = low4(_mm256_srli_epi16(load32(b + 64 * n + 32 * (k % 2)), 4 * (k / 2)));
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(load32(b + 128 + 32 * n), 2 * k), _mm256_set1_epi8(3));
  return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
}

// Per format: {scale₀, scale₁, offset₀, offset₁} of each sub-block (the halves of 16 differ only in
// Q6_K), as one vector.
inline __m128 fp16_pair(const uint8_t* p) {  // two fp16 at p → {a, b, 0, 0}
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(bits)));
}
inline __m128 scaled_d(const uint8_t* b, float offset_factor) {  // {d, d, f·d, f·d}
  return _mm_mul_ps(_mm_broadcastss_ps(fp16_pair(b)), _mm_setr_ps(1.f, 1.f, offset_factor, offset_factor));
}
inline __m128 d_and_min(const uint8_t* b) {  // fp16 d, m → {d, d, m, m}
  const __m128 v = fp16_pair(b);
  return _mm_unpacklo_ps(v, v);
}

// Blocks of one 32-weight sub-block: {scale, scale, offset, offset}.
template <int kType> __m128 coef4(const uint8_t* b);
template <> inline __m128 coef4<kQ4_0>(const uint8_t* b) { return scaled_d(b, -8.f); }
template <> inline __m128 coef4<kQ4_1>(const uint8_t* b) { return d_and_min(b); }
template <> inline __m128 coef4<kQ5_0>(const uint8_t* b) { return scaled_d(b, -16.f); }
template <> inline __m128 coef4<kQ5_1>(const uint8_t* b) { return d_and_min(b); }
template <> inline __m128 coef4<kQ8_0>(const uint8_t* b) { return scaled_d(b, 0.f); }
template <> inline __m128 coef4<kMXFP4>(const uint8_t* b) {
  const float d = e8m0_half(b[0]);
  return _mm_setr_ps(d, d, -12.f * d, -12.f * d);
}

// The coefficients of every sub-block of a block; K-quant super-blocks unpack their eight scales
// with vector instructions, once per 256 weights (specialisations below).
template <int kType>
inline void block_coefs(const uint8_t* b, __m128* out) {
  static_assert(Format<kType>::kSub == 1, "super-block formats specialise block_coefs");
  out[0] = coef4<kType>(b);
}

// {x₀, x₀, y₀, y₀} ... {x₇, x₇, y₇, y₇} from two vectors of eight.
inline void pair_up(__m256 x, __m256 y, __m128* out) {
  const __m256 xx_lo = _mm256_unpacklo_ps(x, x), xx_hi = _mm256_unpackhi_ps(x, x);  // x0x0x1x1 | x4x4x5x5; x2x2x3x3 | x6x6x7x7
  const __m256 yy_lo = _mm256_unpacklo_ps(y, y), yy_hi = _mm256_unpackhi_ps(y, y);
  const __m256 c04 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(xx_lo), _mm256_castps_pd(yy_lo)));
  const __m256 c15 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(xx_lo), _mm256_castps_pd(yy_lo)));
  const __m256 c26 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(xx_hi), _mm256_castps_pd(yy_hi)));
  const __m256 c37 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(xx_hi), _mm256_castps_pd(yy_hi)));
  out[0] = _mm256_castps256_ps128(c04), out[4] = _mm256_extractf128_ps(c04, 1);
  out[1] = _mm256_castps256_ps128(c15), out[5] = _mm256_extractf128_ps(c15, 1);
  out[2] = _mm256_castps256_ps128(c26), out[6] = _mm256_extractf128_ps(c26, 1);
  out[3] = _mm256_castps256_ps128(c37), out[7] = _mm256_extractf128_ps(c37, 1);
}

// A Q4_K / Q5_K super-block's eight sub-block scales d·sc and offsets −dmin·m, as two vectors.
inline void k_scales(const uint8_t* b, __m256& scales, __m256& offsets) {
  // The 12 scale bytes → eight 6-bit scales and eight 6-bit mins (llama.cpp's kmask arithmetic).
  uint32_t u[4];
  std::memcpy(u, b + 4, 12);
  const uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
  u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
  const uint32_t lo_mins = u[1] & kmask1;
  u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
  u[2] = lo_mins;
  u[0] &= kmask1;  // u[0], u[1]: scales 0-7; u[2], u[3]: mins 0-7
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u));
  const __m128 dm = fp16_pair(b);
  scales = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), _mm256_broadcastss_ps(dm));
  offsets = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8))),
                          _mm256_broadcastss_ps(_mm_sub_ps(_mm_setzero_ps(), _mm_movehdup_ps(dm))));
}

template <>
inline void block_coefs<kQ4_K>(const uint8_t* b, __m128* out) {
  __m256 scales, offsets;
  k_scales(b, scales, offsets);
  pair_up(scales, offsets, out);
}
template <>
inline void block_coefs<kQ5_K>(const uint8_t* b, __m128* out) { block_coefs<kQ4_K>(b, out); }

template <>
inline void block_coefs<kQ6_K>(const uint8_t* b, __m128* out) {
  const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));  // 16 int8 scales, two per sub-block
  const __m256 d = _mm256_set1_ps(fp16(b + 208));  // the block's last two bytes: fp16_pair would read past them
  for (int half = 0; half < 2; ++half) {
    const __m256 s = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8 * half))));
    const __m256 o = _mm256_mul_ps(s, _mm256_set1_ps(-32.f));
    // s = {s₀ … s₇} for sub-blocks 4·half … 4·half + 3, two each: {sa, sb, oa, ob} per sub-block.
    const __m256d lo = _mm256_unpacklo_pd(_mm256_castps_pd(s), _mm256_castps_pd(o));  // j, j+2 (128-bit lanes)
    const __m256d hi = _mm256_unpackhi_pd(_mm256_castps_pd(s), _mm256_castps_pd(o));  // j+1, j+3
    __m128* o4 = out + 4 * half;
    o4[0] = _mm256_castps256_ps128(_mm256_castpd_ps(lo)), o4[2] = _mm256_extractf128_ps(_mm256_castpd_ps(lo), 1);
    o4[1] = _mm256_castps256_ps128(_mm256_castpd_ps(hi)), o4[3] = _mm256_extractf128_ps(_mm256_castpd_ps(hi), 1);
  }
}

// The SIMD products read one weight row at a time, four consecutive 32-weight sub-blocks of it
// together (the four 128-bit lanes of a 512-bit register, or two 256-bit registers): each thread then
// reads its rows as one forward stream, which the hardware prefetchers follow. (Four rows side by
// side, one per lane, read as four interleaved short streams: on AMD Zen 4 ~11 GB/s a thread from
// memory against ~25 for one stream, with or without software prefetch.) The activations are stored
// to match, four blocks to a group.

// Activation blocks b..b+3 of a row: their elements 0..15 side by side in 64 bytes, then their
// elements 16..31, so that one load meets a weight register's four sub-blocks lane by lane.
// kParts = 2 holds 15-bit values (the head) as 128·part 0 + part 1.
template <int kParts>
struct ActivationGroup {
  int8_t q[kParts][2][64];  // [part][half][16·block + element]
  float d[4];
  float dsum[2][4];  // [half][block]: d·Σq over that half
  float unused[4];  // four blocks' room in the other layout: rows sit activation_row_bytes apart either way
};
using Q8Group = ActivationGroup<1>;
using Q15Group = ActivationGroup<2>;
static_assert(sizeof(Q8Group) == 4 * sizeof(Q8Block) && sizeof(Q15Group) == 4 * sizeof(Q15Block), "ActivationGroup layout");

inline int64_t groups_of(int64_t k) { return (k / 32 + 3) / 4; }

// One quantised block into its slot of a group.
inline void place(const Q8Block& b, int slot, Q8Group& g) {
  std::memcpy(g.q[0][0] + 16 * slot, b.q, 16);
  std::memcpy(g.q[0][1] + 16 * slot, b.q + 16, 16);
  g.d[slot] = b.d[0], g.dsum[0][slot] = b.dsum[0], g.dsum[1][slot] = b.dsum[1];
}
inline void place(const Q15Block& b, int slot, Q15Group& g) {
  for (int half = 0; half < 2; ++half) {
    std::memcpy(g.q[0][half] + 16 * slot, b.hi + 16 * half, 16);
    std::memcpy(g.q[1][half] + 16 * slot, b.lo + 16 * half, 16);
  }
  g.d[slot] = b.d[0], g.dsum[0][slot] = b.dsum[0], g.dsum[1][slot] = b.dsum[1];
}

// A row of k floats → its groups; a last group with fewer than four blocks is zero after them.
template <typename Block, typename Group>
inline void quantize_row_groups(const float* x, int64_t k, Group* out) {
  std::memset(static_cast<void*>(out), 0, groups_of(k) * sizeof(Group));
  for (int64_t b = 0; b < k / 32; ++b) {
    Block block;
    quantize_row(x + 32 * b, 32, &block);
    place(block, b % 4, out[b / 4]);
  }
}

inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m128 dsum_both(const float (*dsum)[4]) { return _mm_add_ps(load4(dsum[0]), load4(dsum[1])); }

#if defined(PAGEDLLM_VNNI)
using Acc = __m512;  // an activation row's running sums in a row product
inline Acc zero_acc() { return _mm512_setzero_ps(); }

// 16 bytes at `offset` of each of four blocks `stride` apart, a 128-bit lane each; zero past the first kValid.
template <int kValid = 4>
inline __m512i lanes_of_blocks(const uint8_t* w, int64_t stride, int offset) {
  __m512i v = _mm512_zextsi128_si512(load16(w + offset));
  if constexpr (kValid > 1) v = _mm512_inserti32x4(v, load16(w + stride + offset), 1);
  if constexpr (kValid > 2) v = _mm512_inserti32x4(v, load16(w + 2 * stride + offset), 2);
  if constexpr (kValid > 3) v = _mm512_inserti32x4(v, load16(w + 3 * stride + offset), 3);
  return v;
}

inline __m512 spread4(__m128 v) {  // {a, b, c, d} → a in lanes 0-3, b in 4-7, c in 8-11, d in 12-15
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), _mm512_castps128_ps512(v));
}

// acc + q·x per four-byte group for 64 activation bytes x; for Q8_0 (kSigned) q is |w| and x takes
// w's sign where `negative` marks it.
template <bool kSigned>
inline __m512i dots64(__m512i acc, __m512i q, const int8_t* x, __mmask64 negative) {
  __m512i v = _mm512_loadu_si512(x);
  if constexpr (kSigned) v = _mm512_mask_sub_epi8(v, negative, _mm512_setzero_si512(), v);
  return _mm512_dpbusd_epi32(acc, q, v);
}

// A weight register's products with one half (0: elements 0..15, 1: 16..31) of a group.
template <bool kSigned = false, int kParts>
inline __m512i half_dots(__m512i q, const ActivationGroup<kParts>* x, int half, __mmask64 negative = 0) {
  __m512i dots = dots64<kSigned>(_mm512_setzero_si512(), q, x->q[0][half], negative);
  if constexpr (kParts == 2) dots = dots64<kSigned>(_mm512_slli_epi32(dots, 7), q, x->q[1][half], negative);
  return dots;
}

// Both halves: lo holds the weights of elements 0..15, hi of 16..31.
template <bool kSigned = false, int kParts>
inline __m512i group_dots(__m512i lo, __m512i hi, const ActivationGroup<kParts>* x, __mmask64 neg_lo = 0,
                          __mmask64 neg_hi = 0) {
  __m512i dots = dots64<kSigned>(dots64<kSigned>(_mm512_setzero_si512(), lo, x->q[0][0], neg_lo), hi, x->q[0][1], neg_hi);
  if constexpr (kParts == 2)
    dots = dots64<kSigned>(dots64<kSigned>(_mm512_slli_epi32(dots, 7), lo, x->q[1][0], neg_lo), hi, x->q[1][1], neg_hi);
  return dots;
}

// out[r] (+)= the sum of acc[r]'s lanes plus offsets[r]'s, for kA activation rows.
template <int kA>
inline void store_rows(const __m512* acc, const __m128* offsets, float* out, int64_t out_stride, bool accumulate) {
  for (int r = 0; r < kA; ++r)
    store(out + r * out_stride, _mm512_reduce_add_ps(_mm512_add_ps(acc[r], _mm512_castps128_ps512(offsets[r]))) , accumulate);
}

// Four consecutive blocks of a 32-weight format (only the first kValid of them at the end of a row)
// against kA activation rows' groups x (x_stride groups apart).
template <int kType, int kA, int kParts, int kValid = 4>
inline void small_group(const uint8_t* w, const ActivationGroup<kParts>* x, int64_t x_stride, __m512* acc,
                        __m128* offsets) {
  using B = SmallBlock<kType>;
  constexpr int kBytes = B::kBytes;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i lo, hi;
  if constexpr (kType == kQ8_0) {
    lo = lanes_of_blocks<kValid>(w, kBytes, 2);
    hi = lanes_of_blocks<kValid>(w, kBytes, 18);
  } else {
    const __m512i v = lanes_of_blocks<kValid>(w, kBytes, B::kNibbles);
    lo = _mm512_and_si512(v, low4);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    if constexpr (kType == kMXFP4) {  // nibbles → table values + 12, per 128-bit lane
      const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(kMxfp4Shifted)));
      lo = _mm512_shuffle_epi8(table, lo), hi = _mm512_shuffle_epi8(table, hi);
    }
    if constexpr (kType == kQ5_0 || kType == kQ5_1) {  // bit e of each block's qh: element e's fifth bit
      constexpr int kHigh = kType == kQ5_0 ? 2 : 4;
      uint64_t mask_lo = 0, mask_hi = 0;
      for (int i = 0; i < kValid; ++i) {
        const uint64_t qh = load_u32(w + i * kBytes + kHigh);
        mask_lo |= (qh & 0xFFFF) << (16 * i);
        mask_hi |= (qh >> 16) << (16 * i);
      }
      lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(mask_lo, _mm512_set1_epi8(0x10)));
      hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(mask_hi, _mm512_set1_epi8(0x10)));
    }
  }
  __mmask64 negative_lo = 0, negative_hi = 0;
  if constexpr (kType == kQ8_0) {  // signed weights: |w| against x with w's sign
    negative_lo = _mm512_movepi8_mask(lo), negative_hi = _mm512_movepi8_mask(hi);
    lo = _mm512_abs_epi8(lo), hi = _mm512_abs_epi8(hi);
  }
  __m128 d, offset;
  four_headers<kType, kValid>(w, kBytes, d, offset);
  for (int r = 0; r < kA; ++r) {
    const ActivationGroup<kParts>* xr = x + r * x_stride;
    const __m512i dots = group_dots<kType == kQ8_0>(lo, hi, xr, negative_lo, negative_hi);
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), spread4(_mm_mul_ps(d, load4(xr->d))), acc[r]);
    if constexpr (B::kHasOffset) offsets[r] = _mm_fmadd_ps(offset, dsum_both(xr->dsum), offsets[r]);
  }
}

// 16 bytes at a in lanes 0 and 1, 16 bytes at b in lanes 2 and 3.
inline __m512i pairs_of(const uint8_t* a, const uint8_t* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(load16(a))),
                            _mm256_broadcastsi128_si256(load16(b)), 1);
}
// 16-bit shift counts, one per 128-bit lane.
inline __m512i lane_counts(int16_t c0, int16_t c1, int16_t c2, int16_t c3) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16(c1), _mm_set1_epi16(c0))),
                            _mm256_set_m128i(_mm_set1_epi16(c3), _mm_set1_epi16(c2)), 1);
}

// One weight row of Q4_K / Q5_K against kA activation rows. A super-block's sub-blocks 4h..4h+3 are
// one group: nibble runs 2h and 2h + 1 hold sub-blocks 4h, 4h+1 (low, high nibbles) and 4h+2, 4h+3.
template <int kType, int kA, int kParts>
void dot_row_k(const uint8_t* w, const ActivationGroup<kParts>* x, int64_t x_stride, int64_t blocks, float* out,
               int64_t out_stride, bool accumulate) {
  constexpr int kBytes = Format<kType>::kBytes, kQs = kType == kQ4_K ? 16 : 48;
  const __m512i low4 = _mm512_set1_epi8(0x0F), one = _mm512_set1_epi8(1), nibble = lane_counts(0, 4, 0, 4);
  Acc acc[kA];
  __m128 offsets[kA];
  for (int r = 0; r < kA; ++r) acc[r] = zero_acc(), offsets[r] = _mm_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, w += kBytes) {
    __m256 scales, mins;
    k_scales(w, scales, mins);
    for (int h = 0; h < 2; ++h, ++x) {
      const uint8_t* qs = w + kQs + 64 * h;
      __m512i lo = _mm512_and_si512(_mm512_srlv_epi16(pairs_of(qs, qs + 32), nibble), low4);
      __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(pairs_of(qs + 16, qs + 48), nibble), low4);
      if constexpr (kType == kQ5_K) {  // bit j of qh[e]: element e's fifth bit in sub-block j
        const __m512i bit = lane_counts(4 * h, 4 * h + 1, 4 * h + 2, 4 * h + 3);
        const auto fifth = [&](const uint8_t* qh) {
          return _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(load16(qh)), bit), one), 4);
        };
        lo = _mm512_or_si512(lo, fifth(w + 16));
        hi = _mm512_or_si512(hi, fifth(w + 32));
      }
      const __m128 s = h ? _mm256_extractf128_ps(scales, 1) : _mm256_castps256_ps128(scales);
      const __m128 m = h ? _mm256_extractf128_ps(mins, 1) : _mm256_castps256_ps128(mins);
      for (int r = 0; r < kA; ++r) {
        const ActivationGroup<kParts>* xr = x + r * x_stride;
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(group_dots(lo, hi, xr)), spread4(_mm_mul_ps(s, load4(xr->d))), acc[r]);
        offsets[r] = _mm_fmadd_ps(m, dsum_both(xr->dsum), offsets[r]);
      }
    }
  }
  store_rows<kA>(acc, offsets, out, out_stride, accumulate);
}

// One weight row of Q6_K against kA activation rows. Half n of a super-block (sub-blocks 4n..4n+3)
// is one group: sub-block 4n + i takes nibble i/2 of ql's run i%2 and bits 2i of qh; each half of 16
// elements has its own scale, so the two halves' products are weighed apart.
template <int kA, int kParts>
void dot_row_q6k(const uint8_t* w, const ActivationGroup<kParts>* x, int64_t x_stride, int64_t blocks, float* out,
                 int64_t out_stride, bool accumulate) {
  constexpr int kBytes = Format<kQ6_K>::kBytes;
  const __m512i low4 = _mm512_set1_epi8(0x0F), low2 = _mm512_set1_epi8(3);
  const __m512i nibble = lane_counts(0, 0, 4, 4), crumb = lane_counts(0, 2, 4, 6);
  Acc acc[kA];
  __m128 offsets[kA];
  for (int r = 0; r < kA; ++r) acc[r] = zero_acc(), offsets[r] = _mm_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, w += kBytes) {
    // d·sc for the 16 scales; scale 2j + e weighs half e of sub-block j.
    const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(fp16(w + 208)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(w + 192))));
    for (int n = 0; n < 2; ++n, ++x) {
      const uint8_t *ql = w + 64 * n, *qh = w + 128 + 32 * n;
      const auto unpack = [&](int e) {  // elements 16e..16e+15 of the four sub-blocks
        const __m256i runs = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(ql + 32 + 16 * e),
                                                 reinterpret_cast<const __m128i*>(ql + 16 * e));
        const __m512i low = _mm512_and_si512(_mm512_srlv_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(runs), runs, 1), nibble), low4);
        const __m512i two = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(load16(qh + 16 * e)), crumb), low2);
        return _mm512_or_si512(low, _mm512_slli_epi16(two, 4));
      };
      const __m512i q[2] = {unpack(0), unpack(1)};
      const __m512i first = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
      const __m512i pick[2] = {_mm512_add_epi32(first, _mm512_set1_epi32(8 * n)), _mm512_add_epi32(first, _mm512_set1_epi32(8 * n + 1))};
      const __m512 scale[2] = {_mm512_permutexvar_ps(pick[0], sc), _mm512_permutexvar_ps(pick[1], sc)};
      // The offset −32·d·sc per half and sub-block, as four-float vectors.
      const __m512i four = _mm512_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
      __m128 offset[2];
      for (int e = 0; e < 2; ++e)
        offset[e] = _mm_mul_ps(_mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_add_epi32(four, _mm512_set1_epi32(8 * n + e)), sc)),
                               _mm_set1_ps(-32.f));
      for (int r = 0; r < kA; ++r) {
        const ActivationGroup<kParts>* xr = x + r * x_stride;
        const __m512 xd = spread4(load4(xr->d));
        for (int e = 0; e < 2; ++e) {
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(half_dots(q[e], xr, e)), _mm512_mul_ps(scale[e], xd), acc[r]);
          offsets[r] = _mm_fmadd_ps(offset[e], load4(xr->dsum[e]), offsets[r]);
        }
      }
    }
  }
  store_rows<kA>(acc, offsets, out, out_stride, accumulate);
}

#endif

#if !defined(PAGEDLLM_VNNI)
// The same with 256-bit registers (AVX2 without VNNI): a group's four sub-blocks of a weight row in
// two registers, two consecutive sub-blocks each (one per 128-bit lane), against the group's
// activations 32 bytes at a time.

using Acc = __m256;
inline Acc zero_acc() { return _mm256_setzero_ps(); }

// 16 bytes at `offset` of kN (0, 1 or 2) consecutive blocks `stride` apart, one per 128-bit lane; zero after them.
template <int kN>
inline __m256i pair_of_blocks(const uint8_t* w, int64_t stride, int offset) {
  if constexpr (kN == 2) return _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(w + stride + offset),
                                                    reinterpret_cast<const __m128i*>(w + offset));
  else if constexpr (kN == 1) return _mm256_zextsi128_si256(load16(w + offset));
  else return _mm256_setzero_si256();
}

// Σ u·x per four bytes (int32), u unsigned and x signed: |u| ≤ 128 and |x| ≤ 127 keep each pair of
// products within int16.
inline __m256i dot_bytes(__m256i u, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
}

// A register of two sub-blocks (pair p of the group) against their activations' half `half`; for Q8_0
// (kSigned) q is |w| and the activations take w's sign.
template <bool kSigned = false, int kParts>
inline __m256i pair_dots(__m256i q, const ActivationGroup<kParts>* x, int half, int pair, __m256i sign = __m256i()) {
  const auto part = [&](int p) {
    __m256i v = load32(x->q[p][half] + 32 * pair);
    if constexpr (kSigned) v = _mm256_sign_epi8(v, sign);
    return dot_bytes(q, v);
  };
  __m256i dots = part(0);
  if constexpr (kParts == 2) dots = _mm256_add_epi32(_mm256_slli_epi32(dots, 7), part(1));
  return dots;
}

// {a, b, c, d} → {a ×4, b ×4} (pair 0) or {c ×4, d ×4} (pair 1).
inline __m256 spread_pair(__m128 v, int pair) {
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_add_epi32(_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                                                                             _mm256_set1_epi32(2 * pair)));
}
// Eight floats v: {v[i] ×4, v[j] ×4}.
inline __m256 pick2(__m256 v, int i, int j) {
  return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(i, i, i, i, j, j, j, j));
}

template <int kA>
inline void store_rows(const __m256* acc, const __m128* offsets, float* out, int64_t out_stride, bool accumulate) {
  for (int r = 0; r < kA; ++r)
    store(out + r * out_stride, hsum(_mm256_add_ps(acc[r], _mm256_castps128_ps256(offsets[r]))), accumulate);
}

// Four consecutive blocks of a 32-weight format (only the first kValid of them at the end of a row)
// against kA activation rows' groups x (x_stride groups apart).
template <int kType, int kA, int kParts, int kValid = 4>
inline void small_group(const uint8_t* w, const ActivationGroup<kParts>* x, int64_t x_stride, __m256* acc,
                        __m128* offsets) {
  using B = SmallBlock<kType>;
  constexpr int kBytes = B::kBytes;
  constexpr int kPairs = (kValid + 1) / 2;
  __m256i lo[2], hi[2];
  const auto load_pair = [&]<int kN>(int p) {
    const uint8_t* wp = w + 2 * p * kBytes;
    if constexpr (kType == kQ8_0) {
      lo[p] = pair_of_blocks<kN>(wp, kBytes, 2);
      hi[p] = pair_of_blocks<kN>(wp, kBytes, 18);
    } else {
      const __m256i v = pair_of_blocks<kN>(wp, kBytes, B::kNibbles);
      lo[p] = low4(v);
      hi[p] = low4(_mm256_srli_epi16(v, 4));
      if constexpr (kType == kMXFP4) lo[p] = _mm256_shuffle_epi8(mxfp4_table(), lo[p]), hi[p] = _mm256_shuffle_epi8(mxfp4_table(), hi[p]);
      if constexpr (kType == kQ5_0 || kType == kQ5_1) {  // each block's fifth bits: 0..15 in lane 0, 16..31 in lane 1
        constexpr int kHigh = kType == kQ5_0 ? 2 : 4;
        const __m256i a = fifth_bits(wp + kHigh), b = kN == 2 ? fifth_bits(wp + kBytes + kHigh) : _mm256_setzero_si256();
        lo[p] = _mm256_or_si256(lo[p], _mm256_permute2x128_si256(a, b, 0x20));
        hi[p] = _mm256_or_si256(hi[p], _mm256_permute2x128_si256(a, b, 0x31));
      }
    }
  };
  load_pair.template operator()<(kValid >= 2 ? 2 : 1)>(0);
  if constexpr (kPairs == 2) load_pair.template operator()<kValid - 2>(1);
  __m256i sign_lo[2], sign_hi[2];
  for (int p = 0; p < kPairs; ++p) {
    sign_lo[p] = lo[p], sign_hi[p] = hi[p];
    if constexpr (kType == kQ8_0) lo[p] = _mm256_sign_epi8(lo[p], lo[p]), hi[p] = _mm256_sign_epi8(hi[p], hi[p]);
  }
  __m128 d, offset;
  four_headers<kType, kValid>(w, kBytes, d, offset);
  for (int r = 0; r < kA; ++r) {
    const ActivationGroup<kParts>* xr = x + r * x_stride;
    const __m128 scale = _mm_mul_ps(d, load4(xr->d));
    for (int p = 0; p < kPairs; ++p) {
      const __m256i dots = _mm256_add_epi32(pair_dots<kType == kQ8_0>(lo[p], xr, 0, p, sign_lo[p]),
                                            pair_dots<kType == kQ8_0>(hi[p], xr, 1, p, sign_hi[p]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), spread_pair(scale, p), acc[r]);
    }
    if constexpr (B::kHasOffset) offsets[r] = _mm_fmadd_ps(offset, dsum_both(xr->dsum), offsets[r]);
  }
}

// One weight row of Q4_K / Q5_K against kA activation rows, as the 512-bit kernel: sub-blocks 4h..4h+3
// of a super-block are one group; pair p of it is nibble run 2h + p, low nibbles then high.
template <int kType, int kA, int kParts>
void dot_row_k(const uint8_t* w, const ActivationGroup<kParts>* x, int64_t x_stride, int64_t blocks, float* out,
               int64_t out_stride, bool accumulate) {
  constexpr int kBytes = Format<kType>::kBytes, kQs = kType == kQ4_K ? 16 : 48;
  Acc acc[kA];
  __m128 offsets[kA];
  for (int r = 0; r < kA; ++r) acc[r] = zero_acc(), offsets[r] = _mm_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, w += kBytes) {
    __m256 scales, mins;
    k_scales(w, scales, mins);
    for (int h = 0; h < 2; ++h, ++x) {
      __m256i q[2][2];  // [pair][half]
      for (int p = 0; p < 2; ++p) {
        const int j = 4 * h + 2 * p;  // the pair's first sub-block
        for (int e = 0; e < 2; ++e) {
          const __m256i v = _mm256_broadcastsi128_si256(load16(w + kQs + 32 * (2 * h + p) + 16 * e));
          q[p][e] = _mm256_blend_epi32(low4(v), low4(_mm256_srli_epi16(v, 4)), 0xF0);
          if constexpr (kType == kQ5_K) {  // bit j of qh[e]: element e's fifth bit in sub-block j
            const __m256i qh = _mm256_broadcastsi128_si256(load16(w + 16 + 16 * e));
            const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(qh, _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1)),
                                                 _mm256_set1_epi8(1));
            q[p][e] = _mm256_or_si256(q[p][e], _mm256_slli_epi16(bit, 4));
          }
        }
      }
      const __m128 m = h ? _mm256_extractf128_ps(mins, 1) : _mm256_castps256_ps128(mins);
      for (int r = 0; r < kA; ++r) {
        const ActivationGroup<kParts>* xr = x + r * x_stride;
        const __m128 xd = load4(xr->d);
        for (int p = 0; p < 2; ++p) {
          const int j = 4 * h + 2 * p;
          const __m256i dots = _mm256_add_epi32(pair_dots(q[p][0], xr, 0, p), pair_dots(q[p][1], xr, 1, p));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_mul_ps(pick2(scales, j, j + 1), spread_pair(xd, p)), acc[r]);
        }
        offsets[r] = _mm_fmadd_ps(m, dsum_both(xr->dsum), offsets[r]);
      }
    }
  }
  store_rows<kA>(acc, offsets, out, out_stride, accumulate);
}

// One weight row of Q6_K against kA activation rows: half n of a super-block is one group; its pair 0
// is ql's runs 0 and 1 low nibbles with qh bits 0-1 and 2-3, pair 1 the high nibbles with bits 4-5, 6-7.
template <int kA, int kParts>
void dot_row_q6k(const uint8_t* w, const ActivationGroup<kParts>* x, int64_t x_stride, int64_t blocks, float* out,
                 int64_t out_stride, bool accumulate) {
  constexpr int kBytes = Format<kQ6_K>::kBytes;
  Acc acc[kA];
  __m128 offsets[kA];
  for (int r = 0; r < kA; ++r) acc[r] = zero_acc(), offsets[r] = _mm_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, w += kBytes) {
    const __m128i sc_bytes = load16(w + 192);
    const __m256 d = _mm256_set1_ps(fp16(w + 208));
    for (int n = 0; n < 2; ++n, ++x) {
      // d·sc of this half's eight scales: scale 2i + e weighs half e of its sub-block 4n + i.
      const __m256 sc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(n ? _mm_srli_si128(sc_bytes, 8) : sc_bytes)));
      const uint8_t *ql = w + 64 * n, *qh = w + 128 + 32 * n;
      __m256i q[2][2];  // [pair][half]
      for (int e = 0; e < 2; ++e) {
        const __m256i runs = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(ql + 32 + 16 * e),
                                                 reinterpret_cast<const __m128i*>(ql + 16 * e));
        const __m256i bits = _mm256_broadcastsi128_si256(load16(qh + 16 * e));
        for (int p = 0; p < 2; ++p) {
          const __m256i two = _mm256_and_si256(_mm256_srlv_epi32(bits, _mm256_setr_epi32(4 * p, 4 * p, 4 * p, 4 * p, 4 * p + 2,
                                                                                        4 * p + 2, 4 * p + 2, 4 * p + 2)),
                                               _mm256_set1_epi8(3));
          q[p][e] = _mm256_or_si256(low4(p ? _mm256_srli_epi16(runs, 4) : runs), _mm256_slli_epi16(two, 4));
        }
      }
      __m128 offset[2];  // −32·d·sc per half e, for the four sub-blocks
      for (int e = 0; e < 2; ++e)
        offset[e] = _mm_mul_ps(_mm256_castps256_ps128(_mm256_permutevar8x32_ps(sc, _mm256_setr_epi32(e, 2 + e, 4 + e, 6 + e, 0, 0, 0, 0))),
                               _mm_set1_ps(-32.f));
      for (int r = 0; r < kA; ++r) {
        const ActivationGroup<kParts>* xr = x + r * x_stride;
        const __m128 xd = load4(xr->d);
        for (int p = 0; p < 2; ++p)
          for (int e = 0; e < 2; ++e)
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_dots(q[p][e], xr, e, p)),
                                     _mm256_mul_ps(pick2(sc, 4 * p + e, 4 * p + 2 + e), spread_pair(xd, p)), acc[r]);
        for (int e = 0; e < 2; ++e) offsets[r] = _mm_fmadd_ps(offset[e], load4(xr->dsum[e]), offsets[r]);
      }
    }
  }
  store_rows<kA>(acc, offsets, out, out_stride, accumulate);
}
#endif

// One weight row of a 32-weight format against kA activation rows: whole groups of four blocks, then
// the last one to three (the lanes after them stay zero).
template <int kType, int kA, int kParts>
void dot_row(const uint8_t* w, const ActivationGroup<kParts>* x, int64_t x_stride, int64_t blocks, float* out,
             int64_t out_stride, bool accumulate) {
  constexpr int kBytes = Format<kType>::kBytes;
  Acc acc[kA];
  __m128 offsets[kA];
  for (int r = 0; r < kA; ++r) acc[r] = zero_acc(), offsets[r] = _mm_setzero_ps();
  int64_t b = 0;
  for (; b + 4 <= blocks; b += 4, w += 4 * kBytes, ++x) small_group<kType, kA>(w, x, x_stride, acc, offsets);
  switch (blocks - b) {
    case 3: small_group<kType, kA, kParts, 3>(w, x, x_stride, acc, offsets); break;
    case 2: small_group<kType, kA, kParts, 2>(w, x, x_stride, acc, offsets); break;
    case 1: small_group<kType, kA, kParts, 1>(w, x, x_stride, acc, offsets); break;
  }
  store_rows<kA>(acc, offsets, out, out_stride, accumulate);
}

template <int kType, int kA, int kParts>
inline void weight_row(const uint8_t* w, const ActivationGroup<kParts>* x, int64_t x_stride, int64_t k, float* out,
                       int64_t out_stride, bool accumulate) {
  const int64_t blocks = k / (32 * Format<kType>::kSub);
  if constexpr (kType == kQ4_K || kType == kQ5_K) dot_row_k<kType, kA>(w, x, x_stride, blocks, out, out_stride, accumulate);
  else if constexpr (kType == kQ6_K) dot_row_q6k<kA>(w, x, x_stride, blocks, out, out_stride, accumulate);
  else dot_row<kType, kA>(w, x, x_stride, blocks, out, out_stride, accumulate);
}

inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(c10::BFloat16* out, __m256 v) {  // round to nearest even, as torch does
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
}

#if defined(PAGEDLLM_VNNI)
inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store16(c10::BFloat16* out, __m512 v) {  // round to nearest even, as store8
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i top = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(top));
}
#endif

template <int kType, typename Out>
void dequantize_row(const uint8_t* w, int64_t blocks, Out* out) {
  using F = Format<kType>;
  __m128 coefs[F::kSub];
  for (int64_t b = 0; b < blocks; ++b, w += F::kBytes) {
    prefetch_ahead<F::kBytes>(w);
    block_coefs<kType>(w, coefs);
    for (int j = 0; j < F::kSub; ++j, out += 32) {
      const __m256i q = simd_q<kType>(w, j);
      const __m128 c = coefs[j];
      const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
      for (int h = 0; h < 2; ++h) {
#if defined(PAGEDLLM_VNNI)  // a half of 16 values in one register: the prefill's tiles dequantise ~2x faster
        const __m512i ints = kType == kQ8_0 ? _mm512_cvtepi8_epi32(halves[h]) : _mm512_cvtepu8_epi32(halves[h]);
        store16(out + 16 * h, _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), _mm512_set1_ps(c[h]), _mm512_set1_ps(c[2 + h])));
#else
        const __m256 scale = _mm256_set1_ps(c[h]), offset = _mm256_set1_ps(c[2 + h]);
        for (int e = 0; e < 2; ++e) {
          const __m128i bytes = _mm_srli_si128(halves[h], 8 * e);
          const __m256i ints = kType == kQ8_0 ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
          store8(out + 16 * h + 8 * e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, offset));
        }
#endif
      }
    }
  }
}

// bfloat16 → float32 is a 16-bit shift: 8 values, and (AVX-512) 16.
inline __m256 widen8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

#if defined(PAGEDLLM_VNNI)
inline __m512 widen16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#endif

// out[i] = silu(gate[i]) · up[i] for bfloat16 rows, in float32 with one rounding at the end.
inline void silu_mul_row(const c10::BFloat16* gate, const c10::BFloat16* up, int64_t n, c10::BFloat16* out) {
  int64_t i = 0;
#if defined(PAGEDLLM_VNNI)
  for (; i + 16 <= n; i += 16) {
    const __m512 g = widen16(gate + i), d = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    store16(out + i, _mm512_mul_ps(_mm512_div_ps(g, d), widen16(up + i)));
  }
#endif
  for (; i + 8 <= n; i += 8) {
    const __m256 g = widen8(gate + i);
    const __m256 sig = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    store8(out + i, _mm256_mul_ps(sig, widen8(up + i)));
  }
  for (; i < n; ++i) out[i] = static_cast<float>(gate[i]) / (1.f + std::exp(-static_cast<float>(gate[i]))) * static_cast<float>(up[i]);
}

// A bfloat16 row of attention scores → its softmax over the first `visible` entries (float32 math,
// one rounding), 0 after them. `tmp` holds `visible` floats.
inline void softmax_row(c10::BFloat16* row, int64_t visible, int64_t cols, float* tmp) {
  int64_t i = 0;
  float peak = -INFINITY, sum = 0.f;
#if defined(PAGEDLLM_VNNI)
  __m512 peak16 = _mm512_set1_ps(-INFINITY);
  for (; i + 16 <= visible; i += 16) peak16 = _mm512_max_ps(peak16, widen16(row + i));
  peak = _mm512_reduce_max_ps(peak16);
#endif
  for (; i < visible; ++i) peak = std::max(peak, static_cast<float>(row[i]));
  i = 0;
#if defined(PAGEDLLM_VNNI)
  __m512 sum16 = _mm512_setzero_ps();
  for (; i + 16 <= visible; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(widen16(row + i), _mm512_set1_ps(peak)));
    _mm512_storeu_ps(tmp + i, e);
    sum16 = _mm512_add_ps(sum16, e);
  }
  sum = _mm512_reduce_add_ps(sum16);
#endif
  __m256 sum8 = _mm256_setzero_ps();
  for (; i + 8 <= visible; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(widen8(row + i), _mm256_set1_ps(peak)));
    _mm256_storeu_ps(tmp + i, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  sum += hsum(sum8);
  for (; i < visible; ++i) sum += tmp[i] = std::exp(static_cast<float>(row[i]) - peak);
  const float inv = 1.f / sum;
  i = 0;
  for (; i + 8 <= visible; i += 8) store8(row + i, _mm256_mul_ps(_mm256_loadu_ps(tmp + i), _mm256_set1_ps(inv)));
  for (; i < visible; ++i) row[i] = tmp[i] * inv;
  std::memset(static_cast<void*>(row + visible), 0, (cols - visible) * sizeof(c10::BFloat16));
}
#else
inline void silu_mul_row(const c10::BFloat16* gate, const c10::BFloat16* up, int64_t n, c10::BFloat16* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.f + std::exp(-g)) * static_cast<float>(up[i]);
  }
}

inline void softmax_row(c10::BFloat16* row, int64_t visible, int64_t cols, float* tmp) {
  float peak = -INFINITY, sum = 0.f;
  for (int64_t i = 0; i < visible; ++i) peak = std::max(peak, static_cast<float>(row[i]));
  for (int64_t i = 0; i < visible; ++i) sum += tmp[i] = std::exp(static_cast<float>(row[i]) - peak);
  for (int64_t i = 0; i < visible; ++i) row[i] = tmp[i] / sum;
  std::memset(static_cast<void*>(row + visible), 0, (cols - visible) * sizeof(c10::BFloat16));
}

template <int kType, typename Out>
void dequantize_row(const uint8_t* w, int64_t blocks, Out* out) {
  using F = Format<kType>;
  uint8_t q[32];
  Coef c;
  for (int64_t b = 0; b < blocks; ++b, w += F::kBytes) {
    for (int j = 0; j < F::kSub; ++j, out += 32) {
      F::decode(w, j, q, c);
      for (int i = 0; i < 32; ++i) out[i] = static_cast<Out>(c.scale[i / 16] * q[i] + c.offset[i / 16]);
    }
  }
}

#endif

#if defined(PAGEDLLM_SIMD)
// out[m, n] (+)= Σ_k x[m, k]·W[n, k] for rows [n0, n1) of W; x already quantised, in groups. Each weight
// row is read once for up to four activation rows; more take further passes over a chunk of rows
// while it is in cache.
template <int kType, int kParts>
void matmul_rows(const uint8_t* w, int64_t row_bytes, const ActivationGroup<kParts>* x, int64_t m_rows, int64_t k,
                 float* out, int64_t out_stride, int64_t n0, int64_t n1, bool accumulate) {
  const int64_t x_stride = groups_of(k);
  constexpr int64_t kChunk = 16;
  for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
    const int64_t c1 = std::min(n1, c0 + kChunk);
    for (int64_t m = 0; m < m_rows; m += 4) {
      const ActivationGroup<kParts>* xm = x + m * x_stride;
      float* om = out + m * out_stride;
      for (int64_t n = c0; n < c1; ++n) {
        const uint8_t* wn = w + n * row_bytes;
        switch (std::min<int64_t>(4, m_rows - m)) {
          case 4: weight_row<kType, 4>(wn, xm, x_stride, k, om + n, out_stride, accumulate); break;
          case 3: weight_row<kType, 3>(wn, xm, x_stride, k, om + n, out_stride, accumulate); break;
          case 2: weight_row<kType, 2>(wn, xm, x_stride, k, om + n, out_stride, accumulate); break;
          case 1: weight_row<kType, 1>(wn, xm, x_stride, k, om + n, out_stride, accumulate); break;
        }
      }
    }
  }
}
#else
// The portable path, plain loops: each weight sub-block decoded, then dotted with each activation row.
template <int kType, typename Block>
void matmul_rows(const uint8_t* w, int64_t row_bytes, const Block* x, int64_t m_rows, int64_t k, float* out,
                 int64_t out_stride, int64_t n0, int64_t n1, bool accumulate) {
  using F = Format<kType>;
  const int64_t blocks = k / (32 * F::kSub), x_stride = activation_stride(k);
  uint8_t q[32];
  Coef c;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t r = 0; r < m_rows; ++r) {
      const Block* xr = x + r * x_stride;
      float total = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        for (int j = 0; j < F::kSub; ++j) {
          F::decode(w + n * row_bytes + b * F::kBytes, j, q, c);
          const Block& xb = xr[b * F::kSub + j];
          for (int h = 0; h < 2; ++h) {
            int32_t s = 0;
            for (int e = 16 * h; e < 16 * h + 16; ++e) s += q[e] * xb.value(e);
            total += c.scale[h] * xb.d[h] * s + c.offset[h] * xb.dsum[h];
          }
        }
      }
      store(out + r * out_stride + n, total, accumulate);
    }
  }
}
#endif

// A LoRA update's two products for one row, as plain loops that the compiler vectorises for each
// instruction set's copy of this file: low[R] = x[K] · a_t[K, R], then out[N] += low · b_t[R, N] (b_t's
// rows `b_stride` apart, so that a caller can hand over a range of its columns).
inline void lora_low(const float* x, int64_t k, const float* a_t, int64_t r, float* low) {
  std::fill(low, low + r, 0.f);
  for (int64_t i = 0; i < k; ++i) {
    const float xi = x[i];
    const float* a = a_t + i * r;
    for (int64_t j = 0; j < r; ++j) low[j] += xi * a[j];
  }
}

inline void lora_add(const float* low, int64_t r, const float* b_t, int64_t b_stride, int64_t n, float* out) {
  for (int64_t j = 0; j < r; ++j) {
    const float lj = low[j];
    const float* b = b_t + j * b_stride;
    for (int64_t c = 0; c < n; ++c) out[c] += lj * b[c];
  }
}

// Entry points for quant_matmul.cpp, which picks the namespace (instruction set) at run time.
#if defined(PAGEDLLM_SIMD)
inline void quantize_rows(const float* x, int64_t m, int64_t k, int64_t x_stride, uint8_t* out, bool wide) {
  for (int64_t r = 0; r < m; ++r) {
    if (wide) quantize_row_groups<Q15Block>(x + r * x_stride, k, reinterpret_cast<Q15Group*>(out) + r * groups_of(k));
    else quantize_row_groups<Q8Block>(x + r * x_stride, k, reinterpret_cast<Q8Group*>(out) + r * groups_of(k));
  }
}

template <int kType>
void matmul_quantised(const uint8_t* w, int64_t row_bytes, const uint8_t* x, bool wide, int64_t m, int64_t k,
                      float* out, int64_t out_stride, int64_t n0, int64_t n1, bool accumulate) {
  if (wide)
    matmul_rows<kType>(w, row_bytes, reinterpret_cast<const Q15Group*>(x), m, k, out, out_stride, n0, n1, accumulate);
  else
    matmul_rows<kType>(w, row_bytes, reinterpret_cast<const Q8Group*>(x), m, k, out, out_stride, n0, n1, accumulate);
}
#else
inline void quantize_rows(const float* x, int64_t m, int64_t k, int64_t x_stride, uint8_t* out, bool wide) {
  for (int64_t r = 0; r < m; ++r) {
    if (wide) quantize_row(x + r * x_stride, k, reinterpret_cast<Q15Block*>(out) + r * activation_stride(k));
    else quantize_row(x + r * x_stride, k, reinterpret_cast<Q8Block*>(out) + r * activation_stride(k));
  }
}

template <int kType>
void matmul_quantised(const uint8_t* w, int64_t row_bytes, const uint8_t* x, bool wide, int64_t m, int64_t k,
                      float* out, int64_t out_stride, int64_t n0, int64_t n1, bool accumulate) {
  if (wide)
    matmul_rows<kType>(w, row_bytes, reinterpret_cast<const Q15Block*>(x), m, k, out, out_stride, n0, n1, accumulate);
  else
    matmul_rows<kType>(w, row_bytes, reinterpret_cast<const Q8Block*>(x), m, k, out, out_stride, n0, n1, accumulate);
}
#endif
