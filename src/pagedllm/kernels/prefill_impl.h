// Prefill attention in one fused pass (flash attention on the CPU): the body, included once per
// instruction set by prefill_attention.cpp inside its namespace and `#pragma GCC target`.
//
// A task is one sequence's kv head and a run of its new tokens: the M queries of the head's group
// (query m is the run's token m / G, the group's head m % G) against the cached keys, kKeys at a
// time. Key tiles start at multiples of kKeys positions, so a query's result does not depend on how
// its prompt was chunked or batched. Scores are kept transposed, keys × queries, so the online
// softmax's running maximum and sum are per lane (no horizontal reductions), and the products
// broadcast one key or value element against vectors of queries:
//   S[n][m]  = Σ_d K[n][d] · Q[d][m]         (Q scaled and packed once per task)
//   O[d][m]  = O[d][m] · α[m] + Σ_n V[n][d] · P[n][m]
// With bfloat16 products (PAGEDLLM_BF16: AVX-512 BF16's vdpbf16ps, which sums pairs), the reduced
// dimension's pairs sit side by side in 32-bit words: Q as [D/2][M] words, K as its rows, P as
// [N/2][M] words and V as [N/2][D] words. Everything else is float32.

constexpr int64_t kKeys = 128;  // keys per tile (even: the bfloat16 path pairs them)

#if defined(PAGEDLLM_AVX512)
constexpr int kW = 16, kRegKeys = 8, kRegVecs = 3;  // a register tile: 8 keys (or dims) × 3 vectors = 24 sums
using VecF = __m512;
inline VecF vset(float x) { return _mm512_set1_ps(x); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF vadd(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm512_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF vdiv(VecF a, VecF b) { return _mm512_div_ps(a, b); }
inline VecF vmax(VecF a, VecF b) { return _mm512_max_ps(a, b); }
inline VecF vexp(VecF x) { return exp16(x); }
inline VecF vexp0(VecF x) {  // e^x, and exactly 0 below the float range (masked scores are −∞)
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset(kExpMin), _CMP_GE_OQ), exp16(x));
}
inline VecF visible(VecF s, VecF key, VecF pos, VecF low) {  // s where low < key ≤ pos, else −∞
  const __mmask16 keep = _mm512_cmp_ps_mask(key, pos, _CMP_LE_OQ) & _mm512_cmp_ps_mask(key, low, _CMP_GT_OQ);
  return _mm512_mask_mov_ps(vset(-INFINITY), keep, s);
}
#elif defined(PAGEDLLM_SIMD)
constexpr int kW = 8, kRegKeys = 4, kRegVecs = 2;  // 16 registers: 8 sums
using VecF = __m256;
inline VecF vset(float x) { return _mm256_set1_ps(x); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF vadd(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF vsub(VecF a, VecF b) { return _mm256_sub_ps(a, b); }
inline VecF vmul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF vdiv(VecF a, VecF b) { return _mm256_div_ps(a, b); }
inline VecF vmax(VecF a, VecF b) { return _mm256_max_ps(a, b); }
inline VecF vexp(VecF x) { return exp8(x); }
inline VecF vexp0(VecF x) { return _mm256_and_ps(_mm256_cmp_ps(x, vset(kExpMin), _CMP_GE_OQ), exp8(x)); }
inline VecF visible(VecF s, VecF key, VecF pos, VecF low) {
  const VecF keep = _mm256_and_ps(_mm256_cmp_ps(key, pos, _CMP_LE_OQ), _mm256_cmp_ps(key, low, _CMP_GT_OQ));
  return _mm256_blendv_ps(vset(-INFINITY), s, keep);
}
#else
constexpr int kW = 8, kRegKeys = 4, kRegVecs = 2;
struct VecF {
  float v[8];
};
template <typename Op>
inline VecF lanes(Op op) {
  VecF r;
  for (int i = 0; i < 8; ++i) r.v[i] = op(i);
  return r;
}
inline VecF vset(float x) { return lanes([&](int) { return x; }); }
inline VecF vload(const float* p) { return lanes([&](int i) { return p[i]; }); }
inline void vstore(float* p, VecF v) { std::memcpy(p, v.v, sizeof v.v); }
inline VecF vfma(VecF a, VecF b, VecF c) { return lanes([&](int i) { return a.v[i] * b.v[i] + c.v[i]; }); }
inline VecF vadd(VecF a, VecF b) { return lanes([&](int i) { return a.v[i] + b.v[i]; }); }
inline VecF vsub(VecF a, VecF b) { return lanes([&](int i) { return a.v[i] - b.v[i]; }); }
inline VecF vmul(VecF a, VecF b) { return lanes([&](int i) { return a.v[i] * b.v[i]; }); }
inline VecF vdiv(VecF a, VecF b) { return lanes([&](int i) { return a.v[i] / b.v[i]; }); }
inline VecF vmax(VecF a, VecF b) { return lanes([&](int i) { return std::max(a.v[i], b.v[i]); }); }
inline VecF vexp(VecF x) { return lanes([&](int i) { return std::exp(x.v[i]); }); }
inline VecF vexp0(VecF x) { return vexp(x); }
inline VecF visible(VecF s, VecF key, VecF pos, VecF low) {
  return lanes([&](int i) { return key.v[i] <= pos.v[i] && key.v[i] > low.v[i] ? s.v[i] : -INFINITY; });
}
#endif

inline VecF vtanh(VecF x) {  // 1 − 2 / (e^2x + 1): ±1 where e^2x saturates
  return vsub(vset(1.f), vdiv(vset(2.f), vadd(vexp(vadd(x, x)), vset(1.f))));
}

// A cached head row (pool type T) as `dim` floats. q8_0 rows (T = uint8_t): per 32 values a float16
// scale, then 32 int8.
inline void row_to_floats(const float* row, int64_t dim, float* out) { std::memcpy(out, row, dim * sizeof(float)); }

inline void row_to_floats(const c10::Half* row, int64_t dim, float* out) {
  int64_t i = 0;
#if defined(PAGEDLLM_AVX512)
  for (; i < dim; i += 16) vstore(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i))));
#elif defined(PAGEDLLM_SIMD)
  for (; i < dim; i += 8) vstore(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i))));
#endif
  for (; i < dim; ++i) out[i] = static_cast<float>(row[i]);
}

inline void row_to_floats(const c10::BFloat16* row, int64_t dim, float* out) {
  for (int64_t i = 0; i < dim; ++i) {  // the top half of a float32: the compiler vectorises the shifts
    const uint32_t bits = static_cast<uint32_t>(row[i].x) << 16;
    std::memcpy(out + i, &bits, 4);
  }
}

inline void row_to_floats(const uint8_t* row, int64_t dim, float* out) {
  for (int64_t b = 0; b < dim / 32; ++b, row += 34, out += 32) {
    c10::Half d;
    std::memcpy(&d, row, 2);
    const float scale = static_cast<float>(d);
    const int8_t* q = reinterpret_cast<const int8_t*>(row + 2);
#if defined(PAGEDLLM_AVX512)
    for (int i = 0; i < 32; i += 16)
      vstore(out + i, vmul(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i)))),
                           vset(scale)));
#elif defined(PAGEDLLM_SIMD)
    for (int i = 0; i < 32; i += 8)
      vstore(out + i, vmul(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)))),
                           vset(scale)));
#else
    for (int i = 0; i < 32; ++i) out[i] = scale * q[i];
#endif
  }
}

// What one task reads and keeps: its queries' positions and slopes, the running softmax, and the
// tiles, all sized for M queries of `dim` values (words hold bfloat16 pairs on that path).
struct TaskBuffers {
  int64_t dim, m;
  std::vector<float> pos, low, slope, peak, tile_peak, total, alpha, out, scores, keys, values, probs, query;
  std::vector<uint32_t> query_words, key_words, value_words, prob_words;

  TaskBuffers(int64_t dim_, int64_t m_, bool bf16) : dim(dim_), m(m_) {
    for (auto* v : {&pos, &low, &slope, &peak, &tile_peak, &total, &alpha}) v->resize(m);
    out.resize(dim * m);
    scores.resize(kKeys * m);
    if (bf16) {
      keys.resize(2 * dim);  // staging: two keys' rows as floats, and their two value rows
      values.resize(2 * dim);
      query_words.resize(dim / 2 * m);
      key_words.resize(kKeys * dim / 2);
      value_words.resize(kKeys / 2 * dim);
      prob_words.resize(kKeys / 2 * m);
    } else {
      keys.resize(kKeys * dim);
      values.resize(kKeys * dim);
      query.resize(dim * m);
      probs.resize(kKeys * m);
    }
  }
};

// ---- float32 products ------------------------------------------------------------------------

// A register tile's scores to scores[i][m0 ..], their maximum over the keys folded into tile_peak[m0 ..].
template <int NV>
inline void store_scores(VecF (&acc)[kRegKeys][NV], float* scores, int64_t m, int64_t m0, float* tile_peak) {
  for (int j = 0; j < NV; ++j) {
    VecF peak = vload(tile_peak + m0 + j * kW);
    for (int i = 0; i < kRegKeys; ++i) {
      vstore(scores + i * m + m0 + j * kW, acc[i][j]);
      peak = vmax(peak, acc[i][j]);
    }
    vstore(tile_peak + m0 + j * kW, peak);
  }
}

// scores[n][m0 ..] for kRegKeys keys (rows of `keys`, dim apart) and NV vectors of queries.
template <int NV>
inline void score_block(const float* query, int64_t m, const float* keys, int64_t dim, float* scores, int64_t m0,
                        float* tile_peak) {
  VecF acc[kRegKeys][NV];
  for (auto& row : acc)
    for (auto& a : row) a = vset(0.f);
  for (int64_t d = 0; d < dim; ++d) {
    VecF q[NV];
    for (int j = 0; j < NV; ++j) q[j] = vload(query + d * m + m0 + j * kW);
    for (int i = 0; i < kRegKeys; ++i) {
      const VecF k = vset(keys[i * dim + d]);
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(q[j], k, acc[i][j]);
    }
  }
  store_scores<NV>(acc, scores, m, m0, tile_peak);
}

// out[d0 + i][m0 ..] = out · α + Σ_n P[n][m] · V[n][d0 + i] for kRegKeys dims; `values` points at column d0.
template <int NV>
inline void value_block(const float* probs, int64_t m, const float* values, int64_t dim, float* out,
                        const float* alpha, int64_t m0) {
  VecF acc[kRegKeys][NV];
  for (int i = 0; i < kRegKeys; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vmul(vload(out + i * m + m0 + j * kW), vload(alpha + m0 + j * kW));
  for (int64_t n = 0; n < kKeys; ++n) {
    VecF p[NV];
    for (int j = 0; j < NV; ++j) p[j] = vload(probs + n * m + m0 + j * kW);
    for (int i = 0; i < kRegKeys; ++i) {
      const VecF v = vset(values[n * dim + i]);
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(p[j], v, acc[i][j]);
    }
  }
  for (int i = 0; i < kRegKeys; ++i)
    for (int j = 0; j < NV; ++j) vstore(out + i * m + m0 + j * kW, acc[i][j]);
}

// Calls block.template operator()<NV>(m0) over the task's query vectors, kRegVecs at a time.
template <typename Block>
inline void over_query_vectors(int64_t m, Block&& block) {
  const int64_t vectors = m / kW;
  int64_t j = 0;
  for (; j + kRegVecs <= vectors; j += kRegVecs) block.template operator()<kRegVecs>(j * kW);
  if (vectors - j == 1) block.template operator()<1>(j * kW);
  if constexpr (kRegVecs > 2) {
    if (vectors - j == 2) block.template operator()<2>(j * kW);
  }
}

struct FloatProducts {
  static constexpr float kUnit = 1.f;  // natural-log scores, e^x: float32 accuracy
  static VecF exp0(VecF x) { return vexp0(x); }
  static void pack_query(TaskBuffers& b, int64_t m, const float* row, float scale) {
    for (int64_t d = 0; d < b.dim; ++d) b.query[d * b.m + m] = row ? row[d] * scale : 0.f;
  }
  // Keys n, n + 1 go straight to their rows of the tile: the float rows are the operands.
  static float* key_pair(TaskBuffers& b, int64_t n) { return b.keys.data() + n * b.dim; }
  static float* value_pair(TaskBuffers& b, int64_t n) { return b.values.data() + n * b.dim; }
  static void put_pair(TaskBuffers&, int64_t) {}
  static void scores(TaskBuffers& b) {
    for (int64_t n = 0; n < kKeys; n += kRegKeys)
      over_query_vectors(b.m, [&]<int NV>(int64_t m0) {
        score_block<NV>(b.query.data(), b.m, b.keys.data() + n * b.dim, b.dim, b.scores.data() + n * b.m, m0,
                        b.tile_peak.data());
      });
  }
  static void store_probs(TaskBuffers& b, int64_t n, int64_t m0, VecF even, VecF odd) {
    vstore(b.probs.data() + n * b.m + m0, even);
    vstore(b.probs.data() + (n + 1) * b.m + m0, odd);
  }
  static void weigh_values(TaskBuffers& b) {
    for (int64_t d = 0; d < b.dim; d += kRegKeys)
      over_query_vectors(b.m, [&]<int NV>(int64_t m0) {
        value_block<NV>(b.probs.data(), b.m, b.values.data() + d, b.dim, b.out.data() + d * b.m, b.alpha.data(), m0);
      });
  }
};

// ---- bfloat16 products (AVX-512 BF16) ----------------------------------------------------------
#if defined(PAGEDLLM_BF16)
inline uint32_t bf16_bits(float x) { return c10::BFloat16(x).x; }  // round to nearest even

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// 16 words, word i = (bfloat16 of even[i]) | (bfloat16 of odd[i]) << 16.
inline __m512i pair_words(__m512 even, __m512 odd) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                              21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even)));
}

template <int NV>
inline void score_block_bf16(const uint32_t* query, int64_t m, const uint32_t* keys, int64_t pairs, float* scores,
                             int64_t m0, float* tile_peak) {
  VecF acc[kRegKeys][NV];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t d = 0; d < pairs; ++d) {
    __m512i q[NV];
    for (int j = 0; j < NV; ++j) q[j] = _mm512_loadu_si512(query + d * m + m0 + j * 16);
    for (int i = 0; i < kRegKeys; ++i) {
      const __m512i k = _mm512_set1_epi32(static_cast<int>(keys[i * pairs + d]));
      for (int j = 0; j < NV; ++j) acc[i][j] = dot_pairs(acc[i][j], q[j], k);
    }
  }
  store_scores<NV>(acc, scores, m, m0, tile_peak);
}

template <int NV>
inline void value_block_bf16(const uint32_t* probs, int64_t m, const uint32_t* values, int64_t dim, float* out,
                             const float* alpha, int64_t m0) {
  __m512 acc[kRegKeys][NV];
  for (int i = 0; i < kRegKeys; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vmul(vload(out + i * m + m0 + j * 16), vload(alpha + m0 + j * 16));
  for (int64_t n = 0; n < kKeys / 2; ++n) {
    __m512i p[NV];
    for (int j = 0; j < NV; ++j) p[j] = _mm512_loadu_si512(probs + n * m + m0 + j * 16);
    for (int i = 0; i < kRegKeys; ++i) {
      const __m512i v = _mm512_set1_epi32(static_cast<int>(values[n * dim + i]));
      for (int j = 0; j < NV; ++j) acc[i][j] = dot_pairs(acc[i][j], p[j], v);
    }
  }
  for (int i = 0; i < kRegKeys; ++i)
    for (int j = 0; j < NV; ++j) vstore(out + i * m + m0 + j * 16, acc[i][j]);
}

struct Bf16Products {
  // Base-2 scores (the queries carry log2 e), 2^x to ~4e-5: the weights are rounded to bfloat16 (2^-9) after.
  static constexpr float kUnit = 1.44269504088896341f;
  static VecF exp0(VecF x) { return exp2_16(x); }
  static void pack_query(TaskBuffers& b, int64_t m, const float* row, float scale) {
    for (int64_t d = 0; d < b.dim / 2; ++d)
      b.query_words[d * b.m + m] = row ? bf16_bits(row[2 * d] * scale) | bf16_bits(row[2 * d + 1] * scale) << 16 : 0;
  }
  // Keys n, n + 1 are staged as floats, then become two bfloat16 key rows and one row of value pairs.
  static float* key_pair(TaskBuffers& b, int64_t) { return b.keys.data(); }
  static float* value_pair(TaskBuffers& b, int64_t) { return b.values.data(); }
  static void put_pair(TaskBuffers& b, int64_t n) {
    const int64_t dim = b.dim;
    for (int64_t i = 0; i < 2 * dim; i += 32)
      _mm512_storeu_si512(b.key_words.data() + n * dim / 2 + i / 2,
                          reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(vload(b.keys.data() + i + 16), vload(b.keys.data() + i))));
    for (int64_t d = 0; d < dim; d += 16)
      _mm512_storeu_si512(b.value_words.data() + n / 2 * dim + d,
                          pair_words(vload(b.values.data() + d), vload(b.values.data() + dim + d)));
  }
  static void scores(TaskBuffers& b) {
    for (int64_t n = 0; n < kKeys; n += kRegKeys)
      over_query_vectors(b.m, [&]<int NV>(int64_t m0) {
        score_block_bf16<NV>(b.query_words.data(), b.m, b.key_words.data() + n * b.dim / 2, b.dim / 2,
                             b.scores.data() + n * b.m, m0, b.tile_peak.data());
      });
  }
  static void store_probs(TaskBuffers& b, int64_t n, int64_t m0, VecF even, VecF odd) {
    _mm512_storeu_si512(b.prob_words.data() + n / 2 * b.m + m0, pair_words(even, odd));
  }
  static void weigh_values(TaskBuffers& b) {
    for (int64_t d = 0; d < b.dim; d += kRegKeys)
      over_query_vectors(b.m, [&]<int NV>(int64_t m0) {
        value_block_bf16<NV>(b.prob_words.data(), b.m, b.value_words.data() + d, b.dim, b.out.data() + d * b.m,
                             b.alpha.data(), m0);
      });
  }
};
#endif

// ---- the task -----------------------------------------------------------------------------------

// Soft-capping, ALiBi and the causal / window mask on a tile's scores, where the layer or the tile needs
// them; the tile's peaks taken again after. `unit`: what a score is in (1, or log2 e for base-2 scores).
inline void modify_scores(TaskBuffers& b, const PrefillArgs& a, int64_t k0, bool mask, float unit) {
  const bool alibi = a.alibi != nullptr, natural = a.softcap > 0.f || alibi;
  std::fill(b.tile_peak.begin(), b.tile_peak.end(), -INFINITY);
  for (int64_t n = 0; n < kKeys; ++n) {
    const VecF key = vset(static_cast<float>(k0 + n));
    for (int64_t m0 = 0; m0 < b.m; m0 += kW) {
      float* at = b.scores.data() + n * b.m + m0;
      VecF s = vload(at);
      const VecF pos = vload(b.pos.data() + m0);
      if (natural) {
        s = vmul(s, vset(1.f / unit));
        if (a.softcap > 0.f) s = vmul(vset(a.softcap), vtanh(vmul(s, vset(1.f / a.softcap))));
        if (alibi) s = vfma(vload(b.slope.data() + m0), vsub(key, pos), s);
        s = vmul(s, vset(unit));
      }
      if (mask) s = visible(s, key, pos, vload(b.low.data() + m0));
      vstore(at, s);
      vstore(b.tile_peak.data() + m0, vmax(vload(b.tile_peak.data() + m0), s));
    }
  }
}

// The online softmax over one tile: new peaks, α = e^(old peak − new), P = e^(S − peak), totals
// (Products::exp0: e^x or 2^x, as the scores' unit is).
template <typename Products>
inline void softmax_tile(TaskBuffers& b) {
  for (int64_t m0 = 0; m0 < b.m; m0 += kW) {
    const float* s = b.scores.data() + m0;
    const VecF old_peak = vload(b.peak.data() + m0), peak = vmax(old_peak, vload(b.tile_peak.data() + m0));
    const VecF ref = vmax(peak, vset(-1e30f));  // a lane with no visible key yet: its P and α are 0
    const VecF alpha = Products::exp0(vsub(old_peak, ref));
    VecF sum = vset(0.f);
    for (int64_t n = 0; n < kKeys; n += 2) {
      const VecF even = Products::exp0(vsub(vload(s + n * b.m), ref));
      const VecF odd = Products::exp0(vsub(vload(s + (n + 1) * b.m), ref));
      sum = vadd(sum, vadd(even, odd));
      Products::store_probs(b, n, m0, even, odd);
    }
    vstore(b.peak.data() + m0, peak);
    vstore(b.alpha.data() + m0, alpha);
    vstore(b.total.data() + m0, vfma(vload(b.total.data() + m0), alpha, sum));
  }
}

// Where key t's row of the task's kv head starts in the pool (its value row is value_offset further).
template <typename T>
inline const T* key_row(const PrefillArgs& a, const int64_t* table, int64_t kv_head, int64_t t) {
  return static_cast<const T*>(a.pool) + ((table[t / a.block_size] * a.block_size + t % a.block_size) * a.kv_heads + kv_head) * a.row;
}

// Keys [k0, k0 + count) of the task's kv head into the tile's operands (Products::put_pair), two at a
// time, zero past count; then the next tile's rows (up to `next` keys) are asked for, so they arrive
// during this one's products.
template <typename T, typename Products>
inline void load_tile(TaskBuffers& b, const PrefillArgs& a, const int64_t* table, int64_t kv_head, int64_t k0,
                      int64_t count, int64_t next) {
  const int64_t value_offset = a.pool_blocks * a.block_size * a.kv_heads * a.row, dim = b.dim;
  for (int64_t n = 0; n < kKeys; n += 2) {
    float *keys = Products::key_pair(b, n), *values = Products::value_pair(b, n);
    for (int64_t i = 0; i < 2; ++i) {
      if (n + i < count) {
        const T* key = key_row<T>(a, table, kv_head, k0 + n + i);
        row_to_floats(key, dim, keys + i * dim);
        row_to_floats(key + value_offset, dim, values + i * dim);
      } else {
        std::fill(keys + i * dim, keys + (i + 1) * dim, 0.f);
        std::fill(values + i * dim, values + (i + 1) * dim, 0.f);
      }
    }
    Products::put_pair(b, n);
  }
  const int64_t row_bytes = a.row * static_cast<int64_t>(sizeof(T));
  for (int64_t n = 0; n < next; ++n) {
    const char* key = reinterpret_cast<const char*>(key_row<T>(a, table, kv_head, k0 + kKeys + n));
    for (int64_t byte = 0; byte < row_bytes; byte += 64) {
      __builtin_prefetch(key + byte);
      __builtin_prefetch(key + value_offset * static_cast<int64_t>(sizeof(T)) + byte);
    }
  }
}

// One task: `rows` new tokens of sequence `seq` from its `row0`-th, kv head `kv_head`'s query group.
template <typename T, typename Products>
void attend_task(const PrefillArgs& a, TaskBuffers& b, int64_t seq, int64_t kv_head, int64_t row0, int64_t rows) {
  const int64_t group = a.heads / a.kv_heads, dim = a.dim, first_token = a.query_start[seq] + row0;
  const int64_t first_pos = a.context_lens[seq] - (a.query_start[seq + 1] - a.query_start[seq]) + row0;
  for (int64_t m = 0; m < b.m; ++m) {  // lanes past rows · group repeat the last row's position, with zero queries
    const int64_t r = std::min(m / group, rows - 1), head = kv_head * group + m % group;
    const bool real = m < rows * group;
    b.pos[m] = static_cast<float>(first_pos + r);
    b.low[m] = a.window > 0 ? b.pos[m] - static_cast<float>(a.window) : -1.f;
    b.slope[m] = a.alibi ? a.alibi[head] : 0.f;
    Products::pack_query(b, m, real ? a.q + ((first_token + r) * a.heads + head) * dim : nullptr,
                         a.scale * Products::kUnit);
  }
  std::fill(b.peak.begin(), b.peak.end(), -INFINITY);
  std::fill(b.total.begin(), b.total.end(), 0.f);
  std::fill(b.out.begin(), b.out.end(), 0.f);
  const int64_t last_pos = first_pos + rows - 1;
  const int64_t first_key = a.window > 0 ? std::max<int64_t>(0, first_pos - a.window + 1) : 0;
  const int64_t* table = a.tables + seq * a.table_stride;
  for (int64_t k0 = first_key / kKeys * kKeys; k0 <= last_pos; k0 += kKeys) {
    load_tile<T, Products>(b, a, table, kv_head, k0, std::min(kKeys, last_pos + 1 - k0),
                 std::clamp<int64_t>(last_pos + 1 - k0 - kKeys, 0, kKeys));
    std::fill(b.tile_peak.begin(), b.tile_peak.end(), -INFINITY);
    Products::scores(b);
    const bool mask = k0 + kKeys - 1 > first_pos || (a.window > 0 && k0 <= last_pos - a.window);
    if (mask || a.softcap > 0.f || a.alibi) modify_scores(b, a, k0, mask, Products::kUnit);
    softmax_tile<Products>(b);
    Products::weigh_values(b);
  }
  for (int64_t m = 0; m < rows * group; ++m) {
    const int64_t head = kv_head * group + m % group;
    float* out = a.out + ((first_token + m / group) * a.heads + head) * dim;
    // A sink (gpt-oss) adds e^(sink − peak) to the denominator; the peak is in the scores' unit.
    const float sink = a.sinks ? std::exp(a.sinks[head] - b.peak[m] / Products::kUnit) : 0.f;
    const float inv = 1.f / (b.total[m] + sink);
    for (int64_t d = 0; d < dim; ++d) out[d] = b.out[d * b.m + m] * inv;
  }
}

// The tasks of `tasks` from the shared counter `next` on, each with this thread's buffers.
template <typename T, typename Products>
void run_tasks(const PrefillArgs& a, const std::vector<PrefillTask>& tasks, int64_t lanes, std::atomic<int64_t>& next) {
  TaskBuffers buffers(a.dim, lanes, !std::is_same_v<Products, FloatProducts>);
  for (int64_t i = next++; i < static_cast<int64_t>(tasks.size()); i = next++) {
    const PrefillTask& t = tasks[i];
    attend_task<T, Products>(a, buffers, t.seq, t.kv_head, t.row0, t.rows);
  }
}

template <typename T>
void prefill_tasks(const PrefillArgs& a, const std::vector<PrefillTask>& tasks, int64_t lanes, bool bf16,
                   std::atomic<int64_t>& next) {
#if defined(PAGEDLLM_BF16)
  if (bf16) return run_tasks<T, Bf16Products>(a, tasks, lanes, next);
#endif
  (void)bf16;
  run_tasks<T, FloatProducts>(a, tasks, lanes, next);
}
