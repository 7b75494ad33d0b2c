"""mdm_kernels: fused GPU kernels for mutual-dependency penalties in multimodal learning.

Colombo et al., "Improving Multimodal fusion via Mutual Dependency Maximisation",
EMNLP 2021 (arXiv 2109.00922).  See README.md for the formulas and the API.
"""
from .critic import ACTIVATIONS, MLPCritic
from .dispatch import BACKEND_NAMES, BackendUnavailable
from .estimators import (MineEMA, dependency_terms, dv_bound, gradient_penalty, infonce_bound,
                         infonce_loss, js_bound, js_loss, mine_loss, nwj_bound, nwj_loss,
                         wasserstein_dependency, wasserstein_loss)
from .negatives import MarginalSamples, product_of_marginals
from .penalty import DependencyPenalty
from .reference.estimators import GridTooLarge

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "BACKEND_NAMES", "BackendUnavailable", "DependencyPenalty", "GridTooLarge",
    "MLPCritic",
    "MarginalSamples", "MineEMA", "dependency_terms", "dv_bound", "gradient_penalty",
    "infonce_bound", "infonce_loss", "js_bound", "js_loss", "mine_loss", "nwj_bound", "nwj_loss",
    "product_of_marginals", "wasserstein_dependency", "wasserstein_loss", "__version__",
]
