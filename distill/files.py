"""Files written whole or not at all: a temporary file in the same folder, flushed to disk, then renamed over the
target. The rename is atomic on POSIX file systems, so at any instant the target holds either its old content or
the new one, complete, whenever the process is killed or the disk fills."""

import os
from pathlib import Path
from typing import BinaryIO, Callable, Union

from distill.errors import InputError


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


def check_writable_folder(folder: Union[str, Path], key: str) -> None:
    """Before any work: `folder` is, or can be made as, a folder this process may write in. A file on its path or a
    folder without write permission is an InputError naming `key` (the option or config key that gave it)."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot hold it: {existing} is a file"
        raise InputError(f"{key} {folder} {what}, not a folder: choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{key} {folder}: {existing} is not writable by this user: choose another {key}")


_HELD = {}  # folder (resolved) -> (the open descriptor whose lock this process holds, whether it made the folder)


def hold_folder(folder: Union[str, Path], key: str) -> None:
    """Lock `folder` (made if missing) for this process until release_folder or its exit: a second process that
    asks for it gets an InputError naming `key`, instead of two runs writing into one folder. The lock is the
    system's (flock on the folder itself): no file is left behind, and a killed process holds nothing. Asking
    again from the process that holds it is a no-op."""
    import fcntl

    folder = Path(folder).expanduser()
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    name = os.path.realpath(folder)
    if name in _HELD:
        return
    handle = os.open(name, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise InputError(f"another process is writing into {key} {folder} (it holds the folder's lock): wait for it "
                         f"to end, or choose another {key}") from None
    except OSError:  # a file system without locks: nothing to hold
        os.close(handle)
        return
    _HELD[name] = (handle, made)


def _forget_held_folders() -> None:
    """In a forked child (a loader worker): close the inherited descriptors, so that the lock ends with the
    process that took it, not with the last of its children."""
    for handle, _ in _HELD.values():
        try:
            os.close(handle)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_held_folders)


def release_folder(folder: Union[str, Path]) -> None:
    """Let go of hold_folder's lock; a folder it made that is still empty goes too (a refused run leaves none)."""
    name = os.path.realpath(Path(folder).expanduser())
    handle, made = _HELD.pop(name, (None, False))
    if handle is not None:
        os.close(handle)
    if made:
        try:
            os.rmdir(name)
        except OSError:  # not empty: the run wrote into it
            pass
