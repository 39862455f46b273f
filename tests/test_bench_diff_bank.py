"""bench/bench_diff_bank.py runs end to end (tiny sizes) and reports both lookup paths."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_diff_bank  # noqa: E402


def test_bench_diff_bank_smoke(tmp_path):
    out = tmp_path / "bank.json"
    res = bench_diff_bank.main(["--diffs", "8", "--per-shard", "4", "--batch", "4", "--epochs", "1",
                                "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["modules"] == 210 and res["streamed_ms_per_batch"] > 0 and res["preloaded_ms_per_batch"] > 0
