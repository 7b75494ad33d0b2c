// pybind11 module mdm_kernels._cuda: raw-pointer entry points of the CUDA kernels (reading
// order: after mdm_cuda.h; read next mdm_kernels/ops/cuda_ops.py, which registers these as
// torch.library ops, then mdm_kernels/ops/cuda_backend.py).
//
// Pointers are Python ints (tensor.data_ptr()), streams are cudaStream_t handles as ints
// (torch.cuda.current_stream(device).cuda_stream).  The Python side allocates every buffer with
// torch and checks dtypes, shapes, devices and contiguity, naming the argument; the C++ side
// re-checks sizes and codes (std::invalid_argument → ValueError).
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

mdm::SampleArgs sample_args(int kind, int negatives, uintptr_t perms, int64_t K) {
  mdm::SampleArgs s;
  s.kind = kind;
  s.negatives = negatives;
  s.perms = perms;
  s.K = K;
  return s;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "mdm_kernels CUDA kernels (raw device pointers + stream handles)";
  m.attr("MAX_MODALITIES") = mdm::kMaxModalities;
  m.attr("MAX_HIDDEN") = mdm::kMaxHidden;
  m.attr("MAX_BATCH") = mdm::kMaxBatch;
  m.attr("WORKSPACE_FLOATS") = mdm::kWorkspaceFloats;
  m.attr("SCORE_CHUNK_SAMPLES") = mdm::kScoreChunkSamples;
  m.attr("GP_MAX_PARTIAL_ROWS") = mdm::kGpMaxPartialRows;
  m.def("compiled_archs", &mdm::compiled_archs);

  m.def(
      "bounds_forward",
      [](const std::vector<uintptr_t>& P, int64_t B, int64_t H, int dtype, uintptr_t b1,
         uintptr_t w, uintptr_t b_out, int act, int kind, int negatives, uintptr_t perms,
         int64_t K, uintptr_t terms, uintptr_t stats, uintptr_t workspace, int device,
         uintptr_t stream) {
        mdm::bounds_forward(critic_args(P, B, H, dtype, b1, w, b_out, act),
                            sample_args(kind, negatives, perms, K), terms, stats, workspace,
                            device, stream);
      },
      py::arg("P"), py::arg("B"), py::arg("H"), py::arg("dtype"), py::arg("b1"), py::arg("w"),
      py::arg("b_out"), py::arg("act"), py::arg("kind"), py::arg("negatives"),
      py::arg("perms"), py::arg("K"), py::arg("terms"), py::arg("stats"), py::arg("workspace"),
      py::arg("device"), py::arg("stream"),
      "Fused scores + reductions: writes terms (2,) and stats (B + 1,), float32.");

  m.def("backward_buffer_floats", &mdm::backward_buffer_floats, py::arg("B"), py::arg("m"),
        py::arg("kind"), py::arg("negatives"), py::arg("K"),
        "Floats of the dL/dT scratch buffer bounds_backward needs.");
  m.def("owner_list_shape", &mdm::owner_list_shape, py::arg("B"), py::arg("m"),
        py::arg("kind"), py::arg("negatives"), py::arg("K"),
        "[slots, length] of the CSR owner lists bounds_backward reads ([0, 0]: none).");

  m.def(
      "bounds_backward",
      [](const std::vector<uintptr_t>& P, int64_t B, int64_t H, int dtype, uintptr_t b1,
         uintptr_t w, uintptr_t b_out, int act, int kind, int negatives, uintptr_t perms,
         int64_t K, uintptr_t grad_terms, uintptr_t terms, uintptr_t stats,
         uintptr_t owner_order, uintptr_t owner_offsets, uintptr_t score_grads,
         const std::vector<uintptr_t>& dP, uintptr_t dw_rows, uintptr_t db_out_rows,
         int device, uintptr_t stream) {
        mdm::bounds_backward(critic_args(P, B, H, dtype, b1, w, b_out, act),
                             sample_args(kind, negatives, perms, K), grad_terms, terms, stats,
                             owner_order, owner_offsets, score_grads, dP, dw_rows,
                             db_out_rows, device, stream);
      },
      py::arg("P"), py::arg("B"), py::arg("H"), py::arg("dtype"), py::arg("b1"), py::arg("w"),
      py::arg("b_out"), py::arg("act"), py::arg("kind"), py::arg("negatives"),
      py::arg("perms"), py::arg("K"), py::arg("grad_terms"), py::arg("terms"),
      py::arg("stats"), py::arg("owner_order"), py::arg("owner_offsets"),
      py::arg("score_grads"), py::arg("dP"), py::arg("dw_rows"), py::arg("db_out_rows"),
      py::arg("device"), py::arg("stream"),
      "Deterministic backward by recomputation: adds into zeroed float32 dP_k (B, H), "
      "dw_rows (B, H), db_out_rows (B,).");

  m.def("gp_hidden_forward", &mdm::gp_hidden_forward, py::arg("Q"), py::arg("N"),
        py::arg("H"), py::arg("b1"), py::arg("w"), py::arg("act"), py::arg("U"),
        py::arg("device"), py::arg("stream"), "U = w * act'(Q + b1), float32 (N, H).");
  m.def("gp_hidden_backward", &mdm::gp_hidden_backward, py::arg("Q"), py::arg("N"),
        py::arg("H"), py::arg("b1"), py::arg("w"), py::arg("act"), py::arg("dU"),
        py::arg("dQ"), py::arg("partial_rows"), py::arg("dw_part"), py::arg("db1_part"),
        py::arg("device"), py::arg("stream"),
        "dQ = dU * w * act''(Q + b1); per-block partial rows of dw, db1 (partial_rows, H).");

  m.def("_owner_samples", &mdm::owner_samples, py::arg("B"), py::arg("m"), py::arg("kind"),
        py::arg("negatives"), py::arg("role"), py::arg("cls"), py::arg("r"), py::arg("chunk"),
        "Host run of the kernels' owner enumeration (grid sets): the unmasked flat ids "
        "owned by (class, row r) in backward chunk `chunk`.");
  m.def("_backward_chunks", &mdm::backward_chunks, py::arg("B"), py::arg("m"),
        py::arg("kind"), py::arg("negatives"), py::arg("role"),
        "Host run of the backward chunk plan: [lead0, lead1, n0, n1] per chunk.");
}
