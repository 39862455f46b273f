"""Stage functions: one pure function per pipeline stage, reading and writing the paths below.

    data/models/<model>/            download
    data/behaviors/<behavior>/      make_data, one folder per behaviour of `behaviors`
    data/diffs/<store>/             generate_diffs (shards + manifest.parquet), one store per behaviour
                                    (hidden_topic: diffs.run, news: news.run)

Prefect tasks (tasks/) and the CLI (flows/cli.py) call these; nothing here knows about orchestration.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import functools

from dit_core.behaviors import Behavior, get_behavior

from dit_core.config import Params, resolved_yaml
from dit_core.io import atomic_path, compare_record, write_json_atomic
from dit_core.modeling.models import compute_context, fetch_model, load_model, model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePaths:
    """Where each stage's outputs live for a given Params."""

    model: Path
    behaviors: dict[str, Path]  # behaviour name -> its make-data folder
    stores: dict[str, Path]  # behaviour name -> its diff store
    reports: Path

    @property
    def behavior(self) -> Path:
        """The first behaviour's data folder (the only one in a single-behaviour run)."""
        return next(iter(self.behaviors.values()))

    @property
    def diffs(self) -> Path:
        """The first behaviour's diff store."""
        return next(iter(self.stores.values()))


def behavior_dir(p: Params, name: str) -> Path:
    """The make-data folder of behaviour `name`: <paths.data>/behaviors/<name>/."""
    return Path(p.paths.data) / "behaviors" / name


def stage_paths(p: Params) -> StagePaths:
    """The stage output paths implied by params.yaml."""
    data = Path(p.paths.data)
    behaviors = [get_behavior(name) for name in p.behaviors]
    return StagePaths(
        model=model_dir(p.model, data / "models"),
        behaviors={b.name: behavior_dir(p, b.name) for b in behaviors},
        stores={b.name: data / "diffs" / b.store_name(p) for b in behaviors},
        reports=Path(p.paths.reports),
    )


@functools.lru_cache(maxsize=1)
def wrapped_model(path: str, device: str, dtype: str, modules: str):
    """(LoadedModel, DiffModel): one model per process, wrapped once and reused by every shard it trains."""
    from dit_core.modeling.lora import DiffModel

    lm = load_model(path, device, dtype)
    return lm, DiffModel(lm.model, modules)


RESOLVED_PARAMS = "params.resolved.yaml"


def write_resolved_params(p: Params, folder: str | Path) -> Path:
    """The params a run used (profiles, overrides and git commit included), written into `folder`."""
    path = Path(folder) / RESOLVED_PARAMS
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(resolved_yaml(p))
    return path


def run_download(p: Params) -> dict:
    """Fetch the base model into data/models/<name> (a second run does nothing and says so)."""
    t0 = time.time()
    path, fetched = fetch_model(p.model, Path(p.paths.data) / "models")
    msg = f"model ready at {path}" if fetched else f"{path} already holds {p.model.source}:{p.model.id}; nothing to do"
    log.info(msg)
    return {"model_dir": str(path), "fetched": fetched, "seconds": round(time.time() - t0, 1), "message": msg}


MADE_WITH = "made_with.json"


def run_make_data(p: Params, folder: Path | None = None, id_prefix: str | None = None,
                  behavior: str | None = None) -> dict:
    """Write the data of every behaviour of `behaviors` (or only `behavior`); returns its stats (the
    behaviour's own for one, {name: stats} for several). `folder` (one behaviour only) replaces the stage's
    folder and `id_prefix` the behaviour's diff-id prefix (retraining keeps each store's ids apart).
    """
    names = [behavior] if behavior else p.behaviors
    if folder is not None and len(names) != 1:
        raise ValueError(f"run_make_data(folder=...) writes one behaviour's data; got behaviours {names}")
    out = {name: make_behavior_data(p, get_behavior(name), folder, id_prefix) for name in names}
    return out[names[0]] if len(names) == 1 else out


def make_behavior_data(p: Params, b: Behavior, folder: Path | None = None, id_prefix: str | None = None) -> dict:
    """Write one behaviour's data into `folder` (default: data/behaviors/<name>/).

    A rerun with the same data settings and model does nothing and says so; changed settings
    regenerate the data (and say which changed).
    """
    paths = stage_paths(p)
    folder = folder or behavior_dir(p, b.name)
    made_with = b.made_with(p) | ({"id_prefix": id_prefix} if id_prefix else {})
    record = folder / MADE_WITH
    changed = compare_record(record, made_with)
    if changed == [] and all((folder / f).exists() for f in b.data_files):
        stats = json.loads((folder / "stats.json").read_text())
        msg = f"{folder} already holds this behaviour data; nothing to do"
        log.info(msg)
        return stats | {"skipped": True, "message": msg}
    if changed:
        log.warning("behaviour data settings changed (%s): regenerating %s", ", ".join(changed), folder)
    record.unlink(missing_ok=True)  # until the new data is complete, no record vouches for the files
    lm = load_model(paths.model, p.model.device, p.model.dtype) if b.needs_model(p) else None
    t0 = time.time()
    folder.mkdir(parents=True, exist_ok=True)
    with compute_context(lm.device if lm else "cpu", p.model.autocast, p.model.fp32_linear):
        stats = b.make_data(p, folder, lm and lm.model, lm and lm.tokenizer, id_prefix or b.id_prefix)
    stats["seconds"] = round(time.time() - t0, 1)
    write_json_atomic(record, made_with)  # last: the commit point of a complete run
    log.info("%s data: %d diffs -> %s (%s)", b.name, stats["n_diffs"], folder, stats)
    return stats


def dataset_dir(p: Params) -> Path:
    return Path(p.paths.data) / p.paths.dataset


def interpreter_dir(p: Params) -> Path:
    return Path(p.paths.models) / "interpreter"


def run_assemble(p: Params, stores: list[Path] | None = None, test_store: Path | None = None,
                 out: Path | None = None) -> dict:
    """Join diff manifests into the train/val/test dataset (dropping diffs that failed their check).

    Without arguments: the store of every behaviour of `behaviors` into dataset_dir(p). Retraining passes its round stores, the
    benchmark store as the fixed test split and its own dataset folder.
    """
    from dit_core.data.assemble import assemble

    report = assemble(stores or list(stage_paths(p).stores.values()), out or dataset_dir(p), p.assemble, test_store)
    log.info("dataset: %s train / %s val / %s test, %s dropped (%s)", report["train"], report["val"],
             report["test"], report["dropped"], report["dropped_reasons"])
    return report


def run_train_interpreter(p: Params, log_metrics=None, dataset: Path | None = None) -> dict:
    """Train the interpreter on the assembled dataset (default dataset_dir(p)); writes models/interpreter/."""
    from dit_core.interpreter import data_parallel
    from dit_core.interpreter.training import InterpreterRecipe
    from dit_core.evaluation.report import plot_curves

    dp = data_parallel.current(p.model.device)  # under torchrun: joins the ranks, picks this rank's GPU
    lm = load_model(stage_paths(p).model, p.model.device, p.model.dtype)
    out = interpreter_dir(p)
    with compute_context(lm.device, p.model.autocast, p.model.fp32_linear):
        summary = InterpreterRecipe(p, lm, dataset or dataset_dir(p), out, log_metrics=log_metrics).run()
    if not dp.is_main:
        return summary  # rank 0 writes the reports
    reports = Path(p.paths.reports)
    reports.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "train_log.csv", reports / "train_log.csv")  # DVC plots read it here
    plot_curves(out / "train_log.csv", reports / "training_curve.png")
    return summary


def hidden_topic_questions(p: Params) -> Path:
    """The make-data questions of the hidden-topic behaviour (its 20-questions baseline asks the held-out ones)."""
    return behavior_dir(p, "hidden_topic") / "questions.parquet"


def run_evaluate(p: Params, interpreter: str | Path | None = None, dataset: Path | None = None,
                 questions: Path | None = None) -> dict:
    """Evaluate DIT and the baselines on the test split; writes reports/.

    questions: the questions.parquet of the behaviour data the test diffs were made from (its held-out
    questions); default: the make-data stage's.
    """
    from dit_core.evaluation.evaluate import evaluate

    paths = stage_paths(p)
    lm = load_model(paths.model, p.model.device, p.model.dtype)
    with compute_context(lm.device, p.model.autocast, p.model.fp32_linear):
        result = evaluate(p, lm, dataset or dataset_dir(p), interpreter or interpreter_dir(p),
                          questions or hidden_topic_questions(p), paths.reports)
    write_resolved_params(p, paths.reports)
    return result


def scaling_dir(p: Params) -> Path:
    return Path(p.paths.reports) / "scaling"


def run_scaling(p: Params, sizes: str | None = None, on_point=None) -> dict:
    """The data-scaling curve on the assembled dataset: one interpreter per training-set size.

    sizes: e.g. "16,32,all" (default: 8, 16, 32, ... and the whole train split). Writes reports/scaling/.
    """
    import polars as pl

    from dit_core.evaluation.scaling import parse_sizes, public, scaling_curve

    paths = stage_paths(p)
    ds = dataset_dir(p)
    if not (ds / "dataset.parquet").exists():
        raise FileNotFoundError(f"{ds / 'dataset.parquet'} is missing; run `dit stage assemble` first")
    n_train = pl.read_parquet(ds / "dataset.parquet").filter(pl.col("split") == "train").height
    size_list = parse_sizes(sizes, n_train) if sizes else None
    lm = load_model(paths.model, p.model.device, p.model.dtype)
    out = scaling_dir(p)
    with compute_context(lm.device, p.model.autocast, p.model.fp32_linear):
        points = scaling_curve(p, lm, ds, out, size_list, hidden_topic_questions(p), on_point=on_point)
    write_resolved_params(p, out)
    return {"points": [public(pt) for pt in points],
            "table": (out / "scaling.md").read_text(), "dir": str(out)}


def cross_behavior_dir(p: Params) -> Path:
    return Path(p.paths.reports) / "cross_behavior"


def run_cross_behavior(p: Params, on_cell=None) -> dict:
    """The cross-behaviour matrix on the assembled multi-behaviour dataset (dit_core/evaluation/cross.py):
    one interpreter per behaviour and one on all of them, each scored on every behaviour. Writes
    reports/cross_behavior/."""
    from dit_core.evaluation.cross import cross_behavior

    ds = dataset_dir(p)
    if not (ds / "dataset.parquet").exists():
        raise FileNotFoundError(f"{ds / 'dataset.parquet'} is missing; run the pipeline with several behaviours "
                                "first (e.g. dit run --profile mixture)")
    lm = load_model(stage_paths(p).model, p.model.device, p.model.dtype)
    out = cross_behavior_dir(p)
    with compute_context(lm.device, p.model.autocast, p.model.fp32_linear):
        result = cross_behavior(p, lm, ds, out, hidden_topic_questions(p), on_cell=on_cell)
    write_resolved_params(p, out)
    return result | {"table": (out / "matrix.md").read_text(), "dir": str(out)}


def transfer_dir(p: Params) -> Path:
    """The transfer report of grid `transfer.grid`: <paths.reports>/transfer/<grid>/."""
    return Path(p.paths.reports) / "transfer" / p.transfer.grid


def transfer_data_dir(p: Params) -> Path:
    """The transfer grid's data, diff stores and datasets, one folder per variant: <paths.data>/transfer/<grid>/."""
    return Path(p.paths.data) / "transfer" / p.transfer.grid


def run_transfer(p: Params, on_cell=None) -> dict:
    """The transfer report (dit_core/evaluation/transfer.py): every variant's diffs made in its own store, one
    interpreter per row trained on some variants, DIT scored on every variant's test diffs; all resumed.
    Writes reports/transfer/<grid>/."""
    from dit_core.evaluation.transfer import transfer

    run_download(p)  # the base model (nothing to do when it is there)
    lm = load_model(stage_paths(p).model, p.model.device, p.model.dtype)
    out = transfer_dir(p)
    with compute_context(lm.device, p.model.autocast, p.model.fp32_linear):
        result = transfer(p, lm, transfer_data_dir(p), out, on_cell=on_cell)
    write_resolved_params(p, out)
    return result | {"table": (out / "matrix.md").read_text(), "dir": str(out)}
