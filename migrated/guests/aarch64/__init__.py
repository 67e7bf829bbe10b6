"""The arm64 guests' VMM side: the workload guest's loader, layout and view (`boot.py`). The
guest's C sources are next to it; `guests/build.py` cross-builds the image.

Nothing is imported here: `from migrated.guests.aarch64 import boot` loads what it needs.
"""
