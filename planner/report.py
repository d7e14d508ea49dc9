"""Rendering: the only place bytes become "x.xx GiB". Plain text via tabulate, and JSON documents."""

from __future__ import annotations

from planner.units import GiB


def gib_str(n_bytes: int, digits: int = 2) -> str:
    """12345678901 -> '11.50' (GiB, 2**30). Callers label the unit."""
    return f"{n_bytes / GiB:.{digits}f}"
