"""Fault injection for the resume tests: `SOFT_JAX_KILL_AT=<point>` SIGKILLs the process at that point.

Named points sit right after durable progress (a finished step, batch or phase), so a test can kill a
run anywhere a preemption could land and check that the restarted run loses and repeats nothing.
"""

import os
import signal


def point(name: str) -> None:
    if os.environ.get("SOFT_JAX_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
