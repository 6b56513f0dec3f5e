"""The store on both backends (SQLite file, PostgreSQL server started by the tests), then
several serve.py replicas on one PostgreSQL database."""
import os
import signal
import sqlite3
import threading
import time
import uuid

import numpy as np
import pytest

import kept
import store
from conftest import sha
from harness import PostgresServer, why_no_postgres
from service_helpers import (
    Server,
    in_process,
    photo_files,
    sample,
    synthetic_photo,
    tiny_model,
    upload,
)

STATS = {"width": 320, "height": 240, "brightness": 0.5}


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the whole run; each test takes a new database on it."""
    reason = why_no_postgres()
    if reason:
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture
def database_url(postgres):
    return postgres.new_database(f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """(open a store, run raw SQL statements on its database before any store opened it)."""
    if request.param == "sqlite":
        path = str(tmp_path / "catdog.db")

        def raw(*statements):
            with sqlite3.connect(path) as conn:
                for statement in statements:
                    conn.execute(statement)

        return (lambda: store.SQLiteStore(path)), raw
    import psycopg

    url = request.getfixturevalue("database_url")

    def raw(*statements):
        with psycopg.connect(url) as conn:
            for statement in statements:
                conn.execute(statement)

    return (lambda: store.PostgresStore(url, max_connections=4)), raw


@pytest.fixture
def opened(backend):
    s = backend[0]()
    yield s
    s.close()


def rows(s, sql, params=()):
    return [tuple(row) for row in s._query(sql, params)]


# ---------------------------------------------------------------- the same behaviour on both backends
def test_feedback_is_recorded_once_and_counted_in_the_database(opened):
    for i in range(3):
        opened.record_prediction(f"p{i}", "shelter-1", "v1", "cat", 0.9, STATS)
    assert opened.find_prediction("p1") == ("p1", "cat", None)
    assert opened.find_prediction("shelter-1") == "ambiguous" and opened.find_prediction("nope") is None
    assert opened.record_feedback("p1", "cat") == (True, "cat")
    assert opened.record_feedback("p1", "cat") == (False, "cat")  # the same again stores nothing
    assert opened.record_feedback("p1", "dog") == (False, "cat")  # a different one keeps the first
    assert opened.record_feedback("p2", "dog") == (True, "dog")
    assert opened.feedback_count() == 2 == rows(opened, "SELECT COUNT(*) FROM feedback")[0][0]
    assert opened.live_accuracy(10) == (0.5, 2) and opened.live_accuracy(1) == (0.0, 1)  # the newest: p2, wrong


def test_times_and_confidences_keep_double_precision(opened):
    before = time.time()
    opened.record_prediction("p", "r", "v1", "dog", 0.123456789012, STATS)
    (stamp, confidence), = rows(opened, "SELECT time, confidence FROM predictions")
    assert before - 1e-3 <= stamp <= time.time() + 1e-3 and confidence == 0.123456789012


def test_old_databases_are_migrated_and_migrations_are_idempotent(backend):
    open_store, raw = backend
    raw(*[part for part in store.MIGRATIONS[0].split(";")],  # the first schema, without schema_version
        "INSERT INTO predictions VALUES ('r1', 1.0, 'v1', 'cat', 0.9, 100, 80, 0.5)",
        "INSERT INTO feedback VALUES ('r1', 2.0, 'dog')")
    s = open_store()
    try:
        assert s.version == store.LATEST and s.feedback_count() == 1
        assert s.find_prediction("r1") == ("r1", "cat", None) and s.live_accuracy(10) == (0.0, 1)
    finally:
        s.close()
    s = open_store()  # opening a current database changes nothing
    try:
        assert s.version == store.LATEST and s.feedback_count() == 1
        assert rows(s, "SELECT version FROM schema_version") == [(store.LATEST,)]
    finally:
        s.close()


def open_at_once(open_store, count=4):
    """`count` threads calling open_store() together, as replicas starting at the same moment:
    (stores opened, exceptions raised)."""
    opened, failures = [], []

    def start():
        try:
            opened.append(open_store())
        except Exception as e:  # noqa: BLE001 (returned to the test)
            failures.append(e)

    threads = [threading.Thread(target=start) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return opened, failures


def test_replicas_starting_at_once_migrate_a_new_database_once(backend):
    opened, failures = open_at_once(backend[0])
    try:
        assert not failures and len(opened) == 4
        assert rows(opened[0], "SELECT version FROM schema_version") == [(store.LATEST,)]
        assert rows(opened[0], "SELECT value FROM counters") == [(0,)]
    finally:
        for s in opened:
            s.close()


def test_processes_opening_a_new_sqlite_file_at_once_all_get_it(tmp_path):
    """Switching a new file to WAL fails at once, unwaited, while another connection switches
    it: about one start in 300 of four at once failed with "database is locked"."""
    for round_ in range(300):
        path = str(tmp_path / f"{round_}.db")
        opened, failures = open_at_once(lambda path=path: store.SQLiteStore(path))
        for s in opened:
            s.close()
        assert not failures, f"round {round_}: {failures}"


def test_retention_prunes_old_and_surplus_predictions_with_their_feedback(opened):
    for i in range(50):
        opened.record_prediction(f"p{i}", f"r{i}", "v", "cat", 0.9, STATS)
    opened._write("UPDATE predictions SET time = ? WHERE id IN ('p0', 'p1', 'p2')", (time.time() - 100 * 86400,))
    opened.record_feedback("p0", "cat")
    opened.record_feedback("p40", "cat")
    assert opened.prune(older_than=time.time() - 90 * 86400, keep_rows=1000, chunk=2) == 3
    assert opened.find_prediction("p0") is None and opened.feedback_count() == 1
    assert opened.prune(older_than=0, keep_rows=10) == 37  # the newest 10 stay
    assert rows(opened, "SELECT COUNT(*) FROM predictions") == [(10,)] and opened.feedback_count() == 1


def keep(opened, folder, prediction_id, data, age_s=0.0):
    """A prediction whose upload `data` is kept, as serve.py keeps one, made `age_s` seconds ago."""
    photo = sha(data)
    kept.save(folder, photo, data)
    opened.record_prediction(prediction_id, prediction_id, "v1", "cat", 0.9, STATS, photo=photo)
    opened._write("UPDATE predictions SET time = ? WHERE id = ?", (time.time() - age_s, prediction_id))
    return photo


def test_kept_photos_are_one_file_each_and_leave_with_the_last_row_naming_them(opened, tmp_path):
    folder = str(tmp_path / "photos")
    same = keep(opened, folder, "p1", b"photo one")
    assert keep(opened, folder, "p2", b"photo one") == same  # the same bytes again: the same file
    other = keep(opened, folder, "p3", b"photo two")
    assert sorted(photo_files(folder)) == sorted([same, other])
    assert open(kept.path_of(folder, same), "rb").read() == b"photo one"
    assert kept.path_of(folder, same) == os.path.join(folder, same[:2], same)
    assert opened.drop_photo("p1", folder) is True and sorted(photo_files(folder)) == sorted([same, other])  # p2 too
    assert opened.drop_photo("p1", folder) is False  # idempotent
    assert opened.drop_photo("nope", folder) is None
    assert opened.drop_photo("p2", folder) is True and list(photo_files(folder)) == [other]
    assert rows(opened, "SELECT id FROM predictions WHERE photo IS NOT NULL") == [("p3",)]


def test_pending_photos_expire_and_kept_ones_stay_until_retention(opened, tmp_path):
    folder = str(tmp_path / "photos")
    judged = keep(opened, folder, "judged", b"judged photo", age_s=7200)
    opened.record_feedback("judged", "dog")
    shared = keep(opened, folder, "pending-shared", b"judged photo", age_s=7200)  # the same bytes, no feedback
    assert shared == judged
    stale = keep(opened, folder, "stale", b"nobody judged this", age_s=7200)
    fresh = keep(opened, folder, "fresh", b"just uploaded")
    assert opened.expire_photos(time.time() - 3600, folder) == 2  # pending-shared and stale
    assert sorted(photo_files(folder)) == sorted([judged, fresh])  # the judged row still names the shared file
    (row,) = opened.kept_photos()
    assert (row["prediction_id"], row["label"], row["predicted"], row["photo"]) == ("judged", "dog", "cat", judged)
    assert opened.expire_photos(time.time() - 3600, folder) == 0
    assert stale not in photo_files(folder)
    # Retention takes a photo's file with the last row naming it.
    assert opened.prune(older_than=time.time() - 3600, keep_rows=1000, folder=folder) == 3
    assert list(photo_files(folder)) == [fresh] and opened.kept_photos() == []
    assert opened.prune(older_than=time.time() + 1, keep_rows=1000, folder=folder) == 1 and photo_files(folder) == {}


def test_removal_on_request_forgets_every_prediction_of_the_same_bytes_and_deletes_the_file(opened, tmp_path):
    folder = str(tmp_path / "photos")
    same = keep(opened, folder, "p1", b"photo one")
    keep(opened, folder, "p2", b"photo one")  # the same bytes, uploaded again
    other = keep(opened, folder, "p3", b"photo two")
    opened.record_feedback("p2", "dog")
    assert opened.erase_photo("p1", folder) == 2  # p2's row would keep the file, and nobody could find p2
    assert list(photo_files(folder)) == [other] and same not in photo_files(folder)
    assert rows(opened, "SELECT id FROM predictions WHERE photo IS NOT NULL") == [("p3",)]
    assert opened.erase_photo("p1", folder) == 0 and opened.erase_photo("p2", folder) == 0  # idempotent
    assert opened.erase_photo("nope", folder) is None and opened.feedback_count() == 1  # the feedback stays


def test_old_files_no_row_names_and_stale_partial_files_are_swept(opened, tmp_path):
    """An upload written before its row, whose insert failed (or whose process died), and a write
    killed midway leave files no row names: the retention sweep deletes them once they are old."""
    folder = str(tmp_path / "photos")
    named = keep(opened, folder, "p1", b"a kept photo")
    orphans = [sha(data) for data in (b"insert failed", b"just written")]
    for photo, data in zip(orphans, (b"insert failed", b"just written")):
        kept.save(folder, photo, data)
    partial = [os.path.join(folder, named[:2], f".partial-{i}") for i in range(2)]
    for path in partial:
        open(path, "wb").close()
    hour_ago = time.time() - 3600
    for path in (kept.path_of(folder, named), kept.path_of(folder, orphans[0]), partial[0]):
        os.utime(path, (hour_ago, hour_ago))
    (tmp_path / "photos" / "notes.txt").write_text("not a photo")  # the sweep deletes photos only
    assert opened.sweep_photos(folder, time.time() - 60) == 2  # the old orphan and the old partial file
    assert sorted(photo_files(folder)) == sorted([named, orphans[1], ".partial-1", "notes.txt"])
    assert opened.sweep_photos(folder, time.time() + 60) == 2 and sorted(photo_files(folder)) == [named, "notes.txt"]
    assert opened.sweep_photos(str(tmp_path / "nowhere"), time.time()) == 0


def test_database_urls_are_checked_and_passwords_never_logged():
    with pytest.raises(ValueError, match="postgresql://"):
        store.open_store("mysql://db/catdog", "unused.db")
    assert store.redacted("postgresql://catdog:s3cret@db:5432/catdog") == "postgresql://catdog:***@db:5432/catdog"
    assert store.redacted("postgresql://db/catdog") == "postgresql://db/catdog"


# ---------------------------------------------------------------- PostgreSQL: replicas and outages
def predict(replica, rng, kind="cat"):
    r = replica.predict(synthetic_photo(rng, kind))
    assert r.status_code == 200, r.text
    return r.json()["prediction_id"]


def test_two_replicas_share_predictions_feedback_and_live_accuracy(tmp_path, database_url):
    """The audit's failure: a prediction made on one pod, its feedback sent to the other -> 404."""
    replicas = [Server(tiny_model(), str(tmp_path / f"unused-{i}.db"), DATABASE_URL=database_url) for i in (1, 2)]
    try:
        one, two = replicas
        rng = np.random.default_rng(40)
        ids = [predict(one, rng, "cat") for _ in range(3)] + [predict(two, rng, "dog")]
        for prediction_id, truth, replica in zip(ids, ("cat", "cat", "dog", "dog"), (two, two, two, one)):
            r = replica.post("/feedback", json={"prediction_id": prediction_id, "label": truth})
            assert r.status_code == 200 and r.json()["recorded"], r.text
        again = one.post("/feedback", json={"prediction_id": ids[2], "label": "cat"})
        assert again.status_code == 409 and again.json()["error"] == "feedback_exists"  # recorded on the other
        stats = [replica.get("/stats").json() for replica in replicas]
        for s in stats:
            assert s["feedback_count"] == 4 and s["live_accuracy"] == 0.75 and s["live_accuracy_samples"] == 4, s
        texts = [replica.get("/metrics").text for replica in replicas]
        assert {sample(text, "catdog_live_accuracy") for text in texts} == {0.75}  # the shared figure
        # Counters stay per replica (Prometheus sums them): 3 stored on two, 1 on one.
        assert [sum(sample(text, "catdog_feedback_total", correct=c) or 0 for c in ("true", "false"))
                for text in texts] == [1, 3]
        assert all(replica.get("/health").json()["store"] == "postgresql" for replica in replicas)
    finally:
        for replica in replicas:
            replica.stop()
    assert not any(line for replica in replicas for line in replica.logs().splitlines()
                   if "Traceback" in line), "a replica logged a traceback"


def test_replicas_sharing_photos_dir_settle_a_photo_uploaded_to_the_other(tmp_path, database_url):
    """A photo kept pending on one pod, judged through the other: one folder, one decision."""
    photos = str(tmp_path / "photos")
    replicas = [Server(tiny_model(), str(tmp_path / f"unused-{i}.db"), DATABASE_URL=database_url, PHOTOS_DIR=photos,
                       KEEP_PHOTOS="corrected", KEEP_CONFIRMED_SHARE=0) for i in (1, 2)]
    try:
        one, two = replicas
        rng = np.random.default_rng(42)
        confirmed, corrected = (one.predict(synthetic_photo(rng, "cat")).json() for _ in range(2))
        assert len(photo_files(photos)) == 2
        for answer, truth in ((confirmed, "cat"), (corrected, "dog")):
            assert answer["label"] == "cat"
            r = two.post("/feedback", json={"prediction_id": answer["prediction_id"], "label": truth})
            assert r.status_code == 200, r.text
        shared = store.PostgresStore(database_url)
        kept_ids = [row["prediction_id"] for row in shared.kept_photos()]
        shared.close()
        assert kept_ids == [corrected["prediction_id"]]
        assert len(photo_files(photos)) == 1 and two.get("/health").json()["keep_photos"] == "corrected"
    finally:
        for replica in replicas:
            replica.stop()


def test_a_replica_without_photos_dir_says_loudly_that_rows_name_photos(tmp_path, database_url):
    """Keeping switched off, no PHOTOS_DIR: retention can forget those photos only in the rows."""
    shared = store.PostgresStore(database_url)
    shared.record_prediction("p1", "p1", "v1", "cat", 0.9, STATS, photo="ab" * 32)
    shared.close()
    replica = Server(tiny_model(), str(tmp_path / "unused.db"), DATABASE_URL=database_url)
    replica.stop()
    (said,) = [line for line in replica.logs().splitlines() if "photos_left_on_disk" in line]
    assert '"level": "error"' in said and "PHOTOS_DIR" in said, said


def test_killing_a_replica_under_load_loses_no_acknowledged_prediction(tmp_path, database_url):
    import psycopg

    doomed = Server(tiny_model(), str(tmp_path / "a.db"), DATABASE_URL=database_url)
    survivor = Server(tiny_model(), str(tmp_path / "b.db"), DATABASE_URL=database_url)
    acknowledged, lock, stop = [], threading.Lock(), threading.Event()

    def client(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            try:
                r = doomed.predict(synthetic_photo(rng, "cat", size=(64, 64)))
            except OSError:  # the connection died with the process: not acknowledged
                continue
            if r.status_code == 200:
                with lock:
                    acknowledged.append(r.json()["prediction_id"])

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    try:
        for t in clients:
            t.start()
        time.sleep(2.0)
        doomed.stop(signal.SIGKILL)
        stop.set()
        for t in clients:
            t.join(30)
        assert len(acknowledged) >= 10, "too few predictions before the kill to tell anything"
        with psycopg.connect(database_url) as conn:
            stored = {row[0] for row in conn.execute("SELECT id FROM predictions")}
        assert set(acknowledged) <= stored, f"{len(set(acknowledged) - stored)} acknowledged predictions lost"
        # The other replica judges the last one acknowledged before the kill.
        r = survivor.post("/feedback", json={"prediction_id": acknowledged[-1], "label": "cat"})
        assert r.status_code == 200 and r.json()["recorded"], r.text
    finally:
        stop.set()
        doomed.stop(signal.SIGKILL)
        survivor.stop()


def test_a_database_outage_answers_503_and_the_replica_recovers(tmp_path):
    """No 500 and no hang while PostgreSQL is away; answers again once it is back."""
    if why_no_postgres():
        pytest.skip(why_no_postgres())
    server = PostgresServer().start()
    try:
        url = server.new_database("outage")
        client, service = in_process(tiny_model(), str(tmp_path / "unused.db"), database_url=url)
        rng = np.random.default_rng(41)
        assert client.post("/predict", **upload(synthetic_photo(rng))).status_code == 200
        server.stop_server()
        for _ in range(2):  # the broken pooled connection, then a new one that cannot connect
            r = client.post("/predict", **upload(synthetic_photo(rng)))
            assert r.status_code == 503 and r.json["error"] == "store_unavailable", r.json
            assert r.headers["Retry-After"]
        assert client.get("/stats").status_code == 503
        server.restart()
        deadline = time.monotonic() + 30
        while client.post("/predict", **upload(synthetic_photo(rng))).status_code != 200:
            assert time.monotonic() < deadline, "no 200 within 30 s of the database's return"
            time.sleep(0.2)
        service.close()
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_read_only_store_reads_the_kept_photos_and_writes_nothing(kind, tmp_path, request):
    """harvest.py's store: an existing one, read as the service wrote it, and refusing every write."""
    url, path = (request.getfixturevalue("database_url"), "") if kind == "postgresql" else ("", str(tmp_path / "c.db"))
    stats = {"width": 1, "height": 1, "brightness": 0.5}
    writer = store.open_store(url, path)
    writer.record_prediction("p", "p", "v1", "cat", 0.9, stats, photo="ab" * 32)
    writer.record_feedback("p", "dog")
    writer.close()
    reader = store.open_store(url, path, read_only=True)
    try:
        assert [(row["prediction_id"], row["label"]) for row in reader.kept_photos()] == [("p", "dog")]
        with pytest.raises(Exception, match="read-only|readonly"):
            reader.record_prediction("q", "q", "v1", "cat", 0.9, stats)
    finally:
        reader.close()
