// y = x @ w.T (+ b) for a few rows: the decode step's projections, where every weight is read once.
//
// At a handful of rows a linear layer is a stream of its weight: the kernel walks the weight rows once,
// four at a time (independent accumulators keep the FMA units busy), and multiplies each with every
// input row while it sits in L1. Weights may be bfloat16 or int8 (with a float32 scale per row, model/
// quantization.py): they are widened to float32 in registers, so a bfloat16 model streams half the
// bytes and an int8 one a quarter, on any CPU, including those without bfloat16 arithmetic (where
// torch's own bfloat16 matrix-vector product is slow). Accumulation is in float32.
// Above `kMaxRows` rows the product is compute-bound and at::linear (MKL / oneDNN) takes over; for
// int8 weights, one L2-sized tile of rows at a time is widened and multiplied, so no float copy of the
// whole weight is ever made.
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

constexpr int64_t kMaxRows = 8;

// Whether this CPU has bfloat16 arithmetic (the kernel is built with -march=native). Without it, torch's
// bfloat16 matrix products are many times slower than float32 ones, so larger batches widen the weight.
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
constexpr bool kNativeBf16 = true;
#else
constexpr bool kNativeBf16 = false;
#endif

#ifdef __AVX2__
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const int8_t* p) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

inline float widen(float x) { return x; }
inline float widen(int8_t x) { return static_cast<float>(x); }
inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Dot products of one input row with four weight rows.
template <typename T>
inline void dot4(const float* x, const T* w0, const T* w1, const T* w2, const T* w3, int64_t k, float* out) {
  int64_t d = 0;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#ifdef __AVX2__
  // Explicit AVX2: eight independent accumulators (two per weight row) hide the FMA latency.
  __m256 s[8];
  for (auto& v : s) v = _mm256_setzero_ps();
  for (; d + 16 <= k; d += 16) {
    const __m256 xa = _mm256_loadu_ps(x + d), xb = _mm256_loadu_ps(x + d + 8);
    s[0] = _mm256_fmadd_ps(xa, load8(w0 + d), s[0]);
    s[1] = _mm256_fmadd_ps(xb, load8(w0 + d + 8), s[1]);
    s[2] = _mm256_fmadd_ps(xa, load8(w1 + d), s[2]);
    s[3] = _mm256_fmadd_ps(xb, load8(w1 + d + 8), s[3]);
    s[4] = _mm256_fmadd_ps(xa, load8(w2 + d), s[4]);
    s[5] = _mm256_fmadd_ps(xb, load8(w2 + d + 8), s[5]);
    s[6] = _mm256_fmadd_ps(xa, load8(w3 + d), s[6]);
    s[7] = _mm256_fmadd_ps(xb, load8(w3 + d + 8), s[7]);
  }
  a0 = hsum(_mm256_add_ps(s[0], s[1]));
  a1 = hsum(_mm256_add_ps(s[2], s[3]));
  a2 = hsum(_mm256_add_ps(s[4], s[5]));
  a3 = hsum(_mm256_add_ps(s[6], s[7]));
#endif
  for (; d < k; ++d) {
    a0 += x[d] * widen(w0[d]);
    a1 += x[d] * widen(w1[d]);
    a2 += x[d] * widen(w2[d]);
    a3 += x[d] * widen(w3[d]);
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3;
}

// y[rows, n_out] = x[rows, k] @ w[n_out, k].T, each output times its row's scale when `scales` is given.
template <typename T>
void gemv_rows(const float* x, const T* w, const float* scales, float* y, int64_t rows, int64_t n_out,
               int64_t k) {
  at::parallel_for(0, (n_out + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    float acc[4];
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q * 4, valid = std::min<int64_t>(4, n_out - n);
      // A last group of fewer than four rows repeats its last row; only the valid outputs are kept.
      const T* rw[4];
      for (int64_t j = 0; j < 4; ++j) rw[j] = w + (n + std::min(j, valid - 1)) * k;
      for (int64_t r = 0; r < rows; ++r) {
        dot4(x + r * k, rw[0], rw[1], rw[2], rw[3], k, acc);
        for (int64_t j = 0; j < valid; ++j) y[r * n_out + n + j] = scales ? acc[j] * scales[n + j] : acc[j];
      }
    }
  });
}

// The float32 product `y` [rows, n_out], plus the bias, in x's dtype and leading shape.
at::Tensor finish(const at::Tensor& y, const at::Tensor& x, const c10::optional<at::Tensor>& bias) {
  at::Tensor out = y;
  if (bias.has_value() && bias->defined()) out.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return out.to(x.scalar_type()).view(shape);
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1), n_out = weight.size(0);
  const int64_t rows = k ? x.numel() / k : 0;
  const bool supported = (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) &&
                         weight.is_contiguous() && weight.dim() == 2;
  if (rows > kMaxRows || !supported) {
    if (!kNativeBf16 && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16) {
      const c10::optional<at::Tensor> b = bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : bias;
      return at::linear(x.to(at::kFloat), weight.to(at::kFloat), b).to(at::kBFloat16);
    }
    return at::linear(x, weight, bias);
  }
  at::Tensor xf = x.reshape({rows, k}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({rows, n_out}, x.options().dtype(at::kFloat));
  if (rows > 0) {
    if (weight.scalar_type() == at::kFloat)
      gemv_rows(xf.data_ptr<float>(), weight.data_ptr<float>(), nullptr, y.data_ptr<float>(), rows, n_out, k);
    else
      gemv_rows(xf.data_ptr<float>(), weight.data_ptr<c10::BFloat16>(), nullptr, y.data_ptr<float>(), rows,
                n_out, k);
  }
  return finish(y, x, bias);
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
  at::Tensor xf = x.reshape({rows, k}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({rows, n_out}, x.options().dtype(at::kFloat));
  if (rows > 0 && rows <= kMaxRows) {
    gemv_rows(xf.data_ptr<float>(), w.data_ptr<int8_t>(), s.data_ptr<float>(), y.data_ptr<float>(), rows, n_out,
              k);
  } else if (rows > 0) {
    const int64_t tile = std::max<int64_t>(8, kTileBytes / (4 * std::max<int64_t>(k, 1)));
    for (int64_t n = 0; n < n_out; n += tile) {
      const int64_t m = std::min(tile, n_out - n);
      const at::Tensor wf = w.narrow(0, n, m).to(at::kFloat).mul_(s.narrow(0, n, m).unsqueeze(1));
      y.narrow(1, n, m).copy_(at::mm(xf, wf.t()));
    }
  }
  return finish(y, x, bias);
}

}  // namespace

// The op's schema is defined in model/kernels.py; this is its CPU implementation.
TORCH_LIBRARY_IMPL(tinyserve, CPU, m) {
  m.impl("linear", &small_linear);
  m.impl("linear_int8", &small_linear_int8);
}
