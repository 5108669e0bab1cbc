"""The console format of every command and job."""

import logging


def configure_logging(verbose: bool = False) -> None:
    """Time, logger, message; INFO (DEBUG when verbose)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
