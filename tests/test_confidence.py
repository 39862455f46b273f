"""Answers that know when they are unsure: the confidence score, the threshold chosen on val, the
out-of-distribution diffs, and describe/evaluate on a trained tiny interpreter."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from conftest import PARAMS, section, tiny_overrides
from dit_core.config import load_params
from dit_core.data.assemble import assemble
from dit_core.interpreter.confidence import (
    accuracy_coverage,
    choose_threshold,
    delta_norms,
    from_scores,
    is_unsure,
    label_scores,
    noise_diffs,
    zero_diffs,
)
from dit_core.modeling.models import load_model
from test_interpreter import LABELS, make_toy_store


def test_confidence_is_monotone_in_the_margin():
    labels = ["a", "b", "c", "d"]
    margins = np.linspace(0, 8, 17)
    scores = np.array([[-3.0 + m, -3.0, -5.0, -9.0] for m in margins])
    c = from_scores(scores, labels)
    assert c.best == ["a"] * len(margins)
    assert np.allclose(c.margin, margins)
    assert (np.diff(c.confidence) > 0).all() and c.confidence[-1] > 0.99
    # the probability of the best label over the vocabulary: softmax of the log-likelihoods
    assert np.isclose(c.confidence[0], np.exp(-3) / np.exp([-3, -3, -5, -9]).sum())
    # two labels: sigmoid of the margin; ordering of columns does not matter
    two = from_scores(np.array([[0.0, 2.0], [1.0, 1.0]]), ["x", "y"])
    assert two.best == ["y", "x"] and np.allclose(two.confidence, [1 / (1 + np.exp(-2)), 0.5])
    with pytest.raises(ValueError, match="NaN/Inf"):
        from_scores(np.array([[0.0, np.nan]]), ["x", "y"])
    with pytest.raises(ValueError, match="expected"):
        from_scores(np.zeros((2, 3)), ["x", "y"])


def test_threshold_on_made_up_val_scores():
    conf = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    ok = [1, 1, 1, 0, 1, 1, 0, 0]
    # kept sets by confidence: accuracies 1, 1, 1, .75, .8, .833, .714, .625
    r = choose_threshold(conf, ok, 0.8)
    assert r["reached"] and r["threshold"] == 0.5 and r["coverage"] == 6 / 8 and np.isclose(r["accuracy"], 5 / 6)
    assert choose_threshold(conf, ok, 0.9)["threshold"] == 0.8
    assert choose_threshold(conf, ok, 0.6)["threshold"] == 0.3  # every answer kept
    none = choose_threshold([0.9, 0.8], [0, 0], 0.5)
    assert not none["reached"] and none["threshold"] is None and none["coverage"] == 0.0
    # ties: a threshold keeps every answer as confident, so it never splits a tie
    tied = choose_threshold([0.9, 0.7, 0.7, 0.2], [1, 1, 0, 0], 0.75)
    assert tied["threshold"] == 0.9 and tied["coverage"] == 0.25
    assert is_unsure(0.49, r) and not is_unsure(0.5, r) and is_unsure(0.99, none)
    assert is_unsure(0.5, None) is None and is_unsure(None, r) is None
    curve = accuracy_coverage(conf, ok)
    assert curve["accuracy"][:3] == [1.0, 1.0, 1.0] and curve["coverage"][-1] == 1.0
    assert np.isclose(curve["area"], np.mean(np.cumsum(ok) / np.arange(1, 9)))


def test_noise_diffs_match_each_module_norm_and_zero_diffs():
    g = torch.Generator().manual_seed(3)
    A = {"m1": torch.randn(3, 2, 5, generator=g), "m2": torch.randn(3, 2, 7, generator=g) * 10}
    B = {"m1": torch.randn(3, 4, 2, generator=g), "m2": torch.randn(3, 6, 2, generator=g)}
    A["m2"][1] = 0  # a module a diff leaves alone stays zero
    nA, nB = noise_diffs(A, B, seed=1)
    for m in A:
        assert nA[m].shape == A[m].shape and nB[m].shape == B[m].shape and nA[m].dtype == A[m].dtype
        want = torch.linalg.matrix_norm(B[m].double() @ A[m].double())
        got = torch.linalg.matrix_norm(nB[m].double() @ nA[m].double())
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (m, got, want)
        assert torch.allclose(delta_norms(A[m], B[m]), want, rtol=1e-6)
        assert not torch.allclose(nA[m], A[m])
    assert torch.equal(noise_diffs(A, B, seed=1)[0]["m1"], nA["m1"])  # seeded
    zA, zB = zero_diffs(A, B, n=2)
    assert zA["m1"].shape == (2, 2, 5) and zB["m2"].shape == (2, 6, 2)
    assert all(not v.any() for v in [*zA.values(), *zB.values()])


def _recipe(tiny_model_dir, tmp, *overrides):
    from dit_core.interpreter.training import InterpreterRecipe

    lm = load_model(tiny_model_dir, "cpu", "float32")
    make_toy_store(tmp / "diffs", lm, per_label=4)
    assemble([tmp / "diffs"], tmp / "ds", section("assemble", val_fraction=0.25, test_fraction=0.25,
                                                  min_trigger_hit=0.5, max_wrong_prefix_hit=0.5, max_no_trigger_hit=0.25))
    p = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp / "data") + list(overrides))
    recipe = InterpreterRecipe(p, lm, tmp / "ds", tmp / "interp", progress=False)
    recipe.setup()
    return recipe


def test_each_epoch_adds_no_behaviour_rows(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path, "interpreter.null_rate=0.5", "interpreter.null_answer=nothing")
    n_train = recipe.train_df.height
    assert recipe.n_null == round(0.5 * n_train) and recipe.spec.null_answer == "nothing"
    rows = recipe._epoch_rows(0)
    nulls = rows.filter(pl.col("null"))
    assert rows.height == n_train + recipe.n_null and nulls.height == recipe.n_null
    assert sorted(rows.filter(~pl.col("null"))["diff_id"]) == sorted(recipe.train_df["diff_id"])  # each once
    assert (nulls["label"] == "nothing").all() and set(nulls["diff_id"]) <= set(recipe.train_df["diff_id"])
    assert ("hidden_topic", "nothing") in recipe.examples
    assert rows.equals(recipe._epoch_rows(0)) and not rows.equals(recipe._epoch_rows(1))  # seeded per epoch
    # a batch gives the no-behaviour rows the zero diff and the null answer, the others their own diff
    batch = pl.concat([nulls.head(1), rows.filter(~pl.col("null")).head(1)])
    A, B, _, ex = recipe._batch(batch)
    real = recipe.bank.get(batch["diff_id"].to_list())
    for m in A:
        assert not A[m][0].any() and not B[m][0].any()
        assert torch.equal(A[m][1], real[0][m][1]) and torch.equal(B[m][1], real[1][m][1])
    assert real[0][m][0].any()  # the bank's tensors are not modified
    label = recipe.train_df.filter(pl.col("diff_id") == batch["diff_id"][1])["label"][0]
    assert ex == [recipe.examples[("hidden_topic", "nothing")], recipe.examples[("hidden_topic", label)]]
    plain = _recipe(tiny_model_dir, tmp_path / "off", "interpreter.null_rate=0")
    assert plain.n_null == 0 and plain.spec.null_answer is None and "null" not in plain._epoch_rows(0).columns


def test_a_null_answer_that_is_a_label_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=f"null_answer={LABELS[0]!r} is the label of"):
        _recipe(tiny_model_dir, tmp_path, "interpreter.null_rate=0.25", f"interpreter.null_answer={LABELS[0]}")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    from dit_core.interpreter.training import InterpreterRecipe

    tmp = tmp_path_factory.mktemp("confidence")
    lm = load_model(tiny_model_dir, "cpu", "float32")
    make_toy_store(tmp / "diffs", lm, per_label=6)
    assemble([tmp / "diffs"], tmp / "ds", section("assemble", val_fraction=0.2, test_fraction=0.2, min_trigger_hit=0.5,
                                                  max_wrong_prefix_hit=0.5, max_no_trigger_hit=0.25))
    # 40 epochs: in 20 the tiny model does not learn to answer "none" for the zero diff
    p = load_params(PARAMS, tiny_overrides(tiny_model_dir, tmp / "data") + [
        "interpreter.rank=8", "interpreter.alpha=8", "interpreter.lr=0.01", "interpreter.epochs=40",
        "interpreter.batch_size=4", "interpreter.warmup_steps=2", "interpreter.patience=40",
        "interpreter.n_samples=0", "interpreter.unsure_accuracy=0.75", "eval.methods=[dit]", "eval.n_boot=100",
        "eval.max_new_tokens=6"])
    summary = InterpreterRecipe(p, lm, tmp / "ds", tmp / "interp", progress=False).run()
    return p, lm, tmp, summary


def test_training_records_labels_and_the_val_threshold(trained):
    p, lm, tmp, summary = trained
    spec = json.loads((tmp / "interp" / "interpreter.json").read_text())
    # the training labels, then the answer trained on no-behaviour diffs (interpreter.null_answer)
    assert spec["labels"] == {"hidden_topic": sorted(LABELS) + ["none"]} and spec["null_answer"] == "none"
    assert summary["n_null"] == round(p.interpreter.null_rate * summary["n_train"]) > 0
    cal = spec["calibration"]["hidden_topic"]
    ds = pl.read_parquet(tmp / "ds" / "dataset.parquet")
    assert cal["n"] == ds.filter(pl.col("split") == "val").height and cal["target"] == 0.75
    assert cal["reached"] and 0 < cal["threshold"] <= 1 and cal["accuracy"] >= 0.75 and cal["coverage"] > 0
    assert summary["calibration"] == spec["calibration"]


def test_describe_returns_confidence_and_unsure(trained):
    from dit_core.interpreter.describe import describe

    p, lm, tmp, _ = trained
    ds = pl.read_parquet(tmp / "ds" / "dataset.parquet").filter(pl.col("split") == "test").sort("diff_id")
    shard = tmp / "diffs" / sorted(p.name for p in (tmp / "diffs").glob("*.safetensors"))[0]
    got = describe(lm, tmp / "interp", ds["diff_id"].to_list(), [tmp / "diffs"], max_new_tokens=6)
    assert got.columns == ["diff", "description", "confidence", "margin", "best_label", "unsure", "no_behavior"]
    assert got["confidence"].is_between(1 / (len(LABELS) + 1), 1).all() and got["unsure"].dtype == pl.Boolean
    # the zero diff is answered "none" (no behaviour), a test diff with its label
    from dit_core.diffs.bank import DiffBank
    from dit_core.diffs.store import DiffShard, write_shard
    from dit_core.modeling.lora import DiffModel

    A, B, _ = DiffBank(ds, DiffModel(lm.model).shapes(), lm.sha256).get(ds["diff_id"].head(1).to_list())
    zA, zB = zero_diffs(A, B)
    both = DiffShard({m: torch.cat([zA[m], A[m]]) for m in A}, {m: torch.cat([zB[m], B[m]]) for m in B},
                     lm.name, lm.sha256, 1, 1.0, ["zero", "real"])
    write_shard(tmp / "zero_and_real.safetensors", both)
    two = describe(lm, tmp / "interp", [str(tmp / "zero_and_real.safetensors")], max_new_tokens=6)
    assert two["description"].to_list()[0] == "none" and two["no_behavior"].to_list() == [True, False], two
    # the CLI says so in words
    from typer.testing import CliRunner

    from dit_core.modeling.models import fetch_model
    from flows.cli import app

    fetch_model(section("model", source="local", id=str(p.model.id)), tmp / "cli" / "models")
    args = ["--params", str(PARAMS), "--set", "model.source=local", "--set", f"model.id={p.model.id}",
            "--set", f"paths.data={tmp / 'cli'}", "--set", "model.device=cpu"]
    res = CliRunner().invoke(app, ["describe", str(tmp / "zero_and_real.safetensors"), "--interpreter",
                                   str(tmp / "interp"), *args])
    assert res.exit_code == 0, res.output
    zero_line = next(line for line in res.output.splitlines() if "#zero" in line)
    said = "unsure (best guess: none)" if two["unsure"][0] else "no behaviour it knows (none)"
    assert said in zero_line and "no behaviour" not in next(l for l in res.output.splitlines() if "#real" in l)
    threshold = json.loads((tmp / "interp" / "interpreter.json").read_text())["calibration"]["hidden_topic"]["threshold"]
    assert (got["unsure"] == (got["confidence"] < threshold)).all()
    acc = (got["best_label"] == ds["label"]).mean()
    assert acc >= 0.5, got  # chance 0.25
    # the description and the best label agree where the interpreter is sure
    sure = got.filter(~pl.col("unsure"))
    assert (sure["description"] == sure["best_label"]).mean() >= 0.5, sure
    # a whole diff file works as well (one row per diff in it)
    assert describe(lm, tmp / "interp", [str(shard)], max_new_tokens=2)["confidence"].null_count() == 0


def test_interpreter_without_recorded_labels_still_describes(trained, tmp_path):
    import shutil

    from dit_core.interpreter.describe import describe

    p, lm, tmp, _ = trained
    old = shutil.copytree(tmp / "interp", tmp_path / "old", ignore=shutil.ignore_patterns("checkpoints*"))
    spec = json.loads((old / "interpreter.json").read_text())
    calibrated = dict(spec)
    for key in ("labels", "calibration"):
        spec.pop(key)
    (old / "interpreter.json").write_text(json.dumps(spec))  # as saved before they were recorded
    diff_id = pl.read_parquet(tmp / "ds" / "dataset.parquet")["diff_id"][0]
    got = describe(lm, old, [diff_id], [tmp / "diffs"], max_new_tokens=4)
    assert got["description"][0] and got["confidence"][0] is None and got["unsure"][0] is None
    # `dit calibrate` records them afterwards: the same as training did, weights untouched
    from dit_core.interpreter.adapter import read_interpreter
    from dit_core.interpreter.confidence import recalibrate

    assert recalibrate(lm, old, tmp / "ds", 0.75, batch_size=4) == calibrated["calibration"]
    again = json.loads((old / "interpreter.json").read_text())
    assert again == calibrated and read_interpreter(old, lm.sha256)[0].labels == calibrated["labels"]
    with pytest.raises(ValueError, match="trained on dataset version"):
        other = tmp_path / "other"
        other.mkdir()
        pl.read_parquet(tmp / "ds" / "dataset.parquet").head(5).write_parquet(other / "dataset.parquet")
        recalibrate(lm, old, other, 0.75)
    # labels without a threshold (no val diffs): a confidence, unsure unknown
    calibrated["calibration"] = {}
    (old / "interpreter.json").write_text(json.dumps(calibrated))
    got = describe(lm, old, [diff_id], [tmp / "diffs"], max_new_tokens=4)
    assert 0 < got["confidence"][0] <= 1 and got["unsure"][0] is None


def test_zero_diff_scores_as_no_diff(trained):
    from dit_core.diffs.bank import DiffBank
    from dit_core.interpreter.adapter import load_interpreter
    from dit_core.modeling.lora import DiffModel

    p, lm, tmp, _ = trained
    dm = DiffModel(lm.model)
    interp = load_interpreter(dm, tmp / "interp", lm.tokenizer, lm.sha256)
    ds = pl.read_parquet(tmp / "ds" / "dataset.parquet")
    A, B, scale = DiffBank(ds, dm.shapes(), lm.sha256).get(ds["diff_id"].head(2).to_list())
    zA, zB = zero_diffs(A, B)
    q = interp.spec.question
    with_zero = label_scores(interp, lm.tokenizer, q, LABELS, (zA, zB, scale[:1]), [0])
    without = label_scores(interp, lm.tokenizer, q, LABELS, None, [0])
    real = label_scores(interp, lm.tokenizer, q, LABELS, (A, B, scale), [0])
    assert np.allclose(with_zero, without, atol=1e-4) and not np.allclose(real, without, atol=1e-2)


def test_evaluate_reports_coverage_and_confident_wrong_rates(trained):
    from dit_core.evaluation.evaluate import evaluate

    p, lm, tmp, _ = trained
    questions = tmp / "questions.parquet"
    pl.DataFrame({"question": ["What is this?"], "heldout": [True]}).write_parquet(questions)
    evaluate(p, lm, tmp / "ds", tmp / "interp", questions, tmp / "reports")
    metrics = json.loads((tmp / "reports" / "metrics.json").read_text())
    conf = metrics["dit"]["confidence"]
    n_test = pl.read_parquet(tmp / "ds" / "dataset.parquet").filter(pl.col("split") == "test").height
    assert len(conf["curve"]["coverage"]) == n_test and 0 <= conf["area"] <= 1
    assert conf["calibrated"] and conf["threshold"] is not None and 0 <= conf["test_coverage"] <= 1
    assert set(conf["ood"]) == {"noise", "zero"}  # one behaviour: no other behaviour's diffs
    assert conf["ood"]["noise"]["n"] == n_test and conf["ood"]["zero"]["n"] == 1
    # trained to answer "none" on no-behaviour diffs: random ones are answered so more often than the test
    # diffs, the zero diff is; a diff answered "none" is never counted as confidently wrong
    assert conf["null_answer"] == "none" and conf["n_labels"] == len(LABELS) + 1
    assert conf["ood"]["zero"]["answered_null"] == 1.0 and conf["ood"]["zero"]["confident_wrong"] == 0.0
    assert conf["ood"]["noise"]["answered_null"] > conf["test_answered_null"], conf
    assert 'answered "none"' in (tmp / "reports" / "table.md").read_text()
    for o in conf["ood"].values():
        assert 0 <= o["confident_wrong"] <= 1 and 0 < o["mean_confidence"] <= 1
    table = (tmp / "reports" / "table.md").read_text()
    assert "Confidence of DIT's answers" in table and "zero diff" in table
    assert (tmp / "reports" / "coverage.png").stat().st_size > 1000


def test_the_table_says_why_no_answer_is_confident():
    from dit_core.evaluation.report import confidence_table

    base = {"area": 0.0, "threshold": None, "target": 0.9, "test_coverage": 0.0, "test_accuracy_kept": None,
            "test_confident_wrong": 0.0, "n_labels": 31, "ood": {}}
    assert "no set of validation answers reached accuracy 0.90" in confidence_table(base | {"calibrated": True})
    assert "No unsure threshold recorded" in confidence_table(base | {"calibrated": False})
    assert "No unsure threshold" not in confidence_table(base | {"calibrated": True, "threshold": 0.8})
