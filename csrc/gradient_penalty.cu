// Hidden-unit part of the gradient penalty for a one-hidden-layer MLPCritic, with its
// analytic backward (see mdm_cuda.h): U = w ⊙ σ'(Q + b1) and, given dU,
// dQ = dU ⊙ w ⊙ σ''(Q + b1), dw = Σ_n dU ⊙ σ'(Q + b1), db1 = Σ_n dQ.
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace mdm {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;
constexpr int kMaxRowBlocks = 1024;

__global__ void __launch_bounds__(kThreads)
gp_hidden_forward_kernel(const float* __restrict__ Q, int64_t total, int64_t H,
                         const float* __restrict__ b1, const float* __restrict__ w, int act,
                         float* __restrict__ U) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t h = e % H;
    U[e] = w[h] * act_grad(Q[e] + b1[h], act);
  }
}

// Threads own columns h (coalesced over a row), blocks stride over rows; column sums are
// kept in registers and flushed once per block.
__global__ void __launch_bounds__(kThreads)
gp_hidden_backward_kernel(const float* __restrict__ Q, int64_t N, int64_t H,
                          const float* __restrict__ b1, const float* __restrict__ w, int act,
                          const float* __restrict__ dU, float* __restrict__ dQ,
                          float* __restrict__ dw, float* __restrict__ db1) {
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float bh = b1[h], wh = w[h];
    float acc_w = 0.0f, acc_b = 0.0f;
    for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
      const int64_t e = n * H + h;
      const float a = Q[e] + bh;
      const float du = dU[e];
      const float dq = du * wh * act_grad2(a, act);
      dQ[e] = dq;
      acc_w += du * act_grad(a, act);
      acc_b += dq;
    }
    atomicAdd(&dw[h], acc_w);
    atomicAdd(&db1[h], acc_b);
  }
}

void check_gp(int64_t N, int64_t H, int act) {
  if (N < 1 || H < 1)
    throw std::invalid_argument("mdm_kernels._cuda: gradient penalty needs N, H >= 1");
  if (act < kRelu || act > kGelu)
    throw std::invalid_argument("mdm_kernels._cuda: unknown activation code");
}

}  // namespace

void gp_hidden_forward(std::uintptr_t Q, int64_t N, int64_t H, std::uintptr_t b1,
                       std::uintptr_t w, int act, std::uintptr_t U, int device,
                       std::uintptr_t stream) {
  check_gp(N, H, act);
  MDM_CUDA_CHECK(cudaSetDevice(device));
  const int64_t total = N * H;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  gp_hidden_forward_kernel<<<int(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const float*>(Q), total, H, reinterpret_cast<const float*>(b1),
      reinterpret_cast<const float*>(w), act, reinterpret_cast<float*>(U));
  MDM_CUDA_CHECK(cudaGetLastError());
}

void gp_hidden_backward(std::uintptr_t Q, int64_t N, int64_t H, std::uintptr_t b1,
                        std::uintptr_t w, int act, std::uintptr_t dU, std::uintptr_t dQ,
                        std::uintptr_t dw, std::uintptr_t db1, int device,
                        std::uintptr_t stream) {
  check_gp(N, H, act);
  MDM_CUDA_CHECK(cudaSetDevice(device));
  const int blocks = int(N < kMaxRowBlocks ? N : kMaxRowBlocks);
  gp_hidden_backward_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const float*>(Q), N, H, reinterpret_cast<const float*>(b1),
      reinterpret_cast<const float*>(w), act, reinterpret_cast<const float*>(dU),
      reinterpret_cast<float*>(dQ), reinterpret_cast<float*>(dw),
      reinterpret_cast<float*>(db1));
  MDM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mdm
