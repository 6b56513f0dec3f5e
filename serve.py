"""catdog inference service: the champion in ONNX Runtime behind Flask + waitress.

    python serve.py                      # 0.0.0.0:8000, models/model.onnx
    PORT=9000 MODEL_PATH=... python serve.py

Endpoints: GET / (staff page), POST /predict, POST /feedback, GET /health (ready),
GET /live, GET /metrics (Prometheus text), GET /stats (JSON).

Serving imports numpy, Pillow, onnxruntime and Flask only, never torch: decoding and
preprocessing are catdog.open_image + catdog.preprocess, the functions training uses.
Waitress threads decode uploads in parallel and run the model, at most one ONNX Runtime
run per usable CPU at a time; an optional batcher groups concurrent requests instead.
Every prediction and every piece of staff feedback goes to a small SQLite file (DB_PATH),
the only thing the service writes.
Signals: SIGTERM/SIGINT drain in-flight requests then exit; SIGHUP reloads the model.
"""
import io
import json
import math
import os
import queue
import re
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections import Counter, deque

import numpy as np
import onnxruntime as ort
import waitress
from flask import Flask, Request, g, jsonify, request, send_from_directory
from werkzeug.exceptions import HTTPException

import catdog

# ---------------------------------------------------------------- settings (env vars)
env = os.environ.get
HOST = env("HOST", "0.0.0.0")
PORT = int(env("PORT", "8000"))
MODEL_PATH = env("MODEL_PATH", os.path.join(catdog.MODELS_DIR, "model.onnx"))
PROFILE_PATH = env("PROFILE_PATH", os.path.join(os.path.dirname(MODEL_PATH), "reference_profile.json"))
DB_PATH = env("DB_PATH", os.path.join("var", "catdog.db"))
MAX_UPLOAD_MB = float(env("MAX_UPLOAD_MB", "10"))
MAX_PIXELS = int(env("MAX_PIXELS", str(catdog.MAX_PIXELS)))
BATCH_MAX = int(env("BATCH_MAX", "1"))  # >1 turns the batcher on (see "the batcher" below)
BATCH_WAIT_MS = float(env("BATCH_WAIT_MS", "0"))  # 0: batch what queued during the last run
THREADS = int(env("THREADS", "0"))  # waitress worker threads; 0: two per CPU this process may use
ORT_THREADS = int(env("ORT_THREADS", "1"))  # intra-op threads per ORT run
INFER_THREADS = int(env("INFER_THREADS", "0"))  # ORT runs at once; 0: the CPUs this process may use
LIVE_WINDOW = int(env("LIVE_WINDOW", "500"))  # live accuracy over the last N predictions with feedback
DRIFT_WINDOW = int(env("DRIFT_WINDOW", "500"))  # drift over the last N inputs
DRIFT_MIN_SAMPLES = int(env("DRIFT_MIN_SAMPLES", "100"))  # PSI of a handful of images is noise
SHUTDOWN_TIMEOUT = float(env("SHUTDOWN_TIMEOUT", "20"))  # seconds to let in-flight requests finish
MAX_UPLOAD_BYTES = int(MAX_UPLOAD_MB * 1024 * 1024)
BODY_HARD_LIMIT = max(4 * MAX_UPLOAD_BYTES, 64 << 20)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ERROR_STATUS = {"no_file": 400, "empty": 400, "unsupported_media_type": 415, "unsupported_format": 415,
                "not_an_image": 422, "corrupt": 422, "too_many_pixels": 422, "too_small": 422}


def available_cpus():
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota
    (a container limited to 2 CPUs on a 64-core host must not start 64 ORT threads)."""
    cpus = len(os.sched_getaffinity(0))
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            fields = open(path).read().split()
            if path.endswith("cpu.max"):
                quota, period = fields
            else:
                quota, period = fields[0], open(os.path.join(os.path.dirname(path), "cpu.cfs_period_us")).read()
            if quota not in ("max", "-1"):
                cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
            break
        except (OSError, ValueError):
            continue
    return cpus


# ---------------------------------------------------------------- logging: one JSON line per event
log_lock = threading.Lock()


def log(**fields):
    """JSON line to stdout. Callers pass only ids, numbers and labels: never image bytes,
    file names or client addresses."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
    line = json.dumps({"time": stamp, **fields}, default=str)
    with log_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------- the model
model = None  # the current model, set once loaded AND warmed; swapped whole on reload
model_lock = threading.Lock()  # one load at a time
load_error = None  # why the last load failed, for /health


def load_model(path=MODEL_PATH):
    """ONNX session + the meta saved beside it, warmed up at every batch size it will see first."""
    meta = catdog.read_json(os.path.splitext(path)[0] + ".json")
    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1
    # Spinning ORT threads would steal the cores the waitress threads need for decoding.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    crop = meta["preprocess"]["crop"]
    for batch in sorted({1, max(1, BATCH_MAX)}):
        session.run(["logits"], {"image": np.zeros((batch, 3, crop, crop), np.float32)})
    profile = catdog.read_json(PROFILE_PATH) if os.path.exists(PROFILE_PATH) else None
    return {"session": session, "meta": meta, "version": str(meta.get("version", "unknown")),
            "profile": profile, "threads": options.intra_op_num_threads}


def reload_model(reason):
    """Load (or reload) the model in the background; the old one serves until the swap."""
    global model, load_error
    with model_lock:
        started = time.perf_counter()
        try:
            new = load_model()
        except Exception as e:  # keep serving the old model rather than none
            load_error = f"{type(e).__name__}: {e}"
            log(event="model_load_failed", reason=reason, path=MODEL_PATH, error=load_error)
            return
        if model is not None and model["version"] != new["version"]:
            with metrics_lock:
                recent_confidences.clear()  # confidences belong to a model; input statistics do not
        model, load_error = new, None
        log(event="model_loaded", reason=reason, model_version=new["version"], arch=new["meta"].get("arch"),
            ort_threads=new["threads"], drift_profile=new["profile"] is not None,
            load_ms=round((time.perf_counter() - started) * 1000, 1))


def run_model(current, batch):
    return current["session"].run(["logits"], {"image": batch})[0]


# ---------------------------------------------------------------- inference, and the batcher
# Waitress threads decode in parallel, then run the model themselves, at most
# INFER_THREADS runs at once (one per usable CPU): with 8 request threads free to fight
# over 2 cores for inference, `make bench` gave 144-167 instead of 163-172 req/s.
# Measured on 2 cores with int8 EfficientNet-Lite0, ORT's intra-op threads do not speed
# up a run and a batch of 8 costs 8 single runs, so batching saves no CPU and makes each
# request wait for its batch: `make bench` measured it equal or slower, hence off by
# default. With BATCH_MAX > 1, INFER_THREADS inference threads each take what is waiting
# (up to BATCH_MAX, waiting at most BATCH_WAIT_MS for more) and run it as one batch: for
# hardware where a batch is cheaper per image (a GPU, many cores); `make bench` shows
# both so the choice is measured.
inference_slots = threading.BoundedSemaphore(INFER_THREADS or available_cpus())
jobs = queue.Queue()  # the batcher's


def infer(current, x):
    """Logits for one preprocessed image (3, crop, crop) with the given model."""
    if BATCH_MAX <= 1:
        with inference_slots:
            logits = run_model(current, x[None])[0]
        observe("batch_size", (), 1)
        return logits
    job = {"model": current, "x": x, "done": threading.Event()}
    jobs.put(job)
    if not job["done"].wait(60):
        raise RuntimeError("inference timed out")
    if "error" in job:
        raise job["error"]
    return job["logits"]


def batch_loop():
    while True:
        batch = [jobs.get()]
        deadline = time.monotonic() + BATCH_WAIT_MS / 1000
        while len(batch) < BATCH_MAX:
            try:
                batch.append(jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        # After a reload, jobs preprocessed for the old model still run on the old model.
        for current in {id(job["model"]): job["model"] for job in batch}.values():
            group = [job for job in batch if job["model"] is current]
            try:
                logits = run_model(current, np.stack([job["x"] for job in group]))
                for job, row in zip(group, logits):
                    job["logits"] = row
            except Exception as e:
                for job in group:
                    job["error"] = e
            finally:
                observe("batch_size", (), len(group))
                for job in group:
                    job["done"].set()


# ---------------------------------------------------------------- storage: predictions and feedback
# No image bytes, file names or client addresses: only what monitoring needs.
SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY, time REAL NOT NULL, model_version TEXT NOT NULL,
    label TEXT NOT NULL, confidence REAL NOT NULL, width INTEGER, height INTEGER, brightness REAL);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY REFERENCES predictions(request_id), time REAL NOT NULL, label TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions(time);
"""
db = None
db_lock = threading.Lock()


def open_db(path=DB_PATH):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    # WAL: readers never block the writer. synchronous=NORMAL: a commit survives the
    # process being killed (kill -9, OOM); only a power cut can lose the last few.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


def query(sql, params=()):
    with db_lock:
        return db.execute(sql, params).fetchall()


def live_accuracy():
    """(accuracy, n) over the last LIVE_WINDOW predictions that received feedback."""
    n, right = query("SELECT COUNT(*), SUM(label = truth) FROM (SELECT p.label AS label, f.label AS truth "
                     "FROM feedback f JOIN predictions p USING (request_id) ORDER BY p.time DESC LIMIT ?)",
                     (LIVE_WINDOW,))[0]
    return (right / n if n else None), n


# ---------------------------------------------------------------- metrics (Prometheus text format)
metrics_lock = threading.Lock()
counters = {"requests": Counter(), "predictions": Counter(), "feedback": Counter()}
histograms = {  # name -> bucket upper bounds; observations are kept per label tuple
    "latency": LATENCY_BUCKETS, "confidence": catdog.CONFIDENCE_EDGES[:-1], "batch_size": BATCH_BUCKETS}
observations = {name: {} for name in histograms}  # name -> labels -> [bucket counts..., +Inf, sum]
recent_stats = deque(maxlen=DRIFT_WINDOW)  # catdog.image_stats of the latest inputs
recent_confidences = deque(maxlen=DRIFT_WINDOW)
started_at = time.time()
in_flight = 0


def count(name, labels):
    with metrics_lock:
        counters[name][labels] += 1


def observe(name, labels, value):
    edges = histograms[name]
    with metrics_lock:
        row = observations[name].setdefault(labels, [0] * (len(edges) + 2))
        row[next((i for i, edge in enumerate(edges) if value <= edge), len(edges))] += 1
        row[-1] += value


def drift():
    """PSI per feature of the recent inputs against the model's reference profile."""
    current = model
    with metrics_lock:
        stats, confidences = list(recent_stats), list(recent_confidences)
    if current is None or current["profile"] is None or len(stats) < DRIFT_MIN_SAMPLES:
        return {"samples": len(stats), "psi": {}, "drifted": []}
    if len(confidences) < DRIFT_MIN_SAMPLES:
        confidences = []
    scores = {k: round(v, 4) for k, v in catdog.drift_scores(current["profile"], stats, confidences).items()}
    return {"samples": len(stats), "psi": scores, "threshold": catdog.DRIFT_THRESHOLD,
            "drifted": sorted(k for k, v in scores.items() if v > catdog.DRIFT_THRESHOLD)}


def label_text(names, values):
    def escape(v):
        return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{n}="{escape(v)}"' for n, v in zip(names, values)) + "}" if names else ""


def histogram_lines(metric, name, label_names):
    edges = histograms[name]
    with metrics_lock:
        rows = {labels: list(row) for labels, row in observations[name].items()}
    for labels, row in sorted(rows.items()):
        cumulative = 0
        for edge, n in zip(list(edges) + ["+Inf"], row[:-1]):
            cumulative += n
            yield f"{metric}_bucket{label_text(label_names + ('le',), labels + (edge,))} {cumulative}"
        yield f"{metric}_sum{label_text(label_names, labels)} {row[-1]}"
        yield f"{metric}_count{label_text(label_names, labels)} {cumulative}"


def metrics_text():
    current = model
    accuracy, judged = live_accuracy()
    scores = drift()
    with metrics_lock:
        snapshot = {name: dict(c) for name, c in counters.items()}
    families = [  # (name, type, help, lines)
        ("catdog_requests_total", "counter", "HTTP requests by endpoint and status.",
         [f"catdog_requests_total{label_text(('endpoint', 'status'), k)} {v}"
          for k, v in sorted(snapshot["requests"].items())]),
        ("catdog_request_duration_seconds", "histogram", "Request latency by endpoint.",
         list(histogram_lines("catdog_request_duration_seconds", "latency", ("endpoint",)))),
        ("catdog_predictions_total", "counter", "Predictions by label.",
         [f"catdog_predictions_total{label_text(('label',), (k,))} {snapshot['predictions'].get((k,), 0)}"
          for k in catdog.CLASSES]),
        ("catdog_prediction_confidence", "histogram", "Confidence of the predicted label.",
         list(histogram_lines("catdog_prediction_confidence", "confidence", ()))),
        ("catdog_feedback_total", "counter", "Staff feedback by whether the prediction was right.",
         [f"catdog_feedback_total{label_text(('correct',), (k,))} {snapshot['feedback'].get((k,), 0)}"
          for k in ("true", "false")]),
        ("catdog_live_accuracy", "gauge", f"Accuracy over the last {LIVE_WINDOW} predictions with feedback.",
         [f"catdog_live_accuracy {accuracy}"] if judged else []),
        ("catdog_live_accuracy_samples", "gauge", "Predictions with feedback behind catdog_live_accuracy.",
         [f"catdog_live_accuracy_samples {judged}"]),
        ("catdog_drift_psi", "gauge", "PSI of recent inputs against the training reference, per feature.",
         [f"catdog_drift_psi{label_text(('feature',), (k,))} {v}" for k, v in sorted(scores["psi"].items())]),
        ("catdog_drift_window_samples", "gauge", "Recent inputs in the drift window.",
         [f"catdog_drift_window_samples {scores['samples']}"]),
        ("catdog_inference_batch_size", "histogram", "Images per ONNX Runtime run.",
         list(histogram_lines("catdog_inference_batch_size", "batch_size", ()))),
        ("catdog_model_info", "gauge", "The model being served.",
         [f"catdog_model_info{label_text(('version', 'arch'), (current['version'], current['meta'].get('arch')))} 1"]
         if current else []),
        ("catdog_model_ready", "gauge", "1 when the model is loaded and warmed up.",
         [f"catdog_model_ready {int(current is not None and not stopping.is_set())}"]),
        ("catdog_in_flight_requests", "gauge", "Requests being handled now.", [f"catdog_in_flight_requests {in_flight}"]),
        ("catdog_start_time_seconds", "gauge", "Process start, Unix time.", [f"catdog_start_time_seconds {started_at}"]),
    ]
    out = []
    for name, kind, help_text, lines in families:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- the app
class InMemoryRequest(Request):
    # Uploads are capped by MAX_UPLOAD_MB, so keep them in memory: werkzeug would spool
    # big ones to temporary files, and the container's root file system is read-only.
    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


app = Flask(__name__)
app.request_class = InMemoryRequest
app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
stopping = threading.Event()


@app.before_request
def start_request():
    global in_flight
    g.started = time.perf_counter()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
    g.label = g.reason = None
    with metrics_lock:
        in_flight += 1
        g.counted = True


@app.after_request
def finish_request(response):
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"  # raw paths would explode label sets
    g.request_id = g.get("request_id") or uuid.uuid4().hex
    response.headers["X-Request-ID"] = g.request_id
    count("requests", (endpoint, str(response.status_code)))
    observe("latency", (endpoint,), seconds)
    log(request_id=g.request_id, method=request.method, endpoint=endpoint, status=response.status_code,
        latency_ms=round(seconds * 1000, 2), label=g.get("label"), error=g.get("reason"))
    return response


@app.teardown_request
def end_request(exc):
    global in_flight
    if g.pop("counted", False):
        with metrics_lock:
            in_flight -= 1


def error(status, reason, message):
    g.reason = reason
    g.request_id = g.get("request_id") or uuid.uuid4().hex
    return jsonify(error=reason, message=message, request_id=g.request_id), status


@app.errorhandler(HTTPException)
def http_error(e):
    if e.code == 413:
        return error(413, "too_large", f"the upload exceeds the {MAX_UPLOAD_MB:g} MB limit")
    return error(e.code, re.sub(r"\W+", "_", e.name.lower()), e.description)


@app.errorhandler(Exception)
def server_error(e):
    app.logger.exception("unhandled error")  # stderr, with traceback
    return error(500, "internal_error", "the server failed to handle this request")


def read_upload():
    """Bytes of the photo: multipart field `file` (or `image`), or a raw image/* body."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file") or request.files.get("image")
        if upload is None:
            raise catdog.ImageError("no_file", "send the photo as multipart field 'file' (or 'image')")
        return upload.read()
    if not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise catdog.ImageError("no_file", "no photo: send multipart field 'file' or an image/* body")
    if request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        return request.get_data()
    raise catdog.ImageError("unsupported_media_type",
                            f"content type {request.mimetype or 'none'} is not accepted: "
                            "send multipart/form-data or an image/* body")


def decode(data, min_side):
    """RGB image from untrusted bytes; the format is sniffed from the bytes, never the name.
    Big JPEGs decode at a reduced scale that still covers min_side (catdog.open_image)."""
    try:
        return catdog.open_image(data, MAX_PIXELS, min_side)
    except catdog.ImageError:
        raise
    except Exception as e:  # any other failure inside a decoder is still a bad file, not a server fault
        raise catdog.ImageError("corrupt", f"the image could not be decoded ({type(e).__name__})") from None


@app.post("/predict")
def predict():
    current = model  # this request uses this model throughout, even if a reload swaps it meanwhile
    if current is None:
        return error(503, "not_ready", "the model is not loaded yet")
    try:
        img = decode(read_upload(), current["meta"]["preprocess"]["resize"])
    except catdog.ImageError as e:
        return error(ERROR_STATUS.get(e.reason, 422), e.reason, str(e))
    x = catdog.preprocess(img, current["meta"]["preprocess"])
    probabilities = catdog.softmax(infer(current, x))
    classes = current["meta"]["classes"]
    best = int(np.argmax(probabilities))
    label, confidence = classes[best], float(probabilities[best])
    stats = catdog.image_stats(img)
    with db_lock:
        db.execute("INSERT OR REPLACE INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (g.request_id, time.time(), current["version"], label, confidence,
                    stats["width"], stats["height"], stats["brightness"]))
    with metrics_lock:
        recent_stats.append(stats)
        recent_confidences.append(confidence)
    count("predictions", (label,))
    observe("confidence", (), confidence)
    g.label = label
    return jsonify(label=label, confidence=round(confidence, 6),
                   probabilities={c: round(float(p), 6) for c, p in zip(classes, probabilities)},
                   model_version=current["version"], request_id=g.request_id,
                   latency_ms=round((time.perf_counter() - g.started) * 1000, 2))


@app.post("/feedback")
def feedback():
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return error(400, "bad_json", 'send JSON {"request_id": ..., "label": "cat" or "dog"}')
    request_id, truth = body.get("request_id"), body.get("label")
    if not isinstance(truth, str) or truth.lower() not in catdog.CLASSES:
        return error(400, "bad_label", f"label must be one of {', '.join(catdog.CLASSES)}")
    if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
        return error(400, "bad_request_id", "request_id must be the id a /predict answer returned")
    truth = truth.lower()
    with db_lock:
        row = db.execute("SELECT label FROM predictions WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None:
            db.execute("INSERT OR REPLACE INTO feedback VALUES (?, ?, ?)", (request_id, time.time(), truth))
    if row is None:
        return error(404, "unknown_request_id", "no prediction has this request_id")
    correct = row[0] == truth
    count("feedback", ("true" if correct else "false",))
    g.label = truth
    return jsonify(request_id=request_id, label=truth, predicted=row[0], correct=correct)


@app.get("/health")
def health():
    current = model
    if stopping.is_set():
        return jsonify(status="stopping"), 503
    if current is None:
        status = "no_model" if not os.path.exists(MODEL_PATH) else "load_failed" if load_error else "loading"
        return jsonify(status=status, model_path=MODEL_PATH, error=load_error), 503
    return jsonify(status="ok", model_version=current["version"], arch=current["meta"].get("arch"))


@app.get("/live")
def live():
    return jsonify(status="alive")


@app.get("/metrics")
def metrics():
    return metrics_text(), 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}


@app.get("/stats")
def stats():
    current = model
    accuracy, judged = live_accuracy()
    with metrics_lock:
        requests_by = dict(counters["requests"])
        predict_latency = observations["latency"].get(("/predict",))
        by_label = {c: counters["predictions"].get((c,), 0) for c in catdog.CLASSES}
    predict_count = predict_latency and sum(predict_latency[:-1])
    return jsonify(
        model_version=current and current["version"], uptime_s=round(time.time() - started_at, 1),
        requests=sum(requests_by.values()),
        requests_by_endpoint={f"{e} {s}": n for (e, s), n in sorted(requests_by.items())},
        predictions=sum(by_label.values()), predictions_by_label=by_label,
        mean_latency_ms=round(predict_latency[-1] / predict_count * 1000, 2) if predict_count else None,
        live_accuracy=accuracy, live_accuracy_samples=judged, live_window=LIVE_WINDOW,
        feedback_count=query("SELECT COUNT(*) FROM feedback")[0][0], drift=drift())


@app.get("/")
def index():
    return send_from_directory(app.static_folder, "index.html")


# ---------------------------------------------------------------- process: start, reload, stop
def main():
    global db
    db = open_db()
    # Two request threads per CPU: one decodes while the other runs the model. Waitress
    # reads uploads and writes answers in its own loop, so a slow client holds no thread;
    # more threads only made requests share the CPUs longer (8 on 2 cores: -9 % req/s and
    # +30 % p99 at 8 clients against 4, interleaved runs).
    threads = THREADS or 2 * available_cpus()
    server = waitress.create_server(
        app, host=HOST, port=PORT, threads=threads, ident="catdog",
        # The app answers oversize uploads with a JSON 413; waitress's own (plain-text) cap
        # only guards memory against absurd bodies. Bodies stay in memory: no temp files on
        # a read-only file system.
        max_request_body_size=BODY_HARD_LIMIT, inbuf_overflow=BODY_HARD_LIMIT)

    def drain():
        # Let in-flight requests, and those queued for a thread, finish and their answers
        # leave, then stop the event loop.
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        tasks = server.task_dispatcher
        while (in_flight or tasks.queue or tasks.active_count) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # the event loop thread writes the last responses to their sockets
        os.kill(os.getpid(), signal.SIGTERM)

    def on_stop(signum, frame):
        if stopping.is_set():  # the drain is done (or a second Ctrl-C): leave now
            raise SystemExit(0)
        stopping.set()
        server.accepting = False  # no new connections; /health says 503 meanwhile
        log(event="stopping", signal=signal.Signals(signum).name, in_flight=in_flight)
        threading.Thread(target=drain, daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: threading.Thread(
        target=reload_model, args=("SIGHUP",), daemon=True).start())
    if BATCH_MAX > 1:
        for _ in range(INFER_THREADS or available_cpus()):
            threading.Thread(target=batch_loop, daemon=True, name="batcher").start()
    threading.Thread(target=reload_model, args=("start",), daemon=True).start()
    log(event="listening", host=HOST, port=int(server.effective_port), threads=threads, batch_max=BATCH_MAX,
        infer_threads=(INFER_THREADS or available_cpus()) if BATCH_MAX > 1 else None,
        batch_wait_ms=BATCH_WAIT_MS, model_path=MODEL_PATH, db_path=DB_PATH)
    server.run()  # returns on SystemExit after waitress stops its threads
    with db_lock:
        db.close()
    log(event="stopped")


if __name__ == "__main__":
    main()
