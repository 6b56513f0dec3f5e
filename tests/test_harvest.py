"""Staff corrections become training data: harvest.py writes the photos the store kept, with
their staff labels, to a folder (refusing a store it cannot read); make harvest records it in
data/feedback.dvc, which dvc push and pull carry to a fresh clone; and the loop end to end: a
real service keeps the photos staff correct -> make harvest -> preprocess.py takes them into the
training split, never val, test or the evaluation set -> training records how many it used."""
import csv
import os
import shutil
import sqlite3
import stat
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

import catdog
import evaluate
import harness
import harvest
import kept
import preprocess
import store as stores
from conftest import near_copy, photo_bytes, sha


def pet_photo(seed, label, size=(120, 100)):
    """A photo a quick training and the tiny model tell apart: a smooth random picture (distinct
    for every seed: no accidental near-copies) tinted red for a cat, blue for a dog."""
    arr = np.asarray(harness.picture(np.random.default_rng(seed), *size, noise=0), float) * 0.5
    arr[..., 0 if label == "cat" else 2] += 110
    return harness.encode(Image.fromarray(arr.clip(0, 255).astype(np.uint8)), "JPEG", quality=90)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- harvest.py
def keep(db, folder, prediction_id, data, predicted, label=None):
    """A prediction whose photo the service kept, and its staff feedback when `label` is given."""
    store = stores.SQLiteStore(db)
    kept.save(folder, sha(data), data)
    store.record_prediction(prediction_id, prediction_id, "v1", predicted, 0.9,
                            {"width": 1, "height": 1, "brightness": 0.5}, photo=sha(data))
    if label:
        store.record_feedback(prediction_id, label)
    store.close()


def test_harvest_refuses_a_store_it_cannot_read(tmp_path):
    missing = str(tmp_path / "mistyped.db")
    with pytest.raises(SystemExit, match=f"no store at DB_PATH={missing}: the file does not exist"):
        harvest.main(["--out", str(tmp_path / "out")], {"DB_PATH": missing})
    assert not os.path.exists(missing)  # not created by looking
    (tmp_path / "garbage.db").write_bytes(b"not a database " * 100)
    with pytest.raises(SystemExit, match="cannot read the store at DB_PATH=.*garbage.db"):
        harvest.main(["--out", str(tmp_path / "out")], {"DB_PATH": str(tmp_path / "garbage.db")})
    unrelated = tmp_path / "mlflow.db"  # a database, but not the store: refused, and left as it was
    with sqlite3.connect(unrelated) as conn:
        conn.execute("CREATE TABLE runs (id TEXT)")
    before = unrelated.read_bytes()
    with pytest.raises(SystemExit, match="mlflow.db: not a catdog store .*version 0.*: it has no catdog tables"):
        harvest.main(["--out", str(tmp_path / "out")], {"DB_PATH": str(unrelated)})
    assert unrelated.read_bytes() == before
    # The service's own store, stopped: read without leaving a -wal or -shm file of this user,
    # which the service's user could not open at its next start.
    served = tmp_path / "served" / "catdog.db"
    keep(str(served), str(tmp_path / "served" / "photos"), "p0", photo_bytes(0), "dog", "cat")
    files = sorted(os.listdir(served.parent))
    before = served.read_bytes()
    assert [row["prediction_id"] for row in harvest.open_kept({"DB_PATH": str(served), "PHOTOS_DIR": str(
        tmp_path / "served" / "photos")})[0]] == ["p0"]
    assert sorted(os.listdir(served.parent)) == files and served.read_bytes() == before
    with pytest.raises(SystemExit, match="needs PHOTOS_DIR"):
        harvest.main([], {"DATABASE_URL": "postgresql://catdog@127.0.0.1:1/catdog"})
    db = str(tmp_path / "var" / "catdog.db")
    keep(db, str(tmp_path / "var" / "photos"), "p1", photo_bytes(1), "dog", "cat")
    elsewhere = str(tmp_path / "no-photos-here")
    with pytest.raises(SystemExit, match=f"1 kept photos but their folder {elsewhere} does not exist"):
        harvest.main(["--out", str(tmp_path / "out")], {"DB_PATH": db, "PHOTOS_DIR": elsewhere})
    assert not (tmp_path / "out").exists()


def test_harvest_writes_exactly_the_kept_photos_with_their_labels(tmp_path, capsys, monkeypatch):
    db, folder, out = str(tmp_path / "catdog.db"), str(tmp_path / "photos"), tmp_path / "feedback"
    png, jpeg, other = photo_bytes(1, fmt="PNG"), photo_bytes(2), photo_bytes(3)
    keep(db, folder, "p1", png, predicted="dog", label="cat")       # corrected
    keep(db, folder, "p2", jpeg, predicted="dog", label="dog")      # confirmed (a kept share of them)
    keep(db, folder, "p3", other, predicted="cat", label="other")   # corrected to neither
    keep(db, folder, "p4", photo_bytes(4), predicted="cat")         # no feedback yet: not harvested
    keep(db, folder, "p5", photo_bytes(5), predicted="cat", label="dog")
    os.remove(kept.path_of(folder, sha(photo_bytes(5))))        # its file lost
    keep(db, folder, "p6", photo_bytes(6), predicted="cat", label="dog")
    with open(kept.path_of(folder, sha(photo_bytes(6))), "wb") as f:
        f.write(b"other bytes than its name says")
    keep(db, folder, "p7", photo_bytes(7), predicted="cat", label="dog")
    locked = kept.path_of(folder, sha(photo_bytes(7)))  # the service's file (0600), another user's

    def open_as_another_user(path, *args, **kwargs):
        if path == locked:
            raise PermissionError(13, "Permission denied", path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(harvest, "open", open_as_another_user, raising=False)
    (out / "cat").mkdir(parents=True)
    (out / "cat" / "stale.jpg").write_bytes(jpeg)                    # from an earlier harvest
    (out / "notes.txt").write_text("the operator's")

    rows = harvest.main(["--out", str(out)], {"DB_PATH": db})
    files = {os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out) for n in names}
    assert files == {f"cat/{sha(png)}.png", f"dog/{sha(jpeg)}.jpg", f"other/{sha(other)}.jpg", "manifest.csv",
                     "notes.txt"}
    assert (out / "cat" / f"{sha(png)}.png").read_bytes() == png
    manifest = read_csv(out / "manifest.csv")
    assert list(manifest[0]) == list(harvest.COLUMNS)
    assert [(r["prediction_id"], r["model_version"], r["label"], r["predicted"], r["file"], r["skip_reason"])
            for r in manifest] == [("p1", "v1", "cat", "dog", f"cat/{sha(png)}.png", ""),
                                   ("p2", "v1", "dog", "dog", f"dog/{sha(jpeg)}.jpg", ""),
                                   ("p3", "v1", "other", "cat", f"other/{sha(other)}.jpg", ""),
                                   ("p5", "v1", "dog", "cat", "", "missing"),
                                   ("p6", "v1", "dog", "cat", "", "sha256_mismatch"),
                                   ("p7", "v1", "dog", "cat", "", "unreadable")]
    assert manifest[0]["sha256"] == sha(png) and len(rows) == 6
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700  # no other user reads the harvest
    assert manifest[0]["date"].endswith("Z") and manifest[0]["date"][:4].isdigit()
    printed = capsys.readouterr().out
    assert f"harvest: 3 photos -> {out}: cat 1, dog 1, other 1; 2 disagree with the model's answer" in printed
    assert "left out p5 (dog): missing" in printed and "left out p6 (dog): sha256_mismatch" in printed
    assert "left out p7 (dog): unreadable" in printed and "harvest as that user, or from a restored backup" in printed

    # A photo removed on request (the service's DELETE /predictions/{id}/photo) is gone next time.
    store = stores.SQLiteStore(db)
    assert store.drop_photo("p1", folder)
    store.close()
    harvest.main(["--out", str(out)], {"DB_PATH": db})
    assert not (out / "cat" / f"{sha(png)}.png").exists()
    assert [r["prediction_id"] for r in read_csv(out / "manifest.csv")] == ["p2", "p3", "p5", "p6", "p7"]


# ---------------------------------------------------------------- versioning: make harvest, data/feedback.dvc
def sh(cwd, *command, check=True):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, env={
        **os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"})
    assert done.returncode == 0 or not check, f"{command}: {done.stdout}{done.stderr}"
    return done


VENV = os.path.dirname(os.path.dirname(sys.executable))
DVC = os.path.join(VENV, "bin", "dvc")


def make(cwd, target, check=True, **environ):
    """A target of the project's Makefile, its set-up taken as done (this venv)."""
    return sh(cwd, "env", *(f"{k}={v}" for k, v in environ.items()), "make", "--no-print-directory", "-o", "setup",
              target, f"VENV={VENV}", check=check)


@pytest.mark.skipif(not os.path.exists(DVC), reason="dvc is not installed in this environment")
def test_a_harvest_is_versioned_by_dvc_and_a_fresh_clone_gets_it_back(tmp_path):
    """The project's Makefile, .gitignore and committed data/feedback.dvc, with a data stage that
    lists what it trains on: a fresh clone reproduces the committed lock; make harvest records a
    harvest that git commit + dvc push carry, and a clone's make data asks for dvc pull until it
    has it; a harvest folder that is not what data/feedback.dvc records is refused."""
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    for name in ("Makefile", ".gitignore", "harvest.py", "store.py", "kept.py", "catdog.py", "data/feedback.dvc"):
        os.makedirs(os.path.dirname(repo / name), exist_ok=True)
        shutil.copy(os.path.join(catdog.ROOT, name), repo / name)
    (repo / "dvc.yaml").write_text("stages:\n  data:\n    cmd: find data/feedback -name '*.jpg' | sort > data/trained\n"
                                   "    deps: [data/feedback]\n    outs: [data/trained]\n")
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    sh(repo, DVC, "remote", "add", "-d", "local", str(remote))
    make(repo, "data")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "an empty harvest")
    assert sh(repo, "git", "ls-files", "data").stdout == "data/feedback.dvc\n"  # the record, never a photo

    empty = tmp_path / "empty"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(empty))
    for _ in range(2):
        make(empty, "data")
    assert (empty / "data" / "trained").read_text() == ""
    assert sh(empty, "git", "status", "--porcelain").stdout == ""  # the committed lock, reproduced
    assert "up to date" in sh(empty, DVC, "status").stdout

    db, photos = tmp_path / "var" / "catdog.db", tmp_path / "var" / "photos"
    keep(str(db), str(photos), "p1", photo_bytes(1), predicted="dog", label="cat")
    printed = make(repo, "harvest", DB_PATH=db, PHOTOS_DIR=photos).stdout
    assert "git add data/feedback.dvc dvc.lock && git commit" in printed and "dvc push" in printed
    assert stat.S_IMODE(os.stat(repo / "data" / "feedback").st_mode) == 0o700
    make(repo, "data")
    assert (repo / "data" / "trained").read_text() == f"data/feedback/cat/{sha(photo_bytes(1))}.jpg\n"
    sh(repo, "git", "add", "data/feedback.dvc", "dvc.lock")
    sh(repo, "git", "commit", "-q", "-m", "a harvest of one photo")
    sh(repo, DVC, "push", "-q")  # no target: DVC finds data/feedback.dvc in git-ignored data/

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    refused = make(clone, "data", check=False)
    assert refused.returncode != 0 and "dvc pull data/feedback.dvc, then make data again" in refused.stderr
    sh(clone, DVC, "pull", "-q", "data/feedback.dvc")
    make(clone, "data")
    assert (clone / "data" / "trained").read_text() == (repo / "data" / "trained").read_text()
    assert sh(clone, "git", "status", "--porcelain").stdout == ""

    (clone / "data" / "feedback" / "dog").mkdir(exist_ok=True)
    (clone / "data" / "feedback" / "dog" / "unrecorded.jpg").write_bytes(photo_bytes(2))
    refused = make(clone, "data", check=False)
    assert refused.returncode != 0 and "data/feedback is not the harvest data/feedback.dvc records" in refused.stderr


# ---------------------------------------------------------------- the loop
def write_photos(folder, files):
    for name, data in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return str(folder)


def photo_rows(data_dir, split=None):
    return catdog.read_manifest(os.path.join(data_dir, "manifest.csv"), split=split, keep_dropped=split is None)


def run_preprocess(source, data_dir, extra, not_pets):
    os.makedirs(os.path.join(data_dir, "feedback"), exist_ok=True)  # as make data leaves it: an empty harvest
    return preprocess.main(preprocess.parse_args(["--source", source, "--out", os.path.join(data_dir, "processed"),
                                                  "--workers", "1", "--eval-extra", extra, "--not-pets", not_pets]))


def evaluation_of(data_dir, extra):
    test = [(r["path"], catdog.CLASSES.index(r["label"])) for r in photo_rows(data_dir, "test")]
    return evaluate.evaluation_set(test, extra, os.path.join(data_dir, "processed"))


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A real service (a tiny model that answers the wrong class, KEEP_PHOTOS=corrected) gets
    three photos and staff correct all three; make harvest; preprocess with and without the
    harvest beside the same sample."""
    from service_helpers import Server, tiny_model

    tmp = tmp_path_factory.mktemp("loop")
    source = write_photos(tmp / "sample", {f"{label}.{i}.jpg": pet_photo(100 * k + i, label)
                                           for k, label in enumerate(catdog.CLASSES) for i in range(20)})
    extra = write_photos(tmp / "extra", {f"{label}.{i}.jpg": pet_photo(1000 + 100 * k + i, label)
                                         for k, label in enumerate(catdog.CLASSES) for i in range(6)})
    not_pets = write_photos(tmp / "notpets", {f"{kind}/{i}.jpg": harness.encode(
        Image.new("RGB", (60, 50), (40 + 10 * i, 200, 60 + 20 * k)), "JPEG") for k, kind in enumerate(("grass", "leaf"))
        for i in range(10)})
    sent = {"cat": pet_photo(7000, "cat"), "dog": pet_photo(7001, "dog"),
            "cat copy of an evaluation photo": near_copy((tmp / "extra" / "cat.2.jpg").read_bytes())}
    db = str(tmp / "var" / "catdog.db")
    server = Server(tiny_model("tiny-wrong", dog_if_blue=False), db, KEEP_PHOTOS="corrected")
    try:
        answers = {}
        for what, data in sent.items():
            answer = requests.post(server.url + "/predict", files={"file": ("photo.jpg", data)}, timeout=10).json()
            label = what.split()[0]
            assert answer["label"] != label, answer  # the tiny model answers the other class
            feedback = requests.post(server.url + "/feedback", json={"prediction_id": answer["prediction_id"],
                                                                    "label": label}, timeout=10)
            assert feedback.status_code == 200, feedback.text
            answers[what] = answer
    finally:
        server.stop()
    harvested = harvest.main(["--out", str(tmp / "data" / "feedback")], {"DB_PATH": db})
    report = run_preprocess(source, str(tmp / "data"), extra, not_pets)
    run_preprocess(source, str(tmp / "plain"), extra, not_pets)
    return {"tmp": tmp, "sent": sent, "answers": answers, "harvested": harvested, "report": report, "extra": extra}


def test_corrected_photos_reach_the_training_split_and_nothing_else(loop):
    tmp, sent = loop["tmp"], loop["sent"]
    assert {r["prediction_id"]: (r["label"], r["file"]) for r in loop["harvested"]} == {
        loop["answers"][what]["prediction_id"]: (what.split()[0], f"{what.split()[0]}/{sha(data)}.jpg")
        for what, data in sent.items()}
    rows = {r["source"]: r for r in photo_rows(str(tmp / "data")) if os.sep + "feedback" + os.sep in r["source"]}
    by_photo = {what: rows[str(tmp / "data" / "feedback" / what.split()[0] / f"{sha(data)}.jpg")]
                for what, data in sent.items()}
    for what in ("cat", "dog"):
        row = by_photo[what]
        assert (row["split"], row["label"], row["drop_reason"]) == ("train", what, "")
        assert os.path.relpath(row["path"], tmp / "data" / "processed").split(os.sep)[:2] == ["train", what]
    copy = by_photo["cat copy of an evaluation photo"]
    assert (copy["split"], copy["drop_reason"]) == ("", "evaluation_duplicate")
    assert copy["duplicate_of"].endswith(os.path.join("extra", "cat.2.jpg"))
    assert loop["report"]["feedback"]["trained"] == 2
    # No val or test file and no evaluation photo is a harvested photo; the sample's own splits
    # and the evaluation set are what they are without the harvest.
    harvested = {sha(data) for data in sent.values()}
    for split in ("val", "test"):
        assert not harvested & {r["sha256"] for r in photo_rows(str(tmp / "data"), split)}
        assert sorted(os.listdir(tmp / "data" / "processed" / split / "cat")) == \
            sorted(os.listdir(tmp / "plain" / "processed" / split / "cat"))
    evaluation, plain = evaluation_of(str(tmp / "data"), loop["extra"]), evaluation_of(str(tmp / "plain"), loop["extra"])
    assert not harvested & set(evaluation.hashes)
    assert (evaluation.identity(), len(evaluation.items)) == (plain.identity(), len(plain.items)) and \
        len(evaluation.items) == 2 * 2 + 12


def test_training_records_how_many_feedback_photos_it_used(loop, capsys):
    pytest.importorskip("torch")
    mlflow = pytest.importorskip("mlflow")
    import train

    tmp = loop["tmp"]
    tracking = f"sqlite:///{tmp}/mlflow.db"
    # The same evaluation photos in another folder than preprocess.py checked the harvest against.
    elsewhere = shutil.copytree(loop["extra"], tmp / "extra-elsewhere")
    train.main(["--data", str(tmp / "data" / "processed"), "--out", str(tmp / "models"), "--tracking-uri", tracking,
                "--arch", "baseline", "--epochs", "1", "--batch-size", "8", "--eval-extra", str(elsewhere),
                "--not-pets", str(tmp / "notpets"), "--synthetic", "0", "--calibration-images", "16"])
    warning = f"WARNING: the 2 feedback photos in the training split were checked for copies of the extra " \
              f"evaluation photos of {loop['extra']}, not of {elsewhere}"
    assert warning in capsys.readouterr().out
    client = mlflow.MlflowClient(tracking)
    run = client.search_runs([client.get_experiment_by_name("catdog").experiment_id])[0]
    assert run.data.tags["feedback_photos"] == "2"
    assert run.data.tags["feedback_unchecked"] == warning.removeprefix("WARNING: ") + \
        f", which this run is measured on: check them with preprocess.py --eval-extra {elsewhere}"
    assert run.data.params["train_images"] == str(32 + 2)  # 16 per class from the sample, plus the two
    meta = catdog.read_json(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model/model.json",
                                                                tracking_uri=tracking))
    assert meta["data"]["feedback_photos"] == "2"
    card = open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="reports/model_card.md",
                                                    tracking_uri=tracking)).read()
    assert "Staff-corrected photos harvested from the service (make harvest) in the training split: 2." in card


def test_training_warns_only_when_it_evaluates_on_photos_the_harvest_was_not_checked_against(loop, tmp_path):
    import promote

    data, plain = str(loop["tmp"] / "data" / "processed"), str(loop["tmp"] / "plain" / "processed")
    same_folder = os.path.join(loop["tmp"], "data", "..", "extra")
    assert promote.unchecked_feedback(data, same_folder) is None
    assert promote.unchecked_feedback(data, "") is None  # measured on the test split only
    assert promote.unchecked_feedback(plain, str(tmp_path)) is None  # no feedback photo trained on
    assert f"of {loop['extra']}, not of {tmp_path}" in promote.unchecked_feedback(data, str(tmp_path))


def test_without_a_quality_report_the_feedback_count_is_unknown(tmp_path):
    import promote

    write_photos(tmp_path / "processed" / "test" / "cat", {"cat.1.jpg": pet_photo(1, "cat")})
    items = [(str(tmp_path / "processed" / "test" / "cat" / "cat.1.jpg"), 0)]
    evaluation = evaluate.evaluation_set(items, "", str(tmp_path / "processed"))
    assert promote.lineage_of(str(tmp_path / "processed"), items, evaluation)["feedback_photos"] == "None"
    (tmp_path / "manifest.csv").write_text("path,sha256\n")
    catdog.write_json(tmp_path / "quality_report.json", {"kept": 1})  # a dataset made without feedback
    assert promote.lineage_of(str(tmp_path / "processed"), items, evaluation)["feedback_photos"] == "0"


def test_the_store_file_is_the_one_the_service_wrote(loop):
    """The harvest read the service's own SQLite file (DB_PATH), and the photos beside it."""
    db = loop["tmp"] / "var" / "catdog.db"
    with sqlite3.connect(db) as conn:
        named = {row[0] for row in conn.execute("SELECT photo FROM predictions WHERE photo IS NOT NULL")}
    assert named == {sha(data) for data in loop["sent"].values()}
    for photo in named:
        assert os.path.isfile(kept.path_of(str(db.parent / "photos"), photo))
