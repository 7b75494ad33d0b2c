// Host API of the mdm_kernels CUDA backend (plain C++: bindings.cpp needs no CUDA headers).
//
// Every pointer is a raw device address (Python: tensor.data_ptr()), every buffer contiguous;
// `stream` is a cudaStream_t (Python: torch.cuda.current_stream().cuda_stream) and `device`
// the CUDA device index the tensors live on.  Kernels are launched asynchronously on `stream`;
// launch errors raise std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mdm {

constexpr int kMaxModalities = 8;   // m ≤ 8
constexpr int64_t kMaxHidden = 4096;  // H ≤ 4096 (block-shared gradient accumulators)
constexpr int kStatsFloats = 5;      // Σ T, Σ softplus(T), Σ softplus(−T), LSE max, LSE sum
constexpr int kMaxPartials = 1024;   // blocks of a forward reduction
// float32 workspace the forward needs: partial statistics of the joint and marginal sets.
constexpr int64_t kWorkspaceFloats = 2 * int64_t(kMaxPartials) * kStatsFloats;

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// Estimator kinds, in the order of mdm_kernels.reference.estimators.KINDS.
enum Kind : int { kDV = 0, kNWJ = 1, kJS = 2, kInfoNCE = 3, kWasserstein = 4 };

struct CriticArgs {
  std::vector<std::uintptr_t> P;  // m projections P_k (B × H), storage dtype `dtype`
  int64_t B = 0;
  int64_t H = 0;
  int dtype = kFloat32;
  std::uintptr_t b1 = 0, w = 0, b_out = 0;  // float32 (H), (H), (1)
  int act = 0;                               // activation code
};

struct SampleArgs {
  int kind = kDV;
  bool all = false;            // negatives="all" (perms unused)
  std::uintptr_t perms = 0;    // int64 (K, m, B) when !all
  int64_t K = 0;
};

// Forward: terms (float32, 2) = (joint_term, marginal_term); stats (float32, B + 1):
// stats[i] = InfoNCE per-anchor log Σ_c exp T(i, c), stats[B] = log Σ_M exp T (marginal set).
// workspace: float32, kWorkspaceFloats.
void bounds_forward(const CriticArgs& c, const SampleArgs& s, std::uintptr_t terms,
                    std::uintptr_t stats, std::uintptr_t workspace, int device,
                    std::uintptr_t stream);

// Backward: grad_terms (float32, 2) = upstream (dL/djoint, dL/dmarginal); terms/stats from
// the forward.  Accumulates (outputs must be zeroed, float32): dP_k (B × H each), db1 (H),
// dw (H), db_out (1).
void bounds_backward(const CriticArgs& c, const SampleArgs& s, std::uintptr_t grad_terms,
                     std::uintptr_t terms, std::uintptr_t stats,
                     const std::vector<std::uintptr_t>& dP, std::uintptr_t db1,
                     std::uintptr_t dw, std::uintptr_t db_out, int device,
                     std::uintptr_t stream);

// Gradient penalty, hidden-unit part (one hidden layer).  With the interpolated rows x̂_n
// projected by the caller's GEMM, Q = X̂ W1ᵀ (N × H float32), the critic's input gradient is
// g_n = W1ᵀ u_n with u_n = w ⊙ σ'(Q_n + b1).  The caller forms g = U W1 and the penalty
// (‖g‖ − 1)² with first-order torch ops; these kernels compute u and its analytic backward, so
// the whole penalty needs no double backward.
//   gp_hidden_forward:  U = w ⊙ σ'(Q + b1)                                  (N × H)
//   gp_hidden_backward: given dU (N × H): dQ = dU ⊙ w ⊙ σ''(Q + b1)         (N × H)
//                       dw = Σ_n dU ⊙ σ'(Q + b1), db1 = Σ_n dQ  (H, accumulated: zero them)
void gp_hidden_forward(std::uintptr_t Q, int64_t N, int64_t H, std::uintptr_t b1,
                       std::uintptr_t w, int act, std::uintptr_t U, int device,
                       std::uintptr_t stream);
void gp_hidden_backward(std::uintptr_t Q, int64_t N, int64_t H, std::uintptr_t b1,
                        std::uintptr_t w, int act, std::uintptr_t dU, std::uintptr_t dQ,
                        std::uintptr_t dw, std::uintptr_t db1, int device,
                        std::uintptr_t stream);

// Architectures compiled in (e.g. "sm_80 sm_90 compute_90"), set by the build.
std::string compiled_archs();

}  // namespace mdm
