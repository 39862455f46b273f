"""bench/bench_thread_teams.py: each arrangement runs where it says, in its own process."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_thread_teams as bench  # noqa: E402


def test_each_arrangement_runs_in_its_thread_and_is_timed(tmp_path):
    out = tmp_path / "teams.json"
    res = bench.main(["--steps", "2", "--rounds", "1", "--rows", "8", "--hidden", "64", "--layers", "2",
                      "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert set(res["ms_per_step"]) == set(bench.ARRANGEMENTS)
    assert all(ms > 0 for ms in res["ms_per_step"].values())
    assert res["ratio_to_one_thread"]["one-thread"] == 1.0
    threads = res["threads"]
    assert threads["one-thread"]["main_thread"] is True
    assert threads["worker-thread"]["main_thread"] is False and threads["two-teams"]["main_thread"] is False
    if res["torch_threads"] > 1:  # the main thread's team is alive while the second thread works
        assert threads["two-teams"]["os_threads"] > threads["worker-thread"]["os_threads"]
