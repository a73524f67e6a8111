// y = x @ w.T (+ b) for the rows of a decode step: every weight read once, every output row computed alike.
// On a CPU with AVX-512 the model's projections run on packed weights instead (`packed_linear`, at the end
// of this file); the row-by-row walk below serves the rest (AVX2 CPUs, odd shapes).
//
// At decode batch sizes a linear layer is a stream of its weight. The kernel walks the weight one row
// after the next (or, from four input rows on, two rows at a time) and multiplies each with the input
// rows, two at a time, while it sits in L1.
// Weights may be float32, bfloat16 or int8 (with a float32 scale per row, model/quantization.py); they
// are widened to float32 in registers, so a bfloat16 model streams half the bytes and an int8 one a
// quarter, on any CPU, including those without bfloat16 arithmetic (where torch's own bfloat16 products
// are slow). bfloat16 is widened without shuffles: a 32-bit lane holds two bfloat16 values, a shift
// gives the even one and a mask the odd one, and the input row is permuted once per call to match.
// Where the CPU multiplies bfloat16 itself (AVX512-BF16, which AMX CPUs also have), bfloat16 input
// against bfloat16 weights takes its dot-product instruction instead: 32 weights an instruction, none
// widened (the projections of a shipped-model step took 0.72-0.78x the time at 2, 8 and 32 rows).
// Accumulation is in float32, and each output is summed in the same order whatever the number of rows,
// the tile it falls in or the number of threads: a row's result does not depend on what shares its batch.
// Above `kMaxRows` rows (prefill) the product is compute-bound and at::linear (MKL / oneDNN) takes over;
// for int8 weights, one L2-sized tile of rows at a time is widened and multiplied, so no float copy of
// the whole weight is ever made.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// The largest decode step the kernel serves; it beats at::linear on widened weights up to here.
constexpr int64_t kMaxRows = 64;

// Whether this CPU has bfloat16 arithmetic (the kernel is built with -march=native). Without it, torch's
// bfloat16 matrix products are many times slower than float32 ones, so larger batches widen the weight.
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
constexpr bool kNativeBf16 = true;
#else
constexpr bool kNativeBf16 = false;
#endif

inline float widen(float x) { return x; }
inline float widen(int8_t x) { return static_cast<float>(x); }
inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Within each full block of 16 features, bfloat16 weights are widened as (even, odd) halves, so the
// input row is stored in that order too; other weight types keep the natural order.
template <typename T>
constexpr bool kEvenOdd = std::is_same_v<T, c10::BFloat16>;

#ifdef __AVX2__
// Sixteen weights as two float32 vectors, in the order `kEvenOdd<T>` says.
inline void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}
inline void load16(const c10::BFloat16* p, __m256& a, __m256& b) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline void load16(const int8_t* p, __m256& a, __m256& b) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(raw, raw)));
}
// The sum of a's eight lanes, always added in the same tree.
inline float hsum(__m256 a) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}
#endif

// out[r][j] = dot(x row r, weight row w[j]) for W weight rows and R input rows (W * R <= 4). Every
// output is summed in one order, whatever tile computes it: two float32 accumulators take the first
// and the second half of each 16-feature block (bfloat16 blocks in even/odd order; two independent
// chains keep the FMA units busy when one weight row streams alone), then the lanes of their sum in
// one tree, then the leftover features in order. A row's result therefore does not depend on the
// batch around it, the tile it falls in or the number of threads.
template <int W, int R, typename T>
inline void tile(const float* const* x, const T* const* w, int64_t k, float out[][W]) {
  int64_t d = 0;
  float sums[R][W];
#ifdef __AVX2__
  __m256 lo[R][W], hi[R][W];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) lo[r][j] = hi[r][j] = _mm256_setzero_ps();
  for (; d + 16 <= k; d += 16) {
    __m256 xa[R], xb[R];
    for (int r = 0; r < R; ++r) xa[r] = _mm256_loadu_ps(x[r] + d), xb[r] = _mm256_loadu_ps(x[r] + d + 8);
    for (int j = 0; j < W; ++j) {
      __m256 wa, wb;
      load16(w[j] + d, wa, wb);
      for (int r = 0; r < R; ++r) {
        lo[r][j] = _mm256_fmadd_ps(xa[r], wa, lo[r][j]);
        hi[r][j] = _mm256_fmadd_ps(xb[r], wb, hi[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) sums[r][j] = hsum(_mm256_add_ps(lo[r][j], hi[r][j]));
#else
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) sums[r][j] = 0.f;
#endif
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) {
      float s = sums[r][j];
      for (int64_t e = d; e < k; ++e) s += x[r][e] * widen(w[j][e]);
      out[r][j] = s;
    }
}

#ifdef __AVX512BF16__
// The same product for bfloat16 input against bfloat16 weights on a CPU with bfloat16 dot products
// (AVX512-BF16): each instruction multiplies 32 weights with 32 inputs in pairs and adds the products to
// 16 float32 sums, so nothing is widened and the input is used as it is. Also in one order whatever the
// tile: two accumulators take the first and second half of each 64-feature block (a leftover 32-block
// goes to the first), then the lanes of their sum in one tree, then the leftover features in order.
template <int W, int R>
inline void tile(const c10::BFloat16* const* x, const c10::BFloat16* const* w, int64_t k, float out[][W]) {
  __m512 lo[R][W], hi[R][W];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) lo[r][j] = hi[r][j] = _mm512_setzero_ps();
  const auto load = [](const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  int64_t d = 0;
  for (; d + 64 <= k; d += 64) {
    __m512bh xa[R], xb[R];
    for (int r = 0; r < R; ++r) xa[r] = load(x[r] + d), xb[r] = load(x[r] + d + 32);
    for (int j = 0; j < W; ++j) {
      const __m512bh wa = load(w[j] + d), wb = load(w[j] + d + 32);
      for (int r = 0; r < R; ++r) {
        lo[r][j] = _mm512_dpbf16_ps(lo[r][j], xa[r], wa);
        hi[r][j] = _mm512_dpbf16_ps(hi[r][j], xb[r], wb);
      }
    }
  }
  if (d + 32 <= k) {
    for (int j = 0; j < W; ++j)
      for (int r = 0; r < R; ++r) lo[r][j] = _mm512_dpbf16_ps(lo[r][j], load(x[r] + d), load(w[j] + d));
    d += 32;
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < W; ++j) {
      float s = _mm512_reduce_add_ps(_mm512_add_ps(lo[r][j], hi[r][j]));
      for (int64_t e = d; e < k; ++e) s += widen(x[r][e]) * widen(w[j][e]);
      out[r][j] = s;
    }
}
#endif

// The input rows as float32 in `buffer`, each full 16-block in the order the weight type is widened in.
template <typename T, typename In>
const float* prepare_input(const In* x, int64_t rows, int64_t k, std::vector<float>& buffer) {
  buffer.resize(rows * k);
  for (int64_t r = 0; r < rows; ++r) {
    const In* src = x + r * k;
    float* dst = buffer.data() + r * k;
    int64_t d = 0;
    if (kEvenOdd<T>)
      for (; d + 16 <= k; d += 16)
        for (int64_t i = 0; i < 8; ++i) dst[d + i] = widen(src[d + 2 * i]), dst[d + 8 + i] = widen(src[d + 2 * i + 1]);
    for (; d < k; ++d) dst[d] = widen(src[d]);
  }
  return buffer.data();
}

// Up to this many input rows the product is a stream of the weight, walked one row after the next.
// Above it the product is bound by arithmetic, and two weight rows at a time share each input load.
// (One row per unit streamed the weight 1.2-2x faster at one input row than four interleaved rows.)
constexpr int64_t kStreamRows = 3;
// How many weight rows ahead to prefetch (into L2: measured faster than into L1 here).
constexpr int64_t kPrefetchRows = 8;

// Weight rows in units of W, from unit `begin` to `end`, against every input row (two per tile): each
// product times its weight row's scale when `scales` is given, plus the bias when given, rounded once
// into y's type. A last unit of fewer than W rows repeats its last row; only the valid outputs are kept.
template <int W, typename X, typename T, typename Out>
void walk(const X* x, const T* w, const float* scales, const float* bias, Out* y, int64_t rows,
          int64_t n_out, int64_t k, int64_t begin, int64_t end) {
  const int64_t unit_bytes = W * k * static_cast<int64_t>(sizeof(T));
  float out[2][W];
  for (int64_t u = begin; u < end; ++u) {
    const int64_t n = u * W, valid = std::min<int64_t>(W, n_out - n);
#ifdef __AVX2__
    if (n + kPrefetchRows + W <= n_out) {
      const char* ahead = reinterpret_cast<const char*>(w + (n + kPrefetchRows) * k);
      for (int64_t b = 0; b < unit_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T1);
    }
#endif
    const T* rw[W];
    for (int64_t j = 0; j < W; ++j) rw[j] = w + (n + std::min<int64_t>(j, valid - 1)) * k;
    for (int64_t r = 0; r < rows; r += 2) {
      const X* rx[2] = {x + r * k, x + std::min(r + 1, rows - 1) * k};
      const int64_t here = std::min<int64_t>(2, rows - r);
      if (here == 2)
        tile<W, 2>(rx, rw, k, out);
      else
        tile<W, 1>(rx, rw, k, out);
      for (int64_t i = 0; i < here; ++i)
        for (int64_t j = 0; j < valid; ++j) {
          float v = scales ? out[i][j] * scales[n + j] : out[i][j];
          if (bias) v += bias[n + j];
          y[(r + i) * n_out + n + j] = static_cast<Out>(v);
        }
    }
  }
}

// y[rows, n_out] = x[rows, k] @ w[n_out, k].T in units of W weight rows (see walk). Threads split the
// units, so each streams its own contiguous share of the weight.
template <int W, typename X, typename T, typename Out>
void gemm_units(const X* x, const T* w, const float* scales, const float* bias, Out* y, int64_t rows,
                int64_t n_out, int64_t k) {
  const int64_t unit_bytes = W * k * static_cast<int64_t>(sizeof(T));
  // Enough units per task that a thread's share is worth waking it for (about 64 KiB of weight).
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(unit_bytes, 1));
  at::parallel_for(0, (n_out + W - 1) / W, grain, [&](int64_t begin, int64_t end) {
    walk<W>(x, w, scales, bias, y, rows, n_out, k, begin, end);
  });
}

template <typename X, typename T, typename Out>
void gemm_rows(const X* x, const T* w, const float* scales, const float* bias, Out* y, int64_t rows,
               int64_t n_out, int64_t k) {
  if (rows <= kStreamRows)
    gemm_units<1>(x, w, scales, bias, y, rows, n_out, k);
  else
    gemm_units<2>(x, w, scales, bias, y, rows, n_out, k);
}

// The streamed product for x (float32 or bfloat16, any leading shape), in x's dtype and shape.
template <typename T>
at::Tensor streamed(const at::Tensor& x, const at::Tensor& weight, const float* scales, int64_t rows,
                    const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1), n_out = weight.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "tinyserve::linear takes float32 or bfloat16 input, not ", x.scalar_type());
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  at::Tensor y = at::empty(shape, x.options());
  if (rows == 0 || n_out == 0) return y;
  const at::Tensor xc = x.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    if (x.scalar_type() == at::kBFloat16) {
      gemm_rows(xc.data_ptr<c10::BFloat16>(), weight.data_ptr<T>(), scales, bp, y.data_ptr<c10::BFloat16>(),
                rows, n_out, k);
      return y;
    }
#endif
  thread_local std::vector<float> buffer;
  const float* xf = x.scalar_type() == at::kFloat
                        ? prepare_input<T>(xc.data_ptr<float>(), rows, k, buffer)
                        : prepare_input<T>(xc.data_ptr<c10::BFloat16>(), rows, k, buffer);
  if (x.scalar_type() == at::kFloat)
    gemm_rows(xf, weight.data_ptr<T>(), scales, bp, y.data_ptr<float>(), rows, n_out, k);
  else
    gemm_rows(xf, weight.data_ptr<T>(), scales, bp, y.data_ptr<c10::BFloat16>(), rows, n_out, k);
  return y;
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1);
  const int64_t rows = k ? x.numel() / k : 0;
  const bool supported = (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) &&
                         weight.is_contiguous() && weight.dim() == 2 &&
                         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
  if (rows > kMaxRows || !supported) {
    if (!kNativeBf16 && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16) {
      const c10::optional<at::Tensor> b = bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : bias;
      return at::linear(x.to(at::kFloat), weight.to(at::kFloat), b).to(at::kBFloat16);
    }
    return at::linear(x, weight, bias);
  }
  if (weight.scalar_type() == at::kFloat) return streamed<float>(x, weight, nullptr, rows, bias);
  return streamed<c10::BFloat16>(x, weight, nullptr, rows, bias);
}

// Rows of int8 weight widened per L2-sized tile: enough output columns per at::mm to run at its speed.
constexpr int64_t kTileBytes = 256 << 10;

at::Tensor small_linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "qweight must be a 2-D int8 tensor");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == qweight.size(0),
              "scales must be float32, one per weight row");
  const int64_t k = x.size(-1), n_out = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == k, "x has ", k, " features but the weight ", qweight.size(1));
  const int64_t rows = k ? x.numel() / k : 0;
  const at::Tensor w = qweight.contiguous(), s = scales.contiguous();
  if (rows <= kMaxRows) return streamed<int8_t>(x, w, s.data_ptr<float>(), rows, bias);
  at::Tensor xf = x.reshape({rows, k}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({rows, n_out}, x.options().dtype(at::kFloat));
  const int64_t tile = std::max<int64_t>(8, kTileBytes / (4 * std::max<int64_t>(k, 1)));
  for (int64_t n = 0; n < n_out; n += tile) {
    const int64_t m = std::min(tile, n_out - n);
    const at::Tensor wf = w.narrow(0, n, m).to(at::kFloat).mul_(s.narrow(0, n, m).unsqueeze(1));
    y.narrow(1, n, m).copy_(at::mm(xf, wf.t()));
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  return y.to(x.scalar_type()).view(shape);
}

#ifdef __AVX512F__
// Weights packed for AVX-512 (`pack_linear`): the weight rows in groups of kGroup outputs; for each step
// of the input features, a group's kGroup outputs' weights side by side: [groups][k / e][kGroup][e]. A step
// is e = 2 features (the pair a bfloat16 dot-product instruction takes) for bfloat16 weights and for int8
// ones that will meet bfloat16 input (`pairs`), else e = 1. One instruction then multiplies a step of an
// input row, broadcast, with sixteen outputs' weights and adds to their sixteen sums: no horizontal sums,
// and four input rows share each weight load (the row-by-row walk above loads a weight per product and
// reduces every output across lanes: bfloat16, 1.7-3.2x slower from four rows on). bfloat16 weights are
// packed only where the CPU has bfloat16 dot products (AVX512-BF16); int8 ones are widened in registers
// (to bfloat16 pairs for bfloat16 input, to float32 for float32 input), each output scaled by its row's
// scale at the end.
constexpr int64_t kGroup = 64;

// Features per step: a pair for bfloat16 input (the dot-product instruction's), else one.
template <typename X>
constexpr int64_t kStep = std::is_same_v<X, c10::BFloat16> ? 2 : 1;

at::Tensor pack_linear(const at::Tensor& weight, bool pairs) {
  const at::ScalarType type = weight.scalar_type();
  const bool even = weight.dim() == 2 && weight.size(1) % 2 == 0;
  const int64_t step = type == at::kBFloat16 || (type == at::kChar && pairs && kNativeBf16 && even) ? 2 : 1;
  const bool packable = (type == at::kFloat || type == at::kChar || (type == at::kBFloat16 && kNativeBf16)) &&
                        weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0 && weight.size(1) % step == 0;
  if (!packable) return at::empty({0}, weight.options());
  const int64_t n = weight.size(0), k = weight.size(1), groups = (n + kGroup - 1) / kGroup;
  at::Tensor padded = at::zeros({groups * kGroup, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({groups, kGroup, k / step, step}).permute({0, 2, 1, 3}).contiguous();
}

// float32 to bfloat16 as c10::BFloat16 rounds (to nearest even; NaN to the canonical quiet NaN).
inline __m256i round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline void store16(float* y, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(y, mask, v); }
inline void store16(c10::BFloat16* y, __mmask16 mask, __m512 v) { _mm256_mask_storeu_epi16(y, mask, round_bf16(v)); }

// acc += one step of an input row (broadcast) times sixteen outputs' weights for that step.
inline __m512 step16(__m512 acc, const float* x, const float* w) {
  return _mm512_fmadd_ps(_mm512_set1_ps(*x), _mm512_loadu_ps(w), acc);
}
inline __m512 step16(__m512 acc, const float* x, const int8_t* w) {
  const __m512 wide = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  return _mm512_fmadd_ps(_mm512_set1_ps(*x), wide, acc);
}
#ifdef __AVX512BF16__
inline __m512bh broadcast_pair(const c10::BFloat16* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}
inline __m512 step16(__m512 acc, const c10::BFloat16* x, const c10::BFloat16* w) {
  return _mm512_dpbf16_ps(acc, broadcast_pair(x), (__m512bh)_mm512_loadu_si512(w));
}
// int8 pairs made bfloat16 pairs in registers (exact: every int8 is a bfloat16).
inline __m512 step16(__m512 acc, const c10::BFloat16* x, const int8_t* w) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
  return _mm512_dpbf16_ps(acc, broadcast_pair(x), _mm512_cvtne2ps_pbh(hi, lo));
}
#endif

// R input rows against one group: every output's sum runs over the input's steps in order, one step at a
// time, whatever R is, so a row's result does not depend on the rows beside it. Then times its row's
// scale (int8), plus its bias, rounded once into y's type.
template <int R, typename X, typename W, typename Out>
inline void packed_group(const X* x, int64_t k, const W* group, const float* scales, const float* bias, Out* y,
                         int64_t n_out, int64_t valid) {
  constexpr int V = kGroup / 16;
  constexpr int64_t e = kStep<X>;
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < k; d += e) {
    const W* w = group + d * kGroup;
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = step16(acc[r][v], x + r * k + d, w + 16 * e * v);
  }
  for (int v = 0; v < V; ++v) {
    const int64_t lanes = std::min<int64_t>(16, valid - 16 * v);
    if (lanes <= 0) break;
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
    const __m512 s = scales ? _mm512_maskz_loadu_ps(mask, scales + 16 * v) : _mm512_setzero_ps();
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      __m512 out = scales ? _mm512_mul_ps(acc[r][v], s) : acc[r][v];
      if (bias) out = _mm512_add_ps(out, b);
      store16(y + r * n_out + 16 * v, mask, out);
    }
  }
}

// y = x @ w.T for `rows` input rows, group after group of outputs (threads split the groups); `group_of(g)`
// gives group g's packed weights.
template <typename X, typename Out, typename GroupOf>
void packed_rows(const X* x, GroupOf group_of, const float* scales, const float* bias, Out* y, int64_t rows,
                 int64_t n_out, int64_t k) {
  at::parallel_for(0, (n_out + kGroup - 1) / kGroup, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const auto* group = group_of(g);
      const float* gs = scales ? scales + g * kGroup : nullptr;
      const float* gb = bias ? bias + g * kGroup : nullptr;
      Out* out = y + g * kGroup;
      const int64_t valid = std::min(kGroup, n_out - g * kGroup);
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) packed_group<4>(x + r * k, k, group, gs, gb, out + r * n_out, n_out, valid);
      switch (rows - r) {
        case 3: packed_group<3>(x + r * k, k, group, gs, gb, out + r * n_out, n_out, valid); break;
        case 2: packed_group<2>(x + r * k, k, group, gs, gb, out + r * n_out, n_out, valid); break;
        case 1: packed_group<1>(x + r * k, k, group, gs, gb, out + r * n_out, n_out, valid); break;
      }
    }
  });
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& scales,
                         const c10::optional<at::Tensor>& bias, int64_t n_out) {
  const bool int8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(int8 ? (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16)
                   : x.scalar_type() == packed.scalar_type(),
              "tinyserve::packed_linear: no kernel for ", x.scalar_type(), " input and ", packed.scalar_type(),
              " weights");
  const bool scaled = scales.has_value() && scales->defined();
  TORCH_CHECK(scaled == int8 && (!scaled || (scales->scalar_type() == at::kFloat && scales->numel() == n_out)),
              "tinyserve::packed_linear: int8 weights, and only they, take float32 scales, one per output");
  const int64_t k = x.size(-1);
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * packed.size(3) == k && packed.size(2) == kGroup &&
                  packed.is_contiguous() && packed.size(0) * kGroup >= n_out,
              "tinyserve::packed_linear: the packed weight does not fit the input or the output size");
  const int64_t rows = k ? x.numel() / k : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  at::Tensor y = at::empty(shape, x.options());
  if (rows == 0 || n_out == 0) return y;
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const auto groups_of = [&](auto* w) { return [w, k](int64_t g) { return w + g * kGroup * k; }; };
  if (int8) {
    const at::Tensor scale = scales->contiguous();
    const float* sp = scale.data_ptr<float>();
    const int8_t* w = packed.data_ptr<int8_t>();
#ifdef __AVX512BF16__
    if (packed.size(3) == 2) {  // pairs: bfloat16 input, multiplied with the dot-product instruction
      TORCH_CHECK(x.scalar_type() == at::kBFloat16, "tinyserve::packed_linear: int8 pairs take bfloat16 input");
      const at::Tensor xc = x.contiguous();
      packed_rows(xc.data_ptr<c10::BFloat16>(), groups_of(w), sp, bp, y.data_ptr<c10::BFloat16>(), rows, n_out, k);
      return y;
    }
#endif
    TORCH_CHECK(packed.size(3) == 1, "tinyserve::packed_linear: int8 pairs need a CPU with AVX512-BF16");
    const at::Tensor xf = x.reshape({rows, k}).to(at::kFloat).contiguous();
    if (x.scalar_type() == at::kFloat)
      packed_rows(xf.data_ptr<float>(), groups_of(w), sp, bp, y.data_ptr<float>(), rows, n_out, k);
    else
      packed_rows(xf.data_ptr<float>(), groups_of(w), sp, bp, y.data_ptr<c10::BFloat16>(), rows, n_out, k);
    return y;
  }
  const at::Tensor xc = x.contiguous();
  if (x.scalar_type() == at::kFloat) {
    packed_rows(xc.data_ptr<float>(), groups_of(packed.data_ptr<float>()), nullptr, bp, y.data_ptr<float>(), rows,
                n_out, k);
    return y;
  }
#ifdef __AVX512BF16__
  if (x.scalar_type() == at::kBFloat16) {
    packed_rows(xc.data_ptr<c10::BFloat16>(), groups_of(packed.data_ptr<c10::BFloat16>()), nullptr, bp,
                y.data_ptr<c10::BFloat16>(), rows, n_out, k);
    return y;
  }
#endif
  TORCH_CHECK(false, "tinyserve::packed_linear: no packed kernel for ", x.scalar_type());
}
#endif

}  // namespace

// The op's schema is defined in model/kernels.py; this is its CPU implementation.
TORCH_LIBRARY_IMPL(tinyserve, CPU, m) {
  m.impl("linear", &small_linear);
  m.impl("linear_int8", &small_linear_int8);
#ifdef __AVX512F__
  m.impl("pack_linear", &pack_linear);
  m.impl("packed_linear", &packed_linear);
#endif
}
