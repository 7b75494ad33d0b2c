"""Estimate the mutual information of correlated Gaussians with every bound.

    python python/estimator_demo.py [--steps 300] [--backend auto]

Two 4-d Gaussians with per-dimension correlation ρ = 0.6 have I = −2·log(1 − ρ²) ≈ 0.89 nats.
An MLPCritic is trained with each loss; the printed estimates should approach I (InfoNCE is
capped by log B).  Progress bars are drawn only on a terminal: piped or redirected output
(a log file) gets the plain result lines, no carriage-return frames.
"""
import argparse
import math

import torch
from tqdm import trange

import mdm_kernels as mk
from mdm_kernels._cli import interactive


def sample(n, d, rho, generator, device):
    x = torch.randn(n, d, generator=generator, device=device)
    y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(n, d, generator=generator, device=device)
    return x, y


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="critic updates per estimator")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (already the case when the output is not a terminal)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--backend", default="auto", choices=mk.BACKEND_NAMES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    d, rho = 4, 0.6
    true_mi = -0.5 * d * math.log(1 - rho ** 2)
    losses = {"mine (DV)": (mk.mine_loss, mk.dv_bound), "nwj": (mk.nwj_loss, mk.nwj_bound),
              "js": (mk.js_loss, mk.dv_bound), "infonce": (mk.infonce_loss, mk.infonce_bound),
              "wasserstein": (mk.wasserstein_loss, mk.wasserstein_dependency)}
    print(f"true I = {true_mi:.3f} nats, log B = {math.log(args.batch_size):.3f}")
    for name, (loss_fn, bound_fn) in losses.items():
        torch.manual_seed(0)
        g = torch.Generator(device=args.device).manual_seed(0)
        critic = mk.MLPCritic((d, d), hidden=(64,)).to(args.device)
        opt = torch.optim.Adam(critic.parameters(), lr=2e-3)
        for _ in trange(args.steps, desc=name, leave=False, disable=args.quiet or not interactive()):
            x, y = sample(args.batch_size, d, rho, g, args.device)
            loss = loss_fn(critic, x, y, generator=g, backend=args.backend)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x, y = sample(8192, d, rho, g, args.device)
        with torch.no_grad():
            kw = {} if bound_fn is mk.infonce_bound else {"negatives": 8}
            x_, y_ = (x[:args.batch_size], y[:args.batch_size]) if bound_fn is mk.infonce_bound \
                else (x, y)
            est = bound_fn(critic, x_, y_, generator=g, backend=args.backend, **kw).item()
        notes = {"js": " nats (JS-trained critic, read through the DV bound)",
                 "wasserstein": " (Wasserstein dependency: a transport distance, not nats)"}
        print(f"{name:>12}: {est:.3f}{notes.get(name, ' nats')}")


if __name__ == "__main__":
    main()
