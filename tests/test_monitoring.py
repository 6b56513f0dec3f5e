"""monitoring/: the Prometheus config and alert rules pass promtool and their unit tests,
the dashboard and alerts query only metrics (and labels) the real service exports,
a real Prometheus scrapes a real service, and the Alertmanager config passes amtool, routes
every alert by its severity and, run for real, delivers a firing rule to a webhook."""
import contextlib
import http.server
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import catdog  # noqa: E402
import harness  # noqa: E402
from service_helpers import Server, free_port, synthetic_photo, tiny_model  # noqa: E402

MONITORING = os.path.join(ROOT, "monitoring")
needs_promtool = pytest.mark.skipif(not shutil.which("promtool"),
                                    reason="promtool missing (Debian package prometheus; `make system-deps`)")
needs_prometheus = pytest.mark.skipif(not shutil.which("prometheus"),
                                      reason="prometheus missing (Debian package; `make system-deps`)")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")  # Debian's name, upstream's
needs_alertmanager = pytest.mark.skipif(
    not (ALERTMANAGER and shutil.which("amtool")),
    reason="alertmanager or amtool missing (Debian package prometheus-alertmanager; `make system-deps`)")
# Series Prometheus itself adds to every scrape, not exported by the service.
SCRAPE_LABELS = {"job", "instance"}


def promtool(*args, cwd=MONITORING):
    result = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_promtool
def test_promtool_config_rules_and_rule_unit_tests(tmp_path):
    # promtool wants the token file the config names: the compose service writes it at start.
    with open(os.path.join(MONITORING, "prometheus.yml")) as f:
        config = f.read()
    token_file = yaml.safe_load(config)["scrape_configs"][0]["authorization"]["credentials_file"]
    (tmp_path / "api_token").write_text("")
    (tmp_path / "prometheus.yml").write_text(config.replace(token_file, str(tmp_path / "api_token")))
    shutil.copy(os.path.join(MONITORING, "alerts.yml"), tmp_path)
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert f"{len(alert_rules())} rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def alert_rules():
    with open(os.path.join(MONITORING, "alerts.yml")) as f:
        return [rule for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]


def dashboard():
    with open(os.path.join(MONITORING, "grafana", "dashboard.json")) as f:
        return json.load(f)


def queries():
    """(where, PromQL) for every alert rule and every dashboard query."""
    found = [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]
    found += [(f"panel {panel['title']!r}", target["expr"])
              for panel in dashboard()["panels"] for target in panel["targets"]]
    return found


def test_alerts_cover_the_issue_and_dashboard_is_provisioned():
    names = {rule["alert"] for rule in alert_rules()}
    assert {"CatdogHighErrorRate", "CatdogHighLatencyP99", "CatdogLiveAccuracyLow",
            "CatdogInputDrift", "CatdogInputShareShift", "CatdogOtherShareHigh", "CatdogTargetDown"} <= names
    with open(os.path.join(MONITORING, "alerts_test.yml")) as f:
        tested = {case["alertname"] for test in yaml.safe_load(f)["tests"] for case in test["alert_rule_test"]
                  if case["exp_alerts"]}
    assert tested == names, "every alert has a unit test in which it fires"

    with open(os.path.join(MONITORING, "grafana", "datasource.yml")) as f:
        (source,) = yaml.safe_load(f)["datasources"]
    panels = dashboard()["panels"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "errors", "latency", "label", "confidence", "live accuracy", "drift", '"other"'):
        assert topic in titles
    for panel in panels:
        assert panel["targets"] and panel["datasource"]["uid"] == source["uid"]


def test_no_query_depends_on_a_drift_feature_name():
    """Drift features and shares come and go with the model (width and height did); the alerts
    and the panels take whatever features and shares the service exports."""
    for where, expr in queries():
        if "catdog_drift" in expr:
            assert "feature=" not in expr.replace(" ", ""), f"{where} picks drift features by name: {expr}"
            assert "share=" not in expr.replace(" ", ""), f"{where} picks drift shares by name: {expr}"


def test_drift_alerts_and_panels_use_the_services_threshold():
    """PSI and share rise are drift above catdog.DRIFT_THRESHOLD, in the alerts and on the dashboard."""
    rules = {rule["alert"]: rule["expr"].strip() for rule in alert_rules()}
    assert rules["CatdogInputDrift"] == f"catdog_drift_psi > {catdog.DRIFT_THRESHOLD}"
    assert rules["CatdogInputShareShift"] == f"catdog_drift_share_rise > {catdog.DRIFT_THRESHOLD}"
    for metric in ("catdog_drift_psi", "catdog_drift_share_rise"):
        (panel,) = [p for p in dashboard()["panels"] if any(t["expr"] == metric for t in p["targets"])]
        assert "drift" in panel["title"].lower()
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [step["value"] for step in steps] == [None, catdog.DRIFT_THRESHOLD], panel["title"]


def test_other_share_panel_is_the_alerts_share():
    """The dashboard shows the share the alert watches: "other" answers over all answers, summed over instances."""
    (alert,) = [rule for rule in alert_rules() if rule["alert"] == "CatdogOtherShareHigh"]
    (panel,) = [p for p in dashboard()["panels"] if '"other"' in p["title"]]
    hour = next(t["expr"] for t in panel["targets"] if "[1h]" in t["expr"])
    assert hour in alert["expr"]
    assert hour.startswith('sum(rate(catdog_predictions_total{label="other"}')


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The real serve.py with a tiny model; drift needs only one sample so every family has series."""
    server = Server(tiny_model(), str(tmp_path_factory.mktemp("db") / "catdog.db"), DRIFT_MIN_SAMPLES=1)
    rng = np.random.default_rng(3)
    for kind in ("cat", "dog"):
        answer = server.predict(synthetic_photo(rng, kind)).json()
        assert answer["label"] == kind
        assert server.post("/feedback", json={"request_id": answer["request_id"], "label": kind}).ok
    assert server.predict(b"not a photo").status_code == 422
    yield server
    server.stop()


def exported(metrics_text):
    """{series name: {label name: {values}}} of Prometheus text format, read by prometheus_client's parser."""
    series = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            entry = series.setdefault(sample.name, {})
            for key, value in sample.labels.items():
                entry.setdefault(key, set()).add(value)
    return series


def test_dashboard_and_alerts_name_only_exported_metrics(service):
    series = exported(service.get("/metrics").text)
    assert "catdog_drift_psi" in series and "catdog_live_accuracy" in series  # nothing hidden by an empty family
    assert series["catdog_drift_share_rise"]["share"] == set(catdog.DRIFT_SHARES)
    for where, expr in queries():
        names = set(re.findall(r"\bcatdog_\w+", expr))
        assert names or "up{" in expr, f"{where}: no catdog metric in {expr}"
        missing = names - set(series)
        assert not missing, f"{where} queries {missing}, which /metrics does not export"
        known_labels = set().union(SCRAPE_LABELS, *(series[n] for n in names))
        for name, selector in re.findall(r"\b(catdog_\w+)\{([^}]*)\}", expr):
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
                assert label in series[name], f"{where}: {name} has no label {label!r}"
                if op == "=":
                    assert value in series[name][label], f"{where}: {name}{{{label}={value!r}}} never exported"
        for clause in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in filter(None, (s.strip() for s in clause.split(","))):
                assert label in known_labels, f"{where}: groups by {label!r}, which {names} do not carry"


@needs_prometheus
def test_prometheus_scrapes_the_service(service):
    result = subprocess.run(["bash", os.path.join(MONITORING, "scrape_check.sh"), service.url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "endpoint=/predict,status=200 2" in result.stdout
    assert "endpoint=/predict,status=422 1" in result.stdout
    assert "live accuracy: 1 over 2 predictions" in result.stdout
    assert f"{len(alert_rules())} loaded, unhealthy None" in result.stdout


def compose_profile(profile):
    """(every Compose service, the names of those in `profile`); fails when one of these mounts a missing file."""
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        services = yaml.safe_load(f)["services"]
    names = {name for name, s in services.items() if profile in s.get("profiles", [])}
    for name in names:
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert os.path.isfile(os.path.join(ROOT, source)), f"{name} mounts missing {source}"
    return services, names


def test_compose_monitoring_profile_mounts_these_files():
    """The opt-in profile runs Prometheus and Grafana on exactly these files, scraping the api service."""
    services, monitoring = compose_profile("monitoring")
    assert monitoring == {"prometheus", "grafana"} and "profiles" not in services["api"]
    mounted = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("prometheus.yml", "alerts.yml", "grafana/datasource.yml", "grafana/dashboards.yml",
                 "grafana/dashboard.json"):
        assert f"./monitoring/{path}:" in mounted
    with open(os.path.join(MONITORING, "prometheus.yml")) as f:
        (job,) = yaml.safe_load(f)["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["api:8000"]
    # With API_TOKEN in the host config /metrics wants it: the entrypoint writes it where the job reads it.
    prometheus = services["prometheus"]
    assert prometheus["env_file"] == services["api"]["env_file"] and prometheus["tmpfs"] == ["/tmp"]
    (command,) = prometheus["command"]
    token_file = job["authorization"]["credentials_file"]
    assert f'printf %s "$${{API_TOKEN:-}}" > {token_file} && exec env -i /bin/prometheus' in command


def test_compose_alerting_profile_runs_alertmanager_on_this_config():
    """The opt-in profile runs Alertmanager on alertmanager.yml, written by alertmanager_config.sh with
    the webhook URL of the host config, where prometheus.yml sends alerts (9093: its default port)."""
    services, alerting = compose_profile("alerting")
    assert alerting == {"alertmanager"}
    alertmanager = services["alertmanager"]
    mounts = dict(volume.split(":")[:2] for volume in alertmanager["volumes"])
    script = mounts["./monitoring/alertmanager_config.sh"]
    assert mounts["./monitoring/alertmanager.yml"] == os.path.join(os.path.dirname(script), "alertmanager.yml")
    (command,) = alertmanager["command"]
    assert command.startswith(f"sh {script} /tmp/alertmanager.yml && exec ")
    assert "--config.file=/tmp/alertmanager.yml" in command and alertmanager["tmpfs"] == ["/tmp"]
    (env_file,) = alertmanager["env_file"]
    assert env_file["path"] == "${CATDOG_ENV_FILE:-/etc/catdog/catdog.env}"
    assert alertmanager["ports"] == ["127.0.0.1:9093:9093"]
    with open(os.path.join(MONITORING, "prometheus.yml")) as f:
        (managers,) = yaml.safe_load(f)["alerting"]["alertmanagers"]
    assert managers["static_configs"] == [{"targets": ["alertmanager:9093"]}]


def render_alertmanager_config(out, url, source=os.path.join(MONITORING, "alertmanager.yml")):
    """monitoring/alertmanager_config.sh: `source` with the webhook `url` written in, checked by amtool."""
    return subprocess.run(["sh", os.path.join(MONITORING, "alertmanager_config.sh"), str(out), str(source)],
                          env={**os.environ, "ALERT_WEBHOOK_URL": url}, capture_output=True, text=True, timeout=60)


def assert_amtool_success(result):
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    assert "2 receivers" in result.stdout, result.stdout


@needs_alertmanager
def test_alertmanager_config_passes_amtool_and_routes_every_alert_by_severity(tmp_path):
    url = "https://hooks.example/catdog?team=pets&key=a|b"  # & and | are special to sed
    rendered = tmp_path / "alertmanager.yml"
    assert_amtool_success(render_alertmanager_config(rendered, url))
    text = rendered.read_text()
    assert "${ALERT_WEBHOOK_URL}" not in text and text.count(f'url: "{url}"') == 2
    for rule in alert_rules():
        severity = rule["labels"]["severity"]
        result = subprocess.run(["amtool", "config", "routes", "test", f"--config.file={rendered}",
                                 f"alertname={rule['alert']}", f"severity={severity}"],
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == f"catdog-{severity}", f"{rule['alert']}: {result.stdout}{result.stderr}"

    # The documented e-mail and chat receivers are valid config once uncommented.
    with open(os.path.join(MONITORING, "alertmanager.yml")) as f:
        examples = re.sub(r"^(    )# (?=\w+_configs:|  )", r"\1", f.read(), flags=re.M)
    assert examples.count("    email_configs:") == 2 and "    slack_configs:" in examples
    (tmp_path / "examples.yml").write_text(examples)
    assert_amtool_success(render_alertmanager_config(tmp_path / "examples.out.yml", url, tmp_path / "examples.yml"))

    # No URL, no Alertmanager: it would notify no one.
    for bad in ("", "hooks.example/catdog"):
        result = render_alertmanager_config(tmp_path / "refused.yml", bad)
        assert result.returncode == 1 and "ALERT_WEBHOOK_URL must be" in result.stderr, result.stderr


# A scrape target whose model reload failed (a ticket rule) while its model still serves.
RELOAD_FAILED_METRICS = b"catdog_model_ready 1\ncatdog_model_load_failed 1\n"


class WebhookSink(http.server.BaseHTTPRequestHandler):
    """POST: Alertmanager's notification, put on server.posts as (path, JSON). GET: the metrics above."""

    def do_POST(self):
        self.server.posts.put((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
        self.send_response(200)
        self.end_headers()

    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer s3cret":
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(RELOAD_FAILED_METRICS)))
        self.end_headers()
        self.wfile.write(RELOAD_FAILED_METRICS)

    def log_message(self, *args):
        pass


@pytest.fixture
def sink():
    """WebhookSink on 127.0.0.1 (a port the kernel picks), in a thread of this process."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WebhookSink)
    server.posts = queue.Queue()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def write_yaml(path, data):
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def notifications(sink, alertnames, timeout):
    """{alertname: (receiver, path, alert)} of the first notification of each of `alertnames`, waiting
    at most `timeout` s in all; alerts of other names are kept too."""
    found, deadline = {}, time.monotonic() + timeout
    while set(alertnames) - set(found) and (left := deadline - time.monotonic()) > 0:
        try:
            path, post = sink.posts.get(timeout=left)
        except queue.Empty:
            break
        for alert in post["alerts"]:
            found.setdefault(alert["labels"]["alertname"], (post["receiver"], path, alert))
    return found


@needs_prometheus
@needs_alertmanager
def test_a_firing_rule_reaches_the_webhook(tmp_path, sink):
    """Real Prometheus evaluates the project's rules (`for` cut to 0 s) and sends to real Alertmanager
    on the shipped routes (waits cut to 1 s), which posts to the sink: a target that is down pages,
    a failed model reload opens a ticket."""
    down, reload_failed = f"127.0.0.1:{free_port()}", f"127.0.0.1:{sink.server_port}"  # nothing listens on `down`
    with open(os.path.join(MONITORING, "alertmanager.yml")) as f:
        routes = yaml.safe_load(f)
    for route in (routes["route"], *routes["route"]["routes"]):
        route.update(group_wait="1s", group_interval="1s")
    source = write_yaml(tmp_path / "alertmanager.in.yml", routes)
    assert_amtool_success(render_alertmanager_config(tmp_path / "alertmanager.yml", f"http://{reload_failed}/hook",
                                                     source))
    with open(os.path.join(MONITORING, "alerts.yml")) as f:
        rules = yaml.safe_load(f)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "0s"
    write_yaml(tmp_path / "alerts.yml", rules)
    with open(os.path.join(MONITORING, "prometheus.yml")) as f:
        config = yaml.safe_load(f)
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [down, reload_failed]}]
    (tmp_path / "api_token").write_text("s3cret")
    job["authorization"]["credentials_file"] = str(tmp_path / "api_token")  # the sink wants it, as the api would

    with contextlib.ExitStack() as running:
        alertmanager = harness.Server(log=tmp_path / "alertmanager.log", command=lambda port: [
            ALERTMANAGER, f"--config.file={tmp_path / 'alertmanager.yml'}", f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="])  # no peers: no port 9094
        running.callback(alertmanager.stop)
        (managers,) = config["alerting"]["alertmanagers"]
        managers["static_configs"] = [{"targets": [f"127.0.0.1:{alertmanager.port}"]}]
        write_yaml(tmp_path / "prometheus.yml", config)
        prometheus = harness.Server(log=tmp_path / "prometheus.log", command=lambda port: [
            "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}", f"--web.listen-address=127.0.0.1:{port}"])
        running.callback(prometheus.stop)
        alertmanager.wait("/-/ready")
        prometheus.wait("/-/ready")
        found = notifications(sink, ["CatdogTargetDown", "CatdogModelReloadFailed"], timeout=40)
    logs = f"\nprometheus:\n{prometheus.logs()[-2000:]}\nalertmanager:\n{alertmanager.logs()[-2000:]}"
    assert set(found) == {"CatdogTargetDown", "CatdogModelReloadFailed"}, f"notified: {found}{logs}"
    receiver, path, alert = found["CatdogTargetDown"]
    assert (receiver, path, alert["status"]) == ("catdog-page", "/hook", "firing")
    assert alert["labels"]["severity"] == "page" and alert["labels"]["instance"] == down
    assert alert["annotations"]["summary"] == f"catdog: Prometheus cannot scrape {down}"
    receiver, path, alert = found["CatdogModelReloadFailed"]
    assert (receiver, path, alert["status"]) == ("catdog-ticket", "/hook", "firing")
    assert alert["labels"]["severity"] == "ticket" and alert["labels"]["instance"] == reload_failed
