"""The trainer and what it is made of: its config, parameter groups, optimisers, checkpoints, metrics, evaluations
during a run, FSDP sharding and process settings. The top of the library: only the command line and launch/ are
above it."""
