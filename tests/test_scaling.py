"""The data-scaling curve on the toy diffs: nested training subsets, one interpreter per size, DIT scored
on the same test split; finished points are skipped on a rerun; bad sizes are refused before any work."""

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from conftest import tiny_overrides
from dit_core.data.assemble import assemble
from dit_core.config import load_params
from dit_core.modeling.models import load_model
from dit_core.evaluation.scaling import default_sizes, parse_sizes, scaling_curve
from test_interpreter import make_toy_store
from conftest import PARAMS, section


def test_sizes_parse_and_clip():
    assert parse_sizes("32, 8,all,8", n_train=20) == [8, 20]
    assert parse_sizes("1000", n_train=20) == [20]
    assert default_sizes(40) == [8, 16, 32, 40]
    assert default_sizes(5) == [5]
    with pytest.raises(ValueError, match="'x' is neither"):
        parse_sizes("8,x", n_train=20)
    with pytest.raises(ValueError, match="at least 1"):
        parse_sizes("0", n_train=20)


def test_cli_refuses_bad_sizes_before_work():
    from flows.cli import app

    res = CliRunner().invoke(app, ["scaling", "--sizes", "ten"])
    assert res.exit_code == 2
    assert "scaling.sizes = 'ten'" in res.output and "e.g. 16,32,all" in res.output


def test_scaling_curve_on_toy_diffs(tiny_model_dir, tmp_path):
    lm = load_model(tiny_model_dir, "cpu", "float32")
    make_toy_store(tmp_path / "diffs", lm)
    assemble([tmp_path / "diffs"], tmp_path / "ds", section("assemble", val_fraction=0.1, test_fraction=0.25, min_trigger_hit=0.5,
                                      max_wrong_prefix_hit=0.5, max_no_trigger_hit=0.25))
    n_train = pl.read_parquet(tmp_path / "ds" / "dataset.parquet").filter(pl.col("split") == "train").height
    questions = tmp_path / "questions.parquet"
    pl.DataFrame({"question": [f"Question {i}?" for i in range(6)], "heldout": [True] * 6}).write_parquet(questions)
    p = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp_path / "data") + [
        "interpreter.rank=8", "interpreter.alpha=8", "interpreter.lr=0.01", "interpreter.epochs=20",
        "interpreter.batch_size=4", "interpreter.warmup_steps=2", "interpreter.patience=20",
        "interpreter.n_samples=1", "eval.max_new_tokens=6", "eval.n_boot=200"])

    seen = []
    points = scaling_curve(p, lm, tmp_path / "ds", tmp_path / "scaling", [2, 1000], questions,
                           on_point=seen.append, progress=False)
    assert [pt["n_train"] for pt in points] == [2, n_train]  # 1000 is clipped to the train split
    assert points[0]["train_ids"] == points[1]["train_ids"][:2]  # nested subsets
    assert len(seen) == 2 and points[0]["n_train_labels"] <= 2
    # The toy rule is learnable: with every training diff (20 epochs; 30 reach 1.0) DIT ranks the right
    # label first for most held-out diffs (0.75 measured here), far above chance.
    big = points[1]
    assert big["top1"] >= 0.5 and big["exact"] >= 0.5, big
    assert big["top1_chance"] == pytest.approx(0.25) and big["n_test"] > 0
    # Every point was scored on the same test split, with only the dit method.
    for n in (2, n_train):
        preds = pl.read_parquet(tmp_path / "scaling" / f"n{n:05d}" / "predictions.parquet")
        assert set(preds["method"]) == {"dit"} and preds.height == big["n_test"]
    curve = json.loads((tmp_path / "scaling" / "scaling.json").read_text())
    assert [c["n_train"] for c in curve] == [2, n_train]
    assert "| 2 |" in (tmp_path / "scaling" / "scaling.md").read_text()
    assert (tmp_path / "scaling" / "scaling.png").stat().st_size > 0

    # A rerun with the same settings skips finished points (point.json untouched) ...
    done = tmp_path / "scaling" / "n00002" / "point.json"
    before = done.stat().st_mtime_ns
    again = scaling_curve(p, lm, tmp_path / "ds", tmp_path / "scaling", [2], questions, progress=False)
    assert done.stat().st_mtime_ns == before and again[0]["top1"] == points[0]["top1"]
    # ... and changed interpreter settings redo them.
    p_short = p.model_copy(update={"interpreter": p.interpreter.model_copy(update={"epochs": 1})})
    redone = scaling_curve(p_short, lm, tmp_path / "ds", tmp_path / "scaling", [2], questions, progress=False)
    assert done.stat().st_mtime_ns != before and redone[0]["epochs"] == 1
