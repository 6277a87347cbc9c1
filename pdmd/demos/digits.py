"""The embedded image demo: scikit-learn's 8x8 digits through the same diffusers adapter path as Wan.

- data: ``sklearn.datasets.load_digits`` (1797 images, 10 classes, a file shipped inside scikit-learn);
  pixels 0..16 scaled to [-1, 1], latents ``[B, 1, 8, 8]`` (one frame for the Wan adapter);
- teacher: a tiny diffusers ``WanTransformer3DModel`` wrapped in ``pdmd.models.WanDenoiser``; the class
  label is its "text": a learned table of one embedding token per class is ``encoder_hidden_states``,
  zeros are the null class (``DiffusersDenoiser.null_cond``) for CFG; trained by flow matching with
  ``teacher.cond_dropout`` null labels. After training the table is frozen, as a prompt cache is;
- distillation: ``PhasedDMDTrainer`` with ``DigitsTask`` (conditions = class embeddings);
- evaluation: a small CNN classifier trained here on the digits gives (a) class accuracy of the samples,
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
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pdmd.runtime.checkpoint import load_tensors, save_tensors
from pdmd.config import RunConfig, updated
from pdmd.tools.diversity import LPIPS, diversity_table
from pdmd.demos.evaluate import over_seeds
from pdmd.core.objectives import full_interval_target
from pdmd.core.sampler import sample_few_step
from pdmd.demos.toy import sample_teacher
from pdmd.runtime.rundir import candidates, clean_temps, hold
from pdmd.core.trainer import CHECKPOINT, PhasedDMDTrainer, resume_point
from pdmd.pipeline.run import train
from pdmd.runtime.parallel import Parallel

__all__ = ["load_digits", "DigitsTask", "build_teacher", "load_or_train_teacher", "DigitsCNN", "load_or_train_classifier",
           "evaluate_samplers", "distill_digits", "compare_digits", "COMPARE_METHODS", "CONFIDENCE"]

N_CLASSES = 10
TEXT_DIM = 16
SHAPE = (1, 8, 8)
COMPARE_METHODS = ("dmd", "dmd_sgts", "phased_sgts")
CONFIDENCE = 0.9  # a sample is "confident" when the classifier gives its requested class at least this probability
LABELS = {"teacher": "Teacher ({steps} steps, CFG {cfg})", "dmd": "DMD", "dmd_sgts": "DMD with SGTS",
          "phased": "Phased DMD (1 phase per step)", "phased_sgts": "Phased DMD ({phases} phases, SGTS)",
          "data": "Data (real digits)"}


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, 8, 8] in [-1, 1], labels [1797]) from the file bundled with scikit-learn."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


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


# ---------------------------------------------------------------------- feature network
class DigitsCNN(nn.Module):
    """Small classifier on 8x8 digits in [-1, 1] (1 or 3 channels: RGB is averaged to grey).

    ``forward`` returns its three conv stages (the LPIPS backbone); ``features`` the pooled penultimate
    features (the DINOv3 column's analogue); ``logits`` the class scores.
    """

    CHANNELS = (16, 32, 32)

    def __init__(self):
        super().__init__()
        c1, c2, c3 = self.CHANNELS
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(1, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1), nn.Conv2d(c2, c3, 3, padding=1)
        self.head = nn.Linear(c3, N_CLASSES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h1 = F.relu(self.conv1(x.mean(1, keepdim=True)))
        h2 = F.relu(self.conv2(h1))
        h3 = F.relu(self.conv3(F.max_pool2d(h2, 2)))
        return [h1, h2, h3]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[-1].mean((2, 3))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _split(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's 80 / 20 train / held-out split of the ``n`` digits (the first draw of ``gen``)."""
    perm = torch.randperm(n, generator=gen)
    return perm[:int(0.8 * n)], perm[int(0.8 * n):]


def heldout_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The real digits the classifier of ``seed`` was not trained on: the data row's accuracy and confidence."""
    x, y = load_digits()
    _, te = _split(x.shape[0], torch.Generator().manual_seed(seed))
    return x[te], y[te]


def class_scores(net: "DigitsCNN", x: torch.Tensor, labels: torch.Tensor) -> dict:
    """Class accuracy and the confident share: argmax == label, and p(label | x) >= CONFIDENCE."""
    p = torch.cat([net.logits(x[a:a + 1000]).softmax(1) for a in range(0, x.shape[0], 1000)])
    return {"accuracy": float((p.argmax(1) == labels).double().mean()),
            "confident": float((p.gather(1, labels[:, None])[:, 0] >= CONFIDENCE).double().mean())}


def load_or_train_classifier(run_dir: str | Path, seed: int = 0, steps: int = 600) -> tuple[DigitsCNN, float]:
    """(classifier, held-out accuracy), trained on 80 % of the digits (1-pixel random shifts) and cached."""
    path = Path(run_dir) / "classifier.safetensors"
    meta = {"seed": str(seed), "steps": str(steps)}
    if path.exists():
        tensors, stored = load_tensors(path)
        if {k: stored.get(k) for k in meta} == meta:
            net = DigitsCNN()
            net.load_state_dict(tensors)
            return net.eval().requires_grad_(False), float(stored["test_accuracy"])
    x, y = load_digits()
    gen = torch.Generator().manual_seed(seed)
    tr, te = _split(x.shape[0], gen)
    n_train = tr.numel()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = tr[torch.randint(0, n_train, (128,), generator=gen)]
        dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
        xb = torch.roll(x[idx], (dx, dy), (2, 3))
        loss = F.cross_entropy(net.logits(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    acc = float((net.logits(x[te]).argmax(1) == y[te]).float().mean())
    save_tensors(path, net.state_dict(), {**meta, "test_accuracy": str(acc)})
    return net, acc


def digits_lpips(net: DigitsCNN) -> LPIPS:
    """LPIPS on the classifier's stages: unit-normalised channels, squared differences summed over channels
    (lpips' baseline without learned weights), spatial mean, summed over stages; images in [-1, 1]."""
    lp = LPIPS(net, DigitsCNN.CHANNELS, [torch.ones(c) for c in DigitsCNN.CHANNELS])
    with torch.no_grad():  # no ImageNet normalisation: the classifier was trained on [-1, 1] digits
        lp.shift.zero_()
        lp.scale.fill_(1.0)
    return lp.eval().requires_grad_(False)


# ---------------------------------------------------------------------- sampling and evaluation
def seed_noise(seeds) -> torch.Tensor:
    """One latent per seed; seed s gives the same latent to every sampler (as a paper's seed does)."""
    return torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def teacher_sampler(teacher, task: DigitsTask, t_cfg):
    return lambda z, labels: sample_teacher(teacher, z, task.cond(labels), t_cfg.sample_steps, t_cfg.guidance_scale)


def generator_sampler(trainer: PhasedDMDTrainer, task: DigitsTask):
    return lambda z, labels: sample_few_step(trainer.experts, trainer.plan, z, task.cond(labels))


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] latents -> [0, 1] RGB images, as ``pdmd.tools.diversity`` takes them."""
    return ((x.clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)


@torch.no_grad()
def seed_grid(fn, seeds) -> torch.Tensor:
    """[classes, seeds, 1, 8, 8] samples in [-1, 1]: one row per class, the same seeds in every row."""
    z = seed_noise(seeds)
    return torch.stack([fn(z, torch.full((len(seeds),), k, dtype=torch.long)).clamp(-1, 1) for k in range(N_CLASSES)])


@torch.no_grad()
def evaluate_samplers(fns: dict, net: DigitsCNN, eval_cfg, seed: int = 0, heldout=None) -> dict:
    """Per sampler: class accuracy and confident share (by ``net``), feature cosine and LPIPS among
    ``diversity_seeds`` seeds per class (``diversity_groups`` groups of seeds, averaged over groups and classes),
    and the real digits' row (accuracy and confident share on ``heldout`` = (images, labels) when given)."""
    lp, feats = digits_lpips(net), (lambda im: net.features(im * 2 - 1))
    n_seeds, groups = eval_cfg.diversity_seeds, eval_cfg.diversity_groups
    samples = {}
    for name, fn in fns.items():
        grids = seed_grid(fn, range(n_seeds * groups)).reshape(N_CLASSES, groups, n_seeds, *SHAPE)
        samples[name] = {f"{k}/{g}": _to_unit(grids[k, g]) for k in range(N_CLASSES) for g in range(groups)}
    x, y = load_digits()
    gen = torch.Generator().manual_seed(seed + 7)
    real = {}
    for k in range(N_CLASSES):
        pool = x[y == k]
        idx = torch.randperm(pool.shape[0], generator=gen)[:n_seeds * groups]
        for g in range(min(groups, idx.numel() // n_seeds)):
            real[f"{k}/{g}"] = _to_unit(pool[idx[g * n_seeds:(g + 1) * n_seeds]])
    samples["data"] = real
    table = diversity_table(samples, dino=feats, lpips=lp)
    n = eval_cfg.samples_per_prompt
    out = {}
    for name, row in table.items():
        out[name] = {"feature_cosine": row["dino_cosine"], "lpips": row["lpips"], "groups": row["prompts"]}
        if name == "data":
            if heldout is not None:
                out[name].update(class_scores(net, *heldout))
            continue
        z = torch.randn((n * N_CLASSES, *SHAPE), generator=torch.Generator().manual_seed(seed + 1))
        labels = torch.arange(N_CLASSES).repeat_interleave(n)
        x = torch.cat([fns[name](z[a:a + 1000], labels[a:a + 1000]) for a in range(0, z.shape[0], 1000)])
        out[name].update(class_scores(net, x, labels))
    return out


def _fmt(v, fmt: str) -> str:
    """A number, or a ``{"mean", "std"}`` summary over seeds as "mean ± std"."""
    return f"{format(v['mean'], fmt)} ± {format(v['std'], fmt)}" if isinstance(v, dict) else format(v, fmt)


def table_md(rows: dict, labels: dict, classifier_acc: float, eval_cfg) -> str:
    """The Table-2 rows; each metric a number (one run) or a {"mean", "std"} summary over seeds."""
    head = ["| sampler | class accuracy | confident (p >= 0.9) | feature cosine (lower = more diverse) | "
            "LPIPS-CNN (higher = more diverse) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        acc = _fmt(r["accuracy"], ".3f") if "accuracy" in r else f"{classifier_acc:.3f} (held-out)"
        conf = _fmt(r["confident"], ".3f") if "confident" in r else "-"
        head.append(f"| {labels.get(name, name)} | {acc} | {conf} | {_fmt(r['feature_cosine'], '.4f')} | "
                    f"{_fmt(r['lpips'], '.4f')} |")
    note = (f"Diversity: mean over pairs of {eval_cfg.diversity_seeds} seeds of one class, averaged over "
            f"{eval_cfg.diversity_groups} seed group(s) and the 10 classes (the paper's Table 2 protocol, with a CNN "
            f"classifier trained on the digits in place of DINOv3 and of LPIPS' AlexNet). Class accuracy: the "
            f"classifier's agreement with the requested class on {eval_cfg.samples_per_prompt} samples per class; "
            f"confident: the share it gives the requested class probability >= {CONFIDENCE} (the digits' precision: "
            f"blurred or in-between digits raise diversity and lower it). Data: the classifier's held-out digits.")
    return "\n".join(head) + "\n\n" + note + "\n"


def plot_grids(path: Path, grids: dict[str, torch.Tensor]) -> None:
    """Fig.-3-style: one panel per sampler, a row per class, a column per seed (the same seeds everywhere)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(2.9 * len(grids), 3.9), squeeze=False)
    for ax, (name, g) in zip(axes[0], grids.items()):
        c, s = g.shape[:2]
        cells = F.pad(g[:, :, 0], (1, 1, 1, 1), value=-1.0)  # a blank pixel around each digit
        img = cells.permute(0, 2, 1, 3).reshape(c * 10, s * 10)  # rows = classes, columns = seeds
        ax.imshow(img.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
