"""The allocated extents of a RAM file: byte ranges that hold pages, found with SEEK_DATA and
SEEK_HOLE (tmpfs and hugetlbfs answer them); everything else in the file is a hole and reads as
zero. One walk for guest RAM (memory.py) and the RAM reserve's zeroing (ramreserve.py)."""

from __future__ import annotations

import errno
import os


def allocated_ranges(fd: int, position: int, end: int) -> list[tuple[int, int]]:
    """Byte ranges [data, hole) of the file within [position, end) that hold pages."""
    ranges: list[tuple[int, int]] = []
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data after position
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        ranges.append((data, hole))
        position = hole
    return ranges
