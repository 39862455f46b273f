"""bench/gpu_scale.py (the time-boxed paper-setting run for a lent GPU), dry-run on CPU with the tiny model."""

import json
import sys
from pathlib import Path

import pytest

from conftest import pipeline_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_scale  # noqa: E402


def _args(tiny_model_dir, root, **kw):
    tiny = pipeline_overrides(tiny_model_dir, root) + [
        "data.n_topics=6", "data.diffs_per_topic=2", "data.gen_batch_size=8", "diffs.diffs_per_batch=4",
        "diffs.max_batch_tokens=2048", "interpreter.batch_size=4", "assemble.test_fraction=0.34"]
    args = ["--out", str(root / "out"), "--deadline", str(kw.get("deadline", 3600)),
            "--diffs-until", str(kw.get("diffs_until", 3600)), "--sizes", "2,all",
            "--evaluate", str(kw.get("evaluate", 0))]
    return args + [a for o in tiny for a in ("--set", o)]


def test_gpu_scale_dry_run(tiny_model_dir, tmp_path):
    assert gpu_scale.main(_args(tiny_model_dir, tmp_path)) == 0
    steps = json.loads((tmp_path / "out" / "progress.json").read_text())
    names = [s["step"] for s in steps]
    assert names[:3] == ["start", "download", "make_data"] and names[-1] == "done"
    # the recipe is the project's params.yaml under the paper-setting list (not the built-in defaults)
    assert steps[0]["params"] == str(Path(gpu_scale.ROOT) / "params.yaml")
    # 6 topics x 2 diffs in round-robin order, 4 per shard: 3 shards, all trained
    shards = [s for s in steps if s["step"] == "shard"]
    assert [s["index"] for s in shards] == [0, 1, 2] and all(s["status"] == "trained" for s in shards)
    for s in shards:  # where a shard's time went, for the next lease's diagnosis
        parts = [s[k] for k in ("prepare_s", "train_s", "check_s", "write_s")]
        assert all(x >= 0 for x in parts) and s["train_s"] > 0 and sum(parts) <= s["seconds"] + 0.1
    assemble = next(s for s in steps if s["step"] == "assemble")
    assert assemble["split_by"] == "topic" and assemble["n_diffs"] == 12
    points = json.loads((tmp_path / "out" / "scaling_points.json").read_text())
    assert [pt["n_train"] for pt in points][0] == 2 and len(points) == 2
    assert (tmp_path / "out" / "scaling.md").exists()
    assert "evaluate" not in names  # not asked for
    # a rerun resumes: every shard skipped, the curve's points kept
    assert gpu_scale.main(_args(tiny_model_dir, tmp_path)) == 0
    steps = json.loads((tmp_path / "out" / "progress.json").read_text())  # both calls' entries
    assert [s["status"] for s in steps if s["step"] == "shard"] == ["trained"] * 3 + ["skipped"] * 3
    assert [s["step"] for s in steps].count("start") == 2 and steps[-1]["step"] == "done"
    assert [s["n_diffs"] for s in steps if s["step"] == "assemble"] == [12, 12]


def test_gpu_scale_diffs_in_one_call_curve_in_the_next(tiny_model_dir, tmp_path):
    """The lease plan: call 3 makes diffs only (--sizes none), call 4 runs the curve on them."""
    args = _args(tiny_model_dir, tmp_path)
    args[args.index("--sizes") + 1] = "none"
    assert gpu_scale.main(args) == 0
    steps = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert [s["step"] for s in steps][-2:] == ["assemble", "done"]
    assert not (tmp_path / "out" / "scaling_points.json").exists()
    assert gpu_scale.main(_args(tiny_model_dir, tmp_path, diffs_until=0)) == 0
    steps = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert [s["status"] for s in steps if s["step"] == "shard"] == ["trained"] * 3 + ["skipped"] * 3
    assert len(json.loads((tmp_path / "out" / "scaling_points.json").read_text())) == 2


def test_gpu_scale_no_time_for_a_shard(tiny_model_dir, tmp_path):
    with pytest.raises(RuntimeError, match="no shard finished"):
        gpu_scale.main(_args(tiny_model_dir, tmp_path, diffs_until=0))


def test_gpu_scale_out_of_memory_keeps_finished_shards(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from dit_core.diffs import generate as gd

    real = gd.train_shard

    def train_shard(p, lm, behavior_dir, diffs_dir, index, dm=None, timings=None):
        if index == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(p, lm, behavior_dir, diffs_dir, index, dm, timings)

    monkeypatch.setattr(gd, "train_shard", train_shard)
    assert gpu_scale.main(_args(tiny_model_dir, tmp_path)) == 0
    steps = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert [s["index"] for s in steps if s["step"] == "shard"] == [0, 1]
    oom = next(s for s in steps if s["step"] == "shard_out_of_memory")
    assert oom["index"] == 2 and "diffs_per_batch" in oom["fix"]
    assert next(s for s in steps if s["step"] == "assemble")["n_diffs"] == 8 and steps[-1]["step"] == "done"


def test_gpu_scale_evaluates_every_method_when_time_allows(tiny_model_dir, tmp_path):
    assert gpu_scale.main(_args(tiny_model_dir, tmp_path, evaluate=10)) == 0
    steps = json.loads((tmp_path / "out" / "progress.json").read_text())
    ev = next(s for s in steps if s["step"] == "evaluate")
    points = json.loads((tmp_path / "out" / "scaling_points.json").read_text())
    assert ev["n_train"] == points[-1]["n_train"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"dit", "base_question", "base_question_trigger", "no_diff", "shuffled_diff"} <= set(metrics)
    # the same interpreter and test split as the curve's last point: the same DIT top-1
    assert metrics["dit"]["top1"] == points[-1]["top1"]


def test_gpu_scale_skips_evaluation_without_time(tiny_model_dir, tmp_path):
    assert gpu_scale.main(_args(tiny_model_dir, tmp_path, evaluate=10**6)) == 0
    steps = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert any(s["step"] == "evaluate_skipped" for s in steps) and not (tmp_path / "out" / "metrics.json").exists()
