"""arm64: what differs on this architecture (VM build steps; machine state in `...aarch64`)."""

from .machine import Aarch64 as Aarch64
