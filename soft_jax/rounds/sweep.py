"""`soft-jax sweep`: every variant of an ablation config, one after another, each into DIR/<variant>/.

A config file declares its variants in a module-level VARIANTS tuple (soft_jax.experiment.config.variants). Each variant
runs exactly as `soft-jax run --config FILE:<variant> --workdir DIR/<variant>` would, so rerunning the sweep
resumes each as `run` does; a variant whose work dir already holds its finished run is skipped. One thing is
not repeated: the base model's round-0 evaluation. A variant whose round 0 would evaluate the same base model
under the same settings (round0_settings) as another variant that has finished its round 0 copies that
evaluation (loop.run(..., round0_from=...)); the copy is what its own evaluation would have written.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from soft_jax.core import storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import read_json
from soft_jax.core.preemption import Preempted
from soft_jax.experiment import config as config_lib
from soft_jax.experiment.workdir import CONFIG, NEW_STATE, STATE
from soft_jax.rounds import loop

# validation keys that only the collapse guard reads (its decision is remade from the copied per-item scores)
GUARD_ONLY = ("patience", "tolerance", "confidence", "resamples")


def round0_settings(cfg: dict) -> dict:
    """What round 0 (the base model's evaluation) depends on, from a resolved config dict (config.json): the
    base model, the validation set and metric, the eval tasks / limit / protocol, the open-ended questions,
    the lengths and batch sizes they are scored with, and the mesh. The seed only makes the weights of the
    randomly initialised `tiny` model; real checkpoints evaluate the same under any seed."""
    m = cfg["model"]
    random_weights = m["name"] == "tiny" and not m["path"]
    return {
        "model": {k: m[k] for k in ("name", "path", "dtype", "param_dtype")},
        # lm-eval tasks that sample are seeded by the run's seed
        "seed": cfg["seed"] if random_weights or cfg["eval"].get("lm_eval", {}).get("tasks") else None,
        "mesh": cfg["mesh"],
        "validation": {k: v for k, v in cfg["validation"].items() if k not in GUARD_ONLY},
        "eval": cfg["eval"],
        "open_ended": cfg["open_ended"],
        "sampling.batch_size": cfg["sampling"]["batch_size"],  # the open-ended answers' batches
        "train.max_len": [cfg["train"]["max_prompt_len"], cfg["train"]["max_response_len"]],  # valid_nll's cut
    }


def select(path: str, only: str | None) -> tuple[str, ...]:
    """The variants to run, in the config file's order: all it declares, or those --only names."""
    names = config_lib.variants(path)
    if only is None:
        return names
    picked = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in picked if n not in names]
    if unknown or not picked:
        what = f"unknown variant {', '.join(map(repr, unknown))}" if unknown else "no variant named"
        raise UserError(f"--only {only}: {what}; {path} declares {', '.join(names)}")
    return tuple(n for n in names if n in picked)


def _same_run(old: dict | None, new: dict) -> bool:
    """Whether config.json `old` is the run of config `new` (the fixed exemplars a run resolves excepted)."""
    if old is None:
        return False
    changed = config_lib.diff(config_lib.with_added_keys(old), new)
    return not changed or (changed == ["exemplars.fixed_ids"] and not new["exemplars"]["fixed_ids"])


def finished_state(workdir: str, cfg: dict) -> dict | None:
    """The state of the work dir's run when it holds this config's run with nothing left to do, else None."""
    if not _same_run(read_json(os.path.join(workdir, CONFIG)), cfg):
        return None
    state = {**NEW_STATE, **read_json(os.path.join(workdir, STATE), {})}
    return state if state["stopped"] or len(state["finished"]) >= cfg["rounds"] else None


def round0_source(root: str, name: str, cfg: dict, names: tuple[str, ...]) -> str | None:
    """The work dir of another variant (the first in the config's order) whose finished round 0 evaluated the
    same base model under the same settings as `cfg` would, or None (then the variant evaluates its own)."""
    want = round0_settings(cfg)
    for other in names:
        path = os.path.join(root, other)
        if other == name:
            continue
        old = read_json(os.path.join(path, CONFIG))
        state = read_json(os.path.join(path, STATE), {})
        if (old is not None and "0" in state.get("scores", {}) and round0_settings(old) == want
                and storage.isfile(os.path.join(path, "rounds", "000", "eval.json"))):
            return path
    return None


def describe(state: dict) -> str:
    return f"done (collapse guard stopped it after round {state['finished'][-1] if state['finished'] else 0})" \
        if state["stopped"] else "done"


def variants_table(rows: dict[str, dict], root: str) -> str:
    """variant | state | rounds finished | best round | work dir."""
    lines = [["variant", "state", "rounds", "best", "work dir"]]
    for name, r in rows.items():
        s = r.get("state") or {}
        lines.append([name, r["status"], ",".join(map(str, s.get("finished", []))) or "-",
                      "-" if s.get("best_round") is None else str(s["best_round"]), os.path.join(root, name)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("[sweep] " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def sweep(path: str, root: str, overrides=(), only: str | None = None,
          log: Callable[[str], None] = print) -> dict[str, dict]:
    """Runs (or resumes) each selected variant of the config file `path` into root/<variant>/; returns
    {variant: {"status": done | stopped | failed | pending, "state": its state.json}}."""
    all_names = config_lib.variants(path)
    names = select(path, only)
    configs = {n: config_lib.load(f"{path}:{n}", overrides) for n in names}  # every variant checked up front
    if storage.isfile(storage.check(root, "--workdir")):
        raise UserError(f"--workdir {root}: a file is in the way; give a new or existing sweep directory")
    rows: dict[str, dict] = {n: {"status": "pending"} for n in names}
    log(f"[sweep] {path}: {len(names)} variant(s) ({', '.join(names)}), each into {root}/<variant>/")
    name = None
    try:
        for i, name in enumerate(names, 1):
            workdir, cfg = os.path.join(root, name), config_lib.to_dict(configs[name])
            done = finished_state(workdir, cfg)
            if done is not None:
                rows[name] = {"status": describe(done), "state": done}
                log(f"[sweep] variant {i}/{len(names)} {name}: already finished in {workdir}; skipped")
                continue
            source = round0_source(root, name, cfg, all_names)
            log(f"[sweep] variant {i}/{len(names)} {name}: soft-jax run --config {path}:{name} --workdir {workdir}"
                + (f" (round 0 shared from {os.path.basename(source)})" if source else ""))
            rows[name] = {"status": "running"}
            state = loop.run(configs[name], workdir, log, round0_from=source)
            rows[name] = {"status": describe(state), "state": state}
    except BaseException as e:
        if name is not None:
            stopped = isinstance(e, (Preempted, KeyboardInterrupt))
            try:
                state = read_json(os.path.join(root, name, STATE), {})
            except UserError:
                state = {}
            rows[name] = {"status": "stopped" if stopped else "failed", "state": state}
        raise
    finally:
        log(variants_table(rows, root))
    done = [os.path.join(root, n) for n in names if rows[n]["status"].startswith("done")]
    if len(done) > 1:
        log(f"[sweep] compare the variants: soft-jax compare {' '.join(done)}")
    return rows
