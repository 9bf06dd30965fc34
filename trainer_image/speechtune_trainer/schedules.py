"""A warmup + exponential-decay schedule, registered with NeMo under `WarmupExponentialAnnealing`.

NeMo has warmup+cosine and torch's ExponentialLR, but no exponential decay after a linear
warmup. This one decays from the peak to `min_lr` over `max_steps`, so its shape does not
depend on the number of steps per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo.core.config.schedulers import WarmupSchedulerParams
from nemo.core.optim.lr_scheduler import AVAILABLE_SCHEDULERS, WarmupPolicy, register_scheduler

NAME = "WarmupExponentialAnnealing"


@dataclass
class WarmupExponentialAnnealingParams(WarmupSchedulerParams):
    min_lr: float = 0.0


class WarmupExponentialAnnealing(WarmupPolicy):
    """Linear warmup to the base lr, then lr = base * (min_lr / base) ** progress, progress 0 -> 1 at max_steps.

    min_lr must be positive (config.py sets it to a fraction of the peak).
    """

    def _get_lr(self, step):
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return [base * (self.min_lr / base) ** progress for base in self.base_lrs]


def register() -> None:
    """Make the schedule available to NeMo's `optim.sched.name` (idempotent)."""
    if NAME not in AVAILABLE_SCHEDULERS:
        register_scheduler(NAME, WarmupExponentialAnnealing, WarmupExponentialAnnealingParams)
