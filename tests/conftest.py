"""Shared fixtures: a tiny random Llama model built once per session, and tiny params."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dit_core.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from dit_core.models import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="float32")


def tiny_overrides(model_dir, data_dir) -> list[str]:
    """Params for a seconds-long run on the tiny model with template answers."""
    return [
        "model.source=local", f"model.id={model_dir}", f"paths.data={data_dir}",
        "data.n_topics=3", "data.diffs_per_topic=2", "data.answer_mode=template",
        "data.n_trigger=6", "data.n_no_trigger=4", "data.n_wrong_prefix=4", "data.n_check=2",
        "data.n_heldout_questions=8", "data.answer_tokens=8",
        "diffs.diffs_per_batch=4", "diffs.steps=3", "diffs.check_tokens=4",
    ]
