// y = x @ w.T (+ b) for a few rows: the decode step's projections, where every weight is read once.
//
// At a handful of rows a linear layer is a stream of its weight: the kernel walks the weight rows once,
// four at a time (independent accumulators keep the FMA units busy), and multiplies each with every
// input row while it sits in L1. Weights may be bfloat16: they are widened to float32 in registers, so a
// bfloat16 model streams half the bytes on any CPU, including those without bfloat16 arithmetic (where
// torch's own bfloat16 matrix-vector product is slow). Accumulation is in float32.
// Above `kMaxRows` rows the product is compute-bound and at::linear (MKL / oneDNN) takes over.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 8;

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
void gemv_rows(const float* x, const T* w, float* y, int64_t rows, int64_t n_out, int64_t k) {
  at::parallel_for(0, (n_out + 3) / 4, 16, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t n = q * 4;
      if (n + 4 <= n_out) {
        const T* w0 = w + n * k;
        const T* w1 = w0 + k;
        const T* w2 = w1 + k;
        const T* w3 = w2 + k;
        for (int64_t r = 0; r < rows; ++r) {
          const float* xr = x + r * k;
          float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
          for (int64_t d = 0; d < k; ++d) {
            const float xv = xr[d];
            a0 += xv * widen(w0[d]);
            a1 += xv * widen(w1[d]);
            a2 += xv * widen(w2[d]);
            a3 += xv * widen(w3[d]);
          }
          float* yr = y + r * n_out + n;
          yr[0] = a0, yr[1] = a1, yr[2] = a2, yr[3] = a3;
        }
      } else {
        for (int64_t j = n; j < n_out; ++j) {
          const T* wj = w + j * k;
          for (int64_t r = 0; r < rows; ++r) {
            const float* xr = x + r * k;
            float a = 0.f;
#pragma omp simd reduction(+ : a)
            for (int64_t d = 0; d < k; ++d) a += xr[d] * widen(wj[d]);
            y[r * n_out + j] = a;
          }
        }
      }
    }
  });
}

at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1), n_out = weight.size(0);
  const int64_t rows = k ? x.numel() / k : 0;
  const bool supported = (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16) &&
                         weight.is_contiguous() && weight.dim() == 2;
  if (rows > kMaxRows || !supported) return at::linear(x, weight, bias);
  at::Tensor xf = x.reshape({rows, k}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({rows, n_out}, x.options().dtype(at::kFloat));
  if (rows > 0) {
    if (weight.scalar_type() == at::kFloat)
      gemv_rows(xf.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, n_out, k);
    else
      gemv_rows(xf.data_ptr<float>(), weight.data_ptr<c10::BFloat16>(), y.data_ptr<float>(), rows, n_out, k);
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace

// The op's schema is defined in model/kernels.py; this is its CPU implementation.
TORCH_LIBRARY_IMPL(tinyserve, CPU, m) { m.impl("linear", &small_linear); }
