"""Issue 16: the dependency the model maximises must stay bounded.  A deterministic encoder
can raise the raw-input bounds without limit by inflating the scale of its z's; with
``normalize="rms"`` (the training default, ``--critic-input rms``) the critic reads
z / rms(z) and nothing is gained by rescaling."""
import contextlib
import io
import math

import pytest
import torch

from mdm_kernels import DependencyPenalty
from mdm_kernels.penalty import rms_normalize
from mdm_kernels.train.config import TrainConfig, parse_args, validate
from mdm_kernels.train.loop import build_penalty, train

KINDS = ["mine", "nwj", "js", "infonce", "wasserstein"]


def _zs(seed=0, b=16, dims=(5, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(b, 2, generator=g)
    return [lat @ torch.randn(2, d, generator=g) + 0.3 * torch.randn(b, d, generator=g) for d in dims]


def test_rms_normalize_unit_rms_and_scale_free():
    z = torch.randn(7, 5, dtype=torch.float64) * 3
    n = rms_normalize(z)
    torch.testing.assert_close(n.pow(2).mean(-1), torch.ones(7, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rms_normalize(40.0 * z), n, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bound_and_critic_loss_invariant_to_rescaling_z(kind):
    zs = _zs()
    torch.manual_seed(0)
    pen = DependencyPenalty(kind, (5, 3, 4), hidden=(8,), backend="reference", normalize="rms", negatives="shuffle")
    p = torch.randperm(16)  # InfoNCE's layout: anchor in order, the candidates kept together
    perms = torch.stack([torch.arange(16), p, p])[None]
    big = [25.0 * z for z in zs]
    torch.testing.assert_close(pen.bound(*big, perms=perms), pen.bound(*zs, perms=perms))
    if kind != "wasserstein":  # its GP draws a random interpolation; the bound is checked above
        torch.testing.assert_close(pen.critic_loss(*big, perms=perms), pen.critic_loss(*zs, perms=perms))
    raw = DependencyPenalty(kind, (5, 3, 4), hidden=(8,), backend="reference", negatives="shuffle")
    raw.critic.load_state_dict(pen.critic.state_dict())
    assert not torch.allclose(raw.bound(*big, perms=perms), raw.bound(*zs, perms=perms))


def _two_stage_run(normalize, steps=150, weight=1.0, seed=0):
    """Algorithm 1 on linear encoders (free to rescale their z's): one critic step, then one
    model step on -weight * bound.  Returns the logged dependency of every step."""
    torch.manual_seed(seed)
    lat = torch.randn(512, 2)
    xs = [torch.cat([lat, torch.randn(512, 2)], 1) @ torch.randn(4, 6) for _ in range(3)]
    enc = torch.nn.ModuleList([torch.nn.Linear(6, 4) for _ in range(3)])
    pen = DependencyPenalty("wasserstein", (4, 4, 4), hidden=(16,), weight=weight, backend="reference",
                            normalize=normalize)
    opt = torch.optim.Adam(enc.parameters(), 0.05)
    c_opt = torch.optim.Adam(pen.critic.parameters(), 1e-2)
    g = torch.Generator().manual_seed(seed)
    deps = []
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        zs = [e(x[idx]) for e, x in zip(enc, xs)]
        c_opt.zero_grad()
        pen.critic_loss(*zs, generator=g).backward()
        c_opt.step()
        term = pen(*zs, generator=g)
        deps.append(-float(term.detach()) / weight)
        opt.zero_grad()
        term.backward()
        pen.critic.zero_grad()
        opt.step()
    return deps


def test_short_run_dependency_stays_bounded_with_rms_input_and_not_without():
    # the critic is ~1-Lipschitz (GP) on inputs of norm sqrt(4) per modality: the bound is
    # at most about the diameter 2 * sqrt(3 * 4) ~ 7 with rms inputs
    raw = _two_stage_run(None)
    rms = _two_stage_run("rms")
    assert max(rms) < 10.0
    assert max(raw[-20:]) > 50.0  # the old objective: the encoders inflate z


def test_training_config_default_and_option():
    cfg = validate(TrainConfig())
    assert cfg.critic_input == "rms" and cfg.dependency_cap == "log_batch"
    pen = build_penalty(validate(TrainConfig(penalty="nwj")), (4, 4, 4), torch.device("cpu"))
    assert pen.normalize == "rms"
    old = build_penalty(validate(TrainConfig(penalty="nwj", critic_input="raw")), (4, 4, 4), torch.device("cpu"))
    assert old.normalize is None
    assert parse_args(["--penalty", "nwj", "--critic-input", "raw"]).critic_input == "raw"
    with pytest.raises(ValueError, match="--critic-input"):
        validate(TrainConfig(critic_input="layernorm"))
    with pytest.raises(ValueError, match="normalize"):
        DependencyPenalty("nwj", (4, 4, 4), normalize="l2")


def test_skip_test_never_evaluates_the_test_split(tmp_path):
    cfg = TrainConfig(model="lf_lstm", dataset="synthetic", penalty="nwj", epochs=1, device="cpu",
                      quiet=True, skip_test=True, out=str(tmp_path / "r"))
    with contextlib.redirect_stdout(io.StringIO()):
        res = train(cfg)
    assert "acc2" not in res and res["best_val_mae"] > 0
    assert res["config"]["critic_input"] == "rms"


def test_capped_model_term_stops_the_push_and_logs_the_uncapped_bound():
    zs = _zs(seed=1, b=32)
    torch.manual_seed(0)
    pen = DependencyPenalty("nwj", (5, 3, 4), hidden=(16,), backend="reference", normalize="rms",
                            negatives="shuffle", weight=0.5)
    opt = torch.optim.Adam(pen.critic.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):  # a critic that finds the dependency: bound > 0
        opt.zero_grad()
        pen.critic_loss(*zs, generator=g).backward()
        opt.step()
    p = torch.stack([torch.arange(32)] + [torch.randperm(32, generator=g) for _ in range(2)])[None]
    free = [z.clone().requires_grad_(True) for z in zs]
    term = pen(*free, perms=p)
    bound = float(pen.last_bound)
    assert bound > 0.05 and float(term.detach()) == pytest.approx(-0.5 * bound, rel=1e-6)
    term.backward()
    assert any(z.grad.abs().sum() > 0 for z in free)
    pen.cap = 0.05
    capped = [z.clone().requires_grad_(True) for z in zs]
    term = pen(*capped, perms=p)
    assert float(term.detach()) == pytest.approx(-0.5 * 0.05) and float(pen.last_bound) == pytest.approx(bound)
    term.backward()
    assert all(z.grad is None or torch.all(z.grad == 0) for z in capped)  # no push above the cap
    pen.cap = "log_batch"
    assert pen.model_cap(32) == pytest.approx(math.log(32))
    w = DependencyPenalty("wasserstein", (4, 4, 4), cap="log_batch")
    assert w.model_cap(32) is None and DependencyPenalty("wasserstein", (4, 4, 4), cap=2.0).model_cap(32) == 2.0
    with pytest.raises(ValueError, match="cap"):
        DependencyPenalty("nwj", (4, 4, 4), cap=-1.0)


def test_dependency_cap_option():
    assert validate(TrainConfig(dependency_cap="log_batch")).dependency_cap == "log_batch"
    assert validate(TrainConfig(dependency_cap="2.5")).dependency_cap == 2.5
    assert validate(TrainConfig(dependency_cap="none")).dependency_cap is None
    assert parse_args(["--penalty", "mine", "--dependency-cap", "log_batch"]).dependency_cap == "log_batch"
    with pytest.raises(ValueError, match="--dependency-cap"):
        validate(TrainConfig(dependency_cap="huge"))
    pen = build_penalty(validate(TrainConfig(penalty="mine", dependency_cap="log_batch")), (4, 4, 4),
                        torch.device("cpu"))
    assert pen.cap == "log_batch"


def test_cap_binds_are_counted_in_every_epoch_of_the_history(tmp_path):
    # a cap just above zero binds on every batch whose estimate is positive; either way each
    # epoch logs the count and the number of batches
    def run(cap, name):
        cfg = TrainConfig(model="lf_lstm", dataset="synthetic", penalty="nwj", weight=1.0, epochs=2,
                          device="cpu", quiet=True, skip_test=True, dependency_cap=cap, out=str(tmp_path / name))
        with contextlib.redirect_stdout(io.StringIO()):
            return train(cfg)["history"]
    tiny = run(1e-6, "tiny")
    assert all(0 <= h["cap_binds"] <= h["batches"] for h in tiny) and sum(h["cap_binds"] for h in tiny) > 0
    default = run("log_batch", "default")
    assert all(0 <= h["cap_binds"] <= h["batches"] for h in default)
    pen = DependencyPenalty("nwj", (4, 4, 4), cap=1e-6)
    zs = [torch.randn(8, 4) for _ in range(3)]
    pen(*zs)
    assert pen.last_capped == bool(pen.last_bound > 1e-6)
