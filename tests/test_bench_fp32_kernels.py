"""bench/bench_fp32_kernels.py: both kernels give the same products, every shape and row count reported."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_fp32_kernels as bench  # noqa: E402
from shapes import layer_shapes  # noqa: E402


def test_every_shape_is_timed_and_both_kernels_agree(tmp_path):
    out = tmp_path / "k.json"
    res = bench.main(["--shapes", "tiny", "--rows", "16", "3", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    shapes = set(layer_shapes("tiny").values())
    assert {(r["rows"], r["in"], r["out"]) for r in res["runs"]} == {(n, i, o) for n in (16, 3) for i, o in shapes}
    for r in res["runs"]:
        assert r["max_rel_err"] < 1e-5
        assert all(r[f"{k}_tflops"] > 0 for k in ("torch_forward", "onednn_forward", "torch_input_grad",
                                                  "onednn_input_grad"))
    assert "oneDNN" in res["probe"]


def test_the_larger_product_measures_both_kernels_on_the_same_product():
    ratio, seen = bench.larger_product(rows=64, width=128, repeats=2)
    assert ratio is not None and ratio > 0, seen
    assert "64x128 @ 128x128" in seen and "torch" in seen and "oneDNN" in seen
