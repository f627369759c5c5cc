"""SIGTERM and SIGINT as an exception in the main thread, so that a stopped run cleans up like a failed one.

`with stop_on_signals():` (the CLI's and the gear's entry) turns either signal into `Stopped`, raised where the
main thread is. `Stopped` is a BaseException, like KeyboardInterrupt, so no `except Exception` on the way (a
library's fallback, logging's own error handler) swallows it; the `with Workspace(...)` around the run deletes
staging and the work folder (the temporary copies of the input) and writes error.json, and both the workspace
and `stop_on_signals` hand it on as the error model's `InterruptedRun`, which the adapter reports with its exit
code. Only the main thread can receive Python signal handlers: elsewhere (the PACS listener's worker threads)
this does nothing.

`holding(what)` makes a signal wait while the workspace publishes or cleans up, so neither is cut in half; the
signal is recorded and `check()` raises it at the next place that asks (a run whose InterruptedRun some library
swallowed does not publish).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from pedseg.pipeline.errors import InterruptedRun

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_installed = False
_received: int | None = None  # the last signal the handler saw, while installed
_holding: str | None = None  # what must not be cut short right now


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived; becomes InterruptedRun where the run is cleaned up (see the module)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupted(signum: int) -> InterruptedRun:
    name = signal.Signals(signum).name
    return InterruptedRun(f"The run was stopped by {name} before it finished; nothing was published, and the "
                          f"work folder with the temporary copies of the input was deleted.",
                          hint="Run again when you are ready (a scheduler's time or memory limit may need raising).")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise Stopped in the main thread while the block runs, and leave it as InterruptedRun;
    outside the main thread, or nested in another, nothing changes."""
    global _installed, _received
    if threading.current_thread() is not threading.main_thread() or _installed:
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    _installed, _received = True, None
    try:
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)
        yield
    except Stopped as exc:  # stopped outside any workspace
        raise interrupted(exc.signum) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _installed = False


def _on_signal(signum: int, frame: object) -> None:
    global _received
    _received = signum
    if _holding is not None:
        logger.warning("%s received while %s: pedseg stops once that is done", signal.Signals(signum).name, _holding)
        return
    raise Stopped(signum)


@contextlib.contextmanager
def holding(what: str) -> Iterator[None]:
    """A signal that arrives while the block runs waits (recorded, see `check`) instead of interrupting it."""
    global _holding
    if not _installed or threading.current_thread() is not threading.main_thread() or _holding is not None:
        yield
        return
    _holding = what
    try:
        yield
    finally:
        _holding = None


def check() -> None:
    """Raise InterruptedRun when a signal arrived in this run, even if the exception it raised was swallowed."""
    if _installed and _received is not None and threading.current_thread() is threading.main_thread():
        raise interrupted(_received)
