"""The ``pdmd`` command."""
from __future__ import annotations

import argparse
import json
import sys

from .plan import add_plan_parser


def _toy1d(args) -> int:
    from . import toy1d

    metrics = toy1d.run(args.out, steps=args.steps, seed=args.seed, progress=not args.quiet, threads=args.threads)
    print(json.dumps({k: metrics[k] for k in ("deviation_correct", "deviation_incorrect", "seconds")}, indent=2))
    print(f"wrote {args.out}/figure2.png and {args.out}/metrics.json")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdmd", description="Phased DMD trainer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("toy1d", help="reproduce the paper's Figure 2 (1-D subinterval objective check)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--steps", type=int, default=1500, help="training steps per model")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the tensors are tiny, more threads only wait on each other)")
    t.set_defaults(func=_toy1d)
    from .distill import add_commands
    from .diversity import add_cli as add_diversity

    add_commands(sub)
    from .real import add_encode_command

    add_encode_command(sub)
    add_diversity(sub)
    _add_sample(sub)
    add_plan_parser(sub)
    return p


def _add_sample(sub) -> None:
    """``pdmd sample``: a toy run (``--run``) or a diffusers pipeline with exported experts (``--pipeline``)."""
    s = sub.add_parser("sample", help="few-step samples from a toy run or from exported experts in a diffusers pipeline")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory of pdmd distill (embedded default)")
    src.add_argument("--pipeline", help="local diffusers pipeline folder (model_index.json); needs --experts")
    s.add_argument("--experts", help="folder written by pdmd.export.export_experts (manifest.json)")
    s.add_argument("--out", required=True, help="--run: .csv, .npy or .safetensors file; --pipeline: a folder")
    s.add_argument("--steps", type=int, default=4, help="--run: sampling steps")
    s.add_argument("--n", type=int, default=1000, help="--run: samples per prompt")
    s.add_argument("--prompt", action="append", help="--run: one prompt name; --pipeline: a prompt (repeatable)")
    s.add_argument("--prompts", help="--pipeline: text file, one prompt per line")
    s.add_argument("--seed", type=int, default=0, help="--run: seed")
    s.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="--pipeline: one sample per seed")
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--frames", type=int, help="Wan: number of frames (1 for images)")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--device")
    s.set_defaults(func=_sample)


def _sample(args) -> int:
    if args.run:
        from .distill import sample_run

        if args.prompt and len(args.prompt) > 1:
            raise SystemExit("pdmd sample --run takes at most one --prompt (a prompt name of the run)")
        path = sample_run(args.run, args.steps, args.n, args.out, args.prompt[0] if args.prompt else None, args.seed)
        print(f"wrote {path}")
        return 0
    if not args.experts or not (args.prompt or args.prompts):
        raise SystemExit("pdmd sample --pipeline needs --experts and --prompt or --prompts")
    from pathlib import Path

    from .export import sample

    prompts = args.prompt or [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
    out = sample(args.pipeline, args.experts, prompts, args.out, args.seeds, args.height, args.width, args.frames,
                 args.dtype, args.device)
    print(f"wrote {len(prompts) * len(args.seeds)} samples under {out}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def entry() -> int:
    """The console command: bad input (config, paths, shapes) gives a message and exit code 2, not a traceback."""
    try:
        return main()
    except ValueError as e:
        print(f"pdmd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
