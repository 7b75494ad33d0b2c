"""``torchrun`` support for the training layer: process-group setup, the per-rank data
shards, sharded evaluation gathered on every rank, and small collective helpers.

Under ``torchrun --nproc_per_node N -m mdm_kernels.train`` the launcher sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``); :func:`setup` then
initialises the default process group (``nccl`` on CUDA, ``gloo`` on CPU) and picks the
device ``cuda:LOCAL_RANK``.  Without those variables (or with ``WORLD_SIZE=1``) everything
here is a no-op and training is the plain single-process loop.

Restarts (``torchrun --max-restarts N``).  torch >= 2.4 lets the workers share the launcher's
own TCPStore (``TORCHELASTIC_USE_AGENT_STORE=True``), and that store outlives a restart: the
keys the crashed round's process group wrote (each rank's gloo address, NCCL's unique id)
are still there when the restarted round initialises, under the same names, so a restarted
worker can read a dead peer's address and then hang in ``init_process_group`` or fail with
``Connection refused`` (pytorch/pytorch#135712; 2.13 still shares the store across rounds).
:func:`round_prefix` scopes this round's keys by a name no earlier round used.

Timeouts.  ``--dist-timeout`` bounds ``init_process_group`` and every collective (the
backend's own timeout), and a watchdog thread (:class:`Progress`) turns any wait longer than
that -- including the ones the backend does not time out itself, such as gloo connecting to
a stale address -- into one line on stderr naming the rank and the step, and exit status 1
(so that ``torchrun`` restarts the round instead of waiting forever).
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

#: ``--dist-timeout``: seconds a rank may wait in ``init_process_group`` or in a collective.
DEFAULT_TIMEOUT_S = 300.0
PROG = "python -m mdm_kernels.train"


class DistributedFailure(RuntimeError):
    """A collective or the process-group set-up failed (a peer died, the network broke);
    the message is one line naming the rank and the step."""


@dataclass
class Dist:
    """Where this process stands: ``world == 1`` means single-process training."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def check_timeout(timeout_s) -> float:
    """``timeout_s`` as a positive finite float; ValueError naming ``--dist-timeout`` otherwise."""
    try:
        t = float(timeout_s)
    except (TypeError, ValueError):
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout_s!r}") from None
    if not (t > 0 and t < float("inf")):
        raise ValueError(f"--dist-timeout must be a positive number of seconds, got {timeout_s!r}")
    return t


class Progress:
    """Where this rank is (``where``: the step; ``op``: the collective it waits in) and a
    watchdog thread: when nothing calls :meth:`beat` for ``timeout_s`` seconds it writes one
    line to stderr naming the rank, the step and the collective, and ends the process with
    exit status 1 (``os._exit``: a rank stuck in C++ cannot be unwound).  The backend's own
    timeout (the same ``timeout_s``) usually fires first, as an exception; the watchdog is the
    bound for waits that have none (gloo retrying a connection, a store read)."""

    def __init__(self, rank: int, timeout_s: float, where: str = "start-up"):
        self.rank = rank
        self.timeout_s = check_timeout(timeout_s)
        self.where = where
        self.op: str | None = None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mdm-dist-watchdog", daemon=True)

    def start(self) -> "Progress":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self, where: str | None = None, op: str | None = None) -> None:
        if where is not None:
            self.where = where
        self.op = op
        self._last = time.monotonic()

    def describe(self) -> str:
        return f"rank {self.rank}, {self.where}" + (f", {self.op}" if self.op else "")

    def _watch(self) -> None:
        period = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(period):
            if time.monotonic() - self._last > self.timeout_s:
                line = (f"{PROG}: error: {self.describe()}: no progress for {self.timeout_s:g} s "
                        f"(--dist-timeout); another process probably died or hangs\n")
                try:
                    sys.stderr.flush()
                    os.write(2, line.encode())
                finally:
                    os._exit(1)


_progress: Progress | None = None


def progress(where: str) -> None:
    """Record that this rank reached ``where`` (e.g. ``"epoch 3 step 12"``): named by a
    timeout or a failed collective, and it restarts the watchdog's clock.  No-op without
    a process group."""
    if _progress is not None:
        _progress.beat(where)


def _one_line_cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    # gloo/NCCL prefix their messages with the C++ source location: keep the reason
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", text)
    return text[:300] + ("..." if len(text) > 300 else "")


def _is_comm_error(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and re.search(
        r"gloo|nccl|connection|timed out", str(exc), re.IGNORECASE) is not None


@contextmanager
def collective(op: str):
    """Around one collective: names ``op`` in a timeout, restarts the watchdog's clock, and
    turns a communication error into :class:`DistributedFailure` (one line, rank and step)."""
    if _progress is None:
        yield
        return
    _progress.beat(op=op)
    try:
        yield
    except DistributedFailure:
        raise
    except RuntimeError as exc:
        if not _is_comm_error(exc):
            raise
        raise DistributedFailure(f"{_progress.describe()} failed: {_one_line_cause(exc)}") from exc
    _progress.beat()


def round_prefix(store=None) -> str:
    """The store prefix of this ``torchrun`` round's process group.

    Under ``torchrun`` the workers share the launcher's TCPStore, which keeps every key of a
    crashed round (:mod:`module doc <mdm_kernels.train.ddp>`); each round therefore uses its
    own prefix.  On one node that is the restart count (``TORCHELASTIC_RESTART_COUNT``, the
    same for every worker of a node).  On several nodes the launchers count restarts each for
    itself (the node whose worker failed counts one, the others none), so there it is this
    rank's incarnation number, counted in the store: every restart relaunches every rank, so
    every rank of a round reads the same number.  Without a shared store (plain
    ``MASTER_ADDR``/``MASTER_PORT``, or ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) each round
    has a fresh store and the prefix is constant."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return f"mdm_kernels/{run}/"
    try:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    except ValueError:
        nodes = 1
    if nodes <= 1 or store is None:
        return f"mdm_kernels/{run}/restart{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    n = store.add(f"mdm_kernels/{run}/incarnation/rank{os.environ.get('RANK', '0')}", 1)
    return f"mdm_kernels/{run}/incarnation{n}/"


def init_process_group(backend: str, timeout_s: float) -> None:
    """``dist.init_process_group`` from the ``torchrun`` environment (``env://``) with this
    round's store prefix (:func:`round_prefix`) and ``timeout_s`` for the store, the
    backend's connection set-up and every later collective."""
    timeout = timedelta(seconds=timeout_s)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(round_prefix(store), store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def continue_after_restart(cfg, info: Dist, device=None):
    """``cfg`` with ``resume=True`` when ``torchrun`` restarted this round after a crash and
    ``OUT/last.pt`` holds a checkpoint of this same configuration (every option outside
    :data:`~mdm_kernels.train.config.RESUME_MAY_CHANGE` equal): the restarted workers
    continue from the last complete epoch, whether or not the command line says
    ``--resume``.  Before the first checkpoint (or with another run's checkpoint in OUT,
    which the crashed round had not overwritten yet) the round starts from epoch 1 again.

    Every rank takes the same decision: on several nodes the launchers count restarts each
    for itself (a node whose worker did not fail still says 0), so the flag is the maximum
    over ranks -- a rank that started from epoch 1 beside ranks that resumed would pair its
    collectives with theirs and train on silently out of step."""
    import dataclasses
    from pathlib import Path
    from .checkpoint import load_checkpoint
    from .config import RESUME_MAY_CHANGE
    restarted = elastic_restart() > 0
    if info.enabled:
        restarted = bool(_max_over_ranks([restarted], device)[0])
    if cfg.resume or not restarted:
        return cfg
    last = Path(cfg.out) / "last.pt"
    can = last.is_file()
    if can:
        saved = load_checkpoint(last)["config"]
        mine = cfg.to_dict()
        can = all(saved[k] == mine[k] for k in mine if k in saved and k not in RESUME_MAY_CHANGE)
    if info.enabled:
        some_can, some_cannot = _max_over_ranks([can, not can], device)
        if some_can and some_cannot:
            raise ValueError(f"rank {info.rank}: {last} {'is' if can else 'is not'} a checkpoint of "
                             f"this run here, but not on every rank: --out must be a directory "
                             f"every node reads (shared storage) for a restart to continue the run")
    return dataclasses.replace(cfg, resume=True) if can else cfg


def _max_over_ranks(flags, device) -> list:
    t = torch.tensor([int(f) for f in flags], device=device if device is not None else "cpu")
    with collective("all_reduce (restart flags)"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def elastic_restart() -> int:
    """How many times ``torchrun`` restarted this node's workers (0: first round, or not
    under ``torchrun``)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


@contextmanager
def distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Yield ``(Dist, device)``; initialise (and at exit destroy) the process group when
    launched by ``torchrun`` with ``WORLD_SIZE > 1``.  A group that the caller already
    initialised is used as is and left alone.

    ``timeout_s`` (``--dist-timeout``) bounds the initialisation and every collective; a
    communication failure anywhere in the block (the training layer's collectives, DDP's
    gradient all-reduce, the penalty's all-gather) leaves it as :class:`DistributedFailure`,
    one line naming the rank and the last step reached (:func:`progress`)."""
    global _progress
    timeout_s = check_timeout(timeout_s)
    if dist.is_available() and dist.is_initialized():
        info = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    elif env_world_size() > 1:
        if not dist.is_available():
            raise ImportError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        _progress = Progress(int(os.environ.get("RANK", "0")), timeout_s, "start-up").start()
        try:
            with collective(f"init_process_group({backend})"):
                init_process_group(backend, timeout_s)
        except BaseException:
            _progress.stop()
            _progress = None
            raise
        info = Dist(dist.get_rank(), dist.get_world_size(), local, owns_group=True)
    else:
        yield Dist(), device
        return
    if info.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    failed = False
    try:
        yield info, device
    except DistributedFailure:
        failed = True
        raise
    except RuntimeError as exc:
        if _progress is None or not _is_comm_error(exc):
            raise
        failed = True
        raise DistributedFailure(f"{_progress.describe()} failed: {_one_line_cause(exc)}") from exc
    finally:
        if _progress is not None and info.owns_group:
            _progress.stop()
            _progress = None
        # after a failed collective the group is broken: the process exits without
        # destroying it (NCCL could block in the destructor); torchrun cleans up
        if info.owns_group and not failed and dist.is_initialized():
            dist.destroy_process_group()


def shard_indices(n: int, info: Dist, seed: int, epoch: int) -> np.ndarray:
    """This rank's training indices for ``epoch``: a ``DistributedSampler`` shuffle
    (seeded by ``seed`` and the epoch) with ``drop_last=True``, so every rank holds the
    same number of rows (the global-batch estimators require it) and no row appears twice
    in a global batch (padding would duplicate rows and so make some negatives positives)."""
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(range(n), num_replicas=info.world, rank=info.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            with collective("broadcast (initial weights)"):
                dist.broadcast(t.data, src=src)


def average_grads(params) -> None:
    """All-reduce-average gradients in place (the critic: identical on every rank in exact
    arithmetic; averaging keeps the replicas bit-identical even with non-deterministic
    kernels)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    with collective("all_reduce (critic gradients)"):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def mean_over_ranks(values: dict, device) -> dict:
    """Average a dict of floats over ranks (logging: per-rank task losses differ)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    with collective("all_reduce (logged losses)"):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


@torch.no_grad()
def predict_sharded(model, split, batch_size: int, device, info: Dist) -> np.ndarray:
    """Predictions on the whole ``split``, every rank predicting one contiguous shard;
    the shards are all-gathered so that every rank (rank 0 included) gets the full,
    ordered prediction vector and takes the same early-stopping decisions."""
    from .data import batch_from
    model.eval()
    n = len(split)
    chunks = np.array_split(np.arange(n), info.world)
    mine = chunks[info.rank]
    out = [model(batch_from(split, mine[s:s + batch_size], device))[0].float()
           for s in range(0, len(mine), batch_size)]
    local = torch.cat(out) if out else torch.zeros(0, device=device)
    width = max(len(c) for c in chunks)
    pad = torch.zeros(width, device=device, dtype=torch.float32)
    pad[:len(local)] = local.reshape(-1)
    parts = [torch.empty_like(pad) for _ in range(info.world)]
    with collective("all_gather (predictions)"):
        dist.all_gather(parts, pad)
    return torch.cat([p[:len(c)] for p, c in zip(parts, chunks)]).cpu().numpy()


def gather_objects(obj, info: Dist) -> list:
    out = [None] * info.world
    with collective("all_gather_object (RNG states)"):
        dist.all_gather_object(out, obj)
    return out


def barrier(info: Dist) -> None:
    if info.enabled:
        with collective("barrier"):
            dist.barrier()


def has_unused_parameters(model: torch.nn.Module, batch: dict, with_zs: bool, device) -> bool:
    """Whether a training step leaves some trainable parameter without a gradient (DDP then
    needs ``find_unused_parameters=True``, e.g. ``mult``).  One probe forward/backward on a
    few rows; RNG state and gradients are left as they were."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        pred, zs = model(batch)
        loss = pred.float().sum()
        if with_zs:
            loss = loss + sum(z.float().sum() for z in zs)
        loss.backward()
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    return unused
