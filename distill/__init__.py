"""distill: teach Vision Transformers from other networks or from themselves.

Layers, each importing only from those below it (checked by .importlinter):
cli (the `distill` command) > launch (SLURM, submitit) > engine (the trainer) > objectives (DINO, DeiT, DINOv2) >
eval (kNN, linear probe, attention) > losses | models | data > the leaf modules here (config, distributed, ema,
errors, files, logs, precision, progress, schedules, seeds), which import nothing of the package.
"""

__version__ = "0.1.0"
