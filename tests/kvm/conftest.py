"""What the KVM layer's tests share: /dev/kvm, opened for one test and closed after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from migrated.kvm.system import Kvm


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm.open() as handle:
        yield handle
