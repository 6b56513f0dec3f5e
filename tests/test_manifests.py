"""Deployment files checked offline: Dockerfile (hadolint), Compose and GitHub workflows
(their published JSON schemas, actionlint), Kubernetes manifests (kubernetes-validate
--strict, plus the properties a rollout relies on), the deploy shell scripts (shellcheck),
the Makefile's own list of targets, and the README's tables of targets and variables."""
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import local_imports
from service_helpers import ROOT

BIN = os.path.dirname(sys.executable)
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, ".github", "workflows", "*.yml")))
# The api as a kustomize base and the overlays that deploy it; the example Secret is outside
# the kustomization, so that no placeholder token is ever applied.
K8S_BASE = os.path.join(ROOT, "k8s", "base")
K8S_OVERLAYS = sorted(glob.glob(os.path.join(ROOT, "k8s", "overlays", "*", "")))
API_SECRET = os.path.join(K8S_BASE, "secret.yaml.example")
# The database for clusters without a managed one; the example Secret is not *.yaml, so that
# `kubectl apply -f k8s/postgres/` never applies its placeholder password.
POSTGRES_K8S = sorted(glob.glob(os.path.join(ROOT, "k8s", "postgres", "*.yaml")))
POSTGRES_SECRET = os.path.join(ROOT, "k8s", "postgres", "secret.yaml.example")
KEEP_PHOTOS_K8S = os.path.join(ROOT, "k8s", "components", "keep-photos")  # an overlay opts in


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


def kustomize(path, out_dir):
    """`kubectl kustomize path` written to a file in out_dir, and its objects by kind."""
    code, out = run(tool("kubectl"), "kustomize", path)
    assert code == 0, out
    rendered = out_dir / f"{os.path.basename(os.path.normpath(path))}.yaml"
    rendered.write_text(out)
    docs = list(yaml.safe_load_all(out))
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return rendered, by_kind


def with_kept_photos(tmp_path):
    """An overlay in tmp_path: the base with the keep-photos component (kustomize takes relative paths only)."""
    overlay = tmp_path / "keep-photos"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S_BASE, overlay)], "components": [os.path.relpath(KEEP_PHOTOS_K8S, overlay)]}))
    return str(overlay)


def test_kubernetes_manifests_validate_strictly(tmp_path):
    validate = tool("kubernetes-validate")
    assert POSTGRES_K8S and K8S_OVERLAYS
    rendered = [str(kustomize(path, tmp_path)[0]) for path in (K8S_BASE, *K8S_OVERLAYS, with_kept_photos(tmp_path))]
    code, out = run(validate, "--strict", "--quiet", *rendered, *POSTGRES_K8S, POSTGRES_SECRET, API_SECRET)
    assert code == 0, out
    # The validator really rejects a misspelt field (readinesProbe), so the pass above means something.
    deployment = load("k8s/base/deployment.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    code, out = run(validate, "--strict", "--quiet", str(bad))
    assert code != 0 and "readinesProbe" in out, out


@pytest.mark.parametrize("overlay", K8S_OVERLAYS, ids=lambda path: os.path.basename(os.path.normpath(path)))
def test_deployment_rolls_out_safely_and_runs_locked_down(overlay, tmp_path):
    _, docs = kustomize(overlay, tmp_path)
    spec = docs["Deployment"]["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    labels = spec["selector"]["matchLabels"]
    assert labels.items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # A tag can be moved to other bytes; a digest cannot.
    assert re.fullmatch(r"[a-z0-9.-]+/[a-z0-9._/-]+@sha256:[0-9a-f]{64}", container["image"]), container["image"]
    # The HPA alone sets the number of pods: a replicas here would reset it on every apply.
    assert "replicas" not in spec
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] >= 2
    assert docs["PodDisruptionBudget"]["spec"] == {"minAvailable": 1, "selector": {"matchLabels": labels}}
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == labels
    service = docs["Service"]
    assert service["spec"]["selector"] == labels
    # The Ingress sends HTTPS for its host to the Service, with the certificate from a TLS Secret.
    ingress = docs["Ingress"]["spec"]
    (tls,) = ingress["tls"]
    (rule,) = ingress["rules"]
    assert tls["secretName"] and tls["hosts"] == [rule["host"]]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": service["spec"]["ports"][0]["name"]}}
    # Only the ingress controller and the scraper reach the api, on its port; it reaches DNS and PostgreSQL.
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == labels and policy["policyTypes"] == ["Ingress", "Egress"]
    (allowed,) = policy["ingress"]
    assert allowed["ports"] == [{"port": container["ports"][0]["containerPort"]}] and len(allowed["from"]) == 2
    egress_ports = sorted(port["port"] for rule in policy["egress"] for port in rule["ports"])
    assert egress_ports == [53, 53, 5432]


def test_deployment_reads_database_url_and_token_from_secrets():
    """Every replica must share one store: DATABASE_URL comes from a Secret, and a missing Secret
    stops the pods (no silent per-pod SQLite). The API token likewise: a forgotten Secret stops
    the pods rather than leaving /feedback, /stats and /metrics open."""
    container = load("k8s/base/deployment.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    (secret,) = load(os.path.relpath(API_SECRET, ROOT))
    refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in ("DATABASE_URL", "API_TOKEN")}
    assert refs["DATABASE_URL"] == {"name": "catdog-database", "key": "url"}
    assert refs["API_TOKEN"] == {"name": secret["metadata"]["name"], "key": "token"} and secret["metadata"]["name"] == "catdog-api"
    assert set(secret["stringData"]) == {"token"} and "REPLACE-ME" in secret["stringData"]["token"]
    # The example is no resource of the base: kubectl apply -k never applies its placeholder.
    kustomization = load("k8s/base/kustomization.yaml")[0]
    assert os.path.basename(API_SECRET) not in kustomization["resources"]


def test_kept_photos_are_one_volume_every_replica_mounts_at_photos_dir(tmp_path):
    """Off in the base (an unused folder); the component keeps them in one ReadWriteMany claim,
    since a photo uploaded to one pod is judged through another."""
    for path, mode in ((K8S_BASE, None), (with_kept_photos(tmp_path), "corrected")):
        _, docs = kustomize(path, tmp_path)
        pod = docs["Deployment"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] == "photos")
        assert mounts["photos"] == env["PHOTOS_DIR"] and env.get("KEEP_PHOTOS") == mode
        if mode is None:
            assert "PersistentVolumeClaim" not in docs and set(volume) == {"name", "emptyDir"}
        else:
            claim = docs["PersistentVolumeClaim"]
            assert volume == {"name": "photos", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # Per-pod SQLite files beside one shared folder: one pod's retention deletes another's photos.
    with open(os.path.join(KEEP_PHOTOS_K8S, "kustomization.yaml")) as f:
        assert "Requires DATABASE_URL (PostgreSQL" in f.read()


def test_kubernetes_postgres_is_persistent_probed_and_locked_down():
    docs = {doc["kind"]: doc for name in POSTGRES_K8S for doc in load(os.path.relpath(name, ROOT))}
    (secret,) = load(os.path.relpath(POSTGRES_SECRET, ROOT))
    sts, service = docs["StatefulSet"], docs["Service"]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 1 and spec["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 5432
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/var/lib/postgresql/data"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")  # not the volume's root
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"][0] == "pg_isready", probe
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 999
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The example Secret has the keys the two workloads read, a placeholder, and a url that
    # names this Service, user and database.
    password = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password["name"] == secret["metadata"]["name"] == "catdog-database"
    assert set(secret["stringData"]) == {password["key"], "url"}
    assert "REPLACE-ME" in secret["stringData"]["password"]
    user, db = env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]
    assert secret["stringData"]["url"] == (f"postgresql://{user}:{secret['stringData']['password']}"
                                           f"@{service['metadata']['name']}:5432/{db}")
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    api_labels = load("k8s/base/deployment.yaml")[0]["spec"]["selector"]["matchLabels"]
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == api_labels


HOST_CONFIG = {"path": "${CATDOG_ENV_FILE:-/etc/catdog/catdog.env}", "required": True}


def test_compose_reads_the_host_config_and_limits_the_api():
    """Settings and secrets come from one required file outside the checkout (a missing one stops
    Compose, never a silent SQLite start); the api has memory and CPU limits; Grafana has no
    default admin password."""
    services = load("docker-compose.yml")[0]["services"]
    api, grafana = services["api"], services["grafana"]
    assert api["env_file"] == grafana["env_file"] == services["postgres"]["env_file"] == [HOST_CONFIG]
    assert api["environment"].keys() == {"DB_PATH", "PHOTOS_DIR"}  # the rest is the host's
    # The kept photos: one named volume, where the api keeps them and the backup reads them.
    backup = services["backup"]
    for service in (api, backup):
        assert f"photos:{service['environment']['PHOTOS_DIR']}" in service["volumes"]
    assert "photos" in load("docker-compose.yml")[0]["volumes"]
    assert api["mem_limit"] == "1g" and api["cpus"] == 2
    assert not any(k.startswith("GF_SECURITY_ADMIN") for k in grafana["environment"])
    # The entrypoint (Compose's $$ is a $) refuses to start without the password, else hands it over.
    entrypoint = [part.replace("$$", "$") for part in grafana["entrypoint"]]
    env = {"PATH": os.environ["PATH"]}
    out = subprocess.run(entrypoint, env=env, capture_output=True, text=True, timeout=10)
    assert out.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD in the host config" in out.stderr, out.stderr
    shell = entrypoint[:2] + [entrypoint[2].replace("exec /run.sh", "exec env")]  # env: what /run.sh would get
    secrets = {"GRAFANA_ADMIN_PASSWORD": "s3cret", "API_TOKEN": "t0ken", "DATABASE_URL": "postgresql://u:pw@db/catdog"}
    out = subprocess.run(shell, env={**env, **secrets}, capture_output=True, text=True)
    assert out.returncode == 0 and "GF_SECURITY_ADMIN_PASSWORD=s3cret\n" in out.stdout, out.stderr
    assert "t0ken" not in out.stdout and "pw@db" not in out.stdout  # the host config's other secrets stay out
    # The example holds every setting the issue names, and stays in git while the real file cannot.
    with open(os.path.join(ROOT, "catdog.env.example")) as f:
        example = f.read()
    for name in ("DATABASE_URL", "API_TOKEN", "CORS_ORIGINS", "MAX_UPLOAD_MB", "GRAFANA_ADMIN_PASSWORD", "KEEP_PHOTOS",
                 "PHOTOS_DIR", "KEEP_CONFIRMED_SHARE", "KEEP_PENDING_HOURS"):
        assert re.search(rf"^#?{name}=", example, re.M), name
    if shutil.which("git") and os.path.isdir(os.path.join(ROOT, ".git")):
        assert subprocess.run(["git", "check-ignore", "-q", "catdog.env"], cwd=ROOT).returncode == 0
        assert subprocess.run(["git", "check-ignore", "-q", "catdog.env.example"], cwd=ROOT).returncode == 1


def test_the_backup_service_mounts_every_module_backup_py_imports():
    """The backup service runs the checkout's backup.py in the api image: each project module it
    imports must be mounted beside it, or the scheduled backup dies on its first import."""
    mounted = {volume.split(":")[0] for volume in load("docker-compose.yml")[0]["services"]["backup"]["volumes"]}
    assert {f"./{path}" for path in local_imports("backup.py")} <= mounted
    assert "./backup.py" in mounted


def test_compose_postgres_profile_and_the_host_config():
    """The api stores in SQLite unless the host config gives it DATABASE_URL; the opt-in postgres
    profile runs the official image (or POSTGRES_IMAGE) on a named volume, healthchecked."""
    services = load("docker-compose.yml")[0]["services"]
    api, postgres = services["api"], services["postgres"]
    assert "profiles" not in api and postgres["profiles"] == ["postgres"]
    assert "DATABASE_URL" not in api["environment"]
    assert postgres["image"].startswith("${POSTGRES_IMAGE:-postgres:")
    assert "POSTGRES_PASSWORD" not in postgres.get("environment", {})
    (volume,) = postgres["volumes"]
    name, path = volume.split(":")
    assert path == "/var/lib/postgresql/data" and name in load("docker-compose.yml")[0]["volumes"]
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert "ports" not in postgres  # on the Compose network only
    # The example's URL reaches this service as its user, into its database, with its password.
    with open(os.path.join(ROOT, "catdog.env.example")) as f:
        example = dict(line.split("=", 1) for line in f.read().splitlines() if line and not line.startswith("#"))
    env = postgres["environment"]
    assert example["DATABASE_URL"] == (f"postgresql://{env['POSTGRES_USER']}:{example['POSTGRES_PASSWORD']}"
                                       f"@postgres:5432/{env['POSTGRES_DB']}")


def test_ci_postgres_stand_in_passes_hadolint():
    code, out = run(tool("hadolint"), ".ci/postgres/Dockerfile")
    assert code == 0, out


def test_deploy_scripts_pass_shellcheck():
    code, out = run(tool("shellcheck"), "smoke.sh", "deploy.sh", ".ci/run", ".ci/postgres/docker-entrypoint.sh",
                    ".ci/postgres/replicas.sh", "monitoring/alertmanager_config.sh")
    assert code == 0, out


def makefile():
    with open(os.path.join(ROOT, "Makefile")) as f:
        return f.read()


def make_targets():
    return re.search(r"^\.PHONY:((?:.*\\\n)*.*)", makefile(), re.M).group(1).replace("\\\n", " ").split()


def readme_tables(heading):
    """The Markdown tables of the README section under `## heading`, each as its rows' cells."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = re.search(rf"^## {heading}\n(.*?)(?=^## |\Z)", f.read(), re.M | re.S).group(1)
    return [[[cell.strip() for cell in row.strip().strip("|").split("|")] for row in table.splitlines()[2:]]
            for table in re.findall(r"(?:^\|.*\|\n)+", section, re.M)]


def test_make_help_lists_every_target_with_its_comment():
    phony = make_targets()
    code, out = run("make", "--no-print-directory", "help")
    listed = dict(re.findall(r"^  make (\S+) +(.+)$", out, re.M))
    assert code == 0, out
    assert len(phony) >= 20 and sorted(listed) == sorted(phony)
    assert listed["test"] == "lint, the whole test suite, then make fuzz"


def test_readme_lists_every_make_target_and_variable():
    (targets,) = readme_tables("Make targets")
    assert sorted(re.fullmatch(r"`make ([a-z-]+)`", row[0]).group(1) for row in targets) == sorted(make_targets())
    service, make_variables = readme_tables("Environment variables")
    documented = {name for row in make_variables for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row[0])}
    settable = set(re.findall(r"^([A-Z][A-Z0-9_]*) \?=", makefile(), re.M))
    assert len(settable) >= 20 and settable <= documented, sorted(settable - documented)


def test_readme_documents_exactly_the_settings_the_service_reads():
    import serve

    (service, _) = readme_tables("Environment variables")
    documented = {name for row in service for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", row[0])}
    assert documented == {field.name.upper() for field in dataclasses.fields(serve.Settings)}


def test_workflow_actions_are_pinned_by_commit_and_audited():
    """A tag can be moved to other code; a commit cannot. And known vulnerabilities fail a run."""
    for path in WORKFLOWS:
        with open(path) as f:
            text = f.read()
        uses = re.findall(r"uses:\s*(\S+)", text)
        assert uses and all(re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", u) for u in uses), uses
    with open(os.path.join(ROOT, ".github", "workflows", "ci.yml")) as f:
        assert "pip-audit --strict --require-hashes" in f.read()
