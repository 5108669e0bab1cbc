"""A time budget as a plan: how many optimizer steps fit train.time_limit_minutes at the pace the run goes."""

from dataclasses import dataclass
from typing import Optional

BUDGET_WARMUP_STEPS = 3  # first steps pay one-time costs (allocations, compilation): not timed
BUDGET_PROBE_STEPS = 10  # steps timed to fit the schedule into a time budget
# shares of the budget after which the plan is fitted again to the pace since the last fit: early on because the
# first steps are often slower, late so that a pace that drifts in the last third still ends the schedules on time
BUDGET_REFIT_AT = (0.05, 0.15, 0.3, 0.6, 0.85, 0.95)


@dataclass
class TimeBudget:
    """train.time_limit_minutes as a plan: the first fit after BUDGET_PROBE_STEPS timed steps; early steps are often
    slower (workers and caches warming up), so the plan is fitted again after each share of the budget in
    BUDGET_REFIT_AT to the pace of the steps timed since the last fit. A resumed run keeps the plan it made when
    it started (close())."""

    limit_seconds: float
    fits: int = 0  # plans fitted so far
    window_steps: int = 0  # steps timed since the last fit
    window_seconds: float = 0.0
    pace: float = 0.0  # seconds per step at the last fit

    def record(self, seconds: float) -> None:
        self.window_steps += 1
        self.window_seconds += seconds

    def close(self) -> None:
        self.fits = len(BUDGET_REFIT_AT) + 1

    def steps_that_fit(self, step: int, train_seconds: float) -> Optional[int]:
        """When a fit is due: the number of steps in all that fit the budget at the recent pace (the window is
        then started again); None when no fit is due."""
        if self.limit_seconds <= 0 or self.fits > len(BUDGET_REFIT_AT) or self.window_steps < BUDGET_PROBE_STEPS:
            return None
        if self.fits and train_seconds < BUDGET_REFIT_AT[self.fits - 1] * self.limit_seconds:
            return None
        self.pace = self.window_seconds / self.window_steps
        self.fits += 1
        self.window_steps, self.window_seconds = 0, 0.0
        return step + int((self.limit_seconds - train_seconds) / self.pace)
