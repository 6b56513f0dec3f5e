"""DVC: the pipeline is dvc.yaml's stages (data -> train, their hashes in dvc.lock), the data
lives in DVC, never in git, and `dvc push` then `dvc pull` in a fresh clone restores it byte
for byte."""
import configparser
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, local_imports
from conftest import read_tree as tree

DVC = os.path.join(os.path.dirname(sys.executable), "dvc")
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
       "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}

pytestmark = pytest.mark.skipif(not os.path.exists(DVC), reason="dvc is not installed in this environment")


def sh(*command, cwd):
    return subprocess.run(command, cwd=cwd, env=ENV, check=True, capture_output=True, text=True).stdout


def test_project_config_has_analytics_off_and_a_default_local_remote():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, ".dvc", "config"))
    assert config["core"]["analytics"] == "false"
    remote = config[f"'remote \"{config['core']['remote']}\"'"]["url"]
    assert "://" not in remote  # a plain folder: works on any machine with no credentials


def read_yaml(name):
    with open(os.path.join(ROOT, name)) as f:
        return yaml.safe_load(f)


DATA_OUTS = ["data/manifest.csv", "data/processed", "data/quality_report.json", "data/quality_report.md"]


def test_data_is_a_dvc_stage_output_not_in_git(tmp_path):
    # Two records of the data: dvc.lock (the stages') and data/feedback.dvc (the harvest's).
    assert not os.path.exists(os.path.join(ROOT, "data.dvc"))
    data = read_yaml("dvc.lock")["stages"]["data"]
    # Named one by one: data/feedback, an input of the stage, is inside data/ (and data/raw/,
    # a downloaded zip, is no output: its sha256 is in the quality report).
    assert sorted(out["path"] for out in data["outs"]) == DATA_OUTS
    assert next(out for out in data["outs"] if out["path"] == "data/processed")["md5"].endswith(".dir")
    assert sh("git", "ls-files", "data", cwd=ROOT) == "data/feedback.dvc\n"
    # git ignores everything in data/ but that record, so `git add -A` can never pick up a photo
    # (in a repository of the project's .gitignore alone: a checkout may exclude more locally).
    sh("git", "init", "-q", cwd=tmp_path)
    with open(os.path.join(ROOT, ".gitignore")) as f:
        (tmp_path / ".gitignore").write_text(f.read())
    paths = ["data/feedback.dvc", "data/feedback/cat/a.jpg", "data/processed/train/cat/cat.1.jpg", "data/manifest.csv",
             "data/quality_report.json", "data/raw/pets.zip", "data/.gitignore"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True).stdout.split()
    assert ignored == paths[1:]


def test_pipeline_is_data_then_train_with_every_input_as_a_dependency():
    stages = read_yaml("dvc.yaml")["stages"]
    assert list(stages) == ["data", "train"]
    assert "preprocess.py" in stages["data"]["cmd"] and "train.py" in stages["train"]["cmd"]
    assert set(stages["data"]["deps"]) == local_imports("preprocess.py") | {"data/feedback"}
    assert sorted(stages["data"]["outs"]) == DATA_OUTS
    # train reads data/, and every module it imports (registry_model.py it logs as the MLflow model).
    assert set(stages["train"]["deps"]) == {"data", "requirements.txt", "registry_model.py"} | local_imports("train.py")
    # No out: training is not byte-reproducible, so one would rewrite dvc.lock on every machine.
    assert "outs" not in stages["train"]
    # The lock describes this dvc.yaml: the same deps, stage by stage.
    lock = read_yaml("dvc.lock")["stages"]
    assert {name: sorted(d["path"] for d in stage["deps"]) for name, stage in lock.items()} == \
        {name: sorted(stage["deps"]) for name, stage in stages.items()}


def test_dvc_lock_is_committed_with_the_code_it_describes():
    """Each file dependency's md5 in dvc.lock is the file's: a change to catdog.py, train.py, ...
    without `make data train` (or `dvc commit`) would make every fresh clone rewrite dvc.lock."""
    import hashlib

    for name, stage in read_yaml("dvc.lock")["stages"].items():
        for dep in stage["deps"]:
            path = os.path.join(ROOT, dep["path"])
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    assert hashlib.md5(f.read()).hexdigest() == dep["md5"], f"{name}: {dep['path']} changed since dvc.lock"


def test_the_committed_lock_ran_on_the_committed_harvest_so_a_fresh_clone_reproduces_it():
    """data/feedback is the harvest data/feedback.dvc records (make harvest: dvc add), and the
    lock's data stage ran on that one: commit both together (the runbook's `git add
    data/feedback.dvc dvc.lock`), or a fresh clone's make data reruns on another harvest. `make
    data` restores and checks data/feedback before the stage runs (tests/test_harvest.py runs it)."""
    feedback = next(dep for dep in read_yaml("dvc.lock")["stages"]["data"]["deps"] if dep["path"] == "data/feedback")
    record = read_yaml("data/feedback.dvc")["outs"]
    assert [(out["path"], out["md5"]) for out in record] == [("feedback", feedback["md5"])]
    assert feedback["md5"].endswith(".dir")
    commands = sh("make", "-n", "data", cwd=ROOT)
    assert 0 <= commands.find("checkout --quiet data/feedback.dvc") < commands.find("commit --quiet data/feedback.dvc") \
        < commands.find("dvc repro"), commands


def test_models_record_the_data_hash_dvc_lock_holds(tmp_path, monkeypatch):
    import promote

    outs = read_yaml("dvc.lock")["stages"]["data"]["outs"]
    md5 = next(out["md5"] for out in outs if out["path"] == "data/processed")
    assert promote.dvc_hash(os.path.join(ROOT, "data", "processed")) == md5
    assert promote.dvc_hash(os.path.join(ROOT, "elsewhere", "processed")) is None
    # An output that is the folder above the processed data (as `data` once was) names it too.
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"stages": {"data": {"outs": [{"path": "data", "md5": "0" * 32 + ".dir"}]}}}))
    monkeypatch.setattr(promote, "DVC_LOCK", str(lock))
    assert promote.dvc_hash(os.path.join(ROOT, "data", "processed")) == promote.dvc_hash(os.path.join(ROOT, "data")) \
        == "0" * 32 + ".dir"


@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "data", "processed")), reason="no data/: run make all")
def test_dvc_lock_matches_the_data_make_all_built():
    """`dvc status` (what `make all` asks before any stage) finds nothing to rerun."""
    env = {**ENV, "PATH": os.path.dirname(sys.executable) + os.pathsep + ENV["PATH"]}
    done = subprocess.run([DVC, "status", "--quiet", "data"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_push_then_pull_in_a_fresh_clone_restores_the_data(tmp_path, write_photo):
    repo, clone, remote = tmp_path / "repo", tmp_path / "clone", tmp_path / "remote"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh(DVC, "init", "-q", cwd=repo)
    sh(DVC, "config", "core.analytics", "false", cwd=repo)
    sh(DVC, "remote", "add", "-d", "local", str(remote), cwd=repo)
    for i in range(6):  # the shape `make data` leaves behind
        write_photo(str(repo / "data" / "processed" / "train" / "cat" / f"cat.{i}.jpg"), i)
        write_photo(str(repo / "data" / "processed" / "test" / "dog" / f"dog.{i}.jpg"), 100 + i)
    (repo / "data" / "manifest.csv").write_text("path,sha256\n")
    with open(os.path.join(ROOT, ".gitignore")) as f:
        (repo / ".gitignore").write_text(f.read())

    sh(DVC, "add", "--quiet", "data", cwd=repo)
    sh("git", "add", "data.dvc", ".gitignore", ".dvc", ".dvcignore", cwd=repo)
    sh("git", "commit", "-q", "-m", "data", cwd=repo)
    assert sh("git", "ls-files", "data", cwd=repo) == ""
    sh(DVC, "push", "--quiet", cwd=repo)

    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    assert not (clone / "data").exists()
    sh(DVC, "pull", "--quiet", cwd=clone)
    assert tree(clone / "data") == tree(repo / "data")
    assert len(tree(clone / "data")) == 13
