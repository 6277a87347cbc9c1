"""The one YAML reader of pdmd and its error type.

``load_yaml`` reads toy, digits and real-model configs alike: YAML 1.2 floats (``1e-4`` is a number, not a
string), duplicate keys refused, and every problem (missing file, directory, not UTF-8, syntax) a ``ConfigError``
that says ``FILE:LINE: message``. It also returns a map dotted field -> line, so that a schema error names its line.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

__all__ = ["ConfigError", "ConfigLoader", "load_yaml", "line_of"]


class ConfigError(ValueError):
    """Bad user input. ``str()`` reads ``FILE:LINE: message`` (as much of the place as is known);
    ``field`` is the dotted field the message is about (None for a file-level problem)."""

    def __init__(self, message: str, field: str | None = None, file=None, line: int | None = None):
        super().__init__(message)
        self.message, self.field, self.file, self.line = message, field, file, line

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"

    def at(self, file, lines: dict[str, int]) -> "ConfigError":
        """This error placed in ``file`` at the line of its field (or of the nearest enclosing one)."""
        return ConfigError(self.message, self.field, file, self.line or line_of(self.field, lines))


def line_of(name: str | None, lines: dict[str, int]) -> int | None:
    """Line of ``name`` ("distill.betas[1]"), else of its parent ("distill.betas", "distill"): a missing or
    computed field still points at its section."""
    while name:
        if name in lines:
            return lines[name]
        parent = re.sub(r"(\[\d+\]|\.[^.\[]*|^[^.\[]*)$", "", name)
        if parent == name:
            break
        name = parent
    return None


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate keys refused; records each field's line in ``lines``."""

    def construct_document(self, node):
        self.lines: dict[str, int] = {}
        self._walk(node, "")
        return super().construct_document(node)

    def _walk(self, node, path: str) -> None:
        """Record ``dotted.path -> line`` and refuse a key given twice in one mapping: PyYAML would silently
        keep the last one, so a user who edits the first sees no effect."""
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                    continue  # "<<: *anchor" merges a mapping on purpose; its keys may be overridden
                name = f"{path}.{key.value}" if path else key.value
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    raise ConfigError(f"{name} is given twice (first on line {seen[key.tag, key.value]}): YAML would "
                                      "silently keep the last; remove one", name, line=line)
                seen[key.tag, key.value] = line
                self.lines.setdefault(name, line)
                self._walk(value, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines.setdefault(f"{path}[{i}]", item.start_mark.line + 1)
                self._walk(item, f"{path}[{i}]")


# YAML 1.1 (PyYAML) wants a dot and a signed exponent: 1e-4, 1E5 and 1.0e5 are strings there, and users write
# them as numbers. This adds YAML 1.2's exponent forms; forms without an exponent resolve as before (ints stay ints).
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(path) -> tuple[object, dict[str, int]]:
    """The YAML document at ``path`` and a map dotted field -> line; ConfigError ``FILE[:LINE]: ...`` for a
    missing file, a directory, text that is not UTF-8, a syntax error or a duplicate key."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError("is a directory, not a YAML config file", file=p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("no such config file", file=p) from None
    except OSError as e:
        raise ConfigError(f"cannot read the config file ({e.strerror})", file=p) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"is not UTF-8 text (byte 0x{raw[e.start]:02x}); save the config as UTF-8", file=p,
                          line=raw.count(b"\n", 0, e.start) + 1) from None
    loader = None
    try:
        loader = ConfigLoader(text)  # checks the characters first
        return loader.get_single_data(), getattr(loader, "lines", {})
    except ConfigError as e:  # a duplicate key
        raise ConfigError(e.message, e.field, p, e.line) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(" ".join(str(m).split()) for m in (e.context, e.problem) if m)
        raise ConfigError(f"invalid YAML (column {mark.column + 1}): {what}", file=p, line=mark.line + 1) from None
    except yaml.reader.ReaderError as e:  # a control character: a position, not a mark
        raise ConfigError(f"invalid YAML: character #x{e.character:04x} is not allowed in YAML text", file=p,
                          line=text.count("\n", 0, e.position) + 1) from None
    finally:
        if loader is not None:
            loader.dispose()
