"""Batch manifests: every line is an item or a reported broken line; nothing is dropped."""

from __future__ import annotations

import json

import pytest

from prefect_eggapi.batch_input import read_manifest
from prefect_eggapi.errors import InvalidRequestError

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
