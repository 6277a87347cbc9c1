"""Reading a ``RunConfig``: from a dict (``from_dict``), a YAML file with ``--set`` overrides (``load_config``).

Every error is one ``ConfigError`` naming the file, the line and the field as the user wrote it there (an
override: ``--set section.field=value`` in place of the file and line).

Old names are read for one release (``RENAMED``, ``CONVERTED``): the value moves to the new field and a
``ConfigWarning`` names it. A mistake in a value given under an old name is reported under that name (it is the
one on that line), followed by the new name. Giving both the old and the new name is refused.
"""
from __future__ import annotations

import copy
import difflib
import warnings

from pydantic import BaseModel, ValidationError

from pdmd.config import ConfigError, ConfigWarning, RunConfig
from pdmd.yaml_io import ConfigLoader, line_of, load_yaml

__all__ = ["RENAMED", "CONVERTED", "from_dict", "load_config", "updated", "apply_overrides"]

# old name -> new name, same value (the toy's distill-only vocabulary before the one schema)
RENAMED = {
    "distill.lr_generator": "generator.lr", "distill.lr_fake": "fake.lr",
    "distill.fake_updates": "distill.fake_updates_per_generator_update",
    "distill.betas": "generator.betas", "distill.weight_decay": "generator.weight_decay",
    "distill.optimizer_generator": "generator.optimizer", "distill.optimizer_fake": "fake.optimizer",
    "distill.lora_rank": "generator.lora_rank", "distill.lora_alpha": "generator.lora_alpha",
    "distill.fake_kind": "fake.kind", "distill.fake_lora_rank": "fake.lora_rank", "distill.fake_dtype": "fake.dtype",
}


def _bool_to(old: str, yes, no):
    def convert(v):
        if not isinstance(v, bool):
            raise ConfigError(f"{old} must be true or false, got {v!r}", old)
        return yes if v else no
    return convert


def _steps(v):
    if not isinstance(v, list):
        raise ConfigError(f"distill.steps must be a list, got {type(v).__name__}", "distill.steps")
    return [*v, 0.0]


# old name -> (new name, value conversion, how) (the real-model vocabulary before the one schema)
CONVERTED = {
    "distill.steps": ("distill.timesteps", _steps, "the same times followed by 0.0"),
    "distill.sgts": ("distill.method", _bool_to("distill.sgts", "phased_sgts", "phased"),
                     "true: phased_sgts, false: phased"),
    "fake.full_parameters": ("fake.kind", _bool_to("fake.full_parameters", "full", "lora"), "true: full, false: lora"),
}
_OLD = {**{k: (v, None, None) for k, v in RENAMED.items()}, **CONVERTED}

_MESSAGES = {  # pydantic error type -> the house message (after the field's name)
    "int_type": "must be an integer, got {input!r}", "int_parsing": "must be an integer, got {input!r}",
    "int_from_float": "must be an integer, got {input!r}", "float_type": "must be a finite number, got {input!r}",
    "float_parsing": "must be a finite number, got {input!r}", "finite_number": "must be a finite number, got {input!r}",
    "bool_type": "must be true or false, got {input!r}", "bool_parsing": "must be true or false, got {input!r}",
    "string_type": "must be a string, got {input!r}", "list_type": "must be a list, got {kind}",
    "model_type": "must be a mapping, got {kind}", "dict_type": "must be a mapping, got {kind}",
    "model_attributes_type": "must be a mapping, got {kind}", "missing": "is required",
}


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _section(name: str):
    """The schema class of the section ``name`` ("" for the top level)."""
    if not name:
        return RunConfig
    ann = RunConfig.model_fields[name].annotation
    return next(a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel))


def _unknown(section: str, key: str) -> ConfigError:
    known = sorted(_section(section).model_fields)
    old = sorted(o.split(".")[1] for o in _OLD if o.startswith(f"{section}.")) if section else []
    near = difflib.get_close_matches(str(key), known + old, 1)
    hint = ""
    if near:
        new = _OLD.get(f"{section}.{near[0]}", (None,))[0]
        hint = f"; did you mean {near[0]!r}" + (f" (now {new})?" if new else "?")
    full = f"{section}.{key}" if section else str(key)
    prefix = f"{section}." if section else ""
    return ConfigError(f"unknown config field {full!r}: {prefix}{key!r} is not a field of "
                       f"{section or 'the config'}{hint} (known: {known})", full)


def _from_pydantic(err: ValidationError) -> ConfigError:
    e = err.errors()[0]
    name = _dotted(e["loc"])
    if e["type"] == "extra_forbidden":
        section, _, key = name.rpartition(".")
        return _unknown(section, key)
    if e["type"] == "value_error":
        text = str(e["ctx"]["error"])
    else:
        text = _MESSAGES.get(e["type"], e["msg"]).format(input=e.get("input"), kind=type(e.get("input")).__name__)
    return ConfigError(f"{name} {text}", name)


def _migrate(data: dict) -> tuple[dict, dict[str, str], list[str]]:
    """``data`` with old names moved to the new fields; {new: old} for each moved one; the warnings to give."""
    data, moved, notes = copy.deepcopy(data), {}, []
    for old, (new, convert, how) in _OLD.items():
        osec, okey = old.split(".")
        sec = data.get(osec)
        if not isinstance(sec, dict) or okey not in sec:
            continue
        nsec, nkey = new.split(".")
        target = data.setdefault(nsec, {})
        if not isinstance(target, dict):
            continue  # "must be a mapping" is reported by the schema
        if nkey in target or new in moved:
            raise ConfigError(f"{old} and {new} are the same field (old and new name); keep {new}", old)
        value = sec.pop(okey)
        target[nkey] = value if convert is None else convert(value)
        moved[new] = old
        notes.append(f"{old} is now {new}" + (f" ({how})" if how else "") +
                     "; the old name is read until the next release")
    return data, moved, notes


def _as_written(e: ConfigError, moved: dict[str, str]) -> ConfigError:
    """Name the field as the user wrote it: the old name when the value was given under one."""
    for new, old in moved.items():
        if e.field and (e.field == new or e.field.startswith(new + "[")):
            field = old + e.field[len(new):]
            text = e.message[len(e.field):] if e.message.startswith(e.field) else f": {e.message}"
            return ConfigError(f"{field}{text} ({old} is now {new})", field, e.file, e.line)
    return e


def _build(data, warn_at=None) -> RunConfig:
    from pdmd.config_check import validate

    if not isinstance(data, dict):
        raise ConfigError(f"must be a YAML mapping (field: value), got a {type(data).__name__}", line=1)
    data, moved, notes = _migrate(data)
    for note, old in zip(notes, moved.values()):
        warnings.warn(f"{warn_at(old) if warn_at else ''}{note}", ConfigWarning, stacklevel=4)
    try:
        try:
            cfg = RunConfig.model_validate(data)
        except ValidationError as err:
            raise _from_pydantic(err) from None
        return validate(cfg)
    except ConfigError as e:
        raise _as_written(e, moved) from None


def from_dict(data: dict) -> RunConfig:
    """Build and validate a ``RunConfig`` from a dict, rejecting unknown and ill-typed fields (old names: a
    ``ConfigWarning``); a ``ConfigError`` names the field."""
    return _build(data)


def updated(cfg: RunConfig, changes: dict) -> RunConfig:
    """``cfg`` with ``{"section.field": value}`` changed, checked again as a whole."""
    data = cfg.to_dict()
    for key, value in changes.items():
        _put(data, key, value)
    return from_dict(data)


def _put(data: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for h in head:
        if data.get(h) is None:
            data[h] = {}
        if not isinstance(data[h], dict):
            raise ConfigError(f"{h} must be a mapping, got {type(data[h]).__name__}", h)
        data = data[h]
    data[last] = value


def apply_overrides(data: dict, overrides) -> dict[str, str]:
    """Apply ``--set section.field=value`` items to ``data`` (values read as YAML: ``1e-4``, ``[1.0, 0.0]``,
    ``true``, ``null``); returns {dotted field: the item}. Their types are the schema's, checked with the rest."""
    where = {}
    for item in overrides or ():
        key, eq, text = item.partition("=")
        if not eq or not key or any(not p.isidentifier() for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set generator.lr=1e-4")
        loader = ConfigLoader(text)
        try:
            value = loader.get_single_data()
        except Exception as e:  # noqa: BLE001 - a YAML error in one value: the item names it
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
        finally:
            loader.dispose()
        new = _OLD[key][0] if key in _OLD else key
        for other in [new, *(o for o, (n, _, _) in _OLD.items() if n == new)]:  # the override replaces the field,
            sec, _, name = other.partition(".")                              # whichever name the file used
            if other != key and isinstance(data.get(sec), dict):
                data[sec].pop(name, None)
        try:
            _put(data, key, value)
        except ConfigError as e:
            raise ConfigError(e.message, e.field, f"--set {item}") from None
        where[key] = item
    return where


def load_config(path, for_run: bool = False, overrides=()) -> RunConfig:
    """The config at ``path`` (YAML; ``None``: the defaults) with ``--set`` ``overrides``; ConfigError
    ``FILE:LINE: field ...`` (an override's error: ``--set ITEM: field ...``).

    ``for_run``: also check what running it needs from this machine (the device exists)."""
    from pdmd.config_check import require_device

    data, lines = ({}, {}) if path is None else load_yaml(path)
    if data is None:  # an empty file: the defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"must be a YAML mapping (field: value), got a {type(data).__name__}", file=path, line=1)
    where = apply_overrides(data, overrides)

    def place(field):
        """(file, line) of ``field``: its --set item, or its line in the file."""
        name = field
        while name:
            if name in where:
                return f"--set {where[name]}", None
            name = name.rpartition(".")[0] if "[" not in name else name[:name.rindex("[")]
        return path, line_of(field, lines) if path is not None else None

    def warn_at(old):
        file, line = place(old)
        return "" if file is None else f"{file}:{line}: " if line else f"{file}: "
    try:
        cfg = _build(data, warn_at)
        if for_run:
            require_device(cfg.device)
    except ConfigError as e:
        if e.file is not None:
            raise
        file, line = place(e.field)
        raise ConfigError(e.message, e.field, file, e.line or line) from None
    return cfg
