"""A Prefect cancellation (what the UI's Cancel does: the flow run is set to Cancelling) of a pipeline
deployment running on a real process worker, in the middle of diff generation: the flow run ends as
Cancelled, the flow run's process exits within seconds, the finished shard is kept for the rerun, and
the open MLflow runs end as KILLED."""

import os
import subprocess
import time
from pathlib import Path

import mlflow
import polars as pl
import pytest

from conftest import PARAMS, tiny_overrides
from dit_core.config import load_params, params_file_text

POOL = "reliability-cancel"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by the worker) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(420)
def test_cancel_through_process_worker_mid_diff_generation(tiny_model_dir, tmp_path, prefect_server, mlflow_uri):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from dit_core.diffs.store import DiffStore

    from test_deployment import copy_project

    proj = copy_project(tmp_path / "proj")
    # 6 shards of one diff: the cancel comes once shard 0 is done, and lands in one of the later shards
    sets = tiny_overrides(tiny_model_dir, proj / "data") + ["diffs.diffs_per_batch=1", "diffs.steps=40"]
    params = load_params(PARAMS, sets)
    (proj / "params.yaml").write_text(params_file_text(params))
    env = {**os.environ, "DIT_PROJECT_DIR": str(proj), "PYTHONPATH": str(proj),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
    res = subprocess.run(["prefect", "--no-prompt", "deploy", "--name", "pipeline", "--pool", POOL], cwd=proj,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    flow_run = run_deployment("dit-pipeline/pipeline", parameters={"params": params.model_dump()}, timeout=0)
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen(["prefect", "worker", "start", "--pool", POOL, "--limit", "1"], cwd=proj, env=env,
                              stdout=log_path.open("w"), stderr=subprocess.STDOUT, text=True)
    store = proj / "data" / "diffs" / "hidden_topic"

    def log() -> str:
        return log_path.read_text()[-6000:]

    try:
        deadline = time.time() + 240
        with get_client(sync_client=True) as client:
            while not (store / "shard-00000.rows.parquet").exists():
                state = client.read_flow_run(flow_run.id).state
                assert time.time() < deadline and not state.is_final(), f"{state.type}: {state.message}\n{log()}"
                time.sleep(0.2)
            shard0 = (store / "shard-00000.safetensors").read_bytes()
            run = client.read_flow_run(flow_run.id)
            assert run.state.is_running() and run.infrastructure_pid
            pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
            assert _alive(pid)

            t0 = time.time()
            client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled by the test"), force=True)
            while _alive(pid) and time.time() - t0 < 60:
                time.sleep(0.1)
            exited_in = time.time() - t0
            while not (state := client.read_flow_run(flow_run.id).state).is_final() and time.time() - t0 < 60:
                time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert state.type == StateType.CANCELLED, f"{state.type}: {state.message}\n{log()}"
    assert exited_in < 15, f"the flow run's process took {exited_in:.1f} s to exit\n{log()}"
    # the finished shards are kept (shard 0 as it was) and count as done for the rerun; the stop came
    # before the last shard, and nothing partial is visible
    assert (store / "shard-00000.safetensors").read_bytes() == shard0
    done = sorted(store.glob("shard-*.rows.parquet"))
    assert 1 <= len(done) < 6 and not (store / "manifest.parquet").exists(), [f.name for f in done]
    for rows_file in done:
        index = int(rows_file.name.split("-")[1].split(".")[0])
        assert DiffStore(store).is_complete(index, pl.read_parquet(rows_file)["diff_id"].to_list()), rows_file
    assert not list(store.glob(".*.tmp"))
    print(f"flow run process exited {exited_in:.1f} s after the cancel; {len(done)} of 6 shards kept")
    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["dit"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert {"pipeline", "generate_diffs"} <= set(by_name), sorted(by_name)
    for name in ("pipeline", "generate_diffs"):
        assert by_name[name].info.status == "KILLED", (name, by_name[name].info.status)
        assert "SIGTERM" in by_name[name].data.tags.get("dit.error", ""), by_name[name].data.tags


def test_prefect_keeps_its_sigterm_handler_inside_flows_and_the_stop_flag_is_still_set():
    """Prefect acknowledges a cancellation only while its own SIGTERM handler is installed (else the flow
    run ends Crashed): stop_on_signals(chain=True) leaves it in place, keeps Ctrl-C, and the
    TerminationSignal that SIGTERM raises sets the stop flag on its way out, so task threads stop too."""
    import signal

    from prefect.exceptions import TerminationSignal
    from prefect.utilities.engine import capture_sigterm

    import dit_core.stop as stop

    # Prefect passes a SIGTERM on to the handler it replaced: here a harmless one, not the default (exit)
    passed_on = []
    before = signal.signal(signal.SIGTERM, lambda *a: passed_on.append(a[0]))
    try:
        with pytest.raises(TerminationSignal):
            with capture_sigterm():
                prefects = signal.getsignal(signal.SIGTERM)
                with stop.stop_on_signals(chain=True):
                    assert signal.getsignal(signal.SIGTERM) is prefects
                    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
                    assert stop.stop_requested() is None
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler raises here
                    raise AssertionError("SIGTERM did not interrupt")
        assert stop.stop_requested() == "SIGTERM received" and passed_on == [signal.SIGTERM]
        with pytest.raises(stop.StopRequested, match="SIGTERM received"):
            stop.check_stop()  # what a task thread does at its next step
    finally:
        stop._requested = None
        signal.signal(signal.SIGTERM, before)
    # outside Prefect, SIGTERM is ours: it only sets the flag, work stops at its next step
    before = signal.signal(signal.SIGTERM, lambda *a: passed_on.append(a[0]))
    try:
        with stop.stop_on_signals(chain=True):
            assert signal.getsignal(signal.SIGTERM) is not before
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert stop.stop_requested() == "SIGTERM received"
    finally:
        stop._requested = None
        signal.signal(signal.SIGTERM, before)
