// Would an int8 VNNI GEMM beat torch's bf16 GEMM for the prefill? A throw-away upper bound, not
// engine code: the inner kernel of such a GEMM (weights pre-packed as 16 output rows × 4 k per
// 512-bit register, per-32 block scales and offsets as GGML formats need, activations as uint8
// blocks) on Qwen2.5-0.5B's MLP shapes, one thread, with and without the per-block float work.
// Build and run (AVX-512 VNNI CPUs):
//   g++ -O3 -funroll-loops -march=native -std=c++17 [-DNO_BLOCK_SCALES] benchmarks/int8_gemm_probe.cpp -o /tmp/probe && /tmp/probe
// Compare with torch.mm on bf16 [512, 896] × [896, 4864] at torch.set_num_threads(1).
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

constexpr int kRowsM = 8, kGroupsN = 2;  // the register tile that measured best: 8 rows × 32 outputs

// c[m, n] = Σ_g d[m,g]·s[g,n]·Σ x[m,g,:]·w[g,n,:] + dsum[m,g]·o[g,n] over the K/32 groups g.
void tile(const uint8_t* x, int64_t x_stride, const float* d, const float* dsum, int groups, const int8_t* w,
          const float* s, const float* o, const int32_t* bias, float* c, int64_t c_stride) {
  __m512 acc[kRowsM][kGroupsN];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int g = 0; g < groups; ++g) {
    __m512i dots[kRowsM][kGroupsN];
    for (int j = 0; j < kGroupsN; ++j) {
      const __m512i start = _mm512_loadu_si512(bias + (int64_t(j) * groups + g) * 16);  // −128·Σw: x is stored +128
      for (int i = 0; i < kRowsM; ++i) dots[i][j] = start;
    }
    for (int quad = 0; quad < 8; ++quad) {
      __m512i wv[kGroupsN];
      for (int j = 0; j < kGroupsN; ++j) wv[j] = _mm512_loadu_si512(w + (int64_t(j) * groups + g) * 512 + quad * 64);
      for (int i = 0; i < kRowsM; ++i) {
        const __m512i xv = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x + i * x_stride + g * 32 + quad * 4));
        for (int j = 0; j < kGroupsN; ++j) dots[i][j] = _mm512_dpbusd_epi32(dots[i][j], xv, wv[j]);
      }
    }
    for (int j = 0; j < kGroupsN; ++j) {
#ifdef NO_BLOCK_SCALES
      for (int i = 0; i < kRowsM; ++i) acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_castsi512_ps(dots[i][j]));
#else
      const __m512 sv = _mm512_loadu_ps(s + (int64_t(j) * groups + g) * 16);
      const __m512 ov = _mm512_loadu_ps(o + (int64_t(j) * groups + g) * 16);
      for (int i = 0; i < kRowsM; ++i) {
        const __m512 scale = _mm512_mul_ps(sv, _mm512_set1_ps(d[i * groups + g]));
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[i][j]), scale, acc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(dsum[i * groups + g]), ov, acc[i][j]);
      }
#endif
    }
  }
  for (int i = 0; i < kRowsM; ++i)
    for (int j = 0; j < kGroupsN; ++j) _mm512_storeu_ps(c + i * c_stride + j * 16, acc[i][j]);
}

int main() {
  const int M = 512, N = 4864, K = 896, G = K / 32;
  static_assert(512 % kRowsM == 0 && 4864 % (16 * kGroupsN) == 0, "shapes hold whole tiles");
  std::vector<uint8_t> x(int64_t(M) * K, 7);
  std::vector<int8_t> w(int64_t(N) * K, 3);
  std::vector<float> d(M * G, 0.01f), dsum(M * G, 0.1f), s(N * G, 0.02f), o(N * G, 0.1f), c(int64_t(M) * N);
  std::vector<int32_t> bias(N * G, -1000);
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int n = 0; n < N; n += 16 * kGroupsN)
      for (int m = 0; m < M; m += kRowsM)
        tile(x.data() + int64_t(m) * K, K, d.data() + m * G, dsum.data() + m * G, G, w.data() + int64_t(n) * K,
             s.data() + n * G, o.data() + n * G, bias.data() + n * G, c.data() + int64_t(m) * N + n, N);
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("[%d, %d] x [%d, %d]: %.2f ms, %.0f GOP/s on one thread\n", M, K, K, N, t * 1e3, 2.0 * M * N * K / t / 1e9);
  }
}
