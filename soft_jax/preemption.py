"""Clean stops: SIGTERM (what a preempted TPU VM receives) and Ctrl-C ask the run to stop at the next
safe point (after a finished generation batch or training step, which are saved first); a second Ctrl-C
stops at once. The CLI then prints how to resume and exits non-zero; rerunning the command continues.
"""

from __future__ import annotations

import signal

_requested: str | None = None


class Preempted(Exception):
    """The run stopped at a safe point because a signal asked it to; its progress is saved."""

    def __init__(self, signame: str, where: str):
        super().__init__(f"stopped by {signame} after {where}")
        self.signame = signame


def _handler(signum, frame):
    global _requested
    name = signal.Signals(signum).name
    if _requested == "SIGINT" and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    _requested = name


def install() -> None:
    """Routes SIGTERM and SIGINT to a flag that check() reads (main thread only)."""
    global _requested
    _requested = None
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def requested() -> str | None:
    return _requested


def check(where: str) -> None:
    """Raises Preempted when a stop was asked for; call right after durable progress."""
    if _requested:
        raise Preempted(_requested, where)
