"""File lists: the one text format in which the toolkit writes lists of images and reads them back.

A list the toolkit writes starts with the line HEADER; each entry is one line, the path, then optionally a tab and
a label:

    # distill file list: path, optionally a tab and a label
    photos/a b.jpg
    photos/c,d.jpg<TAB>cat

A path that a line could not carry as it is (a tab or a line break in it, spaces at either end, or a leading `"` or
`#`) is written as a JSON string: `"weird\\tname.jpg"`. Names are bytes on Linux: a name that is not UTF-8 (as
`os.listdir` returns it, with surrogate escapes) is written and read back byte for byte. Relative paths are
relative to the list's folder when read for training.

Lists written by hand (no header line) keep the older rule: `path [label]`, the label after the last space or
comma; a line that names an existing file as a whole is a path without a label, spaces and commas included.
Blank lines and lines starting with `#` are skipped in both.
"""

import json
import os
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from distill.errors import InputError
from distill.files import atomic_write_text

HEADER = "# distill file list: path, optionally a tab and a label"
ENCODING = dict(encoding="utf-8", errors="surrogateescape")
Entry = Tuple[str, Optional[str]]


def _needs_quotes(path: str) -> bool:
    return (not path or "\t" in path or "\n" in path or "\r" in path or path != path.strip()
            or path.startswith(('"', "#")))


def format_entry(path: str, label: Optional[object] = None) -> str:
    """One line of a file list (without its line break)."""
    text = json.dumps(path) if _needs_quotes(path) else path
    return text if label is None else f"{text}\t{label}"


def write_file_list(destination: Union[str, Path], entries: Iterable[Union[str, Entry]]) -> Path:
    """Write paths, or (path, label) pairs, atomically (a temporary file renamed over the destination)."""
    destination = Path(destination)
    lines = [HEADER]
    for entry in entries:
        path, label = (entry, None) if isinstance(entry, str) else entry
        lines.append(format_entry(os.fspath(path), label))
    atomic_write_text(destination, "\n".join(lines) + "\n")
    return destination


def _parse_written(line: str) -> Entry:
    if line.startswith('"'):
        path, end = json.JSONDecoder().raw_decode(line)
        rest = line[end:]
        return path, (rest[1:] if rest.startswith("\t") and len(rest) > 1 else None)
    path, tab, label = line.partition("\t")
    return path, (label if tab and label else None)


def _parse_by_hand(line: str, folder: Path) -> Entry:
    text = line.strip()
    whole = Path(text)
    if (whole if whole.is_absolute() else folder / whole).is_file():
        return text, None
    if "\t" in text:
        path, _, label = text.partition("\t")
        return path.strip(), label.strip() or None
    cut = max(text.rfind(" "), text.rfind(","))
    if cut < 0:
        return text, None
    return text[:cut].rstrip(" ,"), text[cut + 1:].strip() or None


def read_file_list(listing: Union[str, Path]) -> List[Entry]:
    """(path, label or None) per entry, in order."""
    listing = Path(listing)
    with open(listing, **ENCODING) as handle:
        lines = handle.read().split("\n")
    written = bool(lines) and lines[0].rstrip("\r") == HEADER
    entries = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entries.append(_parse_written(line) if written else _parse_by_hand(line, listing.parent))
        except ValueError as error:
            raise InputError(f"{listing} line {number}: {error} (a quoted path must be one JSON string); fix the "
                             "line or write the list again") from None
    return entries


def read_paths(listing: Union[str, Path]) -> List[str]:
    """The paths of a file list, labels dropped."""
    return [path for path, _ in read_file_list(listing)]


def readable_name(path: str) -> str:
    """A path as it can be printed or logged whatever its bytes (undecodable bytes as \\xNN)."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


__all__ = ["HEADER", "format_entry", "read_file_list", "read_paths", "readable_name", "write_file_list"]


def describe_os_error(error: OSError) -> str:
    """A file-system error (a missing file, no permission, a full disk, a file where a folder should be) in one
    line, naming the path."""
    where = " -> ".join(readable_name(os.fspath(f)) for f in (error.filename, error.filename2) if f is not None)
    return f"{where}: {error.strerror or error}" if where else str(error)
