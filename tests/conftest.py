"""Shared fixtures: synthetic photos written on the fly (tests never use real photos from git)."""
import io
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SAMPLE = os.path.join(ROOT, "..", "shared", "datasets", "dogs-vs-cats-3k")


def synthetic_photo(seed, size=(96, 80), mode="RGB"):
    """A smooth random picture: distinct seeds give distinct photos (no accidental
    near-duplicates), the same seed gives the same one."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize(size, Image.BICUBIC)
    return img.convert(mode) if mode != "RGB" else img


def photo_bytes(seed, size=(96, 80), mode="RGB", fmt="JPEG", **save_args):
    buffer = io.BytesIO()
    synthetic_photo(seed, size, mode).save(buffer, fmt, **save_args)
    return buffer.getvalue()


def read_tree(folder):
    """{relative path: bytes} of every file under folder."""
    found = {}
    for here, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(here, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


@pytest.fixture
def write_photo():
    """write_photo(path, seed, size=(96, 80), mode="RGB", fmt="JPEG", **save_args) -> path"""

    def write(path, seed, size=(96, 80), mode="RGB", fmt="JPEG", **save_args):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.write(photo_bytes(seed, size, mode, fmt, **save_args))
        return path

    return write
