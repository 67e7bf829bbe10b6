"""Project-wide test rules.

`kvm` tests skip only where /dev/kvm is missing. Where /dev/kvm exists, a skipped `kvm` test
fails the run: a skip must never hide a missing feature on a machine that can test it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from helpers import CALL_FAILED

KVM_DEVICE = "/dev/kvm"
HAVE_KVM = os.path.exists(KVM_DEVICE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_KVM:
        return
    skip = pytest.mark.skip(reason=f"{KVM_DEVICE} is missing on this machine")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


_skipped_kvm_tests: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    # Fixtures read this in their teardown to say more about a failed test (daemon logs).
    item.stash[CALL_FAILED] = item.stash.get(CALL_FAILED, False) or (report.when == "call" and report.failed)
    if HAVE_KVM and report.skipped and "kvm" in item.keywords:
        _skipped_kvm_tests.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_kvm_tests:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _skipped_kvm_tests:
        terminalreporter.write_line(
            f"FAILED: {len(_skipped_kvm_tests)} kvm test(s) skipped although {KVM_DEVICE} exists:",
            red=True,
        )
        for nodeid in _skipped_kvm_tests:
            terminalreporter.write_line(f"  {nodeid}", red=True)
