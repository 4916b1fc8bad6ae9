"""Batch input manifests: JSONL or CSV, a local path or an ``s3://`` URI, one request per line.

Every line becomes either a validated :class:`BatchItem` or a :class:`BrokenLine` with its line
number and reason: a broken line is reported and skipped, never silently dropped, and it never
stops the valid lines from running. Lines are read as a stream, so a manifest of any length is
parsed in bounded memory. No Prefect imports.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from prefect_eggapi.errors import InvalidRequestError
from prefect_eggapi.models import GenerateRequest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ITEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
REQUEST_FIELDS = set(GenerateRequest.model_fields) - {"webhook_url"}
MAX_LINE_CHARS = 64 * 1024


class BatchItem(BaseModel):
    id: str
    line: int
    request: GenerateRequest


class BrokenLine(BaseModel):
    line: int
    reason: str
    text: str = ""


def _lines(source: str, s3: S3Client | None) -> Iterator[str]:
    if source.startswith("s3://"):
        if s3 is None:
            raise InvalidRequestError([("manifest", "an s3:// manifest needs an S3 client")])
        bucket, _, key = source[len("s3://") :].partition("/")
        if not bucket or not key:
            raise InvalidRequestError([("manifest", "must look like s3://bucket/key")])
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        yield from io.TextIOWrapper(body, encoding="utf-8-sig", newline="")  # type: ignore[type-var]
        return
    path = Path(source)
    if not path.is_file():
        raise InvalidRequestError([("manifest", f"no such file: {source}")])
    with path.open(encoding="utf-8-sig", newline="") as fh:
        yield from fh


def _format(source: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in ("jsonl", "csv"):
            raise InvalidRequestError([("manifest_format", "must be 'jsonl' or 'csv'")])
        return fmt
    name = source.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise InvalidRequestError(
        [("manifest_format", "cannot tell from the name; pass 'jsonl' or 'csv'")]
    )


def _rows(lines: Iterable[str], fmt: str) -> Iterator[tuple[int, dict[str, Any] | str, str]]:
    """(line number, fields or an error, raw text) for every non-blank line."""
    if fmt == "jsonl":
        for number, text in enumerate(lines, start=1):
            raw = text.strip()
            if not raw:
                continue
            if len(raw) > MAX_LINE_CHARS:
                yield number, f"line longer than {MAX_LINE_CHARS} characters", raw[:200]
                continue
            try:
                value = json.loads(raw)
            except ValueError as exc:
                yield number, f"not valid JSON: {exc}", raw[:200]
                continue
            if not isinstance(value, dict):
                yield number, "must be a JSON object", raw[:200]
                continue
            yield number, value, raw[:200]
        return
    reader = csv.DictReader(lines)
    for row in reader:
        number = reader.line_num
        if None in row:
            yield number, "more cells than header columns", ",".join(map(str, row.values()))[:200]
            continue
        fields: dict[str, Any] = {k.strip(): v for k, v in row.items() if k and v not in ("", None)}
        if not fields:
            continue
        if "image_urls" in fields:
            fields["image_urls"] = [u for u in re.split(r"[\s|]+", fields["image_urls"]) if u]
        if "num_outputs" in fields:
            num = str(fields["num_outputs"]).strip()
            fields["num_outputs"] = int(num) if num.isdigit() else num
        yield number, fields, ",".join(str(v) for v in row.values())[:200]


def read_manifest(
    source: str,
    *,
    defaults: Mapping[str, Any] | None = None,
    fmt: str | None = None,
    s3: S3Client | None = None,
) -> tuple[list[BatchItem], list[BrokenLine]]:
    """Parse and validate every line; per-line fields override ``defaults``."""
    kind = _format(source, fmt)
    items: list[BatchItem] = []
    broken: list[BrokenLine] = []
    seen: dict[str, int] = {}
    for number, fields, text in _rows(_lines(source, s3), kind):
        if isinstance(fields, str):
            broken.append(BrokenLine(line=number, reason=fields, text=text))
            continue
        item_id = str(fields.pop("id", "") or f"line-{number}")
        unknown = sorted(set(fields) - REQUEST_FIELDS)
        if unknown:
            broken.append(BrokenLine(line=number, reason=f"unknown field(s): {unknown}", text=text))
            continue
        if not ITEM_ID.match(item_id):
            broken.append(
                BrokenLine(
                    line=number, reason=f"id {item_id!r}: use letters, digits, . _ -", text=text
                )
            )
            continue
        if item_id in seen:
            broken.append(
                BrokenLine(
                    line=number,
                    reason=f"duplicate id {item_id!r} (first on line {seen[item_id]})",
                    text=text,
                )
            )
            continue
        try:
            request = GenerateRequest(**{**(defaults or {}), **fields})
        except InvalidRequestError as exc:
            reason = "; ".join(f"{f}: {rule}" for f, rule in exc.problems)
            broken.append(BrokenLine(line=number, reason=reason, text=text))
            continue
        seen[item_id] = number
        items.append(BatchItem(id=item_id, line=number, request=request))
    return items, broken
