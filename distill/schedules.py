"""Per-iteration schedules as arrays, one value per optimizer step (DINO's convention)."""

import numpy as np

from distill.errors import InputError


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from warmup_start to base_value over warmup_steps, then a half cosine from base_value
    down (or up) to final_value over the remaining steps; exactly DINO's cosine_scheduler."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise InputError(f"schedule needs 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps}), total > 0")
    warmup = np.linspace(warmup_start, base_value, warmup_steps) if warmup_steps else np.array([])
    steps = np.arange(total_steps - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup, cosine))


def warmup_then_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear from start to end over warmup_steps, then end (DINO's teacher temperature, per step)."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(start, end, warmup_steps) if warmup_steps else np.array([])
    return np.concatenate((warmup, np.full(total_steps - warmup_steps, end)))


def epochs_to_steps(epochs: float, total_epochs: float, total_steps: int) -> int:
    """A length given in epochs, as steps of a plan of total_steps for total_epochs (a time budget may
    compress the plan; lengths keep their share of it)."""
    return int(round(total_steps * min(epochs, total_epochs) / total_epochs)) if total_epochs > 0 else 0


def stretch_ahead(schedule: np.ndarray, step: int, total_steps: int) -> np.ndarray:
    """A schedule re-planned at `step` for a run of total_steps: the values up to `step` kept, and what was still
    ahead (schedule[step:]) stretched or compressed to fill steps step..total_steps-1, so the curve goes on from
    where it is, without a jump, and still ends on its final value. A time budget re-fitted mid-run uses it."""
    schedule = np.asarray(schedule)
    ahead = total_steps - step
    if step >= len(schedule) or ahead <= 0:
        return schedule[:total_steps] if ahead <= 0 else np.concatenate(
            (schedule, np.full(total_steps - len(schedule), schedule[-1])))
    remaining = len(schedule) - step
    positions = step + np.arange(ahead) * ((remaining - 1) / (ahead - 1) if ahead > 1 else 0.0)
    return np.concatenate((schedule[:step], np.interp(positions, np.arange(len(schedule)), schedule)))
