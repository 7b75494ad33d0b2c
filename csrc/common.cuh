// Shared device helpers for the mdm_kernels CUDA backend, written once and used by every
// kernel: storage-type conversion, activations and their derivatives, the online
// log-sum-exp, warp/block reductions and the decoding of marginal-sample indices.
//
// Every kernel accumulates in float32 whatever the storage type of the projections
// (float, __half, __nv_bfloat16).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>
#include <cstdint>

#include "mdm_cuda.h"

namespace mdm {

// Raises std::runtime_error naming the failed call (defined in launch_utils.cu).
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);

// ---------------------------------------------------------------- storage conversion
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// ---------------------------------------------------------------- activations
// Codes match mdm_kernels.ops.common.ACTIVATION_CODES.  Formulas (overflow-safe in float32):
//   relu        σ = max(x,0)                 σ' = [x>0]            σ'' = 0
//   leaky_relu  σ = x>0 ? x : 0.01x          σ' = x>0 ? 1 : 0.01   σ'' = 0
//   tanh        σ = 1 − 2/(e^{2x}+1)         σ' = 1 − σ²           σ'' = −2σσ'
//   softplus    σ = max(x,0)+log1p(e^{−|x|}) σ' = sigmoid(x) = s   σ'' = s(1−s)
//   gelu        σ = xΦ(x)                    σ' = Φ + xφ           σ'' = φ(2 − x²)
enum Activation : int { kRelu = 0, kLeakyRelu = 1, kTanh = 2, kSoftplus = 3, kGelu = 4 };

constexpr float kLeakySlope = 0.01f;
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float softplusf_(float x) {
  return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x)));
}
__device__ __forceinline__ float tanh_exp(float x) { return 1.0f - 2.0f / (expf(2.0f * x) + 1.0f); }

__device__ __forceinline__ float act_fwd(float x, int act) {
  switch (act) {
    case kRelu: return fmaxf(x, 0.0f);
    case kLeakyRelu: return x > 0.0f ? x : kLeakySlope * x;
    case kTanh: return tanh_exp(x);
    case kSoftplus: return softplusf_(x);
    default: return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
  }
}

__device__ __forceinline__ float act_grad(float x, int act) {
  switch (act) {
    case kRelu: return x > 0.0f ? 1.0f : 0.0f;
    case kLeakyRelu: return x > 0.0f ? 1.0f : kLeakySlope;
    case kTanh: { float t = tanh_exp(x); return 1.0f - t * t; }
    case kSoftplus: return sigmoidf_(x);
    default: {
      float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
      float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
      return cdf + x * pdf;
    }
  }
}

__device__ __forceinline__ float act_grad2(float x, int act) {
  switch (act) {
    case kRelu:
    case kLeakyRelu: return 0.0f;
    case kTanh: { float t = tanh_exp(x); return -2.0f * t * (1.0f - t * t); }
    case kSoftplus: { float s = sigmoidf_(x); return s * (1.0f - s); }
    default: {
      float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
      return pdf * (2.0f - x * x);
    }
  }
}

// σ, σ' and σ'' at once (for the gradient penalty).
__device__ __forceinline__ void act_all(float x, int act, float& a, float& d1, float& d2) {
  a = act_fwd(x, act);
  d1 = act_grad(x, act);
  d2 = act_grad2(x, act);
}

// ---------------------------------------------------------------- online log-sum-exp
// (max, Σ exp(x − max)); empty state is (−inf, 0).
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
  float mx = fmaxf(a.m, b.m);
  return Lse{mx, a.s * expf(a.m - mx) + b.s * expf(b.m - mx)};
}

__device__ __forceinline__ float lse_value(Lse a) { return a.m + logf(a.s); }

// ---------------------------------------------------------------- reductions
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// Butterfly sum: every lane ends with the total (so warp-uniform control flow follows).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ Lse warp_lse(Lse v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    Lse o{__shfl_xor_sync(kFullMask, v.m, off), __shfl_xor_sync(kFullMask, v.s, off)};
    v = lse_merge(v, o);
  }
  return v;
}

// Partial statistics of a set of scores: Σ T, Σ softplus(T), Σ softplus(−T), LSE of T.
struct Stats {
  float sum_t;
  float sum_sp_pos;
  float sum_sp_neg;
  Lse lse;
};
static_assert(sizeof(Stats) == kStatsFloats * sizeof(float), "Stats layout");

__device__ __forceinline__ Stats stats_empty() { return Stats{0.0f, 0.0f, 0.0f, lse_empty()}; }

__device__ __forceinline__ void stats_add(Stats& a, float t) {
  a.sum_t += t;
  a.sum_sp_pos += softplusf_(t);
  a.sum_sp_neg += softplusf_(-t);
  lse_update(a.lse, t);
}

__device__ __forceinline__ Stats stats_merge(Stats a, Stats b) {
  return Stats{a.sum_t + b.sum_t, a.sum_sp_pos + b.sum_sp_pos, a.sum_sp_neg + b.sum_sp_neg,
               lse_merge(a.lse, b.lse)};
}

__device__ __forceinline__ Stats warp_stats(Stats v) {
  v.sum_t = warp_sum(v.sum_t);
  v.sum_sp_pos = warp_sum(v.sum_sp_pos);
  v.sum_sp_neg = warp_sum(v.sum_sp_neg);
  v.lse = warp_lse(v.lse);
  return v;
}

// Block-wide merge of one T per warp (lane 0's value) with the warp reduction Reduce and
// its identity Empty; result valid in thread 0.  `shared` must hold blockDim.x / 32 entries.
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

__device__ __forceinline__ Stats block_stats(Stats v, Stats* shared) {
  return block_reduce<Stats, stats_empty, warp_stats>(v, shared);
}

__device__ __forceinline__ Lse block_lse(Lse v, Lse* shared) {
  return block_reduce<Lse, lse_empty, warp_lse>(v, shared);
}

// ---------------------------------------------------------------- sample index decoding
// Which rows (i_1, ..., i_m) form sample n of a sample set.
enum SetKind : int {
  kSetJoint = 0,         // n < B: (n, ..., n)
  kSetPerms = 1,         // n < K·B: k = n / B, i = n % B, i_j = perms[k, j, i]
  kSetAll = 2,           // n < B^m: row-major, i_1 slowest (negatives.all_grid_indices)
  kSetInfoNceAll = 3,    // n < B·B: anchor i = n / B, candidate c = n % B
  kSetInfoNcePerms = 4,  // n < B·(K+1): anchor i = n / C, c = 0 → i, else perms[c−1, 1, i]
};

struct SampleSet {
  int kind;
  int m;
  int64_t B;
  int64_t K;
  int64_t count;  // number of samples
  int64_t C;      // InfoNCE candidates per anchor
  const int64_t* perms;  // (K, m, B) contiguous, or nullptr
};

// Candidate row c of anchor i (InfoNCE: modalities 2..m take this row together).
__device__ __forceinline__ int64_t infonce_candidate(const SampleSet& s, int64_t i, int64_t c) {
  if (s.kind == kSetInfoNceAll) return c;
  return c == 0 ? i : s.perms[((c - 1) * s.m + 1) * s.B + i];
}

// Fills idx[0..m) for sample n; returns the anchor (InfoNCE) or −1.
__device__ __forceinline__ int64_t decode_sample(const SampleSet& s, int64_t n, int64_t* idx) {
  switch (s.kind) {
    case kSetJoint:
      for (int j = 0; j < s.m; ++j) idx[j] = n;
      return -1;
    case kSetPerms: {
      const int64_t k = n / s.B, i = n - k * s.B;
      for (int j = 0; j < s.m; ++j) idx[j] = s.perms[(k * s.m + j) * s.B + i];
      return -1;
    }
    case kSetAll: {
      for (int j = s.m - 1; j >= 0; --j) {
        const int64_t q = n / s.B;
        idx[j] = n - q * s.B;
        n = q;
      }
      return -1;
    }
    default: {
      const int64_t i = n / s.C, c = n - i * s.C;
      const int64_t cand = infonce_candidate(s, i, c);
      idx[0] = i;
      for (int j = 1; j < s.m; ++j) idx[j] = cand;
      return i;
    }
  }
}

// ---------------------------------------------------------------- critic parameters
// One-hidden-layer MLPCritic after the split first layer: P_k (B × H, storage type T),
// b1 (H), w_out (H), b_out (1), all float32 except the projections.
template <typename T>
struct Critic1 {
  const T* P[kMaxModalities];
  const float* b1;
  const float* w;
  const float* b_out;
  int m;
  int64_t H;
  int act;
};

// First-layer pre-activation of sample idx at hidden unit h.
template <typename T>
__device__ __forceinline__ float preact(const Critic1<T>& c, const int64_t* idx, int64_t h) {
  float pre = c.b1[h];
  for (int k = 0; k < c.m; ++k) pre += to_float(c.P[k][idx[k] * c.H + h]);
  return pre;
}

// Score T(sample) computed by one warp (lanes stride over H); every lane gets the result.
template <typename T>
__device__ __forceinline__ float warp_score(const Critic1<T>& c, const int64_t* idx, int lane) {
  float acc = 0.0f;
  for (int64_t h = lane; h < c.H; h += kWarp) acc += c.w[h] * act_fwd(preact(c, idx, h), c.act);
  return warp_sum(acc) + c.b_out[0];
}

}  // namespace mdm

#define MDM_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    if (err_ != cudaSuccess) mdm::throw_cuda_error(err_, #expr, __FILE__, __LINE__);  \
  } while (0)
