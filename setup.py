"""Build steps pyproject.toml cannot declare: the cffi shim and the workload guest binary.

Both are built by the package build (never at import time). In an editable install the guest
binary is written next to its sources, where the loader looks for it.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _guest_build_module():  # type: ignore[no-untyped-def]
    # Loaded by path: importing the `migrated` package would need its runtime dependencies.
    spec = importlib.util.spec_from_file_location("_guest_build", ROOT / "migrated/guests/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithGuest(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            out = ROOT / "migrated" / "guests"
        else:
            out = Path(self.build_lib) / "migrated" / "guests"
        build = _guest_build_module()
        build.build_workload(out)
        # The arm64 guest needs the aarch64 cross compiler; a host without it still installs
        # (it cannot run arm64 guests anyway), and says what it skipped.
        try:
            build.build_workload_aarch64(out)
        except build.GuestBuildError as err:
            print(f"warning: arm64 workload guest not built: {err}")


setup(
    cffi_modules=[
        "ringreader/_build.py:ffibuilder",
        "migrated/pagehash/_build.py:ffibuilder",
        "migrated/kvm/ioctlbatch/_build.py:ffibuilder",
    ],
    cmdclass={"build_py": BuildPyWithGuest},
)
