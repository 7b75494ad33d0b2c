"""Training loop: two-stage updates (critic, then model), early stopping on validation MAE,
atomic checkpoints and exact resume."""
from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._cli import interactive
from .checkpoint import load_checkpoint, numpy_state_from_plain, numpy_state_to_plain
from .config import CRITIC_INPUTS, TrainConfig, validate
from .data import batch_from, iterate_batches, load_dataset
from .metrics import format_table, sentiment_metrics
from .models import build_model
from . import ddp


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(tmp, path)  # a kill before this line leaves the previous file intact


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_penalty(cfg: TrainConfig, dims, device, group=None):
    if cfg.penalty == "none":
        return None
    try:
        from mdm_kernels import DependencyPenalty
    except ImportError as e:
        raise ImportError(f"--penalty {cfg.penalty}: mdm_kernels.DependencyPenalty is unavailable ({e})") from e
    pen = DependencyPenalty(cfg.penalty, tuple(dims), hidden=(cfg.critic_hidden,), weight=cfg.weight,
                            negatives=cfg.negatives, gp_weight=cfg.gp_weight, ema_decay=cfg.ema_decay,
                            backend=cfg.backend, normalize=CRITIC_INPUTS[cfg.critic_input],
                            cap=cfg.dependency_cap,
                            **({"group": group} if group is not None else {}))
    if isinstance(pen, nn.Module):
        pen = pen.to(device)
    else:
        pen.critic.to(device)
    return pen


def library_versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        from importlib.metadata import version
        v["mdm_kernels"] = version("mdm-kernels")
    except Exception:
        v["mdm_kernels"] = getattr(sys.modules.get("mdm_kernels"), "__version__", "unknown")
    for mod in ("triton", "transformers"):
        m = sys.modules.get(mod)
        if m is not None:
            v[mod] = getattr(m, "__version__", "unknown")
    from .models.numerics import numerics_info
    v["numerics"] = numerics_info()  # MKL code path, threads (models/numerics.py)
    return v


@torch.no_grad()
def predict(model, split, batch_size, device) -> np.ndarray:
    model.eval()
    out = [model(b)[0].float().cpu() for b in iterate_batches(split, batch_size, device)]
    return torch.cat(out).numpy()


def _rng_state(gens: dict) -> dict:
    # tensors and plain values only: last.pt is read with torch.load(weights_only=True)
    st = {"torch": torch.get_rng_state(), "numpy": numpy_state_to_plain(np.random.get_state()),
          "python": random.getstate(),
          "gens": {k: g.get_state() for k, g in gens.items()}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, gens: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(numpy_state_from_plain(st["numpy"]))
    random.setstate(st["python"])
    for k, g in gens.items():
        g.set_state(st["gens"][k])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


_ARCH_KEYS = ("model", "penalty", "dataset", "text_features", "d", "hidden", "critic_hidden", "seed")


def train(cfg: TrainConfig, *, _interrupt_after_epoch: int | None = None) -> dict:
    """Train, evaluate the best checkpoint on the test split, write OUT/metrics.json and
    return the metrics dict.  ``_interrupt_after_epoch`` (tests) raises KeyboardInterrupt
    right after that epoch's checkpoint is written."""
    validate(cfg)
    with ddp.distributed(resolve_device(cfg.device), cfg.dist_timeout) as (info, device):
        cfg = ddp.continue_after_restart(cfg, info, device)  # torchrun --max-restarts: from OUT/last.pt
        return _train(cfg, device, info, _interrupt_after_epoch)


def _train(cfg: TrainConfig, device: torch.device, info: ddp.Dist, _interrupt_after_epoch) -> dict:
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    ddp.barrier(info)
    quiet = cfg.quiet or not info.is_main  # progress bars and lines on rank 0 only
    # progress bars only on a terminal; piped or redirected output gets the per-epoch lines
    bars = not quiet and interactive()
    log = (lambda s: None) if quiet else tqdm.write if bars else (lambda s: print(s, flush=True))

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.text_features, seed=cfg.seed)
    tr = data["train"]
    in_dims = (tr.text.shape[-1], tr.audio.shape[-1], tr.video.shape[-1])
    model = build_model(cfg.model, in_dims, d=cfg.d, hidden=cfg.hidden, dropout=cfg.dropout).to(device)
    # under torchrun: negatives from the global batch (only the z's are all-gathered)
    # the critic's initialisation draws from its own seed, so every arm of a seed (none, KL, f,
    # W) leaves the model the same global RNG stream: same init, data order and dropout masks
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 2)
        penalty = build_penalty(cfg, model.dims, device, group="world" if info.enabled else None)
    opt = torch.optim.Adam(model.optimizer_groups(cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay)
    c_opt = torch.optim.Adam(penalty.critic.parameters(), lr=cfg.critic_lr) if penalty is not None else None
    gens = {"data": torch.Generator().manual_seed(cfg.seed),
            "penalty": torch.Generator(device=device).manual_seed(cfg.seed + 1)}

    if info.enabled:
        # identical init on every rank (same seed above; broadcast makes it exact), then
        # per-rank seeds so that dropout masks differ between ranks
        ddp.broadcast_module(model)
        if penalty is not None:
            ddp.broadcast_module(penalty)
        rank_seed = cfg.seed + info.rank
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        torch.manual_seed(rank_seed)

    state = {"epoch": 0, "best_mae": float("inf"), "best_epoch": 0, "bad_epochs": 0, "history": []}
    last_path, best_path = out / "last.pt", out / "best.pt"
    resumed_after = None
    if cfg.resume:
        if last_path.is_file():
            # on the CPU: RNG states must stay CPU ByteTensors; load_state_dict moves the rest
            ck = load_checkpoint(last_path, map_location="cpu")
            for k in _ARCH_KEYS:
                if ck["config"].get(k) != getattr(cfg, k):
                    raise ValueError(f"--resume: --{k.replace('_', '-')} is {getattr(cfg, k)!r} but the "
                                     f"checkpoint in {out} was trained with {ck['config'].get(k)!r}")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            if penalty is not None:
                penalty.load_state_dict(ck["penalty"])
                c_opt.load_state_dict(ck["c_opt"])
            state = ck["state"]
            resumed_after = state["epoch"]
            rngs = ck.get("rng_ranks")
            if info.enabled and rngs is not None and len(rngs) == info.world:
                _set_rng_state(rngs[info.rank], gens)
            elif info.enabled:
                _set_rng_state(ck["rng"], gens)
                torch.manual_seed(cfg.seed + info.rank + 1000 * state["epoch"])  # dropout: not exact
                log(f"--resume: checkpoint written by {len(rngs) if rngs else 1} process(es), now "
                    f"{info.world}; the continuation is not bit-exact")
            else:
                _set_rng_state(ck["rng"], gens)
            log(f"resumed from {last_path} after epoch {state['epoch']}")
        else:
            # interrupted before its first checkpoint: cfg is the run's own (OUT/config.json)
            log(f"--resume: no checkpoint in {out} yet (interrupted before epoch 1 ended): "
                f"starting at epoch 1 with the run's configuration")

    loss_fn = nn.L1Loss()
    net = model  # what the training step calls; DDP-wrapped under torchrun
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        probe = batch_from(tr, np.arange(min(4, len(tr))), device)
        model.train()
        unused = ddp.has_unused_parameters(model, probe, penalty is not None, device)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=unused)
    t0 = time.time()
    seconds_before = state.get("train_seconds", 0.0)  # a resumed run's time before the interruption
    stopped = cfg.patience > 0 and state["bad_epochs"] >= cfg.patience
    while state["epoch"] < cfg.epochs and not stopped:
        epoch = state["epoch"] + 1
        model.train()
        sums = {"loss": 0.0, "task": 0.0, "dep": 0.0, "critic": 0.0, "cap_binds": 0.0}
        n = 0
        if info.enabled:
            # DistributedSampler shard; --batch-size is per process (global batch: N x it)
            idx = ddp.shard_indices(len(tr), info, cfg.seed, epoch)
            batches = (batch_from(tr, idx[s:s + cfg.batch_size], device) for s in range(0, len(idx), cfg.batch_size))
            total = (len(idx) + cfg.batch_size - 1) // cfg.batch_size
        else:
            batches = iterate_batches(tr, cfg.batch_size, device, shuffle=True, generator=gens["data"])
            total = (len(tr) + cfg.batch_size - 1) // cfg.batch_size
        bar = tqdm(batches, total=total, desc=f"epoch {epoch}/{cfg.epochs}",
                   disable=not bars, leave=False, dynamic_ncols=True)
        for batch in bar:
            ddp.progress(f"epoch {epoch} step {n + 1}")  # named by --dist-timeout errors
            pred, zs = net(batch)
            task = loss_fn(pred, batch["y"])
            loss = task
            if penalty is not None:
                # stage 1: critic step(s) maximising the bound (zs detached inside critic_loss)
                for _ in range(cfg.critic_steps):
                    c_opt.zero_grad(set_to_none=True)
                    closs = penalty.critic_loss(*zs, generator=gens["penalty"])
                    closs.backward()
                    if info.enabled:
                        ddp.average_grads(penalty.critic.parameters())
                    c_opt.step()
                sums["critic"] += float(closs.detach())
                # stage 2: model step on task - lambda * dependency
                term = penalty(*zs, generator=gens["penalty"])
                loss = task + term
                dep = (float(penalty.last_bound) if cfg.weight > 0
                       else float(penalty.estimate(*zs, generator=gens["penalty"])))
                sums["dep"] += dep
                sums["cap_binds"] += float(getattr(penalty, "last_capped", False))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if penalty is not None:
                penalty.critic.zero_grad(set_to_none=True)  # the model step never moves the critic
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            n += 1
            sums["loss"] += float(loss.detach())
            sums["task"] += float(task.detach())
            post = {"loss": f"{sums['loss'] / n:.3f}", "task": f"{sums['task'] / n:.3f}"}
            if penalty is not None:
                post["dep"] = f"{sums['dep'] / n:.3f}"
            bar.set_postfix(post)
        bar.close()
        ddp.progress(f"epoch {epoch} validation")
        if info.enabled:
            sums = ddp.mean_over_ranks(sums, device)  # the logged losses are global means
        val_pred = _predict(model, data["valid"], cfg.batch_size, device, info)
        val_mae = float(np.mean(np.abs(val_pred - data["valid"].y)))
        improved = val_mae < state["best_mae"]
        rec = {"epoch": epoch, "train_loss": sums["loss"] / n, "train_task": sums["task"] / n, "val_mae": val_mae}
        if penalty is not None:
            # cap_binds: batches whose model term was capped (--dependency-cap: zero gradient there)
            rec.update(dependency=sums["dep"] / n, critic_loss=sums["critic"] / n,
                       cap_binds=int(round(sums["cap_binds"])), batches=n)
        state["history"].append(rec)
        state["epoch"] = epoch
        if improved:
            state.update(best_mae=val_mae, best_epoch=epoch, bad_epochs=0)
            if info.is_main:
                atomic_save({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": epoch, "val_mae": val_mae}, best_path)
        else:
            state["bad_epochs"] += 1
        stopped = cfg.patience > 0 and state["bad_epochs"] >= cfg.patience
        state["train_seconds"] = seconds_before + time.time() - t0
        ck = {"model": model.state_dict(), "opt": opt.state_dict(), "config": cfg.to_dict(), "state": state,
              "rng": _rng_state(gens)}
        if penalty is not None:
            ck.update(penalty=penalty.state_dict(), c_opt=c_opt.state_dict())
        ddp.progress(f"epoch {epoch} checkpoint")
        if info.enabled:
            ck["rng_ranks"] = ddp.gather_objects(ck["rng"], info)  # exact resume: every rank's RNG
            ck["world_size"] = info.world
        if info.is_main:
            atomic_save(ck, last_path)  # written once, by rank 0
        ddp.barrier(info)  # the checkpoint exists before any rank goes on (or is interrupted)
        extra = f"  dep {rec['dependency']:.3f}" if penalty is not None else ""
        log(f"epoch {epoch:3d}  train {rec['train_task']:.4f}{extra}  val MAE {val_mae:.4f}"
            f"{'  *' if improved else ''}")
        if _interrupt_after_epoch is not None and epoch >= _interrupt_after_epoch:
            raise KeyboardInterrupt(f"simulated interruption after epoch {epoch}")
    if stopped:
        log(f"early stop: no validation-MAE improvement for {cfg.patience} epochs")

    ddp.progress("test evaluation")
    ddp.barrier(info)
    if best_path.is_file():
        model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
    # --skip-test (hyperparameter selection): the test split is never read
    metrics = {} if cfg.skip_test else sentiment_metrics(
        _predict(model, data["test"], cfg.batch_size, device, info), data["test"].y)
    result = dict(metrics)
    result.update(best_epoch=state["best_epoch"], best_val_mae=state["best_mae"], epochs_run=state["epoch"],
                  train_seconds=seconds_before + time.time() - t0, n_test=len(data["test"]), device=str(device),
                  config=cfg.to_dict(), versions=library_versions(), history=state["history"])
    if info.enabled:
        result["world_size"] = info.world
    if resumed_after is not None:  # train_seconds spans both parts; the interruption is not counted
        result["resumed_after_epoch"] = resumed_after
    if info.is_main:  # metrics.json and the table: once, by rank 0
        clean = json.loads(json.dumps(result, default=str).replace("NaN", "null"))
        atomic_write_text(json.dumps(clean, indent=2) + "\n", out / "metrics.json")
        if metrics:
            print(format_table(metrics, f"test, {len(data['test'])} segments, best epoch {state['best_epoch']}"))
        print(f"wrote {out / 'metrics.json'}")
    ddp.barrier(info)
    return result


def _predict(model, split, batch_size, device, info: ddp.Dist) -> np.ndarray:
    if info.enabled:
        return ddp.predict_sharded(model, split, batch_size, device, info)
    return predict(model, split, batch_size, device)
