"""Deployment files checked offline: Dockerfile (hadolint), Compose and GitHub workflows
(their published JSON schemas, actionlint), Kubernetes manifests (kubernetes-validate
--strict, plus the properties a rollout relies on), the deploy shell scripts (shellcheck),
and the Makefile's own list of targets."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from service_helpers import ROOT

BIN = os.path.dirname(sys.executable)
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, ".github", "workflows", "*.yml")))
K8S = sorted(glob.glob(os.path.join(ROOT, "k8s", "*.yaml")))


def tool(name):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        path = shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed")
    return path


def run(*args):
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    return out.returncode, out.stdout + out.stderr


def load(name):
    with open(os.path.join(ROOT, name)) as f:
        return list(yaml.safe_load_all(f))


def test_dockerfile_is_hadolint_clean():
    code, out = run(tool("hadolint"), "Dockerfile")
    assert code == 0, out


def test_compose_file_matches_the_compose_spec():
    code, out = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml")
    assert code == 0, out
    api = load("docker-compose.yml")[0]["services"]["api"]
    assert api["read_only"] is True and "healthcheck" in api and api["restart"] != "no"
    assert any(v.endswith(":/var/lib/catdog") for v in api["volumes"])


def test_workflows_match_the_schema_and_pass_actionlint():
    assert WORKFLOWS
    code, out = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *WORKFLOWS)
    assert code == 0, out
    code, out = run(tool("actionlint"), *WORKFLOWS)
    assert code == 0, out


def test_kubernetes_manifests_validate_strictly(tmp_path):
    validate = tool("kubernetes-validate")
    code, out = run(validate, "--strict", "--quiet", *K8S)
    assert code == 0, out
    # The validator really rejects a misspelt field (readinesProbe), so the pass above means something.
    deployment = load("k8s/deployment.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    code, out = run(validate, "--strict", "--quiet", str(bad))
    assert code != 0 and "readinesProbe" in out, out


def test_deployment_rolls_out_safely_and_runs_locked_down():
    docs = {doc["kind"]: doc for name in K8S for doc in load(os.path.relpath(name, ROOT))}
    spec = docs["Deployment"]["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert spec["replicas"] == 2 and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert docs["Service"]["spec"]["selector"] == spec["selector"]["matchLabels"]


def test_deploy_scripts_pass_shellcheck():
    code, out = run(tool("shellcheck"), "smoke.sh", "deploy.sh", ".ci/run")
    assert code == 0, out


def test_make_help_lists_every_target_with_its_comment():
    with open(os.path.join(ROOT, "Makefile")) as f:
        phony = re.search(r"^\.PHONY:((?:.*\\\n)*.*)", f.read(), re.M).group(1).replace("\\\n", " ").split()
    code, out = run("make", "--no-print-directory", "help")
    listed = dict(re.findall(r"^  make (\S+) +(.+)$", out, re.M))
    assert code == 0, out
    assert len(phony) >= 20 and sorted(listed) == sorted(phony)
    assert listed["test"] == "lint, the whole test suite, then make fuzz"


def test_workflow_actions_are_pinned_by_commit_and_audited():
    """A tag can be moved to other code; a commit cannot. And known vulnerabilities fail a run."""
    for path in WORKFLOWS:
        with open(path) as f:
            text = f.read()
        uses = re.findall(r"uses:\s*(\S+)", text)
        assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    with open(os.path.join(ROOT, ".github", "workflows", "ci.yml")) as f:
        assert "pip-audit --strict --require-hashes" in f.read()
