"""requirements.txt is the exact pin of requirements.in: re-run `make lock` after editing the .in."""
import os
import re

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def requirement_lines(path):
    """Requirement lines with comments, options (-r, --index-url) and pip-compile's
    indented '# via' notes removed."""
    with open(os.path.join(ROOT, path)) as f:
        lines = [line.split(" #")[0].split("\t#")[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def pins():
    found = {}
    for line in requirement_lines("requirements.txt"):
        match = PIN.match(line)
        assert match, f"requirements.txt line is not name==version: {line!r}"
        found[canonicalize_name(match.group(1))] = Version(match.group(2))
    return found


def test_every_line_of_requirements_txt_is_an_exact_pin():
    assert len(pins()) >= 20  # the transitive closure, not just the direct packages


def test_requirements_txt_satisfies_requirements_in():
    pinned = pins()
    for line in requirement_lines("requirements.in"):
        requirement = Requirement(line)
        if requirement.marker and not requirement.marker.evaluate(default_environment()):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is in requirements.in but not pinned: run `make lock`"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"requirements.txt pins {name}=={pinned[name]}, outside {requirement}: run `make lock`")


def test_torch_is_pinned_and_torchvision_is_not_there():
    pinned = pins()
    assert pinned["torch"] == Version("2.13.0")
    assert "torchvision" not in pinned


def test_no_pin_carries_a_local_label():
    """torch==2.13.0+cpu exists only on PyTorch's own index: on PyPI the install fails. The
    plain pin matches the CPU build (CPU_TORCH=1) and PyPI's alike."""
    for path in ("requirements.txt", "requirements-serve.txt"):
        local = [line for line in requirement_lines(path) if PIN.match(line) and Version(PIN.match(line).group(2)).local]
        assert not local, f"{path}: pins with a local label, on no public index: {local}"
