"""catdog inference service: the champion in ONNX Runtime behind Flask + waitress, answering the
routes of openapi.yaml, configured by environment variables (Settings):

    python serve.py                      # 0.0.0.0:8000, models/model.onnx
    PORT=9000 MODEL_PATH=... python serve.py

In code (tests): create_app(Settings(model_path=..., db_path=...)) is the Flask app around one
Service (model, store, drift, metrics); service.load("why") loads the model, service.start()
starts the threads as main() does. Importing this module starts nothing.
Never torch: upload.py reads and decodes uploads with catdog's functions, training's own.
Predictions and feedback go to store.py's SQLite file (DB_PATH) or PostgreSQL (DATABASE_URL);
with KEEP_PHOTOS on, uploads staff judge are kept as files to train on (PHOTOS_DIR).
Signals: SIGTERM/SIGINT drain in-flight requests then exit; SIGHUP reloads the model.
"""
import base64
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid

import numpy as np
import onnxruntime as ort
import waitress
import waitress.channel
import yaml
from flask import (
    Blueprint,
    Flask,
    current_app,
    g,
    jsonify,
    request,
    send_from_directory,
)
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from werkzeug.exceptions import HTTPException

import catdog
import kept
import monitor
import store as stores
import upload

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# The photos of one request run in ONNX Runtime runs of up to this many: a run of 2-4 images
# costs less per image than single runs, and than larger ones (which outgrow the CPU cache).
RUN_SIZE = 4
OPENAPI_PATH = os.path.join(catdog.ROOT, "openapi.yaml")


# ---------------------------------------------------------------- settings (env vars)
@dataclasses.dataclass(frozen=True)
class Settings:
    """What the environment may set: each field is read from its upper-cased name (PORT=9000)."""
    host: str = "0.0.0.0"
    port: int = 8000
    model_path: str = os.path.join(catdog.MODELS_DIR, "model.onnx")
    profile_path: str = ""  # the drift reference; "": reference_profile.json beside the model
    db_path: str = stores.DEFAULT_DB_PATH
    database_url: str = ""  # postgresql://user:password@host/db: the store every replica shares; "": DB_PATH
    max_upload_mb: float = 10.0
    max_pixels: int = catdog.MAX_PIXELS
    threads: int = 0  # waitress worker threads; 0: one per CPU this process may use, at least 2
    ort_threads: int = 1  # intra-op threads per ORT run
    infer_threads: int = 0  # ORT runs at once; 0: the CPUs this process may use (more only fight over them)
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
    api_token: str = ""  # when set, /feedback, /stats, /metrics and photo removal need "Authorization: Bearer <it>"
    keep_photos: str = "off"  # off, corrected or all (kept.MODES): uploads kept after staff feedback, to train on
    photos_dir: str = ""  # where kept photos go; "": photos/ beside DB_PATH (required with DATABASE_URL)
    keep_confirmed_share: float = 0.1  # corrected: this share of the photos staff confirm is kept too
    keep_pending_hours: float = 24.0  # an upload waits this long for its feedback, then its photo goes

    @classmethod
    def from_env(cls, environ=os.environ):
        """The settings given by environment variables (PORT, MODEL_PATH, ...), defaults for the
        rest; Refused naming the variable whose value is not of its type."""
        values = {}
        for field in dataclasses.fields(cls):
            name, kind = field.name.upper(), type(field.default)
            if name in environ:
                try:
                    values[field.name] = kind(environ[name])
                except ValueError:
                    raise Refused(f"{name}={environ[name]!r}: not a number ({kind.__name__})") from None
        return cls(**values)

    @property
    def max_upload_bytes(self):
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def allowed_origins(self):
        return {origin.strip() for origin in self.cors_origins.split(",") if origin.strip()}

    @property
    def request_threads(self):
        # One request thread per CPU: a request is CPU work from decode to answer, and a second
        # thread per CPU only makes two requests share a core and its caches (docs/benchmarks.md).
        # At least two: one waiting for a heavy decode's lane or the store leaves one to answer.
        # Waitress reads uploads and writes answers in its own loop, so a slow client holds none.
        return self.threads or max(2, available_cpus())


class Refused(Exception):
    """Settings the service cannot start with; the message names the setting and the place."""


def photos_folder(settings):
    """Where kept photos live (kept.checked_folder), or None when KEEP_PHOTOS is off and no
    folder is known; Refused for settings the service must not start with."""
    try:
        return kept.checked_folder(settings.keep_photos, settings.keep_confirmed_share, settings.photos_dir,
                                   settings.db_path, settings.database_url)
    except ValueError as e:
        raise Refused(str(e)) from e


def read_text(path):
    with open(path, encoding="utf-8") as f:
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
    card: str | None  # MODEL_CARD.md beside it (None: it has none)
    threads: int  # ORT intra-op threads

    @property
    def version(self):
        return str(self.meta.get("version", "unknown"))

    def run(self, batch):
        """catdog.ONNX_OUTPUTS of a batch of preprocessed images (n, 3, crop, crop), one tuple per image."""
        return list(zip(*self.session.run(list(catdog.ONNX_OUTPUTS), {"image": batch})))

    @property
    def identity(self):
        """Which model answered: its version, its registry version and MLflow run (None when unknown)."""
        registry = self.meta.get("registry_version")
        return {"model_version": self.version, "registry_version": None if registry is None else str(registry),
                "run_id": self.meta.get("run_id")}


def answer_fields(answer):
    """The JSON fields of catdog.answer's (label, confidence, probabilities, pet_probability,
    distance), rounded as POST /predict sends them (predict.py writes the same)."""
    label, confidence, probabilities, pet_probability, _ = answer
    return {"label": label, "confidence": round(confidence, 6), "pet_probability": round(pet_probability, 6),
            "probabilities": {c: round(p, 6) for c, p in probabilities.items()}}


def load_model(path, ort_threads=1, profile_path=""):
    """ONNX session + the meta, drift profile (profile_path, else the one beside it) and model
    card saved beside it, warmed up."""
    meta = catdog.read_json(os.path.splitext(path)[0] + ".json")
    if "other" not in meta:
        raise ValueError(f"{path} has no \"other\" decision (model.json lacks \"other\"): retrain it with `make train`")
    if mismatch := catdog.preprocessing_mismatch(meta, path):
        raise ValueError(mismatch)
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
    session.run(list(catdog.ONNX_OUTPUTS), {"image": np.zeros((1, 3, crop, crop), np.float32)})
    profile_path = profile_path or os.path.join(os.path.dirname(path), "reference_profile.json")
    profile = catdog.read_json(profile_path) if os.path.exists(profile_path) else None
    card_path = os.path.join(os.path.dirname(path), catdog.MODEL_CARD)
    card = read_text(card_path) if os.path.exists(card_path) else None
    return Model(session, meta, profile, card, options.intra_op_num_threads)


# ---------------------------------------------------------------- the service
class Service:
    """One serving instance: the model (swapped whole on reload), the store, the drift window,
    the metrics, the decode budget and the inference slots. Nothing runs in the background
    until start()."""

    def __init__(self, settings):
        self.settings = settings
        self.model = None  # set once loaded AND warmed up
        self.load_error = None  # why the last load failed, for /health
        self.stopping = threading.Event()
        self.started_at = time.time()
        self.in_flight = 0  # requests being handled now
        self._in_flight_lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time
        self.photos = photos_folder(settings)  # before the store: refused settings open nothing
        # A connection per request thread, and one for the retention thread.
        self.store = stores.open_store(settings.database_url, settings.db_path, settings.request_threads + 1)
        self.drift = monitor.DriftWindow(settings.drift_window, settings.drift_min_samples)
        self.decode_budget = upload.DecodeBudget(int(settings.decode_budget_mb * 1024 * 1024), settings.decode_wait_s,
                                                 log, heavy_lanes=max(1, available_cpus() - 1))
        self.inference_slots = threading.BoundedSemaphore(settings.infer_threads or available_cpus())
        self.metrics = monitor.Metrics(self)

    def start(self):
        """The model loading in the background (/live answers at once, /health once the model
        is warm), and the retention thread."""
        self.load_in_background("start")
        if self.photos is None and self.store.names_photos():
            # Retention then forgets those photos in the rows only: their files would stay for ever.
            log(event="photos_left_on_disk", level="error", error="rows name photos kept by an earlier KEEP_PHOTOS "
                "but no folder is known (DATABASE_URL without PHOTOS_DIR): set PHOTOS_DIR so that they expire")
        threading.Thread(target=self.keep_pruning, daemon=True, name="retention").start()

    def keep_pruning(self):
        """Retention: every RETENTION_INTERVAL_S, a chunked prune (requests wait one chunk at most)
        that takes kept photos with their rows; pending photos older than KEEP_PENDING_HOURS
        dropped (also with KEEP_PHOTOS=off: those an earlier mode left), and files that old no
        row names swept from the photos folder."""
        settings = self.settings
        while not self.stopping.wait(settings.retention_interval_s):
            pending_since = time.time() - settings.keep_pending_hours * 3600
            try:
                deleted = self.store.prune(time.time() - settings.retention_days * 86400, settings.retention_rows,
                                           folder=self.photos)
                expired = self.store.expire_photos(pending_since, self.photos)
                swept = self.store.sweep_photos(self.photos, pending_since)
            except (*self.store.unavailable, OSError) as e:  # a busy or full disk, the database away: next time
                log(event="prune_failed", error=str(e))
                continue
            if deleted:
                log(event="pruned", predictions=deleted)
            if expired:
                log(event="pending_photos_dropped", photos=expired)
            if swept:
                log(event="unnamed_photo_files_removed", files=swept)

    def load_in_background(self, reason):
        threading.Thread(target=self.load, args=(reason,), daemon=True, name="model-loader").start()

    def load(self, reason):
        """Load (or reload) the model; the old one serves until the swap, and stays if the load fails."""
        settings = self.settings
        with self._load_lock:
            started = time.perf_counter()
            try:
                new = load_model(settings.model_path, settings.ort_threads, settings.profile_path)
            except Exception as e:  # noqa: BLE001 (keep serving the old model rather than none)
                self.load_error = f"{type(e).__name__}: {e}"
                self.metrics.load_failures.inc()
                log(event="model_load_failed", reason=reason, path=settings.model_path, error=self.load_error)
                return False
            if self.model is not None and self.model.version != new.version:
                self.drift.forget_confidences()
            self.model, self.load_error = new, None
        log(event="model_loaded", reason=reason, model_version=new.version, arch=new.meta.get("arch"),
            ort_threads=new.threads, drift_profile=new.profile is not None, model_card=new.card is not None,
            load_ms=round((time.perf_counter() - started) * 1000, 1))
        return True

    def enter(self):
        with self._in_flight_lock:
            self.in_flight += 1

    def leave(self):
        with self._in_flight_lock:
            self.in_flight -= 1

    def predict(self, model, photos):
        """The answers for [(preprocessed image, image stats, request id, uploaded bytes)], each
        recorded for monitoring: ONNX Runtime runs of up to RUN_SIZE images, each in an inference slot."""
        outputs = []
        for start in range(0, len(photos), RUN_SIZE):
            batch = np.stack([photo[0] for photo in photos[start:start + RUN_SIZE]])
            with self.inference_slots:
                outputs += model.run(batch)
            self.metrics.batch_size.observe(len(batch))
        return [self.record(model, stats, request_id, out, data)
                for (_, stats, request_id, data), out in zip(photos, outputs)]

    def record(self, model, stats, request_id, outputs, data):
        """The answer's fields of one image's outputs, stored under a new prediction id (the
        server's key of the prediction: what /feedback names) with its pending photo, and counted."""
        answer = catdog.answer(outputs, model.meta)
        label, confidence, _, _, distance = answer
        prediction_id = uuid.uuid4().hex
        stats = {**stats, "pet_distance": distance, catdog.OTHER: float(label == catdog.OTHER)}
        photo = self.keep_pending(data)
        self.store.record_prediction(prediction_id, request_id, model.version, label, confidence, stats, photo)
        if photo is not None:  # again: the last other row naming it may have taken the file meanwhile
            kept.save(self.photos, photo, data)
        # The reference confidences are of cat/dog answers; an "other" answer's is another quantity.
        self.drift.add(stats, confidence if label != catdog.OTHER else None)
        self.metrics.predictions.labels(label).inc()
        self.metrics.confidence.observe(confidence)
        return {**answer_fields(answer), "prediction_id": prediction_id}

    def keep_pending(self, data):
        """The sha256 of an upload whose bytes now wait under the photos folder for its feedback
        (settle_photo); None with KEEP_PHOTOS=off (no hash either: off costs a request nothing), or
        when the file cannot be written: then the answer still goes out and the log says why."""
        if self.settings.keep_photos == "off":
            return None
        photo = hashlib.sha256(data).hexdigest()
        try:
            kept.save(self.photos, photo, data)
        except OSError as e:
            self.metrics.photos_not_kept.inc()
            log(event="photo_not_kept", folder=self.photos, error=f"{type(e).__name__}: {e}")
            return None
        return photo

    def settle_photo(self, prediction_id, predicted, truth, photo):
        """After a prediction's feedback, its pending photo (sha256, None: none) stays or goes (kept.stays)."""
        settings = self.settings
        if photo is not None and not kept.stays(settings.keep_photos, predicted, truth, photo,
                                                settings.keep_confirmed_share):
            self.store.drop_photo(prediction_id, self.photos)

    def drift_report(self):
        model = self.model
        return self.drift.report(model.profile if model is not None else None)

    def stats(self):
        """The /stats answer."""
        model, metrics = self.model, self.metrics
        accuracy, judged = self.store.live_accuracy(self.settings.live_window)
        requests_by = {f"{endpoint} {status}": int(n)
                       for (endpoint, status), n in metrics.values(metrics.requests).items()}
        by_label = {label: int(n) for (label,), n in metrics.values(metrics.predictions).items()}
        predict_count = metrics.values(metrics.latency, "_count").get(("/predict",), 0)
        predict_seconds = metrics.values(metrics.latency, "_sum").get(("/predict",), 0.0)
        return {"model_version": model and model.version, "uptime_s": round(time.time() - self.started_at, 1),
                "requests": sum(requests_by.values()), "requests_by_endpoint": dict(sorted(requests_by.items())),
                "predictions": sum(by_label.values()), "predictions_by_label": by_label,
                "mean_latency_ms": round(predict_seconds / predict_count * 1000, 2) if predict_count else None,
                "live_accuracy": accuracy, "live_accuracy_samples": judged, "live_window": self.settings.live_window,
                "feedback_count": self.store.feedback_count(), "drift": self.drift_report()}

    def close(self):
        self.decode_budget.close()
        self.store.close()


# ---------------------------------------------------------------- the app
api = Blueprint("catdog", __name__)


def create_app(settings, service=None):
    """The Flask app around `service` (by default a new Service of `settings`), which it keeps
    in app.extensions["catdog"]. Starts nothing: main() calls service.start()."""
    service = service or Service(settings)
    openapi_json()  # a broken document fails the start, not its first request
    app = Flask(__name__)
    app.request_class = upload.InMemoryRequest
    app.extensions["catdog"] = service
    app.register_blueprint(api)
    return app


def current_service():
    return current_app.extensions["catdog"]


@api.before_app_request
def start_request():
    request.max_content_length = upload.body_limit(current_service().settings)
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
TOKEN_ENDPOINTS = {"catdog.feedback", "catdog.stats", "catdog.metrics", "catdog.delete_photo"}


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
    metrics = current_service().metrics
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(seconds)
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
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE"
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
        return error(413, *upload.too_large(current_service().settings))
    return error(e.code, re.sub(r"\W+", "_", e.name.lower()), e.description)


@api.app_errorhandler(Exception)
def server_error(e):
    if isinstance(e, current_service().store.unavailable):  # the database is away, not a bug: retry soon
        log(event="store_unavailable", error=f"{type(e).__name__}: {e}")
        return error(503, "store_unavailable", "the prediction store cannot be reached; try again shortly")
    current_app.logger.exception("unhandled error")  # stderr, with traceback
    return error(500, "internal_error", "the server failed to handle this request")


@api.post("/predict")
def predict():
    service = current_service()
    model = service.model  # this request uses this model throughout, even if a reload swaps it meanwhile
    if model is None:
        return error(503, "not_ready", "the model is not loaded yet")
    try:
        data = upload.read_upload()
        x, stats = upload.prepare(data, model.meta["preprocess"], service.settings, service.decode_budget)
    except catdog.ImageError as e:
        return error(upload.status_of(e), e.reason, str(e))
    (answer,) = service.predict(model, [(x, stats, g.request_id, data)])
    g.label = answer["label"]
    return jsonify(**answer, **model.identity, request_id=g.request_id,
                   latency_ms=round((time.perf_counter() - g.started) * 1000, 2))


@api.post("/predict/batch")
def predict_batch():
    """Several photos (multipart parts `file`) in one request: one answer or error per photo,
    in order, each stored and counted as its own prediction with its own request id."""
    service = current_service()
    model, settings = service.model, service.settings
    if model is None:
        return error(503, "not_ready", "the model is not loaded yet")
    try:
        parts = upload.read_batch(settings.max_photos)
    except catdog.ImageError as e:
        return error(upload.status_of(e), e.reason, str(e))
    results, photos = [], []
    for index, part in enumerate(parts):
        results.append({"index": index, "filename": part.filename or ""})
        try:
            data = part.read()
            photos.append((index, *upload.prepare(data, model.meta["preprocess"], settings, service.decode_budget),
                           data))
        except catdog.ImageError as e:
            results[index].update(status=upload.status_of(e), error=e.reason, message=str(e))
    if photos:
        answers = service.predict(model, [(x, stats, g.request_id, data) for _, x, stats, data in photos])
        for (index, *_), answer in zip(photos, answers):
            # request_id: the photo's own id for its feedback, as clients of /predict use it.
            results[index].update(status=200, **answer, request_id=answer["prediction_id"])
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
    prediction_id, predicted, photo = found
    stored, on_record = service.store.record_feedback(prediction_id, truth)
    if on_record != truth:
        return error(409, "feedback_exists", f"this prediction's feedback is already recorded ({on_record}); it is kept")
    if stored:  # the metric counts stored feedback, as the database does; a retry must not judge
        # again a photo settled before (under another KEEP_PHOTOS, maybe)
        service.metrics.feedback.labels("true" if predicted == truth else "false").inc()
        service.settle_photo(prediction_id, predicted, truth, photo)
    g.label = truth
    return jsonify(request_id=key, prediction_id=prediction_id, label=truth, predicted=predicted,
                   correct=predicted == truth, recorded=stored)


@api.delete("/predictions/<prediction_id>/photo")
def delete_photo(prediction_id):
    """Remove a prediction's kept (or pending) photo, on request: no prediction names those bytes
    any more (this one, and any other of the very same photo) and its file is deleted. Idempotent."""
    service = current_service()
    named = service.store.erase_photo(prediction_id, service.photos)
    if named is None:
        return error(404, "unknown_prediction_id", "no prediction has this id")
    return jsonify(prediction_id=prediction_id, removed=named > 0, predictions=named)


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
    return jsonify(status="ok", **model.identity, arch=model.meta.get("arch"),
                   pet_threshold=float(model.meta["other"]["threshold"]), store=service.store.kind,
                   keep_photos=service.settings.keep_photos, **failed)


@api.get("/live")
def live():
    return jsonify(status="alive")


@api.get("/metrics")
def metrics():
    # Text format 0.0.4 whatever the Accept header asks: the Content-Type the service always sent.
    # prometheus_client 0.26's CONTENT_TYPE_LATEST says text format 1.0.0, which only adds UTF-8
    # metric names, which the service has none of.
    return generate_latest(current_service().metrics.registry), 200, {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}


@api.get("/stats")
def stats():
    return jsonify(current_service().stats())


@api.get("/model-card")
def model_card():
    """The served model's card (MODEL_CARD.md beside it, from training): what it learnt from,
    how it was measured, where it fails."""
    model = current_service().model
    if model is None:
        return error(503, "not_ready", "the model is not loaded yet")
    if model.card is None:
        return error(404, "no_model_card", f"the model being served has no {catdog.MODEL_CARD} beside it")
    return model.card, 200, {"Content-Type": "text/markdown; charset=utf-8"}


@api.get("/openapi.json")
def openapi():
    return current_app.response_class(openapi_json(), mimetype="application/json")


@functools.cache
def openapi_json():
    """The API's OpenAPI 3.1 description (openapi.yaml, kept beside this file) as JSON, read once
    (by libyaml, which PyYAML's wheels carry: the pure-Python parser would slow the start)."""
    with open(OPENAPI_PATH, encoding="utf-8") as f:
        return json.dumps(yaml.load(f, Loader=yaml.CSafeLoader), indent=2, ensure_ascii=False) + "\n"


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
    return waitress.create_server(app, host=settings.host, port=settings.port, threads=settings.request_threads,
                                  ident="catdog", **upload.waitress_body_limits(settings))


def stop_listening(server):
    """Refuse new connections from now on: a closed socket, not a backlog nobody answers.
    Runs in the event loop's thread, between two select() calls."""
    server.accepting = False
    server.del_channel()
    server.socket.close()


def connections(server):
    return [channel for channel in list(server._map.values()) if isinstance(channel, waitress.channel.HTTPChannel)]


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
        while ((service.in_flight or tasks.queue or tasks.active_count or connections(server))
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
    upload.tune_malloc()
    log_libraries_as_json("psycopg")
    try:
        settings = Settings.from_env()
        database = stores.redacted(settings.database_url) if settings.database_url else settings.db_path
        service = Service(settings)
    except Refused as e:
        log(event="settings_refused", error=str(e))
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 (the database away or refusing: say so in one line, exit)
        log(event="store_failed", store="postgresql" if settings.database_url else "sqlite", database=database,
            error=f"{type(e).__name__}: {e}")
        sys.exit(1)
    server = make_server(create_app(settings, service), settings)
    handle_signals(server, service)
    service.start()
    log(event="listening", host=settings.host, port=int(server.effective_port), threads=server.adj.threads,
        infer_threads=settings.infer_threads or available_cpus(), model_path=settings.model_path,
        store=service.store.kind, database=database, keep_photos=settings.keep_photos, photos_dir=service.photos)
    server.run()  # returns on SystemExit after waitress stops its threads
    service.close()
    log(event="stopped")


if __name__ == "__main__":
    main()
