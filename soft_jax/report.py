"""`soft-jax report WORKDIR`: PNG plots and a Markdown summary of a run, written to WORKDIR/report/.

Plots: validation and eval metrics per round, examples kept and dropped (per filter) per round,
difficulty distributions per round, training loss per step. The summary has the round table and a few
sample answers per round (the open-ended answers when the run wrote them, else kept training pairs).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from soft_jax import evaluation, guard, io_utils
from soft_jax.data import filters
from soft_jax.errors import UserError
from soft_jax.workdir import CONFIG, METRICS, STATE, WorkDir, read_json

SAMPLES_PER_ROUND = 3


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")] if os.path.exists(path) else []


def _load(workdir: str):
    state = read_json(os.path.join(workdir, STATE))
    if state is None:
        raise UserError(f"{workdir}: not a soft-jax run work dir (no {STATE}); give the --workdir of a run")
    metrics = io_utils.read_appended(os.path.join(workdir, METRICS))
    rounds = sorted(int(d) for d in os.listdir(os.path.join(workdir, "rounds")) if d.isdigit())
    return state, metrics, rounds


def _plots(out: str, workdir: str, state: dict, metrics: list[dict], rounds: list[int]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=100)
        plt.close(fig)
        made.append(name)

    evals = {m["round"]: m for m in metrics if m["phase"] == "eval"}
    keys = sorted({k for m in evals.values() for k in m if k not in ("round", "phase", "seconds")})
    if evals:
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            xs = sorted(r for r in evals if k in evals[r])
            ax.plot(xs, [evals[r][k] for r in xs], marker="o")
            if state.get("best_round") is not None and k in evals.get(state["best_round"], {}):
                ax.axvline(state["best_round"], color="gray", linestyle="--", label="best round")
                ax.legend()
            ax.set(title=k, xlabel="round (0 = base)")
        save(fig, "eval_per_round.png")
    gens = {m["round"]: m for m in metrics if m["phase"] == "generate"}
    if gens:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = sorted(gens)
        bottom = np.zeros(len(xs))
        for name in ("kept", *filters.REASONS):
            vals = np.asarray([gens[r].get(name, 0) for r in xs], float)
            if vals.any():
                ax.bar(xs, vals, bottom=bottom, label=name)
                bottom += vals
        ax.set(title="generations kept and dropped per filter", xlabel="round", ylabel="prompts")
        ax.legend(fontsize=7)
        save(fig, "filters_per_round.png")
    diffs = {t: [r["difficulty"] for r in _rows(WorkDir(workdir).round_file(t, "train.jsonl"))]
             for t in rounds}
    diffs = {t: d for t, d in diffs.items() if d}
    if diffs:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.boxplot([diffs[t] for t in sorted(diffs)], tick_labels=[str(t) for t in sorted(diffs)])
        ax.set(title="difficulty of the kept pairs", xlabel="round", yscale="log")
        save(fig, "difficulty_per_round.png")
    steps = [m for m in metrics if m["phase"] == "train"]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for t in sorted({m["round"] for m in steps}):
            s = sorted((m["step"], m["loss"]) for m in steps if m["round"] == t)
            ax.plot([a for a, _ in s], [b for _, b in s], label=f"round {t}")
        ax.set(title="training loss", xlabel="step", ylabel="loss")
        ax.legend()
        save(fig, "train_loss.png")
    return made


def _summary(workdir: str, state: dict, metrics: list[dict], rounds: list[int], plots: list[str]) -> str:
    config = read_json(os.path.join(workdir, CONFIG), {})
    table = round_table(metrics, config.get("validation", {}).get("metric", "valid_nll"),
                                  config.get("eval", {}).get("tasks", ""), state.get("comparisons", {}),
                                  config.get("eval", {}).get("protocol", ""))
    lines = [f"# soft-jax run: {os.path.abspath(workdir)}", "",
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


def write(workdir: str) -> str:
    """Writes WORKDIR/report/ (plots + summary.md) atomically; returns its path."""
    state, metrics, rounds = _load(workdir)
    out = os.path.join(workdir, "report")
    tmp = tempfile.mkdtemp(prefix=".report-", dir=workdir)
    try:
        plots = _plots(tmp, workdir, state, metrics, rounds)
        with open(os.path.join(tmp, "summary.md"), "w", encoding="utf-8") as f:
            f.write(_summary(workdir, state, metrics, rounds, plots))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
