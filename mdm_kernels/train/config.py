"""Training configuration: defaults < ``--config FILE`` (YAML or JSON) < explicit flags."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..dispatch import BACKEND_NAMES as BACKENDS
from .models import MODELS

PENALTIES = ("none", "mine", "nwj", "js", "infonce", "wasserstein")
#: --critic-input -> DependencyPenalty(normalize=...)
CRITIC_INPUTS = {"rms": "rms", "raw": None}


@dataclass
class TrainConfig:
    model: str = "lf_lstm"
    penalty: str = "none"
    weight: float = 0.1
    critic_steps: int = 1
    negatives: str | int | None = None
    ema_decay: float | None = None
    critic_hidden: int = 128
    critic_lr: float = 1e-3
    gp_weight: float = 10.0
    critic_input: str = "rms"
    dependency_cap: str | float | None = "log_batch"
    dataset: str = "mosi"
    data_dir: str | None = None
    text_features: str = "both"
    epochs: int = 30
    patience: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    d: int | None = None
    hidden: int | None = None
    dropout: float = 0.2
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    out: str = "runs/mosi"
    resume: bool = False
    quiet: bool = False
    skip_test: bool = False
    dist_timeout: float = 300.0  # ddp.DEFAULT_TIMEOUT_S (not imported: config stays torch-free)

    def to_dict(self) -> dict:
        return asdict(self)


HELP = {
    "model": "fusion model: ef_lstm (early fusion LSTM), lf_lstm (late fusion, default), tfn "
             "(tensor fusion), lmf (low-rank fusion), mfn (memory fusion network), mult (crossmodal transformer), mag "
             "(MiniLM + multimodal adaptation gate; needs the optional extra 'mag')",
    "penalty": "dependency penalty between z_l, z_a, z_v: none (baseline), mine, nwj, js, "
               "infonce, wasserstein (default: none)",
    "weight": "lambda: the model minimises task loss - lambda * dependency (default: 0.1)",
    "critic_steps": "critic updates (maximising the bound) before each model update (default: 1)",
    "negatives": "negative samples for the bound: 'shuffle' (one permutation), an integer K "
                 "(K shuffled negatives per sample), 'all' (every combination of rows: B^m samples) or "
                 "'distinct' (every combination of pairwise distinct rows, the unbiased form) (default: "
                 "the estimator's own: all for infonce, shuffle otherwise)",
    "ema_decay": "mine only: moving-average bias correction of the MINE critic loss with this "
                 "decay, e.g. 0.99 (default: off)",
    "critic_hidden": "hidden width of the critic MLP (default: 128)",
    "critic_lr": "learning rate of the critic's Adam optimizer (default: 1e-3)",
    "gp_weight": "gradient-penalty weight of the Wasserstein critic (default: 10)",
    "critic_input": "what the critic reads: rms (each z rescaled to unit root-mean-square, so the "
                    "dependency cannot grow by inflating the scale of z; default) or raw (the z's "
                    "as they are: the objective before issue 16, unbounded in long runs)",
    "dependency_cap": "bound the model's term at -lambda * min(bound, CAP): log_batch (default: log of "
                      "the batch size, for the mutual-information penalties; wasserstein uncapped), a "
                      "positive number (every penalty) or none (the objective before issue 16); the logged "
                      "dependency is uncapped",
    "dataset": "mosi (embedded real CMU-MOSI, bc-LSTM split) or synthetic (known dependency "
               "structure, for tests) (default: mosi)",
    "data_dir": "read MOSI from this directory instead of the embedded file: a directory with "
                "mosi_bclstm.npz, or the raw release (bclstm/, MOSI-label.csv, glove/)",
    "text_features": "text input: glove (word vectors), utterance (bc-LSTM text features) or "
                     "both (word vectors + utterance features at every step) (default: both)",
    "epochs": "maximum number of epochs (default: 30)",
    "patience": "early stopping: epochs without validation-MAE improvement (default: 8)",
    "batch_size": "batch size (default: 32)",
    "lr": "learning rate of the model's Adam optimizer (default: 1e-3)",
    "weight_decay": "Adam weight decay of the model (default: 0)",
    "d": "width of each per-modality representation z (default: model's own, 32; tfn 16)",
    "hidden": "hidden width of encoders and head (default: model's own, 64)",
    "dropout": "dropout probability (default: 0.2)",
    "seed": "random seed (default: 0)",
    "device": "auto (cuda if available, else cpu), cpu, cuda, cuda:N (default: auto)",
    "backend": "penalty kernels: auto (fused kernels on GPU, reference otherwise), triton, "
               "cuda, reference (default: auto)",
    "out": "output directory: metrics.json, best.pt, last.pt (default: runs/mosi)",
    "resume": "continue the run in OUT from OUT/last.pt with the run's own configuration "
              "(an explicit flag that contradicts it is an error; --epochs, --patience, "
              "--device, --backend, --data-dir and --quiet may change); a run interrupted "
              "before its first checkpoint restarts from OUT/config.json (written at the start) "
              "with its own configuration; a directory with neither is refused",
    "skip_test": "do not evaluate the test split at the end (model selection on validation)",
    "quiet": "no progress bars or per-epoch lines (the final table is still printed)",
    "dist_timeout": "under torchrun: seconds a process may wait in init_process_group or in a "
                    "collective before it stops with a one-line error naming its rank and step "
                    "(torchrun --max-restarts then restarts the round) (default: 300)",
}


def _negatives(v) -> str | int | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        k = v
    elif isinstance(v, str) and v in ("shuffle", "all", "distinct"):
        return v
    else:
        try:
            k = int(str(v))
        except ValueError:
            raise ValueError(f"--negatives must be 'shuffle', 'all', 'distinct' or a positive integer, "
                             f"got {v!r}") from None
    if k < 1:
        raise ValueError(f"--negatives must be a positive integer, got {k}")
    return k


def _dependency_cap(v) -> str | float | None:
    if v is None or v == "none":
        return None
    if v == "log_batch":
        return v
    try:
        cap = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"--dependency-cap must be none, log_batch or a positive number, got {v!r}") from None
    if not cap > 0:
        raise ValueError(f"--dependency-cap must be none, log_batch or a positive number, got {v!r}")
    return cap


def validate(cfg: TrainConfig) -> TrainConfig:
    def choice(name, allowed):
        v = getattr(cfg, name)
        if v not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {v!r}")
    choice("model", MODELS)
    choice("penalty", PENALTIES)
    choice("backend", BACKENDS)
    choice("dataset", ("mosi", "synthetic"))
    choice("critic_input", CRITIC_INPUTS)
    cfg.dependency_cap = _dependency_cap(cfg.dependency_cap)
    choice("text_features", ("glove", "utterance", "both"))
    cfg.negatives = _negatives(cfg.negatives)
    for name in ("epochs", "batch_size", "critic_steps", "critic_hidden"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "critic_lr"):
        if not float(getattr(cfg, name)) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("weight", "weight_decay", "gp_weight", "patience"):
        if float(getattr(cfg, name)) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.ema_decay is not None and (cfg.penalty != "mine" or not 0 < cfg.ema_decay < 1):
        raise ValueError(f"--ema-decay must be in (0, 1) and needs --penalty mine; got {cfg.ema_decay} "
                         f"with --penalty {cfg.penalty}")
    try:
        timeout = float(cfg.dist_timeout)
    except (TypeError, ValueError):
        timeout = float("nan")
    if not 0 < timeout < float("inf"):
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {cfg.dist_timeout!r}")
    cfg.dist_timeout = timeout
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    return cfg


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config file not found: {p}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError("--config: reading YAML needs pyyaml (pip install pyyaml), or use JSON") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {p}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {p}: expected a mapping of option names to values")
    known = {f.name for f in fields(TrainConfig)}
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise ValueError(f"--config {p}: unknown option {k!r}")
        out[key] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    from .._cli import OneLineParser
    p = OneLineParser(
        prog="python -m mdm_kernels.train",
        description="Train a multimodal fusion model for sentiment (CMU-MOSI) with an optional "
                    "mutual-dependency penalty, and report Acc-7, Acc-2, F1, MAE and Corr.",
        epilog="Values come from the defaults, then --config FILE, then explicit flags. "
               "See docs/training.md.")
    S = argparse.SUPPRESS
    p.add_argument("--config", metavar="FILE", default=S, help="YAML or JSON file setting any of these options (keys as flag names)")
    p.add_argument("--model", choices=MODELS, default=S, help=HELP["model"])
    p.add_argument("--penalty", choices=PENALTIES, default=S, help=HELP["penalty"])
    p.add_argument("--weight", type=float, default=S, metavar="LAMBDA", help=HELP["weight"])
    p.add_argument("--critic-steps", type=int, default=S, metavar="N", help=HELP["critic_steps"])
    p.add_argument("--negatives", default=S, metavar="{shuffle,K,all,distinct}", help=HELP["negatives"])
    p.add_argument("--ema-decay", type=float, default=S, help=HELP["ema_decay"])
    p.add_argument("--critic-hidden", type=int, default=S, metavar="N", help=HELP["critic_hidden"])
    p.add_argument("--critic-lr", type=float, default=S, help=HELP["critic_lr"])
    p.add_argument("--gp-weight", type=float, default=S, help=HELP["gp_weight"])
    p.add_argument("--critic-input", choices=tuple(CRITIC_INPUTS), default=S, help=HELP["critic_input"])
    p.add_argument("--dependency-cap", default=S, metavar="{none,log_batch,C}", help=HELP["dependency_cap"])
    p.add_argument("--dataset", choices=("mosi", "synthetic"), default=S, help=HELP["dataset"])
    p.add_argument("--data-dir", default=S, metavar="DIR", help=HELP["data_dir"])
    p.add_argument("--text-features", choices=("glove", "utterance", "both"), default=S, help=HELP["text_features"])
    p.add_argument("--epochs", type=int, default=S, help=HELP["epochs"])
    p.add_argument("--patience", type=int, default=S, help=HELP["patience"])
    p.add_argument("--batch-size", type=int, default=S, help=HELP["batch_size"])
    p.add_argument("--lr", type=float, default=S, help=HELP["lr"])
    p.add_argument("--weight-decay", type=float, default=S, help=HELP["weight_decay"])
    p.add_argument("--d", "--z-dim", dest="d", type=int, default=S,
                   help=HELP["d"] + "; under torchrun spell it --z-dim (torchrun reads --d as an "
                                    "ambiguous abbreviation of its own options)")
    p.add_argument("--hidden", type=int, default=S, help=HELP["hidden"])
    p.add_argument("--dropout", type=float, default=S, help=HELP["dropout"])
    p.add_argument("--seed", type=int, default=S, help=HELP["seed"])
    p.add_argument("--device", default=S, help=HELP["device"])
    p.add_argument("--backend", choices=BACKENDS, default=S, help=HELP["backend"])
    p.add_argument("--out", default=S, metavar="DIR", help=HELP["out"])
    p.add_argument("--resume", action="store_true", default=S, help=HELP["resume"])
    p.add_argument("--quiet", action="store_true", default=S, help=HELP["quiet"])
    p.add_argument("--skip-test", action="store_true", default=S, help=HELP["skip_test"])
    p.add_argument("--dist-timeout", type=float, default=S, metavar="SECONDS", help=HELP["dist_timeout"])
    p.add_argument("--debug", action="store_true", default=S,
                   help="show the traceback of an error instead of the one-line message")
    return p


#: Options that may differ when a run is resumed: how long and where it runs, not what it is.
RESUME_MAY_CHANGE = ("out", "resume", "quiet", "epochs", "patience", "device", "backend", "data_dir",
                     "skip_test", "dist_timeout")


def resume_values(explicit: dict, defaults: dict) -> dict:
    """The configuration of ``--resume``: the run's own configuration from ``OUT/last.pt``,
    with the explicitly given values (flags, ``--config`` file) on top.  An explicit value of
    an option outside :data:`RESUME_MAY_CHANGE` that differs from the checkpoint's raises
    ValueError naming the flag.  Before the first checkpoint the configuration comes from
    ``OUT/config.json`` (written when the run started); a directory with neither is refused
    (ValueError saying what ``--resume`` needs).

    ``explicit``: option name -> value as given; ``defaults``: option name -> default (the
    options known to this version; checkpoint keys outside it are ignored)."""
    from .checkpoint import RUN_CONFIG, CheckpointError, load_checkpoint, read_run_config
    out = Path(explicit.get("out", defaults["out"]))
    path = out / "last.pt"
    if not path.is_file() and not (out / RUN_CONFIG).is_file():
        raise ValueError(f"--resume: no run to continue in {out} (neither last.pt nor {RUN_CONFIG}); "
                         f"--resume needs the --out of a run started by python -m mdm_kernels.train, "
                         f"or drop --resume to start a new run there")
    try:
        saved = load_checkpoint(path)["config"] if path.is_file() else read_run_config(out)
        saved = {k: v for k, v in saved.items() if k in defaults}
        saved.pop("resume", None)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}") from None
    saved_cfg = validate(TrainConfig(**{**saved, "out": str(out)}))
    merged = {**saved, **explicit}
    merged_cfg = validate(TrainConfig(**merged))
    for name in explicit:
        if name in RESUME_MAY_CHANGE:
            continue
        new, old = getattr(merged_cfg, name), getattr(saved_cfg, name)
        if new != old:
            raise ValueError(f"--resume: --{name.replace('_', '-')} {new!r} contradicts the run in {out} "
                             f"(trained with {old!r}); drop the flag to continue that run, or "
                             f"train a new one with another --out")
    return merged


#: Options that act only through the dependency penalty: with ``--penalty none`` a value other
#: than the default changes nothing, so the command line refuses it.
PENALTY_ONLY = ("weight", "critic_steps", "negatives", "ema_decay", "critic_hidden", "critic_lr", "gp_weight",
                "critic_input", "dependency_cap", "backend")


def check_effective(cfg: TrainConfig, given) -> None:
    """Refuse options in ``given`` (the names set on the command line or in ``--config``) that
    contradict the configuration or would have no effect in it: a penalty option with
    ``--penalty none`` (e.g. ``--backend triton``: the baseline launches no penalty kernel),
    ``--gp-weight`` without ``--penalty wasserstein`` and ``--data-dir`` with ``--dataset
    synthetic``.  ValueError naming the option."""
    defaults = TrainConfig()
    if "data_dir" in given and cfg.data_dir is not None and cfg.dataset != "mosi":
        raise ValueError(f"--data-dir {cfg.data_dir} has no effect with --dataset {cfg.dataset} (it is "
                         f"where MOSI is read from); drop --data-dir or use --dataset mosi")
    for name in given:
        if name not in PENALTY_ONLY or getattr(cfg, name) == getattr(defaults, name):
            continue
        flag = f"--{name.replace('_', '-')} {getattr(cfg, name)}"
        if cfg.penalty == "none":
            raise ValueError(f"{flag} has no effect with --penalty none (the baseline has no dependency "
                             f"penalty, so no critic and no penalty kernels); add --penalty "
                             f"{{{','.join(PENALTIES[1:])}}} or drop {flag.split()[0]}")
        if name == "gp_weight" and cfg.penalty != "wasserstein":
            raise ValueError(f"{flag} has no effect with --penalty {cfg.penalty} (the gradient penalty "
                             f"belongs to --penalty wasserstein); drop --gp-weight")


def parse_args(argv=None) -> TrainConfig:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    ns.pop("debug", None)  # read by __main__ (tracebacks), not a training option
    values: dict = {}
    try:
        if "config" in ns:
            values.update(load_config_file(ns.pop("config")))
        values.update(ns)
        given = set(values)
        if values.get("resume"):  # the run's own configuration from OUT/last.pt, flags on top
            try:
                values = resume_values(values, {f.name: f.default for f in fields(TrainConfig)})
            except ValueError as e:  # about the run directory, not the syntax: no "(see --help)"
                from .._cli import UsageError
                raise UsageError(str(e)) from e
        cfg = validate(TrainConfig(**values))
        check_effective(cfg, given)
        return cfg
    except (ValueError, FileNotFoundError, ImportError, TypeError) as e:
        parser.error(str(e))
