"""``DependencyPenalty``: the critic plus its estimator, for two-stage training loops.

Colombo et al. (EMNLP 2021) train with alternating updates: the critic T maximises the
dependency bound on the current (detached) representations, then the model minimises
task loss − λ·bound.  With this module both stages are one line each::

    penalty = DependencyPenalty("mine", dims=(d_l, d_a, d_v), weight=0.1)
    critic_opt = torch.optim.Adam(penalty.critic.parameters(), 1e-3)

    for _ in range(critic_steps):                       # stage 1: critic
        critic_opt.zero_grad()
        penalty.critic_loss(z_l, z_a, z_v).backward()
        critic_opt.step()
    loss = task_loss + penalty(z_l, z_a, z_v)           # stage 2: model, −λ·dependency
"""
from __future__ import annotations

import math

from typing import Sequence

import torch
from torch import nn

from .critic import MLPCritic
from .estimators import (MineEMA, dv_bound, infonce_bound, js_bound, mine_loss, nwj_bound,
                         wasserstein_dependency, wasserstein_loss)
from .negatives import parse_negatives

#: Penalty kinds and the bound each maximises.
PENALTY_BOUNDS = {
    "mine": dv_bound,
    "nwj": nwj_bound,
    "js": js_bound,
    "infonce": infonce_bound,
    "wasserstein": wasserstein_dependency,
}


def rms_normalize(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """z / sqrt(mean(z², last dim) + eps): each row rescaled to unit root-mean-square
    (RMSNorm, Zhang & Sennrich 2019, without the learnt gain).  Shape kept, (B, d) -> (B, d)."""
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)


#: ``DependencyPenalty(normalize=...)``: what the critic reads.
NORMALIZATIONS = {None: lambda z: z, "rms": rms_normalize}


class DependencyPenalty(nn.Module):
    """Owns an :class:`~mdm_kernels.MLPCritic` and the estimator of one penalty ``kind``.

    Args:
        kind: ``"mine"`` (DV bound), ``"nwj"``, ``"js"``, ``"infonce"`` or ``"wasserstein"``.
        dims: feature size of each modality.
        hidden, activation: the critic's MLP (see :class:`MLPCritic`).
        weight: λ, the model term is −λ·bound.
        negatives: marginal samples (``"shuffle"``, int K, ``"all"``, ``"distinct"``);
            ``None`` takes the estimator's default (``"all"`` for InfoNCE, ``"shuffle"``
            otherwise).
        gp_weight, one_sided: gradient penalty of the Wasserstein critic loss.
        ema_decay: for ``"mine"``, use MINE's moving-average bias correction in the critic
            loss with this decay (e.g. 0.99); ``None`` disables it.
        backend: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"``.
        group: ``torch.distributed`` process group (or ``"world"``) to draw negatives from
            the global batch under DDP; ``None`` for a single process.
        normalize: what the critic reads.  ``None`` (default): the raw z's.  ``"rms"``: each
            row of each modality rescaled to unit root-mean-square,
            z̃ = z / sqrt(mean_k z_k² + eps) (RMSNorm without gain; ‖z̃‖ = sqrt(d)), so every
            estimate is invariant to a rescaling of z and the critic's inputs stay on a sphere.
            Without it a deterministic encoder can raise any of these bounds without limit by
            inflating the scale of its z's (docs/training.md, "Bounded dependency").
        cap: bound on the model's term: ``None`` (default), ``"log_batch"`` (log B) or a
            number; the model term becomes −λ·min(bound, cap) (see :meth:`model_cap`).
    """

    def __init__(self, kind: str, dims: Sequence[int], hidden=(128,), activation="relu",
                 weight: float = 0.1, negatives=None, gp_weight: float = 10.0,
                 one_sided: bool = False, ema_decay: float | None = None,
                 backend: str = "auto", group=None, normalize: str | None = None,
                 cap: float | str | None = None):
        super().__init__()
        if kind not in PENALTY_BOUNDS:
            raise ValueError(f"kind must be one of {sorted(PENALTY_BOUNDS)}, got {kind!r}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise TypeError(f"weight must be a number, got {weight!r}")
        if ema_decay is not None and kind != "mine":
            raise ValueError("ema_decay applies to kind='mine' only")
        if negatives is not None:
            parse_negatives(negatives)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
        self.normalize = normalize
        if not (cap is None or cap == "log_batch" or (isinstance(cap, (int, float)) and not isinstance(cap, bool)
                                                       and cap > 0)):
            raise ValueError(f"cap must be None, 'log_batch' or a positive number, got {cap!r}")
        self.cap = cap
        self.last_bound = None
        self.last_capped = False  # did the cap bind in the last forward (the model's term)?
        self.kind = kind
        self.weight = float(weight)
        self.negatives = negatives
        self.gp_weight = gp_weight
        self.one_sided = one_sided
        self.backend = backend
        self.group = group
        self.ema = MineEMA(ema_decay) if ema_decay is not None else None
        self.critic = MLPCritic(dims, hidden=hidden, activation=activation)

    def _options(self, generator, perms) -> dict:
        opts = {"generator": generator, "perms": perms, "backend": self.backend,
                "group": self.group}
        if self.negatives is not None:
            opts["negatives"] = self.negatives
        return opts

    def critic_inputs(self, zs) -> tuple[torch.Tensor, ...]:
        """The z's as the critic reads them (see ``normalize``)."""
        return tuple(NORMALIZATIONS[self.normalize](z) for z in zs)

    def bound(self, *zs, generator=None, perms=None) -> torch.Tensor:
        """The dependency estimate (nats), differentiable w.r.t. the z's and the critic."""
        return PENALTY_BOUNDS[self.kind](self.critic, *self.critic_inputs(zs), **self._options(generator, perms))

    def forward(self, *zs, generator=None, perms=None) -> torch.Tensor:
        """Model term −λ·bound (add it to the task loss); with ``cap``, −λ·min(bound, cap):
        no gradient pushes the model once the batch estimate exceeds the cap.  The uncapped
        value is kept in ``last_bound`` (detached) for logging, and whether the cap bound in
        ``last_capped``."""
        b = self.bound(*zs, generator=generator, perms=perms)
        self.last_bound = b.detach()
        cap = self.model_cap(zs[0].shape[0])
        self.last_capped = False
        if cap is not None:
            # where it binds the term is the constant -λ·cap: zero gradient for the model
            # (counted per epoch in the training history as ``cap_binds``)
            self.last_capped = bool(self.last_bound > cap)
            b = torch.clamp(b, max=cap)
        return -self.weight * b

    def model_cap(self, batch: int) -> float | None:
        """The cap of the model's term for a batch of ``batch`` rows: ``cap="log_batch"``
        gives log B for the mutual-information bounds, the most any distribution-free lower
        bound on mutual information can certify from B samples (McAllester & Stratos, AISTATS
        2020), and no cap for ``"wasserstein"`` (not an MI estimate; with ``normalize="rms"``
        it is bounded by the critic's Lipschitz constant times the input diameter); a number
        is used as is for every kind."""
        if self.cap is None or (self.cap == "log_batch" and self.kind == "wasserstein"):
            return None
        return math.log(batch) if self.cap == "log_batch" else float(self.cap)

    def critic_loss(self, *zs, generator=None, perms=None) -> torch.Tensor:
        """Loss of the critic's step on detached z's: −bound (+ gp_weight·GP for
        Wasserstein; with MINE's moving-average correction when ``ema_decay`` was set)."""
        zs = self.critic_inputs(tuple(z.detach() for z in zs))
        opts = self._options(generator, perms)
        if self.kind == "wasserstein":
            return wasserstein_loss(self.critic, *zs, gp_weight=self.gp_weight,
                                    one_sided=self.one_sided, **opts)
        if self.kind == "mine":
            return mine_loss(self.critic, *zs, ema=self.ema, **opts)
        return -PENALTY_BOUNDS[self.kind](self.critic, *zs, **opts)

    @torch.no_grad()
    def estimate(self, *zs, generator=None, perms=None) -> torch.Tensor:
        """The bound without gradients (for logging)."""
        return self.bound(*zs, generator=generator, perms=perms)

    def get_extra_state(self):
        return self.ema.state_dict() if self.ema is not None else None

    def set_extra_state(self, state) -> None:
        if state is not None and self.ema is not None:
            self.ema.load_state_dict(state)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, weight={self.weight}, negatives={self.negatives!r}, "
                f"backend={self.backend!r}, normalize={self.normalize!r}")
