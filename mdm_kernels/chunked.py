"""``"all"`` and ``"distinct"`` negatives in bounded memory on every device: the chunked path.

``backend="chunked"`` (and ``backend="auto"`` where no fused kernel runs and the grid is
large, see :data:`mdm_kernels.dispatch.CHUNKED_AUTO_MIN_GRID`) computes the marginal term of
every estimator over the implicit grid of ``negatives="all"`` (B^m samples) or
``"distinct"`` (B(B−1)···(B−m+1) samples) in plain PyTorch, block by block, without ever
materialising the grid: any device, any dtype (float64 included, gradcheck-able), an
:class:`~mdm_kernels.critic.MLPCritic` with one or two hidden layers, m ≥ 2, every activation.

The decomposition is the fused kernels' (:mod:`mdm_kernels.ops.outer_sums`): with the split
first layer, every grid score is

    T(i_1, …, i_NF) = head(F_1[i_1] + … + F_NF[i_NF]),    F_f: B × H_1,
    head(a) = w_out·σ(a) + b_out                      (one hidden layer)
    head(a) = w_out·σ(W_2 σ(a) + b_2) + b_out         (two hidden layers)

with F_1 = z_1 W_{1,1}ᵀ + b_1 and F_f = z_f W_{1,f}ᵀ (NF = m), or for InfoNCE (anchor z_1,
the candidate modalities kept together, NF = 2) F_2 = Σ_{k ≥ 2} z_k W_{1,k}ᵀ.  The grid is
rows × columns: a row is a combination of the first NF − 1 factors (flat id in row-major
order, i_1 slowest, as :func:`~mdm_kernels.negatives.all_grid_indices`), a column an index
of the last factor.  A block of r rows × c columns forms its pre-activations
A[rows][:, None] + F_NF[cols][None] (r × c × H_1, A = the rows' gathered sum), scores them and
folds them into the estimator's reduction (:mod:`mdm_kernels.reference.estimators`):

    DV, NWJ    online log-sum-exp over every sample: LSE (saved for the backward)
    InfoNCE    online log-sum-exp per anchor row over its candidates: LSE_i (saved)
    JS, W      running sums of softplus(T), T

and ``"distinct"`` masks, inside each block, the samples whose factor indices coincide
(InfoNCE: candidate = anchor).  The backward recomputes each block from the saved factors
and statistics — exactly like the fused kernels — and forms g = ∂term/∂T
(:mod:`mdm_kernels.ops.marginal_terms`' φ: e^{T − LSE}, e^{T − 1 − log N},
e^{T − LSE_i}/B, sigmoid(T)/N, 1/N), then

    ∂A[rows] = Σ_cols ∂a,   ∂F_NF[cols] = Σ_rows ∂a,   ∂a = σ'(a) ⊙ (head's backward of g)

with ∂A scattered to the row factors (``index_add_``) and the head's parameter gradients
(w_out, b_out, W_2, b_2) summed over blocks.  Autograd takes ∂F_f on to z_f, W_{1,f} and b_1.

Memory: the factors and their gradients (2·NF·B·H_1), InfoNCE's B row statistics, and one
block's few buffers (r·c·(H_1 + H_2) ≈ :data:`BLOCK_ELEMENTS` elements each, 1 MB in float32)
— O(B·H + one block), whatever the grid.  Time: the same arithmetic as the reference's
critic on the grid minus the first layer's matmuls (one add per sample and hidden unit instead
of 2·Σd FLOPs), without the reference's gathered copies.

``torch.compile``: while Dynamo traces, the block loop is two ``torch.library`` custom ops
(``mdm_kernels::chunked_grid_fwd``/``_bwd``: fake kernels for the shapes, an autograd
formula), each one opaque node — no graph break (``fullgraph=True`` works), no unrolled loop;
the projections and the joint term around them are compiled.

Shuffle negatives (``"shuffle"``, K, ``perms``: K·B samples, nothing to chunk) and the
gradient penalty are delegated to the reference.

Colombo et al., "Improving Multimodal fusion via Mutual Dependency Maximisation", EMNLP 2021
(the penalties over m modalities); the bounds are credited in
:mod:`mdm_kernels.reference.estimators`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._validation import compute_dtype
from .critic import LEAKY_RELU_SLOPE, MLPCritic
from .dispatch import Backend
from .negatives import MarginalSamples
from .reference import estimators as reference
from .reference.gradient_penalty import gradient_penalty_terms

#: Elements of one block's buffer (r·c·(H_1 + H_2)): 2^18, 1 MB in float32 (2 MB in
#: float64).  The backward holds about five such buffers at a time — a working set of a few
#: MB that stays in a CPU's L2/L3 cache (2^16-2^22 measured within noise on a 2-core Xeon,
#: the larger blocks slower by up to 2x).
BLOCK_ELEMENTS = 1 << 18

#: Block size on accelerators (CUDA, MPS, ...): 2^22 elements (16 MB in float32), so that the
#: ~20 kernel launches of a block are amortised over enough work (not measured yet: no GPU).
DEVICE_BLOCK_ELEMENTS = 1 << 22


def default_block_elements(device: torch.device) -> int:
    """:data:`BLOCK_ELEMENTS` on a CPU, :data:`DEVICE_BLOCK_ELEMENTS` elsewhere."""
    return BLOCK_ELEMENTS if device.type == "cpu" else DEVICE_BLOCK_ELEMENTS

#: Hidden layers the chunked path supports.
MAX_HIDDEN_LAYERS = 2

_NEG_BIG = -1.0e30  # initial running maximum: finite, so e^{m − m'} never sees inf − inf
_SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: linear (derivative 1) above it


@dataclass(frozen=True)
class GridSpec:
    """What one chunked marginal term computes (hashable: the autograd.Function's constant).

    ``kind``: estimator (``dv``, ``nwj``, ``js``, ``infonce``, ``wasserstein``); ``batch``: B;
    ``factors``: NF (m, or 2 for InfoNCE); ``distinct``: mask coinciding indices;
    ``activation``: σ's name; ``hidden_layers``: 1 or 2; ``block_elements``: block size.
    """

    kind: str
    batch: int
    factors: int
    distinct: bool
    activation: str
    hidden_layers: int
    block_elements: int = BLOCK_ELEMENTS

    @property
    def num_rows(self) -> int:
        return self.batch ** (self.factors - 1)

    @property
    def num_samples(self) -> int:
        """N of the marginal mean: B^NF or the falling factorial B(B−1)···(B−NF+1)."""
        b, nf = self.batch, self.factors
        return math.perm(b, nf) if self.distinct else b ** nf

    @property
    def num_candidates(self) -> int:
        """InfoNCE's candidates per anchor: B (``"all"``) or B − 1 (``"distinct"``)."""
        return self.batch - 1 if self.distinct else self.batch


# --------------------------------------------------------------------------- activations

def _act(name: str, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """σ(x) (in place where ``inplace`` and σ allows it)."""
    if name == "relu":
        return torch.relu_(x) if inplace else torch.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, LEAKY_RELU_SLOPE, inplace=inplace)
    if name == "tanh":
        return torch.tanh_(x) if inplace else torch.tanh(x)
    if name == "softplus":
        return F.softplus(x)
    if name == "gelu":
        return F.gelu(x)
    raise ValueError(f"activation {name!r} is not supported by the chunked path")


#: Activations whose derivative is a function of σ(x) alone: computed in place.
_FROM_RESULT = ("relu", "leaky_relu", "tanh")


def _act_saving(name: str, x: torch.Tensor):
    """(σ(x), x or ``None``): in place when the backward needs only σ(x)."""
    if name in _FROM_RESULT:
        return _act(name, x, inplace=True), None
    return _act(name, x), x


def _act_backward(name: str, grad: torch.Tensor, x: torch.Tensor | None,
                  sx: torch.Tensor) -> torch.Tensor:
    """σ'(x) ⊙ grad (grad broadcast to x), with torch's own derivative kernels — those of
    the reference's autograd: relu 1[σ(x) > 0], leaky relu 1 or 0.01, tanh 1 − σ(x)²,
    softplus sigmoid(x) (1 above the threshold 20), exact GELU Φ(x) + x·φ(x)."""
    grad = grad.expand_as(sx)
    aten = torch.ops.aten
    if name == "relu":
        return aten.threshold_backward(grad, sx, 0)
    if name == "leaky_relu":
        return aten.leaky_relu_backward(grad, sx, LEAKY_RELU_SLOPE, True)
    if name == "tanh":
        return aten.tanh_backward(grad, sx)
    if name == "softplus":
        return aten.softplus_backward(grad, x, 1.0, _SOFTPLUS_THRESHOLD)
    if name == "gelu":
        return aten.gelu_backward(grad, x)
    raise ValueError(f"activation {name!r} is not supported by the chunked path")


# --------------------------------------------------------------------------- blocks

def _block_shape(spec: GridSpec, hidden_sum: int) -> tuple[int, int]:
    """(rows r, columns c) of a block: r·c·hidden_sum ≈ ``spec.block_elements``."""
    b, budget = spec.batch, max(1, spec.block_elements)
    cols = b if b * hidden_sum <= budget else max(1, budget // hidden_sum)
    rows = max(1, budget // (cols * hidden_sum))
    return min(rows, spec.num_rows), cols


class _RowBlock:
    """Rows [r0, r1) of the grid: their factor indices (``None`` for NF = 2: the rows are
    F_1's own), the gathered sum A (r × H_1) and, for ``"distinct"``, the rows whose leading
    indices are pairwise distinct."""

    def __init__(self, spec: GridSpec, factors: Sequence[torch.Tensor], r0: int, r1: int):
        self.r0, self.r1 = r0, r1
        lead = factors[:-1]
        device = factors[0].device
        if len(lead) == 1:
            self.idx = None
            self.a = lead[0][r0:r1]
            self.row_ok = None
        else:
            flat = torch.arange(r0, r1, device=device)
            idx = []
            for _ in range(len(lead)):
                idx.append(flat % spec.batch)
                flat = flat // spec.batch
            self.idx = idx[::-1]  # i_1 slowest
            a = lead[0].index_select(0, self.idx[0])
            for f, i in zip(lead[1:], self.idx[1:]):
                a = a + f.index_select(0, i)
            self.a = a
            self.row_ok = None
            if spec.distinct:
                ok = torch.ones(r1 - r0, dtype=torch.bool, device=device)
                for p in range(len(self.idx)):
                    for q in range(p + 1, len(self.idx)):
                        ok &= self.idx[p] != self.idx[q]
                self.row_ok = ok

    def lead_indices(self, device) -> list[torch.Tensor]:
        if self.idx is None:
            return [torch.arange(self.r0, self.r1, device=device)]
        return self.idx

    def valid(self, spec: GridSpec, c0: int, c1: int, device) -> torch.Tensor | None:
        """(r × c) mask of the block's ``"distinct"`` samples, ``None`` for ``"all"``."""
        if not spec.distinct:
            return None
        cols = torch.arange(c0, c1, device=device)
        ok = None
        for i in self.lead_indices(device):
            diff = i[:, None] != cols[None, :]
            ok = diff if ok is None else ok & diff
        if self.row_ok is not None:
            ok &= self.row_ok[:, None]
        return ok

    def scatter(self, grads: list[torch.Tensor], d_a: torch.Tensor) -> None:
        """Add ∂A (r × H_1) into the leading factors' gradients."""
        if self.idx is None:
            grads[0][self.r0:self.r1] += d_a
            return
        for g, i in zip(grads[:-1], self.idx):
            g.index_add_(0, i, d_a)


def _blocks(spec: GridSpec, factors, hidden_sum: int):
    """Yield (row block, c0, c1) over the whole grid."""
    rows, cols = _block_shape(spec, hidden_sum)
    for r0 in range(0, spec.num_rows, rows):
        block = _RowBlock(spec, factors, r0, min(spec.num_rows, r0 + rows))
        for c0 in range(0, spec.batch, cols):
            yield block, c0, min(spec.batch, c0 + cols)


def _head_scores(spec: GridSpec, pre: torch.Tensor, head) -> torch.Tensor:
    """Scores (r × c) of a block's pre-activations ``pre`` (r × c × H_1, consumed)."""
    w_out, b_out = head[0], head[1]
    h = _act(spec.activation, pre, inplace=True)
    if spec.hidden_layers == 2:
        h = _act(spec.activation, torch.addmm(head[3], h.reshape(-1, h.shape[-1]),
                                              head[2].t()), inplace=True)
        return torch.addmv(b_out, h, w_out).reshape(pre.shape[:2])
    return torch.addmv(b_out, h.reshape(-1, h.shape[-1]), w_out).reshape(pre.shape[:2])


def _hidden_sum(spec: GridSpec, head) -> int:
    return head[0].shape[0] if spec.hidden_layers == 1 else head[2].shape[1] + head[2].shape[0]


# --------------------------------------------------------------------------- forward

def _forward(spec: GridSpec, factors, head):
    """(marginal term, statistic): LSE (DV/NWJ, 0-dim), row LSEs (InfoNCE, B) or None."""
    last = factors[-1]
    dtype, device = last.dtype, last.device
    kind = spec.kind
    run_m = torch.full((), _NEG_BIG, dtype=dtype, device=device)
    run_s = torch.zeros((), dtype=dtype, device=device)
    acc = torch.zeros((), dtype=dtype, device=device)
    if kind == "infonce":
        run_m = torch.full((spec.batch,), _NEG_BIG, dtype=dtype, device=device)
        run_s = torch.zeros(spec.batch, dtype=dtype, device=device)
    neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
    for blk, c0, c1 in _blocks(spec, factors, _hidden_sum(spec, head)):
        t = _head_scores(spec, blk.a[:, None, :] + last[None, c0:c1, :], head)
        valid = blk.valid(spec, c0, c1, device)
        if kind in ("dv", "nwj"):
            if valid is not None:
                t = torch.where(valid, t, neg_inf)
            new_m = torch.maximum(run_m, t.max())
            run_s = run_s * torch.exp(run_m - new_m) + torch.exp(t - new_m).sum()
            run_m = new_m
        elif kind == "infonce":
            if valid is not None:
                t = torch.where(valid, t, neg_inf)
            m_old, s_old = run_m[blk.r0:blk.r1], run_s[blk.r0:blk.r1]
            new_m = torch.maximum(m_old, t.max(dim=1).values)
            s_new = s_old * torch.exp(m_old - new_m) + torch.exp(t - new_m[:, None]).sum(1)
            run_m[blk.r0:blk.r1] = new_m
            run_s[blk.r0:blk.r1] = s_new
        else:
            f = F.softplus(t) if kind == "js" else t
            acc = acc + (f.sum() if valid is None else torch.where(valid, f, 0.0).sum())
    if kind in ("dv", "nwj"):
        lse = run_m + torch.log(run_s)
        lme = lse - math.log(spec.num_samples)
        return (lme if kind == "dv" else torch.exp(lme - 1.0)), lse
    if kind == "infonce":
        row_lse = run_m + torch.log(run_s)
        return row_lse.mean() - math.log(spec.num_candidates), row_lse
    return acc / spec.num_samples, None


# --------------------------------------------------------------------------- backward

def _score_grads(spec: GridSpec, t, valid, blk, stat, gout):
    """g = ∂(gout · term)/∂T on a block (0 off the ``"distinct"`` samples)."""
    kind = spec.kind
    if kind == "dv":
        g = gout * torch.exp(t - stat)
    elif kind == "nwj":
        g = gout * torch.exp(t - (1.0 + math.log(spec.num_samples)))
    elif kind == "infonce":
        g = (gout / spec.batch) * torch.exp(t - stat[blk.r0:blk.r1, None])
    elif kind == "js":
        g = (gout / spec.num_samples) * torch.sigmoid(t)
    else:
        g = (gout / spec.num_samples).expand_as(t)
    if valid is not None:
        g = torch.where(valid, g, 0.0)
    return g


def _backward(spec: GridSpec, factors, head, stat, gout):
    """Gradients of gout·term w.r.t. the factors and the head's parameters."""
    last = factors[-1]
    device = last.device
    act = spec.activation
    grads_f = [torch.zeros_like(f) for f in factors]
    w_out, b_out = head[0], head[1]
    g_wout = torch.zeros_like(w_out)
    g_bout = torch.zeros_like(b_out)
    two = spec.hidden_layers == 2
    if two:
        w2, b2 = head[2], head[3]
        g_w2, g_b2 = torch.zeros_like(w2), torch.zeros_like(b2)
    for blk, c0, c1 in _blocks(spec, factors, _hidden_sum(spec, head)):
        pre = blk.a[:, None, :] + last[None, c0:c1, :]          # r × c × H_1
        r, c, h1 = pre.shape
        s1, x1 = _act_saving(act, pre)
        valid = blk.valid(spec, c0, c1, device)
        if two:
            flat1 = s1.reshape(-1, h1)
            s2, x2 = _act_saving(act, torch.addmm(b2, flat1, w2.t()))   # n × H_2
            t = torch.addmv(b_out, s2, w_out).reshape(r, c)
            g = _score_grads(spec, t, valid, blk, stat, gout).reshape(-1)
            g_wout += s2.t() @ g
            g_bout += g.sum()
            d2 = _act_backward(act, g[:, None] * w_out, x2, s2)    # n × H_2
            del s2, x2
            g_w2 += d2.t() @ flat1
            g_b2 += d2.sum(0)
            d_pre = _act_backward(act, (d2 @ w2).reshape(r, c, h1), x1, s1)
        else:
            t = torch.addmv(b_out, s1.reshape(-1, h1), w_out).reshape(r, c)
            g = _score_grads(spec, t, valid, blk, stat, gout)
            g_wout += s1.reshape(-1, h1).t() @ g.reshape(-1)
            g_bout += g.sum()
            d_pre = _act_backward(act, g[:, :, None], x1, s1)     # σ'(a)·g, × w_out below
        del s1, x1, pre
        d_a = d_pre.sum(1)
        d_c = d_pre.sum(0)
        if not two:
            d_a = d_a * w_out
            d_c = d_c * w_out
        blk.scatter(grads_f, d_a)
        grads_f[-1][c0:c1] += d_c
    head_grads = [g_wout, g_bout] + ([g_w2, g_b2] if two else [])
    return grads_f, head_grads


class _ChunkedGridTerm(torch.autograd.Function):
    """The marginal term of ``spec`` from the factors F_1..F_NF and the head's parameters
    (w_out (H,), b_out (1,)[, W_2 (H_2 × H_1), b_2 (H_2,)]); 0-dim."""

    @staticmethod
    def forward(ctx, spec: GridSpec, *tensors):
        factors, head = tensors[:spec.factors], tensors[spec.factors:]
        value, stat = _forward(spec, factors, head)
        ctx.spec = spec
        ctx.has_stat = stat is not None
        ctx.save_for_backward(*tensors, *([stat] if stat is not None else []))
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        spec = ctx.spec
        saved = ctx.saved_tensors
        stat = saved[-1] if ctx.has_stat else None
        tensors = saved[:-1] if ctx.has_stat else saved
        factors, head = tensors[:spec.factors], tensors[spec.factors:]
        grads_f, grads_h = _backward(spec, factors, head, stat, gout)
        return (None, *grads_f, *grads_h)


# torch.compile: the block loop as two custom ops (forward, backward), each one opaque node of
# the graph with a fake kernel (shapes only) and an autograd formula — no graph break and no
# unrolled loop.  Eagerly the autograd.Function above runs the same bodies without the
# dispatcher's custom-op layer.

def _spec_args(spec: GridSpec) -> tuple:
    return (spec.kind, spec.batch, spec.distinct, spec.activation, spec.hidden_layers,
            spec.block_elements)


def _spec_of(factors, kind, batch, distinct, activation, hidden_layers, block_elements):
    return GridSpec(kind, batch, len(factors), distinct, activation, hidden_layers,
                    block_elements)


def _stat_shape(kind: str, batch: int) -> tuple:
    return (batch,) if kind == "infonce" else (() if kind in ("dv", "nwj") else (0,))


@torch.library.custom_op("mdm_kernels::chunked_grid_fwd", mutates_args=())
def _grid_fwd_op(factors: list[torch.Tensor], head: list[torch.Tensor], kind: str, batch: int,
                 distinct: bool, activation: str, hidden_layers: int,
                 block_elements: int) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec_of(factors, kind, batch, distinct, activation, hidden_layers, block_elements)
    value, stat = _forward(spec, factors, head)
    if stat is None:
        stat = factors[0].new_empty(0)
    return value, stat


@_grid_fwd_op.register_fake
def _(factors, head, kind, batch, distinct, activation, hidden_layers, block_elements):
    return factors[0].new_empty(()), factors[0].new_empty(_stat_shape(kind, batch))


@torch.library.custom_op("mdm_kernels::chunked_grid_bwd", mutates_args=())
def _grid_bwd_op(factors: list[torch.Tensor], head: list[torch.Tensor], stat: torch.Tensor,
                 gout: torch.Tensor, kind: str, batch: int, distinct: bool, activation: str,
                 hidden_layers: int, block_elements: int) -> list[torch.Tensor]:
    spec = _spec_of(factors, kind, batch, distinct, activation, hidden_layers, block_elements)
    grads_f, grads_h = _backward(spec, factors, head, stat if stat.numel() else None, gout)
    return list(grads_f) + list(grads_h)


@_grid_bwd_op.register_fake
def _(factors, head, stat, gout, kind, batch, distinct, activation, hidden_layers,
      block_elements):
    return [torch.empty_like(t) for t in list(factors) + list(head)]


def _grid_setup_context(ctx, inputs, output):
    factors, head = inputs[0], inputs[1]
    ctx.num_factors = len(factors)
    ctx.spec_args = inputs[2:]
    ctx.save_for_backward(*factors, *head, output[1])


def _grid_backward(ctx, g_value, g_stat):
    saved = ctx.saved_tensors
    nf = ctx.num_factors
    factors, head, stat = list(saved[:nf]), list(saved[nf:-1]), saved[-1]
    grads = _grid_bwd_op(factors, head, stat, g_value, *ctx.spec_args)
    return (list(grads[:nf]), list(grads[nf:])) + (None,) * len(ctx.spec_args)


_grid_fwd_op.register_autograd(_grid_backward, setup_context=_grid_setup_context)


def _apply(spec: GridSpec, *tensors) -> torch.Tensor:
    """The marginal term: the custom op while ``torch.compile`` traces, else the
    autograd.Function (same forward and backward bodies)."""
    if torch.compiler.is_compiling():
        factors, head = list(tensors[:spec.factors]), list(tensors[spec.factors:])
        value, _ = _grid_fwd_op(factors, head, *_spec_args(spec))
        return value
    return _ChunkedGridTerm.apply(spec, *tensors)


# --------------------------------------------------------------------------- public

def critic_reason(critic, zs=None) -> str | None:
    """Why the chunked path cannot take ``critic``, or ``None``."""
    if not isinstance(critic, MLPCritic):
        return (f"the chunked path takes an MLPCritic (the split first layer), got "
                f"{type(critic).__name__} (backend='reference' takes any callable)")
    if len(critic.hidden) > MAX_HIDDEN_LAYERS:
        return (f"the chunked path supports an MLPCritic with at most {MAX_HIDDEN_LAYERS} "
                f"hidden layers, the critic has {len(critic.hidden)}")
    return None


def grid_spec(kind: str, critic: MLPCritic, samples: MarginalSamples,
              block_elements: int | None = None, device=None) -> GridSpec:
    """The :class:`GridSpec` of estimator ``kind``'s marginal term over ``samples``' grid."""
    if kind not in reference.KINDS:
        raise ValueError(f"kind must be one of {reference.KINDS}, got {kind!r}")
    if samples.perms is not None:
        raise ValueError("the chunked path computes the 'all'/'distinct' grids; shuffles "
                         "(perms) are K·B samples, use the reference")
    if block_elements is None:
        block_elements = default_block_elements(torch.device(device or "cpu"))
    if isinstance(block_elements, bool) or not isinstance(block_elements, int) \
            or block_elements < 1:
        raise ValueError(f"block_elements must be a positive int, got {block_elements!r}")
    nf = 2 if kind == "infonce" else samples.num_modalities
    return GridSpec(kind, samples.batch_size, nf, samples.distinct, critic.activation,
                    len(critic.hidden), block_elements)


def grid_factors(kind: str, critic: MLPCritic, zs: Sequence[torch.Tensor]):
    """(factors F_1..F_NF, head parameters) in the computation dtype (autograd-tracked)."""
    dtype = compute_dtype(critic, zs)
    proj = [z.to(dtype) @ w.to(dtype).t() for z, w in zip(zs, critic.first_weights)]
    first = proj[0] + critic.first_bias.to(dtype)
    if kind == "infonce":
        cand = proj[1]
        for p in proj[2:]:
            cand = cand + p
        factors = [first, cand]
    else:
        factors = [first] + proj[1:]
    head = [critic.out.weight.reshape(-1).to(dtype), critic.out.bias.to(dtype)]
    if len(critic.hidden) == 2:
        layer = critic.hidden_layers[0]
        head += [layer.weight.to(dtype), layer.bias.to(dtype)]
    return factors, head


def chunked_marginal_term(kind: str, critic: MLPCritic, zs: Sequence[torch.Tensor],
                          samples: MarginalSamples,
                          block_elements: int | None = None) -> torch.Tensor:
    """The marginal term of ``kind`` over the ``"all"``/``"distinct"`` grid of ``samples``
    (0-dim, differentiable w.r.t. the critic and every z), in O(B·H + one block) memory:
    log mean_M e^T (DV), mean_M e^{T − 1} (NWJ), mean_M softplus T (JS), mean_M T (W),
    mean_i log mean_{c ∈ C_i} e^{T(i, c)} (InfoNCE)."""
    reason = critic_reason(critic)
    if reason:
        raise TypeError(reason)
    spec = grid_spec(kind, critic, samples, block_elements, zs[0].device)
    factors, head = grid_factors(kind, critic, zs)
    return _apply(spec, *factors, *head)


def dependency_terms(kind: str, critic, zs: Sequence[torch.Tensor], samples: MarginalSamples,
                     block_elements: int | None = None):
    """(joint_term, marginal_term) as :func:`mdm_kernels.reference.estimators.dependency_terms`
    — the grid's marginal term chunked, the B joint scores and shuffles by the reference."""
    if samples.perms is not None:
        return reference.dependency_terms(kind, critic, zs, samples)
    if kind not in reference.KINDS:
        raise ValueError(f"kind must be one of {reference.KINDS}, got {kind!r}")
    b = zs[0].shape[0]
    joint = reference.score_rows(critic, zs,
                                 torch.arange(b, device=zs[0].device).expand(len(zs), -1))
    joint_term = (-F.softplus(-joint)).mean() if kind == "js" else joint.mean()
    return joint_term, chunked_marginal_term(kind, critic, zs, samples, block_elements)


class ChunkedBackend(Backend):
    """``backend="chunked"``: plain PyTorch on any device, the ``"all"``/``"distinct"`` grids
    in O(B·H + one block) memory; shuffles and the gradient penalty by the reference."""

    name = "chunked"
    supports_distinct_negatives = True

    def unsupported_reason(self, op, critic, zs, samples=None) -> str | None:
        if op == "gradient_penalty":
            return None
        return critic_reason(critic, zs)

    def dependency_terms(self, kind, critic, zs, samples):
        return dependency_terms(kind, critic, zs, samples)

    def gradient_penalty(self, critic, joint, marginal, eps, one_sided):
        return gradient_penalty_terms(critic, joint, marginal, eps, one_sided)


BACKEND = ChunkedBackend()
