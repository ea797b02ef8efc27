"""`soft-jax report WORKDIR`: PNG plots and a Markdown summary of a run, written to WORKDIR/report/.

Plots: validation and eval metrics per round, examples kept and dropped (per filter) per round,
difficulty distributions per round, training loss per step. The summary has the round table and a few
sample answers per round (the open-ended answers when the run wrote them, else kept training pairs).
"""

from __future__ import annotations

import json
import os

import numpy as np

from soft_jax import evaluation
from soft_jax.core import io_utils, storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import read_json
from soft_jax.data import filters
from soft_jax.evaluation import guard
from soft_jax.experiment.workdir import CONFIG, METRICS, OPEN_SIGNALS, STATE, WorkDir, round_values
from soft_jax.reports import plots

SAMPLES_PER_ROUND = 3
# curriculum.score -> the unit of the difficulty axis
DIFFICULTY_UNITS = {"response_ppl": "response perplexity", "prompt_ppl": "prompt perplexity",
                    "response_length": "response length (tokens)"}


def _rows(path: str) -> list[dict]:
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).split("\n") if line.strip()]


def _load(workdir: str):
    state = read_json(os.path.join(workdir, STATE))
    if state is None:
        raise UserError(f"{workdir}: not a soft-jax run work dir (no {STATE}); give the --workdir of a run")
    metrics = io_utils.read_appended(os.path.join(workdir, METRICS))
    rounds = sorted(int(d) for d in storage.listdir(os.path.join(workdir, "rounds")) if d.isdigit())
    return state, metrics, rounds


def _figures(workdir: str, state: dict, metrics: list[dict], rounds: list[int], config: dict) -> dict:
    """{png name: matplotlib figure}: eval metrics per round (with the guard's paired intervals), filter counts,
    difficulty, training loss. Rounds tick at whole numbers; legends sit outside the axes."""
    plt = plots.pyplot()
    figs = {}
    evals = {m["round"]: m for m in metrics if m["phase"] == "eval"}
    keys = sorted({k for m in evals.values() for k in m if k not in ("round", "phase", "seconds", "unavailable",
                                                                       "lm_eval_items") and not k.endswith("_stderr")})
    if evals:
        metric = config.get("validation", {}).get("metric")
        comparisons = {int(t): c for t, c in state.get("comparisons", {}).items()}
        first = [metric, *(["guard"] if comparisons else [])] if metric in keys else []
        panels = first + [k for k in keys if k != metric]  # the validation metric and its guard lead
        cols = min(4, len(panels))
        fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.2 * cols, 3.2 * -(-len(panels) // cols)),
                                 squeeze=False, layout="constrained")
        best = state.get("best_round")
        for ax, k in zip(axes.flat, panels):
            if k == "guard":
                _guard_panel(ax, metric, comparisons)
                continue
            xs = sorted(r for r in evals if k in evals[r])
            ax.plot(xs, [evals[r][k] for r in xs], marker="o", label="value after the round")
            if any(k + "_stderr" in evals[r] for r in xs):  # an lm-eval metric: its standard error
                ax.errorbar(xs, [evals[r][k] for r in xs], yerr=[evals[r].get(k + "_stderr", 0) for r in xs],
                            fmt="none", ecolor="tab:blue", capsize=3, label="lm-eval's stderr")
            if k == metric and comparisons:  # the guard's interval of each round, read against its reference
                ts = sorted(t for t in comparisons if t in evals and comparisons[t]["vs"] in evals)
                ref = [evals[comparisons[t]["vs"]][k] for t in ts]
                # drawn as the interval itself: a percentile interval need not contain the point estimate, and
                # at confidence 0 it is that point (an error bar's lengths could come out negative)
                lows = [r + comparisons[t]["low"] for t, r in zip(ts, ref)]
                highs = [r + comparisons[t]["high"] for t, r in zip(ts, ref)]
                ax.vlines(ts, lows, highs, color="black", label=f"paired {_confidence(comparisons)} CI vs best "
                          "earlier round")
                ax.plot(ts + ts, lows + highs, "_", color="black", markersize=10)  # caps
            if best is not None and k in evals.get(best, {}):  # a ring, not a line: it hides no error bar
                ax.plot([best], [evals[best][k]], "o", markersize=13, markerfacecolor="none", color="tab:red",
                        label="best round (collapse guard)")
            plots.round_axis(ax, xs)
            plots.value_axis(ax, k)
            ax.set(title=k, ylabel=plots.ylabel(k))
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        plots.figure_legend(fig, axes.flat)
        figs["eval_per_round.png"] = fig
    gens = {m["round"]: m for m in metrics if m["phase"] == "generate"}
    if gens:
        fig, ax = plt.subplots(figsize=(6.5, 3.5), layout="constrained")
        xs = sorted(gens)
        bottom = np.zeros(len(xs))
        for name in ("kept", *filters.REASONS):
            vals = np.asarray([gens[r].get(name, 0) for r in xs], float)
            if vals.any():
                ax.bar(xs, vals, bottom=bottom, label=name, width=0.6)
                bottom += vals
        plots.round_axis(ax, xs, "round")
        plots.count_axis(ax)
        ax.set(title="generations kept and dropped per filter", ylabel="generations (prompts)")
        plots.legend_outside(ax, "kept / dropped by")
        figs["filters_per_round.png"] = fig
    diffs = {t: [r["difficulty"] for r in _rows(WorkDir(workdir).round_file(t, "train.jsonl"))]
             for t in rounds}
    diffs = {t: d for t, d in diffs.items() if d}
    if diffs:
        fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
        ts = sorted(diffs)
        ax.boxplot([diffs[t] for t in ts], positions=ts, widths=0.5)
        plots.round_axis(ax, ts, "round")
        score = config.get("curriculum", {}).get("score", "")
        ax.set(title="difficulty of the kept pairs", yscale="log", ylabel=DIFFICULTY_UNITS.get(score, score))
        figs["difficulty_per_round.png"] = fig
    steps = [m for m in metrics if m["phase"] == "train"]
    if steps:
        fig, ax = plt.subplots(figsize=(6.5, 3.5), layout="constrained")
        for t in sorted({m["round"] for m in steps}):
            s = sorted((m["step"], m["loss"]) for m in steps if m["round"] == t)
            ax.plot([a for a, _ in s], [b for _, b in s], marker="." if len(s) < 30 else None, label=f"round {t}")
        plots.integer_axis(ax, "x")
        ax.set(title="training loss", xlabel="optimizer step within the round", ylabel="loss (nats / token)")
        plots.legend_outside(ax)
        figs["train_loss.png"] = fig
    return figs


def _confidence(comparisons: dict) -> str:
    return f"{next(iter(comparisons.values()))['confidence']:.0%}"


def _guard_panel(ax, metric: str, comparisons: dict[int, dict]) -> None:
    """The collapse guard's view: each round minus the best round before it, with its paired interval."""
    ts = sorted(comparisons)
    d = [comparisons[t]["diff"] for t in ts]
    ax.axhline(0.0, color="gray", linewidth=0.8)
    plots.intervals(ax, ts, d, [comparisons[t]["low"] for t in ts], [comparisons[t]["high"] for t in ts])
    for t, v in zip(ts, d):
        ax.annotate(comparisons[t]["verdict"] + f" vs r{comparisons[t]['vs']}", (t, v), textcoords="offset points",
                    xytext=(6, 0), fontsize=7, va="center")
    plots.round_axis(ax, [*ts, min(c["vs"] for c in comparisons.values())])
    plots.plain_values(ax)
    ax.set(title=f"{metric}: round - best earlier ({_confidence(comparisons)} CI)",
           ylabel=f"difference in {plots.ylabel(metric)}")


def _plots(out: str, workdir: str, state: dict, metrics: list[dict], rounds: list[int]) -> list[str]:
    config = read_json(os.path.join(workdir, CONFIG), {})
    return [plots.save(fig, out, name) for name, fig in _figures(workdir, state, metrics, rounds, config).items()]


def _summary(workdir: str, state: dict, metrics: list[dict], rounds: list[int], plots: list[str]) -> str:
    config = read_json(os.path.join(workdir, CONFIG), {})
    table = round_table(metrics, config.get("validation", {}).get("metric", "valid_nll"),
                                  config.get("eval", {}).get("tasks", ""), state.get("comparisons", {}),
                                  config.get("eval", {}).get("protocol", ""))
    lines = [f"# soft-jax run: {storage.abspath(workdir)}", "",
             f"Model {config.get('model', {}).get('path') or config.get('model', {}).get('name')}; "
             f"{config.get('rounds')} round(s) configured, finished {state['finished']}; best round "
             f"{state['best_round']}" + (f"; stopped early: {state['stopped']}" if state.get("stopped") else "") + ".",
             "", table, ""]
    lines += [f"![{p}]({p})" for p in plots] + [""]
    for t in rounds:
        rdir = WorkDir(workdir).round_dir(t)
        answers = _rows(os.path.join(rdir, "open_ended.jsonl"))
        pairs = answers or [{"prompt": r["prompt"], "answer": r["response"]}
                            for r in _rows(os.path.join(rdir, "train.jsonl"))]
        if not pairs:
            continue
        kind = "open-ended answers" if answers else "kept training pairs"
        lines += [f"## Round {t}: sample {kind}", ""]
        for p in pairs[:SAMPLES_PER_ROUND]:
            lines += [f"**Prompt:** {p['prompt']}", "", "> " + p["answer"].strip().replace("\n", "\n> "), ""]
    return "\n".join(lines) + "\n"


def round_table(metrics: list[dict], metric: str, tasks: str = "", comparisons: dict | None = None,
                protocol: str = "") -> str:
    """Markdown table, one line per round: prompts, kept/dropped, truncated generations, exemplars shown,
    difficulty, loss, validation with the guard's paired comparison, eval numbers, open-ended signals (the numbers
    of workdir.round_values, which W&B logs too)."""
    values = round_values(metrics, metric, tasks)
    names = evaluation.parse_tasks(tasks) if tasks else []
    opens = [(k, h) for k, h in zip(OPEN_SIGNALS, ("distinct-2", "repeated 4-grams", "truncated answers"))
             if any(k in v["eval"] for v in values.values())]
    shown = any("exemplars_shown" in v for v in values.values())
    lengths = any("answer_tokens_mean" in v for v in values.values())
    relevance = any("irrelevant" in v for v in values.values())
    # lm-eval's metrics (eval.lm_eval.tasks), each with its stderr, and one n/a column per task whose data could not
    # be had
    lm = sorted({k for v in values.values() for k in v["eval"] if k.startswith("lm_eval/") and not k.endswith(
        "_stderr")} | {f"lm_eval/{task}" for v in values.values() for task in v["unavailable"]
                       if task not in evaluation.TASKS})
    head = ["round", "prompts", "kept", "dropped", *(["of them irrelevant"] if relevance else []), "cut by length",
            *(["exemplars / principles shown"] if shown else []),
            *(["answer tokens mean / median", "kept by finish eos / stop / length"] if lengths else []),
            "difficulty", "train loss", metric, "vs best [interval]" if comparisons is not None else None,
            *(f"{k} ({protocol})" if protocol else k for k in names),
            *(" ".join(k.split("/")[1:]) for k in lm), *(h for _, h in opens)]
    head = [h for h in head if h is not None]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, v in values.items():
        num = lambda k: "n/a" if k in v["unavailable"] else f"{v['eval'][k]:.4f}" if k in v["eval"] else "-"
        cells = [str(t), *(str(v.get(k, "-")) for k in ("prompts", "kept", "dropped",
                                                         *(["irrelevant"] if relevance else []), "cut_by_length"))]
        if shown:
            cells.append(f"{v['exemplars_shown']} / {v['principles_shown']}" if "exemplars_shown" in v else "-")
        if lengths:
            cells.append(f"{v['answer_tokens_mean']:.1f} / {v['answer_tokens_median']:.0f}"
                         if "answer_tokens_mean" in v else "-")
            cells.append(" / ".join(str(v["kept_finish"][f]) for f in ("eos", "stop", "length"))
                         if "kept_finish" in v else "-")
        cells += [f"{v['difficulty']:.3g}" if "difficulty" in v else "-",
                  f"{v['train_loss']:.4f}" if "train_loss" in v else "-", num(metric)]
        if comparisons is not None:
            cells.append(guard.describe(comparisons.get(str(t))))
        cells += [num(k) for k in names]
        cells += ["n/a" if k.split("/")[1] in v["unavailable"] else
                  num(k) + (f" ± {v['eval'][k + '_stderr']:.4f}" if k + "_stderr" in v["eval"] else "") for k in lm]
        cells += [num(k) for k, _ in opens]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(workdir: str) -> str:
    """Writes WORKDIR/report/ (plots + summary.md) atomically; returns its path."""
    state, metrics, rounds = _load(workdir)
    out = os.path.join(workdir, "report")

    def fill(tmp: str) -> None:
        plots = _plots(tmp, workdir, state, metrics, rounds)
        with open(os.path.join(tmp, "summary.md"), "w", encoding="utf-8") as f:
            f.write(_summary(workdir, state, metrics, rounds, plots))

    io_utils.write_dir(out, fill)
    return out
