"""smoke.sh and deploy.sh against the real serve.py with a tiny model (reddish photos are
cats, bluish ones dogs): smoke passes a correct service and fails a wrong, unsure or absent
one, or one on another store than the host config asks for; deploy.sh keeps a tag that passes,
rolls a failing one back to the last good tag, and refuses to deploy without its host config,
which keeps a cleaned checkout on the same store."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
from PIL import Image

from harness import PostgresServer, why_no_postgres
from service_helpers import ROOT, export_tiny_model, free_port, served, tiny_model

SMOKE = os.path.join(ROOT, "smoke.sh")


def photo(folder, name, rgb):
    path = os.path.join(folder, name)
    Image.new("RGB", (200, 160), rgb).save(path, "JPEG")
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("photos"))
    return {"cat": photo(folder, "red.jpg", (230, 60, 40)), "dog": photo(folder, "blue.jpg", (40, 60, 230)),
            "gray": photo(folder, "gray.jpg", (128, 128, 128))}


def smoke(url, *photos, host_config="/dev/null"):
    """smoke.sh with this host config (/dev/null: none; never the machine's /etc/catdog/catdog.env)."""
    env = {**os.environ, "CATDOG_ENV_FILE": str(host_config)}
    for name in ("API_TOKEN", "DATABASE_URL"):
        env.pop(name, None)
    out = subprocess.run(["bash", SMOKE, url, *photos], env=env, capture_output=True, text=True, timeout=60)
    return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="module")
def right_server(tmp_path_factory):
    yield from served(tmp_path_factory)


@pytest.fixture(scope="module")
def wrong_server(tmp_path_factory):
    # the same service, but the model has its classes the wrong way round
    yield from served(tmp_path_factory, tiny_model("tiny-swapped", dog_if_blue=False))


def test_smoke_passes_a_working_service(right_server, photos):
    code, out = smoke(right_server.url, photos["cat"], photos["dog"])
    assert code == 0 and "smoke: PASS" in out, out
    assert "corrupt uploads -> 4xx" in out and "/metrics counts predictions" in out


def test_smoke_fails_a_model_that_predicts_the_wrong_class(wrong_server, photos):
    code, out = smoke(wrong_server.url, photos["cat"], photos["dog"])
    assert code == 1 and "FAIL" in out and "expected 'cat'" in out, out


def test_smoke_fails_an_unsure_prediction(right_server, photos):
    # gray is neither red nor blue: the model answers at ~0.5, below the 0.9 bar
    code, out = smoke(right_server.url, photos["gray"], photos["dog"])
    assert code == 1 and "confidence" in out, out


def test_smoke_fails_when_nothing_answers(photos):
    code, out = smoke(f"http://127.0.0.1:{free_port()}", photos["cat"], photos["dog"])
    assert code == 1 and "no answer" in out, out


def test_smoke_fails_a_service_on_another_store_than_the_host_config_asks_for(right_server, photos, tmp_path):
    host_config = tmp_path / "catdog.env"
    host_config.write_text("# PostgreSQL for every replica\nDATABASE_URL=postgresql://catdog:s3cret@db:5432/catdog\n")
    code, out = smoke(right_server.url, photos["cat"], photos["dog"], host_config=host_config)
    assert code == 1 and f"/health says store sqlite, but {host_config} asks for postgresql" in out, out
    assert "s3cret" not in out
    host_config.write_text("DATABASE_URL=\n")
    code, out = smoke(right_server.url, photos["cat"], photos["dog"], host_config=host_config)
    assert code == 0 and "store sqlite" in out, out
    code, out = smoke(right_server.url, photos["cat"], photos["dog"], host_config=tmp_path / "missing.env")
    assert code == 1 and f"cannot read the host config {tmp_path / 'missing.env'}" in out, out


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    yield from served(tmp_path_factory, API_TOKEN="t0ken")


def test_smoke_sends_the_host_configs_token(token_server, photos, tmp_path):
    code, out = smoke(token_server.url, photos["cat"], photos["dog"])
    assert code == 1 and "/metrics answered 401" in out, out
    host_config = tmp_path / "catdog.env"
    host_config.write_text('API_TOKEN=wrong\nexport API_TOKEN="t0ken"\n')  # the last line counts, as in Compose
    code, out = smoke(token_server.url, photos["cat"], photos["dog"], host_config=host_config)
    assert code == 0 and "smoke: PASS" in out, out




# deploy.sh with the real podman-compose on the real docker-compose.yml, and a stand-in for
# podman under both: `create` keeps the container's environment (the host config's settings
# included) and port, `start` runs serve.py with them and the model of the image's tag (good-1
# and good-2 are right, bad is swapped). So the real deploy logic (host config, pull, up, health,
# smoke, history, rollback) runs against a real service configured the way Compose configures it.
FAKE_PODMAN = r"""#!{python}
import json, os, signal, subprocess, sys, time

fake, args = os.environ["FAKE"], sys.argv[1:]
with open(os.path.join(fake, "calls"), "a") as f:
    f.write("podman " + " ".join(args) + "\n")
pid_file, container = os.path.join(fake, "pid"), os.path.join(fake, "container.json")


def stop():
    if os.path.exists(pid_file):
        pid = int(open(pid_file).read())
        os.unlink(pid_file)
        try:
            os.kill(pid, signal.SIGTERM)
            while True:
                os.kill(pid, 0)
                time.sleep(0.05)
        except ProcessLookupError:
            pass


command = args[0] if args else ""
if command == "--version":
    print("podman version 4.3.1")
elif command == "ps":
    print("[]")
elif command == "create":
    settings = dict(value.split("=", 1) for flag, value in zip(args, args[1:]) if flag == "-e")
    port = next(value for flag, value in zip(args, args[1:]) if flag == "-p").split(":")[-2]
    json.dump({{"env": settings, "port": port, "image": args[-1]}}, open(container, "w"))
elif command == "start":
    stop()
    c = json.load(open(container))
    env = {{"PATH": os.environ["PATH"], **c["env"], "HOST": "127.0.0.1", "PORT": c["port"],
           "MODEL_PATH": os.path.join(fake, c["image"].rsplit(":", 1)[1], "model.onnx"),
           "DB_PATH": os.path.join(fake, "feedback-volume.db")}}
    with open(os.path.join(fake, "serve.log"), "a") as log:
        p = subprocess.Popen([sys.executable, os.path.join(os.environ["ROOT"], "serve.py")], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    open(pid_file, "w").write(str(p.pid))
elif command in ("stop", "rm"):
    stop()
elif command == "logs":
    print(open(os.path.join(fake, "serve.log")).read()[-3000:])
"""


@pytest.fixture()
def fake_host(tmp_path, photos):
    """deploy(*args, checkout=ROOT, **env) -> (exit code, output); serving() -> /health; the fake's folder;
    the environment deploy.sh runs in."""
    for tag, right in (("good-1", True), ("good-2", True), ("bad", False)):
        export_tiny_model(str(tmp_path / tag), version=tag, dog_if_blue=right, profile=False)
    podman = tmp_path / "podman"
    podman.write_text(FAKE_PODMAN.format(python=sys.executable))
    podman.chmod(stat.S_IRWXU)
    host_config = tmp_path / "etc" / "catdog.env"  # outside the checkout, as on the deploy host
    host_config.parent.mkdir()
    host_config.write_text("API_TOKEN=t0ken\nCORS_ORIGINS=https://shelter.example\n")
    port = free_port()
    compose = f"{os.path.join(os.path.dirname(sys.executable), 'podman-compose')} --podman-path {podman}"
    env = {**os.environ, "FAKE": str(tmp_path), "ROOT": ROOT, "PORT": str(port), "IMAGE": "registry.test/catdog",
           "DOCKER": str(podman), "COMPOSE": compose, "URL": f"http://127.0.0.1:{port}",
           "SMOKE_ARGS": f"{photos['cat']} {photos['dog']}", "DEPLOY_STATE": str(tmp_path / "good"),
           "HEALTH_TIMEOUT": "30", "CATDOG_ENV_FILE": str(host_config)}
    for name in ("API_TOKEN", "DATABASE_URL"):
        env.pop(name, None)

    def deploy(*args, checkout=ROOT, **settings):
        out = subprocess.run([os.path.join(checkout, "deploy.sh"), *args], env={**env, **settings},
                             capture_output=True, text=True, timeout=120)
        return out.returncode, out.stdout + out.stderr

    def serving():
        import requests
        return requests.get(env["URL"] + "/health", timeout=5).json()

    yield deploy, serving, tmp_path, env
    pid_file = tmp_path / "pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_deploy_keeps_good_tags_and_rolls_a_bad_one_back(fake_host):
    deploy, serving, folder, _ = fake_host
    code, out = deploy("good-1")
    assert code == 0 and serving()["model_version"] == "good-1", out
    # Compose gave the api the host config's settings (smoke.sh sent the token /metrics needs).
    assert json.loads((folder / "container.json").read_text())["env"]["CORS_ORIGINS"] == "https://shelter.example"
    code, out = deploy("good-2")
    assert code == 0 and serving()["model_version"] == "good-2", out

    code, out = deploy("bad")
    assert code == 1, out
    assert "expected 'cat'" in out and "rolled back to registry.test/catdog:good-2" in out, out
    assert serving()["model_version"] == "good-2"
    assert (folder / "good").read_text().split() == ["good-1", "good-2"]
    assert "podman pull --quiet registry.test/catdog:bad" in (folder / "calls").read_text()

    code, out = deploy("--rollback")  # one good tag further back
    assert code == 0 and serving()["model_version"] == "good-1", out
    assert (folder / "good").read_text().split() == ["good-1"]
    code, out = deploy("--rollback")
    assert code == 1 and "nothing to roll back to" in out and serving()["model_version"] == "good-1", out


def git(checkout, *args):
    subprocess.run(["git", "-C", str(checkout), "-c", "user.name=ci", "-c", "user.email=ci@localhost", *args],
                   check=True, capture_output=True)


def test_a_cleaned_checkout_deploys_on_the_same_store_and_no_host_config_deploys_nothing(fake_host):
    """A runner's checkout is cleaned (git clean -ffdx) before every release: the host config
    outside it keeps the api on PostgreSQL, and without that file deploy.sh deploys nothing."""
    if why_no_postgres():
        pytest.skip(why_no_postgres())
    deploy, serving, folder, env = fake_host
    checkout = folder / "checkout"
    checkout.mkdir()
    for name in ("deploy.sh", "smoke.sh", "docker-compose.yml", ".gitignore"):
        shutil.copy2(os.path.join(ROOT, name), checkout / name)
    git(checkout, "init", "-q")
    git(checkout, "add", ".")
    git(checkout, "commit", "-q", "-m", "release")
    with PostgresServer() as postgres:
        url = postgres.new_database("catdog_deploy")
        host_config = folder / "etc" / "catdog.env"
        host_config.write_text(f"DATABASE_URL={url}\nAPI_TOKEN=t0ken\n")

        code, out = deploy("good-1", checkout=checkout)
        assert code == 0 and serving()["store"] == "postgresql" and "store postgresql" in out, out
        (checkout / ".deploy").mkdir()  # what a deploy host accumulates in its checkout
        (checkout / "postgres.env").write_text(f"DATABASE_URL={url}\n")
        git(checkout, "clean", "-ffdx")
        assert sorted(os.listdir(checkout)) == [".git", ".gitignore", "deploy.sh", "docker-compose.yml", "smoke.sh"]
        code, out = deploy("good-2", checkout=checkout)
        health = serving()
        assert code == 0 and (health["model_version"], health["store"]) == ("good-2", "postgresql"), out
        assert json.loads((folder / "container.json").read_text())["env"]["DATABASE_URL"] == url

    (folder / "calls").unlink()
    host_config.unlink()
    code, out = deploy("good-1", checkout=checkout)
    assert code == 1 and f"no host config at {host_config} (CATDOG_ENV_FILE" in out and "nothing deployed" in out, out
    assert not (folder / "calls").exists() and serving()["model_version"] == "good-2"  # nothing pulled or started
    if not os.path.exists("/etc/catdog/catdog.env"):  # unset: the documented default, absent on this machine
        code, out = deploy("good-1", checkout=checkout, CATDOG_ENV_FILE="")
        assert code == 1 and "no host config at /etc/catdog/catdog.env" in out, out
    # Compose alone refuses too: the api's env_file is required.
    up = subprocess.run([*env["COMPOSE"].split(), "up", "-d", "api"], cwd=checkout, env={**env, "TAG": "good-1"},
                        capture_output=True, text=True, timeout=60)
    assert up.returncode != 0 and f"Env file at {host_config} does not exist" in up.stderr, up.stderr
    assert "podman create" not in (folder / "calls").read_text()

    # The opt-out: no host config at all, SQLite in the volume (and smoke.sh expects it).
    code, out = deploy("good-1", checkout=checkout, CATDOG_ENV_FILE="/dev/null")
    assert code == 0 and serving()["store"] == "sqlite", out
    # A host config inside the checkout would go with the next clean; one still holding the
    # example's placeholders was never filled in.
    (checkout / "catdog.env").write_text(f"DATABASE_URL={url}\n")
    code, out = deploy("good-2", checkout=checkout, CATDOG_ENV_FILE=str(checkout / "catdog.env"))
    assert code == 1 and "is inside the checkout" in out, out
    shutil.copy(os.path.join(ROOT, "catdog.env.example"), host_config)
    code, out = deploy("good-2", checkout=checkout)
    assert code == 1 and "still holds a change-me" in out and serving()["model_version"] == "good-1", out
