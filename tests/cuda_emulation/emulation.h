// Host emulation of the few CUDA features the kernels of csrc/ use, so that the very same
// kernel sources compile as plain C++ (g++) and run on the CPU in tests (no GPU needed):
// tests/test_cuda_emulated.py builds csrc/ with this header force-included into a Python
// module and compares it against the reference estimators.
//
// Model: blocks run one after another; the threads of a block run as real OS threads, so
// __syncthreads is a barrier over the block and __shfl_xor_sync a two-phase exchange over the
// 32 threads of a warp.  __shared__ variables become function statics (one block at a time),
// dynamic shared memory a per-block buffer.  A thread that returns drops out of the barriers
// (as exited GPU threads do).  Device memory is host memory: pointers come from CPU tensors.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

inline float __int_as_float(unsigned int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace mdm_emu {

constexpr int kWarpSize = 32;

struct BlockState {
  explicit BlockState(unsigned threads, size_t smem)
      : block(threads), shared(smem + 16), lanes(threads) {
    for (unsigned w = 0; w < (threads + kWarpSize - 1) / kWarpSize; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(kWarpSize));
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<unsigned char> shared;
  std::vector<float> lanes;  // shuffle exchange slots, one per thread
};

inline BlockState* current = nullptr;  // the running block (blocks run one at a time)

inline std::barrier<>& warp_barrier() { return *current->warps[threadIdx.x / kWarpSize]; }

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current->shared.data());
}

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
};

// kernel(args...) over grid × block with `smem` bytes of dynamic shared memory.
template <typename... Params>
struct BoundLaunch {
  LaunchConfig cfg;
  void (*kernel)(Params...);

  template <typename... Args>
  void operator()(Args&&... args) const {
    gridDim = cfg.grid;
    blockDim = cfg.block;
    const unsigned threads = cfg.block.x * cfg.block.y * cfg.block.z;
    const unsigned blocks = cfg.grid.x * cfg.grid.y;
    std::unique_ptr<BlockState> state;
    std::barrier<> between_blocks(threads);  // the same OS threads run every block in turn
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        for (unsigned b = 0; b < blocks; ++b) {
          if (t == 0) {
            state = std::make_unique<BlockState>(threads, cfg.smem);
            current = state.get();
          }
          between_blocks.arrive_and_wait();
          threadIdx = uint3{t, 0, 0};
          blockIdx = uint3{b % cfg.grid.x, b / cfg.grid.x, 0};
          kernel(Params(args)...);
          warp_barrier().arrive_and_drop();  // returned threads leave the barriers
          current->block.arrive_and_drop();
          between_blocks.arrive_and_wait();
        }
      });
    }
    for (auto& th : pool) th.join();
    current = nullptr;
  }
};

template <typename... Params>
BoundLaunch<Params...> bind(LaunchConfig cfg, void (*kernel)(Params...)) {
  return BoundLaunch<Params...>{cfg, kernel};
}

}  // namespace mdm_emu

inline void __syncthreads() { mdm_emu::current->block.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
  auto& slots = mdm_emu::current->lanes;
  slots[threadIdx.x] = v;
  mdm_emu::warp_barrier().arrive_and_wait();
  const float other = slots[threadIdx.x ^ unsigned(offset)];
  mdm_emu::warp_barrier().arrive_and_wait();
  return other;
}

#define MDM_LAUNCH(grid, block, smem, stream, ...) \
  ::mdm_emu::bind(::mdm_emu::LaunchConfig{dim3(grid), dim3(block), size_t(smem)}, &__VA_ARGS__)
#define MDM_DYNAMIC_SHARED(type, name) type* name = ::mdm_emu::dynamic_shared<type>()
