"""Files written whole or not at all: a temporary file in the same folder, flushed to disk, then renamed over the
target. The rename is atomic on POSIX file systems, so at any instant the target holds either its old content or
the new one, complete, whenever the process is killed or the disk fills."""

import os
from pathlib import Path
from typing import BinaryIO, Callable, Union


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> Path:
    """write(handle) into a temporary file beside `path`, fsync, rename over `path`, fsync the folder. On any
    error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    """Text as UTF-8; names that are not UTF-8 (surrogate escapes, as os.listdir returns them) keep their bytes."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8", errors="surrogateescape")))


def remove_leftovers(folder: Union[str, Path], pattern: str = ".*.tmp") -> None:
    """Leftovers of writes that were killed mid-way (never read: the targets are intact)."""
    for leftover in Path(folder).glob(pattern):
        leftover.unlink(missing_ok=True)
