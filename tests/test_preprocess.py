"""preprocess.py on dirty synthetic datasets (both layouts, folder, zip and URL) and on
the shared 3k Kaggle sample when it is present."""
import collections
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import catdog
import preprocess
from conftest import (
    ROOT,
    SHARED_SAMPLE,
    near_copy,
    photo_bytes,
    read_tree,
    sha,
    synthetic_photo,
)

GOOD_PER_CLASS = 20  # 80/10/10 -> 16/2/2 per class
DROPPED = {"empty": 1, "corrupt": 1, "not_an_image": 1, "thumbs_db": 1, "too_small": 1,
           "duplicate": 1, "near_duplicate": 1, "no_label": 1}


def dirty_files():
    """{kaggle-style name: bytes}: 40 usable photos in awkward encodings plus one file for
    every reason to drop."""
    files = {}
    for i in range(GOOD_PER_CLASS):
        for label, offset in (("cat", 0), ("dog", 1000)):
            files[f"{label}.{i}.jpg"] = photo_bytes(offset + i, size=(96 + i, 80))
    files["cat.1.jpg"] = photo_bytes(1, mode="L")                     # grayscale
    files["cat.2.jpg"] = photo_bytes(2, mode="CMYK")                  # CMYK JPEG
    files["cat.3.jpg"] = photo_bytes(3, fmt="PNG")                    # PNG named .jpg
    files["dog.1.jpg"] = photo_bytes(1001, mode="RGBA", fmt="PNG")    # transparency
    files["dog.2.jpg"] = photo_bytes(1002, mode="P", fmt="GIF")       # palette GIF
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was held sideways; upright is 80 wide, 120 high
    files["cat.4.jpg"] = photo_bytes(4, size=(120, 80), exif=exif.tobytes())
    whole = photo_bytes(5000, size=(300, 200))
    files["cat.100.jpg"] = b""                                        # 0 bytes
    files["cat.101.jpg"] = whole[: len(whole) // 2]                   # truncated download
    files["dog.100.jpg"] = b"<html>Access denied</html>"              # not an image
    files["dog.101.jpg"] = photo_bytes(1101, size=(20, 40))           # too small
    files["cat.102.jpg"] = files["cat.0.jpg"]                         # exact copy
    copy = io.BytesIO()                                               # resized, re-encoded copy
    synthetic_photo(1000, size=(96, 80)).resize((86, 72)).save(copy, "JPEG", quality=60)
    files["dog.102.jpg"] = copy.getvalue()
    files["Thumbs.db"] = b"\xd0\xcf\x11\xe0 thumbnail cache"
    files["README.txt"] = b"photos of pets"
    return files


def petimages_name(name):
    """cat.12.jpg -> PetImages/Cat/12.jpg (Microsoft's layout); other files stay at the top."""
    label, _, rest = name.partition(".")
    return f"PetImages/{label.title()}/{rest}" if label in catdog.CLASSES else f"PetImages/{name}"


def write_folder(folder, files, rename=lambda n: n):
    for name, data in files.items():
        path = os.path.join(folder, rename(name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return str(folder)


def write_zip(path, files, rename=lambda n: n):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(rename(name), data)
    return str(path)


def run(source, out, workers=1, *extra):
    """preprocess.py beside an empty harvest folder (data/feedback), as `make data` runs it."""
    os.makedirs(os.path.join(os.path.dirname(out), "feedback"), exist_ok=True)
    args = preprocess.parse_args(["--source", str(source), "--out", str(out), "--workers", str(workers), *extra])
    return preprocess.main(args)


def read_manifest(out):
    return catdog.read_manifest(os.path.join(os.path.dirname(out), "manifest.csv"), keep_dropped=True)


def split_of_each_photo(out):
    """{output file name: split} from the manifest."""
    return {os.path.basename(r["path"]): r["split"] for r in read_manifest(out) if r["path"]}


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("kaggle")
    source = write_folder(base / "raw", dirty_files())
    out = str(base / "data" / "processed")
    return source, out, run(source, out)


def test_every_drop_reason_is_counted(kaggle_run):
    _, _, report = kaggle_run
    assert report["dropped"] == DROPPED
    assert report["inputs"] == 2 * GOOD_PER_CLASS + sum(DROPPED.values())
    assert report["kept"] == 2 * GOOD_PER_CLASS


def test_stratified_80_10_10_split(kaggle_run):
    _, out, report = kaggle_run
    expected = {"train": 16, "val": 2, "test": 2}
    assert report["splits"] == {s: {"cat": n, "dog": n} for s, n in expected.items()}
    for split, n in expected.items():
        for label in catdog.CLASSES:
            assert len(os.listdir(os.path.join(out, split, label))) == n


def test_outputs_are_224_rgb_jpegs(kaggle_run):
    _, out, _ = kaggle_run
    files = read_tree(out)
    assert len(files) == 2 * GOOD_PER_CLASS
    for path, data in files.items():
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (224, 224)), path
        assert path.split(os.sep)[1] == os.path.basename(path).split(".")[0]  # cat/cat.N.jpg


def test_manifest_has_one_row_per_input_file(kaggle_run):
    source, out, _ = kaggle_run
    rows = read_manifest(out)
    assert sorted(os.path.basename(r["source"]) for r in rows) == sorted(os.listdir(source))
    by_name = {os.path.basename(r["source"]): r for r in rows}
    for name, reason in [("cat.100.jpg", "empty"), ("cat.101.jpg", "corrupt"), ("dog.100.jpg", "not_an_image"),
                         ("dog.101.jpg", "too_small"), ("Thumbs.db", "thumbs_db"), ("README.txt", "no_label")]:
        assert (by_name[name]["drop_reason"], by_name[name]["split"], by_name[name]["path"]) == (reason, "", ""), name
    assert (by_name["cat.102.jpg"]["drop_reason"], by_name["cat.102.jpg"]["duplicate_of"]) == ("duplicate", "cat.0.jpg")
    assert (by_name["dog.102.jpg"]["drop_reason"], by_name["dog.102.jpg"]["duplicate_of"]) == ("near_duplicate", "dog.0.jpg")
    for row in rows:
        if not row["drop_reason"]:
            assert os.path.isfile(row["path"]) and row["photo"] == row["source"]
            assert row["sha256"] == catdog.sha256_file(row["source"])
            assert os.path.relpath(row["path"], out).split(os.sep)[:2] == [row["split"], row["label"]]


def test_awkward_encodings_become_upright_rgb(kaggle_run):
    _, out, _ = kaggle_run
    by_name = {os.path.basename(r["source"]): r for r in read_manifest(out)}
    assert by_name["cat.3.jpg"]["format"] == "PNG" and not by_name["cat.3.jpg"]["drop_reason"]
    for name in ("cat.1.jpg", "cat.2.jpg", "dog.1.jpg", "dog.2.jpg"):
        assert not by_name[name]["drop_reason"], name
    # EXIF orientation 6 was applied: the stored 120x80 picture is 80 wide and 120 high.
    assert (by_name["cat.4.jpg"]["width"], by_name["cat.4.jpg"]["height"]) == ("80", "120")
    # Transparency became white, not black: the RGBA photo's mean colour stays close.
    rgba = Image.open(os.path.join(os.path.dirname(out), by_name["dog.1.jpg"]["path"]))
    original = catdog.fit_for_storage(synthetic_photo(1001))
    assert np.abs(np.asarray(rgba, float) - np.asarray(original, float)).mean() < 8


def test_no_photo_or_near_copy_in_two_splits(kaggle_run):
    _, out, _ = kaggle_run
    rows = [r for r in read_manifest(out) if not r["drop_reason"]]
    assert len({r["sha256"] for r in rows}) == len(rows)
    # Checked without the hashes preprocess.py uses: any two stored images in different
    # splits differ clearly, pixel by pixel, on a 16x16 grey thumbnail.
    thumbs = [np.asarray(Image.open(os.path.join(os.path.dirname(out), r["path"])).convert("L").resize((16, 16)), float)
              for r in rows]
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            if rows[i]["split"] != rows[j]["split"]:
                assert np.abs(thumbs[i] - thumbs[j]).mean() > 10, (rows[i]["source"], rows[j]["source"])


def test_quality_report_json_and_markdown(kaggle_run):
    _, out, report = kaggle_run
    data_dir = os.path.dirname(out)
    with open(os.path.join(data_dir, "quality_report.json")) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    with open(os.path.join(data_dir, "quality_report.md")) as f:
        markdown = f.read()
    assert "| near_duplicate | 1 |" in markdown and "| train | 16 | 16 | 32 |" in markdown
    assert "seconds" not in report and "workers" not in report  # timings go to the log, not into data/


def test_rerun_is_deterministic_and_replaces_old_output(kaggle_run, tmp_path):
    source, out, _ = kaggle_run
    data_dir = os.path.dirname(out)
    before, everything = read_tree(out), read_tree(data_dir)
    stale = os.path.join(out, "train", "cat", "cat.999.jpg")
    with open(stale, "wb") as f:
        f.write(b"left over from an older run")
    run(source, out, 2)  # the parallel path must give the same bytes
    assert read_tree(out) == before
    # Manifest and quality report too: the DVC hash of data/ (and so a clone's git status) holds.
    assert read_tree(data_dir) == everything
    other = str(tmp_path / "again" / "processed")
    run(source, other)
    assert read_tree(other) == before


def test_petimages_folder_and_zip_give_the_same_dataset(kaggle_run, tmp_path):
    _, kaggle_out, kaggle_report = kaggle_run
    files = dirty_files()
    folder = write_folder(tmp_path / "ms", files, petimages_name)
    archive = write_zip(tmp_path / "kagglecatsanddogs.zip", files, petimages_name)
    for source, where in ((folder, "from_folder"), (archive, "from_zip")):
        out = str(tmp_path / where / "processed")
        report = run(source, out, 2)
        assert (report["dropped"], report["splits"]) == (kaggle_report["dropped"], kaggle_report["splits"])
        # Same photos, same names (PetImages/Cat/7.jpg -> cat.7.jpg), same splits.
        assert split_of_each_photo(out) == split_of_each_photo(kaggle_out)
        assert read_tree(out) == read_tree(kaggle_out)
    sources = {r["source"] for r in read_manifest(str(tmp_path / "from_zip" / "processed"))}
    assert f"{archive}!PetImages/Cat/7.jpg" in sources


# sha256 over (path, file sha256) of the processed images and the manifest the dirty dataset
# gave before feedback existed: without feedback photos not one byte may change.
DIRTY_DIGEST = "105c915a887b8276e0b7d5df5a627b60b4965f721ccc0aa95359a266972c2b75"
# The same of the shared 3k sample's processed images (data/processed), as dvc.lock recorded them.
SAMPLE_DIGEST = "27ec2dc222870467a072298a77d6ea5e6bbc9a55d2da70b8117dc14ccad623d9"


def tree_digest(files):
    """sha256 over (relative path, sha256) of {relative path: bytes}, in path order."""
    digest = hashlib.sha256()
    for path, data in sorted(files.items()):
        digest.update(f"{path}\t{sha(data)}\n".encode())
    return digest.hexdigest()


def test_without_feedback_photos_not_one_byte_changes(kaggle_run):
    """An empty feedback folder, or an empty harvest (label folders, a manifest with no rows):
    the data is what preprocess.py made before feedback."""
    source, out, _ = kaggle_run
    data_dir = os.path.dirname(out)
    everything = read_tree(data_dir)
    assert tree_digest({**read_tree(out), "manifest.csv": everything["manifest.csv"]}) == DIRTY_DIGEST
    feedback = os.path.join(data_dir, "feedback")
    for label in (*catdog.CLASSES, catdog.OTHER):
        os.makedirs(os.path.join(feedback, label))
    with open(os.path.join(feedback, "manifest.csv"), "w") as f:
        f.write("prediction_id,model_version,label,predicted,date,sha256,file,skip_reason\n")
    try:
        run(source, out)
        assert {k: v for k, v in read_tree(data_dir).items() if not k.startswith("feedback")} == everything
    finally:
        shutil.rmtree(feedback)
    run(source, out)
    assert read_tree(data_dir) == everything


def test_a_feedback_folder_that_is_not_there_stops_the_run(kaggle_run, tmp_path):
    """A mistyped --feedback, or no data/feedback beside --out (make data restores it from
    data/feedback.dvc), would silently train on no feedback: refused before anything is written."""
    source, _, _ = kaggle_run
    out = tmp_path / "data" / "processed"
    for extra, missing in (([], tmp_path / "data" / "feedback"),
                           (["--feedback", str(tmp_path / "feedbak")], tmp_path / "feedbak")):
        with pytest.raises(SystemExit, match=f"--feedback {missing} is not a folder"):
            preprocess.main(preprocess.parse_args(["--source", source, "--out", str(out), *extra]))
    assert not (tmp_path / "data").exists()


def sample_bytes(kaggle_out, split):
    """(name, bytes) of the dirty dataset's first photo in `split`."""
    row = next(r for r in read_manifest(kaggle_out) if r["split"] == split)
    return os.path.basename(row["source"]), dirty_files()[os.path.basename(row["source"])]


@pytest.fixture(scope="module")
def feedback_run(kaggle_run, tmp_path_factory):
    """The dirty dataset again, with a harvest beside it: one photo for each way a feedback
    photo is kept or dropped; extra evaluation photos and not-pets photos beside them."""
    source, kaggle_out, _ = kaggle_run
    base = tmp_path_factory.mktemp("feedback")
    extra = write_folder(base / "extra", {f"{label}.{i}.jpg": photo_bytes(4000 + 10 * k + i)
                                          for k, label in enumerate(catdog.CLASSES) for i in range(3)})
    not_pets = write_folder(base / "not-pets", {f"bird/{i}.jpg": photo_bytes(5000 + i) for i in range(3)})
    fresh = {seed: photo_bytes(seed, size=(120, 90)) for seed in range(3000, 3005)}
    files = {"cat/fresh.jpg": fresh[3000], "dog/fresh.png": photo_bytes(3001, size=(120, 90), fmt="PNG"),
             "cat/same.jpg": fresh[3002], "cat/same-again.jpg": fresh[3002],    # one photo harvested twice
             "cat/both.jpg": fresh[3003], "dog/both.jpg": fresh[3003],          # staff disagreed with themselves
             "other/fresh.jpg": fresh[3004],
             "dog/test-copy.jpg": sample_bytes(kaggle_out, "test")[1],
             "cat/val-near.jpg": near_copy(sample_bytes(kaggle_out, "val")[1]),
             "cat/extra-copy.jpg": (base / "extra" / "cat.0.jpg").read_bytes(),
             "dog/extra-near.jpg": near_copy((base / "extra" / "dog.1.jpg").read_bytes()),
             "dog/not-pet-near.jpg": near_copy((base / "not-pets" / "bird" / "2.jpg").read_bytes()),
             "cat/train-copy.jpg": sample_bytes(kaggle_out, "train")[1],
             "cat/broken.jpg": fresh[3000][: len(fresh[3000]) // 2]}
    write_folder(base / "data" / "feedback", files)
    shutil.copytree(source, base / "raw")  # the same relative layout as kaggle_run: the same manifest sources
    out = str(base / "data" / "processed")
    report = run(str(base / "raw"), out, 2, "--eval-extra", extra, "--not-pets", not_pets)
    return {"out": out, "report": report, "extra": extra, "files": files}


FEEDBACK_REASONS = {"cat/fresh.jpg": "", "dog/fresh.png": "", "cat/same-again.jpg": "", "cat/same.jpg": "duplicate",
                    "cat/both.jpg": "conflicting_labels", "dog/both.jpg": "conflicting_labels",
                    "other/fresh.jpg": "other_label", "dog/test-copy.jpg": "evaluation_duplicate",
                    "cat/val-near.jpg": "evaluation_duplicate", "cat/extra-copy.jpg": "evaluation_duplicate",
                    "dog/extra-near.jpg": "evaluation_duplicate", "dog/not-pet-near.jpg": "not_pets_duplicate",
                    "cat/train-copy.jpg": "training_duplicate", "cat/broken.jpg": "corrupt"}


def test_feedback_photos_join_the_training_split_only(kaggle_run, feedback_run):
    _, kaggle_out, kaggle_report = kaggle_run
    out, report = feedback_run["out"], feedback_run["report"]
    rows = read_manifest(out)
    feedback = {r["source"].split("feedback" + os.sep, 1)[1]: r for r in rows if "feedback" + os.sep in r["source"]}
    assert {name: r["drop_reason"] for name, r in feedback.items()} == FEEDBACK_REASONS
    # The sample's rows, splits and files are untouched; train gains exactly the kept feedback photos.
    sample = [r for r in rows if r not in feedback.values()]
    assert [(os.path.basename(r["source"]), r["split"], r["drop_reason"]) for r in sample] == \
        [(os.path.basename(r["source"]), r["split"], r["drop_reason"]) for r in read_manifest(kaggle_out)]
    for split in ("val", "test"):
        assert read_tree(os.path.join(out, split)) == read_tree(os.path.join(kaggle_out, split))
    added = set(read_tree(os.path.join(out, "train"))) - set(read_tree(os.path.join(kaggle_out, "train")))
    kept = {name: r for name, r in feedback.items() if not r["drop_reason"]}
    assert added == {os.path.relpath(r["path"], os.path.join(out, "train")) for r in kept.values()}
    for name, row in kept.items():
        assert (row["split"], row["label"]) == ("train", name.split("/")[0])
        assert row["sha256"] == sha(feedback_run["files"][name])
        assert Image.open(row["path"]).size == (224, 224)
    for row in feedback.values():
        assert row["split"] == "" if row["drop_reason"] else row["split"] == "train"
    # The copies say what they copy; a refused copy of an evaluation photo keeps no sha256 (below).
    assert feedback["dog/test-copy.jpg"]["duplicate_of"] == sample_bytes(kaggle_out, "test")[0]
    assert feedback["cat/extra-copy.jpg"]["duplicate_of"].endswith(os.path.join("extra", "cat.0.jpg"))
    assert all(r["sha256"] == "" for r in feedback.values() if r["drop_reason"] == "evaluation_duplicate")
    dropped = collections.Counter(r for r in FEEDBACK_REASONS.values() if r)
    # The folders they were checked against, as train.py finds them (relative to the report).
    assert report["feedback"] == {"folder": "feedback", "inputs": len(FEEDBACK_REASONS), "trained": 3,
                                  "dropped": dict(sorted(dropped.items())),
                                  "checked_against": {"eval_extra": "../extra", "not_pets": "../not-pets"}}
    assert report["splits"]["train"] == {"cat": 16 + 2, "dog": 16 + 1}
    assert report["splits"]["val"] == kaggle_report["splits"]["val"]
    markdown = (Path(out).parent / "quality_report.md").read_text()
    assert "## Feedback" in markdown and "| evaluation_duplicate | 4 |" in markdown
    assert "Checked for copies of the photos of --eval-extra `../extra`, --not-pets `../not-pets`." in markdown


def test_feedback_leaves_the_evaluation_set_as_it_was(kaggle_run, feedback_run):
    """evaluate.py leaves out extra photos the manifest knows: a feedback photo refused as a copy
    of one must not take it out of the evaluation set."""
    import evaluate

    def evaluation(out):
        test = [(r["path"], catdog.CLASSES.index(r["label"])) for r in read_manifest(out) if r["split"] == "test"]
        found = evaluate.evaluation_set(test, feedback_run["extra"], out)
        return found.identity(), found.left_out, len(found.items)

    assert evaluation(feedback_run["out"]) == evaluation(kaggle_run[1])
    assert evaluation(feedback_run["out"])[2] == 2 * 2 + 6


def test_feedback_needs_the_evaluation_photos_it_is_checked_against(kaggle_run, tmp_path):
    source, _, _ = kaggle_run
    write_folder(tmp_path / "data" / "feedback", {"cat/fresh.jpg": photo_bytes(3000)})
    with pytest.raises(SystemExit, match="--eval-extra .*missing-extra does not exist"):
        run(source, tmp_path / "data" / "processed", 1, "--eval-extra", str(tmp_path / "missing-extra"),
            "--not-pets", "")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (the stdlib server has none), recording each Range."""

    ranges = []

    def do_GET(self):
        with open(self.translate_path(self.path), "rb") as f:
            data = f.read()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers["Range"] else 0
        self.ranges.append(self.headers["Range"])
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


def test_url_source_resumes_download_and_records_checksum(tmp_path):
    served = tmp_path / "site"
    served.mkdir()
    archive = write_zip(served / "pets.zip", dirty_files(), petimages_name)
    with open(archive, "rb") as f:
        whole = f.read()
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "pets.zip.part").write_bytes(whole[:1000])  # an interrupted earlier download

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pets.zip"
        report = run(url, tmp_path / "data" / "processed", 1, "--raw-dir", str(raw))
    finally:
        server.shutdown()
    assert RangeHandler.ranges == ["bytes=1000-"]
    assert (raw / "pets.zip").read_bytes() == whole and not (raw / "pets.zip.part").exists()
    digest = sha(whole)
    assert report["source"]["sha256"] == digest
    assert (raw / "pets.zip.sha256").read_text().split()[0] == digest
    assert report["kept"] == 2 * GOOD_PER_CLASS


@pytest.mark.integration
@pytest.mark.skipif(not os.path.isdir(SHARED_SAMPLE), reason=f"shared sample {SHARED_SAMPLE} is absent")
def test_shared_3k_sample(tmp_path):
    """The real 3k Kaggle sample, as `make data` runs it (a separate process, all cores)."""
    out = tmp_path / "data" / "processed"
    (tmp_path / "data" / "feedback").mkdir(parents=True)  # as make data leaves it: no harvest
    subprocess.run([sys.executable, "preprocess.py", "--source", SHARED_SAMPLE, "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    report = json.loads((tmp_path / "data" / "quality_report.json").read_text())
    rows = read_manifest(str(out))
    assert report["inputs"] == len(rows) == 3000
    # The sample holds one near-copy pair (dog.74.jpg re-saves dog.180.jpg) and nothing else
    # to drop; the survivor of the pair stays in one split only.
    assert report["dropped"] == {"near_duplicate": 1}
    dropped = [r for r in rows if r["drop_reason"]]
    assert [(os.path.basename(r["source"]), r["duplicate_of"]) for r in dropped] == [("dog.74.jpg", "dog.180.jpg")]
    assert report["splits"] == {"train": {"cat": 1200, "dog": 1199}, "val": {"cat": 150, "dog": 150},
                                "test": {"cat": 150, "dog": 150}}
    kept = [r for r in rows if not r["drop_reason"]]
    assert len({r["sha256"] for r in kept}) == len(kept) == 2999
    assert tree_digest(read_tree(out)) == SAMPLE_DIGEST  # what `make data` made before feedback existed
    # Checksums in the manifest are the published ones for every file.
    with open(SHARED_SAMPLE + ".sha256") as f:
        published = dict(line.split()[::-1] for line in f if line.strip())
    assert {os.path.basename(r["source"]): r["sha256"] for r in rows} == published
    counts = collections.Counter((r["split"], r["label"]) for r in kept)
    for (split, label), n in counts.items():
        names = os.listdir(out / split / label)
        assert len(names) == n
        img = Image.open(out / split / label / names[0])
        assert (img.mode, img.size) == ("RGB", (224, 224))


def test_big_jpeg_decodes_at_reduced_scale_to_nearly_the_same_input():
    """The service decodes big JPEGs with DCT scaling (open_image's min_side): the model input
    barely moves, and the drift statistics still see the file's real, upright size."""
    img = synthetic_photo(7, size=(2016, 1512))
    exif = img.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=90, exif=exif)
    settings = catdog.preprocess_settings("transfer")
    full = catdog.open_image(buffer.getvalue())
    reduced = catdog.open_image(buffer.getvalue(), min_side=settings["resize"])
    assert full.size == (1512, 2016) and reduced.size == (378, 504)  # 1/4 scale: 1/8 would go below 256
    assert full.info["original_size"] == reduced.info["original_size"] == (1512, 2016)
    assert catdog.image_stats(reduced)["width"] == 1512 and catdog.image_stats(reduced)["height"] == 2016
    grey_levels = np.abs(catdog.preprocess(full, settings) - catdog.preprocess(reduced, settings)) * settings["std"]
    assert grey_levels.mean() < 2, grey_levels.mean()


def test_the_preprocessing_fingerprint_follows_what_a_photo_becomes_and_nothing_else():
    """catdog.preprocessing_fingerprint (what model.json records and serve.py checks) changes with
    any edit to the code that turns a decoded upload into the model input, and not with their
    comments or docstrings, nor with the rest of catdog.py."""
    with open(os.path.join(ROOT, "catdog.py")) as f:
        source = f.read()
    ours = catdog.preprocessing_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", ours) and catdog.preprocessing_fingerprint(source) == ours
    changed = {"the decode scale": ("img.draft(None, (min_side, min_side))", "img.draft(None, (min_side, 1))"),
               "the EXIF orientation": ("    ImageOps.exif_transpose(img, in_place=True)", "    pass"),
               "16-bit to 8-bit": ("shift = 8 if arr.max() > 255 else 0", "shift = 8"),
               "the transparency background": ('Image.new("RGB", img.size, (255, 255, 255))',
                                               'Image.new("RGB", img.size, (0, 0, 0))'),
               "the resize filter": ("Image.BILINEAR, box=box", "Image.BICUBIC, box=box"),
               "the normalisation": ('arr /= settings["std"]', 'arr /= settings["std"] * 2')}
    for what, (old, new) in changed.items():
        assert source.count(old) == 1, what
        assert catdog.preprocessing_fingerprint(source.replace(old, new)) != ours, what
    unchanged = {"a comment": ("# HWC -> CHW in the one copy", "# channels first"),
                 "a docstring": ("in 8-bit RGB.", "as 8-bit RGB."),
                 "a constant elsewhere": ("MIN_SIDE = 32", "MIN_SIDE = 48"),
                 "a function elsewhere": ('Image.BILINEAR)\n    raise ValueError', 'Image.BICUBIC)\n    raise ValueError')}
    for what, (old, new) in unchanged.items():
        assert source.count(old) == 1, what
        assert catdog.preprocessing_fingerprint(source.replace(old, new)) == ours, what
