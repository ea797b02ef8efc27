"""`soft-jax compare`: runs side by side, differences to a baseline with paired intervals, refusals; and the
plots' axes (whole-round ticks) in `compare` and `report`.

One real run of the tiny random model (one round, HHH / TruthfulQA on 8 items, 3 open-ended answers) is built
once; a second variant is its copy with a config knob changed, its per-item scores perturbed deterministically
and stored in reverse order, so the expected differences are known and pairing by position would be wrong.
"""

import json
import os
import shutil

import numpy as np
import pytest
from helpers import INHOUSE_BIGBENCH, run

from soft_jax import evaluation
from soft_jax.cli import main
from soft_jax.evaluation import stats
from soft_jax.reports import compare, plots, report

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)

TASKS = ("hhh", "truthfulqa_mc1", "truthfulqa_mc2")
SIGNALS = ("distinct_1", "distinct_2", "repeated_ngram_rate", "length", "truncation_rate")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def _eval_path(w, t):
    return os.path.join(w, "rounds", f"{t:03d}", "eval.json")


def _rounds(w):
    return sorted(int(d) for d in os.listdir(os.path.join(w, "rounds")))


def perturbed_copy(src, dst, knob=("curriculum", "order", "random")):
    """A copy of the run with one config knob changed and deterministic per-item changes: validation scores
    +0.01 * (i % 3), every third benchmark item flipped (MC2: its mass halved); items stored in reverse order."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "report"))
    cfg = _read(os.path.join(dst, "config.json"))
    section, key, value = knob
    cfg[section][key] = value
    _write(os.path.join(dst, "config.json"), cfg)
    for t in _rounds(dst):
        ev = _read(_eval_path(dst, t))
        v = ev["validation"]
        v["items"] = [x + 0.01 * (i % 3) for i, x in enumerate(v["items"])][::-1]
        v["ids"] = v["ids"][::-1]
        v["value"] = float(np.mean(v["items"]))
        for task in TASKS:
            res = ev["tasks"][task]
            for i, r in enumerate(res["items"]):
                if i % 3 == 0:
                    r["correct"] = r["correct"] / 2 if task == "truthfulqa_mc2" else 1.0 - r["correct"]
            res["items"] = res["items"][::-1]
            res["accuracy"] = float(np.mean([r["correct"] for r in res["items"]]))
        _write(_eval_path(dst, t), ev)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:  # the in-house items in BIG-bench's layout (conftest)
        mp.delenv("SOFT_JAX_BIGBENCH_ARCHIVE", raising=False)
        mp.setenv("SOFT_JAX_BIGBENCH_DIR", INHOUSE_BIGBENCH)
        run("tiny.py", root / "base", "rounds=1", "eval.tasks=hhh,truthfulqa_mc1,truthfulqa_mc2", "eval.limit=8",
            "open_ended.limit=3")
    perturbed_copy(root / "base", root / "random_order")
    return root


def cell(md: str, section: str, variant: str, col: int) -> str:
    """The cell of a variant's row, column col (0: the first round), in the table under `## section`."""
    body = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in body.splitlines() if line.startswith(f"| {variant} ") or
               line.startswith(f"| {variant} (baseline)"))
    return [c.strip() for c in row.strip("|").split("|")][1 + col]


def paired_expected(a_dir, b_dir, t, task=None):
    """The baseline's and the variant's per-item scores, paired by identity the slow, obvious way."""
    ea, eb = _read(_eval_path(a_dir, t)), _read(_eval_path(b_dir, t))
    if task is None:
        va, vb = ea["validation"], eb["validation"]
        by = dict(zip(vb["ids"], vb["items"]))
        return va["items"], [by[i] for i in va["ids"]]
    ia, ib = ea["tasks"][task]["items"], eb["tasks"][task]["items"]
    by = dict(zip(evaluation.item_ids(ib), [r["correct"] for r in ib]))
    return [r["correct"] for r in ia], [by[i] for i in evaluation.item_ids(ia)]


def test_table_numbers_differences_and_plots(runs, tmp_path, capsys):
    a, b = runs / "base", runs / "random_order"
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out / 'compare.md'}"
    md = (out / "compare.md").read_text()
    result = _read(out / "compare.json")
    rounds = _rounds(a)
    assert result["baseline"] == "base" and result["variants"] == ["base", "random_order"]
    assert result["config_changes"]["random_order"] == ["curriculum.order: 'easy_to_hard' -> 'random'"]
    assert "| random_order |" in md and "curriculum.order: 'easy_to_hard' -> 'random'" in md
    header = "| variant | " + " | ".join(f"round {t}" for t in rounds) + " |"
    assert md.count(header) == 1 + len(TASKS) + 2 + len(SIGNALS)  # validation, tasks, kept, dropped, signals
    gens = {m["round"]: m for m in map(json.loads, open(a / "metrics.jsonl")) if m["phase"] == "generate"}
    for name, w in (("base", a), ("random_order", b)):
        for col, t in enumerate(rounds):
            ev = _read(_eval_path(w, t))
            assert cell(md, "validation valid_nll", name, col).startswith(f"{ev['validation']['value']:.4f}")
            for task in TASKS:
                assert cell(md, task, name, col).startswith(f"{ev['tasks'][task]['accuracy']:.4f}")
            for s in SIGNALS:
                assert cell(md, f"open-ended {s}", name, col) == f"{ev['open_ended']['signals'][s]:.4f}"
            g = gens.get(t)
            assert cell(md, "generations kept", name, col) == (str(g['kept']) if g else "-")
            assert cell(md, "generations dropped", name, col) == (str(g['prompts'] - g['kept']) if g else "-")
    for col, t in enumerate(rounds):  # the differences are stats.paired_bootstrap on items paired by identity
        for section, task, metric in [("validation valid_nll", None, "validation"), *((x, x, x) for x in TASKS)]:
            ci = stats.paired_bootstrap(*paired_expected(a, b, t, task), 0.95, 2000, seed=[0, t])
            got = next(m for m in result["metrics"] if m["key"] == metric)["diffs"]["random_order"][str(t)]
            assert {k: got[k] for k in ci} == ci
            higher = metric != "validation"
            assert got["verdict"] == stats.verdict(ci, higher)
            assert compare.describe(got) in cell(md, section, "random_order", col)
            assert "Δ" not in cell(md, section, "base", col)  # the baseline has no difference to itself
        shift = np.mean([0.01 * (i % 3) for i in range(len(paired_expected(a, b, t)[0]))])
        vdiff = next(m for m in result["metrics"] if m["key"] == "validation")["diffs"]["random_order"][str(t)]
        assert vdiff["diff"] == pytest.approx(shift) and vdiff["verdict"] == "worse"  # NLL up beyond noise
    pngs = {p for p in os.listdir(out) if p.endswith(".png")}
    assert {"validation_valid_nll.png", "hhh.png", "generations_kept.png", "open-ended_distinct_2.png"} <= pngs
    assert all(f"]({p})" in md for p in pngs)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dir left


def test_baseline_choice_and_figures_tick_whole_rounds(runs):
    variants = [compare.load(str(runs / "base")), compare.load(str(runs / "random_order"))]
    result = compare.compare(variants, baseline="random_order", resamples=500)
    m = next(m for m in result["metrics"] if m["key"] == "hhh")
    assert set(m["diffs"]) == {"base"}
    t = result["rounds"][-1]
    a, b = paired_expected(runs / "random_order", runs / "base", t, "hhh")
    assert {k: m["diffs"]["base"][t][k] for k in ("diff", "low", "high")} == \
        {k: stats.paired_bootstrap(a, b, 0.95, 500, seed=[0, t])[k] for k in ("diff", "low", "high")}
    figs = compare.figures(result)
    try:
        for key, fig in figs.items():
            for ax in fig.axes:
                ticks = list(ax.get_xticks())
                assert ticks == [float(int(x)) for x in ticks] and ticks == list(range(int(ticks[0]),
                                                                                       int(ticks[-1]) + 1)), key
                assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), key
                assert ax.get_legend() is None, key  # the legend is the figure's, outside the panels
            assert fig.legends, key
        from matplotlib.collections import LineCollection

        bars = [c for c in figs["hhh"].axes[1].collections if isinstance(c, LineCollection)]
        assert bars and len(bars[0].get_segments()) > 0, "the difference panel has no interval bars"
    finally:
        plots.pyplot().close("all")


def test_report_plots_tick_whole_rounds_with_labels(runs):
    w = str(runs / "base")
    state, metrics, rounds = report._load(w)
    figs = report._figures(w, state, metrics, rounds, _read(os.path.join(w, "config.json")))
    try:
        assert set(figs) == {"eval_per_round.png", "filters_per_round.png", "difficulty_per_round.png",
                             "train_loss.png"}
        for name, fig in figs.items():
            for ax in (ax for ax in fig.axes if ax.get_visible()):
                ticks = list(ax.get_xticks())
                assert all(float(x).is_integer() for x in ticks), (name, ticks)
                assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), name
                legend = ax.get_legend()
                if legend is not None:  # outside the axes: anchored right of them
                    assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1 - 1, name
        eval_axes = figs["eval_per_round.png"].axes
        from matplotlib.collections import LineCollection

        assert any(isinstance(c, LineCollection) and len(c.get_segments()) for ax in eval_axes
                   for c in ax.collections), "the guard's intervals are drawn"
    finally:
        plots.pyplot().close("all")


def test_integer_ticks():
    assert plots.integer_ticks([0, 1, 2]) == [0, 1, 2]
    assert plots.integer_ticks([2, 0]) == [0, 1, 2]
    assert plots.integer_ticks([1]) == [1]
    assert plots.integer_ticks([]) == []


def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("soft-jax: error: "), err
    return err


@pytest.mark.parametrize("change,needle", [
    (("eval", "limit", 16), "different eval limit (16 vs 8)"),
    (("eval", "protocol", "loglik"), "different eval protocol"),
    (("model", "name", "smollm2-135m"), "different base model"),
    (("validation", "path", "other.jsonl"), "different validation set"),
    (("eval", "tasks", "hhh"), "different eval tasks"),
])
def test_incomparable_runs_exit_2_with_one_line(runs, tmp_path, capsys, change, needle):
    other = tmp_path / "other"
    perturbed_copy(runs / "base", other, change)
    err = _one_line_error(capsys, ["compare", str(runs / "base"), str(other), "--out", str(tmp_path / "cmp")])
    assert needle in err and "not comparable" in err
    assert not os.path.exists(tmp_path / "cmp")


def test_items_pair_by_identity(runs, tmp_path, capsys):
    other = tmp_path / "other"
    perturbed_copy(runs / "base", other)
    t = _rounds(other)[-1]
    ev = _read(_eval_path(other, t))
    ev["tasks"]["hhh"]["items"][0]["question"] = "a question the baseline never saw"
    _write(_eval_path(other, t), ev)
    err = _one_line_error(capsys, ["compare", str(runs / "base"), str(other), "--out", str(tmp_path / "cmp")])
    assert f"round {t} hhh: the items do not pair up" in err
    ev = _read(_eval_path(other, t))
    ev["validation"]["ids"][0] = "not-a-validation-id"
    ev["tasks"]["hhh"] = _read(_eval_path(runs / "base", t))["tasks"]["hhh"]
    _write(_eval_path(other, t), ev)
    err = _one_line_error(capsys, ["compare", str(runs / "base"), str(other), "--out", str(tmp_path / "cmp")])
    assert "validation valid_nll: the items do not pair up" in err


def test_bad_arguments_exit_2(runs, tmp_path, capsys):
    base = str(runs / "base")
    err = _one_line_error(capsys, ["compare", base, str(tmp_path)])
    assert "not a soft-jax run work dir" in err
    err = _one_line_error(capsys, ["compare", base])
    assert "two or more work dirs" in err
    err = _one_line_error(capsys, ["compare", base, str(runs / "random_order"), "--baseline", "nope"])
    assert "--baseline nope: no such variant; choose one of base, random_order" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    err = _one_line_error(capsys, ["compare", base, str(runs / "random_order"), "--out", str(busy)])
    assert "holds no earlier comparison" in err and (busy / "keep.txt").read_text() == "mine"


def test_item_ids_number_repeated_questions():
    rows = [{"question": "q"}, {"question": "r"}, {"question": "q"}, {"question": "q"}]
    assert evaluation.item_ids(rows) == ["q", "r", "q #2", "q #3"]


def test_runs_without_validation_ids_pair_by_position(runs, tmp_path):
    """eval.json files written before validation ids were recorded: the config check vouches for the set."""
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(runs / "base", old, ignore=shutil.ignore_patterns("checkpoints", "report"))
    shutil.copytree(runs / "base", new, ignore=shutil.ignore_patterns("checkpoints", "report"))
    for w, shift in ((old, 0.0), (new, 0.5)):
        for t in _rounds(w):
            ev = _read(_eval_path(w, t))
            del ev["validation"]["ids"]
            ev["validation"]["items"] = [x + shift * (i % 2) for i, x in enumerate(ev["validation"]["items"])]
            _write(_eval_path(w, t), ev)
    result = compare.compare([compare.load(str(old)), compare.load(str(new))], resamples=200)
    diffs = next(m for m in result["metrics"] if m["key"] == "validation")["diffs"]["new"]
    for t, ci in diffs.items():
        a = _read(_eval_path(old, t))["validation"]["items"]
        b = _read(_eval_path(new, t))["validation"]["items"]
        assert {k: ci[k] for k in ("diff", "low", "high")} == \
            {k: stats.paired_bootstrap(a, b, 0.95, 200, seed=[0, t])[k] for k in ("diff", "low", "high")}
