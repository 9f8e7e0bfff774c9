"""Ratios to ceilings as reported, and what a figure above one means: each ratio is printed with
the figure it was divided by, and one above 1 is flagged as disturbed instead of reported."""
from __future__ import annotations

CEILING = "the fp32 matmul ceiling"
DISTURBED = "disturbed by other load, not reported"


def median(xs: list[float]) -> float:
    """The middle of an odd count, the upper middle of an even one: always a value measured."""
    return sorted(xs)[len(xs) // 2]


def bounded(ratio: float | None) -> float | None:
    """A ratio to a ceiling as reported: None above 1. Nothing runs faster than its ceiling (the
    matmul rate, or the bare ORT step at the same batch); a figure above it means one side of the
    ratio was measured while something else took the machine's cores."""
    return None if ratio is None or ratio > 1.0 else ratio


def share(value: float, ceiling: float, what: str) -> str:
    """`value` as a share of `ceiling`, printed with the figure it was divided by, e.g. "74% of
    2,494 tok/s, raw ORT at B=1 measured beside it"; above 100% flagged instead of reported."""
    if bounded(value / ceiling) is None:
        return f"over 100% of {ceiling:,.0f} tok/s, {what}: {DISTURBED}"
    return f"{value / ceiling:.0%} of {ceiling:,.0f} tok/s, {what}"


def median_pair(pairs: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The (value, ceiling) pair whose ratio is the median (median's choice), or None."""
    return sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2] if pairs else None


def pair_runs(pairs: list[tuple[float, float]]) -> str:
    """Every run's pair, e.g. "1,846/2,494 tok/s 74%, 2,010/1,900 tok/s over 100%"."""
    return ", ".join(f"{v:,.0f}/{r:,.0f} tok/s " + (f"{v / r:.0%}" if bounded(v / r) is not None else "over 100%")
                     for v, r in pairs)
