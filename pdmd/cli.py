"""The ``pdmd`` command: its arguments. What each command does is in ``pdmd.commands`` (a run goes through
``pdmd.pipeline.run``); ``entry`` turns user errors into one ``pdmd: error:`` line."""
from __future__ import annotations

import argparse
import re
import sys
import warnings

from pdmd import commands
from pdmd.commands import check_out
from pdmd.tools.plan_config import add_plan_parser


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


def _config_args(p, config_required: bool = False) -> None:
    """--config and --set, on every command that reads a config."""
    p.add_argument("--config", required=config_required, default=None,
                   help="YAML config (docs/config.md)" + ("" if config_required else "; default: the built-in defaults"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="overrides",
                   help="override one config field (repeatable), e.g. --set generator.lr=1e-4 --set "
                        "distill.timesteps=[1.0,0.5,0.0]; typed and checked by the schema")


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
    t.set_defaults(func=commands.toy1d)
    d = sub.add_parser("distill", help="distil the embedded toy teacher (or, for a config with model:, a local Wan/Qwen-Image) into few-step experts")
    _config_args(d)
    d.add_argument("--out", required=True, help="run directory")
    d.add_argument("--max-steps", type=int, default=None, help="generator updates in total (= --set distill.max_steps=N)")
    d.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in OUT (checkpoint.safetensors, checkpoint.dcp under torchrun)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=commands.distill)
    c = sub.add_parser("compare", help="DMD, DMD+SGTS, Phased DMD, Phased DMD+SGTS with the same budget")
    _config_args(c)
    c.add_argument("--out", required=True)
    c.add_argument("--max-steps", type=int, default=None)
    c.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="one number N: N distillation seeds from the config's seed on; several: those seeds. Each "
                        "method runs once per seed (teacher of the config's seed); tables show mean ± std over seeds")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=commands.compare)
    e = sub.add_parser("encode-prompts", help="encode a real-model config's prompts once into its prompt cache")
    _config_args(e, config_required=True)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=commands.encode)
    from pdmd.tools.diversity import add_cli as add_diversity

    add_diversity(sub)
    _add_sample(sub)
    _add_export(sub)
    add_plan_parser(sub)
    return p


def _add_sample(sub) -> None:
    """``pdmd sample``: a toy run (``--run``) or a diffusers pipeline with exported experts (``--pipeline``)."""
    s = sub.add_parser("sample", help="few-step samples from a toy run or from exported experts in a diffusers pipeline")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory of pdmd distill (embedded default); its config is the run's own")
    src.add_argument("--pipeline", help="local diffusers pipeline folder (model_index.json); needs --experts")
    s.add_argument("--experts", help="folder written by pdmd.pipeline.export.export_experts (manifest.json)")
    s.add_argument("--out", required=True, help="--run: .csv, .npy or .safetensors file; --pipeline: a folder")
    s.add_argument("--steps", type=int, default=4, help="--run: sampling steps")
    s.add_argument("--n", type=int, default=1000, help="--run: samples per prompt")
    s.add_argument("--prompt", action="append", help="--run: one prompt name; --pipeline: a prompt (repeatable)")
    s.add_argument("--prompts", help="--pipeline: text file, one prompt per line")
    s.add_argument("--image", action="append", help="--pipeline, image-to-video experts: the image of each --prompt, in order")
    s.add_argument("--images", help="--pipeline, image-to-video experts: a folder of images (sorted) or a file of paths, "
                                    "one per prompt (as data.images)")
    s.add_argument("--seed", type=int, default=0, help="--run: seed")
    s.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="--pipeline: one sample per seed")
    s.add_argument("--height", type=int)
    s.add_argument("--width", type=int)
    s.add_argument("--frames", type=int, help="Wan: number of frames (1 for images)")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--device")
    s.set_defaults(func=commands.sample)


def _add_export(sub) -> None:
    """``pdmd export``: convert a run's exported experts into another LoRA layout (ComfyUI's)."""
    x = sub.add_parser("export", help="write a run's exported experts in ComfyUI's LoRA layout (expert_k_comfy.safetensors)")
    src = x.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory of pdmd distill with a model: section (its experts are in RUN/experts)")
    src.add_argument("--experts", help="an export folder (manifest.json + expert_k.safetensors), e.g. the config's export.dir")
    x.add_argument("--format", choices=["comfy"], default="comfy",
                   help="comfy: diffusion_model.<original module>.lora_down/lora_up/alpha, the keys ComfyUI's LoRA loader maps")
    x.add_argument("--out", help="folder for the converted files and their manifest.json (default: the export folder itself, "
                                 "whose manifest.json gains the ComfyUI entries)")
    x.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="dtype of the LoRA matrices (default: the experts' own)")
    x.set_defaults(func=commands.export)


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
    "export": "the experts' size (rank) and --dtype",
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
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _entry(args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A config warning (an old field name) as one ``pdmd: warning:`` line; others as Python shows them."""
    from pdmd.config import ConfigWarning

    if issubclass(category, ConfigWarning):
        print(f"pdmd: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _entry(args) -> int:
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
