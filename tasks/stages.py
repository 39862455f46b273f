"""Prefect tasks: thin wrappers over dit_core stage functions. They pass params dicts and paths, never tensors."""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE

from dit_core.diffs import generate as gd
from dit_core.config import Params, params_from_dict
from dit_core.modeling.lora import DiffModel
from dit_core.modeling.models import LoadedModel, load_model
from dit_core.stages import run_download, run_make_data, stage_paths


def _params(params: dict) -> Params:
    return params_from_dict(params, "flow parameters")


@task(name="download", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def download(params: dict, parent_run_id: str | None = None) -> dict:
    """Fetch the base model (retried: downloads fail transiently)."""
    from tasks.tracking import stage_run

    with stage_run(params, "download", parent_run_id) as run:
        out = run_download(_params(params))
        run.log_metrics({"seconds": out["seconds"], "fetched": float(out["fetched"])})
        return out


@task(name="make_data", cache_policy=NO_CACHE)
def make_data(params: dict, parent_run_id: str | None = None) -> dict:
    """Write the behaviour data for every diff."""
    from tasks.tracking import stage_run

    with stage_run(params, "make_data", parent_run_id) as run:
        out = run_make_data(_params(params))
        run.log_metrics(out)
        run.log_artifact(stage_paths(_params(params)).behavior / "stats.json")
        return out


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
def finalize_diffs(params: dict, n_shards: int, statuses: list[str], seconds: float,
                   parent_run_id: str | None = None) -> dict:
    """Join shard rows into the manifest and summarise the behaviour checks (logged to MLflow)."""
    from tasks.tracking import stage_run

    p = _params(params)
    extra = gd.run_stats(statuses, seconds, p.diffs.diffs_per_batch)
    with stage_run(params, "generate_diffs", parent_run_id) as run:
        summary = gd.finalize_run(stage_paths(p).diffs, n_shards, extra)
        run.log_metrics(summary)
        run.log_artifact(stage_paths(p).diffs / "manifest.parquet")
        return summary


@task(name="assemble", cache_policy=NO_CACHE)
def assemble(params: dict, parent_run_id: str | None = None) -> dict:
    """Split the diffs into train/val/test (dropping diffs that failed their behaviour check)."""
    from dit_core.stages import run_assemble
    from tasks.tracking import stage_run

    with stage_run(params, "assemble", parent_run_id) as run:
        report = run_assemble(_params(params))
        run.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float))})
        return report


@task(name="train_interpreter", cache_policy=NO_CACHE)
def train_interpreter(params: dict, parent_run_id: str | None = None) -> dict:
    """Train the interpreter, log its curves, register it in MLflow as a pyfunc model."""
    from dit_core.stages import dataset_dir, interpreter_dir, run_train_interpreter
    from tasks.tracking import register_interpreter, stage_run

    p = _params(params)
    with stage_run(params, "train_interpreter", parent_run_id) as run:
        summary = run_train_interpreter(p, log_metrics=run.log_metrics)
        out = interpreter_dir(p)
        for f in ("interpreter.json", "train_log.csv", "summary.json"):
            run.log_artifact(out / f)
        run.log_artifact(f"{p.paths.reports}/training_curve.png")
        if run.run:
            summary["registered"] = register_interpreter(params, out, stage_paths(p).model, [stage_paths(p).diffs])
        summary["dataset"] = str(dataset_dir(p))
        return summary


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(params: dict, parent_run_id: str | None = None) -> dict:
    """Evaluate DIT and the baselines; log metrics; move `champion` if the new interpreter is better."""
    import json

    from dit_core.interpreter.training import dataset_version
    from dit_core.stages import dataset_dir, interpreter_dir, run_evaluate
    from tasks.tracking import champion_gate, stage_run

    p = _params(params)
    with stage_run(params, "evaluate", parent_run_id) as run:
        result = run_evaluate(p)
        metrics = result["metrics"]
        for method, m in metrics.items():
            run.log_metrics({f"{method}.{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        for f in ("metrics.json", "table.md", "predictions.parquet", "scores.png"):
            run.log_artifact(f"{p.paths.reports}/{f}")
        out = {"table": result["table"], "dit": metrics.get("dit", {})}
        registry = interpreter_dir(p) / "registry.json"
        if run.run and registry.exists() and "dit" in metrics:
            rec = json.loads(registry.read_text())
            test_set = dataset_version(dataset_dir(p) / "dataset.parquet")

            def score_champion(uri: str) -> float:
                import mlflow

                local = mlflow.artifacts.download_artifacts(f"{uri}/artifacts/interpreter")
                champ_p = p.model_copy(update={"eval": p.eval.model_copy(update={"methods": ["dit"], "judge": p.eval.judge.model_copy(update={"base_url": None})})})
                champ_p = champ_p.model_copy(update={"paths": p.paths.model_copy(update={"reports": f"{p.paths.reports}/champion_check"})})
                return run_evaluate(champ_p, interpreter=local)["metrics"]["dit"]["top1"]

            gate = champion_gate(params, rec["version"], metrics["dit"]["top1"], test_set, "top1", score_champion)
            import logging

            logging.getLogger("dit_core.tracking").info("champion gate: %s", gate["reason"])
            out["champion"] = gate
        return out


@task(name="scaling", cache_policy=NO_CACHE)
def scaling(params: dict, sizes: str | None = None, parent_run_id: str | None = None) -> dict:
    """The data-scaling curve: one interpreter per training-set size; metrics logged with step = n_train."""
    from dit_core.stages import run_scaling
    from tasks.tracking import stage_run

    with stage_run(params, "scaling", parent_run_id) as run:
        def on_point(pt: dict) -> None:
            run.log_metrics({f"dit.{k}": pt[k] for k in ("top1", "top5", "mrr", "exact", "contains")
                             if isinstance(pt.get(k), (int, float))}, step=pt["n_train"])

        out = run_scaling(_params(params), sizes, on_point=on_point)
        for f in ("scaling.json", "scaling.md", "scaling.png"):
            run.log_artifact(f"{out['dir']}/{f}")
        return out
