"""The inference service through its HTTP API: a real (tiny) exported model in a real
serve.py process on 127.0.0.1, stopped by PID."""
import io
import json
import os
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

import catdog
from service_helpers import ROOT, Server, export_tiny_model, served, synthetic_photo, tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from served(tmp_path_factory)


def test_serving_never_imports_torch():
    code = "import sys, serve; assert 'torch' not in sys.modules, 'serve imported torch'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_serving_requirements_are_a_subset_of_the_project_pins():
    def pins(name):
        with open(os.path.join(ROOT, name)) as f:
            return {line.split("#")[0].strip() for line in f if "==" in line.split("#")[0]}
    serving, project = pins("requirements-serve.txt"), pins("requirements.txt")
    assert {"onnxruntime", "numpy", "pillow", "flask", "waitress"} <= {p.split("==")[0] for p in serving}
    assert serving <= project, f"not pinned the same in requirements.txt: {sorted(serving - project)}"
    assert not any(p.startswith("torch") for p in serving)


def test_inference_threads_follow_the_cgroup_cpu_quota(monkeypatch):
    import serve

    real_open = open

    def fake_open(path, *args, **kw):
        if path == "/sys/fs/cgroup/cpu.max":
            return io.StringIO("50000 100000\n")  # half a CPU
        return real_open(path, *args, **kw)

    assert 1 <= serve.available_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(serve, "open", fake_open, raising=False)
    assert serve.available_cpus() == 1


def test_predicts_real_photos_through_the_api(server):
    rng = np.random.default_rng(1)
    for kind in ("cat", "dog", "cat", "dog"):
        r = server.predict(synthetic_photo(rng, kind))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == kind
        assert body["probabilities"][kind] == body["confidence"] > 0.5
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
        assert body["model_version"] == "tiny-1" and body["latency_ms"] > 0
        assert r.headers["X-Request-ID"] == body["request_id"]
    # the other multipart field name, and a raw image/* body as curl --data-binary sends it
    assert server.predict(synthetic_photo(rng, "dog", fmt="PNG"), field="image").json()["label"] == "dog"
    r = server.post("/predict", data=synthetic_photo(rng, "cat"), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["label"] == "cat"


def test_request_id_is_echoed_only_when_safe(server):
    rng = np.random.default_rng(2)
    r = server.predict(synthetic_photo(rng, "cat"), headers={"X-Request-ID": "shelter-42.a_b"})
    assert r.headers["X-Request-ID"] == r.json()["request_id"] == "shelter-42.a_b"
    r = server.predict(synthetic_photo(rng, "cat"), headers={"X-Request-ID": "<script>" + "x" * 100})
    assert r.status_code == 200 and r.json()["request_id"] == r.headers["X-Request-ID"]
    assert "<" not in r.json()["request_id"] and len(r.json()["request_id"]) == 32


def test_health_live_metrics_stats_and_page(server):
    assert server.get("/live").status_code == 200
    health = server.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model_version": "tiny-1",
                                                           "arch": "baseline"}
    server.predict(synthetic_photo(np.random.default_rng(3), "dog"))
    text = server.get("/metrics").text
    for needle in ('catdog_requests_total{endpoint="/predict",status="200"}',
                   'catdog_request_duration_seconds_bucket{endpoint="/predict",le="+Inf"}',
                   'catdog_predictions_total{label="dog"}', 'catdog_prediction_confidence_bucket{le="0.9"}',
                   'catdog_feedback_total{correct="true"}', 'catdog_model_info{version="tiny-1",arch="baseline"} 1',
                   "catdog_model_ready 1", "catdog_inference_batch_size_count", "catdog_live_accuracy_samples"):
        assert needle in text, needle
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])
    stats = server.get("/stats").json()
    assert stats["predictions_by_label"]["dog"] >= 1 and stats["requests"] >= stats["predictions"] >= 1
    assert stats["mean_latency_ms"] > 0 and stats["model_version"] == "tiny-1"
    assert {"live_accuracy", "feedback_count", "drift"} <= set(stats)
    page = server.get("/")
    assert page.status_code == 200 and "/predict" not in page.text.split("<script>")[0]
    assert 'fetch("predict"' in page.text and 'fetch("feedback"' in page.text


def test_no_model_means_not_ready_but_alive(tmp_path):
    s = Server(str(tmp_path / "missing.onnx"), str(tmp_path / "catdog.db"), wait_ready=False)
    try:
        assert s.get("/live").status_code == 200
        assert s.get("/health").status_code == 503 and s.get("/health").json()["status"] == "no_model"
        r = s.predict(synthetic_photo(np.random.default_rng(4), "cat"))
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        assert "catdog_model_ready 0" in s.get("/metrics").text
    finally:
        s.stop()


def test_feedback_drives_live_accuracy_and_survives_kill_9(tmp_path):
    db_path = str(tmp_path / "db" / "catdog.db")
    s = Server(tiny_model(), db_path, LIVE_WINDOW=3)
    rng = np.random.default_rng(5)
    ids = [s.predict(synthetic_photo(rng, kind), name="Whiskers-7.jpg").json()["request_id"]
           for kind in ("cat", "dog", "cat", "dog")]
    # the oldest prediction is judged wrong, the three newest right: the window of 3 sees 100 %
    truths = ("dog", "dog", "cat", "dog")
    for request_id, truth in zip(ids, truths):
        r = s.post("/feedback", json={"request_id": request_id, "label": truth})
        assert r.status_code == 200 and r.json()["correct"] == (request_id != ids[0])
    assert s.post("/feedback", json={"request_id": "nope", "label": "cat"}).status_code == 404
    assert s.post("/feedback", json={"request_id": ids[0], "label": "horse"}).status_code == 400
    assert s.post("/feedback", data="not json").status_code == 400
    stats = s.get("/stats").json()
    assert (stats["live_accuracy"], stats["live_accuracy_samples"], stats["feedback_count"]) == (1.0, 3, 4)
    metrics = s.get("/metrics").text
    assert "catdog_live_accuracy 1.0" in metrics
    assert 'catdog_feedback_total{correct="false"} 1' in metrics and 'catdog_feedback_total{correct="true"} 3' in metrics
    # a wrong answer among the newest three: 2/3
    s.post("/feedback", json={"request_id": ids[3], "label": "cat"})
    assert abs(s.get("/stats").json()["live_accuracy"] - 2 / 3) < 1e-9

    s.stop(signal.SIGKILL)  # no clean shutdown: what was acknowledged must still be there
    with sqlite3.connect(db_path) as conn:
        rows = dict(conn.execute("SELECT request_id, label FROM feedback").fetchall())
        assert rows == {ids[0]: "dog", ids[1]: "dog", ids[2]: "cat", ids[3]: "cat"}
        columns = [row[1] for row in conn.execute("PRAGMA table_info(predictions)")]
        assert columns == ["request_id", "time", "model_version", "label", "confidence", "width", "height",
                           "brightness"]
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


def test_logs_are_json_lines_without_images_names_or_addresses(server):
    rng = np.random.default_rng(6)
    photo = synthetic_photo(rng, "cat")
    r = server.predict(photo, name="Whiskers-secret-4711.jpg", headers={"X-Forwarded-For": "10.9.8.7"})
    assert r.status_code == 200
    server.predict(b"not an image at all", name="Rex-private.jpg")
    time.sleep(0.2)
    logs = server.logs()
    lines = [json.loads(line) for line in logs.splitlines() if line.strip()]  # every line is JSON
    mine = [line for line in lines if line.get("request_id") == r.json()["request_id"]]
    assert len(mine) == 1
    assert {"request_id", "endpoint", "status", "latency_ms", "label"} <= set(mine[0])
    assert (mine[0]["endpoint"], mine[0]["status"], mine[0]["label"]) == ("/predict", 200, "cat")
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


def test_batcher_groups_concurrent_requests_and_matches_unbatched(tmp_path):
    rng = np.random.default_rng(7)
    photos = [synthetic_photo(rng, kind) for kind in ("cat", "dog") * 12]
    s = Server(tiny_model(), str(tmp_path / "catdog.db"), BATCH_MAX=8, BATCH_WAIT_MS=50, THREADS=24)
    try:
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda p: s.predict(p).json(), photos))
        metrics = s.get("/metrics").text
    finally:
        s.stop()
    for answer, expected in zip(answers, direct_probabilities(tiny_model(), photos)):
        assert np.allclose([answer["probabilities"]["cat"], answer["probabilities"]["dog"]], expected, atol=1e-5)
    sizes = {line.split("le=")[1].split('"')[1]: int(line.split()[-1])
             for line in metrics.splitlines() if line.startswith("catdog_inference_batch_size_bucket")}
    assert sizes["+Inf"] < len(photos), "no two requests shared a batch"
    assert sizes["4"] < sizes["+Inf"] and sizes["+Inf"] == sizes["8"], sizes  # some batches of 5-8, none above 8


def test_sighup_reloads_the_model_without_dropping_requests(tmp_path):
    model_dir = tmp_path / "models"
    shutil.copytree(os.path.dirname(tiny_model()), model_dir)
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
    finally:
        stop.set()
        s.stop()
    assert statuses and set(statuses) == {200}
    assert ("tiny-1", "cat") in versions and ("tiny-2", "dog") in versions  # the new model inverts the rule
    assert versions <= {("tiny-1", "cat"), ("tiny-2", "dog")}


def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    # A long batching wait keeps requests in flight while the signal arrives; with 2 request
    # threads, 4 of the 6 are still queued for a thread then.
    s = Server(tiny_model(), str(tmp_path / "catdog.db"), BATCH_MAX=64, BATCH_WAIT_MS=600, THREADS=2)
    rng = np.random.default_rng(9)
    photos = [synthetic_photo(rng, "dog") for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(s.predict, p) for p in photos]
        time.sleep(0.3)
        s.send(signal.SIGTERM)
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * 6
    assert all(a.json()["label"] == "dog" for a in answers)
    assert s.proc.wait(15) == 0
    assert '"event": "stopped"' in s.logs()
    s.stop()


def test_drift_rises_on_dark_and_grayscale_inputs_and_stays_low_in_distribution(tmp_path):
    s = Server(tiny_model(), str(tmp_path / "catdog.db"), DRIFT_WINDOW=120, DRIFT_MIN_SAMPLES=100, THREADS=4)
    rng = np.random.default_rng(10)

    def send(photos):
        with ThreadPoolExecutor(4) as pool:
            assert {r.status_code for r in pool.map(s.predict, photos)} == {200}
        return s.get("/stats").json()["drift"]

    try:
        assert send([synthetic_photo(rng) for _ in range(40)])["psi"] == {}  # too few inputs to judge yet
        normal = send([synthetic_photo(rng) for _ in range(80)])
        dark = send([synthetic_photo(rng, dark=True) for _ in range(120)])
        gray = send([synthetic_photo(rng, gray=True) for _ in range(120)])
        metrics = s.get("/metrics").text
    finally:
        s.stop()
    assert normal["samples"] == 120 and normal["drifted"] == [], normal
    assert max(normal["psi"].values()) < catdog.DRIFT_THRESHOLD, normal
    assert dark["psi"]["brightness"] > 4 * catdog.DRIFT_THRESHOLD and "brightness" in dark["drifted"], dark
    assert gray["psi"]["saturation"] > 4 * catdog.DRIFT_THRESHOLD and "saturation" in gray["drifted"], gray
    assert 'catdog_drift_psi{feature="saturation"}' in metrics and "catdog_drift_window_samples 120" in metrics
