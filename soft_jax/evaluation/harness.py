"""lm-evaluation-harness on the JAX model: `SoftJaxLM`, an lm-eval `LM` registered as "soft-jax".

Any lm-eval task runs on a soft-jax model without exporting it: `soft-jax eval --lm-eval TASKS`, a run's
`eval.lm_eval.tasks` every round, or lm-eval's own command line through `soft-jax lm-eval --model soft-jax
--model_args model=PATH_OR_NAME ...` (lm-eval finds models only in its own table, so its `lm_eval` command cannot
see a model another package registers; `soft-jax lm-eval` registers this one and then runs lm-eval's command).

The requests are answered as lm-eval's HFLM answers them, so the numbers are comparable to published ones:
- loglikelihood: lm-eval's own `TemplateLM` splits each (context, continuation) pair (the context's trailing
  whitespace moved onto the continuation, the continuation's tokens those of the whole string after the
  context's; an empty context conditioned on the BOS token, else EOS); rows longer than the model are cut on the
  left as HFLM cuts them; the Scorer scores them, each distinct row once and shared prefixes once, and says
  whether the continuation is the greedy one.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of `max_length` tokens, summed.
- generate_until: the contexts encoded and cut on the left to `max_length - max_gen_toks` as HFLM does,
  sampled by the Sampler in groups of equal generation settings (greedy when do_sample is false or the
  temperature 0, else seeded), decoded without special tokens and cut at the first stop sequence (the EOS text
  included), with lm-eval's own post-processing.

Every process of a multi-host run answers every request (the programs are SPMD over the global mesh), so the
harness sees one rank; only the writer process reports.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from soft_jax import models
from soft_jax.core.errors import UserError
from soft_jax.inference.sampler import Sampler, SamplingConfig
from soft_jax.inference.scorer import Scorer

NAME = "soft-jax"


@register_model(NAME, "soft_jax")
class SoftJaxLM(TemplateLM):
    """An lm-eval model on a loaded soft-jax model.

    Args:
      model, tokenizer: a soft-jax Llama and its transformers tokenizer (soft_jax.models.load).
      mesh: the mesh the model is on, or None (one device).
      batch_size: rows per scoring pass and per sampling batch.
      max_length: the longest row (default: the model's max_position_embeddings, as HFLM reads its config).
      max_gen_toks: new tokens per generation when the task does not say.
      add_bos_token: HFLM's: None, the tokenizer's own default; True / False: force it.
      seed: the sampling seed of tasks that sample (do_sample, temperature > 0).
    """

    # How `model=` of --model_args is opened: soft_jax.models.load (a preset, an HF dir, a GGUF file, a PEFT adapter
    # dir; local or gs://), layers stacked (each program compiles one layer, not all of them). The soft-jax command
    # line replaces it with its --model loader, which opens a run's work dir (its best round) too.
    open_model: Callable = staticmethod(lambda name, dtype: models.load(name, dtype=dtype, progress=False,
                                                                        scan_layers=True))

    def __init__(self, model, tokenizer, mesh=None, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, seed: int = 0, progress: bool = False):
        super().__init__()
        if tokenizer is None:
            raise UserError("lm-eval: the model has no tokenizer; give an HF directory with tokenizer files")
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.batch_size, self.seed, self.progress = int(batch_size), int(seed), progress
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks, self.add_bos_token = int(max_gen_toks), add_bos_token
        self.scorer = Scorer(model, tokenizer, mesh, self.batch_size)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SoftJaxLM:
        """From lm-eval's --model_args "model=PATH_OR_NAME,dtype=float32,max_length=...,seed=..." and its
        --batch_size."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> SoftJaxLM:
        """From --model_args as a dict (lm-eval's command line) and lm-eval's batch_size (its device and
        max_batch_size are HFLM's: soft-jax places the model on its own devices)."""
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        name = args.pop("model", None) or args.pop("pretrained", None)
        if not name:
            raise UserError("lm-eval --model soft-jax: give --model_args model=PATH_OR_NAME (a preset, an HF dir, a "
                            "GGUF file, a PEFT adapter dir or a run's work dir)")
        batch = extra.get("batch_size", args.pop("batch_size", 16))
        if not str(batch).isdigit():
            raise UserError(f"lm-eval --batch_size {batch}: give a number of rows (soft-jax batches by its buckets; "
                            "'auto' is HFLM's)")
        known = {"dtype", "max_length", "max_gen_toks", "add_bos_token", "seed"}
        unknown = sorted(set(args) - known)
        if unknown:
            raise UserError(f"lm-eval --model_args {', '.join(unknown)}: not soft-jax's; it takes model, "
                            + ", ".join(sorted(known)))
        model, tokenizer = cls.open_model(str(name), str(args.pop("dtype", "float32")))
        return cls(model, tokenizer, batch_size=int(batch), **args)

    # -- what TemplateLM asks of a model --

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        contexts, continuations = [], []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise UserError(f"lm-eval: a continuation of {len(continuation)} tokens; each needs 1 to "
                                f"{self.max_length} (max_length)")
            row = (list(context) + list(continuation))[-(self.max_length + 1):]  # as HFLM cuts a long row
            contexts.append(row[:len(row) - len(continuation)])
            continuations.append(list(continuation))
        out = self.scorer.tokens(contexts, continuations, progress=self.progress and not disable_tqdm)
        answers = [(float(lp), bool(g)) for lp, g in zip(out.logprobs, out.greedy)]
        for (pair, *_), answer in zip(requests, answers):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, prediction in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, prediction))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}  # requests with the same generation settings sample together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), desc="lm-eval generate_until", disable=disable_tqdm or not self.progress)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise UserError(f"lm-eval: max_gen_toks {max_gen_toks} leaves no room for a context in max_length "
                                f"{self.max_length}")
            sample = kwargs.get("do_sample") and float(kwargs.get("temperature", 0.0)) > 0
            config = SamplingConfig(max_new_tokens=max_gen_toks, batch_size=self.batch_size, seed=self.seed,
                                    temperature=float(kwargs.get("temperature", 0.0)) if sample else 0.0,
                                    top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                                    top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                                    stop_strings=tuple(u for u in until if u))
            rows = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen_toks)
                    for i in members]
            result = Sampler(self.model, self.tokenizer, config, self.mesh)(rows)
            for i, tokens in zip(members, result.tokens):
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(members))
        bar.close()
        return out


@functools.cache
def task_manager(include: str = ""):
    """lm-eval's TaskManager, with the task YAMLs under `include` (a directory; lm-eval's --include_path) too; one
    per include path and process (it indexes every task YAML lm-eval ships)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR", include_path=include or None)


def check_tasks(names: list[str], include: str = "") -> tuple[list[str], dict[str, str]]:
    """(the tasks whose data can be had, {task: why not}) before any weights are read; an unknown task name is a
    UserError. Each task's dataset is loaded as lm-eval loads it (the Hub's datasets from the cache when
    HF_DATASETS_OFFLINE=1 or offline; local files where a task YAML names them)."""
    if "://" in include:  # lm-eval reads task YAMLs (and the files they name) from local paths only
        raise UserError(f"eval.lm_eval.include {include}: lm-eval reads its task YAMLs from a local directory; copy "
                        "them (and their data files) to one and give that")
    manager = task_manager(include)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"eval.lm_eval.tasks: unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks`, "
                        "or give the directory of your task YAMLs as eval.lm_eval.include (--lm-eval-include)")
    available, unavailable = [], {}
    for name in names:
        try:
            manager.load([name])
            available.append(name)
        except Exception as e:  # noqa: BLE001 - datasets raise many kinds (offline, missing, gated); each is said
            reason = str(e).splitlines()[0][:160] if str(e) else ""
            unavailable[name] = f"its data cannot be loaded ({type(e).__name__}: {reason})"
    return available, unavailable


def _key(name: str) -> str:
    metric, _, kind = name.partition(",")
    return metric if kind in ("", "none") else f"{metric}({kind})"


def run_tasks(model, tokenizer, tasks: list[str], *, include: str = "", num_fewshot: int = -1, limit: int = 0,
              batch_size: int = 16, seed: int = 0, mesh=None, progress: bool = False) -> tuple[dict, list[dict]]:
    """lm-eval's simple_evaluate of `tasks` on the model: ({task: {"metrics": {metric: value, metric_stderr:
    stderr}, "higher_is_better": {metric: bool}, "n": items}}, per-item rows). num_fewshot -1: each task's own;
    limit 0: every item. A row: task, doc_id, target, the filtered response and each metric's per-item value."""
    import lm_eval

    lm = SoftJaxLM(model, tokenizer, mesh=mesh, batch_size=batch_size, seed=seed, progress=progress)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(include),
                                  num_fewshot=None if num_fewshot < 0 else num_fewshot, limit=limit or None,
                                  log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, verbosity="ERROR")
    out = {}
    for task in tasks:
        values = {_key(k): float(v) for k, v in res["results"][task].items()
                  if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        out[task] = {"metrics": values, "higher_is_better": dict(res.get("higher_is_better", {}).get(task, {})),
                     "n": int(res.get("n-samples", {}).get(task, {}).get("effective", 0))}
    rows = []
    for task in tasks:
        metrics = [m for m in out[task]["higher_is_better"]]
        for s in res["samples"].get(task, []):
            rows.append(json.loads(json.dumps({"task": task, "doc_id": s["doc_id"], "target": s.get("target"),
                                               "response": s.get("filtered_resps"),
                                               **{m: s[m] for m in metrics if m in s}}, default=_plain)))
    return out, rows


def _plain(x):
    """JSON for numpy scalars and arrays in lm-eval's samples."""
    return x.tolist() if hasattr(x, "tolist") else str(x)

