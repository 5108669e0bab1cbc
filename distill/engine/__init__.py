"""The trainer and what it is made of: schedules, parameter groups, optimisers, EMA, checkpoints, logs."""
