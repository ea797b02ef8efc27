"""`soft-jax compare DIR... [--baseline NAME] [--out OUTDIR]`: runs side by side, round by round (ablations).

Each work dir is one variant, named by its basename. For every metric (the validation metric, the eval
tasks' accuracies, generations kept and dropped, the open-ended degeneracy signals) `compare.md` has a table
with one row per variant and one column per round, and a PNG with one line per variant. The paired metrics
(validation per-item scores, benchmark per-item correctness) also get each variant's difference to the
baseline variant on the same items, with a seeded paired bootstrap interval (soft_jax.evaluation.stats, seed
[seed, round]), in the table and as error bars: a reader sees which differences are beyond noise.
`compare.json` holds every number.

Runs compare only when they measure the same things: the same base model, eval tasks, limit, protocol and
TruthfulQA file, validation metric and set, and open-ended questions (config.json), and per-item results that
pair up by identity (validation item ids, benchmark questions), not by position. Anything else is a
UserError naming the difference.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from soft_jax import evaluation
from soft_jax.core import io_utils, storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import read_json
from soft_jax.evaluation import guard, stats
from soft_jax.experiment import config as config_lib
from soft_jax.experiment.workdir import CONFIG, LM_EVAL_ITEMS, METRICS, STATE
from soft_jax.reports import plots

OUTPUT = "compare.md"
SIGNALS = ("distinct_1", "distinct_2", "repeated_ngram_rate", "length", "truncation_rate")
# config keys that differ between variants by design, or say nothing about what a run measures
IGNORED_DIFFS = ("progress",)
MARKERS, LINES = "osD^v", ("-", "--", ":", "-.")  # per variant, so that equal lines stay apart


@dataclasses.dataclass
class Variant:
    """One run: its name (the work dir's basename), config, eval.json per round and generate event per round."""

    name: str
    path: str
    config: dict
    evals: dict[int, dict]
    generations: dict[int, dict]


@dataclasses.dataclass(frozen=True)
class Metric:
    """A row group of the comparison. key: "validation", a task name, "kept", "dropped" or a signal name."""

    key: str
    title: str
    ylabel: str
    higher: bool | None  # higher is better; None: no direction (counts, length)
    paired: bool  # per-item scores exist: differences to the baseline get a paired interval


def load(path: str) -> Variant:
    """A work dir's config, evaluations and generation counts; a UserError when it is not a soft-jax run."""
    path = path.rstrip("/") or path
    storage.check(path, "run")
    if not storage.isfile(os.path.join(path, STATE)) or not storage.isfile(os.path.join(path, CONFIG)):
        raise UserError(f"{path}: not a soft-jax run work dir (no {STATE} or {CONFIG}); give the --workdir of a run")
    rounds_dir = os.path.join(path, "rounds")
    rounds = sorted(int(d) for d in storage.listdir(rounds_dir) if d.isdigit())
    evals = {t: read_json(os.path.join(rounds_dir, f"{t:03d}", "eval.json")) for t in rounds}
    evals = {t: e for t, e in evals.items() if e is not None}
    if not evals:
        raise UserError(f"{path}: the run has no evaluated round yet (no rounds/NNN/eval.json); run it first")
    generations = {m["round"]: m for m in io_utils.read_appended(os.path.join(path, METRICS))
                   if m.get("phase") == "generate"}
    return Variant(os.path.basename(storage.abspath(path)), path, read_json(os.path.join(path, CONFIG)), evals,
                   generations)


def _identity(config: dict) -> dict[str, object]:
    """What a run measures, by the words an error names it with: runs compare only when these are equal."""
    model, ev, val, oe = (config.get(k, {}) for k in ("model", "eval", "validation", "open_ended"))
    out = {"base model": model.get("path") or model.get("name"), "eval tasks": ev.get("tasks"),
           "eval limit": ev.get("limit"), "eval protocol": ev.get("protocol"),
           "TruthfulQA file": ev.get("truthfulqa_file"), "validation metric": val.get("metric"),
           "open-ended questions": f"{oe.get('path') or 'built-in'}, first {oe.get('limit')}",
           "lm-eval tasks": ev.get("lm_eval", {})}
    if val.get("metric") == "valid_nll":
        out["validation set"] = val.get("path") or "built-in"
    elif val.get("metric") in evaluation.TASKS or str(val.get("metric")).startswith(guard.LM_EVAL):
        out["validation limit"] = val.get("limit")
    return out


def check_comparable(variants: list[Variant]) -> None:
    """A UserError naming the first difference in what the runs measure (config.json and eval.json)."""
    first = variants[0]
    ref = _identity(first.config)
    for v in variants[1:]:
        for what, value in _identity(v.config).items():
            if value != ref.get(what):
                raise UserError(f"{v.path} and {first.path} are not comparable: different {what} ({value!r} vs "
                                f"{ref.get(what)!r}); compare runs of the same base model, evals and validation set")
    seen: dict[str, str] = {}  # protocol -> where; the eval.json files must agree with each other too
    for v in variants:
        for t, e in v.evals.items():
            if "protocol" in e:
                seen.setdefault(e["protocol"], f"{v.path} round {t}")
    if len(seen) > 1:
        (p1, w1), (p2, w2) = list(seen.items())[:2]
        raise UserError(f"{w2} and {w1} are not comparable: different eval protocol ({p2!r} vs {p1!r}) in eval.json; "
                        "compare runs evaluated the same way")


def metrics(variants: list[Variant]) -> list[Metric]:
    """The metrics any variant recorded, in table order: validation, tasks, kept / dropped, signals."""
    metric = variants[0].config["validation"]["metric"]
    first = next(iter(variants[0].evals.values()))
    higher = guard.METRICS.get(metric, first.get("validation", {}).get("higher"))
    out = [Metric("validation", f"validation {metric}", plots.ylabel(metric), higher, True)]
    tasks = evaluation.parse_tasks(variants[0].config["eval"]["tasks"]) if variants[0].config["eval"]["tasks"] else []
    out += [Metric(t, t, plots.ylabel(t), True, True) for t in tasks]
    for task, r in first.get("lm_eval", {}).items():  # lm-eval's metrics, paired where each item has a number
        out += [Metric(f"lm_eval/{task}/{k}", f"{task} {k}", k, r["higher_is_better"].get(k), True)
                for k in r["metrics"] if not k.endswith("_stderr")]
    if any(v.generations for v in variants):
        out += [Metric("kept", "generations kept", plots.ylabel("kept"), None, False),
                Metric("dropped", "generations dropped", plots.ylabel("dropped"), None, False)]
    if any("open_ended" in e for v in variants for e in v.evals.values()):
        out += [Metric(s, f"open-ended {s}", plots.ylabel(s), guard.METRICS.get(s), False) for s in SIGNALS]
    return out


def value(v: Variant, m: Metric, t: int) -> float | None:
    """The variant's number for a metric after round t, as eval.json (or metrics.jsonl for counts) holds it."""
    e = v.evals.get(t, {})
    if m.key == "validation":
        return e["validation"]["value"] if "validation" in e else None
    if m.key in ("kept", "dropped"):
        g = v.generations.get(t)
        return None if g is None else float(g["kept"] if m.key == "kept" else g["prompts"] - g["kept"])
    if m.key in SIGNALS:
        return e.get("open_ended", {}).get("signals", {}).get(m.key)
    if m.key.startswith("lm_eval/"):
        _, task, name = m.key.split("/", 2)
        return e.get("lm_eval", {}).get(task, {}).get("metrics", {}).get(name)
    task = e.get("tasks", {}).get(m.key)
    return None if task is None else task["accuracy"]


def items(v: Variant, m: Metric, t: int) -> tuple[list[str] | None, list[float]] | None:
    """(item ids or None when the run recorded none, per-item scores) of a paired metric after round t."""
    e = v.evals.get(t, {})
    if m.key == "validation":
        return (e["validation"].get("ids"), e["validation"]["items"]) if "validation" in e else None
    if m.key.startswith("lm_eval/"):  # each item's value from the round's lm_eval_items.jsonl, paired by doc_id
        _, task, name = m.key.split("/", 2)
        path = os.path.join(v.path, "rounds", f"{t:03d}", LM_EVAL_ITEMS)
        rows = [r for r in (io_utils.read_jsonl(path) if storage.isfile(path) else []) if r["task"] == task]
        if not rows or not all(isinstance(r.get(name), (int, float)) for r in rows):
            return None  # a corpus-level metric (perplexity): no per-item number to pair
        return [f"{task}/{r['doc_id']}" for r in rows], [float(r[name]) for r in rows]
    task = e.get("tasks", {}).get(m.key)
    return None if task is None else (evaluation.item_ids(task["items"]), [r["correct"] for r in task["items"]])


def aligned(ref: tuple[list[str] | None, list[float]], other: tuple[list[str] | None, list[float]],
            where: str) -> tuple[np.ndarray, np.ndarray]:
    """The two runs' scores of the same items, in the reference's order. Items pair up by id; runs written before
    validation ids were recorded pair by position, which the config check has made safe."""
    (ids_a, a), (ids_b, b) = ref, other
    if ids_a is None or ids_b is None:
        if len(a) != len(b):
            raise UserError(f"{where}: {len(b)} items vs the baseline's {len(a)}; the runs were evaluated on "
                            "different items")
        return np.asarray(a, np.float64), np.asarray(b, np.float64)
    by_id = dict(zip(ids_b, b))
    if len(by_id) != len(ids_b) or len(set(ids_a)) != len(ids_a) or set(by_id) != set(ids_a):
        odd = sorted(set(ids_a) ^ set(by_id))
        example = f"item {odd[0][:60]!r} is in one run only" if odd else "an item id repeats"
        raise UserError(f"{where}: the items do not pair up with the baseline's ({example}); the runs were "
                        "evaluated on different items")
    return np.asarray(a, np.float64), np.asarray([by_id[i] for i in ids_a], np.float64)


def compare(variants: list[Variant], baseline: str | None = None, confidence: float = 0.95,
            resamples: int = 2000, seed: int = 0) -> dict:
    """Every number of the comparison (compare.json): per metric, each variant's value per round and, for the
    paired metrics, its difference to the baseline with a paired bootstrap interval and verdict."""
    if len(variants) < 2:
        raise UserError("give two or more work dirs to compare")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"two work dirs are named {twice!r}; variants are named by their directory's basename: "
                        "rename one")
    baseline = baseline or names[0]
    if baseline not in names:
        raise UserError(f"--baseline {baseline}: no such variant; choose one of {', '.join(names)}")
    check_comparable(variants)
    base = variants[names.index(baseline)]
    rounds = sorted({t for v in variants for t in v.evals} | {t for v in variants for t in v.generations})
    out = {"baseline": baseline, "variants": names, "paths": {v.name: v.path for v in variants},
           "rounds": rounds, "confidence": confidence, "resamples": resamples, "seed": seed,
           "config_changes": {v.name: _changes(base.config, v.config) for v in variants}, "metrics": []}
    for m in metrics(variants):
        values = {v.name: {t: x for t in rounds if (x := value(v, m, t)) is not None} for v in variants}
        diffs: dict = {}
        for v in variants:
            if not m.paired or v is base:
                continue
            diffs[v.name] = {}
            for t in rounds:
                ref, other = items(base, m, t), items(v, m, t)
                if ref is None or other is None:
                    continue
                a, b = aligned(ref, other, f"{v.path} round {t} {m.title}")
                ci = stats.paired_bootstrap(a, b, confidence, resamples, seed=[seed, t])
                verdict = stats.verdict(ci, m.higher) if m.higher is not None else "tie"
                diffs[v.name][t] = {**ci, "verdict": verdict}
        out["metrics"].append({**dataclasses.asdict(m), "values": values, "diffs": diffs})
    return out


def _changes(base: dict, other: dict) -> list[str]:
    """`key: baseline value -> this value` for each config key the variant changed."""
    def get(c, key):
        for part in key.split("."):
            c = c.get(part) if isinstance(c, dict) else None
        return c
    return [f"{k}: {get(base, k)!r} -> {get(other, k)!r}" for k in config_lib.diff(base, other)
            if k not in IGNORED_DIFFS]


def describe(ci: dict) -> str:
    """A table cell's difference: mean [interval] verdict, the verdict in bold when beyond noise."""
    verdict = ci["verdict"] if ci["verdict"] == "tie" else f"**{ci['verdict']}**"
    return f"Δ {ci['diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}] {verdict}"


def markdown(result: dict, plot_names: dict[str, str]) -> str:
    """compare.md: what varies, then one table per metric (rows: variants, columns: rounds) with its plot."""
    base, rounds = result["baseline"], result["rounds"]
    lines = [f"# soft-jax compare: {', '.join(result['variants'])}", "",
             f"Baseline: **{base}**. A Δ is the variant minus the baseline on the same items (per-item validation "
             f"scores, benchmark per-item correctness), with a {result['confidence']:.0%} paired bootstrap "
             f"interval ({result['resamples']} resamples); **better** / **worse** when the whole interval lies on "
             "one side of 0, else tie.", "", "| variant | work dir | config changes vs the baseline |",
             "|---|---|---|"]
    for name in result["variants"]:
        changes = "; ".join(result["config_changes"][name]) or ("(baseline)" if name == base else "none")
        lines.append(f"| {name} | {result['paths'][name]} | {changes} |")
    for m in result["metrics"]:
        direction = {True: "higher is better", False: "lower is better", None: ""}[m["higher"]]
        lines += ["", f"## {m['title']}", "", f"{m['ylabel']}" + (f"; {direction}" if direction else "") + ".", "",
                  "| variant | " + " | ".join(f"round {t}" for t in rounds) + " |", "|---|" + "---|" * len(rounds)]
        for name in result["variants"]:
            cells = []
            for t in rounds:
                x = m["values"][name].get(t)
                cell = "-" if x is None else f"{x:.0f}" if m["key"] in ("kept", "dropped") else f"{x:.4f}"
                if t in m["diffs"].get(name, {}):
                    cell += " (" + describe(m["diffs"][name][t]) + ")"
                cells.append(cell)
            lines.append(f"| {name}{' (baseline)' if name == base else ''} | " + " | ".join(cells) + " |")
        if m["key"] in plot_names:
            lines += ["", f"![{m['title']}]({plot_names[m['key']]})"]
    return "\n".join(lines) + "\n"


def figures(result: dict) -> dict[str, object]:
    """{metric key: figure}: one line per variant over rounds; paired metrics get a second panel with each
    variant's difference to the baseline and its interval as error bars (variants side by side, not on top)."""
    plt = plots.pyplot()
    out = {}
    variants, base = result["variants"], result["baseline"]
    colors = {n: f"C{i}" for i, n in enumerate(variants)}
    for m in result["metrics"]:
        if not any(m["values"][n] for n in variants):
            continue
        paired = bool(m["diffs"]) and any(m["diffs"].values())
        fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(11 if paired else 6, 3.6), squeeze=False,
                                 layout="constrained")
        ax = axes[0][0]
        xs_all = []
        for i, n in enumerate(variants):  # side by side and marked apart: equal lines stay visible
            xs = sorted(m["values"][n])
            xs_all += xs
            ax.plot([t + _shift(i, len(variants)) for t in xs], [m["values"][n][t] for t in xs], color=colors[n],
                    marker=MARKERS[i % len(MARKERS)], linestyle=LINES[i % len(LINES)],
                    label=n + (" (baseline)" if n == base else ""))
        plots.round_axis(ax, xs_all)
        plots.value_axis(ax, m["key"])
        ax.set(title=m["title"], ylabel=m["ylabel"])
        if paired:
            _difference_panel(axes[0][1], m, result, colors)
        plots.figure_legend(fig, axes[0], title="variant")
        out[m["key"]] = fig
    return out


def _shift(i: int, n: int) -> float:
    """Variant i's offset from the round (of n variants side by side), within +-0.25 of a round."""
    return (i - (n - 1) / 2) * (0.5 / n) if n > 1 else 0.0


def _difference_panel(ax, m: dict, result: dict, colors: dict[str, str]) -> None:
    """Each variant minus the baseline per round, its paired interval as an error bar, next to a zero line."""
    variants = result["variants"]
    ts_all = []
    ax.axhline(0.0, color="gray", linewidth=0.8)
    for i, n in enumerate(variants):
        d = m["diffs"].get(n)
        if not d:
            continue
        ts = sorted(d)
        ts_all += ts
        plots.intervals(ax, [t + _shift(i, len(variants)) for t in ts], [d[t]["diff"] for t in ts],
                        [d[t]["low"] for t in ts], [d[t]["high"] for t in ts], color=colors[n],
                        marker=MARKERS[i % len(MARKERS)])
    plots.round_axis(ax, ts_all)
    plots.plain_values(ax)
    ax.set(title=f"difference to {result['baseline']} ({result['confidence']:.0%} paired CI)",
           ylabel=f"Δ {m['ylabel']}")


def write(paths: list[str], out: str | None = None, baseline: str | None = None, confidence: float = 0.95,
          resamples: int = 2000, seed: int = 0) -> str:
    """Writes OUT/{compare.md, compare.json, *.png} atomically (default OUT: `compare` next to the first run);
    returns OUT. Everything is checked and computed before anything is written."""
    result = compare([load(p) for p in paths], baseline, confidence, resamples, seed)
    out = storage.check(out or os.path.join(os.path.dirname(storage.abspath(paths[0].rstrip("/"))), "compare"), "--out")
    if not storage.isfile(os.path.join(out, OUTPUT)) and storage.listdir(out):
        raise UserError(f"--out {out}: the directory exists and holds no earlier comparison; give a new or empty "
                        "directory")
    def fill(tmp: str) -> None:
        titles = {m["key"]: m["title"] for m in result["metrics"]}
        names = {key: plots.save(fig, tmp, titles[key].replace(" ", "_") + ".png")
                 for key, fig in figures(result).items()}
        with open(os.path.join(tmp, OUTPUT), "w", encoding="utf-8") as f:
            f.write(markdown(result, names))
        with open(os.path.join(tmp, "compare.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)

    io_utils.write_dir(out, fill)
    return out

