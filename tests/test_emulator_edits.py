"""The emulator's edits are real edits, and its faults can be seeded rates (issue 17, items 4, 6).

Over real HTTP against the session emulator subprocess (reset before each test), with real input
servers: the emulator's own outputs, presigned URLs of the session SeaweedFS, and a small
threaded HTTP server in this file for what S3 cannot do (endless streams, a held answer, request
counting). Lifecycles run in manual mode: the second ``advance`` of an edit waits for its inputs,
so no test sleeps for timing. The one wait on the clock (a presigned URL's 1 s expiry) polls the
URL itself until S3 refuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from PIL import Image

from prefect_eggapi.cli.emulator import add_arguments, build_config
from prefect_eggapi.testing.emulator import EmulatorConfig, EmulatorProcess, FaultRule
from prefect_eggapi.testing.emulator.config import rate_rule
from prefect_eggapi.testing.emulator.images import RenderSpec, prepare_sources, render_png
from prefect_eggapi.testing.local_s3 import LocalS3

pytestmark = pytest.mark.integration

SOURCES = "eggapi:sources"
PROMPT = "eggapi:prompt"
MIB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (320, 180)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 120), colour).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def chunks(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        text: dict[str, str] = dict(image.text)
        return text


def post(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"model": "nanobanana", "prompt": "a test image", **fields}
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 202, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def run_manual(emulator: EmulatorProcess, task_id: str) -> dict[str, Any]:
    """pending -> processing (the fetch starts) -> the end (waits for the inputs)."""
    assert emulator.advance(task_id)["status"] == "processing"
    return emulator.advance(task_id)


def generation(emulator: EmulatorProcess, client: httpx.Client, prompt: str) -> tuple[str, bytes]:
    """A completed generation: its output URL and bytes."""
    task = post(client, prompt=prompt)
    done = run_manual(emulator, task["id"])
    assert done["status"] == "completed", done
    url: str = done["output"]["url"]
    response = httpx.get(url, trust_env=False)
    assert response.status_code == 200
    return url, response.content


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class InputServer:
    """A threaded HTTP server on loopback: fixed files, an endless stream, a held answer."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.requests: Counter[str] = Counter()
        self.streamed = 0
        self.stream_limit = 64 * MIB
        self.hold_reached = threading.Event()
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.requests[self.path] += 1
                if self.path == "/stream.png":
                    self._stream()
                    return
                if self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.removeprefix("/redirect?to="))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/held.png":
                    owner.hold_reached.set()
                    owner.release.wait(30)
                    self._send(png_bytes((0, 200, 0)), "image/png")
                    return
                found = owner.files.get(self.path)
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._send(*found)

            def _send(self, body: bytes, content_type: str) -> None:
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the emulator gave up (a timeout test)

            def _stream(self) -> None:
                """Chunked, no Content-Length: only a streaming size check can stop it."""
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                piece = png_bytes((1, 2, 3))[:64] + bytes(256 * 1024 - 64)
                try:
                    while owner.streamed < owner.stream_limit:
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        owner.streamed += len(piece)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the emulator hung up: what the test wants

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> InputServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def inputs() -> Iterator[InputServer]:
    with InputServer() as server:
        yield server


@pytest.fixture
def manual(emulator: EmulatorProcess) -> EmulatorProcess:
    emulator.set_config(manual=True)
    return emulator


def presign(local_s3: LocalS3, bucket: str, key: str, data: bytes, expires: int = 600) -> str:
    client = local_s3.client()
    client.put_object(Bucket=bucket, Key=key, Body=data)
    url: str = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
    )
    return url


def assert_failed_unbilled(
    emulator: EmulatorProcess,
    client: httpx.Client,
    api_key: str,
    done: dict[str, Any],
    *fragments: str,
) -> str:
    """Failed at $0.00 with an upstream-style error naming the input; billed and charged nothing."""
    assert done["status"] == "failed", done
    assert done["cost"] == "$0.00"
    error: str = done["error"]
    assert error.startswith("Upstream provider error: input image image_urls["), error
    for fragment in fragments:
        assert fragment in error, error
    api_view = client.get(f"/v1/tasks/{done['id']}").json()["data"]
    assert (api_view["status"], api_view["cost"], api_view["error"]) == ("failed", "$0.00", error)
    (record,) = [t for t in emulator.created_tasks(api_key) if t["task_id"] == done["id"]]
    assert (record["status"], record["cost"], record["billed"]) == ("failed", "$0.00", "0")
    usage = client.get("/v1/usage").json()["data"]["items"]
    assert done["id"] not in [u["task_id"] for u in usage]
    return error


# --------------------------------------------------------------------------- lineage


def test_edit_is_drawn_from_its_fetched_inputs_and_records_their_sha256(
    manual: EmulatorProcess,
    emulator_client: httpx.Client,
    emulator_api_key: str,
    local_s3: LocalS3,
    s3_bucket: str,
) -> None:
    source_url, source = generation(manual, emulator_client, "a lighthouse at dusk")
    gen_chunks = chunks(source)
    assert gen_chunks[PROMPT] == "a lighthouse at dusk"
    assert gen_chunks.get(SOURCES, "") == ""  # a generation has no sources

    jpeg = jpeg_bytes((10, 20, 200))
    s3_url = presign(local_s3, s3_bucket, "inputs/second.jpg", jpeg)
    balance = manual.balance(emulator_api_key)
    task = post(
        emulator_client,
        prompt="turn it into a night scene",
        image_urls=[source_url, s3_url],
        model="nanobanana-pro",
    )
    assert task["type"] == "image_edit" and task["status"] == "pending"
    done = run_manual(manual, task["id"])
    assert done["status"] == "completed", done
    assert done["cost"] == "$0.0160"  # a successful edit is billed ...
    assert manual.balance(emulator_api_key) == balance - Decimal("0.016")
    output = httpx.get(done["output"]["url"], trust_env=False).content
    meta = chunks(output)
    # ... and its PNG names the exact bytes it was made from, in input order.
    assert meta[SOURCES] == f"{sha(source)},{sha(jpeg)}"
    assert meta[PROMPT] == "turn it into a night scene"
    with Image.open(io.BytesIO(output)) as image:
        assert image.size == (1376, 768)
    # Realistic like a generation: a PNG of the same order of size.
    assert len(source) / 3 < len(output) < len(source) * 3, (len(source), len(output))
    assert manual.task(task["id"])["sources"] == [sha(source), sha(jpeg)]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_edit_output_shows_its_first_input(
    manual: EmulatorProcess,
    emulator_client: httpx.Client,
    inputs: InputServer,
    fmt: str,
) -> None:
    """Visibly derived: the centre of the output takes the first input's colour."""
    centres = {}
    for name, colour in (("red", (250, 0, 0)), ("blue", (0, 0, 250))):
        buffer = io.BytesIO()
        Image.new("RGB", (400, 225), colour).save(buffer, fmt)
        inputs.files[f"/{name}"] = (buffer.getvalue(), "application/octet-stream")
        task = post(emulator_client, prompt="same prompt", image_urls=[f"{inputs.base_url}/{name}"])
        done = run_manual(manual, task["id"])
        assert done["status"] == "completed", done
        output = httpx.get(done["output"]["url"], trust_env=False).content
        assert chunks(output)[SOURCES] == sha(inputs.files[f"/{name}"][0])
        with Image.open(io.BytesIO(output)) as image:
            rgb = image.convert("RGB")
            centres[name] = rgb.getpixel((rgb.width // 2, rgb.height // 3))
    red, blue = centres["red"], centres["blue"]
    assert red[0] > red[2] + 80, centres
    assert blue[2] > blue[0] + 80, centres


def test_every_image_shows_its_prompt() -> None:
    """The prompt is drawn (pixels change with it), for generations and edits alike."""
    source = png_bytes((120, 90, 30))
    sources, copy = prepare_sources([source], 1344, 768)
    assert sources == [sha(source)]
    for extra in ({}, {"sources": tuple(sources), "source_image": copy}):
        one = Image.open(
            io.BytesIO(render_png(RenderSpec("gen_x", 0, 1344, 768, "a cat", **extra)))
        )
        two = Image.open(
            io.BytesIO(render_png(RenderSpec("gen_x", 0, 1344, 768, "a dog", **extra)))
        )
        assert one.text[PROMPT] == "a cat" and two.text[PROMPT] == "a dog"
        band = (0, 768 - 768 // 5, 1344, 768)
        assert one.crop(band).tobytes() != two.crop(band).tobytes()
        assert one.crop((0, 0, 1344, 300)).tobytes() == two.crop((0, 0, 1344, 300)).tobytes()


def test_inputs_are_fetched_while_processing_not_at_post_time(
    manual: EmulatorProcess, emulator_client: httpx.Client, inputs: InputServer
) -> None:
    inputs.files["/in.png"] = (png_bytes((50, 60, 70)), "image/png")
    task = post(emulator_client, image_urls=[f"{inputs.base_url}/in.png"])
    assert inputs.requests["/in.png"] == 0  # accepted without looking at the input
    done = run_manual(manual, task["id"])
    assert done["status"] == "completed"
    assert inputs.requests["/in.png"] == 1


def test_a_held_fetch_blocks_neither_the_api_nor_other_tasks(
    manual: EmulatorProcess, emulator_client: httpx.Client, inputs: InputServer
) -> None:
    edit = post(emulator_client, image_urls=[f"{inputs.base_url}/held.png"])
    assert manual.advance(edit["id"])["status"] == "processing"
    assert inputs.hold_reached.wait(10)  # the emulator is now waiting on the input server
    # Meanwhile the emulator serves everything else: a whole generation, its file, reads.
    other = post(emulator_client, prompt="meanwhile")
    assert run_manual(manual, other["id"])["status"] == "completed"
    assert emulator_client.get(f"/v1/tasks/{edit['id']}").json()["data"]["status"] == "processing"
    inputs.release.set()
    done = manual.advance(edit["id"])  # waits for the fetch, then ends the task
    assert done["status"] == "completed", done


def test_edit_of_scheduler_mode_finishes_without_admin_help(
    emulator: EmulatorProcess, emulator_client: httpx.Client, inputs: InputServer
) -> None:
    """Timed mode: an edit whose processing time is up before its input arrived ends then."""
    emulator.set_config(pending_seconds=0, processing_seconds=0)
    edit = post(emulator_client, image_urls=[f"{inputs.base_url}/held.png"])
    assert inputs.hold_reached.wait(10)
    assert emulator_client.get(f"/v1/tasks/{edit['id']}").json()["data"]["status"] == "processing"
    inputs.release.set()
    deadline = time.monotonic() + 10
    while (status := emulator.task(edit["id"])["status"]) == "processing":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert status == "completed"


# --------------------------------------------------------------------------- failing inputs


def test_unreachable_inputs_fail_the_task_unbilled(
    manual: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    balance = manual.balance(emulator_api_key)
    cases = [
        (f"http://127.0.0.1:{closed_port()}/in.png", "connection refused"),
        ("https://example.com/in.png", "not on input_allowed_hosts"),
        (f"{manual.base_url}/images/gen_doesnotexist/0.png", "HTTP 404"),
    ]
    for url, fragment in cases:
        task = post(emulator_client, image_urls=[url])
        done = run_manual(manual, task["id"])
        error = assert_failed_unbilled(manual, emulator_client, emulator_api_key, done, fragment)
        assert "could not be fetched" in error
    assert manual.balance(emulator_api_key) == balance


def test_expired_presigned_input_fails_the_task_unbilled(
    manual: EmulatorProcess,
    emulator_client: httpx.Client,
    emulator_api_key: str,
    local_s3: LocalS3,
    s3_bucket: str,
) -> None:
    data = png_bytes((9, 99, 199))
    fresh = presign(local_s3, s3_bucket, "inputs/fresh.png", data)
    expiring = presign(local_s3, s3_bucket, "inputs/expiring.png", data, expires=1)
    # Before expiry the very same kind of URL works, so the failure below is the expiry.
    done = run_manual(manual, post(emulator_client, image_urls=[fresh])["id"])
    assert done["status"] == "completed", done
    deadline = time.monotonic() + 15
    while httpx.get(expiring, trust_env=False).status_code == 200:  # the clock, not a guess
        assert time.monotonic() < deadline, "presigned URL never expired"
        time.sleep(0.1)
    task = post(emulator_client, image_urls=[expiring])
    done = run_manual(manual, task["id"])
    error = assert_failed_unbilled(
        manual, emulator_client, emulator_api_key, done, "HTTP 403", "(AccessDenied"
    )
    assert "X-Amz-Signature" not in error  # the signature is never echoed
    assert "/inputs/expiring.png" in error

    # What the client makes of it: the service's failure, classified as the taxonomy says (an
    # upstream failure: a fresh attempt may succeed — here with a freshly signed input).
    from prefect_eggapi.client import EggAPIClient
    from prefect_eggapi.client.errors import ErrorClass, TaskFailedError, classify, describe

    with (
        EggAPIClient(emulator_api_key, manual.base_url, rate_limit=None) as client,
        pytest.raises(TaskFailedError) as failed,
    ):
        client.wait_for_task(task["id"], timeout=10)
    assert classify(failed.value) is ErrorClass.RETRYABLE
    assert failed.value.task.cost_amount == 0
    assert "HTTP 403" in str(failed.value) and "AccessDenied" in describe(failed.value)["message"]
    resigned = presign(local_s3, s3_bucket, "inputs/expiring.png", data)
    again = run_manual(manual, post(emulator_client, image_urls=[resigned])["id"])
    assert again["status"] == "completed", again


def test_non_image_inputs_fail_the_task_unbilled(
    manual: EmulatorProcess,
    emulator_client: httpx.Client,
    emulator_api_key: str,
    local_s3: LocalS3,
    s3_bucket: str,
    inputs: InputServer,
) -> None:
    gif = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(gif, "GIF")
    inputs.files["/anim.gif"] = (gif.getvalue(), "image/gif")
    inputs.files["/truncated.png"] = (png_bytes((5, 5, 5))[:-40], "image/png")
    good_url, _ = generation(manual, emulator_client, "a good input")
    cases = [
        ([presign(local_s3, s3_bucket, "inputs/notes.png", b"just some text, not pixels")], 0),
        ([f"{inputs.base_url}/anim.gif"], 0),  # an image, but not PNG, JPEG or WEBP
        ([good_url, f"{inputs.base_url}/truncated.png"], 1),  # the second input is broken
    ]
    for urls, index in cases:
        done = run_manual(manual, post(emulator_client, image_urls=urls)["id"])
        assert_failed_unbilled(
            manual,
            emulator_client,
            emulator_api_key,
            done,
            f"image_urls[{index}]",
            "is not a supported image (PNG, JPEG or WEBP)",
        )


def test_too_large_inputs_fail_the_task_unbilled_without_reading_them_whole(
    manual: EmulatorProcess,
    emulator_client: httpx.Client,
    emulator_api_key: str,
    local_s3: LocalS3,
    s3_bucket: str,
    inputs: InputServer,
) -> None:
    # Over the default 20 MiB, announced by Content-Length (S3).
    big = png_bytes((1, 1, 1))[:64] + bytes(21 * MIB)
    url = presign(local_s3, s3_bucket, "inputs/big.png", big)
    done = run_manual(manual, post(emulator_client, image_urls=[url])["id"])
    assert_failed_unbilled(
        manual, emulator_client, emulator_api_key, done, "is larger than the 20 MiB input limit"
    )
    # Chunked without a length: the stream is cut at the cap, not read to its 64 MiB end.
    done = run_manual(
        manual, post(emulator_client, image_urls=[f"{inputs.base_url}/stream.png"])["id"]
    )
    assert_failed_unbilled(
        manual, emulator_client, emulator_api_key, done, "is larger than the 20 MiB input limit"
    )
    assert inputs.streamed < 40 * MIB, inputs.streamed


def test_slow_input_times_out(
    manual: EmulatorProcess,
    emulator_client: httpx.Client,
    emulator_api_key: str,
    inputs: InputServer,
) -> None:
    manual.set_config(input_fetch_timeout_seconds=0.5)
    done = run_manual(
        manual, post(emulator_client, image_urls=[f"{inputs.base_url}/held.png"])["id"]
    )
    assert_failed_unbilled(manual, emulator_client, emulator_api_key, done, "timed out after 0.5 s")


def test_failed_edits_are_not_billed_in_the_audit_or_usage(
    manual: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    """Section 8.6 / 17.14: a failed task costs "$0.00"; only completed ones are billed."""
    good_url, _ = generation(manual, emulator_client, "round 0")
    ok = run_manual(manual, post(emulator_client, image_urls=[good_url])["id"])
    bad = run_manual(
        manual, post(emulator_client, image_urls=[f"http://127.0.0.1:{closed_port()}/x.png"])["id"]
    )
    assert ok["status"] == "completed" and bad["status"] == "failed"
    audit = {t["task_id"]: t for t in manual.created_tasks(emulator_api_key)}
    assert len(audit) == 3  # all three were created ...
    billed = sum(Decimal(t["billed"]) for t in audit.values())
    assert billed == Decimal("0.02")  # ... but only the two completed ones were billed
    assert audit[bad["id"]]["billed"] == "0"
    summary = emulator_client.get("/v1/usage/summary").json()["data"]
    assert summary == [
        {"model": "nanobanana", "total_units": 2, "total_cost": "$0.0200", "request_count": 2}
    ]


def test_redirects_are_followed_but_only_to_allowed_hosts(
    manual: EmulatorProcess,
    emulator_client: httpx.Client,
    emulator_api_key: str,
    inputs: InputServer,
) -> None:
    data = png_bytes((70, 80, 90))
    inputs.files["/moved.png"] = (data, "image/png")
    done = run_manual(
        manual,
        post(emulator_client, image_urls=[f"{inputs.base_url}/redirect?to=/moved.png"])["id"],
    )
    assert done["status"] == "completed", done
    output = httpx.get(done["output"]["url"], trust_env=False).content
    assert chunks(output)[SOURCES] == sha(data)  # the bytes at the end of the redirect
    away = f"{inputs.base_url}/redirect?to=http://files.example.net/x.png"
    done = run_manual(manual, post(emulator_client, image_urls=[away])["id"])
    assert_failed_unbilled(
        manual,
        emulator_client,
        emulator_api_key,
        done,
        "'files.example.net' is not on input_allowed_hosts",
    )


def test_fetch_inputs_switch_skips_fetching(
    manual: EmulatorProcess, emulator_client: httpx.Client, inputs: InputServer
) -> None:
    manual.set_config(fetch_inputs=False)
    done = run_manual(
        manual, post(emulator_client, image_urls=[f"{inputs.base_url}/none.png"])["id"]
    )
    assert done["status"] == "completed" and done["type"] == "image_edit"
    assert inputs.requests["/none.png"] == 0
    output = httpx.get(done["output"]["url"], trust_env=False).content
    assert chunks(output).get(SOURCES, "") == ""


def test_own_fetches_skip_download_faults_and_the_download_count(
    manual: EmulatorProcess, emulator_client: httpx.Client, emulator_api_key: str
) -> None:
    """Download faults script the client under test: the emulator reading its own output (the
    service reading its CDN) neither trips nor uses them up, nor counts as a client download."""
    url, _ = generation(manual, emulator_client, "round 0")
    downloads = manual.request_count(None, "download")
    manual.add_fault("truncated_download", times=1)
    done = run_manual(manual, post(emulator_client, image_urls=[url])["id"])
    assert done["status"] == "completed", done
    assert manual.request_count(None, "download") == downloads
    (rule,) = manual.faults()
    assert rule["fired"] == 0
    with pytest.raises(httpx.TransportError):  # the client's own download still gets the fault
        httpx.get(url, trust_env=False)


# --------------------------------------------------------------------------- seeded fault rates

RATES = {
    "post_502_before_create": 0.2,
    "post_502_after_create": 0.1,
    "upstream_failure": 0.2,
    "empty_output": 0.1,
}


def outcomes(
    emulator: EmulatorProcess, client: httpx.Client, n: int, poll: bool = False
) -> list[str]:
    """What each of ``n`` POSTs met: a status code, and the task's planned fault."""
    seen: list[str] = []
    for i in range(n):
        response = client.post("/v1/generate", json={"model": "nanobanana", "prompt": f"p{i}"})
        seen.append(str(response.status_code))
        if poll:
            client.get("/v1/tasks")  # extra opportunities for other rules must not matter
    for task in reversed(emulator.tasks()):  # oldest first
        seen.append(",".join(task["faults"]) or "-")
    return seen


def test_seeded_fault_rates_are_reproducible_and_differ_by_seed(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    config = emulator.config.model_copy(
        update={
            "manual": True,
            "fault_rates": RATES,
            "fault_seed": 7,
            "rate_limit_per_second": None,
        }
    )
    emulator.reset(config)
    first = outcomes(emulator, emulator_client, 60)
    fired = Counter(f["kind"] for f in emulator.audit()["faults_fired"])
    for kind in ("error_before_create", "error_after_create", "upstream_failure", "empty_output"):
        assert 0 < fired[kind] < 60, fired  # rates, not rules that always or never fire
    assert first.count("502") == fired["error_before_create"] + fired["error_after_create"]

    emulator.reset(config)
    assert outcomes(emulator, emulator_client, 60) == first  # same seed, same calls: same faults
    # Polling in between (with a rate on get_task too) changes nothing for the POSTs.
    emulator.reset(config.model_copy(update={"fault_rates": {**RATES, "list_tasks_500": 0.5}}))
    assert outcomes(emulator, emulator_client, 60, poll=True) == first
    emulator.reset(config.model_copy(update={"fault_seed": 8}))
    assert outcomes(emulator, emulator_client, 60) != first


def test_fault_rates_through_the_control_endpoint_and_seed(
    emulator: EmulatorProcess, emulator_client: httpx.Client
) -> None:
    emulator.set_config(manual=True, rate_limit_per_second=None)
    emulator.set_config(fault_rates={"post_503_before_create": 0.5}, seed=11)
    rules = emulator.faults()
    assert [(r["id"], r["kind"], r["status"], r["rate"], r["origin"]) for r in rules] == [
        ("rate_post_503_before_create", "error_before_create", 503, 0.5, "rate")
    ]
    first = outcomes(emulator, emulator_client, 30)
    emulator.set_config(manual=False)  # an unrelated patch keeps the plan where it is
    assert emulator.faults()[0]["seen"] == 30
    emulator.set_config(seed=11)  # reseeding restarts the draws
    again = [
        str(
            emulator_client.post(
                "/v1/generate", json={"model": "nanobanana", "prompt": "x"}
            ).status_code
        )
        for _ in range(30)
    ]
    assert again == first[:30]
    assert "503" in again and "202" in again
    # A rate on an explicit rule, added at runtime.
    emulator.set_config(fault_rates={})
    emulator.add_fault("http_error", endpoint="get_task", status=500, rate=0.0)
    (rule,) = emulator.faults()
    assert rule["rate"] == 0.0 and rule["times"] is None  # a rated rule fires forever by default
    response = httpx.patch(
        f"{emulator.base_url}/_emulator/config",
        json={"fault_rates": {"no_such_fault": 0.1}},
        trust_env=False,
    )
    assert response.status_code == 400 and "no_such_fault" in response.text


def test_fault_rates_at_startup_from_the_cli() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--fault-rate",
            "post_502_before_create=0.1",
            "--fault-rate",
            "late_answer=0.02",
            "--fault-seed",
            "3",
        ]
    )
    config = build_config(args)
    assert config.fetch_inputs is True
    assert config.input_allowed_hosts == ["localhost", "127.0.0.0/8", "::1/128"]
    assert config.fault_rates == {"post_502_before_create": 0.1, "late_answer": 0.02}
    assert config.effective_fault_seed() == 3
    late = rate_rule("late_answer", 0.02)
    assert (late.kind, late.rate, late.times, late.delay) == (
        "timeout_after_create",
        0.02,
        None,
        60.0,
    )
    custom = rate_rule("late_answer", {"rate": 0.5, "delay": 4})
    assert custom.delay == 4 and custom.rate == 0.5
    assert FaultRule(kind="upstream_failure", rate=0.3, times=2).times == 2
    switches = build_config(parser.parse_args(["--no-fetch-inputs", "--input-allow-host", "*"]))
    assert switches.fetch_inputs is False and switches.input_allowed_hosts == ["*"]
    with pytest.raises(ValueError, match="NAME=RATE"):
        build_config(parser.parse_args(["--fault-rate", "post_502_before_create"]))
    with pytest.raises(ValueError, match="unknown name"):
        EmulatorConfig(fault_rates={"post_502_sometimes": 0.1})


def test_fault_rates_in_the_startup_config_of_a_process(emulator_api_key: str) -> None:
    from fixtures_emulator import emulator_test_config

    config = emulator_test_config().model_copy(
        update={"fault_rates": {"post_500_before_create": 1.0}, "seed": 5}
    )
    with EmulatorProcess(config) as process:
        response = httpx.post(
            f"{process.base_url}/v1/generate",
            json={"model": "nanobanana", "prompt": "x"},
            headers={"Authorization": f"Bearer {emulator_api_key}"},
            trust_env=False,
        )
        assert response.status_code == 500
        process.reset()  # back to the startup config: the rate is still there
        assert [r["id"] for r in process.faults()] == ["rate_post_500_before_create"]
