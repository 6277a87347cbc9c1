"""Loading diffusers/transformers components from local directories only, with clear errors.

Every loader here takes a directory on disk (a diffusers pipeline folder or one component's folder):
the model hub is never contacted (``local_files_only=True``; ``HF_HUB_OFFLINE`` is set to 1 unless the
user set it), so a typo in a path is a ValueError naming the path, not a download attempt.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def component_dir(path, subfolder: str | None, what: str, config_name: str = "config.json") -> Path:
    """The folder holding ``config_name`` for a component: ``path/subfolder`` of a pipeline, or ``path`` itself."""
    if path is None or str(path) == "":
        raise ValueError(f"{what}: path is empty")
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"{what}: path {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"{what}: path {str(root)!r} is not a directory")
    candidates = ([root / subfolder] if subfolder else []) + [root]
    for c in candidates:
        if (c / config_name).is_file():
            return c
    where = " or ".join(repr(str(c / config_name)) for c in candidates)
    raise ValueError(f"{what}: no {config_name} at {where}: {str(root)!r} holds no such model")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from e


def load_diffusers(cls, path, subfolder: str | None, what: str, **kwargs) -> Any:
    """``cls.from_pretrained`` on a local folder after checking the config names ``cls``."""
    folder = component_dir(path, subfolder, what)
    cfg = read_json(folder / "config.json")
    name = cfg.get("_class_name")
    if name != cls.__name__:
        raise ValueError(f"{what}: {str(folder)!r} holds a {name!r}, not a {cls.__name__}")
    return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)


def optional_json(path, *names: str) -> dict:
    """The first of ``path/name`` that exists, parsed; {} when none does."""
    root = Path(path)
    for n in names:
        if (root / n).is_file():
            return read_json(root / n)
    return {}


def dtype_kwargs(dtype) -> dict:
    """The from_pretrained keyword for a dtype: diffusers >= 0.42 calls it ``dtype`` (``torch_dtype`` before)."""
    if dtype is None:
        return {}
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype": dtype}
