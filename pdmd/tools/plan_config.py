"""``pdmd plan``: the command, and ``--config FILE``, the memory plan of a user's own real-model config.

What it reads from the config (the same mapping ``memory.recipe: auto`` uses at run time, ``pdmd.tools.recipe.plan_kw``):
  model       model.kind and the architecture: read from ``model.path``'s transformer/config.json (and
              transformer_2/ for Wan 2.2 A14B) when the folder exists here, else ``--model`` or ``model.arch``
              (a published architecture; checked against the folder when both exist)
  resolution  data.resolutions: planned for the one with the most tokens; every one's tokens and activations listed
  batch       distill.batch_size split over the GPUs (the micro-batch per GPU); grad_accum runs more micro-batches
              one after another and does not change the peak
  layout      distill.frozen_dtype, fake.kind / dtype / optimizer / lora_rank, generator.lora_rank / optimizer,
              distill.activation_checkpointing, the phases (experts), the text tokens of data.max_sequence_length
  recipe      memory.recipe: its switches' total per GPU and whether it fits (auto: the cheapest allowed set)
model.dtype is the dtype the weights are loaded in; the trainer then casts the frozen base to distill.frozen_dtype
and a full fake score to fake.dtype, so it does not change the steady state the plan counts.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pdmd.models.registry import get_spec
from pdmd.runtime.memory import parse_recipe
from pdmd.tools.planner import (ARCHS, GiB, HEADROOM, Arch, Plan, activation_bytes, format_plan, make_plan,
                                tokens)
from pdmd.tools.recipe import (UNSHARDED, allowed_switches, choose_recipe, format_recipe_list, largest_resolution,
                               plan_kw, recipe_memory)

__all__ = ["arch_for_config", "check_model_arch", "plan_config", "format_config_plan", "config_plan_json",
           "arch_from_config", "arch_from_folder", "published_name", "add_plan_parser"]

MAX_GPUS = 256


def _shape_key(arch: Arch) -> tuple:
    """Everything of ``arch`` that sets its parameters (not its name or default resolution)."""
    return (get_spec(arch.family, "arch.family").name, arch.layers, arch.heads, arch.head_dim, arch.ffn, arch.text_dim,
            arch.in_channels, arch.out_channels, tuple(arch.patch), arch.freq_dim, arch.copies,
            tuple(sorted(arch.extra.items())))


def published_name(arch: Arch) -> str | None:
    """The name in ARCHS of the published architecture of ``arch``'s shape, or None."""
    return next((name for name, a in ARCHS.items() if _shape_key(a) == _shape_key(arch)), None)


def arch_from_config(kind: str, configs: list, where: str = "config.json") -> Arch:
    """The Arch of a base of ``len(configs)`` transformers of family ``kind`` from their diffusers config.json
    dicts (``model.config`` of a loaded one): named as its published architecture when it is one (with that
    one's default resolution), else "custom". ValueError when the family has no planner numbers, a config is
    not of the family's class, or the transformers differ in shape (the plan counts identical copies)."""
    spec = get_spec(kind, "model.kind")
    if spec.plan is None or spec.plan.from_config is None:
        raise ValueError(f"model.kind {spec.name!r} has no planner numbers (pdmd/models/<family>/plan.py)")
    archs = []
    for c in configs:
        name = c.get("_class_name")
        if name is not None and name != spec.transformer_class:
            raise ValueError(f"{where}: holds a {name!r}, not the {spec.title} transformer ({spec.transformer_class})")
        archs.append(spec.plan.from_config(c, "custom"))
    if any(_shape_key(a) != _shape_key(archs[0]) for a in archs):
        raise ValueError(f"{where}: the {len(archs)} transformers differ in shape; the planner counts identical copies")
    arch = dataclasses.replace(archs[0], copies=len(archs))
    name = published_name(arch)
    if name is not None:
        return ARCHS[name]
    return dataclasses.replace(arch, name=f"custom {spec.name} ({arch.layers} blocks, dim {arch.dim})")


def arch_from_folder(path, kind: str) -> tuple[Arch, list[str]]:
    """(the Arch, the config.json files read) of the local diffusers folder ``path`` of family ``kind``: its
    ``transformer/config.json``, and ``transformer_2/config.json`` when there is one (Wan 2.2 A14B)."""
    from pdmd.models._local import component_dir, read_json

    folder = component_dir(path, "transformer", "model.path")
    files = [folder / "config.json"]
    second = Path(path).expanduser() / "transformer_2" / "config.json"
    if folder != Path(path).expanduser() and second.is_file():
        files.append(second)
    arch = arch_from_config(kind, [read_json(f) for f in files], " and ".join(str(f) for f in files))
    return arch, [str(f) for f in files]


def _needs_model(cfg, what: str) -> None:
    if cfg.model is None:
        task = cfg.task if cfg.task in ("toy", "digits") else "toy"
        raise ValueError(f"{what} plans a real-model config (a model: section with kind {', '.join(_kinds())}); this one "
                         f"is the embedded {task} task, whose models are tiny and train in host memory: nothing to plan. "
                         "Start from configs/wan2.1-t2v-14b.yaml, wan2.2-t2v-a14b.yaml, qwen-image.yaml or "
                         "sd3.5-medium.yaml, or use pdmd plan --model NAME")


def _kinds() -> list[str]:
    from pdmd.models.registry import SPECS

    return [s.name for s in SPECS.values() if s.plan is not None]


def _choices(kind: str) -> list[str]:
    spec = get_spec(kind, "model.kind")
    return [a.name for a in spec.plan.archs] if spec.plan is not None else []


def arch_for_config(cfg, model: str | None = None):
    """(Arch, where it came from) for ``cfg``: the folder's transformer config.json when ``model.path`` exists
    here; otherwise ``model`` (``--model``), else ``model.arch``; else a ValueError listing the family's published
    architectures. A name given beside an existing folder must match the folder's shape."""
    _needs_model(cfg, "pdmd plan --config")
    kind = get_spec(cfg.model.kind, "model.kind").name
    choices = _choices(kind)
    named, flag = (model, "--model") if model is not None else (cfg.model.arch, "model.arch")
    if named is not None:
        if named not in ARCHS:
            raise ValueError(f"{flag} must be a published architecture, one of {sorted(ARCHS)}; got {named!r}")
        if named not in choices:
            raise ValueError(f"{flag} {named!r} is not a {kind} architecture (model.kind {cfg.model.kind!r}); "
                             f"choose one of {choices}")
    path = Path(cfg.model.path).expanduser()
    if path.exists():
        arch, files = arch_from_folder(path, kind)
        if named is not None and _shape_key(ARCHS[named]) != _shape_key(arch):
            raise ValueError(f"{flag} {named!r} does not match model.path's transformer ({' and '.join(files)}: "
                             f"{arch.name}, {arch.copies} transformer(s) of {arch.layers} blocks, dim {arch.dim}); "
                             f"remove {flag} or point model.path at a {named} folder")
        return arch, "read from " + " and ".join(files)
    if named is not None:
        return ARCHS[named], f"{flag} (model.path {str(path)!r} does not exist here: its config.json was not read)"
    raise ValueError(f"model.path {str(path)!r} does not exist here, so the architecture cannot be read from its "
                     f"transformer/config.json: name it with model.arch in the config (or pdmd plan --model), one of "
                     f"{choices}")


def check_model_arch(cfg) -> None:
    """ValueError when ``model.arch`` is given and ``model.path``'s transformer config.json has another shape (run
    before any work; nothing to check when either is absent)."""
    if cfg.model is not None and cfg.model.arch is not None and Path(cfg.model.path).expanduser().exists():
        arch_for_config(cfg)


def _fewest_gpus(cfg, kw_for, fits) -> int | None:
    """The fewest GPUs, among those that split distill.batch_size evenly, on which ``fits(kw_for(n), n)``."""
    for n in range(1, min(cfg.distill.batch_size, MAX_GPUS) + 1):
        if cfg.distill.batch_size % n == 0 and fits(kw_for(n), n):
            return n
    return None


def plan_config(cfg, gpus: int = 1, gpu_mem: float = 80.0, model: str | None = None,
                text_tokens: int | None = None) -> dict:
    """Everything ``pdmd plan --config`` prints (``format_config_plan``) or writes (``config_plan_json``)."""
    if not (isinstance(gpus, int) and gpus >= 1):
        raise ValueError(f"--gpus must be an integer >= 1, got {gpus!r}")
    if not gpu_mem > 0:
        raise ValueError(f"--gpu-mem must be > 0 GiB, got {gpu_mem}")
    arch, source = arch_for_config(cfg, model)
    if cfg.data is None or not cfg.data.resolutions:
        raise ValueError("data.resolutions is required: pdmd plan --config plans for the largest of them")
    for r in cfg.data.resolutions:
        try:
            tokens(arch, *r)
        except ValueError as e:
            raise ValueError(f"data.resolutions {list(r)}: {e}") from None
    res = largest_resolution(arch, cfg.data.resolutions)

    def kw_for(n):
        kw = plan_kw(cfg, arch, n, res)
        if text_tokens is not None:
            kw["text_tokens"] = text_tokens
        return kw

    kw = kw_for(gpus)
    ck = kw.pop("checkpointing")
    plan = make_plan(arch, gpus=gpus, gpu_mem=gpu_mem, **kw)
    per_res = []
    for r in cfg.data.resolutions:
        n_tok = tokens(arch, *r)
        per_res.append({"resolution": list(r), "tokens": n_tok,
                        "activations_bytes": activation_bytes(arch, kw["batch"], n_tok, kw["text_tokens"], ck),
                        "planned": tuple(r) == res})
    recipe = parse_recipe(cfg.memory.recipe)
    distributed = gpus > 1
    allowed = allowed_switches(cfg, distributed)
    best, every = choose_recipe(arch, gpus, gpu_mem, checkpointing=ck, **kw)  # every switch, as pdmd plan --model
    runnable = True
    if recipe == "auto":
        chosen = choose_recipe(arch, gpus, gpu_mem, allowed=allowed, checkpointing=ck, **kw)[0]
        best_allowed = chosen
        chosen, note = best_allowed, ("the cheapest of the switches this config allows that fits" if chosen is not None else
                              f"no set of the allowed switches {allowed} fits: the run would stop with an error")
    else:
        chosen = recipe_memory(arch, recipe, gpus, gpu_mem, checkpointing=ck, **kw)
        bad = [s for s in recipe if s in UNSHARDED and distributed]
        runnable = not bad
        note = (f"{bad} run in one process only here: the trainer refuses them on {gpus} GPUs" if bad else
                "as listed in memory.recipe")

    def choice_fits(kw_n, n):
        kw_n = dict(kw_n)
        c = kw_n.pop("checkpointing")
        if recipe == "auto":
            return choose_recipe(arch, n, gpu_mem, allowed=allowed_switches(cfg, n > 1), checkpointing=c, **kw_n)[0] \
                is not None
        if n > 1 and any(s in UNSHARDED for s in recipe):
            return False
        return recipe_memory(arch, recipe, n, gpu_mem, checkpointing=c, **kw_n)["fits"]

    def any_fits(kw_n, n):
        kw_n = dict(kw_n)
        c = kw_n.pop("checkpointing")
        return choose_recipe(arch, n, gpu_mem, checkpointing=c, **kw_n)[0] is not None

    return {
        "blocked": _blocked(cfg, distributed),
        "config": cfg, "arch": arch, "source": source, "gpus": gpus, "gpu_mem": gpu_mem, "plan": plan,
        "checkpointing": ck, "resolution": res, "resolutions": per_res, "recipe": recipe, "allowed": allowed,
        "choice": chosen, "choice_note": note, "cheapest": best, "recipes": every,
        "runnable": runnable,
        "fewest_gpus": {"config_recipe": _fewest_gpus(cfg, kw_for, choice_fits),
                        "any_recipe": _fewest_gpus(cfg, kw_for, any_fits)},
    }


def _blocked(cfg, distributed: bool) -> dict:
    """Switch -> why this config does not allow it (``allowed_switches``' rules, in words)."""
    from pdmd.runtime.memory import SWITCHES, step_in_backward_blockers

    d, out = cfg.distill, {}
    for s in SWITCHES:
        why = []
        if s == "step_in_backward":
            why += step_in_backward_blockers(cfg)
        if s == "activation_offload" and not d.activation_checkpointing:
            why.append("distill.activation_checkpointing is false")
        if s in ("activation_offload", "weight_offload") and d.compile:
            why.append("distill.compile is true")
        if s == "fp8_base" and not d.bf16:
            why.append("distill.bf16 is false")
        if s in UNSHARDED and distributed:
            why.append("it runs in one process only (not with FSDP2 yet)")
        if why:
            out[s] = why
    return out


def _gib(b) -> str:
    return f"{b / GiB:.2f}"


def format_config_plan(r: dict) -> str:
    """The text of ``pdmd plan --config``: what the config chose, the layout table (as ``pdmd plan --model``), the
    recipes, and whether the config's choice fits."""
    cfg, arch, plan, s = r["config"], r["arch"], r["plan"], r["plan"].settings
    d, lay = cfg.distill, s["layout"]
    limit = (1 - HEADROOM) * r["gpu_mem"]
    lines = [
        f"model: {cfg.model.kind} {arch.name} ({r['source']})",
        f"batch: distill.batch_size {d.batch_size} over {r['gpus']} GPU(s) = micro-batch {s['batch']} per GPU"
        + (f" (x{d.grad_accum} micro-batches per update, one after another)" if d.grad_accum > 1 else ""),
        f"phases: {s['experts']} expert(s), LoRA rank {s['lora_rank']}, generator.optimizer {lay.generator_optimizer}; "
        f"text tokens {s['text_tokens']}",
        f"layout: model.dtype {cfg.model.dtype or 'as stored'} (load only), distill.frozen_dtype {lay.frozen_dtype}, "
        f"fake.kind {lay.fake_kind}"
        + (f" (dtype {lay.fake_dtype})" if lay.fake_kind == "full" else f" (lora_rank {lay.fake_lora_rank})")
        + f", fake.optimizer {lay.fake_optimizer}, activation_checkpointing {str(r['checkpointing']).lower()}",
        "",
        f"data.resolutions (frames, height, width), activations per GPU at micro-batch {s['batch']}"
        f" ({'checkpointing' if r['checkpointing'] else 'no checkpointing'}):",
    ]
    for x in r["resolutions"]:
        mark = "   <- planned (most tokens)" if x["planned"] else ""
        lines.append(f"  {str(x['resolution']):<20}{x['tokens']:>9} tokens {_gib(x['activations_bytes']):>9} GiB{mark}")
    lines += ["", format_plan(plan, fewest=False), format_recipe_list(r["cheapest"], r["recipes"], r["gpus"], r["gpu_mem"],
                                                                     r["checkpointing"])]
    lines.append(f"switches this config allows (memory.recipe auto picks among them): {r['allowed'] or '(none)'}")
    for sw, why in r["blocked"].items():
        lines.append(f"  not {sw}: " + "; ".join(why))
    c = r["choice"]
    rec = cfg.memory.recipe
    lines += ["", f"the config's choice: memory.recipe {rec!r}, activation_checkpointing "
                  f"{str(r['checkpointing']).lower()} on {r['gpus']} x {r['gpu_mem']:g} GiB"]
    if c is None:
        lines.append(f"  {r['choice_note']}")
    else:
        fits = c["fits"] and r["runnable"]
        lines.append(f"  switches {list(c['switches']) or '(none)'} ({r['choice_note']}): {_gib(c['total'])} GiB per GPU, "
                     f"host {_gib(c['host'])} GiB, traffic {_gib(c['traffic'])} GiB per pass -> "
                     + ("fits" if fits else f"does NOT fit ({limit:g} GiB allowed)" if not c["fits"] else "cannot run"))
        lines.append("  components, GiB: " + ", ".join(f"{k} {_gib(v)}" for k, v in c["components"].items()))
    few = r["fewest_gpus"]
    fmt = lambda n: f">{MAX_GPUS} (or none that divides distill.batch_size)" if n is None else str(n)  # noqa: E731
    lines.append(f"fewest GPUs of {r['gpu_mem']:g} GiB (dividing distill.batch_size {d.batch_size}): "
                 f"{fmt(few['config_recipe'])} with the config's memory.recipe, {fmt(few['any_recipe'])} with the "
                 "cheapest recipe")
    lines.append("not counted: the boundary-sample pools (latents and prompt embeddings per resolution), the "
                 "CUDA context and allocator slack beyond the 10 % headroom")
    return "\n".join(lines)


def _recipe_json(x: dict | None) -> dict | None:
    if x is None:
        return None
    return {"switches": list(x["switches"]), "total_bytes": x["total"], "fits": x["fits"], "host_bytes": x["host"],
            "traffic_bytes": x["traffic"], "components_bytes": dict(x["components"])}


def config_plan_json(r: dict) -> dict:
    """``plan_config``'s answer for machines (bytes per GPU; ``--json``)."""
    cfg, plan, s = r["config"], r["plan"], r["plan"].settings
    lay = s["layout"]
    return {
        "model": {"kind": cfg.model.kind, "arch": r["arch"].name, "source": r["source"], "base_params": plan.base_params,
                  "lora_params_per_expert": plan.lora_params, "transformers": r["arch"].copies},
        "gpus": r["gpus"], "gpu_mem_gib": r["gpu_mem"], "headroom": HEADROOM,
        "batch_per_gpu": s["batch"], "grad_accum": cfg.distill.grad_accum, "experts": s["experts"],
        "lora_rank": s["lora_rank"], "text_tokens": s["text_tokens"], "checkpointing": r["checkpointing"],
        "layout": {"model.dtype": cfg.model.dtype, "distill.frozen_dtype": lay.frozen_dtype, "fake.kind": lay.fake_kind,
                   "fake.dtype": lay.fake_dtype, "fake.optimizer": lay.fake_optimizer, "fake.lora_rank": lay.fake_lora_rank,
                   "generator.optimizer": lay.generator_optimizer},
        "resolutions": r["resolutions"], "planned_resolution": list(r["resolution"]), "tokens": plan.tokens,
        "ours_bytes": dict(plan.ours), "reference_bytes": dict(plan.reference), "activations_bytes": dict(plan.activations),
        "totals_bytes": {layout: {k: plan.total(layout, k == "checkpointing") for k in ("checkpointing", "no checkpointing")}
                         for layout in ("ours", "reference")},
        "fits": {layout: {k: plan.fits(layout, k == "checkpointing") for k in ("checkpointing", "no checkpointing")}
                 for layout in ("ours", "reference")},
        "bytes_per_param": {layout: plan.bytes_per_param(layout) for layout in ("ours", "reference")},
        "memory.recipe": cfg.memory.recipe, "allowed_switches": r["allowed"], "blocked_switches": r["blocked"],
        "choice": _recipe_json(r["choice"]), "choice_note": r["choice_note"], "choice_runnable": r["runnable"],
        "cheapest": _recipe_json(r["cheapest"]), "recipes": [_recipe_json(x) for x in r["recipes"]],
        "fewest_gpus": r["fewest_gpus"],
    }


# the preset flags and the config fields that set the same thing under --config
_PRESET_FLAGS = {"batch": "distill.batch_size (global; split over --gpus)", "frames": "data.resolutions",
                 "height": "data.resolutions", "width": "data.resolutions", "lora_rank": "generator.lora_rank",
                 "experts": "distill.phase_boundaries", "optimizer_in_backward": "memory.recipe [step_in_backward]"}
_PRESET_DEFAULTS = {"batch": 1, "lora_rank": 64, "experts": 2}


def _plan_cmd(args) -> int:
    import json

    if args.config is not None:
        return _plan_config_cmd(args)
    if args.overrides:
        raise ValueError("--set overrides a config field: use it with --config FILE")
    if args.model is None:
        raise ValueError(f"pdmd plan needs --config FILE (a real-model config) or --model NAME, one of {sorted(ARCHS)}")
    kw = {k: (_PRESET_DEFAULTS.get(k) if getattr(args, k) is None else getattr(args, k))
          for k in ("batch", "frames", "height", "width", "lora_rank", "experts")}
    kw["text_tokens"] = 512 if args.text_tokens is None else args.text_tokens
    plan = make_plan(args.model, gpus=1 if args.gpus is None else args.gpus, gpu_mem=args.gpu_mem,
                     optimizer_in_backward=bool(args.optimizer_in_backward), **kw)
    best, every = choose_recipe(args.model, gpus=plan.gpus, gpu_mem=args.gpu_mem, **kw)
    if args.json:
        print(json.dumps(_plan_json(plan, best, every), indent=2))
        return 0
    print(format_plan(plan))
    print(format_recipe_list(best, every, plan.gpus, args.gpu_mem))
    return 0


def _plan_json(plan: Plan, best, every) -> dict:
    return {"model": plan.arch.name, "gpus": plan.gpus, "gpu_mem_gib": plan.gpu_mem_gib, "batch_per_gpu": plan.batch,
            "tokens": plan.tokens, "base_params": plan.base_params, "lora_params_per_expert": plan.lora_params,
            "ours_bytes": dict(plan.ours), "reference_bytes": dict(plan.reference),
            "activations_bytes": dict(plan.activations),
            "totals_bytes": {lay: {k: plan.total(lay, k == "checkpointing") for k in ("checkpointing", "no checkpointing")}
                             for lay in ("ours", "reference")},
            "fits": {lay: {k: plan.fits(lay, k == "checkpointing") for k in ("checkpointing", "no checkpointing")}
                     for lay in ("ours", "reference")},
            "bytes_per_param": {lay: plan.bytes_per_param(lay) for lay in ("ours", "reference")},
            "cheapest": _recipe_json(best), "recipes": [_recipe_json(x) for x in every]}


def _plan_config_cmd(args) -> int:
    import json

    from pdmd.config import load_config

    given = [k for k in _PRESET_FLAGS if getattr(args, k) not in (None, False)]
    if given:
        k = given[0]
        raise ValueError(f"--{k.replace('_', '-')} is a preset flag; with --config set {_PRESET_FLAGS[k]} in the config "
                         "or with --set")
    cfg = load_config(args.config, overrides=args.overrides)
    r = plan_config(cfg, gpus=1 if args.gpus is None else args.gpus, gpu_mem=args.gpu_mem, model=args.model,
                    text_tokens=args.text_tokens)
    print(json.dumps(config_plan_json(r), indent=2) if args.json else format_config_plan(r))
    return 0


def add_plan_parser(sub) -> None:
    """Register ``pdmd plan`` on the CLI's subparsers."""
    p = sub.add_parser("plan", help="memory plan per GPU of a config (--config) or a published model (--model): our "
                                    "layout vs the reference recipe, and the cheapest memory recipe that fits")
    p.add_argument("--config", default=None, help="a real-model YAML config (docs/config.md): plan what it chose")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="overrides",
                   help="with --config: override one config field (repeatable), e.g. --set distill.batch_size=8")
    p.add_argument("--model", default=None, choices=sorted(ARCHS),
                   help="a published architecture; with --config: the one to plan when model.path does not exist here "
                        "(overrides model.arch)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs (default 1); with --config distill.batch_size is split over them")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes per GPU)")
    p.add_argument("--batch", type=int, default=None, help="--model: micro-batch per GPU (default 1)")
    p.add_argument("--frames", type=int, default=None, help="--model: video frames (4k+1 for Wan; 1 for images)")
    p.add_argument("--height", type=int, default=None, help="--model: pixels")
    p.add_argument("--width", type=int, default=None, help="--model: pixels")
    p.add_argument("--lora-rank", type=int, default=None, help="--model: the experts' LoRA rank (default 64)")
    p.add_argument("--experts", type=int, default=None, help="--model: generator experts, phases (default 2)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="text tokens per sample (default 512; with --config the family's padding of data.max_sequence_length)")
    p.add_argument("--optimizer-in-backward", action="store_true", default=None,
                   help="--model: fake-score update inside backward: no full set of fake gradients")
    p.set_defaults(func=_plan_cmd)
