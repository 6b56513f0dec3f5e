"""smoke.sh and deploy.sh against the real serve.py with a tiny model (reddish photos are
cats, bluish ones dogs): smoke passes a correct service and fails a wrong, unsure or absent
one; deploy.sh keeps a tag that passes and rolls a failing one back to the last good tag."""
import os
import signal
import stat
import subprocess
import sys

import pytest
from PIL import Image

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


def smoke(url, *photos):
    out = subprocess.run(["bash", SMOKE, url, *photos], capture_output=True, text=True, timeout=60)
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


# deploy.sh with stand-ins for docker and compose: `compose up` runs serve.py with the
# model of $TAG (good-1 and good-2 are right, bad is swapped), so the real deploy logic
# (pull, up, health, smoke, history, rollback) runs against a real service.
FAKE_DOCKER = "#!/bin/sh\necho \"docker $*\" >> \"$FAKE/calls\"\n"
FAKE_COMPOSE = """#!/usr/bin/env bash
set -e
echo "compose $* TAG=$TAG" >> "$FAKE/calls"
if [ -f "$FAKE/pid" ]; then
  kill "$(cat "$FAKE/pid")" 2>/dev/null || true
  while kill -0 "$(cat "$FAKE/pid")" 2>/dev/null; do sleep 0.05; done
  rm -f "$FAKE/pid"
fi
if [ "$1" = up ]; then
  MODEL_PATH="$FAKE/$TAG/model.onnx" HOST=127.0.0.1 DB_PATH="$FAKE/catdog.db" \\
    "$PYTHON" "$ROOT/serve.py" >> "$FAKE/serve.log" 2>&1 &
  echo $! > "$FAKE/pid"
fi
"""


@pytest.fixture()
def fake_host(tmp_path, photos):
    for tag, right in (("good-1", True), ("good-2", True), ("bad", False)):
        export_tiny_model(str(tmp_path / tag), version=tag, dog_if_blue=right, profile=False)
    for name, text in (("docker", FAKE_DOCKER), ("compose", FAKE_COMPOSE)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(stat.S_IRWXU)
    port = free_port()
    env = {**os.environ, "FAKE": str(tmp_path), "PYTHON": sys.executable, "ROOT": ROOT, "PORT": str(port),
           "IMAGE": "registry.test/catdog", "DOCKER": str(tmp_path / "docker"), "COMPOSE": str(tmp_path / "compose"),
           "URL": f"http://127.0.0.1:{port}", "SMOKE_ARGS": f"{photos['cat']} {photos['dog']}",
           "DEPLOY_STATE": str(tmp_path / "good"), "HEALTH_TIMEOUT": "30"}

    def deploy(*args):
        out = subprocess.run([os.path.join(ROOT, "deploy.sh"), *args], env=env, capture_output=True, text=True,
                             timeout=120)
        return out.returncode, out.stdout + out.stderr

    def serving():
        import requests
        return requests.get(env["URL"] + "/health", timeout=5).json()["model_version"]

    yield deploy, serving, tmp_path
    pid_file = tmp_path / "pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_deploy_keeps_good_tags_and_rolls_a_bad_one_back(fake_host):
    deploy, serving, folder = fake_host
    code, out = deploy("good-1")
    assert code == 0 and serving() == "good-1", out
    code, out = deploy("good-2")
    assert code == 0 and serving() == "good-2", out

    code, out = deploy("bad")
    assert code == 1, out
    assert "expected 'cat'" in out and "rolled back to registry.test/catdog:good-2" in out, out
    assert serving() == "good-2"
    assert (folder / "good").read_text().split() == ["good-1", "good-2"]
    assert "docker pull --quiet registry.test/catdog:bad" in (folder / "calls").read_text()

    code, out = deploy("--rollback")  # one good tag further back
    assert code == 0 and serving() == "good-1", out
    assert (folder / "good").read_text().split() == ["good-1"]
    code, out = deploy("--rollback")
    assert code == 1 and "nothing to roll back to" in out and serving() == "good-1", out
