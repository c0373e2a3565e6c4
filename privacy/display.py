"""How a privacy figure is shown to people (console, reports, logs); the files keep the
exact floats."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal


def epsilon_text(epsilon: float, decimals: int = 3) -> str:
    """ε at `decimals` places, never below the one accounted: the nearest such figure,
    raised by one unit when it reads below ε (to the nearest, 2.9984 would show as 2.998;
    here 2.999). "Below" compares floats, as the console's fmt.eps does: 0.45, whose float
    is a hair above 0.45, shows as 0.450 (the figure reads back as that float), while
    0.1 + 0.2 (0.30000000000000004) shows as 0.301."""
    if not math.isfinite(epsilon):
        return str(epsilon)
    unit = Decimal(1).scaleb(-decimals)
    near = Decimal(epsilon).quantize(unit, rounding=ROUND_HALF_EVEN)
    if float(near) < epsilon:
        near += unit
    return str(near)
