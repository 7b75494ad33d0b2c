"""The fused Triton kernels as ``torch.library`` custom ops (issue 15): ``opcheck`` of every
op, and whole training steps under ``torch.compile(fullgraph=True)`` against eager.

Without a GPU the ops run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1) and
``torch.compile`` compiles on the CPU, both slow: shapes are tiny and the compiled cases few.
``fullgraph=True`` is the check that a step has no graph break and no host synchronisation
(``.item()``, ``.cpu()``, data-dependent shapes) anywhere in its op path.  The CUDA-graph
test of a whole training step runs only where a GPU is present.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import mdm_kernels  # noqa: E402
from mdm_kernels import MLPCritic  # noqa: E402
from mdm_kernels.negatives import product_of_marginals  # noqa: E402
from mdm_kernels.ops import single_program, triton_ops  # noqa: E402
from mdm_kernels.ops.gradient_penalty import _critic_weights  # noqa: E402
from mdm_kernels.ops.router import execution_path  # noqa: E402
from mdm_kernels.ops.triton_helpers import (activation_code, critic_tail,  # noqa: E402
                                            project_modalities)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _critic(dims, hidden, act, seed):
    torch.manual_seed(seed)
    return MLPCritic(dims, hidden=hidden, activation=act).to(DEVICE)


def _randn(*shape, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)


def _perms(kind, B, m, K, seed):
    """Explicit (K, m, B) marginal indices (InfoNCE: anchor in order, candidates together)."""
    return product_of_marginals(B, m, K, generator=torch.Generator().manual_seed(seed),
                                candidates_together=kind == "infonce").perms.to(DEVICE)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


# ----------------------------------------------------------------------------- opcheck
TILE_CASES = [  # kind, hidden, activation, K shuffles (None: the "all" grid), "distinct"
    ("dv", (8,), "tanh", 2, False),
    ("infonce", (8, 6), "gelu", None, False),
    ("js", (5,), "relu", 1, False),
    ("nwj", (6,), "softplus", None, True),
]


@pytest.mark.parametrize("kind,hidden,act,K,distinct", TILE_CASES,
                         ids=[c[0] + ("-distinct" if c[4] else "") for c in TILE_CASES])
def test_opcheck_gathered_tiles(kind, hidden, act, K, distinct):
    critic = _critic((3, 4), hidden, act, 0)
    B = 5
    zs = [_randn(B, d, seed=k) for k, d in enumerate((3, 4))]
    P = _leaf(torch.stack(project_modalities(critic, zs)))
    ws, bs, wout, bout = critic_tail(critic)
    W2, b2 = (_leaf(ws[0]), _leaf(bs[0])) if ws else (None, None)
    perms = None if K is None else _perms(kind, B, 2, K, 1)
    args = (P, _leaf(critic.first_bias), _leaf(wout), _leaf(bout), W2, b2, perms, kind,
            activation_code(critic), distinct)
    torch.library.opcheck(triton_ops.tiles_fwd, args)
    _, _, stat = triton_ops.tiles_fwd(*args)
    grads = (torch.tensor(0.7, device=DEVICE), torch.tensor(-1.3, device=DEVICE))
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:7]]
    torch.library.opcheck(triton_ops.tiles_bwd,
                          (*plain, stat, *grads, kind, args[8], distinct))


OUTER_CASES = [  # kind, factors, activation, "distinct"
    ("dv", 2, "tanh", False), ("infonce", 2, "relu", False), ("wasserstein", 3, "gelu", False),
    ("js", 2, "tanh", True)]


@pytest.mark.parametrize("kind,nf,act,distinct", OUTER_CASES,
                         ids=[c[0] + ("-distinct" if c[3] else "") for c in OUTER_CASES])
def test_opcheck_outer_sums(kind, nf, act, distinct):
    B, H = (5 if nf == 2 else 3), 6
    factors = [_randn(B, H, seed=f) for f in range(nf)]
    wout, bout = _randn(H, seed=10), _randn(1, seed=11)
    code = activation_code(_critic((2, 2), (H,), act, 0))
    torch.library.opcheck(triton_ops.outer_fwd, (factors, wout, bout, kind, code, distinct))
    _, Ft, stat = triton_ops.outer_fwd(factors, wout, bout, kind, code, distinct)
    torch.library.opcheck(triton_ops.outer_bwd,
                          (Ft, wout.detach(), bout.detach(), stat,
                           torch.tensor(0.9, device=DEVICE), B, kind, code, distinct))


SINGLE_CASES = [  # kind, dims, hidden, activation, K (None: "all"), "distinct"
    ("dv", (3, 4), (8,), "tanh", 2, False),
    ("infonce", (3, 4), (8, 6), "relu", None, False),
    ("nwj", (2, 3, 2), (6,), "gelu", None, False),
    ("infonce", (3, 4), (6,), "tanh", None, True),
]


@pytest.mark.parametrize("kind,dims,hidden,act,K,distinct", SINGLE_CASES,
                         ids=[c[0] + ("-distinct" if c[5] else "") for c in SINGLE_CASES])
def test_opcheck_single_program(kind, dims, hidden, act, K, distinct):
    critic = _critic(dims, hidden, act, 0)
    B = 4
    zs = [_randn(B, d, seed=k) for k, d in enumerate(dims)]
    w1s = [_leaf(w) for w in critic.first_weights]
    tail = [(_leaf(layer.weight), _leaf(layer.bias)) for layer in critic.hidden_layers]
    W2, b2 = tail[0] if tail else (None, None)
    perms = None if K is None else _perms(kind, B, len(dims), K, 2)
    args = (zs, w1s, _leaf(critic.first_bias), _leaf(critic.out.weight),
            _leaf(critic.out.bias), W2, b2, perms, kind, activation_code(critic), distinct)
    torch.library.opcheck(triton_ops.single_fwd, args)
    _, _, P, dPJ, dPM, pg = triton_ops.single_fwd(*args)
    plain = ([z.detach() for z in zs], [w.detach() for w in w1s], dPJ, dPM, pg,
             torch.tensor(0.7, device=DEVICE), torch.tensor(-1.3, device=DEVICE))
    torch.library.opcheck(triton_ops.single_bwd, (*plain, torch.randn_like(P), True))
    torch.library.opcheck(triton_ops.single_bwd, (*plain, None, False))


GP_CASES = [  # dims, hidden, activation, gather rows by index (the Wasserstein path)
    ((5, 6), (4,), "tanh", True),      # Gram path (D > H_1), curved: every gradient
    ((2, 3), (8, 6), "relu", False),   # direct W_1, two layers, σ'' = 0
]


@pytest.mark.parametrize("dims,hidden,act,gather", GP_CASES, ids=["gram-gather", "direct"])
def test_opcheck_gradient_penalty(dims, hidden, act, gather):
    critic = _critic(dims, hidden, act, 0)
    b1, wmat, gram, w2, b2, wout = [_leaf(t) if isinstance(t, torch.Tensor) else t
                                    for t in _critic_weights(critic)]
    B, H1, m = 5, hidden[0], len(dims)
    if gather:
        K = 2
        sj, sm = _randn(B, H1, seed=1), _randn(m * B, H1, seed=2)
        perms = _perms("wasserstein", B, m, K, 3)
        offsets = torch.arange(m, device=DEVICE).unsqueeze(1) * B
        mi = (perms.permute(1, 0, 2).reshape(m, K * B) + offsets).to(torch.int32).contiguous()
        n = K * B
    else:
        sj, sm, mi, n = _randn(B, H1, seed=1), _randn(B, H1, seed=2), None, B
    eps = torch.rand(n, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    code = activation_code(critic)
    tensors = (sj, sm, b1, wmat, w2, b2, wout)
    torch.library.opcheck(triton_ops.gradient_penalty_op,
                          (*tensors, eps, mi, B, gram, False, code, gather, True))
    # value only (what the entry runs when no input needs a gradient)
    detached = [t.detach() if t is not None else None for t in tensors]
    torch.library.opcheck(triton_ops.gradient_penalty_op,
                          (*detached, eps, mi, B, gram, True, code, gather, False))


class _OpNames(TorchDispatchMode):
    """The names of the ops dispatched inside the mode."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strategy", ["single", "grid"])
def test_eager_calls_bypass_the_dispatcher(strategy, monkeypatch):
    """Eagerly, a fused step runs the ops' bodies and autograd formulas directly (the
    custom-op layer costs more host time than the one-program step's launches); the ops
    themselves are what compiled graphs and direct calls see."""
    if strategy == "grid":
        monkeypatch.setattr(single_program, "SINGLE_PROGRAM_MAX_WORK", 0)
    critic = _critic((3, 4), (8,), "tanh", 0)
    zs = [_randn(5, d, seed=k) for k, d in enumerate((3, 4))]
    with _OpNames() as seen:
        loss = (mdm_kernels.mine_loss(critic, *zs, backend="triton")
                + mdm_kernels.wasserstein_loss(critic, *zs, backend="triton"))
        loss.backward()
    assert not {n for n in seen.names if n.startswith("mdm_kernels.")}
    factors = [_randn(4, 6, seed=f) for f in range(2)]
    with _OpNames() as seen:
        triton_ops.outer_fwd(factors, _randn(6, seed=3), _randn(1, seed=4), "dv", 2, False)
    assert "mdm_kernels.triton_outer_fwd" in seen.names


# ----------------------------------------------------------------------------- compiled steps
class Encoders(nn.Module):
    """A small two-modality model: the z's of the penalty come from it, so the model update
    backpropagates through every op into its weights."""

    def __init__(self):
        super().__init__()
        self.text, self.audio = nn.Linear(5, 3), nn.Linear(6, 4)

    def forward(self, x_text, x_audio):
        return torch.tanh(self.text(x_text)), torch.tanh(self.audio(x_audio))


#: SGD step of both updates (a constant, not an argument: ``dynamic=True`` would trace a
#: float argument symbolically)
LR = 0.05


def training_step(model, critic, xs, perms, eps):
    """One alternating update (Colombo et al. 2021): the critic ascends MINE + NWJ + InfoNCE
    and the Wasserstein critic loss with gradient penalty on detached z's, then the model
    descends a task loss minus the dependency estimates read by the updated critic; plain
    SGD on both.  ``perms``/``eps``: ``None`` draws the negatives / ε inside the step."""
    zs = model(*xs)
    kw = dict(backend="triton")
    p = perms or {}
    detached = [z.detach() for z in zs]
    critic_loss = (mdm_kernels.mine_loss(critic, *detached, perms=p.get("dv"), **kw)
                   - mdm_kernels.nwj_bound(critic, *detached, perms=p.get("nwj"), **kw)
                   - mdm_kernels.infonce_bound(critic, *detached, **kw)
                   + mdm_kernels.wasserstein_loss(critic, *detached, perms=p.get("w"),
                                                  epsilon=eps, gp_weight=10.0, **kw))
    critic_params = list(critic.parameters())
    critic_grads = torch.autograd.grad(critic_loss, critic_params)
    with torch.no_grad():
        torch._foreach_sub_(critic_params, [LR * g for g in critic_grads])
    dependency = (mdm_kernels.dv_bound(critic, *zs, perms=p.get("dv"), **kw)
                  + mdm_kernels.infonce_bound(critic, *zs, **kw))
    model_loss = sum((z * z).mean() for z in zs) - 0.1 * dependency
    model_params = list(model.parameters())
    model_grads = torch.autograd.grad(model_loss, model_params)
    with torch.no_grad():
        torch._foreach_sub_(model_params, [LR * g for g in model_grads])
    return (critic_loss.detach(), model_loss.detach(), [g.detach() for g in critic_grads],
            [g.detach() for g in model_grads])


def _setup(B, seed=0, act="tanh"):
    torch.manual_seed(seed)
    model = Encoders().to(DEVICE)
    critic = MLPCritic((3, 4), hidden=(8,), activation=act).to(DEVICE)
    xs = (_randn(B, 5, seed=seed + 1, grad=False), _randn(B, 6, seed=seed + 2, grad=False))
    return model, critic, xs


def _explicit(B, seed=0):
    perms = {"dv": _perms("dv", B, 2, 2, seed + 3), "nwj": _perms("nwj", B, 2, 1, seed + 4),
             "w": _perms("wasserstein", B, 2, 1, seed + 5)}
    eps = torch.rand(B, generator=torch.Generator().manual_seed(seed + 6)).to(DEVICE)
    return perms, eps


def _compile(fn, **kwargs):
    # trace the autograd.grad calls into the graph too: the whole step is one graph
    compiled = torch.compile(fn, fullgraph=True, **kwargs)

    def run(*args):
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return compiled(*args)
    return run


@pytest.mark.parametrize("strategy,backend", [("single", "inductor"), ("grid", "aot_eager")])
def test_compiled_training_step_matches_eager(strategy, backend, monkeypatch):
    """The whole step (both updates, every estimator, the GP) in one graph: same losses,
    gradients and updated parameters as the eager step.  ``"grid"`` takes the multi-program
    families (gathered tiles; the outer sums for InfoNCE's "all"; the GP on the shared
    projections), ``"single"`` the one-program step and the GP on its projections.  Inductor
    compiles the surrounding torch ops once; the second case stops at AOTAutograd (the ops'
    fake kernels and autograd formulas are what it checks), which saves a C++ compilation."""
    if strategy == "grid":
        monkeypatch.setattr(single_program, "SINGLE_PROGRAM_MAX_WORK", 0)
    torch._dynamo.reset()
    B = 6
    model, critic, xs = _setup(B)
    perms, eps = _explicit(B)
    model_c, critic_c = copy.deepcopy(model), copy.deepcopy(critic)
    zs = model(*xs)
    paths = {execution_path("dv", critic, zs, perms["dv"]),
             execution_path("infonce", critic, zs, None)}
    assert paths == ({"single"} if strategy == "single" else {"grid", "outer"})
    step = _compile(training_step, backend=backend)
    for _ in range(2):  # the second call re-runs the compiled graph on the updated weights
        want = training_step(model, critic, xs, perms, eps)
        got = step(model_c, critic_c, xs, perms, eps)
        assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        for g, w in zip(got[2] + got[3], want[2] + want[3]):
            assert_close(g, w, rtol=1e-4, atol=1e-5)
    for p, q in zip([*model_c.parameters(), *critic_c.parameters()],
                    [*model.parameters(), *critic.parameters()]):
        assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_dynamic_batch_compiles_once():
    """``dynamic=True``: two batch sizes, negatives and ε drawn inside the step, one
    graph (the fake kernels take symbolic batch sizes; nothing specialises on B).
    The aot_eager backend runs the same aten RNG calls as eager, so the draws — and the
    values — match the eager step's for the same seed."""
    torch._dynamo.reset()
    counters.clear()
    step = _compile(training_step, backend="aot_eager", dynamic=True)
    model, critic, _ = _setup(7)
    model_c, critic_c = copy.deepcopy(model), copy.deepcopy(critic)
    # batch sizes unlike every feature size: Dynamo's duck sizing gives equal sizes one
    # symbol, so B = 6 would be tied to (and specialised with) the audio width 6
    for B in (7, 10):
        xs = _setup(B, seed=B)[2]
        torch.manual_seed(123)
        want = training_step(model, critic, xs, None, None)
        torch.manual_seed(123)
        got = step(model_c, critic_c, xs, None, None)
        assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # one graph for both batch sizes (a restart of the analysis inside that one compilation,
    # as Dynamo does for the float LR under dynamic=True, is not a second graph)
    assert counters["stats"]["unique_graphs"] == 1


FRESH_PROCESS_STEP = """
import torch
from mdm_kernels import DependencyPenalty
penalty = DependencyPenalty("mine", dims=(3, 4), hidden=(8,), backend="triton",
                            normalize="rms", ema_decay=0.9)
z1, z2 = torch.randn(6, 3), torch.randn(6, 4)
step = torch.compile(lambda a, b: penalty.critic_loss(a, b) + penalty(a, b),
                     fullgraph=True, backend="aot_eager")
assert torch.isfinite(step(z1, z2))
print("compiled")
"""


def test_first_call_of_a_process_compiles_fullgraph():
    """In a fresh process whose first estimator call is compiled (no eager warm-up: the
    backend modules are not imported yet), ``fullgraph=True`` still holds — the dispatch
    imports the backend without a graph break; MINE's moving average and the RMS-normalised
    critic input of :class:`~mdm_kernels.DependencyPenalty` trace too."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_STEP], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the failing check is a device-side assert, which leaves "
                           "the test process's CUDA context unusable")
def test_compiled_perms_validation_without_host_sync():
    """Out-of-range ``perms`` still fail inside a compiled graph: a device-side assertion
    (no host read of the indices while tracing), with the eager message."""
    torch._dynamo.reset()
    critic = _critic((3, 4), (8,), "relu", 0)
    zs = [_randn(5, d, seed=k, grad=False) for k, d in enumerate((3, 4))]
    bad = _perms("dv", 5, 2, 1, 0)
    bad[0, 1, 0] = 5

    def bound(perms):
        return mdm_kernels.dv_bound(critic, *zs, perms=perms, backend="triton")

    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        bound(bad)
    compiled = torch.compile(bound, fullgraph=True, backend="aot_eager")
    assert torch.isfinite(compiled(_perms("dv", 5, 2, 1, 0)))
    with pytest.raises(RuntimeError, match=r"outside \[0, 5\)"):
        compiled(bad)


# ----------------------------------------------------------------------------- CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_captures_a_whole_training_step():
    """A whole step (forward, both backward passes, both SGD updates) captured in one CUDA
    graph: nothing in the op path synchronises with the host or allocates outside torch's
    caching allocator.  Replays match the eager step on copies of the modules."""
    B = 32
    model, critic, xs = _setup(B)
    perms, eps = _explicit(B)
    model_e, critic_e = copy.deepcopy(model), copy.deepcopy(critic)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: JIT compilation, allocator
        for _ in range(2):
            training_step(copy.deepcopy(model), copy.deepcopy(critic), xs, perms, eps)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = training_step(model, critic, xs, perms, eps)
    for _ in range(2):
        graph.replay()
        want = training_step(model_e, critic_e, xs, perms, eps)
        torch.cuda.synchronize()
        assert_close(captured[0], want[0], rtol=1e-4, atol=1e-5)
        assert_close(captured[1], want[1], rtol=1e-4, atol=1e-5)
        for g, w in zip(captured[2] + captured[3], want[2] + want[3]):
            assert_close(g, w, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_reduce_overhead_loss_matches_eager():
    """``mode="reduce-overhead"`` (Inductor with CUDA graphs) of the critic's loss: the
    fused ops inside a CUDA-graphed compiled region give the eager values and gradients."""
    torch._dynamo.reset()
    B = 32
    critic = _critic((3, 4), (16,), "tanh", 0)
    zs = [_randn(B, d, seed=k) for k, d in enumerate((3, 4))]
    perms, eps = _explicit(B)

    def loss(z1, z2):
        return (mdm_kernels.mine_loss(critic, z1, z2, perms=perms["dv"], backend="triton")
                + mdm_kernels.wasserstein_loss(critic, z1, z2, perms=perms["w"], epsilon=eps,
                                               gp_weight=10.0, backend="triton"))

    compiled = torch.compile(loss, mode="reduce-overhead", fullgraph=True)
    want = loss(*zs)
    want_grads = torch.autograd.grad(want, zs)
    for _ in range(3):  # the first calls record, later ones replay the graph
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(*zs)
        got_grads = torch.autograd.grad(got, zs)
        assert_close(got.detach().clone(), want.detach(), rtol=1e-4, atol=1e-5)
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, rtol=1e-3, atol=1e-5)
