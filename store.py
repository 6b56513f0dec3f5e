"""Where the service keeps predictions and staff feedback: a SQLite file (one host, the
default) or PostgreSQL when DATABASE_URL=postgresql://... is set (every replica shares it).

Both run the same schema, migrations and SQL (written with "?" placeholders). No image
bytes, file names or client addresses in rows: only what monitoring needs. A photo kept for
training (KEEP_PHOTOS, kept.py) is a file under the photos folder, named by its sha256, which
a row names; the store removes the file with the last row naming it, and sweeps old files no
row names (sweep_photos). A prediction's key is made by the server; the
client's X-Request-ID is kept beside it for correlation and never overwrites anything.
Feedback for a prediction is recorded once.
"""
import contextlib
import os
import sqlite3
import threading
import time
import urllib.parse

import kept

# Each migration takes the schema from the previous version; schema_version says where a
# database is, so opening an old one upgrades it and opening a current one changes nothing.
# Types both backends read alike: DOUBLE PRECISION is SQLite's REAL and PostgreSQL's float8.
MIGRATIONS = (
    """CREATE TABLE IF NOT EXISTS predictions (
        request_id TEXT PRIMARY KEY, time DOUBLE PRECISION NOT NULL, model_version TEXT NOT NULL,
        label TEXT NOT NULL, confidence DOUBLE PRECISION NOT NULL, width INTEGER, height INTEGER,
        brightness DOUBLE PRECISION);
    CREATE TABLE IF NOT EXISTS feedback (
        request_id TEXT PRIMARY KEY REFERENCES predictions(request_id), time DOUBLE PRECISION NOT NULL,
        label TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS predictions_time ON predictions(time)""",
    """ALTER TABLE predictions RENAME TO predictions_v1;
    ALTER TABLE feedback RENAME TO feedback_v1;
    CREATE TABLE predictions (
        id TEXT PRIMARY KEY, request_id TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, model_version TEXT NOT NULL,
        label TEXT NOT NULL, confidence DOUBLE PRECISION NOT NULL, width INTEGER, height INTEGER,
        brightness DOUBLE PRECISION);
    CREATE TABLE feedback (
        prediction_id TEXT PRIMARY KEY REFERENCES predictions(id), time DOUBLE PRECISION NOT NULL,
        label TEXT NOT NULL);
    INSERT INTO predictions SELECT request_id, request_id, time, model_version, label, confidence, width,
        height, brightness FROM predictions_v1;
    INSERT INTO feedback SELECT request_id, time, label FROM feedback_v1;
    DROP TABLE feedback_v1;
    DROP TABLE predictions_v1;
    CREATE INDEX predictions_time ON predictions(time);
    CREATE INDEX predictions_request_id ON predictions(request_id);
    CREATE INDEX feedback_time ON feedback(time)""",
    # Running totals kept in the same transaction as the rows they count, so every replica
    # reads the same figure without a COUNT(*) over millions of rows.
    """CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO counters SELECT 'feedback', COUNT(*) FROM feedback""",
    # The sha256 of the photo kept for this prediction (KEEP_PHOTOS): its bytes are a file
    # under PHOTOS_DIR (kept.path_of), never a row; NULL when none is kept.
    """ALTER TABLE predictions ADD COLUMN photo TEXT;
    CREATE INDEX predictions_photo ON predictions(photo)""",
)
LATEST = len(MIGRATIONS)
# The SQLite file when DB_PATH is unset (the service's and backup.py's default).
DEFAULT_DB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "var", "catdog.db")


class Store:
    """The queries; a backend says how to reach the database (SQLiteStore, PostgresStore)."""
    kind = ""
    unavailable = ()  # the exceptions that mean "the database cannot answer now" (a 503, not a bug)

    def _transaction(self, write=True):
        """A context manager: a connection inside one transaction, committed on leaving
        (write=False: a single read, which needs no write lock)."""
        raise NotImplementedError

    def _tables(self, conn):
        raise NotImplementedError

    def _lock_for_migration(self, conn):
        """Make other processes opening the same database wait until this one has migrated."""

    def _lock_photo(self, conn, sha256):
        """Make other transactions writing rows that name this photo wait until this one ends
        (SQLite's BEGIN IMMEDIATE already makes every writer wait)."""

    def _query(self, sql, params=()):
        with self._transaction(write=False) as conn:
            return conn.execute(sql, params).fetchall()

    def _write(self, sql, params=()):
        with self._transaction(write=True) as conn:
            conn.execute(sql, params)

    @property
    def version(self):
        with self._transaction(write=False) as conn:
            return self._version(conn)

    def _version(self, conn):
        """schema_version's, or 1 for a database from before it had one, 0 for an empty one."""
        tables = self._tables(conn)
        if "schema_version" in tables:
            return conn.execute("SELECT version FROM schema_version").fetchone()[0]
        return 1 if "predictions" in tables else 0

    def migrate(self):
        """Bring the database to the latest schema in one transaction (DDL is transactional in both)."""
        with self._transaction() as conn:
            self._lock_for_migration(conn)
            version = self._version(conn)
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in (part.strip() for part in script.split(";")):
                    if statement:
                        conn.execute(statement)
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version VALUES (?)", (number,))

    def record_prediction(self, prediction_id, request_id, model_version, label, confidence, stats, photo=None):
        """Store a prediction; `photo`: the sha256 of its kept upload, whose file the caller writes
        (kept.save) before this and again after it: a removal of the last other row naming the
        same photo (_forget_unreferenced) either sees this row or ends before it is stored."""
        with self._transaction() as conn:
            if photo is not None:
                self._lock_photo(conn, photo)
            conn.execute("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (prediction_id, request_id, time.time(), model_version, label, confidence,
                          stats["width"], stats["height"], stats["brightness"], photo))

    def find_prediction(self, key):
        """(prediction id, predicted label, photo sha256 or None) of the prediction with this id,
        else of the one with this request id when exactly one has it; None when none,
        "ambiguous" when several do."""
        rows = (self._query("SELECT id, label, photo FROM predictions WHERE id = ?", (key,))
                or self._query("SELECT id, label, photo FROM predictions WHERE request_id = ? LIMIT 2", (key,)))
        return "ambiguous" if len(rows) > 1 else tuple(rows[0]) if rows else None

    def record_feedback(self, prediction_id, truth):
        """Store the staff's label for a prediction, once: (stored now?, the label on record)."""
        with self._transaction() as conn:
            stored = conn.execute("INSERT INTO feedback VALUES (?, ?, ?) ON CONFLICT (prediction_id) DO NOTHING",
                                  (prediction_id, time.time(), truth)).rowcount == 1
            if stored:
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'feedback'")
                return True, truth
            return False, conn.execute("SELECT label FROM feedback WHERE prediction_id = ?",
                                       (prediction_id,)).fetchone()[0]

    def live_accuracy(self, window):
        """(accuracy or None, n) over the latest `window` feedback answers (the feedback_time index)."""
        n, right = self._query(
            "SELECT COUNT(*), SUM(CASE WHEN label = truth THEN 1 ELSE 0 END) FROM (SELECT p.label AS label, "
            "f.label AS truth FROM feedback f JOIN predictions p ON p.id = f.prediction_id "
            "ORDER BY f.time DESC LIMIT ?) AS latest", (window,))[0]
        return (right / n if n else None), n

    def kept_photos(self):
        """Every kept photo with its staff label, oldest feedback first: dicts of prediction_id,
        model_version, predicted, label, time (of the feedback), photo (sha256)."""
        rows = self._query(
            "SELECT p.id, p.model_version, p.label, f.label, f.time, p.photo FROM predictions p "
            "JOIN feedback f ON f.prediction_id = p.id WHERE p.photo IS NOT NULL ORDER BY f.time, p.id")
        names = ("prediction_id", "model_version", "predicted", "label", "time", "photo")
        return [dict(zip(names, row)) for row in rows]

    def drop_photo(self, prediction_id, folder):
        """Forget this prediction's photo (not kept after its feedback), removing its file from
        `folder` unless another row names it. None when no prediction has this id, else whether
        it had a photo."""
        if not self._query("SELECT 1 FROM predictions WHERE id = ?", (prediction_id,)):
            return None
        return self._forget_photos("id = ?", (prediction_id,), folder) == 1

    def erase_photo(self, prediction_id, folder):
        """Removal on request: forget this prediction's photo in every row naming the same bytes
        (another prediction of them would keep the file, and nobody could find that one), and
        delete its file from `folder`. None when no prediction has this id, else how many
        predictions named the photo (0: it had none)."""
        rows = self._query("SELECT photo FROM predictions WHERE id = ?", (prediction_id,))
        if not rows:
            return None
        return self._forget_photos("photo = ?", (rows[0][0],), folder) if rows[0][0] else 0

    def names_photos(self):
        """Whether any row names a photo (the predictions_photo index: one lookup)."""
        return bool(self._query("SELECT 1 FROM predictions WHERE photo IS NOT NULL LIMIT 1"))

    def expire_photos(self, older_than, folder):
        """Forget the photos of predictions made before `older_than` (Unix time) that got no
        feedback: pending photos nobody judged. How many."""
        return self._forget_photos("time < ? AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.prediction_id = "
                                   "predictions.id)", (older_than,), folder)

    def _forget_photos(self, where, params, folder, chunk=2000):
        """photo = NULL in the rows `where` says, `chunk` rows per transaction; the files no row
        names any more leave `folder` (None: no folder is known, only the rows change)."""
        forgotten = 0
        while True:
            with self._transaction() as conn:
                rows = conn.execute(f"SELECT id, photo FROM predictions WHERE photo IS NOT NULL AND {where} LIMIT ?",
                                    (*params, chunk)).fetchall()
                if not rows:
                    return forgotten
                ids = [row[0] for row in rows]
                conn.execute(f"UPDATE predictions SET photo = NULL WHERE id IN ({','.join('?' * len(ids))})", ids)
                self._forget_unreferenced(conn, {row[1] for row in rows}, folder)
            forgotten += len(rows)

    def sweep_photos(self, folder, older_than, chunk=2000):
        """Delete the files under `folder` written before `older_than` (Unix time) that no row
        names (an upload whose row was never stored: the insert failed, or the process died
        between the two) and the `.partial-*` files a write killed midway left. How many (0
        when no folder is known)."""
        if not folder:
            return 0
        photos, partial = kept.old_files(folder, older_than)
        for path in partial:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed = len(partial)
        for start in range(0, len(photos), chunk):
            part = photos[start:start + chunk]
            named = {row[0] for row in self._query(
                f"SELECT DISTINCT photo FROM predictions WHERE photo IN ({','.join('?' * len(part))})", part)}
            if unnamed := set(part) - named:  # checked again under each photo's lock
                with self._transaction() as conn:
                    removed += self._forget_unreferenced(conn, unnamed, folder)
        return removed

    def _forget_unreferenced(self, conn, photos, folder):
        """Remove the files of these photos that no row names any more, each under its lock, taken
        in order (two transactions never wait for each other's): a new row naming one is stored
        before (and keeps it) or after (and writes it again). How many files went (none when no
        folder is known: then only the rows change)."""
        if not folder:
            return 0
        removed = 0
        for sha256 in sorted(photos):
            self._lock_photo(conn, sha256)
            named = conn.execute("SELECT 1 FROM predictions WHERE photo = ? LIMIT 1", (sha256,)).fetchone()
            if not named:
                kept.remove(folder, sha256)
                removed += 1
        return removed

    def feedback_count(self):
        return self._query("SELECT value FROM counters WHERE name = 'feedback'")[0][0]

    def prune(self, older_than, keep_rows, chunk=2000, folder=None):
        """Delete predictions (and their feedback) older than `older_than` (Unix time) or beyond
        the newest `keep_rows`, `chunk` rows per transaction so requests wait at most one chunk,
        and their photos' files from `folder` unless a remaining row names them. The number of
        predictions deleted."""
        surplus = self._query("SELECT time FROM predictions ORDER BY time DESC LIMIT 1 OFFSET ?", (keep_rows,))
        newest_surplus = surplus[0][0] if surplus else float("-inf")  # this one and older ones go
        deleted = 0
        while True:
            with self._transaction() as conn:
                ids = [row[0] for row in conn.execute(
                    "SELECT id FROM predictions WHERE time < ? OR time <= ? LIMIT ?",
                    (older_than, newest_surplus, chunk)).fetchall()]
                if not ids:
                    return deleted
                marks = ",".join("?" * len(ids))
                photos = {row[0] for row in conn.execute(
                    f"SELECT photo FROM predictions WHERE photo IS NOT NULL AND id IN ({marks})", ids).fetchall()}
                gone = conn.execute(f"DELETE FROM feedback WHERE prediction_id IN ({marks})", ids).rowcount
                conn.execute(f"DELETE FROM predictions WHERE id IN ({marks})", ids)
                conn.execute("UPDATE counters SET value = value - ? WHERE name = 'feedback'", (gone,))
                self._forget_unreferenced(conn, photos, folder)
            deleted += len(ids)

    def close(self):
        raise NotImplementedError


class SQLiteStore(Store):
    """One WAL file, one connection shared by the request threads under a lock."""
    kind = "sqlite"
    unavailable = (sqlite3.OperationalError,)  # locked past the timeout, disk full, file gone

    def __init__(self, path, read_only=False):
        """read_only: an existing file, opened so that nothing is written (no WAL switch, no migration)."""
        self._lock = threading.Lock()
        if read_only:
            self._conn = sqlite3.connect(read_only_uri(path), uri=True, check_same_thread=False,
                                         isolation_level=None, timeout=10)
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        # WAL: readers never block the writer. synchronous=NORMAL: a commit survives the
        # process being killed (kill -9, OOM); only a power cut can lose the last few.
        self._switch_to_wal()
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self.migrate()

    def _switch_to_wal(self, attempts=200):
        """PRAGMA journal_mode=WAL, retried: on a new file that another process is switching at
        the same moment it fails at once with "database is locked" (no busy wait for it)."""
        for attempt in range(attempts):
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or attempt == attempts - 1:
                    raise
                time.sleep(0.01)

    @contextlib.contextmanager
    def _transaction(self, write=True):
        with self._lock:
            if not write:  # one statement, committed on its own (autocommit)
                yield self._conn
                return
            # IMMEDIATE takes the write lock at once, so a transaction that reads then writes
            # never finds another process's write in its way (and a migrating process makes
            # the others wait).
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT (disk full) must not leave one open
                    self._conn.execute("ROLLBACK")
                raise

    def _tables(self, conn):
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def close(self):
        with self._lock:
            self._conn.close()


class _Placeholders:
    """A psycopg connection that takes the "?" placeholders of the shared SQL."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql, params=()):
        return self._conn.execute(sql.replace("?", "%s"), params)


class PostgresStore(Store):
    """A PostgreSQL database shared by every replica, through a pool of connections per replica.
    Each statement commits before the request is answered: an acknowledged write is on disk."""
    kind = "postgresql"
    MIGRATION_LOCK = 7_362_836  # pg_advisory_xact_lock key: one replica migrates, the others wait

    def __init__(self, url, max_connections=10, start_timeout_s=10.0, wait_s=2.0, migrate=True):
        """Connect within start_timeout_s or fail (a replica without its database must not
        start); a request waits at most wait_s for a connection while the database is away."""
        import psycopg
        import psycopg_pool

        self.unavailable = (psycopg.OperationalError, psycopg_pool.PoolTimeout)
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=max_connections, timeout=wait_s, open=False, name="catdog",
            kwargs={"connect_timeout": max(1, round(wait_s)),
                    **({} if migrate else {"options": "-c default_transaction_read_only=on"})})
        try:
            self._pool.open(wait=True, timeout=start_timeout_s)
            if migrate:
                self.migrate()
        except BaseException:
            self._pool.close()
            raise

    @contextlib.contextmanager
    def _transaction(self, write=True):
        with self._pool.connection() as conn:  # commits on leaving, rolls back on an exception
            yield _Placeholders(conn)

    def _tables(self, conn):
        return {row[0] for row in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()}

    def _lock_for_migration(self, conn):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (self.MIGRATION_LOCK,))

    def _lock_photo(self, conn, sha256):
        # 60 bits of the sha256: a bigint key; two photos sharing one only wait for each other.
        conn.execute("SELECT pg_advisory_xact_lock(?)", (int(sha256[:15], 16),))

    def close(self):
        self._pool.close()


def kind_of(database_url):
    """The backend the service's settings choose: "postgresql" when DATABASE_URL is set, else "sqlite"."""
    if database_url and not database_url.startswith(("postgresql://", "postgres://")):
        raise ValueError("DATABASE_URL must be a postgresql:// URL")
    return PostgresStore.kind if database_url else SQLiteStore.kind


def db_path_of(environ):
    """The SQLite file the service's environment names: DB_PATH, else DEFAULT_DB_PATH."""
    return environ.get("DB_PATH") or DEFAULT_DB_PATH


def photos_folder_of(environ):
    """kept.folder_of with the service's variables (PHOTOS_DIR, DB_PATH, DATABASE_URL): the folder
    serve.py keeps photos in, as harvest.py and backup.py find it."""
    return kept.folder_of(environ.get("PHOTOS_DIR", ""), db_path_of(environ), environ.get("DATABASE_URL", ""))


def read_only_uri(path):
    """A sqlite3 URI that reads the file at `path` and writes nothing beside it. With no -wal
    file nobody has it open and it holds every commit: immutable, else a read-only open would
    leave -wal and -shm files of this user, which the service's user could not open at its next
    start. With one, the service is (or was) running and keeps them."""
    immutable = "" if os.path.exists(path + "-wal") else "&immutable=1"
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro{immutable}"


def open_store(database_url, db_path, max_connections=10, read_only=False):
    """PostgresStore of database_url when it is set, else the SQLite file at db_path. read_only:
    a reader's (harvest.py's): an existing store of this code's schema, left as it is (nothing
    created or migrated), else ValueError: a wrong path must not pass for an empty store."""
    if kind_of(database_url) == PostgresStore.kind:
        store = PostgresStore(database_url, max_connections, migrate=not read_only)
    else:
        store = SQLiteStore(db_path, read_only)
    if read_only and (found := store.version) != LATEST:
        store.close()
        why = ("it has no catdog tables" if found == 0 else "start the service of this code once to migrate it"
               if found < LATEST else "a newer catdog wrote it")
        raise ValueError(f"not a catdog store of this code's schema (version {found}, this code's {LATEST}): {why}")
    return store


def redacted(url):
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{credentials.split(':')[0]}:***@{host}"
