"""The inference service with a real (tiny) exported model. Its HTTP contract runs
in-process on Flask's test client (serve.create_app); what needs a real serve.py process
(signals, kill -9, JSON logs on stdout, concurrent requests) runs one on 127.0.0.1, stopped
by PID."""
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import catdog
import harness
import serve
import upload as uploads
from conftest import sha
from service_helpers import (
    ROOT,
    Server,
    export_tiny_model,
    in_process,
    photo_files,
    sample,
    scrape,
    synthetic_photo,
    tiny_model,
    upload,
)


@pytest.fixture
def app(tmp_path):
    """(test client, service) of a fresh app: every count starts at 0."""
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"))
    yield client, service
    service.close()


def predict(client, data, **kw):
    return client.post("/predict", **upload(data), **kw)


# ---------------------------------------------------------------- the module and its settings
def test_serving_never_imports_torch():
    code = "import sys, serve; assert 'torch' not in sys.modules, 'serve imported torch'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


IMPORT_WATCH = r"""
import os, sys, threading
# serve's own imports first: what is left is what importing serve.py itself does
import base64, concurrent.futures, contextlib, ctypes, dataclasses, functools, hashlib, io, json, math, re, signal, sqlite3, time
import uuid, collections
import numpy, onnxruntime, waitress, flask, yaml, prometheus_client, prometheus_client.core, werkzeug.exceptions, catdog
def no_cpu_probe(pid):
    raise AssertionError("import read the CPU affinity")
os.sched_getaffinity = no_cpu_probe
events = []
sys.addaudithook(lambda event, args: events.append((event, str(args[0]) if args else "")))
import serve
print(threading.active_count())
print(json.dumps(events))
"""


def test_importing_serve_starts_no_thread_and_opens_nothing():
    out = subprocess.run([sys.executable, "-c", IMPORT_WATCH], check=False, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    threads, events = out.stdout.splitlines()
    assert threads == "1"
    events = json.loads(events)
    opened = [path for event, path in events if event == "open"]
    assert opened and all(path.endswith((".py", ".pyc")) for path in opened), opened  # module files only
    # Besides loading its own code, only what decorators (functools.cache, contextmanager) do to functions.
    allowed = {"import", "open", "exec", "compile", "marshal.loads", "os.listdir", "builtins.id", "object.__setattr__",
               "object.__getattr__"}
    assert {event for event, _ in events} <= allowed, events


def test_settings_come_from_the_environment_in_one_place():
    default = serve.Settings.from_env({})
    assert default == serve.Settings()
    assert default.model_path == os.path.join(catdog.MODELS_DIR, "model.onnx")
    assert default.db_path == os.path.join(catdog.ROOT, "var", "catdog.db")
    assert (default.port, default.infer_threads, default.live_window, default.max_upload_bytes) == (
        8000, 0, 500, 10 << 20)
    given = serve.Settings.from_env({"PORT": "9000", "MODEL_PATH": "/m/model.onnx", "MAX_UPLOAD_MB": "2.5",
                                     "DECODE_WAIT_S": "5", "SHUTDOWN_TIMEOUT": "3", "UNRELATED": "x"})
    assert (given.port, given.model_path, given.max_upload_mb, given.decode_wait_s, given.shutdown_timeout) == (
        9000, "/m/model.onnx", 2.5, 5.0, 3.0)
    assert serve.load_model(tiny_model()).profile is not None  # reference_profile.json beside the model,
    assert serve.load_model(tiny_model(), profile_path=os.devnull + ".json").profile is None  # unless PROFILE_PATH
    hard_limit = [uploads.waitress_body_limits(s)["max_request_body_size"]
                  for s in (given, dataclasses.replace(given, max_upload_mb=100))]
    assert hard_limit == [64 << 20, 400 << 20]  # waitress's own cap: far above the app's
    with pytest.raises(serve.Refused, match=re.escape("PORT='eighty': not a number (int)")):  # named, not a traceback
        serve.Settings.from_env({"PORT": "eighty"})


def test_serving_requirements_are_a_subset_of_the_project_pins():
    def pins(name):
        with open(os.path.join(ROOT, name)) as f:
            return {line.split("#")[0].strip().rstrip("\\").strip() for line in f if "==" in line.split("#")[0]}
    serving, project = pins("requirements-serve.txt"), pins("requirements.txt")
    with open(os.path.join(ROOT, "requirements-serve.txt")) as f:
        text = f.read()
    assert text.count("==") <= text.count("--hash=sha256:")  # every pin with its hashes: pip --require-hashes
    assert {"onnxruntime", "numpy", "pillow", "flask", "waitress", "prometheus-client", "pyyaml"} <= {
        p.split("==")[0] for p in serving}
    assert serving <= project, f"not pinned the same in requirements.txt: {sorted(serving - project)}"
    assert not any(p.startswith("torch") for p in serving)


def test_inference_threads_follow_the_cgroup_cpu_quota(monkeypatch):
    files = {}

    def fake_open(path, *args, **kw):
        if path not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[path])

    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(serve, "open", fake_open, raising=False)
    assert serve.available_cpus() == 8  # no cgroup files: the affinity mask
    files["/sys/fs/cgroup/cpu.max"] = "max 100000\n"
    assert serve.available_cpus() == 8  # no quota
    files["/sys/fs/cgroup/cpu.max"] = "250000 100000\n"
    assert serve.available_cpus() == 3  # 2.5 CPUs: rounded up
    files["/sys/fs/cgroup/cpu.max"] = "50000 100000\n"
    assert serve.available_cpus() == 1  # half a CPU
    files = {"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "200000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}
    assert serve.available_cpus() == 2  # cgroup v1


# ---------------------------------------------------------------- the HTTP contract, in-process
def test_predicts_real_photos_through_the_api(app):
    client, _ = app
    rng = np.random.default_rng(1)
    for kind in ("cat", "dog", "cat", "dog"):
        r = predict(client, synthetic_photo(rng, kind))
        assert r.status_code == 200, r.text
        body = r.json
        assert set(body) == {"label", "confidence", "pet_probability", "probabilities", "model_version",
                             "registry_version", "run_id", "request_id", "prediction_id", "latency_ms"}
        assert body["label"] == kind
        assert body["probabilities"][kind] == body["confidence"] > 0.5
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
        assert body["model_version"] == "tiny-1" and body["latency_ms"] > 0
        assert r.headers["X-Request-ID"] == body["request_id"]
    # the other multipart field name, and a raw image/* body as curl --data-binary sends it
    r = client.post("/predict", **upload(synthetic_photo(rng, "dog", fmt="PNG"), field="image"))
    assert r.json["label"] == "dog"
    r = client.post("/predict", data=synthetic_photo(rng, "cat"), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.json["label"] == "cat"


def test_request_id_is_echoed_only_when_safe(app):
    client, _ = app
    rng = np.random.default_rng(2)
    r = predict(client, synthetic_photo(rng, "cat"), headers={"X-Request-ID": "shelter-42.a_b"})
    assert r.headers["X-Request-ID"] == r.json["request_id"] == "shelter-42.a_b"
    r = predict(client, synthetic_photo(rng, "cat"), headers={"X-Request-ID": "<script>" + "x" * 100})
    assert r.status_code == 200 and r.json["request_id"] == r.headers["X-Request-ID"]
    assert "<" not in r.json["request_id"] and len(r.json["request_id"]) == 32
    r = client.get("/live", headers={"X-Request-ID": "probe-1"})  # every endpoint echoes it
    assert r.headers["X-Request-ID"] == "probe-1"


def test_health_live_metrics_stats_and_page(app):
    client, service = app
    assert client.get("/live").json == {"status": "alive"}
    health = client.get("/health")
    assert health.status_code == 200 and health.json == {"status": "ok", "model_version": "tiny-1", "arch": "baseline",
                                                            "registry_version": None, "run_id": None,
                                                            "pet_threshold": 0.5, "store": "sqlite",
                                                            "keep_photos": "off"}
    confidence = predict(client, synthetic_photo(np.random.default_rng(3), "dog")).json["confidence"]
    r = client.get("/metrics")
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    series = scrape(r.text)
    assert series[("catdog_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 1
    assert series[("catdog_requests_total", (("endpoint", "/health"), ("status", "200")))] == 1
    assert series[("catdog_request_duration_seconds_count", (("endpoint", "/predict"),))] == 1
    assert series[("catdog_request_duration_seconds_bucket", (("endpoint", "/predict"), ("le", "+Inf")))] == 1
    assert series[("catdog_predictions_total", (("label", "dog"),))] == 1
    assert series[("catdog_predictions_total", (("label", "cat"),))] == 0  # every class from 0
    assert series[("catdog_prediction_confidence_count", ())] == 1
    assert abs(series[("catdog_prediction_confidence_sum", ())] - confidence) < 1e-5
    assert series[("catdog_prediction_confidence_bucket", (("le", "0.5"),))] == 0
    assert series[("catdog_prediction_confidence_bucket", (("le", "+Inf"),))] == 1
    assert series[("catdog_feedback_total", (("correct", "true"),))] == 0
    assert series[("catdog_feedback_total", (("correct", "false"),))] == 0
    assert ("catdog_live_accuracy", ()) not in series and series[("catdog_live_accuracy_samples", ())] == 0
    assert series[("catdog_inference_batch_size_count", ())] == 1 == series[("catdog_inference_batch_size_sum", ())]
    assert series[("catdog_model_info", (("arch", "baseline"), ("version", "tiny-1")))] == 1
    assert series[("catdog_model_ready", ())] == 1
    assert series[("catdog_in_flight_requests", ())] == 1  # this scrape
    assert series[("catdog_drift_window_samples", ())] == 1
    assert series[("catdog_start_time_seconds", ())] == service.started_at
    assert not [name for name, _ in series if name.endswith("_created")]
    stats = client.get("/stats").json
    predict_seconds = series[("catdog_request_duration_seconds_sum", (("endpoint", "/predict"),))]
    assert stats["mean_latency_ms"] == round(predict_seconds * 1000, 2)
    assert 0 <= stats.pop("uptime_s") < 600 and stats.pop("mean_latency_ms") > 0
    assert stats == {
        "model_version": "tiny-1", "requests": 4,
        "requests_by_endpoint": {"/health 200": 1, "/live 200": 1, "/metrics 200": 1, "/predict 200": 1},
        "predictions": 1, "predictions_by_label": {"cat": 0, "dog": 1, "other": 0},
        "live_accuracy": None, "live_accuracy_samples": 0, "live_window": 500, "feedback_count": 0,
        "drift": {"samples": 1, "psi": {}, "share_rise": {}, "drifted": []}}
    page = client.get("/")
    assert page.status_code == 200 and "/predict" not in page.text.split("<script>")[0]
    assert 'send("predict/batch"' in page.text and 'send("feedback"' in page.text  # relative URLs
    assert 'href="model-card"' in page.text


def test_errors_are_json_with_a_request_id_and_counted(app, monkeypatch):
    client, service = app
    for method, path, status, reason in (("get", "/nowhere", 404, "not_found"),
                                         ("get", "/predict", 405, "method_not_allowed")):
        r = getattr(client, method)(path, headers={"X-Request-ID": f"err-{status}"})
        assert (r.status_code, r.json["error"], r.json["request_id"], r.headers["X-Request-ID"]) == (
            status, reason, f"err-{status}", f"err-{status}")
        assert r.json["message"]

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "predict", broken)
    r = predict(client, synthetic_photo(np.random.default_rng(4), "cat"))
    assert r.status_code == 500 and r.json["error"] == "internal_error" and "bug" not in r.text
    text = client.get("/metrics").text
    # raw paths would explode the label set: what no route matched counts as "unmatched"
    assert sample(text, "catdog_requests_total", endpoint="unmatched", status="404") == 1
    assert sample(text, "catdog_requests_total", endpoint="unmatched", status="405") == 1
    assert sample(text, "catdog_requests_total", endpoint="/predict", status="500") == 1
    assert sample(text, "catdog_in_flight_requests") == 1  # every failed request left the count


def test_no_model_means_not_ready_but_alive(tmp_path):
    client, service = in_process(str(tmp_path / "missing.onnx"), str(tmp_path / "catdog.db"), load=False)
    try:
        assert client.get("/live").status_code == 200
        health = client.get("/health")
        assert health.status_code == 503 and health.json == {
            "status": "no_model", "model_path": str(tmp_path / "missing.onnx"), "error": None}
        r = predict(client, synthetic_photo(np.random.default_rng(4), "cat"))
        assert r.status_code == 503 and r.json["error"] == "not_ready"
        text = client.get("/metrics").text
        assert sample(text, "catdog_model_ready") == 0
        assert not [name for name, _ in scrape(text) if name == "catdog_model_info"]
        assert client.get("/stats").json["model_version"] is None
        assert service.load("test") is False and "missing.json" in service.load_error  # the meta is read first
    finally:
        service.close()


def copy_tiny_model(tmp_path):
    """A folder of its own holding the tiny model, for a test that changes the files."""
    model_dir = tmp_path / "models"
    shutil.copytree(os.path.dirname(tiny_model()), model_dir)
    return model_dir


def own_tiny_model(tmp_path):
    """(model folder, test client, service) of an in-process app on its own copy of the tiny model."""
    model_dir = copy_tiny_model(tmp_path)
    return (model_dir, *in_process(str(model_dir / "model.onnx"), str(tmp_path / "catdog.db")))


def test_a_failed_load_reports_and_a_failed_reload_keeps_the_old_model(tmp_path):
    model_dir, client, service = own_tiny_model(tmp_path)
    try:
        assert sample(client.get("/metrics").text, "catdog_model_load_failed") == 0
        (model_dir / "model.onnx").write_bytes(b"not a model")
        assert service.load("test") is False
        # Still serving the old model, and saying that the new one failed (health, metrics).
        assert client.get("/health").json == {"status": "ok", "model_version": "tiny-1", "arch": "baseline",
                                              "registry_version": None, "run_id": None, "pet_threshold": 0.5, "store": "sqlite",
                                              "keep_photos": "off", "reload_error": service.load_error}
        text = client.get("/metrics").text
        assert sample(text, "catdog_model_load_failed") == 1 and sample(text, "catdog_model_load_failures_total") == 1
        assert predict(client, synthetic_photo(np.random.default_rng(5), "dog")).json["label"] == "dog"
        shutil.copy(tiny_model(), model_dir / "model.onnx")
        assert service.load("test") is True and "reload_error" not in client.get("/health").json
        assert sample(client.get("/metrics").text, "catdog_model_load_failed") == 0
        (model_dir / "model.onnx").write_bytes(b"not a model")
        assert service.load("test") is False
        service.model = None  # as before the first successful load
        health = client.get("/health")
        assert health.status_code == 503 and health.json["status"] == "load_failed"
        assert health.json["error"] == service.load_error and service.load_error
    finally:
        service.close()


def test_a_model_trained_with_other_preprocessing_code_is_refused_at_start(tmp_path):
    """model.json's preprocess_fingerprint is not this code's: serve.py starts, stays not ready and
    says on /health which fingerprint is whose and what to do."""
    model_dir = copy_tiny_model(tmp_path)
    meta = catdog.read_json(model_dir / "model.json")
    assert meta["preprocess_fingerprint"] == catdog.preprocessing_fingerprint()  # export_tiny_model records it
    meta["preprocess_fingerprint"] = "0123456789ab" + "0" * 52
    catdog.write_json(model_dir / "model.json", meta)
    s = Server(str(model_dir / "model.onnx"), str(tmp_path / "catdog.db"), wait_ready=False)
    try:
        deadline = time.monotonic() + 20
        while (health := s.get("/health")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "load_failed"
        error = health.json()["error"]
        assert error == "ValueError: " + catdog.preprocessing_mismatch(meta, str(model_dir / "model.onnx"))
        assert (f"trained with preprocessing code of fingerprint 0123456789ab (its model.json), this code's is "
                f"{catdog.preprocessing_fingerprint()[:12]}") in error
        assert "retrain it with this code (`make train`), or deploy the code it was trained with" in error
        assert s.predict(synthetic_photo(np.random.default_rng(4), "cat")).json()["error"] == "not_ready"
    finally:
        s.stop()


def test_a_model_without_a_preprocessing_fingerprint_is_refused_and_a_reload_keeps_the_old_one(tmp_path):
    """A model trained before models recorded their preprocessing code: refused, on a reload
    (SIGHUP) as at start, the model being served staying."""
    model_dir, client, service = own_tiny_model(tmp_path)
    try:
        meta = catdog.read_json(model_dir / "model.json")
        del meta["preprocess_fingerprint"]
        catdog.write_json(model_dir / "model.json", {**meta, "version": "tiny-old"})
        assert service.load("SIGHUP") is False
        health = client.get("/health").json
        assert health["status"] == "ok" and health["model_version"] == "tiny-1"
        assert health["reload_error"] == service.load_error == "ValueError: " + (
            f"{model_dir / 'model.onnx'} was trained before models recorded their preprocessing code (its model.json "
            f"has no preprocess_fingerprint), so nothing shows that this code (catdog.py's "
            f"{', '.join(catdog.PREPROCESSING)}, fingerprint {catdog.preprocessing_fingerprint()[:12]}) prepares "
            "photos as its training did; retrain it with this code (`make train`)")
        assert predict(client, synthetic_photo(np.random.default_rng(5), "dog")).json["label"] == "dog"
        service.model = None  # as at start
        assert client.get("/health").json["status"] == "load_failed"
    finally:
        service.close()


def test_deeply_nested_json_is_a_400_not_a_500(app):
    client, _ = app
    r = client.post("/feedback", data="[" * 100_000 + "]" * 100_000, content_type="application/json")
    assert r.status_code == 400 and r.json["error"] == "bad_json" and "nested" in r.json["message"], r.json
    r = client.post("/feedback", data='{"a":' * 50_000 + "1" + "}" * 50_000, content_type="application/json")
    assert r.status_code == 400 and r.json["error"] == "bad_json"


def test_feedback_drives_live_accuracy(tmp_path):
    client, _ = in_process(tiny_model(), str(tmp_path / "catdog.db"), live_window=3)
    rng = np.random.default_rng(5)
    ids = [predict(client, synthetic_photo(rng, kind)).json["request_id"] for kind in ("cat", "dog", "cat", "dog")]
    # the oldest prediction is judged wrong, the three newest right: the window of 3 sees 100 %
    for request_id, truth, predicted in zip(ids, ("dog", "dog", "CAT", "dog"), ("cat", "dog", "cat", "dog")):
        r = client.post("/feedback", json={"request_id": request_id, "label": truth})
        assert r.status_code == 200 and r.json == {"request_id": request_id, "prediction_id": r.json["prediction_id"],
                                                   "label": truth.lower(), "predicted": predicted,
                                                   "correct": request_id != ids[0], "recorded": True}
    for body, status, reason in (({"request_id": "nope", "label": "cat"}, 404, "unknown_request_id"),
                                 ({"request_id": ids[0], "label": "horse"}, 400, "bad_label"),
                                 ({"request_id": "<bad id>", "label": "cat"}, 400, "bad_request_id"),
                                 ([ids[0], "cat"], 400, "bad_json")):
        r = client.post("/feedback", json=body)
        assert (r.status_code, r.json["error"]) == (status, reason)
    assert client.post("/feedback", data="not json").json["error"] == "bad_json"
    stats = client.get("/stats").json
    assert (stats["live_accuracy"], stats["live_accuracy_samples"], stats["feedback_count"]) == (1.0, 3, 4)
    text = client.get("/metrics").text
    assert sample(text, "catdog_live_accuracy") == 1.0 and sample(text, "catdog_live_accuracy_samples") == 3
    assert sample(text, "catdog_feedback_total", correct="false") == 1
    assert sample(text, "catdog_feedback_total", correct="true") == 3
    # a wrong answer among the newest three: 2/3
    newest = predict(client, synthetic_photo(rng, "dog")).json["prediction_id"]
    assert client.post("/feedback", json={"prediction_id": newest, "label": "cat"}).json["correct"] is False
    assert abs(client.get("/stats").json["live_accuracy"] - 2 / 3) < 1e-9
    assert abs(sample(client.get("/metrics").text, "catdog_live_accuracy") - 2 / 3) < 1e-9


def test_feedback_is_recorded_once_and_predictions_are_never_overwritten(app):
    """The audit's rewrite: a second /predict with the same X-Request-ID made a new prediction
    replace the judged one. Now each prediction has its own server id; the same feedback again
    stores nothing (and counts nothing), a different one is refused."""
    client, _ = app
    rng = np.random.default_rng(24)
    first = predict(client, synthetic_photo(rng, "cat"), headers={"X-Request-ID": "shelter-42"}).json
    assert first["request_id"] == "shelter-42" and first["prediction_id"] != "shelter-42"
    assert client.post("/feedback", json={"prediction_id": first["prediction_id"], "label": "cat"}).json["recorded"]
    again = client.post("/feedback", json={"prediction_id": first["prediction_id"], "label": "cat"})
    assert again.status_code == 200 and again.json["recorded"] is False
    changed = client.post("/feedback", json={"prediction_id": first["prediction_id"], "label": "dog"})
    assert changed.status_code == 409 and changed.json["error"] == "feedback_exists"
    second = predict(client, synthetic_photo(rng, "dog"), headers={"X-Request-ID": "shelter-42"}).json
    assert second["prediction_id"] != first["prediction_id"]
    ambiguous = client.post("/feedback", json={"request_id": "shelter-42", "label": "dog"})
    assert ambiguous.status_code == 409 and ambiguous.json["error"] == "ambiguous_request_id"
    for _ in range(100):  # the audit's 100 repeats
        client.post("/feedback", json={"prediction_id": first["prediction_id"], "label": "cat"})
    text = client.get("/metrics").text
    assert sample(text, "catdog_feedback_total", correct="true") == 1 == client.get("/stats").json["feedback_count"]
    assert client.get("/stats").json["live_accuracy"] == 1.0  # still "predicted cat, truth cat"


def test_drift_rises_on_dark_and_grayscale_inputs_and_stays_low_in_distribution(tmp_path):
    client, _ = in_process(tiny_model(), str(tmp_path / "catdog.db"), drift_window=120, drift_min_samples=100)
    rng = np.random.default_rng(10)

    def send(photos):
        assert {predict(client, p).status_code for p in photos} == {200}
        return client.get("/stats").json["drift"]

    too_few = send([synthetic_photo(rng) for _ in range(40)])
    assert too_few == {"samples": 40, "psi": {}, "share_rise": {}, "drifted": []}
    normal = send([synthetic_photo(rng) for _ in range(80)])
    dark = send([synthetic_photo(rng, dark=True) for _ in range(120)])
    gray = send([synthetic_photo(rng, gray=True) for _ in range(120)])
    text = client.get("/metrics").text
    assert normal["samples"] == 120 and normal["drifted"] == [], normal
    # The tiny profile has no confidences and no pet_distance (its model has no features to speak of).
    assert set(normal["psi"]) == set(catdog.DRIFT_FEATURES) - {"pet_distance"}, normal
    assert set(normal["share_rise"]) == set(catdog.DRIFT_SHARES), normal
    assert max(normal["share_rise"].values()) < catdog.DRIFT_THRESHOLD, normal
    assert max(normal["psi"].values()) < catdog.DRIFT_THRESHOLD, normal
    assert dark["psi"]["brightness"] > 4 * catdog.DRIFT_THRESHOLD and "brightness" in dark["drifted"], dark
    assert gray["psi"]["saturation"] > 4 * catdog.DRIFT_THRESHOLD and "saturation" in gray["drifted"], gray
    assert sample(text, "catdog_drift_psi", feature="saturation") == gray["psi"]["saturation"]
    assert sample(text, "catdog_drift_window_samples") == 120
    assert sample(text, "catdog_drift_share_rise", share="undersized") == gray["share_rise"]["undersized"]


def test_other_answers_feedback_and_drift_share(tmp_path):
    """The tiny model's "other" (a very green image): the answer, feedback "other", the
    counter, and the share of "other" in the drift window."""
    client, _ = in_process(tiny_model(), str(tmp_path / "catdog.db"), drift_window=100, drift_min_samples=100)
    rng = np.random.default_rng(12)
    green = io.BytesIO()
    Image.new("RGB", (300, 200), (20, 250, 30)).save(green, "PNG")
    answer = predict(client, green.getvalue()).json
    assert answer["label"] == "other" and answer["pet_probability"] < 0.5, answer
    assert abs(answer["confidence"] - (1 - answer["pet_probability"])) < 1e-6, answer
    r = client.post("/feedback", json={"request_id": answer["request_id"], "label": "other"})
    assert r.status_code == 200 and r.json["correct"] is True, r.json
    pet = predict(client, synthetic_photo(rng, "cat")).json
    assert pet["label"] == "cat" and pet["pet_probability"] >= 0.5, pet
    assert client.post("/feedback", json={"request_id": pet["request_id"], "label": "other"}).json["correct"] is False
    assert client.post("/feedback", json={"request_id": pet["request_id"], "label": "rabbit"}).status_code == 400
    for _ in range(49):
        predict(client, green.getvalue())
    for _ in range(50):
        predict(client, synthetic_photo(rng))
    drift = client.get("/stats").json["drift"]  # the newest 100: the cat, 49 green, 50 others
    assert drift["share_rise"]["other"] == 0.49 and "other" in drift["drifted"], drift
    text = client.get("/metrics").text
    assert sample(text, "catdog_predictions_total", label="other") == 50
    assert client.get("/stats").json["predictions_by_label"]["other"] == 50


# ---------------------------------------------------------------- a real serve.py process
def test_acknowledged_feedback_survives_kill_9(tmp_path):
    db_path = str(tmp_path / "db" / "catdog.db")
    s = Server(tiny_model(), db_path, LIVE_WINDOW=3)
    rng = np.random.default_rng(5)
    ids = [s.predict(synthetic_photo(rng, kind), name="Whiskers-7.jpg").json()["prediction_id"]
           for kind in ("cat", "dog", "cat", "dog")]
    for request_id, truth in zip(ids, ("dog", "dog", "cat", "cat")):  # 2 of the newest 3 right
        assert s.post("/feedback", json={"prediction_id": request_id, "label": truth}).status_code == 200

    s.stop(signal.SIGKILL)  # no clean shutdown: what was acknowledged must still be there
    with sqlite3.connect(db_path) as conn:
        rows = dict(conn.execute("SELECT prediction_id, label FROM feedback").fetchall())
        assert rows == {ids[0]: "dog", ids[1]: "dog", ids[2]: "cat", ids[3]: "cat"}
        columns = [row[1] for row in conn.execute("PRAGMA table_info(predictions)")]
        assert columns == ["id", "request_id", "time", "model_version", "label", "confidence", "width", "height",
                           "brightness", "photo"]  # photo: a kept upload's sha256, never its bytes
        predicted = conn.execute("SELECT model_version, label FROM predictions ORDER BY time").fetchall()
        assert predicted == [("tiny-1", kind) for kind in ("cat", "dog", "cat", "dog")]
    for name in os.listdir(os.path.dirname(db_path)):  # the database, its WAL and shared memory
        with open(os.path.join(os.path.dirname(db_path), name), "rb") as f:
            content = f.read()
        assert b"Whiskers" not in content and b"127.0.0.1" not in content and b"JFIF" not in content
    again = Server(tiny_model(), db_path, LIVE_WINDOW=3)
    try:
        stats = again.get("/stats").json()
        assert stats["feedback_count"] == 4 and abs(stats["live_accuracy"] - 2 / 3) < 1e-9
    finally:
        again.stop()


def test_retention_runs_in_the_background(tmp_path):
    db_path = str(tmp_path / "catdog.db")
    s = Server(tiny_model(), db_path, RETENTION_ROWS=2, RETENTION_INTERVAL_S=0.2)
    try:
        rng = np.random.default_rng(25)
        for _ in range(5):
            assert s.predict(synthetic_photo(rng)).status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with sqlite3.connect(db_path) as conn:
                if conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 2:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the newest 2 predictions were not all that was left")
    finally:
        s.stop()
    pruned = [json.loads(line) for line in s.logs().splitlines() if '"pruned"' in line]
    assert sum(event["predictions"] for event in pruned) == 3, pruned


def test_logs_are_json_lines_without_images_names_or_addresses(tmp_path):
    s = Server(tiny_model(), str(tmp_path / "catdog.db"))
    try:
        rng = np.random.default_rng(6)
        r = s.predict(synthetic_photo(rng, "cat"), name="Whiskers-secret-4711.jpg",
                      headers={"X-Forwarded-For": "10.9.8.7"})
        assert r.status_code == 200
        assert s.predict(b"not an image at all", name="Rex-private.jpg").status_code == 422
    finally:
        exit_code = s.stop()
    assert exit_code == 0
    logs = s.logs()
    lines = [json.loads(line) for line in logs.splitlines() if line.strip()]  # every line is JSON
    events = [line["event"] for line in lines if "event" in line]
    assert {"listening", "model_loaded"} <= set(events) and events[-2:] == ["stopping", "stopped"]
    mine = [line for line in lines if line.get("request_id") == r.json()["request_id"]]
    assert len(mine) == 1
    assert set(mine[0]) == {"time", "request_id", "method", "endpoint", "status", "latency_ms", "label", "error"}
    assert (mine[0]["method"], mine[0]["endpoint"], mine[0]["status"], mine[0]["label"], mine[0]["error"]) == (
        "POST", "/predict", 200, "cat", None)
    assert [line["error"] for line in lines if line.get("status") == 422] == ["not_an_image"]
    for secret in ("Whiskers", "Rex-private", "10.9.8.7", "not an image", "JFIF", "\\u00ff\\u00d8"):
        assert secret not in logs, secret
    # the client's address (127.0.0.1 here) is in no request line; only the bind address is logged at start
    assert not any("127.0.0.1" in json.dumps(line) for line in lines if "request_id" in line)


def direct_probabilities(model_path, photos):
    """Unbatched reference: one ORT run per photo, decoded and preprocessed as the service does."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    settings = catdog.read_json(model_path.replace(".onnx", ".json"))["preprocess"]
    inputs = [catdog.preprocess(catdog.open_image(p, min_side=settings["resize"]), settings) for p in photos]
    return [catdog.softmax(session.run(["logits"], {"image": x[None]})[0][0]) for x in inputs]


def test_concurrent_requests_each_run_once_and_match_direct_onnx_runs(tmp_path):
    rng = np.random.default_rng(7)
    photos = [synthetic_photo(rng, kind) for kind in ("cat", "dog") * 12]
    s = Server(tiny_model(), str(tmp_path / "catdog.db"), THREADS=24)
    try:
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda p: s.predict(p).json(), photos))
        metrics = s.get("/metrics").text
    finally:
        s.stop()
    for answer, expected in zip(answers, direct_probabilities(tiny_model(), photos)):
        assert np.allclose([answer["probabilities"]["cat"], answer["probabilities"]["dog"]], expected, atol=1e-5)
    assert sample(metrics, "catdog_inference_batch_size_sum") == len(photos)  # every image ran exactly once,
    assert sample(metrics, "catdog_inference_batch_size_bucket", le="1.0") == len(photos)  # each request alone


def test_sighup_reloads_the_model_without_dropping_requests(tmp_path):
    model_dir = copy_tiny_model(tmp_path)
    s = Server(str(model_dir / "model.onnx"), str(tmp_path / "catdog.db"))
    rng = np.random.default_rng(8)
    red = synthetic_photo(rng, "cat")
    statuses, versions, stop = [], set(), threading.Event()

    def hammer():
        while not stop.is_set():
            r = s.predict(red)
            statuses.append(r.status_code)
            versions.add((r.json().get("model_version"), r.json().get("label")))

    try:
        clients = [threading.Thread(target=hammer) for _ in range(3)]
        for c in clients:
            c.start()
        deadline = time.monotonic() + 20
        while not versions and time.monotonic() < deadline:  # the old model is answering
            time.sleep(0.01)
        staged = export_tiny_model(str(tmp_path / "v2"), version="tiny-2", dog_if_blue=False, profile=False)
        for name in ("model.json", "model.onnx"):
            os.replace(os.path.join(os.path.dirname(staged), name), model_dir / name)
        s.send(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while s.get("/health").json().get("model_version") != "tiny-2" and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for c in clients:
            c.join()
        metrics = s.get("/metrics").text
    finally:
        stop.set()
        s.stop()
    assert statuses and set(statuses) == {200}
    assert ("tiny-1", "cat") in versions and ("tiny-2", "dog") in versions  # the new model inverts the rule
    assert versions <= {("tiny-1", "cat"), ("tiny-2", "dog")}
    assert sample(metrics, "catdog_model_info", version="tiny-2", arch="baseline") == 1
    assert sample(metrics, "catdog_model_info", version="tiny-1", arch="baseline") is None


def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    # The test holds the database's write lock, so each request waits to store its prediction
    # (the store waits up to 10 s for the lock) while the signal arrives: with 2 request
    # threads, 2 of the 6 requests are in the app and 4 queued for a thread then.
    db_path = str(tmp_path / "catdog.db")
    s = Server(tiny_model(), db_path, THREADS=2)
    rng = np.random.default_rng(9)
    photos = [synthetic_photo(rng, "dog") for _ in range(6)]
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(s.predict, p) for p in photos]
        time.sleep(1.0)
        s.send(signal.SIGTERM)
        time.sleep(0.5)
        holder.execute("ROLLBACK")
        answers = [f.result() for f in futures]
    holder.close()
    assert [a.status_code for a in answers] == [200] * 6
    assert all(a.json()["label"] == "dog" for a in answers)
    assert s.proc.wait(15) == 0
    logs = s.logs()
    assert "Task queue depth is 4" in logs, logs  # waitress's own warning (plain text): 4 were queued
    events = {line["event"]: line for line in map(json.loads, re.findall(r"^\{.*", logs, re.M)) if "event" in line}
    assert events["stopping"]["in_flight"] == 2 and "stopped" in events, logs
    s.stop()


def test_sigterm_under_keep_alive_load_refuses_new_connections_and_exits_once_answered(tmp_path):
    """The audit: under keep-alive load the drain waited the full SHUTDOWN_TIMEOUT and new
    connections hung. Now: refused at once, every request sent before the signal answered
    (the last one on each connection with Connection: close), exit soon after."""
    import http.client

    s = Server(tiny_model(), str(tmp_path / "catdog.db"), THREADS=2)
    body, content_type = harness.multipart([("file", "a.jpg", synthetic_photo(np.random.default_rng(26), "cat"))])
    headers = {"Content-Type": content_type}
    failures, last_answer, closed = [], [0.0], []

    def keep_alive_client():
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        while True:
            try:
                conn.request("POST", "/predict", body, headers)
                response = conn.getresponse()
                response.read()
            except OSError as e:  # refused or dropped while a request was in flight
                failures.append(repr(e))
                return
            last_answer[0] = time.monotonic()
            if response.status != 200:
                failures.append(response.status)
            if response.getheader("Connection") == "close":  # the server's last answer on it
                closed.append(True)
                return

    clients = [threading.Thread(target=keep_alive_client) for _ in range(3)]
    for c in clients:
        c.start()
    time.sleep(1.0)
    s.send(signal.SIGTERM)
    refused_after = None
    started = time.monotonic()
    while time.monotonic() - started < 2:
        try:
            http.client.HTTPConnection("127.0.0.1", s.port, timeout=1).connect()
        except ConnectionRefusedError:
            refused_after = time.monotonic() - started
            break
        time.sleep(0.01)
    for c in clients:
        c.join(15)
    exit_code = s.proc.wait(15)
    exited_after = time.monotonic() - last_answer[0]
    s.stop()
    assert failures == [] and len(closed) == 3, (failures, closed)
    assert refused_after is not None and refused_after < 0.5, refused_after
    assert exit_code == 0 and exited_after < 2, exited_after


# ---------------------------------------------------------------- several photos, HEIC, identity, CORS, headers
def batch(client, photos, **kw):
    """POST /predict/batch with one `file` part per (bytes, name)."""
    return client.post("/predict/batch", data={"file": [(io.BytesIO(data), name) for data, name in photos]},
                       content_type="multipart/form-data", **kw)


def png(colour, size=(300, 200)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_batch_answers_each_photo_in_order_as_its_own_prediction(app):
    client, service = app
    rng = np.random.default_rng(20)
    photos = [(synthetic_photo(rng, "cat"), "a.jpg"), (b"not an image", "b.txt"), (synthetic_photo(rng, "dog"), "c.jpg"),
              (png((20, 250, 30)), "d.png")]
    r = batch(client, photos)
    assert r.status_code == 200, r.json
    body = r.json
    assert body["count"] == 4 and body["model_version"] == "tiny-1" and body["registry_version"] is None
    assert [(x["index"], x["filename"], x["status"]) for x in body["results"]] == [
        (0, "a.jpg", 200), (1, "b.txt", 422), (2, "c.jpg", 200), (3, "d.png", 200)]
    assert [x.get("label") for x in body["results"]] == ["cat", None, "dog", "other"]
    assert body["results"][1]["error"] == "not_an_image" and body["results"][1]["message"]
    ids = [x["request_id"] for x in body["results"] if x["status"] == 200]
    assert len(set(ids)) == 3 and body["request_id"] not in ids
    for request_id, truth in zip(ids, ("cat", "cat", "other")):  # each photo takes its own feedback
        assert client.post("/feedback", json={"request_id": request_id, "label": truth}).status_code == 200
    text = client.get("/metrics").text
    assert sample(text, "catdog_predictions_total", label="cat") == 1 == sample(text, "catdog_predictions_total",
                                                                                   label="other")
    # The three usable photos ran as one ONNX Runtime run.
    assert sample(text, "catdog_inference_batch_size_count") == 1 and sample(text, "catdog_inference_batch_size_sum") == 3
    assert client.get("/stats").json["feedback_count"] == 3


def test_batch_limits_and_errors_are_json(app, monkeypatch):
    client, service = app
    rng = np.random.default_rng(21)
    photo = synthetic_photo(rng)
    too_many = batch(client, [(photo, f"{i}.jpg") for i in range(service.settings.max_photos + 1)])
    assert too_many.status_code == 400 and too_many.json["error"] == "too_many_photos"
    assert client.post("/predict/batch", data={}, content_type="multipart/form-data").json["error"] == "no_file"
    raw = client.post("/predict/batch", data=photo, content_type="image/jpeg")
    assert raw.status_code == 415 and raw.json["error"] == "unsupported_media_type"
    big = service.settings.max_upload_bytes + 1
    one_too_big = batch(client, [(photo, "ok.jpg"), (b"\xff" * big, "big.jpg")])
    assert [x["status"] for x in one_too_big.json["results"]] == [200, 413]
    whole = batch(client, [(b"\xff" * (big - 2), f"{i}.jpg") for i in range(5)])  # over 4 x MAX_UPLOAD_MB
    assert whole.status_code == 413 and whole.json["error"] == "too_large"
    two = client.post("/predict", data={"file": [(io.BytesIO(photo), "1.jpg"), (io.BytesIO(photo), "2.jpg")]},
                      content_type="multipart/form-data")
    assert two.status_code == 400 and two.json["error"] == "too_many_files" and "/predict/batch" in two.json["message"]


def test_heic_from_an_iphone_is_accepted(app):
    import pillow_heif

    client, _ = app
    rng = np.random.default_rng(22)
    photo = Image.open(io.BytesIO(synthetic_photo(rng, "dog", size=(640, 480))))
    heif = pillow_heif.from_pillow(photo)
    buf = io.BytesIO()
    heif.save(buf, quality=85)
    assert buf.getvalue()[4:12] == b"ftypheic"  # what an iPhone writes
    r = predict(client, buf.getvalue())
    assert r.status_code == 200 and r.json["label"] == "dog", r.json


def test_cors_only_for_the_configured_origins(tmp_path):
    closed, service = in_process(tiny_model(), str(tmp_path / "a.db"))
    assert "Access-Control-Allow-Origin" not in closed.get("/health", headers={"Origin": "https://x.example"}).headers
    service.close()
    client, service = in_process(tiny_model(), str(tmp_path / "b.db"), cors_origins="https://shelter.example, https://b.example")
    allowed = client.get("/health", headers={"Origin": "https://shelter.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://shelter.example"
    assert "X-Request-ID" in allowed.headers["Access-Control-Expose-Headers"] and "Origin" in allowed.headers["Vary"]
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": "https://evil.example"}).headers
    preflight = client.options("/predict", headers={"Origin": "https://b.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200 and "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in preflight.headers["Access-Control-Allow-Headers"]
    service.close()


def test_page_has_a_strict_content_security_policy_and_every_answer_nosniff(app):
    import base64
    import hashlib

    client, _ = app
    page = client.get("/")
    policy = page.headers["Content-Security-Policy"]
    for tag in ("script", "style"):
        block = re.search(rf"<{tag}>(.*?)</{tag}>", page.get_data(as_text=True), re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in policy, policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    for path in ("/", "/health", "/metrics", "/nope"):
        assert client.get(path).headers["X-Content-Type-Options"] == "nosniff", path


def hold_in_another_request(budget, cost):
    """Reserve `cost` of the decode budget from another thread, as a request decoding would,
    until the returned Event is set."""
    held, release = threading.Event(), threading.Event()

    def other_request():
        with budget.reserve(cost):
            held.set()
            release.wait(60)

    threading.Thread(target=other_request, daemon=True).start()
    assert held.wait(5)
    return release


def test_decodes_wait_for_the_memory_budget_then_get_a_503(tmp_path):
    """While other decodes hold the budget, a photo waits up to DECODE_WAIT_S, then gets 503
    busy with Retry-After; once the budget is free it is answered."""
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"), decode_budget_mb=1, decode_wait_s=0.2)
    photo = synthetic_photo(np.random.default_rng(23), "cat", size=(640, 480))  # 1.8 MB to decode
    budget = service.decode_budget
    with budget.reserve(1 << 20):  # another request decoding
        r = predict(client, photo)
    assert r.status_code == 503 and r.json["error"] == "busy" and r.headers["Retry-After"] == "1", r.json
    assert budget.used == 0 and predict(client, photo).status_code == 200  # alone, even over the budget
    release = hold_in_another_request(budget, 1 << 20)
    threading.Timer(0.05, release.set).start()  # frees the budget while this photo waits
    assert predict(client, photo).status_code == 200
    service.close()


def test_heavy_decodes_leave_a_cpu_to_ordinary_photos(tmp_path):
    """With 2 CPUs one heavy decode runs at a time: a second heavy one gets 503 at once, not
    after DECODE_WAIT_S (waiting, it would hold a request thread an ordinary photo needs), even
    though the memory budget has room, while an ordinary photo is answered."""
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"), decode_wait_s=30)
    budget = service.decode_budget
    budget.heavy_lanes, budget.heavy_bytes = 1, 1 << 20
    ordinary = synthetic_photo(np.random.default_rng(28), "cat", size=(320, 240))  # 0.3 MB to decode
    heavy = synthetic_photo(np.random.default_rng(29), "cat", fmt="PNG", size=(1200, 900))  # 3.2 MB, no draft
    release = hold_in_another_request(budget, 2 << 20)  # another request's heavy decode
    assert budget.used + (5 << 20) <= budget.limit  # memory is not what stops it
    threading.Timer(1.0, release.set).start()  # a heavy decode that waited would get the lane in 1 s
    refused = predict(client, heavy)
    answered = predict(client, ordinary)
    release.set()
    assert refused.status_code == 503 and refused.json["error"] == "busy", refused.json
    assert refused.headers["Retry-After"] == "1" and answered.status_code == 200
    with budget._cond:
        assert budget._cond.wait_for(lambda: budget.heavy == 0, 5)
    assert predict(client, heavy).status_code == 200
    service.close()


def test_heavy_decodes_run_at_the_lowest_cpu_priority():
    """A heavy decode runs on a lane thread at nice 19, so the ordinary photos beside it get the
    CPUs first; an ordinary decode stays on the request's own thread and priority."""
    budget = uploads.DecodeBudget(64 << 20, 1, serve.log, heavy_bytes=1 << 20)

    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    callers = nice()
    assert budget.run(2 << 20, nice) == 19
    assert budget.run(1 << 10, nice) == callers == nice()
    assert budget.run(2 << 20, threading.get_ident) != threading.get_ident()
    assert budget.used == budget.heavy == 0


def test_a_heavy_photo_after_the_lanes_closed_gets_a_503_not_a_422(tmp_path):
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"))
    service.decode_budget.heavy_bytes = 1 << 20
    service.decode_budget.close()  # as when the process is exiting
    r = predict(client, synthetic_photo(np.random.default_rng(30), "cat", fmt="PNG", size=(1200, 900)))
    assert r.status_code == 503 and r.json["error"] == "busy" and r.headers["Retry-After"] == "1", r.json
    assert service.decode_budget.used == service.decode_budget.heavy == 0
    service.close()


def test_a_lane_that_may_not_lower_its_priority_still_decodes(monkeypatch, capsys):
    def forbidden(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", forbidden)
    budget = uploads.DecodeBudget(64 << 20, 1, serve.log, heavy_bytes=1 << 20)
    assert budget.run(2 << 20, lambda: "decoded") == "decoded"
    assert "decode_lane_priority_unchanged" in capsys.readouterr().out


def test_api_token_guards_feedback_stats_and_metrics_only(tmp_path):
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"), api_token="s3cret")
    answer = predict(client, synthetic_photo(np.random.default_rng(27), "cat")).json  # public
    feedback = {"prediction_id": answer["prediction_id"], "label": "cat"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.post("/feedback", json=feedback, headers=headers)
        assert r.status_code == 401 and r.json["error"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/stats", headers=headers).status_code == 401
        assert client.get("/metrics", headers=headers).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert client.post("/feedback", json=feedback, headers=good).status_code == 200
    assert client.get("/stats", headers=good).json["feedback_count"] == 1
    text = client.get("/metrics", headers=good).text
    assert sample(text, "catdog_requests_total", endpoint="/feedback", status="401") == 3
    for path in ("/health", "/live", "/", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert client.get("/model-card").status_code == 404  # public: the tiny model has no card, and no 401
    service.close()


def test_the_model_card_beside_the_model_is_served_with_it(tmp_path):
    model_dir, client, service = own_tiny_model(tmp_path)
    try:
        r = client.get("/model-card", headers={"X-Request-ID": "card-1"})
        assert (r.status_code, r.json["error"], r.json["request_id"]) == (404, "no_model_card", "card-1")
        card = "# catdog model card: tiny-1\n\nReddish photos are cats, bluish ones dogs (95 % \u2264 p).\n"
        (model_dir / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        assert client.get("/model-card").status_code == 404  # the card is the served model's: read with it
        assert service.load("test")
        r = client.get("/model-card")
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/markdown; charset=utf-8"
        assert r.get_data(as_text=True) == card and r.headers["X-Content-Type-Options"] == "nosniff"
        service.model = None  # as before the first load
        r = client.get("/model-card")
        assert (r.status_code, r.json["error"], r.headers["Retry-After"]) == (503, "not_ready", "1")
    finally:
        service.close()


# ---------------------------------------------------------------- kept photos (KEEP_PHOTOS)
def photo_column(db_path):
    with sqlite3.connect(db_path) as conn:
        return dict(conn.execute("SELECT id, photo FROM predictions").fetchall())


def test_with_keep_photos_off_nothing_is_written_or_hashed(tmp_path, monkeypatch):
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"))
    try:
        assert service.settings.keep_photos == "off" and service.photos == str(tmp_path / "photos")
        monkeypatch.setattr(serve, "hashlib", None)  # any hash of an upload would fail the request
        rng = np.random.default_rng(60)
        ids = [predict(client, synthetic_photo(rng, kind)).json["prediction_id"] for kind in ("cat", "dog")]
        ids += [x["prediction_id"] for x in batch(client, [(synthetic_photo(rng, "dog"), "a.jpg")]).json["results"]]
        for prediction_id, truth in zip(ids, ("cat", "cat", "other")):
            assert client.post("/feedback", json={"prediction_id": prediction_id, "label": truth}).status_code == 200
        assert not os.path.exists(service.photos) and set(photo_column(tmp_path / "catdog.db").values()) == {None}
        assert client.get("/health").json["keep_photos"] == "off"
    finally:
        service.close()


def test_a_photo_that_cannot_be_written_is_answered_logged_and_counted(tmp_path, capsys):
    """PHOTOS_DIR gone bad after the start (here a file where the folder was: root writes
    anywhere, so no chmod): the prediction is still answered and stored, without a photo, and
    catdog_photos_not_kept_total counts it for the CatdogPhotosNotKept alert."""
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"), keep_photos="all",
                                 photos_dir=str(tmp_path / "kept"))
    try:
        os.rmdir(tmp_path / "kept")
        (tmp_path / "kept").write_text("not a folder")
        answer = predict(client, synthetic_photo(np.random.default_rng(59), "cat"))
        assert answer.status_code == 200 and photo_column(tmp_path / "catdog.db") == {answer.json["prediction_id"]: None}
        assert "catdog_photos_not_kept_total 1.0" in client.get("/metrics").text
        assert '"event": "photo_not_kept"' in capsys.readouterr().out
    finally:
        service.close()


def test_corrected_keeps_the_corrections_and_a_share_of_the_confirmations_by_sha256(tmp_path):
    share = 0.5
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"), keep_photos="corrected",
                                 keep_confirmed_share=share, photos_dir=str(tmp_path / "kept"))
    try:
        rng = np.random.default_rng(61)
        photos = [synthetic_photo(rng, "cat" if i % 2 else "dog") for i in range(16)]
        answers = [predict(client, data).json for data in photos[:8]]
        answers += batch(client, [(data, f"{i}.jpg") for i, data in enumerate(photos[8:])]).json["results"]
        assert sorted(photo_files(tmp_path / "kept")) == sorted(map(sha, photos))  # pending until their feedback
        confirmed = {}
        for i, (data, answer) in enumerate(zip(photos, answers)):
            truth = answer["label"] if i % 3 else "other"  # every third one corrected
            for _ in range(2):  # a retry decides the same
                assert client.post("/feedback", json={"prediction_id": answer["prediction_id"], "label": truth}).json
            if i % 3:
                confirmed[sha(data)] = int(sha(data)[:8], 16) < share * 16 ** 8
        corrected = {sha(data) for i, data in enumerate(photos) if not i % 3}
        assert set(confirmed.values()) == {True, False}, "the rule is not exercised both ways"
        kept = sorted(photo_files(tmp_path / "kept"))
        assert kept == sorted(corrected | {photo for photo, kept in confirmed.items() if kept})
        assert sorted(filter(None, photo_column(tmp_path / "catdog.db").values())) == kept
        assert {row["photo"] for row in service.store.kept_photos() if row["label"] != row["predicted"]} == corrected
        assert client.get("/health").json["keep_photos"] == "corrected"
    finally:
        service.close()


def test_same_bytes_share_one_file_and_a_photo_is_removed_on_request(tmp_path):
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"), keep_photos="all", api_token="s3cret")
    token = {"Authorization": "Bearer s3cret"}
    try:
        rng = np.random.default_rng(62)
        twice, once = synthetic_photo(rng, "cat"), synthetic_photo(rng, "dog")
        first, second, other = (predict(client, data).json["prediction_id"] for data in (twice, twice, once))
        for prediction_id in (first, second, other):  # all: every judged photo stays, right or wrong
            r = client.post("/feedback", json={"prediction_id": prediction_id, "label": "cat"}, headers=token)
            assert r.status_code == 200, r.json
        assert sorted(photo_files(service.photos)) == sorted([sha(twice), sha(once)])
        assert client.delete(f"/predictions/{first}/photo").status_code == 401
        r = client.delete(f"/predictions/{first}/photo", headers=token)
        # The second prediction of the same bytes forgets them too: else it would keep the file.
        assert r.status_code == 200 and r.json == {"prediction_id": first, "removed": True, "predictions": 2}
        assert sorted(photo_files(service.photos)) == [sha(once)]
        for prediction_id in (first, second):  # idempotent
            assert client.delete(f"/predictions/{prediction_id}/photo", headers=token).json == {
                "prediction_id": prediction_id, "removed": False, "predictions": 0}
        r = client.delete("/predictions/nope/photo", headers=token)
        assert r.status_code == 404 and r.json["error"] == "unknown_prediction_id"
        assert [row["prediction_id"] for row in service.store.kept_photos()] == [other]
        assert client.get("/stats", headers=token).json["feedback_count"] == 3  # the feedback stays
    finally:
        service.close()


def test_pending_photos_expire_and_retention_takes_kept_ones_with_their_rows(tmp_path):
    db_path = str(tmp_path / "catdog.db")
    s = Server(tiny_model(), db_path, KEEP_PHOTOS="all", KEEP_PENDING_HOURS=0.0005, RETENTION_ROWS=2,
               RETENTION_INTERVAL_S=0.3)
    try:
        rng = np.random.default_rng(63)
        photos = [synthetic_photo(rng, kind) for kind in ("cat", "dog", "cat")]
        ids = []
        for data in photos:  # judged, judged, never judged
            ids.append(s.predict(data).json()["prediction_id"])
            if len(ids) < 3:
                assert s.post("/feedback", json={"prediction_id": ids[-1], "label": "dog"}).status_code == 200
        assert s.get("/health").json()["keep_photos"] == "all"
        # An upload whose row was never stored (its insert failed) and a write killed midway.
        os.makedirs(tmp_path / "photos" / "cd", exist_ok=True)
        (tmp_path / "photos" / "cd" / ("cd" * 32)).write_bytes(b"no row names this")
        (tmp_path / "photos" / "cd" / ".partial-x1").write_bytes(b"half a photo")
        deadline = time.monotonic() + 20
        while list(photo_files(tmp_path / "photos")) != [sha(photos[1])]:
            assert time.monotonic() < deadline, list(photo_files(tmp_path / "photos"))
            time.sleep(0.1)
        assert photo_column(db_path) == {ids[1]: sha(photos[1]), ids[2]: None}  # the oldest row pruned
    finally:
        s.stop()
    events = {json.loads(line)["event"] for line in s.logs().splitlines() if '"event"' in line}
    assert {"pruned", "pending_photos_dropped", "unnamed_photo_files_removed"} <= events, events


def test_a_verdict_after_keeping_is_switched_off_drops_the_photo_an_earlier_mode_left_pending(tmp_path):
    db_path = str(tmp_path / "catdog.db")
    rng = np.random.default_rng(64)
    photos = [synthetic_photo(rng, "cat") for _ in range(2)]
    client, service = in_process(tiny_model(), db_path, keep_photos="all")
    try:
        kept, pending = (predict(client, data).json["prediction_id"] for data in photos)
        assert client.post("/feedback", json={"prediction_id": kept, "label": "dog"}).status_code == 200
    finally:
        service.close()
    client, service = in_process(tiny_model(), db_path)  # KEEP_PHOTOS=off from now on
    try:
        assert sorted(photo_files(service.photos)) == sorted(map(sha, photos))
        assert client.post("/feedback", json={"prediction_id": pending, "label": "dog"}).status_code == 200
        assert list(photo_files(service.photos)) == [sha(photos[0])]  # else harvested once judged
        # The kept one's verdict sent again (a double click) does not judge it again under off.
        assert client.post("/feedback", json={"prediction_id": kept, "label": "dog"}).json["recorded"] is False
        assert photo_column(db_path) == {kept: sha(photos[0]), pending: None}
    finally:
        service.close()


def test_keeping_photos_refuses_to_start_without_a_usable_folder(tmp_path):
    (tmp_path / "a-file").write_text("")
    for settings, words in (({"keep_photos": "some"}, "KEEP_PHOTOS='some': must be one of off, corrected, all"),
                            ({"keep_photos": "all", "database_url": "postgresql://db/catdog"}, "needs PHOTOS_DIR"),
                            ({"keep_photos": "corrected", "photos_dir": str(tmp_path / "a-file" / "photos")},
                             f"cannot write to the photos folder {tmp_path / 'a-file' / 'photos'}"),
                            ({"keep_confirmed_share": 2.0}, "KEEP_CONFIRMED_SHARE=2.0")):
        with pytest.raises(serve.Refused, match=re.escape(words)):
            serve.Service(serve.Settings(model_path=tiny_model(), db_path=str(tmp_path / "catdog.db"), **settings))
    assert not os.path.exists(tmp_path / "catdog.db")  # refused before the store was opened
    env = {**os.environ, "MODEL_PATH": tiny_model(), "DB_PATH": str(tmp_path / "catdog.db"), "PORT": "0",
           "KEEP_PHOTOS": "corrected", "PHOTOS_DIR": str(tmp_path / "a-file")}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py")], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    refused = [json.loads(line) for line in out.stdout.splitlines() if "settings_refused" in line]
    assert out.returncode == 1 and refused and str(tmp_path / "a-file") in refused[0]["error"], out.stdout + out.stderr
    with pytest.raises(serve.Refused, match=re.escape("KEEP_PENDING_HOURS='a day': not a number (float)")):
        serve.Settings.from_env({"KEEP_PENDING_HOURS": "a day"})
