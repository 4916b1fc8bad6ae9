"""The storage helpers without a server: the one not-found test, the conditional PUT's answers,
S3Settings.from_env's keywords, and from_prefect_aws on any object of the S3Bucket shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.exceptions import ClientError

from prefect_eggapi.storage import (
    OutputStore,
    S3Settings,
    build_s3_client,
    is_not_found,
    put_if,
    read_object,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "S3",
    )


@pytest.mark.parametrize(
    ("error", "missing"),
    [
        (client_error("NoSuchKey", 404), True),
        (client_error("404", 404), True),
        (client_error("NotFound", 0), True),
        (client_error("Weird", 404), True),  # the status alone says it
        (client_error("AccessDenied", 403), False),
        (client_error("NoSuchBucket", 400), False),
        (FileNotFoundError("local"), False),  # not an S3 answer
    ],
)
def test_is_not_found(error: BaseException, missing: bool) -> None:
    assert is_not_found(error) is missing


class ScriptedS3:
    """Answers ``get_object``/``put_object`` from a script: a value, or an error to raise."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.calls: list[dict[str, object]] = []

    def _reply(self, **kwargs: object) -> object:
        self.calls.append(kwargs)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    def get_object(self, **kwargs: object) -> object:
        return self._reply(**kwargs)

    def put_object(self, **kwargs: object) -> object:
        return self._reply(**kwargs)


def test_put_if_writes_over_the_version_or_only_where_nothing_is() -> None:
    s3 = ScriptedS3({"ETag": '"new"'})
    assert put_if(s3, "b", "k", b"{}", '"old"') == '"new"'  # type: ignore[arg-type]
    assert put_if(s3, "b", "k", b"{}", None) == '"new"'  # type: ignore[arg-type]
    assert s3.calls[0]["IfMatch"] == '"old"' and "IfNoneMatch" not in s3.calls[0]
    assert s3.calls[1]["IfNoneMatch"] == "*" and "IfMatch" not in s3.calls[1]
    assert s3.calls[0]["ContentType"] == "application/json"


@pytest.mark.parametrize(
    "lost",
    [
        client_error("PreconditionFailed", 412),
        client_error("ConditionalRequestConflict", 409),
        client_error("OperationAborted", 409),  # the status alone says someone wrote first
        client_error("412", 0),
    ],
)
def test_put_if_says_none_when_someone_else_wrote_first(lost: ClientError) -> None:
    assert put_if(ScriptedS3(lost), "b", "k", b"{}", '"v"') is None  # type: ignore[arg-type]


def test_put_if_raises_every_other_failure() -> None:
    with pytest.raises(ClientError):
        put_if(ScriptedS3(client_error("AccessDenied", 403)), "b", "k", b"", None)  # type: ignore[arg-type]


class Body:
    def read(self) -> bytes:
        return b"data"


def test_read_object_gives_bytes_and_etag_or_none_when_missing() -> None:
    found = ScriptedS3({"Body": Body(), "ETag": '"e1"'})
    assert read_object(found, "b", "k") == (b"data", '"e1"')  # type: ignore[arg-type]
    missing = ScriptedS3(client_error("NoSuchKey", 404))
    assert read_object(missing, "b", "k") is None  # type: ignore[arg-type]
    with pytest.raises(ClientError):
        read_object(ScriptedS3(client_error("AccessDenied", 403)), "b", "k")  # type: ignore[arg-type]


# -- S3Settings.from_env --------------------------------------------------------------------

ENV = {
    "EGGAPI_S3_BUCKET": "env-bucket",
    "EGGAPI_S3_PREFIX": "env/prefix",
    "AWS_ENDPOINT_URL": "http://env:9000",
    "AWS_SECRET_ACCESS_KEY": "env-secret",
}


def test_from_env_keywords_win_and_none_leaves_the_environment() -> None:
    settings = S3Settings.from_env(ENV, bucket="kw-bucket", prefix=None, max_concurrency=8)
    assert (settings.bucket, settings.prefix) == ("kw-bucket", "env/prefix")
    assert settings.endpoint_url == "http://env:9000" and settings.max_concurrency == 8
    assert settings.read_timeout == 60.0  # not given, not in the environment: the default
    secret = S3Settings.from_env(ENV, aws_secret_access_key="kw-secret").aws_secret_access_key
    assert secret is not None and secret.get_secret_value() == "kw-secret"


def test_from_env_empty_keywords_are_values_not_absence() -> None:
    settings = S3Settings.from_env(ENV, prefix="", endpoint_url="")
    assert settings.prefix == "" and settings.endpoint_url is None  # root of the bucket, AWS
    with pytest.raises(ValueError, match="EGGAPI_S3_BUCKET"):
        S3Settings.from_env(ENV, bucket="")


def test_from_env_keywords_are_validated_like_the_fields() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        S3Settings.from_env(ENV, max_concurrency=0)


# -- from_prefect_aws by shape ----------------------------------------------------------------


@dataclass
class Credentials:
    client: S3Client

    def get_s3_client(self) -> S3Client:
        return self.client


@dataclass
class BucketBlock:
    bucket_name: str
    credentials: Credentials
    bucket_folder: str = ""


def test_any_object_of_the_s3_bucket_shape_makes_a_store() -> None:
    client = build_s3_client(S3Settings(bucket="shape-bucket", endpoint_url="http://127.0.0.1:9"))
    store = OutputStore.from_prefect_aws(BucketBlock("shape-bucket", Credentials(client), "/a/b/"))
    assert (store.bucket, store.prefix, store.client) == ("shape-bucket", "a/b", client)
    plain = OutputStore.from_prefect_aws(BucketBlock("shape-bucket", Credentials(client)))
    assert plain.prefix == "eggapi"
    told = OutputStore.from_prefect_aws(
        BucketBlock("shape-bucket", Credentials(client), "a"), prefix="given"
    )
    assert told.prefix == "given"


def test_an_object_of_another_shape_is_refused() -> None:
    client = boto3.session.Session(region_name="us-east-1").client("s3")
    with pytest.raises(TypeError, match="S3Bucket"):
        OutputStore.from_prefect_aws(BucketBlock("", Credentials(client)))
    with pytest.raises(TypeError, match="S3Bucket"):
        OutputStore.from_prefect_aws(object())  # type: ignore[arg-type]
