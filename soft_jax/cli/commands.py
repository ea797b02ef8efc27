"""What each `soft-jax` command does (soft_jax.cli.parser maps the command line onto these functions)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from soft_jax.core import storage
from soft_jax.core.errors import UserError

EXIT_CONTAMINATED = 1  # `data check --strict` found shared n-grams


def _is_workdir(path: str) -> bool:
    return storage.isfile(storage.join(storage.check(path, "--model"), "state.json"))


def _open_model(args, param_dtype=None, need_tokenizer=True, progress=True, scan_layers=False):
    """(build, config, tokenizer) for --model: checks config and tokenizer before `build()` reads weights.

    A run's work dir stands for its best round (stored as its run stored it). scan_layers: store the layers
    stacked, so that every program compiles one layer instead of all of them; the inference commands (generate,
    eval, lm-eval) ask for it, since they compile several shapes and their outputs equal the loop's."""
    from soft_jax import models

    if _is_workdir(args.model):
        from soft_jax.rounds import loop

        model, tokenizer = loop.best_model(args.model, args.dtype)
        return (lambda: model), model.config, tokenizer
    from soft_jax.models import lora

    adapter = args.model if lora.is_peft_dir(args.model) else None  # an HF PEFT adapter on top of its base
    base = lora.peft_base(adapter) if adapter else args.model
    source, cfg, tokenizer = models.inspect(base, dtype=args.dtype, param_dtype=param_dtype, scan_layers=scan_layers)
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
    build, cfg, tokenizer = _open_model(args, scan_layers=True)
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


def _harness():
    """soft_jax.evaluation.harness with this command line's --model loader (a run's work dir too); a missing
    lm-eval is one line with the install command."""
    try:
        from soft_jax.evaluation import harness
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e}); pip install 'soft-jax[lm-eval]'") from None

    def open_model(name: str, dtype: str):
        build, _, tokenizer = _open_model(argparse.Namespace(model=name, dtype=dtype), progress=False,
                                          scan_layers=True)
        return build(), tokenizer

    harness.SoftJaxLM.open_model = staticmethod(open_model)
    return harness


def cmd_lm_eval(args) -> None:
    """`soft-jax lm-eval ARGS`: lm-eval's own command line, with `--model soft-jax` registered."""
    _harness()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args.overrides]
    cli_evaluate()


def cmd_eval(args) -> None:
    from soft_jax import evaluation
    from soft_jax.core.io_utils import write_atomic

    lm_tasks = [t.strip() for t in (args.lm_eval or "").split(",") if t.strip()]
    names = args.tasks if args.tasks is not None else ("" if lm_tasks else "hhh,truthfulqa_mc1,truthfulqa_mc2")
    tasks = evaluation.parse_tasks(names) if names else []
    if args.protocol not in evaluation.PROTOCOLS:
        raise UserError(f"unknown protocol {args.protocol!r}; choose from {', '.join(evaluation.PROTOCOLS)}")
    source, unavailable = evaluation.availability(tasks, args.protocol, args.truthfulqa_file) if tasks else (None, {})
    if lm_tasks:  # lm-eval's data too: missing data surfaces before the model loads
        harness = _harness()
        unavailable.update(harness.check_tasks(lm_tasks, args.lm_eval_include or "")[1])
    if unavailable:  # data problems (no network, bad files) surface before the model loads
        task, why = next(iter(unavailable.items()))
        raise UserError(why if task in evaluation.TASKS else f"lm-eval task {task}: {why}")
    if source is not None:
        print(source.describe())
    build, _, tokenizer = _open_model(args, scan_layers=True)
    model = build()
    results = evaluation.evaluate(model, tokenizer, tasks, args.protocol, args.limit, args.truthfulqa_file,
                                  batch_size=args.batch_size) if tasks else {}
    summary = {t: {k: v for k, v in r.items() if k != "items"} for t, r in results.items() if t in tasks}
    if lm_tasks:
        results["lm_eval"], results["lm_eval_items"] = harness.run_tasks(
            model, tokenizer, lm_tasks, include=args.lm_eval_include or "", num_fewshot=args.num_fewshot,
            limit=args.limit or 0, batch_size=args.batch_size, progress=True)
    write_atomic(args.out, json.dumps(results, indent=1) + "\n")
    if tasks:
        print(f"protocol {args.protocol}: {results['protocol_description']}")
    for task, r in summary.items():
        subsets = ", ".join(f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in r.items() if isinstance(v, dict))
        print(f"{task:16s} {r['accuracy']:.4f} (n={r['n']}, {args.protocol})" + (f"; {subsets}" if subsets else "")
              + (" [soft-jax's own MC2 construction, not the published MC2]" if "construction" in r else ""))
    for task, r in results.get("lm_eval", {}).items():
        m = r["metrics"]
        shown = [f"{k} {v:.4f}" + (f" ± {m[k + '_stderr']:.4f}" if k + "_stderr" in m else "")
                 for k, v in m.items() if not k.endswith("_stderr")]
        print(f"{task:16s} {', '.join(shown)} (n={r['n']}, lm-eval)")
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


def cmd_data_filter(args) -> None:
    """Checks everything (config, pairs file) before any weights are read; writes --output (and --dropped) whole or
    not at all."""
    from soft_jax import data
    from soft_jax.core.io_utils import read_jsonl, write_atomic
    from soft_jax.data import filters
    from soft_jax.rounds import relevance

    config = _load_config(args, "--input, --output, --dropped, --config, --model, --batch-size")
    rows = read_jsonl(args.input, required=("prompt", "response"))
    for n, r in enumerate(rows, 1):
        if not isinstance(r["prompt"], str) or not isinstance(r["response"], str):
            raise UserError(f"{args.input}: row {n}: prompt and response must be strings")
        if r.get("finish", "eos") not in filters.FINISHES or not isinstance(r.get("thoughts", ""), str):
            raise UserError(f"{args.input}: row {n}: finish must be one of {', '.join(filters.FINISHES)} and "
                            "thoughts a string, where given")
    exemplars, principles = data.load_exemplars(config.exemplars.path), data.load_principles(config.principles)

    def open_model():
        name = args.model or config.model.path or config.model.name
        build, _, tokenizer = _open_model(argparse.Namespace(model=name, dtype=config.model.dtype), scan_layers=True)
        return build(), tokenizer

    tr = config.train
    out = relevance.filter_pairs(rows, config.filters, exemplars, principles, open_model, args.batch_size,
                                 (tr.max_prompt_len, tr.max_response_len))
    counts = filters.counts([r["dropped_by"] for r in out])
    print(f"{len(out)} pairs: {counts['kept']} kept, {len(out) - counts['kept']} dropped")
    for name in filters.REASONS:
        if counts[name]:
            print(f"  {name}: {counts[name]}")
    write_atomic(args.output, "".join(json.dumps({k: v for k, v in r.items() if k not in ("kept", "dropped_by")},
                                                 ensure_ascii=False) + "\n" for r in out if r["kept"]))
    print(f"wrote {args.output}")
    if args.dropped:
        write_atomic(args.dropped, "".join(json.dumps({k: v for k, v in r.items() if k != "kept"},
                                                      ensure_ascii=False) + "\n" for r in out if not r["kept"]))
        print(f"wrote {args.dropped}")


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
