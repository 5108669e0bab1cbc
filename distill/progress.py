"""Progress bars that stay readable in a terminal and in a log file (SLURM, CI)."""

import sys
from typing import Any

from tqdm.auto import tqdm


def progress(**kwargs: Any) -> tqdm:
    """A tqdm bar. In a terminal, as usual. When stderr is not a terminal (a log file), a transient bar
    (leave=False: the inner loops of a step, such as feature extraction) is left out, as tqdm's disable=None does,
    since its cursor movements and erasures only garble a file; a lasting bar (training, embedding) writes a line
    every 30 s instead of flooding the log."""
    if not sys.stderr.isatty():
        if kwargs.get("leave") is False:
            kwargs.setdefault("disable", None)
        kwargs.setdefault("mininterval", 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(**kwargs)
