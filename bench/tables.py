"""Plain-text and markdown tables, and the small number helpers every bench table uses."""

from __future__ import annotations

from collections.abc import Sequence


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def median(values: Sequence[float | int | None]) -> float | None:
    have = sorted(v for v in values if v is not None)
    if not have:
        return None
    mid = len(have) // 2
    return float(have[mid]) if len(have) % 2 else (have[mid - 1] + have[mid]) / 2


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    """First column left-aligned (names), the rest right-aligned (numbers)."""
    pairs = enumerate(zip(cells, widths, strict=True))
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    if markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"
        lines = ["| " + " | ".join(headers) + " |", rule]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = _row(headers, widths)
    return "\n".join([line, "-" * len(line), *(_row(r, widths) for r in rows)])
