"""How loaders write guest RAM, on every architecture."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

Write = Callable[[int, "bytes | npt.NDArray[np.generic]"], None]
"""(guest-physical address, data): `Vm.write_guest`, which marks the pages dirty (R5)."""
