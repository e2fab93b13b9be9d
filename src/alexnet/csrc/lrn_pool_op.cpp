// The CPU kernels of the torch.library operators alexnet::lrn_max_pool and
// alexnet::lrn_max_pool_backward (their schemas, fake implementations and autograd are defined
// in alexnet/lrn_pool.py): checks, output tensors, and a call of the kernels in lrn_pool.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "lrn_pool.h"

namespace {

using alexnet_lrn_pool::Dtype;
using alexnet_lrn_pool::Params;

Dtype dtype_of(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat ? Dtype::f32
         : x.scalar_type() == at::kDouble ? Dtype::f64
                                          : Dtype::bf16;
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
  alexnet_lrn_pool::forward(dtype_of(x), x.const_data_ptr(), y.mutable_data_ptr(), wp, p);
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
  alexnet_lrn_pool::backward(dtype_of(x), x.const_data_ptr(), gy.const_data_ptr(),
                             win.const_data_ptr<uint8_t>(), gx.mutable_data_ptr(), p);
  return gx;
}

}  // namespace

// The CPU kernels of the operators that alexnet.lrn_pool defines (their schemas, fake
// implementations and autograd are registered from Python with torch.library).
TORCH_LIBRARY_IMPL(alexnet, CPU, m) {
  m.impl("lrn_max_pool", &lrn_max_pool);
  m.impl("lrn_max_pool_backward", &lrn_max_pool_backward);
}
