"""The reference backend object behind ``backend="reference"`` (and ``"auto"``'s fallback)."""
from __future__ import annotations

from ..dispatch import Backend
from .estimators import dependency_terms
from .gradient_penalty import gradient_penalty_terms


class ReferenceBackend(Backend):
    """Plain PyTorch; accepts any callable critic on any device."""

    name = "reference"
    supports_distinct_negatives = True

    def dependency_terms(self, kind, critic, zs, samples):
        return dependency_terms(kind, critic, zs, samples)

    def gradient_penalty(self, critic, joint, marginal, eps, one_sided):
        return gradient_penalty_terms(critic, joint, marginal, eps, one_sided)


BACKEND = ReferenceBackend()
