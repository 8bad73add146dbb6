"""Real Prefect parts: a `prefect server` on loopback, a process work pool, `prefect deploy`, a worker.

Everything is read back through the Prefect API: flow run states, task run states, artifacts.
- the demo config run from the CLI (its own ephemeral Prefect home), then as a deployment run
  through the worker (another Prefect home): every stage of the second run is a cache hit;
- a change to the KD settings only: prepare, prune and generate are cache hits, distill and the
  student's evaluation run (task run states);
- a run cancelled while its generate stage is serving ends Cancelled with no process left.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress.serving.vllm_server import free_port
from tests.conftest import ROOT, VLLM_PYTHON, require_vllm

pytestmark = pytest.mark.slow
PREFECT = str(Path(sys.executable).parent / "prefect")


def _config(runs: Path, teacher: Path, name: str, n_train: int = 48) -> dict:
    return {
        "name": name,
        "runs_dir": str(runs),
        "tags": ["test"],
        "teacher": {"path": str(teacher)},
        "taskworld": {"tasks": ["rev", "max"], "n_train": n_train, "n_heldout": 12, "seed": 0},
        "prune": {"num_layers": 2, "calibration_samples": 16},
        "generate": {"vllm_python": str(VLLM_PYTHON), "top_k": 4, "max_tokens": 6, "dtype": "float32"},
        "distill": {"train": {"max_steps": 4, "batch_size": 16}},
        "evaluate": {"batch_size": 16, "max_gen_toks": 6},
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server, the local-process pool, the deployments of prefect.yaml and a worker."""
    require_vllm()
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    logs = home / "logs"
    logs.mkdir()
    procs = []

    def spawn(args: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=(logs / log).open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(p)
        return p

    spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], "server.log")
    _wait(lambda: _http_ok(f"http://127.0.0.1:{port}/api/health"), 120, "prefect server health")
    _cli(env, "work-pool", "create", "local-process", "--type", "process")
    deployed = _cli(env, "--no-prompt", "deploy", "--all")
    for name in ("compress-pipeline/compress", "prune/prune", "evaluate-only/evaluate-only"):
        assert name in deployed.stdout, deployed.stdout + deployed.stderr
    worker = spawn([PREFECT, "worker", "start", "--pool", "local-process", "--type", "process"], "worker.log")
    try:
        yield {"env": env, "home": home, "worker": worker, "logs": logs}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(cond, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _run_deployment(env: dict, name: str, config: dict) -> str:
    """`prefect deployment run NAME --params ...`; returns the flow run id."""
    out = _cli(env, "deployment", "run", name, "--params", json.dumps({"config": config})).stdout
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    return match.group(1)


def _api(env: dict, coro_fn):
    """Run ``coro_fn(client)`` against the server of ``env``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(go())


def _state(env: dict, run_id: str) -> str:
    return _api(env, lambda c: c.read_flow_run(run_id)).state.type.value


def _wait_final(env: dict, run_id: str, timeout: float = 600) -> str:
    final = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
    return _wait(lambda: (s := _state(env, run_id)) in final and s, timeout, f"flow run {run_id}", every=2)


def _task_states(env: dict, run_id: str) -> dict[str, list[str]]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read(client):
        return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))

    out: dict[str, list[str]] = {}
    for tr in _api(env, read):
        out.setdefault(tr.name, []).append(tr.state.name)
    return out


def test_cli_then_deployment_hits_then_kd_change(server, tmp_path):
    """The easy world's config (configs/easy.yaml: the demo's pipeline at a third of its time), in a
    temporary runs directory."""
    env, runs = server["env"], tmp_path / "runs"
    cfg = yaml.safe_load((ROOT / "configs" / "easy.yaml").read_text())
    cfg |= {"name": "shared", "runs_dir": str(runs), "tags": ["test"]}
    cfg["teacher"]["path"] = str(ROOT / cfg["teacher"]["path"])
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(cfg))

    # 1. The CLI, ephemeral, with its own Prefect home: every stage runs.
    cli_env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "cli-home"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    cli_env.pop("PREFECT_API_URL", None)
    (tmp_path / "cli-home").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(path)],
        cwd=ROOT,
        env=cli_env,
        capture_output=True,
        text=True,
        # A guard against a hang, not a speed check: the full demo took 653 s here on a quiet 2-core
        # machine, and over 900 s with other work beside it.
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0/9 stages were cache hits" in proc.stdout

    # 2. The same config as a deployment run through the worker (another Prefect home): all hits.
    run_id = _run_deployment(env, "compress-pipeline/compress", cfg)
    assert _wait_final(env, run_id) == "COMPLETED", (server["logs"] / "worker.log").read_text()[-3000:]
    states = _task_states(env, run_id)
    stages = {"prepare", "prune", "generate", "distill_student", "distill_sft"}
    assert set(states) == stages | {f"evaluate_{m}" for m in ("teacher", "pruned", "student", "sft")}, states
    assert all(s == "Cached" for names in states.values() for s in names), states
    flow_run = _api(env, lambda c: c.read_flow_run(run_id))
    assert flow_run.name == "shared" and "test" in flow_run.tags

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def artifacts(client):
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )

    arts = {a.key: a for a in _api(env, artifacts)}
    assert {"compress-report", "compress-results", "compress-summary"} <= set(arts), list(arts)
    assert "KD student" in arts["compress-report"].data
    data = arts["compress-results"].data  # a table artifact: its rows, as JSON text from the API
    table = json.loads(data) if isinstance(data, str) else data
    assert isinstance(table, list) and {r["model"] for r in table} == {"teacher", "pruned", "sft", "student"}, data
    assert str(runs / "shared") in arts["compress-summary"].data

    # 3. Only the KD settings change: only the KD student is re-trained and re-evaluated (the SFT
    # baseline does not read them, so it stays a hit).
    changed = cfg | {"distill": cfg["distill"] | {"kd_weight": 0.8}}
    run_id = _run_deployment(env, "compress-pipeline/compress", changed)
    assert _wait_final(env, run_id) == "COMPLETED"
    states = _task_states(env, run_id)
    for stage in ("prepare", "prune", "generate", "distill_sft", "evaluate_teacher", "evaluate_pruned", "evaluate_sft"):
        assert states[stage] == ["Cached"], (stage, states)
    assert states["distill_student"] == states["evaluate_student"] == ["Completed"], states


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X"):
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_cancel_while_generate_is_serving(server, tmp_path, tiny_model_dir):
    env, runs = server["env"], tmp_path / "runs"
    cfg = _config(runs, tiny_model_dir, "cancel-me", n_train=20000)
    cfg["generate"]["max_tokens"] = 16
    run_id = _run_deployment(env, "compress-pipeline/compress", cfg)
    vllm_log = runs / "cancel-me" / "logs" / "vllm-server.log"
    _wait(
        lambda: vllm_log.is_file() and "Application startup complete" in vllm_log.read_text(),
        600,
        "the vLLM server of the generate stage",
    )
    tree = _descendants(server["worker"].pid)
    vllm = [p for p in tree if "vllm.entrypoints" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert vllm, "no vLLM server process under the worker"
    cmd = Path(f"/proc/{vllm[0]}/cmdline").read_text().split("\0")
    port = int(cmd[cmd.index("--port") + 1])

    _cli(env, "flow-run", "cancel", run_id)
    assert _wait_final(env, run_id, timeout=180) == "CANCELLED", _api(env, lambda c: c.read_flow_run(run_id)).state
    _wait(lambda: not any(_alive(p) for p in tree), 60, "every process of the cancelled run to exit")
    assert _port_free(port), f"port {port} still held"
