"""Dense features: patch descriptors of any layer, facet and stride, and what is made of them (PCA pictures,
correspondence, keypoint transfer, segmentation probes).

`extract` and friends are imported on first use, so that `distill.dense.kinds` (the choices the command line
declares) loads without PyTorch.
"""

import importlib
from typing import Any

from distill.dense.kinds import FACETS

_WHERE = {"DenseFeatures": "features", "extract": "features", "log_binned": "features"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"distill.dense.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'distill.dense' has no attribute {name!r}")


__all__ = ["FACETS", *_WHERE]
