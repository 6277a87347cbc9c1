"""The one list of model families: a family is its folder ``pdmd/models/<family>/`` (which defines ``SPEC``)
plus one line below. Everything else finds the family's knowledge through these look-ups."""
from __future__ import annotations

import importlib

from pdmd.models.spec import ModelSpec

__all__ = ["FAMILIES", "SPECS", "KINDS", "get_spec", "spec_of", "spec_for_pipeline"]

FAMILIES = (
    "wan",
    "qwen_image",
    "sd3",
)

SPECS: dict[str, ModelSpec] = {s.name: s for s in (importlib.import_module(f"pdmd.models.{f}").SPEC for f in FAMILIES)}
KINDS = tuple(SPECS)
_ALIASES = {a: s for s in SPECS.values() for a in s.aliases}


def get_spec(kind: str, field: str = "kind") -> ModelSpec:
    """The spec of ``kind`` (a ``model.kind``, or an alias); ValueError naming ``field`` otherwise."""
    spec = SPECS.get(kind) or _ALIASES.get(kind)
    if spec is None:
        raise ValueError(f"{field} must be one of {KINDS}, got {kind!r}")
    return spec


def spec_of(model) -> ModelSpec:
    """The spec of a denoiser (an instance of one of a family's adapter classes)."""
    for spec in SPECS.values():
        if isinstance(model, spec.denoisers):
            return spec
    raise ValueError(f"model must be a pdmd.models adapter ({', '.join(s.title for s in SPECS.values())}), "
                     f"got {type(model).__name__}")


def spec_for_pipeline(name: str) -> ModelSpec:
    """The spec whose diffusers pipeline class is ``name`` (an export manifest's ``pipeline``)."""
    for spec in SPECS.values():
        if name == spec.pipeline_class or name in spec.pipelines:
            return spec
    raise ValueError(f"pipeline {name!r} is not the pipeline of a known family ({KINDS})")
