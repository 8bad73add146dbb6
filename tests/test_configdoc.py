"""Every config field is documented, and docs/configuration.md is what ``compress.configdoc`` renders."""

from __future__ import annotations

import inspect

import pytest
from pydantic import BaseModel

import compress.config
from compress import configdoc


def config_models() -> list[type[BaseModel]]:
    """The pydantic models defined in compress.config."""
    return [
        o
        for o in vars(compress.config).values()
        if inspect.isclass(o) and issubclass(o, BaseModel) and o.__module__ == "compress.config"
    ]


def test_every_config_field_has_a_description():
    assert len(config_models()) > 10
    missing = [
        f"{m.__name__}.{name}"
        for m in config_models()
        for name, info in m.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert not missing, f"config fields without a description: {missing}"


def test_the_committed_reference_is_up_to_date(capsys):
    assert configdoc.DOC.read_text(encoding="utf-8") == configdoc.render(), (
        "docs/configuration.md is out of date: run `python -m compress.configdoc`"
    )
    assert configdoc.main(["--check"]) == 0


def test_check_fails_with_one_line_when_the_file_differs(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("# stale\n")
    monkeypatch.setattr(configdoc, "DOC", stale)
    monkeypatch.setattr(configdoc, "ROOT", tmp_path)
    assert configdoc.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of date" in err
    assert stale.read_text() == "# stale\n"


def _row(text: str, path: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| `{path}` |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_nested_fields_have_rows_with_their_path_defaults():
    text = configdoc.render()
    cells = _row(text, "distill.train.learning_rate")
    assert cells[1].startswith("float") and cells[2] == "`0.0001`" and "learning rate" in cells[3]
    assert _row(text, "train.learning_rate")[2] == "`0.003`"  # the bootstrap's own default
    assert _row(text, "teacher.path")[2] == "*required*"
    assert '<a id="pipelineconfig-distill-train-trainconfig"></a>' in text
    assert "[TrainConfig](#pipelineconfig-distill-train-trainconfig)" in _row(text, "distill.train")[1]


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("generate.concurrency", "not in key: "),
        ("generate.endpoint.url", "not in key (as `generate.endpoint`)"),
        ("distill.loss", "in key when `kd`"),
        ("generate.self_distill.checker", "in key when `mode=self_distill`"),
        ("distill.train.max_steps", ""),
    ],
)
def test_cache_key_marks_are_shown(path, key):
    cell = _row(configdoc.render(), path)[4]
    assert cell.startswith(key) if key else cell == ""
