// Host-side launch helpers shared by the launchers (reading order: after the kernels):
// CUDA error checks, the device guard, argument checks, the sample sets of an estimator and
// the dispatch from runtime (dtype, m) to the kernels' template instantiations.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "critic.cuh"
#include "mdm_cuda.h"
#include "sample_sets.cuh"

namespace mdm {

// Raises std::runtime_error naming the failed call (defined in launch_utils.cu).
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);

#define MDM_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    cudaError_t err_ = (expr);                                                        \
    if (err_ != cudaSuccess) mdm::throw_cuda_error(err_, #expr, __FILE__, __LINE__);  \
  } while (0)

// Makes `device` current for the launches of one entry point and restores the caller's current
// device on scope exit (also when a launch throws).  The extension links the static CUDA
// runtime, whose current device follows the calling thread's current context — the same one
// torch's runtime reads — so a bare cudaSetDevice would change the caller's device for good.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

[[noreturn]] inline void invalid(const std::string& what) {
  throw std::invalid_argument("mdm_kernels._cuda: " + what);
}

// Checks of the sizes and codes every bounds entry point takes (Python checks them first and
// names the argument; these guard direct callers of the extension).
void check_bounds_args(const CriticArgs& c, const SampleArgs& s);

inline SampleSet joint_set(int64_t B, int m) {
  return SampleSet{kSetJoint, m, false, B, 0, B, B, 0, nullptr};
}

// The marginal set of `kind` (InfoNCE: the anchor × candidate grid or perms layout).
inline SampleSet marginal_set(int64_t B, int m, int kind, int negatives, int64_t K,
                              const int64_t* perms) {
  const bool distinct = negatives == kNegDistinct;
  if (kind == kInfoNCE) {
    if (negatives == kNegPerms) {
      return SampleSet{kSetInfoNcePerms, m, false, B, K, B * (K + 1), B * (K + 1), K + 1, perms};
    }
    return SampleSet{kSetInfoNceAll, m, distinct, B, 0, B * B, distinct ? B * (B - 1) : B * B,
                     B, nullptr};
  }
  if (negatives == kNegPerms) return SampleSet{kSetPerms, m, false, B, K, K * B, K * B, 0, perms};
  if (std::pow(double(B), m) > 4.0e18) invalid("B^m overflows int64 for negatives='all'");
  const int64_t count = ipow(B, m);
  int64_t samples = count;
  if (distinct) {  // falling factorial B(B−1)···(B−m+1)
    samples = 1;
    for (int j = 0; j < m; ++j) samples *= B - j;
  }
  return SampleSet{kSetAll, m, distinct, B, 0, count, samples, 0, nullptr};
}

template <typename T, int M>
struct Instance {
  using Storage = T;
  static constexpr int kM = M;
};

// Calls f(Instance<T, M>{}) for the runtime (m, storage type) pair.
template <typename T, typename F>
void dispatch_modalities(int m, F&& f) {
  switch (m) {
    case 2: f(Instance<T, 2>{}); break;
    case 3: f(Instance<T, 3>{}); break;
    case 4: f(Instance<T, 4>{}); break;
    case 5: f(Instance<T, 5>{}); break;
    case 6: f(Instance<T, 6>{}); break;
    case 7: f(Instance<T, 7>{}); break;
    case 8: f(Instance<T, 8>{}); break;
    default: invalid("need 2.." + std::to_string(kMaxModalities) + " modalities, got " +
                     std::to_string(m));
  }
}
static_assert(kMaxModalities == 8, "dispatch_modalities lists m = 2..8");

template <typename F>
void dispatch_critic(int dtype, int m, F&& f) {
  switch (dtype) {
    case kFloat16: dispatch_modalities<__half>(m, std::forward<F>(f)); break;
    case kBFloat16: dispatch_modalities<__nv_bfloat16>(m, std::forward<F>(f)); break;
    default: dispatch_modalities<float>(m, std::forward<F>(f)); break;
  }
}

template <typename T, int M>
Critic<T, M> make_critic(const CriticArgs& a) {
  Critic<T, M> c{};
  for (int k = 0; k < M; ++k) c.P[k] = reinterpret_cast<const T*>(a.P[k]);
  c.b1 = reinterpret_cast<const float*>(a.b1);
  c.w = reinterpret_cast<const float*>(a.w);
  c.b_out = reinterpret_cast<const float*>(a.b_out);
  c.H = a.H;
  c.act = a.act;
  return c;
}

}  // namespace mdm
