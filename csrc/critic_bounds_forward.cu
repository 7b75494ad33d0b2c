// Forward of the fused critic bounds (reading order: 4, after critic.cuh): score every joint
// and marginal sample of a one-hidden-layer MLPCritic and reduce the one statistic per set that
// the active estimator needs.
//
// Math.  With J the B joint samples and M the N marginal samples (N = K·B for shuffles/perms,
// B^m for "all", B(B−1)···(B−m+1) for "distinct"), bound = joint_term − marginal_term:
//   dv (MINE)    mean_J T               log mean_M e^T  = LSE_M(T) − log N
//   nwj          mean_J T               mean_M e^{T−1}  = exp(LSE_M(T) − log N − 1)
//   js           −mean_J softplus(−T)   mean_M softplus(T)
//   infonce      mean_i T(i, i)         mean_i [LSE_{c∈C_i} T(i, c) − log |C_i|]
//   wasserstein  mean_J T               mean_M T
// LSE is accumulated online as (max, Σ e^{T − max}) so scores of ±1e4 stay finite.
//
// Kernels.  stats_kernel: one warp per sample (lanes stride over H), a grid-stride loop over
// the set's flat ids, one StatAcc per block → partials.  anchor_lse_kernel (InfoNCE): one block
// per anchor, LSE over its candidates.  combine_kernel: one block merges the partials in a
// fixed order and writes (joint_term, marginal_term) and the LSE statistics the backward reuses.
// The grid depends only on the sizes, so results are bitwise reproducible.
#include <cmath>

#include "launch.cuh"

namespace mdm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kMaxAnchorBlocks = 8192;

template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
stats_kernel(Critic<T, M> c, SampleSet s, int stat, StatAcc* __restrict__ partials) {
  __shared__ Lse shared[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp;
  const int64_t warp0 = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t nwarps = int64_t(gridDim.x) * kWarpsPerBlock;
  int64_t idx[M];
  StatAcc acc = stat_empty();
  for (int64_t n = warp0; n < s.count; n += nwarps) {  // warp-uniform loop
    if (!decode_sample<M>(s, n, idx)) continue;        // "distinct": a repeated row
    stat_add(acc, stat, warp_score(c, idx, lane));     // every lane holds the same score
  }
  const StatAcc r = block_stat_of_warps(acc, stat, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = r;
}

// InfoNCE: lse_out[i] = log Σ_{c ∈ C_i} exp T(i, c), one block per anchor (grid-stride).
template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
anchor_lse_kernel(Critic<T, M> c, SampleSet s, float* __restrict__ lse_out) {
  __shared__ Lse shared[kWarpsPerBlock];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  int64_t idx[M];
  for (int64_t i = blockIdx.x; i < s.B; i += gridDim.x) {  // block-uniform loop
    Lse acc = lse_empty();
    for (int64_t slot = warp; slot < s.C; slot += kWarpsPerBlock) {
      if (!decode_sample<M>(s, i * s.C + slot, idx)) continue;  // "distinct": c = i
      lse_update(acc, warp_score(c, idx, lane));
    }
    const Lse r = block_lse(acc, shared);
    if (threadIdx.x == 0) lse_out[i] = lse_value(r);
  }
}

// One block: merges the partials in a fixed order and writes terms (2) and stats[B].
__global__ void __launch_bounds__(kThreads)
combine_kernel(const StatAcc* __restrict__ joint, int n_joint, int joint_stat,
               const StatAcc* __restrict__ marg, int n_marg, int marg_stat,
               float* __restrict__ stats, int64_t B, int kind, float log_n, float inv_n,
               float log_c, float* __restrict__ terms) {
  __shared__ Lse shared[kWarpsPerBlock];
  StatAcc j = stat_empty(), mg = stat_empty(), anc = stat_empty();
  for (int p = threadIdx.x; p < n_joint; p += blockDim.x) j = stat_merge(j, joint[p], joint_stat);
  for (int p = threadIdx.x; p < n_marg; p += blockDim.x) mg = stat_merge(mg, marg[p], marg_stat);
  if (kind == kInfoNCE)
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) anc.sum += stats[i];
  j = block_stat_of_threads(j, joint_stat, shared);
  mg = block_stat_of_threads(mg, marg_stat, shared);
  anc = block_stat_of_threads(anc, kStatSumT, shared);
  if (threadIdx.x != 0) return;
  const float inv_b = 1.0f / float(B);
  const float lse_m = marg_stat == kStatLse ? lse_value(mg.lse) : 0.0f;
  float marg_term;
  switch (kind) {
    case kDV: marg_term = lse_m - log_n; break;
    case kNWJ: marg_term = expf(lse_m - log_n - 1.0f); break;
    case kJS: marg_term = mg.sum * inv_n; break;
    case kInfoNCE: marg_term = anc.sum * inv_b - log_c; break;
    default: marg_term = mg.sum * inv_n; break;
  }
  terms[0] = (joint_stat == kStatSumSoftplusNeg ? -j.sum : j.sum) * inv_b;
  terms[1] = marg_term;
  stats[B] = lse_m;
}

int grid_for(int64_t count, int cap) {
  const int64_t blocks = (count + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return int(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// The statistic each set reduces for `kind` (nothing else is computed).
int joint_statistic(int kind) { return kind == kJS ? kStatSumSoftplusNeg : kStatSumT; }
int marginal_statistic(int kind) {
  switch (kind) {
    case kDV:
    case kNWJ: return kStatLse;
    case kJS: return kStatSumSoftplus;
    default: return kStatSumT;  // wasserstein (InfoNCE reduces per anchor instead)
  }
}

template <typename T, int M>
void forward_impl(const CriticArgs& a, const SampleArgs& s, float* terms, float* stats,
                  StatAcc* workspace, cudaStream_t st) {
  const Critic<T, M> c = make_critic<T, M>(a);
  StatAcc* pj = workspace;
  StatAcc* pm = workspace + kMaxPartials;
  const SampleSet js = joint_set(a.B, M);
  const int jstat = joint_statistic(s.kind), mstat = marginal_statistic(s.kind);
  const int nj = grid_for(js.count, kMaxPartials);
  MDM_LAUNCH(nj, kThreads, 0, st, stats_kernel<T, M>)(c, js, jstat, pj);
  MDM_CUDA_CHECK(cudaGetLastError());
  const SampleSet ms = marginal_set(a.B, M, s.kind, s.negatives, s.K,
                                    reinterpret_cast<const int64_t*>(s.perms));
  int nm = 0;
  float log_n = 0.0f, inv_n = 0.0f, log_c = 0.0f;
  if (s.kind == kInfoNCE) {
    const int grid = int(a.B < kMaxAnchorBlocks ? a.B : kMaxAnchorBlocks);
    MDM_LAUNCH(grid, kThreads, 0, st, anchor_lse_kernel<T, M>)(c, ms, stats);
    MDM_CUDA_CHECK(cudaGetLastError());
    log_c = float(std::log(double(ms.samples / a.B)));  // |C_i|: B, B − 1 or K + 1
  } else {
    nm = grid_for(ms.count, kMaxPartials);
    MDM_LAUNCH(nm, kThreads, 0, st, stats_kernel<T, M>)(c, ms, mstat, pm);
    MDM_CUDA_CHECK(cudaGetLastError());
    log_n = float(std::log(double(ms.samples)));
    inv_n = float(1.0 / double(ms.samples));
  }
  MDM_LAUNCH(1, kThreads, 0, st, combine_kernel)(pj, nj, jstat, pm, nm, mstat, stats, a.B,
                                                 s.kind, log_n, inv_n, log_c, terms);
  MDM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void bounds_forward(const CriticArgs& c, const SampleArgs& s, std::uintptr_t terms,
                    std::uintptr_t stats, std::uintptr_t workspace, int device,
                    std::uintptr_t stream) {
  check_bounds_args(c, s);
  DeviceGuard guard(device);
  auto* t = reinterpret_cast<float*>(terms);
  auto* st = reinterpret_cast<float*>(stats);
  auto* ws = reinterpret_cast<StatAcc*>(workspace);
  auto strm = reinterpret_cast<cudaStream_t>(stream);
  dispatch_critic(c.dtype, int(c.P.size()), [&](auto inst) {
    using I = decltype(inst);
    forward_impl<typename I::Storage, I::kM>(c, s, t, st, ws, strm);
  });
}

}  // namespace mdm
