"""Spend caps as the tasks accept them: a plain amount for this run, or a :class:`Budget`."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from prefect_eggapi.client.errors import InvalidRequestError

__all__ = ["Budget", "BudgetLike", "budget_cap"]


class Budget(BaseModel):
    """A spend cap in dollars over a named scope (default: this run's scope).

    A plain number as ``budget=`` caps the current run scope; a ``Budget`` with a ``scope`` caps
    work that spans runs, e.g. a batch that is resumed by later flow runs.
    """

    model_config = ConfigDict(frozen=True)

    cap: Decimal = Field(ge=0)
    scope: str | None = None


BudgetLike = Decimal | float | str | Budget | None


def budget_cap(value: BudgetLike) -> tuple[Decimal | None, str | None]:
    """``(cap, scope)`` of a ``budget=`` argument; a bad amount names the field."""
    if value is None:
        return None, None
    if isinstance(value, Budget):
        return value.cap, value.scope
    try:
        amount = Decimal(str(value))
    except ArithmeticError:
        amount = Decimal(-1)
    if not amount.is_finite() or amount < 0:
        raise InvalidRequestError([("budget", "must be a non-negative amount in dollars")])
    return amount, None
