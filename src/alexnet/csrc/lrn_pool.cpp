// ReLU -> cross-map LRN (Sec. 3.3) -> overlapping max-pool (Sec. 3.4) in one pass over a layer's
// channels_last maps, forward and backward, on the CPU. Compiled at first use by alexnet.lrn_pool
// (g++ -O3 -march=native -fopenmp, against torch's headers) and loaded with torch.ops.load_library:
// the CPU kernels of the torch.library operators alexnet::lrn_max_pool and its backward.
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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

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

struct Params {
  int64_t n, h, w, c, groups, size, z, s, ho, wo;
  double k, alpha, beta;
  int relu, threads;
};

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
void forward_any(const T* x, T* y, uint8_t* win, const Params& p) {
  switch (p.size / 2) {  // windows of 1 to 9 maps (the paper's is 5); wider ones run unfused
    case 0: forward<T, 0>(x, y, win, p); break;
    case 1: forward<T, 1>(x, y, win, p); break;
    case 2: forward<T, 2>(x, y, win, p); break;
    case 3: forward<T, 3>(x, y, win, p); break;
    default: forward<T, 4>(x, y, win, p); break;
  }
}

template <typename T>
void backward_any(const T* x, const T* gy, const uint8_t* win, T* gx, const Params& p) {
  switch (p.size / 2) {
    case 0: backward<T, 0>(x, gy, win, gx, p); break;
    case 1: backward<T, 1>(x, gy, win, gx, p); break;
    case 2: backward<T, 2>(x, gy, win, gx, p); break;
    case 3: backward<T, 3>(x, gy, win, gx, p); break;
    default: backward<T, 4>(x, gy, win, gx, p); break;
  }
}

// The operator's checks: what the Python side (alexnet.lrn_pool.supports) promises, checked
// again here so that a direct call with anything else is an error, never a wild write.
Params params(const at::Tensor& x, int64_t size, int64_t groups, double k, double alpha,
              double beta, bool relu, int64_t z, int64_t s) {
  TORCH_CHECK(x.device().is_cpu(), "alexnet::lrn_max_pool: a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kDouble,
              "alexnet::lrn_max_pool: float32, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "alexnet::lrn_max_pool: a 4-D channels_last tensor");
  TORCH_CHECK(size >= 1 && size / 2 <= 4, "alexnet::lrn_max_pool: size 1 to 9, got ", size);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "alexnet::lrn_max_pool: ", x.size(1),
              " maps do not split into ", groups, " groups");
  TORCH_CHECK(z >= 1 && z * z <= 255 && s >= 1, "alexnet::lrn_max_pool: pool ", z, "/", s);
  TORCH_CHECK(x.size(2) >= z && x.size(3) >= z, "alexnet::lrn_max_pool: maps smaller than the pool");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  return Params{n, h, w, c, groups, size, z, s, (h - z) / s + 1, (w - z) / s + 1,
                k, alpha, beta, relu ? 1 : 0, static_cast<int>(at::get_num_threads())};
}

// (pooled maps, each window's winner); the winners are empty when no backward will follow.
std::tuple<at::Tensor, at::Tensor> lrn_max_pool(const at::Tensor& x, int64_t size, int64_t groups,
                                                double k, double alpha, double beta, bool relu,
                                                int64_t z, int64_t s, bool winners) {
  const Params p = params(x, size, groups, k, alpha, beta, relu, z, s);
  at::Tensor y = at::empty({p.n, p.c, p.ho, p.wo},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor win = at::empty({winners ? p.n : 0, p.ho, p.wo, p.c}, x.options().dtype(at::kByte));
  uint8_t* wp = winners ? win.mutable_data_ptr<uint8_t>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    forward_any(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(), wp, p);
  else if (x.scalar_type() == at::kDouble)
    forward_any(x.const_data_ptr<double>(), y.mutable_data_ptr<double>(), wp, p);
  else
    forward_any(reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()),
                reinterpret_cast<uint16_t*>(y.mutable_data_ptr<at::BFloat16>()), wp, p);
  return {y, win};
}

at::Tensor lrn_max_pool_backward(const at::Tensor& x, const at::Tensor& gy_in, const at::Tensor& win,
                                 int64_t size, int64_t groups, double k, double alpha, double beta,
                                 bool relu, int64_t z, int64_t s) {
  const Params p = params(x, size, groups, k, alpha, beta, relu, z, s);
  TORCH_CHECK(win.scalar_type() == at::kByte && win.dim() == 4 && win.size(0) == p.n &&
                  win.size(1) == p.ho && win.size(2) == p.wo && win.size(3) == p.c &&
                  win.is_contiguous(),
              "alexnet::lrn_max_pool_backward: the forward's winners");
  TORCH_CHECK(gy_in.dim() == 4 && gy_in.size(0) == p.n && gy_in.size(1) == p.c &&
                  gy_in.size(2) == p.ho && gy_in.size(3) == p.wo,
              "alexnet::lrn_max_pool_backward: a gradient of the pooled maps' shape");
  const at::Tensor gy = gy_in.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor gx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (x.scalar_type() == at::kFloat)
    backward_any(x.const_data_ptr<float>(), gy.const_data_ptr<float>(),
                 win.const_data_ptr<uint8_t>(), gx.mutable_data_ptr<float>(), p);
  else if (x.scalar_type() == at::kDouble)
    backward_any(x.const_data_ptr<double>(), gy.const_data_ptr<double>(),
                 win.const_data_ptr<uint8_t>(), gx.mutable_data_ptr<double>(), p);
  else
    backward_any(reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()),
                 reinterpret_cast<const uint16_t*>(gy.const_data_ptr<at::BFloat16>()),
                 win.const_data_ptr<uint8_t>(),
                 reinterpret_cast<uint16_t*>(gx.mutable_data_ptr<at::BFloat16>()), p);
  return gx;
}

}  // namespace

// The CPU kernels of the operators that alexnet.lrn_pool defines (their schemas, fake
// implementations and autograd are registered from Python with torch.library).
TORCH_LIBRARY_IMPL(alexnet, CPU, m) {
  m.impl("lrn_max_pool", &lrn_max_pool);
  m.impl("lrn_max_pool_backward", &lrn_max_pool_backward);
}
