"""Launching: `distill submit` to SLURM through submitit, or the same job as local processes."""
