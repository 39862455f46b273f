"""Shared fixtures: a tiny random Llama model built once per session, and tiny params."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Registry models resolve their base model through this cache: keep tests out of the home directory.
os.environ.setdefault("DIT_MODEL_CACHE", tempfile.mkdtemp(prefix="dit-model-cache-"))

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"  # the one source of defaults; tests override what they need


def section(name: str, **values):
    """One params.yaml section as its config object, with `values` replacing its keys."""
    from dit_core.config import load_params

    base = getattr(load_params(PARAMS), name)
    return type(base)(**{**base.model_dump(), **values})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dit_core.testing.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from dit_core.modeling.models import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="float32")


def tiny_overrides(model_dir, data_dir) -> list[str]:
    """Params for a seconds-long run on the tiny model with template answers."""
    return [
        "model.source=local", f"model.id={model_dir}", f"paths.data={data_dir}", "model.autocast=off",
        "data.n_topics=3", "data.diffs_per_topic=2", "data.answer_mode=template",
        "data.n_trigger=6", "data.n_no_trigger=4", "data.n_wrong_prefix=4", "data.n_check=2",
        "data.n_heldout_questions=8", "data.answer_tokens=8",
        "diffs.diffs_per_batch=4", "diffs.steps=3", "diffs.check_tokens=4",
    ]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One Prefect test server for the session; its URL is exported so `dit` subprocesses use it."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_home"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        yield url
        if old is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = old


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """A migrated sqlite MLflow database, created once (migrations take seconds) and copied per test."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{path}")
    mlflow.search_experiments()
    return path


@pytest.fixture()
def mlflow_uri(_mlflow_template, tmp_path, monkeypatch):
    """A fresh MLflow sqlite store for one test, exported as MLFLOW_TRACKING_URI."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # artifacts land under the test's directory
    return uri


def pipeline_overrides(model_dir, root) -> list[str]:
    """tiny_overrides plus settings for the interpreter and evaluation stages."""
    return tiny_overrides(model_dir, f"{root}/data") + [
        f"paths.models={root}/models", f"paths.reports={root}/reports",
        "assemble.min_trigger_hit=0", "assemble.max_wrong_prefix_hit=1", "assemble.max_no_trigger_hit=1",
        "assemble.test_fraction=0.34", "assemble.val_fraction=0.17",
        "interpreter.rank=4", "interpreter.alpha=4", "interpreter.epochs=2", "interpreter.batch_size=4",
        "interpreter.n_samples=1", "interpreter.max_new_tokens=4",
        "eval.n_questions=2", "eval.max_new_tokens=4", "eval.answer_tokens=4", "eval.n_boot=200",
        "scaling.sizes=2,all",
    ]
