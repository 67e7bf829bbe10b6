"""What a user installs is what must work: the wheel, in a virtualenv of its own.

The editable install the other tests use reads the source tree, so a package or a data file that
the wheel leaves out goes unnoticed there (a wheel without `migrated.migration` once passed every
other test). Here the wheel is built, installed with its declared dependencies into a new
virtualenv, every module of the three packages is imported from it, the guest image and the C
shims are checked to be inside it, and the installed `migratectl caps` runs against /dev/kvm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("migrated", "transport", "ringreader")

pytestmark = pytest.mark.kvm  # `migratectl caps` opens /dev/kvm

# Imports every module of the installed packages and reports where each package came from.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
found = {}
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    modules = [name]
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(info.name)
        modules.append(info.name)
    found[name] = {"file": package.__file__, "modules": modules}
print(json.dumps(found))
"""


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with the project installed from its wheel; returns the venv's directory."""
    work = tmp_path_factory.mktemp("wheel")
    wheels = work / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO, cwd=work)
    (wheel,) = wheels.glob("migrated-*.whl")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=work)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, cwd=work)
    return venv


def test_every_module_imports_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    found = json.loads(run(installed / "bin" / "python", "-c", IMPORT_ALL, *PACKAGES, cwd=tmp_path))
    for name in PACKAGES:
        origin = Path(found[name]["file"])
        assert installed in origin.parents, f"{name} was imported from {origin}, not from the wheel"
    # Every package of the source tree made it into the wheel.
    for name in PACKAGES:
        in_tree = {
            ".".join(p.relative_to(REPO).parent.parts)
            for p in (REPO / name).rglob("__init__.py")
            if ".venv" not in p.parts and "build" not in p.relative_to(REPO).parts
        }
        assert in_tree <= set(found[name]["modules"]), sorted(in_tree - set(found[name]["modules"]))


def test_the_wheel_carries_the_guest_image_and_the_shims(installed: Path) -> None:
    (site,) = (installed / "lib").glob("python3*/site-packages")
    assert list((site / "migrated").rglob("workload-x86_64.bin")), "the x86 workload guest image is missing"
    assert list((site / "ringreader").glob("_ringreader*.so")), "the ring harvest shim is missing"
    assert list((site / "migrated").rglob("_pagehash*.so")), "the page digest shim is missing"


def test_installed_migratectl_caps_runs(installed: Path, tmp_path: Path) -> None:
    caps = json.loads(run(installed / "bin" / "migratectl", "caps", "--json", cwd=tmp_path))
    assert caps["api_version"] == 12, caps
