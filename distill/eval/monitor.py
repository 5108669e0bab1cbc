"""kNN evaluation of a backbone during and after training, on labelled data."""

import dataclasses
import logging
import time
from typing import Dict, Optional

import torch
from torch import nn

from distill.data.configs import DatasetConfig

from distill.data.datasets import ArrayImages, build_image_source
from distill.data.eval_views import EvalView
from distill.errors import InputError
from distill.eval.features import extract_source_features
from distill.eval.knn import knn_classify

logger = logging.getLogger(__name__)


class KnnMonitor:
    """Weighted kNN of a backbone's embedding: training split as memory bank, validation split as queries."""

    def __init__(self, dataset: DatasetConfig, train_split: str, val_split: str, view: EvalView, ks, temperature: float,
                 batch_size: int, precision: str, device: torch.device, num_workers: int = 0,
                 train_limit: int = 0, val_limit: int = 0) -> None:
        self.view, self.ks, self.temperature = view, list(ks), temperature
        self.batch_size, self.precision, self.device, self.num_workers = batch_size, precision, device, num_workers
        self.train_source = build_image_source(dataclasses.replace(dataset, limit=train_limit), train_split)
        self.val_source = build_image_source(dataclasses.replace(dataset, limit=val_limit), val_split)
        for source in (self.train_source, self.val_source):
            if source.labels is None:
                raise InputError(f"kNN evaluation needs labels, but {source.name} has none (use an ImageFolder tree "
                                 "or a file list with labels, or turn every kNN evaluation off: eval.knn=false, "
                                 "eval.knn_at_start=false, eval.knn_every_epochs=0)")
        if max(self.ks) > len(self.train_source):
            raise InputError(f"eval.knn_k {sorted(self.ks)} asks for more neighbours than the {len(self.train_source)} "
                             f"images of {self.train_source.name}: lower eval.knn_k or raise eval.train_limit")

    def _features(self, backbone: nn.Module, source, desc: str):
        return extract_source_features(backbone, source, self.view, self.batch_size, self.precision,
                                       str(self.device), self.num_workers, desc)

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module) -> Dict[int, Dict[str, float]]:
        was_training = backbone.training
        backbone.eval()
        try:
            start = time.perf_counter()
            train_features, train_labels = self._features(backbone, self.train_source, "kNN bank")
            val_features, val_labels = self._features(backbone, self.val_source, "kNN queries")
            results = knn_classify(train_features, train_labels, val_features, val_labels, self.ks, self.temperature)
            logger.info("kNN (%s) in %.0fs: %s", self.val_source.name, time.perf_counter() - start,
                        ", ".join(f"k={k} top-1 {v['top1']:.2f}" for k, v in results.items()))
            return results
        finally:
            backbone.train(was_training)

    def raw_pixels(self) -> Optional[Dict[int, Dict[str, float]]]:
        """kNN on the pixels themselves (in-memory data only): the floor any learned feature must clear."""
        if not isinstance(self.train_source, ArrayImages):
            return None
        flat = lambda s: s.images.reshape(len(s), -1).float() / 255.0  # noqa: E731
        return knn_classify(flat(self.train_source), self.train_source.labels, flat(self.val_source),
                            self.val_source.labels, self.ks, self.temperature)
