"""What the service reports about itself: the drift window of its recent inputs (scored against
the model's reference profile) and its Prometheus metrics, in a registry of their own.

serve.Service holds one DriftWindow and one Metrics; /metrics renders Metrics.registry and
/stats reads the same figures, so a dashboard and a person see one set of numbers.
"""
import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

import catdog

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


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


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (never prometheus_client's
    process-wide default one), so several apps can live in one process."""

    def __init__(self, service):
        self.service = service
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
        # KEEP_PHOTOS wanted an upload kept and its file could not be written (a full or read-only
        # PHOTOS_DIR): the answer went out, the staff correction will train nothing. Alerted on.
        self.photos_not_kept = Counter("catdog_photos_not_kept", "Uploads KEEP_PHOTOS could not write to PHOTOS_DIR.",
                                       registry=registry)
        self.batch_size = Histogram("catdog_inference_batch_size", "Images per ONNX Runtime run.",
                                    buckets=BATCH_BUCKETS, registry=registry)
        registry.register(self)  # collect()
        Gauge("catdog_model_ready", "1 when the model is loaded and warmed up.",
              registry=registry).set_function(lambda: service.model is not None and not service.stopping.is_set())
        self.load_failures = Counter("catdog_model_load_failures", "Model loads (start or SIGHUP reload) that failed.",
                                     registry=registry)
        Gauge("catdog_model_load_failed", "1 while the latest model load failed (a reload keeps the old model).",
              registry=registry).set_function(lambda: service.load_error is not None)
        Gauge("catdog_in_flight_requests", "Requests being handled now.",
              registry=registry).set_function(lambda: service.in_flight)
        Gauge("catdog_start_time_seconds", "Process start, Unix time.", registry=registry).set(service.started_at)

    def collect(self):
        """The families computed at each scrape: live accuracy from the store, drift of the
        recent inputs, the model being served."""
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

    @staticmethod
    def values(metric, suffix="_total"):
        """{label values: value} of a metric's samples named with this suffix ("_total", "_sum", ...)."""
        return {tuple(s.labels.values()): s.value for family in metric.collect() for s in family.samples
                if s.name == family.name + suffix}
