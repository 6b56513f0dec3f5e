"""Fixtures for the service tests: a tiny exported model, synthetic photos, the app in-process, a real server.

The tiny model has the champion's layout (features -> Linear head) and a rule a test can
check: a reddish photo is a cat, a bluish one a dog. It goes through nets.export_onnx
like the real model, so the service cannot tell the difference.
"""
import atexit
import functools
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import catdog
import serve

ROOT = catdog.ROOT
SHARED = catdog.SHARED_SAMPLE
TINY_PREPROCESS = {"resize": 40, "crop": 32, "mean": 127.0, "std": 128.0}


def export_tiny_model(folder, version="tiny-1", dog_if_blue=True, profile=True):
    """models/model.onnx + model.json (+ reference_profile.json) of the red/blue rule; a
    very green image (mean green above 229) is "other"."""
    import torch
    from torch import nn

    import nets

    features = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # the mean of each channel
    model = nets.CatDogNet(features, nn.Linear(3, 2), nets.PetDecision(3, components=3))
    sign = 1.0 if dog_if_blue else -1.0
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[4.0, 0.0, -4.0], [-4.0, 0.0, 4.0]]) * sign)
        model.head.bias.zero_()
        model.pet.head.weight.copy_(torch.tensor([[0.0, -20.0, 0.0, 0.0]]))
        model.pet.head.bias.fill_(16.0)
    meta = catdog.model_meta("baseline", version=version, other={"label": "other", "score": "head", "threshold": 0.5})
    meta["preprocess"] = dict(TINY_PREPROCESS)
    os.makedirs(folder, exist_ok=True)
    nets.export_onnx(model, meta, os.path.join(folder, "model.onnx"))
    if profile:
        rng = np.random.default_rng(0)
        stats = [catdog.image_stats(catdog.open_image(synthetic_photo(rng))) for _ in range(400)]
        catdog.write_json(os.path.join(folder, "reference_profile.json"), catdog.reference_profile(stats))
    return os.path.join(folder, "model.onnx")


@functools.cache
def tiny_model(version="tiny-1", dog_if_blue=True):
    """Exported once per test run (torch export takes a second or two)."""
    folder = tempfile.mkdtemp(prefix="catdog-tiny-")
    atexit.register(shutil.rmtree, folder, True)
    return export_tiny_model(folder, version, dog_if_blue)


def synthetic_photo(rng, kind=None, fmt="JPEG", size=None, dark=False, gray=False):
    """Photo-like JPEG bytes: a tinted gradient with noise. kind 'cat' is reddish, 'dog' bluish."""
    width, height = size or (int(rng.integers(120, 360)), int(rng.integers(100, 300)))
    base = rng.uniform(60, 200, 3)
    if kind == "cat":
        base[0], base[2] = max(base[0], base[2]) + 40, min(base[0], base[2]) - 20
    elif kind == "dog":
        base[0], base[2] = min(base[0], base[2]) - 20, max(base[0], base[2]) + 40
    ramp = np.linspace(-30, 30, width)[None, :, None] * rng.uniform(-1, 1, 3)
    arr = base + ramp + 20 * rng.standard_normal((height, width, 3), dtype=np.float32)
    if gray:
        arr = arr.mean(axis=2, keepdims=True).repeat(3, axis=2)
    if dark:
        arr = arr * 0.12
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png_chunks(width, height, bit_depth, color_type, raw_rows):
    """A PNG written by hand, for headers Pillow will not produce (bombs, 16-bit RGB)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw_rows) + chunk(b"IEND", b"")


def scrape(text):
    """{(sample name, ((label, value), ...)): value} of Prometheus text, via prometheus_client's parser."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(text, name, **labels):
    """The value of one series in Prometheus text, None when it is not exported."""
    return scrape(text).get((name, tuple(sorted(labels.items()))))


def in_process(model_path, db_path, load=True, **settings):
    """The app of serve.create_app with a Flask test client, no HTTP server and no threads:
    (client, service). With load, the model is loaded before the first request."""
    service = serve.Service(serve.Settings(model_path=model_path, db_path=db_path, **settings))
    if load:
        assert service.load("test"), service.load_error
    return serve.create_app(service.settings, service).test_client(), service


def client_of(tmp_path_factory, model_path=None, **settings):
    """Body of a module-scoped fixture: an in-process test client with its own DB."""
    client, service = in_process(model_path or tiny_model(), str(tmp_path_factory.mktemp("db") / "catdog.db"),
                                 **settings)
    yield client
    service.close()


def upload(data, name="photo.jpg", field="file"):
    """Test-client keyword arguments of a multipart upload, as a browser or curl -F sends it."""
    return {"data": {field: (io.BytesIO(data), name, "application/octet-stream")},
            "content_type": "multipart/form-data"}


class Server:
    """serve.py in a subprocess on 127.0.0.1:<free port>, stdout captured to a file."""

    def __init__(self, model_path, db_path, wait_ready=True, **settings):
        self.port = catdog.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_path = db_path
        self.log_path = tempfile.mkstemp(prefix="catdog-serve-", suffix=".log")[1]
        atexit.register(os.unlink, self.log_path)
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "MODEL_PATH": model_path,
               "DB_PATH": db_path, "PYTHONDONTWRITEBYTECODE": "1",
               **{k: str(v) for k, v in settings.items()}}
        with open(self.log_path, "wb") as log_file:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py")], cwd=ROOT, env=env,
                                         stdout=log_file, stderr=subprocess.STDOUT)
        self.wait("/health" if wait_ready else "/live")

    def wait(self, path, timeout=30):
        try:
            catdog.wait_ready(self.url + path, self.proc, timeout)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}; server log:\n{self.logs()}") from None

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=10, **kw)

    def post(self, path, **kw):
        return requests.post(self.url + path, timeout=30, **kw)

    def predict(self, data, name="photo.jpg", field="file", **kw):
        return self.post("/predict", files={field: (name, data, "application/octet-stream")}, **kw)

    def logs(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def send(self, signum):
        os.kill(self.proc.pid, signum)

    def stop(self, signum=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def served(tmp_path_factory, model_path=None, **settings):
    """Body of a module-scoped fixture: a Server with its own DB, stopped afterwards."""
    s = Server(model_path or tiny_model(), str(tmp_path_factory.mktemp("db") / "catdog.db"), **settings)
    yield s
    s.stop()
