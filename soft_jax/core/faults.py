"""Fault injection for the resume and failure tests, driven by environment variables:

    SOFT_JAX_KILL_AT=<point>     SIGKILL at the named point
    SOFT_JAX_TERM_AT=<point>     SIGTERM there (a preemption notice: the run stops at its next safe point)
    SOFT_JAX_KILL_AFTER=<n>      SIGKILL at the n-th point this process reaches, whatever its name
    SOFT_JAX_TERM_AFTER=<n>      SIGTERM at the n-th point
    SOFT_JAX_ENOSPC_AT=<point>   raise "No space left on device" there (a full disk)
    SOFT_JAX_PAUSE_AT=<point>@<s>  sleep s seconds there (a slow host: widens a race between processes)
    SOFT_JAX_TRACE=<file>        append each point's name to the file as it is reached

Points sit after durable progress (a finished step, batch or phase) and inside every write: between the
two halves of a file's contents (a kill leaves a temp file, or a torn JSON line, behind). So a test can
stop a run anywhere a preemption or crash could land and check that the restarted run loses and repeats
nothing.
"""

import errno
import os
import signal
import time

VARIABLES = ("SOFT_JAX_KILL_AT", "SOFT_JAX_TERM_AT", "SOFT_JAX_KILL_AFTER", "SOFT_JAX_TERM_AFTER", "SOFT_JAX_ENOSPC_AT",
             "SOFT_JAX_PAUSE_AT", "SOFT_JAX_TRACE")
_reached = 0


def point(name: str) -> None:
    global _reached
    env = os.environ
    if not any(v in env for v in VARIABLES):  # the common case: nothing to inject
        return
    _reached += 1
    if env.get("SOFT_JAX_TRACE"):
        with open(env["SOFT_JAX_TRACE"], "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if name == env.get("SOFT_JAX_KILL_AT") or str(_reached) == env.get("SOFT_JAX_KILL_AFTER"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name == env.get("SOFT_JAX_TERM_AT") or str(_reached) == env.get("SOFT_JAX_TERM_AFTER"):
        os.kill(os.getpid(), signal.SIGTERM)
    pause, _, seconds = env.get("SOFT_JAX_PAUSE_AT", "").rpartition("@")
    if name == pause:
        time.sleep(float(seconds))
    if name == env.get("SOFT_JAX_ENOSPC_AT"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
