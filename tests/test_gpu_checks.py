"""bench/gpu_checks.py (the device checks to run on a new GPU machine) runs its code paths on the CPU and passes."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_checks  # noqa: E402


def test_gpu_checks_on_cpu(tmp_path):
    out = tmp_path / "checks.json"
    report = gpu_checks.main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert report["ok"] and report["equal"]["ok"] and report["bank"]["ok"] and report["bf16"]["ok"]
    assert report["syncs"] == {"per_step": 0, "where": []}
    assert report["bf16"]["loss_last_steps"] < report["bf16"]["loss_first_step"]
