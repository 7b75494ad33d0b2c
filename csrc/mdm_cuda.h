// Host API of the mdm_kernels CUDA backend (plain C++: bindings.cpp needs no CUDA headers).
// Reading order: after the kernels (device_math.cuh → sample_sets.cuh → critic.cuh →
// critic_bounds_forward.cu → critic_bounds_backward.cu → gradient_penalty.cu) and their launch
// helpers (launch.cuh, launch_utils.cu); read next: bindings.cpp, then
// mdm_kernels/ops/cuda_ops.py (torch.library registration), mdm_kernels/ops/cuda_backend.py.
//
// Every pointer is a raw device address (Python: tensor.data_ptr()), every buffer contiguous;
// `stream` is a cudaStream_t (Python: torch.cuda.current_stream(device).cuda_stream) and
// `device` the CUDA device index the tensors live on.  Each entry point makes `device` current
// for its launches and restores the caller's current device before returning (DeviceGuard).
// Kernels are launched asynchronously on `stream`; launch errors raise std::runtime_error,
// argument errors std::invalid_argument (Python: RuntimeError / ValueError).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mdm {

constexpr int kMaxModalities = 8;            // m ≤ 8 (one template instantiation per m)
constexpr int64_t kMaxHidden = 4096;         // H ≤ 4096 (block-shared gradient accumulators)
constexpr int64_t kMaxBatch = int64_t(1) << 30;  // B ≤ 2^30 (rows as int32 in backward tiles)
constexpr int kPartialFloats = 3;            // a statistic's partial: Σ, LSE max, LSE sum
constexpr int kMaxPartials = 1024;           // blocks of a forward reduction
// float32 workspace the forward needs: partial statistics of the joint and marginal sets.
constexpr int64_t kWorkspaceFloats = 2 * int64_t(kMaxPartials) * kPartialFloats;
// Largest chunk of flat sample ids whose dL/dT the backward buffers at once (64 MB floats).
// Both sizes below can be lowered at compile time; the host-emulation tests do, so that small
// grids take the multi-chunk / multi-row paths.
#ifndef MDM_SCORE_CHUNK_SAMPLES
#define MDM_SCORE_CHUNK_SAMPLES (int64_t(1) << 24)
#endif
constexpr int64_t kScoreChunkSamples = MDM_SCORE_CHUNK_SAMPLES;
// Gradient-penalty backward: at most this many per-block partial rows of dw, db1.
#ifndef MDM_GP_MAX_PARTIAL_ROWS
#define MDM_GP_MAX_PARTIAL_ROWS 1024
#endif
constexpr int64_t kGpMaxPartialRows = MDM_GP_MAX_PARTIAL_ROWS;

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// Estimator kinds, in the order of mdm_kernels.reference.estimators.KINDS.
enum Kind : int { kDV = 0, kNWJ = 1, kJS = 2, kInfoNCE = 3, kWasserstein = 4 };
// Marginal samples: explicit perms (K, m, B), the "all" grid B^m, or its pairwise-distinct
// part (B(B−1)···(B−m+1) samples; InfoNCE: the B − 1 candidates j ≠ i of each anchor).
enum Negatives : int { kNegPerms = 0, kNegAll = 1, kNegDistinct = 2 };

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
  int negatives = kNegPerms;
  std::uintptr_t perms = 0;    // int64 (K, m, B) when negatives == kNegPerms
  int64_t K = 0;
};

// Forward: terms (float32, 2) = (joint_term, marginal_term); stats (float32, B + 1):
// stats[i] = InfoNCE per-anchor log Σ_c exp T(i, c); stats[B] = log Σ_M exp T for dv/nwj
// (0 for the other kinds, which need no LSE).  workspace: float32, kWorkspaceFloats.
void bounds_forward(const CriticArgs& c, const SampleArgs& s, std::uintptr_t terms,
                    std::uintptr_t stats, std::uintptr_t workspace, int device,
                    std::uintptr_t stream);

// Floats of the dL/dT buffer bounds_backward needs (the largest chunk of either set).
int64_t backward_buffer_floats(int64_t B, int m, int kind, int negatives, int64_t K);

// Number of CSR owner lists (slots) and their length for the perms-based sets: (m, K·B) for
// shuffles/perms, (1, B·(K+1)) for InfoNCE perms, (0, 0) for the grids.
std::vector<int64_t> owner_list_shape(int64_t B, int m, int kind, int negatives, int64_t K);

// Backward: grad_terms (float32, 2) = upstream (dL/djoint, dL/dmarginal); terms/stats from
// the forward; owner_order (slots, len) and owner_offsets (slots, B + 1) int64 CSR lists (see
// owner_list_shape; 0 for the grids); score_grads a float32 scratch of backward_buffer_floats.
// Adds (outputs must be zeroed, float32) into dP_k (B × H each), dw_rows (B × H: row r holds
// the dL/dw_out terms of the samples whose first row is r) and db_out_rows (B); the caller
// reduces dw = Σ_r dw_rows[r], db_out = Σ_r db_out_rows[r], db1 = Σ_r dP_1[r].  No atomics:
// bitwise reproducible for the same inputs on the same GPU.
void bounds_backward(const CriticArgs& c, const SampleArgs& s, std::uintptr_t grad_terms,
                     std::uintptr_t terms, std::uintptr_t stats, std::uintptr_t owner_order,
                     std::uintptr_t owner_offsets, std::uintptr_t score_grads,
                     const std::vector<std::uintptr_t>& dP, std::uintptr_t dw_rows,
                     std::uintptr_t db_out_rows, int device, std::uintptr_t stream);

// Gradient penalty, hidden-unit part (one hidden layer).  With the interpolated rows x̂_n
// projected by the caller's GEMM, Q = X̂ W1ᵀ (N × H float32), the critic's input gradient is
// g_n = W1ᵀ u_n with u_n = w ⊙ σ'(Q_n + b1).  The caller forms g = U W1 and the penalty
// (‖g‖ − 1)² with first-order torch ops; these kernels compute u and its analytic backward, so
// the whole penalty needs no double backward.
//   gp_hidden_forward:  U = w ⊙ σ'(Q + b1)                                  (N × H)
//   gp_hidden_backward: given dU (N × H): dQ = dU ⊙ w ⊙ σ''(Q + b1)         (N × H)
//                       partial rows p (rows ≤ kGpMaxPartialRows) of
//                       dw = Σ_n dU ⊙ σ'(Q + b1) and db1 = Σ_n dQ: dw_part, db1_part
//                       (rows × H, overwritten); the caller sums them over rows.
void gp_hidden_forward(std::uintptr_t Q, int64_t N, int64_t H, std::uintptr_t b1,
                       std::uintptr_t w, int act, std::uintptr_t U, int device,
                       std::uintptr_t stream);
void gp_hidden_backward(std::uintptr_t Q, int64_t N, int64_t H, std::uintptr_t b1,
                        std::uintptr_t w, int act, std::uintptr_t dU, std::uintptr_t dQ,
                        int64_t partial_rows, std::uintptr_t dw_part, std::uintptr_t db1_part,
                        int device, std::uintptr_t stream);

// Host-side checks of the index logic the kernels run (same __host__ __device__ code):
// the flat ids owned by (class, row r) of the chunk `chunk` of a grid set (joint, "all",
// "distinct", InfoNCE grids; role 0: joint set, 1: marginal set), and each chunk's
// (lead0, lead1, n0, n1).
std::vector<int64_t> owner_samples(int64_t B, int m, int kind, int negatives, int role,
                                   int cls, int64_t r, int64_t chunk);
std::vector<std::vector<int64_t>> backward_chunks(int64_t B, int m, int kind, int negatives,
                                                  int role);

// Architectures compiled in (e.g. "sm_80 sm_90 compute_90"), set by the build.
std::string compiled_archs();

}  // namespace mdm
