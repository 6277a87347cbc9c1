"""What each ``pdmd`` command does once ``pdmd.cli`` parsed its arguments: read the config (``--config`` and
``--set``), call the run path (``pdmd.pipeline.run``) or the tool, print the summary, and give the exit status
(0; 1 for a run stopped by non-finite updates; 128 + the signal for a preempted one)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pdmd.config import RunConfig, load_config
from pdmd.runtime.parallel import shutdown

__all__ = ["load_args_config", "distill", "compare", "encode", "sample", "export", "toy1d", "check_out", "seeds_of"]


def load_args_config(args, for_run: bool = True) -> RunConfig:
    """The config of ``--config`` with ``--set`` overrides (and ``--max-steps``, the same as
    ``--set distill.max_steps=N``); the run's torch CPU threads are set from it."""
    import torch

    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "max_steps", None) is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        overrides.append(f"distill.max_steps={args.max_steps}")
    cfg = load_config(args.config, for_run=for_run, overrides=overrides)
    torch.set_num_threads(cfg.threads)
    return cfg


def _interrupted(cmd: str, e) -> int:
    """SIGTERM/SIGINT: the checkpoint is saved; exit 128 + the signal's number (143, 130), as a shell reports a
    process stopped by that signal, so a scheduler sees a preempted run, not a finished one."""
    print(f"pdmd {cmd}: {e}", file=sys.stderr)
    return 128 + e.signum


def _guarded(cmd: str, fn) -> int | dict:
    from pdmd.core.trainer import Interrupted, NonFiniteError

    try:
        return fn()
    except NonFiniteError as e:
        print(f"pdmd {cmd}: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        return _interrupted(cmd, e)


def run_task(cfg, out, resume: bool = False, progress: bool = True) -> dict:
    """``pdmd distill``: the config's task (a real model: a ``model:`` section; digits; the toy) through ``run``.
    Each task's entry point is looked up here, at call time, so a test may replace it."""
    if cfg.is_real:
        from pdmd.pipeline import real

        return real.distill_real(cfg, out, resume=resume, progress=progress)
    if cfg.task == "digits":
        from pdmd.demos import digits

        return digits.distill_digits(cfg, out, resume, progress)
    from pdmd.demos import distill as toy

    return toy.distill(cfg, out, resume=resume, progress=progress)


def distill(args) -> int:
    cfg = load_args_config(args)
    r = _guarded("distill", lambda: run_task(cfg, args.out, resume=args.resume, progress=not args.quiet))
    if isinstance(r, int):
        return r
    # every rank ended normally: leave the process group together (barrier, then destroy). Without the barrier a
    # rank that exits first closes its gloo connections under the other's background threads, which then abort
    # ("terminate called without an active exception", seen under torchrun on a loaded 2-core machine)
    shutdown(barrier=True)
    if cfg.is_real:
        if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
            return 0
        where = cfg.export.dir or Path(args.out) / "experts"
        files = [f for e in r["experts"] for f in (e.get("file"), e.get("comfy_file")) if f]
        print(f"distilled {len(r['experts'])} experts in {r['seconds']} s; wrote {where}/manifest.json and "
              + ", ".join(files))
        return 0
    if cfg.task == "digits":
        return _digits_done(args, r)
    if not r:  # a rank other than 0 under torchrun: rank 0 reports
        return 0
    g, t = r["generator"]["mean"], r["teacher"]["mean"]
    print(f"{r['method']}: modes {g['covered']}/{g['modes']} (teacher {t['covered']}), mass TV {g['mass_tv']:.3f} "
          f"(teacher {t['mass_tv']:.3f}), energy to data {g['energy_to_data']:.4f} (teacher {t['energy_to_data']:.4f}), "
          f"diversity {g['diversity']:.3f} (teacher {t['diversity']:.3f}), precision {g['precision']:.3f} "
          f"(teacher {t['precision']:.3f}, data {r['data']['mean']['precision']:.3f}); {r['seconds']['total']} s")
    print(f"wrote {args.out}/report.md, report.json, samples.png, experts.safetensors")
    return 0


def _digits_done(args, result: dict) -> int:
    print(Path(args.out, "diversity.md").read_text())
    print(f"wrote {args.out}/grid.png, diversity.md, diversity.json, experts.safetensors; {result['seconds']['total']} s")
    return 0


def seeds_of(args, cfg: RunConfig) -> list[int]:
    """--seeds N: N seeds from the config's seed on; --seeds A B C: those seeds; absent: the config's seed."""
    s = getattr(args, "seeds", None)
    if not s:
        return [cfg.seed]
    if len(s) == 1:
        if s[0] < 1:
            raise ValueError(f"--seeds N must be >= 1 (the number of seeds), got {s[0]}")
        return list(range(cfg.seed, cfg.seed + s[0]))
    if len(set(s)) != len(s):
        raise ValueError(f"--seeds must name distinct seeds, got {s}")
    return list(s)


def compare(args) -> int:
    cfg = load_args_config(args)
    if cfg.is_real:
        raise ValueError(f"{args.config}: pdmd compare runs the toy and digits tasks; a config with a model: section "
                         "is for pdmd distill")
    if cfg.task == "digits":
        from pdmd.demos import digits

        r = _guarded("compare", lambda: digits.compare_digits(cfg, args.out, not args.quiet, seeds=seeds_of(args, cfg)))
        return r if isinstance(r, int) else _digits_done(args, r)
    from pdmd.demos import distill as toy

    r = _guarded("compare", lambda: toy.compare(cfg, args.out, progress=not args.quiet, seeds=seeds_of(args, cfg)))
    if isinstance(r, int):
        return r
    print(Path(args.out, "table.md").read_text())
    print(f"wrote {args.out}/table.md, table.json, panel.png")
    return 0


def encode(args) -> int:
    from pdmd.pipeline.real import encode_real, load_real_config

    cfg = load_real_config(args.config, for_run=True, overrides=args.overrides)
    out = encode_real(cfg, progress=not args.quiet)
    print(f"wrote the prompt cache {out}" + (" (the validation prompts in its validation/)"
                                              if cfg.validation.prompts else ""))
    return 0


def toy1d(args) -> int:
    from pdmd.demos import toy1d as demo

    metrics = demo.run(args.out, steps=args.steps, seed=args.seed, progress=not args.quiet, threads=args.threads)
    print(json.dumps({k: metrics[k] for k in ("deviation_correct", "deviation_incorrect", "seconds")}, indent=2))
    print(f"wrote {args.out}/figure2.png and {args.out}/metrics.json")
    return 0


def sample(args) -> int:
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
    from pdmd.pipeline.export import sample as sample_pipeline

    prompts = args.prompt or [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
    if args.image and args.images:
        raise ValueError("pdmd sample: give --image (one per --prompt) or --images, not both")
    images = args.image
    if args.images:
        from pdmd.pipeline.real import image_paths

        images = image_paths(args.images, len(prompts), "--images")
    out = sample_pipeline(args.pipeline, args.experts, prompts, args.out, args.seeds, args.height, args.width,
                          args.frames, args.dtype, args.device, images=images)
    print(f"wrote {len(prompts) * len(args.seeds)} samples under {out}")
    return 0


def export(args) -> int:
    """``pdmd export``: an export folder's diffusers LoRA files in another layout (ComfyUI's)."""
    from pdmd.pipeline.export import MANIFEST, export_comfy

    folder = Path(args.experts) if args.experts else Path(args.run) / "experts"
    flag = "--experts" if args.experts else "--run"
    if not (folder / MANIFEST).is_file():
        hint = (" (a run whose config set export.dir exported there: pass that folder with --experts)"
                if not args.experts else "")
        raise ValueError(f"{flag}: {str(folder)!r} holds no {MANIFEST} (not a pdmd export){hint}")
    out = Path(args.out) if args.out else folder
    check_out(out, "--out" if args.out else flag)
    manifest = export_comfy(folder, out, dtype=args.dtype)
    for e in manifest["experts"]:
        print(f"{out / e['comfy_file']}: expert {e['name']} (phase {e['phase']}) -> {e['comfy_model']}")
    passes = manifest["comfy"]["passes"]
    print(f"wrote {out / MANIFEST}; in ComfyUI: {len(passes)} KSamplerAdvanced passes of {passes[0]['steps']} steps, "
          f"cfg 1, sampler {manifest['comfy']['sampler_name']}, scheduler "
          f"{manifest['comfy']['scheduler'] or 'custom (the manifest sigmas)'}, shift {manifest['comfy']['shift']:g} "
          "(docs/models.md, 'Using the experts in ComfyUI')")
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
