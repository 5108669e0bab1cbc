"""Pictures of a curation: cluster sizes before and after sampling, and a grid of duplicate groups."""

from typing import Optional, Sequence

import numpy as np

from distill.data.fashion_mnist import load_fashion_mnist, parse_fashion_mnist_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cluster_sizes(path, before: np.ndarray, after: Optional[np.ndarray] = None, title: str = "") -> None:
    """Sizes of the clusters, largest first (log scale); with `after`, the same clusters after sampling."""
    plt = _pyplot()
    order = np.argsort(-before, kind="stable")
    figure, axis = plt.subplots(figsize=(7, 3.6))
    ranks = np.arange(1, len(before) + 1)
    axis.step(ranks, np.maximum(before[order], 0.8), where="mid", label=f"before: {int(before.sum())} images")
    if after is not None:
        axis.step(ranks, np.maximum(after[order], 0.8), where="mid",
                  label=f"after sampling: {int(after.sum())} images")
    axis.set_yscale("log")
    axis.set_xlabel("cluster (largest first)")
    axis.set_ylabel("images")
    axis.set_title(title or f"{len(before)} clusters")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


class _Thumbnails:
    """Images by the path they go by in a store: files, or fashion_mnist/<split>/<index>."""

    def __init__(self, size: int) -> None:
        self.size, self.splits = size, {}

    def __call__(self, name: str) -> np.ndarray:
        from PIL import Image

        parsed = parse_fashion_mnist_path(name)
        try:
            if parsed:
                split, index = parsed
                if split not in self.splits:
                    self.splits[split] = load_fashion_mnist(split)[0]
                image = Image.fromarray(self.splits[split][index])
            else:
                image = Image.open(name)
                image.load()
            image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            return np.asarray(image)
        except Exception:  # a moved or unreadable file: a crossed-out tile, the grid still draws
            tile = np.full((self.size, self.size, 3), 200, dtype=np.uint8)
            diagonal = np.arange(self.size)
            tile[diagonal, diagonal] = tile[diagonal, diagonal[::-1]] = (180, 0, 0)
            return tile


def duplicate_grid(path, groups: Sequence[Sequence[str]], max_groups: int = 12, max_per_group: int = 8,
                   size: int = 64) -> None:
    """One row per duplicate group (largest first): the kept image framed in green, then its duplicates."""
    from PIL import Image

    thumbnail = _Thumbnails(size)
    groups = list(groups)[:max_groups]
    max_per_group = min(max_per_group, max((len(g) for g in groups), default=1))
    rows = []
    pad = 3
    for group in groups:
        tiles = []
        for number, name in enumerate(group[:max_per_group]):
            tile = np.pad(thumbnail(name), ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
            if number == 0:
                tile[:pad], tile[-pad:], tile[:, :pad], tile[:, -pad:] = (0, 160, 0), (0, 160, 0), (0, 160, 0), (0, 160, 0)
            tiles.append(tile)
        tiles += [np.full_like(tiles[0], 255)] * (max_per_group - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    if rows:
        Image.fromarray(np.concatenate(rows, axis=0)).save(path)
