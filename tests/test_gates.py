"""Gates: the grammar, their verdicts and messages, and the one-line errors at config load and preflight."""

from __future__ import annotations

import pytest

from compress.config import ConfigError, EvaluateConfig, PipelineConfig, load_config
from compress.gates import GateError, Ref, check_gate, check_gate_models, check_gates, demands_higher, parse_gate
from tests.conftest import ROOT

MODELS = {
    "teacher": {"params": 1000, "throughput": 500.0, "scores": {"taskworld": {"exact_match": {"value": 1.0}}}},
    "student": {
        "params": 480,
        "throughput": 900.0,
        "scores": {
            "taskworld": {"exact_match": {"value": 0.91}},
            "gsm8k": {"exact_match,strict-match": {"value": 0.3}, "exact_match,flexible-extract": {"value": 0.35}},
            "my.task": {"acc": {"value": 0.5}},
        },
    },
}
HEAD = ("taskworld", "exact_match")


@pytest.mark.parametrize(
    ("text", "passed", "left", "right"),
    [
        ("student >= 0.95 * teacher", False, 0.91, 0.95),
        ("student >= 0.9*teacher", True, 0.91, 0.9),
        ("student.taskworld.exact_match > teacher - 0.1", True, 0.91, 0.9),
        ("student.params <= 0.55 * teacher.params", True, 480, 550),
        ("student.throughput / teacher.throughput >= 1.5", True, 1.8, 1.5),
        ("student.gsm8k.exact_match,strict-match >= 0.25", True, 0.3, 0.25),
        ("student.'my.task'.acc == 0.5", True, 0.5, 0.5),
        ("student.'my.task' < 0.4", False, 0.5, 0.4),
        ("-(student - teacher) <= 0.05", False, 0.09, 0.05),
        ("1e-1 < student", True, 0.1, 0.91),
    ],
)
def test_gate_verdicts(text, passed, left, right):
    r = check_gate(text, MODELS, HEAD)
    assert r.passed is passed
    assert r.left == pytest.approx(left) and r.right == pytest.approx(right)


def test_failed_gate_message_names_metrics_and_values():
    r = check_gates(["student >= 0.95 * teacher"], MODELS, HEAD)[0]
    msg = r.message()
    assert "not met" in msg and "0.91 >= 0.95" in msg
    assert "student.taskworld.exact_match = 0.91" in msg and "teacher.taskworld.exact_match = 1" in msg
    assert "\n" not in msg


def test_refs_parse_to_model_task_metric():
    g = parse_gate("student.gsm8k.exact_match,flexible-extract - 0.05 >= pruned")
    assert g.refs() == [Ref("student", "gsm8k", "exact_match,flexible-extract"), Ref("pruned")]
    assert parse_gate("student.params < 1").refs() == [Ref("student", metric="params")]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("student >=", "found the end"),
        ("student", "expected a comparison"),
        ("student >= 0.9 teacher", "unexpected 'teacher'"),
        ("student ≥ 0.9", "cannot read"),
        ("a >= b >= c", "unexpected '>='"),
        ("(student > 1", r"missing '\)'"),
        ("student.a.b.c > 1", "cannot read"),
        ("__import__('os') > 1", "cannot read"),
        ("", "empty"),
    ],
)
def test_bad_gates_are_refused(text, why):
    with pytest.raises(GateError, match=why):
        parse_gate(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("studnet >= 0.5", "no model 'studnet'"),
        ("student.arc_easy.acc >= 0.5", "no results for task 'arc_easy'"),
        ("student.taskworld.acc >= 0.5", "no metric 'acc'"),
        ("student.gsm8k >= 0.5", "several metrics"),
        ("student / (teacher - 1) > 1", "divides by zero"),
    ],
)
def test_gates_on_missing_results_say_what_is_missing(text, why):
    with pytest.raises(GateError, match=why):
        check_gate(text, MODELS, HEAD, index=3)
    with pytest.raises(GateError, match=r"evaluate\.gates\[3\]"):
        check_gate(text, MODELS, HEAD, index=3)


def test_no_throughput_is_an_error():
    models = {"student": {**MODELS["student"], "throughput": None}}
    with pytest.raises(GateError, match="no throughput"):
        check_gate("student.throughput > 1", models, HEAD)


def test_config_refuses_a_bad_gate_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="gates"):
        EvaluateConfig(gates=["student >= 0.9", "student >> 1"])
    path = tmp_path / "c.yaml"
    teacher = ROOT / "assets" / "teacher-tiny"
    path.write_text(f"teacher:\n  path: {teacher}\nevaluate:\n  gates: ['student >= 0.95 teacher']\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [], PipelineConfig)
    assert "evaluate.gates" in str(e.value) and "\n" not in str(e.value)


def test_gate_models_checked_before_running():
    check_gate_models(["student >= 0.9 * teacher", "sft < student"], ["teacher", "pruned", "student", "sft"])
    with pytest.raises(GateError, match=r"evaluate.gates\[1\].*'kd'.*teacher, pruned, student"):
        check_gate_models(["student >= 0.9", "kd > 0"], ["teacher", "pruned", "student"])


def test_preflight_names_the_bad_gate():
    from stages.evaluate import check_evaluation

    tasks = [{"task": "taskworld", "lm_eval": "distillflow_taskworld", "data": "built-in"}]
    check_evaluation(EvaluateConfig(gates=["student.taskworld.exact_match > 0"]), ["student"], tasks)
    with pytest.raises(ConfigError, match=r"task 'arc_easy', not in evaluate\.tasks"):
        check_evaluation(EvaluateConfig(gates=["student.arc_easy.acc > 0"]), ["student"], tasks)
    with pytest.raises(ConfigError, match="names model 'sft'"):
        check_evaluation(EvaluateConfig(gates=["sft > 0"]), ["student"], tasks)
    with pytest.raises(ConfigError, match="needs throughput"):
        check_evaluation(EvaluateConfig(gates=["student.throughput > 0"]), ["student"], tasks)
    with pytest.raises(ConfigError, match=r"evaluate\.vllm\.vllm_python"):
        check_evaluation(EvaluateConfig(backend="vllm", vllm={"vllm_python": "/nonexistent/python"}), ["x"], tasks)


# A real model's run: lm-eval's perplexities (their direction recorded) and our fidelity task.
REAL = {
    name: {
        "params": params,
        "scores": {
            "pydoc_ppl": {
                "word_perplexity": {"value": wp, "higher_is_better": False},
                "bits_per_byte": {"value": bpb, "higher_is_better": False},
            },
            "fidelity": {"kl": {"value": kl}, "top1_agreement": {"value": top1}},
            "custom": {"loss_like": {"value": custom, "higher_is_better": False}},
        },
    }
    for name, params, wp, bpb, kl, top1, custom in (
        ("teacher", 1000, 20.0, 0.9, 0.0, 1.0, 1.0),
        ("student", 500, 23.0, 1.0, 0.3, 0.7, 1.5),
    )
}
PPL = ("pydoc_ppl", "word_perplexity")


@pytest.mark.parametrize(
    ("text", "passed", "left", "right"),
    [
        ("student.pydoc_ppl.word_perplexity <= 1.2 * teacher.pydoc_ppl.word_perplexity", True, 23.0, 24.0),
        ("student.pydoc_ppl.word_perplexity <= 1.1 * teacher.pydoc_ppl.word_perplexity", False, 23.0, 22.0),
        ("student.pydoc_ppl.bits_per_byte - teacher.pydoc_ppl.bits_per_byte < 0.2", True, 0.1, 0.2),
        ("student.fidelity.kl <= 0.05", False, 0.3, 0.05),
        ("student.fidelity.top1_agreement >= 0.6", True, 0.7, 0.6),
        # Taken as written, whichever way it points: the metric is named.
        ("student.pydoc_ppl.word_perplexity >= teacher.pydoc_ppl.word_perplexity", True, 23.0, 20.0),
        # The bare name on a lower-is-better headline, bounded from above: allowed.
        ("student <= 1.2 * teacher", True, 23.0, 24.0),
        ("teacher / student >= 0.9", False, 20.0 / 23.0, 0.9),
        ("student == student", True, 23.0, 23.0),
    ],
)
def test_gates_on_lower_is_better_metrics(text, passed, left, right):
    r = check_gate(text, REAL, PPL)
    assert r.passed is passed
    assert r.left == pytest.approx(left) and r.right == pytest.approx(right)


def test_underscored_task_and_metric_names_parse():
    g = parse_gate("student.pydoc_ppl.word_perplexity <= 1.2*teacher.pydoc_ppl.word_perplexity")
    assert g.refs() == [Ref("student", "pydoc_ppl", "word_perplexity"), Ref("teacher", "pydoc_ppl", "word_perplexity")]
    assert g.op == "<="


@pytest.mark.parametrize(
    "text",
    [
        "student >= 0.9 * teacher",
        "student > teacher",
        "student / teacher >= 0.9",
        "0.9 * teacher <= student",
        "-student <= -teacher",
        "student - teacher >= -1",
        "student >= 10",
    ],
)
def test_a_bare_gate_asking_for_a_higher_lower_is_better_headline_is_refused(text):
    """It would pass a worse model: refused when judged (the recorded direction decides)..."""
    with pytest.raises(GateError, match=r"evaluate\.gates\[0\].*word_perplexity is lower-is-better") as e:
        check_gate(text, REAL, PPL)
    assert "student.pydoc_ppl.word_perplexity" in str(e.value) and "\n" not in str(e.value)
    # ... and on a higher-is-better headline the same gate is judged as usual.
    check_gate(text, REAL, ("fidelity", "top1_agreement"))


@pytest.mark.parametrize(
    ("text", "higher"),
    [
        ("student >= 0.9 * teacher", {"student": True, "teacher": False}),
        ("student <= 1.2 * teacher", {"student": False, "teacher": True}),
        ("teacher / student >= 0.9", {"student": False, "teacher": True}),
        ("(student - teacher) * -2 <= 1", {"student": True, "teacher": False}),
        ("student / 0.5 < 3", {"student": False}),
        ("student == teacher", {"student": False, "teacher": False}),
    ],
)
def test_which_way_a_gate_pushes_each_model(text, higher):
    gate = parse_gate(text)
    assert {r.model: demands_higher(gate, r) for r in gate.refs()} == higher


def test_recorded_direction_wins_over_the_name():
    """'loss_like' is not in the name table; lm-eval recorded it lower-is-better, so the bare rule applies."""
    with pytest.raises(GateError, match="loss_like is lower-is-better"):
        check_gate("student >= teacher", REAL, ("custom", "loss_like"))
    check_gate("student <= 2 * teacher", REAL, ("custom", "loss_like"))


def test_config_refuses_a_bare_gate_on_a_named_lower_is_better_headline(tmp_path):
    ok = EvaluateConfig(headline="pydoc_ppl/word_perplexity", gates=["student <= 1.2 * teacher"])
    assert ok.gates == ["student <= 1.2 * teacher"]
    EvaluateConfig(headline="fidelity/top1_agreement", gates=["student >= 0.9 * teacher"])
    with pytest.raises(ValueError, match=r"\[1\] 'student >= 0.9 \* teacher': asks 'student' for a higher"):
        EvaluateConfig(
            headline="pydoc_ppl/word_perplexity", gates=["student <= 2 * teacher", "student >= 0.9 * teacher"]
        )
    path = tmp_path / "c.yaml"
    teacher = ROOT / "assets" / "teacher-tiny"
    path.write_text(
        f"teacher:\n  path: {teacher}\nevaluate:\n  headline: fidelity/kl\n  gates: ['student / teacher > 0.9']\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path, [], PipelineConfig)
    msg = str(e.value)
    assert "evaluate.gates" in msg and "kl is lower-is-better" in msg and "student.fidelity.kl" in msg
    assert "\n" not in msg


def test_a_zero_score_in_a_product_is_a_verdict_not_a_division():
    """Found by a gate on a teacher that scores 0: only '/' divides (every operator was computed at once)."""
    zero = {"teacher": {"params": 1, "scores": {"taskworld": {"exact_match": {"value": 0.0}}}}} | {
        "student": MODELS["student"]
    }
    r = check_gate("student >= 2.0 * teacher", zero, HEAD)
    assert r.passed and r.right == 0.0
    assert not check_gate("student - teacher <= 0.5", zero, HEAD).passed
    with pytest.raises(GateError, match="divides by zero"):
        check_gate("student / teacher >= 1", zero, HEAD)
