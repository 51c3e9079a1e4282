"""Side-by-side benchmarks of ambient and its peers: ``python -m benchmarks``.

Not part of the test suite. Every section measures ambient and the libraries people already
use for the same job in one process, in one run, interleaved round by round (the order is
shuffled every round), so that a machine busy with other work slows every variant alike.
Results are medians over the rounds with the min-max range. Overheads are taken round by round
(a variant minus the same round's bare endpoint); ratios of overheads are ratios of their
medians, with a 90% bootstrap interval over the rounds in place of a min-max range.

This module holds the shared machinery: statistics, interleaving, tables and targets.
"""

from __future__ import annotations

import gc
import random
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "Options",
    "Report",
    "Stat",
    "Table",
    "Target",
    "interleave",
    "median_interval",
    "paired_difference",
    "paired_ratio",
    "ratio_of_medians",
]

Chunk = Callable[[], Awaitable[float]]
"""One timed chunk of a variant: runs it and returns seconds per operation."""


@dataclass(frozen=True, slots=True)
class Options:
    """What to run and how long.

    Attributes:
        quick: Smaller sizes and fewer rounds (a smoke run, not for publishing).
        rounds: Interleaved rounds per measurement.
        markdown: Print tables as Markdown (for the README).
    """

    quick: bool = False
    rounds: int = 15
    markdown: bool = False

    def size(self, full: int, quick: int) -> int:
        """``full`` normally, ``quick`` in quick mode."""
        return quick if self.quick else full


@dataclass(frozen=True, slots=True)
class Stat:
    """Median and range of a series of measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """Summarise ``values`` (at least one)."""
        return cls(statistics.median(values), min(values), max(values))

    def scaled(self, factor: float) -> Stat:
        """The same statistic in another unit."""
        return Stat(self.median * factor, self.low * factor, self.high * factor)

    def fmt(self, digits: int = 2, suffix: str = "") -> str:
        """``median (low-high)``."""
        return f"{self.median:.{digits}f}{suffix} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Round-by-round ``value - reference`` (both measured in the same rounds)."""
    return [v - r for v, r in zip(values, reference, strict=True)]


def paired_ratio(values: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Round-by-round ``value / reference``; a non-positive reference gives ``inf``."""
    return [v / r if r > 0 else float("inf") for v, r in zip(values, reference, strict=True)]


def ratio_of_medians(
    values: Sequence[float], reference: Sequence[float], *, resamples: int = 1000
) -> Stat:
    """``median(values) / median(reference)`` with a 90% bootstrap interval as the range.

    For ratios of small differences (overheads of a microsecond measured on a busy machine)
    the round-by-round ratio is dominated by noise in its denominator; the ratio of the
    medians is not. The interval resamples whole rounds (pairs stay together).
    """
    point = _safe_ratio(statistics.median(values), statistics.median(reference))
    count = len(values)
    if count < 2:
        return Stat(point, point, point)
    rng = random.Random(0)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(count) for _ in range(count)]
        ratios.append(
            _safe_ratio(
                statistics.median(values[i] for i in picks),
                statistics.median(reference[i] for i in picks),
            )
        )
    ratios.sort()
    return Stat(point, ratios[int(0.05 * resamples)], ratios[int(0.95 * resamples) - 1])


def median_interval(values: Sequence[float], *, resamples: int = 1000) -> Stat:
    """The median with a 90% bootstrap interval as the range (for targets on a difference)."""
    point = statistics.median(values)
    count = len(values)
    if count < 2:
        return Stat(point, point, point)
    rng = random.Random(0)
    medians = sorted(
        statistics.median(values[rng.randrange(count)] for _ in range(count))
        for _ in range(resamples)
    )
    return Stat(point, medians[int(0.05 * resamples)], medians[int(0.95 * resamples) - 1])


def _safe_ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else float("inf")


async def interleave(
    chunks: Mapping[str, Chunk], rounds: int, *, warmup: int = 1, seed: int = 0
) -> dict[str, list[float]]:
    """Run every chunk once per round, in a fresh random order each round.

    Returns:
        Seconds per operation of each chunk, one value per round, in round order.
    """
    order = list(chunks)
    for name in order:
        for _ in range(warmup):
            await chunks[name]()
    results: dict[str, list[float]] = {name: [] for name in order}
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            gc.collect()
            results[name].append(await chunks[name]())
    return results


@dataclass
class Table:
    """A titled table of strings, printed as aligned text or Markdown."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """Append a row."""
        self.rows.append([str(cell) for cell in cells])

    def render(self, *, markdown: bool = False) -> str:
        """The table as text."""
        if markdown:
            lines = [f"#### {self.title}", ""]
            lines.append("| " + " | ".join(self.columns) + " |")
            lines.append("|" + "|".join("---" for _ in self.columns) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in self.rows]
            if self.notes:
                lines.append("")
                lines += [f"{note}  " for note in self.notes]
            return "\n".join(lines)
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
            return "  ".join([first, *rest]).rstrip()

        out = [self.title, "=" * len(self.title), line(self.columns)]
        out.append("  ".join("-" * w for w in widths))
        out += [line(row) for row in self.rows]
        out += [f"  {note}" for note in self.notes]
        return "\n".join(out)


@dataclass(frozen=True, slots=True)
class Target:
    """One of the issue's targets, judged on the median."""

    name: str
    value: Stat
    limit: float
    unit: str = "x"
    higher_is_better: bool = False
    interval: str = "min-max"

    @property
    def informative(self) -> bool:
        """A number reported beside the targets, with no limit of its own."""
        return self.limit == float("inf")

    @property
    def met(self) -> bool:
        """Whether the median is on the right side of the limit."""
        if self.higher_is_better:
            return self.value.median >= self.limit
        return self.value.median <= self.limit

    def render(self) -> str:
        """One line: name, measured value, limit, verdict."""
        sign = ">=" if self.higher_is_better else "<="
        digits = 3 if self.unit == "x" else 2
        value = (
            f"{self.value.median:.{digits}f}{self.unit} [{self.interval}]"
            if self.value.low == self.value.high
            else f"{self.value.fmt(digits, self.unit)} [{self.interval}]"
        )
        if self.informative:
            return f"{'info':6}  {self.name}: {value}"
        verdict = "met" if self.met else "MISSED"
        return f"{verdict:6}  {self.name}: {value}  (target {sign} {self.limit:g}{self.unit})"


@dataclass
class Report:
    """What the sections measured: tables and targets, printed as they come."""

    options: Options
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    missed_elsewhere: list[str] = field(default_factory=list)

    def table(self, table: Table) -> None:
        """Record and print ``table``."""
        self.tables.append(table)
        print(table.render(markdown=self.options.markdown), end="\n\n", flush=True)

    def target(self, target: Target) -> None:
        """Record a target."""
        self.targets.append(target)

    def missed_in(self, what: str) -> None:
        """Record that ``what`` (a section run as its own script) missed a target."""
        line = f"{'MISSED':6}  {what}: a target was missed (its lines are above)"
        self.missed_elsewhere.append(line)
        print(line, flush=True)

    def unavailable(self, what: str, why: str) -> None:
        """Record a variant that could not run, and why."""
        line = f"{what}: not measured ({why})"
        self.missing.append(line)
        print(line, flush=True)
