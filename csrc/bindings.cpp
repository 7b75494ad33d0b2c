// pybind11 module mdm_kernels._cuda: raw-pointer entry points of the CUDA kernels.
//
// Pointers are Python ints (tensor.data_ptr()), streams are cudaStream_t handles as ints
// (torch.cuda.current_stream().cuda_stream).  The Python side (mdm_kernels/ops/cuda_ops.py)
// allocates every buffer with torch and checks dtypes, shapes, devices and contiguity.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "mdm_cuda.h"

namespace py = pybind11;
using std::uintptr_t;

namespace {

mdm::CriticArgs critic_args(const std::vector<uintptr_t>& P, int64_t B, int64_t H, int dtype,
                            uintptr_t b1, uintptr_t w, uintptr_t b_out, int act) {
  mdm::CriticArgs c;
  c.P = P;
  c.B = B;
  c.H = H;
  c.dtype = dtype;
  c.b1 = b1;
  c.w = w;
  c.b_out = b_out;
  c.act = act;
  return c;
}

mdm::SampleArgs sample_args(int kind, bool all, uintptr_t perms, int64_t K) {
  mdm::SampleArgs s;
  s.kind = kind;
  s.all = all;
  s.perms = perms;
  s.K = K;
  return s;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "mdm_kernels CUDA kernels (raw device pointers + stream handles)";
  m.attr("MAX_MODALITIES") = mdm::kMaxModalities;
  m.attr("MAX_HIDDEN") = mdm::kMaxHidden;
  m.attr("WORKSPACE_FLOATS") = mdm::kWorkspaceFloats;
  m.def("compiled_archs", &mdm::compiled_archs);

  m.def(
      "bounds_forward",
      [](const std::vector<uintptr_t>& P, int64_t B, int64_t H, int dtype, uintptr_t b1,
         uintptr_t w, uintptr_t b_out, int act, int kind, bool all, uintptr_t perms, int64_t K,
         uintptr_t terms, uintptr_t stats, uintptr_t workspace, int device, uintptr_t stream) {
        mdm::bounds_forward(critic_args(P, B, H, dtype, b1, w, b_out, act),
                            sample_args(kind, all, perms, K), terms, stats, workspace, device,
                            stream);
      },
      py::arg("P"), py::arg("B"), py::arg("H"), py::arg("dtype"), py::arg("b1"), py::arg("w"),
      py::arg("b_out"), py::arg("act"), py::arg("kind"), py::arg("all"), py::arg("perms"),
      py::arg("K"), py::arg("terms"), py::arg("stats"), py::arg("workspace"),
      py::arg("device"), py::arg("stream"),
      "Fused scores + reductions: writes terms (2,) and stats (B + 1,), float32.");

  m.def(
      "bounds_backward",
      [](const std::vector<uintptr_t>& P, int64_t B, int64_t H, int dtype, uintptr_t b1,
         uintptr_t w, uintptr_t b_out, int act, int kind, bool all, uintptr_t perms, int64_t K,
         uintptr_t grad_terms, uintptr_t terms, uintptr_t stats,
         const std::vector<uintptr_t>& dP, uintptr_t db1, uintptr_t dw, uintptr_t db_out,
         int device, uintptr_t stream) {
        mdm::bounds_backward(critic_args(P, B, H, dtype, b1, w, b_out, act),
                             sample_args(kind, all, perms, K), grad_terms, terms, stats, dP,
                             db1, dw, db_out, device, stream);
      },
      py::arg("P"), py::arg("B"), py::arg("H"), py::arg("dtype"), py::arg("b1"), py::arg("w"),
      py::arg("b_out"), py::arg("act"), py::arg("kind"), py::arg("all"), py::arg("perms"),
      py::arg("K"), py::arg("grad_terms"), py::arg("terms"), py::arg("stats"), py::arg("dP"),
      py::arg("db1"), py::arg("dw"), py::arg("db_out"), py::arg("device"), py::arg("stream"),
      "Backward by recomputation: accumulates into zeroed float32 dP_k, db1, dw, db_out.");

  m.def("gp_hidden_forward", &mdm::gp_hidden_forward, py::arg("Q"), py::arg("N"),
        py::arg("H"), py::arg("b1"), py::arg("w"), py::arg("act"), py::arg("U"),
        py::arg("device"), py::arg("stream"), "U = w * act'(Q + b1), float32 (N, H).");
  m.def("gp_hidden_backward", &mdm::gp_hidden_backward, py::arg("Q"), py::arg("N"),
        py::arg("H"), py::arg("b1"), py::arg("w"), py::arg("act"), py::arg("dU"),
        py::arg("dQ"), py::arg("dw"), py::arg("db1"), py::arg("device"), py::arg("stream"),
        "dQ = dU * w * act''(Q + b1); accumulates dw, db1 (zeroed float32).");
}
