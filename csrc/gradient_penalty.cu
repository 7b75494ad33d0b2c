// Hidden-unit part of the gradient penalty for a one-hidden-layer MLPCritic, with its
// analytic backward (reading order: 6, after critic_bounds_backward.cu).
//
// Math (Gulrajani et al., NeurIPS 2017).  For T(x) = w · σ(W1 x + b1) + b_out the input
// gradient is ∇_x T = W1ᵀ u with u = w ⊙ σ'(W1 x + b1).  With Q = X̂ W1ᵀ (a torch GEMM):
//   forward   U = w ⊙ σ'(Q + b1)                          (N × H)
//   backward  given dU = dL/dU:
//             dQ  = dU ⊙ w ⊙ σ''(Q + b1)                  (N × H)
//             dw  = Σ_n dU_n ⊙ σ'(Q_n + b1)               (H)
//             db1 = Σ_n dQ_n                              (H)
// so the penalty mean (‖U W1‖ − 1)² needs only first-order autograd (no double backward).
// The column sums are per-block partial rows (each block owns rows n ≡ block mod grid, one
// thread per column) that the caller sums: no atomics, bitwise reproducible.
#include "launch.cuh"

namespace mdm {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

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
// kept in registers and written once per block as partial row blockIdx.x.
__global__ void __launch_bounds__(kThreads)
gp_hidden_backward_kernel(const float* __restrict__ Q, int64_t N, int64_t H,
                          const float* __restrict__ b1, const float* __restrict__ w, int act,
                          const float* __restrict__ dU, float* __restrict__ dQ,
                          float* __restrict__ dw_part, float* __restrict__ db1_part) {
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
    dw_part[int64_t(blockIdx.x) * H + h] = acc_w;
    db1_part[int64_t(blockIdx.x) * H + h] = acc_b;
  }
}

void check_gp(int64_t N, int64_t H, int act) {
  if (N < 1 || H < 1) invalid("gradient penalty needs N, H >= 1");
  if (act < kRelu || act > kGelu) invalid("unknown activation code " + std::to_string(act));
}

}  // namespace

void gp_hidden_forward(std::uintptr_t Q, int64_t N, int64_t H, std::uintptr_t b1,
                       std::uintptr_t w, int act, std::uintptr_t U, int device,
                       std::uintptr_t stream) {
  check_gp(N, H, act);
  DeviceGuard guard(device);
  const int64_t total = N * H;
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  MDM_LAUNCH(int(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream),
             gp_hidden_forward_kernel)(
      reinterpret_cast<const float*>(Q), total, H, reinterpret_cast<const float*>(b1),
      reinterpret_cast<const float*>(w), act, reinterpret_cast<float*>(U));
  MDM_CUDA_CHECK(cudaGetLastError());
}

void gp_hidden_backward(std::uintptr_t Q, int64_t N, int64_t H, std::uintptr_t b1,
                        std::uintptr_t w, int act, std::uintptr_t dU, std::uintptr_t dQ,
                        int64_t partial_rows, std::uintptr_t dw_part, std::uintptr_t db1_part,
                        int device, std::uintptr_t stream) {
  check_gp(N, H, act);
  if (partial_rows < 1 || partial_rows > kGpMaxPartialRows || partial_rows > N)
    invalid("partial_rows must be in 1..min(N, " + std::to_string(kGpMaxPartialRows) +
            "), got " + std::to_string(partial_rows));
  DeviceGuard guard(device);
  MDM_LAUNCH(int(partial_rows), kThreads, 0, reinterpret_cast<cudaStream_t>(stream),
             gp_hidden_backward_kernel)(
      reinterpret_cast<const float*>(Q), N, H, reinterpret_cast<const float*>(b1),
      reinterpret_cast<const float*>(w), act, reinterpret_cast<const float*>(dU),
      reinterpret_cast<float*>(dQ), reinterpret_cast<float*>(dw_part),
      reinterpret_cast<float*>(db1_part));
  MDM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mdm
