"""Lineage from the bytes: which images an edit output says it was made from.

The emulator records the sha256 of every edit input it fetched in the output PNG's ``tEXt`` chunk
``eggapi:sources`` (comma-separated hex digests). Reading it here needs no Pillow and no record of
ours: a test compares it with ``sha256`` of the previous round's *stored* bytes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib

SOURCES_CHUNK = "eggapi:sources"
_PNG = b"\x89PNG\r\n\x1a\n"


def png_text(data: bytes) -> dict[str, str]:
    """Every ``tEXt`` / ``zTXt`` keyword → text of a PNG (the first of each keyword)."""
    if not data.startswith(_PNG):
        raise ValueError("not a PNG")
    out: dict[str, str] = {}
    pos = len(_PNG)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            key, _, value = body.partition(b"\x00")
            out.setdefault(key.decode("latin-1"), value.decode("latin-1"))
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\x00")
            out.setdefault(key.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1"))
        elif kind == b"IEND":
            break
    return out


def sources_of(data: bytes) -> list[str]:
    """The input digests an edit output records ([] when the chunk is absent or empty)."""
    value = png_text(data).get(SOURCES_CHUNK, "")
    return [s for s in value.split(",") if s]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lineage_problems(rounds: dict[int, dict[int, bytes]]) -> list[str]:
    """For ``{item: {round: stored bytes}}``: every round k>0 whose ``eggapi:sources`` does not
    name sha256(round k-1's bytes). Empty when the whole chain is proven."""
    problems = []
    for item, by_round in sorted(rounds.items()):
        for rnd in sorted(by_round):
            if rnd == 0:
                continue
            recorded = sources_of(by_round[rnd])
            expected = sha256(by_round[rnd - 1])
            if expected not in recorded:
                problems.append(
                    f"item {item} round {rnd}: {SOURCES_CHUNK}={recorded} lacks sha256 of round "
                    f"{rnd - 1} ({expected})"
                )
    return problems


def has_sources_chunk(data: bytes) -> bool:
    return bool(sources_of(data))
