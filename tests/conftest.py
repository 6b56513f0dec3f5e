"""Shared fixtures: synthetic photos written on the fly (tests never use real photos from git);
and REQUIRE_ALL_TOOLS=1 (CI), which turns a skip for a missing tool into a failure."""
import ast
import hashlib
import io
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SAMPLE = os.path.join(ROOT, "..", "shared", "datasets", "dogs-vs-cats-3k")


def synthetic_photo(seed, size=(96, 80), mode="RGB"):
    """A smooth random picture: distinct seeds give distinct photos (no accidental
    near-duplicates), the same seed gives the same one."""
    import harness  # here, not above: test_workflows loads this file as a plugin with tests/ alone on the path

    img = harness.picture(np.random.default_rng(seed), *size, noise=0)
    return img.convert(mode) if mode != "RGB" else img


def photo_bytes(seed, size=(96, 80), mode="RGB", fmt="JPEG", **save_args):
    buffer = io.BytesIO()
    synthetic_photo(seed, size, mode).save(buffer, fmt, **save_args)
    return buffer.getvalue()


def near_copy(data, scale=0.9, quality=60):
    """A resized, re-encoded copy of a photo: what a re-upload of a saved picture looks like."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    buffer = io.BytesIO()
    img.resize((round(img.width * scale), round(img.height * scale))).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def sha(data):
    """The sha256 of bytes, as the manifests and the photo store name them."""
    return hashlib.sha256(data).hexdigest()


def local_imports(module, seen=None):
    """The project's own modules `module` imports, directly or through each other."""
    seen = seen if seen is not None else {module}
    with open(os.path.join(ROOT, module)) as f:
        tree = ast.parse(f.read())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    for name in sorted(names):
        path = name.split(".")[0] + ".py"
        if path not in seen and os.path.isfile(os.path.join(ROOT, path)):
            seen.add(path)
            local_imports(path, seen)
    return seen


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


# REQUIRE_ALL_TOOLS=1 (set by CI, beside `make system-deps`, which then fails on a missing
# Debian package): a test that skips because a tool, package or module is missing (chromium,
# promtool, PostgreSQL, actionlint, axe-core, torch, ...) fails instead, so a job cannot stay
# green while part of the suite never ran. Skips whose reason says that data is absent stay
# skips: the photo samples of ../shared, the champion (models/, `make train`) and data/
# (`make data`) are not on a fresh CI runner, and no package brings them.
REQUIRE_ALL_TOOLS = os.environ.get("REQUIRE_ALL_TOOLS", "") not in ("", "0")
DATA_ABSENT = re.compile(r"\babsent\b|no champion yet|the champion has no|`make (?:data|train)\b")


def required_skip(report):
    """The reason of a skip that REQUIRE_ALL_TOOLS forbids, else None (xfail is no skip)."""
    if not (REQUIRE_ALL_TOOLS and report.skipped) or hasattr(report, "wasxfail"):
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    return None if DATA_ABSENT.search(reason) else reason


def fail_required_skip(report):
    reason = required_skip(report)
    if reason:
        report.outcome = "failed"
        report.longrepr = f"REQUIRE_ALL_TOOLS is set: this skip is a failure: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip in setup (a skipif mark, a fixture), in the test or in teardown."""
    return fail_required_skip((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """A skip while collecting a module (a module-level pytest.importorskip)."""
    return fail_required_skip((yield))
