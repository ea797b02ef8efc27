"""The `soft-jax` command line's parser: one function per command adds its subcommand and flags."""

from __future__ import annotations

import argparse

from soft_jax.cli.commands import (
    cmd_compare,
    cmd_data_check,
    cmd_data_filter,
    cmd_data_import,
    cmd_data_tasks,
    cmd_eval,
    cmd_export,
    cmd_generate,
    cmd_info,
    cmd_lm_eval,
    cmd_plan,
    cmd_report,
    cmd_run,
    cmd_sweep,
    cmd_train,
)
from soft_jax.core.errors import UserError

DESCRIPTION = ("The `soft-jax` command line: run | sweep | plan | report | compare | info | generate | train | eval | "
               "export | data | lm-eval.")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_model(p):
    p.add_argument("--model", required=True,
                   help="HF checkpoint directory, .gguf file, 'smollm2-135m' (the embedded default), a run's work "
                        "dir (its best round), or an HF PEFT LoRA adapter directory (on the base it names)")
    p.add_argument("--dtype", default="float32", help="compute and parameter dtype: float32 | bfloat16 | float16")


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
    p = sub.add_parser("eval", help="HHH Eval and TruthfulQA MC1/MC2 accuracies, and any lm-evaluation-harness task")
    _add_model(p)
    p.add_argument("--tasks", default=None, help="hhh,truthfulqa_mc1,truthfulqa_mc2 (the default without --lm-eval)")
    p.add_argument("--lm-eval", help="lm-evaluation-harness tasks, comma-separated (pip install 'soft-jax[lm-eval]')")
    p.add_argument("--lm-eval-include", help="a directory of your own lm-eval task YAMLs (lm-eval's include path)")
    p.add_argument("--num-fewshot", type=int, default=-1, help="lm-eval's few-shot examples (-1: each task's own)")
    p.add_argument("--protocol", default="dromedary", help="dromedary | loglik")
    p.add_argument("--limit", type=int, default=None, help="first N items per task (HHH: ceil(N/4) per subset)")
    p.add_argument("--truthfulqa-file", help="the full 817-question multiple_choice set (JSON, JSONL or parquet)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output JSON: {task: {accuracy, n, ...}, lm_eval: ..., lm_eval_items}")
    p.set_defaults(fn=cmd_eval)


def _add_lm_eval(sub) -> None:
    """`soft-jax lm-eval`: lm-eval's command line with the soft-jax model registered."""
    p = sub.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's own command line, with --model "
                       "soft-jax --model_args model=PATH_OR_NAME (a preset, HF dir, GGUF, PEFT adapter or work dir)")
    p.set_defaults(fn=cmd_lm_eval)


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
    """`soft-jax data import | check | filter | tasks`."""
    p = sub.add_parser("data", help="bring your own prompts: import a dataset as a prompt pool; check for "
                                    "benchmark contamination")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{import,check,filter,tasks}",
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
    p = data_sub.add_parser("filter", help="a run config's filters (the relevance filter included) over any JSONL of "
                                           "{prompt, response} pairs: the kept pairs, the count per filter")
    p.add_argument("--input", required=True, metavar="PAIRS", help="JSONL of {prompt, response} rows (other keys are "
                   "kept; `thoughts` and `finish` are read where present)")
    p.add_argument("--output", required=True, metavar="FILE", help="the kept rows, responses cut as the config says")
    p.add_argument("--dropped", metavar="FILE", help="also write the dropped rows, each with its `dropped_by` reason")
    p.add_argument("--config", default="", help="the run config whose filters apply, optionally FILE:ARG (default: "
                   "soft-jax's defaults), with --config.key=value overrides, e.g. "
                   "--config.filters.max_relevance_ratio=1")
    p.add_argument("--model", help="the model the relevance filter scores with (default: the config's model)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per scoring pass (default: 8)")
    p.set_defaults(fn=cmd_data_filter, overrides=[])
    p = data_sub.add_parser("tasks", help="where the BIG-bench task files (HHH, TruthfulQA) are found, in the order "
                                          "they are looked for, and which tasks are available")
    p.set_defaults(fn=cmd_data_tasks)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="soft-jax", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_info, _add_generate, _add_eval, _add_lm_eval, _add_train, _add_run, _add_sweep, _add_plan,
                _add_report, _add_compare, _add_export, _add_data):
        add(sub)
    return parser
