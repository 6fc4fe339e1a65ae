// Attention of query tokens over the paged KV cache, read in place (CPU).
//
// Each query token t belongs to a sequence whose keys and values are the first context_lens[t]
// slots of its block table; it attends to all of them (a decode token to its whole sequence,
// a prompt token to the prompt up to itself: causal without a mask). The cache is the worker's
// layer tensor [num_blocks, 2 (key, value), block_size, kv_heads, head_dim]; query head h reads
// KV head h / (heads / kv_heads), as transformers' repeat_kv does.
//
// A task scores every slot of its token's context for its query heads, takes the softmax in
// float32, then accumulates the values. Each key and value row is read once per task, from where
// it lies in the cache; nothing is gathered or padded.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// A row of `dim` elements as float32: the row itself for float32; converted once into `buf` for
// bfloat16 (a shift of its 16 bits), so the head group's dot products run on float32.
inline const float* as_float(const float* row, int64_t, float*) { return row; }
inline const float* as_float(const c10::BFloat16* row, int64_t dim, float* buf) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  uint32_t* out = reinterpret_cast<uint32_t*>(buf);
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
  return buf;
}

template <typename T>
void attend(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& tables,
            const at::Tensor& lens, at::Tensor& out, float scale) {
  const int64_t tokens = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t block_size = cache.size(2), kv_heads = cache.size(3);
  const int64_t group = heads / kv_heads;
  const int64_t width = tables.size(1);
  const T* q = query.data_ptr<T>();
  const T* kv = cache.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int32_t* table = tables.data_ptr<int32_t>();
  const int32_t* len = lens.data_ptr<int32_t>();
  const int64_t slot = kv_heads * dim;             // one slot of one block: every local KV head
  const int64_t block = 2 * block_size * slot;     // one block: keys then values

  // A task is one token's attention for a run of its KV heads: all of them when there are at least
  // as many tokens as threads (each slot's keys and values are then one contiguous row per task),
  // else one KV head each, so that a single sequence still keeps every thread busy.
  const int64_t split = tokens >= at::get_num_threads() ? 1 : kv_heads;
  const int64_t run = kv_heads / split;   // KV heads per task
  const int64_t width_q = run * group;    // query heads per task
  at::parallel_for(0, tokens * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(width_q * dim), acc(width_q * dim), row(run * dim), total(width_q), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / split, h0 = (task % split) * run;
      const int64_t n = len[t];
      const int32_t* blocks = table + t * width;
      const T* qt = q + (t * heads + h0 * group) * dim;
      T* ot = o + (t * heads + h0 * group) * dim;
      scores.resize(width_q * n);
      for (int64_t i = 0; i < width_q * dim; ++i) qf[i] = static_cast<float>(qt[i]) * scale;
      // Scores: the task's keys of each slot are read once, as one contiguous row.
      for (int64_t j = 0; j < n; ++j) {
        const float* k = as_float(kv + blocks[j / block_size] * block + (j % block_size) * slot + h0 * dim,
                                  run * dim, row.data());
        for (int64_t hq = 0; hq < width_q; ++hq) {
          const float* qh = qf.data() + hq * dim;
          const float* kh = k + (hq / group) * dim;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qh[d] * kh[d];
          scores[hq * n + j] = s;
        }
      }
      for (int64_t hq = 0; hq < width_q; ++hq) {
        float* sh = scores.data() + hq * n;
        const float m = n ? *std::max_element(sh, sh + n) : 0.f;
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          sh[j] = std::exp(sh[j] - m);
          sum += sh[j];
        }
        total[hq] = sum;
      }
      // Values, likewise.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* v = as_float(kv + blocks[j / block_size] * block + (block_size + j % block_size) * slot + h0 * dim,
                                  run * dim, row.data());
        for (int64_t hq = 0; hq < width_q; ++hq) {
          const float p = scores[hq * n + j];
          const float* vh = v + (hq / group) * dim;
          float* a = acc.data() + hq * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += p * vh[d];
        }
      }
      for (int64_t hq = 0; hq < width_q; ++hq) {
        const float inv = total[hq] > 0.f ? 1.f / total[hq] : 0.f;
        for (int64_t d = 0; d < dim; ++d) ot[hq * dim + d] = static_cast<T>(acc[hq * dim + d] * inv);
      }
    }
  });
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && cache.dim() == 5, "query [T, heads, dim] and cache [blocks, 2, block, kv_heads, dim]");
  TORCH_CHECK(query.is_contiguous() && cache.is_contiguous(), "query and cache must be contiguous");
  TORCH_CHECK(query.scalar_type() == cache.scalar_type(), "query and cache dtypes differ");
  TORCH_CHECK(cache.size(1) == 2 && cache.size(4) == query.size(2), "cache shape does not match the query");
  TORCH_CHECK(query.size(1) % cache.size(3) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block tables and context lengths must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == query.size(0) && block_tables.is_contiguous() &&
              context_lens.numel() == query.size(0) && context_lens.is_contiguous(),
              "one block-table row and one context length per query token");
  at::Tensor out = at::empty_like(query);
  if (query.scalar_type() == at::kFloat) {
    attend<float>(query, cache, block_tables, context_lens, out, static_cast<float>(scale));
  } else if (query.scalar_type() == at::kBFloat16) {
    attend<c10::BFloat16>(query, cache, block_tables, context_lens, out, static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "paged_attention supports float32 and bfloat16, not ", query.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(remp, m) {
  m.def("paged_attention(Tensor query, Tensor cache, Tensor block_tables, Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(remp, CPU, m) { m.impl("paged_attention", &paged_attention); }
