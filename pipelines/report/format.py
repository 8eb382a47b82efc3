"""Formatting shared by the terminal and HTML reports: dollars in plain notation, stages in pipeline order."""

from __future__ import annotations

import math
from typing import Any, Optional

from labelnext.pipelines.cost import STAGES

_MAX_DECIMALS = 10


def finite(value: Any) -> Optional[float]:
    """``value`` as a float when it is a finite number, else None (missing, NaN, inf, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def usd(value: Any) -> str:
    """Dollars in plain notation: ``$1,234.50``, ``$0.0123``, ``$0.0000468``; never ``4.682e-05``.

    Amounts under a dollar keep three significant digits (bills of small runs are fractions of a cent);
    anything under ``$0.0000000001`` reads as ``$0.00``.
    """
    v = finite(value)
    if v is None:
        return "n/a"
    sign, v = ("-" if v < 0 else ""), abs(v)
    if v >= 1 or v == 0:
        return f"{sign}${v:,.2f}"
    decimals = max(2, 2 - math.floor(math.log10(v)))
    if decimals > _MAX_DECIMALS:
        return f"{sign}$0.00"
    return f"{sign}${v:.{decimals}f}"


def stages_in_order(stages: dict[str, Any]) -> list[tuple[str, Any]]:
    """A report's stages in pipeline order (``cost_report.json`` stores keys sorted), unknown names last."""
    rank = {name: i for i, name in enumerate(STAGES)}
    return sorted(stages.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0]))
