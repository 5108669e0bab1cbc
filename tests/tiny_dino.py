"""The tiny DINO run the trainer, distributed and SLURM tests share: a 2-block ViT at 16 px, a small head, 2 + 2
crops, fp32 on one thread, a metrics line per step; each test adds its data, schedule and length."""

TINY_DINO = [
    "model.backbone=vit_tiny", "data.num_workers=0", "train.precision=fp32", "train.threads=1",
    "train.log_every_steps=1", "eval.knn=false", "objective.out_dim=64", "objective.hidden_dim=32",
    "objective.bottleneck_dim=16", "objective.views.global_crops_size=16", "objective.views.local_crops_size=8",
    "objective.views.local_crops_number=2",
]


def tiny_model(drop_path_rate=None) -> str:
    """The backbone override: depth 2, width 32, patch 4, 16 px, one channel (drop path as registered unless given)."""
    drop = "" if drop_path_rate is None else f", drop_path_rate: {drop_path_rate}"
    return ("model.overrides={depth: 2, embed_dim: 32, num_heads: 2, patch_size: 4, img_size: 16, in_chans: 1"
            + drop + "}")


# A DINO run small enough for a unit test: 16 steps per epoch of 256 Fashion-MNIST images.
UNIT_RUN = TINY_DINO + [
    tiny_model(0.1), "data.dataset.kind=fashion_mnist", "data.dataset.limit=256", "data.batch_size=16",
    "optim.lr=1e-3", "optim.warmup_epochs=1", "train.epochs=4", "objective.views.mean=[0.286]",
    "objective.views.std=[0.353]",
]


def losses(folder) -> dict:
    """Loss per step from a run's metrics.jsonl; a step redone after a resume keeps its last record."""
    import json
    from pathlib import Path

    records = {}
    for line in (Path(folder) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record["loss"]
    return records
