"""The GitHub workflows, which cannot run here: actionlint over them all, and their shape parsed
from the YAML. ci.yml (pull requests, pushes) lints, runs `make test` with REQUIRE_ALL_TOOLS,
builds the image around the tiny model and smoke-tests it, and never trains on the archive;
train.yml trains on dispatch, on a schedule and on changed training inputs against the
tracking server of the secrets; release.yml builds the champion's image, deploys it on a
runner of its own label, one at a time per environment, with a rollback on dispatch. Also
REQUIRE_ALL_TOOLS itself: conftest's hook and `make system-deps`."""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import yaml

from service_helpers import ROOT
from test_manifests import WORKFLOWS, run, tool

PINNED = re.compile(r"^\s*(?:-\s+)?uses:\s*([\w.-]+/[\w./-]+)@([0-9a-f]{40})\s+#\s*v\d+(?:\.\d+)*\s*$")
TINY_TRAIN = re.compile(r"\bmake\b[^\n]*\b(?:all|data|train)\b|\btrain\.py\b|\bpreprocess\.py\b")


def workflow(name):
    with open(os.path.join(ROOT, ".github", "workflows", name)) as f:
        doc = yaml.safe_load(f)
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def steps(job):
    return job.get("steps", [])


def commands(job):
    return "\n".join(step.get("run", "") for step in steps(job))


def job_running(doc, pattern):
    """The jobs whose steps run a command matching pattern."""
    return {name: job for name, job in doc["jobs"].items() if re.search(pattern, commands(job))}


def env_of(doc, job, pattern):
    """The environment of the step of job that runs pattern: the workflow's, the job's, the step's."""
    (step,) = [step for step in steps(job) if re.search(pattern, step.get("run", ""))]
    return {**doc.get("env", {}), **job.get("env", {}), **step.get("env", {})}


def secret(name):
    return re.compile(r"\$\{\{\s*secrets\." + name + r"\s*\}\}")


def labels(job):
    runs_on = job["runs-on"]
    return [runs_on] if isinstance(runs_on, str) else list(runs_on)


def test_workflows_pass_actionlint():
    """actionlint (with shellcheck over every run: script when shellcheck is on PATH) and the
    custom runner labels in .github/actionlint.yaml."""
    assert {os.path.basename(p) for p in WORKFLOWS} >= {"ci.yml", "train.yml", "release.yml"}
    code, out = run(tool("actionlint"), *WORKFLOWS)
    assert code == 0, out


def test_every_action_is_pinned_by_commit_with_its_version_and_jobs_have_minimal_permissions():
    for path in WORKFLOWS:
        with open(path) as f:
            lines = [line for line in f if re.match(r"^\s*(?:-\s+)?uses:", line)]
        assert lines, path
        for line in lines:
            assert PINNED.match(line), f"{os.path.basename(path)}: not pinned by commit with '# vX.Y.Z': {line}"
        doc = workflow(os.path.basename(path))
        assert doc.get("permissions") == {}, f"{path}: the workflow grants nothing by default"
        for name, job in doc["jobs"].items():
            granted = job.get("permissions")
            assert isinstance(granted, dict), f"{path}: job {name} states its permissions"
            writes = {scope for scope, level in granted.items() if level == "write"}
            assert writes <= {"packages"}, (name, granted)
            if "packages" in writes:
                assert re.search(r"\bmake push\b", commands(job)), f"{name} may write packages only to push"


def test_ci_lints_tests_builds_and_smokes_without_training_on_the_archive():
    doc = workflow("ci.yml")
    assert {"push", "pull_request"} <= set(doc["on"])
    text = "\n".join(commands(job) for job in doc["jobs"].values())
    assert not TINY_TRAIN.search(text), TINY_TRAIN.search(text).group(0)
    assert not re.search(r"\bmake (?:push|deploy|rollback)\b", text), "the tiny model's image is never shipped"
    assert "pip-audit --strict --require-hashes" in text
    (lint_job,) = job_running(doc, r"\bmake lint\b").values()
    lint = commands(lint_job)
    assert "pip install \"$(grep -E '^ruff==' requirements-dev.txt)\"" in lint, "ruff alone, at the dev lock's pin"
    assert "make lint RUFF=ruff" in lint and not re.search(r"requirements\.txt|make (?:setup|test)\b", lint)
    (test_job,) = job_running(doc, r"\bmake test\b").values()
    assert env_of(doc, test_job, r"\bmake test\b").get("REQUIRE_ALL_TOOLS") == "1"
    assert env_of(doc, test_job, r"\bmake system-deps$").get("REQUIRE_ALL_TOOLS") == "1"
    assert "make system-deps" in commands(test_job)
    (image_job,) = job_running(doc, r"\bmake image\b").values()
    run_lines = [step.get("run", "") for step in steps(image_job)]
    order = [next(i for i, r in enumerate(run_lines) if re.search(pattern, r))
             for pattern in (r"\bmake smoke-model\b", r"\bmake image\b", r"\./smoke\.sh |\bmake smoke(?![\w-])")]
    assert order == sorted(order), "smoke-model, then image, then smoke"
    assert "--read-only" in commands(image_job)


def test_train_runs_on_dispatch_schedule_and_changed_inputs_against_the_secret_tracking_server():
    doc = workflow("train.yml")
    on = doc["on"]
    assert "workflow_dispatch" in on
    assert on["schedule"] and all(re.fullmatch(r"(\S+\s+){4}\S+", entry["cron"]) for entry in on["schedule"])
    paths = on["push"]["paths"]
    assert {"train.py", "evaluate.py", "promote.py", "other.py", "nets.py", "catdog.py", "preprocess.py",
            "requirements.txt"} <= set(paths)
    assert "README.md" not in paths and "**" not in paths
    (train_job,) = job_running(doc, r"\bmake all\b").values()
    env = env_of(doc, train_job, r"\bmake all\b")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert secret(name).fullmatch(env[name]), name
    assert train_job["timeout-minutes"] >= 120
    assert doc["concurrency"]["cancel-in-progress"] is False


def test_release_builds_the_champion_deploys_on_a_dedicated_runner_and_rolls_back_on_dispatch():
    doc = workflow("release.yml")
    on = doc["on"]
    assert set(on["workflow_run"]["workflows"]) == {"ci", "train"} and on["workflow_run"]["branches"] == ["main"]
    assert workflow("ci.yml")["name"] == "ci" and workflow("train.yml")["name"] == "train"
    action = on["workflow_dispatch"]["inputs"]["action"]
    assert set(action["options"]) == {"deploy", "rollback"} and action["default"] == "deploy"
    (image_job,) = job_running(doc, r"\bmake image\b").values()
    # After train or on demand too, only a commit ci passed on is released: checked first.
    first = steps(image_job)[0]["run"]
    assert re.search(r"gh run list .*--workflow ci\.yml --commit \"\$SHA\"", first) and "--status success" in first
    assert "head_sha" in steps(image_job)[0]["env"]["SHA"] and image_job["permissions"]["actions"] == "read"
    # The champion's version, resolved once (an alias looked up twice could move in between).
    assert 'get_model_version_by_alias("catdog", "champion")' in commands(image_job)
    assert 'MODEL_URI="models:/catdog/$VERSION"' in commands(image_job)
    assert re.search(r"\bmake push\b", commands(image_job)) and "ghcr.io/" in commands(image_job)
    assert re.search(r"\./smoke\.sh ", commands(image_job)), "the image is smoke-tested before it is pushed"
    assert secret("MLFLOW_TRACKING_URI").fullmatch(env_of(doc, image_job, r"\bmake image\b")["MLFLOW_TRACKING_URI"])
    deploy = job_running(doc, r"\bmake deploy\b")
    rollback = job_running(doc, r"\bmake rollback\b")
    assert len(deploy) == len(rollback) == 1
    for name, job in {**deploy, **rollback}.items():
        assert "self-hosted" in labels(job) and "catdog-deploy" in labels(job), (name, job["runs-on"])
        assert job["environment"] == "production"
        assert "DEPLOY_STATE" in job["env"] and "SMOKE_ARGS=" in commands(job), name
    (rollback_job,) = rollback.values()
    assert "inputs.action == 'rollback'" in rollback_job["if"]
    (deploy_job,) = deploy.values()
    assert deploy_job["needs"] == "image"
    # Every deploy and rollback waits for the one before, whatever triggered it.
    assert "production" in doc["concurrency"]["group"] and doc["concurrency"]["cancel-in-progress"] is False
    with open(os.path.join(ROOT, ".github", "actionlint.yaml")) as f:
        assert "catdog-deploy" in yaml.safe_load(f)["self-hosted-runner"]["labels"]


def test_release_builds_only_when_the_serving_code_or_the_champion_changed():
    """The image tag hashes what the Dockerfile copies besides the model, plus the champion's
    version; a run triggered by ci or train whose tag is in GHCR already builds and deploys nothing."""
    doc = workflow("release.yml")
    (image_job,) = job_running(doc, r"\bmake image\b").values()
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        copied = {source.rstrip("/") for line in f if line.startswith("COPY ") and "--from" not in line
                  for source in line.split()[1:-1] if "MODEL_DIR" not in source}
    assert set(image_job["env"]["SERVING_INPUTS"].split()) == copied | {"Dockerfile", ".dockerignore"}
    (names,) = [step for step in steps(image_job) if step.get("id") == "names"]
    assert "git ls-files -s $SERVING_INPUTS" in names["run"] and 'tag="serve-$inputs-v$VERSION"' in names["run"]
    assert re.search(r'"\$DISPATCHED" != true \] && docker manifest inspect "\$image:\$tag"', names["run"])
    built = [step for step in steps(image_job) if re.search(r"make (image|push)|smoke\.sh", step.get("run", ""))]
    assert built and all(step["if"] == "steps.names.outputs.tag != ''" for step in built)
    logins = [i for i, step in enumerate(steps(image_job)) if "login-action" in step.get("uses", "")]
    assert logins and logins[0] < steps(image_job).index(names), "GHCR is asked only after logging in"
    assert job_running(doc, r"\bmake deploy\b")["deploy"]["if"] == "needs.image.outputs.tag != ''"


SKIPPING = '''
import pytest

def test_tool_missing():
    pytest.skip("promtool is not installed")

@pytest.mark.skipif(True, reason="Debian chromium is not installed (make system-deps installs it)")
def test_marked():
    pass

@pytest.fixture
def server():
    pytest.skip("PostgreSQL server binaries not found")

def test_fixture(server):
    pass

def test_data_absent():
    pytest.skip("the shared sample ../shared/datasets/dogs-vs-cats-3k is absent")

def test_no_champion():
    pytest.skip("no champion yet: models/model.onnx comes from `make train`")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False

def test_fine():
    pass
'''


def outcomes(folder, require):
    """{test name: outcome} of a pytest run over folder with tests/conftest.py as a plugin."""
    env = {k: v for k, v in os.environ.items() if k != "REQUIRE_ALL_TOOLS"}
    env.update(PYTHONPATH=os.path.join(ROOT, "tests"), PYTHONDONTWRITEBYTECODE="1",
               **({"REQUIRE_ALL_TOOLS": require} if require is not None else {}))
    junit = os.path.join(folder, "junit.xml")
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
                          "-c", os.devnull, "--rootdir", folder, f"--junitxml={junit}", "-q", folder],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    found = {}
    for case in ET.parse(junit).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        found[case.get("name")] = kinds[0] if kinds else "passed"
    return found, out.stdout + out.stderr


@pytest.mark.parametrize("require", [None, "0"])
def test_skips_stay_skips_without_require_all_tools(tmp_path, require):
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    found, out = outcomes(str(tmp_path), require)
    assert found == {"test_tool_missing": "skipped", "test_marked": "skipped", "test_fixture": "skipped",
                     "test_data_absent": "skipped", "test_no_champion": "skipped",
                     "test_expected_failure": "skipped", "test_fine": "passed"}, out


def test_require_all_tools_fails_skips_for_missing_tools_but_not_for_absent_data(tmp_path):
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    found, out = outcomes(str(tmp_path), "1")
    # junit: a failed setup is an error, a failed test a failure; xfail stays xfail.
    assert found == {"test_tool_missing": "failure", "test_marked": "error", "test_fixture": "error",
                     "test_data_absent": "skipped", "test_no_champion": "skipped",
                     "test_expected_failure": "skipped", "test_fine": "passed"}, out
    assert "REQUIRE_ALL_TOOLS is set: this skip is a failure: promtool is not installed" in out
    assert "1 xfailed" in out


def test_require_all_tools_fails_a_module_skipped_at_collection(tmp_path):
    (tmp_path / "test_module.py").write_text('import pytest\npytest.importorskip("catdog_no_such_module")\n'
                                             "def test_x():\n    pass\n")
    found, out = outcomes(str(tmp_path), None)
    assert "1 skipped" in out, out
    found, out = outcomes(str(tmp_path), "1")
    assert "REQUIRE_ALL_TOOLS is set" in out and "catdog_no_such_module" in out and "1 error" in out, out


def make(*args, **env):
    out = subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**{k: v for k, v in os.environ.items() if k != "REQUIRE_ALL_TOOLS"},
                                           **env})
    return out.returncode, out.stdout + out.stderr


def test_make_lint_with_ruff_on_path_needs_no_venv():
    """CI's lint job has ruff alone: `make lint RUFF=ruff` runs make lint's one command and sets up nothing."""
    code, out = make("-n", "lint", "RUFF=ruff")
    assert code == 0 and len(out.splitlines()) == 1 and out.startswith("ruff check --select "), out


def test_system_deps_fails_on_a_missing_package_only_with_require_all_tools():
    # APT_GET=false: an installer that never installs anything, so nothing is installed here.
    missing = ("system-deps", "APT_PACKAGES=catdog-no-such-package", "APT_GET=false")
    code, out = make(*missing)
    assert code == 0 and "missing Debian packages: catdog-no-such-package (tests that need them will skip)" in out, out
    code, out = make(*missing, REQUIRE_ALL_TOOLS="1")
    assert code != 0 and "REQUIRE_ALL_TOOLS=1" in out, out
    code, out = make(*missing, "REQUIRE_ALL_TOOLS=1")
    assert code != 0, out
    code, out = make("system-deps", "APT_PACKAGES=make", "APT_GET=false", REQUIRE_ALL_TOOLS="1")
    assert code == 0 and "missing" not in out, out


def test_the_base_image_is_pinned_by_digest_and_dependabot_moves_the_action_pins():
    """Every stage of the serving image starts from BASE_IMAGE, whose default is the tag with
    its digest; Dependabot proposes new action commits as reviewed changes."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.M)
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    assert set(re.findall(r"^FROM (\S+)", dockerfile, re.M)) == {"${BASE_IMAGE}"}
    with open(os.path.join(ROOT, ".github", "dependabot.yml")) as f:
        updates = yaml.safe_load(f)["updates"]
    assert [u["package-ecosystem"] for u in updates] == ["github-actions"]
    assert updates[0]["directory"] == "/" and updates[0]["schedule"]["interval"]
