// The CUDA runtime calls the launchers make, for the host emulation (no libcudart linked):
// one device, always current, no launch errors.
#include <cuda_runtime.h>

extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
const char* cudaGetErrorString(cudaError_t) { return "emulated CUDA runtime"; }
}
