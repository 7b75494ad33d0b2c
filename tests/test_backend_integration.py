"""The public API end to end on the Triton backend (interpreter on CPU, compiled on a GPU):
``DependencyPenalty``'s two stages, MINE's moving average and the fused Wasserstein loss give
the same values and gradients as the reference with the same random draws."""
import pytest
import torch

import mdm_kernels as mk

KINDS = ("mine", "nwj", "js", "infonce", "wasserstein")


def _clone_penalty(pen, backend):
    other = mk.DependencyPenalty(pen.kind, pen.critic.dims, hidden=pen.critic.hidden,
                                 activation=pen.critic.activation, weight=pen.weight,
                                 negatives=pen.negatives,
                                 ema_decay=pen.ema.decay if pen.ema else None,
                                 backend=backend)
    other.load_state_dict(pen.state_dict())
    return other.to(next(pen.parameters()).device)


def _grads(module, zs):
    return [p.grad.clone() for p in module.parameters()] + [z.grad.clone() for z in zs]


@pytest.mark.parametrize("kind", KINDS)
def test_penalty_two_stages_match_reference(kind, device):
    torch.manual_seed(0)
    dims = (5, 3, 4)
    pen_ref = mk.DependencyPenalty(kind, dims, hidden=(7,), activation="tanh", weight=0.3,
                                   negatives=2 if kind != "infonce" else None,
                                   ema_decay=0.9 if kind == "mine" else None,
                                   backend="reference").to(device)
    pen_tri = _clone_penalty(pen_ref, "triton")
    base = [torch.randn(11, d, device=device) for d in dims]
    results = []
    for pen in (pen_ref, pen_tri):
        values = []
        for step in range(2):  # two steps: MINE's moving average is used on the second
            zs = [z.clone().requires_grad_(True) for z in base]
            pen.zero_grad()
            crit = pen.critic_loss(*zs, generator=torch.Generator(device).manual_seed(step))
            crit.backward()
            values.append(crit.detach())
        critic_grads = [p.grad.clone() for p in pen.parameters()]
        zs = [z.clone().requires_grad_(True) for z in base]
        pen.zero_grad()
        term = pen(*zs, generator=torch.Generator(device).manual_seed(5))
        term.backward()
        results.append((values, critic_grads, term.detach(), _grads(pen, zs)))
    (v_ref, cg_ref, t_ref, g_ref), (v_tri, cg_tri, t_tri, g_tri) = results
    for a, b in zip(v_tri, v_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t_tri, t_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(cg_tri + g_tri, cg_ref + g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    if kind == "mine":
        torch.testing.assert_close(pen_tri.ema.log_value, pen_ref.ema.log_value)


def test_auto_uses_reference_on_cpu_and_triton_needs_mlp_critic(device):
    torch.manual_seed(0)
    critic = mk.MLPCritic((3, 4), hidden=(5,)).to(device)
    zs = [torch.randn(6, 3, device=device), torch.randn(6, 4, device=device)]
    perms = mk.product_of_marginals(6, 2, 1, generator=torch.Generator().manual_seed(0),
                                    device=device).perms
    ref = mk.dv_bound(critic, *zs, perms=perms, backend="reference")
    tri = mk.dv_bound(critic, *zs, perms=perms, backend="triton")
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(mk.BackendUnavailable, match="float64"):
        mk.dv_bound(critic.double(), *[z.double() for z in zs], backend="triton")
    with pytest.raises(mk.BackendUnavailable, match="float64"):  # float64 critic, float32 z's
        mk.dv_bound(critic, *zs, backend="triton")


def test_tile_configs_switch(monkeypatch):
    from mdm_kernels.ops import triton_helpers
    configs, fixed = ["a", "b", "c"], "fixed"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MDM_TRITON_AUTOTUNE", "1")
    assert triton_helpers.tile_configs(configs, fixed) == configs
    monkeypatch.setenv("MDM_TRITON_AUTOTUNE", "0")
    assert triton_helpers.tile_configs(configs, fixed) == [fixed]
    monkeypatch.setenv("MDM_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_helpers.tile_configs(configs, fixed) == [fixed]


def _saved_elements(fn):
    """Total number of elements autograd saves for backward while ``fn()`` runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("kind", ("dv", "infonce"))
def test_all_negatives_keep_memory_linear_in_batch(kind, device):
    """The fused "all" estimator saves O(m·B·H) for backward, never the B^m grid: its saved
    state grows linearly with B while the reference's grows like B^m."""
    torch.manual_seed(0)
    dims, hidden = (3, 4, 2), (8,)
    critic = mk.MLPCritic(dims, hidden=hidden).to(device)
    bound = {"dv": mk.dv_bound, "infonce": mk.infonce_bound}[kind]
    saved = {}
    for b in (6, 12):
        zs = [torch.randn(b, d, device=device, requires_grad=True) for d in dims]
        for backend in ("triton", "reference"):
            saved[backend, b] = _saved_elements(
                lambda: bound(critic, *zs, negatives="all", backend=backend))
    params = sum(p.numel() for p in critic.parameters())
    grid = 12 ** (3 if kind == "dv" else 2)
    assert saved["reference", 12] > grid * hidden[0]          # the eager path holds the grid
    assert saved["triton", 12] < 2 * (3 * 12 * (hidden[0] + max(dims)) + params)
    # doubling B at most doubles the fused op's saved state (plus constants)
    assert saved["triton", 12] - saved["triton", 6] <= saved["triton", 6]
