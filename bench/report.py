"""
The results: figures per workload, metric and server, rendered as one
Markdown table with a ratio column wsgw/peer for each peer that ran.

A ratio reads the same way for every metric: wsgw's figure divided by the
peer's.  Whether more is better is marked on the metric (↑ higher is better,
↓ lower is better), so 2.0 on a ↑ row means wsgw does twice as well, and 2.0
on a ↓ row means it needs twice as much.
"""

from __future__ import annotations

import math
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Union

Value = Union[float, int, str, None]

NA = "n/a"


@dataclass
class Row:
    workload: str  # e.g. "W1 idle, N=1,000"
    metric: str  # e.g. "handshakes/s"
    better: str = ""  # "↑", "↓" or "" (a check, not a figure)
    values: Dict[str, Value] = field(default_factory=dict)
    digits: int = 1


class Results:
    """Rows in the order they were first reported; notes for the footer."""

    def __init__(self, servers: Sequence[str]):
        self.servers = list(servers)
        self.rows: List[Row] = []
        self._index: Dict[tuple, Row] = {}
        #: Every value reported per row and server, for runs repeated (--repeat).
        self._samples: Dict[tuple, Dict[str, List[Value]]] = {}
        self.notes: List[str] = []
        self.failures: List[str] = []
        self.failed_servers: set = set()

    def add(
        self,
        workload: str,
        metric: str,
        server: str,
        value: Value,
        better: str = "",
        digits: int = 1,
        derived: bool = False,
    ) -> None:
        """
        File C{value}.  Reported again (the workloads run more than once),
        the row shows the median of the figures, or every distinct check
        ("0/0/0; 3/0/0"); a C{derived} figure, made from other rows' shown
        values, replaces the one before.
        """
        key = (workload, metric)
        row = self._index.get(key)
        if row is None:
            row = self._index[key] = Row(workload, metric, better, {}, digits)
            self.rows.append(row)
        samples = self._samples.setdefault(key, {}).setdefault(server, [])
        if derived:
            samples.clear()
        samples.append(value)
        row.values[server] = summary(samples, row.digits)

    def not_applicable(self, workload: str, metrics: Sequence[tuple], server: str, why: str = NA) -> None:
        for metric, better in metrics:
            self.add(workload, metric, server, why, better)

    def fail(self, server: str, what: str) -> None:
        """A check that did not hold (or a run that broke) for C{server}."""
        self.failures.append(what)
        self.failed_servers.add(server)


def _figure(value: Value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary(samples: Sequence[Value], digits: int = 1) -> Value:
    """
    The median of figures; of anything else, its distinct values in the
    order first seen, the figures among them (a run that measured beside
    one that failed) as their median, written as the row writes figures.
    """
    if all(_figure(v) for v in samples):
        return statistics.median(samples)  # type: ignore[type-var]
    figures = [v for v in samples if _figure(v)]
    shown = [fmt(statistics.median(figures), digits)] if figures else []  # type: ignore[type-var]
    shown += dict.fromkeys(str(v) for v in samples if not _figure(v))
    return shown[0] if len(shown) == 1 else "; ".join(shown)


def fmt(value: Value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "–"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def ratio(ours: Value, theirs: Value) -> str:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and not isinstance(ours, bool):
        if theirs == 0:
            return "–"
        return f"{ours / theirs:.2f}"
    return ""


def table(results: Results) -> str:
    """The Markdown table: one line per (workload, metric)."""
    peers = [s for s in results.servers if s != "wsgw"]
    header = ["Workload", "Metric", *results.servers, *[f"wsgw/{p}" for p in peers]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in results.rows:
        metric = f"{row.metric} {row.better}".strip()
        cells = [row.workload, metric]
        cells += [fmt(row.values.get(s), row.digits) for s in results.servers]
        cells += [ratio(row.values.get("wsgw"), row.values.get(p)) if row.better else "" for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _first_line(argv: List[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def machine() -> str:
    """What the figures were measured on."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    debian = "?"
    try:
        debian = Path("/etc/debian_version").read_text().strip()
    except OSError:
        pass
    import os

    return (
        f"{os.cpu_count()} cores ({cpu}), {memory} RAM, Linux {platform.release()}, Debian {debian}, "
        f"Python {platform.python_version()}, Node {_first_line(['node', '--version'])}"
    )


def document(results: Results, title: str, preamble: Sequence[str]) -> str:
    """The whole Markdown file: what ran where, the table, the notes."""
    parts = [f"# {title}", ""]
    parts += [f"- {line}" for line in preamble]
    parts += ["", table(results), ""]
    if results.notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in results.notes] + [""]
    if results.failures:
        parts += ["Checks that failed (errors, lost or reordered messages, dropped connections):", ""]
        parts += [f"- {f}" for f in results.failures] + [""]
    return "\n".join(parts)
