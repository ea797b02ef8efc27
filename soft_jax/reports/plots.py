"""Plot helpers shared by `soft-jax report` and `soft-jax compare`: figures a reader trusts at a glance.

Rounds are whole numbers, so round axes tick only at the rounds plotted (matplotlib's default locator puts
ticks at 0.5 rounds); legends sit outside the axes, so they never cover data; every axis says what it
measures and in which unit (`ylabel`); y axes show plain values, never an offset like "+1.081e1".
"""

from __future__ import annotations

import os
from collections.abc import Iterable

ROUND_LABEL = "round (0 = base model)"

# metric -> y-axis label with its unit. valid_nll is each held-out pair's mean response NLL per token.
UNITS = {
    "valid_nll": "valid_nll (nats / response token)",
    "hhh": "HHH accuracy (fraction correct)",
    "truthfulqa_mc1": "TruthfulQA MC1 accuracy (fraction correct)",
    "truthfulqa_mc2": "TruthfulQA MC2 (true-answer probability mass)",
    "distinct_1": "distinct-1 (unique / all word unigrams)",
    "distinct_2": "distinct-2 (unique / all word bigrams)",
    "repeated_ngram_rate": "repeated 4-gram rate (fraction of 4-grams)",
    "length": "mean answer length (words)",
    "truncation_rate": "truncation rate (fraction of answers)",
    "kept": "kept generations (prompts)",
    "dropped": "dropped generations (prompts)",
}


# metrics that are fractions in [0, 1]: their axes never show impossible values below 0 or above 1
FRACTIONS = ("hhh", "truthfulqa_mc1", "truthfulqa_mc2", "distinct_1", "distinct_2", "repeated_ngram_rate",
             "truncation_rate")


def _name(metric: str) -> str:
    return metric[len("open_"):] if metric.startswith("open_") else metric


def ylabel(metric: str) -> str:
    """The y-axis label of a metric (open-ended signals may carry report's `open_` prefix)."""
    return UNITS.get(_name(metric), _name(metric))


def value_axis(ax, metric: str) -> None:
    """A y axis of a metric's values: plain numbers, clipped to [0, 1] (with a margin) for fractions, from 0 for
    counts and lengths."""
    plain_values(ax)
    name = _name(metric)
    low, high = ax.get_ylim()
    if name in FRACTIONS:
        ax.set_ylim(max(low, -0.03), min(high, 1.03))
    elif name in ("kept", "dropped", "length"):
        count_axis(ax)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(values: Iterable[float]) -> list[int]:
    """The tick positions of a round axis: every whole round from the first to the last value."""
    values = [v for v in values]
    if not values:
        return []
    return list(range(int(min(values)), int(max(values)) + 1))


def round_axis(ax, rounds: Iterable[float], label: str = ROUND_LABEL) -> None:
    """Ticks at whole rounds only, with the axis label."""
    ticks = integer_ticks(rounds)
    ax.set_xticks(ticks)
    if ticks:
        ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    ax.set_xlabel(label)


def integer_axis(ax, which: str = "x") -> None:
    """Whole-number ticks on an axis of counts (training steps, prompts)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if which == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def count_axis(ax) -> None:
    """A y axis of counts: from 0 to at least 1, whole-number ticks (a constant count would otherwise tick at
    3.95, 4.05), a margin below 0 so that markers at 0 show whole."""
    top = max(1.0, ax.get_ylim()[1]) * 1.05
    ax.set_ylim(-0.03 * top, top)
    integer_axis(ax, "y")


def plain_values(ax) -> None:
    """Tick labels that are the values themselves, not an offset plus small differences."""
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def legend_outside(ax, title: str | None = None) -> None:
    """A legend right of the axes, where it cannot cover a line, bar or error bar."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, title=title,
                  title_fontsize=8)


def figure_legend(fig, axes, title: str | None = None) -> None:
    """One legend for a figure of panels (the union of their labelled artists), right of the panels."""
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, title=title, title_fontsize=8)


def save(fig, directory: str, name: str) -> str:
    """Writes the figure as a PNG (the bounding box grows to hold outside legends) and closes it; returns name."""
    fig.savefig(os.path.join(directory, name), dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return name


def intervals(ax, xs: list, points: list, lows: list, highs: list, color="black", marker: str = "o",
              label: str | None = None) -> None:
    """Points with their intervals drawn as they are, [low, high] with caps: a percentile bootstrap interval need
    not contain its point estimate, and at confidence 0 it is that point (error-bar lengths could be negative)."""
    xs = list(xs)
    ax.vlines(xs, lows, highs, color=color)
    ax.plot(xs + xs, list(lows) + list(highs), "_", color=color, markersize=10)
    ax.plot(xs, points, marker, color=color, linestyle="none", label=label)
