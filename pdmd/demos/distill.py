"""The embedded toy default: its hooks of the run path (``ToyHooks``), ``pdmd compare`` and ``pdmd sample --run``.

distill: teacher (trained once, cached) -> Phased DMD -> exact evaluation -> report.json/.md + pictures.
compare: the four methods of Fig. 1 with the same budget -> a Table-2-style table and a Fig.-3-style panel.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from pdmd.config import METHODS, RunConfig, updated
from pdmd.runtime.parallel import Parallel
from pdmd.demos.evaluate import PRECISION_K, energy_distance, evaluate_prompt, expected_precision, over_seeds, pairwise_diversity
from pdmd.core.sampler import sample_few_step
from pdmd.demos.toy import ToyData, load_or_train_teacher, sample_teacher
from pdmd.runtime.rundir import candidates, hold, read_log
from pdmd.core.trainer import CHECKPOINT, PhasedDMDTrainer
from pdmd.pipeline.run import Hooks, run

__all__ = ["distill", "ToyHooks", "compare", "sample_run", "load_generator", "evaluate_run"]

LABELS = {"teacher": "Teacher ({steps} steps, CFG {cfg})", "dmd": "DMD", "dmd_sgts": "DMD with SGTS",
          "phased": "Phased DMD", "phased_sgts": "Phased DMD with SGTS", "data": "Exact data"}


def _noise(seeds, dim: int = 2) -> torch.Tensor:
    """One noise vector per seed (seed s -> the same latent for every method, as a paper's seed does)."""
    return torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _generators(cfg: RunConfig, data: ToyData, run_dir: Path, trainer: PhasedDMDTrainer | None):
    """Sampling functions noise, prompts -> samples for the teacher reference and the distilled generator."""
    teacher, _ = load_or_train_teacher(run_dir, data, cfg.teacher, cfg.teacher_seed, progress=False)
    t = cfg.teacher
    fns = {"teacher": lambda z, c: sample_teacher(teacher, z, c, t.sample_steps, t.guidance_scale)}
    if trainer is not None:
        fns["generator"] = _trained(trainer)
    return fns


def _trained(trainer: PhasedDMDTrainer):
    """noise, prompts (CPU) -> samples (CPU) of the trainer's current generator, on its device."""
    dev = trainer.device
    return lambda z, c: sample_few_step(trainer.experts, trainer.plan, z.to(dev), c.to(dev)).cpu()


def _samples(fn, data: ToyData, n: int, seed: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in range(data.n_prompts):
        z = torch.randn(n, data.dim, generator=gen)
        out[k] = fn(z, torch.full((n,), k, dtype=torch.long))
    return out


def evaluate_run(cfg: RunConfig, data: ToyData, fns: dict) -> dict:
    """Per prompt and mean metrics for each sampler in ``fns`` and the exact data's own diversity."""
    e = cfg.eval
    n = e.samples_per_prompt
    exact = {k: m.sample(n, torch.Generator().manual_seed(cfg.seed + 10 + k)).float()
             for k, m in enumerate(data.mixtures)}
    samples = {name: _samples(fn, data, n, cfg.seed + 1) for name, fn in fns.items()}
    seeds = torch.arange(e.diversity_groups * e.diversity_seeds)
    z = _noise(seeds, data.dim)
    out = {}
    for name, fn in fns.items():
        per_prompt, div = {}, []
        for k, mix in enumerate(data.mixtures):
            per_prompt[data.names[k]] = evaluate_prompt(mix, samples[name][k], samples["teacher"][k], exact[k])
            x = fn(z, torch.full((z.shape[0],), k, dtype=torch.long))
            div.append(pairwise_diversity(x.reshape(e.diversity_groups, e.diversity_seeds, -1)))
            per_prompt[data.names[k]]["diversity"] = div[-1]
        out[name] = {"per_prompt": per_prompt, "mean": _mean(per_prompt)}
    data_div, data_floor = [], []
    for k, mix in enumerate(data.mixtures):
        x = mix.sample(len(seeds), torch.Generator().manual_seed(cfg.seed + 99 + k))
        data_div.append(pairwise_diversity(x.reshape(e.diversity_groups, e.diversity_seeds, -1)))
        data_floor.append(energy_distance(mix.sample(n, torch.Generator().manual_seed(cfg.seed + 50 + k)), exact[k]))
    # the data's precision is its closed form (tests/test_trainer_eval.py checks samples against it)
    out["data"] = {"mean": {"diversity": sum(data_div) / len(data_div), "energy_to_data": sum(data_floor) / len(data_floor),
                            "precision": expected_precision(PRECISION_K, data.dim)}}
    out["_samples"] = {name: s for name, s in samples.items()}
    out["_exact"] = exact
    return out


def _mean(per_prompt: dict) -> dict:
    vals = list(per_prompt.values())
    m = {key: sum(v[key] for v in vals) / len(vals)
         for key in ("mass_tv", "outliers", "energy_to_data", "energy_to_teacher", "nll", "diversity", "precision")}
    m["covered"], m["modes"] = sum(v["covered"] for v in vals), sum(v["modes"] for v in vals)
    return m


def _fmt(v, fmt: str) -> str:
    """A number, or a ``{"mean", "std"}`` summary over seeds as "mean ± std"."""
    return f"{format(v['mean'], fmt)} ± {format(v['std'], fmt)}" if isinstance(v, dict) else format(v, fmt)


def _row(label: str, m: dict) -> str:
    """One table row; each metric a number (one run) or a {"mean", "std", ...} summary (several seeds)."""
    cov = "-"
    if "covered" in m:
        c = m["covered"]
        cov = (f"{c['mean']:.3g}/{m['modes']['mean']:g} ± {c['std']:.2g}" if isinstance(c, dict)
               else f"{c}/{m['modes']}")
    f = lambda key, fmt: _fmt(m[key], fmt) if key in m else "-"
    return (f"| {label} | {cov} | {f('mass_tv', '.3f')} | {f('energy_to_data', '.4f')} | "
            f"{f('energy_to_teacher', '.4f')} | {f('nll', '.2f')} | {f('diversity', '.3f')} | {f('precision', '.3f')} |")


TABLE_HEAD = ("| sampler | modes covered | mass error (TV) | energy dist. to data | energy dist. to teacher | "
              f"NLL (exact) | diversity (8 seeds) | precision ({PRECISION_K:g} std) |\n|---|---|---|---|---|---|---|---|")


def _plot_panel(path: Path, data: ToyData, columns: dict[str, dict], exact: dict, seeds_x: dict | None = None) -> None:
    """Fig.-3-style panel: one row per prompt, one column per sampler; the 8 seeds' samples marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = {"exact data": exact, **columns}
    fig, axes = plt.subplots(data.n_prompts, len(cols), figsize=(2.6 * len(cols), 2.6 * data.n_prompts),
                             sharex=True, sharey=True, squeeze=False)
    for j, (name, s) in enumerate(cols.items()):
        for k in range(data.n_prompts):
            ax = axes[k][j]
            x = s[k][:1000].numpy()
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.35, color="C0" if j else "0.4", linewidths=0)
            if seeds_x is not None and name in seeds_x:
                ms = seeds_x[name][k].numpy()
                ax.scatter(ms[:, 0], ms[:, 1], s=30, marker="x", color="C3")
            ax.scatter(data.mixtures[k].means[:, 0], data.mixtures[k].means[:, 1], s=12, color="k", marker="+")
            ax.set_xlim(-3.2, 3.2), ax.set_ylim(-3.2, 3.2)
            ax.set_xticks([]), ax.set_yticks([])
            if k == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(data.names[k], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_losses(path: Path, log: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in read_log(log) if "step" in r]  # a torn line is skipped; null (non-finite) plots as a gap
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    for ax, key in zip(axes, ("loss_fake", "g_rms", "grad_norm_gen")):
        ax.plot(steps, [float("nan") if r.get(key) is None else r[key] for r in recs], lw=0.8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("generator step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _progress_plot(data: ToyData):
    def plot(path: Path, trainer: PhasedDMDTrainer) -> None:
        s = _samples(_trained(trainer), data, 500, 12345)
        if not trainer.par.is_main:  # every rank samples (the sharded model runs in lockstep), rank 0 draws
            return
        exact = {k: m.sample(500, torch.Generator().manual_seed(k)).float() for k, m in enumerate(data.mixtures)}
        _plot_panel(path, data, {f"{trainer.plan.n_steps}-step generator, step {trainer.step}": s}, exact)
    return plot


def distill(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True,
            teacher_dir: str | Path | None = None, parallel: Parallel | None = None) -> dict:
    """Train (or reuse) the teacher, distil, evaluate; writes report.json, report.md and pictures to ``out``.

    The run path is ``pdmd.pipeline.run.run`` with ``ToyHooks``. Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank
    trains its share of each batch; rank 0 trains the teacher once and writes the log, reports and pictures.
    """
    return run(cfg, out, ToyHooks(teacher_dir), resume, progress, parallel)


class ToyHooks(Hooks):
    """The toy's pieces of the run path: the cached teacher of the 2-D mixtures, the exact evaluation, the report."""

    def __init__(self, teacher_dir: str | Path | None = None):
        self.teacher_dir, self.plot_fn, self.teacher_seconds = teacher_dir, None, 0.0

    def setup(self, cfg: RunConfig, out: Path, par: Parallel, progress: bool):
        data = ToyData()
        self.teacher_dir = Path(self.teacher_dir or out)
        if not par.is_main:
            par.barrier()  # wait for rank 0 to train or load the cached teacher, then load it
        teacher, self.teacher_seconds = load_or_train_teacher(self.teacher_dir, data, cfg.teacher, cfg.teacher_seed,
                                                              progress and par.is_main)
        if par.is_main:
            if self.teacher_dir != out and not (out / "teacher.safetensors").exists():
                shutil.copyfile(self.teacher_dir / "teacher.safetensors", out / "teacher.safetensors")
            par.barrier()
        self.plot_fn = _progress_plot(data)
        return cfg, teacher, data

    def finish(self, cfg: RunConfig, trainer: PhasedDMDTrainer, out: Path, par: Parallel, seconds: dict) -> dict:
        data, teacher_dir = trainer.task, self.teacher_dir
        trainer.export_experts(out / "experts.safetensors")
        t0 = time.time()
        ev = evaluate_run(cfg, data, _generators(cfg, data, teacher_dir, trainer))  # on every rank: lockstep
        seeds = _noise(range(cfg.eval.diversity_seeds), data.dim)
        seed_x = {name: {k: fn(seeds, torch.full((len(seeds),), k, dtype=torch.long)) for k in range(data.n_prompts)}
                  for name, fn in (("teacher", _generators(cfg, data, teacher_dir, None)["teacher"]),
                                   ("generator", _trained(trainer)))}
        t_label = LABELS["teacher"].format(steps=cfg.teacher.sample_steps, cfg=cfg.teacher.guidance_scale)
        g_label = f"{LABELS[cfg.distill.method]}, {trainer.plan.n_steps} steps"
        if not par.is_main:
            return {}
        _plot_panel(out / "samples.png", data, {t_label: ev["_samples"]["teacher"], g_label: ev["_samples"]["generator"]},
                    ev["_exact"], {t_label: seed_x["teacher"], g_label: seed_x["generator"]})
        _plot_losses(out / "losses.png", out / "log.jsonl")
        report = {
            "method": cfg.distill.method, "steps": trainer.plan.n_steps, "phases": trainer.plan.n_phases,
            "boundaries": list(trainer.plan.boundaries), "generator_updates": trainer.step,
            "nonfinite_skipped": trainer.nonfinite_total,
            "teacher": ev["teacher"], "generator": ev["generator"], "data": ev["data"],
            "seconds": {"teacher_training": round(self.teacher_seconds, 1),
                        "distillation": round(seconds["distillation"], 1),
                        "evaluation": round(time.time() - t0, 1), "total": round(time.time() - seconds["start"], 1)},
            "config": cfg.to_dict(),
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "report.md").write_text(_report_md(report, t_label, g_label))
        return report


PRECISION_NOTE = (f"Precision: share of samples within {PRECISION_K:g} std of a mode (min over modes of distance / "
                  "that mode's std); the exact data's row is its closed form 1 - exp(-k^2/2). Samples between modes "
                  "raise diversity but lower precision.")


def _report_md(r: dict, t_label: str, g_label: str) -> str:
    lines = [f"# pdmd distill: {LABELS[r['method']]}", "",
             f"{r['steps']} sampling steps, {r['phases']} phase(s), boundaries {r['boundaries']}, "
             f"{r['generator_updates']} generator updates, {r['nonfinite_skipped']} non-finite updates skipped.", "",
             "Metrics against the exact data (mean over prompts; modes covered summed). Diversity: mean pairwise "
             "distance among 8 seeds of one prompt (higher = more diverse). " + PRECISION_NOTE, "", TABLE_HEAD,
             _row(t_label, r["teacher"]["mean"]), _row(g_label, r["generator"]["mean"]),
             _row(LABELS["data"], r["data"]["mean"]), "", "## Per prompt", "",
             "| prompt | sampler | covered | mass (true) | mass (sampled) | energy to data | diversity | precision |",
             "|---|---|---|---|---|---|---|---|"]
    for name in r["generator"]["per_prompt"]:
        for who, label in (("teacher", "teacher"), ("generator", "generator")):
            m = r[who]["per_prompt"][name]
            lines.append(f"| {name} | {label} | {m['covered']}/{m['modes']} | {m['true_mass']} | {m['mass']} | "
                         f"{m['energy_to_data']:.4f} | {m['diversity']:.3f} | {m['precision']:.3f} |")
    s = r["seconds"]
    lines += ["", f"Time: teacher {s['teacher_training']} s, distillation {s['distillation']} s, "
              f"evaluation {s['evaluation']} s, total {s['total']} s.", "",
              "Pictures: `samples.png` (exact data, teacher, generator; x = the 8 seeds), `losses.png`, "
              "`samples/step_*.png` (during training)."]
    return "\n".join(lines) + "\n"


def compare(cfg: RunConfig, out: str | Path, progress: bool = True, methods=METHODS, seeds=None) -> dict:
    """The four methods with the same budget, once per seed: table.md, table.json and panel.png in ``out``.

    ``seeds`` (default: the config's seed) are the distillation seeds: seed s runs every method with
    ``seed: s`` (the trainer's RNG, the fake score's LoRA init, the evaluation's sample noise) into
    ``out/seed_<s>/<method>``, while the teacher stays the one of the config's seed (trained once into
    ``out/teacher.safetensors``), so the spread over seeds is the distillation's, not the teacher's. A run
    whose report.json matches its config is reused and an interrupted one resumes from its checkpoint, so
    the same command picks up where it stopped. Every metric is reported as mean and sample std over seeds.
    """
    seeds = [cfg.seed] if seeds is None else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name distinct seeds, got {seeds}")
    with hold(out):  # each method's run locks its own folder
        return _compare(cfg, Path(out), progress, methods, seeds)


def _compare(cfg: RunConfig, out: Path, progress: bool, methods, seeds: list[int]) -> dict:
    data = ToyData()
    load_or_train_teacher(out, data, cfg.teacher, cfg.teacher_seed, progress)
    t = cfg.teacher
    t_label = LABELS["teacher"].format(steps=t.sample_steps, cfg=t.guidance_scale)
    per_seed, seconds = {}, {}
    for s in seeds:
        scfg = updated(cfg, {"seed": s, "teacher.seed": cfg.teacher_seed})
        reports = {m: _run_method(scfg, m, out / f"seed_{s}" / m, out, progress) for m in methods}
        first = reports[methods[0]]
        per_seed[s] = {t_label: first["teacher"]["mean"], **{LABELS[m]: reports[m]["generator"]["mean"] for m in methods},
                       LABELS["data"]: first["data"]["mean"]}
        seconds[s] = {m: reports[m]["seconds"]["total"] for m in methods}
    rows = over_seeds(list(per_seed.values()))
    table = {"budget": {"generator_updates": cfg.distill.max_steps, "batch_size": cfg.distill.batch_size,
                        "fake_updates": cfg.distill.fake_updates_per_generator_update},
             "seeds": seeds, "teacher_seed": cfg.teacher_seed,
             "spread": "mean and sample std (n - 1) over seeds; min, max and the per-seed values alongside",
             "rows": rows, "per_seed": {str(s): r for s, r in per_seed.items()},
             "seconds": {str(s): v for s, v in seconds.items()}}
    (out / "table.json").write_text(json.dumps(table, indent=2))
    md = ["# pdmd compare: the four methods of Fig. 1 with the same budget", "",
          f"{cfg.distill.max_steps} generator updates each (split evenly over a method's phases), batch "
          f"{cfg.distill.batch_size}, {cfg.distill.fake_updates_per_generator_update} fake updates per generator update; "
          f"{len(cfg.distill.timesteps) - 1} sampling steps; teacher sampled with {t.sample_steps} steps and CFG "
          f"{t.guidance_scale}, distilled generators with CFG 1.", "",
          (f"Seeds {seeds} (distillation and evaluation noise; the teacher is the one of seed {cfg.teacher_seed}): "
           f"each cell is mean ± sample std over the {len(seeds)} seeds. The teacher's spread is the evaluation "
           f"noise alone. " if len(seeds) > 1 else f"Seed {seeds[0]}. ") + PRECISION_NOTE, "", TABLE_HEAD]
    # one seed: its plain numbers (table.json keeps the same {mean, std, ...} form either way)
    md += [_row(label, m) for label, m in (rows if len(seeds) > 1 else per_seed[seeds[0]]).items()]
    if len(seeds) > 1:
        for s, r in per_seed.items():
            md += ["", f"## Seed {s}", "", TABLE_HEAD] + [_row(label, m) for label, m in r.items()]
    (out / "table.md").write_text("\n".join(md) + "\n")
    _compare_panel(cfg, data, out, out / f"seed_{seeds[0]}", methods, t_label)
    return table


def _run_method(cfg: RunConfig, method: str, run: Path, teacher_dir: Path, progress: bool) -> dict:
    """One method of ``compare``: its finished report when ``run`` already holds one for this config, else
    distil (resuming from the run's checkpoint if an earlier call was interrupted)."""
    mcfg = updated(cfg, {"distill.method": method})
    done = run / "report.json"
    if done.exists() and (run / "experts.safetensors").exists():
        report = json.loads(done.read_text())
        if report.get("config") == json.loads(json.dumps(mcfg.to_dict())):
            return report
    return distill(mcfg, run, resume=bool(candidates(run / CHECKPOINT)), progress=progress, teacher_dir=teacher_dir)


def _compare_panel(cfg: RunConfig, data: ToyData, out: Path, runs: Path, methods, t_label: str) -> None:
    """Samples of each method (re-sampled from the experts saved under ``runs``) next to the teacher and the data."""
    cols, seeds_x = {}, {}
    seeds = _noise(range(cfg.eval.diversity_seeds), data.dim)
    fns = {t_label: _generators(cfg, data, out, None)["teacher"]}
    for m in methods:
        fns[LABELS[m]] = load_generator(runs / m)
    for label, fn in fns.items():
        cols[label] = _samples(fn, data, 1000, cfg.seed + 1)
        seeds_x[label] = {k: fn(seeds, torch.full((len(seeds),), k, dtype=torch.long)) for k in range(data.n_prompts)}
    exact = {k: m.sample(1000, torch.Generator().manual_seed(k)).float() for k, m in enumerate(data.mixtures)}
    _plot_panel(out / "panel.png", data, cols, exact, seeds_x)


def load_generator(run: str | Path):
    """noise, prompts -> samples of the distilled generator saved in ``run`` (experts.safetensors)."""
    from pdmd.runtime.checkpoint import load_tensors
    from pdmd.config import from_dict
    from pdmd.core.experts import Experts
    from pdmd.core.sampler import make_step_plan

    run = Path(run)
    tensors, meta = load_tensors(run / "experts.safetensors")
    cfg = from_dict(json.loads(meta["config"]))
    d = cfg.distill
    teacher, _ = load_or_train_teacher(run, ToyData(), cfg.teacher, cfg.teacher_seed, progress=False)
    plan = make_step_plan(d.method, d.timesteps, d.phase_boundaries)
    experts = Experts(teacher, plan.n_phases, cfg.generator.lora_rank, cfg.generator.lora_alpha)
    params = {n: p for name in experts.adapters for n, p in experts.adapter_params(name).items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])

    def fn(z, c):
        return sample_few_step(experts, plan, z, c)
    fn.plan = plan
    return fn


def sample_run(run: str | Path, steps: int, n: int, out: str | Path, prompt: str | None = None, seed: int = 0) -> Path:
    """``n`` samples of the distilled generator in ``run``, spread over the prompts (or one prompt)."""
    out = Path(out)
    if out.suffix not in (".csv", ".npy", ".safetensors"):  # checked before the work
        raise ValueError(f"out must end in .csv, .npy or .safetensors, got {out.name!r}")
    fn = load_generator(run)
    if steps != fn.plan.n_steps:
        raise ValueError(f"steps must be {fn.plan.n_steps}: the experts of {run} were distilled for "
                         f"{fn.plan.n_steps} steps, got {steps}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    data = ToyData()
    if prompt is None:
        cond = torch.arange(n) % data.n_prompts
    elif prompt in data.names:
        cond = torch.full((n,), data.names.index(prompt), dtype=torch.long)
    else:
        raise ValueError(f"prompt must be one of {data.names}, got {prompt!r}")
    z = torch.randn(n, data.dim, generator=torch.Generator().manual_seed(seed))
    x = fn(z, cond)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        rows = ["x,y,prompt"] + [f"{a:.6f},{b:.6f},{data.names[int(c)]}" for (a, b), c in zip(x.tolist(), cond)]
        out.write_text("\n".join(rows) + "\n")
    elif out.suffix == ".npy":
        import numpy as np

        np.save(out, torch.cat([x, cond[:, None].float()], 1).numpy())
    elif out.suffix == ".safetensors":
        from pdmd.runtime.checkpoint import save_tensors

        save_tensors(out, {"samples": x, "prompts": cond}, {"prompt_names": json.dumps(data.names)})
    return out
