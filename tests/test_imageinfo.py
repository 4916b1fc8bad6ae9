"""Format and pixel size from magic bytes, checked against real images drawn by Pillow."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from prefect_eggapi.client.imageinfo import (
    MAX_HEADER_BYTES,
    ImageInfo,
    ImageSniffer,
    detect_format,
    sniff,
)


def make_image(fmt: str, size: tuple[int, int] = (37, 23), **save: object) -> bytes:
    mode = "RGBA" if save.pop("alpha", False) else "RGB"
    img = Image.new(mode, size, (200, 40, 90, 128) if mode == "RGBA" else (200, 40, 90))
    # Some texture so encoders don't degenerate.
    for x in range(0, size[0], 3):
        img.putpixel((x, x % size[1]), (10, 220, 30) if mode == "RGB" else (10, 220, 30, 255))
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def feed_in_chunks(data: bytes, size: int) -> ImageInfo:
    sniffer = ImageSniffer()
    for i in range(0, len(data), size):
        sniffer.feed(data[i : i + size])
    return sniffer.info


CASES = [
    pytest.param("PNG", {}, "png", id="png"),
    pytest.param("PNG", {"alpha": True}, "png", id="png-rgba"),
    pytest.param("JPEG", {"quality": 80}, "jpeg", id="jpeg-baseline"),
    pytest.param("JPEG", {"progressive": True}, "jpeg", id="jpeg-progressive-sof2"),
    pytest.param("WEBP", {"quality": 70}, "webp", id="webp-lossy-vp8"),
    pytest.param("WEBP", {"lossless": True}, "webp", id="webp-lossless-vp8l"),
    pytest.param("WEBP", {"alpha": True, "quality": 70}, "webp", id="webp-alpha-vp8x"),
    pytest.param("GIF", {}, "gif", id="gif"),
]


@pytest.mark.parametrize(("pil_format", "save", "fmt"), CASES)
@pytest.mark.parametrize("size", [(37, 23), (1376, 768), (1, 1)])
def test_sniff_real_images(
    pil_format: str, save: dict[str, object], fmt: str, size: tuple[int, int]
) -> None:
    data = make_image(pil_format, size, **dict(save))
    info = sniff(data)
    assert info == ImageInfo(fmt, size[0], size[1])
    assert info.mime_type == f"image/{fmt}"


@pytest.mark.parametrize(("pil_format", "save", "fmt"), CASES)
def test_sniffer_fed_one_byte_at_a_time_gives_the_same_answer(
    pil_format: str, save: dict[str, object], fmt: str
) -> None:
    data = make_image(pil_format, (53, 31), **dict(save))
    whole = sniff(data)
    assert whole.format == fmt
    assert feed_in_chunks(data, 1) == whole
    assert feed_in_chunks(data, 7) == whole
    assert feed_in_chunks(data, 64 * 1024) == whole


def test_webp_variants_really_use_the_three_chunk_kinds() -> None:
    # Guard for the parametrization above: each WebP flavour exercises a different parser.
    assert make_image("WEBP", quality=70)[12:16] == b"VP8 "
    assert make_image("WEBP", lossless=True)[12:16] == b"VP8L"
    assert make_image("WEBP", alpha=True, quality=70, exif=b"Exif\x00\x00II*\x00")[12:16] == (
        b"VP8X"
    )
    info = sniff(make_image("WEBP", (300, 200), alpha=True, exif=b"Exif\x00\x00II*\x00"))
    assert info == ImageInfo("webp", 300, 200)


def test_jpeg_with_large_exif_and_icc_segments_before_sof() -> None:
    exif = b"Exif\x00\x00" + b"\x00" * 60_000
    icc = bytes(range(256)) * 600  # ~150 KB: split over several APP2 segments
    data = make_image("JPEG", (640, 360), exif=exif, icc_profile=icc)
    sof = data.find(b"\xff\xc0")
    assert sof > 200_000, "the SOF marker should sit behind the big APP segments"
    assert sniff(data) == ImageInfo("jpeg", 640, 360)
    assert feed_in_chunks(data, 4096) == ImageInfo("jpeg", 640, 360)
    assert feed_in_chunks(data, 64 * 1024) == ImageInfo("jpeg", 640, 360)


def test_jpeg_prefix_too_short_knows_format_but_not_size() -> None:
    data = make_image("JPEG", (640, 360), exif=b"Exif\x00\x00" + b"\x00" * 10_000)
    info = sniff(data[:5000])
    assert info.format == "jpeg"
    assert info.width is None and info.height is None
    assert info.extension == "jpg"


def test_jpeg_with_fill_bytes_and_restart_markers_before_sof() -> None:
    data = make_image("JPEG", (90, 45))
    # Insert fill bytes (0xFF 0xFF...) and a standalone marker right after SOI.
    patched = data[:2] + b"\xff\xff\xff\x01" + data[2:]
    assert sniff(patched) == ImageInfo("jpeg", 90, 45)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"GIF87a", "gif"),
        (b"GIF89a", "gif"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"<html><body>", None),
        (b"", None),
        (b"\x89PNG", None),
    ],
)
def test_detect_format_by_magic_bytes(head: bytes, fmt: str | None) -> None:
    assert detect_format(head) == fmt


def test_unknown_bytes_have_octet_stream_defaults() -> None:
    info = sniff(b'{"error": "not an image"}')
    assert info == ImageInfo(None)
    assert info.mime_type == "application/octet-stream"
    assert info.extension == "bin"


def test_sniffer_with_no_input_reports_nothing() -> None:
    assert ImageSniffer().info == ImageInfo(None)


def test_sniffer_stops_buffering_after_the_header_limit() -> None:
    # A JPEG whose SOF never arrives: memory must stay bounded at MAX_HEADER_BYTES.
    sniffer = ImageSniffer()
    sniffer.feed(b"\xff\xd8\xff\xe1\xff\xff")  # APP1 claims 65535 bytes
    filler = b"\x00" * 256 * 1024
    for _ in range(8):
        sniffer.feed(filler)
    assert len(sniffer._head) <= MAX_HEADER_BYTES
    assert sniffer.info.format == "jpeg"
    assert sniffer.info.width is None


def test_sniffer_does_not_restart_after_deciding_not_an_image() -> None:
    png = make_image("PNG", (10, 10))
    data = b"<html>error page, definitely not an image</html>" + png
    assert sniff(data).format is None
    chunked = ImageSniffer()
    chunked.feed(data[: -len(png)])
    chunked.feed(png)
    assert chunked.info.format is None
