import subprocess
import sys
from pathlib import Path

import pytest

from compress.config import ConfigError, PipelineConfig, apply_overrides, config_hash, load_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_and_easy_configs_are_valid():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    assert isinstance(cfg, PipelineConfig)
    assert cfg.run_dir == Path("runs/demo")
    assert "lang" in cfg.taskworld.tasks and cfg.teacher.path == "assets/teacher-small"
    easy = load_config(ROOT / "configs" / "easy.yaml")
    assert easy.run_dir == Path("runs/easy") and "lang" not in easy.taskworld.tasks


@pytest.mark.parametrize(("demo", "boot"), [("tiny.yaml", "bootstrap.yaml"), ("easy.yaml", "bootstrap-easy.yaml")])
def test_each_world_benchmarks_on_its_teachers_heldout_split(demo, boot):
    """A demo config and the bootstrap of its teacher draw the same held-out split, so no benchmark
    prompt was in the teacher's training data (the teacher's manifest scores that very split)."""
    from compress.config import BootstrapConfig, load_yaml, validate
    from compress.data.taskworld import world_splits

    cfg = load_config(ROOT / "configs" / demo)
    teacher = validate(BootstrapConfig, load_yaml(ROOT / "configs" / boot), boot)
    assert Path(cfg.teacher.path) == teacher.out_dir
    small = {"n_train": 1}
    assert (
        world_splits(cfg.taskworld.model_copy(update=small))[1]
        == world_splits(teacher.taskworld.model_copy(update=small))[1]
    )


def test_overrides_are_typed(tiny_model_dir, tmp_path):
    p = _write(tmp_path, f"teacher: {{path: {tiny_model_dir}}}\n")
    cfg = load_config(p, ["prune.num_layers=2", "distill.kd_weight=0.25", "taskworld.tasks=[rev, add]"])
    assert cfg.prune.num_layers == 2 and cfg.distill.kd_weight == 0.25
    assert cfg.taskworld.tasks == ["rev", "add"]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("prune: {target_layer: 3}", "prune.target_layer: unknown key"),
        ("prune: {num_layers: many}", "prune.num_layers"),
        ("distill: {kd_weight: 2.0}", "distill.kd_weight"),
        ("bogus: 1", "bogus: unknown key"),
    ],
)
def test_bad_keys_and_types_name_the_field(tiny_model_dir, tmp_path, extra, field):
    p = _write(tmp_path, f"teacher: {{path: {tiny_model_dir}}}\n{extra}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert field in msg and "\n" not in msg and str(p) in msg


def test_missing_teacher_path(tmp_path):
    p = _write(tmp_path, "teacher: {path: /nonexistent/model}\n")
    with pytest.raises(ConfigError, match=r"teacher\.path: no model checkpoint at '/nonexistent/model'"):
        load_config(p)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        apply_overrides({}, ["novalue"])


def test_config_hash_changes_with_content(tiny_model_dir):
    a = PipelineConfig(teacher={"path": tiny_model_dir})
    b = a.model_copy(deep=True)
    assert config_hash(a) == config_hash(b)
    b.prune.num_layers = 3
    assert config_hash(a) != config_hash(b)


@pytest.mark.parametrize(
    ("body", "overrides", "expect"),
    [
        ("teacher: {path: /missing}\n", [], "teacher.path"),
        ("teacher: {path: TEACHER}\nprune: {depth: 2}\n", [], "prune.depth: unknown key"),
        ("teacher: {path: TEACHER}\n", ["prune.num_layers=abc"], "prune.num_layers"),
    ],
)
def test_cli_bad_config_is_one_line_without_traceback(tmp_path, tiny_model_dir, body, overrides, expect):
    p = _write(tmp_path, body.replace("TEACHER", str(tiny_model_dir)))
    args = [sys.executable, "-m", "flows.cli", "run", str(p)]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expect in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_missing_config_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2 and "config file not found" in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name and cfg.teacher.path
