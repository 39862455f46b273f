"""Each pipeline stage with its MLflow run: the bodies that Prefect tasks (tasks/stages.py) wrap and that
the plain driver (`dit run --engine local`) calls directly. They take and return params dicts and paths.

Nothing here imports Prefect, and MLflow is imported only when `tracking.enabled` is true, so a machine
with only the library's dependencies runs the same stage code:

    dit run --engine local --set tracking.enabled=false
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator

from dit_core.config import Params, params_from_dict

log = logging.getLogger("dit_core.stages")

# The pipeline's stages in DAG order: both engines walk this tuple (flows/pipeline.py, run_pipeline).
PIPELINE = ("download", "make-data", "generate-diffs", "assemble", "train-interpreter", "evaluate")


class Untracked:
    """The run handle when tracking is off: logging does nothing."""

    run = None
    run_id = None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_artifact(self, path, folder: str | None = None) -> None:
        pass


@contextmanager
def tracked(params: dict, stage: str, parent_run_id: str | None = None) -> Iterator:
    """The stage's MLflow run (tasks.tracking.stage_run), or `Untracked` without importing MLflow."""
    if not params["tracking"]["enabled"]:
        yield Untracked()
        return
    from tasks.tracking import stage_run

    with stage_run(params, stage, parent_run_id) as run:
        yield run


@contextmanager
def tracked_pipeline(params: dict, name: str = "pipeline", tags: dict | None = None) -> Iterator[str | None]:
    """The parent MLflow run of a whole pipeline or retraining round (None when tracking is off)."""
    if not params["tracking"]["enabled"]:
        yield None
        return
    from tasks.tracking import pipeline_run

    with pipeline_run(params, name, tags) as parent:
        yield parent


def _params(params: dict) -> Params:
    return params_from_dict(params, "flow parameters")


def download(params: dict, parent_run_id: str | None = None) -> dict:
    """Fetch the base model."""
    from dit_core.stages import run_download

    with tracked(params, "download", parent_run_id) as run:
        out = run_download(_params(params))
        run.log_metrics({"seconds": out["seconds"], "fetched": float(out["fetched"])})
        return out


def make_data(params: dict, parent_run_id: str | None = None) -> dict:
    """Write the behaviour data for every diff."""
    from dit_core.stages import run_make_data, stage_paths

    with tracked(params, "make_data", parent_run_id) as run:
        p = _params(params)
        out = {name: run_make_data(p, behavior=name) for name in p.behaviors}
        for name, stats in out.items():
            prefix = f"{name}." if len(out) > 1 else ""
            run.log_metrics({f"{prefix}{k}": v for k, v in stats.items()})
            run.log_artifact(stage_paths(p).behaviors[name] / "stats.json", name if prefix else None)
        return per_behavior(params, out)


def _behavior(params: dict, behavior: str | None) -> str:
    return behavior or params["behaviors"][0]


def prepare_diffs(params: dict, behavior: str | None = None) -> int:
    """Check the behaviour's diff store identity (default: the first behaviour); returns its number of shards."""
    from dit_core.diffs import generate as gd
    from dit_core.stages import stage_paths, wrapped_model

    p, name = _params(params), _behavior(params, behavior)
    paths = stage_paths(p)
    lm, _ = wrapped_model(str(paths.model), p.model.device, p.model.dtype, p.diffs.modules)
    return gd.prepare_run(p, lm, paths.behaviors[name], paths.stores[name])


def train_shard(params: dict, index: int, behavior: str | None = None) -> str:
    """Train one shard of T diffs (skipped when already complete): the unit that maps onto a cluster."""
    from dit_core.diffs import generate as gd
    from dit_core.stages import stage_paths, wrapped_model

    p, name = _params(params), _behavior(params, behavior)
    paths = stage_paths(p)
    lm, dm = wrapped_model(str(paths.model), p.model.device, p.model.dtype, p.diffs.modules)
    return gd.train_shard(p, lm, paths.behaviors[name], paths.stores[name], index, dm)


def finalize_diffs(params: dict, n_shards: int, statuses: list[str], seconds: float,
                   stopped: str | None = None, run=None, behavior: str | None = None) -> dict:
    """Join the finished shards' rows into the behaviour's manifest and summarise the behaviour checks
    (logged into `run`, the generate_diffs stage's MLflow run, when given; keys prefixed by the behaviour's
    name when the run makes several)."""
    from dit_core.behaviors import get_behavior
    from dit_core.diffs import generate as gd
    from dit_core.stages import stage_paths

    p, name = _params(params), _behavior(params, behavior)
    run = run or Untracked()
    store = stage_paths(p).stores[name]
    per_shard = get_behavior(name).diffs_config(p).diffs_per_batch
    summary = gd.finalize_run(store, n_shards, gd.run_stats(statuses, seconds, per_shard, stopped))
    prefix = f"{name}." if len(p.behaviors) > 1 else ""
    run.log_metrics({f"{prefix}{k}": v for k, v in summary.items()})
    run.log_artifact(store / "manifest.parquet", name if prefix else None)
    return summary


def per_behavior(params: dict, results: dict[str, dict]) -> dict:
    """One behaviour's result as it is; several as {behaviour: result}."""
    return results[params["behaviors"][0]] if len(params["behaviors"]) == 1 else results


def generate_diffs(params: dict, parent_run_id: str | None = None,
                   train: Callable[..., str] = train_shard) -> dict:
    """Every behaviour's shards in turn within `diffs.budget_s` (shared), then the manifest of the finished ones.

    `train(params, index, behavior)` trains one shard: `train_shard` here, a Prefect task in flows/pipeline.py.
    """
    import time

    from dit_core.diffs.generate import run_shards

    if train is train_shard and params["ray"]["address"] is not None:
        log.warning("ray.address=%s is for the Prefect engine (flows/pipeline.py); the shards train in this process",
                    params["ray"]["address"])
    with tracked(params, "generate_diffs", parent_run_id) as run:  # open while shards train: a stop marks it
        out, t_start, budget = {}, time.time(), params["diffs"]["budget_s"]
        for name in params["behaviors"]:
            n = prepare_diffs(params, name)
            t0 = time.time()
            left = None if budget is None else max(budget - (t0 - t_start), 1e-3)
            statuses, stopped = run_shards(n, lambda i, name=name: train(params, i, name), left)
            out[name] = finalize_diffs(params, n, statuses, time.time() - t0, stopped, run, name)
        return per_behavior(params, out)


def assemble(params: dict, parent_run_id: str | None = None) -> dict:
    """Split the diffs into train/val/test (dropping diffs that failed their behaviour check)."""
    from dit_core.stages import run_assemble

    with tracked(params, "assemble", parent_run_id) as run:
        report = run_assemble(_params(params))
        run.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
        return report


def train_interpreter(params: dict, parent_run_id: str | None = None, dataset: str | None = None,
                      stores: list[str] | None = None) -> dict:
    """Train the interpreter, log its curves, register it in MLflow as a pyfunc model.

    dataset, stores: the dataset folder and the diff stores recorded with the model (default: the
    pipeline's dataset and every behaviour's store).
    """
    from pathlib import Path

    from dit_core.stages import dataset_dir, interpreter_dir, run_train_interpreter, stage_paths

    p = _params(params)
    with tracked(params, "train_interpreter", parent_run_id) as run:
        summary = run_train_interpreter(p, log_metrics=run.log_metrics, dataset=dataset and Path(dataset))
        out = interpreter_dir(p)
        for f in ("interpreter.json", "train_log.csv", "summary.json"):
            run.log_artifact(out / f)
        run.log_artifact(f"{p.paths.reports}/training_curve.png")
        if run.run:
            from tasks.tracking import register_interpreter

            summary["registered"] = register_interpreter(params, out, stage_paths(p).model,
                                                         [Path(s) for s in stores or stage_paths(p).stores.values()])
        summary["dataset"] = str(dataset or dataset_dir(p))
        return summary


def evaluate(params: dict, parent_run_id: str | None = None, dataset: str | None = None,
             questions: str | None = None, test_set: str | None = None) -> dict:
    """Evaluate DIT and the baselines; log metrics; move `champion` if the new interpreter is better.

    dataset, questions, test_set: where the test split and its questions are and the split's name
    (default: the pipeline's dataset, its make-data questions and the dataset file's version).
    """
    import json
    from pathlib import Path

    from dit_core.stages import interpreter_dir, run_evaluate

    p = _params(params)
    where = {"dataset": dataset and Path(dataset), "questions": questions and Path(questions)}
    with tracked(params, "evaluate", parent_run_id) as run:
        result = run_evaluate(p, **where)
        several = len(result["behaviors"]) > 1
        for name, metrics in result["by_behavior"].items():
            for method, m in metrics.items():
                key = f"{name}.{method}" if several else method
                run.log_metrics({f"{key}.{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        if several:
            run.log_metrics({f"dit.{k}": v for k, v in result["dit"].items()})
        for f in ("metrics.json", "table.md", "predictions.parquet", "scores.png",
                  *(f"scores_{b}.png" for b in result["behaviors"][1:])):
            run.log_artifact(f"{p.paths.reports}/{f}")
        out = {"table": result["table"], "dit": result["dit"]}
        registry = interpreter_dir(p) / "registry.json"
        if run.run and registry.exists() and "top1" in result["dit"]:
            from tasks.tracking import gate_champion

            out["champion"] = gate_champion(params, p, json.loads(registry.read_text()), result["dit"]["top1"],
                                            test_set=test_set, **where)
        return out


def scaling(params: dict, sizes: str | None = None, parent_run_id: str | None = None) -> dict:
    """The data-scaling curve: one interpreter per training-set size; metrics logged with step = n_train."""
    from dit_core.stages import run_scaling

    with tracked(params, "scaling", parent_run_id) as run:
        def on_point(pt: dict) -> None:
            run.log_metrics({f"dit.{k}": pt[k] for k in ("top1", "top5", "mrr", "exact", "contains")
                             if isinstance(pt.get(k), (int, float))}, step=pt["n_train"])

        out = run_scaling(_params(params), sizes, on_point=on_point)
        for f in ("scaling.json", "scaling.md", "scaling.png"):
            run.log_artifact(f"{out['dir']}/{f}")
        return out


def cross_behavior(params: dict, parent_run_id: str | None = None) -> dict:
    """The cross-behaviour matrix (trained on each behaviour / all; tested on each); cells logged as metrics
    `cross.<trained on>.<tested on>.top1`, the table and heatmap as artifacts."""
    from dit_core.stages import run_cross_behavior

    with tracked(params, "cross_behavior", parent_run_id) as run:
        def on_cell(row: str, col: str, cell: dict) -> None:
            run.log_metrics({f"cross.{row}.{col}.{k}": v for k, v in cell.items() if isinstance(v, (int, float))})

        out = run_cross_behavior(_params(params), on_cell=on_cell)
        for f in ("matrix.json", "matrix.md", "matrix.png"):
            run.log_artifact(f"{out['dir']}/{f}", "cross_behavior")
        return out


def transfer(params: dict, parent_run_id: str | None = None) -> dict:
    """The transfer report (variants of the diffs; interpreters trained on some, tested on each); cells logged
    as metrics `transfer.<row>.<column>.top1`, the table and plots as artifacts."""
    from dit_core.stages import run_transfer

    with tracked(params, "transfer", parent_run_id) as run:
        def on_cell(row: str, col: str, cell: dict) -> None:
            run.log_metrics({f"transfer.{row}.{col}.{k}": v for k, v in cell.items() if isinstance(v, (int, float))})

        out = run_transfer(_params(params), on_cell=on_cell)
        for f in ("matrix.json", "matrix.md", "matrix.png", "rank.png"):
            if os.path.exists(f"{out['dir']}/{f}"):
                run.log_artifact(f"{out['dir']}/{f}", "transfer")
        return out


STAGES: dict[str, Callable[..., dict]] = {
    "download": download, "make-data": make_data, "generate-diffs": generate_diffs, "assemble": assemble,
    "train-interpreter": train_interpreter, "evaluate": evaluate,
}


def run_pipeline(params: dict, stages: dict[str, Callable[..., dict]] = STAGES) -> dict:
    """The whole DAG, stage after stage, under one parent MLflow run; each stage resumes earlier work.

    Holds the workspace lock (dit_core/lock.py): a second run in the same `paths.data` refuses.
    """
    from dit_core.lock import workspace_lock

    with workspace_lock(params["paths"]["data"], "pipeline"), tracked_pipeline(params) as parent:
        return {name: stages[name](params, parent) for name in PIPELINE}


def retrain_data(params: dict, plan: dict, parent_run_id: str | None = None) -> dict:
    """Make the benchmark store (once) and this round's store (resumed where a stopped run left it)."""
    from dit_core import retrain as rt

    p = _params(params)
    with tracked(params, "retrain_data", parent_run_id) as run:
        out = {"benchmark": rt.make_benchmark(p), "round": rt.make_round(p, plan)}
        run.log_metrics({"benchmark_diffs": out["benchmark"]["n_diffs"], "round_diffs": out["round"]["n_diffs"]})
        return out


def retrain_assemble(params: dict, plan: dict, parent_run_id: str | None = None) -> dict:
    """Every round store's train/val and the benchmark as the test split, into the retrain dataset."""
    from dit_core import retrain as rt

    with tracked(params, "assemble", parent_run_id) as run:
        report = rt.assemble_round(_params(params), plan)
        run.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
        return report


def retrain_interpreter(params: dict, plan: dict, parent_run_id: str | None = None) -> dict:
    """Train and register the round's interpreter on the grown corpus (a resumed round whose interpreter
    is registered for this dataset already reuses it: one registered version per round)."""
    from dit_core import retrain as rt

    rp = rt.round_params(_params(params), plan)
    reused = rt.registered_interpreter(rp, plan["dataset"])
    if reused is not None:
        log.info("round %d: interpreter already trained on this dataset and registered as version %s",
                 plan["round"], reused["registered"]["version"])
        return reused
    return train_interpreter(rp.model_dump(), parent_run_id, plan["dataset"], [*plan["stores"], plan["benchmark"]])


def retrain_evaluate(params: dict, plan: dict, test_set: str, parent_run_id: str | None = None) -> dict:
    """Score the round's interpreter on the benchmark split; `champion` moves only if it beats the
    champion there."""
    from dit_core import retrain as rt

    rp = rt.round_params(_params(params), plan)
    return evaluate(rp.model_dump(), parent_run_id, plan["dataset"], plan["questions"], test_set)


def retrain_finish(params: dict, plan: dict, record: dict, parent_run_id: str | None = None) -> dict:
    """Record the round as finished (round.json in its store), then version the corpus with DVC."""
    from dit_core import retrain as rt

    finished = rt.finish_round(plan, record)
    from tasks.dvc_versioning import dvc_version

    return {"record": finished, "dvc": dvc_version(_params(params), plan)}


RETRAIN_STEPS: dict[str, Callable[..., dict]] = {
    "download": download, "data": retrain_data, "assemble": retrain_assemble,
    "train-interpreter": retrain_interpreter, "evaluate": retrain_evaluate, "finish": retrain_finish,
}


def run_retrain(params: dict, steps: dict[str, Callable[..., dict]] = RETRAIN_STEPS) -> dict:
    """One round of scheduled retraining under one parent MLflow run (docs/retraining.md): a new diff store
    with fresh seeds, the interpreter retrained on every round's diffs, scored on the fixed benchmark."""
    from dit_core.lock import workspace_lock
    from dit_core.retrain import plan_round

    with workspace_lock(params["paths"]["data"], "retrain"):
        return _retrain_round(params, steps, plan_round(_params(params)))


def _retrain_round(params: dict, steps: dict[str, Callable[..., dict]], plan: dict) -> dict:
    log.info("retraining round %d%s: %s", plan["round"], " (resumed)" if plan["resumed"] else "", plan["store"])
    with tracked_pipeline(params, "retrain", {"dit.round": str(plan["round"])}) as parent:
        out: dict = {"round": plan["round"], "plan": plan}
        out["download"] = steps["download"](params, parent)
        out["data"] = steps["data"](params, plan, parent)
        out["assemble"] = steps["assemble"](params, plan, parent)
        out["train-interpreter"] = steps["train-interpreter"](params, plan, parent)
        out["evaluate"] = ev = steps["evaluate"](params, plan, out["assemble"]["test_set"], parent)
        a, t = out["assemble"], out["train-interpreter"]
        record = {"n_new_diffs": out["data"]["round"]["n_diffs"], "dataset_version": a["dataset_version"],
                  "test_set": a["test_set"], **{k: a[k] for k in ("train", "val", "test", "dropped")},
                  "dit": ev.get("dit", {}), "registered": t.get("registered"), "champion": ev.get("champion")}
        out["finish"] = steps["finish"](params, plan, record, parent)
        return out


def run_stage(params: dict, name: str) -> dict:
    """One stage by its command-line name (`scaling` takes its sizes from params.yaml)."""
    if name == "scaling":
        return scaling(params, params["scaling"]["sizes"])
    if name == "cross-behavior":
        return cross_behavior(params)
    if name == "transfer":
        return transfer(params)
    return STAGES[name](params)

