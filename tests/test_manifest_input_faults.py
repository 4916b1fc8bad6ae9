"""Manifest faults seen in real runs: bytes that are not UTF-8, a BOM, a 30 MB line.

Through the whole ``batch_generate`` flow (emulator + real S3 + Prefect harness), local and
``s3://`` manifests alike: each bad line is reported in ``status.jsonl`` with its line number and
a clear reason (and only a short preview of its text), it costs no HTTP call, and every valid
line still runs. None of it may crash the flow with a bare ``UnicodeDecodeError``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from prefect_eggapi.flows import batch_generate
from prefect_eggapi.flows.batch import BatchError
from prefect_eggapi.flows.manifests import MAX_LINE_BYTES
from reliability_common import read_status

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_harness")]

BIG = 30 * 1024 * 1024


@pytest.fixture
def s3_env(local_s3, s3_bucket, monkeypatch):
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EGGAPI_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("EGGAPI_S3_PREFIX", "out")
    return local_s3.client()


def line(**fields: str) -> bytes:
    return json.dumps(fields).encode()


def assert_reported(rows, expected_broken: dict[int, str], total: int) -> None:
    assert [r["line"] for r in rows] == list(range(1, total + 1))  # every line, in order
    for row in rows:
        if row["line"] in expected_broken:
            assert row["status"] == "broken", row
            assert row["error"]["message"] == expected_broken[row["line"]], row
            assert len(row["error"]["text"]) <= 200
        else:
            assert row["status"] == "persisted", row


def test_local_jsonl_with_bom_bad_bytes_and_a_30mb_line(eggapi_env, s3_env, s3_bucket, tmp_path):
    path = Path(tmp_path / "faults.jsonl")
    with path.open("wb") as fh:
        fh.write(b"\xef\xbb\xbf" + line(id="first", prompt="a quiet harbour") + b"\n")
        fh.write(b'{"id": "latin", "prompt": "caf\xe9"}\n')  # line 2: Latin-1
        fh.write(b'{"id": "huge", "prompt": "')  # line 3: 30 MB
        for _ in range(BIG // (1 << 20)):
            fh.write(b"x" * (1 << 20))
        fh.write(b'"}\n')
        fh.write(line(id="last", prompt="a red kite") + b"\n")
    with pytest.raises(BatchError, match="2 broken line"):
        asyncio.run(batch_generate(manifest=str(path), run_key="utf8-faults"))
    assert len(eggapi_env.created_tasks()) == 2  # only the valid lines were paid for
    rows = read_status(s3_env, s3_bucket, "out/batches/utf8-faults/status.jsonl")
    assert_reported(
        rows,
        {
            2: "not valid UTF-8 (byte 0xe9 at column 31)",
            3: f"line longer than {MAX_LINE_BYTES} bytes",
        },
        total=4,
    )


def test_s3_csv_with_bad_bytes_and_a_30mb_line(eggapi_env, s3_env, s3_bucket):
    body = bytearray(b"\xef\xbb\xbfid,prompt\n")
    body += b"a,a calm lake\n"  # line 2
    body += b"b,caf\xe9 au lait\n"  # line 3
    body += b"c," + b"y" * BIG + b"\n"  # line 4
    body += b'd,"a prompt\nover two lines"\n'  # lines 5-6
    s3_env.put_object(Bucket=s3_bucket, Key="in/faults.csv", Body=bytes(body))
    del body
    with pytest.raises(BatchError, match="2 broken line"):
        asyncio.run(
            batch_generate(manifest=f"s3://{s3_bucket}/in/faults.csv", run_key="csv-faults")
        )
    assert len(eggapi_env.created_tasks()) == 2
    rows = read_status(s3_env, s3_bucket, "out/batches/csv-faults/status.jsonl")
    assert [(r["line"], r["status"]) for r in rows] == [
        (2, "persisted"),
        (3, "broken"),
        (4, "broken"),
        (6, "persisted"),
    ]
    assert rows[1]["error"]["message"] == "not valid UTF-8 (byte 0xe9 at column 6)"
    assert rows[2]["error"]["message"] == f"line longer than {MAX_LINE_BYTES} bytes"
    assert all(len(r["error"]["text"]) <= 200 for r in rows[1:3])
