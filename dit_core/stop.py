"""Stop when told: SIGTERM or SIGINT asks the running work to stop at its next step boundary.

    with stop_on_signals():          # the command line and the Prefect flows
        ...                          # loops call check_stop() once per step

The first signal sets a flag (work in Prefect's worker threads sees it too: Python runs signal handlers
in the main thread only, so a handler that raised would not reach them) and every training, generation
and check loop raises `StopRequested` at its next step; finished shards and epochs are already on disk,
so a rerun resumes. A second signal interrupts at once.

Inside a Prefect flow run, SIGTERM stays with Prefect's own handler: a cancellation (the UI's Cancel)
reaches a worker's flow run as a "cancel" message and then SIGTERM, and the flow run is acknowledged
and recorded as Cancelled only while Prefect's handler is the one installed (with ours in its place the
run ended Crashed). That handler raises `TerminationSignal` in the main thread; the first place it
passes through (an MLflow run ending, or `stop_on_signals` itself) sets the flag via `note_stop`, so the
task threads stop at their next step too.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)
_requested: str | None = None


def is_stop(e: BaseException) -> bool:
    """Whether `e` ends work because a stop was asked for: StopRequested, a second Ctrl-C, or Prefect's
    TerminationSignal (its flow engine turns SIGTERM into that exception in the main thread)."""
    return isinstance(e, (StopRequested, KeyboardInterrupt)) or type(e).__name__ == "TerminationSignal"


class StopRequested(Exception):
    """A stop was asked for (a signal); raised at a step boundary."""

    def __init__(self, reason: str):
        super().__init__(f"stopped: {reason}; finished shards and epochs are kept, a rerun resumes")
        self.reason = reason


def _signal_name(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "SIGINT"
    try:
        return signal.Signals(int(getattr(e, "signal", signal.SIGTERM))).name
    except (TypeError, ValueError):
        return "SIGTERM"


def note_stop(e: BaseException) -> str | None:
    """If `e` is a stop, make sure the flag is set (Prefect's TerminationSignal arrives without it) so
    other threads stop too; returns the stop's reason, None when `e` is not a stop."""
    if not is_stop(e):
        return None
    if _requested is None:
        log.warning("%s received: stopping (finished shards and epochs are kept)", _signal_name(e))
        request_stop(f"{_signal_name(e)} received")
    return _requested


def _prefect_owns_sigterm() -> bool:
    """Whether a Prefect flow engine's SIGTERM handler is installed (this is a flow run's process)."""
    return getattr(signal.getsignal(signal.SIGTERM), "__module__", "").startswith("prefect.")


def request_stop(reason: str) -> None:
    """Ask the running work to stop at its next step boundary."""
    global _requested
    _requested = reason


def stop_requested() -> str | None:
    return _requested


def check_stop() -> None:
    """Raise StopRequested if a stop was asked for (call once per step)."""
    if _requested is not None:
        raise StopRequested(_requested)


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT), chain: bool = False
                    ) -> Iterator[None]:
    """SIGTERM/SIGINT set the stop flag while inside; a second Ctrl-C raises KeyboardInterrupt at once.

    chain: inside Prefect flows. After setting the flag, also call the handler this one replaced; and
    leave SIGTERM to Prefect's handler when it is installed (see the module docstring), noting the stop
    when its TerminationSignal leaves this block.
    """
    global _requested
    if threading.current_thread() is not threading.main_thread():  # handlers only install there
        yield
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if _requested is None:
            log.warning("%s received: stopping at the next step boundary (press Ctrl-C again to stop now)", name)
            request_stop(f"{name} received")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt(f"{name} again: stopping now")
        previous = old.get(signum)
        if chain and callable(previous):
            previous(signum, frame)

    if chain and _prefect_owns_sigterm():
        signals = tuple(s for s in signals if s != signal.SIGTERM)
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
        _requested = None  # a clean end; after a stop the flag stays set, so no thread trains on
    except BaseException as e:
        note_stop(e)
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
