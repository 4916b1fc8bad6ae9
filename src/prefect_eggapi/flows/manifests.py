"""Batch input manifests: JSONL or CSV, a local path or an ``s3://`` URI, one request per line.

Every line becomes either a validated :class:`BatchItem` or a :class:`BrokenLine` with its line
number and reason: a broken line is reported and skipped, never silently dropped, and it never
stops the valid lines from running. That includes a line that is not valid UTF-8 (reported with
the byte and its column) and a line longer than :data:`MAX_LINE_BYTES` (reported without reading
it whole). The manifest is read as a stream of bounded chunks, local file and S3 body alike, so a
manifest of any length, with lines of any length, is parsed in bounded memory. A UTF-8 BOM at
the start is ignored. No Prefect imports.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.client.types import GenerateRequest
from prefect_eggapi.storage import stream_object

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ITEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
REQUEST_FIELDS = set(GenerateRequest.model_fields) - {"webhook_url"}
# The longest manifest line (and CSV record) read, in bytes, terminator excluded. A valid line is
# far shorter: a prompt is at most 2000 characters (<= 24 KB even fully JSON-escaped) and
# image_urls at most 9 URLs of <= 2048 characters. A longer line is reported as broken after
# reading at most this much of it; the rest is skipped up to the next newline, never held.
MAX_LINE_BYTES = 64 * 1024
MAX_LINE_CHARS = MAX_LINE_BYTES  # the former name
# Manifests are read in chunks of this many bytes, so memory stays near
# MAX_LINE_BYTES + CHUNK_BYTES however long a line is.
CHUNK_BYTES = 64 * 1024
PREVIEW_CHARS = 200  # BrokenLine.text: a short preview, never the whole line
_BOM = b"\xef\xbb\xbf"


class BatchItem(BaseModel):
    id: str
    line: int
    request: GenerateRequest


class BrokenLine(BaseModel):
    line: int
    reason: str
    text: str = ""


@dataclass(frozen=True)
class _Line:
    """One physical line: ``data`` (no terminator), or None when it was longer than the cap."""

    number: int
    data: bytes | None
    end: bytes  # b"\n", b"\r\n", b"\r" or b"" (last line without one)
    head: bytes = b""  # an oversized line's first bytes, for the preview
    quotes: int = 0  # how many '"' an oversized line held (CSV keeps its quoting in step)

    def preview(self) -> str:
        raw = self.head if self.data is None else self.data[: PREVIEW_CHARS * 4]
        return raw.decode("utf-8", errors="replace").strip()[:PREVIEW_CHARS]


def _split_lines(chunks: Iterable[bytes], cap: int) -> Iterator[_Line]:
    """Split a byte stream on ``\\n``, ``\\r\\n`` or ``\\r`` (as universal newlines do).

    Holds at most ``cap`` + one chunk: past the cap a line is only scanned for its end.
    """
    number = 0
    buf = bytearray()  # the start of a line that runs on into the next chunk
    over = False  # inside a line already past the cap
    head = b""
    quotes = 0
    cr = False  # the previous chunk ended in \r: a \n starting this one belongs to it

    def add(piece: bytes) -> None:
        nonlocal over, head, quotes
        if over:
            quotes += piece.count(b'"')
            return
        buf.extend(piece)
        if len(buf) > cap:
            over, head, quotes = True, bytes(buf[: PREVIEW_CHARS * 4]), buf.count(b'"')
            buf.clear()

    def finish(piece: bytes, end: bytes) -> _Line:
        nonlocal number, over, head, quotes
        number += 1
        if buf or over or len(piece) > cap:
            add(piece)
            data = None if over else bytes(buf)
            buf.clear()
        else:  # the common case: the whole line in one chunk
            data = piece
        if number == 1:  # a UTF-8 byte order mark is not part of the first line
            data = None if data is None else data.removeprefix(_BOM)
            head = head.removeprefix(_BOM)
        line = _Line(number, data, end, head=head, quotes=quotes)
        over, head, quotes = False, b"", 0
        return line

    for chunk in chunks:
        if cr:
            cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                yield finish(b"", b"\r\n")
            else:
                yield finish(b"", b"\r")
        pieces = chunk.splitlines(keepends=True)
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if piece[-1:] == b"\n":
                end = b"\r\n" if piece[-2:] == b"\r\n" else b"\n"
            elif piece[-1:] != b"\r":
                add(piece)  # runs on into the next chunk
                continue
            elif i == last:
                add(piece[:-1])
                cr = True  # \r or \r\n: the next chunk tells
                continue
            else:
                end = b"\r"
            yield finish(piece[: -len(end)], end)
    if cr:
        yield finish(b"", b"\r")
    elif buf or over:
        yield finish(b"", b"")


def _read_chunks(read: Callable[[int], bytes]) -> Iterator[bytes]:
    while chunk := read(CHUNK_BYTES):
        yield chunk


def _lines(source: str, s3: S3Client | None) -> Iterator[_Line]:
    if source.startswith("s3://"):
        if s3 is None:
            raise InvalidRequestError([("manifest", "an s3:// manifest needs an S3 client")])
        bucket, _, key = source[len("s3://") :].partition("/")
        if not bucket or not key:
            raise InvalidRequestError([("manifest", "must look like s3://bucket/key")])
        yield from _split_lines(stream_object(s3, bucket, key, CHUNK_BYTES), MAX_LINE_BYTES)
        return
    path = Path(source)
    if not path.is_file():
        raise InvalidRequestError([("manifest", f"no such file: {source}")])
    with path.open("rb") as fh:
        yield from _split_lines(_read_chunks(fh.read), MAX_LINE_BYTES)


def _decode(line: _Line) -> tuple[str | None, str]:
    """(text, "") or (None, why it cannot be read)."""
    if line.data is None:
        return None, f"line longer than {MAX_LINE_BYTES} bytes"
    try:
        return line.data.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        column = len(line.data[: exc.start].decode("utf-8")) + 1
        return None, f"not valid UTF-8 (byte 0x{line.data[exc.start]:02x} at column {column})"


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


Row = tuple[int, dict[str, Any] | str, str]


def _jsonl_rows(lines: Iterable[_Line]) -> Iterator[Row]:
    for line in lines:
        number = line.number
        text, problem = _decode(line)
        if text is None:
            yield number, problem, line.preview()
            continue
        raw = text.strip()
        if not raw:
            continue
        try:
            value = json.loads(raw)
        except ValueError as exc:
            yield number, f"not valid JSON: {exc}", raw[:PREVIEW_CHARS]
            continue
        if not isinstance(value, dict):
            yield number, "must be a JSON object", raw[:PREVIEW_CHARS]
            continue
        yield number, value, raw[:PREVIEW_CHARS]


class _CsvFeed:
    """Decoded lines for :func:`csv.reader`, keeping every record within ``MAX_LINE_BYTES``.

    An undecodable line is fed with replacement characters. An oversized line, and every line
    of a record after it passes the cap, is fed as nothing but a lone quote when it held an odd
    number of them: the reader's quoting stays in step (so the records after it parse as they
    would have) and nothing of it is held. The problems met since :meth:`next_record` are kept
    in ``problems`` as (line, reason, preview); a reason of None means "the record is too long".
    """

    def __init__(self, lines: Iterator[_Line]) -> None:
        self._lines = lines
        self.problems: list[tuple[int, str | None, str]] = []
        self.first = 0  # the first line of the record being read
        self._size = 0
        self._over = False

    def __iter__(self) -> _CsvFeed:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        data = line.data
        self.first = self.first or line.number
        if not self._over:
            if data is None:
                self.problems.append((line.number, _decode(line)[1], line.preview()))
                self._over = True
            elif self._size + len(data) > MAX_LINE_BYTES:
                self.problems.append((self.first, None, line.preview()))
                self._over = True
        if self._over or data is None:
            quotes = line.quotes if data is None else data.count(b'"')
            return '"' * (quotes % 2)
        self._size += len(data) + len(line.end)
        text, problem = _decode(line)
        if text is None:
            self.problems.append((line.number, problem, line.preview()))
            text = data.decode("utf-8", errors="replace")
        return text + line.end.decode("ascii")

    def next_record(self) -> None:
        self.problems = []
        self.first = 0
        self._size = 0
        self._over = False


def _csv_rows(lines: Iterator[_Line]) -> Iterator[Row]:
    feed = _CsvFeed(lines)
    reader = csv.reader(feed)
    header: list[str] | None = None
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # the reader starts afresh on the next line
            number = feed.first or reader.line_num
            feed.next_record()
            if header is None:
                problem = f"CSV header, line {number}: {exc}"
                raise InvalidRequestError([("manifest", problem)]) from None
            yield number, f"not valid CSV: {exc}", ""
            continue
        number, problems = reader.line_num, feed.problems
        first = feed.first
        feed.next_record()
        if problems:
            line, reason, preview = problems[0]
            if reason is None:
                reason = f"record longer than {MAX_LINE_BYTES} bytes (lines {first}-{number})"
            if header is None:
                raise InvalidRequestError([("manifest", f"CSV header, line {line}: {reason}")])
            yield line, reason, preview
            continue
        if not cells:
            continue
        if header is None:
            header = cells
            continue
        text = ",".join(cells)[:PREVIEW_CHARS]
        if len(cells) > len(header):
            yield number, "more cells than header columns", text
            continue
        fields: dict[str, Any] = {
            k.strip(): v for k, v in zip(header, cells, strict=False) if k and v != ""
        }
        if not fields:
            continue
        if "image_urls" in fields:
            fields["image_urls"] = [u for u in re.split(r"[\s|]+", fields["image_urls"]) if u]
        if "num_outputs" in fields:
            num = str(fields["num_outputs"]).strip()
            fields["num_outputs"] = int(num) if num.isdigit() else num
        yield number, fields, text


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
    lines = _lines(source, s3)
    rows = _jsonl_rows(lines) if kind == "jsonl" else _csv_rows(lines)
    for number, fields, text in rows:
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
