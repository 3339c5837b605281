"""The Dockerfile and the hashed locks in deploy/ it installs from: base images pinned by digest,
every package from a lock (torch from PyTorch's index alone), and locks that hold every dependency
pyproject.toml names, and what those need in turn."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEPLOY = ROOT / "deploy"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _stage(name: str) -> str:
    return DOCKERFILE.split(f" AS {name}\n")[1].split("\nFROM ")[0]


def test_dockerfile_pins_images_and_installs_only_hashed_locks():
    stages = re.findall(r"^FROM (\S+) AS (\S+)$", DOCKERFILE, flags=re.M)
    names = {name for _, name in stages}
    assert len(stages) == DOCKERFILE.count("\nFROM ") + DOCKERFILE.startswith("FROM ")
    for image, name in stages:
        assert image in names or DIGEST.search(image), f"stage {name}: {image} not pinned by digest"
    assert "# syntax=" not in DOCKERFILE  # a frontend image would be one more unpinned pull
    assert "--extra-index-url" not in DOCKERFILE and "--trusted-host" not in DOCKERFILE
    runs = [re.sub(r"\\\n\s*", "", r) for r in re.findall(r"^RUN (.*?)(?<!\\)$", DOCKERFILE, flags=re.M | re.S)]
    installs = [cmd for run in runs for cmd in run.split("&&") if "pip install" in cmd]
    assert len(installs) == 6
    for cmd in installs:  # from a hashed lock, wheels only; or the project's own wheel, offline
        hashed = "--require-hashes --no-deps --only-binary :all: --index-url" in cmd and " -r " in cmd
        assert hashed or ("--no-deps --no-index /tmp/wheels/" in cmd), cmd
    # the service image has no torch; the trainer's torch comes from PyTorch's index alone
    assert "requirements-service.txt" in _stage("service") and "torch" not in _stage("service")
    trainer = _stage("trainer")
    assert 'ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}' in trainer
    torch_install = next(c for c in installs if "requirements-torch" in c)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_install
    assert all("--index-url https://pypi.org/simple" in c for c in installs if " -r " in c and c != torch_install)
    variant = re.search(r"^ARG TORCH_VARIANT=(\w+)$", trainer, flags=re.M).group(1)
    for lock in re.findall(r"deploy/(requirements-[\w${}-]+\.txt)", DOCKERFILE):
        assert (DEPLOY / lock.replace("${TORCH_VARIANT}", variant)).is_file(), lock


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``{name: (version, hashes)}`` of a ``--generate-hashes`` lock; every entry pinned and hashed."""
    entries = {}
    for block in re.split(r"\n(?=\S)", path.read_text()):
        if block.startswith("#") or not block.strip():
            continue
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        assert m, f"{path.name}: not pinned: {block.splitlines()[0]}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        assert hashes, f"{path.name}: {m.group(1)} has no hash"
        entries[canonicalize_name(m.group(1))] = (m.group(2), hashes)
    return entries


LINUX_311 = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
             "platform_machine": "x86_64", "python_version": "3.11", "implementation_name": "cpython",
             "platform_python_implementation": "CPython"}  # fmt: skip


def _needs(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({**LINUX_311, "extra": e}) for e in extras | {""})


def check_lock(
    lock: dict[str, tuple[str, list[str]]], roots: list[Requirement], *, elsewhere: frozenset[str] = frozenset()
) -> None:
    """Every root is locked at a version it accepts, with the extras it asks for; and every locked
    package whose metadata is at hand (installed here at the locked version) finds its own requirements
    in the lock (or in ``elsewhere``), as ``pip install --no-deps`` needs."""
    wanted: dict[str, set[str]] = {}
    for req in roots:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is not locked"
        assert req.specifier.contains(lock[name][0], prereleases=True), f"{req}: locked {lock[name][0]}"
        wanted.setdefault(name, set()).update(req.extras)
    for name, (version, _) in lock.items():
        try:
            if importlib.metadata.version(name) != version:
                continue
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in importlib.metadata.requires(name) or []:
            req = Requirement(line)
            if _needs(req, wanted.get(name, set())):
                assert canonicalize_name(req.name) in lock.keys() | elsewhere, f"{name} needs {req}, not locked"


def test_locks_cover_pyproject():
    """The locks the images install hold every dependency pyproject names: the service extra (with
    the base the thin client needs), the trainer extra (torch in its own lock), the build backend."""
    base = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    extras = PYPROJECT["project"]["optional-dependencies"]
    service = [Requirement(r) for r in extras["service"]]
    trainer = [Requirement(r) for r in extras["trainer"]]
    torch_req = next(r for r in trainer if r.name == "torch")
    torch_lock = read_lock(DEPLOY / "requirements-torch-cpu.txt")
    assert list(torch_lock) == ["torch"] and torch_lock["torch"][0] == f"{torch_req.specifier}".lstrip("=") + "+cpu"
    check_lock(read_lock(DEPLOY / "requirements-build.txt"),
               [Requirement(r) for r in PYPROJECT["build-system"]["requires"]])  # fmt: skip
    check_lock(read_lock(DEPLOY / "requirements-service.txt"), base + service)
    trainer_lock = read_lock(DEPLOY / "requirements-trainer-cpu.txt")
    assert "torch" not in trainer_lock
    check_lock(trainer_lock, base + [r for r in trainer if r is not torch_req], elsewhere=frozenset({"torch"}))
    torch_needs = [Requirement(r) for r in importlib.metadata.requires("torch") or []]
    if importlib.metadata.version("torch") == torch_lock["torch"][0]:  # torch's own needs, as the lock's build has them
        assert {canonicalize_name(r.name) for r in torch_needs if _needs(r, set())} <= trainer_lock.keys()
