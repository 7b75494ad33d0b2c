"""``python -m mdm_kernels.train.analyze {drop,critic,sweep,reproduce}``: analyses of trained runs
(modality drop, critic interpretability) and multi-seed sweeps.  See docs/analysis.md."""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys

from .._cli import OneLineParser, one_line_user_errors, out_dir_removed_if_refused
from .config import PENALTIES
from .models import MODELS


def _list(kind, allowed=None):
    def parse(s):
        vals = [v.strip() for v in s.split(",") if v.strip()]
        if kind is int:
            try:
                vals = [int(v) for v in vals]
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
        if allowed is not None:
            bad = [v for v in vals if v not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
        if not vals:
            raise argparse.ArgumentTypeError("empty list")
        return vals
    return parse


PROG = "python -m mdm_kernels.train.analyze"
DEBUG_HELP = "show the traceback of an error instead of the one-line message"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Analyses for mdm_kernels.train runs (docs/analysis.md).")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("drop", help="modality drop: metrics with each modality / pair zeroed or noised")
    d.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (with best.pt), e.g. baseline and penalty")
    d.add_argument("--out", required=True, metavar="DIR", help="writes modality_drop.md and modality_drop.json")
    d.add_argument("--modes", type=_list(str, ("zero", "noise")), default=["zero", "noise"], help="zero,noise (default both)")
    d.add_argument("--split", choices=("test", "valid"), default="test")
    d.add_argument("--device", default="cpu")
    d.add_argument("--seed", type=int, default=0, help="noise seed")

    c = sub.add_parser("critic", help="export the critic's per-segment scores (joint vs shuffled) + plot")
    c.add_argument("run", metavar="RUN_DIR", help="a run trained with a penalty (uses last.pt: model + critic)")
    c.add_argument("--out", required=True, metavar="DIR", help="writes critic_scores.csv/.png, critic_summary.json")
    c.add_argument("--split", choices=("test", "valid"), default="test")
    c.add_argument("--shuffles", type=int, default=20, help="permutations averaged for the shuffled score")
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)

    s = sub.add_parser("sweep", help="seeds x penalties x models; mean ± std table + JSON of all runs")
    s.add_argument("--seeds", type=_list(int), default=[0, 1, 2, 3, 4], help="comma list (default 0,1,2,3,4)")
    s.add_argument("--penalties", type=_list(str, PENALTIES), default=list(PENALTIES), help="comma list (default all)")
    s.add_argument("--models", type=_list(str, MODELS), default=["lf_lstm", "tfn", "mult"], help="comma list (default lf_lstm,tfn,mult)")
    s.add_argument("--out", required=True, metavar="DIR", help="writes sweep.md, sweep.json, runs/<model>_<penalty>_s<seed>/")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--patience", type=int, default=None)
    s.add_argument("--weight", type=float, default=None)
    s.add_argument("--text-features", choices=("glove", "utterance", "both"), default=None)
    s.add_argument("--dataset", choices=("mosi", "synthetic"), default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--backend", default=None)
    s.add_argument("--no-skip-existing", action="store_true", help="retrain runs that already have metrics.json")
    s.add_argument("--no-progress", action="store_true")
    from .reproduce import add_parser as add_reproduce_parser
    add_reproduce_parser(sub, _list)
    for sp in sub.choices.values():  # --debug also after the subcommand
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return p


def critic_summary_table(summary: dict) -> str:
    """The summary of :func:`analysis.run_critic` as a short two-column table."""
    rows = [("run", summary.get("run_dir")), ("split, segments", f"{summary.get('split')}, {summary.get('n')}"),
            ("mean joint score", summary.get("joint_mean")),
            ("mean shuffled score", summary.get("shuffled_mean")),
            ("fraction joint > shuffled", summary.get("frac_joint_above_shuffled")),
            ("Pearson(dependency, label)", summary.get("pearson_dependency_label")),
            ("Pearson(dependency, |label|)", summary.get("pearson_dependency_abs_label")),
            ("Pearson(dependency, |error|)", summary.get("pearson_dependency_abs_error"))]
    cells = [(k, "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in rows]
    width = max(len(k) for k, _ in cells)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in cells)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from . import analysis
    # one line naming the option, exit status 2; a refused run leaves no empty --out behind
    with one_line_user_errors(PROG, argv), (
            out_dir_removed_if_refused(args.out) if getattr(args, "out", None) is not None
            else contextlib.nullcontext()):
        if args.cmd == "drop":
            res = analysis.run_drop(args.runs, args.out, modes=args.modes, split=args.split, device=args.device,
                                    seed=args.seed)
            print(analysis.drop_table(res))
            print(f"wrote {args.out}/modality_drop.md and .json")
        elif args.cmd == "critic":
            summ = analysis.run_critic(args.run, args.out, split=args.split, device=args.device,
                                       n_shuffles=args.shuffles, seed=args.seed)
            print(critic_summary_table(summ))
            print(f"wrote {args.out}/critic_scores.csv, critic_scores.png, critic_summary.json")
        elif args.cmd == "reproduce":
            from .reproduce import run_cli
            run_cli(args, f"{PROG} " + " ".join(shlex.quote(a) for a in argv if a != "--debug"))
        else:
            base = {k: v for k, v in (("epochs", args.epochs), ("patience", args.patience), ("weight", args.weight),
                                      ("text_features", args.text_features), ("dataset", args.dataset),
                                      ("batch_size", args.batch_size), ("device", args.device),
                                      ("backend", args.backend)) if v is not None}
            cmd = f"{PROG} " + " ".join(shlex.quote(a) for a in argv if a != "--debug")
            res = analysis.run_sweep(args.seeds, args.penalties, args.models, args.out, base=base,
                                     progress=not args.no_progress, skip_existing=not args.no_skip_existing,
                                     command=cmd)
            print(analysis.sweep_table(res["summary"]))
            print(f"wrote {args.out}/sweep.md and sweep.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
