"""The rows of the ``make bench`` table: a figure, its same-run baseline and its target."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    """A bound on a figure, absolute or as a ratio to the figure's baseline.

    With neither bound the row is information only (a second baseline to read the
    figure against): it shows "-" as its target and is left out of the count of targets.
    """

    at_least: float | None = None
    at_most: float | None = None
    # The bound applies to value / baseline (a fraction, 0.6 = 60 %), not to the value.
    of_baseline: bool = False

    @property
    def bounded(self) -> bool:
        return self.at_least is not None or self.at_most is not None

    def judged(self, value: float, baseline: float | None) -> float | None:
        """The number the bound applies to; None when a ratio has no baseline."""
        if not self.of_baseline:
            return value
        if not baseline:
            return None
        return value / baseline

    def met(self, value: float, baseline: float | None) -> bool:
        judged = self.judged(value, baseline)
        if judged is None:
            return False
        if self.at_least is not None and judged < self.at_least:
            return False
        return self.at_most is None or judged <= self.at_most

    def describe(self, unit: str) -> str:
        def bound(number: float) -> str:
            if self.of_baseline:
                return f"{number:.0%} of baseline" if number < 1 else f"{number:g}x baseline"
            return f"{number:g} {unit}"

        parts = []
        if self.at_least is not None:
            parts.append(f">= {bound(self.at_least)}")
        if self.at_most is not None:
            parts.append(f"<= {bound(self.at_most)}")
        return " and ".join(parts) or "- (information)"


@dataclass(frozen=True, kw_only=True, slots=True)
class Figure:
    """One measured figure (a median over runs) with what it is compared to."""

    name: str
    value: float
    unit: str
    target: Target
    baseline: float | None = None
    baseline_name: str = ""
    # Anything a reader needs to interpret the row (sizes, runs, conditions).
    note: str = ""

    @property
    def met(self) -> bool:
        return self.target.met(self.value, self.baseline)

    @property
    def verdict(self) -> str:
        """The table's Met column: yes, NO, or "-" for a row without a target."""
        if not self.target.bounded:
            return "-"
        return "yes" if self.met else "NO"

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline:
            return None
        return self.value / self.baseline


def median(values: Sequence[float]) -> float:
    """The median of several runs' figures (the machine is noisy)."""
    return float(statistics.median(values))


def max_in_window(times_s: Sequence[float], window_s: float) -> int:
    """Largest number of instants inside any closed window of length ``window_s``.

    The rate bound's measure (at most ``rate * window + burst``), used by the benchmarks
    and the tests alike.
    """
    ordered = sorted(times_s)
    best = 0
    start = 0
    for end, instant in enumerate(ordered):
        while instant - ordered[start] > window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render(figures: Sequence[Figure]) -> str:
    """A Markdown table: figure, value, baseline, ratio, target, met."""
    lines = [
        "| Figure | Value | Baseline (same run) | Ratio | Target | Met |",
        "| --- | ---: | --- | ---: | --- | :---: |",
    ]
    for figure in figures:
        baseline = (
            f"{_number(figure.baseline)} {figure.unit} ({figure.baseline_name})"
            if figure.baseline is not None
            else "-"
        )
        ratio = f"{figure.ratio:.2f}x" if figure.ratio is not None else "-"
        name = f"{figure.name} ({figure.note})" if figure.note else figure.name
        lines.append(
            f"| {name} | {_number(figure.value)} {figure.unit} | {baseline} | {ratio} "
            f"| {figure.target.describe(figure.unit)} | {figure.verdict} |"
        )
    return "\n".join(lines)


def summary(figures: Sequence[Figure]) -> str:
    """The line under the table: how many of the rows with a target met it."""
    judged = [figure for figure in figures if figure.target.bounded]
    met = sum(figure.met for figure in judged)
    line = f"{met} of {len(judged)} targets met."
    if len(judged) < len(figures):
        line += f" ({len(figures) - len(judged)} rows for information, without a target.)"
    return line
