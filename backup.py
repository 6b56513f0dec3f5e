"""Backups that restore: the store (predictions and staff feedback, the only ground truth the
service gets, and the photos it keeps to train on) and MLflow (its database and artifacts: the registry releases are built from),
into a folder the operator names, with manifest.json saying what, when, sizes, sha256 and
row counts. Restore puts each part back where the same variables say, and checks the rows.

    python backup.py backup DEST [--only store|mlflow]              # make backup DEST=dir
    python backup.py restore FROM [--only store|mlflow] [--force]   # make restore FROM=dir
    python backup.py check FROM                                     # sha256, sizes, rows, readable dumps

Where each part comes from, read as the service and training read it:
- store: PostgreSQL at DATABASE_URL (pg_dump, custom format), else the SQLite file at DB_PATH
  (SQLite's online backup API: the service may keep writing meanwhile); then its kept photos
  (the files in PHOTOS_DIR, else photos/ beside the SQLite file, of the photos a row with
  feedback names; not the pending uploads nobody judged) when KEEP_PHOTOS is on or the folder
  exists: after the rows, so every photo a backed-up row keeps is there unless it was removed
  while the backup ran. A restore puts them back only from a backup that holds them;
- mlflow: the database of MLFLOW_TRACKING_URI (sqlite:///... or postgresql://...) and the
  artifacts folder MLFLOW_ARTIFACTS_DIR (default: mlruns/ beside the sqlite database).
Every refusal (a missing source, a DEST that is not empty, a restore over a live store without
--force, a file that fails its sha256) exits non-zero with a message naming what and where.
"""
import argparse
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import urllib.parse

import catdog
import kept
import store as stores

MANIFEST = "manifest.json"
PARTS = ("store", "mlflow")
FILE_OF = {"sqlite": "{name}.sqlite", "postgresql": "{name}.pgdump", "folder": "{name}.tar"}
POSTGRES_BINARIES = "/usr/lib/postgresql/*/bin"  # Debian's, newest first; PG_BINDIR or PATH win


class Refused(Exception):
    """A backup or restore that must not go on; the message says what and where."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One thing backed up: name (store, mlflow-db, mlflow-artifacts), kind (sqlite,
    postgresql, folder) and where it lives (a path or a postgresql:// URL)."""
    name: str
    kind: str
    location: str

    @property
    def file(self):
        return FILE_OF[self.kind].format(name=self.name)

    @property
    def shown(self):
        return stores.redacted(self.location) if self.kind == "postgresql" else self.location


# ---------------------------------------------------------------- where things live
def store_source(environ):
    """The store the service would open with these variables (serve.Settings, store.open_store)."""
    url = environ.get("DATABASE_URL", "")
    try:
        kind = stores.kind_of(url)
    except ValueError as e:
        raise Refused(f"DATABASE_URL={stores.redacted(url)}: {e}") from e
    return Source("store", kind, url if url else stores.db_path_of(environ))


def photos_source(environ, held=None):
    """The store's kept photos' folder, found as the service finds it (kept.folder_of). For a
    backup (`held` None): None when there is none to back up (KEEP_PHOTOS off and no folder there).
    For a restore: the folder when the backup holds photos (`held`), else None: an older backup,
    or one made with keeping off, restores its rows and leaves the folder alone."""
    if held is False:
        return None
    mode = environ.get("KEEP_PHOTOS", "off")
    try:
        folder = stores.photos_folder_of(environ)
    except ValueError as e:
        if mode == "off" and not held:
            return None
        raise Refused(f"the store's kept photos (KEEP_PHOTOS={mode}): {e}") from e
    if mode == "off" and not held and not os.path.isdir(folder):
        return None
    return Source("store-photos", "folder", folder)


def mlflow_sources(environ):
    """MLflow's database and artifacts folder, from MLFLOW_TRACKING_URI and MLFLOW_ARTIFACTS_DIR."""
    uri = environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = catdog.TRACKING_URI
    artifacts = environ.get("MLFLOW_ARTIFACTS_DIR", "")
    scheme, _, rest = uri.partition("://")
    if scheme == "sqlite":
        path = os.path.abspath(rest.removeprefix("/").split("?")[0])
        return [Source("mlflow-db", "sqlite", path),
                Source("mlflow-artifacts", "folder", artifacts or os.path.join(os.path.dirname(path), "mlruns"))]
    if scheme.split("+")[0] in ("postgresql", "postgres"):
        if not artifacts:
            raise Refused(f"MLFLOW_TRACKING_URI={stores.redacted(uri)} is PostgreSQL: set MLFLOW_ARTIFACTS_DIR to "
                          "the artifacts folder (the tracking server's --artifacts-destination)")
        return [Source("mlflow-db", "postgresql", f"postgresql://{rest}"), Source("mlflow-artifacts", "folder", artifacts)]
    raise Refused(f"MLFLOW_TRACKING_URI={stores.redacted(uri)}: back up a tracking server where it runs, with "
                  "MLFLOW_TRACKING_URI set to its backend store (sqlite:/// or postgresql://) and "
                  "MLFLOW_ARTIFACTS_DIR to its artifacts folder")


def sources(environ, parts=PARTS, photos=None):
    """The sources of these parts ("store": its database and kept photos, photos_source(environ,
    photos); "mlflow")."""
    store = [store_source(environ), photos_source(environ, photos)] if "store" in parts else []
    return [source for source in store if source] + (mlflow_sources(environ) if "mlflow" in parts else [])


def postgres_folder(*tools):
    """The folder holding every one of PostgreSQL's `tools`: PG_BINDIR, else PATH's (a tool there
    may be a link into its real folder), else Debian's newest server package; None when none does."""
    on_path = shutil.which(tools[0])
    folders = [os.environ.get("PG_BINDIR", ""), os.path.dirname(os.path.realpath(on_path)) if on_path else "",
               *os.environ.get("PATH", "").split(os.pathsep)]
    folders += sorted(glob.glob(POSTGRES_BINARIES), key=lambda d: int(d.split("/")[-2]), reverse=True)
    for folder in filter(None, folders):
        if all(os.access(os.path.join(folder, tool), os.X_OK) for tool in tools):
            return folder
    return None


def postgres_tool(name):
    """pg_dump or pg_restore (postgres_folder)."""
    folder = postgres_folder(name)
    if folder is None:
        raise Refused(f"{name} not found (PG_BINDIR, PATH, {POSTGRES_BINARIES}): apt-get install postgresql-client")
    return os.path.join(folder, name)


# ---------------------------------------------------------------- the databases
def connect(source, readonly=False):
    """A connection to the source's database (SQLite: closed on leaving `with`)."""
    if source.kind == "sqlite":
        if readonly and not os.access(source.location, os.R_OK):
            raise Refused(f"{source.name}: no readable SQLite file at {source.location}")
        os.makedirs(os.path.dirname(os.path.abspath(source.location)), exist_ok=True)
        # A plain read-only open (not store.read_only_uri's immutable one): the online backup
        # must take SQLite's locks to copy a database the service or MLflow writes meanwhile.
        uri = f"file:{urllib.parse.quote(os.path.abspath(source.location))}?mode={'ro' if readonly else 'rwc'}"
        return contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None))
    import psycopg

    try:
        return psycopg.connect(source.location, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        raise Refused(f"{source.name}: cannot reach PostgreSQL at {source.shown}: {e}") from e


def table_rows(conn, kind):
    """{table: rows} of every table in the database (the current schema for PostgreSQL)."""
    listing = ("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'" if kind == "sqlite"
               else "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    names = sorted(row[0] for row in conn.execute(listing).fetchall())
    return {name: conn.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0] for name in names}


def artifacts_outside(conn, kind, folder):
    """Artifact locations MLflow's database names on this disk outside `folder` (a backup of
    the folder would miss them); the tracking server's mlflow-artifacts:/ are in its folder."""
    tables = table_rows(conn, kind)
    uris = [row[0] for table, column in (("runs", "artifact_uri"), ("logged_models", "artifact_location"))
            if table in tables for row in conn.execute(f"SELECT {column} FROM {table}").fetchall()]
    root = os.path.realpath(folder)
    return [uri for uri in uris if not uri.startswith("mlflow-artifacts:")
            and os.path.commonpath([root, os.path.realpath(uri.removeprefix("file://"))]) != root]


def run_tool(name, *args, url=None):
    """pg_dump or pg_restore (on the database at `url`). The password goes in PGPASSWORD, never in
    the command line, which every user of the host can read (/proc/*/cmdline)."""
    env = dict(os.environ)
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            credentials, host = parts.netloc.rsplit("@", 1)
            url = urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials.split(':', 1)[0]}@{host}"))
            env["PGPASSWORD"] = urllib.parse.unquote(parts.password)
        args = (*args, f"--dbname={url}")
    done = subprocess.run([postgres_tool(name), *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise Refused(f"{name} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def kept_photos(store):
    """The sha256 of every photo a row with staff feedback names in the `store` source's database:
    the kept photos (pending uploads nobody judged, and half-written files, are no part of a backup)."""
    url, path = (store.location, "") if store.kind == "postgresql" else ("", store.location)
    try:
        reader = stores.open_store(url, path, max_connections=1, read_only=True)
    except ValueError as e:  # a store of another schema: its photos cannot be told apart
        raise Refused(f"{store.name}: {store.shown}: {e}") from e
    try:
        return sorted({row["photo"] for row in reader.kept_photos()})
    finally:
        reader.close()


def dump(source, target, photos=None):
    """Copy the source into the file `target`: {table: rows} of a database, {"files": n} of a folder
    (of a photos folder: only the files of `photos`, sha256s)."""
    if source.kind == "sqlite":  # the online backup API: a consistent copy while the service writes
        with connect(source, readonly=True) as src, connect(Source(source.name, "sqlite", target)) as dst:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            return table_rows(dst, "sqlite")
    if source.kind == "postgresql":
        # pg_dump reads the snapshot the rows are counted in: the counts are the dump's exactly.
        with connect(source) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            rows = table_rows(conn, "postgresql")
            run_tool("pg_dump", "--format=custom", f"--snapshot={snapshot}", f"--file={target}", url=source.location)
            conn.execute("COMMIT")
        return rows
    with tarfile.open(target, "w") as tar:
        if photos is None:
            tar.add(source.location, arcname=".")
        for path in (kept.path_of(source.location, sha256) for sha256 in photos or ()):
            with contextlib.suppress(FileNotFoundError):  # removed since the rows were read: gone
                tar.add(path, arcname=os.path.relpath(path, source.location))
        return {"files": sum(member.isfile() for member in tar.getmembers())}


def load(source, path):
    """Put the backup file `path` into the (empty, or --force) source; what is there afterwards."""
    if source.kind == "sqlite":  # into the live file's pages: a running service sees the restored rows
        with connect(Source(source.name, "sqlite", path), readonly=True) as src, connect(source) as dst:
            src.backup(dst)
            return table_rows(dst, "sqlite")
    if source.kind == "postgresql":
        run_tool("pg_restore", "--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction",
                 "--exit-on-error", path, url=source.location)
        with connect(source) as conn:
            return table_rows(conn, "postgresql")
    shutil.rmtree(source.location, ignore_errors=True)
    os.makedirs(source.location)
    with tarfile.open(path) as tar:
        tar.extractall(source.location, filter="data")
    return {"files": sum(len(files) for _, _, files in os.walk(source.location))}


def in_use(source):
    """What a restore would overwrite there ("" when nothing): rows, files."""
    if source.kind == "sqlite":
        return f"the SQLite file {source.location} exists" if os.path.exists(source.location) else ""
    if source.kind == "postgresql":
        with connect(source) as conn:
            rows = table_rows(conn, "postgresql")
        return f"{source.shown} holds tables {', '.join(rows)}" if rows else ""
    exists = os.path.isdir(source.location) and os.listdir(source.location)
    return f"the folder {source.location} is not empty" if exists else ""


def readable(source, artifacts=None):
    """Refused unless the source can be backed up (checked before anything is written); MLflow's
    database must keep every run's artifacts in the `artifacts` folder backed up beside it."""
    if source.kind == "folder":
        if not os.path.isdir(source.location) or not os.access(source.location, os.R_OK | os.X_OK):
            raise Refused(f"{source.name}: no readable folder at {source.location}")
        return
    with connect(source, readonly=True) as conn:
        try:
            table_rows(conn, source.kind)  # a file that is no SQLite database fails here, before DEST is made
            outside = artifacts_outside(conn, source.kind, artifacts) if artifacts else []
        except sqlite3.DatabaseError as e:
            raise Refused(f"{source.name}: {source.location} is not a readable SQLite database: {e}") from e
    if outside:
        raise Refused(f"{source.name}: runs keep artifacts outside {artifacts} (e.g. {outside[0]}): "
                      "set MLFLOW_ARTIFACTS_DIR to the folder that holds them")


# ---------------------------------------------------------------- backup, check, restore
def backup(dest, environ, only=None):
    """Every part into the new or empty folder `dest`, manifest.json last (a folder without one
    is an unfinished backup, which check and restore refuse). The manifest."""
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise Refused(f"DEST {dest} exists and is not an empty folder: name a new one")
    parts = sources(environ, [only] if only else PARTS)
    artifacts = next((s.location for s in parts if s.name == "mlflow-artifacts"), None)
    for source in parts:
        readable(source, artifacts if source.name == "mlflow-db" else None)
    os.makedirs(dest, exist_ok=True)
    started = now()
    entries = []
    for source in parts:
        path = os.path.join(dest, source.file)
        photos = kept_photos(parts[0]) if source.name == "store-photos" else None  # parts[0]: the store, read first
        counts = dump(source, path, photos)
        entries.append({"name": source.name, "kind": source.kind, "source": source.shown, "file": source.file,
                        "bytes": os.path.getsize(path), "sha256": catdog.sha256_file(path), "rows": counts})
        print(f"{source.name}: {source.shown} -> {path} ({os.path.getsize(path)} bytes, {counts})")
    manifest = {"started": started, "finished": now(), "parts": entries}
    with open(os.path.join(dest, MANIFEST), "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    return manifest


def now():
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def check(folder):
    """Refused unless every file of the manifest is there with its size and sha256, each SQLite
    copy passes integrity_check with the manifest's rows and each pg_dump file lists. The manifest."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise Refused(f"FROM {folder}: no {MANIFEST} (not a backup, or an unfinished one)")
    with open(path) as f:
        manifest = json.load(f)
    for entry in manifest["parts"]:
        file = os.path.join(folder, entry["file"])
        if not os.path.isfile(file) or os.path.getsize(file) != entry["bytes"] or catdog.sha256_file(file) != entry["sha256"]:
            raise Refused(f"{entry['name']}: {file} is missing or differs from the size and sha256 in {path}")
        if entry["kind"] == "sqlite":
            with connect(Source(entry["name"], "sqlite", file), readonly=True) as conn:
                verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
                if verdict != "ok" or table_rows(conn, "sqlite") != entry["rows"]:
                    raise Refused(f"{entry['name']}: {file} fails integrity_check ({verdict}) or its rows differ")
        elif entry["kind"] == "postgresql":
            run_tool("pg_restore", "--list", file)
        else:
            with tarfile.open(file) as tar:
                if sum(member.isfile() for member in tar.getmembers()) != entry["rows"]["files"]:
                    raise Refused(f"{entry['name']}: {file} does not hold the {entry['rows']['files']} files counted")
    return manifest


def restore(folder, environ, only=None, force=False):
    """Each part of the backup in `folder` (or only one) back where the variables say; refused
    over a live store, database or folder unless `force`. Afterwards every table must hold the
    rows the manifest counted, and the folder the files."""
    manifest = check(folder)
    held = [part for part in PARTS if any(entry["name"].startswith(part) for entry in manifest["parts"])]
    photos = any(entry["name"] == "store-photos" for entry in manifest["parts"])
    targets = {source.name: source for source in sources(environ, [only] if only else held, photos)}
    entries = [entry for entry in manifest["parts"] if entry["name"] in targets]
    missing = targets.keys() - {entry["name"] for entry in entries}
    if missing:
        raise Refused(f"FROM {folder} holds no {', '.join(sorted(missing))} (it holds: "
                      f"{', '.join(entry['name'] for entry in manifest['parts'])}); pick one with --only")
    for entry in entries:
        target = targets[entry["name"]]
        if target.kind != entry["kind"]:
            raise Refused(f"{entry['name']}: the backup is {entry['kind']} but the variables name "
                          f"{target.kind} at {target.shown}")
        live = in_use(target)
        if live and not force:
            raise Refused(f"{entry['name']}: {live}: restoring would overwrite it (stop the service, then "
                          "--force, or point the variables at an empty one)")
    for entry in entries:
        target = targets[entry["name"]]
        counts = load(target, os.path.join(folder, entry["file"]))
        if {table: counts.get(table) for table in entry["rows"]} != entry["rows"]:
            raise Refused(f"{entry['name']}: {target.shown} holds {counts} after the restore, "
                          f"the backup {entry['rows']}")
        print(f"{entry['name']}: {os.path.join(folder, entry['file'])} -> {target.shown} ({counts})")
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, folder, what in (("backup", "dest", "a new or empty folder"), ("restore", "source", "a backup folder"),
                               ("check", "source", "a backup folder")):
        command = commands.add_parser(name)
        command.add_argument(folder, help=what)
        if name != "check":
            command.add_argument("--only", choices=PARTS, help="one part (default: all)")
    commands.choices["restore"].add_argument("--force", action="store_true",
                                             help="overwrite a store, database or folder that is in use")
    args = parser.parse_args(argv)
    try:
        if args.command == "backup":
            backup(args.dest, os.environ, args.only)
        elif args.command == "restore":
            restore(args.source, os.environ, args.only, args.force)
        else:
            manifest = check(args.source)
            print(f"{args.source}: {len(manifest['parts'])} parts of {manifest['finished']} match their manifest")
    except Refused as e:
        sys.exit(f"{args.command} refused: {e}")


if __name__ == "__main__":
    main()
