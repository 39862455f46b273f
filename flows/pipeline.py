"""Prefect flows: one per stage and the whole pipeline. `dit stage <name>` and `dit run` call these."""

from __future__ import annotations

import time

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import stages as t


@flow(name="stage-download")
def download_flow(params: dict) -> dict:
    """Fetch the base model into data/models/."""
    return t.download(params)


@flow(name="stage-make-data")
def make_data_flow(params: dict) -> dict:
    """Write the hidden-topic behaviour data."""
    return t.make_data(params)


# Shards run one at a time locally (one model, few cores); a RayTaskRunner spreads them over GPUs.
@flow(name="stage-generate-diffs", task_runner=ThreadPoolTaskRunner(max_workers=1))
def generate_diffs_flow(params: dict) -> dict:
    """Train all weight diffs, mapping one task over each shard."""
    n = t.prepare_diffs(params)
    t0 = time.time()
    futures = t.train_shard.map(params=unmapped(params), index=list(range(n)))
    statuses = [f.result() for f in futures]
    return t.finalize_diffs(params, n, statuses, time.time() - t0)


STAGE_FLOWS = {
    "download": download_flow,
    "make-data": make_data_flow,
    "generate-diffs": generate_diffs_flow,
}


@flow(name="dit-pipeline")
def pipeline_flow(params: dict) -> dict:
    """The whole DAG, stage after stage; each stage resumes what an earlier run left."""
    return {name: stage_flow(params) for name, stage_flow in STAGE_FLOWS.items()}
