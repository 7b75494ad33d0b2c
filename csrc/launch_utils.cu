// Host-side definitions shared by the launchers (reading order: after the kernels, with
// launch.cuh): CUDA error reporting, the device guard, the bounds argument checks, the host
// runs of the index logic for tests, and the compiled-arch string.
#include <stdexcept>
#include <string>
#include <vector>

#include "launch.cuh"

#ifndef MDM_CUDA_ARCHS
#define MDM_CUDA_ARCHS "unknown"
#endif

namespace mdm {

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw std::runtime_error(std::string("mdm_kernels._cuda: ") + expr + " failed at " + file +
                           ":" + std::to_string(line) + ": " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}

DeviceGuard::DeviceGuard(int device) {
  if (device < 0) invalid("device index must be >= 0, got " + std::to_string(device));
  MDM_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) {
    MDM_CUDA_CHECK(cudaSetDevice(device));
  } else {
    previous_ = -1;  // nothing to restore
  }
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);  // a destructor must not throw
}

void check_bounds_args(const CriticArgs& c, const SampleArgs& s) {
  const int m = int(c.P.size());
  if (m < 2 || m > kMaxModalities)
    invalid("need 2.." + std::to_string(kMaxModalities) + " modalities, got " +
            std::to_string(m));
  if (c.H < 1 || c.H > kMaxHidden)
    invalid("hidden width must be in 1.." + std::to_string(kMaxHidden) + ", got " +
            std::to_string(c.H));
  if (c.B < 1 || c.B > kMaxBatch)
    invalid("batch size must be in 1.." + std::to_string(kMaxBatch) + ", got " +
            std::to_string(c.B));
  if (c.dtype < kFloat32 || c.dtype > kBFloat16) invalid("unknown dtype code");
  if (c.act < kRelu || c.act > kGelu) invalid("unknown activation code");
  if (s.kind < kDV || s.kind > kWasserstein) invalid("unknown estimator kind");
  if (s.negatives < kNegPerms || s.negatives > kNegDistinct) invalid("unknown negatives code");
  if (s.negatives == kNegPerms && (s.K < 1 || s.perms == 0))
    invalid("perms (K >= 1) required with negatives code 0 (perms)");
  if (s.negatives == kNegDistinct && c.B < (s.kind == kInfoNCE ? 2 : m))
    invalid("negatives='distinct' needs B >= " + std::to_string(s.kind == kInfoNCE ? 2 : m) +
            ", got " + std::to_string(c.B));
}

namespace {

SampleSet host_set(int64_t B, int m, int kind, int negatives, int role) {
  if (negatives == kNegPerms) invalid("host index checks cover the grid sets only");
  if (m < 2 || m > kMaxModalities || B < 1) invalid("bad m or B");
  return role == 0 ? joint_set(B, m) : marginal_set(B, m, kind, negatives, 0, nullptr);
}

}  // namespace

std::vector<int64_t> owner_samples(int64_t B, int m, int kind, int negatives, int role,
                                   int cls, int64_t r, int64_t chunk) {
  const SampleSet s = host_set(B, m, kind, negatives, role);
  if (cls < 0 || cls >= owner_class_count(s) || r < 0 || r >= B || chunk < 0 || chunk >= num_chunks(s))
    invalid("owner class, row or chunk out of range");
  const Chunk ch = chunk_at(s, chunk);
  const OwnerRange o = owner_range(s, OwnerLists{nullptr, nullptr, 0}, cls, r, ch);
  std::vector<int64_t> ids;
  dispatch_modalities<float>(m, [&](auto inst) {
    constexpr int M = decltype(inst)::kM;
    int64_t idx[M];
    for (int64_t u = 0; u < o.count; ++u) {
      const int64_t n = owner_sample(o, u);
      if (decode_sample<M>(s, n, idx)) ids.push_back(n);  // the ids a kernel gives γ ≠ 0
    }
  });
  return ids;
}

std::vector<std::vector<int64_t>> backward_chunks(int64_t B, int m, int kind, int negatives,
                                                  int role) {
  const SampleSet s = host_set(B, m, kind, negatives, role);
  std::vector<std::vector<int64_t>> out;
  for (int64_t k = 0; k < num_chunks(s); ++k) {
    const Chunk ch = chunk_at(s, k);
    out.push_back({ch.lead0, ch.lead1, ch.n0, ch.n1});
  }
  return out;
}

std::string compiled_archs() { return MDM_CUDA_ARCHS; }

}  // namespace mdm
