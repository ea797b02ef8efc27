"""The `soft-jax` command line: run | sweep | plan | report | compare | info | generate | train | eval | export | data.

Every user mistake ends with exit code 2 and one line on stderr (what is wrong, where, how to mend it).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys

from soft_jax.core import compile_cache, storage
from soft_jax.core.errors import UserError
from soft_jax.core.preemption import Preempted

EXIT_USER_ERROR = 2
EXIT_DISK_FULL = 1
EXIT_STORAGE = 1  # a bucket unreachable past retries (soft_jax.core.storage.StorageError)
EXIT_CONTAMINATED = 1  # `data check --strict` found shared n-grams


def _disk_full(e: BaseException) -> OSError | None:
    """The "no space left" OSError behind an exception (libraries such as Orbax wrap it), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_model(p):
    p.add_argument("--model", required=True,
                   help="HF checkpoint directory, .gguf file, 'smollm2-135m' (the embedded default), a run's work "
                        "dir (its best round), or an HF PEFT LoRA adapter directory (on the base it names)")
    p.add_argument("--dtype", default="float32", help="compute and parameter dtype: float32 | bfloat16 | float16")


def _is_workdir(path: str) -> bool:
    return storage.isfile(storage.join(storage.check(path, "--model"), "state.json"))


def _open_model(args, param_dtype=None, need_tokenizer=True, progress=True):
    """(build, config, tokenizer) for --model: checks config and tokenizer before `build()` reads weights.

    A run's work dir stands for its best round."""
    from soft_jax import models

    if _is_workdir(args.model):
        from soft_jax.rounds import loop

        model, tokenizer = loop.best_model(args.model, args.dtype)
        return (lambda: model), model.config, tokenizer
    from soft_jax.models import lora

    adapter = args.model if lora.is_peft_dir(args.model) else None  # an HF PEFT adapter on top of its base
    base = lora.peft_base(adapter) if adapter else args.model
    source, cfg, tokenizer = models.inspect(base, dtype=args.dtype, param_dtype=param_dtype)
    if tokenizer is None and need_tokenizer:
        raise UserError(f"{base}: the checkpoint has no tokenizer files; add them to the directory")
    if adapter:
        return (lambda: lora.load_peft(models.build(source, cfg, progress=progress), adapter)), cfg, tokenizer
    return (lambda: models.build(source, cfg, progress=progress)), cfg, tokenizer


def cmd_info(args) -> None:
    build, _, tokenizer = _open_model(args, need_tokenizer=False, progress=False)
    model = build()
    cfg = model.config
    from flax import nnx

    n_params = sum(v.size for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param))
    rope = cfg.rope_dict.get("rope_type", "default")
    lines = [
        f"model        {args.model}",
        f"architecture {cfg.model_type} ({'tied' if cfg.tie_word_embeddings else 'untied'} embeddings"
        f"{', q/k/v bias' if cfg.qkv_bias else ''}"
        f"{f', sliding window {cfg.sliding_window}' if cfg.sliding_window else ''})",
        f"sizes        {cfg.num_layers} layers, hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads x {cfg.head_dim}, vocab {cfg.vocab_size}, "
        f"context {cfg.max_position_embeddings}",
        f"rope         theta {cfg.rope_theta:g}, scaling {rope}",
        f"parameters   {n_params:,} ({n_params / 1e6:.1f}M), dtype {cfg.param_dtype}",
    ]
    if tokenizer is None:
        lines.append("tokenizer    none (the checkpoint ships no tokenizer files)")
    else:
        lines.append(f"tokenizer    {type(tokenizer).__name__}, {len(tokenizer)} tokens, bos {tokenizer.bos_token!r}, "
                     f"eos {tokenizer.eos_token!r}")
        template = tokenizer.chat_template
        lines.append("chat         " + (f"template present ({len(template)} chars)" if template else "no template"))
    print("\n".join(lines))


def cmd_generate(args) -> None:
    from soft_jax.core.io_utils import read_jsonl, write_jsonl
    from soft_jax.inference import engine, sampler

    if (args.prompt is None) == (args.prompts is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    if args.prompts:
        rows = read_jsonl(args.prompts, required=("prompt",))
    else:
        rows = [{"prompt": args.prompt}]
    config = sampler.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed, batch_size=args.batch_size,
                                    stop_strings=tuple(args.stop))
    build, cfg, tokenizer = _open_model(args)
    chat = bool(tokenizer.chat_template) if args.chat is None else args.chat
    if chat and not tokenizer.chat_template:
        raise UserError(f"{args.model}: --chat asked for, but the tokenizer has no chat template; use --no-chat")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                           add_generation_prompt=True) if chat else r["prompt"] for r in rows]
    engine.check_lengths([tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts],
                         config.max_new_tokens, cfg.max_position_embeddings)
    model = build()
    outputs = sampler.generate(model, tokenizer, texts, config, add_special_tokens=not chat)
    results = [{"id": r.get("id", i), "prompt": r["prompt"], "completion": o}
               for i, (r, o) in enumerate(zip(rows, outputs))]
    if args.out:
        write_jsonl(args.out, results)
        print(f"wrote {len(results)} completions to {args.out}")
    else:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))


def cmd_train(args) -> None:
    from soft_jax import models, training
    from soft_jax.core.io_utils import read_jsonl

    rows = read_jsonl(args.data, required=("prompt", "response"))
    config = training.TrainConfig(
        max_prompt_len=args.max_prompt_len, max_response_len=args.max_response_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, epochs=args.epochs, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        order=args.order, seed=args.seed, checkpoint_every=args.checkpoint_every, remat=args.remat,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets)
    if args.lora_dropout and not args.lora_rank:
        raise UserError(f"--lora-dropout {args.lora_dropout} drops the LoRA adapters' inputs: give --lora-rank R too, "
                        "or drop --lora-dropout")
    if args.adapter and not args.lora_rank:
        raise UserError("--adapter writes LoRA adapters: give --lora-rank R too (or drop --adapter for a full model)")
    if args.lora_rank:
        from soft_jax.models import lora

        lora.parse_targets(args.lora_targets)  # a bad name fails before weights load
    build, cfg, tokenizer = _open_model(args, args.param_dtype)
    pairs = [(r["prompt"], r["response"]) for r in rows]
    prepared = training.prepare(tokenizer, pairs, config)  # format, length and schedule problems
    training.make_schedule(config, training.total_steps(prepared[1], config))  # surface before weights load
    model = build()
    if args.checkpoint_dir:  # SIGTERM / Ctrl-C: save the finished step, then stop (resumable)
        from soft_jax.core import preemption

        preemption.install()
    trained, result = training.train(model, tokenizer, pairs, config, checkpoint_dir=args.checkpoint_dir,
                                     prepared=prepared)
    if args.adapter:
        from soft_jax.models import lora

        lora.export_peft(trained, args.out, base_model=args.model)
    else:
        models.export_hf(trained, tokenizer, args.out)  # adapters, when trained, merged into the kernels
    print(f"trained {result.steps} steps on {result.examples} examples ({result.tokens} tokens; truncated: "
          f"{result.truncated_prompts} prompts, {result.truncated_responses} responses); final loss "
          f"{result.losses[-1] if result.losses else float('nan'):.4f}; wrote {args.out}"
          + (" (a PEFT LoRA adapter: peft.PeftModel.from_pretrained(base, out))" if args.adapter else ""))


def cmd_export(args) -> None:
    from soft_jax import models

    build, _, tokenizer = _open_model(args, need_tokenizer=False)
    model = build()
    if args.adapter:
        from soft_jax.models import lora

        lora.export_peft(model, args.out, base_model=_base_of(args.model))
        print(f"exported the LoRA adapters of {args.model} to {storage.abspath(args.out)} "
              f"(peft: PeftModel.from_pretrained(base, {args.out!r}))")
        return
    models.export_hf(model, tokenizer, args.out)
    print(f"exported {args.model} to {storage.abspath(args.out)} (transformers: from_pretrained({args.out!r}))")


def _base_of(model_arg: str) -> str:
    """The base model path a PEFT adapter exported from --model should name: a work dir's model, else --model."""
    if _is_workdir(model_arg):
        m = json.loads(storage.read_text(storage.join(model_arg, "config.json")))["model"]
        return m.get("path") or m.get("name", "")
    return model_arg


def cmd_eval(args) -> None:
    from soft_jax import evaluation
    from soft_jax.core.io_utils import write_atomic

    tasks = evaluation.parse_tasks(args.tasks)
    if args.protocol not in evaluation.PROTOCOLS:
        raise UserError(f"unknown protocol {args.protocol!r}; choose from {', '.join(evaluation.PROTOCOLS)}")
    source, unavailable = evaluation.availability(tasks, args.protocol, args.truthfulqa_file)
    if unavailable:  # data problems (no network, bad files) surface before the model loads
        raise UserError(next(iter(unavailable.values())))
    if source is not None:
        print(source.describe())
    build, _, tokenizer = _open_model(args)
    model = build()
    results = evaluation.evaluate(model, tokenizer, tasks, args.protocol, args.limit, args.truthfulqa_file,
                                  batch_size=args.batch_size)
    summary = {t: {k: v for k, v in r.items() if k != "items"} for t, r in results.items() if t in tasks}
    write_atomic(args.out, json.dumps(results, indent=1) + "\n")
    print(f"protocol {args.protocol}: {results['protocol_description']}")
    for task, r in summary.items():
        subsets = ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in r.items() if isinstance(v, dict))
        print(f"{task:16s} {r['accuracy']:.4f} (n={r['n']}, {args.protocol})" + (f"; {subsets}" if subsets else "")
              + (" [soft-jax's own MC2 construction, not the published MC2]" if "construction" in r else ""))
    print(f"wrote {args.out}")


def _overrides(args, takes: str) -> list[str]:
    """The --config.key=value overrides left in args.overrides, as key=value."""
    overrides, rest = [], list(args.overrides)
    while rest:
        item = rest.pop(0)
        if not item.startswith("--config."):
            raise UserError(f"unrecognized argument {item!r}; `{args.command}` takes {takes} and "
                            "--config.key=value overrides")
        if "=" not in item and rest and not rest[0].startswith("--"):  # --config.key value
            item += "=" + rest.pop(0)
        overrides.append(item[len("--config."):])
    return overrides


def _load_config(args, takes: str):
    """The run config of --config with the --config.key=value overrides left in args.overrides."""
    from soft_jax.experiment import config as config_lib
    return config_lib.load(args.config, _overrides(args, takes))


def cmd_run(args) -> None:
    from soft_jax.core import preemption
    from soft_jax.parallel import distributed
    from soft_jax.rounds import loop

    config = _load_config(args, "--config FILE, --workdir DIR")
    distributed.initialize()
    preemption.install()
    loop.run(config, args.workdir)


def cmd_sweep(args) -> None:
    from soft_jax.core import preemption
    from soft_jax.parallel import distributed
    from soft_jax.rounds import sweep

    overrides = _overrides(args, "--config FILE, --workdir DIR, --only A,B")
    sweep.select(args.config, args.only)  # a config without variants or an unknown --only: before anything starts
    distributed.initialize()
    preemption.install()
    sweep.sweep(args.config, args.workdir, overrides, args.only,
                log=print if distributed.is_writer() else (lambda _: None))


def cmd_plan(args) -> None:
    from soft_jax.experiment import preflight
    from soft_jax.scale import plan

    if args.mesh_generate:
        sizes = args.mesh_generate.split(",")
        if len(sizes) != 3 or not all(x.strip().lstrip("-").isdigit() for x in sizes):
            raise UserError(f"--mesh-generate {args.mesh_generate}: give DATA,FSDP,TENSOR sizes, e.g. 8,1,8 (one -1)")
        args.overrides = list(args.overrides) + [f"--config.mesh_generate.{axis}={int(n)}"
                                                 for axis, n in zip(("data", "fsdp", "tensor"), sizes)]
    config = _load_config(args, "--config FILE, --topology SLICE or --gpu-target FILE")
    where = plan.target(args.topology, args.gpu_target, args.gpus, args.gpu_memory)
    if args.memory_limit is not None:
        if args.memory_limit <= 0:
            raise UserError(f"--memory-limit {args.memory_limit}: give the GiB per device to plan for (> 0)")
        where.device_bytes = int(args.memory_limit * plan.GiB)
    preflight.plan_run(config, where)
    print("[plan] every program fits" if where.device_bytes else
          "[plan] every program compiled; this device's memory is unknown (CPU), so nothing was compared")


def cmd_report(args) -> None:
    from soft_jax.reports import report

    print(f"wrote {report.write(args.workdir)}")


def cmd_compare(args) -> None:
    from soft_jax.reports import compare

    if not 0 <= args.confidence < 1:
        raise UserError(f"--confidence {args.confidence}: give a level in [0, 1), e.g. 0.95")
    if args.resamples < 100:
        raise UserError(f"--resamples {args.resamples}: give at least 100")
    out = compare.write(args.workdirs, args.out, args.baseline, args.confidence, args.resamples)
    print(f"wrote {os.path.join(out, compare.OUTPUT)}")


def cmd_data_import(args) -> None:
    from soft_jax.data import pool

    if not args.tfds_name and not args.out.endswith(".jsonl"):  # before reading: a typo costs no parse
        raise UserError(f"--out {args.out}: give a .jsonl file, or --tfds-name NAME to write a TFDS dataset "
                        "under the directory OUT")
    rows, counts = pool.import_pool(args.inputs, args.format, field=args.field, category_field=args.category_field,
                                    category=args.category, max_chars=args.max_chars)
    print("\n".join(pool.describe(counts, args.max_chars, args.format)))
    print(f"wrote {pool.write_pool(rows, args.out, args.tfds_name)}")


def cmd_data_tasks(args) -> None:
    from soft_jax.data import sources

    print("\n".join(sources.report_lines()))


def cmd_data_check(args) -> None:
    """Exit 0 when clean. Overlaps print a warning and exit 0 (a shared stock phrase can be harmless; the
    listing says which items to read), or exit 1 with --strict, for scripts that gate a run on it."""
    from soft_jax.core.io_utils import write_atomic
    from soft_jax.experiment import contamination

    report = contamination.find_overlaps(args.pool, args.exemplars, args.validation,
                                         truthfulqa_file=args.truthfulqa_file)
    print("\n".join(contamination.describe(report)))
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")
    if report["clean"]:
        sizes = " or ".join(f"{n}-gram" for n in report["ngram_sizes"])
        print(f"clean: no word {sizes} shared with the evaluation sets")
        return
    pairs = {(o["train"], o["train_id"]) for o in report["overlaps"]}
    print(f"soft-jax: warning: {len(pairs)} training-side items share word n-grams with the evaluation sets "
          "(listed above); reword or drop them", file=sys.stderr)
    if args.strict:
        sys.exit(EXIT_CONTAMINATED)


def _add_info(sub) -> None:
    """`soft-jax info`."""

    p = sub.add_parser("info", help="architecture, sizes, parameters, tokenizer of a model")
    _add_model(p)
    p.set_defaults(fn=cmd_info)


def _add_generate(sub) -> None:
    """`soft-jax generate`: sampling flags default to SamplingConfig's."""
    p = sub.add_parser("generate", help="sample completions for prompts")
    _add_model(p)
    p.add_argument("--prompt", help="one prompt")
    p.add_argument("--prompts", help="JSONL file, one {\"prompt\": ..., \"id\": ...} per line")
    p.add_argument("--out", help="output JSONL (default: print to stdout)")
    from soft_jax.inference.sampler import SamplingConfig
    s = SamplingConfig()  # the flags' defaults are the API's
    p.add_argument("--max-new-tokens", type=int, default=s.max_new_tokens)
    p.add_argument("--temperature", type=float, default=s.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=s.top_p)
    p.add_argument("--top-k", type=int, default=s.top_k)
    p.add_argument("--seed", type=int, default=s.seed)
    p.add_argument("--batch-size", type=int, default=s.batch_size)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut before it")
    p.add_argument("--chat", dest="chat", action="store_true", default=None,
                   help="wrap prompts in the model's chat template (default when it has one)")
    p.add_argument("--no-chat", dest="chat", action="store_false")
    p.set_defaults(fn=cmd_generate)


def _add_eval(sub) -> None:
    """`soft-jax eval`."""
    p = sub.add_parser("eval", help="HHH Eval and TruthfulQA MC1/MC2 accuracies")
    _add_model(p)
    p.add_argument("--tasks", default="hhh,truthfulqa_mc1,truthfulqa_mc2")
    p.add_argument("--protocol", default="dromedary", help="dromedary | loglik")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (HHH: ceil(N/4) per subset)")
    p.add_argument("--truthfulqa-file", help="the full 817-question multiple_choice set (JSON, JSONL or parquet)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output JSON: {task: {accuracy, n, ...}}")
    p.set_defaults(fn=cmd_eval)


def _add_train(sub) -> None:
    """`soft-jax train`: SFT flags default to TrainConfig's."""
    p = sub.add_parser("train", help="SFT on a JSONL of {prompt, response} rows; writes an HF directory")
    _add_model(p)
    p.add_argument("--data", required=True, help="JSONL, one {\"prompt\": ..., \"response\": ...} per line")
    p.add_argument("--out", required=True, help="output HF checkpoint directory")
    p.add_argument("--param-dtype", default=None, help="parameter dtype (default: --dtype); float32 for bf16 compute")
    from soft_jax.training.settings import TRAIN_ORDERS, TrainConfig
    t = TrainConfig()
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--lr", type=float, default=t.learning_rate)
    p.add_argument("--warmup-steps", type=int, default=t.warmup_steps, help=f"default: {t.warmup_ratio} of the steps")
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--grad-accum", type=int, default=t.grad_accum)
    p.add_argument("--max-prompt-len", type=int, default=t.max_prompt_len)
    p.add_argument("--max-response-len", type=int, default=t.max_response_len)
    p.add_argument("--order", default=t.order, help=" | ".join(TRAIN_ORDERS) + " (shuffle: rows packed best "
                   "fit decreasing, in a shuffled order; given: the file's order, row after row)")
    p.add_argument("--seed", type=int, default=t.seed)
    p.add_argument("--remat", action="store_true")
    p.add_argument("--checkpoint-dir", help="Orbax step checkpoints; a rerun resumes from the latest")
    p.add_argument("--checkpoint-every", type=int, default=t.checkpoint_every)
    p.add_argument("--lora-rank", type=int, default=t.lora_rank, help="LoRA adapters of this rank; only they "
                   "train (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=t.lora_alpha, help="adapter scale alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=t.lora_dropout,
                   help="the probability each adapter input entry is dropped in training (as PEFT's lora_dropout)")
    p.add_argument("--lora-targets", default=t.lora_targets, help="comma-separated projections that get adapters")
    p.add_argument("--adapter", action="store_true", help="write the HF PEFT adapter (adapter_config.json + "
                   "adapter_model.safetensors) instead of the merged model")
    p.set_defaults(fn=cmd_train)


def _add_run(sub) -> None:
    """`soft-jax run`."""
    p = sub.add_parser("run", help="run or resume SOFT / SOFT+ rounds from a config (see configs/)")
    p.add_argument("--config", required=True, help="config file, optionally with an argument: configs/soft.py[:ARG]")
    p.add_argument("--workdir", required=True, help="work dir; rerunning the same command resumes the run")
    p.set_defaults(fn=cmd_run, overrides=[])


def _add_sweep(sub) -> None:
    """`soft-jax sweep`."""
    p = sub.add_parser("sweep", help="run or resume every variant of an ablation config, each into DIR/<variant>/ "
                                     "(the base model's round 0 is evaluated once)")
    p.add_argument("--config", required=True, help="an ablation config file that declares VARIANTS, e.g. "
                                                   "configs/ablation_order.py")
    p.add_argument("--workdir", required=True, help="sweep dir; rerunning the same command resumes the sweep")
    p.add_argument("--only", help="comma-separated variants to run (default: all the file declares)")
    p.set_defaults(fn=cmd_sweep, overrides=[])


def _add_plan(sub) -> None:
    """`soft-jax plan`."""
    p = sub.add_parser("plan", help="compile a run's programs for a TPU slice or GPUs from this machine; "
                       "memory per device against the device's, without reading weights")
    p.add_argument("--config", required=True, help="config file, optionally with an argument: configs/soft.py[:ARG]")
    p.add_argument("--mesh-generate", metavar="D,F,T", help="the generation mesh (data,fsdp,tensor) to compile "
                   "generation and scoring for, as the config's mesh_generate (default: the config's)")
    p.add_argument("--topology", help="a TPU slice: v4-32, v5e-64, v5p-8, v6e-16, ... (needs libtpu: "
                                      "pip install \"soft-jax[plan-tpu]\")")
    p.add_argument("--gpu-target", help="h100 (H100 SXM 80GB), a100 (A100 SXM 80GB), l4 (L4 24GB) or a "
                                        "GpuTargetConfigProto text file; a process gets "
                                        "$XLA_PYTHON_CLIENT_MEM_FRACTION of the memory, 0.75 when unset "
                                        "(needs jax's CUDA plugin: pip install \"soft-jax[plan-gpu]\")")
    p.add_argument("--gpus", type=int, default=1, help="number of GPUs (with --gpu-target)")
    p.add_argument("--gpu-memory", type=float, help="GiB a process gets of one GPU (needed with a --gpu-target file)")
    p.add_argument("--memory-limit", type=float, help="GiB per device to plan for instead of the device's memory "
                                                      "(headroom)")
    p.set_defaults(fn=cmd_plan, overrides=[])


def _add_report(sub) -> None:
    """`soft-jax report`."""
    p = sub.add_parser("report", help="plots and a Markdown summary of a run in WORKDIR/report/")
    p.add_argument("workdir", help="a run's work dir")
    p.set_defaults(fn=cmd_report)


def _add_compare(sub) -> None:
    """`soft-jax compare`."""
    p = sub.add_parser("compare", help="runs side by side (ablations): a table and plots per metric over rounds, "
                                       "differences to a baseline run with paired bootstrap intervals")
    p.add_argument("workdirs", nargs="+", metavar="DIR", help="two or more runs' work dirs; each is named by its "
                                                              "basename")
    p.add_argument("--baseline", help="the variant the others are compared with (default: the first DIR)")
    p.add_argument("--out", help="output directory (default: `compare` next to the first DIR)")
    p.add_argument("--confidence", type=float, default=0.95, help="paired bootstrap interval level (default 0.95)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.set_defaults(fn=cmd_compare)


def _add_export(sub) -> None:
    """`soft-jax export`."""
    p = sub.add_parser("export", help="write an HF checkpoint directory that transformers loads")
    _add_model(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--adapter", action="store_true", help="write only the LoRA adapters, in the HF PEFT format")
    p.set_defaults(fn=cmd_export)


def _add_data(sub) -> None:
    """`soft-jax data import | check | tasks`."""
    p = sub.add_parser("data", help="bring your own prompts: import a dataset as a prompt pool; check for "
                                    "benchmark contamination")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{import,check,tasks}",
                                parser_class=_Parser)
    p = data_sub.add_parser("import", help="the first user turn of each conversation -> a JSONL prompt pool "
                                           "(deduplicated, counted)")
    p.add_argument("--format", required=True, choices=["sharegpt", "dolly", "oasst", "alpaca", "jsonl"])
    p.add_argument("inputs", nargs="+", metavar="IN", help="input files (JSON list or JSONL)")
    p.add_argument("--out", required=True, metavar="POOL",
                   help="output pool (.jsonl), or with --tfds-name a TFDS data directory")
    p.add_argument("--tfds-name", default="", metavar="NAME", help="also write an array_record TFDS dataset NAME "
                   "under --out (prompts.tfds; it keeps ids, prompts and inputs)")
    p.add_argument("--field", default="prompt", help="the prompt key of --format jsonl rows (default: prompt)")
    p.add_argument("--category-field", metavar="FIELD", help="the record key holding each prompt's category "
                   "(default: `category` for dolly and jsonl, none otherwise; oasst: e.g. lang)")
    p.add_argument("--category", default="", metavar="NAME", help="the category of prompts without one (default: none)")
    p.add_argument("--max-chars", type=int, default=2000, metavar="N",
                   help="drop prompts whose prompt + input is longer (default: 2000 characters)")
    p.set_defaults(fn=cmd_data_import)
    p = data_sub.add_parser("check", help="word 13- and 8-grams that the pool, exemplars and validation set share "
                                          "with HHH, TruthfulQA and the open-ended questions")
    p.add_argument("pool", nargs="?", default="", help="a JSONL prompt pool (default: the built-in one)")
    p.add_argument("--exemplars", default="", metavar="FILE", help="exemplar JSONL (default: the built-in pool)")
    p.add_argument("--validation", default="", metavar="FILE",
                   help="validation pairs JSONL (default: the built-in set)")
    p.add_argument("--truthfulqa-file", metavar="FILE",
                   help="the full 817-question multiple_choice set instead of BIG-bench's 299")
    p.add_argument("--out", metavar="FILE", help="write the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit 1 when anything is shared (default: warn, exit 0)")
    p.set_defaults(fn=cmd_data_check)
    p = data_sub.add_parser("tasks", help="where the BIG-bench task files (HHH, TruthfulQA) are found, in the order "
                                          "they are looked for, and which tasks are available")
    p.set_defaults(fn=cmd_data_tasks)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="soft-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_info, _add_generate, _add_eval, _add_train, _add_run, _add_sweep, _add_plan, _add_report,
                _add_compare, _add_export, _add_data):
        add(sub)
    return parser


def _again(argv) -> str:
    """The command line that resumes this run."""
    return "soft-jax " + shlex.join(sys.argv[1:] if argv is None else argv)


# arguments that name files or folders: a URL among them is checked before any work (an output's bucket too)
INPUTS = ("model", "data", "inputs", "workdirs", "truthfulqa_file", "pool")
OUTPUTS = ("out", "workdir", "checkpoint_dir")


def _check_urls(args) -> None:
    for name in INPUTS + OUTPUTS:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and "://" in value:
                (storage.check_bucket if name in OUTPUTS else storage.check)(value, f"--{name.replace('_', '-')}")


def main(argv=None) -> int:
    storage.configure()  # before anything reaches Cloud Storage: STORAGE_EMULATOR_HOST covers TensorStore too
    try:
        args, rest = build_parser().parse_known_args(argv)
        if rest and args.command not in ("run", "sweep", "plan"):
            raise UserError(f"unrecognized arguments: {' '.join(rest)} (see `soft-jax {args.command} --help`)")
        args.overrides = rest
        _check_urls(args)
        if args.command in ("run", "sweep", "eval", "generate", "train"):
            compile_cache.enable()
        args.fn(args)
    except UserError as e:
        print(f"soft-jax: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except storage.StorageError as e:  # the bucket failed past the client's retries: nothing is half-written
        print(f"soft-jax: error: {e}; finished work is saved: rerun the same command once the bucket is reachable",
              file=sys.stderr)
        return EXIT_STORAGE
    except Preempted as e:  # a signal asked `run` to stop; it stopped at a safe point
        print(f"soft-jax: {e}; progress is saved. resume with: {_again(argv)}", file=sys.stderr)
        return 130 if e.signame == "SIGINT" else 143
    except KeyboardInterrupt:  # a second Ctrl-C during `run` (the first anywhere else): stopped where it was
        words = sys.argv[1:] if argv is None else argv
        hint = (f"; the step or batch in progress is lost, what was saved before it is kept. resume with: "
                f"{_again(argv)}") if words[:1] in (["run"], ["sweep"]) else ""
        print(f"soft-jax: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk is the user's to fix; anything else is a bug
        full = _disk_full(e)
        if full is None:
            raise
        where = f" while writing {full.filename}" if full.filename else ""
        print(f"soft-jax: error: no space left on device{where}; free some space and rerun the same command: "
              "finished rounds and saved progress are intact", file=sys.stderr)
        return EXIT_DISK_FULL
    return 0


if __name__ == "__main__":
    sys.exit(main())
