"""Like-for-like against the peer library torch-mist (optional; skipped when not installed).

The benchmark's peer rows claim that both sides compute the same estimator; this checks it,
value and gradient, float64, with torch-mist's own joint critic used as our (callable)
critic and our negatives configured as torch-mist draws them (``neg_samples``: K cyclic shifts
(n + 1 + k) mod B never containing the positive, 0 = all B rows, −1 = the B − 1 others).
Install: docs/benchmarks.md ("The peer library"); a torch-mist that is installed but does
not import fails here instead of skipping.
"""
import os
import sys

import pytest
import torch

import mdm_kernels as mk

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import mdm_bench as mb  # noqa: E402

if mb.import_peer() is None:  # raises PeerImportError for a broken installation
    pytest.skip("optional peer library torch-mist not installed", allow_module_level=True)

import torch_mist.estimators as tme  # noqa: E402

FACTORIES = {"dv": tme.mine, "nwj": tme.nwj, "js": tme.js, "infonce": tme.infonce}
BOUNDS = {"dv": mk.dv_bound, "nwj": mk.nwj_bound, "js": mk.js_bound, "infonce": mk.infonce_bound}


def cyclic_shifts(batch, k):
    """torch-mist's K negatives as our perms (K, 2, B): row n of y pairs with (n + 1 + k) mod B."""
    rows = torch.arange(batch)
    return torch.stack([torch.stack([rows, (rows + 1 + s) % batch]) for s in range(k)])


def peer_and_ours(kind, negatives, batch=7, seed=0):
    torch.manual_seed(seed)
    neg = negatives if isinstance(negatives, int) else mb.PEER_NEG_SAMPLES[negatives]
    est = FACTORIES[kind](x_dim=3, y_dim=5, hidden_dims=[6], critic_type="joint",
                          neg_samples=neg).double()
    if kind == "dv":
        est._train_baseline = est.baseline  # as the benchmark's peer step: the DV loss
    x = torch.randn(batch, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(batch, 5, dtype=torch.float64, requires_grad=True)
    params = list(est.parameters()) + [x, y]
    peer = est.loss(x, y)
    peer_grads = torch.autograd.grad(peer, params)

    def critic(a, b):
        return est.critic(a, b)

    opts = ({"perms": cyclic_shifts(batch, negatives)} if isinstance(negatives, int)
            else {"negatives": negatives})
    ours = -BOUNDS[kind](critic, x, y, backend="reference", **opts)
    return peer, peer_grads, ours, torch.autograd.grad(ours, params)


@pytest.mark.parametrize("kind", ["dv", "nwj", "js"])
@pytest.mark.parametrize("negatives", [1, 3, "all", "distinct"])
def test_same_estimator_as_peer(kind, negatives):
    peer, peer_grads, ours, our_grads = peer_and_ours(kind, negatives)
    torch.testing.assert_close(ours, peer, rtol=1e-12, atol=1e-12)
    for g, w in zip(our_grads, peer_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("negatives", ["all", "distinct"])
def test_infonce_grids_match_peer(negatives):
    peer, peer_grads, ours, our_grads = peer_and_ours("infonce", negatives)
    torch.testing.assert_close(ours, peer, rtol=1e-12, atol=1e-12)
    for g, w in zip(our_grads, peer_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_infonce_shuffles_are_a_different_estimator():
    """K shuffles: our candidates include the positive, the peer's do not — the benchmark
    labels those peer rows; here the difference is real (and only that)."""
    peer, _, ours, _ = peer_and_ours("infonce", 3)
    assert not torch.allclose(ours, peer)
    assert mb.peer_estimator_note(mb.OpCase("infonce", 7, (3, 5), (6,), 3, "paper-m2"))
    assert mb.peer_estimator_note(mb.OpCase("infonce", 7, (3, 5), (6,), "distinct",
                                            "sweep-m2")) is None
