// ReLU -> cross-map LRN (Sec. 3.3) -> overlapping max-pool (Sec. 3.4) in one pass over a layer's
// channels_last maps, forward and backward, on the CPU: the kernels, plain C++ (lrn_pool_op.cpp
// wraps them as the CPU kernels of the torch.library operators alexnet::lrn_max_pool and its
// backward). A translation unit of its own: compiled beside the torch headers and the operator
// code, GCC vectorised the backward's loops less and it ran 2.2x slower (measured).
//
// Why: the three layers are memory-bound; done apart they read and write the layer's full maps
// (55x55x96 per image at conv1) about ten times per step. Here the forward reads the conv output
// once and writes only the pooled maps and the winner of each pooling window (one byte); the
// backward reads the conv output, the pooled gradient and the winners once and writes the input
// gradient once. Sums, powers and the max are in float32 for bfloat16 maps, in float64 for
// float64 maps.
//
//   b[i] = a[i] / (k + alpha * sum_{j in win(i)} a[j]^2)^beta,  a = relu(x) (or x),
//   win(i) = the size maps centred on i, clipped at the edges of i's group (tower);
//   d loss / d a[i] = g[i] s[i] - 2 alpha beta a[i] sum_{j in win(i)} g[j] a[j] s[j] / D[j],
//   D = k + alpha * window_sum(a^2), s = D^-beta; g = the pool's gradient routed to its winner.
#include "lrn_pool.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using alexnet_lrn_pool::Params;

inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float f) { p[i] = f; }
inline void store(double* p, int64_t i, double f) { p[i] = f; }
inline void store(uint16_t* p, int64_t i, float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p[i] = (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}

// Window sums along the maps of a whole image row at once (W pixels x C maps, contiguous in
// channels_last): long flat loops the compiler vectorises, instead of a few short loops per
// pixel. `q` holds the row's values at q[half + j] with `half` zeros at both ends. A tap that
// would cross the edge of a group (tower) or pixel is left out by its mask: inside[o][j] says
// whether map j's neighbour j + o - half lies in j's group.
struct Masks {
  std::vector<uint8_t> inside;  // (2 * half + 1) rows of `len`
  Masks(int64_t len, int64_t cg, int64_t half) : inside((2 * half + 1) * len) {
    for (int64_t o = 0; o <= 2 * half; ++o)
      for (int64_t j = 0; j < len; ++j) {
        const int64_t c = j % cg + o - half;
        inside[o * len + j] = c >= 0 && c < cg;
      }
  }
};

// The window sum at map j (q padded as above), the taps leaving j's group masked out. HALF is
// a compile-time constant (size = 2 * HALF + 1): the taps unroll and the loop over j vectorises.
template <int HALF, typename A>
inline A window_at(const A* __restrict__ q, int64_t j, int64_t len,
                   const uint8_t* __restrict__ inside) {
  A sum = q[j + HALF];
#pragma GCC unroll 16
  for (int o = 0; o <= 2 * HALF; ++o)
    if (o != HALF) sum += inside[o * len + j] ? q[j + o] : A(0);
  return sum;
}

// d^-beta: for the paper's beta = 0.75 as rsqrt * sqrt(rsqrt), a fraction of powf's cost and
// vectorised (powf is not). P075 is a compile-time choice so that the loops stay branch-free.
template <bool P075, typename A>
inline A inv_pow(A d, A beta) {
  if (P075) {
    const A r = A(1) / std::sqrt(d);
    return r * std::sqrt(r);
  }
  return std::pow(d, -beta);
}

// One image row: a = relu(x) (or x) and its squares q (padded), in one pass.
// The accumulator: float32 for float32 and bfloat16 maps, float64 for float64 maps.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, typename A = Acc<T>>
void row_squares(const T* __restrict__ x, const Params& p, A* __restrict__ a,
                 A* __restrict__ q) {
  const int64_t len = p.w * p.c, half = p.size / 2;
  for (int64_t j = 0; j < len; ++j) {
    const A v = load(x, j);
    const A aj = p.relu ? std::max(v, A(0)) : v;  // NaN stays NaN
    a[j] = aj;
    q[half + j] = aj * aj;
  }
}

// torch's max-pool rule, kept here: a later value wins if it is larger or NaN, so ties go to
// the first in row-major order. The 2-D max is taken as a max along the row, then down the
// column (the same winner: the first row holding the maximum, its first column).
template <typename A>
inline void take_max(const A* __restrict__ v, A* __restrict__ best, uint8_t* __restrict__ arg,
                     const uint8_t* __restrict__ varg, uint8_t add, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const bool take = v[j] > best[j] || v[j] != v[j];
    best[j] = take ? v[j] : best[j];
    arg[j] = take ? static_cast<uint8_t>((varg ? varg[j] : 0) + add) : arg[j];
  }
}

template <typename T, int HALF>
void forward(const T* x, T* y, uint8_t* win, const Params& p) {
  using A = Acc<T>;
  constexpr int64_t half = HALF;
  const A k = static_cast<A>(p.k), alpha = static_cast<A>(p.alpha), beta = static_cast<A>(p.beta);
  const int64_t row = p.w * p.c, orow = p.wo * p.c;
  const Masks masks(row, p.c / p.groups, half);
#pragma omp parallel num_threads(p.threads)
  {
    std::vector<A> a(row), q(row + 2 * half, A(0)), b(row);
    // The row-wise max of the last z normalised rows (and where in the row each came from):
    // a ring that stays in cache; each input row is normalised once.
    std::vector<A> hmax(p.z * orow), best(orow);
    std::vector<uint8_t> harg(p.z * orow), arg(orow);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < p.n; ++n) {
      const T* xn = x + n * p.h * row;
      int64_t next = 0;  // the next input row to normalise
      for (int64_t oh = 0; oh < p.ho; ++oh) {
        for (; next < oh * p.s + p.z; ++next) {
          row_squares(xn + next * row, p, a.data(), q.data());
          const uint8_t* __restrict__ in = masks.inside.data();
          const A *__restrict__ aa = a.data(), *__restrict__ qq = q.data();
          A* __restrict__ bb = b.data();
          auto normalise = [&](auto p075) {  // b = a * (k + alpha * window_sum(a^2))^-beta
            for (int64_t j = 0; j < row; ++j)
              bb[j] = aa[j] * inv_pow<p075()>(k + alpha * window_at<HALF>(qq, j, row, in), beta);
          };
          if (p.beta == 0.75) normalise(std::true_type{});
          else normalise(std::false_type{});
          A* hm = hmax.data() + (next % p.z) * orow;
          uint8_t* ha = harg.data() + (next % p.z) * orow;
          for (int64_t ow = 0; ow < p.wo; ++ow) {
            const A* src = b.data() + ow * p.s * p.c;
            std::memcpy(hm + ow * p.c, src, p.c * sizeof(A));
            std::memset(ha + ow * p.c, 0, p.c);
            for (int64_t dx = 1; dx < p.z; ++dx)
              take_max(src + dx * p.c, hm + ow * p.c, ha + ow * p.c, nullptr, dx, p.c);
          }
        }
        const int64_t r0 = (oh * p.s) % p.z;
        std::memcpy(best.data(), hmax.data() + r0 * orow, orow * sizeof(A));
        std::memcpy(arg.data(), harg.data() + r0 * orow, orow);
        for (int64_t dy = 1; dy < p.z; ++dy) {
          const int64_t r = (oh * p.s + dy) % p.z;
          take_max(hmax.data() + r * orow, best.data(), arg.data(), harg.data() + r * orow,
                   static_cast<uint8_t>(dy * p.z), orow);
        }
        const int64_t out = (n * p.ho + oh) * orow;
        T* __restrict__ yo = y + out;
        const A* __restrict__ bb = best.data();
        for (int64_t j = 0; j < orow; ++j) store(yo, j, bb[j]);
        if (win) std::memcpy(win + out, arg.data(), orow);
      }
    }
  }
}

template <typename T, int HALF>
void backward(const T* x, const T* gy, const uint8_t* win, T* gx, const Params& p) {
  using A = Acc<T>;
  constexpr int64_t half = HALF;
  const int64_t cg = p.c / p.groups, row = p.w * p.c;
  const A k = static_cast<A>(p.k), alpha = static_cast<A>(p.alpha), beta = static_cast<A>(p.beta);
  const A coef = A(2) * alpha * beta;
  const Masks masks(row, cg, half);
#pragma omp parallel num_threads(p.threads)
  {
    std::vector<A> a(row), q(row + 2 * half, A(0)), s(row), g(row), t(row + 2 * half, A(0));
#pragma omp for schedule(static) collapse(2)
    for (int64_t n = 0; n < p.n; ++n) {
      for (int64_t h = 0; h < p.h; ++h) {
        // g: the pooled gradient routed to the winners in this row. The pooling rows whose
        // windows hold row h: oh * s <= h < oh * s + z.
        A* __restrict__ gg = g.data();
        for (int64_t j = 0; j < row; ++j) gg[j] = A(0);
        const int64_t oh0 = h >= p.z ? (h - p.z) / p.s + 1 : 0;
        const int64_t oh1 = std::min<int64_t>(h / p.s, p.ho - 1);
        for (int64_t oh = oh0; oh <= oh1; ++oh) {
          for (int64_t ow = 0; ow < p.wo; ++ow) {
            const int64_t o = ((n * p.ho + oh) * p.wo + ow) * p.c;
            const uint8_t* __restrict__ wo = win + o;
            const T* __restrict__ go = gy + o;
            for (int64_t dx = 0; dx < p.z; ++dx) {
              const uint8_t kw = static_cast<uint8_t>((h - oh * p.s) * p.z + dx);
              A* __restrict__ gp = gg + (ow * p.s + dx) * p.c;
              for (int64_t c = 0; c < p.c; ++c) gp[c] += wo[c] == kw ? load(go, c) : A(0);
            }
          }
        }
        const int64_t at = (n * p.h + h) * row;
        A *__restrict__ aa = a.data(), *__restrict__ qq = q.data(), *__restrict__ ss = s.data();
        A* __restrict__ tt = t.data();
        const uint8_t* __restrict__ in = masks.inside.data();
        row_squares(x + at, p, aa, qq);
        auto terms = [&](auto p075) {  // s = D^-beta and t = g a s / D (t padded)
          for (int64_t j = 0; j < row; ++j) {
            const A dj = k + alpha * window_at<HALF>(qq, j, row, in);
            const A sj = inv_pow<p075()>(dj, beta);
            ss[j] = sj;
            tt[half + j] = gg[j] * aa[j] * sj / dj;
          }
        };
        if (p.beta == 0.75) terms(std::true_type{});
        else terms(std::false_type{});
        T* __restrict__ out = gx + at;
        // grad = g s - 2 alpha beta a window_sum(t); relu's gradient: 0 where x <= 0, i.e.
        // where a = relu(x) is not > 0.
        for (int64_t j = 0; j < row; ++j) {
          const A grad = gg[j] * ss[j] - coef * aa[j] * window_at<HALF>(tt, j, row, in);
          store(out, j, (!p.relu || aa[j] > A(0)) ? grad : A(0));
        }
      }
    }
  }
}

template <typename T>
void forward_t(const T* x, T* y, uint8_t* win, const Params& p) {
  switch (p.size / 2) {  // windows of 1 to 9 maps (the paper's is 5); wider ones run unfused
    case 0: forward<T, 0>(x, y, win, p); break;
    case 1: forward<T, 1>(x, y, win, p); break;
    case 2: forward<T, 2>(x, y, win, p); break;
    case 3: forward<T, 3>(x, y, win, p); break;
    default: forward<T, 4>(x, y, win, p); break;
  }
}

template <typename T>
void backward_t(const T* x, const T* gy, const uint8_t* win, T* gx, const Params& p) {
  switch (p.size / 2) {
    case 0: backward<T, 0>(x, gy, win, gx, p); break;
    case 1: backward<T, 1>(x, gy, win, gx, p); break;
    case 2: backward<T, 2>(x, gy, win, gx, p); break;
    case 3: backward<T, 3>(x, gy, win, gx, p); break;
    default: backward<T, 4>(x, gy, win, gx, p); break;
  }
}

}  // namespace

namespace alexnet_lrn_pool {

void forward(Dtype dtype, const void* x, void* y, uint8_t* win, const Params& p) {
  if (dtype == Dtype::f32)
    forward_t(static_cast<const float*>(x), static_cast<float*>(y), win, p);
  else if (dtype == Dtype::f64)
    forward_t(static_cast<const double*>(x), static_cast<double*>(y), win, p);
  else
    forward_t(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), win, p);
}

void backward(Dtype dtype, const void* x, const void* gy, const uint8_t* win, void* gx,
              const Params& p) {
  if (dtype == Dtype::f32)
    backward_t(static_cast<const float*>(x), static_cast<const float*>(gy), win,
               static_cast<float*>(gx), p);
  else if (dtype == Dtype::f64)
    backward_t(static_cast<const double*>(x), static_cast<const double*>(gy), win,
               static_cast<double*>(gx), p);
  else
    backward_t(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(gy), win,
               static_cast<uint16_t*>(gx), p);
}

}  // namespace alexnet_lrn_pool
