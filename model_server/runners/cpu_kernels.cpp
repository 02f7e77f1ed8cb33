// The fast runner's CPU kernels (model_server/runners/cpu_kernels.py says why), over ATen's vector types.
//
// decode_attention: each row is one new token of a running sequence: its K and V are written at the row's position
// in its slot, then its query heads attend over the slot's positions 0..position. One task per (row, kv head) reads
// that head's cached K and V once for all the query heads that share it (grouped-query attention), with scores,
// softmax and the weighted sum in fp32 (fp64 for fp64 models); only the output is rounded to the model's dtype.
//
// prefill_attention: new prompts, packed end to end, attend causally to themselves, as decode_attention does but
// over K and V read where the fused projection left them (no padding, no copies, no K/V repeated per query head);
// in bf16 a block of a prompt's rows widens the keys and values it sees once (attend_prompts).
//
// rms_norm: the Llama family's RMSNorm in one pass per row, rounded where the family's module rounds: x / rms(x) in
// fp32 (fp64 for fp64 models) rounded to x's dtype, then times the weight in that dtype.
//
// rope: rotary embedding of q or k straight from the fused projection's output, rounded as the family's
// `x * cos + rotate_half(x) * sin` rounds.
//
// linear: x [m, k] times a weight laid out once by pack_linear, in panels of kPanel output features stored k-major
// (one load per k brings a panel's row), so a tile of up to kTileRows rows of x times one panel sums in registers.
// Products and sums in fp32 (bf16 weights widened as they load: a bf16 GEMM's exact products and fp32 sums); bias,
// SiLU and a residual add or gate multiply at the store, in fp32, rounded once to x's dtype.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
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

// `n` elements of T widened to A, a vector at a time.
template <typename T, typename A>
inline void widen_row(const T* p, int64_t n, A* out) {
  constexpr int64_t width = Vectorized<A>::size();
  for (int64_t e = 0; e < n; e += width) {
    const int64_t m = std::min(width, n - e);
    widen<T, A>(p + e, m).store(out + e, m);
  }
}

constexpr int64_t kMaxHeadDim = 256, kMaxHeads = 64;

// Scores s[0..span) become exp(s - their max), in place; returns 1 / their sum (softmax's scale).
template <typename A>
inline A exp_scores(A* s, int64_t span) {
  using Vec = Vectorized<A>;
  const A top = at::vec::reduce_all<A>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, s, span);
  at::vec::map([top](Vec x) { return (x - Vec(top)).exp(); }, s, s, span);
  return 1 / at::vec::reduce_all<A>([](Vec& x, Vec& y) { return x + y; }, s, span);
}

// exp_scores over `vecs` whole vectors of scores, the lanes past the last key -inf (they become 0): no partial vectors.
template <typename A>
inline A exp_vectors(A* s, int64_t vecs) {
  using Vec = Vectorized<A>;
  constexpr int64_t width = Vec::size();
  Vec top = Vec::loadu(s);
  for (int64_t b = 1; b < vecs; ++b) top = at::vec::maximum(top, Vec::loadu(s + b * width));
  const Vec highest(at::vec::vec_reduce_all<A>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, top));
  Vec sum(0);
  for (int64_t b = 0; b < vecs; ++b) {
    const Vec e = (Vec::loadu(s + b * width) - highest).exp();
    e.store(s + b * width);
    sum = sum + e;
  }
  return 1 / at::vec::vec_reduce_all<A>([](Vec& x, Vec& y) { return x + y; }, sum);
}

// out[0..d) = inv * sum over j < span of p[j] * (the value row at values + j * v_step), rounded once to T. The values
// are T, or A where the caller widened them once. Four sums in registers per chunk of d, so the adds need not wait
// on each other.
template <typename T, typename A, typename V>
inline void weigh_values(const A* p, const V* values, int64_t v_step, int64_t span, int64_t d, A inv, T* out) {
  using Vec = Vectorized<A>;
  constexpr int64_t width = Vec::size();
  for (int64_t at = 0; at < d; at += width) {
    const V* vc = values + at;
    const int64_t m = std::min(width, d - at);
    Vec a0(0), a1(0), a2(0), a3(0);
    int64_t j = 0;
    for (; j + 4 <= span; j += 4) {
      a0 = at::vec::fmadd(Vec(p[j]), widen<V, A>(vc + j * v_step, m), a0);
      a1 = at::vec::fmadd(Vec(p[j + 1]), widen<V, A>(vc + (j + 1) * v_step, m), a1);
      a2 = at::vec::fmadd(Vec(p[j + 2]), widen<V, A>(vc + (j + 2) * v_step, m), a2);
      a3 = at::vec::fmadd(Vec(p[j + 3]), widen<V, A>(vc + (j + 3) * v_step, m), a3);
    }
    for (; j < span; ++j) a0 = at::vec::fmadd(Vec(p[j]), widen<V, A>(vc + j * v_step, m), a0);
    narrow_store<T, A>(((a0 + a1) + (a2 + a3)) * Vec(inv), out + at, m);
  }
}

// One (row, kv head): its `g` query heads attend over `span` positions of keys and values, `k_step` and `v_step`
// elements apart (a slot's cache: head_dim; a prompt's packed rows: their tensors' rows), one dot product a key. D is
// the head_dim where it is known at compile time (64, 128: the chunk loops unroll into registers), else 0.
template <typename T, int64_t D>
void attend_one(const T* q, const T* keys, const T* values, int64_t k_step, int64_t v_step, T* out, int64_t span,
                int64_t g, int64_t d_runtime, double scale, std::vector<at::opmath_type<T>>& scores) {
  using A = at::opmath_type<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t width = Vec::size();
  const int64_t d = D ? D : d_runtime, chunks = (d + width - 1) / width;
  auto count = [=](int64_t c) { return std::min(width, d - c * width); };
  scores.resize(g * span);
  A* s = scores.data();
  const A sc = static_cast<A>(scale);
  Vec query[kMaxHeadDim / width];
  for (int64_t r = 0; r < g; ++r) {  // a query head's scores: its chunks stay in registers over the keys
    for (int64_t c = 0; c < chunks; ++c) query[c] = widen<T, A>(q + r * d + c * width, count(c));
    for (int64_t j = 0; j < span; ++j) {
      const T* kj = keys + j * k_step;
      Vec dot = query[0] * widen<T, A>(kj, count(0));
      for (int64_t c = 1; c < chunks; ++c) dot = at::vec::fmadd(query[c], widen<T, A>(kj + c * width, count(c)), dot);
      s[r * span + j] = at::vec::vec_reduce_all<A>([](Vec& x, Vec& y) { return x + y; }, dot) * sc;
    }
  }
  for (int64_t r = 0; r < g; ++r) {
    A* sr = s + r * span;
    weigh_values<T, A, T>(sr, values, v_step, span, d, exp_scores(sr, span), out + r * d);
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
      T* slot_keys = keys_p + task * cap * d;
      T* slot_values = values_p + task * cap * d;
      std::copy_n(kp + i * k_row + h * d, d, slot_keys + pos[i] * d);  // the row's new K and V at its position
      std::copy_n(vp + i * v_row + h * d, d, slot_values + pos[i] * d);
      one(qp + task * g * d, slot_keys, slot_values, d, d, op + task * g * d, pos[i] + 1, g, d, scale, scores);
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

// Prompts packed end to end (prompt p on rows starts[p]..starts[p+1]-1) attend causally to themselves. A task is a
// block of up to kPromptBlock rows of one prompt and one kv head. In bf16 (and fp16) it widens the keys and values its
// rows see once, the keys laid out transposed ([d][keys], `kt`), so a query row's scores for a vector's width of keys
// are d broadcast multiply-adds with no sum across a vector's lanes per key (before: one dot product a key, every row
// widening every key and value it read again). SmolLM2's heads, bf16, 2-core AMX Xeon: 32 prompts of 51 tokens
// 0.79x the time, 12 of 128 0.91x (loadtests/bench_attention.py). Rows past the last prompt (padding) are zeros.
constexpr int64_t kPromptBlock = 64;
// Past this many keys a block's rows take one dot product a key (attend_one) instead: the transposed keys and widened
// values no longer stay in L1, and laying them out again for every later block of a long prompt cost more than it
// saved (4 prompts of 400 tokens: 1.26x the time, bf16, AMX Xeon). So do fp32 and fp64 models, which have nothing to
// widen: laid out, fp32 measured level to 1.09x the time (loadtests/bench_attention.py).
constexpr int64_t kMaxLaidOut = 128;

// Scores of R query heads (`query` [R][d], widened) for `key_vecs` vectors' width of keys laid out by attend_prompts
// (`kt` [d][ld]), times `sc`, into `s` [R][ld]. The heads share each load of the keys, and each keeps two sums (even
// and odd dimensions): 2R multiply-add chains that do not wait on each other.
template <int R, typename A>
void prompt_scores(const A* query, const A* kt, int64_t ld, int64_t key_vecs, int64_t d, A sc, A* s) {
  using Vec = Vectorized<A>;
  constexpr int64_t width = Vec::size();
  for (int64_t b = 0; b < key_vecs; ++b) {
    const A* kb = kt + b * width;
    Vec even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = Vec(0);
    int64_t c = 0;
    for (; c + 2 <= d; c += 2) {
      const Vec k0 = Vec::loadu(kb + c * ld), k1 = Vec::loadu(kb + (c + 1) * ld);
      for (int r = 0; r < R; ++r) {
        even[r] = at::vec::fmadd(Vec(query[r * d + c]), k0, even[r]);
        odd[r] = at::vec::fmadd(Vec(query[r * d + c + 1]), k1, odd[r]);
      }
    }
    if (c < d) {
      const Vec k0 = Vec::loadu(kb + c * ld);
      for (int r = 0; r < R; ++r) even[r] = at::vec::fmadd(Vec(query[r * d + c]), k0, even[r]);
    }
    for (int r = 0; r < R; ++r) ((even[r] + odd[r]) * Vec(sc)).store(s + r * ld + b * width);
  }
}

template <typename T>
void attend_prompts(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* starts,
                    int64_t prompts, double scale, at::Tensor& out) {
  using A = at::opmath_type<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t width = Vec::size();
  const int64_t rows = starts[prompts], n_kv = q.size(1), g = q.size(2), d = q.size(3);
  const int64_t k_row = k.stride(0), v_row = v.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  std::fill(op + rows * n_kv * g * d, op + out.numel(), T(0));
  std::vector<int64_t> blocks;  // (prompt, first row of the block within it)
  for (int64_t p = 0; p < prompts; ++p)
    for (int64_t r = 0; r < starts[p + 1] - starts[p]; r += kPromptBlock) blocks.insert(blocks.end(), {p, r});
  const int64_t n_blocks = static_cast<int64_t>(blocks.size()) / 2;
  const A sc = static_cast<A>(scale);
  auto one = d == 64 ? attend_one<T, 64> : d == 128 ? attend_one<T, 128> : attend_one<T, 0>;
  at::parallel_for(0, n_blocks * n_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kt, vw, scores, query(g * d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = blocks[2 * (task / n_kv)], r0 = blocks[2 * (task / n_kv) + 1], h = task % n_kv;
      const int64_t first = starts[p], r1 = std::min(starts[p + 1] - first, r0 + kPromptBlock);
      if (std::is_same_v<T, A> || r1 > kMaxLaidOut) {
        for (int64_t i = first + r0; i < first + r1; ++i) {
          const int64_t at = (i * n_kv + h) * g * d;
          one(qp + at, kp + first * k_row + h * d, vp + first * v_row + h * d, k_row, v_row, op + at, i - first + 1, g,
              d, scale, scores);
        }
        continue;
      }
      const int64_t ld = (r1 + width - 1) / width * width;  // keys 0..r1-1, padded to whole vectors with zeros
      kt.assign(d * ld, A(0));
      vw.resize(r1 * d);  // the values, widened once: each row of them is read by every later row of the block
      scores.resize(g * ld);
      for (int64_t j = 0; j < r1; ++j) {
        A* key = vw.data() + j * d;  // widened in vw first (then overwritten by the values): vectors, not scalars
        widen_row<T, A>(kp + (first + j) * k_row + h * d, d, key);
        for (int64_t c = 0; c < d; ++c) kt[c * ld + j] = key[c];
        widen_row<T, A>(vp + (first + j) * v_row + h * d, d, key);
      }
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t span = i + 1, key_vecs = (span + width - 1) / width, at = ((first + i) * n_kv + h) * g * d;
        widen_row<T, A>(qp + at, g * d, query.data());
        for (int64_t r = 0; r < g; r += 4) {  // up to four query heads at a time share the keys' loads
          const A* qr = query.data() + r * d;
          A* sr = scores.data() + r * ld;
          switch (std::min<int64_t>(4, g - r)) {
            case 4: prompt_scores<4, A>(qr, kt.data(), ld, key_vecs, d, sc, sr); break;
            case 3: prompt_scores<3, A>(qr, kt.data(), ld, key_vecs, d, sc, sr); break;
            case 2: prompt_scores<2, A>(qr, kt.data(), ld, key_vecs, d, sc, sr); break;
            default: prompt_scores<1, A>(qr, kt.data(), ld, key_vecs, d, sc, sr);
          }
        }
        for (int64_t r = 0; r < g; ++r) {
          A* sr = scores.data() + r * ld;
          std::fill(sr + span, sr + key_vecs * width, -std::numeric_limits<A>::infinity());  // keys it cannot see
          weigh_values<T, A, A>(sr, vw.data(), d, span, d, exp_vectors(sr, key_vecs), op + at + r * d);
        }
      }
    }
  });
}

constexpr int64_t kPanel = 2 * Vectorized<float>::size(), kTileRows = 6;

// A panel's row (kPanel weights) as two fp32 vectors.
template <typename W>
inline void panel_row(const W* p, Vectorized<float>& lo, Vectorized<float>& hi) {
  lo = widen<W, float>(p, Vectorized<float>::size());
  hi = widen<W, float>(p + Vectorized<float>::size(), Vectorized<float>::size());
}

// R rows of x (fp32, `ldx` apart) times one panel [k, kPanel], summed over k into `tile` [R, kPanel].
template <int R, typename W>
void tile_product(const float* x, int64_t ldx, const W* panel, int64_t k, float* tile) {
  using Vec = Vectorized<float>;
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec(0.f);
  for (int64_t j = 0; j < k; ++j) {
    Vec lo, hi;
    panel_row(panel + j * kPanel, lo, hi);
    for (int r = 0; r < R; ++r) {
      const Vec a(x[r * ldx + j]);
      acc[r][0] = at::vec::fmadd(a, lo, acc[r][0]);
      acc[r][1] = at::vec::fmadd(a, hi, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    acc[r][0].store(tile + r * kPanel);
    acc[r][1].store(tile + r * kPanel + Vec::size());
  }
}

template <typename W>
void tile_rows(int64_t rows, const float* x, int64_t ldx, const W* panel, int64_t k, float* tile) {
  switch (rows) {
    case 6: return tile_product<6>(x, ldx, panel, k, tile);
    case 5: return tile_product<5>(x, ldx, panel, k, tile);
    case 4: return tile_product<4>(x, ldx, panel, k, tile);
    case 3: return tile_product<3>(x, ldx, panel, k, tile);
    case 2: return tile_product<2>(x, ldx, panel, k, tile);
    default: return tile_product<1>(x, ldx, panel, k, tile);
  }
}

enum class Combine { kNone, kAdd, kMul };

// What follows the product: bias [n] (fp32), SiLU, then `other` [m, n] added or multiplied; rounded once.
template <typename T>
struct Epilogue {
  const float* bias;
  bool silu;
  Combine combine;
  const T* other;
  int64_t other_row;
  T* out;
  int64_t out_row;

  // `rows` rows of a tile's `cols` columns (of kPanel) at output row `i`, column `col`.
  void store(const float* tile, int64_t i, int64_t rows, int64_t col, int64_t cols) const {
    using Vec = Vectorized<float>;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; c += Vec::size()) {
        const int64_t m = std::min<int64_t>(Vec::size(), cols - c);
        Vec v = Vec::loadu(tile + r * kPanel + c, m);
        if (bias) v = v + Vec::loadu(bias + col + c, m);
        if (silu) v = v / (Vec(1.f) + v.neg().exp());
        if (combine != Combine::kNone) {
          const Vec o = widen<T, float>(other + (i + r) * other_row + col + c, m);
          v = combine == Combine::kAdd ? v + o : v * o;
        }
        narrow_store<T, float>(v, out + (i + r) * out_row + col + c, m);
      }
    }
  }
};

template <typename T>
void gemm(const float* x, int64_t ldx, const T* packed, int64_t m, int64_t k, int64_t n, const Epilogue<T>& epi) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  // Rows in blocks of at most 48 (a block of x stays in L2 while the panels pass), equal in size so that the
  // threads' contiguous shares of (block, panel) tasks hold equal work.
  const int64_t blocks = (m + 47) / 48;
  const int64_t block = ((m + blocks - 1) / blocks + kTileRows - 1) / kTileRows * kTileRows;
  at::parallel_for(0, blocks * panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[kTileRows * kPanel];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / panels, p = task % panels, last = std::min(m, (b + 1) * block);
      const int64_t cols = std::min(kPanel, n - p * kPanel);
      for (int64_t i = b * block; i < last; i += kTileRows) {
        const int64_t rows = std::min(kTileRows, last - i);
        tile_rows<T>(rows, x + i * ldx, ldx, packed + p * k * kPanel, k, tile);
        epi.store(tile, i, rows, p * kPanel, cols);
      }
    }
  });
}

// weight [n, k] (fp32 or bf16) -> [panels, k, kPanel] in its dtype, the last panel padded with zeros.
at::Tensor pack_linear(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "pack_linear: the weight must be [out, in]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "pack_linear: fp32 or bf16 weights");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  auto padded = at::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// x [m, k] (rows may be apart) times a pack_linear weight of n outputs; bias [n] fp32 or none; activation "none" or
// "swish" (SiLU); then `other` [m, n] in x's dtype combined by `how` ("add", "mul"; "" for none).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias,
                  c10::string_view activation, const std::optional<at::Tensor>& other, c10::string_view how) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "linear: x must be [m, k] with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(1) == x.size(1) &&
                  packed.size(2) == kPanel && packed.size(0) * kPanel >= n && n > (packed.size(0) - 1) * kPanel,
              "linear: the weight must come from pack_linear, with x's k and n outputs");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "linear: x in the weight's dtype");
  TORCH_CHECK(activation == "none" || activation == "swish", "linear: activation none or swish");
  TORCH_CHECK(how.empty() || how == "add" || how == "mul", "linear: how is add, mul or empty");
  TORCH_CHECK(how.empty() == !other.has_value(), "linear: `other` goes with `how`");
  const int64_t m = x.size(0), k = x.size(1);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                "linear: the bias must be [n] fp32");
  }
  if (other) {
    TORCH_CHECK(other->dim() == 2 && other->size(0) == m && other->size(1) == n && other->stride(1) == 1 &&
                    other->scalar_type() == x.scalar_type(),
                "linear: `other` must be [m, n] in x's dtype with contiguous rows");
  }
  auto out = at::empty({m, n}, x.options());
  if (m == 0) return out;  // no row blocks to share (and none to size them by)
  const auto wide = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat).contiguous();
  const Combine combine = how.empty() ? Combine::kNone : how == "add" ? Combine::kAdd : Combine::kMul;
  auto run = [&](auto zero) {
    using T = decltype(zero);
    const Epilogue<T> epi{bias ? bias->data_ptr<float>() : nullptr,
                          activation == "swish",
                          combine,
                          other ? other->data_ptr<T>() : nullptr,
                          other ? other->stride(0) : 0,
                          out.data_ptr<T>(),
                          n};
    gemm<T>(wide.data_ptr<float>(), wide.stride(0), packed.data_ptr<T>(), m, k, n, epi);
  };
  if (x.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(at::BFloat16{});
  }
  return out;
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

// q [rows, n_kv, g, d]; k, v [rows, n_kv, d] (a row's heads contiguous, rows may be apart); starts [prompts + 1]
// int64 on the host, rising from 0 to at most rows; returns [rows, n_kv, g, d].
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& starts,
                             double scale) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous(), "prefill_attention: q must be contiguous [rows, n_kv, g, d]");
  const int64_t rows = q.size(0), n_kv = q.size(1), d = q.size(3);
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(0) == rows && k.size(1) == n_kv && k.size(2) == d,
              "prefill_attention: k and v must be [rows, n_kv, d]");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == d && v.stride(2) == 1 && v.stride(1) == d,
              "prefill_attention: a row's K and V heads must be contiguous");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "prefill_attention: one dtype for q, k and v");
  TORCH_CHECK(d <= kMaxHeadDim && q.size(2) <= kMaxHeads,
              "prefill_attention: head_dim <= 256, <= 64 query heads a kv head");
  TORCH_CHECK(starts.dim() == 1 && starts.numel() >= 1 && starts.scalar_type() == at::kLong && starts.is_cpu() &&
                  starts.is_contiguous(),
              "prefill_attention: starts must be int64 [prompts + 1] on the host");
  const int64_t* s = starts.data_ptr<int64_t>();
  const int64_t prompts = starts.numel() - 1;
  TORCH_CHECK(s[0] == 0 && s[prompts] <= rows, "prefill_attention: starts must run from 0 to at most the rows");
  for (int64_t p = 0; p < prompts; ++p) TORCH_CHECK(s[p] < s[p + 1], "prefill_attention: an empty prompt");
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefill_attention",
                                  [&] { attend_prompts<scalar_t>(q, k, v, s, prompts, scale, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY(genembed, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor positions, "
      "float scale) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor starts, float scale) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("pack_linear(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int n, Tensor? bias, str activation, Tensor? other, str how) -> Tensor");
}

TORCH_LIBRARY_IMPL(genembed, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("pack_linear", &pack_linear);
  m.impl("linear", &linear);
}
