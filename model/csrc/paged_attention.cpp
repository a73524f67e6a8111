// Decode attention over a paged KV cache, read where it lies (no gather copy, no mask).
//
// One new query token per row attends to positions [0, seq_len) of its sequence, whose keys and values
// sit in cache slots block_tables[row][pos / block_size] * block_size + pos % block_size. Work is split
// over (row, kv head, span of the context), flash-decoding style, so one long sequence still uses every
// thread; each split keeps an online softmax (running max, sum, weighted values) in float32, and the
// splits of a (row, kv head) are merged at the end. All query heads that share a kv head (GQA) are
// served by one pass over its keys and values.
//
// Built at run time by model/attention.py with torch.utils.cpp_extension (-O3 -march=native), so the
// inner loops vectorize for the machine that runs them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / (kv_heads * splits), h = task / splits % kv_heads, s = task % splits;
      const int64_t len = lens[r], lo = s * span, hi = std::min(len, lo + span);
      float* res = partial.data() + task * group * part;
      if (lo >= hi) {
        for (int64_t g = 0; g < group; ++g) res[g * part] = neg_inf, res[g * part + 1] = 0.0f;
        continue;
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = load(qp, (r * heads + h * group + g) * dim + d) * scale;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t start = lo; start < hi; start += block_size) {
        const int64_t block = tables[r * width + start / block_size];
        const int64_t n = std::min(block_size, hi - start);
        const int64_t first = block * block_size + start % block_size;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * dim;
          float best = m[g];
          for (int64_t j = 0; j < n; ++j) {
            const T* kj = kp + (first + j) * cache_stride + h * head_stride;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < dim; ++d) dot += qg[d] * load(kj, d);
            scores[g * block_size + j] = dot;
            best = std::max(best, dot);
          }
          const float alpha = std::exp(m[g] - best);  // exp(-inf) = 0 on the first block
          float* ag = acc.data() + g * dim;
          float sum = l[g] * alpha;
          for (int64_t d = 0; d < dim; ++d) ag[d] *= alpha;
          for (int64_t j = 0; j < n; ++j) {
            const float p = std::exp(scores[g * block_size + j] - best);
            sum += p;
            const T* vj = vp + (first + j) * cache_stride + h * head_stride;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) ag[d] += p * load(vj, d);
          }
          m[g] = best;
          l[g] = sum;
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
      for (int64_t s = 0; s < splits; ++s) best = std::max(best, base[s * group * part]);
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
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // an empty (padded) row attends to nothing
      for (int64_t d = 0; d < dim; ++d) op[i * dim + d] = static_cast<T>(total[d] * inv);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.dim() == 3, "q must be [rows, heads, head_dim]");
  TORCH_CHECK(k_cache.stride(2) == 1 && v_cache.strides() == k_cache.strides(), "cache layout mismatch");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables and seq_lens must be int32");
  k_cache.index_copy_(0, slot_mapping, k);
  v_cache.index_copy_(0, slot_mapping, v);
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
