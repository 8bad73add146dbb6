"""Quality gates: strict little comparisons over a run's results, such as ``student >= 0.95 * teacher``.

Grammar (whitespace is free)::

    gate   := expr ('>=' | '>' | '<=' | '<' | '==') expr
    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := NUMBER | REF | '(' expr ')' | '-' factor
    REF    := MODEL                  the model's headline metric
            | MODEL '.' TASK '.' METRIC
            | MODEL '.' TASK         the task's only metric
            | MODEL '.params'        its parameter count
            | MODEL '.throughput'    its vLLM serving throughput, tokens/s

MODEL is a name such as ``teacher``, ``pruned``, ``sft`` or ``student``. TASK and METRIC are
lm-eval's names (``taskworld`` for the built-in held-out split); a metric with a filter keeps it,
as in ``student.gsm8k.exact_match,strict-match``. Any other name can be quoted:
``student.'my.task'.acc``. Nothing is ``eval``-ed: the text is tokenised and parsed here, so a
typo is a one-line error at config load, and an unknown model at preflight.

Direction. A gate is an inequality the user writes, so it means exactly what it says: for a
lower-is-better metric (``compress.metrics``: perplexities, bits per byte, KL, ...) a gate that
bounds a student from above is the natural one::

    student.pydoc_ppl.word_perplexity <= 1.2 * teacher.pydoc_ppl.word_perplexity
    student.fidelity.kl <= 0.05

Values are read as recorded, never inverted. The one exception is the bare shorthand ``student``,
which hides the metric and reads like "keeps 90% of the teacher's score": when the headline is
lower-is-better, a gate that asks its subject (the first bare model name other than the teacher,
the reference) for a *higher* headline, such as ``student >= 0.9 * teacher`` or ``student /
teacher >= 0.9``, would pass a worse model, so it is refused with a one-line hint
(``check_gate_direction``): at config load when ``evaluate.headline`` names the metric, and when
the gates are judged otherwise (the headline's direction is then the one lm-eval recorded, a gate
refused there counts as failed, with the hint). ``student <= 1.2 * teacher`` and ``teacher /
student >= 0.8`` are the right-way-round forms. A gate that spells the metric out is taken as
written, whichever way it points.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from compress.metrics import lower_is_better, models_lower_is_better

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": lambda a, b: abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b)),
}
SPECIAL = ("params", "throughput")
REFERENCE = "teacher"  # the model a gate measures the others against

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)
      | (?P<ref>[A-Za-z_]\w*(?:\.(?:'[^']+'|"[^"]+"|\w+(?:,[\w-]+)?)){0,2})
      | (?P<op>>=|<=|==|>|<)
      | (?P<sym>[-+*/()])
    )""",
    re.VERBOSE,
)


class GateError(ValueError):
    """A gate that does not parse, or names something the run does not have."""


class GateFailed(RuntimeError):
    """A run whose results do not meet its gates (raised after every report file is written)."""


@dataclass(frozen=True)
class Ref:
    """A value of one model: its headline metric, a task's metric, its parameters or its throughput."""

    model: str
    task: str | None = None
    metric: str | None = None

    def __str__(self) -> str:
        return ".".join(p for p in (self.model, self.task, self.metric) if p)


@dataclass(frozen=True)
class Gate:
    """A parsed gate: two expressions (nested tuples over ``Ref`` and numbers) and a comparison."""

    text: str
    left: Any
    op: str
    right: Any

    def refs(self) -> list[Ref]:
        return _refs(self.left) + _refs(self.right)


def parse_gate(text: str) -> Gate:
    """Parse one gate; ``GateError`` with the reason on anything that is not in the grammar."""
    tokens = _tokenize(text)
    parser = _Parser(tokens, text)
    left = parser.expr()
    kind, op = parser.next()
    if kind != "op":
        raise GateError(f"'{text}': expected a comparison (>=, >, <=, <, ==) after the left side")
    right = parser.expr()
    if parser.pos != len(tokens):
        raise GateError(f"'{text}': unexpected '{tokens[parser.pos][1]}' after the comparison")
    return Gate(text, left, op, right)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos, end = 0, len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise GateError(f"'{text}': cannot read '{text[pos:].strip()}'")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))  # type: ignore[arg-type]
        pos = m.end()
    if not tokens:
        raise GateError("empty gate")
    return tokens


class _Parser:
    """Recursive descent over the tokens; expressions become ``(op, a, b)``, ``Ref`` or ``float``."""

    def __init__(self, tokens: list[tuple[str, str]], text: str):
        self.tokens, self.text, self.pos = tokens, text, 0

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self) -> Any:
        node = self.term()
        while self.peek() in (("sym", "+"), ("sym", "-")):
            node = (self.next()[1], node, self.term())
        return node

    def term(self) -> Any:
        node = self.factor()
        while self.peek() in (("sym", "*"), ("sym", "/")):
            node = (self.next()[1], node, self.factor())
        return node

    def factor(self) -> Any:
        kind, value = self.next()
        if kind == "num":
            return float(value)
        if kind == "ref":
            return _ref(value, self.text)
        if (kind, value) == ("sym", "-"):
            return ("*", -1.0, self.factor())
        if (kind, value) == ("sym", "("):
            node = self.expr()
            if self.next() != ("sym", ")"):
                raise GateError(f"'{self.text}': missing ')'")
            return node
        what = f"'{value}'" if value else "the end"
        raise GateError(f"'{self.text}': expected a number or a model name, found {what}")


def _ref(token: str, text: str) -> Ref:
    parts = [p.strip("'\"") for p in re.findall(r"'[^']+'|\"[^\"]+\"|[^.]+", token)]
    if len(parts) == 2 and parts[1] in SPECIAL:
        return Ref(parts[0], metric=parts[1])
    return Ref(parts[0], *[*parts[1:], None, None][:2])


def _refs(node: Any) -> list[Ref]:
    if isinstance(node, Ref):
        return [node]
    if isinstance(node, tuple):
        return _refs(node[1]) + _refs(node[2])
    return []


def _const(node: Any) -> float | None:
    """The value of a subtree without references, or None when it has one."""
    if isinstance(node, float):
        return node
    if isinstance(node, Ref):
        return None
    op, a, b = node
    x, y = _const(a), _const(b)
    if x is None or y is None or (op == "/" and y == 0):
        return None
    return {"+": x + y, "-": x - y, "*": x * y, "/": x / y}[op]


def _polarity(node: Any, sign: float = 1.0) -> list[tuple[Ref, float]]:
    """Each reference with the sign of its effect on ``node``'s value (metrics taken as positive)."""
    if isinstance(node, Ref):
        return [(node, sign)]
    if isinstance(node, float):
        return []
    op, a, b = node
    ca, cb = _const(a), _const(b)
    if op == "+":
        return _polarity(a, sign) + _polarity(b, sign)
    if op == "-":
        return _polarity(a, sign) + _polarity(b, -sign)
    if op == "*" and ca is not None:
        return _polarity(b, sign * ca)
    if op == "*" and cb is not None:
        return _polarity(a, sign * cb)
    if op == "/" and cb:
        return _polarity(a, sign / cb)
    return _polarity(a, sign) + _polarity(b, sign if op == "*" else -sign)


def demands_higher(gate: Gate, ref: Ref) -> bool:
    """Whether the gate is easier to meet the higher ``ref`` is (``student >= 0.9 * teacher``: yes
    for student, no for teacher); ``==`` demands neither."""
    if gate.op == "==":
        return False
    side = 1.0 if gate.op in (">=", ">") else -1.0
    effect = sum(s for r, s in _polarity(gate.left) if r == ref) - sum(s for r, s in _polarity(gate.right) if r == ref)
    return side * effect > 0


def check_gate_direction(text: str, headline: tuple[str, str], lower: bool | None = None, where: str = "") -> None:
    """Refuse a gate that asks a bare model name for a higher headline when lower is better.

    ``headline`` is the (task, metric) a bare name stands for (``("pydoc_ppl", "word_perplexity")``);
    ``lower`` its direction when known (recorded by lm-eval), else the metric's name decides.
    ``GateError`` with a one-line hint.
    """
    task, metric = headline
    if not (lower if lower is not None else lower_is_better(metric)):
        return
    gate = parse_gate(text)
    bare = [r for r in gate.refs() if r.task is None and r.metric is None]
    # The model being judged: the teacher is the reference the others are measured against.
    subject = next((r for r in bare if r.model != REFERENCE), bare[0] if bare else None)
    if subject is not None and demands_higher(gate, subject):
        where = where or f"'{text}'"
        raise GateError(
            f"{where}: asks '{subject.model}' for a higher headline, but {metric} is lower-is-better, so it "
            f"would pass a worse model; bound it from above (e.g. '{subject.model} <= 1.1 * teacher') or name "
            f"the metric ('{subject.model}.{task or 'TASK'}.{metric} ...')"
        )


def check_gate_models(gates: list[str], models: list[str], where: str = "evaluate.gates") -> None:
    """Every model a gate names is one the run evaluates (``GateError`` naming the gate otherwise)."""
    for i, text in enumerate(gates):
        for ref in parse_gate(text).refs():
            if ref.model not in models:
                raise GateError(f"{where}[{i}]: '{text}' names model '{ref.model}'; this run has {', '.join(models)}")


@dataclass
class GateResult:
    """A gate checked against results: both sides' values and what each reference resolved to."""

    gate: str
    passed: bool
    left: float
    op: str
    right: float
    values: dict[str, float]

    def message(self) -> str:
        """One line: the gate, both sides' values and every value it read."""
        used = ", ".join(f"{k} = {format_value(v)}" for k, v in self.values.items())
        sides = f"{format_value(self.left)} {self.op} {format_value(self.right)}"
        if self.passed:
            return f"gate '{self.gate}' met: {sides} ({used})"
        return f"gate '{self.gate}' not met: {sides} is false ({used})"


def format_value(x: float) -> str:
    """A gate value as people read it: counts with separators, scores to 4 significant digits."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def check_gates(gates: list[str], models: dict[str, dict[str, Any]], headline: tuple[str, str]) -> list[GateResult]:
    """Evaluate every gate on ``models`` (summary form: ``scores``, ``params``, ``throughput``).

    ``headline`` is the (task, metric) a bare model name stands for. Raises ``GateError`` when a
    gate names a model, task or metric that is not among the results.
    """
    return [check_gate(text, models, headline, i) for i, text in enumerate(gates)]


ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def check_gate(text: str, models: dict[str, dict[str, Any]], headline: tuple[str, str], index: int = 0) -> GateResult:
    """Evaluate one gate, ``evaluate.gates[index]`` (see ``check_gates``)."""
    gate = parse_gate(text)
    where = f"evaluate.gates[{index}]: '{text}'"
    check_gate_direction(text, headline, models_lower_is_better(models, *headline), where)
    values: dict[str, float] = {}

    def value(node: Any) -> float:
        if isinstance(node, float):
            return node
        if isinstance(node, Ref):
            v = _resolve(node, models, headline, where)
            values[_label(node, headline)] = v
            return v
        op, a, b = node
        x, y = value(a), value(b)
        if op == "/" and y == 0:
            raise GateError(f"{where} divides by zero")
        # Functions, not results: a dict of results would compute x / y for every operator.
        return ARITHMETIC[op](x, y)

    left, right = value(gate.left), value(gate.right)
    return GateResult(text, OPS[gate.op](left, right), left, gate.op, right, values)


def _label(ref: Ref, headline: tuple[str, str]) -> str:
    if ref.task is None and ref.metric is None:
        return f"{ref.model}.{headline[0]}.{headline[1]}"
    return str(ref)


def _resolve(ref: Ref, models: dict[str, dict[str, Any]], headline: tuple[str, str], where: str) -> float:
    if ref.model not in models:
        raise GateError(f"{where}: no model '{ref.model}' in the results ({', '.join(models)})")
    m = models[ref.model]
    if ref.task is None and ref.metric in SPECIAL:
        v = m.get(ref.metric)
        if v is None:
            hint = " (measured with evaluate.throughput)" if ref.metric == "throughput" else ""
            raise GateError(f"{where}: {ref.model} has no {ref.metric}{hint}")
        return float(v)
    scores = m.get("scores") or {}
    task, metric = (ref.task, ref.metric) if ref.task else headline
    if task not in scores:
        raise GateError(f"{where}: {ref.model} has no results for task '{task}' ({', '.join(scores) or 'none'})")
    if metric is None:
        if len(scores[task]) != 1:
            raise GateError(f"{where}: task '{task}' has several metrics; name one ({', '.join(scores[task])})")
        metric = next(iter(scores[task]))
    if metric not in scores[task]:
        raise GateError(f"{where}: task '{task}' has no metric '{metric}' ({', '.join(scores[task])})")
    v = scores[task][metric].get("value")
    if v is None:
        raise GateError(f"{where}: {ref.model} {task}/{metric} has no value")
    return float(v)
