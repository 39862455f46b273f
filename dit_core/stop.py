"""Stop when told: SIGTERM or SIGINT asks the running work to stop at its next step boundary.

    with stop_on_signals():          # the command line and the Prefect flows
        ...                          # loops call check_stop() once per step

The first signal sets a flag (work in Prefect's worker threads sees it too: Python runs signal handlers
in the main thread only, so a handler that raised would not reach them) and every training, generation
and check loop raises `StopRequested` at its next step; finished shards and epochs are already on disk,
so a rerun resumes. A second signal interrupts at once.
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

    chain: after setting the flag, also call the handler this one replaced. Inside a Prefect flow that is
    Prefect's own, which ends the flow run (Cancelled when the cancel came from Prefect) while the flag
    stops the worker threads at their next step.
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

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
        _requested = None  # a clean end; after a stop the flag stays set, so no thread trains on
    finally:
        for s, h in old.items():
            signal.signal(s, h)
