"""Scheduled retraining on the tiny model, without Prefect: each round adds a store and the train split
grows, the benchmark split stays the same and out of training, earlier stores are never touched, a
stopped round resumes as the same round, `champion` moves only on a strictly higher benchmark score,
and a DVC repository gets the new store tracked (`dit retrain --engine local`)."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient

from conftest import PARAMS, pipeline_overrides
from dit_core.config import ConfigError, load_params

RETRAIN = ["retrain.new_diffs=4", "retrain.benchmark_diffs=4", "eval.methods=[dit]", "diffs.check=false",
           "interpreter.epochs=1"]


def _overrides(model_dir, root) -> list[str]:
    return pipeline_overrides(model_dir, root) + RETRAIN + [f"retrain.dir={root}/corpus"]


def _params(model_dir, root, *extra) -> dict:
    return load_params(PARAMS, _overrides(model_dir, root) + list(extra)).model_dump()


def _files(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _dataset(root: Path) -> pl.DataFrame:
    return pl.read_parquet(root / "corpus" / "dataset" / "dataset.parquet")


def _ids(ds: pl.DataFrame, *splits) -> set[str]:
    return set(ds.filter(pl.col("split").is_in(splits))["diff_id"])


@pytest.mark.timeout(600)
def test_rounds_grow_the_corpus_keep_the_benchmark_and_gate_the_champion(tiny_model_dir, tmp_path, mlflow_uri,
                                                                         monkeypatch, caplog):
    from tasks import tracking
    from tasks.stage_runs import RETRAIN_STEPS, run_retrain

    params = _params(tiny_model_dir, tmp_path)
    scores, gates = [0.5, 0.5, 0.75], []  # equal in round 2 (kept), higher in round 3 (moves)
    real_gate = tracking.champion_gate

    def gate(params, version, score, test_set, scorer, score_champion=None):
        gates.append({"version": version, "test_set": test_set})
        return real_gate(params, version, scores[len(gates) - 1], test_set, scorer, score_champion)

    monkeypatch.setattr(tracking, "champion_gate", gate)
    root = tmp_path / "corpus"

    caplog.set_level("INFO", logger="dit_core")
    r1 = run_retrain(params)
    assert r1["round"] == 1 and r1["data"]["round"]["n_diffs"] == 4
    assert r1["evaluate"]["champion"]["promoted"] and "no champion yet" in r1["evaluate"]["champion"]["reason"]
    assert "not inside a DVC repository" in r1["finish"]["dvc"]["skipped"]
    assert "not inside a DVC repository" in caplog.text
    ds1 = _dataset(tmp_path)
    store1, bench = root / "hidden_topic-round-001", root / "hidden_topic-benchmark"
    before = {"store1": _files(store1), "bench": _files(bench)}

    # Round 2 stops at evaluation; the rerun is round 2 again and reuses its registered interpreter.
    def boom(*args, **kwargs):
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_retrain(params, {**RETRAIN_STEPS, "evaluate": boom})
    r2 = run_retrain(params)
    assert r2["round"] == 2 and r2["plan"]["resumed"] and r2["train-interpreter"].get("reused")
    assert r2["data"]["benchmark"]["skipped"] and r2["data"]["round"]["skipped"]
    ds2 = _dataset(tmp_path)

    # The corpus grows and keeps every earlier train diff; earlier stores are bit-for-bit unchanged.
    assert _ids(ds1, "train") < _ids(ds2, "train")
    assert r2["assemble"]["train"] > r1["assemble"]["train"]
    assert {"store1": _files(store1), "bench": _files(bench)} == before
    # The benchmark split is identical in both rounds and none of its diffs or topics is trained on.
    test1, test2 = (ds.filter(pl.col("split") == "test").drop("split").sort("diff_id") for ds in (ds1, ds2))
    assert test1.height == 4 and test1.equals(test2)
    assert all(d.startswith("bench-") for d in test1["diff_id"])
    for ds in (ds1, ds2):
        fit = ds.filter(pl.col("split").is_in(["train", "val"]))
        assert not set(fit["diff_id"]) & set(test1["diff_id"])
        assert not set(fit["label"].str.to_lowercase()) & set(test1["label"].str.to_lowercase())
    assert r1["assemble"]["test_set"] == r2["assemble"]["test_set"] == gates[0]["test_set"] == gates[1]["test_set"]

    # Champion: an equal score keeps it, a strictly higher one moves it.
    assert not r2["evaluate"]["champion"]["promoted"] and "does not beat" in r2["evaluate"]["champion"]["reason"]
    client = MlflowClient()

    def champion() -> str:
        return str(client.get_model_version_by_alias("dit-interpreter", "champion").version)

    assert champion() == r1["train-interpreter"]["registered"]["version"]
    assert len(client.search_model_versions("name='dit-interpreter'")) == 2  # the resumed round registered once
    r3 = run_retrain(params)
    assert r3["round"] == 3 and r3["evaluate"]["champion"]["promoted"]
    assert "beats champion" in r3["evaluate"]["champion"]["reason"]
    assert champion() == r3["train-interpreter"]["registered"]["version"]
    assert _ids(ds2, "train") < _ids(_dataset(tmp_path), "train")

    record = json.loads((root / "hidden_topic-round-002" / "round.json").read_text())
    assert record["round"] == 2 and record["test_set"] == r1["assemble"]["test_set"]
    assert record["champion"]["promoted"] is False
    runs = mlflow.search_runs(experiment_names=["dit"], output_format="list")
    assert {r.data.tags.get("dit.round") for r in runs if r.data.tags.get("dit.stage") == "retrain"} >= {"1", "2", "3"}


def test_round_size_must_fill_whole_topics(tiny_model_dir, tmp_path):
    from dit_core.config import params_from_dict
    from dit_core.retrain import plan_round

    p = params_from_dict(_params(tiny_model_dir, tmp_path, "retrain.new_diffs=5"))
    with pytest.raises(ConfigError, match=r"retrain.new_diffs=5 is not a multiple of data.diffs_per_topic=2.*4 or 6"):
        plan_round(p)


@pytest.mark.timeout(300)
def test_cli_round_in_a_dvc_repo_tracks_the_store(tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    (tmp_path / ".gitignore").write_text("/data/\n/models/\n/reports/\n")  # as in the project
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)
    monkeypatch.chdir(tmp_path)
    args = ["retrain", "--engine", "local", "--params", str(PARAMS)]
    for o in _overrides(tiny_model_dir, tmp_path) + ["tracking.enabled=false"]:
        args += ["--set", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "round 1 on the benchmark split" in res.output
    root = tmp_path / "corpus"
    for name in ("hidden_topic-round-001", "hidden_topic-benchmark", "dataset"):
        assert (root / f"{name}.dvc").is_file(), name
    status = subprocess.run(["dvc", "status", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True)
    assert json.loads(status.stdout) == {}
