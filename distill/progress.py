"""Progress bars that stay readable in a terminal and in a log file (SLURM, CI)."""

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(**kwargs: Any) -> tqdm:
    """A tqdm bar; when stderr is not a terminal it updates every 30 s instead of flooding the log."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
