"""The SOFT / SOFT+ round loop (METHOD.md): generate -> filter -> score -> order -> train -> eval -> save.

Every phase leaves a durable artifact in the work dir before the next starts, so a rerun of the same
command skips what is finished and resumes inside a phase where that is possible:

    DIR/config.json                    the run's config (a rerun with a changed config is checked against it)
    DIR/state.json                     finished rounds, validation scores, best round, why the run stopped
    DIR/metrics.jsonl                  one object per event: round, phase, numbers (deduplicated on resume)
    DIR/curriculum.json                per-prompt difficulty of the pool (across-rounds curriculum only)
    DIR/rounds/NNN/prompts.jsonl       the round's prompt slice
    DIR/rounds/NNN/generations.jsonl   raw self-aligned outputs, exemplar ids, parsed answer, filter verdict
    DIR/rounds/NNN/train.jsonl         kept (prompt, response) pairs in training order, with difficulty
    DIR/rounds/NNN/eval.json           validation score, eval tasks, open-ended answers file
    DIR/checkpoints/rounds/N           Orbax: the parameters after round N
    DIR/checkpoints/train/NNN          Orbax: training-step checkpoints of the round in progress

Generation resumes at batch granularity (each finished batch is one line of a partial file; a torn last
line is dropped), training at step granularity. Random draws are keyed by (seed, round, batch), never by
a running stream, so a resumed round samples exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from soft_jax import config as config_lib
from soft_jax import curriculum, data, distributed, evaluation, faults, guard, io_utils, memory, preemption, sampling
from soft_jax import signals, training
from soft_jax import sharding as shd
from soft_jax.checkpoints import StepCheckpointer
from soft_jax.data import filters, templates
from soft_jax.errors import UserError
from soft_jax.io_utils import write_atomic
from soft_jax.io_utils import write_jsonl as _write_jsonl
from soft_jax.models import presets

STATE, CONFIG, METRICS, LOCK = "state.json", "config.json", "metrics.jsonl", ".lock"


def checksum(model) -> float:
    """A cheap fingerprint of a model's parameters (recorded so a run shows which model did what)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return float(sum(jax.device_get(jax.numpy.sum(jax.numpy.abs(x.astype(jax.numpy.float32)))) for x in leaves))


def round_dir(workdir: str, t: int) -> str:
    return os.path.join(workdir, "rounds", f"{t:03d}")


# --- small durable files ------------------------------------------------------------------------


def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:  # soft-jax writes atomically: something else damaged the file
            raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}); the file was damaged outside "
                            "soft-jax: restore it, or start over with a new --workdir") from None


def write_json(path: str, obj) -> None:
    """Atomic JSON write; on a multi-host run only process 0 writes shared files (here and below)."""
    if not distributed.is_writer():
        return
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path: str, rows) -> None:
    if distributed.is_writer():
        _write_jsonl(path, rows)


def remove(path: str) -> None:
    """Removes a file or directory tree if it exists (writer only)."""
    if not distributed.is_writer() or not os.path.lexists(path):
        return
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.remove(path)


def append_line(path: str, row: dict) -> None:
    if distributed.is_writer():
        io_utils.append_line(path, row)


class Metrics:
    """metrics.jsonl: one object per event keyed by (round, phase, step); a resumed event replaces, never repeats."""

    def __init__(self, path: str):
        self.path = path
        self.rows = {self._key(r): r for r in io_utils.read_appended(path)}
        self._rewrite()

    @staticmethod
    def _key(row: dict) -> tuple:
        return row.get("round"), row.get("phase"), row.get("step")

    def _rewrite(self) -> None:
        if not distributed.is_writer():
            return
        write_jsonl(self.path, self.rows.values())

    def add(self, row: dict) -> None:
        key = self._key(row)
        seen = key in self.rows
        self.rows[key] = row
        if seen:
            self._rewrite()
        else:
            append_line(self.path, row)


# --- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    """Everything a run reads besides the model, loaded and checked before any weights."""

    principles: str
    exemplars: list[data.Exemplar]
    pool: list[dict]
    validation: list[dict]
    sizes: list[int]
    open_ended: list[dict]


def load_inputs(c: ml_collections.ConfigDict) -> Inputs:
    exemplars = data.load_exemplars(c.exemplars.path)
    if c.exemplars.k > len(exemplars):
        raise UserError(f"exemplars.k = {c.exemplars.k} but the exemplar pool has {len(exemplars)}; lower "
                        "exemplars.k or add exemplars")
    if c.exemplars.strategy == "fixed" and c.exemplars.fixed_ids:
        data.sample_exemplars(exemplars, c.exemplars.k, "fixed", [], c.exemplars.fixed_ids)  # refuses unknown ids
    pr = c.prompts
    pool = (data.load_tfds_prompts(pr.tfds, pr.tfds_split, pr.tfds_data_dir, pr.tfds_prompt_key) if pr.tfds
            else data.load_prompts(pr.path))
    per_round = c.prompts.per_round or len(pool) // c.rounds  # 0: the whole pool, split evenly
    sizes = data.round_sizes(per_round, c.rounds)
    if sum(sizes) > len(pool):
        raise UserError(f"{c.rounds} rounds of {per_round} prompts need {sum(sizes)} prompts but the "
                        f"prompt pool ({c.prompts.path or 'built-in'}) has {len(pool)}; lower rounds or "
                        "prompts.per_round, or give a larger pool")
    validation = data.load_pairs(c.validation.path) if c.validation.metric == "valid_nll" else []
    tasks = evaluation.parse_tasks(c.eval.tasks) if c.eval.tasks else []
    for task in set(tasks) | ({c.validation.metric} & set(evaluation.TASKS)):  # no data: fail now, not later
        evaluation.load_items(task, 1, c.eval.truthfulqa_file or None)
    open_ended = data.load_prompts(c.open_ended.path or data.asset("questions.jsonl")) if c.open_ended.limit else []
    return Inputs(data.load_principles(c.principles), exemplars, pool, validation, sizes,
                  open_ended[:c.open_ended.limit])


def resolve_fixed_exemplars(c: ml_collections.ConfigDict, inputs: Inputs) -> None:
    """The fixed strategy's exemplars, when the config names none: k covering as many principles as k random
    draws do on average (data.choose_fixed), written into the config so config.json records them."""
    e = c.exemplars
    if e.strategy == "fixed" and not e.fixed_ids:
        covers = [filters.cited_principles(x.thoughts) for x in inputs.exemplars]
        e.fixed_ids = data.choose_fixed(inputs.exemplars, e.k, covers)


def lock_workdir(workdir: str):
    """An exclusive lock on the work dir for this process's lifetime (the OS drops it when the process dies,
    even by SIGKILL, so a crashed run never leaves a stale lock)."""
    import fcntl

    f = open(os.path.join(workdir, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{workdir}: another soft-jax run (pid {owner}) is using this work dir; wait for it to "
                        "finish or stop it, or use another --workdir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def check_workdir(workdir: str, c: ml_collections.ConfigDict) -> dict | None:
    """The config to write to config.json (None: it is up to date); on a rerun refuses config changes that
    invalidate finished rounds. Reads only, so that every host can check before any host writes."""
    path = os.path.join(workdir, CONFIG)
    new = config_lib.to_dict(c)
    old = read_json(path)
    if old is None:
        if os.path.isdir(workdir) and set(os.listdir(workdir)) - {LOCK}:
            raise UserError(f"{workdir}: the directory is not empty and holds no soft-jax run ({CONFIG} missing); "
                            "give a new or empty work dir")
        return new
    changed = config_lib.diff(old, new)
    state = read_json(os.path.join(workdir, STATE), {"finished": []})
    done = len(state["finished"])
    bad = [k for k in changed if k not in config_lib.RESUMABLE_CHANGES]
    per_old, per_new = old["prompts"]["per_round"], new["prompts"]["per_round"]
    if isinstance(per_old, list) or isinstance(per_new, list):
        sizes_old = per_old if isinstance(per_old, list) else [per_old] * old["rounds"]
        sizes_new = per_new if isinstance(per_new, list) else [per_new] * new["rounds"]
        if sizes_old[:done + 1] != sizes_new[:done + 1]:
            bad.append("prompts.per_round")
    elif per_old != per_new:
        bad.append("prompts.per_round")
    if bad:
        raise UserError(f"{workdir} holds a run with another config (changed: {', '.join(sorted(set(bad)))}); "
                        "use a new --workdir, or rerun with the config in its config.json")
    return new if changed else None


def check_batches(c: ml_collections.ConfigDict, mesh_sizes: dict) -> None:
    """Refuses batch sizes that the mesh's data axes (data x fsdp) do not divide."""
    rows = mesh_sizes["data"] * mesh_sizes["fsdp"]
    micro = c.train.batch_size // max(c.train.grad_accum, 1)
    for what, n in (("sampling.batch_size", c.sampling.batch_size), ("train.batch_size / train.grad_accum", micro)):
        if n % rows:
            raise UserError(f"config: {what} = {n} is not divisible by the mesh's data x fsdp = {rows}; "
                            f"make it a multiple of {rows}")


def prompt_tokens(c: ml_collections.ConfigDict, inputs: Inputs, tokenizer) -> tuple[int, int]:
    """(the longest self-align prompt, the tokens a sampling batch shares) in tokens: the principles and the k
    longest exemplars, and the pool's longest prompt."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    longest = sorted(inputs.exemplars, key=lambda e: -len(templates.exemplar_block(e)))[:c.exemplars.k]
    prefix = count(templates.self_align_prompt(inputs.principles, longest, "")) - count(f"{templates.USER}")
    prompt = prefix + max(count(templates.user_turn(p["prompt"], p["input"])) for p in inputs.pool) + 16
    return prompt, prefix if c.exemplars.granularity == "batch" else 0


def train_config(c: ml_collections.ConfigDict, t: int = 1) -> training.TrainConfig:
    """Round t's SFT settings: the config's, in the curriculum's order, seeded by the round."""
    tr = c.train
    return training.TrainConfig(
        max_prompt_len=tr.max_prompt_len, max_response_len=tr.max_response_len, pack=tr.pack, order="given",
        batch_size=tr.batch_size, grad_accum=tr.grad_accum, epochs=tr.epochs, learning_rate=tr.learning_rate,
        warmup_ratio=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm, weight_decay=tr.weight_decay,
        seed=c.seed + t, checkpoint_every=tr.checkpoint_every, remat=tr.remat, scan_layers=c.model.scan_layers)


class Run:
    """One work dir's run; `run()` executes or resumes it."""

    def __init__(self, c: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print):
        self.c, self.workdir = c, workdir
        self.log = log if distributed.is_writer() else (lambda _: None)
        self.progress = bool(c.progress) and distributed.is_writer()
        # everything a run reads is checked before the work dir is touched or weights are read
        model_cfg, tokenizer = presets.check(c.model.name, c.model.path, c.model.dtype, c.model.param_dtype)
        self.inputs = load_inputs(c)
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise UserError(f"--workdir {workdir}: a file is in the way; give a new or existing run directory")
        training.check_overhead(tokenizer, c.train)  # max lengths that cannot hold the chat format
        resolve_fixed_exemplars(c, self.inputs)  # before config.json is compared or written: it records them
        shape = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
        mesh = shd.make_mesh(shape)  # refuses a mesh that does not divide the devices
        self.mesh = mesh if jax.device_count() > 1 else None
        sizes = memory.resolve_mesh(shape, jax.device_count())
        check_batches(c, sizes)
        self.check_memory(model_cfg, tokenizer, sizes)
        # every host checks before any host writes: a host that checked late would see the writer's files
        update = check_workdir(workdir, c)
        distributed.barrier("workdir checked")
        self.lock = None
        if distributed.is_writer():
            os.makedirs(workdir, exist_ok=True)
            self.lock = lock_workdir(workdir)
            try:
                if update:
                    write_json(os.path.join(workdir, CONFIG), update)
                if io_utils.remove_stray_temps(workdir, skip=("checkpoints",)):
                    self.log(f"[run] removed temp files that an interrupted write left in {workdir}")
            except BaseException:
                self.lock.close()
                raise
        distributed.barrier("workdir ready")
        self.state = read_json(os.path.join(workdir, STATE), {"finished": [], "scores": {}, "best_round": None,
                                                              "stopped": None})
        self.metrics = Metrics(os.path.join(workdir, METRICS))
        self.filter_cfg = filters.FilterConfig(**c.filters.to_dict())
        self.rounds_ckpt = StepCheckpointer(os.path.join(workdir, "checkpoints", "rounds"), every=0, keep=None)

    def check_memory(self, model_cfg, tokenizer, mesh_shape) -> None:
        """On a GPU or TPU, compiles the round's programs (soft_jax.plan) and refuses a run whose largest one
        does not fit a device; on CPU, prints soft_jax.memory's estimate."""
        c = self.c
        prompt, shared = prompt_tokens(c, self.inputs, tokenizer)
        available = memory.device_memory()
        if available is None:  # CPU: its memory is the host's; the estimate, for the record
            est = memory.for_run(c, model_cfg, mesh_shape, prompt, shared)
            self.log(f"[memory] estimate per device: training {memory.gib(est['train_total'])} GiB, generation "
                     f"{memory.gib(est['generate_total'])} GiB (device memory unknown on CPU)")
            return
        # an accelerator: the compiler says what each of the round's programs needs on these devices
        from soft_jax import plan

        mesh = self.mesh or shd.make_mesh((1, 1, 1), jax.devices()[:1])
        programs = plan.compile_run(model_cfg, plan.Shapes.of_run(c, prompt, shared), mesh, train_config(c))
        self.log("[memory] compiled, per device: " + ", ".join(f"{p.name} {memory.gib(p.total)}" for p in programs)
                 + f" GiB of {memory.gib(available)} GiB")
        plan.refuse_over(programs, available)

    # -- models --

    def load_base(self):
        m = self.c.model
        return presets.load(m.name, m.path, m.dtype, m.param_dtype, mesh=self.mesh, seed=self.c.seed,
                            progress=self.progress)

    def restore_round(self, template, t: int):
        graphdef, state = nnx.split(template)
        restored, _ = self.rounds_ckpt.restore(t, state)
        return nnx.merge(graphdef, restored)

    def try_restore_round(self, template, t: int):
        """Round t's model, or None when its checkpoint is missing or unreadable (a bad one is removed)."""
        if t not in (self.rounds_ckpt.manager.all_steps() or []):
            return None
        try:
            return self.restore_round(template, t)
        except Exception as e:  # noqa: BLE001 - corrupted or partial files: redo the round's training instead
            reason = str(e).splitlines()[0][:200] if str(e) else ""
            self.log(f"[checkpoint] {self.rounds_ckpt.manager.directory}/{t} is unreadable ({type(e).__name__}: "
                     f"{reason}); removing it and redoing round {t}'s training from its saved data")
            self.rounds_ckpt.discard(t)
            return None

    def resume_model(self, base):
        """The model after the last finished round. A finished round whose checkpoint cannot be read is
        reopened: its data files stay, its training is redone (deterministic, so the same model results)."""
        st = self.state
        while st["finished"]:
            t = st["finished"][-1]
            model = self.try_restore_round(base, t)
            if model is not None:
                return model
            st["finished"].pop()
            self.update_guard()
            write_json(os.path.join(self.workdir, STATE), st)
        return base

    def save_round(self, model, t: int, meta: dict) -> None:
        self.rounds_ckpt.save(t, nnx.state(model), meta)

    # -- phases --

    def round_prompts(self, t: int, base, tokenizer) -> list[dict]:
        path = os.path.join(round_dir(self.workdir, t), "prompts.jsonl")
        if os.path.exists(path):
            return [json.loads(line) for line in open(path, encoding="utf-8")]
        slices = data.split_rounds(self.inputs.pool, self.inputs.sizes, self.c.seed,
                                   self.pool_difficulty(base, tokenizer),
                                   hardest_first=self.c.curriculum.order == "hard_to_easy")
        rows = [{**row, "round": t} for row in slices[t - 1]]
        write_jsonl(path, rows)
        return rows

    def pool_difficulty(self, base, tokenizer) -> list[float] | None:
        kind = self.c.curriculum.across_rounds
        if kind == "none":
            return None
        path = os.path.join(self.workdir, "curriculum.json")
        cached = read_json(path)
        if cached is None:
            pairs = [(templates.user_turn(p["prompt"], p["input"]), "") for p in self.inputs.pool]
            score = "prompt_ppl" if kind == "prompt_ppl" else "prompt_length"
            values = (curriculum.difficulty("prompt_ppl", base, tokenizer, pairs, self.c.curriculum.batch_size,
                                            self.mesh) if score == "prompt_ppl"
                      else [float(len(tokenizer(p, add_special_tokens=False)["input_ids"])) for p, _ in pairs])
            cached = {"score": kind, "difficulty": {p["prompt_id"]: v for p, v in zip(self.inputs.pool, values)}}
            write_json(path, cached)
        return [cached["difficulty"][p["prompt_id"]] for p in self.inputs.pool]

    def generate(self, t: int, generator, tokenizer, prompts: list[dict], label: str = "") -> list[dict]:
        """Self-aligned generations for the round's prompts, resumable per batch."""
        rdir = round_dir(self.workdir, t)
        final = os.path.join(rdir, "generations.jsonl")
        if os.path.exists(final):
            return [json.loads(line) for line in open(final, encoding="utf-8")]
        partial = os.path.join(rdir, "generations.partial.jsonl")
        done = {b["batch"]: b["rows"] for b in io_utils.read_appended(partial)}
        s = self.c.sampling
        cfg = sampling.SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                      top_k=s.top_k, batch_size=s.batch_size, stop_strings=templates.STOP_STRINGS)
        ctx = filters.Context(self.inputs.exemplars, self.inputs.principles, self.filter_cfg)
        n_batches = math.ceil(len(prompts) / s.batch_size)
        bar = tqdm(total=len(prompts), desc=f"round {t} generating", unit="prompt", disable=not self.progress)
        bar.update(sum(len(r) for r in done.values()))
        t0, new_tokens = time.perf_counter(), 0
        try:  # a stop or an error closes the bar first, so the message after it starts on its own line
            for b in range(n_batches):
                if b in done:
                    continue
                batch = prompts[b * s.batch_size:(b + 1) * s.batch_size]
                rows = self.generate_batch(t, b, generator, tokenizer, batch, cfg, ctx)
                new_tokens += sum(len(tokenizer(r["raw"], add_special_tokens=False)["input_ids"]) for r in rows)
                append_line(partial, {"batch": b, "rows": rows})
                done[b] = rows
                bar.update(len(rows))
                bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
                faults.point(f"generate_r{t}_b{b}")
                preemption.check(f"round {t} generation batch {b + 1} of {n_batches}")
        finally:
            bar.close()
        rows = [r for b in range(n_batches) for r in done[b]]
        write_jsonl(final, rows)
        remove(partial)
        seconds = time.perf_counter() - t0
        self.metrics.add({"round": t, "phase": "generate", "generator": label, "generator_checksum": checksum(generator),
                          "prompts": len(rows), "seconds": seconds,
                          "new_tokens_per_s": new_tokens / max(seconds, 1e-9), **self.shown(rows),
                          "truncated_generations": sum(r["finish"] == "length" for r in rows),
                          **filters.counts([r["dropped_by"] for r in rows])})
        faults.point(f"generated_r{t}")
        preemption.check(f"round {t} generation")
        return rows

    def generate_batch(self, t: int, b: int, generator, tokenizer, batch: list[dict], cfg, ctx) -> list[dict]:
        """Round t's batch b: self-aligned outputs, parsed and judged by the filters (one row per prompt)."""
        shots = [self.exemplars_for(t, b, p) for p in batch]
        texts = [templates.self_align_prompt(self.inputs.principles, ex, p["prompt"], p["input"])
                 for p, ex in zip(batch, shots)]
        seed = np.random.default_rng([self.c.seed, t, b]).integers(2**31, size=2)
        outs, finish = sampling.generate(generator, tokenizer, texts, cfg, progress=False, mesh=self.mesh,
                                         seed=int(seed[0]), return_finish=True)
        forced = [False] * len(outs)
        if self.c.sampling.force_answer:  # thoughts that ended without an answer: write the marker, sample it
            todo = [i for i, o in enumerate(outs) if templates.parse(o)[1] is None and f"\n{templates.USER}" not in o]
            if todo:
                heads = [texts[i] + templates.with_answer_marker(outs[i]) for i in todo]
                answers, ends = sampling.generate(generator, tokenizer, heads, cfg, progress=False, mesh=self.mesh,
                                                  seed=int(seed[1]), return_finish=True)
                for i, a, end in zip(todo, answers, ends):  # the answer's own stop reason is the row's
                    outs[i], forced[i], finish[i] = templates.with_answer_marker(outs[i]) + a, True, end
        rows = []
        for p, ex, raw, f, end in zip(batch, shots, outs, forced, finish):
            thoughts, answer = templates.parse(raw)
            if answer is None and not self.filter_cfg.require_marker:
                thoughts, answer = "", templates.parse("\n" + templates.ANSWER + raw)[1]
            if answer is not None:
                answer = filters.cut_repeated_sentence(answer)
            reason = filters.verdict(answer, p["prompt"], ctx, thoughts, end)
            rows.append({"prompt_id": p["prompt_id"], "prompt": p["prompt"], "input": p["input"],
                         "category": p.get("category", ""), "exemplar_ids": [e.id for e in ex], "raw": raw,
                         "finish": end, "thoughts": thoughts, "answer": answer, "forced_answer": f,
                         "kept": reason is None, "dropped_by": reason})
        return rows

    def shown(self, rows: list[dict]) -> dict:
        """How many distinct exemplars the round's prompts saw, the principles their thoughts cite, and the
        principles one prompt's exemplars cite on average (equal for the fixed and random strategies)."""
        cites = {e.id: filters.cited_principles(e.thoughts) for e in self.inputs.exemplars}
        per_row = [set().union(*(cites[i] for i in r["exemplar_ids"])) for r in rows]
        return {"exemplars_shown": len({i for r in rows for i in r["exemplar_ids"]}),
                "principles_shown": len(set().union(*per_row)) if per_row else 0,
                "principles_per_prompt": float(np.mean([len(s) for s in per_row])) if per_row else 0.0}

    def exemplars_for(self, t: int, b: int, prompt: dict) -> list[data.Exemplar]:
        e = self.c.exemplars
        if e.granularity == "batch":  # one draw per batch: the batch shares its whole prefix
            key = [self.c.seed, t, b]
        else:
            key = [self.c.seed, t, int(data.prompt_id(prompt["prompt_id"])[1:], 16)]
        return data.sample_exemplars(self.inputs.exemplars, e.k, e.strategy, key, e.fixed_ids)

    def build_train_set(self, t: int, model, tokenizer, generations: list[dict]) -> list[dict]:
        """Kept pairs, scored for difficulty under the current model and put in the curriculum's order."""
        path = os.path.join(round_dir(self.workdir, t), "train.jsonl")
        if os.path.exists(path):
            return [json.loads(line) for line in open(path, encoding="utf-8")]
        kept = [g for g in generations if g["kept"]]
        pairs = [(templates.user_turn(g["prompt"], g["input"]), g["answer"], g.get("finish") != "length")
                 for g in kept]
        cur, tr = self.c.curriculum, self.c.train
        scores = curriculum.difficulty(cur.score, model, tokenizer, pairs, cur.batch_size, self.mesh,
                                       (tr.max_prompt_len, tr.max_response_len))
        idx = curriculum.order(scores, cur.order, [self.c.seed, t, 0xC0])
        rows = [{"prompt_id": kept[i]["prompt_id"], "prompt": pairs[i][0], "response": pairs[i][1],
                 "finished": pairs[i][2], "difficulty": scores[i], "position": n}
                for n, i in enumerate(idx)]
        write_jsonl(path, rows)
        self.metrics.add({"round": t, "phase": "curriculum", "examples": len(rows), "score": cur.score,
                          "order": cur.order, "mean_difficulty": float(np.mean(scores)) if scores else None})
        faults.point(f"scored_r{t}")
        preemption.check(f"round {t} scoring")
        return rows

    def train(self, t: int, start, tokenizer, rows: list[dict]):
        cfg = train_config(self.c, t)
        ckpt_dir = os.path.join(self.workdir, "checkpoints", "train", f"{t:03d}")

        def log(record):
            self.metrics.add({"round": t, "phase": "train", **record})

        pairs = [(r["prompt"], r["response"], r.get("finished", True)) for r in rows]  # unfinished: no end of turn
        if not pairs:
            raise UserError(f"round {t}: every generation was filtered out, so there is nothing to train on; see "
                            f"{round_dir(self.workdir, t)}/generations.jsonl (dropped_by) and relax the filters or "
                            "sample more tokens")
        model, result = training.train(start, tokenizer, pairs, cfg, mesh=self.mesh, checkpoint_dir=ckpt_dir,
                                       progress=self.progress, log=log)
        summary = {"round": t, "phase": "train_done", "steps": result.steps, "examples": result.examples,
                   "tokens": result.tokens, "truncated_prompts": result.truncated_prompts,
                   "truncated_responses": result.truncated_responses}
        return model, summary, ckpt_dir

    def evaluate(self, t: int, model, tokenizer) -> dict:
        """Validation score (with per-item scores for the guard), eval tasks, open-ended answers and their
        degeneracy signals of the model after round t (0: the base)."""
        path = os.path.join(round_dir(self.workdir, t), "eval.json")
        found = read_json(path)
        if found is not None:
            return found
        c, out = self.c, {"round": t}
        v = c.validation
        t0 = time.perf_counter()
        if self.inputs.open_ended:
            answers = self.open_ended(model, tokenizer)
            name = "open_ended.jsonl"
            write_jsonl(os.path.join(round_dir(self.workdir, t), name), answers)
            out["open_ended"] = {"file": name, "n": len(answers),
                                 "signals": signals.summary([a["answer"] for a in answers],
                                                            [a["finish"] for a in answers])}
        if v.metric == "valid_nll":
            pairs = [(p["prompt"], p["response"]) for p in self.inputs.validation]
            logps = curriculum.response_logps(model, tokenizer, pairs, v.batch_size, self.mesh,
                                              (c.train.max_prompt_len, c.train.max_response_len))
            items = [float(-np.mean(lp)) for lp in logps]
        elif v.metric in signals.SIGNALS:
            key = signals.SIGNALS[v.metric][0]
            items = [a["signals"][key] for a in answers]
        else:
            res = evaluation.evaluate(model, tokenizer, [v.metric], c.eval.protocol, v.limit or None,
                                      mesh=self.mesh, progress=False)
            items = [r["correct"] for r in res[v.metric]["items"]]
        out["validation"] = {"metric": v.metric, "value": float(np.mean(items)), "n": len(items), "items": items}
        if c.eval.tasks:
            res = evaluation.evaluate(model, tokenizer, evaluation.parse_tasks(c.eval.tasks), c.eval.protocol,
                                      c.eval.limit or None, truthfulqa_file=c.eval.truthfulqa_file or None,
                                      batch_size=c.eval.batch_size, mesh=self.mesh, progress=self.progress)
            out["protocol"], out["protocol_description"] = res.pop("protocol"), res.pop("protocol_description")
            out["tasks"] = res
        write_json(path, out)
        summary = {"round": t, "phase": "eval", "seconds": time.perf_counter() - t0,
                   c.validation.metric: out["validation"]["value"]}
        for task, r in out.get("tasks", {}).items():
            summary[task] = r["accuracy"]
        for k in ("distinct_2", "repeated_ngram_rate", "length", "truncation_rate"):
            if "open_ended" in out:
                summary[f"open_{k}"] = out["open_ended"]["signals"][k]
        self.metrics.add(summary)
        faults.point(f"evaluated_r{t}")
        preemption.check(f"round {t} evaluation")
        return out

    def open_ended(self, model, tokenizer) -> list[dict]:
        """Answers to the open-ended questions in the engraving format, with why each stopped and its signals."""
        qs = self.inputs.open_ended
        heads = [training.engraving_parts(tokenizer, q["prompt"], "")[0] for q in qs]
        templated = bool(tokenizer.chat_template)
        outs, finish = sampling.generate(model, tokenizer, heads, sampling.SamplingConfig(
            max_new_tokens=self.c.open_ended.max_new_tokens, batch_size=self.c.sampling.batch_size),
            add_special_tokens=not templated, progress=False, mesh=self.mesh, return_finish=True)
        return [{"prompt_id": q["prompt_id"], "prompt": q["prompt"], "answer": a, "finish": f,
                 "signals": signals.per_answer(a, f)} for q, a, f in zip(qs, outs, finish)]

    def update_guard(self) -> None:
        """The collapse guard's decision over every evaluated round (guard.decide), into state."""
        v, st = self.c.validation, self.state
        evals = [read_json(os.path.join(round_dir(self.workdir, t), "eval.json")) for t in [0, *st["finished"]]]
        evals = [e for e in evals if e is not None]
        st["scores"] = {str(e["round"]): e["validation"]["value"] for e in evals}
        st.update(guard.decide([{"round": e["round"], "items": e["validation"]["items"]} for e in evals], v.metric,
                               v.patience, v.confidence, v.tolerance, v.resamples, self.c.seed))

    # -- the loop --

    def run(self) -> dict:
        try:
            return self._run()
        finally:  # also on an error or a stop: a later run in this process can take the work dir
            self.rounds_ckpt.close()
            if self.lock:
                self.lock.close()

    def _run(self) -> dict:
        c = self.c
        t_start = time.perf_counter()
        base, tokenizer = self.load_base()
        self.log(f"[run] {self.workdir}: {c.rounds} round(s), prompts per round {self.inputs.sizes}, "
                 f"model {c.model.path or c.model.name}, {jax.device_count()} device(s)")
        if c.eval.tasks:
            self.log(f"[run] every round (0 = the base model) evaluates {c.eval.tasks} under the {c.eval.protocol} "
                     f"protocol: {evaluation.DESCRIPTIONS[c.eval.protocol]}"
                     + ("; its truthfulqa_mc2 is soft-jax's own construction" if c.eval.protocol == "dromedary"
                        and "truthfulqa_mc2" in c.eval.tasks else ""))
        v = c.validation
        self.log(f"[run] collapse guard: validation {v.metric}, a round is better or worse than the best only beyond "
                 f"noise ({v.confidence:.0%} paired bootstrap interval, tolerance {v.tolerance}), patience {v.patience}")
        if "0" not in self.state["scores"]:
            self.evaluate(0, base, tokenizer)
            self.update_guard()
            write_json(os.path.join(self.workdir, STATE), self.state)
        model = self.resume_model(base)
        for t in range(len(self.state["finished"]) + 1, c.rounds + 1):
            if self.state["stopped"]:
                break
            model = self.one_round(t, model, base, tokenizer)
        self.log(self.table())
        if distributed.is_writer():
            from soft_jax import report

            self.log(f"[run] report: {report.write(self.workdir)}")
        if self.state["stopped"]:
            self.log(f"[run] stopped early: {self.state['stopped']}")
        self.log(f"[run] done in {time.perf_counter() - t_start:.0f} s; best round {self.state['best_round']} "
                 f"(load it with --model {self.workdir})")
        return self.state

    def one_round(self, t: int, model, base, tokenizer):
        c = self.c
        t0 = time.perf_counter()
        prompts = self.round_prompts(t, base, tokenizer)
        previous = f"round {t - 1}" if t > 1 else "base"
        generator, label = (model, previous) if c.generator == "previous" else (base, "base")
        gens = self.generate(t, generator, tokenizer, prompts, label)
        kept = sum(g["kept"] for g in gens)
        self.log(f"[round {t}] generate: {len(gens)} prompts, {kept} kept, "
                 f"{len(gens) - kept} dropped ({self.dropped_text(gens)})")
        rows = self.build_train_set(t, model, tokenizer, gens)
        trained = self.try_restore_round(base, t)  # saved before a stop that came before state.json
        if trained is not None:
            remove(os.path.join(self.workdir, "checkpoints", "train", f"{t:03d}"))
        else:
            start, label = (model, previous) if c.sft_start == "continue" else (base, "base")
            trained, summary, ckpt_dir = self.train(t, start, tokenizer, rows)
            summary.update(start=label, start_checksum=checksum(start))
            self.save_round(trained, t, {"round": t, "generator": c.generator, "sft_start": c.sft_start})
            self.metrics.add(summary)
            faults.point(f"trained_r{t}")
            preemption.check(f"round {t} training")
            remove(ckpt_dir)
        ev = self.evaluate(t, trained, tokenizer)
        self.state["finished"].append(t)
        self.update_guard()
        write_json(os.path.join(self.workdir, STATE), self.state)
        self.metrics.add({"round": t, "phase": "round", "seconds": time.perf_counter() - t0})
        distributed.barrier(f"round {t} done")
        self.log(f"[round {t}] done: validation {c.validation.metric} {ev['validation']['value']:.4f} "
                 f"({guard.describe(self.state['comparisons'].get(str(t)))}), best round {self.state['best_round']}")
        faults.point(f"round_done_r{t}")
        preemption.check(f"round {t}")
        return trained

    @staticmethod
    def dropped_text(gens: list[dict]) -> str:
        counts = filters.counts([g["dropped_by"] for g in gens])
        return ", ".join(f"{k} {v}" for k, v in counts.items() if k != "kept" and v) or "none"

    def table(self) -> str:
        return round_table(list(self.metrics.rows.values()), self.c.validation.metric, self.c.eval.tasks,
                           self.state.get("comparisons", {}), self.c.eval.protocol)


def round_table(metrics: list[dict], metric: str, tasks: str = "", comparisons: dict | None = None,
                protocol: str = "") -> str:
    """Markdown table, one line per round: prompts, kept/dropped, truncated generations, exemplars shown,
    difficulty, loss, validation with the guard's paired comparison, eval numbers, open-ended signals."""
    by: dict = {}
    for r in metrics:
        by.setdefault(r.get("round"), {}).setdefault(r.get("phase"), []).append(r)
    names = evaluation.parse_tasks(tasks) if tasks else []
    opens = [("open_distinct_2", "distinct-2"), ("open_repeated_ngram_rate", "repeated 4-grams"),
             ("open_truncation_rate", "truncated answers")]
    opens = [(k, h) for k, h in opens if any(k in r for r in metrics)]
    shown = [r for r in metrics if r.get("phase") == "generate" and "exemplars_shown" in r]
    head = ["round", "prompts", "kept", "dropped", "cut by length", *(["exemplars / principles shown"] if shown else []),
            "difficulty", "train loss", metric, "vs best [interval]" if comparisons is not None else None,
            *(f"{k} ({protocol})" if protocol else k for k in names), *(h for _, h in opens)]
    head = [h for h in head if h is not None]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    num = lambda row, k: f"{row[k]:.4f}" if k in row else "-"  # noqa: E731
    for t in sorted(k for k in by if k is not None):
        ph = by[t]
        gen, cur = (ph.get("generate") or [{}])[0], (ph.get("curriculum") or [{}])[0]
        losses = [r["loss"] for r in sorted(ph.get("train", []), key=lambda r: r["step"])]
        ev = (ph.get("eval") or [{}])[0]
        cells = [str(t), str(gen.get("prompts", "-")), str(gen.get("kept", "-")),
                 str(gen["prompts"] - gen["kept"]) if gen else "-", str(gen.get("truncated_generations", "-"))]
        if shown:
            cells.append(f"{gen['exemplars_shown']} / {gen['principles_shown']}" if "exemplars_shown" in gen else "-")
        cells += [f"{cur['mean_difficulty']:.3g}" if cur.get("mean_difficulty") is not None else "-",
                  f"{np.mean(losses[-max(1, len(losses) // 4):]):.4f}" if losses else "-", num(ev, metric)]
        if comparisons is not None:
            cells.append(guard.describe(comparisons.get(str(t))))
        cells += [num(ev, k) for k in names] + [num(ev, k) for k, _ in opens]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(c: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print) -> dict:
    return Run(c, workdir, log).run()


def best_model(workdir: str, dtype: str | None = None):
    """(model, tokenizer) of a work dir's best round (or its base model when round 0 scored best)."""
    cfg = read_json(os.path.join(workdir, CONFIG))
    state = read_json(os.path.join(workdir, STATE))
    if cfg is None or state is None:
        raise UserError(f"{workdir}: not a soft-jax run work dir (no {CONFIG} / {STATE}); run `soft-jax run` first")
    c = ml_collections.ConfigDict(cfg)
    m = c.model
    model, tokenizer = presets.load(m.name, m.path, dtype or m.dtype, m.param_dtype, seed=c.seed, progress=False)
    best = state.get("best_round")
    if best:
        ckpt = StepCheckpointer(os.path.join(workdir, "checkpoints", "rounds"), every=0, keep=None)
        graphdef, params = nnx.split(model)
        try:
            restored, _ = ckpt.restore(best, params)
        except Exception as e:  # noqa: BLE001 - missing or corrupted files
            raise UserError(f"{ckpt.manager.directory}/{best}: round {best}'s checkpoint is missing or unreadable "
                            f"({type(e).__name__}); rerun `soft-jax run` on {workdir} to rebuild it") from None
        finally:
            ckpt.close()
        model = nnx.merge(graphdef, restored)
    return model, tokenizer
