"""Hostile uploads: each gets a 4xx with a JSON reason, or a correct prediction. Never a
5xx, never a crash. The corpus is generated here (no files in git)."""
import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service_helpers import png_chunks, served, synthetic_photo

RED, BLUE = (200, 60, 40), (40, 60, 200)  # the tiny model: reddish is a cat, bluish a dog


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(side, rows=None):
    """A small PNG that inflates to side x side 8-bit gray pixels (only `rows` of them
    present when given: the header alone must be refused)."""
    row, compressor, parts = b"\x00" * (side + 1), zlib.compressobj(9), []
    for _ in range(rows or side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    return png_chunks(side, side, 8, 0, b"".join(parts))


def png_16bit_rgb(color, side=64):
    pixel = struct.pack(">HHH", *(c * 257 for c in color))
    return png_chunks(side, side, 16, 2, zlib.compress((b"\x00" + pixel * side) * side))


def animated_gif(color):
    frames = [Image.new("RGB", (64, 64), tuple(max(0, c - 20 * i) for c in color)) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(color, size=(80, 48)):
    img = Image.new("RGB", size, color)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    return encode(img, "JPEG", exif=exif)


@functools.cache
def corpus():
    """name -> (request kwargs, expected status, expected label); built on first use."""
    rng = np.random.default_rng(42)
    photo = synthetic_photo(rng, "cat")
    return {
        "zero_bytes": (dict(files={"file": ("a.jpg", b"")}), 400, None),
        "no_body": (dict(), 400, None),
        "wrong_field_name": (dict(files={"photo": ("a.jpg", photo)}), 400, None),
        "truncated_jpeg": (dict(files={"file": ("a.jpg", photo[: len(photo) // 2])}), 422, None),
        "text_named_jpg": (dict(files={"file": ("cat.jpg", b"hello, I am a text file\n" * 50)}), 422, None),
        "pdf_as_raw_image": (dict(data=b"%PDF-1.4\n" + b"0" * 500, headers={"Content-Type": "image/jpeg"}), 422, None),
        "png_bomb_over_pillow_guard": (dict(files={"file": ("bomb.png", png_bomb(30_000, rows=100))}), 422, None),
        "png_bomb_over_pixel_limit": (dict(files={"file": ("bomb.png", png_bomb(7_000))}), 422, None),
        "upload_50_mb": (dict(files={"file": ("big.jpg", b"\xff\xd8\xff" + bytes(50 * 1024 * 1024))}), 413, None),
        "json_body": (dict(json={"image": "cat.jpg"}), 415, None),
        "icon_format": (dict(files={"file": ("a.jpg", encode(Image.new("RGB", (64, 64), RED), "ICO"))}), 415, None),
        "tiny_image": (dict(files={"file": ("a.png", encode(Image.new("RGB", (8, 8), RED), "PNG"))}), 422, None),
        "animated_gif": (dict(files={"file": ("a.gif", animated_gif(RED))}), 200, "cat"),
        "png_16bit_rgb": (dict(files={"file": ("a.png", png_16bit_rgb(BLUE))}), 200, "dog"),
        "png_16bit_gray": (dict(files={"file": ("a.png", encode(Image.fromarray(
            np.full((64, 64), 40000, np.uint16)), "PNG"))}), 200, None),
        "cmyk_jpeg": (dict(files={"file": ("a.jpg", encode(Image.new("CMYK", (96, 96), (255, 200, 0, 0)), "JPEG"))}),
                      200, "dog"),
        "rgba_png_transparent": (dict(files={"file": ("a.png", encode(Image.new("RGBA", (64, 64), RED + (255,)), "PNG"))}),
                                 200, "cat"),
        "exif_rotated_jpeg": (dict(files={"file": ("a.jpg", exif_rotated_jpeg(BLUE))}), 200, "dog"),
        "phone_size_rotated_jpeg": (dict(files={"file": ("a.jpg", exif_rotated_jpeg(RED, (4032, 3024)))}), 200, "cat"),
        "webp_named_png": (dict(files={"file": ("a.png", encode(Image.new("RGB", (64, 64), RED), "WEBP"))}), 200, "cat"),
        "grayscale_jpeg_raw_body": (dict(data=encode(Image.new("L", (64, 64), 128), "JPEG"),
                                         headers={"Content-Type": "image/jpeg"}), 200, None),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from served(tmp_path_factory)


NAMES = ("zero_bytes", "no_body", "wrong_field_name", "truncated_jpeg", "text_named_jpg", "pdf_as_raw_image",
         "png_bomb_over_pillow_guard", "png_bomb_over_pixel_limit", "upload_50_mb", "json_body", "icon_format",
         "tiny_image", "animated_gif", "png_16bit_rgb", "png_16bit_gray", "cmyk_jpeg", "rgba_png_transparent",
         "exif_rotated_jpeg", "phone_size_rotated_jpeg", "webp_named_png", "grayscale_jpeg_raw_body")


@pytest.mark.parametrize("name", NAMES)
def test_hostile_upload_gets_a_4xx_or_a_correct_prediction(server, name):
    kwargs, status, label = corpus()[name]
    r = server.post("/predict", **kwargs)
    assert r.status_code == status, r.text[:300]
    body = r.json()
    if status == 200:
        assert label is None or body["label"] == label
    else:
        assert body["error"] and body["message"] and body["request_id"] == r.headers["X-Request-ID"]
    assert server.proc.poll() is None


def test_service_is_healthy_after_the_corpus(server):
    assert set(corpus()) == set(NAMES)
    for kwargs, _, _ in corpus().values():
        server.post("/predict", **kwargs)
    assert server.get("/health").status_code == 200
    assert server.predict(synthetic_photo(np.random.default_rng(1), "dog")).json()["label"] == "dog"
    metrics = server.get("/metrics").text
    assert 'status="413"' in metrics and 'status="422"' in metrics
    assert 'status="5' not in metrics
