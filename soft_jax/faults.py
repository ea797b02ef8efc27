"""Fault injection for the resume tests: `SOFT_JAX_KILL_AT=<point>` SIGKILLs the process at that point;
`SOFT_JAX_TERM_AT=<point>` sends it SIGTERM there (a preemption notice: the run stops at its next safe point).

Named points sit right after durable progress (a finished step, batch or phase), so a test can kill a
run anywhere a preemption could land and check that the restarted run loses and repeats nothing.
"""

import os
import signal


def point(name: str) -> None:
    if os.environ.get("SOFT_JAX_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SOFT_JAX_TERM_AT") == name:
        os.kill(os.getpid(), signal.SIGTERM)
