import pytest

from compress.lineage import read_json, record_stage, sha256_path, write_json


def test_dir_hash_tracks_content_and_names(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").write_text("1")
    h1 = sha256_path(d)
    (d / "teacher_manifest.json").write_text("{}")
    assert sha256_path(d) == h1  # sidecar files do not count
    (d / "a").write_text("2")
    h2 = sha256_path(d)
    assert h2 != h1
    (d / "a").rename(d / "b")
    assert sha256_path(d) != h2
    with pytest.raises(FileNotFoundError):
        sha256_path(tmp_path / "missing")


def test_record_stage_merges(tmp_path):
    record_stage(tmp_path, "prune", {"seconds": 1})
    record_stage(tmp_path, "generate", {"seconds": 2})
    m = read_json(tmp_path / "manifest.json")
    assert set(m["stages"]) == {"prune", "generate"}
    assert m["stages"]["prune"]["seconds"] == 1


def test_write_json_atomic_leaves_no_temp(tmp_path):
    write_json(tmp_path / "x.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
