"""Cost strings and price estimates: exact Decimal arithmetic (eggapi-api.md §8.6, §11, §13)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from prefect_eggapi.client.pricing import (
    PRICES,
    estimate_cost,
    format_cost,
    parse_cost,
    unit_price,
)
from prefect_eggapi.client.types import GenerateRequest


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$0.0100", Decimal("0.0100")),  # completed task (G3)
        ("$0.00", Decimal("0")),  # pending / failed task (G2, G3)
        ("$0.0000", Decimal("0")),  # pending task (G1)
        ("0.016000", Decimal("0.016")),  # webhook payload: no "$", 6 places
        ("$0.4000", Decimal("0.4")),  # G1 veo
        ("$0.032", Decimal("0.032")),
        (" $0.0100 ", Decimal("0.01")),
        ("$.5", Decimal("0.5")),
        ("12", Decimal("12")),
        ("-$0.0100", Decimal("-0.01")),  # a refund, should one ever appear
        (None, Decimal("0")),
        ("", Decimal("0")),
        (Decimal("0.016"), Decimal("0.016")),
        (3, Decimal("3")),
        (0.016, Decimal("0.016")),
    ],
)
def test_parse_cost_accepts_every_documented_form(raw: object, expected: Decimal) -> None:
    value = parse_cost(raw)  # type: ignore[arg-type]
    assert isinstance(value, Decimal)
    assert value == expected


def test_parse_cost_keeps_exact_decimals_when_summing() -> None:
    total = sum((parse_cost("$0.0100") for _ in range(1000)), Decimal("0"))
    assert total == Decimal("10")
    # The float route would not be exact.
    assert sum(0.01 for _ in range(1000)) != 10


@pytest.mark.parametrize(
    "raw",
    [
        "abc",
        "$",
        "$$0.01",
        "0.01$",
        "$1,000.00",
        "1e-3",
        "$0.01 USD",
        "€0.01",
        "0.",
        "$-0.01",
        "--1",
    ],
)
def test_parse_cost_rejects_garbage_with_value_error(raw: str) -> None:
    with pytest.raises(ValueError, match="unrecognised cost string"):
        parse_cost(raw)


def test_parse_cost_rejects_bool_with_value_error() -> None:
    with pytest.raises(ValueError):
        parse_cost(True)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [float("nan"), float("inf")])
def test_parse_cost_rejects_non_finite_floats(raw: float) -> None:
    with pytest.raises(ValueError):
        parse_cost(raw)


def test_format_cost_uses_the_task_object_style() -> None:
    assert format_cost(Decimal("0.01")) == "$0.0100"
    assert format_cost(Decimal("0.128")) == "$0.1280"
    assert parse_cost(format_cost(Decimal("0.032"))) == Decimal("0.032")


@pytest.mark.parametrize(
    ("model", "resolution", "price"),
    [
        ("nanobanana", None, "0.01"),
        ("nanobanana", "1k", "0.01"),
        ("nanobanana", "2k", "0.01"),
        ("nanobanana", "4k", "0.01"),
        ("nanobanana-pro", None, "0.016"),  # §17.2: default resolution 1k
        ("nanobanana-pro", "1k", "0.016"),
        ("nanobanana-pro", "2k", "0.016"),
        ("nanobanana-pro", "4k", "0.032"),  # "4K costs double"
    ],
)
def test_unit_price_table(model: str, resolution: str | None, price: str) -> None:
    assert unit_price(model, resolution) == Decimal(price)


def test_unit_price_unknown_model_raises_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"veo3\.1"):
        unit_price("veo3.1")


def test_unit_price_unknown_resolution_raises_value_error() -> None:
    with pytest.raises(ValueError, match="8k"):
        unit_price("nanobanana", "8k")


def test_estimate_pro_4k_times_four_is_0_128() -> None:
    req = GenerateRequest(model="nanobanana-pro", prompt="p", resolution="4k", num_outputs=4)
    assert estimate_cost(req) == Decimal("0.128")


@pytest.mark.parametrize("resolution", [None, "1k", "2k", "4k"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_estimate_nanobanana_is_one_cent_per_image_at_any_resolution(
    resolution: str | None, n: int
) -> None:
    req = GenerateRequest(model="nanobanana", prompt="p", resolution=resolution, num_outputs=n)
    assert estimate_cost(req) == Decimal("0.01") * n


def test_estimate_pro_default_resolution_uses_1k_price() -> None:
    req = GenerateRequest(model="nanobanana-pro", prompt="p", num_outputs=2)
    assert estimate_cost(req) == Decimal("0.032")


def test_price_table_is_decimal_everywhere() -> None:
    for table in PRICES.values():
        assert set(table) == {"1k", "2k", "4k"}
        assert all(isinstance(v, Decimal) for v in table.values())
