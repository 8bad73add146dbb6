"""The configuration reference, ``docs/configuration.md``, rendered from the models of ``compress.config``.

Each root config (``PipelineConfig``, ``EvaluateOnlyConfig``, ``BootstrapConfig``) is walked depth
first, one table per model it holds: a row per field with its dotted path from the root (the path
``--set`` takes), its type, its default at that path (a nested section may default otherwise than
its model does: ``distill.train`` is not ``TrainConfig()``), its description and, for the roots
whose stages are cached, its cache-key mark (``compress.cachekey``; a section's mark holds for
every field inside it).

    python -m compress.configdoc           # write docs/configuration.md
    python -m compress.configdoc --check   # exit 1 when docs/configuration.md is not what it would write
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from compress.cachekey import KeyWhen, OutOfKey, key_marks
from compress.config import BootstrapConfig, EvaluateOnlyConfig, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
# The root configs, each with the command whose YAML it is.
ROOTS: tuple[tuple[type[BaseModel], str], ...] = (
    (PipelineConfig, "`distillflow run CONFIG` (and `plan`, `prune`, the Python API, the Prefect deployment)"),
    (EvaluateOnlyConfig, "`distillflow evaluate-only CONFIG`"),
    (BootstrapConfig, "`distillflow bootstrap --config CONFIG`"),
)
INTRO = """\
# Configuration reference

This file is generated from the pydantic models in `compress/config.py` by `compress/configdoc.py`:
do not edit it by hand. After changing a config model, regenerate it with
`.venv/bin/python -m compress.configdoc`; `make lint` (and so `make test` and CI) runs the same
command with `--check` and fails while this file is out of date.

Each field is named by its dotted path from the top of the YAML file, the path that
`--set key.path=value` takes (`[]` marks the items of a list). Its default is the one in force at
that path (`distill.train` does not default as `bootstrap`'s `train` does), *required* where there
is none. The *Cache key* column shows the marks of `compress/cachekey.py`: *not in key* never
changes its stage's cache key; *in key when* `flag` enters it only in the jobs that raise that flag
(`Job.flags` in `compress/jobs.py`, e.g. `kd` for the KD student and not the SFT baseline). A blank
cell is no mark: the field enters the key of every stage whose job holds it. A section's mark holds
for every field inside it; a root without any mark has no such column.
"""


class _Required:
    """No default: the field must be given."""


_REQUIRED = _Required()


@dataclass(frozen=True)
class Row:
    """One field of a table, rendered."""

    path: str
    type: str
    default: str
    description: str
    key: str


@dataclass(frozen=True)
class Section:
    """One model at one path: a heading, the model's docstring and a table of its fields."""

    anchor: str
    path: str
    model: type[BaseModel]
    rows: list[Row]


@dataclass(frozen=True)
class Mark:
    """A cache-key mark and the path of the field that carries it."""

    mark: OutOfKey | KeyWhen
    path: str


def anchor(root: type[BaseModel], path: str = "", model: type[BaseModel] | None = None) -> str:
    """The HTML anchor of a section: the root, the path and the model (a union has several at a path)."""
    text = "-".join(p for p in (root.__name__, path, model.__name__ if model else "") if p)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def nested_models(tp: Any, suffix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """The models inside a field's type, each with the path suffix of its values (``[]`` in a list)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        yield from nested_models(args[0], suffix)
    elif origin in (typing.Union, types.UnionType):
        for a in args:
            yield from nested_models(a, suffix)
    elif origin is not None and origin is not typing.Literal:
        for a in args:
            yield from nested_models(a, suffix + "[]")
    elif inspect.isclass(tp) and issubclass(tp, BaseModel):
        yield suffix, tp


def type_text(tp: Any, links: dict[type[BaseModel], str]) -> str:
    """A readable type: Literal values listed, unions joined by ``|``, models linked to their section."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return type_text(args[0], links)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a, links) for a in args)
    if origin is typing.Literal:
        return " | ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_text(a, links) for a in args)}]"
    if tp is type(None):
        return "null"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{links[tp]})"
    return "path" if tp is Path else getattr(tp, "__name__", str(tp))


_BOUNDS = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "≤"),
           (annotated_types.Lt, "lt", "<"), (annotated_types.MinLen, "min_length", "length ≥"))  # fmt: skip


def constraints_text(info: FieldInfo) -> str:
    """The field's bounds and pattern, e.g. ``(≥ 1, ≤ 256)``; empty without any."""
    parts = [f"{sign} {getattr(m, attr)}" for m in info.metadata for cls, attr, sign in _BOUNDS if isinstance(m, cls)]
    parts += [f"pattern `{m.pattern}`" for m in info.metadata if getattr(m, "pattern", None)]
    return f" ({', '.join(parts)})" if parts else ""


def default_text(value: Any) -> str:
    """JSON-ish: a code span, ``required`` when there is no default, a pointer for a nested section."""
    if value is _REQUIRED:
        return "*required*"
    if isinstance(value, BaseModel):
        return "*see its section*"
    text = json.dumps(to_jsonable_python(value), ensure_ascii=False)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def key_text(marks: tuple[Mark, ...], path: str) -> str:
    """The cache-key cell of a field under ``marks`` (its own and its sections')."""
    out = next((m for m in marks if isinstance(m.mark, OutOfKey)), None)
    if out is not None:
        return f"not in key: {out.mark.why}" if out.path == path else f"not in key (as `{out.path}`)"
    flags = dict.fromkeys(m.mark.flag for m in marks if isinstance(m.mark, KeyWhen))
    return " and ".join(f"in key when `{f}`" for f in flags)


def _defaults(model: type[BaseModel]) -> BaseModel | None:
    """An instance of ``model`` with every default (validated), or None when a field is required."""
    try:
        return model()
    except ValidationError:
        return None


def _field_default(info: FieldInfo, name: str, values: BaseModel | None) -> Any:
    if values is not None:
        return getattr(values, name)
    return _REQUIRED if info.is_required() else info.get_default(call_default_factory=True)


def walk(root: type[BaseModel]) -> list[Section]:
    """The sections of ``root``, depth first: each model, then the models inside it, in field order."""
    sections: list[Section] = []

    def visit(model: type[BaseModel], path: str, values: BaseModel | None, marks: tuple[Mark, ...]) -> None:
        values = values if values is not None else _defaults(model)
        rows, children = [], []
        for name, info in model.model_fields.items():
            field_path = f"{path}.{name}" if path else name
            value = _field_default(info, name, values)
            own = tuple(Mark(m, field_path) for m in key_marks(model, name) if m is not None)
            nested = list(nested_models(info.annotation))
            links = {m: anchor(root, field_path + suffix, m) for suffix, m in nested}
            kind = type_text(info.annotation, links) + constraints_text(info)
            key = key_text(marks + own, field_path)
            rows.append(Row(field_path, kind, default_text(value), info.description or "", key))
            for suffix, m in nested:
                child_values = value if not suffix and isinstance(value, m) else None
                children.append((m, field_path + suffix, child_values, marks + own))
        sections.append(Section(anchor(root, path, model if path else None), path, model, rows))
        for child in children:
            visit(*child)

    visit(root, "", None, ())
    return sections


def prose(text: str) -> str:
    """Docstring or description text as Markdown: ``*`` and ``<`` escaped outside code spans (``alpha*KD``,
    ``runs/<name>/`` would turn into emphasis and an HTML tag)."""
    parts = re.split(r"(``.*?``|`[^`]*`)", text)
    return "".join(p if i % 2 else p.replace("*", "\\*").replace("<", "&lt;") for i, p in enumerate(parts))


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def render_section(section: Section, with_key: bool) -> str:
    """A section: heading (the root's own is its model name), the model's docstring, the table."""
    doc = prose(inspect.cleandoc(section.model.__doc__ or ""))
    heading = f"### `{section.path}`: {section.model.__name__}" if section.path else f"## {section.model.__name__}"
    head = ["Field", "Type", "Default", "Description", *(["Cache key"] if with_key else [])]
    lines = [f'<a id="{section.anchor}"></a>', "", heading, "", doc, "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for r in section.rows:
        cells = [f"`{r.path}`", r.type, r.default, prose(r.description), *([r.key] if with_key else [])]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole of ``docs/configuration.md``."""
    parts = [INTRO]
    parts.append("\n".join(f"- [{m.__name__}](#{anchor(m)}): {command}" for m, command in ROOTS) + "\n")
    for model, _ in ROOTS:
        sections = walk(model)
        with_key = any(r.key for s in sections for r in s.rows)  # the bootstrap flow keys its teacher apart
        parts += [render_section(s, with_key) for s in sections]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.configdoc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from what would be written")
    args = parser.parse_args(argv)
    text, name = render(), DOC.relative_to(ROOT)
    if args.check:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{name} is out of date: run `.venv/bin/python -m compress.configdoc` and commit it", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
