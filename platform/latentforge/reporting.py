"""End-of-stage summaries printed by every job (counts, rates, where the output is)."""

from __future__ import annotations

from typing import Any, Iterable


def progress_bar(total: int, desc: str, unit: str = "img", enabled: bool = True) -> Any:
    """A stage's tqdm bar on stderr (off when disabled or when there is nothing to do). Redrawn at most
    once a second on a terminal, every 10 s in a log (`ray job logs`, CI), which keeps every line."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled or total == 0, file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 10.0, dynamic_ncols=True, smoothing=0.1)


def format_rate(count: float, seconds: float, unit: str) -> str:
    return f"{count / seconds:,.1f} {unit}/s" if seconds > 0 else f"- {unit}/s"


def summary_table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column plain-text table; numbers get thousands separators."""
    cells = [(str(k), f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)) for k, v in rows]
    width = max((len(k) for k, _ in cells), default=0)
    line = "-" * max(len(title), width + 2 + max((len(v) for _, v in cells), default=0))
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in cells)
    return f"{title}\n{line}\n{body}\n{line}"
