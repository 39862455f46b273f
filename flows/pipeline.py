"""Prefect flows: one per stage and the whole pipeline. `dit stage <name>` and `dit run` call these
(`--engine local` runs the same stage bodies without Prefect: tasks/stage_runs.py)."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, unmapped

from dit_core.stop import stop_on_signals
from tasks import ray_runner, stage_runs
from tasks import stages as t


@flow(name="stage-download")
def download_flow(params: dict) -> dict:
    """Fetch the base model into data/models/."""
    return t.download(params)


@flow(name="stage-make-data")
def make_data_flow(params: dict) -> dict:
    """Write the data of every behaviour in params `behaviors`."""
    return t.make_data(params)


def _shard_options(resources: dict):
    """Ray resources (ray_runner.shard_resources) for the shard tasks submitted inside."""
    from prefect_ray.context import remote_options

    return remote_options(**resources)


# Local shards train in turn in the thread that runs this flow, never on a thread pool: torch's OpenMP
# threads belong to the thread that starts them, and a second thread's kernels on the same cores run up
# to ~2x slower while the first thread's team lives (bench/bench_thread_teams.py). With params
# `ray.address` generate_diffs_stage gives this flow a RayTaskRunner: one Ray task per shard.
@flow(name="stage-generate-diffs")
def generate_diffs_flow(params: dict, parent_run_id: str | None = None) -> dict:
    """Train all weight diffs, one task per shard: in turn here within diffs.budget_s (if any); on Ray
    mapped over the cluster (no budget) or submitted in turn (budget)."""
    if not ray_runner.ray_enabled(params):
        with stop_on_signals(chain=True):
            return stage_runs.generate_diffs(params, parent_run_id, train=t.train_shard)
    resources, shard_params = ray_runner.shard_resources(params), ray_runner.worker_params(params)
    get_run_logger().info("shards on Ray (%s), each task with %s", ray_runner.describe_cluster(), resources)
    if params["diffs"]["budget_s"] is not None:  # a budget decides shard by shard whether the next fits
        def train(_params: dict, index: int, behavior: str) -> str:
            with _shard_options(resources):
                return t.train_shard.submit(params=shard_params, index=index, behavior=behavior).result()

        with stop_on_signals(chain=True):
            return stage_runs.generate_diffs(params, parent_run_id, train=train)
    with stop_on_signals(chain=True), stage_runs.tracked(params, "generate_diffs", parent_run_id) as run:
        names = params["behaviors"]
        sizes = {name: t.prepare_diffs(params, name) for name in names}
        jobs = [(name, i) for name in names for i in range(sizes[name])]
        t0 = time.time()
        with _shard_options(resources):
            futures = t.train_shard.map(params=unmapped(shard_params), index=[i for _, i in jobs],
                                        behavior=[name for name, _ in jobs])
        statuses = [f.result() for f in futures]
        seconds = time.time() - t0
        return stage_runs.per_behavior(params, {
            name: stage_runs.finalize_diffs(params, sizes[name], [s for (b, _), s in zip(jobs, statuses) if b == name],
                                            seconds, run=run, behavior=name) for name in names})


def generate_diffs_stage(params: dict, parent_run_id: str | None = None) -> dict:
    """generate_diffs_flow here, or on the RayTaskRunner params `ray` selects."""
    run = generate_diffs_flow
    if ray_runner.ray_enabled(params):
        run = generate_diffs_flow.with_options(task_runner=ray_runner.task_runner(params))
    return run(params, parent_run_id)


@flow(name="stage-assemble")
def assemble_flow(params: dict) -> dict:
    """Split the diffs into the interpreter's train/val/test dataset."""
    return t.assemble(params)


@flow(name="stage-train-interpreter")
def train_interpreter_flow(params: dict) -> dict:
    """Train the interpreter and register it in MLflow."""
    return t.train_interpreter(params)


@flow(name="stage-evaluate")
def evaluate_flow(params: dict) -> dict:
    """Evaluate DIT against the baselines; gate the `champion` alias."""
    return t.evaluate(params)


@flow(name="scaling-curve")
def scaling_flow(params: dict, sizes: str | None = None) -> dict:
    """Held-out DIT score against training diffs: one interpreter per size on the assembled dataset."""
    return t.scaling(params, sizes if sizes is not None else params["scaling"]["sizes"])


@flow(name="cross-behavior")
def cross_behavior_flow(params: dict) -> dict:
    """The cross-behaviour matrix: interpreters trained on each behaviour and on all, tested on each."""
    with stop_on_signals(chain=True):
        return t.cross_behavior(params)


@flow(name="transfer")
def transfer_flow(params: dict) -> dict:
    """The transfer report: each variant's diffs in its own store, interpreters trained on some variants,
    DIT scored on every variant (docs/transfer.md)."""
    with stop_on_signals(chain=True):
        return t.transfer(params)


STAGE_FLOWS = {
    "download": download_flow,
    "make-data": make_data_flow,
    "generate-diffs": generate_diffs_stage,
    "assemble": assemble_flow,
    "train-interpreter": train_interpreter_flow,
    "evaluate": evaluate_flow,
    "scaling": scaling_flow,
}

# The report commands' flows (`dit scaling`, `dit cross-behavior`, `dit transfer`).
REPORT_FLOWS = {"scaling": scaling_flow, "cross-behavior": cross_behavior_flow, "transfer": transfer_flow}

# What the pipeline flow runs for each stage of stage_runs.PIPELINE.
PIPELINE_STEPS = {
    "download": t.download, "make-data": t.make_data, "generate-diffs": generate_diffs_stage,
    "assemble": t.assemble, "train-interpreter": t.train_interpreter, "evaluate": t.evaluate,
}


@flow(name="dit-pipeline")
def pipeline_flow(params: dict | None = None) -> dict:
    """The whole DAG, stage after stage, under one parent MLflow run; each stage resumes earlier work.

    params: a full params dict (as `dit run` passes); empty or None reads params.yaml.
    """
    from dit_core.config import load_params, params_from_dict

    params = params_from_dict(params).model_dump() if params else load_params("params.yaml").model_dump()
    with stop_on_signals(chain=True):
        return stage_runs.run_pipeline(params, PIPELINE_STEPS)


# What the retraining flow runs for each step of stage_runs.run_retrain.
RETRAIN_STEPS = {
    "download": t.download, "data": t.retrain_data, "assemble": t.retrain_assemble,
    "train-interpreter": t.retrain_interpreter, "evaluate": t.retrain_evaluate, "finish": t.retrain_finish,
}


@flow(name="dit-retrain")
def retrain_flow(params_file: str = "params.yaml", overrides: list[str] | None = None,
                 profiles: list[str] | None = None, params: dict | None = None) -> dict:
    """Scheduled retraining, one round (docs/retraining.md): new diffs join the corpus, the interpreter is
    retrained on all of it and scored on the fixed benchmark; `champion` moves only if it is better there.

    params: a full params dict (as `dit retrain` passes); otherwise params_file in the working directory
    with profiles and overrides laid over it (what the scheduled deployment does).
    """
    from dit_core.config import load_params, params_from_dict

    params = (params_from_dict(params).model_dump() if params
              else load_params(params_file, overrides or [], profiles or []).model_dump())
    with stop_on_signals(chain=True):
        return stage_runs.run_retrain(params, RETRAIN_STEPS)
