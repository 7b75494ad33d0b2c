"""Pure-PyTorch reference implementations: readable, float64-capable, numerically stable.

They are the correctness oracle of every fused kernel and have the same signatures as the
public API (minus ``backend``).
"""
from .estimators import (KINDS, dependency_terms, dv_bound, infonce_bound, js_bound,
                         log_mean_exp, marginal_scores, nwj_bound, wasserstein_dependency)
from .gradient_penalty import gradient_penalty

__all__ = ["KINDS", "dependency_terms", "dv_bound", "nwj_bound", "js_bound", "infonce_bound",
           "wasserstein_dependency", "gradient_penalty", "log_mean_exp", "marginal_scores"]
