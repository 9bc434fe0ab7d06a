"""Writing files so that a reader never sees half of one: write next to the place, then rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(file: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(partial_path)`, then rename the partial file over `file` (atomic on POSIX).
    An interrupted run leaves the previous `file` intact, never a truncated one."""
    file = Path(file)
    partial = file.with_name(f".{file.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, file)
    finally:
        if partial.exists():
            partial.unlink()
    return file
