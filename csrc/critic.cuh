// The one-hidden-layer MLPCritic as the kernels see it (reading order: 3, after
// sample_sets.cuh): the per-modality projections P_k = z_k W_{1,k}ᵀ (B × H, storage type T),
// b1 (H), w_out (H), b_out (1), all float32 except the projections.
//
// Score of sample (i_1, ..., i_m):
//   pre_h = b1_h + Σ_k P_k[i_k, h]      (the split first layer: never a concatenated input)
//   T     = Σ_h w_h σ(pre_h) + b_out
// M, the number of modalities, is a template parameter: the row indices and projection
// pointers are then indexed by unrolled constants and live in registers (a runtime m gave
// 176–272-byte local-memory stack frames per ptxas; see docs/cuda_backend.md).
#pragma once

#include "device_math.cuh"

namespace mdm {

template <typename T, int M>
struct Critic {
  const T* P[M];
  const float* b1;
  const float* w;
  const float* b_out;
  int64_t H;
  int act;
};

// pre_h = b1_h + Σ_k P_k[idx_k, h].
template <typename T, int M>
__device__ __forceinline__ float preact(const Critic<T, M>& c, const int64_t* idx, int64_t h) {
  float pre = c.b1[h];
#pragma unroll
  for (int k = 0; k < M; ++k) pre += to_float(c.P[k][idx[k] * c.H + h]);
  return pre;
}

// T computed by one warp (lanes stride over H, then a butterfly sum); every lane gets it.
template <typename T, int M>
__device__ __forceinline__ float warp_score(const Critic<T, M>& c, const int64_t* idx, int lane) {
  float acc = 0.0f;
  for (int64_t h = lane; h < c.H; h += kWarp) acc += c.w[h] * act_fwd(preact(c, idx, h), c.act);
  return warp_sum(acc) + c.b_out[0];
}

}  // namespace mdm
