"""Photos kept to train on (KEEP_PHOTOS): which uploads stay once staff judge them, and their files.

A kept photo is a file under the photos folder named by its sha256 (path_of), one per photo
however many predictions share it; a row of the store names it (predictions.photo), never
holds its bytes. The service writes an upload here at /predict as a pending photo and, once
staff give their verdict, keeps it or lets it go (stays); store.py removes a file with the last
row naming it. harvest.py and backup.py find the folder as the service does (folder_of).
"""
import contextlib
import os
import re
import tempfile

# off keeps nothing; corrected keeps the photos staff correct (and KEEP_CONFIRMED_SHARE of
# those they confirm, so that training does not see only hard cases); all keeps every judged one.
MODES = ("off", "corrected", "all")
SHA256, PREFIX = re.compile(r"[0-9a-f]{64}"), re.compile(r"[0-9a-f]{2}")  # a photo file's name and its folder's


def folder_of(photos_dir, db_path, database_url):
    """Where kept photos live: PHOTOS_DIR, else a photos/ folder beside the SQLite file. With
    PostgreSQL every replica must see the same folder, so PHOTOS_DIR has no default there."""
    if photos_dir:
        return photos_dir
    if database_url:
        raise ValueError("KEEP_PHOTOS with DATABASE_URL needs PHOTOS_DIR: a folder (volume) every replica mounts")
    return os.path.join(os.path.dirname(os.path.abspath(db_path)), "photos")


def checked_folder(mode, confirmed_share, photos_dir, db_path, database_url):
    """The service's photos folder, created and written to once when `mode` keeps photos; None
    when it is off and no folder is known (PostgreSQL without PHOTOS_DIR). ValueError naming the
    setting and the folder for settings the service must not start with."""
    if mode not in MODES:
        raise ValueError(f"KEEP_PHOTOS={mode!r}: must be one of {', '.join(MODES)}")
    if not 0 <= confirmed_share <= 1:
        raise ValueError(f"KEEP_CONFIRMED_SHARE={confirmed_share}: must be between 0 and 1")
    try:
        folder = folder_of(photos_dir, db_path, database_url)
    except ValueError as e:
        if mode == "off":
            return None
        raise ValueError(f"KEEP_PHOTOS={mode}: {e}") from e
    if mode != "off":
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)  # photos of people's pets, at times of people
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise ValueError(f"KEEP_PHOTOS={mode}: cannot write to the photos folder {folder} (PHOTOS_DIR): {e}") from e
    return folder


def stays(mode, predicted, truth, sha256, confirmed_share):
    """Whether a pending photo stays once staff judged it: all keeps it; corrected keeps a
    correction, and a confirmation whose sha256 falls in confirmed_share (so a retry, or the same
    photo judged twice, decides the same); off keeps nothing (a photo an earlier mode left)."""
    if mode == "all" or (mode == "corrected" and predicted != truth):
        return True
    return mode == "corrected" and int(sha256[:8], 16) < confirmed_share * 16 ** 8


def path_of(folder, sha256):
    """A kept photo's file: content-addressed, one copy per photo however many predictions share it."""
    return os.path.join(folder, sha256[:2], sha256)


def save(folder, sha256, data):
    """Write a photo's bytes to its path_of unless the file is there: into a temporary file
    renamed into place, so that no reader ever sees half a photo. The file is the service user's
    alone (mode 0600, mkstemp's)."""
    path = path_of(folder, sha256)
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def remove(folder, sha256):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path_of(folder, sha256))


def old_files(folder, older_than):
    """(sha256 names of the photo files, paths of the `.partial-*` files) under `folder` last
    written before `older_than` (Unix time); none when the folder does not exist."""
    photos, partial = [], []
    with contextlib.suppress(FileNotFoundError):
        for sub in os.scandir(folder):
            if not (sub.is_dir(follow_symlinks=False) and PREFIX.fullmatch(sub.name)):
                continue
            for entry in os.scandir(sub.path):
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to do
                    if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime >= older_than:
                        continue
                    if entry.name.startswith(".partial-"):
                        partial.append(entry.path)
                    elif SHA256.fullmatch(entry.name) and entry.name.startswith(sub.name):
                        photos.append(entry.name)
    return photos, partial
