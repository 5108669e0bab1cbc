"""Shared fixtures, and how `make test` spreads the suite over the machine's cores (pytest-xdist, `-n N --dist
loadgroup`): each worker is pinned to its own share of the cores, so its training runs, and the processes it
starts, use as many threads as it has cores instead of every core each; a worker runs the long tests first so
that none is left alone at the end; the tests of a module that builds a module-wide fixture (a SLURM cluster,
a trained teacher) stay on one worker, which builds it once."""

import os

import pytest
import torch

from tests.tiny_dino import UNIT_RUN


def _worker(config):
    """(index, count) of this pytest-xdist worker, or None in a plain run."""
    worker = getattr(config, "workerinput", None)
    if worker is None:
        return None
    return int(worker["workerid"].lstrip("gw")), int(worker["workercount"])


def cores_of_worker(cores, index: int, count: int):
    """The worker's share of `cores`: contiguous and as even as can be, one core each when there are more workers
    than cores."""
    cores = sorted(cores)
    if count >= len(cores):
        return [cores[index % len(cores)]]
    return [core for i, core in enumerate(cores) if i * count // len(cores) == index]


def pytest_configure(config):
    worker = _worker(config)
    if worker is not None and hasattr(os, "sched_setaffinity"):
        share = cores_of_worker(os.sched_getaffinity(0), *worker)
        os.sched_setaffinity(0, share)  # inherited by the processes the tests start
        torch.set_num_threads(len(share))


def pytest_collection_modifyitems(config, items):
    if _worker(config) is None:
        return
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        ours = [d for defs in (fixtures.name2fixturedefs.values() if fixtures else ()) for d in defs
                if getattr(d.func, "__module__", "").startswith("tests.")]
        if any(d.scope != "function" for d in ours) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: long tests first


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_overrides():
    """The overrides of tests/tiny_dino.py's unit run into an output folder, with more of the test's own."""
    def make(output_dir, *extra):
        return UNIT_RUN + [f"train.output_dir={output_dir}", *extra]

    return make


@pytest.fixture
def tiny_config(tiny_overrides):
    """The unit run's validated config (see tiny_overrides)."""
    from distill.engine.train_config import load_train_config

    def make(output_dir, *extra):
        return load_train_config(None, tiny_overrides(output_dir, *extra))

    return make
