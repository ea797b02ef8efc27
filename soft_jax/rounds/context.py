"""What a round's phases are handed: the run's config, inputs, work dir, generation mesh, log and progress bars.

The phases (self-align generation, the evaluation phase) read these and nothing else of the run, so a benchmark or
a test runs a phase from a context it builds itself, with no `Run` and no work dir it does not write to."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from jax.sharding import Mesh

from soft_jax.experiment.config import RunConfig
from soft_jax.experiment.inputs import Inputs
from soft_jax.experiment.workdir import WorkDir


@dataclasses.dataclass(frozen=True)
class RoundContext:
    """Args:
        config: the run config (soft_jax.experiment.config.RunConfig), checked.
        inputs: principles, exemplars, prompt pool, validation pairs, open-ended questions and eval tasks, loaded
            and checked before any weights (soft_jax.experiment.inputs.load).
        workdir: the run's work dir; None for a phase whose results are not written (the benchmarks).
        mesh: the mesh generation and scoring run on; None for one device.
        log: where progress lines go (a no-op on every process but the writer).
        progress: whether to show progress bars.
    """

    config: RunConfig
    inputs: Inputs
    workdir: WorkDir | None = None
    mesh: Mesh | None = None
    log: Callable[[str], None] = print
    progress: bool = False
