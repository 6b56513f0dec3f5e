"""DVC: the data lives in DVC, never in git, and `make data && dvc push` then `dvc pull`
in a fresh clone restores it byte for byte."""
import configparser
import os
import subprocess
import sys

import pytest

from conftest import ROOT
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


def test_data_is_tracked_by_dvc_not_git():
    with open(os.path.join(ROOT, "data.dvc")) as f:
        assert "path: data\n" in f.read()
    assert sh("git", "ls-files", "data", cwd=ROOT) == ""
    # git ignores the data folder itself, so `git add -A` can never pick up a photo.
    assert sh("git", "check-ignore", "data/processed/train/cat/cat.1.jpg", cwd=ROOT).strip()


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
    (repo / ".gitignore").write_text("/data/\n")  # as in the project

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
