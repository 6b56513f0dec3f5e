"""make predict (predict.py): a folder scored offline with the tiny model answers as the service
answers the same files, lists every unusable file with its reason without stopping, writes CSV or
JSON lines, and reads the accuracy off the file names."""
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import harness
import predict
from service_helpers import ROOT, in_process, tiny_model, upload

MAX_UPLOAD_MB = 0.5  # the service's limit, from the environment, for both paths
UNREADABLE = {"broken.jpg": "corrupt", "empty.jpg": "empty", "notes.txt": "not_an_image",
              "small.png": "too_small", "huge.png": "too_large"}


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Labelled photos by name and by folder (cat.7.jpg is bluish: the tiny model says dog), an
    unlabelled album, a green "other" PNG, and files the service refuses, each for its reason."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    for i in range(5):
        write(root / f"cat.{i}.jpg", harness.synthetic_photo(rng, "cat"))
        write(root / f"dog.{i}.jpg", harness.synthetic_photo(rng, "dog", fmt="PNG" if i == 0 else "JPEG"))
    write(root / "cat.7.jpg", harness.synthetic_photo(rng, "dog"))
    write(root / "dog" / "rex.jpg", harness.synthetic_photo(rng, "dog"))
    write(root / "album" / "IMG_0001.jpg", harness.synthetic_photo(rng, "cat"))
    write(root / "other.1.png", harness.encode(Image.new("RGB", (120, 90), (20, 250, 20)), "PNG"))
    jpeg = harness.synthetic_photo(rng, "cat", size=(400, 300))
    write(root / "broken.jpg", jpeg[:len(jpeg) // 3])
    write(root / "empty.jpg", b"")
    write(root / "notes.txt", b"not a photo\n")
    write(root / "small.png", harness.encode(Image.new("RGB", (12, 12)), "PNG"))
    write(root / "huge.png", harness.encode(harness.picture(rng, 600, 600), "PNG"))
    return str(root)


def run(*argv):
    """predict.main in this process, the tiny model and MAX_UPLOAD_MB from the environment: its stdout."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(out):
        env.setenv("MODEL_PATH", tiny_model())
        env.setenv("MAX_UPLOAD_MB", str(MAX_UPLOAD_MB))
        predict.main([*argv, "--workers", "2"])
    return out.getvalue()


@pytest.fixture(scope="module")
def jsonl(folder, tmp_path_factory):
    """(rows of a JSON lines run, its stdout)."""
    path = str(tmp_path_factory.mktemp("out") / "predictions.jsonl")
    printed = run(folder, "--out", path)
    with open(path) as f:
        return [json.loads(line) for line in f], printed


def test_answers_equal_the_services_answers_for_the_same_files(folder, jsonl, tmp_path):
    rows, _ = jsonl
    assert [row["file"] for row in rows] == sorted(os.path.relpath(p, folder) for p in predict.files_under(folder))
    client, service = in_process(tiny_model(), str(tmp_path / "catdog.db"), max_upload_mb=MAX_UPLOAD_MB)
    try:
        for row in rows:
            with open(os.path.join(folder, row["file"]), "rb") as f:
                answer = client.post("/predict", **upload(f.read())).json
            if "error" in answer:  # the reason; the message may differ (a body over the limit is refused unread)
                assert row["error"] == answer["error"] and "label" not in row, row["file"]
            else:
                fields = ("label", "confidence", "pet_probability", "probabilities", "model_version")
                assert {k: row[k] for k in fields} == {k: answer[k] for k in fields}, row["file"]
    finally:
        service.close()
    assert {row["file"]: row["label"] for row in rows if "label" in row} == {
        **{f"cat.{i}.jpg": "cat" for i in range(5)}, **{f"dog.{i}.jpg": "dog" for i in range(5)},
        "cat.7.jpg": "dog", "dog/rex.jpg": "dog", "album/IMG_0001.jpg": "cat", "other.1.png": "other"}


def test_unreadable_files_are_rows_with_their_reasons_and_summarised(jsonl):
    rows, printed = jsonl
    assert {row["file"]: row["error"] for row in rows if "error" in row} == UNREADABLE
    assert all(row["message"] for row in rows if "error" in row)
    assert f"unreadable: {len(UNREADABLE)} files" in printed
    for name, reason in UNREADABLE.items():
        assert re.search(rf"^  {re.escape(name)}: {reason}: \S", printed, re.M), printed
    assert re.search(r"^predict: 19 files of .* [\d.]+ photos/s offline \(2 workers", printed, re.M), printed


def test_accuracy_from_the_names_and_folders(jsonl):
    rows, printed = jsonl
    truth = {row["file"]: row["truth"] for row in rows if row["truth"]}
    # cat.N, dog.N, dog/rex and other.1 are labelled: the album and the refused files are not
    assert len(truth) == 13 and truth["dog/rex.jpg"] == "dog" and truth["other.1.png"] == "other"
    assert "album/IMG_0001.jpg" not in truth
    # 13 labelled, all readable; cat.7.jpg (bluish) is the one answered wrong
    assert "12 of 13 photos labelled by their names right" in printed, printed
    assert "accuracy 92.31% (95 % Wilson interval 66.69% to 98.63%)" in printed, printed


def test_csv_parses_with_probabilities_as_columns(folder, jsonl, tmp_path):
    rows, _ = jsonl
    path = str(tmp_path / "predictions.txt")
    run(folder, "--out", path, "--out-format", "csv")
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == predict.CSV_FIELDS
    assert [r["file"] for r in table] == [r["file"] for r in rows]
    for line, row in zip(table, rows):
        if "error" in row:
            assert (line["error"], line["label"], line["probability_cat"]) == (row["error"], "", "")
        else:
            assert (line["label"], float(line["probability_dog"]), float(line["confidence"])) == (
                row["label"], row["probabilities"]["dog"], row["confidence"])
            assert line["error"] == "" and line["model_version"] == "tiny-1"


def test_an_unknown_output_extension_is_refused_before_scoring(folder, tmp_path):
    with pytest.raises(SystemExit, match=r"predictions\.txt.*--out-format"):
        run(folder, "--out", str(tmp_path / "predictions.txt"))
    assert not os.path.exists(tmp_path / "predictions.txt")


def test_a_missing_or_empty_folder_fails_naming_it(tmp_path):
    missing, empty = str(tmp_path / "nowhere"), str(tmp_path / "empty")
    os.makedirs(empty)
    out = subprocess.run([sys.executable, "predict.py", missing, "--out", str(tmp_path / "p.csv")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1 and f"{missing} is not a folder" in out.stderr, out.stderr
    with pytest.raises(SystemExit, match=f"{re.escape(empty)} holds no files"):
        run(empty, "--out", str(tmp_path / "p.csv"))


def test_compare_posts_the_same_files_to_a_real_service(folder, tmp_path, monkeypatch):
    # A shell set up for production: the service --compare starts must store nothing there.
    monkeypatch.setenv("DATABASE_URL", "postgresql://catdog@127.0.0.1:1/production")
    monkeypatch.setenv("KEEP_PHOTOS", "all")
    monkeypatch.setenv("PHOTOS_DIR", str(tmp_path / "production-photos"))
    printed = run(folder, "--out", str(tmp_path / "p.csv"), "--compare")
    assert not os.path.exists(tmp_path / "production-photos")
    assert re.search(r"^the same 19 files one by one to a local POST /predict .*: [\d.]+ photos/s; "
                     r"offline [\d.]+ photos/s, [\d.]+x$", printed, re.M), printed
    assert "answers differing from /predict's: 0" in printed, printed
