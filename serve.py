"""catdog inference service: the champion in ONNX Runtime behind Flask + waitress.

    python serve.py                      # 0.0.0.0:8000, models/model.onnx
    PORT=9000 MODEL_PATH=... python serve.py

Endpoints: GET / (staff page), POST /predict, POST /feedback, GET /health (ready),
GET /live, GET /metrics (Prometheus text), GET /stats (JSON).

In code (tests): app = create_app(Settings(model_path=..., db_path=...)) builds the Flask
app around one Service (model, store, metrics, batcher), reachable as
app.extensions["catdog"]; service.load("why") loads the model, service.start() starts the
threads as main() does. Importing this module only defines things: no threads, no files.

Serving imports numpy, Pillow, onnxruntime, Flask and prometheus_client only, never torch:
decoding and preprocessing are catdog.open_image (open_checked, then decode_header_checked) +
catdog.preprocess, the functions
training uses. Waitress threads decode uploads in parallel and run the model, at most one
ONNX Runtime run per usable CPU at a time; an optional batcher groups concurrent requests
instead. Every prediction and every piece of staff feedback goes to the store (store.py): a
small SQLite file (DB_PATH), the only thing the service writes, or PostgreSQL when
DATABASE_URL is set, shared by every replica.
Signals: SIGTERM/SIGINT drain in-flight requests then exit; SIGHUP reloads the model.
"""
import base64
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import hmac
import io
import json
import logging
import math
import os
import queue
import re
import signal
import sys
import threading
import time
import uuid
from collections import deque

import numpy as np
import onnxruntime as ort
import waitress
import waitress.channel
from flask import Blueprint, Flask, Request, current_app, g, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from werkzeug.exceptions import HTTPException

import catdog
import store as stores

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
HEAVY_DECODE_BYTES = 16 << 20  # a decode over this (about 4 MP of RGBA) is heavy: see DecodeBudget
ERROR_STATUS = {"busy": 503, "no_file": 400, "empty": 400, "too_large": 413, "unsupported_media_type": 415, "unsupported_format": 415,
                "not_an_image": 422, "corrupt": 422, "truncated": 422, "too_many_pixels": 422, "too_small": 422}


# ---------------------------------------------------------------- settings (env vars)
@dataclasses.dataclass(frozen=True)
class Settings:
    """What the environment may set: each field is read from its upper-cased name (PORT=9000)."""
    host: str = "0.0.0.0"
    port: int = 8000
    model_path: str = os.path.join(catdog.MODELS_DIR, "model.onnx")
    profile_path: str = ""  # the drift reference; "": reference_profile.json beside the model
    db_path: str = os.path.join(catdog.ROOT, "var", "catdog.db")
    database_url: str = ""  # postgresql://user:password@host/db: the store every replica shares; "": DB_PATH
    max_upload_mb: float = 10.0
    max_pixels: int = catdog.MAX_PIXELS
    batch_max: int = 1  # >1 turns the batcher on (see Batcher)
    batch_wait_ms: float = 0.0  # 0: batch what queued during the last run
    threads: int = 0  # waitress worker threads; 0: two per CPU this process may use
    ort_threads: int = 1  # intra-op threads per ORT run
    infer_threads: int = 0  # ORT runs at once; 0: the CPUs this process may use
    live_window: int = 500  # live accuracy over the last N predictions with feedback
    drift_window: int = 500  # drift over the last N inputs
    drift_min_samples: int = 100  # PSI of a handful of images is noise
    shutdown_timeout: float = 20.0  # seconds to let in-flight requests finish
    max_photos: int = 32  # photos per POST /predict/batch
    decode_budget_mb: float = 256.0  # memory for images being decoded at once, across request threads
    decode_wait_s: float = 0.25  # how long a decode waits for that memory before a 503 (it holds a request thread meanwhile)
    retention_days: float = 90.0  # predictions (and their feedback) older than this are deleted
    retention_rows: int = 1_000_000  # and beyond the newest this many
    retention_interval_s: float = 600.0  # how often the pruning runs (in the background)
    cors_origins: str = ""  # comma-separated origins a browser front end may call the API from; "": none
    api_token: str = ""  # when set, /feedback, /stats and /metrics need "Authorization: Bearer <it>"

    @classmethod
    def from_env(cls, environ=os.environ):
        """The settings given by environment variables (PORT, MODEL_PATH, ...), defaults for the rest."""
        return cls(**{field.name: type(field.default)(environ[field.name.upper()])
                      for field in dataclasses.fields(cls) if field.name.upper() in environ})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @property
    def reference_profile_path(self):
        return self.profile_path or os.path.join(os.path.dirname(self.model_path), "reference_profile.json")

    @property
    def max_upload_bytes(self):
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_batch_bytes(self):
        """The whole body of a POST /predict/batch: four photos at the size limit, or 32 ordinary ones."""
        return 4 * self.max_upload_bytes

    @property
    def allowed_origins(self):
        return {origin.strip() for origin in self.cors_origins.split(",") if origin.strip()}

    @property
    def request_threads(self):
        # Two request threads per CPU: one decodes while the other runs the model. Waitress
        # reads uploads and writes answers in its own loop, so a slow client holds no thread;
        # more threads only made requests share the CPUs longer (8 on 2 cores: -9 % req/s and
        # +30 % p99 at 8 clients against 4, interleaved runs).
        return self.threads or 2 * available_cpus()

    @property
    def body_hard_limit(self):
        """Waitress's own cap on a request body (see make_server)."""
        return max(4 * self.max_upload_bytes, 64 << 20)


def read_text(path):
    with open(path) as f:
        return f.read()


def available_cpus():
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota
    (a container limited to 2 CPUs on a 64-core host must not start 64 ORT threads)."""
    cpus = len(os.sched_getaffinity(0))
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        try:
            fields = read_text(path).split()
            if path.endswith("cpu.max"):
                quota, period = fields
            else:
                quota, period = fields[0], read_text(os.path.join(os.path.dirname(path), "cpu.cfs_period_us"))
            if quota not in ("max", "-1"):
                cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
            break
        except (OSError, ValueError):
            continue
    return cpus


# ---------------------------------------------------------------- logging: one JSON line per event
LOG_LOCK = threading.Lock()


def log(**fields):
    """JSON line to stdout. Callers pass only ids, numbers and labels: never image bytes,
    file names or client addresses."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
    line = json.dumps({"time": stamp, **fields}, default=str)
    with LOG_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class LibraryLogs(logging.Handler):
    """Libraries' warnings (the PostgreSQL pool retrying its connections) as JSON lines too."""

    def emit(self, record):
        log(event="library_log", logger=record.name, level=record.levelname.lower(), message=record.getMessage())


def log_libraries_as_json(*names):
    for name in names:
        logger = logging.getLogger(name)
        logger.addHandler(LibraryLogs(logging.WARNING))
        logger.propagate = False


# ---------------------------------------------------------------- the model
@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded and warmed-up model. Swapped whole on reload: a request keeps the one it started with."""
    session: ort.InferenceSession
    meta: dict  # model.json: classes, preprocess settings, version, arch
    profile: dict | None  # the training inputs' statistics, for drift (None: no drift scores)
    threads: int  # ORT intra-op threads

    @property
    def version(self):
        return str(self.meta.get("version", "unknown"))

    def run(self, batch):
        """catdog.ONNX_OUTPUTS of a batch of preprocessed images (n, 3, crop, crop), one tuple per image."""
        return list(zip(*self.session.run(list(catdog.ONNX_OUTPUTS), {"image": batch})))

    @property
    def pet_threshold(self):
        return float(self.meta["other"]["threshold"])

    @property
    def identity(self):
        """Which model answered: its version, its registry version and MLflow run (None when unknown)."""
        registry = self.meta.get("registry_version")
        return {"model_version": self.version, "registry_version": None if registry is None else str(registry),
                "run_id": self.meta.get("run_id")}

    def answer(self, outputs):
        """catdog.answer of one image's outputs."""
        return catdog.answer(outputs, self.meta)


def load_model(path, ort_threads=1, batch_sizes=(1,), profile_path=None):
    """ONNX session + the meta saved beside it, warmed up at every batch size it will see first."""
    meta = catdog.read_json(os.path.splitext(path)[0] + ".json")
    if "other" not in meta:
        raise ValueError(f"{path} has no \"other\" decision (model.json lacks \"other\"): retrain it with `make train`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = ort_threads
    options.inter_op_num_threads = 1
    # Spinning ORT threads would steal the cores the waitress threads need for decoding.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    missing = set(catdog.ONNX_OUTPUTS) - {output.name for output in session.get_outputs()}
    if missing:
        raise ValueError(f"{path} lacks the outputs {', '.join(sorted(missing))}: retrain it with `make train`")
    crop = meta["preprocess"]["crop"]
    for batch in sorted(set(batch_sizes)):
        session.run(list(catdog.ONNX_OUTPUTS), {"image": np.zeros((batch, 3, crop, crop), np.float32)})
    profile_path = profile_path or os.path.join(os.path.dirname(path), "reference_profile.json")
    profile = catdog.read_json(profile_path) if os.path.exists(profile_path) else None
    return Model(session, meta, profile, options.intra_op_num_threads)


# ---------------------------------------------------------------- inference, and the batcher
class Job:
    """One image waiting for the batcher; `done` is set once outputs or error is."""

    def __init__(self, model, x):
        self.model, self.x, self.done = model, x, threading.Event()
        self.outputs = self.error = None


class Batcher:
    """Runs the model for the request threads.

    Waitress threads decode in parallel, then run the model themselves, at most `workers`
    runs at once (one per usable CPU): with 8 request threads free to fight over 2 cores
    for inference, `make bench` gave 144-167 instead of 163-172 req/s.
    On 2 cores with int8 EfficientNet-Lite0, ORT's intra-op threads do not speed up a run
    and a batch of 8 costs 8 single runs, so batching saves no CPU and makes each request
    wait for its batch: `make bench` measured it equal or slower, hence off by default.
    With batch_max > 1, `workers` threads each take what is waiting (up to batch_max,
    waiting at most wait_ms for more) and run it as one batch: for hardware where a batch
    is cheaper per image (a GPU, many cores); `make bench` shows both so the choice is measured.
    """

    def __init__(self, batch_max, wait_ms, workers, on_run):
        self.batch_max, self.wait_s, self.workers = batch_max, wait_ms / 1000, workers
        self.on_run = on_run  # called with the number of images of every ORT run
        self._slots = threading.BoundedSemaphore(workers)
        self._jobs = queue.Queue()

    @property
    def batching(self):
        return self.batch_max > 1

    def start(self):
        if self.batching:
            for _ in range(self.workers):
                threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def infer(self, model, x):
        """The model's outputs (Model.run) for one preprocessed image (3, crop, crop)."""
        if not self.batching:
            with self._slots:
                outputs = model.run(x[None])[0]
            self.on_run(1)
            return outputs
        job = Job(model, x)
        self._jobs.put(job)
        if not job.done.wait(60):
            raise RuntimeError("inference timed out")
        if job.error is not None:
            raise job.error
        return job.outputs

    def infer_many(self, model, xs, chunk=4):
        """Outputs for several images of one request, in ONNX Runtime runs of up to `chunk`
        images (each in one slot). Measured with int8 Lite2 on one thread: 7.1 ms per image
        alone, 6.2 in runs of 2-4, 7.7 in runs of 8, 8.8 in one run of 32 (cache)."""
        outputs = []
        for start in range(0, len(xs), chunk):
            with self._slots:
                outputs += model.run(np.stack(xs[start:start + chunk]))
            self.on_run(min(chunk, len(xs) - start))
        return outputs

    def _loop(self):
        while True:
            self._run(self._next_batch())

    def _next_batch(self):
        batch = [self._jobs.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.batch_max:
            try:
                batch.append(self._jobs.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _run(self, batch):
        # After a reload, jobs preprocessed for the old model still run on the old model.
        for model in {id(job.model): job.model for job in batch}.values():
            group = [job for job in batch if job.model is model]
            try:
                for job, row in zip(group, model.run(np.stack([job.x for job in group]))):
                    job.outputs = row
            except Exception as e:  # noqa: BLE001 (whatever failed, each waiting request gets it)
                for job in group:
                    job.error = e
            finally:
                self.on_run(len(group))
                for job in group:
                    job.done.set()


# ---------------------------------------------------------------- drift
class DriftWindow:
    """Statistics (catdog.image_stats) and confidences of the latest inputs, scored with PSI
    against the model's reference profile."""

    def __init__(self, size, min_samples):
        self.min_samples = min_samples
        self._stats, self._confidences = deque(maxlen=size), deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, stats, confidence=None):
        with self._lock:
            self._stats.append(stats)
            if confidence is not None:
                self._confidences.append(confidence)

    def forget_confidences(self):
        """On a new model: confidences belong to a model; input statistics do not."""
        with self._lock:
            self._confidences.clear()

    def report(self, profile):
        """PSI per feature and rise per share of the window against `profile` (catdog.drift_scores;
        none below min_samples inputs)."""
        with self._lock:
            stats, confidences = list(self._stats), list(self._confidences)
        if profile is None or len(stats) < self.min_samples:
            return {"samples": len(stats), "psi": {}, "share_rise": {}, "drifted": []}
        if len(confidences) < self.min_samples:
            confidences = []
        scores = {k: round(v, 4) for k, v in catdog.drift_scores(profile, stats, confidences).items()}
        return {"samples": len(stats), "psi": {k: v for k, v in scores.items() if k not in catdog.DRIFT_SHARES},
                "share_rise": {k: v for k, v in scores.items() if k in catdog.DRIFT_SHARES},
                "threshold": catdog.DRIFT_THRESHOLD,
                "drifted": sorted(k for k, v in scores.items() if v > catdog.DRIFT_THRESHOLD)}


# ---------------------------------------------------------------- metrics (Prometheus)
class Registry(CollectorRegistry):
    """A registry without the `_created` series prometheus_client adds to every counter and
    histogram: the service never exported them and nothing queries them
    (prometheus_client.disable_created_metrics() would switch them off process-wide)."""

    def collect(self):
        for family in super().collect():
            family.samples = [s for s in family.samples if s.name != family.name + "_created"]
            yield family


class ScrapeTimeMetrics:
    """Families computed at each scrape: live accuracy from the store, drift of the recent
    inputs, the model being served."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        service = self.service
        accuracy, judged = service.store.live_accuracy(service.settings.live_window)
        live = GaugeMetricFamily("catdog_live_accuracy",
                                 f"Accuracy over the last {service.settings.live_window} predictions with feedback.")
        if judged:  # no sample, rather than a made-up one, before any feedback
            live.add_metric([], accuracy)
        yield live
        yield GaugeMetricFamily("catdog_live_accuracy_samples", "Predictions with feedback behind catdog_live_accuracy.",
                                value=judged)
        drift = service.drift_report()
        psi = GaugeMetricFamily("catdog_drift_psi", "PSI of recent inputs against the training reference, per feature.",
                                labels=("feature",))
        for feature, score in sorted(drift["psi"].items()):
            psi.add_metric([feature], score)
        yield psi
        rise = GaugeMetricFamily("catdog_drift_share_rise", "Share of recent inputs minus the training reference's, "
                                 "per kind (undersized, elongated, other).", labels=("share",))
        for share, score in sorted(drift["share_rise"].items()):
            rise.add_metric([share], score)
        yield rise
        yield GaugeMetricFamily("catdog_drift_window_samples", "Recent inputs in the drift window.",
                                value=drift["samples"])
        model = service.model
        info = GaugeMetricFamily("catdog_model_info", "The model being served.", labels=("version", "arch"))
        if model is not None:
            info.add_metric([model.version, str(model.meta.get("arch"))], 1)
        yield info


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (never prometheus_client's
    process-wide default one), so several apps can live in one process."""

    def __init__(self, service):
        self.registry = registry = Registry()
        self.requests = Counter("catdog_requests", "HTTP requests by endpoint and status.",
                                ("endpoint", "status"), registry=registry)
        self.latency = Histogram("catdog_request_duration_seconds", "Request latency by endpoint.",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=registry)
        self.predictions = Counter("catdog_predictions", "Predictions by label.", ("label",), registry=registry)
        self.confidence = Histogram("catdog_prediction_confidence", "Confidence of the predicted label.",
                                    buckets=catdog.CONFIDENCE_EDGES[:-1], registry=registry)
        self.feedback = Counter("catdog_feedback", "Staff feedback by whether the prediction was right.",
                                ("correct",), registry=registry)
        for label in catdog.ANSWERS:  # every series exists from 0, so rate() sees the first one
            self.predictions.labels(label)
        for correct in ("true", "false"):
            self.feedback.labels(correct)
        self.batch_size = Histogram("catdog_inference_batch_size", "Images per ONNX Runtime run.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        registry.register(ScrapeTimeMetrics(service))
        Gauge("catdog_model_ready", "1 when the model is loaded and warmed up.",
              registry=registry).set_function(lambda: service.ready)
        self.load_failures = Counter("catdog_model_load_failures", "Model loads (start or SIGHUP reload) that failed.",
                                     registry=registry)
        Gauge("catdog_model_load_failed", "1 while the latest model load failed (a reload keeps the old model).",
              registry=registry).set_function(lambda: service.load_error is not None)
        Gauge("catdog_in_flight_requests", "Requests being handled now.",
              registry=registry).set_function(lambda: service.in_flight)
        Gauge("catdog_start_time_seconds", "Process start, Unix time.", registry=registry).set(service.started_at)

    def count_request(self, endpoint, status, seconds):
        self.requests.labels(endpoint, status).inc()
        self.latency.labels(endpoint).observe(seconds)

    def count_prediction(self, label, confidence):
        self.predictions.labels(label).inc()
        self.confidence.observe(confidence)

    def text(self):
        """Prometheus text format 0.0.4, whatever the Accept header asks."""
        return generate_latest(self.registry)

    @staticmethod
    def samples(metric, suffix):
        return [s for family in metric.collect() for s in family.samples if s.name == family.name + suffix]

    def requests_by_endpoint(self):
        """{(endpoint, status): requests answered}"""
        return {(s.labels["endpoint"], s.labels["status"]): int(s.value) for s in self.samples(self.requests, "_total")}

    def predictions_by_label(self):
        return {s.labels["label"]: int(s.value) for s in self.samples(self.predictions, "_total")}

    def latency_of(self, endpoint):
        """(requests, seconds in all) of one endpoint."""
        count, seconds = ({s.labels["endpoint"]: s.value for s in self.samples(self.latency, suffix)}
                          for suffix in ("_count", "_sum"))
        return int(count.get(endpoint, 0)), seconds.get(endpoint, 0.0)


# ---------------------------------------------------------------- the service
@dataclasses.dataclass
class Answer:
    prediction_id: str  # the server's key of the stored prediction: what /feedback names
    label: str
    confidence: float
    probabilities: dict
    pet_probability: float

    def fields(self):
        return {"label": self.label, "confidence": round(self.confidence, 6),
                "pet_probability": round(self.pet_probability, 6),
                "probabilities": {c: round(p, 6) for c, p in self.probabilities.items()},
                "prediction_id": self.prediction_id}


class Service:
    """One serving instance: the model (swapped whole on reload), the store, the drift window,
    the metrics and the batcher. Nothing runs in the background until start()."""

    def __init__(self, settings):
        self.settings = settings
        self.model = None  # set once loaded AND warmed up
        self.load_error = None  # why the last load failed, for /health
        self.stopping = threading.Event()
        self.started_at = time.time()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time
        # A connection per request thread, and one for the retention thread.
        self.store = stores.open_store(settings.database_url, settings.db_path, settings.request_threads + 1)
        self.drift = DriftWindow(settings.drift_window, settings.drift_min_samples)
        self.decode_budget = DecodeBudget(int(settings.decode_budget_mb * 1024 * 1024), settings.decode_wait_s,
                                          heavy_lanes=max(1, available_cpus() - 1))
        self.metrics = Metrics(self)
        self.batcher = Batcher(settings.batch_max, settings.batch_wait_ms,
                               settings.infer_threads or available_cpus(), self.metrics.batch_size.observe)

    def start(self):
        """The batcher's threads, and the model loading in the background: /live answers at
        once, /health once the model is warm."""
        self.batcher.start()
        self.load_in_background("start")
        threading.Thread(target=self.keep_pruning, daemon=True, name="retention").start()

    def keep_pruning(self):
        """Retention: every RETENTION_INTERVAL_S, a chunked prune (requests wait one chunk at most)."""
        settings = self.settings
        while not self.stopping.wait(settings.retention_interval_s):
            try:
                deleted = self.store.prune(time.time() - settings.retention_days * 86400, settings.retention_rows)
            except self.store.unavailable as e:  # a busy or full disk, the database away: next time
                log(event="prune_failed", error=str(e))
                continue
            if deleted:
                log(event="pruned", predictions=deleted)

    def load_in_background(self, reason):
        threading.Thread(target=self.load, args=(reason,), daemon=True, name="model-loader").start()

    def load(self, reason):
        """Load (or reload) the model; the old one serves until the swap, and stays if the load fails."""
        settings = self.settings
        with self._load_lock:
            started = time.perf_counter()
            try:
                new = load_model(settings.model_path, settings.ort_threads, (1, max(1, settings.batch_max)),
                                 settings.reference_profile_path)
            except Exception as e:  # noqa: BLE001 (keep serving the old model rather than none)
                self.load_error = f"{type(e).__name__}: {e}"
                self.metrics.load_failures.inc()
                log(event="model_load_failed", reason=reason, path=settings.model_path, error=self.load_error)
                return False
            if self.model is not None and self.model.version != new.version:
                self.drift.forget_confidences()
            self.model, self.load_error = new, None
        log(event="model_loaded", reason=reason, model_version=new.version, arch=new.meta.get("arch"),
            ort_threads=new.threads, drift_profile=new.profile is not None,
            load_ms=round((time.perf_counter() - started) * 1000, 1))
        return True

    @property
    def ready(self):
        return self.model is not None and not self.stopping.is_set()

    @property
    def in_flight(self):
        return self._in_flight

    def enter(self):
        with self._in_flight_lock:
            self._in_flight += 1

    def leave(self):
        with self._in_flight_lock:
            self._in_flight -= 1

    def predict(self, model, x, stats, request_id):
        """The Answer for a preprocessed photo (and its image stats), recorded for monitoring."""
        return self.record(model, stats, request_id, self.batcher.infer(model, x))

    def predict_many(self, model, photos):
        """predict for [(preprocessed image, image stats, request id)], in a few ONNX Runtime runs (infer_many)."""
        outputs = self.batcher.infer_many(model, [x for x, _, _ in photos])
        return [self.record(model, stats, request_id, out) for (_, stats, request_id), out in zip(photos, outputs)]

    def record(self, model, stats, request_id, outputs):
        """The Answer of one image's outputs, stored under a new prediction id and counted."""
        label, confidence, probabilities, pet_probability, distance = model.answer(outputs)
        answer = Answer(uuid.uuid4().hex, label, confidence, probabilities, pet_probability)
        stats = {**stats, "pet_distance": distance, catdog.OTHER: float(label == catdog.OTHER)}
        self.store.record_prediction(answer.prediction_id, request_id, model.version, label, confidence, stats)
        # The reference confidences are of cat/dog answers; an "other" answer's is another quantity.
        self.drift.add(stats, confidence if label != catdog.OTHER else None)
        self.metrics.count_prediction(label, confidence)
        return answer

    def drift_report(self):
        model = self.model
        return self.drift.report(model.profile if model is not None else None)

    def stats(self):
        """The /stats answer."""
        model = self.model
        accuracy, judged = self.store.live_accuracy(self.settings.live_window)
        requests_by = self.metrics.requests_by_endpoint()
        by_label = self.metrics.predictions_by_label()
        predict_count, predict_seconds = self.metrics.latency_of("/predict")
        return {
            "model_version": model and model.version, "uptime_s": round(time.time() - self.started_at, 1),
            "requests": sum(requests_by.values()),
            "requests_by_endpoint": {f"{e} {s}": n for (e, s), n in sorted(requests_by.items())},
            "predictions": sum(by_label.values()), "predictions_by_label": by_label,
            "mean_latency_ms": round(predict_seconds / predict_count * 1000, 2) if predict_count else None,
            "live_accuracy": accuracy, "live_accuracy_samples": judged, "live_window": self.settings.live_window,
            "feedback_count": self.store.feedback_count(), "drift": self.drift_report()}

    def close(self):
        self.decode_budget.close()
        self.store.close()


# ---------------------------------------------------------------- the app
class InMemoryRequest(Request):
    # Uploads are capped by MAX_UPLOAD_MB, so keep them in memory: werkzeug would spool
    # big ones to temporary files, and the container's root file system is read-only.
    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


api = Blueprint("catdog", __name__)


def create_app(settings, service=None):
    """The Flask app around `service` (by default a new Service of `settings`), which it keeps
    in app.extensions["catdog"]. Starts nothing: main() calls service.start()."""
    service = service or Service(settings)
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.extensions["catdog"] = service
    app.register_blueprint(api)
    return app


def current_service():
    return current_app.extensions["catdog"]


@api.before_app_request
def start_request():
    if request.endpoint == "catdog.predict_batch":  # several photos, each within max_upload_mb
        request.max_content_length = current_service().settings.max_batch_bytes
    g.started = time.perf_counter()
    given = request.headers.get("X-Request-ID", "")
    g.request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
    g.label = g.reason = None
    current_service().enter()
    g.counted = True
    token = current_service().settings.api_token
    if token and request.endpoint in TOKEN_ENDPOINTS and not authorized(token):
        return error(401, "unauthorized", "this endpoint needs the service's token: Authorization: Bearer <API_TOKEN>")


# What staff and operators use; the public rest (predict, health, page, OpenAPI) needs no token.
TOKEN_ENDPOINTS = {"catdog.feedback", "catdog.stats", "catdog.metrics"}


def authorized(token):
    given = request.headers.get("Authorization", "")
    return given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer "):].encode(), token.encode())


@api.after_app_request
def finish_request(response):
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"  # raw paths would explode label sets
    g.request_id = g.get("request_id") or uuid.uuid4().hex
    response.headers["X-Request-ID"] = g.request_id
    add_security_headers(response)
    current_service().metrics.count_request(endpoint, str(response.status_code), seconds)
    log(request_id=g.request_id, method=request.method, endpoint=endpoint, status=response.status_code,
        latency_ms=round(seconds * 1000, 2), label=g.get("label"), error=g.get("reason"))
    return response


@api.teardown_app_request
def end_request(exc):
    if g.pop("counted", False):
        current_service().leave()


def add_security_headers(response):
    """nosniff everywhere; CORS for the configured origins only (CORS_ORIGINS, default none)."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    origin = request.headers.get("Origin")
    if origin and origin in current_service().settings.allowed_origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID"
        if request.method == "OPTIONS":  # the browser's preflight
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type, X-Request-ID"
            response.headers["Access-Control-Max-Age"] = "600"
    response.vary.add("Origin")


def error(status, reason, message):
    g.reason = reason
    g.request_id = g.get("request_id") or uuid.uuid4().hex
    extra = {"Retry-After": "1"} if status == 503 else {}  # busy or not ready yet: soon
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return jsonify(error=reason, message=message, request_id=g.request_id), status, extra


@api.app_errorhandler(HTTPException)
def http_error(e):
    if e.code == 413:
        settings = current_service().settings
        limit = settings.max_batch_bytes if request.endpoint == "catdog.predict_batch" else settings.max_upload_bytes
        if request.content_length is not None and request.content_length <= limit:  # small, but in too many parts
            return error(413, "too_many_parts", f"the form has more than {request.max_form_parts} parts")
        return error(413, "too_large", f"the upload exceeds the {limit / (1 << 20):g} MB limit")
    return error(e.code, re.sub(r"\W+", "_", e.name.lower()), e.description)


@api.app_errorhandler(Exception)
def server_error(e):
    if isinstance(e, current_service().store.unavailable):  # the database is away, not a bug: retry soon
        log(event="store_unavailable", error=f"{type(e).__name__}: {e}")
        return error(503, "store_unavailable", "the prediction store cannot be reached; try again shortly")
    current_app.logger.exception("unhandled error")  # stderr, with traceback
    return error(500, "internal_error", "the server failed to handle this request")


class TooManyFiles(Exception):
    pass


def read_upload():
    """Bytes of the photo: multipart field `file` (or `image`), or a raw image/* body."""
    if request.mimetype == "multipart/form-data":
        uploads = request.files.getlist("file") + request.files.getlist("image")
        if not uploads:
            raise catdog.ImageError("no_file", "send the photo as multipart field 'file' (or 'image')")
        if len(uploads) > 1:
            raise TooManyFiles()
        return uploads[0].read()
    if not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise catdog.ImageError("no_file", "no photo: send multipart field 'file' or an image/* body")
    if request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        return request.get_data()
    raise catdog.ImageError("unsupported_media_type",
                            f"content type {request.mimetype or 'none'} is not accepted: "
                            "send multipart/form-data or an image/* body")


class DecodeBudget:
    """Bytes of images being decoded at once, across request threads: a decode waits until its
    bytes fit (or nothing else is decoding), at most `wait_s`, else ImageError "busy" (503).
    Bounds the service's memory whatever several worst-case uploads arrive together.
    A heavy decode (over `heavy_bytes`: a 16 MP PNG takes a CPU for a second) also needs one of
    `heavy_lanes`, fewer than the CPUs, so that ordinary photos always have a CPU left. When
    every lane is taken it gets the 503 at once: waiting, it would hold a request thread that
    an ordinary photo queued behind it needs. Each lane is a thread of its own at the lowest
    CPU priority, so that where a heavy decode and ordinary photos want the same CPU (the
    model's threads run on every CPU), the ordinary photos mostly get it first (the lane still
    takes the GIL between blocks of the file)."""

    def __init__(self, limit_bytes, wait_s, heavy_bytes=HEAVY_DECODE_BYTES, heavy_lanes=1):
        self.limit, self.wait_s, self.used = limit_bytes, wait_s, 0
        self.heavy_bytes, self.heavy_lanes, self.heavy = heavy_bytes, heavy_lanes, 0
        self._cond = threading.Condition()
        self._lanes = concurrent.futures.ThreadPoolExecutor(heavy_lanes, "heavy-decode", lowest_cpu_priority)

    def run(self, cost, decode):
        """decode() once `cost` bytes fit the budget: on a low-priority lane when it is heavy.
        A lane pool that is shut down (the process exiting) answers 503, not the client's
        fault. (It cannot break: lowest_cpu_priority, its initializer, never raises.)"""
        with self.reserve(cost):
            if cost <= self.heavy_bytes:
                return decode()
            try:
                future = self._lanes.submit(decode)
            except RuntimeError:  # "cannot schedule new futures after shutdown"
                raise catdog.ImageError("busy", "the service cannot decode large images now: retry in a second") from None
            return future.result()

    def close(self):
        """Let the lane threads go once their decodes are done."""
        self._lanes.shutdown(wait=False)

    def _lanes_taken(self, heavy):
        return heavy and self.heavy >= self.heavy_lanes

    def _fits(self, cost, heavy):
        if self._lanes_taken(heavy):
            return False
        return self.used == 0 or self.used + cost <= self.limit

    @contextlib.contextmanager
    def reserve(self, cost):
        heavy = cost > self.heavy_bytes
        with self._cond:
            if self._lanes_taken(heavy) or not self._cond.wait_for(lambda: self._fits(cost, heavy), self.wait_s):
                raise catdog.ImageError("busy", "the service is decoding other large images: retry in a second")
            self.used += cost
            self.heavy += heavy
        try:
            yield
        finally:
            with self._cond:
                self.used -= cost
                self.heavy -= heavy
                self._cond.notify_all()
            if cost > 32 << 20:
                release_memory()


def lowest_cpu_priority():
    """Nice 19 for the calling thread alone: Linux keeps a nice value per thread (elsewhere the
    id would name a process, so nothing is changed there). Where a sandbox forbids it, the
    lane keeps its priority: a failed initializer would break the lane for every heavy photo."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as e:
        log(event="decode_lane_priority_unchanged", error=str(e))


@functools.cache
def glibc():
    """The C library when it is glibc (malloc_trim, mallopt), else None. Loaded on first use:
    importing serve opens nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_memory():
    """Give freed heap back to the system after a large decode (glibc keeps it otherwise)."""
    if glibc():
        glibc().malloc_trim(0)


def tune_malloc():
    """Blocks of 1 MB and more come from mmap and go back to the system when freed: glibc's
    default threshold grows with use, after which a decoded 16 MP image stays in the heap."""
    if glibc():
        glibc().mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (a fixed one also stops the growth)


def model_input(img, settings):
    """(preprocessed image, image stats) of an opened image, decoding it (header checked)."""
    img = catdog.decode_header_checked(img)
    return catdog.preprocess(img, settings), catdog.image_stats(img)


def prepare(data, model, settings, budget):
    """(preprocessed image, image stats) of untrusted bytes; ImageError when they are not a
    usable photo. The format is sniffed from the bytes, never the name; big JPEGs decode at
    a reduced scale that still covers the model's input (catdog.open_checked). The decode
    budget is held from decoding until only the small model input is left."""
    if len(data) > settings.max_upload_bytes:
        raise catdog.ImageError("too_large", f"the photo exceeds the {settings.max_upload_mb:g} MB limit")
    try:
        img = catdog.open_checked(data, settings.max_pixels, model.meta["preprocess"]["resize"])
        return budget.run(catdog.decoding_bytes(img), lambda: model_input(img, model.meta["preprocess"]))
    except catdog.ImageError:
        raise
    except Exception as e:  # noqa: BLE001 (any other failure inside a decoder is still a bad file)
        raise catdog.ImageError("corrupt", f"the image could not be decoded ({type(e).__name__})") from None


@api.post("/predict")
def predict():
    service = current_service()
    model = service.model  # this request uses this model throughout, even if a reload swaps it meanwhile
    if model is None:
        return error(503, "not_ready", "the model is not loaded yet")
    try:
        x, stats = prepare(read_upload(), model, service.settings, service.decode_budget)
    except catdog.ImageError as e:
        return error(ERROR_STATUS.get(e.reason, 422), e.reason, str(e))
    except TooManyFiles:
        return error(400, "too_many_files", "one photo per POST /predict: send several to POST /predict/batch")
    answer = service.predict(model, x, stats, g.request_id)
    g.label = answer.label
    return jsonify(**answer.fields(), **model.identity, request_id=g.request_id,
                   latency_ms=round((time.perf_counter() - g.started) * 1000, 2))


@api.post("/predict/batch")
def predict_batch():
    """Several photos (multipart parts `file`) in one request: one answer or error per photo,
    in order, each stored and counted as its own prediction with its own request id."""
    service = current_service()
    model, settings = service.model, service.settings
    if model is None:
        return error(503, "not_ready", "the model is not loaded yet")
    if request.mimetype != "multipart/form-data":
        return error(415, "unsupported_media_type", "send multipart/form-data with one part 'file' per photo")
    uploads = request.files.getlist("file")
    if not uploads:
        return error(400, "no_file", "send each photo as a multipart part named 'file'")
    if len(uploads) > settings.max_photos:
        return error(400, "too_many_photos", f"{len(uploads)} photos: at most {settings.max_photos} per request")
    results, photos = [], []
    for index, upload in enumerate(uploads):
        results.append({"index": index, "filename": upload.filename or ""})
        try:
            photos.append((index, *prepare(upload.read(), model, settings, service.decode_budget)))
        except catdog.ImageError as e:
            results[index].update(status=ERROR_STATUS.get(e.reason, 422), error=e.reason, message=str(e))
    if photos:
        answers = service.predict_many(model, [(x, stats, g.request_id) for _, x, stats in photos])
        for (index, _, _), answer in zip(photos, answers):
            # request_id: the photo's own id for its feedback, as clients of /predict use it.
            results[index].update(status=200, **answer.fields(), request_id=answer.prediction_id)
    return jsonify(request_id=g.request_id, **model.identity, count=len(results), results=results)


@api.post("/feedback")
def feedback():
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # '[' * 100000: Python's JSON parser recurses once per level
        return error(400, "bad_json", "the JSON is nested too deeply")
    if not isinstance(body, dict):
        return error(400, "bad_json", 'send JSON {"prediction_id": ..., "label": "cat", "dog" or "other"}')
    key, truth = body.get("prediction_id") or body.get("request_id"), body.get("label")
    if not isinstance(truth, str) or truth.lower() not in catdog.ANSWERS:
        return error(400, "bad_label", f"label must be one of {', '.join(catdog.ANSWERS)} (other: neither)")
    if not isinstance(key, str) or not REQUEST_ID.match(key):
        return error(400, "bad_request_id", "prediction_id must be the id a /predict answer returned")
    truth = truth.lower()
    service = current_service()
    found = service.store.find_prediction(key)
    if found is None:
        return error(404, "unknown_request_id", "no prediction has this id")
    if found == "ambiguous":
        return error(409, "ambiguous_request_id", "several predictions have this request_id: send their prediction_id")
    prediction_id, predicted = found
    stored, on_record = service.store.record_feedback(prediction_id, truth)
    if on_record != truth:
        return error(409, "feedback_exists", f"this prediction's feedback is already recorded ({on_record}); it is kept")
    if stored:  # the metric counts stored feedback, as the database does
        service.metrics.feedback.labels("true" if predicted == truth else "false").inc()
    g.label = truth
    return jsonify(request_id=key, prediction_id=prediction_id, label=truth, predicted=predicted,
                   correct=predicted == truth, recorded=stored)


@api.get("/health")
def health():
    service = current_service()
    model, path = service.model, service.settings.model_path
    if service.stopping.is_set():
        return jsonify(status="stopping"), 503
    if model is None:
        status = "no_model" if not os.path.exists(path) else "load_failed" if service.load_error else "loading"
        return jsonify(status=status, model_path=path, error=service.load_error), 503
    # Still ready after a failed reload (the old model serves), but say so: the new file is broken.
    failed = {"reload_error": service.load_error} if service.load_error else {}
    return jsonify(status="ok", **model.identity, arch=model.meta.get("arch"), pet_threshold=model.pet_threshold,
                   store=service.store.kind, **failed)


@api.get("/live")
def live():
    return jsonify(status="alive")


@api.get("/metrics")
def metrics():
    # The Content-Type the service always sent. prometheus_client 0.26's CONTENT_TYPE_LATEST
    # says text format 1.0.0, which only adds UTF-8 metric names, which the service has none of.
    return current_service().metrics.text(), 200, {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}


@api.get("/stats")
def stats():
    return jsonify(current_service().stats())


@api.get("/openapi.json")
def openapi():
    """The API's OpenAPI 3.1 description, kept beside this file."""
    return send_from_directory(catdog.ROOT, "openapi.json", mimetype="application/json")


@api.get("/")
def index():
    response = send_from_directory(current_app.static_folder, "index.html")
    response.headers["Content-Security-Policy"] = page_policy(os.path.join(current_app.static_folder, "index.html"))
    return response


@functools.cache
def page_policy(path):
    """A Content-Security-Policy that allows the page's own inline <script> and <style> blocks
    (by hash) and nothing else: no other script, no other origin."""
    page = read_text(path)

    def digest(tag):
        found = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return "'sha256-" + base64.b64encode(hashlib.sha256(found.group(1).encode()).digest()).decode() + "'"

    return (f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; "
            "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


# ---------------------------------------------------------------- process: start, reload, stop
def make_server(app, settings):
    return waitress.create_server(
        app, host=settings.host, port=settings.port, threads=settings.request_threads,
        ident="catdog",
        # The app answers oversize uploads with a JSON 413; waitress's own (plain-text) cap
        # only guards against absurd bodies. Bodies over MAX_UPLOAD_MB (a batch, or an upload
        # about to be refused) wait in a temporary file (TMPDIR, a volume in the deployments),
        # not in memory: 16 slow 60 MB uploads would otherwise hold 1 GB.
        max_request_body_size=settings.body_hard_limit, inbuf_overflow=settings.max_upload_bytes)


def stop_listening(server):
    """Refuse new connections from now on: a closed socket, not a backlog nobody answers.
    Runs in the event loop's thread, between two select() calls."""
    server.accepting = False
    server.del_channel()
    server.socket.close()


def connections(server):
    return [channel for channel in list(server._map.values()) if isinstance(channel, waitress.channel.HTTPChannel)]


def open_connections(server):
    return len(connections(server))


IDLE_BEFORE_CLOSE_S = 0.25  # a keep-alive client still sending sends its next request sooner


def finish_connections(server):
    """Wind down every open connection, in the event loop's thread: the requests it holds are
    answered with Connection: close (waitress then closes it); one idle for IDLE_BEFORE_CLOSE_S
    is closed. Closing a connection the moment it falls idle would drop the request its client
    is sending right then."""
    for channel in connections(server):
        for pending in channel.requests:
            pending.headers["CONNECTION"] = "close"  # as if the client had asked: waitress closes after it
        idle = not channel.requests and channel.request is None and not channel.total_outbufs_len
        if idle and time.time() - channel.last_activity > IDLE_BEFORE_CLOSE_S:
            channel.handle_close()


def handle_signals(server, service):
    """SIGTERM/SIGINT: stop accepting, let in-flight requests finish, exit. SIGHUP: reload the model."""
    def drain():
        # Let in-flight requests, and those queued for a thread, finish and their answers
        # leave, winding down keep-alive connections (finish_connections); then stop the event loop.
        deadline = time.monotonic() + service.settings.shutdown_timeout
        tasks = server.task_dispatcher
        while ((service.in_flight or tasks.queue or tasks.active_count or open_connections(server))
               and time.monotonic() < deadline):
            server.trigger.pull_trigger(lambda: finish_connections(server))  # in the event loop's thread
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_stop(signum, frame):
        if service.stopping.is_set():  # the drain is done (or a second Ctrl-C): leave now
            raise SystemExit(0)
        service.stopping.set()
        server.accepting = False
        # Closed by the event loop itself: closing it here, inside the loop's select(), would
        # make the retried select fail on the closed descriptor.
        server.trigger.pull_trigger(lambda: stop_listening(server))  # /health on open connections: 503
        log(event="stopping", signal=signal.Signals(signum).name, in_flight=service.in_flight)
        threading.Thread(target=drain, daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: service.load_in_background("SIGHUP"))


def main():
    tune_malloc()
    log_libraries_as_json("psycopg")
    settings = Settings.from_env()
    try:
        service = Service(settings)
    except Exception as e:  # noqa: BLE001 (the database away or refusing: say so in one line, exit)
        log(event="store_failed", store="postgresql" if settings.database_url else "sqlite",
            database=stores.redacted(settings.database_url) if settings.database_url else settings.db_path,
            error=f"{type(e).__name__}: {e}")
        sys.exit(1)
    server = make_server(create_app(settings, service), settings)
    handle_signals(server, service)
    service.start()
    log(event="listening", host=settings.host, port=int(server.effective_port), threads=server.adj.threads,
        batch_max=settings.batch_max, infer_threads=service.batcher.workers if service.batcher.batching else None,
        batch_wait_ms=settings.batch_wait_ms, model_path=settings.model_path, store=service.store.kind,
        database=stores.redacted(settings.database_url) if settings.database_url else settings.db_path)
    server.run()  # returns on SystemExit after waitress stops its threads
    service.close()
    log(event="stopped")


if __name__ == "__main__":
    main()
