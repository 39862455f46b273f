"""The registered interpreter is portable: registered from project A through a real MLflow server, A
deleted, loaded from directory B, it finds its base model through the model cache and describes a PEFT
adapter. A cached base model whose weights differ from the recorded ones is refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import polars as pl
import pytest
from conftest import pipeline_overrides

from dit_core.modeling.models import (
    SOURCE_FILE,
    ModelSourceError,
    resolve_recorded_model,
    weights_sha256,
)

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path_factory):
    """An `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts) outside every project dir."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers to start and reap
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server on {url} did not answer within 120 s: "
                                   f"{(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        # The server runs uvicorn as a child: end the whole session it leads (its id is proc.pid).
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _peft_adapter(model_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from dit_core.modeling.models import load_model

    base = load_model(model_dir, "cpu", "float32").model
    torch.manual_seed(3)
    # Strong enough to move the tiny random model off its greedy "\n\n..." (an empty description).
    cfg = LoraConfig(r=2, lora_alpha=16, init_lora_weights=False,
                     target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(base, cfg)
    pm.save_pretrained(out)
    return out


def test_registered_interpreter_loads_in_another_directory(prefect_server, mlflow_server, tiny_model_dir,
                                                           tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from dit_core.config import load_params
    from flows.pipeline import pipeline_flow

    a, b, cache = tmp_path / "project_a", tmp_path / "project_b", tmp_path / "model_cache"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("DIT_MODEL_CACHE", str(cache))
    monkeypatch.chdir(a)
    params = load_params(PARAMS_FILE, pipeline_overrides(tiny_model_dir, a)).model_dump()
    out = pipeline_flow(params)
    assert out["evaluate"]["champion"]["promoted"] is True

    uri = "models:/dit-interpreter@champion"
    flavor = mlflow.models.get_model_info(uri).flavors["python_function"]
    model_config = flavor["config"]
    text = json.dumps(model_config)
    assert str(a) not in text and str(a.resolve()) not in text, model_config
    assert model_config["base_model"]["sha256"] == weights_sha256(tiny_model_dir)
    assert model_config["stores"] == ["data/diffs/hidden_topic"]
    logged = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "logged")))
    assert (logged / flavor["code"] / "dit_core" / "interpreter" / "describe.py").is_file()
    reqs = (logged / "requirements.txt").read_text()
    assert all(f"{pkg}==" in reqs for pkg in ("torch", "transformers", "peft", "safetensors", "polars")), reqs

    store = a / "data" / "diffs" / "hidden_topic"
    moved_store = shutil.copytree(store, b / "elsewhere" / "diffs")
    diff_id = pl.read_parquet(store / "manifest.parquet")["diff_id"][0]
    shutil.rmtree(a)
    monkeypatch.chdir(b)
    adapter = _peft_adapter(tiny_model_dir, b / "adapter")

    model = mlflow.pyfunc.load_model(uri)
    preds = model.predict([str(adapter)])
    assert len(preds) == 1 and isinstance(preds[0], str) and preds[0].strip(), preds
    assert len(list(cache.glob(f"*/{tiny_model_dir.name}/{SOURCE_FILE}"))) == 1
    # Stored diff ids: the recorded project-relative store is absent here; a caller-given one is used.
    with pytest.raises(FileNotFoundError, match=re.escape(diff_id)):
        model.predict([diff_id])
    assert len(model.predict([diff_id], params={"stores": [str(moved_store)]})) == 1
    assert str(MlflowClient().get_model_version_by_alias("dit-interpreter", "champion").version) == "1"


def _identity(model_dir: Path, sha: str) -> dict:
    return {"source": "local", "id": str(model_dir), "revision": None, "sha256": sha}


def test_resolve_fetches_once_and_refuses_other_weights(tiny_model_dir, tmp_path):
    sha = weights_sha256(tiny_model_dir)
    path = resolve_recorded_model(_identity(tiny_model_dir, sha), tmp_path)
    assert path.is_relative_to(tmp_path) and weights_sha256(path) == sha
    stamp = (path / SOURCE_FILE).stat().st_mtime_ns
    assert resolve_recorded_model(_identity(tiny_model_dir, sha), tmp_path) == path
    assert (path / SOURCE_FILE).stat().st_mtime_ns == stamp  # cached: not fetched again

    tampered = "0" * 64
    # Same identity with another sha256 is another cache entry: fetched, then refused.
    with pytest.raises(ModelSourceError) as e:
        resolve_recorded_model(_identity(tiny_model_dir, tampered), tmp_path)
    msg = str(e.value)
    assert tampered in msg and sha in msg and str(tmp_path) in msg


def test_resolve_refuses_tampered_cache(tiny_model_dir, tmp_path):
    sha = weights_sha256(tiny_model_dir)
    path = resolve_recorded_model(_identity(tiny_model_dir, sha), tmp_path)
    weights = next(path.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match="differ from the recorded") as e:
        resolve_recorded_model(_identity(tiny_model_dir, sha), tmp_path)
    assert str(path) in str(e.value) and sha in str(e.value)


def test_resolve_names_missing_local_model(tmp_path):
    gone = tmp_path / "gone-model"
    with pytest.raises(ModelSourceError, match="does not exist on this machine") as e:
        resolve_recorded_model(_identity(gone, "ab" * 32), tmp_path / "cache")
    assert str(gone) in str(e.value) and "DIT_MODEL_CACHE" in str(e.value)
