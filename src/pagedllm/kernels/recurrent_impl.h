// The recurrent layers' loops, included once per instruction set (recurrent_layers.cpp): the loops over
// channels and a head's values are written for the compiler to vectorise at that namespace's target.

#include "simd_exp.h"

// x / (1 + e^-x) over n floats in place (SiLU), with the vector exp where the instruction set has one:
// a prefill chunk's convolution takes ~3 million of them a layer.
inline void silu_in_place(float* x, int64_t n) {
  int64_t i = 0;
#if defined(PAGEDLLM_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    _mm512_storeu_ps(x + i, _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
  }
#endif
#if defined(PAGEDLLM_SIMD)
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v)))));
  }
#endif
  for (; i < n; ++i) x[i] = x[i] / (1.f + std::exp(-x[i]));
}

// The sequence that token t belongs to (query_start ascending).
inline int64_t sequence_of(const ConvArgs& a, int64_t seqs, int64_t t) {
  return std::upper_bound(a.query_start, a.query_start + seqs + 1, t) - a.query_start - 1;
}

// Output rows [t0, t1) of the causal convolution: each tap reads the sequence's own earlier input, or
// its remembered one (zeros for a fresh sequence) before its first new token.
inline void conv_rows(const ConvArgs& a, int64_t seqs, int64_t t0, int64_t t1) {
  const int64_t keep = a.taps - 1, n = a.channels;
  std::vector<float> wt(a.taps * n);  // the weights tap-major, so each tap's row vectorises
  for (int64_t c = 0; c < n; ++c)
    for (int64_t j = 0; j < a.taps; ++j) wt[j * n + c] = a.weight[c * a.taps + j];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t s = sequence_of(a, seqs, t), offset = t - a.query_start[s];
    const float* history = a.state + a.slots[s] * keep * n;
    float* out = a.out + t * n;
    for (int64_t c = 0; c < n; ++c) out[c] = a.bias ? a.bias[c] : 0.f;
    for (int64_t j = 0; j < a.taps; ++j) {
      const int64_t back = offset - keep + j;  // the input this tap reads, from the sequence's first new one
      if (back < 0 && a.fresh[s]) continue;
      const float* in = back >= 0 ? a.x + (t - keep + j) * n : history + (keep + back) * n;
      const float* w = wt.data() + j * n;
      for (int64_t c = 0; c < n; ++c) out[c] += in[c] * w[c];
    }
    if (a.silu) silu_in_place(out, n);
  }
}

// Sequence s's history becomes its last taps − 1 inputs: remembered ones shift down past the new ones.
inline void conv_history(const ConvArgs& a, int64_t s) {
  const int64_t keep = a.taps - 1, n = a.channels, count = a.query_start[s + 1] - a.query_start[s];
  float* history = a.state + a.slots[s] * keep * n;
  for (int64_t i = 0; i < keep; ++i) {  // reads row i + count ≥ i + 1: never one already overwritten
    const int64_t from = i + count;
    float* row = history + i * n;
    if (from >= keep) std::copy_n(a.x + (a.query_start[s] + from - keep) * n, n, row);
    else if (a.fresh[s]) std::fill(row, row + n, 0.f);
    else std::copy_n(history + from * n, n, row);
  }
}

// The causal convolution's step for channels [c0, c1) of sequence s: out = SiLU(Σ taps · inputs), the
// input appended to the remembered ones (the oldest dropped).
inline void conv_step(const DeltaNetArgs& a, int64_t s, int64_t c0, int64_t c1, float* out) {
  const float* x = a.proj + s * a.proj_stride;
  float* history = a.conv_state + a.slots[s] * (a.taps - 1) * a.channels;
  const bool fresh = a.fresh[s];
  for (int64_t c = c0; c < c1; ++c) {
    const float* w = a.conv_weight + c * a.taps;
    float acc = x[c] * w[a.taps - 1];
    for (int64_t j = 0; j < a.taps - 1; ++j) {
      const float h = fresh ? 0.f : history[j * a.channels + c];
      acc += h * w[j];
      if (j > 0) history[(j - 1) * a.channels + c] = h;
    }
    history[(a.taps - 2) * a.channels + c] = x[c];
    out[c - c0] = acc;
  }
  silu_in_place(out, c1 - c0);
}

inline void l2_normalise(float* x, int64_t n, float scale) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float f = scale / std::sqrt(sum + 1e-6f);
  for (int64_t i = 0; i < n; ++i) x[i] *= f;
}

// Sequence s's q and k of key head g, convolved and l2-normalised (q also scaled by 1/√dk), into q and k.
inline void key_head(const DeltaNetArgs& a, int64_t s, int64_t g, float* q, float* k) {
  const int64_t dk = a.key_dim, keys = a.key_heads * dk;
  conv_step(a, s, g * dk, (g + 1) * dk, q);
  conv_step(a, s, keys + g * dk, keys + (g + 1) * dk, k);
  l2_normalise(q, dk, 1.f / std::sqrt(static_cast<float>(dk)));
  l2_normalise(k, dk, 1.f);
}

// Value head h of sequence s: its convolved values, the delta rule's step on its state matrix [dk, dv]
// (read and written in place, two passes), and the output RMS-normalised and gated by SiLU(z).
inline void value_head(const DeltaNetArgs& a, int64_t s, int64_t h, const float* q, const float* k, float* v,
                       float* o) {
  const int64_t dk = a.key_dim, dv = a.value_dim, keys = a.key_heads * dk;
  conv_step(a, s, 2 * keys + h * dv, 2 * keys + (h + 1) * dv, v);
  const float* row = a.proj + s * a.proj_stride;
  const float alpha = row[a.channels + a.value_heads * dv + a.value_heads + h] + a.dt_bias[h];
  const float softplus = alpha > 20.f ? alpha : std::log1p(std::exp(alpha));
  const float decay = std::exp(-std::exp(a.a_log[h]) * softplus);
  const float beta = 1.f / (1.f + std::exp(-row[a.channels + a.value_heads * dv + h]));
  float* state = a.matrices + (a.slots[s] * a.value_heads + h) * dk * dv;
  if (a.fresh[s]) std::fill(state, state + dk * dv, 0.f);
  for (int64_t j = 0; j < dv; ++j) o[j] = 0.f;  // first Sᵀk of the decayed state, into o
  for (int64_t i = 0; i < dk; ++i) {
    float* si = state + i * dv;
    const float ki = k[i];
    for (int64_t j = 0; j < dv; ++j) {
      si[j] *= decay;
      o[j] += si[j] * ki;
    }
  }
  for (int64_t j = 0; j < dv; ++j) v[j] = (v[j] - o[j]) * beta;  // the correction δ
  for (int64_t j = 0; j < dv; ++j) o[j] = 0.f;
  for (int64_t i = 0; i < dk; ++i) {  // S += k ⊗ δ, then Sᵀq
    float* si = state + i * dv;
    const float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < dv; ++j) {
      si[j] += ki * v[j];
      o[j] += si[j] * qi;
    }
  }
  float sum = 0.f;
  for (int64_t j = 0; j < dv; ++j) sum += o[j] * o[j];
  const float inv = 1.f / std::sqrt(sum / dv + a.eps);
  const float* z = row + a.channels + h * dv;
  for (int64_t j = 0; j < dv; ++j) o[j] = o[j] * inv * a.norm_weight[j] * (z[j] / (1.f + std::exp(-z[j])));
}

// Tasks are (sequence, key head): the key head's q and k once, then each of its value heads.
inline void delta_net_tasks(const DeltaNetArgs& a, int64_t t0, int64_t t1) {
  std::vector<float> q(a.key_dim), k(a.key_dim), v(a.value_dim);
  const int64_t per_group = a.value_heads / a.key_heads;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t s = t / a.key_heads, g = t % a.key_heads;
    key_head(a, s, g, q.data(), k.data());
    for (int64_t r = 0; r < per_group; ++r) {
      const int64_t h = a.tiled ? r * a.key_heads + g : g * per_group + r;
      value_head(a, s, h, q.data(), k.data(), v.data(), a.out + s * a.value_heads * a.value_dim + h * a.value_dim);
    }
  }
}
