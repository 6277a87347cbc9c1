"""The import graph keeps its layers (docs/architecture.md): a lower layer never imports a higher one, and
pdmd_kernels imports nothing of pdmd. Every ``import`` in the source counts, at module level or inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# layer -> the layers it may import (besides itself); the table of docs/architecture.md
ALLOWED = {
    "runtime": set(),
    "config": {"runtime", "models.registry"},  # model.kind and family-only fields are checked against the registry
    "core": {"runtime", "config"},
    "models": {"core", "runtime"},
    "pipeline": {"core", "runtime", "models", "config", "tools"},
    "tools": {"models", "runtime", "config"},
    "demos": {"core", "runtime", "models", "config", "pipeline", "tools"},
    "commands": {"core", "runtime", "models", "config", "pipeline", "tools", "demos"},
    "cli": {"commands", "config", "tools"},
    "package": {"core"},  # pdmd/__init__.py re-exports the math
}
CONFIG_MODULES = {"config", "config_check", "config_aliases", "yaml_io"}


def layer_of(module: str) -> str:
    """pdmd.core.trainer -> core; pdmd.config_check -> config; pdmd -> package."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    return "config" if parts[1] in CONFIG_MODULES else parts[1]


def imports(path: Path, module: str, root: Path):
    """Every pdmd module ``path`` imports (absolute; relative imports resolved against ``module``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            yield base
            if (root / base.replace(".", "/")).is_dir():  # "from pdmd.models import registry": a module by name
                yield from (f"{base}.{a.name}" for a in node.names)


def violations(root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / "pdmd").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        src = layer_of(module)
        for target in imports(path, module, root):
            if not (target == "pdmd" or target.startswith("pdmd.")):
                continue
            dst = layer_of(target)
            if dst == src or target == "pdmd":
                continue
            allowed = ALLOWED[src]
            if dst in allowed or any(target == a or target.startswith(a + ".") for a in
                                     (f"pdmd.{x}" for x in allowed if "." in x)):
                continue
            bad.append(f"{path.relative_to(root)}: {src} imports {target} ({dst})")
    return sorted(set(bad))


def test_no_module_imports_a_higher_layer():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a runtime module importing the trainer is reported."""
    (tmp_path / "pdmd" / "runtime").mkdir(parents=True)
    (tmp_path / "pdmd" / "runtime" / "x.py").write_text("def f():\n    from pdmd.core.trainer import PhasedDMDTrainer\n")
    (tmp_path / "pdmd" / "core").mkdir()
    (tmp_path / "pdmd" / "core" / "y.py").write_text("from ..pipeline import run\n")
    assert violations(tmp_path) == ["pdmd/core/y.py: core imports pdmd.pipeline (pipeline)",
                                    "pdmd/runtime/x.py: runtime imports pdmd.core.trainer (core)"]


def test_the_kernels_import_nothing_of_pdmd():
    for path in (ROOT / "kernels" / "pdmd_kernels").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n == "pdmd" or n.startswith("pdmd.") for n in names), path


def test_no_module_is_over_450_lines():
    """docs/architecture.md: a module is one responsibility; past ~450 lines it is two."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "pdmd").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}
