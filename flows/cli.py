"""The `dit` command line.

    dit run                                  # the whole pipeline (Prefect flow)
    dit stage download                       # one stage: download | make-data | generate-diffs
    dit stage make-data --set data.n_topics=16
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

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Diff Interpretation Tuning: make weight diffs, train an interpreter, describe diffs.")

ParamsOpt = typer.Option("params.yaml", "--params", "-p", help="params file (missing: built-in defaults)")
SetOpt = typer.Option(None, "--set", "-s", help="override a param, e.g. --set diffs.rank=2 (repeatable)")

EXIT_CONFIG, EXIT_FAILED = 2, 1


def _load(params_file: str, overrides: Optional[list[str]]) -> dict:
    from dit_core.config import ConfigError, load_params

    try:
        return load_params(params_file, overrides or []).model_dump()
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _run_flow(flow, params: dict) -> dict:
    try:
        return flow(params)
    except Exception as e:  # the flow already logged the traceback; say it plainly and exit non-zero
        typer.secho(f"error: {type(e).__name__}: {e}", fg="red", err=True)
        raise typer.Exit(EXIT_FAILED) from None


@app.command()
def stage(
    name: str = typer.Argument(..., help="download | make-data | generate-diffs"),
    params_file: str = ParamsOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run one pipeline stage (the same entry point dvc.yaml calls).

    Example: dit stage generate-diffs --set data.n_topics=16
    """
    from flows.pipeline import STAGE_FLOWS

    if name not in STAGE_FLOWS:
        typer.secho(f"error: unknown stage '{name}'; choose one of {', '.join(STAGE_FLOWS)}", fg="red", err=True)
        raise typer.Exit(EXIT_CONFIG)
    params = _load(params_file, set_)
    result = _run_flow(STAGE_FLOWS[name], params)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command()
def run(params_file: str = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Run the whole pipeline on the configured model (default: the embedded SmolLM2-135M, offline).

    Example: dit run --set data.n_topics=8
    """
    from flows.pipeline import pipeline_flow

    params = _load(params_file, set_)
    result = _run_flow(pipeline_flow, params)
    typer.echo(json.dumps(result, indent=2, default=str))


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
