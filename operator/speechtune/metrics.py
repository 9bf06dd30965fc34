"""Prometheus metrics, with the same names in `speechtune run` and the operator.

Labels never carry a trial number: studies have thousands of trials.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_STUDY = ["namespace", "study"]
WER_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, float("inf"))

TRIALS = Gauge("speechtune_trials", "Trials of a study by current state", _STUDY + ["state"])
# "stage": the spec.stages entry the trial ran in ("" for a study without stages)
TRIALS_FINISHED = Counter("speechtune_trials_finished", "Trials that ended, by stage and final state", _STUDY + ["stage", "state"])
BEST_VALUE = Gauge("speechtune_best_value", "Best objective value of a study so far", _STUDY + ["metric"])
REPORTED_VALUE = Histogram(
    "speechtune_reported_value", "Objective values reported by trials, by step (bucketed) or rung",
    _STUDY + ["step"], buckets=WER_BUCKETS,
)
PRUNED = Counter("speechtune_pruned", "Trials stopped early by the pruner", _STUDY)
PROMOTIONS = Counter("speechtune_promotions", "Configurations promoted to a higher fidelity level", _STUDY + ["rung"])
PROXY_CORRELATION = Gauge(
    "speechtune_proxy_rank_correlation", "Spearman rho between adjacent fidelity levels' objectives",
    _STUDY + ["from_level", "to_level"],
)
PROXY_COST_SHARE = Gauge(
    "speechtune_proxy_cost_share", "What reaching a fidelity level costs as a share of reaching the top (medians of measured run times)",
    _STUDY + ["level"],
)
TRIAL_DURATION = Histogram(
    "speechtune_trial_duration_seconds", "Wall time of finished trials, by stage and final state", _STUDY + ["stage", "state"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600, float("inf")),
)
STAGE_ACTIVE = Gauge("speechtune_stage_active", "1 for the stage a study is running now, 0 for its other stages", _STUDY + ["stage"])
STAGE_BEST_VALUE = Gauge("speechtune_stage_best_value", "Best objective value found in a stage", _STUDY + ["stage", "metric"])
SUGGEST_SECONDS = Histogram(
    "speechtune_suggest_seconds", "Time spent sampling a new trial (ask)", _STUDY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf")),
)
METRIC_LAG = Histogram(
    "speechtune_metric_lag_seconds", "From a trainer printing a value to the value being in storage", _STUDY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, float("inf")),
)
GPU_SECONDS = Counter(
    "speechtune_gpu_seconds", "Requested nvidia.com/gpu x run time of trial runs, counted as their output arrives", _STUDY,
)
WORKER_IDLE_SECONDS = Counter(
    "speechtune_worker_idle_seconds", "Time warm workers were up without a run (capacity held for nothing)", _STUDY,
)
WORKER_IDLE_GPU_SECONDS = Counter(
    "speechtune_worker_idle_gpu_seconds", "Requested nvidia.com/gpu x idle time of warm workers: GPU time no run used", _STUDY,
)
WORKER_IGNORED_LINES = Counter(
    "speechtune_worker_ignored_lines", "Protocol lines a warm worker printed for a run it was not executing: ignored", _STUDY,
)
GPU_RESOURCE = "nvidia.com/gpu"


def requested_gpus(resources: dict) -> float:
    """GPUs a trial's container asks for: requests, else limits (Kubernetes defaults one to the other).

    0 without any, or for a value that is not a plain number: the API server accepts only whole
    GPUs, so such a trial would not launch anyway.
    """
    for kind in ("requests", "limits"):
        value = (resources.get(kind) or {}).get(GPU_RESOURCE)
        if value is not None:
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0


def step_bucket(step: int) -> str:
    """Exact steps up to 16, then powers of two, so the label set stays small."""
    if step <= 16:
        return str(step)
    bucket = 32
    while step > bucket:
        bucket *= 2
    return f"le{bucket}"
