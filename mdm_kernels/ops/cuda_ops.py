"""``torch.library`` registration of the CUDA C++ kernels (reading order: after ``csrc/``'s
kernels and ``csrc/bindings.cpp``; read next :mod:`mdm_kernels.ops.cuda_backend`).

The raw-pointer entry points of :mod:`mdm_kernels._cuda` (built from ``csrc/`` by
``setup.py``) become custom ops with ``register_fake`` (output shapes for ``torch.compile`` /
FakeTensor tracing) and ``register_autograd``.  Every buffer is allocated here with torch (the
caching allocator's stream semantics apply) on the inputs' device and handed over as
``tensor.data_ptr()`` with that device's index and its *current* stream,
``torch.cuda.current_stream(device).cuda_stream``; the extension makes the device current
for its launches and restores the caller's device afterwards.  Inputs are checked before any
launch, and errors name the argument.

Ops (namespace ``mdm_kernels``; ``kind``, ``act``, ``negatives`` are the integer codes below):

* ``cuda_bounds_fwd(P, b1, w, b_out, perms, kind, act, negatives) -> (terms (2,), stats (B+1,))``:
  fused scoring of the joint and marginal samples of a one-hidden-layer ``MLPCritic`` from the
  per-modality projections P_k = z_k W_{1,k}ᵀ and the estimator reductions; ``terms`` =
  (joint_term, marginal_term), ``stats`` = the log-sum-exp statistics the backward reuses.
* ``cuda_bounds_bwd(..., grad_terms, terms, stats) -> (dP (m, B, H), db1, dw, db_out)``:
  deterministic backward by recomputation (per-row owners, no atomics).
* ``cuda_gp_hidden(Q, b1, w, act) -> U`` and ``cuda_gp_hidden_bwd``: the hidden-unit part
  U = w ⊙ σ'(Q + b1) of the critic's input gradient and its analytic backward (the gradient
  penalty then needs no double backward).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .launch_context import launch_device
from .runtime_flags import fresh_empty

try:
    from .. import _cuda  # built by setup.py from csrc/
    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # not built (no nvcc at install time, or MDM_BUILD_CUDA=0)
    _cuda = None
    IMPORT_ERROR = exc

#: Estimator codes of the kernels (order of mdm_kernels.reference.estimators.KINDS).
KIND_CODES = {"dv": 0, "nwj": 1, "js": 2, "infonce": 3, "wasserstein": 4}
#: Activation codes of the kernels (same as mdm_kernels.ops.triton_helpers.ACTIVATION_CODES).
ACTIVATION_CODES = {"relu": 0, "leaky_relu": 1, "tanh": 2, "softplus": 3, "gelu": 4}
#: Marginal-sample layouts: explicit perms (K, m, B), the "all" grid, its distinct part.
NEGATIVES_CODES = {"perms": 0, "all": 1, "distinct": 2}
#: Storage dtypes of the projections the kernels are instantiated for.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Limits compiled into the kernels (mirror csrc/mdm_cuda.h; tests/test_cuda_build.py checks).
MAX_MODALITIES = 8
MAX_HIDDEN = 4096
MAX_BATCH = 1 << 30
WORKSPACE_FLOATS = 2 * 1024 * 3


def extension():
    """The compiled module, or raise ImportError saying how to build it."""
    if _cuda is None:
        raise ImportError(
            f"mdm_kernels._cuda is not built ({IMPORT_ERROR}); build it with a CUDA toolkit: "
            "`pip install --no-build-isolation -e .` (nvcc on PATH or CUDA_HOME set) or "
            "`python setup.py build_ext --inplace` — see docs/cuda_backend.md")
    return _cuda


def _launch_ctx(t: torch.Tensor) -> tuple[int, int]:
    """(device index, current stream handle of that device) for launches on t's device."""
    if t.device.type == "cuda":
        return t.device.index, torch.cuda.current_stream(t.device).cuda_stream
    return 0, 0  # only reachable with a host-memory stand-in extension (CPU tests of the glue)


def _ptrs(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [int(t.data_ptr()) for t in tensors]


# ------------------------------------------------------------------ input checks
def _host_memory_ok() -> bool:
    """True only for a test stand-in of the extension that works on host memory."""
    return bool(getattr(_cuda, "HOST_MEMORY", False))


def check_tensor(name: str, t, *, device: torch.device, dtypes: Sequence[torch.dtype],
                 shape: Optional[tuple] = None, ndim: Optional[int] = None) -> None:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a contiguous tensor on
    ``device`` (a CUDA device) with a dtype in ``dtypes`` and the given shape / rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda" and not _host_memory_ok():
        raise ValueError(f"{name} must be a CUDA tensor for the CUDA kernels, got device "
                         f"{t.device}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the op's inputs are on {device}: "
                         f"move every input to one device")
    if t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels take raw pointers), got "
                         f"strides {t.stride()}: pass {name}.contiguous()")


def _check_code(name: str, value, codes: dict) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in codes.values():
        raise ValueError(f"{name} must be one of {sorted(codes.values())} "
                         f"({', '.join(f'{v}: {k}' for k, v in codes.items())}), got {value!r}")


def check_bounds_inputs(P, b1, w, b_out, perms, kind, act, negatives) -> None:
    """Checks of every ``cuda_bounds_*`` input, before any launch (errors name the argument):
    P a list of 2..8 contiguous (B, H) float32/float16/bfloat16 CUDA tensors on one device,
    b1, w contiguous float32 (H,), b_out float32 (1,), the codes valid, perms a contiguous
    int64 (K, m, B) tensor exactly when ``negatives`` is the perms code."""
    if not isinstance(P, (list, tuple)) or not 2 <= len(P) <= MAX_MODALITIES:
        raise ValueError(f"P must be a list of 2..{MAX_MODALITIES} projections, got "
                         f"{len(P) if isinstance(P, (list, tuple)) else type(P).__name__}")
    if not isinstance(P[0], torch.Tensor):
        raise TypeError(f"P[0] must be a torch.Tensor, got {type(P[0]).__name__}")
    device = P[0].device
    check_tensor("P[0]", P[0], device=device, dtypes=tuple(DTYPE_CODES), ndim=2)
    b, h = P[0].shape
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"P[0] has {b} rows: the batch size must be in 1..{MAX_BATCH}")
    if not 1 <= h <= MAX_HIDDEN:
        raise ValueError(f"P[0] has {h} columns: the hidden width must be in 1..{MAX_HIDDEN}")
    for k, p in enumerate(P[1:], start=1):
        check_tensor(f"P[{k}]", p, device=device, dtypes=(P[0].dtype,), shape=(b, h))
    for name, t, n in (("b1", b1, h), ("w", w, h), ("b_out", b_out, 1)):
        check_tensor(name, t, device=device, dtypes=(torch.float32,), shape=(n,))
    _check_code("kind", kind, KIND_CODES)
    _check_code("act", act, ACTIVATION_CODES)
    _check_code("negatives", negatives, NEGATIVES_CODES)
    if negatives == NEGATIVES_CODES["perms"]:
        if perms is None:
            raise ValueError("perms is required with negatives=0 (explicit perms)")
        check_tensor("perms", perms, device=device, dtypes=(torch.int64,), ndim=3)
        if perms.shape[0] < 1 or perms.shape[1:] != (len(P), b):
            raise ValueError(f"perms must have shape (K >= 1, {len(P)}, {b}), got "
                             f"{tuple(perms.shape)}")
    elif perms is not None:
        raise ValueError(f"perms must be None with negatives={negatives} (an implicit grid)")
    if negatives == NEGATIVES_CODES["distinct"]:
        needed = 2 if kind == KIND_CODES["infonce"] else len(P)
        if b < needed:
            raise ValueError(f"negatives='distinct' needs a batch of at least {needed} rows, "
                             f"got {b}")


def check_gp_inputs(Q, b1, w, act, dU=None) -> None:
    """Checks of the ``cuda_gp_hidden*`` inputs: Q a contiguous float32 (N >= 1, H) CUDA tensor,
    b1 and w contiguous float32 (H,) on Q's device, a valid activation code, dU (N, H)."""
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"Q must be a torch.Tensor, got {type(Q).__name__}")
    check_tensor("Q", Q, device=Q.device, dtypes=(torch.float32,), ndim=2)
    n, h = Q.shape
    if n < 1 or h < 1:
        raise ValueError(f"Q must have at least one row and one column, got {tuple(Q.shape)}")
    for name, t in (("b1", b1), ("w", w)):
        check_tensor(name, t, device=Q.device, dtypes=(torch.float32,), shape=(h,))
    _check_code("act", act, ACTIVATION_CODES)
    if dU is not None:
        if not isinstance(dU, torch.Tensor) or tuple(dU.shape) != (n, h) \
                or dU.device != Q.device:
            raise ValueError(f"dU must be a ({n}, {h}) tensor on {Q.device}, got "
                             f"{tuple(getattr(dU, 'shape', ()))} on "
                             f"{getattr(dU, 'device', None)}")


def owner_lists(perms: torch.Tensor, kind: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR lists of the samples each output row owns in the backward (csrc/sample_sets.cuh):
    ``order`` (slots, L) holds, for every slot, the flat sample ids sorted stably by their row,
    ``offsets`` (slots, B + 1) where each row's ids start.  Slots: one per modality k, rows
    ``perms[:, k]`` (L = K·B, id k·B + i), or for InfoNCE the candidate rows (one slot,
    L = B·(K+1), id i·(K+1) + c with c = 0 the positive).  Device-side ops only (a stable sort
    and a searchsorted): no host synchronisation."""
    if kind == KIND_CODES["infonce"]:
        anchor = torch.arange(batch, device=perms.device).unsqueeze(0)
        rows = torch.cat([anchor, perms[:, 1]], dim=0).t().reshape(1, -1)
    else:
        rows = perms.transpose(0, 1).reshape(perms.shape[1], -1)
    sorted_rows, order = torch.sort(rows, dim=1, stable=True)
    bounds = torch.arange(batch + 1, device=perms.device).expand(rows.shape[0], -1)
    offsets = torch.searchsorted(sorted_rows, bounds.contiguous())
    return order.contiguous(), offsets.contiguous()


# ------------------------------------------------------------------ fused critic bounds
@torch.library.custom_op("mdm_kernels::cuda_bounds_fwd", mutates_args=())
def bounds_fwd(P: list[torch.Tensor], b1: torch.Tensor, w: torch.Tensor, b_out: torch.Tensor,
               perms: Optional[torch.Tensor], kind: int, act: int, negatives: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    ext = extension()
    check_bounds_inputs(P, b1, w, b_out, perms, kind, act, negatives)
    b, h = P[0].shape
    dev = P[0].device
    terms = fresh_empty(2, dtype=torch.float32, device=dev)
    stats = torch.zeros(b + 1, dtype=torch.float32, device=dev)  # [:B] written by InfoNCE only
    workspace = fresh_empty(WORKSPACE_FLOATS, dtype=torch.float32, device=dev)
    index, stream = _launch_ctx(P[0])
    with launch_device(P[0]):
        ext.bounds_forward(_ptrs(P), b, h, DTYPE_CODES[P[0].dtype], b1.data_ptr(),
                           w.data_ptr(), b_out.data_ptr(), act, kind, negatives,
                           0 if perms is None else perms.data_ptr(),
                           0 if perms is None else perms.shape[0], terms.data_ptr(),
                           stats.data_ptr(), workspace.data_ptr(), index, stream)
    return terms, stats


@bounds_fwd.register_fake
def _bounds_fwd_fake(P, b1, w, b_out, perms, kind, act, negatives):
    b = P[0].shape[0]
    return (P[0].new_empty((2,), dtype=torch.float32),
            P[0].new_empty((b + 1,), dtype=torch.float32))


@torch.library.custom_op("mdm_kernels::cuda_bounds_bwd", mutates_args=())
def bounds_bwd(P: list[torch.Tensor], b1: torch.Tensor, w: torch.Tensor, b_out: torch.Tensor,
               perms: Optional[torch.Tensor], kind: int, act: int, negatives: int,
               grad_terms: torch.Tensor, terms: torch.Tensor, stats: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = extension()
    check_bounds_inputs(P, b1, w, b_out, perms, kind, act, negatives)
    b, h = P[0].shape
    m = len(P)
    dev = P[0].device
    grad_terms = grad_terms.to(torch.float32).contiguous()
    check_tensor("grad_terms", grad_terms, device=dev, dtypes=(torch.float32,), shape=(2,))
    check_tensor("terms", terms, device=dev, dtypes=(torch.float32,), shape=(2,))
    check_tensor("stats", stats, device=dev, dtypes=(torch.float32,), shape=(b + 1,))
    k = 0 if perms is None else perms.shape[0]
    dP = torch.zeros(m, b, h, dtype=torch.float32, device=dev)
    dw_rows = torch.zeros(b, h, dtype=torch.float32, device=dev)
    db_out_rows = torch.zeros(b, dtype=torch.float32, device=dev)
    gamma = fresh_empty(ext.backward_buffer_floats(b, m, kind, negatives, k),
                        dtype=torch.float32, device=dev)
    order = offsets = None
    if perms is not None:
        order, offsets = owner_lists(perms, kind, b)
    index, stream = _launch_ctx(P[0])
    with launch_device(P[0]):
        ext.bounds_backward(_ptrs(P), b, h, DTYPE_CODES[P[0].dtype], b1.data_ptr(),
                            w.data_ptr(), b_out.data_ptr(), act, kind, negatives,
                            0 if perms is None else perms.data_ptr(), k,
                            grad_terms.data_ptr(), terms.data_ptr(), stats.data_ptr(),
                            0 if order is None else order.data_ptr(),
                            0 if offsets is None else offsets.data_ptr(), gamma.data_ptr(),
                            _ptrs(dP.unbind(0)), dw_rows.data_ptr(), db_out_rows.data_ptr(),
                            index, stream)
    # the kernels leave per-row partials; these sums are deterministic torch reductions
    # (db1 = Σ_r dP_1[r]: every sample has exactly one first row)
    return dP, dP[0].sum(0), dw_rows.sum(0), db_out_rows.sum().reshape(1)


@bounds_bwd.register_fake
def _bounds_bwd_fake(P, b1, w, b_out, perms, kind, act, negatives, grad_terms, terms, stats):
    b, h = P[0].shape
    f32 = torch.float32
    return (P[0].new_empty((len(P), b, h), dtype=f32), P[0].new_empty((h,), dtype=f32),
            P[0].new_empty((h,), dtype=f32), P[0].new_empty((1,), dtype=f32))


def _bounds_setup_context(ctx, inputs, output):
    P, b1, w, b_out, perms, kind, act, negatives = inputs
    terms, stats = output
    ctx.num_modalities = len(P)
    ctx.has_perms = perms is not None
    ctx.kind, ctx.act, ctx.negatives = kind, act, negatives
    saved = list(P) + [b1, w, b_out, terms, stats] + ([perms] if perms is not None else [])
    ctx.save_for_backward(*saved)
    ctx.mark_non_differentiable(stats)


def _bounds_backward(ctx, grad_terms, grad_stats):
    saved = ctx.saved_tensors
    m = ctx.num_modalities
    P = list(saved[:m])
    b1, w, b_out, terms, stats = saved[m:m + 5]
    perms = saved[m + 5] if ctx.has_perms else None
    if grad_terms is None:
        grad_terms = torch.zeros_like(terms)
    dP, db1, dw, db_out = bounds_bwd(P, b1, w, b_out, perms, ctx.kind, ctx.act, ctx.negatives,
                                     grad_terms, terms, stats)
    return ([dP[k].to(P[k].dtype) for k in range(m)], db1, dw, db_out, None, None, None, None)


torch.library.register_autograd("mdm_kernels::cuda_bounds_fwd", _bounds_backward,
                                setup_context=_bounds_setup_context)


# ------------------------------------------------------------------ gradient penalty part
@torch.library.custom_op("mdm_kernels::cuda_gp_hidden", mutates_args=())
def gp_hidden(Q: torch.Tensor, b1: torch.Tensor, w: torch.Tensor, act: int) -> torch.Tensor:
    ext = extension()
    check_gp_inputs(Q, b1, w, act)
    n, h = Q.shape
    U = fresh_empty(Q.shape, dtype=Q.dtype, device=Q.device)
    index, stream = _launch_ctx(Q)
    with launch_device(Q):
        ext.gp_hidden_forward(Q.data_ptr(), n, h, b1.data_ptr(), w.data_ptr(), act,
                              U.data_ptr(), index, stream)
    return U


@gp_hidden.register_fake
def _gp_hidden_fake(Q, b1, w, act):
    return torch.empty_like(Q)


@torch.library.custom_op("mdm_kernels::cuda_gp_hidden_bwd", mutates_args=())
def gp_hidden_bwd(Q: torch.Tensor, b1: torch.Tensor, w: torch.Tensor, act: int,
                  dU: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ext = extension()
    check_gp_inputs(Q, b1, w, act, dU)
    n, h = Q.shape
    dU = dU.to(torch.float32).contiguous()
    dQ = fresh_empty(Q.shape, dtype=Q.dtype, device=Q.device)
    rows = min(n, ext.GP_MAX_PARTIAL_ROWS)
    dw_part = fresh_empty(rows, h, dtype=torch.float32, device=Q.device)
    db1_part = fresh_empty(rows, h, dtype=torch.float32, device=Q.device)
    index, stream = _launch_ctx(Q)
    with launch_device(Q):
        ext.gp_hidden_backward(Q.data_ptr(), n, h, b1.data_ptr(), w.data_ptr(), act,
                               dU.data_ptr(), dQ.data_ptr(), rows, dw_part.data_ptr(),
                               db1_part.data_ptr(), index, stream)
    return dQ, dw_part.sum(0), db1_part.sum(0)


@gp_hidden_bwd.register_fake
def _gp_hidden_bwd_fake(Q, b1, w, act, dU):
    h = Q.shape[1]
    return (torch.empty_like(Q), Q.new_empty((h,)), Q.new_empty((h,)))


def _gp_setup_context(ctx, inputs, output):
    Q, b1, w, act = inputs
    ctx.act = act
    ctx.save_for_backward(Q, b1, w)


def _gp_backward(ctx, dU):
    Q, b1, w = ctx.saved_tensors
    dQ, dw, db1 = gp_hidden_bwd(Q, b1, w, ctx.act, dU)
    return dQ, db1, dw, None


torch.library.register_autograd("mdm_kernels::cuda_gp_hidden", _gp_backward,
                                setup_context=_gp_setup_context)
