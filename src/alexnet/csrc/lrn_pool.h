// The fused ReLU -> LRN -> max-pool kernels (lrn_pool.cpp), as the operator (lrn_pool_op.cpp)
// calls them: maps in channels_last, float32, bfloat16 (as uint16_t) or float64.
#pragma once
#include <cstdint>

namespace alexnet_lrn_pool {

struct Params {
  int64_t n, h, w, c, groups, size, z, s, ho, wo;  // input N, H, W, C; groups; window; pool; out
  double k, alpha, beta;
  int relu, threads;
};

enum class Dtype { f32, bf16, f64 };

// y: (n, ho, wo, c); win: each window's winner (row-major index in the window), or null.
void forward(Dtype dtype, const void* x, void* y, uint8_t* win, const Params& p);
// gx: (n, h, w, c), from x, the pooled gradient gy and the forward's winners.
void backward(Dtype dtype, const void* x, const void* gy, const uint8_t* win, void* gx,
              const Params& p);

}  // namespace alexnet_lrn_pool
