"""migrated: a live-migration daemon for KVM virtual machines."""

__version__ = "0.1.0"
