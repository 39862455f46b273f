"""One writer per workspace: a lock file in `paths.data` that every writing run holds.

    with workspace_lock("data", "dit run"):
        ...                                   # a second run here refuses, naming this one

The lock is an advisory `flock` on `<data>/.dit.lock`, so the kernel drops it when its process ends,
however it ends (SIGKILL included): a lock left by a killed run is never in the way, and the next run
takes it over and says whose it was. The file holds the holder's PID, host, start time and command,
for the message the second run prints.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)
LOCK_FILE = ".dit.lock"
_held: dict[str, dict] = {}  # locks this process holds: a nested acquisition (dit run -> its flow) re-enters


class WorkspaceBusy(RuntimeError):
    """Another run holds this workspace's lock; the message names it."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "an unknown time"
    return (f"PID {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"
            f" ({holder.get('command', '?')})")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {}


@contextmanager
def workspace_lock(data_dir: str | Path, command: str) -> Iterator[dict]:
    """Hold the lock of the workspace whose data lives in `data_dir` (created if missing).

    Raises WorkspaceBusy at once when another live process holds it. Yields what was recorded.
    """
    path = Path(data_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _held:
        yield _held[key]
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            raise WorkspaceBusy(
                f"{Path(data_dir)} is in use by another run: {_describe(holder)}. Wait for it to finish, "
                f"stop it, or give this run its own workspace (--set paths.data=... --set paths.models=... "
                f"--set paths.reports=...)") from None
        previous = _read(fd)
        if previous:  # the kernel freed it: that run ended without cleaning up (killed or crashed)
            log.warning("taking over the workspace lock of %s, which is no longer running", _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        _held[key] = me
        try:
            yield me
        finally:
            del _held[key]
            os.ftruncate(fd, 0)  # a clean end leaves an empty file: nothing to take over
    finally:
        os.close(fd)  # closing drops the flock
