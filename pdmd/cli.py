"""The ``pdmd`` command."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from pdmd.tools.planner import add_plan_parser


def _toy1d(args) -> int:
    from pdmd.demos import toy1d

    metrics = toy1d.run(args.out, steps=args.steps, seed=args.seed, progress=not args.quiet, threads=args.threads)
    print(json.dumps({k: metrics[k] for k in ("deviation_correct", "deviation_incorrect", "seconds")}, indent=2))
    print(f"wrote {args.out}/figure2.png and {args.out}/metrics.json")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in pdmd's one-line form (subcommands' parsers are of this class too)."""

    def error(self, message):
        self.exit(2, f"pdmd: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdmd", description="Phased DMD trainer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("toy1d", help="reproduce the paper's Figure 2 (1-D subinterval objective check)")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--steps", type=int, default=1500, help="training steps per model")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the tensors are tiny, more threads only wait on each other)")
    t.set_defaults(func=_toy1d)
    from pdmd.demos.distill import add_commands
    from pdmd.tools.diversity import add_cli as add_diversity

    add_commands(sub)
    from pdmd.pipeline.real import add_encode_command

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
    s.add_argument("--experts", help="folder written by pdmd.pipeline.export.export_experts (manifest.json)")
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
        from pdmd.demos.distill import sample_run

        if args.prompt and len(args.prompt) > 1:
            raise ValueError("--prompt: pdmd sample --run takes at most one (a prompt name of the run)")
        if not Path(args.run, "experts.safetensors").is_file():
            raise ValueError(f"--run {args.run!r} holds no experts.safetensors (not a finished pdmd distill run)")
        check_out(Path(args.out).parent, "--out")
        path = sample_run(args.run, args.steps, args.n, args.out, args.prompt[0] if args.prompt else None, args.seed)
        print(f"wrote {path}")
        return 0
    if not args.experts or not (args.prompt or args.prompts):
        raise ValueError("pdmd sample --pipeline needs --experts and --prompt or --prompts")
    if args.prompts and not Path(args.prompts).is_file():
        raise ValueError(f"--prompts {args.prompts!r} is not a file (one prompt per line)")
    if args.device is not None:
        from pdmd.config import require_device

        require_device(args.device, "--device")
    check_out(args.out, "--out")
    from pdmd.pipeline.export import sample

    prompts = args.prompt or [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
    out = sample(args.pipeline, args.experts, prompts, args.out, args.seeds, args.height, args.width, args.frames,
                 args.dtype, args.device)
    print(f"wrote {len(prompts) * len(args.seeds)} samples under {out}")
    return 0


def check_out(path, flag: str = "--out") -> None:
    """ValueError naming ``flag`` unless ``path`` is a directory we may write into or can be made as one: checked
    before any work, so a run does not train for an hour and then fail to write its first file."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {str(p)!r} is a file, not a directory")
    q = p.absolute()
    while not q.exists():  # the first existing ancestor: mkdir -p makes the rest inside it
        q = q.parent
    if not q.is_dir():
        raise ValueError(f"{flag} {str(p)!r}: {str(q)!r} is a file, so no directory can be made under it")
    if not os.access(q, os.W_OK | os.X_OK):  # also False on a read-only file system, even for root
        raise ValueError(f"{flag} {str(p)!r}: {str(q)!r} is not writable (permission denied)")


# commands whose --out is a directory they write into (sample checks its own --out)
_OUT_DIRS = ("toy1d", "distill", "compare", "eval")


def _run(args) -> int:
    if args.command in _OUT_DIRS and getattr(args, "out", None) is not None:
        check_out(args.out)
    return args.func(args)


def main(argv=None) -> int:
    """``pdmd`` on ``argv``; errors propagate (``entry`` turns user errors into one line)."""
    return _run(build_parser().parse_args(argv))


# which settings size the allocations of each command, for the out-of-memory line
_SIZES = {
    "distill": "distill.batch_size, distill.pool_size, teacher.batch_size, teacher.width and eval.samples_per_prompt "
               "(a real model: distill.batch_size, distill.pool_size and data.resolutions; pdmd plan estimates its memory)",
    "compare": "distill.batch_size, distill.pool_size, teacher.batch_size, teacher.width and eval.samples_per_prompt",
    "encode-prompts": "data.max_sequence_length and model.dtype",
    "sample": "--n (--run), or --height, --width, --frames and --dtype (--pipeline)",
    "toy1d": "--steps",
}


def _memory_error(e: BaseException, args) -> str | None:
    """The one line for a failed allocation (torch CPU or CUDA, Python), or None when ``e`` is not one.

    The size comes from the allocator's own message; the settings that control it from ``_SIZES``."""
    text = str(e)
    oom = (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in text
           or "can't allocate memory" in text or "not enough memory" in text)
    overflow = "Storage size calculation overflowed" in text or "integer multiplication overflow" in text
    if not (oom or overflow):
        return None
    if overflow:
        size = "more than 2**63 bytes (the tensor size overflows)"
    elif m := re.search(r"allocate (\d+) bytes", text):  # torch's CPU allocator
        n = int(m.group(1))
        k = min(max((n.bit_length() - 1) // 10, 0), 6)  # the largest binary unit not above n
        size = f"{n / 2 ** (10 * k):.3g} {('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB')[k]} ({n} bytes)"
    elif m := re.search(r"allocate ([\d.]+ ?[KMGTPE]i?B)", text, re.IGNORECASE):  # CUDA, numpy
        size = m.group(1)
    else:
        size = "an unreported size"
    command = getattr(args, "command", None)
    config = getattr(args, "config", None)
    where = f" in {config}" if config else ""
    fields = f"; lower {_SIZES[command]}{where}" if command in _SIZES else ""
    return f"out of memory: tried to allocate {size}{fields}"


def entry(argv=None) -> int:
    """The console command. A user error (bad config, path, device, a size that does not fit in memory) prints
    one ``pdmd: error: ...`` line and exits 2; Ctrl-C exits 130. Any other exception is a bug in pdmd and keeps
    its traceback."""
    args = build_parser().parse_args(argv)  # argparse's errors: one line and exit 2 (_Parser.error)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("pdmd: interrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # pdmd's bad-input errors (ConfigError and the ValueErrors naming a field or path)
        print(f"pdmd: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        line = _memory_error(e, args)
        if line is None:
            raise
        print(f"pdmd: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
