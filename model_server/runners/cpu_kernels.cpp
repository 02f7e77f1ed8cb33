// The fast runner's CPU kernels (model_server/runners/cpu_kernels.py says why), over ATen's vector types.
//
// decode_attention: each row is one new token of a running sequence: its K and V are written at the row's position
// in its slot, then its query heads attend over the slot's positions 0..position. One task per (row, kv head) reads
// that head's cached K and V once for all the query heads that share it (grouped-query attention), with scores,
// softmax and the weighted sum in fp32 (fp64 for fp64 models); only the output is rounded to the model's dtype.
//
// rms_norm: the Llama family's RMSNorm in one pass per row, rounded where the family's module rounds: x / rms(x) in
// fp32 (fp64 for fp64 models) rounded to x's dtype, then times the weight in that dtype.
//
// rope: rotary embedding of q or k straight from the fused projection's output, rounded as the family's
// `x * cos + rotate_half(x) * sin` rounds.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using at::vec::Vectorized;

// `count` (at most a vector's width) elements of a row, widened to the accumulation type A. Lanes past `count`
// are zero: a head_dim that is not a multiple of the width (the tests' tiny models) adds nothing to a dot.
template <typename T, typename A>
inline Vectorized<A> widen(const T* p, int64_t count) {
  using Vec = Vectorized<A>;
  if constexpr (std::is_same_v<T, A>) {
    return Vec::loadu(p, count);
  } else {
    if (count == Vec::size()) {
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
    A tail[Vec::size()] = {};
    for (int64_t e = 0; e < count; ++e) tail[e] = static_cast<A>(p[e]);
    return Vec::loadu(tail, count);
  }
}

// Store `count` lanes of `a` as T (rounded to nearest even, as torch rounds).
template <typename T, typename A>
inline void narrow_store(const Vectorized<A>& a, T* p, int64_t count) {
  if constexpr (std::is_same_v<T, A>) {
    a.store(p, count);
  } else {
    at::vec::convert_from_float<T>(a, a).store(p, count);
  }
}

// `a` rounded to T and widened back: where the family's module rounds an intermediate to the model's dtype.
template <typename T, typename A>
inline Vectorized<A> rounded(const Vectorized<A>& a) {
  if constexpr (std::is_same_v<T, A>) {
    return a;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, a)));
  }
}

constexpr int64_t kMaxHeadDim = 256, kMaxHeads = 64;

// One (row, kv head): write the row's K and V at `pos`, attend its `g` query heads over positions 0..pos. D is the
// head_dim where it is known at compile time (64, 128: the chunk loops unroll into registers), else 0.
template <typename T, int64_t D>
void attend_one(const T* q, const T* k_new, const T* v_new, T* keys, T* values, T* out, int64_t pos, int64_t g,
                int64_t d_runtime, double scale, std::vector<at::opmath_type<T>>& scores) {
  using A = at::opmath_type<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t width = Vec::size();
  const int64_t d = D ? D : d_runtime, chunks = (d + width - 1) / width, span = pos + 1;
  auto count = [=](int64_t c) { return std::min(width, d - c * width); };
  std::copy_n(k_new, d, keys + pos * d);
  std::copy_n(v_new, d, values + pos * d);
  scores.resize(g * span);
  A* s = scores.data();
  const A sc = static_cast<A>(scale);
  Vec query[kMaxHeadDim / width];
  for (int64_t r = 0; r < g; ++r) {  // a query head's scores: its chunks stay in registers over the keys
    for (int64_t c = 0; c < chunks; ++c) query[c] = widen<T, A>(q + r * d + c * width, count(c));
    for (int64_t j = 0; j < span; ++j) {
      const T* kj = keys + j * d;
      Vec dot = query[0] * widen<T, A>(kj, count(0));
      for (int64_t c = 1; c < chunks; ++c) dot = at::vec::fmadd(query[c], widen<T, A>(kj + c * width, count(c)), dot);
      s[r * span + j] = at::vec::vec_reduce_all<A>([](Vec& x, Vec& y) { return x + y; }, dot) * sc;
    }
  }
  A inv[kMaxHeads];
  for (int64_t r = 0; r < g; ++r) {
    A* sr = s + r * span;
    const A top = at::vec::reduce_all<A>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, sr, span);
    at::vec::map([top](Vec x) { return (x - Vec(top)).exp(); }, sr, sr, span);
    inv[r] = 1 / at::vec::reduce_all<A>([](Vec& x, Vec& y) { return x + y; }, sr, span);
  }
  for (int64_t r = 0; r < g; ++r) {
    const A* p = s + r * span;
    for (int64_t c = 0; c < chunks; ++c) {  // four sums in registers, so the adds need not wait on each other
      const T* vc = values + c * width;
      const int64_t m = count(c);
      Vec a0(0), a1(0), a2(0), a3(0);
      int64_t j = 0;
      for (; j + 4 <= span; j += 4) {
        a0 = at::vec::fmadd(Vec(p[j]), widen<T, A>(vc + j * d, m), a0);
        a1 = at::vec::fmadd(Vec(p[j + 1]), widen<T, A>(vc + (j + 1) * d, m), a1);
        a2 = at::vec::fmadd(Vec(p[j + 2]), widen<T, A>(vc + (j + 2) * d, m), a2);
        a3 = at::vec::fmadd(Vec(p[j + 3]), widen<T, A>(vc + (j + 3) * d, m), a3);
      }
      for (; j < span; ++j) a0 = at::vec::fmadd(Vec(p[j]), widen<T, A>(vc + j * d, m), a0);
      narrow_store<T, A>(((a0 + a1) + (a2 + a3)) * Vec(inv[r]), out + r * d + c * width, m);
    }
  }
}

// Ask for a task's cached K and V while the one before it computes: a decode step's KV comes from memory (the
// layers' weights went through the caches since this layer's last step), and one core's demand reads alone do
// not keep up with the arithmetic.
template <typename T>
inline void prefetch(const T* keys, const T* values, int64_t task, int64_t cap, int64_t d, int64_t span) {
  const char* kb = reinterpret_cast<const char*>(keys + task * cap * d);
  const char* vb = reinterpret_cast<const char*>(values + task * cap * d);
  const int64_t bytes = span * d * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < bytes; b += 64) {
    __builtin_prefetch(kb + b);
    __builtin_prefetch(vb + b);
  }
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys, at::Tensor& values,
            const at::Tensor& positions, double scale, at::Tensor& out) {
  const int64_t n = q.size(0), n_kv = q.size(1), g = q.size(2), d = q.size(3), cap = keys.size(2);
  const int64_t k_row = k.stride(0), v_row = v.stride(0);  // a row's heads are contiguous, rows may be apart
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* keys_p = keys.data_ptr<T>();
  T* values_p = values.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  auto one = d == 64 ? attend_one<T, 64> : d == 128 ? attend_one<T, 128> : attend_one<T, 0>;
  at::parallel_for(0, n * n_kv, 1, [=](int64_t begin, int64_t end) {
    std::vector<at::opmath_type<T>> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / n_kv, h = task % n_kv;
      if (task + 1 < end) prefetch(keys_p, values_p, task + 1, cap, d, pos[(task + 1) / n_kv] + 1);
      one(qp + task * g * d, kp + i * k_row + h * d, vp + i * v_row + h * d, keys_p + task * cap * d,
          values_p + task * cap * d, op + task * g * d, pos[i], g, d, scale, scores);
    }
  });
}

template <typename T>
void norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t h, double eps) {
  using A = at::opmath_type<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t width = Vec::size();
  const int64_t chunks = (h + width - 1) / width;
  auto count = [=](int64_t c) { return std::min(width, h - c * width); };
  // rows of a decode step stay on one thread: below ~32k elements a parallel region costs more than it saves
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / h), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xr = x + i * h;
      Vec squares(0);
      for (int64_t c = 0; c < chunks; ++c) {
        const Vec v = widen<T, A>(xr + c * width, count(c));
        squares = at::vec::fmadd(v, v, squares);
      }
      const A sum = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, squares);
      const Vec inv(A(1) / std::sqrt(sum / static_cast<A>(h) + static_cast<A>(eps)));
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t m = count(c);
        const Vec normed = rounded<T, A>(widen<T, A>(xr + c * width, m) * inv);
        narrow_store<T, A>(normed * widen<T, A>(weight + c * width, m), out + i * h + c * width, m);
      }
    }
  });
}

template <typename T>
void rope_rows(const T* x, int64_t x_row, const T* cos, const T* sin, T* out, int64_t rows, int64_t heads,
               int64_t d) {
  using A = at::opmath_type<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t width = Vec::size();
  const int64_t half = d / 2, chunks = (half + width - 1) / width;
  at::parallel_for(0, rows * heads, std::max<int64_t>(1, 32768 / d), [=](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / heads, h = task % heads;
      const T* xr = x + t * x_row + h * d;
      const T* c = cos + t * d;
      const T* s = sin + t * d;
      T* o = out + task * d;
      for (int64_t k = 0; k < chunks; ++k) {
        const int64_t at = k * width, m = std::min(width, half - at);
        const Vec x1 = widen<T, A>(xr + at, m), x2 = widen<T, A>(xr + half + at, m);
        // x * cos + rotate_half(x) * sin, each product rounded to T as the family's module rounds it
        const Vec lo = rounded<T, A>(x1 * widen<T, A>(c + at, m)) - rounded<T, A>(x2 * widen<T, A>(s + at, m));
        const Vec hi =
            rounded<T, A>(x2 * widen<T, A>(c + half + at, m)) + rounded<T, A>(x1 * widen<T, A>(s + half + at, m));
        narrow_store<T, A>(lo, o + at, m);
        narrow_store<T, A>(hi, o + half + at, m);
      }
    }
  });
}

// x [tokens, heads, d] (a row's heads contiguous, rows may be apart: a view of the fused projection), cos and sin
// [tokens, d] in x's dtype; returns x with rotary embedding applied, contiguous.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rope: x must be [tokens, heads, d] with a row's heads contiguous and d even");
  const int64_t tokens = x.size(0), heads = x.size(1), d = x.size(2);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == tokens && cos.size(1) == d,
              "rope: cos and sin must be [tokens, d]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: cos and sin in x's dtype");
  const auto c = cos.contiguous(), s = sin.contiguous();
  auto out = at::empty({tokens, heads, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                        out.data_ptr<scalar_t>(), tokens, heads, d);
  });
  return out;
}

// x [..., h] (any layout: strided views are copied), weight [h] in x's dtype.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == h && weight.scalar_type() == x.scalar_type(),
              "rms_norm: the weight must be [h] in x's dtype");
  const auto rows = x.contiguous();
  const auto w = weight.contiguous();
  auto out = at::empty_like(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    norm_rows<scalar_t>(rows.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                        rows.numel() / std::max<int64_t>(h, 1), h, eps);
  });
  return out;
}

// q [n, n_kv, g, d]; k, v [n, n_kv, d] (the rows' new K and V, rows may be strided); keys, values
// [slots >= n, n_kv, cap, d], written at `positions` [n] (int64); returns [n, n_kv, g, d].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys,
                            at::Tensor& values, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && k.dim() == 3, "decode_attention: q 4-d, keys 4-d, k 3-d");
  const int64_t n = q.size(0), n_kv = q.size(1), d = q.size(3);
  TORCH_CHECK(q.is_contiguous() && keys.is_contiguous() && values.is_contiguous() && positions.is_contiguous(),
              "decode_attention: q, the pool and positions must be contiguous");
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(0) >= n && keys.size(1) == n_kv && keys.size(3) == d,
              "decode_attention: the pool's shape does not fit q");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == n && k.size(1) == n_kv && k.size(2) == d,
              "decode_attention: k and v must be [n, n_kv, d]");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == d && v.stride(2) == 1 && v.stride(1) == d,
              "decode_attention: a row's K and V heads must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
              "decode_attention: one dtype for q, k, v and the pool");
  TORCH_CHECK(d <= kMaxHeadDim && q.size(2) <= kMaxHeads,
              "decode_attention: head_dim <= 256, <= 64 query heads a kv head");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == n, "decode_attention: int64 positions [n]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < keys.size(2), "decode_attention: a position outside the pool's capacity");
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention",
                                  [&] { attend<scalar_t>(q, k, v, keys, values, positions, scale, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY(genembed, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor positions, "
      "float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(genembed, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
}
