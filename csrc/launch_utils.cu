// Host-side helpers shared by the launchers: error reporting and the compiled-arch string.
#include <stdexcept>
#include <string>

#include "common.cuh"

#ifndef MDM_CUDA_ARCHS
#define MDM_CUDA_ARCHS "unknown"
#endif

namespace mdm {

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw std::runtime_error(std::string("mdm_kernels._cuda: ") + expr + " failed at " + file +
                           ":" + std::to_string(line) + ": " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}

std::string compiled_archs() { return MDM_CUDA_ARCHS; }

}  // namespace mdm
