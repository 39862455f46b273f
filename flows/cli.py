"""The `dit` command line.

    dit run                                  # the whole pipeline (Prefect flow)
    dit stage download                       # one stage: download | make-data | generate-diffs
    dit stage make-data --set data.n_topics=16
    dit scaling --sizes 16,32,all            # held-out score against training diffs
    dit retrain                              # one retraining round: new diffs, retrain, gate champion
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

# dit_core logs through the standard library; make Prefect show those records in its run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dit_core")
# The temporary local server would try to send telemetry; the project's machines are offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Diff Interpretation Tuning: make weight diffs, train an interpreter, describe diffs.")

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="params file (every default lives there)")
ProfileOpt = typer.Option(None, "--profile", "-P",
                          help="profile laid over the params file: profiles/NAME.yaml or a .yaml path (repeatable, in order)")
EngineOpt = typer.Option("prefect", "--engine", "-e",
                         help="prefect: as Prefect flows (a temporary server unless PREFECT_API_URL is set); "
                              "local: the same stage code in this process, no Prefect (with tracking.enabled=false "
                              "no MLflow either)")
BudgetOpt = typer.Option(None, "--budget", help="seconds for diff generation (= --set diffs.budget_s=SECONDS)")
SetOpt = typer.Option(None, "--set", "-s", help="override a param, e.g. --set diffs.rank=2 (repeatable, wins over profiles)")

EXIT_CONFIG, EXIT_FAILED, EXIT_STOPPED = 2, 1, 143  # 143: 128 + SIGTERM, as a shell reports it


def _load(params_file: str, overrides: Optional[list[str]], profiles: Optional[list[str]] = None) -> dict:
    from dit_core.config import ConfigError, load_params

    try:
        return load_params(params_file, overrides or [], profiles or []).model_dump()
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _run_flow(flow, params: dict, lock: bool = True, **kwargs) -> dict:
    import contextlib

    from dit_core.lock import workspace_lock
    from dit_core.stop import StopRequested, is_stop, stop_on_signals, stop_requested

    try:
        held = (workspace_lock(params["paths"]["data"], "dit " + " ".join(sys.argv[1:])[:300]) if lock
                else contextlib.nullcontext())
        with stop_on_signals(), held:
            return flow(params, **kwargs)
    except BaseException as e:
        if not is_stop(e):
            if isinstance(e, Exception):  # the flow already logged the traceback; say it plainly
                typer.secho(f"error: {type(e).__name__}: {e}", fg="red", err=True)
                raise typer.Exit(EXIT_FAILED) from None
            raise
        reason = stop_requested() or type(e).__name__
        typer.secho(f"error: {e if isinstance(e, StopRequested) else StopRequested(reason)}", fg="red", err=True)
        raise typer.Exit(EXIT_STOPPED) from None


STAGE_NAMES = ("download", "make-data", "generate-diffs", "assemble", "train-interpreter", "evaluate", "scaling")


def _engine(engine: str) -> None:
    if engine not in ("prefect", "local"):
        typer.secho(f"error: --engine {engine!r}: choose prefect or local", fg="red", err=True)
        raise typer.Exit(EXIT_CONFIG)


def _with_budget(set_: Optional[list[str]], budget: Optional[float]) -> list[str]:
    return [*(set_ or []), *([f"diffs.budget_s={budget}"] if budget is not None else [])]


@app.command()
def stage(
    name: str = typer.Argument(..., help=" | ".join(STAGE_NAMES)),
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
    budget: Optional[float] = BudgetOpt,
    engine: str = EngineOpt,
) -> None:
    """Run one pipeline stage (the same entry point dvc.yaml calls).

    Examples:
      dit stage generate-diffs --profile gated --budget 3600
      dit stage evaluate --engine local --set tracking.enabled=false
      torchrun --standalone --nproc-per-node 4 $(which dit) stage train-interpreter   # data-parallel, 4 GPUs
    """
    if name not in STAGE_NAMES:
        typer.secho(f"error: unknown stage '{name}'; choose one of {', '.join(STAGE_NAMES)}", fg="red", err=True)
        raise typer.Exit(EXIT_CONFIG)
    _engine(engine)
    params = _load(params_file, _with_budget(set_, budget), profile)
    from dit_core.interpreter.data_parallel import rank_from_env, world_size_from_env

    if world_size_from_env() > 1:  # under torchrun: data-parallel interpreter training
        if name != "train-interpreter":
            typer.secho(f"error: WORLD_SIZE={world_size_from_env()}: only train-interpreter runs data-parallel "
                        f"under torchrun; run `dit stage {name}` in one process", fg="red", err=True)
            raise typer.Exit(EXIT_CONFIG)
        if rank_from_env() > 0:  # rank 0 holds the workspace lock, tracks the run and writes the files
            from tasks.stage_runs import run_stage

            params["tracking"]["enabled"] = False
            _run_flow(lambda p: run_stage(p, name), params, lock=False)
            return
    if engine == "local":
        from tasks.stage_runs import run_stage

        result = _run_flow(lambda p: run_stage(p, name), params)
    else:
        from flows.pipeline import STAGE_FLOWS

        result = _run_flow(STAGE_FLOWS[name], params)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def run(params_file: str = ParamsOpt, profile: Optional[list[str]] = ProfileOpt,
        set_: Optional[list[str]] = SetOpt, budget: Optional[float] = BudgetOpt,
        engine: str = EngineOpt) -> None:
    """Run the whole pipeline on the configured model (default: the embedded SmolLM2-135M).

    Examples:
      dit run
      dit run --profile paper --profile gpu --budget 1800
      dit run --engine local --set tracking.enabled=false     # no Prefect, no MLflow
    """
    _engine(engine)
    params = _load(params_file, _with_budget(set_, budget), profile)
    if engine == "local":
        from tasks.stage_runs import run_pipeline

        result = _run_flow(run_pipeline, params)
    else:
        from flows.pipeline import pipeline_flow

        result = _run_flow(pipeline_flow, params)
    ev = result.get("evaluate", {})
    summary = {k: v for k, v in result.items() if k != "evaluate"}
    typer.echo(json.dumps(summary, indent=2, default=str))
    diffs = result.get("generate-diffs", {})
    if diffs.get("stopped"):
        typer.secho(f"diff generation stopped early: {diffs['stopped']}; {diffs.get('n_diffs')} diffs made",
                    fg="yellow", err=True)
    typer.echo("\n" + ev.get("table", ""))
    if "champion" in ev:
        typer.echo(f"champion: {ev['champion']['reason']}")


@app.command()
def retrain(params_file: str = ParamsOpt, profile: Optional[list[str]] = ProfileOpt,
            set_: Optional[list[str]] = SetOpt, budget: Optional[float] = BudgetOpt,
            engine: str = EngineOpt) -> None:
    """One round of scheduled retraining (what the scheduled-retraining deployment runs): retrain.new_diffs
    fresh diffs become a new store, the interpreter is retrained on every round's diffs and scored on the
    fixed benchmark split; `champion` moves only if it beats the champion there. A run that stopped
    resumes its round. See docs/retraining.md.

    Examples:
      dit retrain
      dit retrain --engine local --set retrain.new_diffs=72
    """
    _engine(engine)
    params = _load(params_file, _with_budget(set_, budget), profile)
    if engine == "local":
        from tasks.stage_runs import run_retrain

        result = _run_flow(run_retrain, params)
    else:
        from flows.pipeline import retrain_flow

        result = _run_flow(lambda p: retrain_flow(params=p), params)
    ev = result.get("evaluate", {})
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "evaluate"}, indent=2, default=str))
    typer.echo(f"\nround {result['round']} on the benchmark split:\n" + ev.get("table", ""))
    if ev.get("champion"):
        typer.echo(f"champion: {ev['champion']['reason']}")


def _model_for(params: dict):
    from dit_core.config import params_from_dict
    from dit_core.modeling.models import ModelSourceError, load_model
    from dit_core.stages import stage_paths

    p = params_from_dict(params)
    try:
        return p, load_model(stage_paths(p).model, p.model.device, p.model.dtype)
    except ModelSourceError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_FAILED) from None


def _interpreter_path(spec: str, params: dict) -> str:
    """A local interpreter dir, or an MLflow registry URI (models:/name@alias) resolved to one."""
    if not spec.startswith(("models:/", "runs:/")):
        return spec
    import mlflow

    from tasks.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(params))
    try:
        root = mlflow.artifacts.download_artifacts(spec.rstrip("/") + "/artifacts/interpreter")
    except Exception as e:
        typer.secho(f"error: cannot fetch interpreter {spec} from MLflow at {tracking_uri(params)}: {e}",
                    fg="red", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    return root


@app.command()
def describe(
    diffs: list[str] = typer.Argument(..., help="diff ids, diff .safetensors files or PEFT adapter dirs"),
    interpreter: str = typer.Option("models:/dit-interpreter@champion", "--interpreter", "-i",
                                    help="interpreter dir or MLflow URI"),
    behavior: str = typer.Option(None, "--behavior", "-b",
                                 help="ask the question of this behaviour (default: the interpreter's first)"),
    any_base: bool = typer.Option(False, "--any-base", help="accept PEFT adapters that record another base model"),
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Say in words what each weight diff does, with the interpreter's confidence ("unsure (best guess: ...)"
    below the threshold chosen on the validation split; "no behaviour it knows" where the answer is the one
    it was trained to give on the zero diff, interpreter.null_answer; docs/confidence.md).

    Examples:
      dit describe ht00003
      dit describe my_lora_adapter/ --interpreter models/interpreter
      dit describe nw00007 --profile mixture --interpreter models/mixture/interpreter --behavior news
    """
    from dit_core.interpreter.describe import describe as run_describe
    from dit_core.stages import stage_paths

    params = _load(params_file, set_, profile)
    p, lm = _model_for(params)
    try:
        df = run_describe(lm, _interpreter_path(interpreter, params), diffs, list(stage_paths(p).stores.values()),
                          p.diffs.modules, behavior=behavior, any_base=any_base, full_rank=p.diffs.full_rank,
                          cache_bytes=int(p.interpreter.diff_memory_mb * 2**20))
    except (FileNotFoundError, ValueError, KeyError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    for row in df.iter_rows(named=True):
        text = (f"unsure (best guess: {row['description']})" if row["unsure"] else
                f"no behaviour it knows ({row['description']})" if row["no_behavior"] else row["description"])
        sure = f"\tconfidence {row['confidence']:.2f}" if row["confidence"] is not None else ""
        typer.echo(f"{row['diff']}\t{text}{sure}")


@app.command()
def calibrate(
    interpreter: str = typer.Option(None, "--interpreter", "-i", help="interpreter dir (default: the pipeline's)"),
    dataset: str = typer.Option(None, "--dataset", "-d", help="the dataset it was trained on (default: the pipeline's)"),
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Record the label vocabulary and unsure threshold (interpreter.unsure_accuracy, chosen on the val
    split) in a trained interpreter, e.g. one saved before they were recorded; training does it itself.

    Example: dit calibrate --set interpreter.unsure_accuracy=0.8
    """
    import json

    from dit_core.interpreter.confidence import recalibrate
    from dit_core.stages import dataset_dir, interpreter_dir

    params = _load(params_file, set_, profile)
    p, lm = _model_for(params)
    try:
        out = recalibrate(lm, interpreter or interpreter_dir(p), dataset or dataset_dir(p),
                          p.interpreter.unsure_accuracy, p.diffs.modules, p.interpreter.batch_size)
    except (FileNotFoundError, ValueError, KeyError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    typer.echo(json.dumps(out, indent=2))


@app.command("import-peft")
def import_peft_cmd(
    adapter_dir: str = typer.Argument(..., help="PEFT LoRA adapter directory (safetensors)"),
    out: str = typer.Argument(..., help="output diff file (.safetensors)"),
    any_base: bool = typer.Option(False, "--any-base", help="accept an adapter that records another base model"),
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Convert a PEFT LoRA adapter into a diff file (any rank/alpha), checked against the base model.

    Example: dit import-peft my_adapter/ data/imported/my_adapter.safetensors
    """
    from dit_core.diffs.store import DiffFileError, write_shard
    from dit_core.modeling.lora import DiffModel
    from dit_core.modeling.peft_io import import_peft

    params = _load(params_file, set_, profile)
    p, lm = _model_for(params)
    try:
        shard = import_peft(adapter_dir, DiffModel(lm.model, p.diffs.modules).shapes(), lm.name, lm.sha256,
                            any_base=any_base)
    except DiffFileError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    write_shard(out, shard)
    touched = sum(bool(shard.A[m].abs().sum() > 0) for m in shard.modules)
    typer.echo(f"wrote {out} (rank {shard.rank}, scale {shard.scale:g}, {touched} of {len(shard.modules)} "
               "modules hold the adapter; the others are zero)")


@app.command("import-full")
def import_full_cmd(
    model_dir: str = typer.Argument(..., help="finetuned model directory of the base model (safetensors)"),
    out: str = typer.Argument(..., help="output diff file (.safetensors); the report goes beside it"),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", min=1,
                                       help="rank each module's weight change is reduced to (default diffs.full_rank)"),
    top: int = typer.Option(15, "--top", help="modules and tensors shown in the printed table"),
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Turn a full finetune of the base model into a diff by truncated SVD per module (docs/full-finetunes.md).

    Prints the share of each module's Frobenius norm kept (worst first) and the weights a diff cannot
    represent; writes both as <OUT name>.report.json.

    Example: dit import-full my_finetune/ data/imported/my_finetune.safetensors --rank 16
    """
    from dit_core.diffs.full import format_report, import_full, write_full
    from dit_core.diffs.store import DiffFileError
    from dit_core.modeling.lora import DiffModel

    params = _load(params_file, set_, profile)
    p, lm = _model_for(params)
    try:
        shard, report = import_full(model_dir, DiffModel(lm.model, p.diffs.modules), lm, rank or p.diffs.full_rank)
    except DiffFileError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    path = write_full(out, shard, report)
    typer.echo(format_report(report, top))
    typer.echo(f"wrote {out} (rank {shard.rank}, scale 1, {len(shard.modules)} modules) and {path}")


@app.command("export-peft")
def export_peft_cmd(
    diff: str = typer.Argument(..., help="a stored diff id"),
    out: str = typer.Argument(..., help="output PEFT adapter directory"),
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Write a stored diff as a PEFT adapter directory (PeftModel.from_pretrained loads it).

    Example: dit export-peft ht00003 exported/ht00003
    """
    from dit_core.diffs.store import DiffStore
    from dit_core.modeling.peft_io import export_peft
    from dit_core.stages import stage_paths

    params = _load(params_file, set_, profile)
    from dit_core.config import params_from_dict

    p = params_from_dict(params)
    try:
        shard = DiffStore(stage_paths(p).diffs).load([diff])
    except (FileNotFoundError, KeyError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    export_peft(shard, 0, out, str(stage_paths(p).model.resolve()))
    typer.echo(f"wrote PEFT adapter {out}")


def _run_report(name: str, params: dict, engine: str) -> None:
    """Run a report command (`scaling`, `cross-behavior`, `transfer`) on the engine, print its table and folder."""
    if engine == "local":
        from tasks.stage_runs import run_stage

        result = _run_flow(lambda p: run_stage(p, name), params)
    else:
        from flows.pipeline import REPORT_FLOWS

        result = _run_flow(REPORT_FLOWS[name], params)
    typer.echo(result["table"])
    typer.echo(f"written to {result['dir']}")


@app.command()
def scaling(
    sizes: str = typer.Option(None, "--sizes", help="training-set sizes, e.g. 16,32,all (= --set scaling.sizes=...)"),
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
    engine: str = EngineOpt,
) -> None:
    """The data-scaling curve: train one interpreter per number of training diffs (nested subsets of the
    assembled train split) and score DIT on the test split; writes reports/scaling/ (DVC stage `scaling`).

    Examples:
      dit scaling --sizes 16,32,all
      dit scaling --profile paper --profile gpu          # the profile's scaling.sizes
    """
    _engine(engine)
    params = _load(params_file, [*(set_ or []), *([f"scaling.sizes={sizes}"] if sizes else [])], profile)
    _run_report("scaling", params, engine)


@app.command("cross-behavior")
def cross_behavior(
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
    engine: str = EngineOpt,
) -> None:
    """The cross-behaviour matrix on a dataset of several behaviours: one interpreter trained on each
    behaviour alone and one on all of them, each scored on every behaviour's test diffs; writes
    reports/cross_behavior/ (matrix.md, matrix.png, matrix.json) and logs them to MLflow.

    Examples:
      dit run --profile mixture && dit cross-behavior --profile mixture
    """
    _engine(engine)
    _run_report("cross-behavior", _load(params_file, set_ or [], profile), engine)


@app.command()
def transfer(
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
    engine: str = EngineOpt,
) -> None:
    """The transfer report: each variant of transfer.variants (e.g. another diff rank or trigger kind) makes
    its diffs in a store of its own; one interpreter per row of transfer.rows, trained on some variants, is
    scored on every variant's test diffs. Writes reports/transfer/<grid>/ (matrix.md, matrix.png,
    matrix.json, rank.png for ranks) and logs the cells to MLflow; a rerun trains nothing already done.

    Examples:
      dit transfer                          # the small default grid (ranks 1 and 4)
      dit transfer --profile ranks          # ranks 1-64: interpreters trained on rank 1 and on all ranks
      dit transfer --profile triggers       # SEP code, zero-width space at the start / at a random place
    """
    _engine(engine)
    _run_report("transfer", _load(params_file, set_ or [], profile), engine)


@app.command()
def verify(
    paths: list[str] = typer.Argument(..., help="diff store, dataset folder, interpreter folder, PEFT adapter folder, diff file, "
                                                "or an MLflow model URI (models:/dit-interpreter@champion)"),
    params_file: str = ParamsOpt,
) -> None:
    """Check stored artifacts (sha256 recorded at write time, format, shapes, NaN/Inf); list every problem.

    Examples:
      dit verify data/diffs/hidden_topic data/dit_dataset models/interpreter
      dit verify models:/dit-interpreter@champion
    """
    from dit_core.verify import verify as run_verify

    params = _load(params_file, [], []) if any(p.startswith(("models:/", "runs:/")) for p in paths) else None
    n_problems = 0
    for ref in paths:
        local = _interpreter_path(ref, params) if params else ref
        report = run_verify(local)
        checked = ", ".join(f"{v} {k}" for k, v in report["checked"].items())
        status = "ok" if not report["problems"] else f"{len(report['problems'])} problem(s)"
        typer.echo(f"{ref}: {report['kind']} ({checked}): {status}")
        for problem in report["problems"]:
            typer.secho(f"  {problem}", fg="red", err=True)
        n_problems += len(report["problems"])
    if n_problems:
        raise typer.Exit(EXIT_FAILED)


@app.command("params")
def params_cmd(
    params_file: str = ParamsOpt,
    profile: Optional[list[str]] = ProfileOpt,
    set_: Optional[list[str]] = SetOpt,
    dvc_args: bool = typer.Option(False, "--dvc-args",
                                  help="print what the profiles and --set change as `dvc exp run -S` arguments"),
    doc: bool = typer.Option(False, "--doc", help="print the configuration reference (docs/configuration.md)"),
) -> None:
    """Print the resolved params (params file + profiles + --set), or their changes as DVC arguments.

    Examples:
      dit params --profile paper
      dit params --profile paper --profile gpu --dvc-args | xargs dvc exp run
    """
    from dit_core.config import dvc_set_args, load_params, params_from_dict, resolved_yaml

    if doc:
        from dit_core.config import schema_markdown

        typer.echo(schema_markdown(params_file), nl=False)
        return
    resolved = params_from_dict(_load(params_file, set_, profile))
    if dvc_args:
        for arg in dvc_set_args(load_params(params_file), resolved):
            typer.echo(arg)
    else:
        typer.echo(resolved_yaml(resolved), nl=False)


@app.command()
def report(params_file: str = ParamsOpt, profile: Optional[list[str]] = ProfileOpt,
           set_: Optional[list[str]] = SetOpt) -> None:
    """Print the latest evaluation table (reports/table.md)."""
    from dit_core.config import params_from_dict

    p = params_from_dict(_load(params_file, set_, profile))
    table = Path(p.paths.reports) / "table.md"
    if not table.exists():
        typer.secho(f"error: {table} not found; run `dit stage evaluate` first", fg="red", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(table.read_text())


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
