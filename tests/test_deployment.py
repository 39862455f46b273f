"""prefect.yaml deploys against a local Prefect server and a real process worker on the `gpu` pool runs
the pipeline deployment end to end on the tiny model."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import pipeline_overrides
from dit_core.config import load_params, params_file_text
from conftest import PARAMS

ROOT = Path(__file__).resolve().parents[1]


def _cli(args, cwd, env, timeout=300):
    res = subprocess.run(["prefect", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def copy_project(proj: Path) -> Path:
    """A project folder as a deployment sees it: the flows and tasks packages and prefect.yaml."""
    proj.mkdir()
    for name in ("flows", "tasks"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", proj)
    return proj


@pytest.mark.timeout(900)
def test_deploy_and_run_through_process_worker(tiny_model_dir, tmp_path, prefect_server, mlflow_uri):
    proj = copy_project(tmp_path / "proj")
    params = load_params(PARAMS, pipeline_overrides(tiny_model_dir, proj))
    (proj / "params.yaml").write_text(params_file_text(params))
    env = {**os.environ, "DIT_PROJECT_DIR": str(proj), "PYTHONPATH": str(proj)}

    _cli(["work-pool", "create", "gpu", "--type", "process"], proj, env)
    out = _cli(["--no-prompt", "deploy", "--all"], proj, env)
    assert "dit-pipeline/pipeline" in out and "dit-retrain/scheduled-retraining" in out
    schedules = _cli(["deployment", "inspect", "dit-retrain/scheduled-retraining"], proj, env)
    assert "0 3 * * 1" in schedules

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_run = run_deployment("dit-pipeline/pipeline", timeout=0)
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", "gpu", "--limit", "1"], cwd=proj, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        with get_client(sync_client=True) as client:
            while time.time() < deadline:
                state = client.read_flow_run(flow_run.id).state
                if state.is_final():
                    break
                time.sleep(3)
    finally:
        worker.terminate()
        log = worker.communicate(timeout=30)[0]
    assert state.is_completed(), f"{state.type}: {state.message}\n{log[-6000:]}"
    assert (proj / "reports" / "metrics.json").exists()
