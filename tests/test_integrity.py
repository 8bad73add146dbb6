"""The run's output files, listed with size and sha256 in the manifest, and checked by distillflow verify."""

import json
import subprocess
import sys

from compress.integrity import check_files, verify_run
from compress.lineage import files_digest, list_files, sha256_path
from tests.conftest import ROOT


def _run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "model.safetensors").write_bytes(b"\0" * 4096 + b"weights")
    (run / "student" / "config.json").write_text('{"a": 1}')
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text('{"prompt": "x"}\n' * 10)
    files = {
        "student": [f | {"path": f"student/{f['path']}"} for f in list_files(run / "student")],
        "data": [f | {"path": f"data/{f['path']}"} for f in list_files(run / "data" / "train.jsonl")],
    }
    (run / "manifest.json").write_text(json.dumps({"stages": {"distill_student": {"files": files}}}))
    return run


def _verify(run):
    cmd = [sys.executable, "-m", "flows.cli", "verify", str(run)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


def test_a_directory_digest_is_derived_from_its_files_sha256sum(tmp_path):
    run = _run_dir(tmp_path)
    listed = list_files(run / "student")
    assert [f["path"] for f in listed] == ["config.json", "model.safetensors"]
    assert sha256_path(run / "student") == files_digest(listed)
    out = subprocess.run(["sha256sum", str(run / "student" / "model.safetensors")], capture_output=True, text=True)
    assert out.stdout.split()[0] == listed[1]["sha256"]


def test_verify_names_every_missing_truncated_or_changed_file(tmp_path):
    run = _run_dir(tmp_path)
    assert verify_run(run) == (3, [])
    ok = _verify(run)
    assert ok.returncode == 0 and "all 3 recorded output files match" in ok.stdout

    weights = run / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    (run / "student" / "config.json").write_text('{"a": 2}')  # same size, other bytes
    (run / "data" / "train.jsonl").unlink()
    checked, problems = verify_run(run)
    assert checked == 3 and len(problems) == 3
    assert any("model.safetensors: 100 bytes, recorded 4103" in p for p in problems), problems
    assert any("config.json: sha256 differs" in p for p in problems), problems
    assert any("train.jsonl: missing" in p for p in problems), problems
    bad = _verify(run)
    assert bad.returncode == 1 and "3 of the run's files are missing or changed" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_check_files_is_quiet_on_a_match(tmp_path):
    run = _run_dir(tmp_path)
    assert check_files(run, [f | {"path": f"student/{f['path']}"} for f in list_files(run / "student")]) == []
