"""Stop when told: SIGTERM during diff generation stops the process within seconds, keeps the finished
shard, marks the MLflow run KILLED and exits non-zero; a rerun resumes after the kept shard."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from conftest import PARAMS, ROOT, tiny_overrides
from dit_core.config import load_params


def _wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear in {timeout} s")


@pytest.mark.parametrize("engine", ["local", "prefect"])
def test_sigterm_during_diff_generation(engine, tiny_model_dir, tmp_path, mlflow_uri, prefect_server):
    from tasks.stage_runs import download, make_data

    # 6 shards of one diff: the signal comes once shard 0 is done and lands in a later one
    sets = tiny_overrides(tiny_model_dir, tmp_path / "data") + ["diffs.diffs_per_batch=1", "diffs.steps=40"]
    params = load_params(PARAMS, sets).model_dump()
    download(params)
    make_data(params)
    store = tmp_path / "data" / "diffs" / "hidden_topic"
    args = [sys.executable, "-m", "flows.cli", "stage", "generate-diffs", "--engine", engine,
            *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(store / "shard-00000.rows.parquet", proc)
        shard0 = (store / "shard-00000.safetensors").read_bytes()
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        stopped_in = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert stopped_in < 20, f"took {stopped_in:.1f} s to stop"
    assert "SIGTERM received" in err and "a rerun resumes" in err
    assert (store / "shard-00000.safetensors").read_bytes() == shard0  # the finished shard is kept
    done = sorted(store.glob("shard-*.rows.parquet"))
    assert len(done) < 6 and not (store / "manifest.parquet").exists(), [f.name for f in done]
    assert not list(store.glob(".*.tmp"))  # no half-written file left behind
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["dit"], output_format="list")
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and "SIGTERM" in killed[0].data.tags["dit.error"]


def test_sigkill_mid_shard_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """SIGKILL inside shard 1: shard 0 is kept byte for byte, nothing partial is visible, and the rerun's
    manifest and shards equal those of a run that was never interrupted."""
    import polars as pl

    from tasks.stage_runs import download, generate_diffs, make_data

    def setup(root):
        sets = tiny_overrides(tiny_model_dir, root / "data") + [
            "diffs.diffs_per_batch=2", "diffs.steps=300", "tracking.enabled=false"]
        params = load_params(PARAMS, sets).model_dump()
        download(params)
        make_data(params)
        return sets, params, root / "data" / "diffs" / "hidden_topic"

    sets, params, store = setup(tmp_path / "killed")
    args = [sys.executable, "-m", "flows.cli", "stage", "generate-diffs", "--engine", "local",
            *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(store / "shard-00000.rows.parquet", proc)
        shard0 = (store / "shard-00000.safetensors").read_bytes()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (store / "shard-00001.rows.parquet").exists() and not (store / "manifest.parquet").exists()
    rerun = generate_diffs(params)
    assert rerun["shards_skipped"] == 1 and rerun["shards_trained"] == 2
    assert (store / "shard-00000.safetensors").read_bytes() == shard0
    assert not list(store.glob(".*.tmp"))

    _, ref_params, ref_store = setup(tmp_path / "uninterrupted")
    generate_diffs(ref_params)
    got, want = pl.read_parquet(store / "manifest.parquet"), pl.read_parquet(ref_store / "manifest.parquet")
    # file hashes differ between processes (safetensors writes its metadata map in a per-process order);
    # the tensors and the metadata themselves are equal
    assert got.drop("shard_sha256").equals(want.drop("shard_sha256"))
    from safetensors import safe_open

    for i in range(3):
        name = f"shard-{i:05d}.safetensors"
        with safe_open(str(store / name), "pt") as a, safe_open(str(ref_store / name), "pt") as b:
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), name


def test_sigkill_during_interpreter_training_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """SIGKILL after some epochs: the rerun resumes from the last finished epoch and ends with the same
    interpreter weights as a run that was never interrupted."""
    import json

    from safetensors.torch import load_file

    from dit_core.stages import interpreter_dir
    from tasks.stage_runs import assemble, download, generate_diffs, make_data

    def setup(root):
        from conftest import pipeline_overrides

        sets = pipeline_overrides(tiny_model_dir, root) + [
            "tracking.enabled=false", "interpreter.epochs=150", "interpreter.patience=150", "interpreter.n_samples=0"]
        p = load_params(PARAMS, sets)
        params = p.model_dump()
        for stage in (download, make_data, generate_diffs, assemble):
            stage(params)
        return sets, p

    sets, p = setup(tmp_path / "killed")
    out = interpreter_dir(p)
    args = [sys.executable, "-m", "flows.cli", "stage", "train-interpreter", "--engine", "local",
            *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoints" / "state.json"
    try:
        _wait_for(state, proc)
        deadline = time.time() + 120
        while json.loads(state.read_text())["epoch"] < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = json.loads(state.read_text())["epoch"]
    assert 3 <= done < 150 and not (out / "interpreter.json").exists()  # killed mid-training, nothing final
    from dit_core.stages import run_train_interpreter

    resumed = run_train_interpreter(p)
    assert resumed["epoch"] == 150
    log = (out / "train_log.csv").read_text().splitlines()
    assert len(log) == 151  # header + one row per epoch: no epoch lost or repeated

    _, ref = setup(tmp_path / "uninterrupted")
    run_train_interpreter(ref)
    got = load_file(str(out / "interpreter.safetensors"))
    want = load_file(str(interpreter_dir(ref) / "interpreter.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
