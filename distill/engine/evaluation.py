"""What a run evaluates besides its loss: weighted kNN of the evaluated backbone, top-1 / top-5 of the objective's
classifiers on the validation split, and the attention figure. Rank 0 only; it holds no training state."""

import dataclasses
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from distill.data.datasets import build_image_source
from distill.data.eval_views import EvalView


class RunEvaluation:
    """Built from the run's config, the training images and the objective's evaluation view."""

    def __init__(self, config, source, view: EvalView, has_classifiers: bool, precision: str,
                 device: torch.device) -> None:
        self.config, self.source, self.view = config, source, view
        self.precision, self.device = precision, device
        self.monitor = self._build_monitor()
        self.validation = self._build_validation() if has_classifiers else None

    def _build_monitor(self):
        e, c = self.config.eval, self.config
        if not (e.knn or e.knn_at_start or e.knn_every_epochs):
            return None
        from distill.eval.monitor import KnnMonitor

        view = self.view.at_size(e.image_size) if e.image_size else self.view
        return KnnMonitor(e.dataset or c.data.dataset, e.train_split, e.val_split, view, e.knn_k, e.knn_temperature,
                          e.batch_size, self.precision, self.device, c.data.num_workers, e.train_limit, e.val_limit)

    def _build_validation(self):
        """The labelled validation images, for objectives with classifiers (DeiT)."""
        e = self.config.eval
        dataset = dataclasses.replace(e.dataset or self.config.data.dataset, limit=e.val_limit)
        return build_image_source(dataset, e.val_split)

    def knn(self, backbone: nn.Module) -> Optional[Dict[int, Dict[str, float]]]:
        return self.monitor.evaluate(backbone) if self.monitor is not None else None

    def raw_pixels(self) -> Optional[Dict[int, Dict[str, float]]]:
        return self.monitor.raw_pixels() if self.monitor is not None else None

    def classify(self, networks: Dict[str, nn.Module]) -> Dict[str, Dict[str, float]]:
        """{name: {"top1", "top5", "loss"}} on the validation split (nothing without one)."""
        if self.validation is None:
            return {}
        from distill.eval.classify import evaluate_classifier

        e = self.config.eval
        return {name: evaluate_classifier(network, self.validation, self.view, e.batch_size, self.precision,
                                          str(self.device), self.config.data.num_workers, desc=f"{name} validation")
                for name, network in networks.items()}

    def attention_figure(self, backbone: nn.Module, count: int, path: Path):
        """Attention maps of the first validation images (the training images without a kNN monitor)."""
        from distill.eval.attention import attention_figure

        source = self.monitor.val_source if self.monitor is not None else self.source
        view = self.monitor.view if self.monitor is not None else self.view
        return attention_figure(backbone, source, view, count, path, self.device)


def flatten_knn(result: Dict[int, Dict[str, float]], prefix: str = "knn") -> Dict[str, float]:
    """{"knn_top1_k20": ...}: one metrics column per k."""
    return {f"{prefix}_top1_k{k}": v["top1"] for k, v in result.items()}
