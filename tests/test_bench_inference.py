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


def test_under_bf16_each_path_is_compared_with_fp32():
    res = bench.main(["--tiny", "--autocast", "bf16", "--diffs", "2", "--prompts-per-diff", "3", "--new-tokens",
                      "3", "--batch", "4", "--transcript-pairs", "1"])
    assert res["autocast"].startswith("bf16")
    g, c = res["generation"], res["closed_set"]
    assert set(g["same_text_as_fp32"]) == {"shared_prefix", "transformers"}
    assert all(0 <= v <= 1 for v in g["same_text_as_fp32"].values())
    d = c["max_abs_logprob_diff_to_fp32"]
    # bf16 rounds: neither path equals fp32, and both stay near it
    assert 0 < d["packed"] < 1.0 and 0 < d["one_row_per_label"] < 1.0
    m = c["mean_abs_logprob_diff_to_fp32"]
    assert 0 < m["packed"] <= d["packed"] and 0 < m["one_row_per_label"] <= d["one_row_per_label"]
