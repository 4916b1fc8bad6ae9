"""Prices, cost strings and estimates, all in ``Decimal``.

The API writes money three ways (``"$0.0100"``, ``"$0.00"``, webhook ``"0.016000"``); floats would
drift when summing thousands of them, so everything here is exact.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect_eggapi.client.types import GenerateRequest

# Price per returned image (eggapi-api.md §13; §17.2: nanobanana-pro defaults to 1k).
PRICES: dict[str, dict[str, Decimal]] = {
    "nanobanana": {"1k": Decimal("0.01"), "2k": Decimal("0.01"), "4k": Decimal("0.01")},
    "nanobanana-pro": {"1k": Decimal("0.016"), "2k": Decimal("0.016"), "4k": Decimal("0.032")},
}
DEFAULT_RESOLUTION = "1k"

_COST = re.compile(r"^\s*(-?)\$?\s*(\d+(?:\.\d+)?|\.\d+)\s*$")


def parse_cost(value: str | int | float | Decimal | None) -> Decimal:
    """``"$0.0100"`` / ``"$0.00"`` / ``"0.016000"`` / None -> Decimal; garbage raises ValueError."""
    if value is None or value == "":
        return Decimal("0")
    if isinstance(value, bool):
        raise ValueError(f"unrecognised cost: {value!r}")
    if isinstance(value, int | float | Decimal):
        amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
        if not amount.is_finite():
            raise ValueError(f"cost must be a finite amount, got {value!r}")
        return amount
    match = _COST.match(value)
    if not match:
        raise ValueError(f"unrecognised cost string: {value!r}")
    try:
        amount = Decimal(match.group(2))
    except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
        raise ValueError(f"unrecognised cost string: {value!r}") from exc
    return -amount if match.group(1) else amount


def format_cost(amount: Decimal) -> str:
    """The API's task-object style, ``$0.0100``."""
    return f"${amount.quantize(Decimal('0.0001'))}"


def unit_price(model: str, resolution: str | None = None) -> Decimal:
    try:
        table = PRICES[model]
    except KeyError:
        raise ValueError(f"no price known for model {model!r}; known: {sorted(PRICES)}") from None
    try:
        return table[resolution or DEFAULT_RESOLUTION]
    except KeyError:
        raise ValueError(
            f"no price known for resolution {resolution!r}; known: {sorted(table)}"
        ) from None


def estimate_cost(request: GenerateRequest) -> Decimal:
    """The most this request can cost: billing counts returned images, at most ``num_outputs``."""
    return unit_price(request.model, request.resolution) * request.num_outputs
