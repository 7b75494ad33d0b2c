// Fused critic scoring + estimator reductions (DV/MINE, NWJ, JS, InfoNCE, Wasserstein) for a
// one-hidden-layer MLPCritic, forward and backward.
//
// A sample (i_1, ..., i_m) is scored by one warp: lanes stride over the H hidden units,
// forming the pre-activation P_1[i_1, h] + ... + P_m[i_m, h] + b1[h] from gathered rows of the
// per-modality projections (never a concatenated input), so a score costs m·H loads and no
// N × H activation is ever stored.  Marginal samples come from explicit perms (K, m, B) or are
// decoded from their flat id for negatives="all" (never materialised).
//
// Forward: per-block partial statistics (Σ T, Σ softplus(±T), online LSE) → one combine
// block that writes (joint_term, marginal_term) and the LSE statistics the backward needs.
// InfoNCE: one block per anchor reduces its candidates' LSE.
// Backward: recomputes each score, turns the upstream scalars into dL/dT_n, and accumulates
// dL/dP_k (scattered atomics), dL/db1, dL/dw_out (block-shared, then global atomics), dL/db_out.
#include <cmath>
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace mdm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kMaxBackwardBlocks = 2048;
constexpr int kMaxAnchorBlocks = 8192;

template <typename T>
__global__ void __launch_bounds__(kThreads)
stats_kernel(Critic1<T> c, SampleSet s, Stats* __restrict__ partials) {
  __shared__ Stats shared[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp;
  const int64_t warp0 = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t nwarps = int64_t(gridDim.x) * kWarpsPerBlock;
  int64_t idx[kMaxModalities];
  Stats acc = stats_empty();
  for (int64_t n = warp0; n < s.count; n += nwarps) {  // warp-uniform loop
    decode_sample(s, n, idx);
    stats_add(acc, warp_score(c, idx, lane));          // every lane holds the same score
  }
  Stats r = block_stats(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = r;
}

// InfoNCE: lse_out[i] = log Σ_{c ∈ C_i} exp T(i, c), one block per anchor.
template <typename T>
__global__ void __launch_bounds__(kThreads)
anchor_lse_kernel(Critic1<T> c, SampleSet s, float* __restrict__ lse_out) {
  __shared__ Lse shared[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int64_t idx[kMaxModalities];
  for (int64_t i = blockIdx.x; i < s.B; i += gridDim.x) {  // block-uniform loop
    Lse acc = lse_empty();
    for (int64_t cc = warp; cc < s.C; cc += kWarpsPerBlock) {
      const int64_t cand = infonce_candidate(s, i, cc);
      idx[0] = i;
      for (int j = 1; j < s.m; ++j) idx[j] = cand;
      lse_update(acc, warp_score(c, idx, lane));
    }
    Lse r = block_lse(acc, shared);
    if (threadIdx.x == 0) lse_out[i] = lse_value(r);
  }
}

// One block: merges the partials and writes terms (2) and stats[B] (marginal log Σ exp T).
__global__ void __launch_bounds__(kThreads)
combine_kernel(const Stats* __restrict__ joint, int n_joint, const Stats* __restrict__ marg,
               int n_marg, float* __restrict__ stats, int64_t B, int kind, float log_n,
               float inv_n, float log_c, float* __restrict__ terms) {
  __shared__ Stats shared[kWarpsPerBlock];
  Stats j = stats_empty(), mg = stats_empty(), anc = stats_empty();
  for (int p = threadIdx.x; p < n_joint; p += blockDim.x) j = stats_merge(j, joint[p]);
  for (int p = threadIdx.x; p < n_marg; p += blockDim.x) mg = stats_merge(mg, marg[p]);
  if (kind == kInfoNCE)
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) anc.sum_t += stats[i];
  j = block_stats(warp_stats(j), shared);
  mg = block_stats(warp_stats(mg), shared);
  anc = block_stats(warp_stats(anc), shared);
  if (threadIdx.x != 0) return;
  const float inv_b = 1.0f / float(B);
  const float lse_m = lse_value(mg.lse);
  float joint_term = (kind == kJS) ? -j.sum_sp_neg * inv_b : j.sum_t * inv_b;
  float marg_term;
  switch (kind) {
    case kDV: marg_term = lse_m - log_n; break;
    case kNWJ: marg_term = expf(lse_m - log_n - 1.0f); break;
    case kJS: marg_term = mg.sum_sp_pos * inv_n; break;
    case kInfoNCE: marg_term = anc.sum_t * inv_b - log_c; break;
    default: marg_term = mg.sum_t * inv_n; break;
  }
  terms[0] = joint_term;
  terms[1] = marg_term;
  stats[B] = lse_m;
}

struct GradOut {
  float* dP[kMaxModalities];
  float* db1;
  float* dw;
  float* db_out;
};

// dL/dT for a sample with score t (role 0: joint set, 1: marginal set / InfoNCE candidates).
__device__ __forceinline__ float score_grad(int role, int kind, float t, float g,
                                            const float* terms, const float* stats,
                                            int64_t anchor, int64_t B, float inv_n) {
  if (role == 0) return kind == kJS ? g * inv_n * sigmoidf_(-t) : g * inv_n;
  switch (kind) {
    case kDV: return g * expf(t - stats[B]);
    case kNWJ: return g * terms[1] * expf(t - stats[B]);
    case kJS: return g * inv_n * sigmoidf_(t);
    case kInfoNCE: return g * inv_n * expf(t - stats[anchor]);
    default: return g * inv_n;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
backward_kernel(Critic1<T> c, SampleSet s, int role, int kind, const float* __restrict__ grad_terms,
                const float* __restrict__ terms, const float* __restrict__ stats, float inv_n,
                GradOut out) {
  extern __shared__ float smem[];  // 2H floats: dL/db1, dL/dw of this block
  __shared__ float s_dbout;
  float* s_db1 = smem;
  float* s_dw = smem + c.H;
  for (int64_t h = threadIdx.x; h < 2 * c.H; h += blockDim.x) smem[h] = 0.0f;
  if (threadIdx.x == 0) s_dbout = 0.0f;
  __syncthreads();

  const float g = grad_terms[role];
  const int lane = threadIdx.x % kWarp;
  const int64_t warp0 = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t nwarps = int64_t(gridDim.x) * kWarpsPerBlock;
  int64_t idx[kMaxModalities];
  if (g != 0.0f) {
    for (int64_t n = warp0; n < s.count; n += nwarps) {
      const int64_t anchor = decode_sample(s, n, idx);
      const float t = warp_score(c, idx, lane);
      const float gt = score_grad(role, kind, t, g, terms, stats, anchor, s.B, inv_n);
      if (gt == 0.0f) continue;  // warp-uniform: every lane has the same t
      if (lane == 0) atomicAdd(&s_dbout, gt);
      for (int64_t h = lane; h < c.H; h += kWarp) {
        const float pre = preact(c, idx, h);
        const float dpre = gt * c.w[h] * act_grad(pre, c.act);
        atomicAdd(&s_dw[h], gt * act_fwd(pre, c.act));
        if (dpre != 0.0f) {
          atomicAdd(&s_db1[h], dpre);
          for (int k = 0; k < c.m; ++k) atomicAdd(&out.dP[k][idx[k] * c.H + h], dpre);
        }
      }
    }
  }
  __syncthreads();
  for (int64_t h = threadIdx.x; h < c.H; h += blockDim.x) {
    atomicAdd(&out.db1[h], s_db1[h]);
    atomicAdd(&out.dw[h], s_dw[h]);
  }
  if (threadIdx.x == 0) atomicAdd(out.db_out, s_dbout);
}

void check_args(const CriticArgs& c, const SampleArgs& s) {
  const int m = int(c.P.size());
  if (m < 2 || m > kMaxModalities)
    throw std::invalid_argument("mdm_kernels._cuda: need 2.." + std::to_string(kMaxModalities) +
                                " modalities, got " + std::to_string(m));
  if (c.H < 1 || c.H > kMaxHidden)
    throw std::invalid_argument("mdm_kernels._cuda: hidden width must be in 1.." +
                                std::to_string(kMaxHidden) + ", got " + std::to_string(c.H));
  if (c.B < 1) throw std::invalid_argument("mdm_kernels._cuda: empty batch");
  if (c.dtype < kFloat32 || c.dtype > kBFloat16)
    throw std::invalid_argument("mdm_kernels._cuda: unknown dtype code");
  if (c.act < kRelu || c.act > kGelu)
    throw std::invalid_argument("mdm_kernels._cuda: unknown activation code");
  if (s.kind < kDV || s.kind > kWasserstein)
    throw std::invalid_argument("mdm_kernels._cuda: unknown estimator kind");
  if (!s.all && (s.K < 1 || s.perms == 0))
    throw std::invalid_argument("mdm_kernels._cuda: perms (K >= 1) required unless all");
}

template <typename T>
Critic1<T> make_critic(const CriticArgs& a) {
  Critic1<T> c{};
  c.m = int(a.P.size());
  for (int k = 0; k < c.m; ++k) c.P[k] = reinterpret_cast<const T*>(a.P[k]);
  c.b1 = reinterpret_cast<const float*>(a.b1);
  c.w = reinterpret_cast<const float*>(a.w);
  c.b_out = reinterpret_cast<const float*>(a.b_out);
  c.H = a.H;
  c.act = a.act;
  return c;
}

SampleSet joint_set(const CriticArgs& c) {
  return SampleSet{kSetJoint, int(c.P.size()), c.B, 0, c.B, 0, nullptr};
}

// The marginal set of kind (InfoNCE: the anchor × candidate grid).
SampleSet marginal_set(const CriticArgs& c, const SampleArgs& s) {
  const int m = int(c.P.size());
  const auto* perms = reinterpret_cast<const int64_t*>(s.perms);
  if (s.kind == kInfoNCE) {
    const int64_t C = s.all ? c.B : s.K + 1;
    return SampleSet{s.all ? kSetInfoNceAll : kSetInfoNcePerms, m, c.B, s.K, c.B * C, C,
                     s.all ? nullptr : perms};
  }
  if (s.all) {
    const double total = std::pow(double(c.B), m);
    if (total > 4.0e18) throw std::invalid_argument("mdm_kernels._cuda: B^m overflows int64");
    int64_t count = 1;
    for (int j = 0; j < m; ++j) count *= c.B;
    return SampleSet{kSetAll, m, c.B, 0, count, 0, nullptr};
  }
  return SampleSet{kSetPerms, m, c.B, s.K, s.K * c.B, 0, perms};
}

int grid_for(int64_t count, int cap) {
  const int64_t blocks = (count + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return int(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

template <typename T>
void forward_impl(const CriticArgs& a, const SampleArgs& s, float* terms, float* stats,
                  Stats* workspace, cudaStream_t st) {
  const Critic1<T> c = make_critic<T>(a);
  Stats* pj = workspace;
  Stats* pm = workspace + kMaxPartials;
  const SampleSet js = joint_set(a);
  const int nj = grid_for(js.count, kMaxPartials);
  stats_kernel<T><<<nj, kThreads, 0, st>>>(c, js, pj);
  MDM_CUDA_CHECK(cudaGetLastError());
  const SampleSet ms = marginal_set(a, s);
  int nm = 0;
  float log_n = 0.0f, inv_n = 0.0f, log_c = 0.0f;
  if (s.kind == kInfoNCE) {
    const int grid = int(a.B < kMaxAnchorBlocks ? a.B : kMaxAnchorBlocks);
    anchor_lse_kernel<T><<<grid, kThreads, 0, st>>>(c, ms, stats);
    MDM_CUDA_CHECK(cudaGetLastError());
    log_c = float(std::log(double(ms.C)));
  } else {
    nm = grid_for(ms.count, kMaxPartials);
    stats_kernel<T><<<nm, kThreads, 0, st>>>(c, ms, pm);
    MDM_CUDA_CHECK(cudaGetLastError());
    log_n = float(std::log(double(ms.count)));
    inv_n = float(1.0 / double(ms.count));
  }
  combine_kernel<<<1, kThreads, 0, st>>>(pj, nj, pm, nm, stats, a.B, s.kind, log_n, inv_n,
                                         log_c, terms);
  MDM_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
void backward_impl(const CriticArgs& a, const SampleArgs& s, const float* grad_terms,
                   const float* terms, const float* stats, const GradOut& out, cudaStream_t st) {
  const Critic1<T> c = make_critic<T>(a);
  const size_t smem = size_t(2 * a.H) * sizeof(float);
  const SampleSet js = joint_set(a);
  backward_kernel<T><<<grid_for(js.count, kMaxBackwardBlocks), kThreads, smem, st>>>(
      c, js, 0, s.kind, grad_terms, terms, stats, float(1.0 / double(a.B)), out);
  MDM_CUDA_CHECK(cudaGetLastError());
  const SampleSet ms = marginal_set(a, s);
  const float inv_n = float(1.0 / double(s.kind == kInfoNCE ? a.B : ms.count));
  backward_kernel<T><<<grid_for(ms.count, kMaxBackwardBlocks), kThreads, smem, st>>>(
      c, ms, 1, s.kind, grad_terms, terms, stats, inv_n, out);
  MDM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bounds_forward(const CriticArgs& c, const SampleArgs& s, std::uintptr_t terms,
                    std::uintptr_t stats, std::uintptr_t workspace, int device,
                    std::uintptr_t stream) {
  check_args(c, s);
  MDM_CUDA_CHECK(cudaSetDevice(device));
  auto* t = reinterpret_cast<float*>(terms);
  auto* st = reinterpret_cast<float*>(stats);
  auto* ws = reinterpret_cast<Stats*>(workspace);
  auto strm = reinterpret_cast<cudaStream_t>(stream);
  switch (c.dtype) {
    case kFloat16: forward_impl<__half>(c, s, t, st, ws, strm); break;
    case kBFloat16: forward_impl<__nv_bfloat16>(c, s, t, st, ws, strm); break;
    default: forward_impl<float>(c, s, t, st, ws, strm); break;
  }
}

void bounds_backward(const CriticArgs& c, const SampleArgs& s, std::uintptr_t grad_terms,
                     std::uintptr_t terms, std::uintptr_t stats,
                     const std::vector<std::uintptr_t>& dP, std::uintptr_t db1,
                     std::uintptr_t dw, std::uintptr_t db_out, int device,
                     std::uintptr_t stream) {
  check_args(c, s);
  if (dP.size() != c.P.size())
    throw std::invalid_argument("mdm_kernels._cuda: one dP per modality required");
  MDM_CUDA_CHECK(cudaSetDevice(device));
  GradOut out{};
  for (size_t k = 0; k < dP.size(); ++k) out.dP[k] = reinterpret_cast<float*>(dP[k]);
  out.db1 = reinterpret_cast<float*>(db1);
  out.dw = reinterpret_cast<float*>(dw);
  out.db_out = reinterpret_cast<float*>(db_out);
  const auto* g = reinterpret_cast<const float*>(grad_terms);
  const auto* t = reinterpret_cast<const float*>(terms);
  const auto* st = reinterpret_cast<const float*>(stats);
  auto strm = reinterpret_cast<cudaStream_t>(stream);
  switch (c.dtype) {
    case kFloat16: backward_impl<__half>(c, s, g, t, st, out, strm); break;
    case kBFloat16: backward_impl<__nv_bfloat16>(c, s, g, t, st, out, strm); break;
    default: backward_impl<float>(c, s, g, t, st, out, strm); break;
  }
}

}  // namespace mdm
