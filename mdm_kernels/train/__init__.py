"""Training layer: ``python -m mdm_kernels.train`` (fusion models on MOSI with penalties)."""
from .config import TrainConfig, parse_args
from .metrics import sentiment_metrics

__all__ = ["TrainConfig", "parse_args", "sentiment_metrics", "train"]


def train(cfg: TrainConfig, **kw):
    from .loop import train as _train
    return _train(cfg, **kw)
