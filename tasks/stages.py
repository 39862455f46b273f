"""Prefect tasks: thin wrappers over dit_core stage functions. They pass params dicts and paths, never tensors."""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE

from dit_core import generate_diffs as gd
from dit_core.config import Params, params_from_dict
from dit_core.lora import DiffModel
from dit_core.models import LoadedModel, load_model
from dit_core.stages import run_download, run_make_data, stage_paths


def _params(params: dict) -> Params:
    return params_from_dict(params, "flow parameters")


@task(name="download", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def download(params: dict) -> dict:
    """Fetch the base model (retried: downloads fail transiently)."""
    return run_download(_params(params))


@task(name="make_data", cache_policy=NO_CACHE)
def make_data(params: dict) -> dict:
    """Write the behaviour data for every diff."""
    return run_make_data(_params(params))


@functools.lru_cache(maxsize=1)
def _wrapped_model(path: str, device: str, dtype: str, modules: str) -> tuple[LoadedModel, DiffModel]:
    # One model per worker process, wrapped once and reused by every shard task it runs.
    lm = load_model(path, device, dtype)
    return lm, DiffModel(lm.model, modules)


@task(name="prepare_diffs", cache_policy=NO_CACHE)
def prepare_diffs(params: dict) -> int:
    """Check the diff store's identity; returns the number of shards."""
    p = _params(params)
    paths = stage_paths(p)
    lm, _ = _wrapped_model(str(paths.model), p.model.device, p.model.dtype, p.diffs.modules)
    return gd.prepare_run(p, lm, paths.behavior, paths.diffs)


@task(name="train_shard", task_run_name="train_shard-{index}", cache_policy=NO_CACHE)
def train_shard(params: dict, index: int) -> str:
    """Train one shard of T diffs (skipped when already complete): the unit that maps onto a cluster."""
    p = _params(params)
    paths = stage_paths(p)
    lm, dm = _wrapped_model(str(paths.model), p.model.device, p.model.dtype, p.diffs.modules)
    return gd.train_shard(p, lm, paths.behavior, paths.diffs, index, dm)


@task(name="finalize_diffs", cache_policy=NO_CACHE)
def finalize_diffs(params: dict, n_shards: int, statuses: list[str], seconds: float) -> dict:
    """Join shard rows into the manifest and summarise the behaviour checks."""
    p = _params(params)
    trained = statuses.count("trained")
    extra = {"shards_trained": trained, "shards_skipped": n_shards - trained, "seconds": round(seconds, 1),
             "seconds_per_diff": round(seconds / (trained * p.diffs.diffs_per_batch), 2) if trained else None}
    return gd.finalize_run(stage_paths(p).diffs, n_shards, extra)
