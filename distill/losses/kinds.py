"""The named choices the losses take, importable without PyTorch (the config schemas check against them)."""

CENTERINGS = ("center", "sinkhorn_knopp")  # DINO's centering, or Sinkhorn-Knopp targets (DINOv2's option)
DISTILLATION_TYPES = ("none", "soft", "hard")  # DeiT
CRITERIA = ("auto", "ce", "bce")  # DeiT's base criterion: auto (soft-target CE under mixup, else smoothed CE)
