"""The local S3 server: loopback only, real SigV4 checks, clean start-up errors and stop."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import boto3
import httpx
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from prefect_eggapi.testing.local_s3 import INSTALL_HINT, LocalS3, LocalS3Error, find_weed_binary

pytestmark = pytest.mark.integration


def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every listening TCP socket of ``pid``, from /proc (no external tools)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found: list[tuple[str, int]] = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            assert len(hex_ip) == width
            if width == 8:
                ip = ".".join(str(b) for b in bytes.fromhex(hex_ip)[::-1])
            else:
                ip = "ipv6:" + hex_ip
            found.append((ip, int(hex_port, 16)))
    return found


def _client(server: LocalS3, access_key: str, secret_key: str):  # type: ignore[no-untyped-def]
    return boto3.session.Session().client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=server.region,
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"mode": "standard", "total_max_attempts": 1},
        ),
    )


def test_server_answers_signed_requests(local_s3: LocalS3, s3_bucket: str) -> None:
    assert local_s3.running
    assert local_s3.endpoint_url.startswith("http://127.0.0.1:")
    names = [b["Name"] for b in local_s3.client().list_buckets().get("Buckets", [])]
    assert s3_bucket in names
    # create_bucket is idempotent
    assert local_s3.create_bucket(s3_bucket) == s3_bucket
    assert local_s3.startup_seconds is not None and local_s3.startup_seconds < 30


def test_binds_only_loopback(local_s3: LocalS3) -> None:
    listening = _listening_addresses(local_s3.pid)
    ports = {port for _, port in listening}
    assert int(local_s3.endpoint_url.rsplit(":", 1)[1]) in ports
    assert len(listening) >= 5
    assert all(ip == "127.0.0.1" for ip, _ in listening), listening


def test_secret_stays_out_of_repr(local_s3: LocalS3) -> None:
    text = repr(local_s3)
    assert local_s3.secret_key not in text
    assert local_s3.access_key in text
    env = local_s3.env()
    assert env["AWS_SECRET_ACCESS_KEY"] == local_s3.secret_key
    assert env["AWS_ENDPOINT_URL_S3"] == local_s3.endpoint_url
    assert env["AWS_REGION"] == "us-east-1"


def test_identity_file_is_private(local_s3: LocalS3) -> None:
    mode = stat.S_IMODE((local_s3.data_dir / "s3-identities.json").stat().st_mode)
    assert mode == 0o600


def test_wrong_secret_key_is_rejected(local_s3: LocalS3, s3_bucket: str) -> None:
    bad = _client(local_s3, local_s3.access_key, local_s3.secret_key + "x")
    with pytest.raises(ClientError) as info:
        bad.list_objects_v2(Bucket=s3_bucket)
    assert info.value.response["Error"]["Code"] in ("SignatureDoesNotMatch", "InvalidAccessKeyId")


def test_unknown_access_key_is_rejected(local_s3: LocalS3, s3_bucket: str) -> None:
    bad = _client(local_s3, "EGGNOTAKEY0000000000", local_s3.secret_key)
    with pytest.raises(ClientError) as info:
        bad.put_object(Bucket=s3_bucket, Key="x", Body=b"y")
    assert info.value.response["Error"]["Code"] == "InvalidAccessKeyId"


def test_tampered_presigned_url_is_refused(local_s3: LocalS3, s3_bucket: str) -> None:
    client = local_s3.client()
    client.put_object(Bucket=s3_bucket, Key="a/secret.txt", Body=b"hello")
    client.put_object(Bucket=s3_bucket, Key="a/other.txt", Body=b"other")
    url = client.generate_presigned_url(
        "get_object", Params={"Bucket": s3_bucket, "Key": "a/secret.txt"}, ExpiresIn=60
    )
    ok = httpx.get(url)
    assert ok.status_code == 200 and ok.content == b"hello"

    other_key = httpx.get(url.replace("a/secret.txt", "a/other.txt"))
    assert other_key.status_code == 403

    sig_at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    flipped = "0" if url[sig_at] != "0" else "1"
    bad_sig = httpx.get(url[:sig_at] + flipped + url[sig_at + 1 :])
    assert bad_sig.status_code == 403

    longer = httpx.get(url.replace("X-Amz-Expires=60", "X-Amz-Expires=600"))
    assert longer.status_code == 403


def test_stop_leaves_no_process_and_removes_temp_dir() -> None:
    server = LocalS3()
    pid, data_dir = server.pid, server.data_dir
    assert data_dir.exists()
    os.kill(pid, 0)  # alive
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 20
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not data_dir.exists()
    assert not server.running
    server.stop()  # idempotent


def test_caller_data_dir_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "s3data"
    with LocalS3(data) as server:
        pid = server.pid
        server.create_bucket("kept-bucket")
        server.client().put_object(Bucket="kept-bucket", Key="k", Body=b"v")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert data.is_dir()
    assert "SeaweedFS" in (data / "weed.log").read_text()


def test_restart_keeps_endpoint_credentials_and_objects(tmp_path: Path) -> None:
    with LocalS3(tmp_path / "s3data") as server:
        old_pid, endpoint = server.pid, server.endpoint_url
        server.create_bucket("kept-bucket")
        server.client().put_object(Bucket="kept-bucket", Key="k", Body=b"v")
        server.restart()
        assert server.pid != old_pid and server.endpoint_url == endpoint
        with pytest.raises(ProcessLookupError):
            os.kill(old_pid, 0)
        body = server.client().get_object(Bucket="kept-bucket", Key="k")["Body"].read()
        assert body == b"v"


def test_restart_refuses_an_owned_data_dir(local_s3: LocalS3) -> None:
    with pytest.raises(RuntimeError, match="caller-given data_dir"):
        local_s3.restart()
    assert local_s3.running


def test_missing_binary_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LocalS3Error) as info:
        find_weed_binary()
    assert INSTALL_HINT in str(info.value)
    assert "prefect-eggapi[local]" in str(info.value)


def _fake_binary(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-weed"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    fake = _fake_binary(tmp_path, 'echo "boom: cannot open volume"; exit 3')
    with pytest.raises(LocalS3Error) as info:
        LocalS3(tmp_path / "d", binary=fake, startup_timeout=10)
    message = str(info.value)
    assert "status 3" in message
    assert "boom: cannot open volume" in message


def test_start_timeout_kills_the_process(tmp_path: Path) -> None:
    fake = _fake_binary(tmp_path, 'echo "$$" > "$PWD/fake.pid"; echo starting; exec sleep 60')
    with pytest.raises(LocalS3Error) as info:
        LocalS3(tmp_path / "d", binary=fake, startup_timeout=1)
    assert "not ready after" in str(info.value)
    assert "starting" in str(info.value)
    pid = int((tmp_path / "d" / "fake.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
