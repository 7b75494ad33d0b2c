"""One dispatch for every backend:
``backend="auto" | "triton" | "cuda" | "chunked" | "reference"``.

A backend is an object with the :class:`Backend` interface, registered lazily by module path
(so importing :mod:`mdm_kernels` never compiles anything).  ``"auto"`` picks, for CUDA
tensors, the first of Triton and CUDA that is available and supports the critic and the op;
otherwise (CPU or other devices, missing builds, refused critics) the chunked plain-PyTorch
path (:mod:`mdm_kernels.chunked`) for an ``"all"``/``"distinct"`` grid of at least
:data:`CHUNKED_AUTO_MIN_GRID` cells with an ``MLPCritic`` of at most two hidden layers, and
the pure-PyTorch reference, which accepts any callable critic, for everything else.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

import torch

#: Names accepted by ``backend=``.
BACKEND_NAMES = ("auto", "triton", "cuda", "chunked", "reference")

#: Where each backend lives: a module exposing ``BACKEND``.
_BACKEND_MODULES = {
    "reference": "mdm_kernels.reference.backend",
    "triton": "mdm_kernels.ops.triton_backend",
    "cuda": "mdm_kernels.ops.cuda_backend",
    "chunked": "mdm_kernels.chunked",
}

#: Preference order of ``"auto"`` among the fused backends.
_AUTO_ORDER = ("triton", "cuda")

#: ``"auto"`` runs the chunked path instead of the reference when no fused backend can run
#: and the grid — B^m cells for ``"all"``/``"distinct"`` (B² for InfoNCE) — has at least this
#: many: 2^16, e.g. m = 2 at B = 256, m = 3 at B = 41, where the reference's memory passes
#: ~200 MB (H = 128) and the chunked path is 8-18x faster on a CPU.  Below it ``"auto"`` keeps
#: the small workloads on the oracle: the chunked path is faster from ~1,000 cells (2.5-3.5x
#: at 1,000-4,096, even at 64-512; 1 CPU thread, torch 2.13), but the reference's memory is
#: small there (docs/chunked.md).
CHUNKED_AUTO_MIN_GRID = 1 << 16

_cache: dict[str, object] = {}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, no GPU, unsupported critic...)."""


class Backend:
    """Interface of a backend.  Subclasses override the ``*_terms`` methods.

    ``op`` names are the estimator kinds (``dv``, ``nwj``, ``js``, ``infonce``,
    ``wasserstein``) and ``gradient_penalty``.
    """

    name = "abstract"

    #: Whether the backend implements ``negatives="distinct"`` (combinations of pairwise
    #: distinct indices, ``MarginalSamples.distinct``).  Those that do not are refused by
    #: :func:`resolve_backend` with the reason, never silently run as ``"all"``.
    supports_distinct_negatives = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device`` at all, or ``None``."""
        return None

    def unsupported_reason(self, op: str, critic, zs: Sequence[torch.Tensor],
                           samples=None) -> str | None:
        """Why this backend cannot run ``op`` for this critic/input, or ``None``."""
        return None

    def fused_critic_reason(self, critic, zs, hidden_layers: int) -> str | None:
        """The checks every fused backend shares: an ``MLPCritic`` with at most
        ``hidden_layers`` hidden layers, and no float64 critic or inputs (the fused kernels
        compute in float32; float64 is the reference's job, never silently down-cast)."""
        from .critic import MLPCritic
        label = f"{self.name} kernels"
        if not isinstance(critic, MLPCritic):
            return f"{label} take an MLPCritic, got {type(critic).__name__}"
        if len(critic.hidden) > hidden_layers:
            return (f"{label} support an MLPCritic with at most {hidden_layers} hidden "
                    f"layer(s), the critic has {len(critic.hidden)}")
        if zs[0].dtype == torch.float64 or critic.first_bias.dtype == torch.float64:
            return f"{label} take float32, float16 or bfloat16 (float64: backend='reference')"
        return None

    def dependency_terms(self, kind, critic, zs, samples):
        """(joint_term, marginal_term), see :mod:`mdm_kernels.reference.estimators`."""
        raise NotImplementedError

    def gradient_penalty(self, critic, joint, marginal, eps, one_sided):
        """GP for validated inputs and explicit ε, see :mod:`mdm_kernels.reference.gradient_penalty`."""
        raise NotImplementedError

    def wasserstein_terms(self, critic, zs, samples, gp_perms, eps, one_sided):
        """(joint_term, marginal_term, gp) of ``wasserstein_loss``.

        The GP is taken at interpolations between joint row i (repeated) and marginal sample
        (k, i) = rows ``gp_perms[k, :, i]``, with ε of shape (K'·B,).  Fused backends override
        this to share the per-modality projections between the two parts.
        """
        joint, marginal = self.dependency_terms("wasserstein", critic, zs, samples)
        k = gp_perms.shape[0]
        joint_rows = [z.repeat(k, 1) for z in zs]
        marg_rows = [z.index_select(0, gp_perms[:, j].reshape(-1)) for j, z in enumerate(zs)]
        gp = self.gradient_penalty(critic, joint_rows, marg_rows, eps, one_sided)
        return joint, marginal, gp


@torch.compiler.assume_constant_result
def _import_module(path: str) -> str:
    """Import ``path``; ``""``, or the ImportError's text.  Dynamo does not trace
    ``importlib``: marked as a constant result, this runs eagerly even when the first
    estimator call of a process is inside a ``torch.compile``'d step (no graph break)."""
    try:
        importlib.import_module(path)
    except ImportError as exc:
        return str(exc)
    return ""


def get_backend(name: str) -> Backend:
    """The backend object called ``name`` (raises :class:`BackendUnavailable` if it failed
    to import)."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name not in _cache:
        error = _import_module(_BACKEND_MODULES[name])
        _cache[name] = (ImportError(error) if error
                        else sys.modules[_BACKEND_MODULES[name]].BACKEND)
    found = _cache[name]
    if isinstance(found, ImportError):
        raise BackendUnavailable(f"backend {name!r} is not available: {found}")
    return found


def _reason(name: str, op: str, critic, zs, samples) -> str | None:
    try:
        backend = get_backend(name)
    except BackendUnavailable as exc:
        return str(exc)
    return (backend.unavailable_reason(zs[0].device)
            or backend.unsupported_reason(op, critic, zs, samples)
            or _negatives_reason(backend, samples))


def _negatives_reason(backend: Backend, samples) -> str | None:
    """Why ``backend`` cannot draw ``samples``' negatives, or ``None``."""
    if getattr(samples, "distinct", False) and not backend.supports_distinct_negatives:
        return (f"negatives='distinct' is not implemented by the {backend.name} kernels yet "
                f"(backend='reference' computes it)")
    return None


def grid_cells(op: str, samples) -> int:
    """Cells of the implicit grid ``op`` scans for ``samples``: B^m (``"all"``/``"distinct"``),
    B² for InfoNCE's anchor × candidate grid, 0 for shuffles or no samples."""
    if samples is None or getattr(samples, "perms", None) is not None:
        return 0
    b = samples.batch_size
    return b * b if op == "infonce" else b ** samples.num_modalities


def _chunked_preferred(op: str, critic, zs, samples) -> bool:
    """Whether ``"auto"`` runs the chunked path (a grid of at least
    :data:`CHUNKED_AUTO_MIN_GRID` cells that the chunked path takes)."""
    return (grid_cells(op, samples) >= CHUNKED_AUTO_MIN_GRID
            and _reason("chunked", op, critic, zs, samples) is None)


def resolve_backend(backend: str, op: str, critic, zs: Sequence[torch.Tensor],
                    samples=None) -> Backend:
    """Choose the backend that runs ``op``; explicit requests that cannot run raise
    :class:`BackendUnavailable` with the reason."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        if zs[0].device.type == "cuda":
            for name in _AUTO_ORDER:
                if _reason(name, op, critic, zs, samples) is None:
                    return get_backend(name)
        if _chunked_preferred(op, critic, zs, samples):
            return get_backend("chunked")
        return get_backend("reference")
    reason = _reason(backend, op, critic, zs, samples)
    if reason is not None:
        raise BackendUnavailable(f"backend={backend!r} cannot run {op}: {reason}")
    return get_backend(backend)
