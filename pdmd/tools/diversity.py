"""Diversity as the paper's Table 2 measures it: among the images of one prompt (8 seeds), the mean pairwise
cosine similarity of DINOv3 features (lower = more diverse) and the mean pairwise LPIPS distance (higher = more
diverse), each averaged over prompts.

Feature networks come from local files only:
- DINOv3: a transformers ``DINOv3ViTModel`` folder (its pooled CLS feature; resizing and normalisation from the
  folder's ``preprocessor_config.json``, done in torch so torchvision is not needed);
- LPIPS: the ``lpips`` package when it imports (it needs torchvision) and torchvision's AlexNet checkpoint is in
  the torch hub cache. Otherwise ``LPIPS`` below computes the same
  quantity: backbone features unit-normalised over channels, squared differences, per-layer 1x1 linear weights,
  spatial mean, sum over layers, on a pluggable backbone. ``alexnet_backbone`` is AlexNet's feature stack in
  plain torch with torchvision's parameter names (loads torchvision's ``alexnet-owt-*.pth``), and the linear
  weights load from the lpips package's ``weights/v0.1/alex.pth`` (found without importing the package) or a path.

Sample folder layout: ``DIR/<prompt>/<seed>.png`` for one method, or ``DIR/<method>/<prompt>/<seed>.png`` for a
table with one row per method.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pdmd.models._local import component_dir, read_json

__all__ = ["LPIPS", "alexnet_backbone", "load_lpips", "DinoFeatures", "load_dino", "mean_pairwise", "diversity_table",
           "read_samples", "format_table", "run", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ALEX_CHANNELS = (64, 192, 384, 256, 256)
ALEX_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))  # relu1 .. relu5 of torchvision's alexnet.features


class _Slices(nn.Module):
    """A sequential stack returning the output after each slice (the layers LPIPS compares)."""

    def __init__(self, features: nn.Sequential, slices):
        super().__init__()
        self.features, self.slices = features, slices

    def forward(self, x):
        outs = []
        for a, b in self.slices:
            for i in range(a, b):
                x = self.features[i](x)
            outs.append(x)
        return outs


def alexnet_backbone(weights: str | Path | None = None) -> nn.Module:
    """AlexNet's convolutional features (torchvision layout); ``weights``: torchvision's alexnet checkpoint."""
    f = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=False),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=False), nn.MaxPool2d(3, 2),
    )
    net = _Slices(f, ALEX_SLICES)
    if weights is not None:
        sd = torch.load(str(_existing(weights, "alexnet weights")), map_location="cpu", weights_only=True)
        feats = {k: v for k, v in sd.items() if k.startswith("features.")}
        if not feats:
            raise ValueError(f"alexnet weights: {str(weights)!r} has no 'features.*' tensors (torchvision's alexnet checkpoint)")
        net.load_state_dict(feats)
    return net.eval()


def _existing(path, what) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{what}: {str(p)!r} is not a file")
    return p


class LPIPS(nn.Module):
    """LPIPS distance (Zhang et al. 2018, v0.1) between images in [-1, 1], per pair, on any feature backbone."""

    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, backbone: nn.Module, channels: Sequence[int], lin_weights: Sequence[torch.Tensor] | None = None):
        super().__init__()
        self.backbone = backbone
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        if lin_weights is not None:
            if len(lin_weights) != len(channels):
                raise ValueError(f"lin_weights must have one tensor per layer ({len(channels)}), got {len(lin_weights)}")
            with torch.no_grad():
                for lin, w in zip(self.lins, lin_weights):
                    lin.weight.copy_(w.reshape(lin.weight.shape))
        self.register_buffer("shift", torch.tensor(self.SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(self.SCALE)[None, :, None, None])

    @staticmethod
    def _unit(f, eps=1e-10):
        return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.backbone((x - self.shift) / self.scale)
        fy = self.backbone((y - self.shift) / self.scale)
        return sum(lin((self._unit(a) - self._unit(b)) ** 2).mean((2, 3)) for lin, a, b in zip(self.lins, fx, fy))[:, 0]


def _lpips_package_file() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # finds the installed package without importing it (no torchvision needed)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "alex.pth"
    return path if path.is_file() else None


ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet checkpoint, as cached by torch.hub


def load_lpips(alexnet_weights=None, lin_weights=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """An LPIPS(alex) distance ``fn(x, y) -> [B]`` on images in [-1, 1], from local files only.

    ``alexnet_weights`` defaults to torchvision's cached checkpoint (``$TORCH_HOME/hub/checkpoints``). The lpips
    package runs when it imports and no ``alexnet_weights`` was given; otherwise the torch implementation above,
    with the package's linear weights (or ``lin_weights``).
    """
    cached = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if alexnet_weights is None:
        if not cached.is_file():
            raise ValueError(f"LPIPS: no AlexNet weights: pass alexnet_weights= (torchvision's {ALEXNET_FILE}, a local "
                             f"file) or place it at {str(cached)!r}")
        try:
            import lpips
        except ImportError:  # it imports torchvision, which may not install beside this torch build
            alexnet_weights = cached
        else:
            net = lpips.LPIPS(net="alex", verbose=False).eval()  # torchvision finds the cached file: no download
            return lambda x, y: net(x, y).flatten()
    lin_path = lin_weights or _lpips_package_file()
    if lin_path is None:
        raise ValueError("LPIPS: no linear-layer weights: install the lpips package (pip install --no-deps lpips) or pass lin_weights=")
    sd = torch.load(str(_existing(lin_path, "lpips linear weights")), map_location="cpu", weights_only=True)
    lins = [sd[f"lin{i}.model.1.weight"] for i in range(len(ALEX_CHANNELS))]
    return LPIPS(alexnet_backbone(alexnet_weights), ALEX_CHANNELS, lins).eval()


class DinoFeatures(nn.Module):
    """Pooled DINOv3 features of images in [0, 1], resized and normalised as the model's preprocessor says."""

    def __init__(self, model, size: int = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.model, self.size = model.eval(), size
        self.register_buffer("mean", torch.tensor(mean)[None, :, None, None])
        self.register_buffer("std", torch.tensor(std)[None, :, None, None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.model(pixel_values=(x - self.mean) / self.std).pooler_output


def load_dino(path) -> DinoFeatures:
    """DINOv3 (transformers ``DINOv3ViTModel``) from a local folder."""
    from transformers import DINOv3ViTModel

    folder = component_dir(path, None, "DINOv3 model")
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") != "dinov3_vit":
        raise ValueError(f"DINOv3 model: {str(folder)!r} holds a {cfg.get('model_type')!r} model, not dinov3_vit")
    pre = read_json(folder / "preprocessor_config.json") if (folder / "preprocessor_config.json").is_file() else {}
    size = pre.get("size", {}).get("height", 224) if isinstance(pre.get("size"), dict) else 224
    kw = {k: pre[v] for k, v in (("mean", "image_mean"), ("std", "image_std")) if v in pre}
    return DinoFeatures(DINOv3ViTModel.from_pretrained(str(folder), local_files_only=True), size=size, **kw)


def mean_pairwise(items: torch.Tensor, fn: Callable) -> float:
    """Mean of ``fn(a, b)`` over all unordered pairs of rows (fn takes batches of pairs)."""
    n = items.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images per prompt, got {n}")
    i, j = zip(*itertools.combinations(range(n), 2))
    return float(fn(items[list(i)], items[list(j)]).mean())


def _cosine(a, b):
    return F.cosine_similarity(a, b, dim=-1)


@torch.no_grad()
def prompt_scores(images: torch.Tensor, dino=None, lpips=None) -> dict:
    """DINOv3 mean pairwise cosine and LPIPS mean pairwise distance for one prompt's images [N, 3, H, W] in [0, 1]."""
    out = {}
    if dino is not None:
        out["dino_cosine"] = mean_pairwise(dino(images), _cosine)
    if lpips is not None:
        out["lpips"] = mean_pairwise(images * 2 - 1, lpips)
    return out


def read_samples(folder) -> dict[str, dict[str, torch.Tensor]]:
    """{method: {prompt: images [N, 3, H, W] in [0, 1]}} from ``DIR/<prompt>/*.png`` or ``DIR/<method>/<prompt>/*.png``."""
    import numpy as np
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"samples: {str(root)!r} is not a directory")

    def images_in(d: Path):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                for p in files]

    def prompts_in(d: Path):
        out = {}
        for sub in sorted(p for p in d.iterdir() if p.is_dir()):
            imgs = images_in(sub)
            if imgs:
                if len({tuple(i.shape) for i in imgs}) != 1:
                    raise ValueError(f"samples: images in {str(sub)!r} differ in size")
                out[sub.name] = torch.stack(imgs)
        return out

    direct = prompts_in(root)
    if direct:
        return {root.name: direct}
    methods = {m.name: prompts_in(m) for m in sorted(p for p in root.iterdir() if p.is_dir())}
    methods = {k: v for k, v in methods.items() if v}
    if not methods:
        raise ValueError(f"samples: no images under {str(root)!r} (expected DIR/<prompt>/<seed>.png or DIR/<method>/<prompt>/<seed>.png)")
    return methods


def diversity_table(samples: dict[str, dict[str, torch.Tensor]], dino=None, lpips=None) -> dict:
    """{method: {"dino_cosine", "lpips", "prompts", "per_prompt"}} averaged over prompts."""
    if dino is None and lpips is None:
        raise ValueError("give at least one of dino= and lpips=")
    table = {}
    for method, prompts in samples.items():
        per = {p: prompt_scores(imgs, dino, lpips) for p, imgs in prompts.items()}
        row = {k: sum(s[k] for s in per.values()) / len(per) for k in next(iter(per.values()))}
        table[method] = dict(row, prompts=len(per), per_prompt=per)
    return table


def format_table(table: dict) -> str:
    cols = [c for c in ("dino_cosine", "lpips") if any(c in r for r in table.values())]
    head = {"dino_cosine": "DINOv3 cosine (lower = more diverse)", "lpips": "LPIPS (higher = more diverse)"}
    lines = ["| method | prompts | " + " | ".join(head[c] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for m, r in table.items():
        lines.append(f"| {m} | {r['prompts']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def run(samples_dir, out=None, dino_path=None, alexnet_weights=None, lin_weights=None, no_lpips=False) -> dict:
    """Compute, print and write (``diversity.json``, ``diversity.md``) the table for a samples folder."""
    samples = read_samples(samples_dir)  # a wrong folder is refused before the models load
    dino = load_dino(dino_path) if dino_path else None
    lp = None if no_lpips else load_lpips(alexnet_weights, lin_weights)
    table = diversity_table(samples, dino, lp)
    out = Path(out or samples_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diversity.json").write_text(json.dumps(table, indent=2))
    (out / "diversity.md").write_text(format_table(table) + "\n")
    return table


def add_cli(sub) -> None:
    """``pdmd eval diversity --samples DIR``."""
    ev = sub.add_parser("eval", help="evaluate samples").add_subparsers(dest="eval_command", required=True)
    d = ev.add_parser("diversity", help="the paper's Table 2: DINOv3 cosine and LPIPS among seeds of each prompt")
    d.add_argument("--samples", required=True, help="DIR/<prompt>/<seed>.png or DIR/<method>/<prompt>/<seed>.png")
    d.add_argument("--out", help="where to write diversity.json and diversity.md (default: the samples folder)")
    d.add_argument("--dino", help="local DINOv3 model folder (transformers DINOv3ViTModel)")
    d.add_argument("--lpips-alexnet", help="torchvision alexnet checkpoint file, for pdmd's own LPIPS (else the lpips package)")
    d.add_argument("--lpips-lin", help="LPIPS linear weights file (default: the lpips package's weights/v0.1/alex.pth)")
    d.add_argument("--no-lpips", action="store_true", help="DINOv3 only")
    d.set_defaults(func=_cli)


def _cli(args) -> int:
    table = run(args.samples, args.out, args.dino, args.lpips_alexnet, args.lpips_lin, args.no_lpips)
    print(format_table(table))
    print(f"wrote {Path(args.out or args.samples) / 'diversity.json'} and diversity.md")
    return 0
