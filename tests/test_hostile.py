"""Hostile uploads: each gets a 4xx with a JSON reason, or a correct prediction. Never a
5xx, never a crash. The corpus is generated here (no files in git). It runs in-process on
Flask's test client; one upload goes through a real waitress, whose own body limit sits
far above the app's."""
import collections
import functools
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service_helpers import (
    client_of,
    in_process,
    png_chunks,
    sample,
    scrape,
    served,
    synthetic_photo,
    tiny_model,
    upload,
)

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
        "zero_bytes": ({"files": {"file": ("a.jpg", b"")}}, 400, None),
        "no_body": ({}, 400, None),
        "wrong_field_name": ({"files": {"photo": ("a.jpg", photo)}}, 400, None),
        "truncated_jpeg": ({"files": {"file": ("a.jpg", photo[: len(photo) // 2])}}, 422, None),
        "text_named_jpg": ({"files": {"file": ("cat.jpg", b"hello, I am a text file\n" * 50)}}, 422, None),
        "pdf_as_raw_image": ({"data": b"%PDF-1.4\n" + b"0" * 500, "headers": {"Content-Type": "image/jpeg"}}, 422, None),
        "png_bomb_over_pillow_guard": ({"files": {"file": ("bomb.png", png_bomb(30_000, rows=100))}}, 422, None),
        "png_bomb_over_pixel_limit": ({"files": {"file": ("bomb.png", png_bomb(7_000))}}, 422, None),
        "upload_50_mb": ({"files": {"file": ("big.jpg", b"\xff\xd8\xff" + bytes(50 * 1024 * 1024))}}, 413, None),
        "json_body": ({"json": {"image": "cat.jpg"}}, 415, None),
        "icon_format": ({"files": {"file": ("a.jpg", encode(Image.new("RGB", (64, 64), RED), "ICO"))}}, 415, None),
        "tiny_image": ({"files": {"file": ("a.png", encode(Image.new("RGB", (8, 8), RED), "PNG"))}}, 422, None),
        "animated_gif": ({"files": {"file": ("a.gif", animated_gif(RED))}}, 200, "cat"),
        "png_16bit_rgb": ({"files": {"file": ("a.png", png_16bit_rgb(BLUE))}}, 200, "dog"),
        "png_16bit_gray": ({"files": {"file": ("a.png", encode(Image.fromarray(
            np.full((64, 64), 40000, np.uint16)), "PNG"))}}, 200, None),
        "cmyk_jpeg": ({"files": {"file": ("a.jpg", encode(Image.new("CMYK", (96, 96), (255, 200, 0, 0)), "JPEG"))}},
                      200, "dog"),
        "rgba_png_transparent": ({"files": {"file": ("a.png", encode(Image.new("RGBA", (64, 64), RED + (255,)), "PNG"))}},
                                 200, "cat"),
        "exif_rotated_jpeg": ({"files": {"file": ("a.jpg", exif_rotated_jpeg(BLUE))}}, 200, "dog"),
        "phone_size_rotated_jpeg": ({"files": {"file": ("a.jpg", exif_rotated_jpeg(RED, (4032, 3024)))}}, 200, "cat"),
        "webp_named_png": ({"files": {"file": ("a.png", encode(Image.new("RGB", (64, 64), RED), "WEBP"))}}, 200, "cat"),
        "grayscale_jpeg_raw_body": ({"data": encode(Image.new("L", (64, 64), 128), "JPEG"),
                                 "headers": {"Content-Type": "image/jpeg"}}, 200, None),
        # The audit's lying files: a header declaring far more than the data holds.
        "png_with_5_of_3000_rows": ({"files": {"file": ("a.png", png_rows(3000, 3000, 5))}}, 422, None),
        "jpeg_header_claims_6300x6300_over_64x64": ({"files": {"file": ("a.jpg", jpeg_lying_size(6300))}}, 422, None),
        "lossless_webp_6300x6300": ({"files": {"file": ("a.webp", encode(Image.new("RGBA", (6300, 6300)), "WEBP",
                                                                         lossless=True))}}, 422, None),
        "png_1x16000000": ({"files": {"file": ("a.png", png_chunks(1, 16_000_000, 8, 0, b""))}}, 422, None),
        # Under the 16 MP of lossless formats, over WebP's own cap (its decoder's canvases).
        "lossless_webp_4000x3000": ({"files": {"file": ("a.webp", encode(Image.new("RGBA", (4000, 3000)), "WEBP",
                                                                         lossless=True))}}, 422, None),
    }


def png_rows(width, height, rows):
    """An RGB PNG declaring width x height whose data ends after `rows` rows (a complete zlib stream)."""
    return png_chunks(width, height, 8, 2, zlib.compress((b"\x00" + b"\x80" * (3 * width)) * rows))


def jpeg_lying_size(side):
    """A 64x64 JPEG whose frame header says side x side."""
    data = bytearray(encode(Image.new("RGB", (64, 64), RED), "JPEG"))
    frame = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, frame + 5, side, side)
    return bytes(data)


def post(client, files=None, **kwargs):
    """POST /predict with a corpus entry (requests-style arguments) on the test client."""
    if files:
        ((field, (name, content)),) = files.items()
        kwargs.update(upload(content, name, field))
    return client.post("/predict", **kwargs)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    yield from client_of(tmp_path_factory)


NAMES = ("zero_bytes", "no_body", "wrong_field_name", "truncated_jpeg", "text_named_jpg", "pdf_as_raw_image",
         "png_bomb_over_pillow_guard", "png_bomb_over_pixel_limit", "upload_50_mb", "json_body", "icon_format",
         "tiny_image", "animated_gif", "png_16bit_rgb", "png_16bit_gray", "cmyk_jpeg", "rgba_png_transparent",
         "exif_rotated_jpeg", "phone_size_rotated_jpeg", "webp_named_png", "grayscale_jpeg_raw_body",
         "png_with_5_of_3000_rows", "jpeg_header_claims_6300x6300_over_64x64", "lossless_webp_6300x6300",
         "png_1x16000000", "lossless_webp_4000x3000")
# The reason each lying file is refused with: refused for what it is, before decoding.
REASONS = {"png_with_5_of_3000_rows": "truncated", "jpeg_header_claims_6300x6300_over_64x64": "truncated",
           "lossless_webp_6300x6300": "too_many_pixels", "png_1x16000000": "too_small",
           "lossless_webp_4000x3000": "too_many_pixels"}


@pytest.mark.parametrize("name", NAMES)
def test_hostile_upload_gets_a_4xx_or_a_correct_prediction(client, name):
    kwargs, status, label = corpus()[name]
    r = post(client, **kwargs)
    assert r.status_code == status, r.text[:300]
    body = r.json
    if status == 200:
        assert label is None or body["label"] == label
        assert body["label"] in ("cat", "dog") and body["request_id"] == r.headers["X-Request-ID"]
    else:
        assert set(body) == {"error", "message", "request_id"} and body["error"] and body["message"]
        assert body["request_id"] == r.headers["X-Request-ID"]
        assert body["error"] == REASONS.get(name, body["error"]), body


def test_service_is_healthy_after_the_corpus(tmp_path):
    assert set(corpus()) == set(NAMES)
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"))
    for kwargs, _, _ in corpus().values():
        post(client, **kwargs)
    assert client.get("/health").status_code == 200
    assert post(client, files={"file": ("a.jpg", synthetic_photo(np.random.default_rng(1), "dog"))}).json["label"] == "dog"
    series = scrape(client.get("/metrics").text)
    service.close()
    answered = {dict(labels)["status"]: value for (name, labels), value in series.items()
                if name == "catdog_requests_total" and dict(labels)["endpoint"] == "/predict"}
    expected = collections.Counter(str(status) for _, status, _ in corpus().values())
    expected["200"] += 1  # the photo after the corpus
    assert answered == expected  # every upload answered as listed: no 5xx among them
    assert series[("catdog_in_flight_requests", ())] == 1  # only the scrape itself


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from served(tmp_path_factory)


def test_waitress_passes_an_oversize_upload_to_the_app_for_a_json_413(server):
    # waitress's own cap (64 MB here) only guards memory; the app's 10 MB limit answers, in JSON
    r = server.post("/predict", **corpus()["upload_50_mb"][0])
    assert (r.status_code, r.json()["error"], r.json()["request_id"]) == (413, "too_large", r.headers["X-Request-ID"])
    assert "10 MB" in r.json()["message"]
    assert server.predict(synthetic_photo(np.random.default_rng(2), "cat")).json()["label"] == "cat"
    assert sample(server.get("/metrics").text, "catdog_requests_total", endpoint="/predict", status="413") == 1


def test_a_small_form_in_too_many_parts_is_told_so_not_called_too_large(tmp_path):
    """The audit's 10,000-part multipart got "exceeds the 10 MB limit" although it is ~1 MB."""
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"))
    parts = {f"file{k}": (io.BytesIO(b"x"), f"{k}.jpg") for k in range(10_000)}
    r = client.post("/predict", data=parts, content_type="multipart/form-data")
    service.close()
    assert r.status_code == 413 and r.json["error"] == "too_many_parts", r.json
    assert "1000 parts" in r.json["message"]
