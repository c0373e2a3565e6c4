"""How a privacy figure is shown to people (console, reports, logs); the files keep the
exact floats."""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, Decimal


def epsilon_text(epsilon: float, decimals: int = 3) -> str:
    """ε rounded *up* at `decimals` places, so that a shown ε is never below the one
    accounted (to the nearest, 2.9984 would show as 2.998). Decimal(float) is the float's
    exact value: 0.5 shows as 0.500."""
    if not math.isfinite(epsilon):
        return str(epsilon)
    return str(Decimal(epsilon).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_CEILING))
