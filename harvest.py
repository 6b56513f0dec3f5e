"""The photos staff corrected -> a labelled folder the next dataset takes in (make harvest).

    python harvest.py                        # DATABASE_URL, else DB_PATH; PHOTOS_DIR (as serve.py reads them)
    python harvest.py --out /tmp/feedback

Reads the store the service writes (store.open_store: PostgreSQL at DATABASE_URL, else the
SQLite file at DB_PATH, default store.DEFAULT_DB_PATH) and the photos it kept (PHOTOS_DIR,
default photos/ beside the SQLite file; KEEP_PHOTOS in serve.py), and writes every kept photo
that has staff feedback, under the label staff gave, to
    <out>/{cat,dog,other}/<sha256>.<ext>     (ext from the photo's own format)
    <out>/manifest.csv                       (prediction_id, model_version, label, predicted,
                                              date, sha256, file, skip_reason)
The label folders are rewritten to exactly the store's kept photos now, so a photo removed on
request is gone from the next harvest. A photo that cannot be written (its file missing or
unreadable, not the bytes its name says, not an image) is listed with its reason and left out.
<out> is made its user's alone (mode 0700): kept photos are personal data. preprocess.py
takes <out> into the training split only (make data); `make harvest` then records it in
data/feedback.dvc (dvc add) so that `dvc push` carries it.
"""
import csv
import datetime
import hashlib
import io
import os
import shutil

from PIL import Image

import catdog
import kept
import store as stores

# ---------------------------------------------------------------- configuration (--name value overrides)
out = os.path.join(catdog.DATA_DIR, "feedback")  # the harvest folder (only its label folders and manifest.csv are replaced)
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp",
              "TIFF": "tif", "HEIF": "heic"}
COLUMNS = ("prediction_id", "model_version", "label", "predicted", "date", "sha256", "file", "skip_reason")


def open_kept(environ):
    """(kept photos of store.Store.kept_photos, the photos folder) of the store the service
    would open with these variables; SystemExit naming what is wrong when it cannot be read."""
    url, db_path = environ.get("DATABASE_URL", ""), stores.db_path_of(environ)
    try:
        kind = stores.kind_of(url)
        folder = stores.photos_folder_of(environ)
    except ValueError as e:
        raise SystemExit(f"harvest: {e}") from None
    where = f"DATABASE_URL={stores.redacted(url)}" if url else f"DB_PATH={db_path}"
    # A read-only open of a missing file fails with SQLite's bare "unable to open database file": say which setting.
    if kind == stores.SQLiteStore.kind and not os.path.isfile(db_path):
        raise SystemExit(f"harvest: no store at {where}: the file does not exist (set DB_PATH to the service's)")
    try:
        store = stores.open_store(url, db_path, max_connections=1, read_only=True)
    except Exception as e:  # an unreachable server, a refused password, a file that is no database
        raise SystemExit(f"harvest: cannot read the store at {where}: {e}") from None
    try:
        photos = store.kept_photos()
    finally:
        store.close()
    if photos and not os.path.isdir(folder):
        raise SystemExit(f"harvest: the store names {len(photos)} kept photos but their folder {folder} does not "
                         "exist (set PHOTOS_DIR to the service's)")
    return photos, folder


def photo_file(row, folder):
    """(the file's name under its label folder, its bytes) of a kept photo, or (reason, None)."""
    if row["label"] not in catdog.ANSWERS:
        return "unknown_label", None
    try:
        with open(kept.path_of(folder, row["photo"]), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "missing", None
    except OSError:  # above all PermissionError: the service writes its photos 0600 as its own user
        return "unreadable", None
    if hashlib.sha256(data).hexdigest() != row["photo"]:
        return "sha256_mismatch", None  # content-addressed: other bytes than the name says
    try:
        fmt = Image.open(io.BytesIO(data)).format  # the header only: preprocess.py decodes it fully
    except Exception:
        fmt = None
    if fmt not in EXTENSIONS:
        return "not_an_image", None
    return f"{row['photo']}.{EXTENSIONS[fmt]}", data


def harvest(photos, folder, out):
    """Write the kept photos and the manifest into `out`; the manifest's rows."""
    os.makedirs(out, exist_ok=True)
    os.chmod(out, 0o700)  # photos of people's pets, and at times of people: no other user reads them
    for label in catdog.ANSWERS:
        shutil.rmtree(os.path.join(out, label), ignore_errors=True)
        os.makedirs(os.path.join(out, label))
    rows = []
    for row in photos:
        name, data = photo_file(row, folder)
        file = os.path.join(row["label"], name) if data is not None else ""
        if data is not None:
            with open(os.path.join(out, file), "wb") as f:
                f.write(data)
        date = datetime.datetime.fromtimestamp(row["time"], datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append({**row, "date": date, "sha256": row["photo"], "file": file,
                     "skip_reason": "" if data is not None else name})
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def summary(rows, folder, out):
    """What was harvested, in a few lines: per label, how many disagree with the model, what was left out."""
    written = [row for row in rows if row["file"]]
    counts = ", ".join(f"{label} {sum(row['label'] == label for row in written)}" for label in catdog.ANSWERS)
    disagree = sum(row["label"] != row["predicted"] for row in written)
    lines = [f"harvest: {len(written)} photos -> {out}: {counts}; {disagree} disagree with the model's answer"]
    for row in rows:
        if not row["file"]:
            lines.append(f"  left out {row['prediction_id']} ({row['label']}): {row['skip_reason']} "
                         f"({kept.path_of(folder, row['sha256'])})")
    if any(row["skip_reason"] == "unreadable" for row in rows):
        lines.append("  unreadable: the service's photo files are its own user's (mode 0600): harvest as that user, "
                     "or from a restored backup of the store (docs/operations.md, Harvest)")
    return "\n".join(lines)


def main(argv=None, environ=os.environ):
    args = catdog.config_parser(globals()).parse_args(argv)
    photos, folder = open_kept(environ)
    rows = harvest(photos, folder, args.out)
    print(summary(rows, folder, args.out))
    return rows


if __name__ == "__main__":
    main()
