"""Batch manifests: every line is an item or a reported broken line; nothing is dropped."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from prefect_eggapi.client.errors import InvalidRequestError
from prefect_eggapi.flows import manifests as batch_input
from prefect_eggapi.flows.manifests import MAX_LINE_BYTES, read_manifest

DEFAULTS = {"model": "nanobanana", "aspect_ratio": "16:9"}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_jsonl_items_defaults_and_broken_lines(tmp_path):
    lines = [
        json.dumps({"id": "a", "prompt": "a fox"}),
        "",
        json.dumps({"prompt": "a pro owl", "model": "nanobanana-pro", "resolution": "4k"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "a", "prompt": "duplicate id"}),
        json.dumps({"prompt": "x" * 2001}),
        json.dumps({"prompt": "ok", "num_outputs": 9}),
        json.dumps({"prompt": "ok", "colour": "red"}),
        json.dumps({"id": "bad id!", "prompt": "ok"}),
        json.dumps({"prompt": "edit me", "image_urls": ["https://x.test/a.png"]}),
    ]
    items, broken = read_manifest(write(tmp_path, "m.jsonl", "\n".join(lines)), defaults=DEFAULTS)
    assert [(i.id, i.line) for i in items] == [("a", 1), ("line-3", 3), ("line-11", 11)]
    assert items[1].request.model == "nanobanana-pro" and items[1].request.resolution == "4k"
    assert items[0].request.model == "nanobanana"
    assert items[2].request.task_type == "image_edit"
    reasons = {b.line: b.reason for b in broken}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10]
    assert "not valid JSON" in reasons[4]
    assert "JSON object" in reasons[5]
    assert "duplicate id 'a'" in reasons[6]
    assert "prompt" in reasons[7]
    assert "num_outputs" in reasons[8]
    assert "colour" in reasons[9]
    assert "bad id!" in reasons[10]
    # Every non-blank line is accounted for exactly once.
    assert len(items) + len(broken) == sum(1 for line in lines if line.strip())


def test_csv_with_lists_and_counts(tmp_path):
    text = (
        "id,prompt,num_outputs,image_urls\n"
        "c1,a castle,2,\n"
        'c2,"an edit, with a comma",1,https://x.test/1.png|https://x.test/2.png\n'
        "c3,,1,\n"
        "c4,too many,1,,extra\n"
    )
    items, broken = read_manifest(write(tmp_path, "m.csv", text), defaults=DEFAULTS)
    assert [i.id for i in items] == ["c1", "c2"]
    assert items[0].request.num_outputs == 2
    assert items[1].request.image_urls == ("https://x.test/1.png", "https://x.test/2.png")
    assert [b.line for b in broken] == [4, 5]
    assert "prompt" in broken[0].reason and "more cells" in broken[1].reason


def test_manifest_errors_name_the_field(tmp_path):
    with pytest.raises(InvalidRequestError, match="manifest"):
        read_manifest(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InvalidRequestError, match="manifest_format"):
        read_manifest(write(tmp_path, "m.txt", "x"))
    with pytest.raises(InvalidRequestError, match="manifest_format"):
        read_manifest(write(tmp_path, "m.txt", "x"), fmt="xml")


@pytest.mark.integration
def test_s3_manifest(local_s3, s3_bucket):
    client = local_s3.client()
    body = "\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(250)).encode()
    client.put_object(Bucket=s3_bucket, Key="in/batch.jsonl", Body=body)
    items, broken = read_manifest(f"s3://{s3_bucket}/in/batch.jsonl", defaults=DEFAULTS, s3=client)
    assert len(items) == 250 and not broken
    assert items[-1].request.prompt == "p249"


# --------------------------------------------------------------------------- undecodable and
# oversized lines: each becomes a broken line with its number; the others still run, and reading
# stays streaming (bounded memory) however long a line is.

BIG = 30 * 1024 * 1024  # a 30 MB line, as seen in a real run
MEMORY_BOUND = 2 * 1024 * 1024  # peak traced allocations while reading it (measured: < 0.5 MiB)


def write_bytes(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def jline(**fields) -> bytes:
    return json.dumps(fields).encode()


def write_with_big_line(path, before: list[bytes], big_prefix: bytes, after: list[bytes]) -> str:
    """``before`` lines, one line of ``big_prefix`` + 30 MB of ``x``, ``after`` lines (streamed)."""
    with open(path, "wb") as fh:
        for line in before:
            fh.write(line + b"\n")
        fh.write(big_prefix)
        block = b"x" * (1024 * 1024)
        for _ in range(BIG // len(block)):
            fh.write(block)
        fh.write(b"\n")
        for line in after:
            fh.write(line + b"\n")
    return str(path)


def peak_while(fn):
    """(result, peak traced bytes) of ``fn()`` (warm up first, so lazy imports don't count)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_invalid_utf8_jsonl_line_is_broken_with_its_number_and_column(tmp_path):
    data = b"\n".join(
        [
            jline(id="a", prompt="one"),
            jline(id="b", prompt="two"),
            b'{"prompt": "caf\xc3\xa9 \xff and more"}',  # \xff is the 18th character
            jline(id="c", prompt="three"),
            b"\xc3",  # a truncated sequence, at the very end and without a newline
        ]
    )
    items, broken = read_manifest(write_bytes(tmp_path, "m.jsonl", data), defaults=DEFAULTS)
    assert [(i.id, i.line) for i in items] == [("a", 1), ("b", 2), ("c", 4)]
    assert [b.line for b in broken] == [3, 5]
    assert broken[0].reason == "not valid UTF-8 (byte 0xff at column 18)"
    assert "caf\u00e9" in broken[0].text and len(broken[0].text) <= 200
    assert broken[1].reason == "not valid UTF-8 (byte 0xc3 at column 1)"


def test_utf8_bom_does_not_break_line_one(tmp_path):
    bom = b"\xef\xbb\xbf"
    jsonl = bom + jline(id="first", prompt="p") + b"\n\xfe\n" + jline(prompt="q") + b"\n"
    items, broken = read_manifest(write_bytes(tmp_path, "m.jsonl", jsonl), defaults=DEFAULTS)
    assert [(i.id, i.line) for i in items] == [("first", 1), ("line-3", 3)]
    assert [(b.line, b.reason) for b in broken] == [(2, "not valid UTF-8 (byte 0xfe at column 1)")]
    csv_text = bom + b"id,prompt\nc1,a castle\n"
    items, broken = read_manifest(write_bytes(tmp_path, "m.csv", csv_text), defaults=DEFAULTS)
    assert [i.id for i in items] == ["c1"] and not broken


def test_invalid_utf8_csv_record_is_broken_and_multiline_fields_still_work(tmp_path):
    data = (
        b"id,prompt,num_outputs\n"
        b"c1,a castle,1\n"  # line 2
        b"c2,caf\xe9 latin-1,1\n"  # line 3: Latin-1, not UTF-8
        b'c3,"a prompt\r\nover two lines",1\n'  # lines 4-5 (reported at its last line, as before)
        b'c4,"a quoted \xff field\nover two lines",1\n'  # lines 6-7, bad byte on line 6
        b"c5,after the bad ones,2\n"  # line 8
    )
    items, broken = read_manifest(write_bytes(tmp_path, "m.csv", data), defaults=DEFAULTS)
    assert [(i.id, i.line) for i in items] == [("c1", 2), ("c3", 5), ("c5", 8)]
    assert items[1].request.prompt == "a prompt\r\nover two lines"
    assert items[2].request.num_outputs == 2
    assert [(b.line, b.reason) for b in broken] == [
        (3, "not valid UTF-8 (byte 0xe9 at column 7)"),
        (6, "not valid UTF-8 (byte 0xff at column 14)"),
    ]
    assert all(len(b.text) <= 200 for b in broken)


def test_bad_csv_header_is_refused_naming_the_manifest(tmp_path):
    with pytest.raises(InvalidRequestError, match=r"manifest.*line 1.*UTF-8"):
        read_manifest(write_bytes(tmp_path, "m.csv", b"id,pr\xffompt\nc1,a castle\n"))


def test_line_at_the_cap_is_read_and_one_byte_more_is_broken(tmp_path):
    def padded(n: int) -> bytes:
        line = jline(prompt="ok", id="x" * 10)
        return line + b" " * (n - len(line))

    data = padded(MAX_LINE_BYTES) + b"\n" + padded(MAX_LINE_BYTES + 1) + b"\n"
    items, broken = read_manifest(write_bytes(tmp_path, "m.jsonl", data), defaults=DEFAULTS)
    assert [i.line for i in items] == [1]
    assert [(b.line, b.reason) for b in broken] == [(2, f"line longer than {MAX_LINE_BYTES} bytes")]


def test_30mb_jsonl_line_is_broken_without_reading_it_whole(tmp_path):
    path = write_with_big_line(
        tmp_path / "big.jsonl",
        [jline(id="a", prompt="before")],
        b'{"id": "huge", "prompt": "',
        [jline(id="b", prompt="after")],
    )
    read_manifest(write(tmp_path, "warm.jsonl", '{"prompt": "warm"}\n'), defaults=DEFAULTS)
    (items, broken), peak = peak_while(lambda: read_manifest(path, defaults=DEFAULTS))
    assert [(i.id, i.line) for i in items] == [("a", 1), ("b", 3)]
    assert [(b.line, b.reason) for b in broken] == [(2, f"line longer than {MAX_LINE_BYTES} bytes")]
    assert broken[0].text.startswith('{"id": "huge"') and len(broken[0].text) <= 200
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB while reading a 30 MB line"


def test_30mb_csv_line_and_oversized_multiline_record_are_broken_in_bounded_memory(tmp_path):
    path = write_with_big_line(
        tmp_path / "big.csv",
        [b"id,prompt", b"c1,before"],  # lines 1-2
        b'c2,"a quoted, unbalanced " prompt',  # line 3: 30 MB; quotes stay balanced
        [b"c3,after", b'c4,"' + b"y\n" * 40_000 + b'",1', b"c5,last"],  # 4, 5-40005, 40006
    )
    read_manifest(write(tmp_path, "warm.csv", "id,prompt\nw,warm\n"), defaults=DEFAULTS)
    (items, broken), peak = peak_while(lambda: read_manifest(path, defaults=DEFAULTS))
    assert [(i.id, i.line) for i in items] == [("c1", 2), ("c3", 4), ("c5", 40006)]
    assert [(b.line, b.reason) for b in broken] == [
        (3, f"line longer than {MAX_LINE_BYTES} bytes"),
        (5, f"record longer than {MAX_LINE_BYTES} bytes (lines 5-40005)"),
    ]
    assert all(len(b.text) <= 200 for b in broken)
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB while reading a 30 MB line"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_results_do_not_depend_on_where_chunks_split(tmp_path, monkeypatch, chunk):
    data = (
        b"\xef\xbb\xbf"
        + b"\r\n".join(
            [jline(id="a", prompt="crlf"), b"\xff\xfe", jline(id="b", prompt="caf\u00e9")]
        )
        + b"\r"
        + jline(id="c", prompt="lone CR")
        + b"\r\n\r\n"
        + b"x" * 300
        + b"\n"
        + jline(id="d", prompt="end")
    )
    csv_data = b'id,prompt\r\nc1,"two\r\nlines"\r\nc2,\xff\rc3,three\r\n' + b"z" * 300 + b"\rc4,x"
    monkeypatch.setattr(batch_input, "MAX_LINE_BYTES", 200)
    expected = None
    for size in (chunk, 1 << 16):
        monkeypatch.setattr(batch_input, "CHUNK_BYTES", size)
        got = (
            read_manifest(write_bytes(tmp_path, "m.jsonl", data), defaults=DEFAULTS),
            read_manifest(write_bytes(tmp_path, "m.csv", csv_data), defaults=DEFAULTS),
        )
        assert expected is None or got == expected
        expected = got
    assert expected is not None
    (items, broken), (csv_items, csv_broken) = expected
    assert [(i.id, i.line) for i in items] == [("a", 1), ("b", 3), ("c", 4), ("d", 7)]
    assert [b.line for b in broken] == [2, 6]
    assert [(i.id, i.line, i.request.prompt) for i in csv_items] == [
        ("c1", 3, "two\r\nlines"),
        ("c3", 5, "three"),
        ("c4", 7, "x"),
    ]
    assert [b.line for b in csv_broken] == [4, 6]


@pytest.mark.integration
def test_s3_manifest_with_bad_bytes_and_a_30mb_line(local_s3, s3_bucket):
    client = local_s3.client()
    body = bytearray(b"\xef\xbb\xbf")
    body += b"\n".join(jline(prompt=f"p{i}") for i in range(5)) + b"\n"  # lines 1-5
    body += b'{"prompt": "bad \xff byte"}\n'  # line 6
    body += b'{"prompt": "' + b"x" * BIG + b'"}\n'  # line 7
    body += jline(prompt="p-last") + b"\n"  # line 8
    client.put_object(Bucket=s3_bucket, Key="in/bad.jsonl", Body=bytes(body))
    del body
    uri = f"s3://{s3_bucket}/in/bad.jsonl"
    read_manifest(uri, defaults=DEFAULTS, s3=client)  # warm up
    (items, broken), peak = peak_while(lambda: read_manifest(uri, defaults=DEFAULTS, s3=client))
    assert [i.line for i in items] == [1, 2, 3, 4, 5, 8]
    assert [(b.line, b.reason) for b in broken] == [
        (6, "not valid UTF-8 (byte 0xff at column 17)"),
        (7, f"line longer than {MAX_LINE_BYTES} bytes"),
    ]
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB while reading a 30 MB line"
