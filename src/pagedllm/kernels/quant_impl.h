// The body of the quantised kernels, included once per instruction set by quant_matmul.cpp
// inside its own namespace and `#pragma GCC target`, so one build carries every path and the
// caller picks one at run time. Only `dot32` differs between the paths; the block decoders are
// plain loops that the compiler vectorises for each target.
//
// Every GGML block format is read as 32-weight sub-blocks: 32 unsigned integers q and, per half
// of 16, a scale and an offset, so that weight = scale·q + offset. Activations are quantised to
// Q8 blocks of 32 (int8, one float scale, the sum of each half), so that a sub-block's dot product
// is Σ_half scale·dx·Σ(q·a) + offset·dx·Σa — integer work inside, two float terms per half.

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

// One activation row's sub-block, as the quantiser writes it.
struct Q8Block {
  int8_t q[32];
  float d;
  int16_t sum[2];  // Σq of elements 0..15 and 16..31
};
static_assert(sizeof(Q8Block) == 40, "Q8Block layout");

inline void quantize_row(const float* x, int64_t k, Q8Block* out) {
  for (int64_t b = 0; b < k / 32; ++b, x += 32) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
    int sums[2] = {0, 0};
    for (int i = 0; i < 32; ++i) {
      const int v = static_cast<int>(std::nearbyint(x[i] * inv));
      out[b].q[i] = static_cast<int8_t>(v);
      sums[i / 16] += v;
    }
    out[b].d = d;
    out[b].sum[0] = static_cast<int16_t>(sums[0]);
    out[b].sum[1] = static_cast<int16_t>(sums[1]);
  }
}

#if defined(PAGEDLLM_SIMD)
// Σ over 4-element groups of u·s: int32 lane i holds elements 4i..4i+3, so lanes 0–3 are the
// first half of the sub-block and 4–7 the second.
inline __m256i dot32(__m256i u, __m256i s) {
#if defined(PAGEDLLM_VNNI)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
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
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                        _mm256_set1_epi64x(-1));
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

inline float fp16_simd(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
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

template <int kType> void simd_coef(const uint8_t* b, int j, Coef& c);
template <> inline void simd_coef<kQ4_0>(const uint8_t* b, int, Coef& c) {
  const float d = fp16_simd(b);
  uniform(c, d, -8.f * d);
}
template <> inline void simd_coef<kQ4_1>(const uint8_t* b, int, Coef& c) { uniform(c, fp16_simd(b), fp16_simd(b + 2)); }
template <> inline void simd_coef<kQ5_0>(const uint8_t* b, int, Coef& c) {
  const float d = fp16_simd(b);
  uniform(c, d, -16.f * d);
}
template <> inline void simd_coef<kQ5_1>(const uint8_t* b, int, Coef& c) { uniform(c, fp16_simd(b), fp16_simd(b + 2)); }
template <> inline void simd_coef<kQ8_0>(const uint8_t* b, int, Coef& c) { uniform(c, fp16_simd(b), 0.f); }
template <> inline void simd_coef<kQ4_K>(const uint8_t* b, int j, Coef& c) {
  uint8_t sc, m;
  scale_min_k4(j, b + 4, &sc, &m);
  uniform(c, fp16_simd(b) * sc, -fp16_simd(b + 2) * m);
}
template <> inline void simd_coef<kQ5_K>(const uint8_t* b, int j, Coef& c) { simd_coef<kQ4_K>(b, j, c); }
template <> inline void simd_coef<kQ6_K>(const uint8_t* b, int j, Coef& c) {
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * (j / 4) + 2 * (j % 4);
  const float d = fp16_simd(b + 208);
  for (int h = 0; h < 2; ++h) {
    c.scale[h] = d * sc[h];
    c.offset[h] = -32.f * d * sc[h];
  }
}

// Dot products of one weight row with kRows activation rows: each sub-block is unpacked once and
// used for every activation row.
template <int kType, int kRows>
void dot_rows(const uint8_t* w, const Q8Block* a, int64_t a_stride, int64_t blocks, float* out,
              int64_t out_stride) {
  using F = Format<kType>;
  __m256 acc[kRows];
  float offsets[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps(), offsets[r] = 0.f;
  Coef c;
  for (int64_t b = 0; b < blocks; ++b, w += F::kBytes) {
    for (int j = 0; j < F::kSub; ++j, ++a) {
      __m256i q = simd_q<kType>(w, j);
      simd_coef<kType>(w, j, c);
      const __m256i wq = q;
      if constexpr (kType == kQ8_0) q = _mm256_sign_epi8(q, q);  // |w|, with w's sign moved to a
      for (int r = 0; r < kRows; ++r) {
        const Q8Block* x = a + r * a_stride;
        __m256i s = load32(x->q);
        if constexpr (kType == kQ8_0) s = _mm256_sign_epi8(s, wq);
        const __m256i p = dot32(q, s);
        const __m256 scale = (kType == kQ6_K) ? _mm256_setr_m128(_mm_set1_ps(c.scale[0] * x->d), _mm_set1_ps(c.scale[1] * x->d))
                                              : _mm256_set1_ps(c.scale[0] * x->d);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r]);
        if constexpr (kType == kQ6_K) offsets[r] += x->d * (c.offset[0] * x->sum[0] + c.offset[1] * x->sum[1]);
        else if constexpr (kType != kQ8_0) offsets[r] += x->d * c.offset[0] * (x->sum[0] + x->sum[1]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) out[r * out_stride] = hsum(acc[r]) + offsets[r];
}
inline void store8(float* out, __m256 v) { _mm256_storeu_ps(out, v); }
inline void store8(c10::BFloat16* out, __m256 v) {  // round to nearest even, as torch does
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i top = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
}

template <int kType, typename Out>
void dequantize_row(const uint8_t* w, int64_t blocks, Out* out) {
  using F = Format<kType>;
  Coef c;
  for (int64_t b = 0; b < blocks; ++b, w += F::kBytes) {
    for (int j = 0; j < F::kSub; ++j, out += 32) {
      const __m256i q = simd_q<kType>(w, j);
      simd_coef<kType>(w, j, c);
      const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
      for (int h = 0; h < 2; ++h) {
        const __m256 scale = _mm256_set1_ps(c.scale[h]), offset = _mm256_set1_ps(c.offset[h]);
        for (int e = 0; e < 2; ++e) {
          const __m128i bytes = _mm_srli_si128(halves[h], 8 * e);
          const __m256i ints = kType == kQ8_0 ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
          store8(out + 16 * h + 8 * e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), scale, offset));
        }
      }
    }
  }
}
#else
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

template <int kType, int kRows>
void dot_rows(const uint8_t* w, const Q8Block* a, int64_t a_stride, int64_t blocks, float* out,
              int64_t out_stride) {
  using F = Format<kType>;
  uint8_t q[32];
  Coef c;
  float total[kRows] = {};
  for (int64_t b = 0; b < blocks; ++b, w += F::kBytes) {
    for (int j = 0; j < F::kSub; ++j, ++a) {
      F::decode(w, j, q, c);
      for (int r = 0; r < kRows; ++r) {
        const Q8Block* x = a + r * a_stride;
        for (int h = 0; h < 2; ++h) {
          int32_t s = 0;
          for (int i = 16 * h; i < 16 * h + 16; ++i) s += q[i] * x->q[i];
          total[r] += x->d * (c.scale[h] * s + c.offset[h] * x->sum[h]);
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r) out[r * out_stride] = total[r];
}
#endif

// The same product with float activations (for the output head, where int8 rounding can flip a
// near-tie): each weight row is dequantised once into `buf` and dotted with every x row.
template <int kType>
void matmul_rows_f32(const uint8_t* w, int64_t row_bytes, const float* x, int64_t m_rows, int64_t k, float* out,
                     int64_t out_stride, int64_t n0, int64_t n1, float* buf) {
  const int64_t blocks = k / (32 * Format<kType>::kSub);
  for (int64_t n = n0; n < n1; ++n) {
    dequantize_row<kType>(w + n * row_bytes, blocks, buf);
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* xm = x + m * k;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < k; ++i) s += buf[i] * xm[i];
      out[m * out_stride + n] = s;
    }
  }
}

// out[m, n] = Σ_k x[m, k]·W[n, k] for rows [n0, n1) of W; x already quantised. Activation rows
// go four at a time so each weight sub-block is unpacked once per four.
template <int kType>
void matmul_rows(const uint8_t* w, int64_t row_bytes, const Q8Block* x, int64_t m_rows, int64_t k,
                 float* out, int64_t out_stride, int64_t n0, int64_t n1) {
  const int64_t blocks = k / (32 * Format<kType>::kSub), x_stride = k / 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    int64_t m = 0;
    for (; m + 4 <= m_rows; m += 4) dot_rows<kType, 4>(row, x + m * x_stride, x_stride, blocks, out + m * out_stride + n, out_stride);
    switch (m_rows - m) {
      case 3: dot_rows<kType, 3>(row, x + m * x_stride, x_stride, blocks, out + m * out_stride + n, out_stride); break;
      case 2: dot_rows<kType, 2>(row, x + m * x_stride, x_stride, blocks, out + m * out_stride + n, out_stride); break;
      case 1: dot_rows<kType, 1>(row, x + m * x_stride, x_stride, blocks, out + m * out_stride + n, out_stride); break;
    }
  }
}
