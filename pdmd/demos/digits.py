"""The embedded image demo: scikit-learn's 8x8 digits through the same diffusers adapter path as Wan.

- data: ``sklearn.datasets.load_digits`` (1797 images, 10 classes, a file shipped inside scikit-learn);
  pixels 0..16 scaled to [-1, 1], latents ``[B, 1, 8, 8]`` (one frame for the Wan adapter);
- teacher: a tiny diffusers ``WanTransformer3DModel`` wrapped in ``pdmd.models.WanDenoiser``; the class
  label is its "text": a learned table of one embedding token per class is ``encoder_hidden_states``,
  zeros are the null class (``DiffusersDenoiser.null_cond``) for CFG; trained by flow matching with
  ``teacher.cond_dropout`` null labels. After training the table is frozen, as a prompt cache is;
- distillation: ``PhasedDMDTrainer`` with ``DigitsTask`` (conditions = class embeddings);
- evaluation (``pdmd.demos.digits_eval``): a small CNN classifier trained here on the digits gives (a) class accuracy of the samples,
  (b) the paper's Table 2 on digits: mean pairwise cosine of its penultimate features (the DINOv3 column)
  and an LPIPS distance on its conv stages (``pdmd.tools.diversity.LPIPS`` with this backbone, unit channel
  weights as lpips' un-learned baseline), among 8 seeds per class, averaged over classes and seed groups;
  (c) "confident": the share of samples the classifier gives the requested class with probability >= 0.9,
  the digits' precision: blurred or in-between digits raise the pairwise distances without being diverse
  in any useful sense, and the classifier is unsure of them;
- pictures: Fig.-3-style grids, one panel per sampler, a row per class, a column per seed (same seeds).

``pdmd distill`` with ``task: digits`` runs teacher + ``distill.method``; ``pdmd compare`` runs the teacher
and DMD, DMD with SGTS, Phased DMD with SGTS with the same budget, and writes the four-panel grid; with
``--seeds`` once per distillation seed (teacher and classifier of the config's seed), as mean ± std.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pdmd.runtime.checkpoint import load_tensors, save_tensors
from pdmd.config import RunConfig, updated
from pdmd.demos.evaluate import over_seeds
from pdmd.core.objectives import full_interval_target
from pdmd.core.sampler import sample_few_step
from pdmd.demos.toy import sample_teacher
from pdmd.runtime.rundir import candidates, clean_temps, hold
from pdmd.core.trainer import CHECKPOINT, PhasedDMDTrainer, resume_point
from pdmd.pipeline.run import train
from pdmd.runtime.parallel import Parallel
from pdmd.demos.digits_eval import (CONFIDENCE, N_CLASSES, SHAPE, DigitsCNN, class_scores, digits_lpips,  # noqa: F401
                                    evaluate_samplers, heldout_digits, load_digits, load_or_train_classifier,
                                    plot_grids, seed_grid, seed_noise, table_md)

__all__ = ["load_digits", "DigitsTask", "build_teacher", "load_or_train_teacher", "DigitsCNN", "load_or_train_classifier",
           "evaluate_samplers", "distill_digits", "compare_digits", "COMPARE_METHODS", "CONFIDENCE"]

TEXT_DIM = 16
COMPARE_METHODS = ("dmd", "dmd_sgts", "phased_sgts")
LABELS = {"teacher": "Teacher ({steps} steps, CFG {cfg})", "dmd": "DMD", "dmd_sgts": "DMD with SGTS",
          "phased": "Phased DMD (1 phase per step)", "phased_sgts": "Phased DMD ({phases} phases, SGTS)",
          "data": "Data (real digits)"}


# ---------------------------------------------------------------------- teacher
def build_teacher(t_cfg) -> tuple[nn.Module, nn.Embedding]:
    """(WanDenoiser around a tiny WanTransformer3DModel, class embedding table); ``teacher.width`` is the
    transformer's width (heads of 16), ``teacher.depth`` its blocks, ``teacher.shift`` the flow shift."""
    from diffusers import WanTransformer3DModel

    from pdmd.models import WanDenoiser

    if t_cfg.width % 16:
        raise ValueError(f"teacher.width must be a multiple of 16 for the digits teacher (heads of 16), got {t_cfg.width}")
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=t_cfg.width // 16, attention_head_dim=16,
                               in_channels=1, out_channels=1, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=2 * t_cfg.width,
                               num_layers=t_cfg.depth, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                               rope_max_seq_len=32)
    return WanDenoiser(tr, t_cfg.shift), nn.Embedding(N_CLASSES, TEXT_DIM)


def _encode(embed: nn.Embedding, labels: torch.Tensor) -> torch.Tensor:
    """Class labels -> one "text" token each, ``[B, 1, TEXT_DIM]``."""
    return embed(labels)[:, None, :]


def train_teacher(t_cfg, seed: int = 0, progress: bool = True) -> tuple[nn.Module, nn.Embedding]:
    """Flow matching (Eq. 4) on the digits; ``cond_dropout`` of the labels replaced by the null (zero) embedding."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, embed = build_teacher(t_cfg)
    x_all, y_all = load_digits()
    params = list(model.parameters()) + list(embed.parameters())
    opt = torch.optim.AdamW(params, lr=t_cfg.lr, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, t_cfg.steps)
    model.train()
    for _ in tqdm(range(t_cfg.steps), desc="digits teacher", disable=not progress, dynamic_ncols=True, mininterval=1.0):
        idx = torch.randint(0, x_all.shape[0], (t_cfg.batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(t_cfg.batch_size, generator=gen).clamp_min(1e-3)
        x_t, target = full_interval_target(x0, noise, t, model.schedule)
        cond = _encode(embed, y)
        drop = (torch.rand(t_cfg.batch_size, generator=gen) < t_cfg.cond_dropout)[:, None, None]
        loss = ((model(x_t, t, torch.where(drop, model.null_cond(cond), cond)) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
    return model.eval().requires_grad_(False), embed.eval().requires_grad_(False)


def load_or_train_teacher(run_dir: str | Path, t_cfg, seed: int = 0, progress: bool = True):
    """(teacher, embedding table, seconds spent training) cached at ``run_dir/teacher.safetensors``."""
    path = Path(run_dir) / "teacher.safetensors"
    keys = ("width", "depth", "steps", "batch_size", "lr", "cond_dropout", "shift")
    meta = {**{k: str(getattr(t_cfg, k)) for k in keys}, "task": "digits", "seed": str(seed)}
    if path.exists():
        tensors, stored = load_tensors(path)
        if {k: stored.get(k) for k in meta} == meta:
            model, embed = build_teacher(t_cfg)
            model.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("teacher.")})
            embed.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("embed.")})
            return model.eval().requires_grad_(False), embed.eval().requires_grad_(False), 0.0
    start = time.time()
    model, embed = train_teacher(t_cfg, seed, progress)
    tensors = {**{f"teacher.{k}": v for k, v in model.state_dict().items()},
               **{f"embed.{k}": v for k, v in embed.state_dict().items()}}
    save_tensors(path, tensors, meta)
    return model, embed, time.time() - start


class DigitsTask:
    """The trainer's condition source: uniformly drawn classes as their (frozen) embeddings."""

    latent_shape = SHAPE

    def __init__(self, embed: nn.Embedding):
        self.table = embed.weight.detach().clone()

    def cond(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels][:, None, :]

    def sample_cond(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.cond(torch.randint(0, N_CLASSES, (n,), generator=generator))


def teacher_sampler(teacher, task: DigitsTask, t_cfg):
    return lambda z, labels: sample_teacher(teacher, z, task.cond(labels), t_cfg.sample_steps, t_cfg.guidance_scale)


def generator_sampler(trainer: PhasedDMDTrainer, task: DigitsTask):
    return lambda z, labels: sample_few_step(trainer.experts, trainer.plan, z, task.cond(labels))



# ---------------------------------------------------------------------- runs
def _label(name: str, cfg: RunConfig) -> str:
    t = cfg.teacher
    return LABELS[name].format(steps=t.sample_steps, cfg=t.guidance_scale, phases=len(cfg.distill.phase_boundaries) + 1)


def _train_method(cfg: RunConfig, root: Path, out: Path, progress: bool, ckpt: Path | None):
    """Distil a fresh copy of the cached teacher (the trainer wraps it in place) into ``out``, continuing from
    ``ckpt`` (checked by ``resume_point``) if given."""
    teacher, embed, _ = load_or_train_teacher(root, cfg.teacher, cfg.teacher_seed, progress=False)
    task = DigitsTask(embed)
    trainer, seconds = train(cfg, teacher, task, out, ckpt, progress, Parallel())  # pdmd.pipeline.run's
    trainer.export_experts(out / "experts.safetensors")
    return trainer, task, seconds


def _run(cfg: RunConfig, out, methods, progress: bool, resume: bool, root=None) -> dict:
    """Teacher and classifier (cached in ``root``, default ``out``; both of the teacher's seed, so they stay
    fixed across distillation seeds), each method, the evaluation, grid and table in ``out``."""
    with hold(out):  # the lock on --out for the whole run; temp files of a crash removed
        return _run_locked(cfg, Path(out), methods, progress, resume, Path(root or out))


def _run_locked(cfg: RunConfig, out: Path, methods, progress: bool, resume: bool, root: Path) -> dict:
    cfgs, subs, ckpts = {}, {}, {}
    for m in methods:  # every check before any work: the cached teacher is untouched by a refused resume
        cfgs[m] = updated(cfg, {"distill.method": m})
        subs[m] = out if len(methods) == 1 else out / m
        if subs[m] != out and subs[m].is_dir():
            clean_temps(subs[m])
        ckpts[m] = resume_point(cfgs[m], subs[m], resume or (len(methods) > 1 and bool(candidates(subs[m] / CHECKPOINT))))
    torch.manual_seed(cfg.seed)
    start = time.time()
    teacher, embed, teacher_s = load_or_train_teacher(root, cfg.teacher, cfg.teacher_seed, progress)
    net, clf_acc = load_or_train_classifier(root, cfg.teacher_seed)
    task = DigitsTask(embed)
    fns = {"teacher": teacher_sampler(teacher, task, cfg.teacher)}
    seeds = range(cfg.eval.diversity_seeds)
    grids = {"teacher": seed_grid(fns["teacher"], seeds)}
    seconds = {"teacher_training": round(teacher_s, 1)}
    for m in methods:
        trainer, mtask, secs = _train_method(cfgs[m], root, subs[m], progress, ckpts[m])
        fns[m] = generator_sampler(trainer, mtask)
        grids[m] = seed_grid(fns[m], seeds)
        seconds[m] = round(secs, 1)
    t0 = time.time()
    rows = evaluate_samplers(fns, net, cfg.eval, cfg.seed, heldout_digits(cfg.teacher_seed))
    seconds["evaluation"] = round(time.time() - t0, 1)
    labels = {name: _label(name, cfg) for name in ("teacher", "data", *methods)}
    plot_grids(out / "grid.png", {labels[k]: g for k, g in grids.items()})
    torch.save({k: g for k, g in grids.items()}, out / "grids.pt")
    seconds["total"] = round(time.time() - start, 1)
    result = {"task": "digits", "methods": list(methods), "steps": len(cfg.distill.timesteps) - 1,
              "rows": {labels[k]: v for k, v in rows.items()}, "classifier_test_accuracy": clf_acc,
              "seconds": seconds, "threads": torch.get_num_threads(), "config": cfg.to_dict()}
    (out / "diversity.json").write_text(json.dumps(result, indent=2))
    md = [f"# pdmd digits: {', '.join(labels[m] for m in methods)} vs the teacher", "",
          f"{len(cfg.distill.timesteps) - 1}-step generators, {cfg.distill.max_steps} generator updates each, "
          f"batch {cfg.distill.batch_size}, {cfg.distill.fake_updates_per_generator_update} fake updates per generator update; "
          f"grids in `grid.png` (rows: classes 0-9, columns: seeds 0-{cfg.eval.diversity_seeds - 1}).", "",
          table_md(rows, labels, clf_acc, cfg.eval),
          f"Time (s): {json.dumps(seconds)}"]
    (out / "diversity.md").write_text("\n".join(md) + "\n")
    return result


def distill_digits(cfg: RunConfig, out, resume: bool = False, progress: bool = True) -> dict:
    """``pdmd distill`` on digits: teacher, ``distill.method``, grid and diversity table in ``out``."""
    return _run(cfg, out, (cfg.distill.method,), progress, resume)


def compare_digits(cfg: RunConfig, out, progress: bool = True, methods=COMPARE_METHODS, seeds=None) -> dict:
    """``pdmd compare`` on digits: teacher, DMD, DMD with SGTS, Phased DMD with SGTS (same budget and seeds).

    One distillation seed (default: the config's) runs in ``out`` itself; several run each in
    ``out/seed_<s>`` with the teacher and classifier of the config's seed cached in ``out``, and ``out``'s
    diversity.md/.json hold every metric's mean and sample std over seeds (min, max, values in the json).
    A seed whose diversity.json matches its config is reused: the same command resumes an interrupted run.
    """
    out = Path(out)
    seeds = [cfg.seed] if seeds is None else [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name distinct seeds, got {seeds}")
    if len(seeds) == 1 and seeds[0] == cfg.seed:
        return _run(cfg, out, tuple(methods), progress, resume=False)
    with hold(out):  # the seeds' own runs lock out/seed_<s>
        return _compare_seeds(cfg, out, methods, progress, seeds)


def _compare_seeds(cfg: RunConfig, out: Path, methods, progress: bool, seeds: list[int]) -> dict:
    start = time.time()
    per_seed = {}
    for s in seeds:
        scfg = updated(cfg, {"seed": s, "teacher.seed": cfg.teacher_seed})
        sub = out / f"seed_{s}"
        done = sub / "diversity.json"
        r = json.loads(done.read_text()) if done.exists() else None
        if r is None or r["config"] != json.loads(json.dumps(scfg.to_dict())) or r["methods"] != list(methods):
            r = _run(scfg, sub, tuple(methods), progress, resume=False, root=out)
        per_seed[s] = r
    rows = over_seeds([r["rows"] for r in per_seed.values()])
    _, clf_acc = load_or_train_classifier(out, cfg.teacher_seed)
    first = per_seed[seeds[0]]
    result = {"task": "digits", "methods": list(methods), "steps": first["steps"], "seeds": seeds,
              "teacher_seed": cfg.teacher_seed,
              "spread": "mean and sample std (n - 1) over seeds; min, max and the per-seed values alongside",
              "rows": rows, "per_seed": {str(s): r["rows"] for s, r in per_seed.items()},
              "classifier_test_accuracy": clf_acc,
              "seconds": {"per_seed": {str(s): r["seconds"] for s, r in per_seed.items()},
                          "total": round(time.time() - start, 1)},
              "threads": torch.get_num_threads(), "config": cfg.to_dict()}
    (out / "diversity.json").write_text(json.dumps(result, indent=2))
    shutil.copyfile(out / f"seed_{seeds[0]}" / "grid.png", out / "grid.png")
    d = cfg.distill
    md = [f"# pdmd digits: {', '.join(_label(m, cfg) for m in methods)} vs the teacher, {len(seeds)} seeds", "",
          f"{len(d.timesteps) - 1}-step generators, {d.max_steps} generator updates each, batch {d.batch_size}, "
          f"{d.fake_updates_per_generator_update} fake updates per generator update. Seeds {seeds} (distillation and evaluation noise; "
          f"teacher and classifier of seed {cfg.teacher_seed}); each cell is mean ± sample std over the seeds, "
          f"per-seed tables in `seed_<s>/diversity.md`. `grid.png`: seed {seeds[0]}'s grids.", "",
          table_md(rows, {}, clf_acc, cfg.eval)]
    (out / "diversity.md").write_text("\n".join(md) + "\n")
    return result
