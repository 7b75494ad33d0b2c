// Backward of the fused critic bounds (reading order: 5, after critic_bounds_forward.cu):
// recomputation, no N × H activation stored, no atomics — bitwise reproducible.
//
// Math.  With upstream g_J = dL/djoint_term, g_M = dL/dmarginal_term, the coefficient
// γ_n = dL/dT_n of each sample is (N the marginal sample count, LSE from the forward):
//   joint set     g_J / B                       (js: g_J σ(−T_n) / B)
//   dv            g_M e^{T_n − LSE_M}           (softmax weight)
//   nwj           g_M · marginal_term · e^{T_n − LSE_M}
//   js            g_M σ(T_n) / N
//   infonce       g_M e^{T(i,c) − LSE_i} / B    (anchor i's softmax, averaged over anchors)
//   wasserstein   g_M / N
// and through T_n = Σ_h w_h σ(pre_{n,h}) + b_out, pre_n = b1 + Σ_k P_k[i_k(n)]:
//   dL/dpre_{n,h} = γ_n w_h σ'(pre_{n,h}),   dL/dw_h = Σ_n γ_n σ(pre_{n,h}),
//   dL/db_out = Σ_n γ_n,   dL/db1 = Σ_n dL/dpre_n,
//   dL/dP_k[r] = Σ_{n ∈ S_k(r)} dL/dpre_n   with S_k(r) = {n : i_k(n) = r}.
//
// Kernels, per sample set (joint, then marginal) and per chunk of its flat ids:
//   score_grad_kernel  one warp per sample: γ_n into a chunk buffer (masked ids: 0);
//   owner_grad_kernel  one block per (owner class, row r) — for grids, the lead-digit class
//                      only over the chunk's lead rows — sums dL/dpre over S_k(r) in a fixed
//                      order (sample_sets.cuh: owner_range) and adds it to dP_k[r] for every
//                      modality k of the class — each output row has exactly one writer per
//                      launch, so plain read-add-write replaces the former m·H global atomics
//                      per sample.  The class holding modality 1 also adds the row's dL/dw
//                      terms to dw_rows[r] and Σ γ to db_out_rows[r]; the caller reduces those
//                      and db1 = Σ_r dP_1[r] (each sample has exactly one first row).
// Inside a block, threads form groups of gs ≥ min(H, 256) lanes (a power of two ≥ 32): each
// group takes every groups-th sample of a tile, lanes stride over h, each (group, h) has a
// private shared-memory accumulator, and the groups are merged in a fixed order at the end.
// Cost: every sample is scored once and its pre-activation recomputed once per owner class
// (m classes for perms/"all", 1 for joint, 2 for InfoNCE).
#include "launch.cuh"

namespace mdm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kMaxScoreBlocks = 4096;
constexpr int kTile = kThreads;  // owned samples decoded per tile (one per thread)

struct GradRows {
  float* dP[kMaxModalities];
  float* dw_rows;
  float* db_out_rows;
};

// γ = dL/dT for a sample with score t (role 0: joint set, 1: marginal set / InfoNCE grid).
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

// γ_n for the flat ids [ch.n0, ch.n1) → gamma[n − n0].
template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
score_grad_kernel(Critic<T, M> c, SampleSet s, int role, int kind,
                  const float* __restrict__ grad_terms, const float* __restrict__ terms,
                  const float* __restrict__ stats, float inv_n, Chunk ch,
                  float* __restrict__ gamma) {
  const float g = grad_terms[role];
  if (g == 0.0f) return;  // owner_grad_kernel skips this set too
  const int lane = threadIdx.x % kWarp;
  const int64_t warp0 = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t nwarps = int64_t(gridDim.x) * kWarpsPerBlock;
  int64_t idx[M];
  for (int64_t n = ch.n0 + warp0; n < ch.n1; n += nwarps) {  // warp-uniform loop
    float gt = 0.0f;
    if (decode_sample<M>(s, n, idx)) {
      const float t = warp_score(c, idx, lane);
      gt = score_grad(role, kind, t, g, terms, stats, idx[0], s.B, inv_n);
    }
    if (lane == 0) gamma[n - ch.n0] = gt;
  }
}

// Lanes per sample group: a power of two ≥ 32 covering H, at most the block.
__host__ __device__ __forceinline__ int owner_group_size(int64_t H, int threads) {
  int gs = kWarp;
  while (gs < H && gs < threads) gs <<= 1;
  return gs;
}

template <typename T, int M>
__global__ void __launch_bounds__(kThreads)
owner_grad_kernel(Critic<T, M> c, SampleSet s, OwnerLists lists,
                  int role, const float* __restrict__ grad_terms,
                  const float* __restrict__ gamma, Chunk ch, int64_t row0, int class0,
                  GradRows out) {
  MDM_DYNAMIC_SHARED(float, smem);  // 2 · groups · H: Σ dL/dpre and Σ γ σ(pre) per group
  __shared__ int s_idx[kTile * M];
  __shared__ float s_gamma[kTile];
  if (grad_terms[role] == 0.0f) return;
  const int cls = class0 + int(blockIdx.y);
  const int64_t r = row0 + blockIdx.x;
  const OwnerRange o = owner_range(s, lists, cls, r, ch);
  if (o.count == 0) return;  // block-uniform
  const uint32_t members = owner_members(s, cls);
  const bool first = (members & 1u) != 0;  // the class of modality 1: dw, db_out terms
  const int64_t H = c.H;
  const int gs = owner_group_size(H, blockDim.x);
  const int groups = blockDim.x / gs, group = threadIdx.x / gs, lane = threadIdx.x % gs;
  float* acc = smem;
  float* acc_w = smem + int64_t(groups) * H;
  for (int64_t e = threadIdx.x; e < 2 * int64_t(groups) * H; e += blockDim.x) smem[e] = 0.0f;
  float gamma_sum = 0.0f;  // thread 0: Σ γ over the owned samples, in order
  __syncthreads();
  for (int64_t t0 = 0; t0 < o.count; t0 += kTile) {
    const int len = int(o.count - t0 < kTile ? o.count - t0 : kTile);
    if (threadIdx.x < len) {
      const int64_t n = owner_sample(o, t0 + threadIdx.x);
      int64_t idx[M];
      decode_sample<M>(s, n, idx);  // masked ids have γ = 0 and are skipped below
#pragma unroll
      for (int j = 0; j < M; ++j) s_idx[threadIdx.x * M + j] = int(idx[j]);
      s_gamma[threadIdx.x] = gamma[n - ch.n0];
    }
    __syncthreads();
    if (threadIdx.x == 0)
      for (int t = 0; t < len; ++t) gamma_sum += s_gamma[t];
    for (int t = group; t < len; t += groups) {
      const float gt = s_gamma[t];
      if (gt == 0.0f) continue;  // uniform over the group
      int64_t idx[M];
#pragma unroll
      for (int j = 0; j < M; ++j) idx[j] = s_idx[t * M + j];
      for (int64_t h = lane; h < H; h += gs) {  // (group, h) accumulators are private
        const float pre = preact(c, idx, h);
        acc[group * H + h] += gt * c.w[h] * act_grad(pre, c.act);
        if (first) acc_w[group * H + h] += gt * act_fwd(pre, c.act);
      }
    }
    __syncthreads();  // tiles reuse s_idx / s_gamma; the last one also publishes acc
  }
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float d = 0.0f, dw = 0.0f;
    for (int q = 0; q < groups; ++q) {  // fixed merge order
      d += acc[q * H + h];
      dw += acc_w[q * H + h];
    }
#pragma unroll
    for (int k = 0; k < M; ++k)
      if ((members >> k) & 1u) out.dP[k][r * H + h] += d;
    if (first) out.dw_rows[r * H + h] += dw;
  }
  if (first && threadIdx.x == 0) out.db_out_rows[r] += gamma_sum;
}

int score_grid(int64_t count) {
  const int64_t blocks = (count + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return int(blocks < 1 ? 1 : (blocks > kMaxScoreBlocks ? kMaxScoreBlocks : blocks));
}

template <typename T, int M>
void backward_impl(const CriticArgs& a, const SampleArgs& s, const float* grad_terms,
                   const float* terms, const float* stats, const OwnerLists& lists,
                   float* gamma, const GradRows& out, cudaStream_t st) {
  const Critic<T, M> c = make_critic<T, M>(a);
  const int gs = owner_group_size(a.H, kThreads);
  const size_t smem = size_t(2) * size_t(kThreads / gs) * size_t(a.H) * sizeof(float);
  const SampleSet sets[2] = {joint_set(a.B, M),
                             marginal_set(a.B, M, s.kind, s.negatives, s.K,
                                          reinterpret_cast<const int64_t*>(s.perms))};
  for (int role = 0; role < 2; ++role) {
    const SampleSet& set = sets[role];
    const float inv_n =
        float(1.0 / double(role == 0 || s.kind == kInfoNCE ? a.B : set.samples));
    const OwnerLists set_lists = role == 0 ? OwnerLists{nullptr, nullptr, 0} : lists;
    for (int64_t k = 0; k < num_chunks(set); ++k) {
      const Chunk ch = chunk_at(set, k);
      MDM_LAUNCH(score_grid(ch.n1 - ch.n0), kThreads, 0, st, score_grad_kernel<T, M>)(
          c, set, role, s.kind, grad_terms, terms, stats, inv_n, ch, gamma);
      MDM_CUDA_CHECK(cudaGetLastError());
      // Grids: only the chunk's lead rows own samples of the lead-digit class, so that class
      // gets its own launch over those rows (no empty blocks); the others span all B rows.
      const int classes = owner_class_count(set), lead_class = is_grid(set) ? 1 : 0;
      if (lead_class == 1) {
        MDM_LAUNCH(dim3(unsigned(ch.lead1 - ch.lead0), 1u), kThreads, smem, st,
                   owner_grad_kernel<T, M>)(c, set, set_lists, role, grad_terms, gamma, ch,
                                            ch.lead0, 0, out);
        MDM_CUDA_CHECK(cudaGetLastError());
      }
      MDM_LAUNCH(dim3(unsigned(a.B), unsigned(classes - lead_class)), kThreads, smem, st,
                 owner_grad_kernel<T, M>)(c, set, set_lists, role, grad_terms, gamma, ch, 0,
                                          lead_class, out);
      MDM_CUDA_CHECK(cudaGetLastError());
    }
  }
}

}  // namespace

int64_t backward_buffer_floats(int64_t B, int m, int kind, int negatives, int64_t K) {
  const SampleSet ms = marginal_set(B, m, kind, negatives, K, nullptr);
  const int64_t cap = chunk_capacity(ms);
  return cap > B ? cap : B;  // the joint set is one chunk of B
}

std::vector<int64_t> owner_list_shape(int64_t B, int m, int kind, int negatives, int64_t K) {
  if (negatives != kNegPerms) return {0, 0};
  if (kind == kInfoNCE) return {1, B * (K + 1)};
  return {m, K * B};
}

void bounds_backward(const CriticArgs& c, const SampleArgs& s, std::uintptr_t grad_terms,
                     std::uintptr_t terms, std::uintptr_t stats, std::uintptr_t owner_order,
                     std::uintptr_t owner_offsets, std::uintptr_t score_grads,
                     const std::vector<std::uintptr_t>& dP, std::uintptr_t dw_rows,
                     std::uintptr_t db_out_rows, int device, std::uintptr_t stream) {
  check_bounds_args(c, s);
  if (dP.size() != c.P.size()) invalid("one dP per modality required");
  if (s.negatives == kNegPerms && (owner_order == 0 || owner_offsets == 0))
    invalid("owner_order / owner_offsets (CSR lists) required with perms");
  DeviceGuard guard(device);
  GradRows out{};
  for (size_t k = 0; k < dP.size(); ++k) out.dP[k] = reinterpret_cast<float*>(dP[k]);
  out.dw_rows = reinterpret_cast<float*>(dw_rows);
  out.db_out_rows = reinterpret_cast<float*>(db_out_rows);
  const int m = int(c.P.size());
  const OwnerLists lists{reinterpret_cast<const int64_t*>(owner_order),
                         reinterpret_cast<const int64_t*>(owner_offsets),
                         owner_list_shape(c.B, m, s.kind, s.negatives, s.K)[1]};
  const auto* g = reinterpret_cast<const float*>(grad_terms);
  const auto* t = reinterpret_cast<const float*>(terms);
  const auto* st = reinterpret_cast<const float*>(stats);
  auto* gamma = reinterpret_cast<float*>(score_grads);
  auto strm = reinterpret_cast<cudaStream_t>(stream);
  dispatch_critic(c.dtype, m, [&](auto inst) {
    using I = decltype(inst);
    backward_impl<typename I::Storage, I::kM>(c, s, g, t, st, lists, gamma, out, strm);
  });
}

}  // namespace mdm
