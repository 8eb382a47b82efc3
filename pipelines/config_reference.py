"""The configuration reference, walked from the pydantic run config: every key's type, default and description.

``python -m labelnext.pipelines.config_reference docs/configuration.md`` writes the docs page (without a path it
prints it); ``labelnext config --explain KEY`` prints one entry. The page is generated, never edited by hand:
``tests/test_docs.py`` fails when it is stale or when a key has no description.
"""

from __future__ import annotations

import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional, Union

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from labelnext.pipelines.config import ConfigError, RunConfig

REGENERATE = ".venv/bin/python -m labelnext.pipelines.config_reference docs/configuration.md"

_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="), (annotated_types.Lt, "lt", "<"),
           (annotated_types.Le, "le", "<="))


@dataclass(frozen=True)
class KeyDoc:
    """One config key as the reference shows it."""

    key: str  # dotted path, e.g. ``cluster.k``
    type: str
    default: str
    description: str
    section: bool = False  # a nested settings model rather than a value


def _model_of(annotation: Any) -> Optional[type[BaseModel]]:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _bounds(metadata: list[Any]) -> list[str]:
    found = []
    for item in metadata:
        for kind, attr, symbol in _BOUNDS:
            if isinstance(item, kind):
                found.append(f"{symbol} {getattr(item, attr)}")
    return found


def type_name(annotation: Any, metadata: Optional[list[Any]] = None) -> str:
    """A reader's name for a field's type: ``int > 0``, ``auto, random or kmeans++``, ``str or null``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0], list(args[1:]) + list(metadata or []))
    if origin is Literal:
        names = [yaml_value(a) for a in args]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin in (Union, types.UnionType):
        parts = [type_name(a, metadata) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(parts)
    if origin in (list, tuple, dict):
        inner = ", ".join(type_name(a) for a in args)
        base = f"{origin.__name__}[{inner}]" if args else origin.__name__
    else:
        base = getattr(annotation, "__name__", str(annotation))
    bounds = _bounds(metadata or [])
    return f"{base} {' and '.join(bounds)}" if bounds else base


def yaml_value(value: Any) -> str:
    """A default as one would write it in the YAML config."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _default(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()
    return None if info.default is PydanticUndefined else info.default


def walk(model: type[BaseModel] = RunConfig, prefix: str = "") -> Iterator[KeyDoc]:
    """Every key under ``model``, depth first in declaration order; a section comes before its keys."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_of(info.annotation)
        if sub is not None:
            yield KeyDoc(key, "section", "", info.description or sub.__doc__ or "", section=True)
            yield from walk(sub, key + ".")
        else:
            yield KeyDoc(key, type_name(info.annotation, info.metadata), yaml_value(_default(info)),
                         info.description or "")


def missing_descriptions() -> list[str]:
    """Keys (sections included) that have no description."""
    return [d.key for d in walk() if not d.description.strip()]


def lookup(key: str) -> KeyDoc:
    """The entry of one dotted key; an unknown key is a :class:`ConfigError` naming it."""
    for doc in walk():
        if doc.key == key:
            return doc
    raise ConfigError(f"unknown config key: {key}")


def explain(key: str) -> str:
    """What ``labelnext config --explain KEY`` prints: description, type and default (a section lists its keys)."""
    doc = lookup(key)
    lines = [f"{doc.key}: {_sentence(doc.description)}"]
    if not doc.section:
        lines += [f"  type: {doc.type}", f"  default: {doc.default}"]
        return "\n".join(lines)
    for sub in walk():
        if sub.key.startswith(key + ".") and not sub.section:
            lines.append(f"  {sub.key} ({sub.type}, default {sub.default}): {_sentence(sub.description)}")
    return "\n".join(lines)


def _sentence(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    return _sentence(text).replace("|", "\\|")


HEAD = """# Configuration reference

<!-- Generated by `python -m labelnext.pipelines.config_reference docs/configuration.md` from the pydantic
     models; do not edit by hand. tests/test_docs.py fails when this page is stale. -->

A run reads one YAML config: a packaged one by name (`local`, the default; `cluster-h100`; `nightly`; their
sources are `configs/*.yaml`) or a file of your own, given with `--config`. Every key is optional; a key you
leave out takes the default below. `--set key=value` overrides any key by its dotted path, with YAML rules for
the value (`--set cluster.k=64`, `--set input.passthrough_columns=[title, url]`, `--set cluster.k=null`).
Unknown keys, wrong types and impossible values stop the run before Ray starts, with one line naming the key.

```console
$ labelnext config --config nightly --set cluster.k=64     # the merged config, as YAML
$ labelnext config --explain cluster.init                  # one key: description, type and default
```

"""


def render() -> str:
    """The whole Markdown page: the head, then one table per section in declaration order."""
    parts = [HEAD]
    rows: list[str] = []

    def flush() -> None:
        if rows:
            parts.append("| key | type | default | description |\n| --- | --- | --- | --- |\n")
            parts.append("".join(rows) + "\n")
            rows.clear()

    for doc in walk():
        if doc.section:
            flush()
            level = "#" * min(2 + doc.key.count("."), 4)
            parts.append(f"{level} `{doc.key}`\n\n{_sentence(doc.description)}\n\n")
        else:
            rows.append(f"| `{doc.key}` | {_cell(doc.type)} | `{_cell(doc.default)}` | {_cell(doc.description)} |\n")
    flush()
    return "".join(parts).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    page = render()
    if not argv:
        sys.stdout.write(page)
        return 0
    with open(argv[0], "w", encoding="utf-8") as f:
        f.write(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
