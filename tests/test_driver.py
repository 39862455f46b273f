"""One driver: a wall-clock budget for diff generation, and the stage code run without Prefect (and
without MLflow when tracking is off) through `dit run --engine local`."""

import json
import subprocess
import sys

import mlflow
import polars as pl
import pytest
import torch
import yaml

from conftest import PARAMS, ROOT, pipeline_overrides, tiny_overrides
from dit_core.config import load_params
from dit_core.diffs.generate import ShardBudget, run_shards


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_budget_stops_after_the_last_shard_that_fits():
    clock = Clock()

    def train(i):
        clock.t += 10.0  # every shard takes 10 s
        return "trained"

    statuses, stopped = run_shards(5, train, budget_s=25, clock=clock)
    # after 2 shards 20 s are spent; a third (10 s) would end at 30 > 25
    assert statuses == ["trained", "trained", "not_run", "not_run", "not_run"]
    assert "diffs.budget_s=25" in stopped and "2 trained shards" in stopped
    assert run_shards(3, lambda i: "trained", budget_s=None, clock=clock) == (["trained"] * 3, None)


def test_budget_counts_only_trained_shards_and_always_starts_the_first():
    clock = Clock()
    budget = ShardBudget(1.0, clock)
    clock.t = 5.0  # already past the budget, but nothing has been trained yet
    assert budget.allows_next()
    budget.spent(0.5)
    assert not budget.allows_next()
    # skipped (already complete) shards cost nothing and do not use up the budget
    statuses, stopped = run_shards(3, lambda i: "skipped", budget_s=1.0, clock=clock)
    assert statuses == ["skipped"] * 3 and stopped is None


def test_out_of_memory_ends_generation_and_keeps_finished_shards():
    def train(i):
        if i == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "trained"

    statuses, stopped = run_shards(3, train)
    assert statuses == ["trained", "not_run", "not_run"]
    assert "shard 1" in stopped and "diffs.diffs_per_batch" in stopped
    with pytest.raises(ValueError, match="not memory"):
        run_shards(2, lambda i: (_ for _ in ()).throw(ValueError("not memory")))


def test_budgeted_generation_keeps_its_shards_and_a_rerun_finishes(tiny_model_dir, tmp_path):
    from tasks.stage_runs import download, generate_diffs, make_data

    base = tiny_overrides(tiny_model_dir, tmp_path / "data") + ["tracking.enabled=false", "diffs.diffs_per_batch=2"]
    params = load_params(PARAMS, base + ["diffs.budget_s=0.001"]).model_dump()
    download(params)
    make_data(params)
    first = generate_diffs(params)
    assert first["n_diffs"] == 2 and first["shards_trained"] == 1 and first["shards_not_run"] == 2
    assert "budget" in first["stopped"]
    store = tmp_path / "data" / "diffs" / "hidden_topic"
    shard0 = (store / "shard-00000.safetensors").read_bytes()
    assert pl.read_parquet(store / "manifest.parquet").height == 2

    # no budget and smaller micro-batches (the same gradient): the rest is trained, shard 0 is kept
    rest = generate_diffs(load_params(PARAMS, base + ["diffs.max_batch_tokens=64"]).model_dump())
    assert rest["n_diffs"] == 6 and rest["shards_skipped"] == 1 and rest["shards_trained"] == 2
    assert rest["stopped"] is None
    assert (store / "shard-00000.safetensors").read_bytes() == shard0


# As if prefect and mlflow were not installed: `import` fails and importlib.util.find_spec says None.
BLOCK = """
import sys
sys.modules.update(prefect=None, mlflow=None)
sys.argv = ['dit', *sys.argv[1:]]
from flows.cli import app
app()
"""


def test_local_engine_runs_the_pipeline_without_prefect_or_mlflow(tiny_model_dir, tmp_path):
    args = ["run", "--engine", "local"]
    for o in pipeline_overrides(tiny_model_dir, tmp_path) + ["tracking.enabled=false"]:
        args += ["--set", o]
    res = subprocess.run([sys.executable, "-c", BLOCK, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert "dit" in metrics
    resolved = yaml.safe_load((tmp_path / "reports" / "params.resolved.yaml").read_text())
    assert resolved["tracking"]["enabled"] is False and resolved["run"]["git_commit"]
    assert not (tmp_path / "mlflow.db").exists()


def test_a_profile_run_logs_its_resolved_params(tiny_model_dir, tmp_path, mlflow_uri):
    from tasks.stage_runs import run_pipeline

    profile = tmp_path / "tiny-eval.yaml"
    profile.write_text("eval:\n  seed: 3\n")
    params = load_params(PARAMS, pipeline_overrides(tiny_model_dir, tmp_path), profiles=[str(profile)])
    run_pipeline(params.model_dump())
    runs = mlflow.search_runs(experiment_names=["dit"], output_format="list")
    assert {r.data.tags["dit.stage"] for r in runs} >= {"pipeline", "generate_diffs", "evaluate"}
    for r in runs:
        assert r.data.params["profile"] == str(profile)
        assert r.data.params["git_commit"] == params.run.git_commit
        assert "autocast.decision" in r.data.params and "fp32_linear.decision" in r.data.params
        logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{r.info.run_id}/params.resolved.yaml"))
        assert logged["eval"]["seed"] == 3 and logged["run"]["profiles"] == [str(profile)]
    beside = yaml.safe_load((tmp_path / "reports" / "params.resolved.yaml").read_text())
    assert beside["run"]["profiles"] == [str(profile)]
