"""x86_64: what differs on this architecture (VM build steps; machine state in `..x86_state`)."""

from .machine import X86_64 as X86_64
