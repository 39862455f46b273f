"""bench/paper_scale.sh (the GPU recipe: paper's setting at scale + data-scaling curve), dry-run on CPU with
the tiny model: the pipeline and the curve both run to the end and write their reports."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import pipeline_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_paper_scale_script_dry_run(tiny_model_dir, tmp_path, prefect_server, mlflow_uri):
    extra = " ".join(f"--set {o}" for o in pipeline_overrides(tiny_model_dir, tmp_path))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "DIFFS_PER_BATCH": "4", "MAX_BATCH_TOKENS": "2048",
           "SIZES": "1,all", "EXTRA": extra}
    res = subprocess.run(["bash", str(ROOT / "bench" / "paper_scale.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "assemble.split_by=topic" in res.stdout and "== scaling curve took" in res.stdout
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert {"dit", "base_question", "no_diff"} <= set(metrics)
    # split_by topic: 3 topics x 2 diffs -> 1 test topic, 1 val topic, 1 train topic (2 diffs)
    points = json.loads((tmp_path / "reports" / "scaling" / "scaling.json").read_text())
    assert [pt["n_train"] for pt in points] == [1, 2]
    assert all(0.0 <= pt["top1"] <= 1.0 and pt["n_test"] == 2 for pt in points)
