"""The named choices of the dense tools, importable without PyTorch (the command line declares them)."""

FACETS = ("token", "key", "query", "value")  # a block's output, or the key / query / value of its attention
SELECTIONS = ("kmeans", "saliency")  # how best buddies are reduced to k pairs
ALPHAS = (0.05, 0.1, 0.15)  # PCK thresholds, as shares of the bounding box (or the image)
IGNORE_INDEX = 255  # mask pixels a segmentation ignores
LAYER_SETS = {"last": (-1,), "last4": (-4, -3, -2, -1)}  # segmentation features: DINOv2's linear and multi-layer
