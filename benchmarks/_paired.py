"""Paired timing of interleaved runs, shared by the benchmark scripts.

On a shared machine the speed of the CPU drifts within a round of many runs (other jobs, the
host of a virtual machine), and one configuration's step time varies by ±10 % from run to run.
A ratio of two pooled statistics inherits all of it. A *paired* ratio divides each run by the
reference runs just before and after it, so a slow drift cancels; the median over rounds of
those ratios resists the odd disturbed run, and the spread of the per-round ratios says how far
to trust it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

ReferenceOf = Callable[[str], "str | None"]


def schedule(names: Sequence[str], reference_of: ReferenceOf, every: int) -> list[str]:
    """One round's run order: each reference is run first, again after every ``every``
    configurations that refer to it, and last. ``reference_of(name)`` names the reference of a
    configuration (``None`` or the name itself for a reference)."""
    order: list[str] = []
    refs = [n for n in names if reference_of(n) in (None, n)]
    for ref in refs:
        group = [n for n in names if n not in refs and reference_of(n) == ref]
        for i in range(0, max(len(group), 1), every):
            order += [ref, *group[i : i + every]]
        order.append(ref)
    leftover = [n for n in names if n not in order]
    if leftover:
        raise ValueError(f"configurations {leftover} refer to a reference that is not run")
    return order


def adjacent_reference(
    order: Sequence[str], values: Sequence[float], i: int, reference_of: ReferenceOf
) -> float:
    """The mean value of the reference runs just before and after run ``i`` (its own value for
    a reference run)."""
    ref = reference_of(order[i])
    if ref in (None, order[i]):
        return values[i]
    before = next((values[j] for j in range(i - 1, -1, -1) if order[j] == ref), None)
    after = next((values[j] for j in range(i + 1, len(order)) if order[j] == ref), None)
    found = [v for v in (before, after) if v is not None]
    return sum(found) / len(found)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` (linear interpolation between order statistics)."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def spread(values: Sequence[float]) -> str:
    """``median [q25, q75]`` of per-round ratios, as printed in the tables."""
    if len(values) < 3:
        return f"{statistics.median(values):.3f}"
    return (
        f"{statistics.median(values):.3f} [{quantile(values, 0.25):.3f}, "
        f"{quantile(values, 0.75):.3f}]"
    )
