"""bench/bench_lora_delta.py: every method computes the project's layer output and gradients."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_lora_delta as bench  # noqa: E402


def test_every_method_matches_the_project_layer(tmp_path):
    out = tmp_path / "delta.json"
    res = bench.main(["--shapes", "tiny", "--T", "3", "--rows", "2", "--seq", "5", "--repeats", "1",
                      "--out", str(out)])
    assert json.loads(out.read_text()) == res
    runs = {(r["order"], r["method"]): r for r in res["runs"]}
    assert set(runs) == {(o, m) for o in ("mixed", "grouped") for m in bench.METHODS}
    for (order, method), r in runs.items():
        if method != "base":
            assert r["max_rel_err"] < 1e-5, (order, method, r)
            assert r["aten_ops_per_shape_set"] > runs[(order, "base")]["aten_ops_per_shape_set"]
    # Rows in diff order take the one-bmm-per-diff path: fewer ops than the per-row gather.
    assert runs[("grouped", "project")]["aten_ops_per_shape_set"] < runs[("mixed", "project")]["aten_ops_per_shape_set"]


def test_bf16_autocast_runs_and_stays_close(tmp_path):
    res = bench.main(["--shapes", "tiny", "--T", "2", "--rows", "2", "--seq", "4", "--repeats", "1",
                      "--autocast", "bf16", "--out", str(tmp_path / "d.json")])
    assert res["autocast"] == "bf16"
    errs = [r["max_rel_err"] for r in res["runs"] if r["method"] != "base"]
    assert errs and max(errs) < 0.05
