"""MLflow: one run per stage (nested under the pipeline's parent run), the interpreter registry and the
`champion` alias gate. MLFLOW_TRACKING_URI wins over params.yaml `tracking.uri` (default sqlite)."""

from __future__ import annotations

import importlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from dit_core.io import write_text_atomic

log = logging.getLogger("dit_core.tracking")
PYFUNC_CODE = str(Path(__file__).with_name("pyfunc_interpreter.py"))


def tracking_uri(params: dict) -> str:
    """The tracking URI in force."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params["tracking"]["uri"]


def configure(params: dict) -> bool:
    """Point MLflow at the configured store and experiment; False when tracking is disabled."""
    if not params["tracking"]["enabled"]:
        return False
    mlflow.set_tracking_uri(tracking_uri(params))
    mlflow.set_experiment(params["tracking"]["experiment"])
    return True


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def _numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and v == v:
            out[f"{prefix}{k}"] = float(v)
        elif isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
    return out


class StageRun:
    """Handle of an active stage run: log metrics and artifacts (no-ops when tracking is off)."""

    def __init__(self, run):
        self.run = run

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.run:
            mlflow.log_metrics(_numbers(metrics), step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.run and Path(path).exists():
            mlflow.log_artifact(str(path), folder)


def end_status(e: BaseException) -> str:
    """KILLED for a run stopped by a signal (a stop request or a second Ctrl-C), FAILED otherwise."""
    from dit_core.stop import is_stop

    return "KILLED" if is_stop(e) else "FAILED"


def error_tag(e: BaseException) -> str:
    """What ended the run, with the stop's reason (e.g. 'SIGTERM received') when a stop ended it."""
    from dit_core.stop import note_stop

    stop = note_stop(e)  # also sets the stop flag for a Prefect TerminationSignal, so task threads stop
    reason = f" ({stop})" if stop else ""
    return f"{type(e).__name__}: {e}{reason}"[:4000]


@contextmanager
def stage_run(params: dict, stage: str, parent_run_id: str | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage; marked FAILED with the error message if the stage raises."""
    if not configure(params):
        yield StageRun(None)
        return
    parent_run_id = parent_run_id or os.environ.get("DIT_PARENT_RUN_ID")
    active = mlflow.active_run()
    if active is not None and parent_run_id is None:
        parent_run_id = active.info.run_id
    with mlflow.start_run(run_name=stage, parent_run_id=parent_run_id, nested=active is not None,
                          tags={"dit.stage": stage}) as run:
        mlflow.log_params(_flat({k: params[k] for k in params if k != "tracking"}))
        mlflow.log_params(_run_record(params))
        mlflow.log_text(_resolved_yaml(params), "params.resolved.yaml")
        try:
            yield StageRun(run)
        except BaseException as e:
            mlflow.set_tag("dit.error", error_tag(e))
            mlflow.end_run(status=end_status(e))
            raise


def _resolved_yaml(params: dict) -> str:
    from dit_core.config import params_from_dict, resolved_yaml

    return resolved_yaml(params_from_dict(params))


def _run_record(params: dict) -> dict[str, str]:
    """The profile, the commit and the kernel decisions (autocast, fp32 linears), as params any run can be
    searched by."""
    from dit_core.modeling.models import autocast_decision, fp32_linear_decision, resolve_device_dtype

    run, model = params.get("run") or {}, params["model"]
    device, _ = resolve_device_dtype(model["device"], model["dtype"])
    return {"profile": "+".join(run.get("profiles") or []) or "(none)",
            "git_commit": str(run.get("git_commit")),
            "autocast.decision": autocast_decision(device, model["autocast"])[1][:500],
            "fp32_linear.decision": fp32_linear_decision(device, model["fp32_linear"], model["autocast"])[1][:500]}


@contextmanager
def pipeline_run(params: dict, name: str = "pipeline", tags: dict | None = None) -> Iterator[str | None]:
    """The parent run of a whole pipeline (or of a retraining round); stage runs nest under it."""
    if not configure(params):
        yield None
        return
    with mlflow.start_run(run_name=name, tags={"dit.stage": name, **(tags or {})}) as run:
        mlflow.log_params(_run_record(params))
        mlflow.log_text(_resolved_yaml(params), "params.resolved.yaml")
        try:
            yield run.info.run_id
        except BaseException as e:
            mlflow.set_tag("dit.error", error_tag(e))
            mlflow.end_run(status=end_status(e))
            raise


def register_interpreter(params: dict, interpreter_dir: Path, base_model_dir: Path, stores: list[Path] = ()) -> dict:
    """Log the interpreter as a pyfunc model (code, no pickle) and register it; returns name/version.

    The logged model holds no path of this machine: the base model is recorded by identity (see
    `tasks/pyfunc_interpreter.py` for how a loading machine finds it), `dit_core` is logged as code and
    the third-party packages it needs are pinned.
    """
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from dit_core.config import ModelConfig
    from dit_core.modeling.models import model_identity

    name = params["tracking"]["registered_model"]
    model_cfg = ModelConfig(**params["model"])
    info = mlflow.pyfunc.log_model(
        name="interpreter",
        python_model=PYFUNC_CODE,
        artifacts={"interpreter": str(interpreter_dir)},
        model_config={"base_model": model_identity(base_model_dir, model_cfg),
                      "stores": _portable_stores(stores),
                      "modules": params["diffs"]["modules"]},
        code_paths=[DIT_CORE_DIR],
        pip_requirements=pinned_requirements(),
        # Without a params schema MLflow drops predict(params=...) with a warning.
        signature=ModelSignature(params=ParamSchema([ParamSpec("stores", "string", [], (-1,)),
                                                     ParamSpec("behavior", "string", ""),
                                                     ParamSpec("details", "boolean", False)])),
        registered_model_name=name,
    )
    version = info.registered_model_version
    record = {"name": name, "version": str(version), "model_uri": f"models:/{name}/{version}",
              "run_id": mlflow.active_run().info.run_id}
    write_text_atomic(Path(interpreter_dir) / "registry.json", json.dumps(record, indent=2))
    return record


DIT_CORE_DIR = str(Path(importlib.import_module("dit_core").__file__).resolve().parent)  # the one imported
# What dit_core imports on the load-and-describe path, fetching the base model included
# (huggingface_hub for hub models, gguf for the embedded and gguf sources).
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "gguf", "numpy",
                    "polars", "pandera", "pydantic", "pyyaml")


def pinned_requirements(packages: tuple[str, ...] = RUNTIME_PACKAGES) -> list[str]:
    """`name==version` of each installed package, without local version labels.

    A label such as torch's `+cpu` or `+cu124` names the index a build came from, not a version a
    plain install can resolve; the loading machine picks its own build of the same version.
    """
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in packages:
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError as e:
            raise MlflowException(f"cannot pin {pkg} for the registered interpreter: it is not installed "
                                  f"here; install it (`pip install -e .`) and register again") from e
    return out


def _portable_stores(stores) -> list[str]:
    """Diff stores as paths relative to the working directory (the project); others are left out.

    A relative store finds the same diffs in any checkout of the project; an absolute path would name
    this machine. Diffs outside the project are described from their files, or by passing stores.
    """
    cwd = Path.cwd().resolve()
    out = []
    for s in stores:
        try:
            out.append(Path(s).resolve().relative_to(cwd).as_posix())
        except ValueError:
            log.info("diff store %s is outside the project directory %s: not recorded with the model; "
                     "pass it at load as model_config={'stores': [...]} to describe its diff ids", s, cwd)
    return out


def champion_gate(params: dict, version: str, score: float, test_set: str, scorer: str,
                  score_champion=None) -> dict:
    """Move alias `champion` to `version` only if it beats the champion on the same test set.

    The champion's score on this test set is read from its version tags; when it was measured on
    another test set, `score_champion(model_uri)` re-measures it here first.
    """
    client = MlflowClient()
    name = params["tracking"]["registered_model"]
    client.set_model_version_tag(name, version, f"eval.{scorer}", str(score))
    client.set_model_version_tag(name, version, "eval.test_set", test_set)
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    if champ is None:
        client.set_registered_model_alias(name, "champion", version)
        return {"promoted": True, "reason": f"no champion yet: version {version} ({scorer}={score:.3f}) becomes champion"}
    if str(champ.version) == str(version):
        return {"promoted": True, "reason": f"version {version} already is the champion"}
    tags = champ.tags or {}
    if tags.get("eval.test_set") == test_set and f"eval.{scorer}" in tags:
        champ_score = float(tags[f"eval.{scorer}"])
    elif score_champion is not None:
        champ_score = float(score_champion(f"models:/{name}/{champ.version}"))
    else:
        return {"promoted": False, "reason": f"champion v{champ.version} was scored on another test set; kept"}
    if score > champ_score:
        client.set_registered_model_alias(name, "champion", version)
        return {"promoted": True, "reason": f"version {version} {scorer}={score:.3f} beats champion "
                                            f"v{champ.version} {scorer}={champ_score:.3f} on test set {test_set}"}
    return {"promoted": False, "reason": f"version {version} {scorer}={score:.3f} does not beat champion "
                                         f"v{champ.version} {scorer}={champ_score:.3f} on test set {test_set}"}


def gate_champion(params: dict, p, record: dict, top1: float, dataset: Path | None = None,
                  questions: Path | None = None, test_set: str | None = None) -> dict:
    """The evaluate stage's champion decision for the version in `record` (interpreter registry.json).

    A champion scored on another test set is re-scored on this one first (DIT only, no judge).
    dataset, questions: where the test split and its questions are (default: the pipeline's);
    test_set: the test split's name (default: the dataset file's version). Retraining names its
    benchmark split by its rows alone, since its dataset file changes every round.
    """
    from dit_core.interpreter.training import dataset_version
    from dit_core.stages import dataset_dir, run_evaluate

    test_set = test_set or dataset_version((dataset or dataset_dir(p)) / "dataset.parquet")

    def score_champion(uri: str) -> float:
        local = mlflow.artifacts.download_artifacts(f"{uri}/artifacts/interpreter")
        check = p.model_copy(update={
            "eval": p.eval.model_copy(update={"methods": ["dit"],
                                              "judge": p.eval.judge.model_copy(update={"base_url": None})}),
            "paths": p.paths.model_copy(update={"reports": f"{p.paths.reports}/champion_check"})})
        return run_evaluate(check, interpreter=local, dataset=dataset, questions=questions)["dit"]["top1"]

    gate = champion_gate(params, record["version"], top1, test_set, "top1", score_champion)
    log.info("champion gate: %s", gate["reason"])
    return gate
