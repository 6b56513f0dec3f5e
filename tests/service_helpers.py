"""Fixtures for the service tests, on harness.py: the tiny model exported once per run, the
app in-process, a real serve.py with a log file, Prometheus text read back."""
import atexit
import functools
import io
import os
import shutil
import tempfile

import requests
from prometheus_client.parser import text_string_to_metric_families

import catdog
import harness
import serve
from conftest import read_tree
from harness import (
    export_tiny_model,
    free_port,
    png_chunks,
    synthetic_photo,
    wait_ready,
)

__all__ = ["ROOT", "SHARED", "Server", "client_of", "export_tiny_model", "free_port", "in_process", "photo_files",
           "png_chunks", "sample", "scrape", "served", "synthetic_photo", "tiny_model", "upload", "wait_ready"]

ROOT = catdog.ROOT
SHARED = catdog.SHARED_SAMPLE


@functools.cache
def tiny_model(version="tiny-1", dog_if_blue=True):
    """harness.export_tiny_model, once per test run (torch export takes a second or two)."""
    folder = tempfile.mkdtemp(prefix="catdog-tiny-")
    atexit.register(shutil.rmtree, folder, True)
    return export_tiny_model(folder, version, dog_if_blue)


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


def photo_files(folder):
    """{file name: bytes} of every file under a photos folder (its sha256 for a photo), {} when the
    folder does not exist."""
    return {os.path.basename(path): data for path, data in read_tree(folder).items()}


def upload(data, name="photo.jpg", field="file"):
    """Test-client keyword arguments of a multipart upload, as a browser or curl -F sends it."""
    return {"data": {field: (io.BytesIO(data), name, "application/octet-stream")},
            "content_type": "multipart/form-data"}


class Server(harness.Server):
    """serve.py of `model_path` storing into `db_path`, settings as environment variables,
    stdout and stderr in a log file; ready (or only live) when built."""

    def __init__(self, model_path, db_path, wait_ready=True, **settings):
        self.db_path = db_path
        log = tempfile.mkstemp(prefix="catdog-serve-", suffix=".log")[1]
        atexit.register(os.unlink, log)
        super().__init__({"MODEL_PATH": model_path, "DB_PATH": db_path, **settings}, log=log)
        self.wait("/health" if wait_ready else "/live")

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=10, **kw)

    def post(self, path, **kw):
        return requests.post(self.url + path, timeout=30, **kw)

    def predict(self, data, name="photo.jpg", field="file", **kw):
        return self.post("/predict", files={field: (name, data, "application/octet-stream")}, **kw)


def served(tmp_path_factory, model_path=None, **settings):
    """Body of a module-scoped fixture: a Server with its own DB, stopped afterwards."""
    s = Server(model_path or tiny_model(), str(tmp_path_factory.mktemp("db") / "catdog.db"), **settings)
    yield s
    s.stop()
