"""bench/bench_inference.py: both paths of each comparison run and agree."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_inference as bench  # noqa: E402


def test_both_paths_run_and_agree(tmp_path):
    out = tmp_path / "inference.json"
    res = bench.main(["--tiny", "--diffs", "3", "--prompts-per-diff", "4", "--new-tokens", "4", "--batch", "5",
                      "--transcript-pairs", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    g, c = res["generation"], res["closed_set"]
    assert g["prompts"] == 12 and g["shared_prefix_path"] is True and g["shared_prefix_tokens"] >= 8
    assert g["same_text"] == 1.0 and all(s > 0 for s in g["seconds"].values())
    assert c["same_top1"] is True and c["max_abs_logprob_diff"] < 1e-4 and all(s > 0 for s in c["seconds"].values())
