"""One training loop for every objective.

The trainer owns what every paradigm shares: devices and precision, the data loader, the optimiser and its
parameter groups, the schedules of learning rate and weight decay, gradient accumulation and clipping,
non-finite losses, checkpoints and resuming, logs, progress, time budgets and evaluation. What is trained,
and how, belongs to the objective (distill/objectives): the trainer only calls the Objective contract.

Public seams: setup() builds everything, train_step(micro_batches) runs one optimizer step, train() the loop
(resuming first), run() all of it with the evaluations and exports.
"""

import json
import logging
import logging.handlers
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from distill import distributed
from distill.config import save_config
from distill.data.datasets import build_image_source
from distill.data.filelists import write_file_list
from distill.data.loader import build_loader
from distill.engine import checkpointing, sharding
from distill.engine.budget import BUDGET_WARMUP_STEPS, TimeBudget
from distill.engine.evaluation import RunEvaluation, flatten_knn
from distill.engine.metrics import MetricsWriter, plot_loss_curve, read_metrics, repair_metrics
from distill.engine.optim import build_optimizer, kernels_kept, set_lr_and_wd
from distill.engine.param_groups import param_groups
from distill.engine.runtime import configure_runtime, resolve_device
from distill.engine.train_config import TrainConfig
from distill.errors import CheckpointError, DistillError, InputError
from distill.files import atomic_write_text, check_writable_folder, hold_folder, release_folder
from distill.models.checkpoint import TRAINING_FORMAT, TrainingCheckpoint
from distill.models.diagnosis import key_differences
from distill.models.registry import backbone_kwargs, backbone_options
from distill.objectives import Objective, StepInfo, build_objective
from distill.objectives.base import scalar
from distill.precision import autocast, resolve_precision
from distill.progress import progress
from distill.schedules import cosine_schedule, epochs_to_steps, stretch_ahead

logger = logging.getLogger(__name__)


class TrainingDiverged(DistillError):
    """The loss or the gradients stopped being finite."""


@dataclass
class SkippedSteps:
    """Steps skipped for a non-finite loss or gradient (train.nan_policy=skip)."""

    in_a_row: int = 0
    total: int = 0


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.train.output_dir)
        # progress and outcome
        self.step = 0
        self.train_seconds = 0.0
        self.total_steps = 1
        self.budget = TimeBudget(config.train.time_limit_minutes * 60)
        self.skipped = SkippedSteps()
        self.stop_reason: Optional[str] = None
        self.stop_signal: Optional[int] = None
        self.previous_handlers: Dict[int, Any] = {}
        self.previous_interrupt: Any = None
        self.results: Dict[str, Any] = {}
        self.losses: List[float] = []
        self.last_save_time = time.monotonic()
        # built by setup()
        self.device: Optional[torch.device] = None
        self.precision = "fp32"
        self.is_main = True
        self.source = None
        self.objective: Optional[Objective] = None
        self.channels = 0
        self.eval_view = None
        self.loader = self.sampler = None
        self.steps_per_epoch = 0
        self.global_batch = 0
        self.configured_steps = 0
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.lr_schedule = self.wd_schedule = None
        self.plan_history: List[Tuple[int, int]] = []
        self.metrics: Optional[MetricsWriter] = None
        self.evaluation: Optional[RunEvaluation] = None
        self.shard_units: List[torch.nn.Module] = []
        self._log_handler: Optional[logging.Handler] = None
        self._whole: Optional[Objective] = None
        self.config_changed_at: Optional[int] = None  # a resume with other settings: the step they start at

    # ------------------------------------------------------------------------------------------- set-up

    def setup(self) -> None:
        """Process group, device and precision, data, objective, loader, optimiser, schedules, the state to resume,
        then the run folder, metrics and the evaluations. run() calls it when it has not been called.

        Whether to resume, and whether the checkpoint there fits this run, is decided before anything in the run
        folder is written: a refused run leaves the folder as it found it. What set-up logs before the folder
        opens is held, then written to the folder's train.log."""
        held = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        logging.getLogger("distill").addHandler(held)
        try:
            self._prepare()
            if self.is_main:  # its data are checked (labels for kNN) before the folder opens
                self.evaluation = RunEvaluation(self.config, self.source, self.eval_view,
                                                bool(self.objective.classifiers()), self.precision, self.device)
        except BaseException:
            release_folder(self.output_dir)
            raise
        finally:
            logging.getLogger("distill").removeHandler(held)
        self.metrics = MetricsWriter(self.output_dir, enabled=self.is_main)
        if self.is_main:
            self._open_run_folder("resumed_from_step" in self.results, held.buffer)

    def _prepare(self) -> None:
        c = self.config
        self.device = resolve_device(c.train.device)
        distributed.init_from_env(self.device)
        self.is_main = distributed.is_main_process()
        self.precision = resolve_precision(c.train.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu" and self.is_main:
            logger.warning("train.precision=fp16 on a CPU is emulated and runs many times slower than bf16 (about "
                           "14x on the reference machine): use train.precision=bf16 (or auto), or fp32")
        configure_runtime(c.train.threads, self.device, c.data.num_workers)
        if self.is_main:
            check_writable_folder(self.output_dir, "train.output_dir")
            hold_folder(self.output_dir, "train.output_dir")  # until run() ends: one run writes into a folder
        checkpoint = self._checkpoint_to_resume()
        torch.manual_seed(c.train.seed + distributed.rank())

        self.source = build_image_source(c.data.dataset)
        self.objective = build_objective(c, self.source).to(self.device)
        distributed.broadcast_state(self.objective)
        if c.train.parallel == "fsdp" and distributed.several():
            self.shard_units = sharding.shard(self.objective, self.precision, self.device)
        self.channels = self.objective.eval_backbone().config["in_chans"]
        self.eval_view = self.objective.eval_view(self.channels)
        self.loader, self.sampler = build_loader(
            self.source, self.objective.views(self.channels), c.data.batch_size, c.train.seed, c.data.num_workers,
            distributed.rank(), distributed.world_size(), repeats=self.objective.sampler_repeats())
        self.steps_per_epoch = self.sampler.batches_per_epoch // c.optim.accumulate_steps
        self.global_batch = c.data.batch_size * c.optim.accumulate_steps * distributed.world_size()
        if self.steps_per_epoch < 1:
            raise InputError(f"one optimizer step needs {self.global_batch} images but {self.source.name} has "
                             f"{len(self.source)}: lower data.batch_size or optim.accumulate_steps")

        groups = param_groups(self.objective.trainable_module(), exclude_tokens=c.optim.exclude_tokens_from_wd,
                              layer_decay=c.optim.layer_decay, patch_embed_lr_mult=c.optim.patch_embed_lr_mult)
        self.optimizer = build_optimizer(c.optim.name, groups, c.optim.betas, c.optim.momentum)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        if c.train.compile:
            self.objective.compile_backbones()
        self.configured_steps = math.ceil(c.train.epochs * self.steps_per_epoch)
        self.plan(self.configured_steps)
        if checkpoint is not None:
            self._restore(checkpoint)

    def _open_run_folder(self, resumed: bool, earlier: List[logging.LogRecord]) -> None:
        """The run folder, once the run is known to go ahead: config, log file (starting with the `earlier`
        records of set-up), the list of unreadable images, and the metrics (a fresh run starts its own; a resumed
        one keeps the rows up to its checkpoint's step)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_temporaries(self.output_dir)
        config = self.output_dir / "config.yaml"
        if self.config_changed_at is not None and config.is_file():
            config.replace(self.output_dir / f"config_until_step_{self.config_changed_at}.yaml")
        save_config(self.config, config)
        handler = QuietFileHandler(self.output_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for record in earlier:
            handler.handle(record)
        logging.getLogger("distill").addHandler(handler)
        self._log_handler = handler
        if self.source.unreadable:
            write_file_list(self.output_dir / "unreadable_images.txt", self.source.unreadable)
        if resumed:
            repair_metrics(self.metrics.path, self.step)
        elif self.metrics.path.exists():
            self.metrics.path.unlink()

    def scaled_lr(self) -> float:
        """optim.lr scaled from optim.lr_reference_batch images to the global batch (linear, sqrt or none)."""
        o = self.config.optim
        ratio = self.global_batch / o.lr_reference_batch
        return o.lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[o.lr_scaling]

    def plan(self, total_steps: int) -> None:
        """Schedules for a run of total_steps optimizer steps; lengths in epochs keep their share of the run."""
        o, epochs = self.config.optim, self.config.train.epochs
        self.total_steps = max(1, total_steps)
        warmup = epochs_to_steps(o.warmup_epochs, epochs, self.total_steps)
        self.lr_schedule = cosine_schedule(self.scaled_lr(), o.min_lr, self.total_steps, warmup)
        self.wd_schedule = cosine_schedule(o.weight_decay, o.weight_decay_end, self.total_steps)
        self.objective.plan(self.total_steps, epochs)
        self.plan_history = [(0, self.total_steps)]

    def replan(self, step: int, total_steps: int) -> None:
        """The plan changed at `step` to total_steps in all: every schedule (learning rate, weight decay, the
        objective's temperatures and momentum) goes on from its value at `step`, what was ahead stretched or
        compressed to the new end. The history of changes goes into checkpoints, so a resumed run rebuilds the
        same curves."""
        self.total_steps = max(step + 1, total_steps)
        self.lr_schedule = stretch_ahead(self.lr_schedule, step, self.total_steps)
        self.wd_schedule = stretch_ahead(self.wd_schedule, step, self.total_steps)
        self.objective.replan(step, self.total_steps, self.config.train.epochs)
        self.plan_history.append((step, self.total_steps))

    def replay_plan(self, history: List[Tuple[int, int]]) -> None:
        """The schedules a run had after these plans: (0, first total), then (step, total) of each change."""
        self.plan(history[0][1])
        for step, total in history[1:]:
            self.replan(step, total)

    def fit_budget(self) -> None:
        """Fit the plan to train.time_limit_minutes when a fit is due (see TimeBudget); never past the configured
        epochs."""
        fits = self.budget.steps_that_fit(self.step, self.train_seconds)
        if fits is None:
            return
        planned = min(max(fits, self.step + 1), self.configured_steps)
        if planned != self.total_steps:
            logger.info("time budget %.1f min at %.3f s/step: %d steps instead of %d (%.2f epochs)",
                        self.budget.limit_seconds / 60, self.budget.pace, planned, self.total_steps,
                        planned / self.steps_per_epoch)
            self.replan(self.step, planned)

    # ------------------------------------------------------------------------------------------- checkpoints

    def _state(self, rng: Any, objective: Dict[str, Any], optimizer: Dict[str, Any]) -> Dict[str, Any]:
        from omegaconf import OmegaConf

        return {
            "format": TRAINING_FORMAT,
            "objective": objective,
            "eval_network": self.objective.eval_backbone_prefix(),
            "eval_view": self.eval_view.describe(),
            "optimizer": optimizer,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step,
            "total_steps": self.total_steps,
            "plan_history": [list(change) for change in self.plan_history],  # (step, total) of each plan
            "steps_per_epoch": self.steps_per_epoch,
            "train_seconds": self.train_seconds,
            "rng": rng,  # one random state per rank (a single one on one process)
            "config": OmegaConf.to_container(OmegaConf.structured(self.config)),
        }

    def save_checkpoint(self, keep_epoch: Optional[int] = None) -> Optional[Path]:
        """Called on every rank at the same step: each rank's random state goes into rank 0's file."""
        rng = distributed.gather_objects(checkpointing.rng_state())
        if self.shard_units:  # every rank gathers its shards into rank 0's whole tensors
            objective = sharding.full_state(self.objective.state_dict(), keep=self.is_main)
            optimizer = sharding.full_optimizer_state(self.optimizer, keep=self.is_main)
        if not self.is_main:
            return None
        if not self.shard_units:
            objective, optimizer = self.objective.state_dict(), self.optimizer.state_dict()
        path = self.output_dir / checkpointing.LATEST
        broken = checkpointing.non_finite_tensors(objective)
        if broken:  # a checkpoint is what a resume starts from: it never holds weights that cannot train again
            kept = f"{path} still holds the last finite ones" if path.exists() else "no earlier checkpoint was there"
            more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
            raise CheckpointError(
                f"the networks hold NaN or inf at step {self.step} ({broken[0]}{more}), so they were not saved: {kept}. "
                "Lower optim.lr, set optim.clip_grad, or train in fp32, then run the same command to resume")
        state = self._state(rng[0] if len(rng) == 1 else rng, objective, optimizer)
        targets = [path] + ([self.output_dir / f"checkpoint_{keep_epoch:04d}.pth"] if keep_epoch is not None else [])
        for target in targets:
            try:
                checkpointing.save_atomic(state, target)
            except OSError as error:
                kept = "the previous one is intact" if target.exists() else "no earlier one was there"
                raise CheckpointError(
                    f"could not write the checkpoint {target} at step {self.step}: {error.strerror or error} ({kept}). "
                    "Free space or fix the folder, then run the same command to resume") from None
        self.last_save_time = time.monotonic()
        self._write_loss_curve()
        return path

    def _checkpoint_to_resume(self) -> Optional[TrainingCheckpoint]:
        """train.resume's checkpoint (auto: the run folder's), read and checked against this run's recipe; None
        for a fresh run. Refuses a fresh run over an existing checkpoint."""
        path = checkpointing.find_resume_checkpoint(self.output_dir, self.config.train.resume)
        existing = self.output_dir / checkpointing.LATEST
        if path is None and existing.is_file():
            raise InputError(
                f"{self.output_dir} already holds a checkpoint that a fresh run would overwrite: continue it with "
                "train.resume=auto, move it away, or choose another train.output_dir")
        if path is None:
            return None
        if not path.is_file():
            raise InputError(f"train.resume={self.config.train.resume}: no checkpoint at {path}")
        try:
            run = checkpointing.load_training_checkpoint(path)
        except CheckpointError as error:
            if path != existing:
                raise
            raise CheckpointError(f"{error}. The run cannot resume from it: move it away, then resume from an earlier "
                                  "checkpoint_NNNN.pth (train.resume=PATH) or start again") from None
        if (run.config["objective"]["name"], run.backbone) != (self.config.objective.name, self.config.model.backbone):
            theirs, ours = run_description(run.config), run_description(self.config)
            raise CheckpointError(
                f"{path} was written by a {theirs['recipe']} run and this is a {ours['recipe']} run: resume it "
                "with its own recipe (its config.yaml is beside it), or choose another train.output_dir")
        return run

    def _restore(self, run: TrainingCheckpoint) -> None:
        """Weights, optimizer, scaler, step, schedules and random states from a checkpoint that fits."""
        path = run.source
        if run["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(
                f"{path} was written with {run['steps_per_epoch']} steps per epoch, this run has "
                f"{self.steps_per_epoch}: resume with the same data and batch size (or train.resume=never)")
        weights = run.weights
        if self.shard_units:  # whole tensors in the file, whatever the number of ranks that wrote it
            weights = sharding.shard_like(weights, self.objective.state_dict())
        differences = key_differences(run.weights, self.objective.state_dict())
        if differences:
            theirs, ours = run_description(run.config)["recipe"], run_description(self.config)["recipe"]
            recipes = (f"It was written by a {theirs} run, this is a {ours} run" if theirs != ours else
                       f"Both are {ours} runs")
            changed = setting_differences(run.config, self.config)
            if changed:
                recipes += f"; what differs: {', '.join(changed)}"
            raise CheckpointError(
                f"{path} does not fit this run's networks ({'; '.join(differences.lines())}). {recipes}: resume "
                "with the checkpoint's own config.yaml, or choose another train.output_dir")
        self.objective.load_state_dict(weights)
        with kernels_kept(self.optimizer):
            if self.shard_units:
                sharding.load_optimizer_state(self.optimizer, run["optimizer"])
            else:
                self.optimizer.load_state_dict(run["optimizer"])
        if self.scaler is not None and run["scaler"]:
            self.scaler.load_state_dict(run["scaler"])
        self.step, self.train_seconds = run["step"], run["train_seconds"]
        history = run.payload.get("plan_history")  # checkpoints before continuous re-plans have none
        if history and history[-1][1] == run["total_steps"]:
            self.replay_plan([tuple(change) for change in history])
        else:
            self.plan(run["total_steps"])
        self.budget.close()
        planned = run.config.get("train", {}).get("epochs")
        if planned is not None and planned != self.config.train.epochs:
            logger.warning("train.epochs is %g but %s was planned for %g epochs (%d steps): a resume keeps the plan "
                           "its schedules were drawn for. To train longer, start a new run from its weights "
                           "(model.pretrained=%s, whose teacher it loads, in another train.output_dir)",
                           self.config.train.epochs, path, planned, self.total_steps, path)
            self.config.train.epochs = planned  # config.yaml says what the run follows
        changed = setting_differences(run.config, self.config, ("model", "objective", "optim", "data"), most=6,
                                      ignore=("data.num_workers",), new_keys=False)
        if changed:  # allowed (a lower lr after a divergence), but said, and the earlier recipe is kept
            self.config_changed_at = self.step
            logger.warning("resuming %s with settings that differ from its run's: %s. Training goes on with these "
                           "from step %d; the earlier config.yaml is kept as config_until_step_%d.yaml",
                           path, "; ".join(changed), self.step, self.step)
        self._restore_random_states(run["rng"])
        self.results["resumed_from_step"] = self.step
        logger.info("resumed from %s at step %d of %d (epoch %.2f)", path, self.step, self.total_steps,
                    self.step / self.steps_per_epoch)

    @staticmethod
    def _restore_random_states(rng: Any) -> None:
        if not isinstance(rng, list):
            checkpointing.set_rng_state(rng)
            return
        # one per rank; on another number of ranks, rank 0's with a per-rank offset
        same_ranks = len(rng) == distributed.world_size()
        checkpointing.set_rng_state(rng[distributed.rank()] if same_ranks else rng[0])
        if not same_ranks and distributed.world_size() > 1:
            torch.manual_seed(int(torch.randint(2**31, (1,)).item()) + distributed.rank())

    # ------------------------------------------------------------------------------------------- one step

    def _clip(self, parameters: List[torch.nn.Parameter]) -> float:
        """Gradient clipping; returns the total gradient norm before clipping."""
        grads = [distributed.local(p.grad) for p in parameters if p.grad is not None]
        if not grads:
            return 0.0
        squares = torch.stack(torch._foreach_norm(grads)).double() ** 2
        if self.shard_units:  # each rank holds a slice of every gradient: the squares add up over ranks
            distributed.all_reduce_sum(squares)
        norms = squares.sqrt()
        total = float(norms.norm())
        clip = self.config.optim.clip_grad
        if clip > 0 and math.isfinite(total):
            if self.config.optim.clip_mode == "per_param":  # DINO: each tensor to norm <= clip
                factors = torch.clamp(clip / (norms + 1e-6), max=1.0).to(grads[0].dtype)
                torch._foreach_mul_(grads, list(factors.unbind()))
            elif total > clip:
                torch._foreach_mul_(grads, clip / (total + 1e-6))
        return total

    def _diverged(self, what: str, value: float, info: StepInfo) -> None:
        latest = self.output_dir / checkpointing.LATEST
        saved = f"the last good checkpoint ({latest}) is untouched" if latest.is_file() else "no checkpoint was written"
        message = (
            f"{what} is {value} at step {info.step + 1} (epoch {info.epoch:.2f}); stopped without saving, so {saved}. "
            f"Likely causes: a learning rate too high for the batch (lr now {self.lr_schedule[info.step]:.3g}), "
            "fp16 overflow (use train.precision=bf16), too little warm-up, or a broken batch. Resume with a lower "
            "optim.lr or more optim.warmup_epochs, or set train.nan_policy=skip to skip such steps")
        if self.config.train.nan_policy == "stop":
            raise TrainingDiverged(message)
        self.skipped.in_a_row += 1
        self.skipped.total += 1
        logger.warning("skipping step %d: %s is %s (%d in a row)", info.step + 1, what, value, self.skipped.in_a_row)
        if self.skipped.in_a_row > self.config.train.max_skipped_steps:
            raise TrainingDiverged(f"{self.skipped.in_a_row} non-finite steps in a row. " + message)

    def train_step(self, micro_batches: List[Dict[str, Any]]) -> Optional[Dict[str, float]]:
        """One optimizer step over the micro-batches (gradient accumulation) at self.step; returns the values to
        log (means over ranks), or None for a step skipped as non-finite. Does not advance self.step."""
        info = StepInfo(self.step, self.total_steps, self.steps_per_epoch)
        set_lr_and_wd(self.optimizer, float(self.lr_schedule[self.step]), float(self.wd_schedule[self.step]))
        trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        logged: Dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            if self.shard_units:  # reduce the gradients once, after the last micro-batch
                sharding.sync_gradients(self.shard_units, index == len(micro_batches) - 1)
            batch = _to_device(batch, self.device)
            with autocast(self.precision, self.device):
                outputs = self.objective(batch, info)
            loss = outputs["loss"]
            if distributed.any_rank(not bool(torch.isfinite(loss.detach()))):
                self.optimizer.zero_grad(set_to_none=True)
                self._diverged("the loss", loss.item(), info)
                return None
            scaled = loss / len(micro_batches)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for key, value in outputs.items():
                logged[key] = logged.get(key, 0.0) + scalar(value) / len(micro_batches)
        if self.shard_units:  # sharded gradients arrive averaged; networks run without backward stay gathered
            sharding.reshard(self.shard_units)
        else:
            distributed.average_gradients(trainable)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip(trainable)
        if not math.isfinite(grad_norm) and not self.scaler:  # fp16's scaler skips such steps by itself
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged("the gradient norm", grad_norm, info)
            return None
        self.objective.before_optimizer_step(info)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.after_optimizer_step(info)
        self.skipped.in_a_row = 0
        logged = distributed.mean_over_ranks(logged)  # each rank's losses are over its share of the batch
        logged["grad_norm"] = grad_norm
        return logged

    # ------------------------------------------------------------------------------------------- the loop

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (preemption, time limits), and a first Ctrl-C (SIGINT): finish the step, checkpoint,
        and stop. A second Ctrl-C stops at once, without the checkpoint (the last one written stays)."""
        if threading.current_thread() is not threading.main_thread():
            return

        received: List[signal.Signals] = []

        def request_stop(signum, frame):
            received.append(signal.Signals(signum))
            self.stop_reason = "signal " + " + ".join(s.name for s in dict.fromkeys(received))
            # the launcher's requeue signal wins over a SIGTERM that came with it (scancel sends both)
            self.stop_signal = signal.SIGUSR2 if signal.SIGUSR2 in received else received[0]

        # USR2 is submitit's preemption / time-limit signal; its own handler (which requeues the job) is called
        # after the checkpoint is written (see _hand_on_signal)
        self.previous_handlers = {sig: signal.signal(sig, request_stop)
                                  for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}

        def interrupt(signum, frame):
            if signal.SIGINT in received:
                raise KeyboardInterrupt
            request_stop(signum, frame)
            logger.warning("Ctrl-C: finishing the step and writing a checkpoint (Ctrl-C again stops at once, "
                           "without it)")

        self.previous_interrupt = signal.signal(signal.SIGINT, interrupt)

    def _hand_on_signal(self) -> None:
        """After the stop's checkpoint: give the signal to the handler it replaced (submitit requeues there)."""
        handler = self.previous_handlers.get(self.stop_signal)  # none for Ctrl-C: the stop is all it asked
        for sig, previous in self.previous_handlers.items():
            signal.signal(sig, previous)
        if callable(handler):
            logger.info("checkpoint written; handing %s on to the launcher", signal.Signals(self.stop_signal).name)
            handler(self.stop_signal, None)

    def _log_step(self, logged: Dict[str, float], images_per_second: float, bar) -> None:
        self.losses.append(logged["loss"])
        bar.set_postfix(loss=f"{logged['loss']:.4f}", img_s=f"{images_per_second:.0f}", refresh=False)
        if self.step % self.config.train.log_every_steps == 0 or self.step == 1:
            self.metrics.write({
                "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **logged,
                "lr": float(self.lr_schedule[self.step - 1]), "wd": float(self.wd_schedule[self.step - 1]),
                **self.objective.scheduled_values(self.step - 1), "images_per_second": round(images_per_second, 1),
                "train_seconds": round(self.train_seconds, 2)})

    def _stop_due(self, signalled: bool) -> Optional[str]:
        """Why the loop ends after this step, from facts every rank shares (rank 0's clock, any rank's signal)."""
        t = self.config.train
        reasons = [("another rank was told to stop", signalled),  # a signal that reached only some ranks
                   (f"train.max_steps={t.max_steps}", t.max_steps and self.step >= t.max_steps),
                   (f"time budget of {t.time_limit_minutes} min", self._budget_spent())]
        return next((reason for reason, due in reasons if due), None)

    def _budget_spent(self) -> bool:
        """The time budget is used up with more than the plan's last 1% (at least one step) still ahead. The last
        1% is trained past the limit: a plan fitted to a pace that drifted a little then still ends its schedules,
        instead of stopping a step or two short and training a step per resume after."""
        left = self.total_steps - self.step
        return (self.budget.limit_seconds > 0 and self.train_seconds >= self.budget.limit_seconds
                and left > max(1, self.total_steps // 100))

    def train(self) -> None:
        """Train from self.step (0, or where setup() resumed) until the plan is done or a stop is due; the last
        state is saved."""
        self._install_signal_handlers()
        self.last_save_time = time.monotonic()
        start_step, start_seconds = self.step, self.train_seconds
        bar = progress(total=self.total_steps, initial=self.step, desc=f"{self.config.objective.name}", unit="step",
                       disable=not self.is_main)
        self.objective.train()
        try:
            stop = self._loop(bar, start_step)
        finally:
            bar.close()
            if self.previous_interrupt is not None:  # Ctrl-C means the loop's stop only while the loop runs
                signal.signal(signal.SIGINT, self.previous_interrupt)
                self.previous_interrupt = None
        if stop:
            logger.info("stopped at step %d of %d: %s", self.step, self.total_steps, self.stop_reason)
        if self.step % self.steps_per_epoch or stop:  # the epoch-end save covered the rest
            self.save_checkpoint()
        if self.stop_signal is not None:
            self._hand_on_signal()
        self._summarise(start_step, start_seconds)

    def _loop(self, bar, start_step: int) -> bool:
        """The steps, each followed by the decisions every rank shares; returns whether a stop ended it early."""
        c = self.config
        data, smoothed_rate = None, None
        # the loop ends on decisions all ranks share: a signal handler sets stop_reason at any moment, on some ranks
        _, (stop,) = distributed.agree(0.0, self.stop_reason is not None)
        if not stop and c.train.max_steps and self.step >= c.train.max_steps:  # a resume already there: no step
            stop, self.stop_reason = True, f"train.max_steps={c.train.max_steps}"
        if not stop and self._budget_spent():  # a resume whose budget went before: no step, and why
            stop, self.stop_reason = True, (f"time budget of {c.train.time_limit_minutes} min, spent before this "
                                            "resume (raise train.time_limit_minutes to train on)")
        while self.step < self.total_steps and not stop:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            if data is None:
                self.sampler.set_epoch(epoch, start=position * c.optim.accumulate_steps)
                data = iter(self.loader)
            tick = time.perf_counter()
            logged = self.train_step([next(data) for _ in range(c.optim.accumulate_steps)])
            # rank 0's clock for every rank (budgets, time limits and refits then decide alike everywhere), whether
            # any rank is due for a periodic save, and whether any rank was signalled to stop
            save_due = time.monotonic() - self.last_save_time > c.train.checkpoint_every_minutes * 60
            seconds, (save_due, signalled) = distributed.agree(time.perf_counter() - tick, save_due,
                                                               self.stop_reason is not None)
            self.train_seconds += seconds
            if self.step - start_step >= BUDGET_WARMUP_STEPS:
                self.budget.record(seconds)
            self.step += 1
            rate = self.global_batch / seconds
            smoothed_rate = rate if smoothed_rate is None else 0.9 * smoothed_rate + 0.1 * rate
            if logged is not None:
                self._log_step(logged, smoothed_rate, bar)
            bar.total = self.total_steps
            bar.update(1)
            self.fit_budget()
            if self.step % self.steps_per_epoch == 0:
                data = None
                self._end_of_epoch(self.step // self.steps_per_epoch)
            elif save_due:
                self.save_checkpoint()
            due = self._stop_due(signalled)
            stop = due is not None
            if stop and self.stop_reason is None:
                self.stop_reason = due
        return stop

    def _summarise(self, start_step: int, start_seconds: float) -> None:
        finished = self.step >= self.total_steps
        self.results.update(status="finished" if finished else "stopped", stop_reason=self.stop_reason,
                            steps=self.step, total_steps=self.total_steps,
                            epochs=round(self.step / self.steps_per_epoch, 3),
                            train_minutes=round(self.train_seconds / 60, 2), skipped_steps=self.skipped.total)
        done, seconds = self.step - start_step, self.train_seconds - start_seconds  # this process's share
        if seconds > 0 and done:  # a resume with nothing left to do measured no pace
            self.results["images_per_second"] = round(done * self.global_batch / seconds, 1)

    def _end_of_epoch(self, epoch: int) -> None:
        every = self.config.train.save_every_epochs
        self.save_checkpoint(keep_epoch=epoch if every and epoch % every == 0 else None)
        # decided from the config alone, so that every rank takes part in gathering sharded weights
        classify_every, knn_every = self.config.eval.classify_every_epochs, self.config.eval.knn_every_epochs
        classify = bool(self.objective.epoch_classifiers()) and classify_every and epoch % classify_every == 0
        knn = knn_every and epoch % knn_every == 0 and self.step < self.total_steps
        if not (classify or knn):
            return
        whole = self._whole_objective()
        if whole is None:
            return
        if classify:
            row = {"step": self.step, "epoch": epoch}
            for name, result in self.evaluation.classify(whole.epoch_classifiers()).items():
                row.update({f"{name}_val_top1": round(result["top1"], 3), f"{name}_val_top5": round(result["top5"], 3),
                            f"{name}_val_loss": round(result["loss"], 4)})
            if len(row) > 2:
                self.metrics.write(row)
        if knn:
            result = self.evaluation.knn(whole.eval_backbone())
            if result is not None:
                self.metrics.write({"step": self.step, "epoch": epoch, **flatten_knn(result)})

    def _whole_objective(self) -> Optional[Objective]:
        """The objective to evaluate and export: the trained one, or when it is sharded an unsharded copy on rank
        0 (None elsewhere). Collective when sharded: every rank calls it at the same point."""
        if not self.shard_units:
            return self.objective if self.is_main else None
        state = sharding.full_state(self.objective.state_dict(), keep=self.is_main)
        if not self.is_main:
            return None
        if self._whole is None:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self._whole = build_objective(self.config, self.source).to(self.device)
        self._whole.load_state_dict(state)
        return self._whole.eval()

    def _write_loss_curve(self) -> None:
        if not self.is_main:
            return
        try:
            plot_loss_curve(read_metrics(self.metrics.path), self.output_dir / "loss_curve.png",
                            f"{self.config.objective.name} on {self.source.name}")
        except OSError as error:  # a picture is not worth stopping for; the checkpoint was written
            logger.warning("could not write %s: %s", self.output_dir / "loss_curve.png", error.strerror or error)

    # ------------------------------------------------------------------------------------------- the whole run

    def run(self) -> Dict[str, Any]:
        """Set up (unless done), train (or resume), evaluate, export; returns the results also written to
        results.json."""
        if self.objective is None:
            self.setup()
        e = self.config.eval
        try:
            fresh = "resumed_from_step" not in self.results
            earlier = {} if fresh else self._earlier_results()
            # (one process: every rank of several would have to see the same file to take the same way)
            if earlier.get("status") == "finished" and self.step >= self.total_steps and distributed.world_size() == 1:
                logger.info("%s already finished at step %d: its results.json stands, nothing to do (distill eval "
                            "evaluates it again; another train.output_dir trains anew)", self.output_dir, self.step)
                self.results = earlier
                return self.results
            # what only the first session measured (the backbone at start, raw pixels) stays in results.json
            self.results.update({k: v for k, v in earlier.items() if k in ("knn_start", "knn_raw_pixels")})
            if self.is_main and e.raw_pixels and "knn_raw_pixels" not in self.results:
                pixels = self.evaluation.raw_pixels()
                if pixels:
                    self.results["knn_raw_pixels"] = pixels
            if e.knn_at_start and fresh:
                whole = self._whole_objective()
                start = self.evaluation.knn(whole.eval_backbone()) if whole is not None else None
                if start is not None:
                    self.results["knn_start"] = start
            self.train()
            whole = self._whole_objective()
            if self.is_main:
                self._finish(whole)
        except Exception as error:  # the run's own log keeps why it ended (the command line says it too)
            self._log_to_file(error)
            raise
        finally:
            self.close()
        return self.results

    def close(self) -> None:
        """Ends what setup() opened: the metrics file, the run's log file and the run folder's lock. run() calls
        it when it ends; after a setup() without run() (a notebook, a script that only saves or evaluates), call it,
        or use the trainer as a context manager, so that another process may write into the folder."""
        if self.metrics is not None:
            self.metrics.close()
        if self._log_handler is not None:
            logging.getLogger("distill").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        release_folder(self.output_dir)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _earlier_results(self) -> Dict[str, Any]:
        """results.json of the sessions before a resume ({} if none or unreadable)."""
        try:
            earlier = json.loads((self.output_dir / "results.json").read_text())
        except (OSError, ValueError):
            return {}
        return earlier if isinstance(earlier, dict) else {}

    def _log_to_file(self, error: Exception) -> None:
        if self._log_handler is None:
            return
        message = str(error) if isinstance(error, DistillError) else "the run failed"
        record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, message, None,
                                   None if isinstance(error, DistillError) else (type(error), error,
                                                                                 error.__traceback__))
        self._log_handler.handle(record)

    def _finish(self, whole: Objective) -> None:
        """Exports, the last evaluations, the loss curve and results.json (rank 0)."""
        e = self.config.eval
        self.results["exported"] = [str(p) for p in whole.export(self.output_dir)]
        if self.stop_signal is not None:  # a stopped (preempted) job has seconds left: the resume evaluates
            self.results["evaluation"] = "skipped: stopped by a signal; the resumed run evaluates at its end"
            self._write_loss_curve()
            self._write_results()
            return
        classified = self.evaluation.classify(whole.classifiers())
        if classified:
            self.results["val"] = classified
        if e.knn:
            end = self.evaluation.knn(whole.eval_backbone())
            if end is not None:
                self.results["knn_end"] = end
        if e.attention_images:
            figure = self.evaluation.attention_figure(whole.eval_backbone(), e.attention_images,
                                                      self.output_dir / "attention.png")
            self.results["attention_figure"] = str(figure.path)
        self._write_loss_curve()
        self._write_results()

    def _write_results(self) -> None:
        try:
            atomic_write_text(self.output_dir / "results.json", json.dumps(self.results, indent=2))
        except OSError as error:
            raise CheckpointError(f"could not write {self.output_dir / 'results.json'}: {error.strerror or error} "
                                  "(the checkpoint and exports are written): free space and rerun the same command "
                                  "to write it") from None


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    if device.type == "cpu":
        return batch
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list):
            moved[key] = [v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for v in value]
        else:
            moved[key] = value
    return moved


def run_training(config: TrainConfig) -> Trainer:
    """`distill train` and a submitted job alike: run a checked config, then leave the process group (after the
    ranks meet, when the run ended normally everywhere). Returns the trainer (its results, its stop signal)."""
    trainer = Trainer(config)
    finished = False
    try:
        trainer.run()
        finished = True
    finally:
        distributed.shutdown(meet=finished)
    return trainer


class QuietFileHandler(logging.FileHandler):
    """The run's log file. A record it cannot write (a full disk) is dropped: the failure itself reaches the user
    as an error, without the logging module's own traceback on top."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _plain(config: Any) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return config if isinstance(config, dict) else OmegaConf.to_container(OmegaConf.structured(config))


def _leaves(tree: Any, prefix: str) -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {key: value for name, sub in tree.items() for key, value in _leaves(sub, f"{prefix}.{name}").items()}


def setting_differences(theirs: Any, ours: Any, sections: Tuple[str, ...] = ("model", "objective"),
                        most: int = 4, ignore: Tuple[str, ...] = (), new_keys: bool = True) -> List[str]:
    """The settings of `sections` that differ between a checkpoint's run config and this run's, as
    "model.overrides.mlp_ratio 4.0 there, 2.0 here" (at most `most`, then how many more), for messages that refuse
    a resume: the networks' shapes follow from these sections."""
    theirs, ours = _plain(theirs), _plain(ours)
    missing = object()
    lines = []
    for section in sections:
        old, new = _leaves(theirs.get(section, {}), section), _leaves(ours.get(section, {}), section)
        for key in sorted(set(old) | set(new)):
            if key in ignore or (not new_keys and key not in old):  # (a key its version did not have)
                continue
            was, now = old.get(key, missing), new.get(key, missing)
            if was != now:
                was, now = ("unset" if value is missing else value for value in (was, now))
                lines.append(f"{key} {was} there, {now} here")
    return lines[:most] + ([f"{len(lines) - most} more"] if len(lines) > most else [])


def run_description(config: Any) -> Dict[str, str]:
    """"backbone" and "recipe" (objective, backbone and its width) of a run config (the typed one, or the plain
    containers a checkpoint stores), for messages that compare two runs."""
    plain = _plain(config)
    name, overrides = plain["model"]["backbone"], dict(plain["model"]["overrides"])
    try:
        kwargs = backbone_kwargs(name, **{k: v for k, v in overrides.items() if k in backbone_options(name)})
    except DistillError:
        kwargs = dict(overrides)
    shape = ", ".join(f"{key} {kwargs[key]}" for key in ("embed_dim", "depth", "patch_size") if key in kwargs)
    backbone = f"{name} ({shape})" if shape else name
    return {"backbone": backbone, "recipe": f"{plain['objective']['name']} / {backbone}"}
