"""Build steps pyproject.toml cannot declare: the cffi shim and the workload guest binary.

Both are built by the package build (never at import time). In an editable install the guest
binary is written next to its sources, where the loader looks for it.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _guest_builder():  # type: ignore[no-untyped-def]
    # Loaded by path: importing the `migrated` package would need its runtime dependencies.
    spec = importlib.util.spec_from_file_location("_guest_build", ROOT / "migrated/guests/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_workload


class BuildPyWithGuest(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            out = ROOT / "migrated" / "guests"
        else:
            out = Path(self.build_lib) / "migrated" / "guests"
        _guest_builder()(out)


setup(
    cffi_modules=[
        "ringreader/_build.py:ffibuilder",
        "migrated/pagehash/_build.py:ffibuilder",
    ],
    cmdclass={"build_py": BuildPyWithGuest},
)
