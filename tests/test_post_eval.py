"""post_eval.py against a small stand-in service whose answers we know in advance.

The stand-in decides from the image content alone (red photo -> cat, blue -> dog, grey ->
other: neither), so a dog photo painted red is a known mistake; it records every feedback it
receives.
"""
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import catdog  # noqa: E402
import evaluate  # noqa: E402
import post_eval  # noqa: E402

RED, BLUE, GREY = (200, 40, 40), (40, 40, 200), (128, 128, 128)


class StandIn(BaseHTTPRequestHandler):
    feedback = []  # (request_id, label) pairs received
    predictions = {}  # request_id -> label answered

    def log_message(self, *args):
        pass

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            return self.reply(200, {"status": "ok", "model_version": "v-test"})
        self.reply(404, {"error": "not found"})

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/feedback":
            answer = json.loads(data)
            known = answer["request_id"] in self.predictions
            if known:
                self.feedback.append((answer["request_id"], answer["label"]))
            return self.reply(200 if known else 404, {"ok": known})
        # The label is in the file name on disk; the service must not be told it.
        assert b'filename="photo.jpg"' in data
        start = data.index(b"\r\n\r\n") + 4
        img = catdog.open_image(data[start:data.rindex(b"\r\n--")])
        red, _, blue = np.asarray(img, dtype=float).reshape(-1, 3).mean(axis=0)
        label = "other" if abs(red - blue) < 30 else "cat" if red > blue else "dog"
        request_id = uuid.uuid4().hex
        self.predictions[request_id] = label
        pet_probability = 0.1 if label == "other" else 0.95
        self.reply(200, {"label": label, "confidence": 0.9, "pet_probability": pet_probability,
                         "model_version": "v-test", "request_id": request_id, "latency_ms": 1.0})


@pytest.fixture()
def service():
    StandIn.feedback, StandIn.predictions = [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def photos(tmp_path):
    """3 red cats, 3 blue dogs and 1 red dog (a known mistake): accuracy 6/7."""
    folder = tmp_path / "photos"
    (folder / "dog").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 48), RED).save(folder / f"cat.{i}.jpg")
        Image.new("RGB", (64, 48), BLUE).save(folder / "dog" / f"{i}.jpg")
    Image.new("RGB", (64, 48), RED).save(folder / "dog" / "red.jpg")
    return folder


def run_cli(url, args, tmp_path):
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    return subprocess.run([sys.executable, os.path.join(ROOT, "post_eval.py"), url, *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def test_known_answers_feedback_report_mlflow_and_failing_exit(service, photos, tmp_path):
    """6 of 7 right is below the default 0.99: exit 1, yet everything is measured and logged."""
    out = tmp_path / "report"
    result = run_cli(service, [str(photos), "--out", str(out)], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "accuracy 0.8571 is below 0.99" in result.stderr

    metrics = catdog.read_json(out / "metrics.json")
    assert metrics["images"] == 7 and metrics["errors"] == 0
    assert metrics["accuracy"] == pytest.approx(6 / 7)
    assert (metrics["accuracy_low"], metrics["accuracy_high"]) == pytest.approx(evaluate.wilson_interval(6, 7))
    assert f"accuracy 0.8571 (95 % interval {metrics['accuracy_low']:.4f}-{metrics['accuracy_high']:.4f}" in result.stdout
    assert metrics["precision_cat"] == pytest.approx(3 / 4) and metrics["recall_cat"] == 1.0
    assert metrics["precision_dog"] == 1.0 and metrics["recall_dog"] == pytest.approx(3 / 4)
    assert metrics["f1_dog"] == pytest.approx(2 * 0.75 / 1.75)
    assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p95_ms"] <= metrics["latency_p99_ms"]
    assert "[[3, 0], [1, 3]]" in result.stdout

    # Every answered request got its TRUE label back, including the wrong one.
    assert len(StandIn.feedback) == 7 and metrics["feedback_posted"] == 7
    assert sorted(label for _, label in StandIn.feedback) == ["cat"] * 3 + ["dog"] * 4
    assert {rid for rid, _ in StandIn.feedback} == set(StandIn.predictions)

    report = (out / "report.md").read_text()
    assert "FAIL" in report and "| true dog | 1 | 3 |" in report and "red.jpg" in report
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    # The MLflow run carries the metrics and the serving model version.
    db = sqlite3.connect(tmp_path / "mlflow.db")
    (run_id,) = db.execute("select run_uuid from tags where key='model_version' and value='v-test'").fetchone()
    accuracy = db.execute("select value from metrics where run_uuid=? and key='accuracy'", (run_id,)).fetchone()
    assert accuracy[0] == pytest.approx(6 / 7)
    assert re.search(rf"MLflow run {run_id}", result.stdout)


def test_service_down_fails_before_sending(photos, tmp_path):
    result = run_cli("http://127.0.0.1:9", [str(photos), "--out", str(tmp_path / "r")], tmp_path)
    assert result.returncode != 0 and "is the service up" in (result.stdout + result.stderr)


def test_limit_keeps_both_classes_and_manifest_split(photos, tmp_path):
    pairs = catdog.labelled_photos([str(photos)])
    assert len(pairs) == 7 and {label for _, label in pairs} == {"cat", "dog"}
    assert sorted(label for _, label in post_eval.balanced_head(pairs, 4)) == ["cat", "cat", "dog", "dog"]

    # preprocess.py's layout: `path` (processed copy) relative to the manifest's folder,
    # `source` the original as given on the command line, "zip!member" for a zip.
    data = tmp_path / "data"
    (data / "processed").mkdir(parents=True)
    Image.new("RGB", (64, 48), BLUE).save(data / "processed" / "dog.7.jpg")
    manifest = data / "manifest.csv"
    manifest.write_text("path,source,sha256,label,width,height,format,bytes,split,drop_reason,duplicate_of\n"
                        f"processed/cat.0.jpg,{photos}/cat.0.jpg,x,cat,64,48,JPEG,1,test,,\n"
                        f"processed/cat.1.jpg,{photos}/cat.1.jpg,x,cat,64,48,JPEG,1,train,,\n"
                        "processed/dog.7.jpg,raw/pets.zip!dog.7.jpg,x,dog,64,48,JPEG,1,test,,\n"
                        f",{photos}/dog/1.jpg,x,dog,0,0,,0,,corrupt,\n")
    assert post_eval.manifest_files(str(manifest), "test") == [
        (f"{photos}/cat.0.jpg", "cat"), (str(data / "processed" / "dog.7.jpg"), "dog")]


@pytest.fixture()
def three_classes(tmp_path):
    """Cats, dogs and photos of neither, by name and by folder, with one known mistake each way:
    a grey cat (answered other) and a red non-pet (answered cat)."""
    folder = tmp_path / "three"
    (folder / "dog").mkdir(parents=True)
    (folder / "other").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), RED).save(folder / f"cat.{i}.jpg")
        Image.new("RGB", (64, 48), BLUE).save(folder / "dog" / f"{i}.jpg")
    for i in range(2):
        Image.new("RGB", (64, 48), GREY).save(folder / f"other.{i}.jpg")
        Image.new("RGB", (64, 48), GREY).save(folder / "other" / f"{i}.jpg")
    Image.new("RGB", (64, 48), GREY).save(folder / "cat.grey.jpg")
    Image.new("RGB", (64, 48), RED).save(folder / "other" / "red.jpg")
    return folder


def test_three_answers_from_names_and_folders(service, three_classes, tmp_path):
    out = tmp_path / "report"
    result = run_cli(service, [str(three_classes), "--out", str(out), "--min-accuracy", "0.8"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    metrics = catdog.read_json(out / "metrics.json")
    assert metrics["images"] == 12 and metrics["accuracy"] == pytest.approx(10 / 12)
    assert "confusion matrix (rows true cat/dog/other): [[3, 0, 1], [0, 3, 0], [1, 0, 4]]" in result.stdout
    assert metrics["precision_other"] == pytest.approx(4 / 5) and metrics["recall_other"] == pytest.approx(4 / 5)
    assert metrics["precision_cat"] == pytest.approx(3 / 4) and metrics["recall_dog"] == 1.0
    assert metrics["f1_macro"] == pytest.approx(np.mean([0.75, 1.0, 0.8]))
    assert (metrics["other_photos"], metrics["pet_photos"]) == (5, 7)
    assert metrics["other_as_pet"] == pytest.approx(1 / 5) and metrics["pets_as_other"] == pytest.approx(1 / 7)
    assert "20.00% of 5 non-pets answered cat or dog, 14.29% of 7 pets answered other" in result.stdout
    assert "kinds" not in metrics  # no --not-pets: no kinds to tell apart

    # "other" is the truth posted back for the photos of neither
    assert sorted(label for _, label in StandIn.feedback) == ["cat"] * 4 + ["dog"] * 3 + ["other"] * 5
    report = (out / "report.md").read_text()
    assert "| true cat | 3 | 0 | 1 |" in report and "| true other | 1 | 0 | 4 |" in report
    assert "pred other" in report and "cat.grey.jpg" in report and "red.jpg" in report
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture()
def not_pets(tmp_path):
    """A not-pets folder of kinds: bird/ (3 grey, 1 red: answered cat), object/nested/ (2 grey),
    and a photo at the top named by its kind (food.1.jpg)."""
    folder = tmp_path / "not-pets"
    (folder / "bird").mkdir(parents=True)
    (folder / "object" / "nested").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 48), GREY).save(folder / "bird" / f"bird.{i}.jpg")
    Image.new("RGB", (64, 48), RED).save(folder / "bird" / "bird.red.jpg")
    for i in range(2):
        Image.new("RGB", (64, 48), GREY).save(folder / "object" / "nested" / f"{i}.jpg")
    Image.new("RGB", (64, 48), GREY).save(folder / "food.1.jpg")
    return folder


def test_not_pets_are_other_with_a_share_per_kind(service, photos, not_pets, tmp_path):
    """--not-pets-part all: every photo under the folder, nested or at the top, is sent."""
    out = tmp_path / "report"
    result = run_cli(service, [str(photos), "--not-pets", str(not_pets), "--not-pets-part", "all", "--out", str(out)],
                     tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # 12 of 14 right is below 0.99
    assert f"14 photos from {photos} + {not_pets} (not pets, all part)" in result.stdout

    metrics = catdog.read_json(out / "metrics.json")
    assert metrics["images"] == 14 and metrics["other_photos"] == 7 and metrics["other_as_pet"] == pytest.approx(1 / 7)
    assert metrics["kinds"] == {
        "bird": {"photos": 4, "cat": 1, "dog": 0, "other": 3, "as_pet": 0.25},
        "food": {"photos": 1, "cat": 0, "dog": 0, "other": 1, "as_pet": 0.0},
        "object": {"photos": 2, "cat": 0, "dog": 0, "other": 2, "as_pet": 0.0}}
    assert "  bird: 25.0% of 4 answered cat or dog" in result.stdout
    assert "| bird | 4 | 1 | 0 | 3 | 25.0% |" in (out / "report.md").read_text()
    assert sorted(label for _, label in StandIn.feedback).count("other") == 7

    db = sqlite3.connect(tmp_path / "mlflow.db")
    (run_id,) = db.execute("select run_uuid from tags where key='model_version' and value='v-test'").fetchone()
    logged = dict(db.execute("select key, value from metrics where run_uuid=?", (run_id,)).fetchall())
    assert logged["other_as_pet.bird"] == 0.25 and logged["other_as_pet.object"] == 0.0
    assert logged["pets_as_other"] == 0.0
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)).fetchall())
    assert params["not_pets_part"] == "all"


@pytest.fixture()
def split_not_pets(tmp_path):
    """A not-pets folder of two kinds, 10 photos each, split by evaluate.not_pet_photos as train.py
    splits it: the test photos are grey (answered other), the train and val photos red (answered
    cat), so any photo the model was trained or tuned on that is sent shows as a mistake."""
    folder = tmp_path / "split-not-pets"
    for kind in ("bird", "food"):
        (folder / kind).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (64, 48), GREY).save(folder / kind / f"{i}.jpg")
    parts = evaluate.not_pet_photos(str(folder), catdog.SEED)
    for path, _ in parts["train"] + parts["val"]:
        Image.new("RGB", (64, 48), RED).save(path)
    return folder, parts


def test_not_pets_send_only_the_held_out_test_part_by_default(service, photos, split_not_pets, tmp_path):
    folder, parts = split_not_pets
    assert {len(p) for p in parts.values()} == {6, 4, 10}  # per kind of 10: 5 train, 2 val, 3 test

    out = tmp_path / "report"
    result = run_cli(service, [str(photos), "--not-pets", str(folder), "--out", str(out)], tmp_path)
    assert f"13 photos from {photos} + {folder} (not pets, test part)" in result.stdout
    metrics = catdog.read_json(out / "metrics.json")
    assert metrics["other_photos"] == 6 and metrics["other_as_pet"] == 0.0  # no red (train or val) photo sent
    assert metrics["kinds"] == {kind: {"photos": 3, "cat": 0, "dog": 0, "other": 3, "as_pet": 0.0}
                                for kind in ("bird", "food")}
    assert sorted(label for _, label in StandIn.feedback).count("other") == 6

    # "all" sends every photo of the folder, the 14 the model has seen among them
    result = run_cli(service, [str(photos), "--not-pets", str(folder), "--not-pets-part", "all", "--out", str(out)],
                     tmp_path)
    metrics = catdog.read_json(out / "metrics.json")
    assert metrics["other_photos"] == 20 and metrics["other_as_pet"] == pytest.approx(14 / 20), result.stdout

    # a part is exactly evaluate's (training's split), for whatever seed training used
    for part in ("train", "val", "test"):
        for seed in (catdog.SEED, 7):
            pairs, kinds = post_eval.not_pet_photos(str(folder), part, seed)
            expected = evaluate.not_pet_photos(str(folder), seed)[part]
            assert sorted(pairs) == sorted((path, "other") for path, _ in expected)
            assert kinds == {os.path.realpath(path): kind for path, kind in expected}
    assert post_eval.not_pet_photos(str(folder), "test", 7) != post_eval.not_pet_photos(str(folder), "test")

    bad = run_cli(service, [str(photos), "--not-pets", str(folder), "--not-pets-part", "everything"], tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_not_pets_without_kind_folders_warn(service, photos, tmp_path):
    """The parts come from the kind subfolders: photos at the top are sent only with "all"."""
    folder = tmp_path / "flat"
    folder.mkdir()
    Image.new("RGB", (64, 48), GREY).save(folder / "bird.1.jpg")
    result = run_cli(service, [str(photos), "--not-pets", str(folder), "--out", str(tmp_path / "r")], tmp_path)
    assert "no test photos of not-pets" in result.stderr
    assert catdog.read_json(tmp_path / "r" / "metrics.json")["images"] == 7


def test_limit_balances_classes_and_kinds_of_non_pets(photos, not_pets, three_classes):
    assert sorted(label for _, label in post_eval.labelled_photos([str(three_classes)])) == (
        ["cat"] * 4 + ["dog"] * 3 + ["other"] * 5)
    others, kinds = post_eval.not_pet_photos(str(not_pets), "all")
    assert {label for _, label in others} == {"other"} and sorted(kinds.values()) == (
        ["bird"] * 4 + ["food"] + ["object"] * 2)

    pairs = post_eval.labelled_photos([str(photos)]) + others
    head = post_eval.balanced_head(pairs, 6, kinds)
    assert sorted(label for _, label in head) == ["cat", "cat", "dog", "dog", "other", "other"]
    kinds_seen = [kinds[os.path.realpath(path)] for path, label in post_eval.balanced_head(pairs, 9, kinds)
                  if label == "other"]
    assert sorted(kinds_seen) == ["bird", "food", "object"]  # one of each kind before a second of any

    # a photo given twice (the manifest and --not-pets may overlap) is sent once
    assert post_eval.unique(others + others[:2]) == others


def test_against_the_real_service(tmp_path):
    """serve.py with a tiny model (reddish -> cat, bluish -> dog, very green -> other): every
    photo right, and the service's own live accuracy and feedback count agree with post_eval."""
    from service_helpers import Server, synthetic_photo, tiny_model

    rng = np.random.default_rng(7)
    photos = tmp_path / "photos"
    (photos / "other").mkdir(parents=True)
    for i in range(6):
        for kind in ("cat", "dog"):
            (photos / f"{kind}.{i}.jpg").write_bytes(synthetic_photo(rng, kind))
    for i in range(4):
        Image.new("RGB", (120, 100), (20, 250, 30)).save(photos / "other" / f"{i}.jpg")
    server = Server(tiny_model(), str(tmp_path / "catdog.db"))
    try:
        result = run_cli(server.url, [str(photos), "--limit", "12", "--out", str(tmp_path / "r")], tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        metrics = catdog.read_json(tmp_path / "r" / "metrics.json")
        assert metrics["images"] == 12 and metrics["accuracy"] == 1.0 and metrics["model_version"] == "tiny-1"
        assert metrics["other_as_pet"] == 0.0 and metrics["pets_as_other"] == 0.0
        stats = server.get("/stats").json()
        assert stats["feedback_count"] == 12 and stats["live_accuracy"] == 1.0
        assert stats["predictions_by_label"] == {"cat": 4, "dog": 4, "other": 4}
        assert '"feedback_count": 12' in (tmp_path / "r" / "report.md").read_text()
        assert "photo.jpg" not in server.logs() and "cat.0" not in server.logs()
    finally:
        server.stop()


def test_post_eval_and_the_metrics_it_shares_with_training_need_no_torch():
    """evaluate.py (metrics, plots, the not-pets split) is numpy: post_eval.py imports no torch."""
    done = subprocess.run([sys.executable, "-c", "import sys, post_eval; print(sorted(m for m in sys.modules "
                           "if m.split('.')[0] in ('torch', 'nets', 'other', 'promote', 'train')))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
