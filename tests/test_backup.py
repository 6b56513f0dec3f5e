"""backup.py: predictions and feedback written through the service are backed up, the store
is destroyed, restored, and every row, every kept photo and the live accuracy come back (SQLite,
PostgreSQL);
MLflow's database and artifacts the same; every refusal exits loudly, naming what and where."""
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

import backup
from harness import PostgresServer, why_no_postgres
from service_helpers import (
    ROOT,
    in_process,
    photo_files,
    synthetic_photo,
    tiny_model,
    upload,
)


def write_traffic(client, count=12, seed=0):
    """`count` predictions through the app, two thirds with staff feedback (some of it wrong)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        r = client.post("/predict", **upload(synthetic_photo(rng, "cat" if i % 2 else "dog")))
        assert r.status_code == 200, r.json
        if i % 3:
            truth = "cat" if i % 4 else "other"
            assert client.post("/feedback", json={"prediction_id": r.json["prediction_id"], "label": truth}).json


def every_row(source):
    """{table: all its rows, sorted} of the source's database."""
    with backup.connect(source) as conn:
        return {table: sorted(tuple(row) for row in conn.execute(f'SELECT * FROM "{table}"').fetchall())
                for table in backup.table_rows(conn, source.kind)}


def live_stats(client):
    stats = client.get("/stats").json
    return stats["live_accuracy"], stats["live_accuracy_samples"]


def kept(before):
    """The sha256 of the photos the rows with feedback name: the kept ones, all a backup holds."""
    judged = {row[0] for row in before["feedback"]}
    return {row[-1] for row in before["predictions"] if row[0] in judged and row[-1]}


def round_trip(tmp_path, environ, destroy, **settings):
    """Traffic through the service, backup while it runs, destroy (the kept photos too), restore,
    the same rows, kept photo files and live accuracy again; a restore over the restored store needs --force."""
    db_path = str(tmp_path / "var" / "catdog.db")
    client, service = in_process(tiny_model(), db_path, **settings)
    write_traffic(client)
    before, stats = every_row(backup.store_source(environ)), live_stats(client)
    photos = backup.photos_source(environ)
    folder = photos.location if photos else str(tmp_path / "no-photos")
    everything = photo_files(folder)
    files = {name: data for name, data in everything.items() if name in kept(before)}
    assert before["feedback"] and before["predictions"] and stats[1] == len(before["feedback"]) and stats[0] < 1
    assert bool(files) == (settings.get("keep_photos", "off") != "off") == (photos is not None)
    if photos:  # pending uploads nobody judged and a half-written file: no part of a backup
        assert len(everything) > len(files)
        open(os.path.join(photos.location, next(iter(files))[:2], ".partial-x1"), "wb").close()
    manifest = backup.backup(str(tmp_path / "backup"), environ, only="store")
    service.close()
    parts = {part["name"]: part["rows"] for part in manifest["parts"]}
    assert parts == {"store": {table: len(rows) for table, rows in before.items()},
                     **({"store-photos": {"files": len(files)}} if files else {})}
    destroy()
    if photos:
        shutil.rmtree(photos.location)

    backup.restore(str(tmp_path / "backup"), environ)
    assert every_row(backup.store_source(environ)) == before and photo_files(folder) == files
    client, service = in_process(tiny_model(), db_path, **settings)
    assert live_stats(client) == stats
    with pytest.raises(backup.Refused, match="restoring would overwrite it"):
        backup.restore(str(tmp_path / "backup"), environ)
    write_traffic(client, count=3, seed=1)  # rows the backup does not have, gone after --force
    backup.restore(str(tmp_path / "backup"), environ, force=True)
    assert every_row(backup.store_source(environ)) == before and photo_files(folder) == files
    service.close()


@pytest.mark.parametrize("keep_photos", ["off", "all"])
def test_sqlite_store_restores_every_row_every_photo_and_the_live_accuracy(tmp_path, keep_photos):
    environ = {"DB_PATH": str(tmp_path / "var" / "catdog.db"), "KEEP_PHOTOS": keep_photos}

    def destroy():
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(environ["DB_PATH"] + suffix):
                os.remove(environ["DB_PATH"] + suffix)
    round_trip(tmp_path, environ, destroy, keep_photos=keep_photos)


def test_a_backup_without_photos_restores_its_rows_once_keeping_is_on(tmp_path):
    """A backup from before KEEP_PHOTOS (or made with it off) holds no photos: its rows restore
    all the same, with or without --only store, and the photos folder is left alone."""
    db = str(tmp_path / "var" / "catdog.db")
    client, service = in_process(tiny_model(), db)
    write_traffic(client, count=3)
    before = every_row(backup.store_source({"DB_PATH": db}))
    service.close()
    manifest = backup.backup(str(tmp_path / "old"), {"DB_PATH": db}, only="store")
    assert [part["name"] for part in manifest["parts"]] == ["store"]
    on = {"DB_PATH": db, "KEEP_PHOTOS": "all"}
    for only in (None, "store"):
        backup.restore(str(tmp_path / "old"), on, only=only, force=True)
        assert every_row(backup.store_source(on)) == before and not os.path.exists(tmp_path / "var" / "photos")


def test_postgres_store_restores_every_row_every_photo_and_the_live_accuracy(tmp_path):
    reason = why_no_postgres()
    if reason:
        pytest.skip(reason)
    with PostgresServer() as pg:
        name = f"catdog_{uuid.uuid4().hex[:8]}"
        url = pg.new_database(name)
        photos = str(tmp_path / "photos")
        environ = {"DATABASE_URL": url, "KEEP_PHOTOS": "corrected", "PHOTOS_DIR": photos}

        def destroy():
            import psycopg

            with psycopg.connect(pg.url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
        round_trip(tmp_path, environ, destroy, database_url=url, keep_photos="corrected", photos_dir=photos)


def test_mlflow_database_and_artifacts_restore(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    environ = {"MLFLOW_TRACKING_URI": uri}
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("catdog", artifact_location=str(tmp_path / "mlruns" / "catdog"))
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "arch", "tiny")
    client.log_metric(run.info.run_id, "accuracy", 0.875)
    (tmp_path / "model.json").write_text('{"version": "tiny-1"}')
    client.log_artifact(run.info.run_id, str(tmp_path / "model.json"), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("catdog")
    client.create_model_version("catdog", f"{run.info.artifact_uri}/model", run.info.run_id)

    manifest = backup.backup(str(tmp_path / "backup"), environ, only="mlflow")
    assert {part["name"]: part["rows"] for part in manifest["parts"]}["mlflow-artifacts"] == {"files": 1}
    os.remove(tmp_path / "mlflow.db")
    subprocess.run(["rm", "-r", str(tmp_path / "mlruns")], check=True)
    backup.restore(str(tmp_path / "backup"), environ)

    client = MlflowClient(tracking_uri=uri)
    again = client.get_run(run.info.run_id)
    assert again.data.params == {"arch": "tiny"} and again.data.metrics == {"accuracy": 0.875}
    assert client.get_model_version("catdog", "1").run_id == run.info.run_id
    local = client.download_artifacts(run.info.run_id, "model/model.json", str(tmp_path / "download"))
    assert open(local).read() == '{"version": "tiny-1"}'

    # A run whose artifacts are outside the folder backed up would restore without them.
    with pytest.raises(backup.Refused, match="runs keep artifacts outside"):
        backup.backup(str(tmp_path / "elsewhere"), {**environ, "MLFLOW_ARTIFACTS_DIR": str(tmp_path / "download")},
                      only="mlflow")


def run_cli(*args, **environ):
    return subprocess.run([sys.executable, os.path.join(ROOT, "backup.py"), *args], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **environ}, cwd=ROOT, timeout=120)


def test_refusals_exit_non_zero_and_name_what_and_where(tmp_path):
    db = str(tmp_path / "catdog.db")
    missing = run_cli("backup", str(tmp_path / "b"), "--only", "store", DB_PATH=db)
    assert missing.returncode != 0 and f"no readable SQLite file at {db}" in missing.stderr
    (tmp_path / "junk.db").write_text("not a database")
    junk = run_cli("backup", str(tmp_path / "b"), "--only", "store", DB_PATH=str(tmp_path / "junk.db"))
    assert junk.returncode != 0 and "junk.db is not a readable SQLite database" in junk.stderr
    assert not os.path.exists(tmp_path / "b")

    client, service = in_process(tiny_model(), db)
    write_traffic(client, count=3)
    service.close()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old").write_text("")
    full = run_cli("backup", str(tmp_path / "full"), "--only", "store", DB_PATH=db)
    assert full.returncode != 0 and f"DEST {tmp_path / 'full'} exists and is not an empty folder" in full.stderr
    done = run_cli("backup", str(tmp_path / "b"), "--only", "store", DB_PATH=db)
    assert done.returncode == 0, done.stderr

    live = run_cli("restore", str(tmp_path / "b"), DB_PATH=db)
    assert live.returncode != 0 and f"the SQLite file {db} exists" in live.stderr and "--force" in live.stderr
    assert run_cli("restore", str(tmp_path / "b"), "--force", DB_PATH=db).returncode == 0
    assert run_cli("check", str(tmp_path / "b")).returncode == 0

    with open(tmp_path / "b" / "store.sqlite", "r+b") as f:  # one flipped byte
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    bad = run_cli("check", str(tmp_path / "b"))
    assert bad.returncode != 0 and "differs from the size and sha256" in bad.stderr
    assert run_cli("restore", str(tmp_path / "b"), "--force", DB_PATH=db).returncode != 0

    nothing = run_cli("restore", str(tmp_path), DB_PATH=db)
    assert nothing.returncode != 0 and "no manifest.json" in nothing.stderr
    no_mlflow = run_cli("backup", str(tmp_path / "c"), "--only", "mlflow",
                        MLFLOW_TRACKING_URI="http://127.0.0.1:1", DB_PATH=db)
    assert no_mlflow.returncode != 0 and "back up a tracking server where it runs" in no_mlflow.stderr
    wrong_url = run_cli("backup", str(tmp_path / "c"), "--only", "store", DATABASE_URL="mysql://x@y/z")
    assert wrong_url.returncode != 0 and "DATABASE_URL must be a postgresql:// URL" in wrong_url.stderr
    no_folder = run_cli("backup", str(tmp_path / "c"), "--only", "store", DATABASE_URL="postgresql://x@y/z",
                        KEEP_PHOTOS="corrected")
    assert no_folder.returncode != 0 and "KEEP_PHOTOS=corrected" in no_folder.stderr and "PHOTOS_DIR" in no_folder.stderr


def test_postgres_tools_take_the_password_from_the_environment_not_the_command_line(monkeypatch):
    """pg_dump's and pg_restore's command lines are readable by every user of the host."""
    seen = {}

    def run(argv, **kwargs):
        seen.update(argv=argv, env=kwargs["env"])
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(backup.subprocess, "run", run)
    monkeypatch.setattr(backup, "postgres_tool", lambda name: name)
    backup.run_tool("pg_dump", "--format=custom", url="postgresql://catdog:s%40cret@db:5432/catdog?sslmode=require")
    assert seen["argv"] == ["pg_dump", "--format=custom", "--dbname=postgresql://catdog@db:5432/catdog?sslmode=require"]
    assert seen["env"]["PGPASSWORD"] == "s@cret"
