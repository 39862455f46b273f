"""The Prefect pipeline on the tiny model with a temporary sqlite MLflow: every stage runs, every stage
logs a run, the interpreter is registered and gets `champion`, and it can be loaded and used from the
registry. The champion gate refuses a worse model."""


import mlflow
import polars as pl
import pytest
from mlflow import MlflowClient

from conftest import pipeline_overrides
from dit_core.config import load_params
from conftest import PARAMS


@pytest.fixture()
def params(tiny_model_dir, tmp_path, mlflow_uri):
    return load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path)).model_dump()


def test_pipeline_flow_end_to_end(prefect_server, params, tmp_path, monkeypatch):
    import threading

    from dit_core.diffs import generate as gd
    from flows.pipeline import pipeline_flow

    threads, train_shard = [], gd.train_shard

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return train_shard(*args, **kwargs)

    monkeypatch.setattr(gd, "train_shard", recording)
    out = pipeline_flow(params)
    assert out["generate-diffs"]["n_diffs"] == 6
    # the shards train in the flow's thread, where the other stages ran torch (bench/bench_thread_teams.py)
    assert threads and set(threads) == {threading.get_ident()}
    assert out["assemble"]["test"] == 3  # stratified split_by diff: one held-out diff of each of 3 topics
    assert out["evaluate"]["champion"]["promoted"] is True
    reports = tmp_path / "reports"
    for f in ("metrics.json", "predictions.parquet", "table.md", "scores.png", "training_curve.png"):
        assert (reports / f).exists(), f
    preds = pl.read_parquet(reports / "predictions.parquet")
    assert set(preds["method"]) == set(params["eval"]["methods"]) - {"generated_story"}  # a news baseline

    client = MlflowClient()
    runs = mlflow.search_runs(experiment_names=["dit"], output_format="list")
    stages = {r.data.tags.get("dit.stage") for r in runs}
    assert {"pipeline", "download", "make_data", "generate_diffs", "assemble", "train_interpreter", "evaluate"} <= stages
    parent = next(r for r in runs if r.data.tags["dit.stage"] == "pipeline")
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs if r is not parent)
    champ = client.get_model_version_by_alias("dit-interpreter", "champion")
    assert str(champ.version) == "1" and champ.tags["eval.top1"]

    model = mlflow.pyfunc.load_model("models:/dit-interpreter@champion")
    ds = pl.read_parquet(tmp_path / "data" / "dit_dataset" / "dataset.parquet")
    shard = str(tmp_path / "data" / "diffs" / "hidden_topic" / "shard-00000.safetensors")
    preds = model.predict([ds["diff_id"][0], shard])
    assert len(preds) == 1 + 4 and all(isinstance(p, str) for p in preds)


def test_champion_gate_refuses_worse_model(mlflow_uri, params):
    from tasks.tracking import champion_gate, configure

    configure(params)
    client = MlflowClient()
    client.create_registered_model("dit-interpreter")
    for _ in range(2):
        client.create_model_version("dit-interpreter", "file:///nowhere")
    assert champion_gate(params, "1", 0.6, "setA", "top1")["promoted"]
    refused = champion_gate(params, "2", 0.4, "setA", "top1")
    assert not refused["promoted"] and "does not beat" in refused["reason"]
    assert str(client.get_model_version_by_alias("dit-interpreter", "champion").version) == "1"
    # Another test set: the champion is re-scored there before comparing.
    better = champion_gate(params, "2", 0.7, "setB", "top1", score_champion=lambda uri: 0.5)
    assert better["promoted"] and str(client.get_model_version_by_alias("dit-interpreter", "champion").version) == "2"


def test_failed_stage_marks_run_failed(mlflow_uri, params):
    from tasks.tracking import stage_run

    with pytest.raises(ValueError):
        with stage_run(params, "assemble"):
            raise ValueError("boom: bad input")
    run = mlflow.search_runs(experiment_names=["dit"], output_format="list")[0]
    assert run.info.status == "FAILED" and "boom: bad input" in run.data.tags["dit.error"]
