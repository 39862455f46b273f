"""One writer per workspace: a second run refuses while the first lives, naming it; the lock of a
SIGKILLed run is taken over; a clean end leaves nothing to take over."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from dit_core.lock import LOCK_FILE, WorkspaceBusy, workspace_lock

HOLD = """
import sys, time
from dit_core.lock import workspace_lock
with workspace_lock(sys.argv[1], "dit run (test holder)"):
    print("held", flush=True)
    time.sleep(600)  # killed by the test when done
"""


def _holder(data_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(data_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_refuses_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(WorkspaceBusy) as err:
            with workspace_lock(tmp_path, "second"):
                pass
        msg = str(err.value)
        assert f"PID {proc.pid}" in msg and socket.gethostname() in msg and "dit run (test holder)" in msg
        assert "started 20" in msg and "paths.data" in msg
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind
    with caplog.at_level("WARNING"), workspace_lock(tmp_path, "after the kill") as me:
        assert me["pid"] == os.getpid()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "after the kill"
    assert f"PID {proc.pid}" in caplog.text and "no longer running" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end: nothing for the next run to take over


def test_nested_acquisition_in_one_process_re_enters(tmp_path):
    with workspace_lock(tmp_path, "dit run") as outer, workspace_lock(tmp_path, "its flow") as inner:
        assert inner is outer


def test_cli_refuses_while_another_run_holds_the_workspace(tiny_model_dir, tmp_path):
    from conftest import ROOT, tiny_overrides

    data = tmp_path / "data"
    proc = _holder(data)
    try:
        args = [sys.executable, "-m", "flows.cli", "stage", "download", "--engine", "local"]
        for o in tiny_overrides(tiny_model_dir, data) + ["tracking.enabled=false"]:
            args += ["--set", o]
        res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert res.returncode == 1
        assert f"in use by another run: PID {proc.pid}" in res.stderr
        assert not (data / "models").exists()  # refused before any work (the holder never lets go: no waiting)
    finally:
        proc.kill()
        proc.wait()
