"""The ``pdmd`` command."""
from __future__ import annotations

import argparse
import json
import sys

from .plan import add_plan_parser


def _toy1d(args) -> int:
    from . import toy1d

    metrics = toy1d.run(args.out, steps=args.steps, seed=args.seed, progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("deviation_correct", "deviation_incorrect", "seconds")}, indent=2))
    print(f"wrote {args.out}/figure2.png and {args.out}/metrics.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdmd", description="Phased DMD trainer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("toy1d", help="reproduce the paper's Figure 2 (1-D subinterval objective check)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--steps", type=int, default=1500, help="training steps per model")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_toy1d)
    add_plan_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
