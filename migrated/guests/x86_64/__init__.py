"""The x86_64 guests' VMM side: long mode set up by the VMM (`longmode.py`), the workload
guest's loader and the small OS's devices (`boot.py`), raw images started as a BIOS would
(`raw.py`). The guest's C sources are next to them; `guests/build.py` builds the image.

Nothing is imported here: `from migrated.guests.x86_64 import boot` loads what it needs.
"""
