"""Figures quoted in the docs, checked against the committed files they come from.

A figure in README.md or docs/*.md names its source as a Markdown link: the figure is the link's
text, the committed JSON file is its target (relative to the page, as GitHub resolves it) and the
link's title says where in the file it is, e.g.

    KD keeps [96.0%](docs/results/demo-seed0/summary.json "models.student.score / models.teacher.score")

The title is a small arithmetic expression (``+ - * /``, parentheses, numbers) over paths into the
JSON: ``a.b.c`` for keys, ``a.b[0]`` for list items, ``a["odd key"]`` for keys that are not names.
The figure agrees with its file when the value, rounded to the decimals the figure shows, is the
figure; a figure ending in ``%`` is compared with 100 times the value. Thousands separators, a
leading ``+``, ``**`` and a unit after the number (``x``, ``s``, `` GB`` ...) are allowed.

``python -m tests.doc_figures`` prints every disagreement and exits 1 when there is one;
``tests/test_docs.py`` runs the same check in CI.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r'\[([^\]\n]+)\]\(([^)\s]+\.json)\s+"([^"\n]+)"\)')
NUMBER = re.compile(r"^\**\s*([+\-−]?)([\d,]*\.?\d+)\s*(%?)")


@dataclass(frozen=True)
class Figure:
    page: Path
    line: int
    text: str
    file: Path
    expr: str


def pages(root: Path = ROOT) -> list[Path]:
    """The pages whose figures are checked: the README and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def figures(page: Path) -> list[Figure]:
    """Every figure link on ``page``."""
    found = []
    for no, line in enumerate(page.read_text().splitlines(), 1):
        for m in LINK.finditer(line):
            found.append(Figure(page, no, m.group(1), (page.parent / m.group(2)).resolve(), m.group(3)))
    return found


def evaluate(expr: str, data) -> float:
    """The value of a title expression over the JSON ``data`` (see the module docstring)."""

    def lookup(node):
        if isinstance(node, ast.Name):
            return data[node.id]
        if isinstance(node, ast.Attribute):
            return lookup(node.value)[node.attr]
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            return lookup(node.value)[node.slice.value]
        raise ValueError(f"unsupported path {ast.unparse(node)!r}")

    ops = {ast.Add: float.__add__, ast.Sub: float.__sub__, ast.Mult: float.__mul__, ast.Div: float.__truediv__}

    def value(node) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        got = lookup(node)
        if isinstance(got, bool) or not isinstance(got, int | float):
            raise ValueError(f"{ast.unparse(node)!r} is {got!r}, not a number")
        return float(got)

    return value(ast.parse(expr, mode="eval").body)


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def disagreement(fig: Figure) -> str | None:
    """Why ``fig`` does not match its file, or None when it does."""
    m = NUMBER.match(fig.text.strip())
    if not m:
        return f"'{fig.text}' is not a number"
    sign, digits, percent = m.groups()
    shown = float(digits.replace(",", "")) * (-1 if sign in ("-", "−") else 1)
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    if not fig.file.is_file():
        return f"{_show(fig.file)} does not exist"
    try:
        actual = evaluate(fig.expr, json.loads(fig.file.read_text()))
    except (KeyError, IndexError, TypeError, ValueError, SyntaxError, ZeroDivisionError) as e:
        return f"'{fig.expr}' cannot be read from {_show(fig.file)}: {e!r}"
    actual *= 100 if percent else 1
    # Rounded to the shown decimals (half a unit of the last shown digit, plus float slack).
    if abs(round(actual, decimals) - shown) > 0.5 * 10**-decimals + 1e-9:
        return f"shows {fig.text} but {_show(fig.file)} '{fig.expr}' is {actual:.6g}"
    return None


def check(root: Path = ROOT) -> list[str]:
    """One line per figure that disagrees with its file (empty: all agree)."""
    problems = []
    for page in pages(root):
        for fig in figures(page):
            why = disagreement(fig)
            if why:
                problems.append(f"{page.relative_to(root)}:{fig.line}: {why}")
    return problems


if __name__ == "__main__":
    bad = check()
    print("\n".join(bad) or f"every figure agrees with its file ({sum(len(figures(p)) for p in pages())} figures)")
    sys.exit(1 if bad else 0)
