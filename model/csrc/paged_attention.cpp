// Decode attention over a paged KV cache, read where it lies (no gather copy, no mask).
//
// One new query token per row attends to positions [0, seq_len) of its sequence, whose keys and values
// sit in cache slots block_tables[row][pos / block_size] * block_size + pos % block_size. Work is split
// over (row, kv head, span of the context), flash-decoding style, so one long sequence still uses every
// thread; each split keeps an online softmax (running max, sum, weighted values) in float32, and the
// splits of a (row, kv head) are merged at the end. All query heads that share a kv head (GQA) are
// served by one pass over its keys and values: each key and value row is widened to float32 once, then
// used by every query head of the group, and the softmax's exponentials are computed eight at a time.
//
// Built at run time by model/attention.py with torch.utils.cpp_extension (-O3 -march=native), so the
// inner loops vectorize for the machine that runs them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }

inline float load(const double* p, int64_t i) { return static_cast<float>(p[i]); }

inline float load(const c10::BFloat16* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

// One cache row (a key or a value of one head) as float32.
template <typename T>
inline void widen_row(const T* src, float* dst, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = load(src, d);
}
#ifdef __AVX2__
template <>
inline void widen_row(const c10::BFloat16* src, float* dst, int64_t dim) {
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
    _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
  }
  for (; d < dim; ++d) dst[d] = load(src, d);
}
#endif

// x[i] = exp(x[i]) for x[i] <= 0 (scores minus their running maximum). AVX2: Cephes' expf (range
// reduction by ln 2, a degree-6 polynomial, the exponent put back by integer arithmetic), within 2 ulp.
// A NaN stays NaN (the clamp's operand order keeps it), as in exact attention: a NaN key must reach the
// output, so that the request fails instead of attending as if that key were not there.
// Its constants, shared by the AVX2 loop and the AVX-512 path (exp16).
namespace cephes_exp {
constexpr float kLow = -87.3f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace cephes_exp

inline void exp_nonpositive(float* x, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  using namespace cephes_exp;
  const __m256 lo = _mm256_set1_ps(kLow), log2e = _mm256_set1_ps(kLog2e);
  const __m256 ln2_hi = _mm256_set1_ps(kLn2Hi), ln2_lo = _mm256_set1_ps(kLn2Lo);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_max_ps(lo, _mm256_loadu_ps(x + i));  // NaN in the second operand is returned
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm256_fnmadd_ps(fx, ln2_lo, _mm256_fnmadd_ps(fx, ln2_hi, v));
    __m256 p = _mm256_set1_ps(kPoly[0]);
    for (int c = 1; c < 6; ++c) p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(kPoly[c]));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, v), v, _mm256_add_ps(v, one));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    _mm256_storeu_ps(x + i, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2)));
  }
#endif
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

// Ask for the next block's keys and values of one head while this block is being computed: blocks sit
// anywhere in the cache, so the hardware prefetcher cannot guess the next one.
template <typename T>
inline void prefetch_block(const T* kp, const T* vp, int64_t first, int64_t n, int64_t cache_stride,
                           int64_t head_offset, int64_t dim) {
#ifdef __AVX2__
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
  for (int64_t j = 0; j < n; ++j) {
    const char* k = reinterpret_cast<const char*>(kp + (first + j) * cache_stride + head_offset);
    const char* v = reinterpret_cast<const char*>(vp + (first + j) * cache_stride + head_offset);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(k + b, _MM_HINT_T0), _mm_prefetch(v + b, _MM_HINT_T0);
  }
#endif
}

// scores[g * stride + j] = q_g . keys[j] for the group's query heads and a block's n widened keys.
// AVX2, dim a multiple of 8: four keys at a time per query head, reduced together.
inline void block_scores(const float* q, const float* keys, int64_t n, int64_t group, int64_t dim,
                         float* scores, int64_t stride) {
#ifdef __AVX2__
  if (dim % 8 == 0) {
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      for (int64_t j0 = 0; j0 < n; j0 += 4) {
        const int64_t here = std::min<int64_t>(4, n - j0);
        const float* k[4];
        for (int64_t t = 0; t < 4; ++t) k[t] = keys + (j0 + std::min(t, here - 1)) * dim;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < dim; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qg + d);
          a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[0] + d), a0);
          a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[1] + d), a1);
          a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[2] + d), a2);
          a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[3] + d), a3);
        }
        const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        float sums[4];
        _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
        for (int64_t t = 0; t < here; ++t) scores[g * stride + j0 + t] = sums[t];
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g)
    for (int64_t j = 0; j < n; ++j) {
      float dot = 0.0f;
      for (int64_t d = 0; d < dim; ++d) dot += q[g * dim + d] * keys[j * dim + d];
      scores[g * stride + j] = dot;
    }
}

// acc_g += sum_j p[g * stride + j] * values[j] for the group's query heads and a block's n widened
// values. AVX2, dim a multiple of 8: 64 features of an accumulator stay in registers over the block.
inline void block_values(const float* p, const float* values, int64_t n, int64_t group, int64_t dim,
                         float* acc, int64_t stride) {
  int64_t d0 = 0;
#ifdef __AVX2__
  if (dim % 8 == 0) {
    for (; d0 + 64 <= dim; d0 += 64)
      for (int64_t g = 0; g < group; ++g) {
        float* ag = acc + g * dim + d0;
        __m256 a[8];
        for (int v = 0; v < 8; ++v) a[v] = _mm256_loadu_ps(ag + 8 * v);
        for (int64_t j = 0; j < n; ++j) {
          const __m256 pj = _mm256_set1_ps(p[g * stride + j]);
          const float* vj = values + j * dim + d0;
          for (int v = 0; v < 8; ++v) a[v] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * v), a[v]);
        }
        for (int v = 0; v < 8; ++v) _mm256_storeu_ps(ag + 8 * v, a[v]);
      }
    for (; d0 < dim; d0 += 8)
      for (int64_t g = 0; g < group; ++g) {
        __m256 a = _mm256_loadu_ps(acc + g * dim + d0);
        for (int64_t j = 0; j < n; ++j)
          a = _mm256_fmadd_ps(_mm256_set1_ps(p[g * stride + j]), _mm256_loadu_ps(values + j * dim + d0), a);
        _mm256_storeu_ps(acc + g * dim + d0, a);
      }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] += p[g * stride + j] * values[j * dim + d];
}

#ifdef __AVX512F__
// The same attention on AVX-512, for a float32 cache, and for a bfloat16 one where the CPU has bfloat16 dot
// products (AVX512-BF16); head_dim a multiple of Lanes<T>::dot. Scores come sixteen keys at a time: each
// key's dot product with a query head is one instruction per 16 float32 or 32 bfloat16 features (nothing
// widened), and the sixteen sums are reduced together into one vector of scores, on which the softmax then
// runs sixteen lanes wide. Values are widened once per key and added into the accumulators of up to four
// query heads held in registers. (Shipped model's heads, bfloat16, per layer: 236 to 118-124 us at 32 rows
// x 192 positions, 161 to 80-93 us at one row x 4,096, against the AVX2 loop.)
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int64_t dot = 16;  // features per dot-product instruction
  using Query = __m512;
  static Query query(const float* q) { return _mm512_loadu_ps(q); }
  static __m512 dot_add(__m512 acc, Query q, const float* k) { return _mm512_fmadd_ps(q, _mm512_loadu_ps(k), acc); }
  static __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
};
#ifdef __AVX512BF16__
template <>
struct Lanes<c10::BFloat16> {
  static constexpr int64_t dot = 32;
  using Query = __m512bh;
  static Query query(const c10::BFloat16* q) { return (__m512bh)_mm512_loadu_si512(q); }
  static __m512 dot_add(__m512 acc, Query q, const c10::BFloat16* k) {
    return _mm512_dpbf16_ps(acc, q, (__m512bh)_mm512_loadu_si512(k));
  }
  static __m512 widen16(const c10::BFloat16* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
};
#endif
template <typename T, typename = void>
constexpr bool kLanes = false;
template <typename T>
constexpr bool kLanes<T, std::void_t<decltype(Lanes<T>::dot)>> = true;

// exp_nonpositive, sixteen lanes at a time (same constants, same NaN rule).
inline __m512 exp16(__m512 x) {
  using namespace cephes_exp;
  __m512 v = _mm512_max_ps(_mm512_set1_ps(kLow), x);  // NaN in the second operand is returned
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(kLog2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  v = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Lo), _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Hi), v));
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int c = 1; c < 6; ++c) p = _mm512_fmadd_ps(p, v, _mm512_set1_ps(kPoly[c]));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, v), v, _mm512_add_ps(v, _mm512_set1_ps(1.0f)));
  const __m512i pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(pow2));
}

// Lane j of the result: the sum of v[j]'s sixteen lanes.
inline __m512 sum16(const __m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, 0x88), _mm512_shuffle_f32x4(y0, y1, 0xDD));
}

// acc[g][d0 .. d0 + 16 D) += sum_j p[g][j] * values[j][d0 ..] for G query heads: the accumulators stay in
// registers over the n keys, each value widened once for all G heads.
template <int G, int D, typename T>
inline void add_values(const float* p, const T* const* vrows, int64_t n, int64_t d0, float* acc, int64_t dim) {
  __m512 a[G][D];
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < D; ++t) a[g][t] = _mm512_loadu_ps(acc + g * dim + d0 + 16 * t);
  for (int64_t j = 0; j < n; ++j) {
    __m512 v[D];
    for (int t = 0; t < D; ++t) v[t] = Lanes<T>::widen16(vrows[j] + d0 + 16 * t);
    for (int g = 0; g < G; ++g) {
      const __m512 pj = _mm512_set1_ps(p[g * 16 + j]);
      for (int t = 0; t < D; ++t) a[g][t] = _mm512_fmadd_ps(pj, v[t], a[g][t]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < D; ++t) _mm512_storeu_ps(acc + g * dim + d0 + 16 * t, a[g][t]);
}

template <int G, typename T>
inline void add_values_heads(const float* p, const T* const* vrows, int64_t n, float* acc, int64_t dim) {
  int64_t d0 = 0;
  for (; d0 + 64 <= dim; d0 += 64) add_values<G, 4>(p, vrows, n, d0, acc, dim);
  switch ((dim - d0) / 16) {  // dim is a multiple of 16
    case 3: add_values<G, 3>(p, vrows, n, d0, acc, dim); break;
    case 2: add_values<G, 2>(p, vrows, n, d0, acc, dim); break;
    case 1: add_values<G, 1>(p, vrows, n, d0, acc, dim); break;
  }
}

// One task (a row's kv head over positions [lo, hi)): its group's running max m, sum l and weighted
// values acc, as the general loop computes them.
template <typename T>
void attend_avx512(const T* qrow, const T* kp, const T* vp, const int32_t* table, int64_t lo, int64_t hi,
                   int64_t block_size, int64_t cache_stride, int64_t head_offset, int64_t group, int64_t dim,
                   float scale, float* m, float* l, float* acc) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const T* krows[16];
  const T* vrows[16];
  alignas(64) float probs[8 * 16];
  for (int64_t start = lo; start < hi;) {
    // Up to sixteen keys that share a block.
    const int64_t in_block = start % block_size;
    const int64_t n = std::min<int64_t>({16, hi - start, block_size - in_block});
    const int64_t first = static_cast<int64_t>(table[start / block_size]) * block_size + in_block;
    // Lanes past a short run of keys repeat its first (and are masked): the sixteen sums stay in registers.
    for (int64_t j = 0; j < 16; ++j) {
      const int64_t slot = first + (j < n ? j : 0);
      krows[j] = kp + slot * cache_stride + head_offset;
      vrows[j] = vp + slot * cache_stride + head_offset;
    }
    if (const int64_t next = start + n; next < hi) {
      const int64_t slot = static_cast<int64_t>(table[next / block_size]) * block_size + next % block_size;
      prefetch_block(kp, vp, slot, std::min<int64_t>({16, hi - next, block_size - next % block_size}),
                     cache_stride, head_offset, dim);
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t g0 = 0; g0 < group; g0 += 8) {
      const int64_t heads = std::min<int64_t>(8, group - g0);
      for (int64_t gi = 0; gi < heads; ++gi) {
        const int64_t g = g0 + gi;
        const T* qg = qrow + g * dim;
        __m512 part[16];
        for (int j = 0; j < 16; ++j) part[j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < dim; c += Lanes<T>::dot) {
          const auto qc = Lanes<T>::query(qg + c);
          for (int j = 0; j < 16; ++j) part[j] = Lanes<T>::dot_add(part[j], qc, krows[j] + c);
        }
        __m512 sc = _mm512_mask_blend_ps(valid, _mm512_set1_ps(neg_inf),
                                         _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale)));
        // The running maximum is NaN once any score is (see exp_nonpositive).
        const bool nan = _mm512_mask_cmp_ps_mask(valid, sc, sc, _CMP_UNORD_Q) != 0 || std::isnan(m[g]);
        const float best = nan ? std::numeric_limits<float>::quiet_NaN()
                               : std::max(m[g], _mm512_reduce_max_ps(sc));
        const float alpha = std::exp(m[g] - best);  // exp(-inf) = 0 on the first keys
        const __m512 pr = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(best))));
        _mm512_store_ps(probs + gi * 16, pr);
        l[g] = l[g] * alpha + _mm512_reduce_add_ps(pr);
        m[g] = best;
        float* ag = acc + g * dim;
        const __m512 al = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < dim; d += 16) _mm512_storeu_ps(ag + d, _mm512_mul_ps(al, _mm512_loadu_ps(ag + d)));
      }
      for (int64_t gi = 0; gi < heads; gi += 4) {
        float* ag = acc + (g0 + gi) * dim;
        const float* pg = probs + gi * 16;
        switch (std::min<int64_t>(4, heads - gi)) {
          case 4: add_values_heads<4>(pg, vrows, n, ag, dim); break;
          case 3: add_values_heads<3>(pg, vrows, n, ag, dim); break;
          case 2: add_values_heads<2>(pg, vrows, n, ag, dim); break;
          default: add_values_heads<1>(pg, vrows, n, ag, dim); break;
        }
      }
    }
    start += n;
  }
}
#endif

constexpr int64_t kSplitTokens = 512;  // context span per task: long rows are split over threads

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size, double scale,
            at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads, width = block_tables.size(1);
  const int64_t cache_stride = k_cache.stride(0), head_stride = k_cache.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  T* op = out.data_ptr<T>();

  int64_t max_len = 0;
  for (int64_t r = 0; r < rows; ++r) max_len = std::max<int64_t>(max_len, lens[r]);
  const int64_t span = std::max<int64_t>(block_size, kSplitTokens / block_size * block_size);
  const int64_t splits = std::max<int64_t>(1, (max_len + span - 1) / span);
  // Per (row, kv head, split, query head in group): running max, sum and the weighted value sum.
  const int64_t part = dim + 2;
  std::vector<float> partial(rows * kv_heads * splits * group * part);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, rows * kv_heads * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), scores(group * block_size), acc(group * dim), m(group), l(group);
    std::vector<float> keys(block_size * dim), values(block_size * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / (kv_heads * splits), h = task / splits % kv_heads, s = task % splits;
      const int64_t len = lens[r], lo = s * span, hi = std::min(len, lo + span);
      float* res = partial.data() + task * group * part;
      if (lo >= hi) {
        for (int64_t g = 0; g < group; ++g) res[g * part] = neg_inf, res[g * part + 1] = 0.0f;
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.0f);
      bool done = false;
#ifdef __AVX512F__
      if constexpr (kLanes<T>)
        if (dim % Lanes<T>::dot == 0) {
          attend_avx512(qp + (r * heads + h * group) * dim, kp, vp, tables + r * width, lo, hi, block_size,
                      cache_stride, h * head_stride, group, dim, static_cast<float>(scale), m.data(), l.data(),
                      acc.data());
          done = true;
        }
#endif
      if (!done) {
        for (int64_t g = 0; g < group; ++g)
          for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = load(qp, (r * heads + h * group + g) * dim + d) * scale;
        for (int64_t start = lo; start < hi; start += block_size) {
          const int64_t block = tables[r * width + start / block_size];
          const int64_t n = std::min(block_size, hi - start);
          const int64_t first = block * block_size + start % block_size;
          if (start + block_size < hi) prefetch_block(kp, vp, tables[r * width + start / block_size + 1] * block_size,
                                                      std::min(block_size, hi - start - block_size), cache_stride,
                                                      h * head_stride, dim);
          // The block's keys and values, widened once for every query head of the group.
          for (int64_t j = 0; j < n; ++j) {
            widen_row(kp + (first + j) * cache_stride + h * head_stride, keys.data() + j * dim, dim);
            widen_row(vp + (first + j) * cache_stride + h * head_stride, values.data() + j * dim, dim);
          }
          block_scores(qf.data(), keys.data(), n, group, dim, scores.data(), block_size);
          for (int64_t g = 0; g < group; ++g) {
            float* sg = scores.data() + g * block_size;
            float best = m[g];  // NaN once any score is NaN (std::max would drop it): see exp_nonpositive
            for (int64_t j = 0; j < n; ++j) best = std::isnan(sg[j]) || sg[j] > best ? sg[j] : best;
            const float alpha = std::exp(m[g] - best);  // exp(-inf) = 0 on the first block
            for (int64_t j = 0; j < n; ++j) sg[j] -= best;
            exp_nonpositive(sg, n);
            float sum = l[g] * alpha;
            for (int64_t j = 0; j < n; ++j) sum += sg[j];
            float* ag = acc.data() + g * dim;
            for (int64_t d = 0; d < dim; ++d) ag[d] *= alpha;
            m[g] = best;
            l[g] = sum;
          }
          block_values(scores.data(), values.data(), n, group, dim, acc.data(), block_size);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        res[g * part] = m[g];
        res[g * part + 1] = l[g];
        std::copy(acc.begin() + g * dim, acc.begin() + (g + 1) * dim, res + g * part + 2);
      }
    }
  });

  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> total(dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / heads, h = i % heads / group, g = i % group;
      const float* base = partial.data() + ((r * kv_heads + h) * splits) * group * part + g * part;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < splits; ++s) {  // a split whose maximum is NaN makes the whole row NaN
        const float m = base[s * group * part];
        best = std::isnan(m) || m > best ? m : best;
      }
      std::fill(total.begin(), total.end(), 0.0f);
      float sum = 0.0f;
      if (best != -std::numeric_limits<float>::infinity()) {
        for (int64_t s = 0; s < splits; ++s) {
          const float* p = base + s * group * part;
          const float w = std::exp(p[0] - best);
          sum += w * p[1];
          for (int64_t d = 0; d < dim; ++d) total[d] += w * p[2 + d];
        }
      }
      const float inv = sum == 0.0f ? 0.0f : 1.0f / sum;  // an empty (padded) row attends to nothing
      for (int64_t d = 0; d < dim; ++d) op[i * dim + d] = static_cast<T>(total[d] * inv);
    }
  });
}

// cache[slots[i]] = rows[i]: a copy per row where both are laid out plainly (two dispatcher calls of
// index_copy_ a layer cost more than the copies at decode sizes), else index_copy_.
void write_cache(at::Tensor& cache, const at::Tensor& slots, const at::Tensor& rows) {
  const int64_t n = slots.numel(), row = cache.size(1) * cache.size(2);
  const bool plain = rows.dim() == 3 && rows.scalar_type() == cache.scalar_type() && rows.size(1) == cache.size(1) &&
                     rows.size(2) == cache.size(2) && rows.stride(2) == 1 && rows.stride(1) == rows.size(2) &&
                     cache.stride(0) == row && cache.stride(1) == cache.size(2) && cache.stride(2) == 1 &&
                     slots.scalar_type() == at::kLong && slots.dim() == 1 && rows.size(0) == n;
  if (!plain) {
    cache.index_copy_(0, slots, rows);
    return;
  }
  const at::Tensor index = slots.contiguous();
  const int64_t* slot = index.data_ptr<int64_t>();
  const int64_t slots_in_cache = cache.size(0), bytes = row * static_cast<int64_t>(cache.element_size());
  char* dst = static_cast<char*>(cache.data_ptr());
  const char* src = static_cast<const char*>(rows.data_ptr());
  const int64_t src_stride = rows.stride(0) * static_cast<int64_t>(rows.element_size());
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(slot[i] >= 0 && slot[i] < slots_in_cache, "cache slot ", slot[i], " is out of range");
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + slot[i] * bytes, src + i * src_stride, bytes);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be [rows, heads, head_dim]");
  TORCH_CHECK(k_cache.stride(2) == 1 && v_cache.strides() == k_cache.strides(), "cache layout mismatch");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables and seq_lens must be int32");
  write_cache(k_cache, slot_mapping, k);
  write_cache(v_cache, slot_mapping, v);
  at::Tensor query = q.contiguous(), tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  at::Tensor out = at::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode<scalar_t>(query, k_cache, v_cache, tables, lens, block_size, scale, out);
  });
  return out;
}

}  // namespace

// The op's schema is defined in model/attention.py; this is its CPU implementation, called by the
// dispatcher with no Python in between (a compiled decode step calls it once per layer).
TORCH_LIBRARY_IMPL(tinyserve, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
