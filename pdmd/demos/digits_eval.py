"""The digits demo's data and evaluation: the 8x8 digits, the CNN classifier trained on them, its LPIPS, and the
Table-2 metrics, grids and table of samplers (``pdmd.demos.digits`` runs the demo)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pdmd.runtime.checkpoint import load_tensors, save_tensors
from pdmd.tools.diversity import LPIPS, diversity_table

__all__ = ["N_CLASSES", "SHAPE", "CONFIDENCE", "load_digits", "DigitsCNN", "heldout_digits", "class_scores",
           "load_or_train_classifier", "digits_lpips", "seed_noise", "seed_grid", "evaluate_samplers", "table_md",
           "plot_grids"]

N_CLASSES = 10
SHAPE = (1, 8, 8)
CONFIDENCE = 0.9  # a sample is "confident" when the classifier gives its requested class at least this probability


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, 8, 8] in [-1, 1], labels [1797]) from the file bundled with scikit-learn."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


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
