"""A model family is its folder ``pdmd/models/<family>/`` plus one line in ``pdmd/models/registry.py``: nothing
outside ``pdmd/models`` names a family in code, and every family folder is registered with a complete spec."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from pdmd.models import registry
from pdmd.models.spec import ModelSpec

PDMD = Path(__file__).resolve().parent.parent / "pdmd"

# Files outside pdmd/models allowed to name a family, and why. None of them branches on the family:
ALLOWED = {
    # the digits demo's teacher is a tiny Wan transformer by design (it shows the diffusers adapter path on a
    # dataset that ships with scikit-learn); it always uses that one class, whatever the config says
    "demos/digits.py",
}


def _words(identifier: str) -> set[str]:
    """snake_case and CamelCase parts, lower-cased: WanMoEDenoiser -> {wan, mo, e, denoiser}."""
    return {w.lower() for part in identifier.split("_") for w in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", part)}


def _family_names():
    stems, exact, classes = set(), set(), set()
    for folder in registry.FAMILIES:
        spec = importlib.import_module(f"pdmd.models.{folder}").SPEC
        stems.add(re.split(r"[-_.]", spec.name)[0].lower())
        exact.update({spec.name, folder, *spec.aliases})
        classes.update({spec.transformer_class, spec.pipeline_class, *spec.pipelines, *(c.__name__ for c in spec.denoisers)})
    return stems, exact, classes


def _docstrings(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def family_mentions(source: str) -> list[str]:
    """Where code (not comments, not docstrings) names a family: an identifier with a family's stem or class
    name, a string that is a family's name (``"wan"``, ``"qwen-image"``), or a string naming one of its classes.
    Prose in messages ("applies to Wan 2.2 A14B") is not code and passes."""
    stems, exact, classes = _family_names()
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.alias):
            names = [node.name.rsplit(".", 1)[-1], node.asname or ""]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = node.module.split(".")
        elif isinstance(node, ast.arg):
            names = [node.arg]
        for n in names:
            if n and (_words(n) & stems or any(c in n for c in classes)):
                found.append(f"line {node.lineno}: identifier {n!r}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value.strip() in exact or any(c in node.value for c in classes):
                found.append(f"line {node.lineno}: string {node.value!r}")
    return found


def test_nothing_outside_pdmd_models_names_a_family():
    offenders = {}
    for path in sorted(PDMD.rglob("*.py")):
        rel = path.relative_to(PDMD).as_posix()
        if rel.startswith("models/") or rel in ALLOWED:
            continue
        hits = family_mentions(path.read_text())
        if hits:
            offenders[rel] = hits
    assert not offenders, f"family branches outside pdmd/models (ask the family's ModelSpec instead): {offenders}"


@pytest.mark.parametrize("code", ['if kind == "wan":\n    pass\n', "from diffusers import QwenImagePipeline\n",
                                  "x = isinstance(m, WanMoEDenoiser)\n", 'cls = getattr(d, "StableDiffusion3Pipeline")\n',
                                  "def load_sd3():\n    pass\n"])
def test_the_check_sees_family_branches(code):
    assert family_mentions(code)


def test_the_check_lets_prose_and_spec_lookups_pass():
    code = ('"""Wan, Qwen-Image and SD3 docs."""\n# a comment on Wan 2.2\n'
            'raise ValueError("model.boundary_sigma applies to Wan 2.2 A14B only")\nspec = get_spec(kind)\n')
    assert family_mentions(code) == []


def test_every_family_folder_is_registered_with_a_complete_spec():
    folders = {p.parent.name for p in (PDMD / "models").glob("*/__init__.py")}
    assert folders == set(registry.FAMILIES)
    for kind, spec in registry.SPECS.items():
        assert isinstance(spec, ModelSpec) and spec.name == kind
        assert spec.lora_targets and spec.prompts.encoders and spec.timestep_scale > 0
        assert spec.prediction == "flow"  # every family so far; the trainer reads it from the denoiser
        for d in spec.denoisers:
            assert d.lora_targets == spec.lora_targets  # written once: the spec reads the adapter's
        assert registry.get_spec(kind) is spec and registry.spec_for_pipeline(spec.pipeline_class) is spec
        assert all(registry.spec_for_pipeline(p) is spec for p in spec.pipelines)
    with pytest.raises(ValueError, match="kind must be one of"):
        registry.get_spec("flux")
