"""Clean stops: SIGTERM (what a preempted TPU VM receives) and Ctrl-C ask the run to stop at the next
safe point (after a finished generation batch or training step, which are saved first); a second Ctrl-C
stops at once. The CLI then prints how to resume and exits non-zero; rerunning the command continues.

On a multi-process run the signal may reach one host only, and a host that stopped alone would leave the
others blocked in their next collective. So every safe point asks all hosts (one all-gather of a small
integer): they all stop after the same step or batch, with the same signal name and exit code.
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
    """Routes SIGTERM and SIGINT to a flag that raise_if_stopped() reads (main thread only)."""
    global _requested
    _requested = None
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def requested() -> str | None:
    """The signal that asked the run to stop, agreed by every host (None: go on).

    A collective on a multi-process run: every host must call it at the same safe points, in the same order
    (they run the same program). Any host's request stops all; SIGTERM (a preemption) outranks SIGINT.
    """
    import jax

    if jax.process_count() == 1:
        return _requested
    import numpy as np
    from jax.experimental import multihost_utils

    local = signal.Signals[_requested].value if _requested else 0
    agreed = int(np.max(multihost_utils.process_allgather(np.int32(local))))
    return signal.Signals(agreed).name if agreed else None


def raise_if_stopped(where: str) -> None:
    """Raises Preempted when a stop was asked for (on any host); call right after durable progress."""
    signame = requested()
    if signame:
        raise Preempted(signame, where)
