"""Weights & Biases tracking of a run (the config's `log` section; off while log.wandb.project is "").

`pip install 'soft-jax[wandb]'`: wandb is an optional extra, imported only when a project is set. `check` refuses a
run that asks for W&B without the package (exit 2) before any weights are read; `loop.Run` drives a `Tracker`.

What is logged, by process 0 alone (the other hosts neither import wandb nor create anything):
- the resolved config (what config.json holds) when the run starts;
- each round once its evaluation and the guard's decision are in, at step = the round (0: the base model): the
  round table's numbers (workdir.round_values, which report.round_table prints): `round/prompts`, `round/kept`,
  `round/dropped`, `round/irrelevant` (the relevance filter's, when on), `round/cut_by_length`,
  `round/exemplars_shown`, `round/principles_shown`,
  `round/answer_tokens_mean`, `round/answer_tokens_median`, `round/difficulty`,
  `round/train_loss`, `validation/<metric>`, `eval/<task>`, `eval/open_*`, and the guard's comparison with the best
  round before it, `guard/diff`, `guard/low`, `guard/high`, `guard/vs`, `guard/verdict`; and `samples`, a table of
  the round's first log.wandb_samples generations: prompt, answer, kept, dropped_by (the filter), difficulty (of a
  kept pair, from train.jsonl), finish (eos, stop or length);
- at the end, the report's plots (WORKDIR/report/*.png) as images under `plots/`, in the row of the last round this
  process logged; finish() on every way out (exit code 1 on an error or a stop).

Resume: WORKDIR/wandb_id (JSON: the W&B run's id, and the first round not yet logged) is written before wandb.init,
so a rerun of the same command continues the same W&B run (resume="allow") and logs each round once: W&B's steps
must increase. Online, a resumed run starts from the step W&B's server reports instead (run.starting_step): a run
killed by SIGKILL may lose the rows wandb had not sent yet, and those are logged again (offline, such rows are lost:
wandb had not written them). Rounds logged offline are not logged again when a rerun turns online: `wandb sync` the
offline run. W&B's own files go to a local directory: WORKDIR/wandb/, or for a gs:// work dir
$SOFT_JAX_CACHE/wandb/BUCKET/PREFIX/wandb/ (wandb writes with plain file calls; `wandb sync` uploads an offline run
from there).
"""

from __future__ import annotations

import json
import os
import secrets
import string

from soft_jax.core import io_utils, storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import read_json
from soft_jax.data import templates
from soft_jax.experiment.config import RunConfig
from soft_jax.experiment.workdir import WANDB_ID, WorkDir, round_values, save_json
from soft_jax.parallel import distributed

ROUND_KEYS = ("prompts", "kept", "dropped", "irrelevant", "cut_by_length", "exemplars_shown", "principles_shown",
              "answer_tokens_mean", "answer_tokens_median", "difficulty", "train_loss")
GUARD_KEYS = ("diff", "low", "high", "vs", "verdict")
SAMPLE_COLUMNS = ["prompt_id", "prompt", "answer", "kept", "dropped_by", "difficulty", "finish"]
INSTALL = "pip install 'soft-jax[wandb]'"


def check(config: RunConfig) -> None:
    """With log.wandb.project set, that wandb can be imported (a UserError saying how to install it, if not)."""
    if not config.log.wandb.project:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"log.wandb.project is set but wandb is not installed; {INSTALL} "
                        '(or set log.wandb.project="")') from None


def local_dir(workdir: str) -> str:
    """The local directory wandb.init gets as `dir` (wandb adds wandb/ under it): the work dir itself, or for a gs://
    one a folder in the soft-jax cache named after the bucket and prefix."""
    if storage.is_gcs(workdir):
        return io_utils.cache_dir("wandb", *workdir[len(storage.GCS):].strip("/").split("/"))
    return os.path.abspath(workdir)


def new_id() -> str:
    """A W&B run id: 8 random base-36 digits, as wandb makes its own."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def round_row(values: dict, metric: str, comparison: dict | None) -> dict:
    """A round's W&B row (without its samples) from its round_values and the guard's comparison."""
    row = {f"round/{k}": values[k] for k in ROUND_KEYS if k in values}
    row.update({(f"validation/{k}" if k == metric else f"eval/{k}"): x for k, x in values.get("eval", {}).items()})
    row.update({f"guard/{k}": comparison[k] for k in GUARD_KEYS} if comparison else {})
    return row


def _rows(path: str) -> list[dict]:
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).split("\n") if line.strip()]


class Tracker:
    """One run's W&B run: a context manager that starts it (process 0, with log.wandb.project set and mode not
    disabled) and finishes it on every way out; `log_rounds` and `log_plots` do nothing when it did not start."""

    def __init__(self, config: RunConfig, wd: WorkDir):
        self.config, self.wd = config, wd
        self.run = None
        self.next_round = 0  # the first round not logged yet
        self.logged: int | None = None  # the last round this process logged: its row gets the plots

    def __enter__(self) -> Tracker:
        w = self.config.log.wandb
        if not w.project or w.mode == "disabled" or not distributed.is_writer():
            return self
        import wandb

        saved = read_json(self.wd.file(WANDB_ID), {})
        run_id, self.next_round = saved.get("id") or new_id(), saved.get("next_round", 0)
        if "id" not in saved:  # before init: a run killed inside it continues the same id
            self._save(run_id)
        local = local_dir(self.wd.path)
        os.makedirs(local, exist_ok=True)
        tags = [t.strip() for t in w.tags.split(",") if t.strip()]
        try:
            self.run = wandb.init(project=w.project, entity=w.entity or None, mode=w.mode, tags=tags or None,
                                  config=self.config.to_dict(), id=run_id, resume="allow", dir=local,
                                  name=os.path.basename(self.wd.path.rstrip("/")))
        except wandb.errors.Error as e:  # no API key, no network, an unknown entity
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"log.wandb: W&B could not start the run ({first}); run `wandb login`, or set "
                            "log.wandb.mode=offline") from None
        if self.run.resumed and not self.run.offline:  # what W&B's server holds (rows a kill lost go again)
            self.next_round = self.run.starting_step
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=0 if kind is None else 1)

    def _save(self, run_id: str) -> None:
        save_json(self.wd.file(WANDB_ID), {"id": run_id, "next_round": self.next_round})

    def log_rounds(self, state: dict) -> None:
        """Logs every evaluated round from the first not yet logged (round 0 once its eval.json is in, each finished
        round), in order, each at its own step."""
        if self.run is None:
            return
        todo = [t for t in [0, *state["finished"]] if t >= self.next_round and str(t) in state["scores"]]
        if not todo:
            return
        metric = self.config.validation.metric
        values = round_values(list(self.wd.metrics.rows.values()), metric, self.config.eval.tasks)
        for t in todo:
            row = round_row(values.get(t, {}), metric, state["comparisons"].get(str(t)))
            samples = self.samples(t)
            if samples is not None:
                row["samples"] = samples
            self.run.log(row, step=t)  # the row is committed by the next step or finish(): the plots may join it
            self.logged, self.next_round = t, t + 1
            self._save(self.run.id)

    def samples(self, t: int):
        """Round t's first log.wandb_samples generations as a wandb.Table (None: none, or round 0)."""
        import wandb

        gens = _rows(self.wd.round_file(t, "generations.jsonl"))[:self.config.log.wandb_samples]
        if not gens:
            return None
        difficulty = {r["prompt_id"]: r["difficulty"] for r in _rows(self.wd.round_file(t, "train.jsonl"))}
        return wandb.Table(columns=SAMPLE_COLUMNS, data=[
            [g["prompt_id"], templates.user_turn(g["prompt"], g.get("input", "")), g["answer"], g["kept"],
             g["dropped_by"] or "", difficulty.get(g["prompt_id"]) if g["kept"] else None, g["finish"]]
            for g in gens])

    def log_plots(self, report_dir: str) -> None:
        """The report's plots as images, in the row of the last round this process logged (a rerun that logged no
        round adds none: the process that logged the last round did)."""
        if self.run is None or self.logged is None:
            return
        import wandb

        local = io_utils.local_copy(report_dir, keep=lambda name: name.endswith(".png"))
        names = sorted(n for n in os.listdir(local) if n.endswith(".png"))
        self.run.log({f"plots/{n[:-4]}": wandb.Image(os.path.join(local, n)) for n in names}, step=self.logged)
