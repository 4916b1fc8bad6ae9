"""OutputStore against a real S3 server (SeaweedFS on loopback): keys, checksums, metadata,
idempotent reruns, multipart, failures that leave nothing behind, presigned URLs, edit inputs,
settings and prefect-aws interop."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import SecretStr, ValidationError

from prefect_eggapi.storage import (
    MAX_EDIT_INPUTS,
    InvalidKeyError,
    InvalidMetadataError,
    NotAnImageError,
    OutputStore,
    S3Settings,
    StoredImage,
    TooManyInputsError,
    UploadError,
    build_s3_client,
    decode_metadata_value,
    encode_metadata_value,
    make_transfer_config,
)
from prefect_eggapi.testing.local_s3 import LocalS3

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


# -- image helpers ----------------------------------------------------------------------------


def png_bytes(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = 80, height: int = 60) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 240)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def chunked(data: bytes, size: int = 7000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def objects(store: OutputStore) -> list[dict[str, Any]]:
    return list(store.client.list_objects_v2(Bucket=store.bucket).get("Contents", []))


def pending_uploads(store: OutputStore) -> list[Any]:
    return list(store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []))


def get_bytes(store: OutputStore, key: str) -> bytes:
    return store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A ~12 MiB PNG of noise (incompressible), made once per module."""
    side = 2048
    img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    assert len(data) > 11 * MiB
    return data


def multipart_store(local_s3: LocalS3, bucket: str, client: Any = None) -> OutputStore:
    return OutputStore(
        client or local_s3.client(),
        bucket,
        prefix="mp",
        transfer_config=make_transfer_config(
            multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2
        ),
        spool_max_memory=1 * MiB,
    )


# -- persist ----------------------------------------------------------------------------------


def test_persist_png_streams_to_deterministic_key(output_store: OutputStore) -> None:
    data = png_bytes(64, 48)
    stored = output_store.persist(
        chunked(data, 100),
        task_id="task_abc123",
        index=0,
        metadata={"Model": "nanobanana-pro", "request_fingerprint": "f" * 64, "cost": "$0.0100"},
    )
    assert stored.created is True
    assert stored.key == "eggapi/task_abc123/0.png"
    assert stored.uri == f"s3://{output_store.bucket}/eggapi/task_abc123/0.png"
    assert stored.content_type == "image/png"
    assert stored.format == "png"
    assert (stored.width, stored.height) == (64, 48)
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()

    head = output_store.client.head_object(Bucket=output_store.bucket, Key=stored.key)
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(data)
    meta = head["Metadata"]
    assert meta["sha256"] == stored.sha256
    assert (meta["width"], meta["height"], meta["format"]) == ("64", "48", "png")
    assert meta["eggapi-task-id"] == "task_abc123"
    assert meta["output-index"] == "0"
    assert meta["model"] == "nanobanana-pro"
    assert meta["request-fingerprint"] == "f" * 64
    assert meta["cost"] == "$0.0100"
    assert get_bytes(output_store, stored.key) == data


def test_persist_jpeg_gets_jpg_extension_from_magic_bytes(output_store: OutputStore) -> None:
    data = jpeg_bytes(80, 60)
    stored = output_store.persist([data], task_id="task-j", index=3)
    assert stored.key == "eggapi/task-j/3.jpg"
    assert stored.content_type == "image/jpeg"
    assert (stored.format, stored.width, stored.height) == ("jpeg", 80, 60)
    head = output_store.client.head_object(Bucket=output_store.bucket, Key=stored.key)
    assert head["ContentType"] == "image/jpeg"
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert get_bytes(output_store, stored.key) == data


def test_second_persist_reuses_identical_object(output_store: OutputStore) -> None:
    data = png_bytes(32, 32)
    first = output_store.persist(chunked(data), task_id="t1", index=0, metadata={"cost": "0.01"})
    head1 = output_store.client.head_object(Bucket=output_store.bucket, Key=first.key)
    time.sleep(1.1)  # LastModified has one-second resolution
    second = output_store.persist(chunked(data), task_id="t1", index=0, metadata={"cost": "0.01"})
    head2 = output_store.client.head_object(Bucket=output_store.bucket, Key=first.key)
    assert first.created is True
    assert second.created is False
    assert second.model_dump(exclude={"created"}) == first.model_dump(exclude={"created"})
    assert head2["LastModified"] == head1["LastModified"]
    assert head2["ETag"] == head1["ETag"]
    assert [o["Key"] for o in objects(output_store)] == [first.key]


def test_changed_bytes_at_same_key_are_overwritten(output_store: OutputStore) -> None:
    first = output_store.persist([png_bytes(color=(1, 2, 3))], task_id="t2", index=0)
    second = output_store.persist([png_bytes(color=(4, 5, 6))], task_id="t2", index=0)
    assert second.created is True
    assert second.key == first.key and second.sha256 != first.sha256
    assert hashlib.sha256(get_bytes(output_store, first.key)).hexdigest() == second.sha256


def test_find_existing(output_store: OutputStore) -> None:
    assert output_store.find_existing("task-f", 1) is None
    stored = output_store.persist(
        [jpeg_bytes()], task_id="task-f", index=1, metadata={"prompt": "un café à 2 €"}
    )
    found = output_store.find_existing("task-f", 1)
    assert found is not None
    assert found.created is False
    assert found.model_dump(exclude={"created"}) == stored.model_dump(exclude={"created"})
    assert found.metadata["prompt"] == "un café à 2 €"
    # index 1 must not match index 10 or 11
    assert output_store.find_existing("task-f", 0) is None
    output_store.persist([png_bytes()], task_id="task-g", index=10)
    assert output_store.find_existing("task-g", 1) is None
    assert output_store.find_existing("task-g", 10) is not None


def test_find_existing_ignores_objects_without_checksum(output_store: OutputStore) -> None:
    output_store.client.put_object(
        Bucket=output_store.bucket, Key="eggapi/task-x/0.png", Body=png_bytes()
    )
    assert output_store.find_existing("task-x", 0) is None
    stored = output_store.persist([png_bytes()], task_id="task-x", index=0)
    assert stored.created is True  # the untrusted object was replaced
    assert output_store.find_existing("task-x", 0) is not None


def test_non_image_is_rejected_and_nothing_written(output_store: OutputStore) -> None:
    with pytest.raises(NotAnImageError) as info:
        output_store.persist(
            [b"<html><body>Access denied</body></html>"], task_id="task-n", index=0
        )
    assert "not an image" in str(info.value)
    assert info.value.head.startswith(b"<html>")
    with pytest.raises(NotAnImageError):
        output_store.persist([], task_id="task-n", index=1)
    assert objects(output_store) == []


def test_invalid_task_id_and_metadata_rejected_before_reading(output_store: OutputStore) -> None:
    consumed: list[bytes] = []

    def stream() -> Iterator[bytes]:
        consumed.append(b"x")
        yield png_bytes()

    for bad in ("../etc", "a/b", "", "x" * 300):
        with pytest.raises(InvalidKeyError):
            output_store.persist(stream(), task_id=bad, index=0)
    with pytest.raises(InvalidKeyError):
        output_store.persist(stream(), task_id="ok", index=-1)
    with pytest.raises(InvalidMetadataError, match="reserved"):
        output_store.persist(stream(), task_id="ok", index=0, metadata={"SHA256": "x"})
    with pytest.raises(InvalidMetadataError, match="both normalise"):
        output_store.persist(stream(), task_id="ok", index=0, metadata={"a_b": "1", "a-b": "2"})
    with pytest.raises(InvalidMetadataError, match="2048"):
        output_store.persist(stream(), task_id="ok", index=0, metadata={"big": "x" * 3000})
    assert consumed == []
    assert objects(output_store) == []


def test_metadata_values_are_ascii_safe_and_round_trip() -> None:
    for value in ["plain", "café", "line\nbreak", " padded ", "=?UTF-8?B?Zm9v?=", "€" * 3, ""]:
        encoded = encode_metadata_value(value)
        assert encoded.isascii() and encoded.isprintable()
        assert decode_metadata_value(encoded) == value
    assert encode_metadata_value("nanobanana-pro") == "nanobanana-pro"


def test_multipart_upload_is_intact(local_s3: LocalS3, s3_bucket: str, big_png: bytes) -> None:
    store = multipart_store(local_s3, s3_bucket)
    started = time.monotonic()
    stored = store.persist(chunked(big_png, 256 * 1024), task_id="big", index=0)
    elapsed = time.monotonic() - started
    print(f"\npersist {len(big_png) / MiB:.1f} MiB multipart: {elapsed:.2f} s "
          f"({len(big_png) / MiB / elapsed:.0f} MiB/s)")  # fmt: skip
    assert stored.created and (stored.width, stored.height) == (2048, 2048)
    head = store.client.head_object(Bucket=s3_bucket, Key=stored.key)
    assert head["ETag"].strip('"').endswith("-3")  # 3 parts of 5 MiB: really multipart
    assert head["ContentLength"] == len(big_png)
    body = get_bytes(store, stored.key)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(big_png).hexdigest()
    assert pending_uploads(store) == []


def test_a_body_below_the_multipart_threshold_is_one_put_from_the_calling_thread(
    local_s3: LocalS3, s3_bucket: str
) -> None:
    """Issue 16: small outputs skip s3transfer's pool (a thread hop per image) for one
    PutObject with the same content type, metadata and default checksum."""
    client = local_s3.client()
    calls: list[tuple[str, str, dict[str, Any]]] = []

    def record(params: dict[str, Any], model: Any, **_: Any) -> None:
        calls.append((model.name, threading.current_thread().name, dict(params)))

    client.meta.events.register("provide-client-params.s3.*", record)
    store = OutputStore(client, s3_bucket, prefix="eggapi")
    data = png_bytes(64, 48)
    stored = store.persist(chunked(data, 100), task_id="small", index=0, metadata={"k": "v"})
    caller = threading.current_thread().name
    assert [(name, thread) for name, thread, _ in calls] == [
        ("HeadObject", caller),
        ("PutObject", caller),
    ]
    put = calls[1][2]
    assert put["ContentType"] == "image/png"
    assert put["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert put["Metadata"]["k"] == "v"
    assert put["ChecksumAlgorithm"] == "CRC32"  # what s3transfer added by default
    assert store._manager is None  # no transfer manager (thread pool) was ever built
    assert stored.created and get_bytes(store, stored.key) == data
    head = store.client.head_object(Bucket=s3_bucket, Key=stored.key)
    assert head["ContentType"] == "image/png" and head["ContentLength"] == len(data)
    assert head["Metadata"]["sha256"] == stored.sha256


def test_a_failed_single_put_is_a_typed_retryable_upload_error(
    local_s3: LocalS3, s3_bucket: str
) -> None:
    """The single PUT keeps the upload path's error classification (and leaves nothing)."""
    client = local_s3.client()

    def fail(**_: Any) -> None:
        raise ConnectionResetError("simulated reset on PUT")

    client.meta.events.register("before-call.s3.PutObject", fail)
    store = OutputStore(client, s3_bucket, prefix="eggapi")
    with pytest.raises(UploadError) as info:
        store.persist([png_bytes(20, 20)], task_id="small-fail", index=0)
    assert info.value.key == "eggapi/small-fail/0.png" and info.value.retryable
    assert str(info.value).startswith("upload to s3://")
    assert objects(store) == []


def _fake_png_stream(total: int, seed: bytes = b"s") -> Iterator[bytes]:
    """A PNG signature + IHDR followed by ``total`` bytes of noise, never held in memory."""
    ihdr = struct.pack(">IIBBBBB", 4000, 3000, 8, 2, 0, 0, 0)
    yield b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
    yield struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        yield bytes(piece)
        sent += len(piece)


def test_memory_stays_bounded_for_large_streams(local_s3: LocalS3, s3_bucket: str) -> None:
    store = multipart_store(local_s3, s3_bucket)
    total = 40 * MiB
    tracemalloc.start()
    try:
        stored = store.persist(_fake_png_stream(total), task_id="huge", index=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256(b"".join(_fake_png_stream(total))).hexdigest()
    assert stored.sha256 == expected and stored.size > total
    assert (stored.width, stored.height) == (4000, 3000)
    # spool (1 MiB in RAM) + (2 in flight + 1 being read) parts of 5 MiB, plus overhead;
    # ~18 MiB measured, well below the 40 MiB that holding the image would take
    assert peak < 25 * MiB, f"peak {peak / MiB:.1f} MiB"


def test_failing_stream_leaves_nothing(output_store: OutputStore) -> None:
    data = png_bytes(200, 200)

    def broken() -> Iterator[bytes]:
        yield data[:100]
        yield data[100:300]
        raise ConnectionError("download interrupted")

    with pytest.raises(ConnectionError, match="interrupted"):
        output_store.persist(broken(), task_id="task-b", index=0)
    assert objects(output_store) == []
    assert pending_uploads(output_store) == []
    assert output_store.find_existing("task-b", 0) is None


def test_failed_multipart_upload_is_aborted(
    local_s3: LocalS3, s3_bucket: str, big_png: bytes
) -> None:
    client = local_s3.client()
    calls = {"n": 0}
    lock = threading.Lock()

    def fail_second_part(**_: Any) -> None:
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 2:
            raise ConnectionResetError("simulated network failure on part 2")

    client.meta.events.register("before-call.s3.UploadPart", fail_second_part)
    store = multipart_store(local_s3, s3_bucket, client)
    with pytest.raises(UploadError) as info:
        store.persist([big_png], task_id="task-mp", index=0)
    assert info.value.key == "mp/task-mp/0.png"
    assert info.value.retryable  # a reset connection: another try may get through
    assert calls["n"] >= 2
    assert objects(store) == []
    assert pending_uploads(store) == []  # boto3 aborted the multipart upload
    assert store.find_existing("task-mp", 0) is None


def test_a_failed_read_is_an_s3_call_error_not_an_upload_error(
    local_s3: LocalS3, s3_bucket: str
) -> None:
    """HEAD/LIST failures name the call that failed and are classified from the failure."""
    from prefect_eggapi.storage import S3CallError

    store = OutputStore(local_s3.client(), "no-such-bucket-here", "p")
    with pytest.raises(S3CallError) as info:
        store.find_existing("task-x", 0)
    assert type(info.value) is S3CallError  # nothing was being uploaded
    assert info.value.code == "NoSuchBucket" and not info.value.retryable
    assert str(info.value).startswith("LIST s3://no-such-bucket-here/")


def test_store_is_shared_across_threads(output_store: OutputStore) -> None:
    images = [png_bytes(10 + i, 10, (i * 20, 0, 0)) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            pool.map(
                lambda i: output_store.persist(chunked(images[i], 50), task_id="par", index=i),
                range(8),
            )
        )
    assert [r.key for r in results] == [f"eggapi/par/{i}.png" for i in range(8)]
    assert all(r.created for r in results)
    assert [r.width for r in results] == [10 + i for i in range(8)]
    for r, img in zip(results, images, strict=True):
        assert get_bytes(output_store, r.key) == img


# -- presign and edit inputs ------------------------------------------------------------------


def test_presign_get_downloads_with_plain_httpx(output_store: OutputStore) -> None:
    data = jpeg_bytes()
    stored = output_store.persist([data], task_id="task-p", index=0)
    url = output_store.presign_get(stored.key, expires_in=120)
    assert "X-Amz-Expires=120" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "image/jpeg"
    with pytest.raises(ValueError, match="expires_in"):
        output_store.presign_get(stored.key, expires_in=8 * 24 * 3600)


def test_stage_inputs_limit_checked_before_any_upload(output_store: OutputStore) -> None:
    sources: list[Path | bytes] = [png_bytes(5 + i, 5) for i in range(MAX_EDIT_INPUTS + 1)]
    with pytest.raises(TooManyInputsError, match="at most 9"):
        output_store.stage_inputs(sources, expires_in=3600)
    assert objects(output_store) == []
    # one non-image among valid ones: nothing staged either
    with pytest.raises(NotAnImageError):
        output_store.stage_inputs([png_bytes(), b"not an image at all"], expires_in=3600)
    assert objects(output_store) == []


def test_stage_inputs_uploads_once_and_urls_fetch(
    output_store: OutputStore, tmp_path: Path
) -> None:
    png = png_bytes(40, 30)
    jpg = jpeg_bytes(20, 10)
    path = tmp_path / "photo.png"  # JPEG bytes behind a .png name: magic bytes win
    path.write_bytes(jpg)
    urls = output_store.stage_inputs([png, path, png], expires_in=3600)
    assert len(urls) == 3
    keys = sorted(o["Key"] for o in objects(output_store))
    assert keys == sorted(
        [
            f"eggapi/inputs/{hashlib.sha256(png).hexdigest()}.png",
            f"eggapi/inputs/{hashlib.sha256(jpg).hexdigest()}.jpg",
        ]
    )
    bodies = [httpx.get(u) for u in urls]
    assert [b.status_code for b in bodies] == [200, 200, 200]
    assert [b.content for b in bodies] == [png, jpg, png]
    assert all("X-Amz-Expires=3600" in u for u in urls)
    # staging again does not upload again
    head_before = output_store.client.head_object(Bucket=output_store.bucket, Key=keys[0])
    time.sleep(1.1)
    again = output_store.stage_inputs([path, png], expires_in=7200)
    head_after = output_store.client.head_object(Bucket=output_store.bucket, Key=keys[0])
    assert head_after["LastModified"] == head_before["LastModified"]
    assert len(objects(output_store)) == 2
    assert [httpx.get(u).content for u in again] == [jpg, png]


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bucket", "Bad_Bucket"),
        ("bucket", "ab"),
        ("bucket", "192.168.1.1"),
        ("bucket", "a..b"),
        ("prefix", "a/../b"),
        ("prefix", "a//b"),
        ("prefix", "bad\\name"),
        ("endpoint_url", "ftp://example"),
        ("multipart_chunksize", 1024),
        ("max_attempts", 0),
        ("presign_expires_in", 8 * 24 * 3600),
    ],
)
def test_settings_validation_names_the_field(field: str, value: object) -> None:
    values: dict[str, Any] = {"bucket": "good-bucket", field: value}
    with pytest.raises(ValidationError) as info:
        S3Settings(**values)
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(field,)]
    assert field in str(info.value)


def test_settings_normalise_and_hide_secret() -> None:
    s = S3Settings(
        bucket="my.bucket-1",
        prefix="/runs/2024/",
        endpoint_url="http://127.0.0.1:9000/",
        aws_secret_access_key=SecretStr("topsecret"),
    )
    assert s.prefix == "runs/2024"
    assert s.endpoint_url == "http://127.0.0.1:9000"
    assert "topsecret" not in repr(s) and "topsecret" not in str(s.model_dump())


def test_settings_from_env() -> None:
    env = {
        "EGGAPI_S3_BUCKET": "env-bucket",
        "EGGAPI_S3_PREFIX": "outs",
        "AWS_ENDPOINT_URL": "http://general:1",
        "AWS_ENDPOINT_URL_S3": "http://s3specific:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKID",
        "AWS_SECRET_ACCESS_KEY": "SECRET",
    }
    s = S3Settings.from_env(env)
    assert (s.bucket, s.prefix, s.endpoint_url, s.region_name) == (
        "env-bucket",
        "outs",
        "http://s3specific:2",
        "eu-west-1",
    )
    assert s.aws_access_key_id == "AKID"
    assert s.aws_secret_access_key is not None
    assert s.aws_secret_access_key.get_secret_value() == "SECRET"
    env.pop("AWS_ENDPOINT_URL_S3")
    assert S3Settings.from_env(env, prefix="other").endpoint_url == "http://general:1"
    assert S3Settings.from_env(env, prefix="other").prefix == "other"
    with pytest.raises(ValueError, match="EGGAPI_S3_BUCKET"):
        S3Settings.from_env({})
    with pytest.raises(ValidationError, match="bucket"):
        S3Settings.from_env({"EGGAPI_S3_BUCKET": "Nope!"})


def test_build_s3_client_config() -> None:
    client = build_s3_client(
        S3Settings(bucket="cfg-bucket", endpoint_url="http://127.0.0.1:1", connect_timeout=3,
                   read_timeout=7, max_attempts=4, region_name="us-east-1")
    )  # fmt: skip
    config = client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (3, 7)
    assert config.retries == {"mode": "standard", "total_max_attempts": 4}
    assert config.signature_version == "s3v4"
    assert config.s3 == {"addressing_style": "path"}
    aws = build_s3_client(S3Settings(bucket="cfg-bucket", region_name="us-east-1"))
    assert not (aws.meta.config.s3 or {}).get("addressing_style")


def test_from_settings_against_local_server(local_s3: LocalS3, s3_bucket: str) -> None:
    store = OutputStore.from_settings(local_s3.settings(s3_bucket, prefix="from-settings"))
    stored = store.persist([png_bytes()], task_id="task-s", index=0)
    assert stored.key == "from-settings/task-s/0.png"
    assert get_bytes(store, stored.key) == png_bytes()
    env_store = OutputStore.from_settings(
        S3Settings.from_env({**local_s3.env(), "EGGAPI_S3_BUCKET": s3_bucket})
    )
    found = env_store.find_existing("task-s", 0)
    assert found is None  # different prefix ("eggapi")
    assert env_store.persist([png_bytes()], task_id="task-s", index=0).created


def test_from_settings_builds_one_store_per_settings() -> None:
    settings = S3Settings(bucket="cache-bucket", endpoint_url="http://127.0.0.1:9")
    store = OutputStore.from_settings(settings)
    assert OutputStore.from_settings(settings.model_copy()) is store  # equal settings: reused
    other = OutputStore.from_settings(settings.model_copy(update={"prefix": "other"}))
    assert other is not store and other.client is not store.client
    rotated = S3Settings(
        bucket="cache-bucket", endpoint_url="http://127.0.0.1:9", aws_secret_access_key="new"
    )
    assert OutputStore.from_settings(rotated) is not store  # new credentials: a new client


# -- prefect-aws ------------------------------------------------------------------------------


def test_from_prefect_aws_blocks(local_s3: LocalS3, s3_bucket: str) -> None:
    from prefect_aws import AwsCredentials, S3Bucket

    credentials = AwsCredentials(
        aws_access_key_id=local_s3.access_key,
        aws_secret_access_key=local_s3.secret_key,
        region_name=local_s3.region,
        aws_client_parameters={"endpoint_url": local_s3.endpoint_url},
    )
    block = S3Bucket(bucket_name=s3_bucket, credentials=credentials, bucket_folder="flows/out/")
    store = OutputStore.from_prefect_aws(block)
    assert (store.bucket, store.prefix) == (s3_bucket, "flows/out")
    data = jpeg_bytes()
    stored = store.persist([data], task_id="task-pa", index=0, metadata={"model": "nanobanana"})
    assert isinstance(stored, StoredImage)
    assert stored.key == "flows/out/task-pa/0.jpg"
    assert httpx.get(store.presign_get(stored.key)).content == data
    assert store.persist([data], task_id="task-pa", index=0).created is False

    plain = OutputStore.from_prefect_aws(S3Bucket(bucket_name=s3_bucket, credentials=credentials))
    assert plain.prefix == "eggapi"
    with pytest.raises(TypeError, match="S3Bucket"):
        OutputStore.from_prefect_aws(object())
