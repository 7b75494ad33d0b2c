"""Analyses on top of the training layer (issue 9): modality drop, critic interpretability,
multi-seed sweeps.  CLI: ``python -m mdm_kernels.train.analyze {drop,critic,sweep}``
(see docs/analysis.md).  Training itself is always :func:`mdm_kernels.train.loop.train`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .._cli import interactive
from .checkpoint import load_checkpoint
from .config import TrainConfig, validate
from .data import iterate_batches, load_dataset
from .metrics import KEYS, sentiment_metrics

MODALITIES = ("text", "audio", "video")
METRIC_NAMES = {"acc7": "Acc-7", "acc2": "Acc-2", "f1": "F1", "acc2_nonzero": "Acc-2 (nz)",
                "f1_nonzero": "F1 (nz)", "mae": "MAE", "corr": "Corr"}


def _clean(obj):
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(_clean(obj), indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- checkpoints
def load_run(run_dir, which: str = "best", device: str = "cpu", data=None) -> dict:
    """Rebuild a trained run from ``run_dir`` (written by ``python -m mdm_kernels.train``).

    ``which="best"``: the best-validation model (best.pt; the penalty's critic is not saved
    there); ``"last"``: model *and* critic of the final epoch (last.pt), a consistent pair for
    critic analyses.  Returns ``{"cfg", "model", "penalty", "data", "device"}``."""
    from .loop import build_penalty
    from .models import build_model
    run = Path(run_dir)
    path = run / f"{which}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (train first with python -m mdm_kernels.train --out {run})")
    dev = torch.device(device)
    ck = load_checkpoint(path, map_location=dev)
    cfg = validate(TrainConfig(**{**ck["config"], "device": device}))
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir, cfg.text_features, seed=cfg.seed)
    tr = data["train"]
    in_dims = (tr.text.shape[-1], tr.audio.shape[-1], tr.video.shape[-1])
    model = build_model(cfg.model, in_dims, d=cfg.d, hidden=cfg.hidden, dropout=cfg.dropout).to(dev)
    model.load_state_dict(ck["model"])
    model.eval()
    penalty = None
    if "penalty" in ck and cfg.penalty != "none":
        penalty = build_penalty(cfg, model.dims, dev)
        penalty.load_state_dict(ck["penalty"])
        penalty.eval()
    return {"cfg": cfg, "model": model, "penalty": penalty, "data": data, "device": dev}


# --------------------------------------------------------------------------- modality drop
def drop_conditions() -> list[tuple[str, ...]]:
    """(), each modality, each pair -- the modalities removed in each condition."""
    return [()] + [(m,) for m in MODALITIES] + list(itertools.combinations(MODALITIES, 2))


def _condition_name(c) -> str:
    return "none (all modalities)" if not c else "-" + ",-".join(c)


def _perturb(batch: dict, drop, mode: str, stats: dict, gen: torch.Generator) -> dict:
    b = dict(batch)
    for m in drop:
        x = b[m]
        if mode == "zero":
            b[m] = torch.zeros_like(x)
        elif mode == "noise":
            mu, sd = stats[m]
            noise = torch.randn(x.shape, generator=gen).to(x.device) * sd.to(x.device) + mu.to(x.device)
            if m == "text":  # keep the padding pattern: noise only at the valid steps
                L = x.shape[1]
                mask = (torch.arange(L, device=x.device)[None, :] < b["text_len"][:, None]).to(x.dtype)
                noise = noise * mask[..., None]
            b[m] = noise.to(x.dtype)
        else:
            raise ValueError(f"mode must be 'zero' or 'noise', got {mode!r}")
    return b


def _feature_stats(split) -> dict:
    """Per-feature mean/std of each modality over valid (non-padded) steps of ``split``."""
    out = {}
    L = split.text.shape[1]
    mask = np.arange(L)[None, :] < split.text_len[:, None]
    t = split.text[mask]
    out["text"] = (torch.from_numpy(t.mean(0)), torch.from_numpy(t.std(0) + 1e-6))
    for m in ("audio", "video"):
        x = getattr(split, m).reshape(-1, getattr(split, m).shape[-1])
        out[m] = (torch.from_numpy(x.mean(0)), torch.from_numpy(x.std(0) + 1e-6))
    return out


@torch.no_grad()
def modality_drop(model, split, *, modes=("zero", "noise"), batch_size: int = 64, device="cpu",
                  seed: int = 0, stats_split=None) -> list[dict]:
    """Evaluate ``model`` on ``split`` with each modality and each pair zeroed or replaced by
    Gaussian noise with the per-feature mean/std of ``stats_split`` (default: ``split``).
    Returns one row per (mode, condition): ``{"mode", "condition", "dropped", **metrics}``."""
    model.eval()
    stats = _feature_stats(stats_split if stats_split is not None else split)
    rows = []
    for mode in modes:
        for cond in drop_conditions():
            if not cond and mode != modes[0]:
                continue  # the intact condition is the same for every mode
            gen = torch.Generator().manual_seed(seed)
            preds = [model(_perturb(b, cond, mode, stats, gen))[0].float().cpu()
                     for b in iterate_batches(split, batch_size, device)]
            met = sentiment_metrics(torch.cat(preds).numpy(), split.y)
            rows.append({"mode": mode if cond else "-", "condition": _condition_name(cond),
                         "dropped": list(cond), **met})
    return rows


def drop_table(results: dict[str, list[dict]], keys=KEYS) -> str:
    """Markdown table: one block of rows per run label."""
    head = "| run | mode | condition | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |"
    lines = [head, "|" + "---|" * (3 + len(keys))]
    for label, rows in results.items():
        for r in rows:
            vals = " | ".join("n/a" if r[k] is None or not math.isfinite(r[k]) else f"{r[k]:.4f}" for k in keys)
            lines.append(f"| {label} | {r['mode']} | {r['condition']} | {vals} |")
    return "\n".join(lines)


def run_drop(run_dirs, out_dir, *, modes=("zero", "noise"), split: str = "test", device="cpu",
             seed: int = 0, labels=None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, meta, data, data_key = {}, {}, None, None
    for i, rd in enumerate(run_dirs):
        ck_cfg = load_checkpoint(Path(rd) / "best.pt")["config"] \
            if (Path(rd) / "best.pt").is_file() else {}
        key = (ck_cfg.get("dataset"), ck_cfg.get("data_dir"), ck_cfg.get("text_features"),
               ck_cfg.get("seed") if ck_cfg.get("dataset") == "synthetic" else None)
        run = load_run(rd, "best", device, data=data if key == data_key else None)
        data, data_key = run["data"], key
        label = labels[i] if labels else f"{run['cfg'].model}/{run['cfg'].penalty}/s{run['cfg'].seed}"
        results[label] = modality_drop(run["model"], data[split], modes=modes, device=run["device"],
                                       seed=seed, stats_split=data["train"])
        meta[label] = {"run_dir": str(rd), "config": run["cfg"].to_dict()}
    md = (f"# Modality drop ({split} split)\n\nZeroed: the modality's input set to 0. Noise: replaced by "
          "Gaussian noise with the train split's per-feature mean and std.\n\n" + drop_table(results) + "\n")
    agg = aggregate_drop(results, meta)
    if agg:
        md += ("\n## Change vs the intact condition, mean ± std over the seeds of each model/penalty\n\n"
               + aggregate_drop_table(agg) + "\n")
    (out / "modality_drop.md").write_text(md)
    _write_json({"split": split, "runs": meta, "results": results, "by_seed": agg}, out / "modality_drop.json")
    return results


def aggregate_drop(results: dict, meta: dict, keys=("mae", "acc2", "corr")) -> list[dict]:
    """Per (model, penalty, mode, condition): the change of each metric vs the same run's intact
    condition, over the runs (seeds) given. Empty unless some model/penalty has >= 2 runs."""
    groups: dict = {}
    for label, rows in results.items():
        c = meta[label]["config"]
        base = rows[0]
        for r in rows[1:]:
            g = groups.setdefault((c["model"], c["penalty"], r["mode"], r["condition"]), {k: [] for k in keys})
            for k in keys:
                g[k].append(r[k] - base[k])
    if not any(len(next(iter(v.values()))) >= 2 for v in groups.values()):
        return []
    return [{"model": m, "penalty": p, "mode": mo, "condition": co, "n": len(v[keys[0]]),
             **{f"delta_{k}": _mean_std(v[k])[:2] for k in keys}} for (m, p, mo, co), v in groups.items()]


def aggregate_drop_table(agg: list[dict], keys=("mae", "acc2", "corr")) -> str:
    lines = ["| model | penalty | mode | condition | runs | " + " | ".join(f"Δ{METRIC_NAMES[k]}" for k in keys) + " |",
             "|" + "---|" * (5 + len(keys))]
    for r in agg:
        cells = [f"{r[f'delta_{k}'][0]:+.4f} ± {r[f'delta_{k}'][1]:.4f}" for k in keys]
        lines.append(f"| {r['model']} | {r['penalty']} | {r['mode']} | {r['condition']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- critic scores
@torch.no_grad()
def critic_scores(model, penalty, split, *, n_shuffles: int = 20, batch_size: int = 64, device="cpu",
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Per segment: the critic's score of the joint triple T(z_l[i], z_a[i], z_v[i]), the mean
    score of ``n_shuffles`` shuffled triples (audio and video from other segments, independent
    permutations: samples of the product of marginals), their difference (a pointwise
    dependency), the prediction and the label."""
    if penalty is None:
        raise ValueError("critic scores need a run trained with a penalty (--penalty mine|nwj|js|...), "
                         "its critic is in last.pt")
    model.eval()
    preds, zs = [], [[], [], []]
    for b in iterate_batches(split, batch_size, device):
        p, z = model(b)
        preds.append(p.float().cpu())
        for k in range(3):
            zs[k].append(z[k].float())
    z = [torch.cat(zk) for zk in zs]
    critic = penalty.critic
    joint = critic(*z).float().cpu().numpy()
    n = len(joint)
    gen = torch.Generator().manual_seed(seed)
    shuf = np.zeros((n_shuffles, n), dtype=np.float64)
    for s in range(n_shuffles):
        pa = torch.randperm(n, generator=gen).to(z[0].device)
        pv = torch.randperm(n, generator=gen).to(z[0].device)
        shuf[s] = critic(z[0], z[1][pa], z[2][pv]).float().cpu().numpy()
    pred = torch.cat(preds).numpy()
    return {"joint": joint, "shuffled": shuf.mean(0), "shuffled_std": shuf.std(0),
            "dependency": joint - shuf.mean(0), "pred": pred, "label": np.asarray(split.y),
            "abs_error": np.abs(pred - np.asarray(split.y))}


def write_critic_csv(scores: dict, words, path) -> None:
    order = np.argsort(-scores["dependency"])
    rank = np.empty_like(order)
    rank[order] = np.arange(1, len(order) + 1)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "dependency_rank", "joint_score", "shuffled_score_mean", "shuffled_score_std",
                    "dependency", "label", "pred", "abs_error", "transcript"])
        for i in range(len(scores["joint"])):
            w.writerow([i, int(rank[i]), f"{scores['joint'][i]:.6f}", f"{scores['shuffled'][i]:.6f}",
                        f"{scores['shuffled_std'][i]:.6f}", f"{scores['dependency'][i]:.6f}",
                        f"{scores['label'][i]:.4f}", f"{scores['pred'][i]:.4f}", f"{scores['abs_error'][i]:.4f}",
                        words[i]])


def plot_critic(scores: dict, words, path, title: str = "", k: int = 6) -> None:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from .metrics import pearson
    dep, y, err = scores["dependency"], scores["label"], scores["abs_error"]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    a = ax[0, 0]
    bins = np.histogram_bin_edges(np.concatenate([scores["joint"], scores["shuffled"]]), 40)
    a.hist(scores["joint"], bins, alpha=0.6, label="joint (matched triple)")
    a.hist(scores["shuffled"], bins, alpha=0.6, label="shuffled (mean over permutations)")
    a.set_xlabel("critic score T(z_l, z_a, z_v)"); a.set_ylabel("segments"); a.legend(fontsize=8)
    a.set_title("joint vs shuffled scores")
    a = ax[0, 1]
    a.scatter(y, dep, s=6, alpha=0.5)
    a.set_xlabel("sentiment label"); a.set_ylabel("dependency = joint - shuffled")
    a.set_title(f"dependency vs sentiment (Pearson {pearson(y, dep):.2f}; vs |label| {pearson(np.abs(y), dep):.2f})")
    a = ax[1, 0]
    a.scatter(err, dep, s=6, alpha=0.5, color="tab:red")
    a.set_xlabel("|prediction - label|"); a.set_ylabel("dependency")
    a.set_title(f"dependency vs absolute error (Pearson {pearson(err, dep):.2f})")
    a = ax[1, 1]
    order = np.argsort(dep)
    sel = np.concatenate([order[-k:][::-1], order[:k][::-1]])
    short = [(words[i][:48] + ("..." if len(words[i]) > 48 else "")) or "(empty)" for i in sel]
    colors = ["tab:green"] * k + ["tab:gray"] * k
    a.barh(range(len(sel))[::-1], dep[sel], color=colors)
    a.set_yticks(range(len(sel))[::-1]); a.set_yticklabels(
        [f"{s}  [y={y[i]:+.1f}]" for s, i in zip(short, sel)], fontsize=7)
    a.set_xlabel("dependency"); a.set_title(f"{k} most (green) / least (gray) dependent segments")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_critic(run_dir, out_dir, *, split: str = "test", device="cpu", n_shuffles: int = 20, seed: int = 0) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir, "last", device)
    sp = run["data"][split]
    scores = critic_scores(run["model"], run["penalty"], sp, n_shuffles=n_shuffles, device=run["device"], seed=seed)
    cfg = run["cfg"]
    write_critic_csv(scores, sp.words, out / "critic_scores.csv")
    plot_critic(scores, sp.words, out / "critic_scores.png",
                title=f"{cfg.model} + {cfg.penalty} critic (seed {cfg.seed}), {split} split, last.pt; "
                      f"{n_shuffles} shuffles")
    from .metrics import pearson
    summary = {"run_dir": str(run_dir), "config": cfg.to_dict(), "split": split, "n": len(sp),
               "joint_mean": float(scores["joint"].mean()), "shuffled_mean": float(scores["shuffled"].mean()),
               "frac_joint_above_shuffled": float(np.mean(scores["dependency"] > 0)),
               "pearson_dependency_label": pearson(scores["dependency"], scores["label"]),
               "pearson_dependency_abs_label": pearson(scores["dependency"], np.abs(scores["label"])),
               "pearson_dependency_abs_error": pearson(scores["dependency"], scores["abs_error"])}
    _write_json(summary, out / "critic_summary.json")
    return summary


# --------------------------------------------------------------------------- sweep
def _mean_std(vals):
    v = np.array([x for x in vals if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def summarise(runs: list[dict], keys=KEYS) -> list[dict]:
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["model"], r["penalty"]), []).append(r)
    out = []
    for (model, pen), rs in groups.items():
        row = {"model": model, "penalty": pen, "n": len(rs), "seeds": [r["seed"] for r in rs]}
        for k in keys:
            row[k] = _mean_std([r["metrics"].get(k) for r in rs])[:2]
        out.append(row)
    return out


def sweep_table(summary: list[dict], keys=KEYS) -> str:
    lines = ["| model | penalty | seeds | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |",
             "|" + "---|" * (3 + len(keys))]
    for r in summary:
        # one seed has no spread: the mean alone (the seeds column says n = 1), not "± 0.0000"
        cells = [("n/a" if not math.isfinite(r[k][0]) else f"{r[k][0]:.4f}" if r["n"] < 2
                  else f"{r[k][0]:.4f} ± {r[k][1]:.4f}") for k in keys]
        lines.append(f"| {r['model']} | {r['penalty']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def delta_table(summary: list[dict], keys=("acc2", "f1", "mae", "corr")) -> str:
    """Penalty minus baseline ('none') per model, with the pooled seed std of the two groups:
    |delta| < std means the difference is within seed-to-seed spread."""
    base = {r["model"]: r for r in summary if r["penalty"] == "none"}
    lines = ["| model | penalty | " + " | ".join(f"Δ{METRIC_NAMES[k]} (pooled std)" for k in keys) + " |",
             "|" + "---|" * (2 + len(keys))]
    for r in summary:
        b = base.get(r["model"])
        if r["penalty"] == "none" or b is None:
            continue
        cells = []
        for k in keys:
            d = r[k][0] - b[k][0]
            sd = math.sqrt((r[k][1] ** 2 + b[k][1] ** 2) / 2)
            cells.append(f"{d:+.4f} ({sd:.4f})")
        lines.append(f"| {r['model']} | {r['penalty']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: options that do not change what a run computes: where it is written, and --resume (an exact
#: continuation, tests/test_train_cli.py)
NON_RESULT_OPTIONS = ("out", "resume")


def configs_agree(old: dict, new: dict) -> bool:
    """Equal on every option both record except :data:`NON_RESULT_OPTIONS`: options added to
    TrainConfig after a run finished (absent from its record) do not invalidate it, so a grid's
    cache survives new, unrelated options."""
    return bool(old) and all(old[k] == new[k] for k in old.keys() & new.keys() if k not in NON_RESULT_OPTIONS)


def config_record(cfg: TrainConfig) -> dict:
    """``cfg`` as a run records it in its JSON files (what :func:`configs_agree` compares)."""
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def interrupted_run(cfg: TrainConfig) -> bool:
    """``cfg.out`` holds an unfinished run of ``cfg`` (``last.pt`` of the same configuration,
    no ``metrics.json``), which ``--resume`` continues exactly."""
    out = Path(cfg.out)
    if (out / "metrics.json").is_file() or not (out / "last.pt").is_file():
        return False
    try:
        ck = load_checkpoint(out / "last.pt", map_location="cpu")
    except Exception:  # a torn or foreign checkpoint: train afresh (it is overwritten)
        return False
    return configs_agree(json.loads(json.dumps(ck.get("config", {}), default=str)), config_record(cfg))


def train_cached(cfg: TrainConfig, skip_existing: bool = True) -> tuple[dict, bool]:
    """Train ``cfg`` quietly into ``cfg.out`` unless ``cfg.out/metrics.json`` already holds a
    run of the same configuration (:func:`configs_agree`) and ``skip_existing``; returns
    ``(metrics dict, reused)``.  A run interrupted earlier (:func:`interrupted_run`) continues
    from its last epoch with ``--resume`` (bit-identical to an uninterrupted run) unless
    ``skip_existing`` is off.  The cache of ``sweep`` and ``reproduce``."""
    from .loop import train
    mpath = Path(cfg.out) / "metrics.json"
    if skip_existing and mpath.is_file():
        old = json.loads(mpath.read_text())
        if configs_agree(old.get("config", {}), config_record(cfg)):
            return old, True
    if skip_existing and interrupted_run(cfg):
        cfg = replace(cfg, resume=True)
    with contextlib.redirect_stdout(io.StringIO()):
        return train(cfg), False


def run_sweep(seeds, penalties, models, out_dir, *, base: dict | None = None, progress: bool = True,
              skip_existing: bool = True, command: str | None = None) -> dict:
    """Train every (model, penalty, seed) with :func:`mdm_kernels.train.loop.train` into
    ``out_dir/runs/<model>_<penalty>_s<seed>``, then write ``sweep.md`` (mean ± std over seeds
    of every metric + deltas vs the baseline) and ``sweep.json`` (every run).  ``base``: any
    other TrainConfig fields (epochs, text_features, ...).  With ``skip_existing`` a run whose
    metrics.json exists with the same config is reused (a killed sweep continues)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    base = dict(base or {})
    combos = [(m, p, s) for m in models for p in penalties for s in seeds]
    for m, p, s in combos:  # validate every config before training anything
        validate(TrainConfig(**{**base, "model": m, "penalty": p, "seed": s}))
    runs = []
    t0 = time.time()
    lines = progress and not interactive()  # piped output: one plain line per run, no bar frames
    bar = tqdm(combos, desc="sweep", disable=not progress or lines, dynamic_ncols=True)
    for m, p, s in bar:
        bar.set_postfix(run=f"{m}/{p}/s{s}")
        rd = out / "runs" / f"{m}_{p}_s{s}"
        cfg = TrainConfig(**{**base, "model": m, "penalty": p, "seed": s, "out": str(rd), "quiet": True})
        res, _ = train_cached(cfg, skip_existing)
        runs.append({"model": m, "penalty": p, "seed": s, "run_dir": str(rd),
                     "metrics": {k: res.get(k) for k in KEYS}, "best_epoch": res.get("best_epoch"),
                     "epochs_run": res.get("epochs_run"), "train_seconds": res.get("train_seconds")})
        if lines:
            mae = res.get("mae")
            print(f"sweep {len(runs)}/{len(combos)}: {m}/{p}/s{s} done"
                  + (f", test MAE {mae:.4f}" if isinstance(mae, float) else ""), flush=True)
    bar.close()
    summary = summarise(runs)
    cfg0 = {k: v for k, v in TrainConfig(**base).to_dict().items() if k not in ("model", "penalty", "seed", "out", "quiet")}
    md = ["# Sweep: mean ± std over seeds (test split)", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    md += [f"Models {list(models)}, penalties {list(penalties)}, seeds {list(seeds)}; "
           f"{len(runs)} runs, {time.time() - t0:.0f} s wall. Std is the sample std (ddof=1) over seeds.",
           "", f"Shared settings: `{json.dumps(cfg0, default=str)}`", "", sweep_table(summary), "",
           "## Penalty minus baseline (same model)", "",
           "Pooled std = sqrt((std_pen² + std_base²)/2); a |Δ| below it is within seed-to-seed spread.",
           "", delta_table(summary), ""]
    (out / "sweep.md").write_text("\n".join(md))
    _write_json({"command": command, "models": list(models), "penalties": list(penalties), "seeds": list(seeds),
                 "settings": cfg0, "summary": summary, "runs": runs}, out / "sweep.json")
    return {"runs": runs, "summary": summary}
