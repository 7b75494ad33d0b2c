// Device math shared by every kernel (reading order: 1 of the CUDA sources — then
// sample_sets.cuh, critic.cuh, the kernels critic_bounds_forward.cu, critic_bounds_backward.cu,
// gradient_penalty.cu, their launch helpers launch.cuh / launch_utils.cu, the host API
// mdm_cuda.h, bindings.cpp, and on the Python side mdm_kernels/ops/cuda_ops.py (torch.library
// registration) and mdm_kernels/ops/cuda_backend.py (the backend object)).
//
// Storage-type conversion, activations σ, σ', σ'', the online log-sum-exp and the warp/block
// reductions of score statistics.  Every kernel accumulates in float32 whatever the storage
// type of the projections (float, __half, __nv_bfloat16).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <cstdint>

#include "mdm_cuda.h"

// Kernel launch and dynamic shared memory, spelled as macros so that the kernels also compile
// as plain C++ for the host emulation of tests/cuda_emulation/ (which defines both first).
#ifndef MDM_LAUNCH
#define MDM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
#ifndef MDM_DYNAMIC_SHARED
#define MDM_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace mdm {

// ---------------------------------------------------------------- storage conversion
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// ---------------------------------------------------------------- activations
// Codes match mdm_kernels.ops.cuda_ops.ACTIVATION_CODES.  Formulas (overflow-safe in float32):
//   relu        σ = max(x,0)                 σ' = [x>0]            σ'' = 0
//   leaky_relu  σ = x>0 ? x : 0.01x          σ' = x>0 ? 1 : 0.01   σ'' = 0
//   tanh        σ = tanhf(x)                 σ' = 1 − σ²           σ'' = −2σσ'
//   softplus    σ = max(x,0)+log1p(e^{−|x|}) σ' = sigmoid(x) = s   σ'' = s(1−s)
//   gelu        σ = xΦ(x)                    σ' = Φ + xφ           σ'' = φ(2 − x²)
// tanh uses the library tanhf (a few ulp everywhere), not 1 − 2/(e^{2x}+1), whose relative
// error near 0 is ~1e-4 even in exact float32 arithmetic (cancellation).
enum Activation : int { kRelu = 0, kLeakyRelu = 1, kTanh = 2, kSoftplus = 3, kGelu = 4 };

constexpr float kLeakySlope = 0.01f;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float softplusf_(float x) {
  return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}

__device__ __forceinline__ float act_fwd(float x, int act) {
  switch (act) {
    case kRelu: return fmaxf(x, 0.0f);
    case kLeakyRelu: return x > 0.0f ? x : kLeakySlope * x;
    case kTanh: return tanhf(x);
    case kSoftplus: return softplusf_(x);
    default: return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  }
}

__device__ __forceinline__ float act_grad(float x, int act) {
  switch (act) {
    case kRelu: return x > 0.0f ? 1.0f : 0.0f;
    case kLeakyRelu: return x > 0.0f ? 1.0f : kLeakySlope;
    case kTanh: { const float t = tanhf(x); return 1.0f - t * t; }
    case kSoftplus: return sigmoidf_(x);
    default: {
      const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
      const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
      return cdf + x * pdf;
    }
  }
}

__device__ __forceinline__ float act_grad2(float x, int act) {
  switch (act) {
    case kRelu:
    case kLeakyRelu: return 0.0f;
    case kTanh: { const float t = tanhf(x); return -2.0f * t * (1.0f - t * t); }
    case kSoftplus: { const float s = sigmoidf_(x); return s * (1.0f - s); }
    default: {
      const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
      return pdf * (2.0f - x * x);
    }
  }
}

// ---------------------------------------------------------------- online log-sum-exp
// (max, Σ exp(x − max)); empty state is (−inf, 0).  log Σ exp x = max + log(sum).
struct Lse {
  float m;
  float s;
};

__device__ __forceinline__ Lse lse_empty() { return Lse{-CUDART_INF_F, 0.0f}; }

__device__ __forceinline__ void lse_update(Lse& a, float x) {
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;  // a.m = −inf: exp(−inf) = 0, a.s = 0 anyway
    a.m = x;
  } else {
    a.s += expf(x - a.m);
  }
}

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b) {
  if (b.m == -CUDART_INF_F) return a;
  if (a.m == -CUDART_INF_F) return b;
  const float mx = fmaxf(a.m, b.m);
  return Lse{mx, a.s * expf(a.m - mx) + b.s * expf(b.m - mx)};
}

__device__ __forceinline__ float lse_value(Lse a) { return a.m + logf(a.s); }

// ---------------------------------------------------------------- reductions
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// Butterfly sum: every lane ends with the total (so warp-uniform control flow follows).
// The order of additions is fixed, so results are bitwise reproducible.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ Lse warp_lse(Lse v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const Lse o{__shfl_xor_sync(kFullMask, v.m, off), __shfl_xor_sync(kFullMask, v.s, off)};
    v = lse_merge(v, o);
  }
  return v;
}

__device__ __forceinline__ float zero_float() { return 0.0f; }

// Block-wide merge of one value per warp (lane 0's) with the warp reduction Reduce and its
// identity Empty; the result is valid in warp 0 (thread 0).  `shared` holds blockDim.x / 32
// entries.  Contains two __syncthreads: every thread of the block must call it.
template <typename T, T (*Empty)(), T (*Reduce)(T)>
__device__ __forceinline__ T block_reduce(T v, T* shared) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = Empty();
  if (warp == 0) {
    if (lane < nwarps) r = shared[lane];
    r = Reduce(r);
  }
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_sum(float v, float* shared) {
  return block_reduce<float, zero_float, warp_sum>(v, shared);
}

__device__ __forceinline__ Lse block_lse(Lse v, Lse* shared) {
  return block_reduce<Lse, lse_empty, warp_lse>(v, shared);
}

// ---------------------------------------------------------------- score statistics
// The one statistic a sample set needs for the active estimator (nothing else is computed):
//   kStatSumT           Σ T               joint term of dv/nwj/infonce/wasserstein, marginal of wasserstein
//   kStatSumSoftplus    Σ softplus(T)     JS marginal term
//   kStatSumSoftplusNeg Σ softplus(−T)    JS joint term
//   kStatLse            log Σ exp T       dv/nwj marginal term (online, max-shifted)
enum Statistic : int { kStatSumT = 0, kStatSumSoftplus = 1, kStatSumSoftplusNeg = 2, kStatLse = 3 };

// Accumulator of one statistic: a sum (lse unused) or an online LSE (sum unused).
struct StatAcc {
  float sum;
  Lse lse;
};
static_assert(sizeof(StatAcc) == kPartialFloats * sizeof(float), "StatAcc layout");

__device__ __forceinline__ StatAcc stat_empty() { return StatAcc{0.0f, lse_empty()}; }

__device__ __forceinline__ void stat_add(StatAcc& a, int stat, float t) {
  switch (stat) {
    case kStatSumT: a.sum += t; break;
    case kStatSumSoftplus: a.sum += softplusf_(t); break;
    case kStatSumSoftplusNeg: a.sum += softplusf_(-t); break;
    default: lse_update(a.lse, t); break;
  }
}

__device__ __forceinline__ StatAcc stat_merge(StatAcc a, StatAcc b, int stat) {
  if (stat == kStatLse) return StatAcc{0.0f, lse_merge(a.lse, b.lse)};
  return StatAcc{a.sum + b.sum, lse_empty()};
}

// Block merge of one accumulator per warp (lane 0's: the kernels that score one sample per
// warp hold the same value in every lane); stat is block-uniform; valid in thread 0.
// `shared` holds blockDim.x / 32 Lse entries.
__device__ __forceinline__ StatAcc block_stat_of_warps(StatAcc v, int stat, Lse* shared) {
  if (stat == kStatLse) return StatAcc{0.0f, block_lse(v.lse, shared)};
  return StatAcc{block_sum(v.sum, reinterpret_cast<float*>(shared)), lse_empty()};
}

// Block merge of one accumulator per thread (warp reduction first); valid in thread 0.
__device__ __forceinline__ StatAcc block_stat_of_threads(StatAcc v, int stat, Lse* shared) {
  if (stat == kStatLse) {
    v.lse = warp_lse(v.lse);
  } else {
    v.sum = warp_sum(v.sum);
  }
  return block_stat_of_warps(v, stat, shared);
}

}  // namespace mdm
