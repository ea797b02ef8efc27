"""The SOFT / SOFT+ round loop: slice -> generate -> filter -> score -> order -> train -> eval.

The method is docs/method.md ("A run, round by round"); the phases, their files and the modules they call are
docs/architecture.md ("The data flow of a round").

Every phase leaves a durable artifact in the work dir (soft_jax.experiment.workdir lists them) before the next starts,
so a rerun of the same command skips what is finished and resumes inside a phase where that is possible:
generation at batch granularity (soft_jax.rounds.selfalign), training at step granularity (Orbax step checkpoints).
The collapse guard (soft_jax.evaluation.guard) decides the best round and the stop from every round's eval.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from soft_jax import data, evaluation, training
from soft_jax.core import faults, preemption
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import read_json, read_jsonl
from soft_jax.data import filters, templates
from soft_jax.evaluation import guard
from soft_jax.experiment import config as config_lib
from soft_jax.experiment import contamination, preflight, tracking
from soft_jax.experiment.config import RunConfig
from soft_jax.experiment.workdir import CONFIG, CONTAMINATION, CURRICULUM, STATE, WorkDir, remove
from soft_jax.models import presets
from soft_jax.parallel import distributed
from soft_jax.parallel import sharding as shd
from soft_jax.reports import report
from soft_jax.rounds import curriculum, round_eval, selfalign
from soft_jax.rounds.context import RoundContext
from soft_jax.scale import memory, tables
from soft_jax.training.checkpoints import StepCheckpointer


def checksum(model) -> float:
    """A cheap fingerprint of a model's parameters (recorded so a run shows which model did what)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return float(sum(jax.device_get(jax.numpy.sum(jax.numpy.abs(x.astype(jax.numpy.float32)))) for x in leaves))


def generation_dtype(m) -> str | None:
    """The dtype of the generation mesh's copy of the weights (config `model` section): the compute dtype when it
    is narrower than the stored one (float32 master weights, bfloat16 compute), else None (as stored)."""
    stored = jnp.dtype(m.param_dtype or m.dtype)
    return m.dtype if jnp.dtype(m.dtype).itemsize < stored.itemsize else None


class Run:
    """One work dir's run; `run()` executes or resumes it."""

    def __init__(self, config: RunConfig, workdir: str, log: Callable[[str], None] = print,
                 round0_from: str | None = None):
        tracking.check(config)  # W&B asked for but not installed: refused before anything is read
        self.wd = WorkDir(workdir)
        self.round0_from = round0_from  # a sibling run's work dir whose round 0 this run shares (soft_jax.rounds.sweep)
        self.log = log if distributed.is_writer() else (lambda _: None)
        self.progress = bool(config.progress) and distributed.is_writer()
        # everything a run reads is checked before the work dir is touched or weights are read; on a GPU or TPU
        # the round's programs are compiled, as `soft-jax plan` compiles them, and refused when one does not fit
        available = memory.device_memory()
        p = preflight.prepare(config, jax.devices(), available, compile=available is not None, log=self.log,
                              name=f"{jax.device_count()} x {jax.devices()[0].device_kind}")
        self.config, self.inputs = p.config, p.inputs  # config: its fixed exemplars resolved, as config.json records
        self.mesh = p.mesh if jax.device_count() > 1 else None
        self.gen_mesh = p.gen_mesh if p.gen_mesh is not None else self.mesh
        self._generation_copy = None  # (the model, its copy on gen_mesh)
        if p.gen_mesh is not None and config_lib.generation_mesh_shape(config) is None:
            self.log(f"[mesh] generation and scoring on mesh {dict(p.gen_mesh.shape)}, the one "
                     + ("plan's decode bound ranks first" if tuple(p.gen_mesh.shape.values()) == p.candidates[0] else
                        "ranked best by plan's decode bound that fits as compiled") + f" on {p.chip.name}; set "
                     "mesh_generate to choose another (the training mesh's sizes: generate in its layout)")
        if p.estimate is not None:  # CPU: its memory is the host's; the estimate, for the record
            self.log(f"[memory] estimate per device: training {memory.gib(p.estimate['train_total'])} GiB, "
                     f"generation {memory.gib(p.estimate['generate_total'])} GiB (device memory unknown on CPU)")
        else:
            self.log("[memory] compiled, per device: " + ", ".join(f"{x.name} {memory.gib(x.total)}"
                                                                  for x in p.programs)
                     + f" GiB of {memory.gib(available)} GiB")
            tables.refuse_over(p.programs, available)
        self.state = self.wd.open(self.config, self.log)
        self.tracker = tracking.Tracker(self.config, self.wd)  # W&B (log.wandb), process 0
        self.rounds_ckpt = StepCheckpointer(self.wd.file("checkpoints", "rounds"), every=0, keep=None)

    @property
    def context(self) -> RoundContext:
        """What the phases read of this run (self-align generation, the evaluation phase)."""
        return RoundContext(config=self.config, inputs=self.inputs, workdir=self.wd, mesh=self.gen_mesh, log=self.log,
                            progress=self.progress)

    # -- models --

    def on_generation_mesh(self, model):
        """`model` with its weights on the generation mesh (a copy, made once per model and kept until another
        model is asked for or training starts), or `model` itself when generation uses the training mesh."""
        if self.gen_mesh is self.mesh:
            return model
        if self._generation_copy is None or self._generation_copy[0] is not model:
            self._generation_copy = None  # the old copy's memory is free before the new one is made
            dtype = generation_dtype(self.config.model)
            self._generation_copy = (model, shd.reshard(model, self.gen_mesh, dtype=dtype))
        return self._generation_copy[1]

    def restore_round(self, base, t: int):
        """Round t's model, or None when its checkpoint is missing or unreadable (a bad one is removed)."""
        if t not in (self.rounds_ckpt.manager.all_steps() or []):
            return None
        try:
            return restore_round_model(self.rounds_ckpt, t, base, self.config.train)
        except Exception as e:  # noqa: BLE001 - corrupted or partial files: redo the round's training instead
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            self.log(f"[checkpoint] {self.rounds_ckpt.manager.directory}/{t} is unreadable ({type(e).__name__}: "
                     f"{reason}); removing it and redoing round {t}'s training from its saved data")
            self.rounds_ckpt.discard(t)
            return None

    def resume_model(self, base):
        """The model after the last finished round. A finished round whose checkpoint cannot be read is
        reopened: its data files stay, its training is redone and the retrained model evaluated again."""
        while self.state["finished"]:
            t = self.state["finished"][-1]
            model = self.restore_round(base, t)
            if model is not None:
                return model
            self.state["finished"].pop()
            self.update_guard()
            for name in ("eval.json", round_eval.OPEN_ENDED):  # they described the model that is gone
                remove(self.wd.round_file(t, name))
        return base

    def update_guard(self) -> None:
        """The collapse guard's decision over every evaluated round (guard.decide), into state.json."""
        v = self.config.validation
        evals = [e for e in (read_json(self.wd.round_file(t, "eval.json")) for t in [0, *self.state["finished"]])
                 if e is not None]
        self.state["scores"] = {str(e["round"]): e["validation"]["value"] for e in evals}
        self.state.update(guard.decide([{"round": e["round"], "items": e["validation"]["items"]} for e in evals],
                                       v.metric, v.patience, v.confidence, v.tolerance, v.resamples, self.config.seed,
                                       higher=evals[0]["validation"].get("higher") if evals else None))
        self.wd.save_state(self.state)

    # -- phases: each returns its artifact, computed once (WorkDir.phase) --

    def round_prompts(self, t: int, base, tokenizer) -> list[dict]:
        def compute():
            slices = data.split_rounds(self.inputs.pool, self.inputs.sizes, self.config.seed,
                                       self.pool_difficulty(base, tokenizer),
                                       hardest_first=self.config.curriculum.order == "hard_to_easy")
            return [{**row, "round": t} for row in slices[t - 1]], None

        return self.wd.phase(self.wd.round_file(t, "prompts.jsonl"), compute)

    def pool_difficulty(self, base, tokenizer) -> list[float] | None:
        """Each pool prompt's difficulty for the across-rounds curriculum (None: no curriculum across rounds)."""
        kind = self.config.curriculum.across_rounds
        if kind == "none":
            return None

        def compute():
            prompts = [templates.user_turn(p["prompt"], p["input"]) for p in self.inputs.pool]
            values = (curriculum.difficulty("prompt_ppl", self.on_generation_mesh(base), tokenizer,
                                            [(p, "") for p in prompts], self.config.curriculum.batch_size,
                                            self.gen_mesh)
                      if kind == "prompt_ppl"
                      else [float(len(tokenizer(p, add_special_tokens=False)["input_ids"])) for p in prompts])
            return {"score": kind, "difficulty": {p["prompt_id"]: v for p, v in zip(self.inputs.pool, values)}}, None

        cached = self.wd.phase(self.wd.file(CURRICULUM), compute)
        return [cached["difficulty"][p["prompt_id"]] for p in self.inputs.pool]

    def generate(self, t: int, generator, tokenizer, prompts: list[dict], label: str) -> list[dict]:
        about = lambda: {"generator": label, "generator_checksum": checksum(generator)}  # when run
        rows = self.wd.phase(self.wd.round_file(t, "generations.jsonl"),
                             lambda: selfalign.generate(self.context, t, self.on_generation_mesh(generator), tokenizer,
                                                        prompts, about()),
                             f"generated_r{t}", f"round {t} generation")
        remove(self.wd.round_file(t, selfalign.PARTIAL))  # only once the whole round's rows are written
        return rows

    def build_train_set(self, t: int, model, tokenizer, generations: list[dict]) -> list[dict]:
        """Kept pairs, scored for difficulty under the current model and put in the curriculum's order."""
        def compute():
            kept = [{**g, "round": t} for g in generations if g["kept"]]
            if self.config.train_data == "accumulate":  # rounds 1..t's kept pairs, in round order
                earlier = [read_jsonl(self.wd.round_file(s, "generations.jsonl")) for s in range(1, t)]
                kept = [{**g, "round": s} for s, gens in enumerate(earlier, 1) for g in gens if g["kept"]] + kept
            pairs = [(templates.user_turn(g["prompt"], g["input"]), g["answer"], g["finish"] != "length")
                     for g in kept]
            cur, tr = self.config.curriculum, self.config.train
            if cur.score == "response_ppl" and self.config.generator == "previous" and all(
                    "answer_ppl" in g and g["round"] == t for g in kept):  # the relevance filter's, same model
                scores = [g["answer_ppl"] for g in kept]
            else:
                scores = curriculum.difficulty(cur.score, self.on_generation_mesh(model), tokenizer, pairs,
                                               cur.batch_size, self.gen_mesh, (tr.max_prompt_len, tr.max_response_len))
            idx = curriculum.order(scores, cur.order, [self.config.seed, t, 0xC0])
            rows = [{"prompt_id": kept[i]["prompt_id"], "prompt": pairs[i][0], "response": pairs[i][1],
                     "finished": pairs[i][2], "difficulty": scores[i], "position": n, "round": kept[i]["round"]}
                    for n, i in enumerate(idx)]
            return rows, {"round": t, "phase": "curriculum", "examples": len(rows), "score": cur.score,
                          "order": cur.order, "mean_difficulty": float(np.mean(scores)) if scores else None}

        return self.wd.phase(self.wd.round_file(t, "train.jsonl"), compute, f"scored_r{t}", f"round {t} scoring")

    def train(self, t: int, start, label: str, tokenizer, rows: list[dict]):
        """Round t's SFT from `start`, resuming from its step checkpoints; saves the round's checkpoint."""
        pairs = [(r["prompt"], r["response"], r["finished"]) for r in rows]  # unfinished: no end of turn
        if not pairs:
            raise UserError(f"round {t}: every generation was filtered out, so there is nothing to train on; see "
                            f"{self.wd.round_file(t, 'generations.jsonl')} (dropped_by) and relax the filters or "
                            "sample more tokens")
        ckpt_dir = self.wd.train_checkpoints(t)
        self._generation_copy = None  # training needs the memory
        model, result = training.train(start, tokenizer, pairs, self.config.train_config(t), mesh=self.mesh,
                                       checkpoint_dir=ckpt_dir, progress=self.progress,
                                       log=lambda record: self.wd.metrics.add({"round": t, "phase": "train", **record}))
        # the event before the round checkpoint: a rerun that finds the checkpoint skips training (and its event)
        self.wd.metrics.add({"round": t, "phase": "train_done", "steps": result.steps, "examples": result.examples,
                             "tokens": result.tokens, "truncated_prompts": result.truncated_prompts,
                             "truncated_responses": result.truncated_responses, "start": label,
                             "start_checksum": checksum(start)})
        self.rounds_ckpt.save(t, round_state(model), {"round": t, "generator": self.config.generator,
                                                      "sft_start": self.config.sft_start})
        faults.point(f"trained_r{t}")
        preemption.raise_if_stopped(f"round {t} training")
        remove(ckpt_dir)
        return model

    def evaluate(self, t: int, model, tokenizer) -> dict:
        compute = ((lambda: round_eval.shared_round0(self.context, self.round0_from)) if t == 0 and self.round0_from
                   else (lambda: round_eval.evaluate(self.context, t, self.on_generation_mesh(model), tokenizer)))
        return self.wd.phase(self.wd.round_file(t, "eval.json"), compute, f"evaluated_r{t}", f"round {t} evaluation")

    # -- the loop --

    def run(self) -> dict:
        try:
            with self.tracker:  # the W&B run starts here and is finished on every way out
                return self._run()
        finally:  # also on an error or a stop: a later run in this process can take the work dir
            self.rounds_ckpt.close()
            self.wd.close()

    def _run(self) -> dict:
        config, v = self.config, self.config.validation
        t_start = time.perf_counter()
        m = config.model
        base, tokenizer = presets.load_preset(m.name, m.path, m.dtype, m.param_dtype, mesh=self.mesh, seed=config.seed,
                                              progress=self.progress, scan_layers=m.scan_layers, quant=m.quant)
        self.log(f"[run] {self.wd.path}: {config.rounds} round(s), prompts per round {self.inputs.sizes}, "
                 f"model {config.model.path or config.model.name}, {jax.device_count()} device(s)")
        if self.inputs.unavailable:
            self.log(f"[eval] not evaluated in this run (eval.required=false; shown as n/a): "
                     f"{', '.join(self.inputs.unavailable)}: {next(iter(self.inputs.unavailable.values()))}")
        if self.inputs.bigbench is not None:
            self.log(f"[eval] {self.inputs.bigbench.describe()}")
        if self.inputs.eval_tasks:
            mc2 = config.eval.protocol == "dromedary" and "truthfulqa_mc2" in self.inputs.eval_tasks
            self.log(f"[run] every round (0 = the base model) evaluates {','.join(self.inputs.eval_tasks)} under the "
                     f"{config.eval.protocol} "
                     f"protocol: {evaluation.DESCRIPTIONS[config.eval.protocol]}"
                     + ("; its truthfulqa_mc2 is soft-jax's own construction" if mc2 else ""))
        self.log(f"[run] collapse guard: validation {v.metric}, a round is better or worse than the best only beyond "
                 f"noise ({v.confidence:.0%} paired bootstrap interval, tolerance {v.tolerance}), "
                 f"patience {v.patience}")
        if config.check_contamination and distributed.is_writer():
            contamination.check_run(self.inputs, self.wd.file(CONTAMINATION), config.eval.truthfulqa_file,
                                    config.open_ended.path, self.log)
        if "0" not in self.state["scores"]:
            self.evaluate(0, base, tokenizer)
            self.update_guard()
        model = self.resume_model(base)
        self.tracker.log_rounds(self.state)  # round 0, and rounds an earlier process finished but did not log
        for t in range(len(self.state["finished"]) + 1, config.rounds + 1):
            if self.state["stopped"]:
                break
            model = self.one_round(t, model, base, tokenizer)
        self.log(report.round_table(list(self.wd.metrics.rows.values()), v.metric, config.eval.tasks,
                                    self.state["comparisons"], config.eval.protocol))
        if distributed.is_writer():
            out = report.write(self.wd.path)
            self.tracker.log_plots(out)
            self.log(f"[run] report: {out}")
        if self.state["stopped"]:
            self.log(f"[run] stopped early: {self.state['stopped']}")
        self.log(f"[run] done in {time.perf_counter() - t_start:.0f} s; best round {self.state['best_round']} "
                 f"(load it with --model {self.wd.path})")
        return self.state

    def one_round(self, t: int, model, base, tokenizer):
        config, t0 = self.config, time.perf_counter()
        prompts = self.round_prompts(t, base, tokenizer)
        previous = f"round {t - 1}" if t > 1 else "base"
        generator, label = (model, previous) if config.generator == "previous" else (base, "base")
        gens = self.generate(t, generator, tokenizer, prompts, label)
        counts = filters.counts([g["dropped_by"] for g in gens])
        dropped = ", ".join(f"{k} {n}" for k, n in counts.items() if k != "kept" and n) or "none"
        self.log(f"[round {t}] generate: {len(gens)} prompts, {counts['kept']} kept, "
                 f"{len(gens) - counts['kept']} dropped ({dropped})")
        rows = self.build_train_set(t, model, tokenizer, gens)
        trained = self.restore_round(base, t)  # saved before a stop that came before state.json
        if trained is not None:
            remove(self.wd.train_checkpoints(t))
        else:
            start, label = (model, previous) if config.sft_start == "continue" else (base, "base")
            trained = self.train(t, start, label, tokenizer, rows)
        ev = self.evaluate(t, trained, tokenizer)
        self.state["finished"].append(t)
        self.update_guard()
        self.wd.metrics.add({"round": t, "phase": "round", "seconds": time.perf_counter() - t0})
        self.tracker.log_rounds(self.state)
        distributed.barrier(f"round {t} done")
        self.log(f"[round {t}] done: validation {config.validation.metric} {ev['validation']['value']:.4f} "
                 f"({guard.describe(self.state['comparisons'].get(str(t)))}), best round {self.state['best_round']}")
        faults.point(f"round_done_r{t}")
        preemption.raise_if_stopped(f"round {t}")
        return trained


def run(config: RunConfig, workdir: str, log: Callable[[str], None] = print,
        round0_from: str | None = None) -> dict:
    """Runs or resumes the run in `workdir`. round0_from: the work dir of a run whose round 0 (the base model's
    evaluation) this run copies instead of evaluating again; the caller vouches that it is the same (a sweep)."""
    return Run(config, workdir, log, round0_from).run()


def best_model(workdir: str, dtype: str | None = None):
    """(model, tokenizer) of a work dir's best round (or its base model when round 0 scored best)."""
    wd = WorkDir(workdir)
    cfg, state = read_json(wd.file(CONFIG)), read_json(wd.file(STATE))
    if cfg is None or state is None:
        raise UserError(f"{workdir}: not a soft-jax run work dir (no {CONFIG} / {STATE}); run `soft-jax run` first")
    config = config_lib.from_saved(cfg)
    m = config.model
    model, tokenizer = presets.load_preset(m.name, m.path, dtype or m.dtype, m.param_dtype, seed=config.seed,
                                           progress=False, scan_layers=m.scan_layers, quant=m.quant)
    best = state.get("best_round")
    if best:
        ckpt = StepCheckpointer(wd.file("checkpoints", "rounds"), every=0, keep=None)
        try:
            model = restore_round_model(ckpt, best, model, config.train)
        except Exception as e:  # noqa: BLE001 - missing or corrupted files
            raise UserError(f"{ckpt.manager.directory}/{best}: round {best}'s checkpoint is missing or unreadable "
                            f"({type(e).__name__}); rerun `soft-jax run` on {workdir} to rebuild it") from None
        finally:
            ckpt.close()
    return model, tokenizer


def round_state(model):
    """What a round checkpoint holds: the LoRA adapters alone when the model has them (the base is read once,
    from the model's checkpoint), else every parameter."""
    from soft_jax.models import lora

    return nnx.state(model, nnx.LoRAParam) if lora.has_adapters(model) else nnx.state(model)


def restore_round_model(ckpt: StepCheckpointer, t: int, base, train):
    """Round t's model from its checkpoint: with LoRA (train.lora_rank), `base` with the round's adapters (the
    base arrays shared, not copied), else the checkpoint's parameters."""
    from soft_jax.models import lora

    if train.lora_rank:
        template = lora.add_adapters(base, train.lora_rank, train.lora_alpha, train.lora_targets)
        graphdef, adapters, rest = nnx.split(template, nnx.LoRAParam, ...)
        return nnx.merge(graphdef, ckpt.restore(t, adapters)[0], rest)
    graphdef, state = nnx.split(base)
    return nnx.merge(graphdef, ckpt.restore(t, state)[0])
