"""A throwaway PostgreSQL server for the tests and make bench: Debian's postgresql binaries,
initdb + pg_ctl in a temporary folder, listening on 127.0.0.1 only, stopped by its PID.

    with PostgresServer() as pg:
        url = pg.new_database("catdog_test")     # postgresql://catdog@127.0.0.1:PORT/catdog_test
"""
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import catdog

DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"


def binaries():
    """The folder holding initdb and pg_ctl (PG_BINDIR, else PATH's, else Debian's newest), or None."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    on_path = shutil.which("initdb")
    candidates.append(os.path.dirname(os.path.realpath(on_path)) if on_path else "")
    candidates += sorted(glob.glob(DEBIAN_BINARIES), key=lambda d: int(d.split("/")[-2]), reverse=True)
    for folder in filter(None, candidates):
        if all(os.access(os.path.join(folder, tool), os.X_OK) for tool in ("initdb", "pg_ctl")):
            return folder
    return None


def server_user():
    """Who runs the server: PostgreSQL refuses to run as root, so root hands it to the
    `postgres` account Debian's package creates."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return None


def why_unavailable():
    """None when a server can be started here, else the reason (for a skip)."""
    if binaries() is None:
        return "PostgreSQL server binaries not found (Debian: apt-get install postgresql; make system-deps)"
    if os.geteuid() == 0 and server_user() is None:
        return "running as root without a 'postgres' account to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (make setup)"
    return None


class PostgresServer:
    """initdb in a temporary folder, then pg_ctl start on 127.0.0.1:<free port> (trust auth:
    only this machine's loopback reaches it)."""

    def __init__(self, superuser="catdog"):
        self.bin = binaries()
        self.user = server_user()
        self.superuser = superuser
        self.folder = tempfile.mkdtemp(prefix="catdog-pg-")
        self.data = os.path.join(self.folder, "data")
        self.port = catdog.free_port()
        self.pid = None
        if self.user:
            account = pwd.getpwnam(self.user)
            os.chown(self.folder, account.pw_uid, account.pw_gid)

    def _run(self, tool, *args):
        subprocess.run([os.path.join(self.bin, tool), *args], check=True, user=self.user, cwd=self.folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self):
        self._run("initdb", "-D", self.data, "-U", self.superuser, "--auth=trust", "-E", "UTF8", "--no-sync")
        return self.restart()

    def restart(self):
        """Start the server on the data folder (again, after stop_server: same port, same data)."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-o", options,
                  "-l", os.path.join(self.folder, "server.log"))
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())
        return self

    def url(self, database="postgres"):
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def new_database(self, name):
        """A new, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def logs(self):
        with open(os.path.join(self.folder, "server.log"), errors="replace") as f:
            return f.read()

    def stop_server(self, timeout=30):
        """Fast shutdown (SIGINT to the postmaster's PID: sessions end, the server checkpoints)."""
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGINT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                os.kill(self.pid, 0)  # ProcessLookupError once it has exited
                time.sleep(0.05)
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid = None

    def stop(self):
        """Stop the server and delete its data."""
        self.stop_server()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
