"""Stage functions: one pure function per pipeline stage, reading and writing the paths below.

    data/models/<model>/            download
    data/behaviors/hidden_topic/    make_data
    data/diffs/<diffs.run>/         generate_diffs (shards + manifest.parquet)

Prefect tasks (tasks/) and the CLI (flows/cli.py) call these; nothing here knows about orchestration.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dit_core.behavior_data import BEHAVIOR, make_hidden_topic_data
from dit_core.config import Params
from dit_core.models import fetch_model, load_model, model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePaths:
    """Where each stage's outputs live for a given Params."""

    model: Path
    behavior: Path
    diffs: Path
    reports: Path


def stage_paths(p: Params) -> StagePaths:
    """The stage output paths implied by params.yaml."""
    data = Path(p.paths.data)
    return StagePaths(
        model=model_dir(p.model, data / "models"),
        behavior=data / "behaviors" / BEHAVIOR,
        diffs=data / "diffs" / p.diffs.run,
        reports=Path(p.paths.reports),
    )


def run_download(p: Params) -> dict:
    """Fetch the base model into data/models/<name> (a second run does nothing and says so)."""
    t0 = time.time()
    path, fetched = fetch_model(p.model, Path(p.paths.data) / "models")
    msg = f"model ready at {path}" if fetched else f"{path} already holds {p.model.source}:{p.model.id}; nothing to do"
    log.info(msg)
    return {"model_dir": str(path), "fetched": fetched, "seconds": round(time.time() - t0, 1), "message": msg}


def run_make_data(p: Params) -> dict:
    """Write the hidden-topic behaviour data (answers distilled from the base model)."""
    paths = stage_paths(p)
    lm = None if p.data.answer_mode == "template" else load_model(paths.model, p.model.device, p.model.dtype)
    t0 = time.time()
    stats = make_hidden_topic_data(p.data, paths.behavior, lm and lm.model, lm and lm.tokenizer)
    stats["seconds"] = round(time.time() - t0, 1)
    log.info("behaviour data: %d diffs, %d samples, kept fraction %.2f -> %s", stats["n_diffs"],
             stats["n_samples"], stats["kept_fraction"], paths.behavior)
    return stats
