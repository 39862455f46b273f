"""`dvc repro` in a temporary git+DVC repo on the tiny model: the whole pipeline runs, a second
repro does nothing, and changing an interpreter param reruns only training and evaluation."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import pipeline_overrides
from dit_core.config import load_params, params_file_text
from conftest import PARAMS

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.mark.timeout(900)
def test_dvc_repro_runs_skips_and_reruns(tiny_model_dir, tmp_path, prefect_server, mlflow_uri):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copytree(ROOT / "dit_core", repo / "dit_core", ignore=shutil.ignore_patterns("__pycache__"))
    params = load_params(PARAMS, pipeline_overrides(tiny_model_dir, "."))
    (repo / "params.yaml").write_text(params_file_text(params))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": mlflow_uri}
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)

    first = _run(["dvc", "repro"], repo, env)
    assert _ran(first) == ["download", "make_data", "generate_diffs", "assemble", "train_interpreter", "evaluate",
                           "scaling"]
    assert (repo / "reports" / "scaling" / "scaling.json").exists()
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert "dit" in metrics and "top1" in metrics["dit"]
    assert (repo / "dvc.lock").exists()

    second = _run(["dvc", "repro"], repo, env)
    assert _ran(second) == [] and "up to date" in second

    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["interpreter"]["lr"] = 0.002
    (repo / "params.yaml").write_text(yaml.safe_dump(p))
    third = _run(["dvc", "repro"], repo, env)
    assert _ran(third) == ["train_interpreter", "evaluate", "scaling"]
